"""
Mix several datasets with fixed probabilities, and the training-time resize / crop / flip.

A :class:`MixedDataset` is a deterministic stream of draws: everything about draw ``n`` is
a function of ``(seed, n)``, so any draw can be asked for again, in any order or process.
"""

from collections import namedtuple, OrderedDict
import multiprocessing

from marigold_model.data.sample import Sample, UnreadableSample
import numpy as np
from PIL import Image

try:  # torch is a dependency of marigold_model; the mixing logic itself is numpy-only
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object


Crop = namedtuple('Crop', 'height width top left flip')
Crop.__doc__ = """One TrainTransform decision: resized size, crop offset and horizontal flip."""


class TrainTransform:
    """
    Resize the shorter side to cover the target, random crop, random horizontal flip.

    RGB is resized bilinearly (with antialiasing when shrinking); depth and the valid mask use
    nearest neighbour so invalid pixels never bleed into valid ones. K follows every step
    (pixel centres at integer coordinates): scale ``f' = f * s``, ``c' = (c + 0.5) * s - 0.5``,
    crop ``c' = c - offset``, flip ``cx' = (W - 1) - cx``.
    """

    def __init__(self, height, width, hflip=True):
        """Set the output size; ``hflip`` flips horizontally with probability 0.5."""
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f'TrainTransform: size must be positive, got {height}x{width}')
        self.height = int(height)
        self.width = int(width)
        self.hflip = bool(hflip)

    def resized_size(self, height, width):
        """Return the size to resize to before the crop: the smallest that covers the output."""
        scale = max(self.height / height, self.width / width)
        # Round up so the resized image always covers the crop.
        return (max(self.height, int(np.ceil(height * scale - 1e-6))),
                max(self.width, int(np.ceil(width * scale - 1e-6))))

    def plan(self, height, width, rng):
        """Draw the Crop (offset and flip) for an input of the given size from ``rng``."""
        new_h, new_w = self.resized_size(height, width)
        top = int(rng.integers(0, new_h - self.height + 1))
        left = int(rng.integers(0, new_w - self.width + 1))
        flip = bool(self.hflip and rng.uniform() < 0.5)
        return Crop(new_h, new_w, top, left, flip)

    def plans(self, height, width, limit=2):
        """Return every Crop possible for an input of the given size, or None if over ``limit``."""
        new_h, new_w = self.resized_size(height, width)
        flips = (False, True) if self.hflip else (False,)
        if (new_h - self.height + 1) * (new_w - self.width + 1) * len(flips) > limit:
            return None
        return [Crop(new_h, new_w, top, left, flip) for top in range(new_h - self.height + 1)
                for left in range(new_w - self.width + 1) for flip in flips]

    def __call__(self, sample, rng):
        """Transform one sample with a crop and flip drawn from ``rng``."""
        return self.apply(sample, self.plan(sample.height, sample.width, rng))

    def apply(self, sample, crop):
        """Resize, crop and flip one sample as ``crop`` (of :meth:`plan` / :meth:`plans`) says."""
        h, w = sample.height, sample.width
        new_h, new_w, top, left, flip = crop
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
        rgb = rgb[top:top + self.height, left:left + self.width]
        depth = depth[top:top + self.height, left:left + self.width]
        valid = valid[top:top + self.height, left:left + self.width]
        k[0, 2] -= left
        k[1, 2] -= top
        if flip:
            rgb, depth, valid = rgb[:, ::-1], depth[:, ::-1], valid[:, ::-1]
            k[0, 2] = (self.width - 1) - k[0, 2]
            k[0, 1] = -k[0, 1]  # skew changes sign under a mirror
        return Sample(rgb=np.ascontiguousarray(rgb), depth=np.ascontiguousarray(depth),
                      valid=np.ascontiguousarray(valid), K=k, name=sample.name)


# Stream keys of the generators: which source (per block of draws), the frame order of a
# source in a pass, the crop / flip of a draw, and the replacement of an unreadable frame.
_SOURCE, _ORDER, _TRANSFORM, _RETRY = 0, 1, 2, 3
_BLOCK = 4096  # draws whose sources are drawn at once


class MixedDataset(_Dataset):
    """
    Draw samples from several datasets with fixed probabilities, each frame once per pass.

    Draw ``n`` (0, 1, 2, ...) picks a source by ``probabilities`` and takes the next frame of
    that source's current pass: pass ``e`` of source ``k`` visits its frames in the order of a
    permutation drawn from ``(seed, k, e)``, so every frame of a source is used exactly once
    per pass over it (the paper's epochs), whatever the mixture. The crop and flip of draw
    ``n`` come from a generator keyed by ``(seed, n)``, so they differ between passes.
    Everything is a function of ``(seed, n)``; a trainer that numbers its draws by step,
    micro-step and process gets a reproducible, resumable sequence.

    A frame whose reader raises :class:`UnreadableSample` is replaced by a random draw (by
    probability, uniform frame) and counted in ``skipped`` (shared with DataLoader worker
    processes); ``skipped_log`` keeps the last messages of this process.

    ``dataset[i]`` is draw ``i`` for ``0 <= i < len(dataset)`` (``length`` draws, by default
    one pass over every source's frames); :meth:`sample` takes any draw number.
    """

    def __init__(self, datasets, probabilities, length=None, seed=0, transform=None,
                 max_retries=50):
        """
        Set up the mixture.

        :param datasets: sequence of map-style datasets yielding Sample
        :param probabilities: one non-negative weight per dataset (normalised here)
        :param length: number of draws ``len()`` reports (default: the total frame count)
        :param transform: optional callable ``(sample, rng) -> sample``, e.g. TrainTransform
        :param max_retries: consecutive unreadable samples tolerated for one draw
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
        if length is None:
            length = sum(len(ds) for ds, p in zip(datasets, probs) if p > 0)
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
        # Per-source draw counts before each block, and a few recent blocks / permutations.
        self._block_starts = [np.zeros(len(datasets), dtype=np.int64)]
        self._blocks = OrderedDict()
        self._orders = OrderedDict()
        # (source, frame) -> (height, width) of frames read successfully (for cache keys).
        self._sizes = {}

    @property
    def skipped(self):
        """Return how many unreadable samples were skipped so far (all workers)."""
        return int(self._skipped.value)

    @skipped.setter
    def skipped(self, value):
        """Set the count, e.g. to the one of a checkpoint being resumed."""
        with self._skipped.get_lock():
            self._skipped.value = int(value)

    def __len__(self):
        """Return the number of draws of ``dataset[i]``."""
        return self.length

    # -- where a draw goes ------------------------------------------------------------------

    def _block(self, block):
        """Return the sources of one block's draws and each draw's rank within its source."""
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        size = len(self.datasets)
        if size == 1:
            sources = np.zeros(_BLOCK, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, _SOURCE, block])
            sources = rng.choice(size, size=_BLOCK, p=self.probabilities)
        ranks = np.empty(_BLOCK, dtype=np.int64)
        for source in range(size):
            where = np.flatnonzero(sources == source)
            ranks[where] = np.arange(where.size)
        self._blocks[block] = (sources, ranks)
        if len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return sources, ranks

    def _block_start(self, block):
        """Per-source counts of the draws before ``block``."""
        while len(self._block_starts) <= block:
            sources, _ = self._block(len(self._block_starts) - 1)
            counts = np.bincount(sources, minlength=len(self.datasets))
            self._block_starts.append(self._block_starts[-1] + counts)
        return self._block_starts[block]

    def _order(self, source, epoch):
        """Frame order of one pass over a source."""
        key = (source, epoch)
        if key not in self._orders:
            rng = np.random.default_rng([self.seed, _ORDER, source, epoch])
            self._orders[key] = rng.permutation(len(self.datasets[source]))
            if len(self._orders) > 2 * len(self.datasets):
                self._orders.popitem(last=False)
        return self._orders[key]

    def locate(self, number):
        """Return (source, frame, pass) of draw ``number``, before replacing unreadable frames."""
        number = int(number)
        if number < 0:
            raise IndexError(f'MixedDataset: draw number must be >= 0, got {number}')
        block, offset = divmod(number, _BLOCK)
        sources, ranks = self._block(block)
        source = int(sources[offset])
        position = int(self._block_start(block)[source] + ranks[offset])
        epoch, within = divmod(position, len(self.datasets[source]))
        return source, int(self._order(source, epoch)[within]), epoch

    def _transform_rng(self, number):
        return np.random.default_rng([self.seed, _TRANSFORM, int(number)])

    # -- reading ----------------------------------------------------------------------------

    def sample(self, number):
        """Return the (transformed) Sample of any draw ``number``, replacing unreadable frames."""
        source, frame, _ = self.locate(number)
        last_error = None
        for attempt in range(self.max_retries + 1):
            try:
                sample = self.datasets[source][frame]
            except UnreadableSample as exc:
                last_error = exc
                with self._skipped.get_lock():
                    self._skipped.value += 1
                message = f'dataset {source} index {frame}: {exc}'
                self.skipped_log = (self.skipped_log + [message])[-100:]
                retry = np.random.default_rng([self.seed, _RETRY, int(number), attempt])
                source = int(retry.choice(len(self.datasets), p=self.probabilities))
                frame = int(retry.integers(len(self.datasets[source])))
                continue
            self._sizes[(source, frame)] = (sample.height, sample.width)
            if self.transform is not None:
                sample = self.transform(sample, self._transform_rng(number))
            return sample
        raise RuntimeError(f'MixedDataset: {self.max_retries + 1} unreadable samples in a row '
                           f'for draw {number}; last error: {last_error}')

    def __getitem__(self, index):
        """Return draw ``index`` (see :meth:`sample`)."""
        if not 0 <= index < self.length:
            raise IndexError(f'MixedDataset index {index} out of range [0, {self.length})')
        return self.sample(index)

    # -- caching support --------------------------------------------------------------------

    def cache_key(self, number):
        """
        Return a key naming exactly the sample of draw ``number``, or None if not known unread.

        The key is (source, frame, crop): the frame must have been read successfully before
        (its size decides the crop), the transform must be a TrainTransform (or None) and
        leave the frame at most two variants (both flips of a frame at the output size), so
        a cache of keyed latents stays bounded by twice the frame count. Readers are
        deterministic, so equal keys give equal samples. On None, read the sample and ask again.
        """
        source, frame, _ = self.locate(number)
        size = self._sizes.get((source, frame))
        if size is None:
            return None
        if self.transform is None:
            return (source, frame, None)
        if not isinstance(self.transform, TrainTransform):
            return None  # its randomness is unknown: never cache
        if self.transform.plans(*size) is None:
            return None  # a frame larger than the output: too many crops to keep them all
        return (source, frame, self.transform.plan(*size, self._transform_rng(number)))

    def variants(self, limit=2):
        """
        Yield (cache key, Sample) of every frame with at most ``limit`` crops.

        Frames whose transform allows more crops (larger than the output) are read (so their
        size is known) but not listed. Unreadable frames are left out and not counted.
        """
        for source, dataset in enumerate(self.datasets):
            if self.probabilities[source] <= 0:
                continue
            for frame in range(len(dataset)):
                try:
                    sample = dataset[frame]
                except UnreadableSample:
                    continue
                self._sizes[(source, frame)] = (sample.height, sample.width)
                if self.transform is None:
                    yield (source, frame, None), sample
                elif isinstance(self.transform, TrainTransform):
                    for crop in self.transform.plans(sample.height, sample.width, limit) or ():
                        yield (source, frame, crop), self.transform.apply(sample, crop)
