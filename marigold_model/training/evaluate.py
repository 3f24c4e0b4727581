"""
Evaluate relative depth predictors with the affine-invariant protocol (``marigold-eval``).

The protocol is the Marigold paper's: per image, fit a least-squares scale and shift of the
prediction to the ground truth on the valid pixels (sensor mask, crop, depth range), clip the
aligned depth to the data set's range, compute AbsRel, delta1 and friends, then average the
per-image values over the data set.

Data sets are opened from specs by :mod:`marigold_model.training.eval_datasets` (NYUv2,
KITTI Eigen, an RGB-D folder, procedural scenes). Baselines (``'constant'``, ``'ramp'``) go
through the same protocol and show what a predictor must beat.
"""

import argparse
import json
import math
import os
from pathlib import Path
import sys

import numpy as np

from .eval_datasets import crop_mask, EvalDataset, FOLDER_MIN_DEPTH, open_dataset
from ..alignment import (AlignmentError, depth_metrics, evaluate_affine_invariant,
                         REASON_DEGENERATE_RANGE, REASON_NONFINITE_PREDICTION)
from ..config import BACKENDS, EstimatorConfig, InferenceConfig, ModelConfig, override
from ..data.sample import UnreadableSample

BASELINES = ('constant', 'ramp')
# Upsampling the data set's images by more than this is warned about: the model sees no detail
# the image does not have, and the cost grows with the square of the factor.
UPSAMPLE_WARNING = 2.0
# Keys of evaluate_affine_invariant's result that describe the fit, not the quality.
_FIT_KEYS = ('scale', 'shift', 'n_valid')


# ---- predictors and scoring -----------------------------------------------------------------


def constant_baseline(rgb):
    """Return float32 [H, W] of 0.5: scored as the mean ground truth (:func:`score_image`)."""
    return np.full(np.shape(rgb)[:2], 0.5, dtype=np.float32)


def ramp_baseline(rgb):
    """Return float32 [H, W] depth growing linearly from the bottom row (0) to the top (1)."""
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


def bootstrap_interval(difference, rng, resamples=10000):
    """Return the 95 % bootstrap interval (low, high) of the mean of paired differences."""
    difference = np.asarray(difference)
    picks = rng.integers(0, difference.size, (resamples, difference.size))
    return np.percentile(difference[picks].mean(axis=1), [2.5, 97.5])


def score_image(pred_rel, gt, valid, min_depth, max_depth):
    """
    Metrics of one image under the affine-invariant protocol.

    A prediction that is constant on the valid pixels has no least-squares scale; it is scored
    with scale 0 and shift = mean ground truth (the limit of the fit, the best constant).

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


def resolution_notes(resolution, requested, image_shape):
    """
    Say which processing resolution an evaluation uses, and warn when it upsamples a lot.

    :param resolution: resolved processing resolution (longer side; None = the input size)
    :param requested: the --resolution asked for (0 = the model's default)
    :param image_shape: shape of a data set image ((H, W, ...)), or None if unknown
    :return: list of lines for stderr (the last one a warning when upsampling > 2x)
    """
    if resolution is None:
        return ['marigold-eval: processing resolution: the input size of each image']
    source = "the model's default" if requested == 0 else '--resolution'
    lines = [f'marigold-eval: processing resolution {resolution} px (longer side, {source})']
    if image_shape is not None:
        longest = max(image_shape[:2])
        factor = resolution / longest
        if factor > UPSAMPLE_WARNING:
            lines.append(
                f"marigold-eval: warning: that upsamples the data set's images ({longest} px "
                f'longer side) {factor:.1f}x, which costs about {factor ** 2:.0f}x the '
                f'pixels and adds no detail; pass --resolution -1 (the input size) or '
                f'--resolution {longest}')
    return lines


# ---- reports --------------------------------------------------------------------------------


def _json_number(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def markdown_table(results):
    """Format :func:`evaluate` results as a markdown table (predictor, AbsRel, delta1, images)."""
    lines = ['| predictor | AbsRel | delta1 | images |', '|---|---|---|---|']
    for row in results:
        lines.append(f'| {row["predictor"]} | {row["abs_rel"]:.4f} | {row["delta1"]:.4f} | '
                     f'{row["images"]} |')
    return '\n'.join(lines) + '\n'


def write_report(folder, report):
    """
    Write ``results.json`` and ``results.md`` into a folder (created).

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
    """Build the ``marigold-eval`` argument parser."""
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
    parser.add_argument('--backend', default=model.backend, choices=BACKENDS,
                        help="'onnxruntime' runs a marigold-export-onnx folder given as "
                             '--model (default %(default)s)')
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
    model = override(ModelConfig(), model=args.model, device=args.device, dtype=args.dtype,
                     backend=args.backend)
    inference = override(InferenceConfig(), denoising_steps=args.steps,
                         ensemble_size=args.ensemble, processing_resolution=args.resolution,
                         seed=args.seed, batch_size=args.batch_size)
    return EstimatorConfig(model=model, inference=inference)


def run(args):
    """Evaluate what the parsed arguments ask for, write the report and return it."""
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
            first = dataset.samples[0].rgb.shape if len(dataset) else None
            for line in resolution_notes(resolution, args.resolution, first):
                print(line, file=sys.stderr)
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
    """Run ``marigold-eval`` (argv default ``sys.argv[1:]``); return the exit code."""
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
