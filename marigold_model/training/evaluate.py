"""
Evaluate relative depth predictors with the affine-invariant protocol (``marigold-eval``).

The protocol is the Marigold paper's: per image, fit a least-squares scale and shift of the
prediction to the ground truth on the valid pixels (sensor mask, crop, depth range), clip the
aligned depth to the data set's range, compute AbsRel, delta1 and friends, then average the
per-image values over the data set.

Data sets (``--dataset`` specs, see :func:`open_dataset`):

- ``nyu:PATH[:SPLITS]``: NYUv2 ``nyu_depth_v2_labeled.mat`` (HDF5), optionally restricted to
  the 654 test images listed by ``splits.mat``; Eigen crop, 1e-3..10 m.
- ``kitti:ROOT:SPLITFILE[:DEPTH_ROOT]``: KITTI Eigen split, lines ``rgb_path depth_path
  [focal]``; 16-bit PNG depth / 256 = meters, 0 invalid; Garg crop, 1e-5..80 m.
- ``folder:ROOT[:DEPTH_SCALE]``: an RGB-D folder (:mod:`marigold_model.data.rgbd_folder`,
  integer depth times DEPTH_SCALE = meters, default millimetres), no crop, range 1e-3 m..inf
  unless ``--min-depth`` / ``--max-depth`` say otherwise.
- ``synthetic:N:SEED[:SIZE]``: N procedural scenes drawn from a random stream that training
  never uses; range taken from the data.

Baselines (``'constant'``, ``'ramp'``) go through the same protocol and show what a
predictor must beat.
"""

import argparse
from dataclasses import dataclass, field
import json
import math
import os
from pathlib import Path
import sys

import numpy as np

from ..alignment import (AlignmentError, depth_metrics, evaluate_affine_invariant,
                        REASON_DEGENERATE_RANGE, REASON_NONFINITE_PREDICTION)
from ..config import (EstimatorConfig, InferenceConfig, ModelConfig, override,
                     validate_inference_config, validate_model_config)
from ..data.image_io import read_png16, read_rgb
from ..data.sample import make_sample, UnreadableSample

NYU_MIN_DEPTH, NYU_MAX_DEPTH = 1e-3, 10.0
KITTI_MIN_DEPTH, KITTI_MAX_DEPTH = 1e-5, 80.0
FOLDER_MIN_DEPTH, FOLDER_MAX_DEPTH = 1e-3, math.inf
# NYUv2 RGB camera (NYU Depth V2 toolbox, camera_params.m).
NYU_K = np.array([[518.8579, 0.0, 325.5824], [0.0, 519.4696, 253.7362], [0.0, 0.0, 1.0]])
# KITTI left colour camera focal length, used when the split file has no focal column.
KITTI_DEFAULT_FOCAL = 721.5377
# Eigen crop (rows 45:471, cols 41:601) defined on NYUv2's 480x640 frames.
EIGEN_CROP_SIZE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)
# Garg crop as fractions of the image size (rows top, bottom, cols left, right).
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)
# Third seed word of evaluation scenes: training draws scene i of seed s from the stream
# [s, i] (numpy pads with zeros), so a non-zero third word can never repeat a training scene.
SYNTHETIC_EVAL_STREAM = 0x4556414C
BASELINES = ('constant', 'ramp')
# Keys of evaluate_affine_invariant's result that describe the fit, not the quality.
_FIT_KEYS = ('scale', 'shift', 'n_valid')


class DatasetError(ValueError):
    """An evaluation data set is missing, malformed or wrongly specified."""


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
    Eigen crop: rows 45:471, cols 41:601 at 480x640, scaled proportionally to other sizes.

    :param height: image height
    :param width: image width
    :return: bool [height, width] mask, True inside the crop
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
    Garg crop: rows 0.4081*H : 0.9919*H, cols 0.0359*W : 0.9641*W (truncated, as Garg et al.).

    :param height: image height
    :param width: image width
    :return: bool [height, width] mask, True inside the crop
    """
    height, width = _check_size(height, width)
    top, bottom, left, right = GARG_CROP
    mask = np.zeros((height, width), dtype=bool)
    mask[int(top * height):int(bottom * height), int(left * width):int(right * width)] = True
    return mask


CROPS = {'eigen': eigen_crop_mask, 'garg': garg_crop_mask}


def crop_mask(crop, height, width):
    """
    Return the evaluation mask of a crop setting.

    :param crop: None (whole image), ``'eigen'``, ``'garg'``, a callable ``(height, width) ->
        mask`` or a bool array of the image size
    :param height: image height
    :param width: image width
    :return: bool [height, width] mask
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


# ---- NYUv2 ----------------------------------------------------------------------------------


def _require_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f'{what} not found: {path}')
    return path


def read_nyu_split(path, key='testNdxs'):
    """
    Read 1-based image indices from NYUv2's ``splits.mat`` (MATLAB v5 or v7.3).

    :param path: path of splits.mat
    :param key: ``'testNdxs'`` (654 images) or ``'trainNdxs'`` (795 images)
    :return: int64 array of 0-based indices
    """
    from scipy.io import loadmat
    path = _require_file(path, 'NYUv2 splits file')
    try:
        content = loadmat(str(path), variable_names=[key])
    except (NotImplementedError, ValueError):
        content = None  # MATLAB v7.3 is HDF5, which scipy refuses
    if content is None:
        import h5py
        try:
            with h5py.File(path, 'r') as stream:
                content = {key: stream[key][()]} if key in stream else {}
        except OSError as error:
            raise DatasetError(f'{path} is not a MATLAB file: {error}') from None
    if key not in content:
        raise DatasetError(f'{path} has no {key!r} entry')
    values = content[key]
    values = np.asarray(values).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 1) or np.any(
            values != np.round(values)):
        raise DatasetError(f'{path}: {key} must hold positive 1-based integer indices')
    return values.astype(np.int64) - 1


class NyuLabeled:
    """
    NYUv2 labeled set (``nyu_depth_v2_labeled.mat``) as a sequence of Samples, read lazily.

    The file is MATLAB v7.3 (HDF5) and stores arrays transposed: ``images`` is
    [N, 3, W, H] uint8 and ``depths`` [N, W, H] float meters (in-painted).
    """

    def __init__(self, path, indices=None):
        """
        Open the file and check its layout.

        :param path: path of nyu_depth_v2_labeled.mat
        :param indices: optional 0-based image indices to serve (e.g. the test split)
        """
        import h5py
        path = _require_file(path, 'NYUv2 labeled file')
        try:
            self._file = h5py.File(path, 'r')
        except OSError as error:
            raise DatasetError(f'{path} is not an HDF5 (MATLAB v7.3) file: {error}') from None
        for key in ('images', 'depths'):
            if key not in self._file:
                self.close()
                raise DatasetError(f'{path} has no {key!r} dataset; is it '
                                   'nyu_depth_v2_labeled.mat?')
        self._images, self._depths = self._file['images'], self._file['depths']
        images, depths = self._images.shape, self._depths.shape
        if len(images) != 4 or images[1] != 3 or len(depths) != 3 or depths[0] != images[0] or (
                depths[1:] != images[2:]):
            self.close()
            raise DatasetError(f'{path}: expected images [N, 3, W, H] and depths [N, W, H], '
                               f'got {images} and {depths}')
        count = images[0]
        self.indices = np.arange(count) if indices is None else np.asarray(indices, np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= count):
            self.close()
            raise DatasetError(f'{path}: split index out of range for {count} images')
        self.path = path

    def __len__(self):
        """Return the number of images served."""
        return len(self.indices)

    def __getitem__(self, position):
        """
        Read one image and its depth.

        :param position: 0 <= position < len(self)
        :return: Sample named ``nyu_<1-based index>``
        """
        if not 0 <= position < len(self):
            raise IndexError(f'NYUv2 position {position} out of range [0, {len(self)})')
        index = int(self.indices[position])
        rgb = np.asarray(self._images[index]).transpose(2, 1, 0)
        depth = np.asarray(self._depths[index]).T
        return make_sample(rgb, depth, NYU_K, f'nyu_{index + 1:04d}')

    def close(self):
        """Close the HDF5 file."""
        self._file.close()


# ---- KITTI ----------------------------------------------------------------------------------


def read_kitti_depth(path):
    """
    Read a KITTI depth PNG: uint16, meters * 256, 0 = no measurement.

    :param path: PNG path
    :return: float32 [H, W] meters, 0 where invalid
    """
    return read_png16(path).astype(np.float32) / np.float32(256.0)


class KittiEigen:
    """
    KITTI Eigen split as a sequence of Samples.

    Each split line is ``rgb_path depth_path [focal]``, relative to the root(s); lines whose
    depth path is ``None`` (no ground truth) are left out and counted in ``no_ground_truth``.
    """

    def __init__(self, root, split_file, depth_root=None):
        """
        Parse the split file and check that every listed file exists.

        :param root: folder the RGB paths are relative to
        :param split_file: the split text file
        :param depth_root: folder the depth paths are relative to (default ``root``)
        """
        self.root = Path(root)
        self.depth_root = Path(depth_root) if depth_root else self.root
        for folder in {self.root, self.depth_root}:
            if not folder.is_dir():
                raise DatasetError(f'KITTI root folder not found: {folder}')
        split_file = _require_file(split_file, 'KITTI split file')
        self.entries = []
        self.no_ground_truth = 0
        with open(split_file) as stream:
            for number, line in enumerate(stream, 1):
                fields = line.split()
                if not fields or fields[0].startswith('#'):
                    continue
                if len(fields) < 2:
                    raise DatasetError(f'{split_file}:{number}: expected "rgb_path depth_path '
                                       f'[focal]", got {line.strip()!r}')
                if fields[1] == 'None':
                    self.no_ground_truth += 1
                    continue
                try:
                    focal = float(fields[2]) if len(fields) > 2 else KITTI_DEFAULT_FOCAL
                except ValueError:
                    raise DatasetError(f'{split_file}:{number}: focal {fields[2]!r} is not a '
                                       'number') from None
                self.entries.append((self.root / fields[0], self.depth_root / fields[1], focal))
        if not self.entries:
            raise DatasetError(f'{split_file} lists no image with ground truth')
        missing = [str(p) for entry in self.entries for p in entry[:2] if not p.is_file()]
        if missing:
            raise DatasetError(f'{len(missing)} file(s) of {split_file} not found, e.g. '
                               + ', '.join(missing[:3]))

    def __len__(self):
        """Return the number of images with ground truth."""
        return len(self.entries)

    def __getitem__(self, position):
        """
        Read one image and its projected LiDAR depth.

        :param position: 0 <= position < len(self)
        :return: Sample named after the RGB path
        """
        if not 0 <= position < len(self):
            raise IndexError(f'KITTI position {position} out of range [0, {len(self)})')
        rgb_path, depth_path, focal = self.entries[position]
        rgb = read_rgb(rgb_path)
        depth = read_kitti_depth(depth_path)
        if depth.shape != rgb.shape[:2]:
            raise DatasetError(f'{depth_path} is {depth.shape} but {rgb_path} is '
                               f'{rgb.shape[:2]}')
        height, width = depth.shape
        k = np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0],
                      [0.0, 0.0, 1.0]])
        name = str(rgb_path.relative_to(self.root).with_suffix(''))
        return make_sample(rgb, depth, k, name)


# ---- synthetic and folder -------------------------------------------------------------------


def synthetic_samples(count, seed, height=None, width=None):
    """
    Render procedural evaluation scenes that no training stream can produce.

    Scene ``i`` comes from ``numpy.random.default_rng([seed, i, SYNTHETIC_EVAL_STREAM])``.

    :param count: number of scenes (>= 1)
    :param seed: evaluation seed
    :param height: image height (default the generator's)
    :param width: image width (default the generator's)
    :return: list of Samples
    """
    from ..data.synthetic import render_scene, SceneConfig
    if count < 1:
        raise DatasetError(f'synthetic scene count must be >= 1, got {count}')
    config = SceneConfig()
    return [render_scene(np.random.default_rng([seed, i, SYNTHETIC_EVAL_STREAM]), config,
                         height, width, name=f'synthetic_eval_{seed}_{i:04d}')
            for i in range(count)]


def depth_range_of(samples):
    """
    Open interval just containing every valid depth of the samples.

    :param samples: iterable of Samples
    :return: (min_depth, max_depth) with min < every valid depth < max
    """
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
    Open an evaluation data set from a spec string.

    Specs: ``nyu:PATH[:SPLITS]``, ``kitti:ROOT:SPLITFILE[:DEPTH_ROOT]``,
    ``folder:ROOT[:DEPTH_SCALE]``,
    ``synthetic:N:SEED[:SIZE]`` (SIZE ``64`` or ``48x64``).

    :param spec: the spec
    :param min_depth: override of the data set's lower depth bound
    :param max_depth: override of the data set's upper depth bound
    :return: EvalDataset (call ``close()`` when done)
    """
    kind, _, rest = str(spec).partition(':')
    parts = rest.split(':') if rest else []
    usage = {'nyu': 'nyu:PATH[:SPLITS]', 'kitti': 'kitti:ROOT:SPLITFILE[:DEPTH_ROOT]',
             'folder': 'folder:ROOT[:DEPTH_SCALE]', 'synthetic': 'synthetic:N:SEED[:SIZE]'}
    if kind not in usage:
        raise DatasetError(f'unknown data set {spec!r}; use one of {", ".join(usage.values())}')
    counts = {'nyu': (1, 2), 'kitti': (2, 3), 'folder': (1, 2), 'synthetic': (2, 3)}[kind]
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
        samples = synthetic_samples(count, seed, *size)
        (low, high), crop = depth_range_of(samples), None
    low = low if min_depth is None else float(min_depth)
    high = high if max_depth is None else float(max_depth)
    if not 0 <= low < high:
        raise DatasetError(f'depth range must satisfy 0 <= min < max, got {low}..{high}')
    return EvalDataset(str(spec), samples, low, high, crop, info)


# ---- predictors and scoring -----------------------------------------------------------------


def constant_baseline(rgb):
    """
    Predict the same relative depth everywhere.

    Least squares cannot fit a constant; :func:`score_image` then uses scale 0, i.e. the
    mean ground truth, which is the best constant in the least-squares sense.

    :param rgb: [H, W, 3] image
    :return: float32 [H, W] of 0.5
    """
    return np.full(np.shape(rgb)[:2], 0.5, dtype=np.float32)


def ramp_baseline(rgb):
    """
    Predict depth growing linearly from the bottom row (closest, 0) to the top row (1).

    :param rgb: [H, W, 3] image
    :return: float32 [H, W] relative depth
    """
    height, width = np.shape(rgb)[:2]
    rows = (height - 1 - np.arange(height)) / max(height - 1, 1)
    return np.repeat(rows[:, None], width, axis=1).astype(np.float32)


def resolve_predictor(predictor, name=None):
    """
    Turn a predictor into a batch function and a label.

    :param predictor: a baseline name (``'constant'``, ``'ramp'``), an object with
        ``estimate(list of frames) -> list of results with .depth`` (DepthEstimator), or a
        callable ``rgb -> depth`` (an array, or an object with ``.depth``)
    :param name: label for the results (default derived from the predictor)
    :return: (callable list of rgb -> list of [H, W] arrays, label)
    """
    if isinstance(predictor, str):
        if predictor not in BASELINES:
            raise ValueError(f'unknown baseline {predictor!r}; use one of {BASELINES}')
        single = {'constant': constant_baseline, 'ramp': ramp_baseline}[predictor]
        return (lambda frames: [single(f) for f in frames]), name or predictor
    if hasattr(predictor, 'estimate'):
        def batch(frames):
            return [result.depth for result in predictor.estimate(list(frames))]
        return batch, name or type(predictor).__name__
    if callable(predictor):
        def batch(frames):
            return [getattr(out, 'depth', out) for out in map(predictor, frames)]
        return batch, name or getattr(predictor, '__name__', 'predictor')
    raise ValueError(f'predictor must be a baseline name, an estimator or a callable, got '
                     f'{type(predictor).__name__}')


def score_image(pred_rel, gt, valid, min_depth, max_depth):
    """
    Metrics of one image under the affine-invariant protocol.

    A prediction that is constant on the valid pixels has no least-squares scale; it is scored
    with scale 0 and shift = mean ground truth (the limit of the fit, the best constant).

    :param pred_rel: [H, W] relative depth
    :param gt: [H, W] ground-truth meters
    :param valid: [H, W] bool evaluation mask (sensor mask and crop)
    :param min_depth: lower depth bound (exclusive)
    :param max_depth: upper depth bound (exclusive)
    :return: dict of metrics plus ``scale``, ``shift`` and ``n_valid``
    :raises AlignmentError: no valid pixel, or too few for a fit
    """
    try:
        return evaluate_affine_invariant(pred_rel, gt, valid, min_depth, max_depth)
    except AlignmentError as error:
        if error.reason != REASON_DEGENERATE_RANGE:
            raise
    pred = np.asarray(pred_rel, dtype=np.float64)
    truth = np.asarray(gt, dtype=np.float64)
    with np.errstate(invalid='ignore'):
        mask = (np.asarray(valid, dtype=bool) & np.isfinite(pred) & np.isfinite(truth)
                & (truth > min_depth) & (truth < max_depth))
    shift = float(truth[mask].mean())
    aligned = np.full(truth.shape, np.clip(shift, min_depth, max_depth))
    result = depth_metrics(aligned, truth, mask)
    result.update(scale=0.0, shift=shift, n_valid=int(mask.sum()))
    return result


def _progress(total, label, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; evaluation works without it
        return None
    return tqdm(total=total, desc=label, unit='img', file=sys.stderr)


def evaluate(predictor, dataset, min_depth=None, max_depth=None, crop=None, *, batch_size=4,
             limit=None, progress=False, name=None):
    """
    Score a predictor on a data set: per-image aligned metrics, averaged over images.

    :param predictor: DepthEstimator, callable ``rgb -> relative depth`` or a baseline name
        (see :func:`resolve_predictor`)
    :param dataset: EvalDataset, or a sequence of Samples
    :param min_depth: lower depth bound; default the EvalDataset's (else 1e-3)
    :param max_depth: upper depth bound; default the EvalDataset's (else infinity)
    :param crop: crop setting (see :func:`crop_mask`); default the EvalDataset's (else none)
    :param batch_size: frames per predictor call
    :param limit: score only the first ``limit`` samples
    :param progress: show a tqdm progress bar on stderr
    :param name: label of the predictor in the result
    :return: dict with ``predictor``, ``images`` (scored), ``skipped`` (no valid pixels) and
        the mean of every metric (``abs_rel``, ``delta1``, ``delta2``, ``delta3``, ``rmse``,
        ``sq_rel``), and ``abs_rel_per_image`` (the scored images' AbsRel, in order, for
        paired comparisons)
    :raises ValueError: bad arguments, a prediction of the wrong shape, or no image scored
    """
    if isinstance(dataset, EvalDataset):
        min_depth = dataset.min_depth if min_depth is None else min_depth
        max_depth = dataset.max_depth if max_depth is None else max_depth
        crop = dataset.crop if crop is None else crop
        samples = dataset.samples
    else:
        samples = dataset
    min_depth = FOLDER_MIN_DEPTH if min_depth is None else float(min_depth)
    max_depth = math.inf if max_depth is None else float(max_depth)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if limit is not None and limit < 1:
        raise ValueError(f'limit must be >= 1, got {limit}')
    predict, label = resolve_predictor(predictor, name)
    total = len(samples) if limit is None else min(limit, len(samples))
    sums, scored, skipped, per_image = {}, 0, 0, []
    bar = _progress(total, label, progress)
    try:
        for start in range(0, total, batch_size):
            chunk = [samples[i] for i in range(start, min(start + batch_size, total))]
            predictions = predict([sample.rgb for sample in chunk])
            if len(predictions) != len(chunk):
                raise ValueError(f'{label} returned {len(predictions)} predictions for '
                                 f'{len(chunk)} frames')
            for sample, prediction in zip(chunk, predictions):
                prediction = np.asarray(prediction)
                if prediction.shape != sample.depth.shape:
                    raise ValueError(f'{label}: prediction for {sample.name} has shape '
                                     f'{prediction.shape}, ground truth {sample.depth.shape}')
                valid = sample.valid & crop_mask(crop, *sample.depth.shape)
                try:
                    metrics = score_image(prediction, sample.depth, valid, min_depth, max_depth)
                except AlignmentError as error:
                    if error.reason == REASON_NONFINITE_PREDICTION:
                        # Leaving the image out would score a failing predictor as if it
                        # had not failed.
                        raise ValueError(f'{label}: {sample.name}: {error}') from None
                    skipped += 1  # no (or one) valid pixel: nothing to align or score
                    continue
                scored += 1
                per_image.append(metrics['abs_rel'])
                for key, value in metrics.items():
                    if key not in _FIT_KEYS:
                        sums[key] = sums.get(key, 0.0) + value
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if not scored:
        raise ValueError(f'{label}: none of {total} images had valid ground truth within '
                         f'{min_depth}..{max_depth} m inside the crop')
    result = {'predictor': label, 'images': scored, 'skipped': skipped}
    result.update({key: value / scored for key, value in sorted(sums.items())})
    result['abs_rel_per_image'] = per_image
    return result


# ---- reports --------------------------------------------------------------------------------


def _json_number(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def markdown_table(results):
    """
    Format results as a markdown table (predictor, AbsRel, delta1, images).

    :param results: list of dicts from :func:`evaluate`
    :return: the table as text
    """
    lines = ['| predictor | AbsRel | delta1 | images |', '|---|---|---|---|']
    for row in results:
        lines.append(f'| {row["predictor"]} | {row["abs_rel"]:.4f} | {row["delta1"]:.4f} | '
                     f'{row["images"]} |')
    return '\n'.join(lines) + '\n'


def write_report(folder, report):
    """
    Write ``results.json`` and ``results.md`` into a folder (created).

    :param folder: output folder
    :param report: dict with ``dataset``, ``protocol``, ``model`` and ``results``
    :return: (json path, markdown path)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(report, default=str),
                       parse_constant=lambda constant: None)
    json_path, md_path = folder / 'results.json', folder / 'results.md'
    with open(json_path, 'w') as stream:
        json.dump(clean, stream, indent=2)
        stream.write('\n')
    protocol = report['protocol']
    high = protocol['max_depth']
    high = 'inf' if high is None else f'{high:g}'
    text = (f'# Depth evaluation: {report["dataset"]}\n\n'
            'Per image: least-squares scale and shift on valid pixels, clipped to '
            f'{protocol["min_depth"]:g}..{high} m, '
            f'crop {protocol["crop"] or "none"}; metrics averaged over images.\n\n'
            + markdown_table(report['results']))
    md_path.write_text(text)
    return json_path, md_path


# ---- command line ---------------------------------------------------------------------------


def build_parser():
    """
    Build the ``marigold-eval`` argument parser.

    :return: argparse.ArgumentParser
    """
    model, inference = ModelConfig(), InferenceConfig()
    parser = argparse.ArgumentParser(
        prog='marigold-eval',
        description='Evaluate Marigold relative depth (per-image least-squares scale and '
                    'shift, then AbsRel / delta1) on NYUv2, KITTI, an RGB-D folder or '
                    'procedural scenes.')
    parser.add_argument('--model', default=model.model,
                        help='HF id, local model folder or bundled:<name> (default %(default)s)')
    parser.add_argument('--dataset', required=True,
                        help='nyu:PATH[:SPLITS] | kitti:ROOT:SPLITFILE[:DEPTH_ROOT] | '
                             'folder:ROOT[:DEPTH_SCALE] | synthetic:N:SEED[:SIZE]')
    parser.add_argument('--steps', type=int, default=inference.denoising_steps,
                        help='denoising steps, 0 = model default')
    parser.add_argument('--ensemble', type=int, default=inference.ensemble_size,
                        help='ensemble size')
    parser.add_argument('--resolution', type=int, default=inference.processing_resolution,
                        help='processing resolution, 0 = model default, -1 = input size')
    parser.add_argument('--device', default=model.device, help='auto, cpu, cuda or cuda:N')
    parser.add_argument('--dtype', default=model.dtype,
                        help='auto, float32, float16 or bfloat16')
    parser.add_argument('--seed', type=int, default=inference.seed, help='noise seed')
    parser.add_argument('--batch-size', type=int, default=inference.batch_size,
                        help='frames per estimator call and U-Net batch')
    parser.add_argument('--baselines', action='store_true',
                        help='also evaluate the constant and ramp baselines')
    parser.add_argument('--baselines-only', action='store_true',
                        help='evaluate only the baselines (no model is loaded)')
    parser.add_argument('--limit', type=int, default=None, help='score only the first N images')
    parser.add_argument('--min-depth', type=float, default=None,
                        help="override the data set's lower depth bound (meters)")
    parser.add_argument('--max-depth', type=float, default=None,
                        help="override the data set's upper depth bound (meters)")
    parser.add_argument('--output', default=None,
                        help='folder for results.json and results.md')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser


def _estimator_config(args):
    model = override(ModelConfig(), model=args.model, device=args.device, dtype=args.dtype)
    inference = override(InferenceConfig(), denoising_steps=args.steps,
                         ensemble_size=args.ensemble, processing_resolution=args.resolution,
                         seed=args.seed, batch_size=args.batch_size)
    validate_model_config(model)
    validate_inference_config(inference)
    return EstimatorConfig(model=model, inference=inference)


def run(args):
    """
    Evaluate what the parsed arguments ask for and write the report.

    :param args: namespace from :func:`build_parser`
    :return: the report dict
    """
    if args.limit is not None and args.limit < 1:
        raise ValueError(f'--limit must be >= 1, got {args.limit}')
    config = None if args.baselines_only else _estimator_config(args)
    dataset = open_dataset(args.dataset, args.min_depth, args.max_depth)
    options = {'batch_size': args.batch_size, 'limit': args.limit, 'progress': not args.quiet}
    results, model_info = [], None
    try:
        if config is not None:
            from ..estimator import DepthEstimator
            estimator = DepthEstimator(config)
            steps, resolution = estimator.resolved_settings()
            model_info = {'model': args.model, 'steps': steps, 'ensemble': args.ensemble,
                          'processing_resolution': resolution or 'input size',
                          'seed': args.seed, 'device': str(estimator.device),
                          'dtype': str(estimator.dtype).replace('torch.', '')}
            short = os.path.basename(args.model.rstrip('/')) or args.model
            label = f'{short} ({steps} step(s), ensemble {args.ensemble})'
            results.append(evaluate(estimator, dataset, name=label, **options))
        if args.baselines or args.baselines_only:
            for baseline in BASELINES:
                results.append(evaluate(baseline, dataset, **options))
    finally:
        dataset.close()
    report = {
        'dataset': dataset.name,
        'protocol': {'alignment': 'per-image least-squares scale and shift',
                     'min_depth': dataset.min_depth,
                     'max_depth': _json_number(dataset.max_depth),
                     'crop': dataset.crop if isinstance(dataset.crop, str) else None,
                     **dataset.info},
        'model': model_info,
        'results': results,
    }
    if args.output:
        write_report(args.output, report)
    return report


def main(argv=None):
    """
    Run ``marigold-eval``.

    :param argv: arguments (default ``sys.argv[1:]``)
    :return: exit code (0 on success)
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, UnreadableSample) as error:
        parser.exit(2, f'marigold-eval: error: {error}\n')
    sys.stdout.write(markdown_table(report['results']))
    if args.output:
        sys.stdout.write(f'wrote {Path(args.output) / "results.json"} and results.md\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
