"""
Regenerate the bundled sample camera sequence of the demo (deterministic).

Usage::

    python marigold_ros/samples/make_sample_sequence.py [--output DIR] [--scene-seed N]

One procedural room (marigold_model.data.synthetic) seen by an orbiting camera, as SETTINGS
says. Written next to this script:

* ``rgb_NNNN.jpg``: the camera images (JPEG, as a camera would compress them),
* ``depth_NNNN.png``: the exact planar z depth, 16-bit millimeters (0 = no hit), for
  judging the demo's metric depth,
* ``sparse.npz``: a sparse depth "sensor": a fraction of the valid pixels of each frame
  with multiplicative noise (arrays ``frame``, ``u``, ``v``, ``depth_m``),
* ``sequence.json``: size, K, rate, frame_id and the generator settings.
"""

import argparse
import json
from pathlib import Path

from marigold_model.data.synthetic import NO_HARD_CASES, render_sequence, SceneConfig
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SETTINGS = {
    'scene_seed': 1,
    # The scene generator before its hard cases (thin objects, occluders, camouflage, decals),
    # which this sequence was rendered with; true draws the same seed with them.
    'hard_cases': False,
    'frames': 16,
    'width': 320,
    'height': 240,
    'motion': 'orbit',
    'rate_hz': 5.0,
    'frame_id': 'camera_optical_frame',
    'jpeg_quality': 92,
    'sparse_fraction': 0.005,
    'sparse_noise': 0.01,
    'sparse_seed': 7,
}


def make_sequence(output=HERE, settings=None):
    """Render the sequence into ``output`` (``settings`` override SETTINGS); return its json."""
    cfg = dict(SETTINGS, **(settings or {}))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    scene = SceneConfig() if cfg['hard_cases'] else SceneConfig(**NO_HARD_CASES)
    samples = render_sequence(np.random.default_rng(cfg['scene_seed']), cfg['frames'],
                              scene, height=cfg['height'], width=cfg['width'],
                              motion=cfg['motion'], noise=True)
    rng = np.random.default_rng(cfg['sparse_seed'])
    sparse = {'frame': [], 'u': [], 'v': [], 'depth_m': []}
    for index, sample in enumerate(samples):
        Image.fromarray(sample.rgb).save(output / f'rgb_{index:04d}.jpg', quality=cfg[
            'jpeg_quality'])
        millimeters = np.where(sample.valid, np.rint(sample.depth * 1000.0), 0)
        Image.fromarray(np.clip(millimeters, 0, 65535).astype('<u2')).save(
            output / f'depth_{index:04d}.png')
        rows, cols = np.nonzero(sample.valid)
        count = max(1, int(round(cfg['sparse_fraction'] * sample.valid.size)))
        pick = rng.choice(rows.size, size=min(count, rows.size), replace=False)
        noisy = sample.depth[rows[pick], cols[pick]] * (
            1.0 + cfg['sparse_noise'] * rng.standard_normal(pick.size))
        sparse['frame'].append(np.full(pick.size, index, np.int32))
        sparse['u'].append(cols[pick].astype(np.int32))
        sparse['v'].append(rows[pick].astype(np.int32))
        sparse['depth_m'].append(noisy.astype(np.float32))
    np.savez_compressed(output / 'sparse.npz', **{k: np.concatenate(v)
                                                  for k, v in sparse.items()})
    meta = dict(cfg, K=samples[0].K.tolist(),
                generator='marigold_ros/samples/make_sample_sequence.py')
    path = output / 'sequence.json'
    path.write_text(json.dumps(meta, indent=2) + '\n')
    return path


def main(argv=None):
    """Run the command line with ``argv`` (default sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', default=str(HERE), help='folder to write to')
    parser.add_argument('--scene-seed', type=int, default=SETTINGS['scene_seed'],
                        help='another room of the same kind (the bundled one is seed 1)')
    args = parser.parse_args(argv)
    print(make_sequence(args.output, {'scene_seed': args.scene_seed}))


if __name__ == '__main__':
    main()
