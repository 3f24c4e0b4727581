"""
Numpy-level conversions between ROS image / point cloud messages and arrays.

cv_bridge semantics (cv_bridge is not available here), numpy views over the message buffer
and no per-pixel Python.  The image readers hand a message's fields to
:mod:`marigold_model.data.image_decoding`, which the bag data reader shares; they only touch
attributes, so rclpy and rosbags messages both work.  The writers build rclpy messages.
"""

import array
import io

from marigold_model.data.image_decoding import as_uint8 as _as_uint8
from marigold_model.data.image_decoding import byte_order as _byte_order
from marigold_model.data.image_decoding import COLOR_ENCODINGS  # noqa: F401 - re-exported
from marigold_model.data.image_decoding import decode_compressed_rgb
from marigold_model.data.image_decoding import decode_depth
from marigold_model.data.image_decoding import decode_rgb
from marigold_model.data.image_decoding import DEFAULT_MAX_PIXELS
from marigold_model.data.image_decoding import DEPTH_ENCODINGS  # noqa: F401 - re-exported
from marigold_model.data.image_decoding import ImageConversionError
from marigold_model.data.image_decoding import mono16_to_mono8  # noqa: F401 - re-exported
from marigold_model.data.image_decoding import normalise_encoding as _normalise_encoding
from marigold_model.errors import ReasonError
import numpy as np
from PIL import Image as PILImage
from sensor_msgs.msg import CompressedImage
from sensor_msgs.msg import Image
from sensor_msgs.msg import PointCloud2
from sensor_msgs.msg import PointField

# PointField datatype codes -> numpy dtype characters (without byte order).
_POINTFIELD_DTYPES = {
    PointField.INT8: 'i1', PointField.UINT8: 'u1', PointField.INT16: 'i2',
    PointField.UINT16: 'u2', PointField.INT32: 'i4', PointField.UINT32: 'u4',
    PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8',
}


class PointCloudConversionError(ReasonError):
    """A PointCloud2 that cannot be read; ``reason`` is the short key, the text names the field."""


# --------------------------------------------------------------------------- helpers


def _to_byte_array(arr):
    """Return ``array.array('B')`` holding the bytes of a contiguous numpy array (one copy)."""
    # rclpy keeps an assigned array('B') as is; any other value (bytes, memoryview, list) is
    # copied element by element, and range-checked with ROS_PYTHON_CHECK_FIELDS=1.
    out = array.array('B')
    out.frombytes(memoryview(np.ascontiguousarray(arr)).cast('B'))
    return out


# --------------------------------------------------------------------------- colour images


def image_to_rgb(msg, max_pixels=DEFAULT_MAX_PIXELS):
    """Convert a sensor_msgs/Image to a new HxWx3 uint8 RGB array (``decode_rgb`` encodings)."""
    return decode_rgb(msg.data, msg.height, msg.width, msg.step, msg.encoding,
                      msg.is_bigendian, max_pixels)


def rgb_to_image(rgb, header, encoding='rgb8'):
    """
    Build a sensor_msgs/Image from an RGB array (for tests, tools and bag making).

    :param rgb: HxWx3 uint8 RGB.  For 'mono8' an HxW uint8 array is also accepted and for
        'mono16' an HxW uint16 array; an RGB input is converted to BT.601 luma
        (0.299 R + 0.587 G + 0.114 B, times 257 for mono16).
    :param header: std_msgs/Header to use (stamp and frame_id).
    :param encoding: 'rgb8', 'bgr8', 'rgba8' (alpha 255), 'bgra8', 'mono8' or 'mono16'.
    :return: sensor_msgs/Image, little endian, no row padding.
    :raises ImageConversionError: 'unknown_encoding' or 'bad_array'.
    """
    arr = np.asarray(rgb)
    encoding = _normalise_encoding(encoding)
    if encoding in ('mono8', 'mono16') and arr.ndim == 2:
        wanted = np.uint8 if encoding == 'mono8' else np.uint16
        if arr.dtype != wanted:
            raise ImageConversionError(
                'bad_array', f'{encoding} from a 2-D array needs dtype {np.dtype(wanted)}, '
                f'got {arr.dtype}')
        pixels = arr.astype('<u2') if encoding == 'mono16' else arr
    else:
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ImageConversionError(
                'bad_array', f'expected an HxWx3 uint8 RGB array, got shape {arr.shape} '
                f'dtype {arr.dtype}')
        if encoding == 'rgb8':
            pixels = arr
        elif encoding == 'bgr8':
            pixels = arr[:, :, ::-1]
        elif encoding in ('rgba8', 'bgra8'):
            pixels = np.empty(arr.shape[:2] + (4,), np.uint8)
            pixels[:, :, :3] = arr if encoding == 'rgba8' else arr[:, :, ::-1]
            pixels[:, :, 3] = 255
        elif encoding in ('mono8', 'mono16'):
            luma = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            luma = np.clip(np.rint(luma), 0, 255)
            pixels = luma.astype(np.uint8) if encoding == 'mono8' else \
                (luma.astype(np.uint16) * 257).astype('<u2')
        else:
            raise ImageConversionError(
                'unknown_encoding', f'rgb_to_image cannot write encoding {encoding!r}; '
                'supported: rgb8, bgr8, rgba8, bgra8, mono8, mono16')
    height, width = pixels.shape[:2]
    msg = Image()
    msg.header = header
    msg.height = height
    msg.width = width
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = width * (pixels.itemsize * (pixels.shape[2] if pixels.ndim == 3 else 1))
    msg.data = _to_byte_array(pixels)
    return msg


# --------------------------------------------------------------------------- compressed


def compressed_to_rgb(msg, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode a JPEG or PNG CompressedImage (codec from the bytes) to HxWx3 uint8 RGB."""
    return decode_compressed_rgb(msg.data, msg.format, max_pixels)


def rgb_to_compressed(rgb, header, fmt='jpeg', quality=90):
    """
    Encode an HxWx3 uint8 RGB array as a sensor_msgs/CompressedImage.

    The ``format`` field follows compressed_image_transport for an rgb8 source:
    'rgb8; jpeg compressed bgr8' or 'rgb8; png compressed bgr8' (the compressed bytes hold
    correct colours; 'bgr8' only names OpenCV's decode order).

    :param fmt: 'jpeg' (or 'jpg') or 'png'.
    :param quality: JPEG quality 1-100.
    :raises ImageConversionError: 'unknown_encoding' or 'bad_array'.
    """
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ImageConversionError(
            'bad_array', f'expected an HxWx3 uint8 RGB array, got shape {arr.shape} '
            f'dtype {arr.dtype}')
    fmt = str(fmt).strip().lower()
    out = io.BytesIO()
    pil = PILImage.fromarray(np.ascontiguousarray(arr))
    if fmt in ('jpeg', 'jpg'):
        pil.save(out, format='JPEG', quality=int(quality))
        fmt = 'jpeg'
    elif fmt == 'png':
        pil.save(out, format='PNG')
    else:
        raise ImageConversionError(
            'unknown_encoding', f'cannot compress to {fmt!r}; use jpeg or png')
    msg = CompressedImage()
    msg.header = header
    msg.format = f'rgb8; {fmt} compressed bgr8'
    data = array.array('B')
    data.frombytes(out.getbuffer())
    msg.data = data
    return msg


# --------------------------------------------------------------------------- depth images


def depth_to_image(depth, header):
    """
    Build a 32FC1 depth Image (REP 118: meters, NaN = no reading, kept as NaN).

    :param depth: HxW float array (meters, or relative depth for depth/relative).
    :return: little endian, step = 4 * width.
    :raises ImageConversionError: 'bad_array' for a non 2-D or non-float array.
    """
    arr = np.asarray(depth)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ImageConversionError(
            'bad_array', f'expected an HxW float depth array, got shape {arr.shape} '
            f'dtype {arr.dtype}')
    pixels = arr.astype('<f4', copy=False)
    msg = Image()
    msg.header = header
    msg.height, msg.width = pixels.shape
    msg.encoding = '32FC1'
    msg.is_bigendian = 0
    msg.step = 4 * pixels.shape[1]
    msg.data = _to_byte_array(pixels)
    return msg


def image_to_depth(msg, max_pixels=DEFAULT_MAX_PIXELS):
    """Convert a 32FC1 (m) or 16UC1 (mm, 0 -> NaN) Image to float32 m; mono16 has no unit."""
    return decode_depth(msg.data, msg.height, msg.width, msg.step, msg.encoding,
                        msg.is_bigendian, max_pixels)


# --------------------------------------------------------------------------- point clouds


def _xyzrgb_fields():
    return [PointField(name='x', offset=0, datatype=PointField.FLOAT32, count=1),
            PointField(name='y', offset=4, datatype=PointField.FLOAT32, count=1),
            PointField(name='z', offset=8, datatype=PointField.FLOAT32, count=1),
            PointField(name='rgb', offset=12, datatype=PointField.FLOAT32, count=1)]


def organized_cloud_msg(header, height, width, data, colour=True):
    """
    Wrap a filled x y z (rgb) buffer, 16 bytes per point, as an organized PointCloud2.

    The one place that writes the cloud's metadata: fields x, y, z float32 at offsets 0, 4, 8
    and rgb at 12 when ``colour``, point_step 16, row_step 16 * width, little endian,
    is_dense False.

    :param data: the points' bytes (array('B') for the fast path, or anything the message's
        data field accepts)
    :param colour: declare the rgb field
    """
    msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = height, width
    fields = _xyzrgb_fields()
    msg.fields = fields if colour else fields[:3]
    msg.is_bigendian = False
    msg.point_step = 16
    msg.row_step = 16 * width
    msg.is_dense = False
    if isinstance(data, array.array) and hasattr(msg, '_data'):
        # The generated setter copies even an array('B') (array.array('B', value)) unless
        # ROS_PYTHON_CHECK_FIELDS is set: 2-5 ms for 640x480.  The slot takes it as is.
        msg._data = data
    else:
        msg.data = data
    return msg


def pack_rgb(rgb):
    """Pack (..., 3) uint8 RGB into uint32 0x00RRGGBB (viewed as float32: PCL's 'rgb' field)."""
    arr = np.asarray(rgb, dtype=np.uint8)
    return ((arr[..., 0].astype(np.uint32) << 16) | (arr[..., 1].astype(np.uint32) << 8)
            | arr[..., 2].astype(np.uint32))


def pointcloud2_from_depth(points_xyz, rgb, header):
    """
    Build an organized PointCloud2 (height = rows, width = columns) from a point image.

    Layout: x, y, z float32 at offsets 0, 4, 8 and, when ``rgb`` is given, rgb float32 at
    offset 12 holding the bits of 0x00RRGGBB.  point_step is 16 in both cases (without
    colour the last 4 bytes are padding, like PCL's PointXYZ), row_step 16 * W,
    little endian, is_dense False.  Invalid points must be NaN in ``points_xyz`` (as
    produced by :func:`marigold_ros.geometry.unproject_depth`); they stay NaN.

    :param points_xyz: HxWx3 float array (camera optical frame, meters).
    :param rgb: HxWx3 uint8 RGB of the same H, W, or None.
    :raises ValueError: on shape mismatch.
    """
    pts = np.asarray(points_xyz)
    if pts.ndim != 3 or pts.shape[2] != 3:
        raise ValueError(f'points_xyz must be HxWx3, got shape {pts.shape}')
    height, width = pts.shape[:2]
    buf = np.zeros((height, width, 4), dtype='<f4')
    buf[:, :, :3] = pts
    if rgb is not None:
        colours = np.asarray(rgb)
        if colours.shape != (height, width, 3) or colours.dtype != np.uint8:
            raise ValueError(f'rgb must be uint8 of shape {(height, width, 3)} like the '
                             f'points, got {colours.dtype} {colours.shape}')
        buf.view('<u4')[:, :, 3] = pack_rgb(colours)
    return organized_cloud_msg(header, height, width, _to_byte_array(buf),
                               colour=rgb is not None)


def pointcloud2_to_xyz(msg, skip_nans=False, dtype=np.float32):
    """
    Read x, y, z of every point of a PointCloud2 as an (N, 3) array.

    The fields are located by name and offset, FLOAT32 and FLOAT64 are supported, and
    ``point_step``, ``row_step`` and ``is_bigendian`` are honoured, so LiDAR clouds with
    extra fields (intensity, ring, time...) and padding read correctly.

    :param skip_nans: drop points with a non-finite coordinate.
    :param dtype: the array's dtype, or None for the fields' own precision: float64 when a
        coordinate is FLOAT64 (clouds in map / UTM frames, where float32 steps are 0.25-0.5 m
        at millions of meters), else float32.
    :return: (height * width, 3) array in row-major order (fewer with skip_nans).
    :raises PointCloudConversionError: ('missing_field', 'unsupported_datatype',
        'bad_layout' or 'truncated') naming the field or the layout problem.
    """
    height, width = int(msg.height), int(msg.width)
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    by_name = {f.name: f for f in msg.fields}
    layouts = []
    for name in ('x', 'y', 'z'):
        field = by_name.get(name)
        if field is None:
            raise PointCloudConversionError(
                'missing_field', f'PointCloud2 has no {name!r} field (fields: '
                + ', '.join(sorted(by_name)) + ')')
        if field.datatype not in (PointField.FLOAT32, PointField.FLOAT64):
            raise PointCloudConversionError(
                'unsupported_datatype', f'field {name!r} has datatype {field.datatype}; '
                'only FLOAT32 (7) and FLOAT64 (8) are supported')
        field_dtype = np.dtype(_byte_order(msg.is_bigendian)
                               + _POINTFIELD_DTYPES[field.datatype])
        if field.offset + field_dtype.itemsize > point_step:
            raise PointCloudConversionError(
                'bad_layout', f'field {name!r} (offset {field.offset}, '
                f'{field_dtype.itemsize} bytes) does not fit in point_step {point_step}')
        layouts.append((int(field.offset), field_dtype))
    if dtype is None:
        dtype = np.result_type(np.float32, *(np.dtype(d.char) for _, d in layouts))
    npoints = height * width
    if npoints == 0:
        return np.empty((0, 3), dtype)
    if row_step < width * point_step:
        raise PointCloudConversionError(
            'bad_layout', f'row_step {row_step} < width {width} * point_step {point_step}')
    buf = _as_uint8(msg.data)
    needed = (height - 1) * row_step + width * point_step
    if buf.size < needed:
        raise PointCloudConversionError(
            'truncated', f'PointCloud2 data has {buf.size} bytes, {needed} needed for '
            f'{height}x{width} points')
    out = np.empty((height, width, 3), dtype)
    for axis, (offset, field_dtype) in enumerate(layouts):
        # A strided view per field: no copy of the cloud, no per-point Python.
        out[:, :, axis] = np.ndarray((height, width), dtype=field_dtype, buffer=buf,
                                     offset=offset, strides=(row_step, point_step))
    out = out.reshape(npoints, 3)
    if skip_nans:
        out = out[np.isfinite(out).all(axis=1)]
    return out
