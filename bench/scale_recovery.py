"""
Benchmark: metric scale recovery from sparse depth, AbsRel against sparsity and outliers.

Ground truth comes from ``marigold_model.data.synthetic.render_scene`` (rooms with boxes and
spheres, exact z depth). The "relative prediction" imitates Marigold: the ground truth normalised
to [0, 1], softened at edges (Gaussian blur) and distorted by a smooth low-frequency error of
a few percent, renormalised to [0, 1].

Sparse readings are a random fraction of the valid pixels with 2 % multiplicative noise; a
given rate of them are gross outliers (off by a factor 1.5 to 5). Columns:

* oracle: least-squares scale and shift on all ground-truth pixels (the evaluation protocol;
  does not depend on the sparse input),
* lsq: plain least squares on the sparse readings (what a naive node would do),
* global: the robust fit of :class:`ScaleTracker` (RANSAC + refinement),
* local: ``global`` followed by the opt-in :func:`refine_local`.

Values are mean AbsRel over the scenes; ``fail`` counts scenes where the tracker produced no
estimate (their AbsRel is left out). Timing is reported per frame, fit vs refinement.

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


def _sparse(rng, gt, valid, fraction, outlier_rate, noise=0.02):
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


def run(scenes, height, width, seed):
    """
    Run the benchmark and print the table.

    :param scenes: number of scenes per cell
    :param height: image height
    :param width: image width
    :param seed: random seed
    """
    rng = np.random.default_rng(seed)
    data = []
    source = None
    for _ in range(scenes):
        (gt, valid), source = _ground_truth(rng, height, width)
        rel = _prediction(rng, gt, valid)
        s, t = fit_scale_shift(rel, gt, valid)
        data.append((gt, valid, rel, abs_rel(s * rel + t, gt, valid)))
    print(f'scale recovery: {scenes} {source} scenes of {height}x{width}, mean AbsRel')
    print(f'{"sparsity":>9} {"points":>7} {"outliers":>8} {"oracle":>8} {"lsq":>8} '
          f'{"global":>8} {"local":>8} {"fail":>5}')
    fit_time = refine_time = 0.0
    n_timed = 0
    for fraction in SPARSITIES:
        for outlier_rate in OUTLIER_RATES:
            rows = {'oracle': [], 'lsq': [], 'global': [], 'local': []}
            failures = 0
            for gt, valid, rel, oracle in data:
                sparse = _sparse(rng, gt, valid, fraction, outlier_rate)
                rows['oracle'].append(oracle)
                rel_values, metric_values = sample_sparse_pairs(rel, sparse)
                try:
                    s, t = fit_scale_shift(rel_values, metric_values)
                    rows['lsq'].append(abs_rel(np.clip(s * rel + t, 1e-3, None), gt, valid))
                except AlignmentError:
                    pass
                start = time.perf_counter()
                estimate = ScaleTracker().update(rel_values, metric_values, 0.0)
                middle = time.perf_counter()
                if not estimate.usable:
                    failures += 1
                    continue
                global_depth = estimate.apply(rel)
                uv, values = sparse_pixels(sparse, rel.shape)
                refined = refine_local(global_depth, uv, values)
                end = time.perf_counter()
                fit_time += middle - start
                refine_time += end - middle
                n_timed += 1
                rows['global'].append(abs_rel(global_depth, gt, valid & np.isfinite(global_depth)))
                rows['local'].append(abs_rel(refined, gt, valid & np.isfinite(refined)))
            cells = ' '.join(f'{np.mean(v):8.4f}' if v else f'{"-":>8}' for v in rows.values())
            points = int(round(fraction * height * width))
            print(f'{100 * fraction:8.2f}% {points:7d} {100 * outlier_rate:7.0f}% {cells} '
                  f'{failures:5d}')
    if n_timed:
        print(f'per frame: robust fit {1e3 * fit_time / n_timed:.2f} ms, local refinement '
              f'{1e3 * refine_time / n_timed:.2f} ms '
              f'(ratio {refine_time / max(fit_time, 1e-12):.1f}x)')


def main(argv=None):
    """
    Parse arguments and run.

    :param argv: command line arguments (default ``sys.argv[1:]``)
    """
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--scenes', type=int, default=6)
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    run(args.scenes, args.height, args.width, args.seed)


if __name__ == '__main__':
    main()
