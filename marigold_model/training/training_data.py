"""
The training data stream: sources built from DataSpecs, mixed, and drawn reproducibly.

Every (step, micro-step, process) reads fixed positions of one stream (draw_numbers), and
each sample becomes model inputs (sample_to_tensors): RGB and depth in [-1, 1], valid mask.
"""

import importlib

import numpy as np
import torch

from .train_config import READERS, TrainingError
from ..alignment import normalize_percentile


def build_source(spec, config):
    """Make the Dataset of one DataSpec (``config`` gives synthetic scenes their resolution)."""
    options = dict(spec.options)
    module, name, _ = READERS[spec.kind]
    reader = getattr(importlib.import_module(module, __package__), name)
    if spec.kind == 'synthetic':
        from ..data.synthetic import SceneConfig
        scene = dict(options.pop('scene', None) or {})
        scene = SceneConfig(height=config.height, width=config.width,
                            **{k: tuple(v) if isinstance(v, list) else v
                               for k, v in scene.items()})
        return reader(config=scene, **options)
    return reader(spec.root, **options)


def build_training_data(config, sources=None):
    """
    Build the mixed training set: sources drawn by probability, resized, cropped, flipped.

    :param sources: optional datasets standing in for ``config.data`` (one per entry, e.g.
        frames already in memory); the probabilities still come from ``config.data``
    :return: MixedDataset
    """
    from ..data.mixing import MixedDataset, TrainTransform
    if sources is None:
        sources = [build_source(spec, config) for spec in config.data]
    elif len(sources) != len(config.data):
        raise TrainingError(f'{len(sources)} sources given for {len(config.data)} data entries')
    probabilities = [spec.probability for spec in config.data]
    transform = TrainTransform(config.height, config.width, hflip=config.hflip)
    return MixedDataset(sources, probabilities, seed=config.seed, transform=transform)


def build_validation_data(config):
    """Build the held-out draws of ``config.val_data``: cropped as training draws, not flipped."""
    from ..data.mixing import MixedDataset, TrainTransform
    sources = [build_source(spec, config) for spec in config.val_data]
    transform = TrainTransform(config.height, config.width, hflip=False)
    return MixedDataset(sources, [spec.probability for spec in config.val_data],
                        seed=config.seed, transform=transform)


def sample_to_tensors(sample, config):
    """
    Turn one Sample into model inputs: RGB and normalised depth in [-1, 1], valid mask.

    A sample without any valid depth pixel gets depth 0 and an all-False mask: it teaches
    nothing (the loss is masked) but does not stop training.

    :return: (rgb [3, H, W], depth [1, H, W], valid [1, H, W]) tensors
    """
    rgb = torch.from_numpy(sample.rgb.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0
    valid = np.asarray(sample.valid, dtype=bool) & np.isfinite(sample.depth)
    if valid.any():
        depth = normalize_percentile(sample.depth, valid, config.depth_low_percentile,
                                     config.depth_high_percentile)
    else:
        depth = np.zeros(valid.shape, np.float32)
    depth = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None]
    valid = torch.from_numpy(np.ascontiguousarray(valid))[None]
    return rgb, depth, valid


def draw_numbers(config, step, micro, process, processes):
    """Return the stream positions of one (step, micro-step, process): the same every time."""
    # Numbered step by step, micro-step by micro-step, process by process: all processes
    # together walk the stream once (each frame once per pass over its source).
    first = ((step * config.grad_accumulation + micro) * processes + process) * config.batch_size
    return list(range(first, first + config.batch_size))
