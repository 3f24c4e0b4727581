"""
The depth path for a batch of frames: image messages in, depth and cloud messages out.

Shared by the live node (newest frame per camera, on a worker thread) and the bag processor
(every frame, batched), so the path exists once, as three stages in the order a frame
meets them::

    decode   Image / CompressedImage -> RGB (conversions)            FrameInput.rgb
    infer    ONE DepthEstimator call for the batch -> relative depth  FrameInput.depth
             (+ uncertainty); with sparse guidance on, frames that have  FrameInput.guided
             sparse points are guided one by one first (guided_depth)
    finish   camera model scaled to the depth resolution (geometry), metric scale (fixed by
             the user, or from a scale source) -> messages            FrameOutput

Each stage takes the batch's FrameInput objects, which carry a frame's state from one stage
to the next (a frame that fails keeps its FrameError in ``error`` and skips the later
stages), so a caller may run the stages on different threads: the bag processor decodes and
infers batch k+1 on its model thread while it finishes batch k.  :meth:`DepthPipeline.process`
runs the three in a row (the live node).

A relative depth is never published as meters: ``metric``, ``points`` and uncertainty in
meters exist only when a metric scale is known.  Every output reuses the input header
(stamp and optical frame_id).

Nothing here blocks on ROS or spins: the caller feeds frames and publishes or writes what
comes back.
"""

import array
from dataclasses import dataclass, field
import time

from marigold_model.data.synthetic import colorize_depth
from marigold_model.errors import ReasonError
from marigold_model.estimator import EstimatorOutOfMemory
from marigold_model.scale_apply import apply_scale
from marigold_model.scale_tracking import ScaleEstimate, STATUS_OK
import numpy as np
from PIL import Image as PILImage
import torch

from .conversions import compressed_to_rgb, depth_to_image, image_to_rgb, ImageConversionError
from .conversions import organized_cloud_msg, rgb_to_image
from .device_outputs import DeviceRays, metric_outputs, runs_on_device
from .geometry import CalibrationError, CameraModel, pixel_rays, scale_camera
from .guided_depth import GuidedInference
from .node_params import DEFAULT_OUTPUT_NAMES, OutputConfig
from .stamp_matcher import stamp_to_ns

#: Notes saying why an output is missing (diagnostics keys).
NOTE_NO_CAMERA_INFO = 'no_camera_info'
NOTE_BAD_CAMERA_INFO = 'bad_camera_info'
NOTE_NO_METRIC_SCALE = 'no_metric_scale'

#: FrameOutput.problems whose input was used all the same: warnings rather than errors.
PROBLEM_IMPLAUSIBLE_CAMERA_INFO = 'camera_info_implausible'
WARNING_PROBLEMS = frozenset({PROBLEM_IMPLAUSIBLE_CAMERA_INFO})

#: ``ScaleEstimate.reason`` of a scale given by the user (OutputConfig.fixed_scale).
REASON_FIXED_SCALE = 'fixed'


@dataclass
class FrameInput:
    """
    One frame on its way through the stages.

    The caller sets the first four fields; the stages fill the others.

    :param image: sensor_msgs/Image or CompressedImage (rclpy or rosbags message)
    :param camera_info: sensor_msgs/CameraInfo matched to the image, or None (needed by
        :meth:`DepthPipeline.finish` only, so a caller may match it after inference)
    :param key: camera namespace / stream id (warm start and scale state are kept per key)
    :param outputs: names of the FrameOutput messages to build (a subset of
        :data:`~marigold_ros.node_params.OUTPUT_NAMES`), or None for the default ones
        (:data:`~marigold_ros.node_params.DEFAULT_OUTPUT_NAMES`: all but depth/colored).
        The live node passes the topics that have subscribers, as image_pipeline's nodes
        do; the scale is estimated either way, so its tracking never misses a frame.
    :param rgb: the decoded image (HxWx3 uint8), set by :meth:`DepthPipeline.decode`
    :param depth: the estimator's DepthResult, set by :meth:`DepthPipeline.infer`
    :param error: the FrameError that stopped the frame, or None
    :param timings: seconds per stage so far ('decode', 'estimator': the batch's call)
    :param guided: the frame's :class:`~marigold_model.guidance.GuidedResult` when sparse
        guidance made its depth (then ``depth`` holds its relative depth), else None
    """

    image: object
    camera_info: object = None
    key: str = ''
    outputs: frozenset = None
    rgb: object = None
    depth: object = None
    error: object = None
    timings: dict = field(default_factory=dict)
    guided: object = None


@dataclass
class FrameOutput:
    """
    The messages made from one frame; None where an output is not available.

    :param header: the input image header, reused by every output
    :param relative: Image 32FC1, relative depth in [0, 1] (NOT meters); None only when not
        asked for (FrameInput.outputs)
    :param metric: Image 32FC1 in meters (REP 118, NaN = invalid) when a scale is known
    :param uncertainty: Image 32FC1 ensemble spread, meters when ``metric`` exists, else
        relative units
    :param camera_info: CameraInfo scaled to the published depth resolution
    :param points: organized PointCloud2 (meters, x y z rgb) when scale and camera are known
    :param colored: Image rgb8, the metric depth (else the relative depth) colour-mapped for
        viewing (near = yellow, far = dark purple, invalid = black); only when asked for
    :param scale: the ScaleEstimate applied, or None
    :param scale_reason: why no scale was applied (the unusable estimate's reason, e.g.
        'low_inlier_ratio'); '' when one was, or when no scale was asked for
    :param notes: reasons for missing outputs (NOTE_* constants)
    :param problems: (reason, message) pairs of bad inputs that did not stop the frame,
        e.g. an unusable camera_info ('camera_info_<reason>')
    :param timings: seconds per stage ('decode', estimator stages, 'estimator', 'outputs')
    :param key: the stream key of the frame
    """

    header: object
    relative: object = None
    metric: object = None
    uncertainty: object = None
    camera_info: object = None
    points: object = None
    colored: object = None
    scale: object = None
    scale_reason: str = ''
    notes: tuple = ()
    problems: tuple = ()
    timings: dict = field(default_factory=dict)
    key: str = ''


class FrameError(ReasonError):
    """
    A frame that could not be processed at all.

    Reasons: 'truncated', 'unknown_encoding', 'empty_frame_id', 'zero_stamp', 'out_of_memory'...
    """


def is_compressed(msg):
    """Tell a CompressedImage from an Image by its fields."""
    return hasattr(msg, 'format') and not hasattr(msg, 'encoding')


def _decode_image(frame, max_pixels):
    """
    Check the header of a frame and convert its image to RGB.

    :param frame: FrameInput
    :param max_pixels: pixel limit
    :return: HxWx3 uint8 RGB
    :raises FrameError: the reason the frame cannot be used
    """
    msg = frame.image
    header = msg.header
    if not str(header.frame_id).strip():
        raise FrameError(
            'empty_frame_id', 'image header has an empty frame_id: depth and clouds '
            'could not be placed in TF; set the camera optical frame (REP 103/105) in '
            'the driver', frame.key)
    if stamp_to_ns(header.stamp) == 0:
        raise FrameError(
            'zero_stamp', 'image header stamp is zero: camera_info matching and latency '
            'need the capture time; set the stamp in the driver', frame.key)
    try:
        if is_compressed(msg):
            return compressed_to_rgb(msg, max_pixels)
        return image_to_rgb(msg, max_pixels)
    except ImageConversionError as error:
        raise FrameError(error.reason, str(error), frame.key) from error


def fixed_scale_estimate(scale, shift):
    """Wrap a user-given scale (meters per relative unit) and shift (m) as an 'ok' estimate."""
    return ScaleEstimate(scale=float(scale), shift=float(shift), inlier_ratio=1.0,
                         residual=0.0, n_points=0, age_s=0.0, status=STATUS_OK,
                         reason=REASON_FIXED_SCALE)


def camera_for_image(camera_info, width, height, rectified=False):
    """
    Validate a CameraInfo against the image it was matched to.

    :param camera_info: sensor_msgs/CameraInfo
    :param width: image width
    :param height: image height
    :param rectified: the image is rectified: the camera is P, without distortion
    :return: CameraModel of the image (binning and ROI folded in)
    :raises CalibrationError: unusable calibration, or reason 'size_mismatch' when the
        camera (after binning / ROI) is not the image's size
    """
    model = CameraModel.from_msg(camera_info)
    if rectified:
        model = model.rectified()
    model = model.effective()
    if (model.width, model.height) != (width, height):
        raise CalibrationError(
            'size_mismatch', f'camera_info describes a {model.width}x{model.height} image '
            f'(after binning / ROI) but the image is {width}x{height}')
    return model


def colored_depth(depth, header, value_range=None):
    """
    Colour-map a depth image (NaN / inf black) as an rgb8 Image, with the previews' map.

    ``value_range``: fixed (near, far), or None for the frame's 1st-99th percentile.
    """
    depth = np.asarray(depth)
    return rgb_to_image(colorize_depth(depth, np.isfinite(depth), value_range), header)


def resize_rgb(rgb, width, height):
    """Resize HxWx3 uint8 RGB bilinearly with pixel centres, as the depth was (no copy if same)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(PILImage.fromarray(rgb).resize((width, height), PILImage.BILINEAR))


def organized_cloud(depth, camera, rgb, header):
    """
    Build the organized x y z rgb PointCloud2 of a metric depth image in one pass.

    The same message as ``pointcloud2_from_depth(unproject_depth(depth, camera), rgb,
    header)`` (a test checks byte equality), written straight into the message's buffer:
    the cached per-pixel rays times z, and 0x00RRGGBB read from the RGB bytes as big-endian
    uint32 at a 3-byte stride (R G B + the next byte) shifted right by 8, which is several
    times faster than packing the channels one by one.  The cloud is most of the node's own
    cost per frame.

    :param depth: HxW float32 meters, NaN where invalid
    :param camera: CameraModel of the depth image (same size; distortion honoured)
    :param rgb: HxWx3 uint8 colours of the same size
    :param header: std_msgs/Header
    :return: sensor_msgs/PointCloud2 (point_step 16, is_dense False)
    """
    height, width = depth.shape
    eff = camera.effective()
    rx, ry, ray_ok = pixel_rays(height, width, eff.K, eff.distortion_coefficients(),
                                eff.distortion_model)
    with np.errstate(invalid='ignore'):
        valid = (depth > 0) & ray_ok  # False for NaN
    z = depth if valid.all() else np.where(valid, depth, np.float32(np.nan))
    data, points = cloud_buffer(height, width)
    np.multiply(rx, z, out=points[:, :, 0])
    np.multiply(ry, z, out=points[:, :, 1])
    points[:, :, 2] = z
    write_colours(points, rgb)
    return organized_cloud_msg(header, height, width, data)


def cloud_buffer(height, width):
    """Return a zeroed organized cloud's bytes (array('B')) and their [H, W, 4] float32 view."""
    data = array.array('B', [0]) * (16 * height * width)
    return data, np.frombuffer(data, dtype='<f4').reshape(height, width, 4)


def write_colours(points, rgb):
    """Write each pixel's 0x00RRGGBB into the fourth word of a [H, W, 4] cloud buffer."""
    flat = np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1)
    colours = points.view('<u4').reshape(-1, 4)[:, 3]
    if colours.size > 1:
        # The last pixel has no next byte to read, so it is packed on its own below.  The
        # byte swap goes to a contiguous copy first: faster than a strided big-endian ufunc.
        words = np.ndarray((colours.size - 1,), dtype='>u4', buffer=flat,
                           strides=(3,)).astype('<u4')
        words >>= 8
        colours[:-1] = words
    red, green, blue = (int(c) for c in flat[-3:])
    colours[-1] = (red << 16) | (green << 8) | blue


class DepthPipeline:
    """
    The depth path as stages: :meth:`decode`, :meth:`infer`, :meth:`finish`.

    Thread-safety: each stage may run on its own thread, one call at a time per stage, the
    batches in the same order through every stage (the estimator's warm start and the
    scale tracking follow that order).  ``output_config``, ``scale_source`` and
    ``guidance`` may be replaced from another thread (each stage call reads them once).

    :param estimator: marigold_model DepthEstimator (or anything with its ``estimate``)
    :param output_config: OutputConfig
    :param scale_source: object with ``estimate(key, header, relative_depth, camera)``
        returning a ScaleEstimate or None, and optionally ``last_estimate(key)``, the last
        outcome with its reason (see marigold_ros.scale_recovery), or None
    :param device_outputs: compute metric depth, uncertainty and the cloud's points where the
        model ran (marigold_ros.device_outputs) and copy each back once; None: when the
        estimator runs on CUDA (on the CPU the numpy host path is faster: 3.2 against 8.7
        ms of CPU per 640x480 frame with a cloud; the two give the same bytes)
    :param guidance: GuidanceConfig to guide the frames that have sparse points (the scale
        source must be a ScaleRecovery), or None for no guidance
    """

    def __init__(self, estimator, output_config=OutputConfig(), scale_source=None,
                 guidance=None, device_outputs=None):
        """Keep the estimator, the output settings, the scale source and the guidance."""
        if not isinstance(output_config, OutputConfig):
            raise TypeError(f'output_config must be an OutputConfig, got '
                            f'{type(output_config).__name__}')
        self.estimator = estimator
        self.output_config = output_config
        self.scale_source = scale_source
        self.guidance = guidance
        self._guided = GuidedInference()
        if device_outputs is None:
            device_outputs = getattr(getattr(estimator, 'device', None), 'type', '') == 'cuda'
        self.device_outputs = bool(device_outputs)
        self._rays = {}  # DeviceRays per torch device, used by finish only

    def process(self, frames):
        """
        Run the three stages on a batch of FrameInputs, one estimator call for all of them.

        Returns one FrameOutput or FrameError per frame, in order: bad frames, rejected
        frames and out-of-memory become FrameError; only estimator bugs raise.
        """
        self.infer(self.decode(frames))
        return self.finish(frames)

    # ------------------------------------------------------------------ 1. decode

    def decode(self, frames):
        """
        Check each frame's header and convert its image to RGB (``FrameInput.rgb``).

        A frame that cannot be decoded gets its FrameError in ``error``: reasons of
        ImageConversionError ('empty', 'truncated', 'bad_step', 'unknown_encoding',
        'corrupt_compressed', 'too_large', ...) or 'empty_frame_id' / 'zero_stamp'.

        :param frames: list of FrameInput
        :return: the same list
        """
        max_pixels = self.output_config.max_input_pixels
        for frame in frames:
            if frame.error is not None or frame.rgb is not None:
                continue
            clock = time.perf_counter()
            try:
                frame.rgb = _decode_image(frame, max_pixels)
            except FrameError as error:
                frame.error = error
                continue
            frame.timings['decode'] = time.perf_counter() - clock
        return frames

    # ------------------------------------------------------------------ 2. infer

    def infer(self, frames):
        """
        Run the model once on the decoded frames of a batch (``FrameInput.depth``).

        Frames with an error are left out.  When the estimator runs out of memory or
        rejects the batch, every frame of the call gets that FrameError.

        :param frames: list of FrameInput, decoded
        :return: seconds spent in the estimator call (0.0 without a call)
        :raises Exception: only unexpected estimator failures (bugs)
        """
        good = [frame for frame in frames if frame.error is None]
        guided = 0.0
        if good and self.guidance is not None and self.scale_source is not None and \
                self.output_config.fixed_scale <= 0:
            good, guided = self._guided.infer(good, self.estimator, self.guidance,
                                              self.scale_source, self._camera_of)
        if not good:
            return guided
        clock = time.perf_counter()
        try:
            extra = {'device_tensors': True} if self.device_outputs else {}
            estimates = self.estimator.estimate([frame.rgb for frame in good],
                                                keys=[frame.key for frame in good], **extra)
        except EstimatorOutOfMemory as error:
            reason, message = 'out_of_memory', str(error)
        except ValueError as error:
            reason, message = 'estimator_rejected', str(error)
        else:
            seconds = time.perf_counter() - clock
            for frame, estimate in zip(good, estimates):
                frame.depth = estimate
                frame.timings['estimator'] = seconds
            return seconds + guided
        for frame in good:
            frame.error = FrameError(reason, message, frame.key)
        return time.perf_counter() - clock + guided

    def _camera_of(self, frame):
        """Return the CameraModel of a decoded frame's image, or None without camera_info."""
        if frame.camera_info is None:
            return None
        return camera_for_image(frame.camera_info, frame.rgb.shape[1], frame.rgb.shape[0],
                                self.output_config.rectified_input)

    # ------------------------------------------------------------------ 3. finish

    def finish(self, frames):
        """
        Scale the depth of each frame and build its messages.

        :param frames: list of FrameInput through :meth:`infer` (``camera_info`` set)
        :return: list of FrameOutput, or the frame's FrameError, one per frame in order
        """
        config = self.output_config
        results = []
        for frame in frames:
            if frame.error is not None:
                results.append(frame.error)
                continue
            clock = time.perf_counter()
            output = self._outputs(frame, config)
            output.timings.update(decode=frame.timings.get('decode', 0.0),
                                  estimator=frame.timings.get('estimator', 0.0),
                                  outputs=time.perf_counter() - clock)
            results.append(output)
        return results

    def _scale(self, frame, header, depth, camera, config, problems):
        """Return (ScaleEstimate or None, why there is no usable one: a reason or '')."""
        if config.fixed_scale > 0:
            return fixed_scale_estimate(config.fixed_scale, config.fixed_shift), ''
        source = self.scale_source
        if source is None:
            return None, ''
        if frame.guided is not None:  # the depth is the guided one: its own scale and shift
            return source.guided_estimate(frame.key, header, frame.guided), ''
        try:
            scale = source.estimate(frame.key, header, depth, camera)
        except Exception as error:  # noqa: B902 - a scale problem must not lose the frame
            problems.append(('scale_source_error', f'scale recovery failed: {error!r}'))
            return None, 'scale_source_error'
        if scale is not None and scale.usable:
            return scale, ''
        # ScaleRecovery returns None for no usable scale and keeps the outcome with its reason.
        if scale is None and hasattr(source, 'last_estimate'):
            return None, getattr(source.last_estimate(frame.key), 'reason', None) or ''
        return scale, getattr(scale, 'reason', None) or ''

    def _metric(self, estimate, depth, scale, spread, camera, max_depth):
        """
        Metric depth and uncertainty (meters) from a usable scale estimate, on the host.

        On the device path (``device_outputs``) also the cloud: (bytes, [H, W, 4] view) with
        x y z written and the colour word left to the caller; otherwise None for the cloud.
        """
        device_depth = getattr(estimate, 'device_depth', None)
        if not (self.device_outputs and device_depth is not None and runs_on_device(scale)):
            # One conversion for fixed, tracked and locally refined estimates.
            return apply_scale(scale, depth, spread, max_depth) + (None,)
        cloud = rays = None
        if camera is not None:
            cloud = cloud_buffer(*device_depth.shape)
            device_rays = self._rays.get(device_depth.device)
            if device_rays is None:
                device_rays = self._rays[device_depth.device] = DeviceRays(device_depth.device)
            rays = device_rays.get(camera)
        with torch.inference_mode():
            out = metric_outputs(device_depth, scale, max_depth, estimate.device_uncertainty,
                                 rays, None if cloud is None else cloud[1])
        return out.metric, out.uncertainty, cloud

    def _outputs(self, frame, config):
        rgb, estimate = frame.rgb, frame.depth
        header = frame.image.header
        wanted = DEFAULT_OUTPUT_NAMES if frame.outputs is None else frame.outputs
        depth = np.asarray(estimate.depth, dtype=np.float32)
        height, width = depth.shape
        notes, problems = [], []
        output = FrameOutput(header=header, key=frame.key, timings=dict(estimate.timings))
        if 'relative' in wanted:
            output.relative = depth_to_image(depth, header)

        camera = None
        if frame.camera_info is None:
            notes.append(NOTE_NO_CAMERA_INFO)
        else:
            try:
                model = camera_for_image(frame.camera_info, rgb.shape[1], rgb.shape[0],
                                         config.rectified_input)
                camera = scale_camera(model, width, height)
                problems += [(PROBLEM_IMPLAUSIBLE_CAMERA_INFO, 'camera_info looks wrong (used '
                              'anyway): ' + text) for text in model.implausibilities()]
            except CalibrationError as error:
                notes.append(NOTE_BAD_CAMERA_INFO)
                problems.append(('camera_info_' + error.reason, str(error)))
        if camera is not None and 'camera_info' in wanted:
            output.camera_info = camera.to_msg(header)

        scale, no_scale_reason = self._scale(frame, header, depth, camera, config, problems)
        metric = cloud = None
        want_points = config.publish_points and camera is not None and 'points' in wanted
        spread = None if estimate.uncertainty is None else \
            np.asarray(estimate.uncertainty, dtype=np.float32)
        if scale is None or not scale.usable:
            notes.append(NOTE_NO_METRIC_SCALE)
            output.scale_reason = no_scale_reason
        else:
            output.scale = scale
            if wanted & {'metric', 'uncertainty', 'points', 'colored'}:
                metric, spread, cloud = self._metric(estimate, depth, scale, spread,
                                                     camera if want_points else None,
                                                     config.max_depth)
            if metric is not None and 'metric' in wanted:
                output.metric = depth_to_image(metric, header)

        if config.publish_uncertainty and spread is not None and 'uncertainty' in wanted:
            output.uncertainty = depth_to_image(spread, header)

        if want_points and metric is not None:
            small_rgb = resize_rgb(rgb, width, height)
            if cloud is None:
                output.points = organized_cloud(metric, camera, small_rgb, header)
            else:
                write_colours(cloud[1], small_rgb)
                output.points = organized_cloud_msg(header, height, width, cloud[0])
        if 'colored' in wanted:
            output.colored = colored_depth(depth if metric is None else metric, header,
                                           config.colored_range)
        output.notes = tuple(notes)
        output.problems = tuple(problems)
        return output
