"""
Benchmark: metric scale recovery from sparse depth, AbsRel against sparsity and outliers.

Ground truth comes from ``marigold_model.data.synthetic.render_scene``; the "relative
prediction" imitates Marigold (normalised, blurred at edges, a smooth error of a few
percent).  Sparse readings are a random fraction of the valid pixels with 2 % noise, a given
rate of them gross outliers.  Columns: oracle (least squares on all ground truth), const
(the median sparse reading everywhere), lsq (plain least squares on the readings), global
(:class:`ScaleTracker`'s robust fit) and local (global then :func:`refine_local`).

Every column is scored on all valid ground-truth pixels of ALL scenes: a pixel left without
a positive depth counts as 1 mm, and a scene where a fit fails is scored as ``const`` (not
left out, which would flatter a method that fails on hard scenes); ``fail`` counts those.
Fit and refinement times are medians over the frames where both ran.

Run: .venv/bin/python bench/scale_recovery.py [--scenes 6 --height 240 --width 320]
"""

import argparse
import time

from marigold_model.alignment import abs_rel, AlignmentError, fit_scale_shift
from marigold_model.data.synthetic import render_scene
from marigold_model.scale_apply import refine_local
from marigold_model.scale_tracking import sample_sparse_pairs, ScaleTracker, sparse_pixels
import numpy as np
from scipy import ndimage

SPARSITIES = (0.0005, 0.001, 0.005, 0.01, 0.05)
OUTLIER_RATES = (0.0, 0.05, 0.2)
MISSING_DEPTH = 1e-3  # meters: the score of a pixel left without a positive depth


def _ground_truth(rng, height, width):
    """Ground-truth depth and validity of one procedural scene."""
    sample = render_scene(rng, height=height, width=width)
    valid = sample.valid & np.isfinite(sample.depth) & (sample.depth > 0)
    return (sample.depth.astype(np.float64), valid), 'render_scene'


def _prediction(rng, gt, valid, error=0.03, blur_px=1.0):
    """Affine-invariant imitation of a Marigold prediction of ``gt``."""
    height, width = gt.shape
    filled = np.where(valid, gt, np.median(gt[valid]))
    rel = (filled - filled.min()) / (filled.max() - filled.min())
    rel = ndimage.gaussian_filter(rel, blur_px)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    phase = rng.uniform(0.0, 2.0 * np.pi, 3)
    rel = rel + error * (np.sin(2 * np.pi * 0.7 * xx + phase[0])
                         * np.cos(2 * np.pi * 0.5 * yy + phase[1])
                         + 0.5 * np.sin(2 * np.pi * 1.3 * (xx + yy) + phase[2]))
    return (rel - rel.min()) / (rel.max() - rel.min())


def make_sparse(rng, gt, valid, fraction, outlier_rate, noise=0.02):
    """Sparse depth image (0 = no reading) from the valid ground truth."""
    candidates = np.flatnonzero(valid.ravel())
    n = min(candidates.size, max(2, int(round(fraction * gt.size))))
    index = rng.choice(candidates, n, replace=False)
    truth = gt.ravel()[index]
    values = truth * (1.0 + noise * rng.standard_normal(n))
    bad = rng.random(n) < outlier_rate
    values[bad] = truth[bad] * np.exp(rng.choice([-1.0, 1.0], bad.sum())
                                      * rng.uniform(0.4, 1.6, bad.sum()))
    sparse = np.zeros(gt.shape)
    sparse.ravel()[index] = values
    return sparse


def score(pred, gt, valid):
    """Score every valid pixel (AbsRel); a pixel without a positive depth counts as 1 mm."""
    with np.errstate(invalid='ignore'):
        filled = np.where(np.isfinite(pred) & (pred > 0), pred, MISSING_DEPTH)
    return abs_rel(np.maximum(filled, MISSING_DEPTH), gt, valid)


def run(scenes, height, width, seed):
    """Run the benchmark on ``scenes`` scenes per cell and print the table."""
    rng = np.random.default_rng(seed)
    data = []
    source = None
    for _ in range(scenes):
        (gt, valid), source = _ground_truth(rng, height, width)
        rel = _prediction(rng, gt, valid)
        s, t = fit_scale_shift(rel, gt, valid)
        data.append((gt, valid, rel, score(s * rel + t, gt, valid)))
    print(f'scale recovery: {scenes} {source} scenes of {height}x{width}, mean AbsRel over '
          'all valid pixels of all scenes (a failed fit scores as const)')
    print(f'{"sparsity":>9} {"points":>7} {"outliers":>8} {"oracle":>8} {"const":>8} '
          f'{"lsq":>8} {"global":>8} {"local":>8} {"lsq fail":>8} {"fail":>5}')
    fit_times, refine_times = [], []
    for fraction in SPARSITIES:
        for outlier_rate in OUTLIER_RATES:
            rows = {'oracle': [], 'const': [], 'lsq': [], 'global': [], 'local': []}
            failures = lsq_failures = 0
            for gt, valid, rel, oracle in data:
                sparse = make_sparse(rng, gt, valid, fraction, outlier_rate)
                rows['oracle'].append(oracle)
                rel_values, metric_values = sample_sparse_pairs(rel, sparse)
                const = score(np.full(rel.shape, np.median(metric_values)), gt, valid)
                rows['const'].append(const)
                try:
                    s, t = fit_scale_shift(rel_values, metric_values)
                    rows['lsq'].append(score(s * rel + t, gt, valid))
                except AlignmentError:
                    lsq_failures += 1
                    rows['lsq'].append(const)
                start = time.perf_counter()
                estimate = ScaleTracker().update(rel_values, metric_values, 0.0)
                middle = time.perf_counter()
                if not estimate.usable:
                    failures += 1
                    rows['global'].append(const)
                    rows['local'].append(const)
                    continue
                global_depth = estimate.apply(rel)
                uv, values = sparse_pixels(sparse, rel.shape)
                refined = refine_local(global_depth, uv, values)
                end = time.perf_counter()
                fit_times.append(middle - start)
                refine_times.append(end - middle)
                rows['global'].append(score(global_depth, gt, valid))
                rows['local'].append(score(refined, gt, valid))
            cells = ' '.join(f'{np.mean(v):8.4f}' for v in rows.values())
            points = int(round(fraction * height * width))
            print(f'{100 * fraction:8.2f}% {points:7d} {100 * outlier_rate:7.0f}% {cells} '
                  f'{lsq_failures:8d} {failures:5d}')
    if fit_times:
        fit, refine = np.median(fit_times), np.median(refine_times)
        print(f'per frame (median of {len(fit_times)}): robust fit {1e3 * fit:.2f} ms, local '
              f'refinement {1e3 * refine:.2f} ms (ratio {refine / max(fit, 1e-12):.1f}x)')


def main(argv=None):
    """Parse arguments (default ``sys.argv[1:]``) and run."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--scenes', type=int, default=6)
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    run(args.scenes, args.height, args.width, args.seed)


if __name__ == '__main__':
    main()
