"""
Shared test helpers without ROS: images, scenes, depth maps, scale estimates, fake estimators.

Tests of marigold_model import these too, so nothing here imports ROS; the message and bag
builders are in msg_builders.  test/ is on sys.path under pytest: ``from builders import ...``.
"""

import importlib.util

from marigold_model.alignment import abs_rel, fit_scale_shift
from marigold_model.data.synthetic import render_sequence
from marigold_model.estimator import DepthResult
from marigold_model.scale_tracking import ScaleEstimate
import numpy as np
from PIL import Image

# The orbiting-camera scene of the bag tests (conftest's ``scenes`` fixture).
SCENE_FRAMES, SCENE_HEIGHT, SCENE_WIDTH = 6, 48, 64
# The depth maps of the scale tracking tests (synthetic_scene).
TRACKING_HEIGHT, TRACKING_WIDTH = 160, 240


def load_script(path, name):
    """Import a script that is not in a package (bench/, launch/, samples/) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_rgb(height, width, seed=0):
    """Return uniform random uint8 RGB pixels [H, W, 3] from a seeded generator."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_png(path, array):
    """Write an image array with PIL (the format from the suffix), making the folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def orbit_scenes(count=SCENE_FRAMES, seed=7, height=SCENE_HEIGHT, width=SCENE_WIDTH):
    """Render ``count`` frames of one synthetic scene seen from an orbiting camera."""
    return render_sequence(np.random.default_rng(seed), count, height=height, width=width,
                           motion='orbit')


def scale_estimate(scale, shift=0.0, status='ok', n_points=0):
    """Return an estimate of a known scale and shift (all inliers, no residual, fresh)."""
    return ScaleEstimate(scale=scale, shift=shift, inlier_ratio=1.0, residual=0.0,
                         n_points=n_points, age_s=0.0, status=status)


def synthetic_scene(rng, height=TRACKING_HEIGHT, width=TRACKING_WIDTH, error=0.03):
    """
    Smooth ground-truth depth and an affine-invariant "prediction" of it.

    The ground truth is a tilted plane (6 m at the top to 2 m at the bottom) with four
    Gaussian blobs closer to the camera. The prediction is the ground truth normalised to
    [0, 1] plus a smooth low-frequency error of ``error`` (relative units), renormalised.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy /= height
    xx /= width
    gt = 6.0 - 4.0 * yy + 0.8 * xx * rng.uniform(-1.0, 1.0)
    for _ in range(4):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        radius = rng.uniform(0.05, 0.15)
        gt -= rng.uniform(0.3, 1.2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)
                                             / (2.0 * radius ** 2))
    rel = (gt - gt.min()) / (gt.max() - gt.min())
    phase = rng.uniform(0.0, 2.0 * np.pi, 2)
    rel = rel + error * np.sin(2 * np.pi * 0.7 * xx + phase[0]) * np.cos(
        2 * np.pi * 0.5 * yy + phase[1])
    return gt, (rel - rel.min()) / (rel.max() - rel.min())


def sparse_image(rng, gt, fraction=0.005, outlier_rate=0.05, noise=0.02):
    """
    Sparse metric depth image: a random ``fraction`` of pixels, the rest 0 (no reading).

    Readings carry ``noise`` multiplicative Gaussian noise; ``outlier_rate`` of them are off
    by a factor of 1.5 to 5 instead.
    """
    n = max(2, int(round(fraction * gt.size)))
    index = rng.choice(gt.size, n, replace=False)
    values = gt.ravel()[index] * (1.0 + noise * rng.standard_normal(n))
    bad = rng.random(n) < outlier_rate
    values[bad] = gt.ravel()[index[bad]] * np.exp(
        rng.choice([-1.0, 1.0], bad.sum()) * rng.uniform(0.4, 1.6, bad.sum()))
    sparse = np.zeros(gt.shape)
    sparse.ravel()[index] = values
    return sparse


def oracle_abs_rel(rel, gt):
    """Return the AbsRel of the least-squares fit on all ground-truth pixels."""
    s, t = fit_scale_shift(rel, gt)
    return abs_rel(s * rel + t, gt)


class OracleEstimator:
    """A perfect 'model': the true depth of each frame normalised to [0, 1] (affine in z)."""

    def __init__(self, scenes):
        """Index the true depth by the frame's pixels."""
        self.depth = {s.rgb.tobytes(): s.depth for s in scenes}
        self.calls = 0

    def set_inference(self, inference):
        """Accept settings like DepthEstimator."""

    def estimate(self, frames, keys=None):
        """Return the normalised true depth of every frame."""
        self.calls += 1
        results = []
        for frame in frames:
            depth = self.depth[np.ascontiguousarray(frame).tobytes()]
            low, high = depth.min(), depth.max()
            results.append(DepthResult(((depth - low) / (high - low)).astype(np.float32),
                                       None, {'total': 0.0}, depth.shape))
        return results


class FakeEstimator:
    """Return a given relative depth (function of the frame) and record the calls."""

    def __init__(self, depth_fn=None, uncertainty=None, out_size=None, error=None):
        """Keep the depth function and the options."""
        self.depth_fn = depth_fn
        self.uncertainty = uncertainty
        self.out_size = out_size
        self.error = error
        self.calls = []

    def estimate(self, frames, keys=None):
        """Return one DepthResult per frame."""
        self.calls.append(([f.copy() for f in frames], list(keys)))
        if self.error is not None:
            raise self.error
        results = []
        for frame in frames:
            size = self.out_size or frame.shape[:2]
            if self.depth_fn is not None:
                depth = self.depth_fn(*size)
            else:
                depth = np.linspace(0.1, 0.9, size[0] * size[1], dtype=np.float32)
                depth = depth.reshape(size)
            unc = None if self.uncertainty is None else \
                np.full(size, self.uncertainty, np.float32)
            results.append(DepthResult(depth.astype(np.float32), unc, {'total': 0.001},
                                       tuple(size)))
        return results
