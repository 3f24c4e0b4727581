"""
Sparse guidance in the depth pipeline: the frames that have sparse points, one at a time.

With ``scale_recovery.guidance`` (process_bag ``--guidance``) :meth:`DepthPipeline.infer
<marigold_ros.pipeline.DepthPipeline.infer>` hands its decoded frames here first.  A frame
whose camera has sparse points for its stamp (:meth:`ScaleRecovery.sparse_points
<marigold_ros.scale_recovery.ScaleRecovery.sparse_points>`, the pairing scale recovery uses)
is estimated by :class:`~marigold_model.guidance.SparseGuidance` (Marigold-DC): its
``FrameInput.depth`` is the guided relative depth and ``FrameInput.guided`` the result, whose
scale and shift :meth:`DepthPipeline.finish` applies, so the metric depth is the guided one.
The other frames go through the plain estimator call: those without input silently (their
scale recovery reports why), those the guidance refuses (too few points, no global fit, an
estimator without gradients) with the reason counted and warned about as
``guidance_<reason>``.
"""

import time

from marigold_model.estimator import DepthResult, EstimatorOutOfMemory
from marigold_model.guidance import GuidanceError, SparseGuidance

from .geometry import CalibrationError
from .scale_inputs import ScaleInputError


class GuidedInference:
    """
    Run sparse guidance on the frames that have points; keep one SparseGuidance per setting.

    Used from the pipeline's infer stage only (one call at a time).
    """

    def __init__(self):
        """Start without a SparseGuidance (made for the first guided frame)."""
        self._guidance = None  # SparseGuidance, or the GuidanceError it was refused with
        self._made_for = None

    def infer(self, frames, estimator, config, scale_source, camera_of):
        """
        Guide each frame that has sparse points; return the frames left for the plain call.

        :param frames: decoded FrameInputs without error
        :param estimator: the pipeline's DepthEstimator (torch backend, DDIM scheduler)
        :param config: GuidanceConfig
        :param scale_source: the ScaleRecovery holding the sparse input
        :param camera_of: callable FrameInput -> CameraModel of its image, or None (LiDAR
            points need one)
        :return: (frames not guided, seconds spent guiding)
        :raises Exception: only unexpected failures (bugs)
        """
        plain, seconds = [], 0.0
        for frame in frames:
            header = frame.image.header
            try:
                uv, metric = scale_source.sparse_points(frame.key, header, frame.rgb.shape,
                                                        _camera(camera_of, frame))
            except ScaleInputError:
                plain.append(frame)  # the plain path's estimate() reports why, once
                continue
            clock = time.perf_counter()
            try:
                result = self._sparse_guidance(estimator, config).estimate(
                    frame.rgb, uv=uv, values=metric)
            except GuidanceError as error:
                scale_source.guidance_failed(frame.key, error)
                plain.append(frame)
                continue
            except EstimatorOutOfMemory as error:
                frame.error = _frame_error('out_of_memory', str(error), frame.key)
            except ValueError as error:
                frame.error = _frame_error('estimator_rejected', str(error), frame.key)
            else:
                frame.guided = result
                frame.depth = DepthResult(depth=result.relative, uncertainty=None,
                                          timings=dict(result.timings))
            frame.timings['estimator'] = time.perf_counter() - clock
            seconds += frame.timings['estimator']
        return plain, seconds

    def _sparse_guidance(self, estimator, config):
        """Return the SparseGuidance of this estimator and settings (GuidanceError: none)."""
        if self._made_for != (id(estimator), config):
            try:
                self._guidance = SparseGuidance(estimator, config)
            except GuidanceError as error:
                self._guidance = error  # refused once, refused for every frame
            except AttributeError as error:  # not a DepthEstimator (a wrapper, a stand-in)
                self._guidance = GuidanceError('unsupported_estimator', f'sparse guidance '
                                               f'needs a DepthEstimator: {error}')
            self._made_for = (id(estimator), config)
        if isinstance(self._guidance, GuidanceError):
            raise self._guidance
        return self._guidance


def _camera(camera_of, frame):
    """Return the frame's camera model, or None when it has none (or a bad one)."""
    try:
        return camera_of(frame)
    except CalibrationError:
        return None


def _frame_error(reason, message, key):
    from .pipeline import FrameError  # the pipeline imports this module
    return FrameError(reason, message, key)
