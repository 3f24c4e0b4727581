"""Tier-1 tests of marigold_ros.conversions (numpy only, no ROS graph)."""

import array
from functools import partial
import io
import struct
import zlib

from builders import random_rgb
from marigold_ros.conversions import compressed_to_rgb
from marigold_ros.conversions import depth_to_image
from marigold_ros.conversions import image_to_depth
from marigold_ros.conversions import image_to_rgb
from marigold_ros.conversions import ImageConversionError
from marigold_ros.conversions import pointcloud2_from_depth
from marigold_ros.conversions import pointcloud2_to_xyz
from marigold_ros.conversions import PointCloudConversionError
from marigold_ros.conversions import rgb_to_compressed
from marigold_ros.conversions import rgb_to_image
from msg_builders import header
import numpy as np
from PIL import Image as PILImage
import pytest
from sensor_msgs.msg import CompressedImage
from sensor_msgs.msg import Image
from sensor_msgs.msg import PointCloud2
from sensor_msgs.msg import PointField

H, W = 5, 7
_header = partial(header, sec=12, nanosec=345, frame_id='camera_optical')


def _raw_image(encoding, rows, padding=0, is_bigendian=0):
    """Build an Image by hand from an (H, row_bytes) uint8 array, padding rows with junk."""
    rows = np.asarray(rows, np.uint8)
    height, row_bytes = rows.shape
    padded = np.full((height, row_bytes + padding), 0xAB, np.uint8)
    padded[:, :row_bytes] = rows
    bytes_per_pixel = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1,
                       'mono16': 2, '16UC1': 2, '32FC1': 4, 'yuv422': 2,
                       'yuv422_yuy2': 2}[encoding]
    return Image(header=_header(), height=height, width=row_bytes // bytes_per_pixel,
                 encoding=encoding, is_bigendian=is_bigendian, step=row_bytes + padding,
                 data=padded.tobytes())


# ----------------------------------------------------------------- colour encodings


@pytest.mark.parametrize('padding', [0, 5])
@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_colour_encodings_against_hand_built_layout(encoding, padding):
    rgb = random_rgb(H, W)
    alpha = np.full((H, W, 1), 77, np.uint8)
    layout = {'rgb8': rgb, 'bgr8': rgb[:, :, [2, 1, 0]],
              'rgba8': np.concatenate([rgb, alpha], axis=2),
              'bgra8': np.concatenate([rgb[:, :, [2, 1, 0]], alpha], axis=2)}[encoding]
    msg = _raw_image(encoding, layout.reshape(H, -1), padding)
    out = image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (H, W, 3)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)
    # The result must not alias the message buffer.
    out[:] = 0
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_rgb_to_image_round_trip(encoding):
    rgb = random_rgb(H, W, seed=3)
    msg = rgb_to_image(rgb, _header(), encoding)
    assert msg.encoding == encoding and msg.header.frame_id == 'camera_optical'
    assert msg.header.stamp.sec == 12 and msg.header.stamp.nanosec == 345
    assert msg.step == W * (4 if 'a' in encoding[3:] else 3)
    assert isinstance(msg.data, array.array) and msg.data.typecode == 'B'
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


@pytest.mark.parametrize('padding', [0, 3])
def test_mono8_replicated(padding):
    grey = np.arange(H * W, dtype=np.uint8).reshape(H, W) * 7
    out = image_to_rgb(_raw_image('mono8', grey, padding))
    np.testing.assert_array_equal(out, np.stack([grey, grey, grey], axis=2))
    np.testing.assert_array_equal(image_to_rgb(rgb_to_image(grey, _header(), 'mono8')),
                                  np.stack([grey] * 3, axis=2))


@pytest.mark.parametrize('is_bigendian', [0, 1])
@pytest.mark.parametrize('padding', [0, 4])
def test_mono16_scaled_like_cv_bridge_both_endiannesses(is_bigendian, padding):
    values = np.array([[0, 128, 129, 200, 0x1234, 0xFF00, 0xFFFF]] * H, np.uint16)
    raw = values.astype('>u2' if is_bigendian else '<u2').view(np.uint8).reshape(H, -1)
    out = image_to_rgb(_raw_image('mono16', raw, padding, is_bigendian))
    # cv_bridge: convertTo(CV_8U, 255 / 65535) rounds v / 257: 128 / 257 = 0.498 -> 0,
    # 129 / 257 = 0.502 -> 1, 200 / 257 = 0.78 -> 1, 4660 / 257 = 18.13 -> 18,
    # 65280 / 257 = 254.0 -> 254, 65535 / 257 = 255.
    expected_row = [0, 0, 1, 1, 18, 254, 255]
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], np.array([expected_row] * H))


# Hand-computed BT.601 video range (R = 1.164 (Y-16) + 1.596 (V-128), G = 1.164 (Y-16)
# - 0.813 (V-128) - 0.391 (U-128), B = 1.164 (Y-16) + 2.018 (U-128), rounded, clipped).
# Y=100, U=90, V=200: R = 97.776 + 114.912 = 212.69 -> 213,
# G = 97.776 - 58.536 + 14.858 = 54.10 -> 54, B = 97.776 - 76.684 = 21.09 -> 21.
# Y=180 with the same chroma: 190.896 -> R 305.8 -> 255, G 147.2 -> 147, B 114.2 -> 114.
# Y=16/235 with neutral chroma: black / white.  Y=0, U=0, V=255: (203, 0, 0).
_YUV_PAIRS = [  # (Y0, U, Y1, V) -> (rgb0, rgb1)
    ((100, 90, 180, 200), ((213, 54, 21), (255, 147, 114))),
    ((16, 128, 235, 128), ((0, 0, 0), (255, 255, 255))),
    ((0, 0, 255, 255), ((203, 0, 0), (255, 225, 20))),
]


@pytest.mark.parametrize('padding', [0, 6])
@pytest.mark.parametrize('encoding', ['yuv422', 'yuv422_yuy2'])
def test_yuv422_bt601_hand_computed(encoding, padding):
    row = []
    expected = []
    for (y0, u, y1, v), (rgb0, rgb1) in _YUV_PAIRS:
        # ROS 'yuv422' is UYVY; 'yuv422_yuy2' is YUYV.
        row += [u, y0, v, y1] if encoding == 'yuv422' else [y0, u, y1, v]
        expected += [rgb0, rgb1]
    rows = np.array([row, row[4:] + row[:4]], np.uint8)
    expected = np.array([expected, expected[2:] + expected[:2]], np.uint8)
    out = image_to_rgb(_raw_image(encoding, rows, padding))
    assert out.shape == (2, 6, 3)
    np.testing.assert_array_equal(out, expected)


def test_yuv_aliases_and_odd_width():
    msg = _raw_image('yuv422', np.array([[90, 100, 200, 180]], np.uint8))
    msg.encoding = 'uyvy'
    np.testing.assert_array_equal(image_to_rgb(msg)[0], [(213, 54, 21), (255, 147, 114)])
    odd = Image(height=1, width=3, encoding='yuv422', step=6, data=bytes(6))
    with pytest.raises(ImageConversionError) as err:
        image_to_rgb(odd)
    assert err.value.reason == 'bad_size'


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize('encoding', ['16UC1', '32FC1', 'bayer_rggb8', '8UC3', 'nv12'])
def test_unknown_and_depth_encodings_rejected(encoding):
    msg = Image(height=2, width=2, encoding=encoding, step=8, data=bytes(16))
    with pytest.raises(ImageConversionError) as err:
        image_to_rgb(msg)
    assert err.value.reason == 'unknown_encoding'
    assert encoding in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize('msg_kwargs, reason', [
    ({'height': 0, 'width': 4, 'step': 12, 'data': b''}, 'empty'),
    ({'height': 4, 'width': 0, 'step': 0, 'data': bytes(4)}, 'empty'),
    ({'height': 2, 'width': 2, 'step': 6, 'data': b''}, 'empty'),
    ({'height': 2, 'width': 2, 'step': 6, 'data': bytes(11)}, 'truncated'),
    ({'height': 2, 'width': 2, 'step': 5, 'data': bytes(12)}, 'bad_step'),
    ({'height': 2, 'width': 2, 'step': 0, 'data': bytes(12)}, 'bad_step'),
])
def test_bad_images_raise_with_reason(msg_kwargs, reason):
    with pytest.raises(ImageConversionError) as err:
        image_to_rgb(Image(encoding='rgb8', **msg_kwargs))
    assert err.value.reason == reason


def test_too_large_rejected_before_reading_data():
    # The header claims a huge image but there is no matching data: the size check wins.
    msg = Image(height=10000, width=10000, encoding='rgb8', step=30000, data=bytes(10))
    with pytest.raises(ImageConversionError) as err:
        image_to_rgb(msg, max_pixels=1_000_000)
    assert err.value.reason == 'too_large'
    small = rgb_to_image(random_rgb(H, W), _header())
    with pytest.raises(ImageConversionError) as err:
        image_to_rgb(small, max_pixels=H * W - 1)
    assert err.value.reason == 'too_large'
    assert image_to_rgb(small, max_pixels=H * W).shape == (H, W, 3)


# ----------------------------------------------------------------- compressed


def _smooth_rgb(height=32, width=48):
    v, u = np.mgrid[0:height, 0:width]
    return np.stack([u * 5, v * 7, (u + v) * 2], axis=2).clip(0, 255).astype(np.uint8)


def test_png_round_trip_exact_and_format_strings():
    rgb = random_rgb(16, 24, seed=5)
    msg = rgb_to_compressed(rgb, _header(), 'png')
    assert msg.format == 'rgb8; png compressed bgr8'
    assert msg.header.frame_id == 'camera_optical'
    np.testing.assert_array_equal(compressed_to_rgb(msg), rgb)
    for fmt in ('png', 'PNG', 'bgr8; png compressed bgr8', ''):
        msg.format = fmt
        np.testing.assert_array_equal(compressed_to_rgb(msg), rgb)


def test_jpeg_round_trip_close():
    rgb = _smooth_rgb()
    msg = rgb_to_compressed(rgb, _header(), 'jpeg', quality=95)
    assert msg.format == 'rgb8; jpeg compressed bgr8'
    for fmt in ('jpeg', 'rgb8; jpeg compressed bgr8', 'jpg'):
        msg.format = fmt
        out = compressed_to_rgb(msg)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - rgb).mean() < 3.0


def _primaries():
    """
    Make a 32x48 RGB image of six flat 16x16 blocks with distinct R, G and B.

    Top row: red, green, blue; bottom row: (200, 120, 40), (40, 200, 120), (120, 40, 200).
    Flat 16-pixel blocks on the JPEG block grid keep JPEG's error small inside each block.
    """
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255),
               (200, 120, 40), (40, 200, 120), (120, 40, 200)]
    rgb = np.zeros((32, 48, 3), np.uint8)
    for k, colour in enumerate(colours):
        row, col = divmod(k, 3)
        rgb[16 * row:16 * row + 16, 16 * col:16 * col + 16] = colour
    return rgb


def _block_means(rgb):
    """Mean colour of the inner 8x8 of each 16x16 block: [6, 3] float."""
    return np.array([rgb[16 * r + 4:16 * r + 12, 16 * c + 4:16 * c + 12].reshape(-1, 3)
                     .mean(axis=0) for r in range(2) for c in range(3)])


def test_foreign_png_and_jpeg_decode_to_the_right_channels():
    """
    PNG and JPEG bytes written by PIL (not by our encoder) decode with R, G, B in place.

    PNG is lossless: exact.  JPEG at quality 95: each flat block's centre comes back within
    1 of its colour per channel (measured, PIL 13 and OpenCV 4.14); the bound is 4, while a
    red/blue swap is off by 80 to 255 in some block.
    """
    rgb = _primaries()
    for fmt, options in (('PNG', {}), ('JPEG', {'quality': 95, 'subsampling': 0})):
        buf = io.BytesIO()
        PILImage.fromarray(rgb, 'RGB').save(buf, format=fmt, **options)
        out = compressed_to_rgb(CompressedImage(format=fmt.lower(), data=buf.getvalue()))
        assert out.shape == rgb.shape and out.dtype == np.uint8
        if fmt == 'PNG':
            np.testing.assert_array_equal(out, rgb)
        np.testing.assert_allclose(_block_means(out), _block_means(rgb), atol=4, err_msg=fmt)


def test_opencv_png_and_jpeg_decode_to_the_right_channels():
    """
    Bytes from OpenCV's imencode, as compressed_image_transport makes them, decode as RGB.

    OpenCV is given the BGR array (its channel order) and writes correct colours to the file.
    Bounds as in the PIL test.
    """
    cv2 = pytest.importorskip(
        'cv2', reason='needs OpenCV: pip install opencv-python-headless (requirements-dev.txt)')
    rgb = _primaries()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    for ext, options in (('.png', []), ('.jpg', [cv2.IMWRITE_JPEG_QUALITY, 95,
                                                 cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                 cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])):
        ok, encoded = cv2.imencode(ext, bgr, options)
        assert ok
        msg = CompressedImage(format=f'rgb8; {ext[1:]} compressed bgr8', data=encoded.tobytes())
        out = compressed_to_rgb(msg)
        if ext == '.png':
            np.testing.assert_array_equal(out, rgb)
        np.testing.assert_allclose(_block_means(out), _block_means(rgb), atol=4, err_msg=ext)


def test_our_png_and_jpeg_decode_right_in_pil_and_opencv():
    """Our encoder's bytes read back with R, G, B in place by PIL and, if present, OpenCV."""
    rgb = _primaries()
    png = rgb_to_compressed(rgb, _header(), 'png').data.tobytes()
    jpeg = rgb_to_compressed(rgb, _header(), 'jpeg', quality=95).data.tobytes()
    np.testing.assert_array_equal(np.array(PILImage.open(io.BytesIO(png))), rgb)
    from_pil = np.array(PILImage.open(io.BytesIO(jpeg)).convert('RGB'))
    # Quality 95, PIL's default 4:2:0 chroma: the blocks' centres are within 1 (measured).
    np.testing.assert_allclose(_block_means(from_pil), _block_means(rgb), atol=4)
    try:
        import cv2
    except ImportError:
        return  # the PIL checks above stand alone; the OpenCV test says how to get OpenCV
    from_cv = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_array_equal(from_cv, rgb)
    from_cv = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    np.testing.assert_allclose(_block_means(from_cv), _block_means(rgb), atol=4)


def test_png_mono16_scaled_like_mono16():
    values = np.full((4, 5), 0x1234, np.uint16)
    values[0, 0] = 0xFFFF
    buf = io.BytesIO()
    PILImage.fromarray(values).save(buf, format='PNG')
    msg = CompressedImage(format='png', data=buf.getvalue())
    out = compressed_to_rgb(msg)
    assert out.shape == (4, 5, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [18, 18, 18]  # 0x1234 / 257 = 18.13, as the raw mono16


def test_corrupt_compressed():
    good = rgb_to_compressed(_smooth_rgb(), _header(), 'jpeg').data.tobytes()
    for data in (b'not an image at all', good[:len(good) // 3],
                 bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8))):
        with pytest.raises(ImageConversionError) as err:
            compressed_to_rgb(CompressedImage(format='jpeg', data=data))
        assert err.value.reason == 'corrupt_compressed'
        # Says what is wrong with the data, never PIL's '<_io.BytesIO object at 0x...>'.
        text = str(err.value)
        assert 'corrupt' in text and f'{len(data)} bytes' in text, text
        assert ' at 0x' not in text and 'object' not in text, text


def _png_with_header_size(width, height):
    buf = io.BytesIO()
    PILImage.fromarray(random_rgb(4, 4)).save(buf, format='PNG')
    data = bytearray(buf.getvalue())
    # IHDR chunk: 8-byte signature, 4-byte length, 'IHDR', width, height, ..., CRC.
    struct.pack_into('>II', data, 16, width, height)
    crc = zlib.crc32(bytes(data[12:29]))
    struct.pack_into('>I', data, 29, crc)
    return bytes(data)


def test_compressed_size_limit_checked_before_decode():
    # A 4x4 PNG whose header claims 20000 x 10000: refused as too large, not decoded.
    msg = CompressedImage(format='png', data=_png_with_header_size(20000, 10000))
    with pytest.raises(ImageConversionError) as err:
        compressed_to_rgb(msg, max_pixels=1_000_000)
    assert err.value.reason == 'too_large'
    ok = rgb_to_compressed(random_rgb(8, 8), _header(), 'png')
    with pytest.raises(ImageConversionError) as err:
        compressed_to_rgb(ok, max_pixels=63)
    assert err.value.reason == 'too_large'
    # Without a limit of ours, PIL's decompression-bomb check still refuses it at open.
    with pytest.raises(ImageConversionError, match='decompression bomb') as err:
        compressed_to_rgb(msg, max_pixels=None)
    assert err.value.reason == 'too_large'


def test_compressed_empty_and_depth_format():
    with pytest.raises(ImageConversionError) as err:
        compressed_to_rgb(CompressedImage(format='jpeg', data=b''))
    assert err.value.reason == 'empty'
    with pytest.raises(ImageConversionError) as err:
        compressed_to_rgb(CompressedImage(format='16UC1; compressedDepth png', data=b'1234'))
    assert err.value.reason == 'unknown_encoding'


# ----------------------------------------------------------------- depth


def test_depth_32fc1_round_trip_keeps_nan():
    depth = np.linspace(0.1, 9.0, H * W, dtype=np.float32).reshape(H, W)
    depth[1, 2] = np.nan
    msg = depth_to_image(depth, _header())
    assert msg.encoding == '32FC1' and msg.step == 4 * W and msg.is_bigendian == 0
    back = image_to_depth(msg)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, depth)  # NaN positions compared equal
    assert np.isnan(back[1, 2])


@pytest.mark.parametrize('is_bigendian', [0, 1])
def test_depth_16uc1_millimetres_to_metres(is_bigendian):
    mm = np.array([[0, 1, 1000, 1500, 65535]] * 3, np.uint16)
    raw = mm.astype('>u2' if is_bigendian else '<u2').view(np.uint8).reshape(3, -1)
    out = image_to_depth(_raw_image('16UC1', raw, padding=2, is_bigendian=is_bigendian))
    assert out.dtype == np.float32 and out.shape == (3, 5)
    assert np.all(np.isnan(out[:, 0]))
    np.testing.assert_allclose(out[:, 1:], [[0.001, 1.0, 1.5, 65.535]] * 3, rtol=1e-6)


def test_depth_32fc1_big_endian_with_padding():
    metres = np.array([[1.25, -0.5, np.inf], [2.0, 3.5, 0.0]], np.float32)
    raw = metres.astype('>f4').view(np.uint8).reshape(2, -1)
    out = image_to_depth(_raw_image('32FC1', raw, padding=4, is_bigendian=1))
    np.testing.assert_array_equal(out, metres)


def test_depth_rejects_colour_and_bad_arrays():
    with pytest.raises(ImageConversionError) as err:
        image_to_depth(rgb_to_image(random_rgb(H, W), _header()))
    assert err.value.reason == 'unknown_encoding' and 'rgb8' in str(err.value)
    with pytest.raises(ImageConversionError) as err:
        image_to_depth(Image(height=2, width=2, encoding='16UC1', step=4, data=bytes(7)))
    assert err.value.reason == 'truncated'
    with pytest.raises(ImageConversionError):
        depth_to_image(np.zeros((2, 2, 2), np.float32), _header())
    with pytest.raises(ImageConversionError):
        depth_to_image(np.zeros((2, 2), np.uint16), _header())


# ----------------------------------------------------------------- point clouds


def test_pointcloud_layout_and_packed_rgb():
    points = np.arange(H * W * 3, dtype=np.float32).reshape(H, W, 3) / 10
    points[2, 3] = np.nan
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0, 0] = (0x12, 0x34, 0x56)
    rgb[4, 6] = (255, 0, 128)
    msg = pointcloud2_from_depth(points, rgb, _header())
    assert isinstance(msg, PointCloud2)
    assert (msg.height, msg.width) == (H, W)
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ('x', 0, PointField.FLOAT32, 1), ('y', 4, PointField.FLOAT32, 1),
        ('z', 8, PointField.FLOAT32, 1), ('rgb', 12, PointField.FLOAT32, 1)]
    assert msg.point_step == 16 and msg.row_step == 16 * W
    assert msg.is_dense is False and msg.is_bigendian is False
    assert len(msg.data) == 16 * H * W
    assert isinstance(msg.data, array.array)
    assert msg.header.frame_id == 'camera_optical'
    raw = msg.data.tobytes()
    # Point (0, 0): rgb bits are 0x00123456; point (4, 6): 0x00FF0080.
    assert struct.unpack_from('<I', raw, 12)[0] == 0x00123456
    last = (4 * W + 6) * 16
    assert struct.unpack_from('<I', raw, last + 12)[0] == 0x00FF0080
    assert struct.unpack_from('<fff', raw, last) == tuple(float(v) for v in points[4, 6])
    nan_point = (2 * W + 3) * 16
    assert all(np.isnan(struct.unpack_from('<fff', raw, nan_point)))
    xyz = pointcloud2_to_xyz(msg)
    np.testing.assert_array_equal(xyz, points.reshape(-1, 3))
    assert pointcloud2_to_xyz(msg, skip_nans=True).shape == (H * W - 1, 3)


def test_pointcloud_without_colour_keeps_16_byte_points():
    points = np.ones((2, 3, 3), np.float32)
    msg = pointcloud2_from_depth(points, None, _header())
    assert [f.name for f in msg.fields] == ['x', 'y', 'z']
    assert msg.point_step == 16 and msg.row_step == 48
    np.testing.assert_array_equal(pointcloud2_to_xyz(msg), np.ones((6, 3)))
    with pytest.raises(ValueError):
        pointcloud2_from_depth(points, np.zeros((2, 3, 3), np.float32), _header())


def _lidar_cloud(points, is_bigendian):
    """Hand-packed cloud: intensity f32 @0, x y z f64 @8, ring u16 @32; row padding 8."""
    order = '>' if is_bigendian else '<'
    rows = []
    for row in points:
        chunk = b''
        for x, y, z in row:
            chunk += struct.pack(order + 'f4xdddH6x', 0.5, x, y, z, 7)
        rows.append(chunk + b'\xee' * 8)
    fields = [PointField(name='intensity', offset=0, datatype=PointField.FLOAT32, count=1),
              PointField(name='x', offset=8, datatype=PointField.FLOAT64, count=1),
              PointField(name='y', offset=16, datatype=PointField.FLOAT64, count=1),
              PointField(name='z', offset=24, datatype=PointField.FLOAT64, count=1),
              PointField(name='ring', offset=32, datatype=PointField.UINT16, count=1)]
    return PointCloud2(header=_header(), height=len(points), width=len(points[0]),
                       fields=fields, is_bigendian=bool(is_bigendian), point_step=40,
                       row_step=40 * len(points[0]) + 8, data=b''.join(rows),
                       is_dense=True)


@pytest.mark.parametrize('is_bigendian', [0, 1])
def test_pointcloud_to_xyz_float64_offsets_steps_endianness(is_bigendian):
    points = [[(1.5, -2.0, 3.25), (0.0, 1e3, -4.5)], [(7.0, 8.0, 9.0), (-1.0, -2.0, -3.0)]]
    assert struct.calcsize('>f4xdddH6x') == 40
    xyz = pointcloud2_to_xyz(_lidar_cloud(points, is_bigendian))
    assert xyz.dtype == np.float32
    np.testing.assert_array_equal(xyz, np.array(points, np.float32).reshape(-1, 3))


def test_pointcloud_to_xyz_keeps_float64_when_asked():
    # UTM-like coordinates: float32 steps are 0.5 m at five million meters.
    points = [[(412345.678, 5012345.678, 101.25), (412345.679, 5012345.679, 101.5)]]
    precise = pointcloud2_to_xyz(_lidar_cloud(points, 1), dtype=None)
    assert precise.dtype == np.float64
    np.testing.assert_array_equal(precise, np.array(points).reshape(-1, 3))
    assert np.abs(pointcloud2_to_xyz(_lidar_cloud(points, 0)) - precise).max() > 0.1
    single = _lidar_cloud([[(1.0, 2.0, 3.0)]], 0)
    for field in single.fields[1:4]:
        field.datatype = PointField.FLOAT32
    single.point_step, single.row_step = 40, 48
    assert pointcloud2_to_xyz(single, dtype=None).dtype == np.float32


def test_pointcloud_to_xyz_errors_name_the_field():
    cloud = _lidar_cloud([[(1.0, 2.0, 3.0)]], 0)
    cloud.fields = [f for f in cloud.fields if f.name != 'y']
    with pytest.raises(PointCloudConversionError) as err:
        pointcloud2_to_xyz(cloud)
    assert err.value.reason == 'missing_field' and "'y'" in str(err.value)
    cloud = _lidar_cloud([[(1.0, 2.0, 3.0)]], 0)
    cloud.fields[3].datatype = PointField.UINT16
    with pytest.raises(ValueError) as err:
        pointcloud2_to_xyz(cloud)
    assert err.value.reason == 'unsupported_datatype' and "'z'" in str(err.value)
    cloud = _lidar_cloud([[(1.0, 2.0, 3.0)], [(1.0, 2.0, 3.0)]], 0)
    cloud.data = cloud.data[:-20]
    with pytest.raises(PointCloudConversionError) as err:
        pointcloud2_to_xyz(cloud)
    assert err.value.reason == 'truncated'
    empty = PointCloud2(fields=cloud.fields, point_step=40)
    assert pointcloud2_to_xyz(empty).shape == (0, 3)
