"""
Estimate depth for image files: ``marigold-estimate IMAGE [IMAGE ...] --output DIR``.

Writes, per image, the relative depth as a normalised 16-bit PNG, a colour-mapped preview
and (with an ensemble) the uncertainty; the numbers are relative, not meters.
"""

import argparse
from pathlib import Path
import sys

import numpy as np

from .config import BACKENDS, EstimatorConfig, InferenceConfig, ModelConfig
from .data.image_io import relative_to_uint16
from .data.synthetic import colorize_depth
from .estimator import DepthEstimator
from .loading import WeightsNotFoundError


def write_outputs(folder, stem, rgb, result):
    """
    Write depth PNG (16-bit, ``1 + round(relative * 65534)``, 0 = none), preview and uncertainty.

    :return: list of written paths
    """
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / f'{stem}_depth16.png', folder / f'{stem}_preview.png']
    Image.fromarray(relative_to_uint16(result.depth)).save(written[0])
    colour = colorize_depth(result.depth, np.isfinite(result.depth))  # 0 is the nearest
    if colour.shape[:2] != rgb.shape[:2]:
        colour = np.asarray(Image.fromarray(colour).resize(rgb.shape[1::-1]))
    Image.fromarray(np.concatenate([rgb, colour], axis=1)).save(written[1])
    if result.uncertainty is not None:
        spread = result.uncertainty / max(float(result.uncertainty.max()), 1e-6)
        written.append(folder / f'{stem}_uncertainty.png')
        Image.fromarray(np.round(spread * 255).astype(np.uint8)).save(written[-1])
    return written


def main(argv=None):
    """Run the command line with ``argv`` (default ``sys.argv``); return the exit code."""
    defaults, model = InferenceConfig(), ModelConfig()
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('images', nargs='+')
    parser.add_argument('--output', default='depth_output')
    parser.add_argument('--model', default=model.model)
    parser.add_argument('--device', default=model.device)
    parser.add_argument('--backend', default=model.backend, choices=BACKENDS,
                        help="'onnxruntime' runs a marigold-export-onnx folder given as --model")
    parser.add_argument('--steps', type=int, default=defaults.denoising_steps)
    parser.add_argument('--ensemble', type=int, default=defaults.ensemble_size)
    parser.add_argument('--resolution', type=int, default=defaults.processing_resolution)
    parser.add_argument('--seed', type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    from PIL import Image
    try:
        estimator = DepthEstimator(EstimatorConfig(
            ModelConfig(model=args.model, device=args.device, backend=args.backend),
            InferenceConfig(denoising_steps=args.steps, ensemble_size=args.ensemble,
                            processing_resolution=args.resolution, seed=args.seed)))
        for name in args.images:
            rgb = np.asarray(Image.open(name).convert('RGB'))
            result = estimator.estimate(rgb)
            for path in write_outputs(args.output, Path(name).stem, rgb, result):
                print(path)
    except (WeightsNotFoundError, ValueError, OSError) as error:
        print(f'marigold-estimate: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
