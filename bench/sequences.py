"""
Benchmark: the demo on many rooms, to judge models by more than the demo's one scene.

The demo plays one sequence (marigold_ros/samples: scene seed 1, orbiting camera, 320x240),
so its summary scores one room. This renders the same kind of sequence for scene seeds
1..N with the sample generator (seed 1 is the bundled sequence) and runs the whole demo on
each with every model: the live node through ROS topics, metric scale from the sparse depth.
It prints the demo summary's figures per scene and model (metric AbsRel, relative AbsRel
after per-frame alignment, the scale fit's last inlier ratio; metric is NaN where the node
never found a scale), the means, on how many scenes each model gave metric depth, and each
model's paired difference to the first with a bootstrap interval.

Run: .venv/bin/python bench/sequences.py --models bundled:marigold-tiny OTHER [--seeds 12]
"""

import argparse
from pathlib import Path
import subprocess
import sys
import tempfile

from marigold_model.training.evaluate import bootstrap_interval
from marigold_ros.demo import run_demo, SAMPLES, TINY_INLIER_THRESHOLD
import numpy as np

FIGURES = {'metric': ('accuracy', 'metric_abs_rel'),
           'relative': ('accuracy', 'relative_aligned_abs_rel'),
           'inliers': ('metric_scale', 'scale_inlier_ratio')}


def demo_figures(summary):
    """Return the FIGURES of one demo summary as floats (NaN where the summary has none)."""
    values = {}
    for name, (section, key) in FIGURES.items():
        value = summary[section].get(key)
        values[name] = float('nan') if value in (None, '') else float(value)
    return values


def main(argv=None):
    """Print the per-scene table and the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', required=True,
                        help='model folders or bundled:<name>; the first is the reference')
    parser.add_argument('--seeds', type=int, default=12, help='scene seeds 1..N')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--inlier-threshold', type=float, default=TINY_INLIER_THRESHOLD,
                        help="the scale fit's relative inlier threshold (default: the demo's "
                        'for tiny models)')
    args = parser.parse_args(argv)
    scores = np.full((args.seeds, len(args.models), len(FIGURES)), np.nan)
    header = ' | '.join(f'{model} {name}' for model in args.models for name in FIGURES)
    print(f'| scene seed | {header} |\n' + '|---' * (1 + len(args.models) * len(FIGURES)) + '|')
    with tempfile.TemporaryDirectory() as work:
        for row, seed in enumerate(range(1, args.seeds + 1)):
            sequence = Path(work) / f'scene_{seed}'
            subprocess.run([sys.executable, str(Path(SAMPLES) / 'make_sample_sequence.py'),
                            '--output', str(sequence), '--scene-seed', str(seed)],
                           check=True, stdout=subprocess.DEVNULL)
            for column, model in enumerate(args.models):
                summary = run_demo(Path(work) / f'demo_{seed}_{column}', model, args.device,
                                   samples=sequence, inlier_threshold=args.inlier_threshold,
                                   log=lambda *_: None)
                scores[row, column] = list(demo_figures(summary).values())
            print(f'| {seed} | ' + ' | '.join(f'{value:.3f}' for value in scores[row].ravel())
                  + ' |', flush=True)
    print('| mean where metric | ' + ' | '.join(
        f'{value:.3f}' for value in np.nanmean(scores, axis=0).ravel()) + ' |')
    metric = scores[:, :, 0]
    rng = np.random.default_rng(0)
    for column, model in enumerate(args.models):
        line = f'{model}: metric depth on {np.isfinite(metric[:, column]).sum()} of ' \
            f'{args.seeds} scenes'
        both = np.isfinite(metric[:, column]) & np.isfinite(metric[:, 0])
        if column and both.any():
            difference = metric[both, column] - metric[both, 0]
            low, high = bootstrap_interval(difference, rng)
            line += (f'; metric AbsRel {np.mean(difference):+.3f} against {args.models[0]} '
                     f'on the {both.sum()} scenes both have (95 % interval {low:+.3f} to '
                     f'{high:+.3f}), lower on {np.mean(difference < 0):.0%} of them')
        print(line)


if __name__ == '__main__':
    main()
