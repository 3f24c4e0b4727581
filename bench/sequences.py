"""
Benchmark: models on camera sequences like the demo's, scene by scene.

The demo plays one sequence (marigold_ros/samples: scene seed 1, orbiting camera, 320x240),
so its summary scores one scene. This renders the same kind of sequence for several scene
seeds (seed 1 is the demo's scene) and scores each model on every ``--every``-th frame as the
node runs it (one step, the model's processing resolution, result resized to the frame):
mean relative AbsRel per scene after the per-image least-squares scale and shift, then the
mean over scenes and the share of scenes each model wins against the first one.

Run: .venv/bin/python bench/sequences.py --models bundled:marigold-tiny OTHER [--seeds 12]
"""

import argparse

from marigold_model.alignment import evaluate_affine_invariant
from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.data.synthetic import MOTIONS, NO_HARD_CASES, render_sequence, SceneConfig
from marigold_model.estimator import DepthEstimator
import numpy as np


def scene_scores(estimator, frames):
    """Mean relative AbsRel of ``estimator`` over rendered frames (Sample objects)."""
    return float(np.mean([
        evaluate_affine_invariant(estimator.estimate([frame.rgb])[0].depth,
                                  np.where(frame.valid, frame.depth, np.nan))['abs_rel']
        for frame in frames]))


def main(argv=None):
    """Print the per-scene table and the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', required=True,
                        help='model folders or bundled:<name>; the first is the reference')
    parser.add_argument('--seeds', type=int, default=12, help='scene seeds 1..N')
    parser.add_argument('--frames', type=int, default=16)
    parser.add_argument('--every', type=int, default=4, help='score every n-th frame')
    parser.add_argument('--motion', default='orbit', choices=MOTIONS)
    parser.add_argument('--hard-cases', action='store_true',
                        help="draw the generator's hard cases too (the demo's scene has none)")
    args = parser.parse_args(argv)
    scene = SceneConfig() if args.hard_cases else SceneConfig(**NO_HARD_CASES)
    estimators = [DepthEstimator(EstimatorConfig(ModelConfig(model=model, device='cpu'),
                                                 InferenceConfig(denoising_steps=1)))
                  for model in args.models]
    scores = np.zeros((args.seeds, len(args.models)))
    print('| scene seed | ' + ' | '.join(args.models) + ' |')
    print('|---' * (len(args.models) + 1) + '|')
    for row, seed in enumerate(range(1, args.seeds + 1)):
        frames = render_sequence(np.random.default_rng(seed), args.frames, scene, height=240,
                                 width=320, motion=args.motion, noise=True)[::args.every]
        scores[row] = [scene_scores(estimator, frames) for estimator in estimators]
        print(f'| {seed} | ' + ' | '.join(f'{value:.4f}' for value in scores[row]) + ' |',
              flush=True)
    print('| mean | ' + ' | '.join(f'{value:.4f}' for value in scores.mean(axis=0)) + ' |')
    wins = (scores < scores[:, :1]).mean(axis=0)
    print('| scenes won against the first | – | '
          + ' | '.join(f'{value:.0%}' for value in wins[1:]) + ' |')


if __name__ == '__main__':
    main()
