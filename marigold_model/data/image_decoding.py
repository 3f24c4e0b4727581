"""
Raw image buffers, named by their ROS encoding, to numpy: the one decoder of camera images.

The ROS node (``marigold_ros.conversions``) and the bag data reader
(:mod:`marigold_model.data.bag_rgbd`) both decode here, so they accept the same encodings with
the same results. The functions take a message's fields, not a message, so no ROS message
class is needed. Semantics follow cv_bridge (not available here), with numpy views over the
buffer instead of per-pixel Python.
"""

import array
import io
import re

from marigold_model.errors import ReasonError
import numpy as np
from PIL import Image as PILImage

#: Largest image (width * height) accepted by default: above 8K UHD (33.2 MP), so only
#: corrupt or hostile headers hit it before a huge allocation does.
DEFAULT_MAX_PIXELS = 40_000_000

#: Colour encodings accepted by :func:`decode_rgb` (sensor_msgs/image_encodings names).
#: 'yuv422' is UYVY (U Y0 V Y1) and 'yuv422_yuy2' is YUYV (Y0 U Y1 V) as in ROS; newer
#: ROS releases also name them 'uyvy' and 'yuyv', accepted as aliases.
COLOR_ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', 'yuv422',
                   'yuv422_yuy2', 'uyvy', 'yuyv')

#: Depth encodings accepted by :func:`decode_depth` (REP 118).
DEPTH_ENCODINGS = ('32FC1', '16UC1')

#: Meters per unit of 16UC1 depth (REP 118: millimeters).
MILLIMETERS = 0.001

# Bytes per pixel of the accepted colour encodings.
_BYTES_PER_PIXEL = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2,
                    'yuv422': 2, 'yuv422_yuy2': 2, 'uyvy': 2, 'yuyv': 2}
_YUV_ALIASES = {'uyvy': 'yuv422', 'yuyv': 'yuv422_yuy2'}

# BT.601 "video range" YUV -> RGB in 20-bit fixed point, the constants and rounding of
# OpenCV's cvtColor(COLOR_YUV2RGB_UYVY / _YUY2), which is what cv_bridge runs:
#   R = 1.164 (Y - 16) + 1.596 (V - 128)
#   G = 1.164 (Y - 16) - 0.813 (V - 128) - 0.391 (U - 128)
#   B = 1.164 (Y - 16) + 2.018 (U - 128)
# with Y - 16 clamped at 0, +0.5 rounding and saturation to [0, 255].
_BT601_SHIFT = 20
_BT601_CY = 1220542
_BT601_CUB = 2116026
_BT601_CUG = -409993
_BT601_CVG = -852492
_BT601_CVR = 1673527


class ImageConversionError(ReasonError):
    """
    An image buffer that cannot be converted.

    :param reason: short machine-readable key, usable as a diagnostics counter:
        'unknown_encoding', 'empty', 'truncated', 'bad_step', 'bad_size', 'too_large',
        'corrupt_compressed' or 'bad_array'.
    :param message: human-readable description naming the problem.
    """


def as_uint8(data):
    """
    Return a flat uint8 view of a message ``data`` field, without copying if possible.

    ``data`` may be a numpy array (rosbags), bytes-like or array('B') (rclpy), or a list.
    """
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(data, dtype=np.uint8)
    # Lists (e.g. a hand-built message) are rare and slow anyway.
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def byte_order(is_bigendian):
    """Return '>' or '<' for a message's ``is_bigendian`` flag."""
    return '>' if is_bigendian else '<'


def normalise_encoding(encoding):
    """Return a colour encoding name as compared here: stripped, lower case."""
    return str(encoding).strip().lower()


def _strided_view(buf, height, width, step, encoding, channels, dtype, bytes_per_pixel,
                  max_pixels):
    """Validate the geometry of a buffer and return an (H, W, C) view honouring ``step``."""
    width, height, step = int(width), int(height), int(step)
    if width == 0 or height == 0 or buf.size == 0:
        raise ImageConversionError(
            'empty', f'empty image: {width}x{height}, {buf.size} data bytes')
    if max_pixels is not None and width * height > max_pixels:
        raise ImageConversionError(
            'too_large', f'image {width}x{height} exceeds max_pixels={max_pixels}')
    row_bytes = width * bytes_per_pixel
    if step < row_bytes:
        raise ImageConversionError(
            'bad_step', f'step {step} < width {width} * {bytes_per_pixel} bytes per pixel '
            f'({encoding})')
    if buf.size < step * height:
        raise ImageConversionError(
            'truncated', f'data has {buf.size} bytes, step {step} * height {height} = '
            f'{step * height} expected ({encoding})')
    itemsize = np.dtype(dtype).itemsize
    # The strides make the row padding (step - row_bytes) invisible without copying.
    return np.ndarray((height, width, channels), dtype=dtype, buffer=buf,
                      strides=(step, channels * itemsize, itemsize))


def mono16_to_mono8(values):
    """Scale 16-bit grey to uint8 as cv_bridge does (``convertTo(CV_8U, 255 / 65535)``)."""
    return np.rint(values * (255.0 / 65535.0)).astype(np.uint8)


def decode_rgb(data, height, width, step, encoding, is_bigendian=False,
               max_pixels=DEFAULT_MAX_PIXELS):
    """
    Decode a raw colour image to an HxWx3 uint8 RGB array (cv_bridge semantics).

    Encodings: rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8 (replicated to three
    channels), mono16 (scaled to 8 bit as cv_bridge does: v * 255 / 65535 rounded),
    yuv422 (= UYVY, as in ROS image_encodings) and yuv422_yuy2 (= YUYV), both converted with
    BT.601 video-range coefficients exactly as OpenCV/cv_bridge do.

    The result is always a new C-contiguous array that does not share memory with ``data``,
    so callers may modify it.

    :param data: the pixel bytes (numpy array, bytes-like, array('B') or list)
    :param step: bytes per row, padding included
    :param is_bigendian: byte order of 16-bit values
    :param max_pixels: refuse images with more than this many pixels (None: no limit)
    :raises ImageConversionError: with ``reason`` 'unknown_encoding' (depth encodings such as
        16UC1 / 32FC1 included), 'empty', 'too_large', 'bad_step', 'truncated' or 'bad_size'
        (odd width in a YUV 4:2:2 image).
    """
    name = normalise_encoding(encoding)
    if name not in _BYTES_PER_PIXEL:
        if str(encoding).strip().upper() in DEPTH_ENCODINGS:
            raise ImageConversionError(
                'unknown_encoding', f'encoding {encoding!r} is a depth encoding, not a '
                'colour image; supported: ' + ', '.join(COLOR_ENCODINGS))
        raise ImageConversionError(
            'unknown_encoding', f'unsupported image encoding {encoding!r}; supported: '
            + ', '.join(COLOR_ENCODINGS))
    name = _YUV_ALIASES.get(name, name)
    buf = as_uint8(data)
    bpp = _BYTES_PER_PIXEL[name]
    geometry = (buf, height, width, step, encoding)

    if name == 'mono16':
        dtype = np.dtype(byte_order(is_bigendian) + 'u2')
        view = _strided_view(*geometry, 1, dtype, bpp, max_pixels)[..., 0]
        return np.repeat(mono16_to_mono8(view)[:, :, None], 3, axis=2)
    if name in ('yuv422', 'yuv422_yuy2'):
        if int(width) % 2:
            raise ImageConversionError(
                'bad_size', f'{encoding} needs an even width, got {width}')
        view = _strided_view(*geometry, 2, np.uint8, bpp, max_pixels)
        return _yuv422_to_rgb(view, uyvy=(name == 'yuv422'))

    view = _strided_view(*geometry, bpp, np.uint8, bpp, max_pixels)
    if name == 'rgb8':
        return view.copy()  # C order: drops the row padding
    if name == 'rgba8':
        return np.ascontiguousarray(view[:, :, :3])
    if name == 'bgr8':
        return np.ascontiguousarray(view[:, :, ::-1])
    if name == 'bgra8':
        return np.ascontiguousarray(view[:, :, 2::-1])
    # mono8
    return np.repeat(view, 3, axis=2)


def _yuv422_to_rgb(view, uyvy):
    """Convert an (H, W, 2) interleaved 4:2:2 view to RGB like OpenCV (fixed point)."""
    height, width = view.shape[:2]
    # Each macro-pixel of 4 bytes holds two pixels sharing one U and one V.
    macro = view.reshape(height, width // 2, 4)  # no copy: each row is contiguous
    if uyvy:
        u, y0, v, y1 = (macro[..., i] for i in range(4))
    else:
        y0, u, y1, v = (macro[..., i] for i in range(4))
    uu = u.astype(np.int32) - 128
    vv = v.astype(np.int32) - 128
    half = 1 << (_BT601_SHIFT - 1)
    ruv = half + _BT601_CVR * vv
    guv = half + _BT601_CVG * vv + _BT601_CUG * uu
    buv = half + _BT601_CUB * uu
    luma = np.stack((y0, y1), axis=-1).astype(np.int32)  # (H, W/2, 2)
    luma = np.maximum(luma - 16, 0) * _BT601_CY
    out = np.empty((height, width // 2, 2, 3), dtype=np.int32)
    out[..., 0] = luma + ruv[..., None]
    out[..., 1] = luma + guv[..., None]
    out[..., 2] = luma + buv[..., None]
    out >>= _BT601_SHIFT  # arithmetic shift = floor, as OpenCV
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8).reshape(height, width, 3)


def _plain(error):
    """Return an exception's text without object addresses ('<... object at 0x...>')."""
    return re.sub(r'<[^<>]* at 0x[0-9a-fA-F]+>', 'the data', str(error)) or \
        type(error).__name__


def decode_compressed_rgb(data, fmt='', max_pixels=DEFAULT_MAX_PIXELS):
    """
    Decode a compressed image (JPEG or PNG) to HxWx3 uint8 RGB.

    ``fmt`` (a CompressedImage's ``format``) is only used to reject compressedDepth images;
    the codec is detected from the bytes (PIL), so 'jpeg', 'png', 'rgb8; jpeg compressed
    bgr8' etc. all work. The size is read from the header before the full decode, so
    oversized images are refused cheaply. 16-bit grey PNGs are scaled like mono16.

    :param max_pixels: refuse images with more than this many pixels (None: no limit)
    :raises ImageConversionError: 'empty', 'unknown_encoding' (compressedDepth),
        'too_large' or 'corrupt_compressed'.
    """
    fmt = str(fmt)
    if 'compresseddepth' in fmt.lower():
        raise ImageConversionError(
            'unknown_encoding', f'compressed format {fmt!r} is a depth image, not colour')
    buf = as_uint8(data)
    if buf.size == 0:
        raise ImageConversionError('empty', 'compressed image has no data')
    try:
        # Only JPEG and PNG decoders are enabled: less attack surface for untrusted input.
        pil = PILImage.open(io.BytesIO(buf.tobytes()), formats=('JPEG', 'PNG'))
    except PILImage.DecompressionBombError as exc:
        raise ImageConversionError('too_large', f'compressed image too large: {exc}') from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL's own text names a BytesIO object address: say what the bytes are instead.
        raise ImageConversionError(
            'corrupt_compressed', f'compressed image (format {fmt!r}, {buf.size} bytes '
            f'starting {buf[:8].tobytes().hex(" ")}) is corrupt or not JPEG / PNG: no '
            'decoder recognises it') from exc
    with pil:
        width, height = pil.size
        if width == 0 or height == 0:
            raise ImageConversionError('empty', f'compressed image is {width}x{height}')
        if max_pixels is not None and width * height > max_pixels:
            raise ImageConversionError(
                'too_large', f'compressed image {width}x{height} exceeds '
                f'max_pixels={max_pixels}')
        try:
            pil.load()
            if pil.mode in ('I;16', 'I;16L', 'I;16B', 'I'):
                mono = mono16_to_mono8(np.asarray(pil).clip(0, 65535))
                return np.repeat(mono[:, :, None], 3, axis=2)
            rgb = pil if pil.mode == 'RGB' else pil.convert('RGB')
            return np.array(rgb, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageConversionError(
                'corrupt_compressed', f'compressed {pil.format} image {width}x{height} '
                f'(format {fmt!r}, {buf.size} bytes) is corrupt: {_plain(exc)}') from exc


def decode_depth(data, height, width, step, encoding, is_bigendian=False,
                 max_pixels=DEFAULT_MAX_PIXELS, unit=MILLIMETERS):
    """
    Decode a raw depth image to a new HxW float32 array in meters (REP 118).

    32FC1 is taken as meters (NaN / inf kept as they are); 16UC1 is ``unit`` meters per
    count (millimeters by default), with 0 (no reading) -> NaN.

    :param data: the pixel bytes (numpy array, bytes-like, array('B') or list)
    :param step: bytes per row, padding included
    :param is_bigendian: byte order of the values
    :param max_pixels: refuse images with more than this many pixels (None: no limit)
    :raises ImageConversionError: 'unknown_encoding' for other encodings (mono16 included:
        it carries no unit), 'empty', 'too_large', 'bad_step' or 'truncated'.
    """
    name = str(encoding).strip().upper()
    if name not in DEPTH_ENCODINGS:
        raise ImageConversionError(
            'unknown_encoding', f'unsupported depth encoding {encoding!r}; supported: '
            '32FC1 (meters), 16UC1 (millimeters)')
    geometry = (as_uint8(data), height, width, step, encoding)
    order = byte_order(is_bigendian)
    if name == '32FC1':
        view = _strided_view(*geometry, 1, np.dtype(order + 'f4'), 4, max_pixels)[..., 0]
        return view.astype(np.float32)  # native order, contiguous, a copy
    view = _strided_view(*geometry, 1, np.dtype(order + 'u2'), 2, max_pixels)[..., 0]
    meters = view.astype(np.float32) * np.float32(unit)
    meters[view == 0] = np.nan
    return meters
