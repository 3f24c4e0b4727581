"""
Generic RGB-D folder reader.

Layout: ``root/rgb/NAME.(png|jpg|jpeg)`` with ``root/depth/NAME.(png|npy|exr)`` paired by
NAME; frames without depth are ignored. Depth encodings:

* 16-bit PNG: meters = value * ``depth_scale`` (default 0.001, i.e. millimetres); 0 invalid.
* ``.npy``: float arrays are meters; integer arrays are scaled by ``depth_scale`` like PNG.
* ``.exr``: float meters, read with OpenCV or imageio when one is importable (else a
  ValueError at construction says so).

Intrinsics: the ``K`` argument, else ``root/intrinsics.txt`` or ``root/K.txt`` (a 3x3 matrix,
or the four numbers ``fx fy cx cy``), else a pinhole with ``default_hfov_deg`` horizontal
field of view and a centred principal point at each image's size.
"""

from marigold_model.data.image_io import (exr_backend, read_exr, read_npy, read_png16,
                                          read_rgb, require_dir, RGB_SUFFIXES)
from marigold_model.data.sample import intrinsics_from_hfov, make_sample, UnreadableSample
import numpy as np

try:  # torch is a dependency of marigold_model; the reader itself is numpy-only
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object

DEPTH_SUFFIXES = ('.png', '.npy', '.exr')
INTRINSICS_FILES = ('intrinsics.txt', 'K.txt')


def load_intrinsics(path):
    """Read a 3x3 K (9 numbers, or ``fx fy cx cy``) from a text file as 3x3 float64."""
    try:
        values = np.loadtxt(path, dtype=np.float64).ravel()
    except (OSError, ValueError) as exc:
        raise ValueError(f'cannot read intrinsics file {str(path)!r}: {exc}') from exc
    if values.size == 9:
        k = values.reshape(3, 3)
    elif values.size == 4:
        fx, fy, cx, cy = values
        k = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    else:
        raise ValueError(f'intrinsics file {str(path)!r} must hold 9 numbers (3x3 K) or 4 '
                         f'(fx fy cx cy), found {values.size}')
    if not np.all(np.isfinite(k)) or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ValueError(f'intrinsics file {str(path)!r}: invalid K {k.tolist()}')
    return k


class RGBDFolderDataset(_Dataset):
    """RGB-D frames from ``rgb/`` and ``depth/`` folders as :class:`Sample`."""

    def __init__(self, root, depth_scale=0.001, K=None, rgb_dir='rgb', depth_dir='depth',
                 default_hfov_deg=60.0):
        """
        Index the rgb/depth pairs under ``root``.

        :param depth_scale: meters per unit of integer depth (16-bit PNG, integer npy)
        :param K: optional 3x3 intrinsics overriding any file
        :param default_hfov_deg: horizontal fov used when no intrinsics are known
        """
        self.root = require_dir(root, 'RGBDFolderDataset')
        rgb_root = require_dir(self.root / rgb_dir, 'RGBDFolderDataset rgb folder')
        depth_root = require_dir(self.root / depth_dir, 'RGBDFolderDataset depth folder')
        if not depth_scale > 0:
            raise ValueError(f'RGBDFolderDataset: depth_scale must be > 0, got {depth_scale}')
        self.depth_scale = float(depth_scale)
        self.default_hfov_deg = float(default_hfov_deg)
        if K is not None:
            self.K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        else:
            files = [self.root / n for n in INTRINSICS_FILES if (self.root / n).is_file()]
            self.K = load_intrinsics(files[0]) if files else None

        depth_by_stem = {}
        for p in sorted(depth_root.iterdir()):
            if p.suffix.lower() in DEPTH_SUFFIXES:
                depth_by_stem.setdefault(p.stem, p)
        self.items = []
        for p in sorted(rgb_root.iterdir()):
            if p.suffix.lower() in RGB_SUFFIXES and p.stem in depth_by_stem:
                self.items.append((p, depth_by_stem[p.stem]))
        if not self.items:
            raise ValueError(f'RGBDFolderDataset: no rgb/depth pairs under {str(self.root)!r} '
                             f'(expected {rgb_dir}/NAME.png|jpg with '
                             f'{depth_dir}/NAME.png|npy|exr)')
        if any(d.suffix.lower() == '.exr' for _, d in self.items) and exr_backend() is None:
            raise ValueError(f'RGBDFolderDataset: {str(depth_root)!r} holds EXR depth, which '
                             f'needs OpenCV (cv2) or imageio; neither is installed')

    def __len__(self):
        """Return the number of frames."""
        return len(self.items)

    def read_depth(self, path):
        """Read one depth file as HxW float32 meters (0 / non-finite = invalid)."""
        suffix = path.suffix.lower()
        if suffix == '.png':
            return read_png16(path).astype(np.float32) * self.depth_scale
        if suffix == '.exr':
            return read_exr(path)
        data = read_npy(path)
        if np.issubdtype(data.dtype, np.integer):
            return data.astype(np.float32) * self.depth_scale
        if not np.issubdtype(data.dtype, np.floating):
            raise UnreadableSample(f'{str(path)!r}: unsupported depth dtype {data.dtype}')
        return data.astype(np.float32)

    def __getitem__(self, index):
        """Read frame ``index`` as a Sample named by the file stem."""
        rgb_path, depth_path = self.items[index]
        rgb = read_rgb(rgb_path)
        depth = self.read_depth(depth_path)
        if rgb.shape[:2] != depth.shape:
            raise UnreadableSample(f'{str(rgb_path)!r} and {str(depth_path)!r}: sizes '
                                   f'{rgb.shape[:2]} and {depth.shape} differ')
        k = self.K
        if k is None:
            k = intrinsics_from_hfov(rgb.shape[1], rgb.shape[0], self.default_hfov_deg)
        return make_sample(rgb, depth, k, rgb_path.stem)
