"""
Small file readers shared by the data readers: RGB, 16-bit PNG, npy, EXR, root checks.

Read failures raise :class:`UnreadableSample` naming the file, so a mixed dataset can skip it.
"""

import os
from pathlib import Path
import re

from marigold_model.data.sample import DatasetError, UnreadableSample
import numpy as np
from PIL import Image

RGB_SUFFIXES = ('.png', '.jpg', '.jpeg')


def require_dir(path, what):
    """Return a data set root as a Path; ValueError (naming reader ``what``) if not a directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f'{what}: root path {str(p)!r} does not exist')
    if not p.is_dir():
        raise ValueError(f'{what}: root path {str(p)!r} is not a directory')
    return p


def require_file(path, what):
    """Return a file a data set needs as a Path; DatasetError naming ``what`` if missing."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f'{what} not found: {path}')
    return path


def read_rgb(path):
    """Read an 8-bit image as HxWx3 uint8 RGB."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert('RGB'), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableSample(f'cannot read image {str(path)!r}: {exc}') from exc


def read_png16(path):
    """Read a single-channel 16-bit PNG as HxW uint16."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            data = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableSample(f'cannot read depth PNG {str(path)!r}: {exc}') from exc
    if data.ndim != 2 or mode not in ('I;16', 'I;16B', 'I;16L', 'I'):
        raise UnreadableSample(f'depth PNG {str(path)!r} is not single-channel 16-bit '
                               f'(mode {mode}, shape {data.shape})')
    if data.dtype != np.uint16:
        if data.min(initial=0) < 0 or data.max(initial=0) > 65535:
            raise UnreadableSample(f'depth PNG {str(path)!r} has values outside 16 bits')
        data = data.astype(np.uint16)
    return data


def relative_to_uint16(relative):
    """
    Store relative depth in [0, 1] as uint16: ``1 + round(value * 65534)``, non-finite -> 0.

    0 means no depth, as in 16-bit metric depth files, so the nearest point (relative 0)
    is never mistaken for a hole. Values outside [0, 1] are clipped.
    """
    rel = np.asarray(relative, dtype=np.float64)
    valid = np.isfinite(rel)
    out = np.zeros(rel.shape, np.uint16)
    out[valid] = 1 + np.rint(np.clip(rel[valid], 0.0, 1.0) * 65534.0).astype(np.uint16)
    return out


def read_npy(path):
    """Read an HxW (or HxWx1) array from a .npy file as HxW."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UnreadableSample(f'cannot read {str(path)!r}: {exc}') from exc
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[..., 0]
    if data.ndim != 2:
        raise UnreadableSample(f'{str(path)!r}: expected an HxW array, got shape {data.shape}')
    return data


def exr_backend():
    """Return the name of an importable EXR reader ('cv2' or 'imageio'), or None."""
    for name in ('cv2', 'imageio'):
        try:
            __import__(name)
        except ImportError:
            continue
        return name
    return None


def read_exr(path):
    """Read the first channel of an OpenEXR image as HxW float32."""
    backend = exr_backend()
    if backend is None:
        raise ValueError(f'cannot read {str(path)!r}: reading EXR needs OpenCV (cv2) or '
                         f'imageio with an EXR plugin, and neither is installed')
    try:
        if backend == 'cv2':
            # OpenCV reads EXR only when this is set before the first imread.
            os.environ.setdefault('OPENCV_IO_ENABLE_OPENEXR', '1')
            import cv2
            data = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_UNCHANGED)
            if data is None:
                raise OSError('cv2.imread returned None')
        else:
            import imageio.v3 as iio
            data = iio.imread(str(path))
    except Exception as exc:  # noqa: B902 - any backend failure means this file is unreadable
        raise UnreadableSample(f'cannot read EXR {str(path)!r}: {exc}') from exc
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., 0]
    return data


def read_list_file(path, root):
    """
    Parse a file of ``rgb_path depth_path`` rows (whitespace or comma separated).

    Header rows and comments (``#``) are skipped, as are rows whose depth is ``None``.

    :param root: directory the relative paths are relative to
    :return: list of (rgb Path, depth Path)
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f'list file {str(p)!r} does not exist')
    pairs = []
    for line in p.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        tokens = [t for t in re.split(r'[,\s]+', line) if t]
        if len(tokens) < 2 or 'None' in tokens[:2]:
            continue
        if not all(Path(t).suffix for t in tokens[:2]):
            continue  # a header row such as "rgb_path,depth_path"
        pairs.append((Path(root) / tokens[0], Path(root) / tokens[1]))
    return pairs
