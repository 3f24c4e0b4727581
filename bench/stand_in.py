"""
A stand-in for DepthEstimator that takes a set time per frame and returns a fixed depth.

The node and bag benchmarks measure what surrounds the model; on a CPU the real model would
drown that, and on a GPU the caller waits with the GIL released.  The stand-in sleeps (GIL
released) ``milliseconds`` per frame, then returns a smooth relative depth in [0, 1] at the
real estimator's size, with the interface marigold_ros uses::

    from stand_in import StandInEstimator      # bench scripts run from bench/
    estimator = StandInEstimator(milliseconds=30)
"""

import threading
import time

from marigold_model.config import EstimatorConfig
from marigold_model.estimator import check_call, DepthResult, processing_size
import numpy as np

#: Settings of Marigold v1-1 (model_index.json), the defaults a real model folder gives.
STAND_IN_STEPS = 4
STAND_IN_RESOLUTION = 768


def ramp_depth(height, width):
    """
    Return a plausible relative depth: far at the top, near at the bottom, a bump across.

    :return: read-only float32 [height, width] in [0, 1] (both ends reached when H > 1)
    """
    rows = np.linspace(1.0, 0.0, height, dtype=np.float64)[:, None]
    cols = np.cos(np.linspace(-np.pi / 2, np.pi / 2, width, dtype=np.float64))[None, :]
    depth = 0.85 * rows + 0.15 * rows * cols
    span = depth.max() - depth.min()
    depth = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    depth = depth.astype(np.float32)
    depth.setflags(write=False)
    return depth


class StandInEstimator:
    """
    DepthEstimator's interface, a fixed depth and a fixed time per frame.

    :param milliseconds: time one frame takes (a call of N frames takes N times this)
    :param default_steps: what the model folder would give as default denoising steps
    :param default_resolution: its default processing resolution
    """

    def __init__(self, milliseconds, config=EstimatorConfig(), default_steps=STAND_IN_STEPS,
                 default_resolution=STAND_IN_RESOLUTION):
        """Keep the time and the settings."""
        if not milliseconds >= 0:
            raise ValueError(f'milliseconds must be >= 0, got {milliseconds}')
        self.milliseconds = float(milliseconds)
        self.config = config
        self.device = 'stand-in'
        self.dtype = 'float32'
        self._default_steps = int(default_steps)
        self._default_resolution = int(default_resolution)
        self._lock = threading.Lock()
        self._maps = {}
        self.warm_keys = set()
        self.calls = 0
        self.frames = 0

    @property
    def inference(self):
        """Return the InferenceConfig used for the next call."""
        return self.config.inference

    def set_inference(self, inference):
        """Replace the per-call InferenceConfig."""
        self.config = EstimatorConfig(self.config.model, inference)

    @property
    def default_steps(self):
        """Return the denoising steps the stand-in model is published with."""
        return self._default_steps

    @property
    def default_resolution(self):
        """Return the stand-in model's processing resolution."""
        return self._default_resolution

    def resolved_settings(self, inference=None):
        """
        Resolve steps and processing resolution as DepthEstimator does.

        :return: (steps, resolution) with resolution 0 meaning the input size
        """
        inference = inference or self.config.inference
        steps = inference.denoising_steps or self.default_steps
        resolution = inference.processing_resolution
        if resolution == 0:
            resolution = self.default_resolution
        return steps, max(resolution, 0)

    def reset_warm_start(self, key=None):
        """Forget a stream key seen (None: all), as the real one forgets its latents."""
        if key is None:
            self.warm_keys.clear()
        else:
            self.warm_keys.discard(key)

    def _depth(self, height, width):
        depth = self._maps.get((height, width))
        if depth is None:
            depth = ramp_depth(height, width)
            self._maps[(height, width)] = depth
        return depth

    def estimate(self, frames, keys=None, latents=None):
        """
        Wait ``milliseconds`` per frame with the GIL released, then return the fixed depth.

        :return: DepthResult, or a list of them for a list input
        :raises ValueError: frames the real estimator refuses (same checks)
        """
        single, frames, keys, _ = check_call(frames, keys, latents,
                                             self.config.model.max_input_pixels)
        inference = self.config.inference
        _, resolution = self.resolved_settings(inference)
        with self._lock:
            clock = time.perf_counter()
            time.sleep(self.milliseconds * len(frames) / 1000.0)
            seconds = time.perf_counter() - clock
            results = []
            for frame, key in zip(frames, keys):
                size = processing_size(frame.shape[0], frame.shape[1], resolution)
                out = frame.shape[:2] if inference.match_input_resolution else size
                # A fresh array per frame, as the real one's .cpu().numpy(): callers may
                # keep or change it.
                depth = self._depth(*out).copy()
                spread = None
                if inference.ensemble_size > 1:
                    spread = (0.005 + 0.02 * depth).astype(np.float32)
                timings = {'stand_in': seconds, 'total': seconds}
                results.append(DepthResult(depth, spread, timings, tuple(size)))
                if key is not None:
                    self.warm_keys.add(key)
            self.calls += 1
            self.frames += len(frames)
        return results[0] if single else results
