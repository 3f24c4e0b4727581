"""
The depth path for a batch of frames: image messages in, depth and cloud messages out.

Shared by the live node (newest frame per camera, on a worker thread) and the bag processor
(every frame, batched), so the path exists once::

    Image / CompressedImage -> RGB (conversions) -> DepthEstimator (one call per batch)
    -> relative depth -> camera model scaled to the depth resolution (geometry)
    -> metric scale (fixed by the user, or from a scale source) -> messages

A relative depth is never published as meters: ``metric``, ``points`` and uncertainty in
meters exist only when a metric scale is known.  Every output reuses the input header
(stamp and optical frame_id).

Nothing here blocks on ROS or spins: the caller feeds frames and publishes or writes what
comes back.
"""

import array
from dataclasses import dataclass, field
import math
import time

from marigold_model.config import ModelConfig
from marigold_model.estimator import EstimatorOutOfMemory
from marigold_model.scale_tracking import ScaleEstimate, STATUS_OK
import numpy as np
from PIL import Image as PILImage

from .conversions import compressed_to_rgb, depth_to_image, image_to_rgb, ImageConversionError
from .conversions import organized_cloud_msg
from .geometry import CalibrationError, CameraModel, pixel_rays, scale_camera
from .stamp_matcher import stamp_to_ns

#: Notes saying why an output is missing (diagnostics keys).
NOTE_NO_CAMERA_INFO = 'no_camera_info'
NOTE_BAD_CAMERA_INFO = 'bad_camera_info'
NOTE_NO_METRIC_SCALE = 'no_metric_scale'

#: ``ScaleEstimate.reason`` of a scale given by the user (OutputConfig.fixed_scale).
REASON_FIXED_SCALE = 'fixed'


@dataclass(frozen=True)
class OutputConfig:
    """
    Node settings that shape the outputs (each one is a ROS parameter of the node).

    :param publish_points: publish the organized point cloud (needs camera info and a
        metric scale)
    :param publish_uncertainty: publish the ensemble spread (only exists with ensemble > 1)
    :param fixed_scale: > 0: the user knows the metric scale of the scene and metric depth is
        fixed_scale * relative + fixed_shift (meters); 0: the scale comes from scale recovery,
        or the node stays relative
    :param fixed_shift: metric offset in meters used with fixed_scale
    :param max_depth: metric depths beyond this many meters become NaN (no reading) in the
        depth image and the cloud; 0 means no limit
    :param max_input_pixels: refuse images with more pixels (width * height) than this before
        decoding them
    :param rectified_input: the images are rectified (image_rect): the camera is the
        camera_info's P with no distortion, as depth_image_proc assumes; false: raw images,
        whose rays are undistorted with K and D
    """

    publish_points: bool = True
    publish_uncertainty: bool = True
    fixed_scale: float = 0.0
    fixed_shift: float = 0.0
    max_depth: float = 0.0
    max_input_pixels: int = ModelConfig.max_input_pixels
    rectified_input: bool = False

    def __post_init__(self):
        """
        Validate the settings.

        :raises ValueError: a setting is out of range, naming it
        """
        if not (math.isfinite(self.fixed_scale) and self.fixed_scale >= 0):
            raise ValueError(f'fixed_scale must be finite and >= 0 (0 = not fixed), got '
                             f'{self.fixed_scale}')
        if not math.isfinite(self.fixed_shift):
            raise ValueError(f'fixed_shift must be finite, got {self.fixed_shift}')
        if not (math.isfinite(self.max_depth) and self.max_depth >= 0):
            raise ValueError(f'max_depth must be finite and >= 0 (0 = no limit), got '
                             f'{self.max_depth}')
        if self.max_input_pixels <= 0:
            raise ValueError(f'max_input_pixels must be > 0, got {self.max_input_pixels}')


#: The messages a frame can produce, in publishing order (FrameOutput attributes).
OUTPUT_NAMES = ('relative', 'metric', 'uncertainty', 'camera_info', 'points')


@dataclass
class FrameInput:
    """
    One frame to process.

    :param image: sensor_msgs/Image or CompressedImage (rclpy or rosbags message)
    :param camera_info: sensor_msgs/CameraInfo matched to the image, or None
    :param key: camera namespace / stream id (warm start and scale state are kept per key)
    :param outputs: names of the FrameOutput messages to build (a subset of
        :data:`OUTPUT_NAMES`), or None for all.  The live node passes the topics that have
        subscribers, as image_pipeline's nodes do; the scale is estimated either way, so
        its tracking never misses a frame.
    :param rgb: the image already decoded by :meth:`DepthPipeline.decode` (HxWx3 uint8), so
        that a caller which decoded it ahead (the bag processor) does not pay twice; None:
        decoded by :meth:`DepthPipeline.process`
    """

    image: object
    camera_info: object = None
    key: str = ''
    outputs: frozenset = None
    rgb: object = None


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
    :param scale: the ScaleEstimate applied, or None
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
    scale: object = None
    notes: tuple = ()
    problems: tuple = ()
    timings: dict = field(default_factory=dict)
    key: str = ''


class FrameError(ValueError):
    """
    A frame that could not be processed at all.

    :param reason: diagnostics counter key, e.g. 'truncated', 'unknown_encoding',
        'empty_frame_id', 'zero_stamp', 'out_of_memory'
    :param message: human-readable description naming the problem
    :param key: stream key of the frame
    """

    def __init__(self, reason, message, key=''):
        """Store the reason, message and key."""
        super().__init__(message)
        self.reason = reason
        self.key = key


def is_compressed(msg):
    """
    Tell a CompressedImage from an Image by its fields.

    :param msg: sensor_msgs/Image or CompressedImage
    :return: True for a CompressedImage
    """
    return hasattr(msg, 'format') and not hasattr(msg, 'encoding')


def fixed_scale_estimate(scale, shift):
    """
    Wrap a user-given scale and shift as a ScaleEstimate.

    :param scale: meters per relative unit (> 0)
    :param shift: meters
    :return: ScaleEstimate with status 'ok' and reason 'fixed'
    """
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


def resize_rgb(rgb, width, height):
    """
    Resize RGB to (width, height) bilinearly with pixel centres (as the depth was resized).

    :param rgb: HxWx3 uint8
    :param width: new width
    :param height: new height
    :return: height x width x 3 uint8 (the input itself when the size already matches)
    """
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
    data = array.array('B', [0]) * (16 * height * width)
    points = np.frombuffer(data, dtype='<f4').reshape(height, width, 4)
    np.multiply(rx, z, out=points[:, :, 0])
    np.multiply(ry, z, out=points[:, :, 1])
    points[:, :, 2] = z
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
    return organized_cloud_msg(header, height, width, data)


class DepthPipeline:
    """
    Process batches of frames: decode, one estimator call, then outputs per frame.

    Thread-safety: one thread calls :meth:`process` at a time; ``output_config`` and
    ``scale_source`` may be replaced from another thread (each call reads them once).

    :param estimator: marigold_model DepthEstimator (or anything with its ``estimate``)
    :param output_config: OutputConfig
    :param scale_source: object with ``estimate(key, header, relative_depth, camera)``
        returning a ScaleEstimate or None (see marigold_ros.scale_recovery), or None
    """

    def __init__(self, estimator, output_config=OutputConfig(), scale_source=None):
        """Keep the estimator, the output settings and the scale source."""
        if not isinstance(output_config, OutputConfig):
            raise TypeError(f'output_config must be an OutputConfig, got '
                            f'{type(output_config).__name__}')
        self.estimator = estimator
        self.output_config = output_config
        self.scale_source = scale_source

    # ------------------------------------------------------------------ decoding

    def decode(self, frame, max_pixels=None):
        """
        Check the header and convert the image of one frame to RGB.

        :param frame: FrameInput
        :param max_pixels: pixel limit (default: output_config.max_input_pixels)
        :return: HxWx3 uint8 RGB
        :raises FrameError: reasons of ImageConversionError ('empty', 'truncated',
            'bad_step', 'unknown_encoding', 'corrupt_compressed', 'too_large', ...) or
            'empty_frame_id' / 'zero_stamp'
        """
        if max_pixels is None:
            max_pixels = self.output_config.max_input_pixels
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

    # ------------------------------------------------------------------ the batch

    def process(self, frames):
        """
        Process a batch of frames with one estimator call.

        Bad frames become FrameError entries and the others go on; the result list has
        one entry per input frame, in order.

        :param frames: list of FrameInput
        :return: list of FrameOutput or FrameError
        :raises Exception: only unexpected estimator failures (bugs); out-of-memory and
            rejected frames become FrameError
        """
        config = self.output_config
        results = [None] * len(frames)
        rgbs, positions, decode_times = [], [], []
        for index, frame in enumerate(frames):
            clock = time.perf_counter()
            rgb = frame.rgb
            if rgb is None:
                try:
                    rgb = self.decode(frame, config.max_input_pixels)
                except FrameError as error:
                    results[index] = error
                    continue
            rgbs.append(rgb)
            positions.append(index)
            decode_times.append(time.perf_counter() - clock)
        if not rgbs:
            return results
        clock = time.perf_counter()
        try:
            estimates = self.estimator.estimate(
                rgbs, keys=[frames[i].key for i in positions])
        except EstimatorOutOfMemory as error:
            return self._fail(results, frames, positions, 'out_of_memory', str(error))
        except ValueError as error:
            return self._fail(results, frames, positions, 'estimator_rejected', str(error))
        call_time = time.perf_counter() - clock
        for rgb, index, estimate, decode_time in zip(rgbs, positions, estimates,
                                                     decode_times):
            clock = time.perf_counter()
            output = self._outputs(frames[index], rgb, estimate, config)
            output.timings.update(decode=decode_time, estimator=call_time,
                                  outputs=time.perf_counter() - clock)
            results[index] = output
        return results

    @staticmethod
    def _fail(results, frames, positions, reason, message):
        for index in positions:
            results[index] = FrameError(reason, message, frames[index].key)
        return results

    def _scale(self, frame, header, depth, camera, config, problems):
        if config.fixed_scale > 0:
            return fixed_scale_estimate(config.fixed_scale, config.fixed_shift)
        source = self.scale_source
        if source is None:
            return None
        try:
            return source.estimate(frame.key, header, depth, camera)
        except Exception as error:  # noqa: B902 - a scale problem must not lose the frame
            problems.append(('scale_source_error', f'scale recovery failed: {error!r}'))
            return None

    @staticmethod
    def _metric(scale, depth, spread, max_depth):
        """Metric depth and uncertainty (meters) from a usable scale estimate."""
        # One conversion for fixed, tracked and locally refined estimates.
        from .scale_recovery import apply_scale
        return apply_scale(scale, depth, spread, max_depth)

    def _outputs(self, frame, rgb, estimate, config):
        header = frame.image.header
        wanted = frozenset(OUTPUT_NAMES) if frame.outputs is None else frame.outputs
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
            except CalibrationError as error:
                notes.append(NOTE_BAD_CAMERA_INFO)
                problems.append(('camera_info_' + error.reason, str(error)))
        if camera is not None and 'camera_info' in wanted:
            output.camera_info = camera.to_msg(header)

        scale = self._scale(frame, header, depth, camera, config, problems)
        metric = None
        spread = None if estimate.uncertainty is None else \
            np.asarray(estimate.uncertainty, dtype=np.float32)
        if scale is None or not scale.usable:
            notes.append(NOTE_NO_METRIC_SCALE)
        else:
            output.scale = scale
            if wanted & {'metric', 'uncertainty', 'points'}:
                metric, spread = self._metric(scale, depth, spread, config.max_depth)
            if metric is not None and 'metric' in wanted:
                output.metric = depth_to_image(metric, header)

        if config.publish_uncertainty and spread is not None and 'uncertainty' in wanted:
            output.uncertainty = depth_to_image(spread, header)

        if config.publish_points and metric is not None and camera is not None \
                and 'points' in wanted:
            output.points = organized_cloud(metric, camera, resize_rgb(rgb, width, height),
                                            header)
        output.notes = tuple(notes)
        output.problems = tuple(problems)
        return output
