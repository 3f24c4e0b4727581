"""Conversions against hand-computed values (bit patterns, rounding, byte layouts)."""

import array
import io
import math
import struct

from builtin_interfaces.msg import Time
from marigold_ros.conversions import COLOR_ENCODINGS, compressed_to_rgb, depth_to_image
from marigold_ros.conversions import image_to_depth, image_to_rgb, ImageConversionError
from marigold_ros.conversions import mono16_to_mono8, organized_cloud_msg, pack_rgb
from marigold_ros.conversions import pointcloud2_from_depth, pointcloud2_to_xyz, rgb_to_image
from marigold_ros.conversions import PointCloudConversionError, rgb_to_compressed
import numpy as np
from PIL import Image as PILImage
import pytest
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header


def test_mono16_to_mono8_rounds_like_cv_bridge():
    """255 / 65535 = 1 / 257: 257 k maps to k, and 128 / 257 = 0.498 rounds down, 129 up."""
    values = np.array([0, 257, 128, 129, 65535, 257 * 100 + 129], dtype=np.uint16)
    assert mono16_to_mono8(values).tolist() == [0, 1, 0, 1, 255, 101]
    assert mono16_to_mono8(values).dtype == np.uint8


def test_pack_rgb_bit_pattern():
    """0x00RRGGBB: red in bits 16-23, green 8-15, blue 0-7."""
    packed = pack_rgb(np.array([[0x12, 0x34, 0x56], [255, 0, 1]], dtype=np.uint8))
    assert packed.dtype == np.uint32
    assert packed.tolist() == [0x123456, 0xFF0001]


def test_mono16_to_mono8_near_a_rounding_boundary():
    """64893 * 255 / 65535 = 252.50195 rounds up (a 65536 divisor would give 252.498)."""
    assert mono16_to_mono8(np.array([64893], dtype=np.uint16)).tolist() == [253]


def _header():
    return Header(stamp=Time(sec=3, nanosec=4), frame_id='cam')


def test_depth_to_image_layout_and_refusal():
    """32FC1, little endian, step 4 * width, the header kept; non-float input refused."""
    depth = np.array([[1.5, np.nan, 2.0], [0.25, 3.0, np.inf]])
    msg = depth_to_image(depth, _header())
    assert msg.header.frame_id == 'cam' and msg.header.stamp.sec == 3
    assert (msg.height, msg.width, msg.step, msg.encoding) == (2, 3, 12, '32FC1')
    assert bytes(msg.data) == struct.pack('<6f', 1.5, math.nan, 2.0, 0.25, 3.0, math.inf)
    for bad in (np.zeros((2, 3), np.int32), np.zeros(3)):
        with pytest.raises(ImageConversionError, match='expected an HxW float depth') as err:
            depth_to_image(bad, _header())
        assert err.value.reason == 'bad_array'


def test_image_to_depth_limits_and_message():
    """max_pixels applies to 32FC1 too; an unknown encoding names the supported ones."""
    msg = Image(height=2, width=3, encoding='32FC1', step=12, data=bytes(24))
    assert image_to_depth(msg).shape == (2, 3)
    with pytest.raises(ImageConversionError) as err:
        image_to_depth(msg, max_pixels=5)
    assert err.value.reason == 'too_large'
    msg16 = Image(height=2, width=3, encoding='16UC1', step=6, data=bytes(12))
    with pytest.raises(ImageConversionError) as err:
        image_to_depth(msg16, max_pixels=5)
    assert err.value.reason == 'too_large'
    msg.encoding = 'mono16'
    with pytest.raises(ImageConversionError,
                       match=r'supported: 32FC1 \(meters\), 16UC1 \(millimeters\)$'):
        image_to_depth(msg)


def test_organized_cloud_defaults_and_plain_data():
    """Colour is declared by default; data that is not an array('B') goes through the setter."""
    msg = organized_cloud_msg(_header(), 1, 2, bytes(range(32)))
    assert [f.name for f in msg.fields] == ['x', 'y', 'z', 'rgb']
    assert [f.offset for f in msg.fields] == [0, 4, 8, 12]
    assert (msg.point_step, msg.row_step, msg.is_dense) == (16, 32, False)
    assert isinstance(msg.data, array.array) and list(msg.data) == list(range(32))
    assert msg.header.frame_id == 'cam'
    fast = organized_cloud_msg(_header(), 1, 1, array.array('B', range(16)), colour=False)
    assert [f.name for f in fast.fields] == ['x', 'y', 'z'] and list(fast.data) == list(range(16))


def test_pointcloud2_from_depth_refusals_name_the_shape():
    """A 2-D or wrong-width point array, or mismatched colours, raise ValueError."""
    header = _header()
    for bad in (np.zeros((4, 3)), np.zeros((2, 2, 4))):
        with pytest.raises(ValueError, match='points_xyz must be HxWx3'):
            pointcloud2_from_depth(bad, None, header)
    with pytest.raises(ValueError, match=r'rgb must be uint8 of shape \(2, 3, 3\)'):
        pointcloud2_from_depth(np.zeros((2, 3, 3)), np.zeros((2, 3, 3), np.int16), header)


def _cloud(fields, point_step, width=2, row_step=None, data=None):
    """Build a cloud by hand: float32 fields given as (name, offset)."""
    msg = PointCloud2(height=1, width=width, point_step=point_step,
                      row_step=row_step if row_step is not None else width * point_step)
    msg.fields = [PointField(name=n, offset=o, datatype=PointField.FLOAT32, count=1)
                  for n, o in fields]
    msg.data = data if data is not None else bytes(width * point_step)
    return msg


def test_pointcloud2_to_xyz_layout_checks_by_hand():
    """A field ending exactly at point_step fits; one byte more does not; reasons named."""
    data = struct.pack('<6f', 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    xyz = pointcloud2_to_xyz(_cloud([('x', 0), ('y', 4), ('z', 8)], 12, data=data))
    assert xyz.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    with pytest.raises(PointCloudConversionError,
                       match=r"field 'z' \(offset 12, 4 bytes\) does not fit in point_step 12"
                       ) as err:
        pointcloud2_to_xyz(_cloud([('x', 0), ('y', 4), ('z', 12)], 12))
    assert err.value.reason == 'bad_layout'
    with pytest.raises(PointCloudConversionError,
                       match=r'row_step 20 < width 2 \* point_step 12') as err:
        pointcloud2_to_xyz(_cloud([('x', 0), ('y', 4), ('z', 8)], 12, row_step=20))
    assert err.value.reason == 'bad_layout'
    with pytest.raises(PointCloudConversionError,
                       match=r'has 20 bytes, 24 needed for 1x2 points') as err:
        pointcloud2_to_xyz(_cloud([('x', 0), ('y', 4), ('z', 8)], 12, data=bytes(20)))
    assert err.value.reason == 'truncated'


def test_pointcloud2_to_xyz_missing_and_unsupported_fields_are_named():
    """The message lists the fields there are; the datatype message names the supported."""
    with pytest.raises(PointCloudConversionError,
                       match=r"no 'x' field \(fields: y, z\)$") as err:
        pointcloud2_to_xyz(_cloud([('y', 4), ('z', 8)], 12))
    assert err.value.reason == 'missing_field'
    msg = _cloud([('x', 0), ('y', 4), ('z', 8)], 12)
    msg.fields[1].datatype = PointField.INT32
    with pytest.raises(PointCloudConversionError,
                       match=r'only FLOAT32 \(7\) and FLOAT64 \(8\) are supported$'):
        pointcloud2_to_xyz(msg)


def test_empty_cloud_keeps_the_requested_dtype():
    """No points: a (0, 3) array of the requested (default float32) dtype."""
    msg = _cloud([('x', 0), ('y', 4), ('z', 8)], 12, width=0)
    assert pointcloud2_to_xyz(msg).dtype == np.float32
    assert pointcloud2_to_xyz(msg, dtype=None).dtype == np.float32
    assert pointcloud2_to_xyz(msg, dtype=np.float64).dtype == np.float64


def test_rgb_to_image_mono16_from_a_2d_array_by_hand():
    """A 2-D uint16 array is written as is for mono16, little endian, 2 bytes a pixel."""
    grey = np.array([[0x0102, 0xFFFE]], dtype=np.uint16)
    msg = rgb_to_image(grey, _header(), 'mono16')
    assert (msg.encoding, msg.step, bytes(msg.data)) == ('mono16', 4, b'\x02\x01\xfe\xff')
    with pytest.raises(ImageConversionError,
                       match=r'^mono16 from a 2-D array needs dtype uint16, got uint8$') as err:
        rgb_to_image(grey.astype(np.uint8), _header(), 'mono16')
    assert err.value.reason == 'bad_array'


@pytest.mark.parametrize('bad', [np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3), np.uint8),
                                 np.zeros((2, 3, 3), np.uint16)])
def test_rgb_to_image_refuses_anything_but_hxwx3_uint8(bad):
    """Four channels, a 2-D array for rgb8, or 16 bits: 'bad_array' naming what it got."""
    expected = f'expected an HxWx3 uint8 RGB array, got shape {bad.shape} dtype {bad.dtype}'
    with pytest.raises(ImageConversionError) as err:
        rgb_to_image(bad, _header())
    assert str(err.value) == expected
    assert err.value.reason == 'bad_array'


def test_rgb_to_image_luma_by_hand():
    """BT.601 luma 0.299 R + 0.587 G + 0.114 B, rounded; mono16 is that times 257."""
    rgb = np.array([[[255, 255, 255], [100, 50, 200], [0, 0, 0], [10, 0, 0], [0, 0, 13]]],
                   dtype=np.uint8)
    # 255; 29.9 + 29.35 + 22.8 = 82.05; 0; 2.99; 1.482
    luma = [255, 82, 0, 3, 1]
    mono8 = rgb_to_image(rgb, _header(), 'mono8')
    assert (mono8.encoding, mono8.step, list(mono8.data)) == ('mono8', 5, luma)
    mono16 = rgb_to_image(rgb, _header(), 'mono16')
    assert (mono16.encoding, mono16.step) == ('mono16', 10)
    assert list(struct.unpack('<5H', bytes(mono16.data))) == [257 * v for v in luma]
    grey = np.array([[7, 250]], dtype=np.uint8)
    assert list(rgb_to_image(grey, _header(), 'mono8').data) == [7, 250]


def _encoded(image, fmt, **kwargs):
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _compressed(data, fmt='png'):
    return CompressedImage(format=fmt, data=data)


def _refusal(call, *args, **kwargs):
    with pytest.raises(ImageConversionError) as err:
        call(*args, **kwargs)
    return err.value.reason, str(err.value)


def test_compressed_to_rgb_sizes_modes_and_formats():
    """One-pixel sides decode; max_pixels is inclusive; grey becomes RGB; BMP is refused."""
    tall = np.arange(5, dtype=np.uint8).reshape(5, 1, 1).repeat(3, axis=2) * 40
    got = compressed_to_rgb(_compressed(_encoded(PILImage.fromarray(tall), 'PNG')))
    assert np.array_equal(got, tall)
    wide = tall.transpose(1, 0, 2).copy()
    got = compressed_to_rgb(_compressed(_encoded(PILImage.fromarray(wide), 'PNG')), max_pixels=5)
    assert np.array_equal(got, wide)
    grey = np.array([[0, 7], [200, 255]], dtype=np.uint8)
    got = compressed_to_rgb(_compressed(_encoded(PILImage.fromarray(grey, 'L'), 'PNG')))
    assert got.shape == (2, 2, 3) and np.array_equal(got, np.repeat(grey[:, :, None], 3, 2))
    bmp = _encoded(PILImage.fromarray(grey, 'L'), 'BMP')
    reason, text = _refusal(compressed_to_rgb, _compressed(bmp, 'bmp'))
    assert reason == 'corrupt_compressed'
    assert text.startswith(f"compressed image (format 'bmp', {len(bmp)} bytes starting 42 4d ")
    assert text.endswith('is corrupt or not JPEG / PNG: no decoder recognises it')


def test_compressed_to_rgb_refusals_name_the_problem():
    """Depth formats, no data and a too-large image: exact messages."""
    assert _refusal(compressed_to_rgb, _compressed(b'x', '16UC1; compressedDepth png')) == (
        'unknown_encoding', "compressed format '16UC1; compressedDepth png' is a depth image, "
        'not colour')
    assert _refusal(compressed_to_rgb, _compressed(b'')) == (
        'empty', 'compressed image has no data')
    small = _encoded(PILImage.fromarray(np.zeros((2, 3, 3), np.uint8)), 'PNG')
    reason, text = _refusal(compressed_to_rgb, _compressed(small), max_pixels=5)
    assert (reason, text) == ('too_large', 'compressed image 3x2 exceeds max_pixels=5')


def test_rgb_to_compressed_defaults_by_hand():
    """Default: JPEG at quality 90 ('jpg' is the same); PNG is lossless; refusals named."""
    rgb = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    header = _header()
    default = rgb_to_compressed(rgb, header)
    assert default.format == 'rgb8; jpeg compressed bgr8'
    expected = _encoded(PILImage.fromarray(rgb), 'JPEG', quality=90)
    assert bytes(default.data) == expected
    assert bytes(rgb_to_compressed(rgb, header, 'jpg').data) == expected
    assert rgb_to_compressed(rgb, header, 'jpg').format == 'rgb8; jpeg compressed bgr8'
    png = rgb_to_compressed(rgb, header, 'png')
    assert png.format == 'rgb8; png compressed bgr8'
    assert np.array_equal(np.asarray(PILImage.open(io.BytesIO(bytes(png.data)))), rgb)
    assert _refusal(rgb_to_compressed, rgb, header, 'webp') == (
        'unknown_encoding', "cannot compress to 'webp'; use jpeg or png")
    for bad in (np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3), np.uint8)):
        assert _refusal(rgb_to_compressed, bad, header) == (
            'bad_array', f'expected an HxWx3 uint8 RGB array, got shape {bad.shape} dtype uint8')


def test_image_to_rgb_names_depth_and_unknown_encodings():
    """A depth encoding (any case) and an unknown one get their own messages."""
    supported = ', '.join(COLOR_ENCODINGS)
    for encoding in ('16UC1', '32fc1'):
        msg = Image(height=1, width=1, encoding=encoding, step=4, data=bytes(4))
        assert _refusal(image_to_rgb, msg) == (
            'unknown_encoding', f'encoding {encoding!r} is a depth encoding, not a colour '
            f'image; supported: {supported}')
    msg = Image(height=1, width=1, encoding='foo', step=4, data=bytes(4))
    assert _refusal(image_to_rgb, msg) == (
        'unknown_encoding', f"unsupported image encoding 'foo'; supported: {supported}")


def test_rgb_to_image_little_endian_and_unknown_encoding():
    """Output is little endian (is_bigendian 0); an unknown encoding names the writable ones."""
    msg = rgb_to_image(np.zeros((1, 2, 3), np.uint8), _header(), 'bgr8')
    assert msg.is_bigendian == 0 and msg.step == 6
    assert _refusal(rgb_to_image, np.zeros((1, 2, 3), np.uint8), _header(), 'yuv422') == (
        'unknown_encoding', "rgb_to_image cannot write encoding 'yuv422'; supported: rgb8, "
        'bgr8, rgba8, bgra8, mono8, mono16')


def test_image_to_rgb_mono16_and_yuv_limits_by_hand():
    """mono16 to three equal 8-bit channels; max_pixels and odd YUV widths are refused."""
    msg = Image(height=1, width=2, encoding='mono16', step=4, is_bigendian=0,
                data=struct.pack('<2H', 257 * 9, 65535))
    assert image_to_rgb(msg).tolist() == [[[9, 9, 9], [255, 255, 255]]]
    assert _refusal(image_to_rgb, msg, max_pixels=1)[0] == 'too_large'
    yuv = Image(height=1, width=2, encoding='yuv422', step=4, data=bytes([128, 16, 128, 235]))
    assert _refusal(image_to_rgb, yuv, max_pixels=1)[0] == 'too_large'
    odd = Image(height=1, width=3, encoding='yuv422', step=6, data=bytes(6))
    assert _refusal(image_to_rgb, odd) == ('bad_size', 'yuv422 needs an even width, got 3')
