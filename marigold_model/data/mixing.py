"""
Mix several datasets with fixed probabilities, and the training-time resize / crop / flip.

Both are deterministic: ``MixedDataset[i]`` draws everything (which dataset, which sample,
crop offset, flip) from ``np.random.default_rng([seed, i])``.
"""

import multiprocessing

from marigold_model.data.sample import Sample, UnreadableSample
import numpy as np
from PIL import Image

try:  # torch is a dependency of marigold_model; the mixing logic itself is numpy-only
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object


class TrainTransform:
    """
    Resize the shorter side to cover the target, random crop, random horizontal flip.

    RGB is resized bilinearly (with antialiasing when shrinking); depth and the valid mask use
    nearest neighbour so invalid pixels never bleed into valid ones. K follows every step
    (pixel centres at integer coordinates): scale ``f' = f * s``, ``c' = (c + 0.5) * s - 0.5``,
    crop ``c' = c - offset``, flip ``cx' = (W - 1) - cx``.
    """

    def __init__(self, height, width, hflip=True):
        """
        Set the output size.

        :param height: output height in pixels.
        :param width: output width in pixels.
        :param hflip: flip horizontally with probability 0.5.
        """
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f'TrainTransform: size must be positive, got {height}x{width}')
        self.height = int(height)
        self.width = int(width)
        self.hflip = bool(hflip)

    def __call__(self, sample, rng):
        """
        Transform one sample.

        :param sample: input Sample.
        :param rng: numpy Generator for the crop offset and the flip.
        :return: Sample of size (height, width).
        """
        h, w = sample.height, sample.width
        scale = max(self.height / h, self.width / w)
        # Round up so the resized image always covers the crop.
        new_h = max(self.height, int(np.ceil(h * scale - 1e-6)))
        new_w = max(self.width, int(np.ceil(w * scale - 1e-6)))
        rgb, depth, valid = sample.rgb, sample.depth, sample.valid
        k = sample.K.copy()
        if (new_h, new_w) != (h, w):
            rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))
            sx, sy = new_w / w, new_h / h
            # Nearest source pixel for each target pixel centre (same convention as K).
            cols = np.minimum(((np.arange(new_w) + 0.5) / sx).astype(np.int64), w - 1)
            rows = np.minimum(((np.arange(new_h) + 0.5) / sy).astype(np.int64), h - 1)
            depth = depth[rows[:, None], cols[None, :]]
            valid = valid[rows[:, None], cols[None, :]]
            k[0, :] *= sx
            k[1, :] *= sy
            k[0, 2] += 0.5 * sx - 0.5
            k[1, 2] += 0.5 * sy - 0.5
        top = int(rng.integers(0, new_h - self.height + 1))
        left = int(rng.integers(0, new_w - self.width + 1))
        rgb = rgb[top:top + self.height, left:left + self.width]
        depth = depth[top:top + self.height, left:left + self.width]
        valid = valid[top:top + self.height, left:left + self.width]
        k[0, 2] -= left
        k[1, 2] -= top
        if self.hflip and rng.uniform() < 0.5:
            rgb, depth, valid = rgb[:, ::-1], depth[:, ::-1], valid[:, ::-1]
            k[0, 2] = (self.width - 1) - k[0, 2]
            k[0, 1] = -k[0, 1]  # skew changes sign under a mirror
        return Sample(rgb=np.ascontiguousarray(rgb), depth=np.ascontiguousarray(depth),
                      valid=np.ascontiguousarray(valid), K=k, name=sample.name)


class MixedDataset(_Dataset):
    """
    Draw samples from several datasets with fixed probabilities.

    Index ``i`` uses ``np.random.default_rng([seed, i])`` to pick a dataset (by
    ``probabilities``), a sample index in it (uniform) and the transform's randomness, so it
    always yields the same Sample. A sample whose reader raises :class:`UnreadableSample` is
    skipped (a fresh draw from the same generator replaces it) and counted in ``skipped``
    (shared with DataLoader worker processes); ``skipped_log`` keeps the last messages of this
    process.
    """

    def __init__(self, datasets, probabilities, length, seed=0, transform=None,
                 max_retries=50):
        """
        Set up the mixture.

        :param datasets: sequence of map-style datasets yielding Sample.
        :param probabilities: one non-negative weight per dataset (normalised here).
        :param length: number of indices of this dataset (an epoch).
        :param seed: base seed.
        :param transform: optional callable ``(sample, rng) -> sample``, e.g. TrainTransform.
        :param max_retries: consecutive unreadable samples tolerated for one index.
        """
        datasets = list(datasets)
        probs = np.asarray(probabilities, dtype=np.float64).ravel()
        if not datasets:
            raise ValueError('MixedDataset: no datasets given')
        if len(probs) != len(datasets):
            raise ValueError(f'MixedDataset: {len(datasets)} datasets but {len(probs)} '
                             f'probabilities')
        if np.any(~np.isfinite(probs)) or np.any(probs < 0) or probs.sum() <= 0:
            raise ValueError(f'MixedDataset: probabilities must be non-negative with a '
                             f'positive sum, got {list(probabilities)}')
        for i, (ds, p) in enumerate(zip(datasets, probs)):
            if p > 0 and len(ds) == 0:
                raise ValueError(f'MixedDataset: dataset {i} ({type(ds).__name__}) is empty '
                                 f'but has probability {p}')
        if length < 0:
            raise ValueError(f'MixedDataset: length must be >= 0, got {length}')
        self.datasets = datasets
        self.probabilities = probs / probs.sum()
        self.length = int(length)
        self.seed = int(seed)
        self.transform = transform
        self.max_retries = int(max_retries)
        self._skipped = multiprocessing.Value('q', 0)
        self.skipped_log = []

    @property
    def skipped(self):
        """Return how many unreadable samples were skipped so far (all workers)."""
        return int(self._skipped.value)

    def __len__(self):
        """Return the number of indices."""
        return self.length

    def draw(self, rng):
        """
        Pick a dataset and an index in it.

        :param rng: numpy Generator.
        :return: (dataset number, sample index).
        """
        which = int(rng.choice(len(self.datasets), p=self.probabilities))
        return which, int(rng.integers(len(self.datasets[which])))

    def __getitem__(self, index):
        """
        Return the Sample for ``index``, skipping unreadable ones.

        :param index: 0 <= index < len(self).
        :return: Sample (transformed when a transform is set).
        """
        if not 0 <= index < self.length:
            raise IndexError(f'MixedDataset index {index} out of range [0, {self.length})')
        rng = np.random.default_rng([self.seed, int(index)])
        last_error = None
        for _ in range(self.max_retries + 1):
            which, j = self.draw(rng)
            try:
                sample = self.datasets[which][j]
            except UnreadableSample as exc:
                last_error = exc
                with self._skipped.get_lock():
                    self._skipped.value += 1
                message = f'dataset {which} index {j}: {exc}'
                self.skipped_log = (self.skipped_log + [message])[-100:]
                continue
            if self.transform is not None:
                sample = self.transform(sample, rng)
            return sample
        raise RuntimeError(f'MixedDataset: {self.max_retries + 1} unreadable samples in a row '
                           f'for index {index}; last error: {last_error}')
