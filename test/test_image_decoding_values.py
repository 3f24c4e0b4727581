"""
Values and messages of marigold_model.data.image_decoding, called directly (issue 18).

Compressed inputs are made by PIL from known arrays; where the installed Pillow never gives
an image the decoder still handles (a zero-size header, the 16-bit grey modes of other Pillow
releases), PIL's ``open`` is wrapped to return exactly such an image.
"""

import array
import io

from marigold_model.data import image_decoding
from marigold_model.data.image_decoding import as_uint8, ImageConversionError
from marigold_model.data.image_decoding import decode_compressed_rgb, decode_depth, decode_rgb
import numpy as np
from PIL import Image as PILImage
import pytest


def _refusal(func, *args, **kwargs):
    with pytest.raises(ImageConversionError) as err:
        func(*args, **kwargs)
    return err.value.reason, str(err.value)


def _png(array, mode=None):
    buf = io.BytesIO()
    PILImage.fromarray(array, mode).save(buf, format='PNG')
    return buf.getvalue()


def test_byte_order_defaults_to_little_endian():
    # mono16 0x0102 = 258 little-endian (-> 1), 0x0201 = 513 big-endian (-> 2).
    data = bytes([0x02, 0x01, 0xFF, 0x00])  # 258, 255 little-endian
    assert decode_rgb(data, 1, 2, 4, 'mono16')[0, :, 0].tolist() == [1, 1]
    assert decode_rgb(data, 1, 2, 4, 'mono16', True)[0, :, 0].tolist() == [2, 254]
    # 16UC1 258 mm little-endian; 32FC1 1.5 little-endian.
    assert decode_depth(data[:2], 1, 1, 2, '16UC1')[0, 0] == np.float32(258) * np.float32(0.001)
    assert decode_depth(np.float32(1.5).tobytes(), 1, 1, 4, '32FC1')[0, 0] == 1.5
    assert decode_depth(np.array([1.5], '>f4').tobytes(), 1, 1, 4, '32FC1', True)[0, 0] == 1.5


def test_geometry_refusals_name_the_numbers():
    assert _refusal(decode_rgb, b'', 2, 3, 9, 'rgb8') == (
        'empty', 'empty image: 3x2, 0 data bytes')
    assert _refusal(decode_rgb, bytes(24), 2, 4, 12, 'rgb8', max_pixels=7) == (
        'too_large', 'image 4x2 exceeds max_pixels=7')
    assert _refusal(decode_rgb, bytes(24), 2, 4, 11, 'bgr8') == (
        'bad_step', 'step 11 < width 4 * 3 bytes per pixel (bgr8)')
    assert _refusal(decode_rgb, bytes(23), 3, 2, 8, 'rgba8') == (
        'truncated', 'data has 23 bytes, step 8 * height 3 = 24 expected (rgba8)')
    assert _refusal(decode_depth, bytes(10), 3, 1, 4, '32FC1') == (
        'truncated', 'data has 10 bytes, step 4 * height 3 = 12 expected (32FC1)')


def test_yuv422_gives_uint8():
    # Grey UYVY (U = V = 128): R = G = B = 1.164 (Y - 16), rounded.
    data = bytes([128, 16, 128, 235, 128, 126, 128, 81])
    yuyv = bytes(data[i ^ 1] for i in range(8))
    for encoding, raw in (('yuv422', data), ('yuv422_yuy2', yuyv)):
        rgb = decode_rgb(raw, 1, 4, 8, encoding)
        assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous
        assert rgb[0, :, 0].tolist() == [0, 255, 128, 76]


def test_corrupt_compressed_message_names_format_size_and_first_bytes():
    data = b'not an image at all'
    assert _refusal(decode_compressed_rgb, data) == (
        'corrupt_compressed', "compressed image (format '', 19 bytes starting "
        '6e 6f 74 20 61 6e 20 69) is corrupt or not JPEG / PNG: no decoder recognises it')
    # Only JPEG and PNG are decoded: a valid GIF is refused the same way.
    buf = io.BytesIO()
    PILImage.new('RGB', (2, 2)).save(buf, format='GIF')
    reason, text = _refusal(decode_compressed_rgb, buf.getvalue(), 'gif')
    assert reason == 'corrupt_compressed' and "(format 'gif', " in text


def test_truncated_png_message_is_pils_text_without_addresses():
    png = _png(np.arange(32 * 48 * 3, dtype=np.uint32).reshape(32, 48, 3).astype(np.uint8))
    cut = png[:len(png) // 2]
    with pytest.raises(OSError) as pil_error:
        PILImage.open(io.BytesIO(cut)).load()
    assert _refusal(decode_compressed_rgb, cut, 'png') == (
        'corrupt_compressed', f"compressed PNG image 48x32 (format 'png', {len(cut)} bytes) "
        f'is corrupt: {pil_error.value}')


def test_plain_error_text():
    plain = image_decoding._plain
    assert plain(OSError('cannot identify image file <_io.BytesIO object at 0x7F4dAB>')) == (
        'cannot identify image file the data')
    assert plain(ValueError('<a at 0x1> and <b c at 0xff>, not <this>')) == (
        'the data and the data, not <this>')
    assert plain(ValueError('at 0x12 without brackets')) == 'at 0x12 without brackets'
    assert plain(EOFError()) == 'EOFError'
    assert plain(SyntaxError('')) == 'SyntaxError'


def test_decompression_bomb_refused_as_too_large(monkeypatch):
    # PIL refuses an image above twice MAX_IMAGE_PIXELS while opening it: 8x8 = 64 > 2 * 20.
    png = _png(np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(PILImage, 'MAX_IMAGE_PIXELS', 20)
    with pytest.raises(PILImage.DecompressionBombError) as pil_error:
        PILImage.open(io.BytesIO(png))
    assert _refusal(decode_compressed_rgb, png, 'png', max_pixels=None) == (
        'too_large', f'compressed image too large: {pil_error.value}')


def _open_returning(monkeypatch, make):
    """Make PIL's open return ``make(real image)`` (a behaviour of another PIL release)."""
    real_open = PILImage.open

    def fake_open(fp, mode='r', formats=None):
        return make(real_open(fp, mode, formats))

    monkeypatch.setattr(PILImage, 'open', fake_open)


@pytest.mark.parametrize('size', [(0, 3), (3, 0), (0, 0)])
def test_zero_size_compressed_image_is_empty(monkeypatch, size):
    # Pillow 13 refuses a zero width or height in the header itself; the guard covers others.
    png = _png(np.zeros((2, 2, 3), np.uint8))
    _open_returning(monkeypatch, lambda image: PILImage.new('RGB', size))
    assert _refusal(decode_compressed_rgb, png, 'png') == (
        'empty', f'compressed image is {size[0]}x{size[1]}')


@pytest.mark.parametrize('mode, dtype', [('I;16', '<u2'), ('I;16L', '<u2'), ('I;16B', '>u2'),
                                         ('I', '<i4')])
def test_every_16_bit_grey_mode_scaled_like_mono16(monkeypatch, mode, dtype):
    # Pillow 13 opens a 16-bit grey PNG as I;16; other releases and rawmodes give the rest.
    values = np.array([[0, 128, 129, 385, 386, 65535]])  # /257: 0, .498, .502, 1.498, ...
    png = _png(values.astype(np.uint16))
    raw = values.astype(dtype).tobytes()
    _open_returning(monkeypatch, lambda image: PILImage.frombytes(mode, (6, 1), raw))
    rgb = decode_compressed_rgb(png, 'png')
    assert rgb.shape == (1, 6, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [0, 0, 1, 1, 2, 255]
    assert (rgb == rgb[:, :, :1]).all()


def test_32_bit_grey_clipped_to_16_bit(monkeypatch):
    # Mode I holds int32: below 0 reads as 0, above 65535 as 65535, as cv_bridge saturates.
    png = _png(np.zeros((1, 4), np.uint16))
    raw = np.array([-5, -70000, 70000, 2 ** 31 - 1], '<i4').tobytes()
    _open_returning(monkeypatch, lambda image: PILImage.frombytes('I', (4, 1), raw))
    assert decode_compressed_rgb(png, 'png')[0, :, 0].tolist() == [0, 0, 255, 255]


def test_as_uint8_flat_bytes_without_copies():
    words = np.array([[0x0102, 0x0304], [0x0506, 0xFFFF]], '<u2')
    flat = as_uint8(words)
    assert flat.dtype == np.uint8 and flat.shape == (8,)
    assert flat.tolist() == [2, 1, 4, 3, 6, 5, 255, 255] and np.shares_memory(flat, words)
    buffer = bytearray([7, 8, 9])
    for data in (buffer, memoryview(buffer), array.array('B', buffer)):
        got = as_uint8(data)
        assert got.dtype == np.uint8 and got.tolist() == [7, 8, 9]
    assert np.shares_memory(as_uint8(buffer), np.frombuffer(buffer, np.uint8))
    assert as_uint8(b'\x00\xfe').tolist() == [0, 254]
    # A hand-built message's list (nested or not) is copied into uint8.
    for data, expected in (([1, 2, 255], [1, 2, 255]), ([[1, 2], [3, 4]], [1, 2, 3, 4]),
                           ([5], [5])):
        got = as_uint8(data)
        assert got.dtype == np.uint8 and got.ndim == 1 and got.tolist() == expected
