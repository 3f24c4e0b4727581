"""
One RGB-D training sample and the errors data readers raise.

Every reader in :mod:`marigold_model.data` yields :class:`Sample` objects (numpy, no torch);
:func:`collate_samples` turns a list of them into a batch of torch tensors for a DataLoader.
"""

from dataclasses import dataclass

import numpy as np


class UnreadableSample(Exception):
    """
    A single sample could not be read or decoded (corrupt file, bad message, ...).

    Readers raise it from ``__getitem__``; :class:`marigold_model.data.mixing.MixedDataset`
    counts and skips such samples instead of stopping training.
    """


class DatasetError(ValueError):
    """A whole data set is missing, malformed or wrongly specified (nothing can be read)."""


@dataclass(frozen=True)
class Sample:
    """
    One RGB-D frame.

    :param rgb: HxWx3 uint8 image.
    :param depth: HxW float32 planar z depth in meters (camera optical frame), 0 or non-finite
        where invalid.
    :param valid: HxW bool mask of pixels with a usable depth.
    :param K: 3x3 float64 pinhole intrinsics for this image (pixel centres at integer
        coordinates, OpenCV / ROS convention).
    :param name: identifier of the sample (file stem, bag stamp, synthetic index, ...).
    """

    rgb: np.ndarray
    depth: np.ndarray
    valid: np.ndarray
    K: np.ndarray
    name: str

    def __post_init__(self):
        """Check shapes and dtypes at construction."""
        self.validate()

    def validate(self):
        """Raise ValueError when a field has the wrong shape or dtype."""
        rgb, depth, valid, k = self.rgb, self.depth, self.valid, self.K
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f'Sample {self.name!r}: rgb must be HxWx3, got '
                             f'{getattr(rgb, "shape", type(rgb))}')
        if rgb.dtype != np.uint8:
            raise ValueError(f'Sample {self.name!r}: rgb must be uint8, got {rgb.dtype}')
        hw = rgb.shape[:2]
        if not isinstance(depth, np.ndarray) or depth.shape != hw:
            raise ValueError(f'Sample {self.name!r}: depth shape '
                             f'{getattr(depth, "shape", None)} != rgb shape {hw}')
        if depth.dtype != np.float32:
            raise ValueError(f'Sample {self.name!r}: depth must be float32, got {depth.dtype}')
        if not isinstance(valid, np.ndarray) or valid.shape != hw or valid.dtype != np.bool_:
            raise ValueError(f'Sample {self.name!r}: valid must be a bool array of shape {hw}')
        if not isinstance(k, np.ndarray) or k.shape != (3, 3) or k.dtype != np.float64:
            raise ValueError(f'Sample {self.name!r}: K must be a 3x3 float64 array')
        if not isinstance(self.name, str):
            raise ValueError(f'Sample name must be a str, got {type(self.name).__name__}')

    @property
    def height(self):
        """Return the image height in pixels."""
        return self.rgb.shape[0]

    @property
    def width(self):
        """Return the image width in pixels."""
        return self.rgb.shape[1]


def make_sample(rgb, depth, K, name, valid=None):
    """
    Build a :class:`Sample`, casting dtypes and deriving the mask from the depth.

    :param rgb: HxWx3 image (uint8, or float in [0, 1])
    :param depth: HxW depth in meters; non-finite or <= 0 means invalid
    :param valid: optional extra HxW mask, combined (and) with the depth-derived one
    :return: a validated Sample whose invalid depth pixels are set to 0
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        if np.issubdtype(rgb.dtype, np.floating):
            rgb = np.clip(np.rint(rgb * 255.0), 0, 255)
        rgb = rgb.astype(np.uint8)
    depth = np.asarray(depth, dtype=np.float32)
    mask = np.isfinite(depth) & (depth > 0)
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool)
    depth = np.where(mask, depth, np.float32(0.0)).astype(np.float32)
    return Sample(rgb=np.ascontiguousarray(rgb), depth=depth, valid=mask,
                  K=np.asarray(K, dtype=np.float64).reshape(3, 3).copy(), name=str(name))


def intrinsics_from_hfov(width, height, hfov_deg):
    """Return 3x3 pinhole intrinsics: square pixels, centred principal point, hfov in degrees."""
    f = 0.5 * width / np.tan(np.deg2rad(hfov_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0],
                     [0.0, f, (height - 1) / 2.0],
                     [0.0, 0.0, 1.0]])


def collate_samples(samples):
    """
    Stack equal-size samples into a batch dict of torch tensors (a DataLoader ``collate_fn``).

    :return: dict with ``rgb`` float32 (B, 3, H, W) in [0, 1], ``depth`` float32
        (B, 1, H, W) meters (0 where invalid), ``valid`` bool (B, 1, H, W), ``K`` float32
        (B, 3, 3) and ``name`` list of str
    """
    import torch  # local import: the rest of this module is numpy-only

    if not samples:
        raise ValueError('collate_samples: empty batch')
    shapes = {s.rgb.shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f'collate_samples: samples differ in size: {sorted(shapes)}')
    rgb = np.stack([s.rgb for s in samples]).transpose(0, 3, 1, 2)
    return {
        'rgb': torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0),
        'depth': torch.from_numpy(np.stack([s.depth for s in samples])[:, None]),
        'valid': torch.from_numpy(np.stack([s.valid for s in samples])[:, None]),
        'K': torch.from_numpy(np.stack([s.K for s in samples]).astype(np.float32)),
        'name': [s.name for s in samples],
    }
