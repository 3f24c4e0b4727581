"""
Evaluation data sets: samples plus the protocol they are scored with (depth range, crop).

Specs (``--dataset`` of ``marigold-eval``, see :func:`open_dataset`):

- ``nyu:PATH[:SPLITS]``: NYUv2 ``nyu_depth_v2_labeled.mat`` (HDF5), optionally restricted to
  the 654 test images listed by ``splits.mat``; Eigen crop, 1e-3..10 m.
- ``kitti:ROOT:SPLITFILE[:DEPTH_ROOT]``: KITTI Eigen split, lines ``rgb_path depth_path
  [focal]``; 16-bit PNG depth / 256 = meters, 0 invalid; Garg crop, 1e-5..80 m.
- ``folder:ROOT[:DEPTH_SCALE]``: an RGB-D folder (:mod:`marigold_model.data.rgbd_folder`,
  integer depth times DEPTH_SCALE = meters, default millimetres), no crop, range 1e-3 m..inf
  unless ``--min-depth`` / ``--max-depth`` say otherwise.
- ``synthetic:N:SEED[:SIZE]``: N procedural scenes drawn from a random stream that training
  never uses; range taken from the data. ``synthetic-basic:...``: the same scenes without the
  hard cases (thin objects, occluders, camouflage, decals), as the generator drew them before.
"""

from dataclasses import dataclass, field
import math
from pathlib import Path

import numpy as np

from ..data.kitti import KittiEigen
from ..data.nyu import NyuLabeled, read_nyu_split
from ..data.sample import DatasetError

NYU_MIN_DEPTH, NYU_MAX_DEPTH = 1e-3, 10.0
KITTI_MIN_DEPTH, KITTI_MAX_DEPTH = 1e-5, 80.0
FOLDER_MIN_DEPTH, FOLDER_MAX_DEPTH = 1e-3, math.inf
# Eigen crop (rows 45:471, cols 41:601) defined on NYUv2's 480x640 frames.
EIGEN_CROP_SIZE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)
# Garg crop as fractions of the image size (rows top, bottom, cols left, right).
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)
# Third seed word of evaluation scenes: training draws scene i of seed s from the stream
# [s, i] (numpy pads with zeros), so a non-zero third word can never repeat a training scene.
SYNTHETIC_EVAL_STREAM = 0x4556414C


@dataclass(frozen=True)
class EvalDataset:
    """
    Samples plus the protocol they are scored with.

    :param name: the spec or a short description
    :param samples: indexable sequence of :class:`marigold_model.data.sample.Sample`
    :param min_depth: lower bound of valid ground truth (meters, exclusive)
    :param max_depth: upper bound of valid ground truth (meters, exclusive)
    :param crop: ``'eigen'``, ``'garg'``, None, or a callable ``(height, width) -> mask``
    :param info: extra facts for the report (e.g. entries skipped for lack of ground truth)
    """

    name: str
    samples: object
    min_depth: float
    max_depth: float
    crop: object = None
    info: dict = field(default_factory=dict)

    def __len__(self):
        """Return the number of samples."""
        return len(self.samples)

    def close(self):
        """Release open files held by the samples' reader."""
        closer = getattr(self.samples, 'close', None)
        if closer is not None:
            closer()


# ---- crops ----------------------------------------------------------------------------------


def _check_size(height, width):
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f'image size must be positive, got {height}x{width}')
    return int(height), int(width)


def eigen_crop_mask(height, width):
    """
    Return the Eigen crop as a bool [height, width] mask, True inside.

    Rows 45:471, cols 41:601 at 480x640, scaled proportionally to other sizes.
    """
    height, width = _check_size(height, width)
    top, bottom, left, right = EIGEN_CROP
    base_h, base_w = EIGEN_CROP_SIZE
    mask = np.zeros((height, width), dtype=bool)
    # Round half up (not Python's half-to-even) so scaled crops stay symmetric in size.
    rows = (int(top * height / base_h + 0.5), int(bottom * height / base_h + 0.5))
    cols = (int(left * width / base_w + 0.5), int(right * width / base_w + 0.5))
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def garg_crop_mask(height, width):
    """
    Return the Garg crop as a bool [height, width] mask, True inside.

    Rows 0.4081*H : 0.9919*H, cols 0.0359*W : 0.9641*W, truncated as Garg et al. do.
    """
    height, width = _check_size(height, width)
    top, bottom, left, right = GARG_CROP
    mask = np.zeros((height, width), dtype=bool)
    mask[int(top * height):int(bottom * height), int(left * width):int(right * width)] = True
    return mask


CROPS = {'eigen': eigen_crop_mask, 'garg': garg_crop_mask}


def crop_mask(crop, height, width):
    """
    Return the bool [height, width] evaluation mask of a crop setting.

    :param crop: None (whole image), ``'eigen'``, ``'garg'``, a callable ``(height, width) ->
        mask`` or a bool array of the image size
    """
    if crop is None:
        return np.ones(_check_size(height, width), dtype=bool)
    if isinstance(crop, str):
        if crop not in CROPS:
            raise ValueError(f'unknown crop {crop!r}; use one of {sorted(CROPS)} or None')
        return CROPS[crop](height, width)
    mask = crop(height, width) if callable(crop) else crop
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ValueError(f'crop mask shape {mask.shape} differs from the image {height}x{width}')
    return mask.astype(bool)

# ---- synthetic and folder -------------------------------------------------------------------


def synthetic_samples(count, seed, height=None, width=None, hard_cases=True):
    """
    Render ``count`` procedural evaluation scenes that no training stream can produce.

    Scene ``i`` comes from ``numpy.random.default_rng([seed, i, SYNTHETIC_EVAL_STREAM])``;
    height and width default to the generator's.
    """
    from ..data.synthetic import NO_HARD_CASES, render_scene, SceneConfig
    if count < 1:
        raise DatasetError(f'synthetic scene count must be >= 1, got {count}')
    config = SceneConfig() if hard_cases else SceneConfig(**NO_HARD_CASES)
    return [render_scene(np.random.default_rng([seed, i, SYNTHETIC_EVAL_STREAM]), config,
                         height, width, name=f'synthetic_eval_{seed}_{i:04d}')
            for i in range(count)]


def depth_range_of(samples):
    """Return (min_depth, max_depth), an open interval just containing every valid depth."""
    low, high = math.inf, -math.inf
    for sample in samples:
        if sample.valid.any():
            values = sample.depth[sample.valid]
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if not low <= high:
        raise DatasetError('no sample has a valid depth pixel')
    # A relative margin keeps the extreme pixels inside the strict bounds in any precision.
    return low * (1.0 - 1e-6), high * (1.0 + 1e-6)


def _open_folder(root, depth_scale=None):
    from ..data.rgbd_folder import RGBDFolderDataset
    if not Path(root).is_dir():
        raise DatasetError(f'RGB-D folder not found: {root}')
    if depth_scale is None:
        return RGBDFolderDataset(root)
    try:
        depth_scale = float(depth_scale)
    except ValueError:
        raise DatasetError(f'folder depth scale must be a number, got {depth_scale!r}') from None
    return RGBDFolderDataset(root, depth_scale=depth_scale)


# ---- data set specs -------------------------------------------------------------------------


def _int_field(text, what):
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f'{what} must be an integer, got {text!r}') from None


def _parse_size(text):
    height, _, width = text.lower().partition('x')
    height = _int_field(height, 'synthetic image height')
    width = _int_field(width, 'synthetic image width') if width else height
    if height < 8 or width < 8:
        raise DatasetError(f'synthetic image size {height}x{width} is too small (>= 8)')
    return height, width


def open_dataset(spec, min_depth=None, max_depth=None):
    """
    Open an evaluation data set from a spec string (see the module docstring).

    Synthetic SIZE is ``64`` or ``48x64``; ``min_depth`` / ``max_depth`` override the data
    set's bounds.

    :return: EvalDataset (call ``close()`` when done)
    """
    kind, _, rest = str(spec).partition(':')
    parts = rest.split(':') if rest else []
    usage = {'nyu': 'nyu:PATH[:SPLITS]', 'kitti': 'kitti:ROOT:SPLITFILE[:DEPTH_ROOT]',
             'folder': 'folder:ROOT[:DEPTH_SCALE]', 'synthetic': 'synthetic:N:SEED[:SIZE]',
             'synthetic-basic': 'synthetic-basic:N:SEED[:SIZE]'}
    if kind not in usage:
        raise DatasetError(f'unknown data set {spec!r}; use one of {", ".join(usage.values())}')
    counts = {'nyu': (1, 2), 'kitti': (2, 3), 'folder': (1, 2), 'synthetic': (2, 3),
              'synthetic-basic': (2, 3)}[kind]
    if not counts[0] <= len(parts) <= counts[1] or not all(parts):
        raise DatasetError(f'malformed data set {spec!r}; expected {usage[kind]}')
    info = {}
    if kind == 'nyu':
        indices = read_nyu_split(parts[1]) if len(parts) > 1 else None
        samples = NyuLabeled(parts[0], indices)
        low, high, crop = NYU_MIN_DEPTH, NYU_MAX_DEPTH, 'eigen'
        info['split'] = 'test (splits.mat)' if indices is not None else 'all images'
    elif kind == 'kitti':
        samples = KittiEigen(*parts)
        low, high, crop = KITTI_MIN_DEPTH, KITTI_MAX_DEPTH, 'garg'
        info['no_ground_truth'] = samples.no_ground_truth
    elif kind == 'folder':
        samples = _open_folder(*parts)
        low, high, crop = FOLDER_MIN_DEPTH, FOLDER_MAX_DEPTH, None
    else:
        count = _int_field(parts[0], 'synthetic scene count')
        seed = _int_field(parts[1], 'synthetic seed')
        if seed < 0:
            raise DatasetError(f'synthetic seed must be >= 0, got {seed}')
        size = _parse_size(parts[2]) if len(parts) > 2 else (None, None)
        samples = synthetic_samples(count, seed, *size, hard_cases=kind == 'synthetic')
        (low, high), crop = depth_range_of(samples), None
    low = low if min_depth is None else float(min_depth)
    high = high if max_depth is None else float(max_depth)
    if not 0 <= low < high:
        raise DatasetError(f'depth range must satisfy 0 <= min < max, got {low}..{high}')
    return EvalDataset(str(spec), samples, low, high, crop, info)
