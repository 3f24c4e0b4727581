"""
Metric scale per camera: buffered sparse depth / LiDAR readings, paired with a depth frame.

:class:`ScaleRecovery` buffers the readings of each camera, projects the one matching a
depth frame into its grid and updates that camera's tracker. Messages, subscriptions and tf2
are in :mod:`marigold_ros.scale_inputs`; the maths, without ROS, in
:mod:`marigold_model.scale_tracking` and :mod:`marigold_model.scale_apply`. A bad input
never gives a scale: the previous estimate is kept, ``stale`` with the input's reason, until
older than ``max_stale_s``.
"""

from dataclasses import dataclass, fields, replace
import math
import threading

from marigold_model.scale_apply import RefinedScaleEstimate
from marigold_model.scale_tracking import ScaleEstimate, ScaleTracker, ScaleTrackerConfig
from marigold_model.scale_tracking import sparse_pixels, STATUS_NO_ESTIMATE, STATUS_OK
from marigold_model.scale_tracking import STATUS_STALE
import numpy as np

from .diagnostics import KeyedThrottle
from .geometry import CalibrationError, MIN_DEPTH, project_points, quaternion_to_matrix
from .geometry import scale_camera
from .scale_inputs import InputSubscriptions, points_reading, REASON_NO_TRANSFORM
from .scale_inputs import ScaleInputError, sparse_depth_reading
from .stamp_matcher import NS_PER_S, stamp_to_ns, StampMatcher

#: Values of :attr:`ScaleRecoveryConfig.source`.
SOURCES = ('none', 'sparse_depth', 'points')

# Reasons (diagnostics counter keys) of pairing a reading with a frame.
REASON_NO_SPARSE_INPUT = 'no_sparse_input'
REASON_SPARSE_SIZE_MISMATCH = 'sparse_depth_size_mismatch'
REASON_POINTS_BEHIND = 'points_behind_camera'
REASON_POINTS_OUTSIDE = 'points_outside_image'
REASON_NO_CAMERA_INFO = 'no_camera_info'

#: ``ScaleEstimate.reason`` of a scale that comes from sparse guidance.
REASON_GUIDED = 'guided'
#: Prefix of the reasons of frames that fell back from guidance to the global fit.
GUIDANCE_REASON_PREFIX = 'guidance_'

# A sparse depth image registered to the camera covers the same field of view, so its aspect
# ratio matches; 5 % leaves room for rounding in odd downscaled sizes (e.g. 1 px of 41)
# while catching a 16:9 / 4:3 / 16:10 mix-up (>= 17 %), i.e. a sensor not registered at all.
_ASPECT_TOLERANCE = 0.05

#: The extrinsic parameters' default: no calibration given (never used between two frames).
IDENTITY_EXTRINSIC = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))


@dataclass(frozen=True)
class _RecoverySettings:
    """The fields of :class:`ScaleRecoveryConfig` beyond the tracker's (documented there)."""

    source: str = 'none'
    match_tolerance_s: float = 0.05
    queue_size: int = 10
    sparse_depth_scale: float = 0.001
    use_tf: bool = True
    extrinsic_translation: tuple = (0.0, 0.0, 0.0)
    extrinsic_rotation_xyzw: tuple = (0.0, 0.0, 0.0, 1.0)
    transform_tolerance_s: float = 0.1
    fixed_frame: str = ''
    local_refinement: bool = False
    guidance: bool = False
    error_throttle_s: float = 5.0


# The last base's fields come first: the parameters keep their order (source ... seed).
@dataclass(frozen=True)
class ScaleRecoveryConfig(ScaleTrackerConfig, _RecoverySettings):
    """
    Settings of :class:`ScaleRecovery`; the node exposes each field as a ROS parameter.

    A :class:`~marigold_model.scale_tracking.ScaleTrackerConfig` (``min_points`` to
    ``seed``, documented there) with the input settings below.

    :param source: ``'none'``, ``'sparse_depth'`` (Image ``sparse_depth``) or ``'points'``
        (PointCloud2 ``points_in``)
    :param match_tolerance_s: largest stamp gap between a depth frame and the sparse input
        used for it
    :param queue_size: sparse messages buffered per stream for stamp matching
    :param sparse_depth_scale: meters per unit of 16UC1 sparse depth (0.001: millimeters)
    :param use_tf: look the LiDAR pose up in tf2 (when ``tf2_ros`` is importable); otherwise
        the extrinsic parameters are used
    :param extrinsic_translation: (x, y, z) of the LiDAR frame in the camera optical frame
        (meters, REP 103 / 105: ``p_optical = R p_lidar + t``); the identity default is
        only used for clouds in the camera's own frame (else ``no_transform``)
    :param extrinsic_rotation_xyzw: the rotation of that transform as a quaternion (x, y,
        z, w)
    :param transform_tolerance_s: largest gap between the cloud stamp and the newest tf2
        transform when tf2 cannot interpolate at the cloud stamp (else ``stale_transform``)
    :param fixed_frame: a world-fixed tf2 frame (e.g. 'odom') to carry the cloud from its
        stamp to the image stamp (tf2 lookup_transform_full), so the robot's motion between
        the two (up to match_tolerance_s) does not shift the points; '' = the extrinsic at the
        cloud stamp only (live tf2; process_bag reads /tf_static only)
    :param local_refinement: opt-in: correct the global affine fit locally towards the
        sparse points of the frame (:func:`~marigold_model.scale_apply.refine_local`)
    :param guidance: opt-in: steer the diffusion towards the frame's sparse points
        (Marigold-DC, :mod:`marigold_model.guidance`, settings ``guidance.*``) instead of
        fitting a scale to a finished prediction; about denoising_steps x
        iterations_per_step x 3 model calls per frame, one frame per call; frames with too
        few points fall back to the global fit (reason ``guidance_<reason>``)
    :param error_throttle_s: at most one log line per problem (reason) per this period
    """

    def __post_init__(self):
        """
        Normalise list values to tuples (ROS array parameters) and validate.

        :raises ValueError: a setting is out of range (naming it)
        """
        for name in ('extrinsic_translation', 'extrinsic_rotation_xyzw', 'anchors'):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.source not in SOURCES:
            raise ValueError(f'source must be one of {SOURCES}, got {self.source!r}')
        for name in ('match_tolerance_s', 'transform_tolerance_s', 'error_throttle_s'):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f'{name} must be >= 0, got {value}')
        if int(self.queue_size) < 1:
            raise ValueError(f'queue_size must be >= 1, got {self.queue_size}')
        if not (math.isfinite(self.sparse_depth_scale) and self.sparse_depth_scale > 0):
            raise ValueError(f'sparse_depth_scale must be > 0, got {self.sparse_depth_scale}')
        t = self.extrinsic_translation
        if len(t) != 3 or not all(math.isfinite(v) for v in t):
            raise ValueError(f'extrinsic_translation must be 3 finite values, got {t}')
        quaternion_to_matrix(self.extrinsic_rotation_xyzw)  # raises ValueError naming it
        super().__post_init__()  # the tracker settings


def _number(value, digits=4):
    """Format a float for a diagnostics value."""
    return f'{value:.{digits}g}'


def status_fields(estimate, reason=None):
    """
    Diagnostics key/value pairs of a scale estimate (strings, for diagnostic_msgs/KeyValue).

    :param reason: reason to report when ``estimate`` is None
    :return: list of (key, value) string pairs: ``scale_status``, ``scale``,
        ``scale_shift``, ``scale_inlier_ratio``, ``scale_residual``, ``scale_points``,
        ``scale_age_s``, ``scale_reason``
    """
    if estimate is None:
        estimate = ScaleEstimate(scale=math.nan, shift=math.nan, inlier_ratio=0.0,
                                 residual=math.nan, n_points=0, age_s=math.inf,
                                 status=STATUS_NO_ESTIMATE, reason=reason)
    return [('scale_status', str(estimate.status)),
            ('scale', _number(estimate.scale, 6)),
            ('scale_shift', _number(estimate.shift, 6)),
            ('scale_inlier_ratio', _number(estimate.inlier_ratio, 3)),
            ('scale_residual', _number(estimate.residual, 3)),
            ('scale_points', str(int(estimate.n_points))),
            ('scale_age_s', _number(estimate.age_s, 3)),
            ('scale_reason', estimate.reason or '')]


def _guidance_fields(last, global_fit):
    """
    Diagnostics of sparse guidance: whether the latest frame was guided, and its global fit.

    :return: ``scale_guidance`` ('guided', or 'global_fit' for a frame that fell back) and
        ``scale_global_fit`` (the guided frame's first robust fit: what the global fit alone
        would have applied)
    """
    guided = last is not None and last.reason == REASON_GUIDED
    fit = ''
    if guided and global_fit is not None:
        fit = (f'scale {_number(global_fit.scale, 6)}, shift {_number(global_fit.shift, 6)} m, '
               f'inliers {_number(global_fit.inlier_ratio, 3)}, residual '
               f'{_number(global_fit.residual, 3)}, points {int(global_fit.n_points)}')
    return [('scale_guidance', 'guided' if guided else 'global_fit'),
            ('scale_global_fit', fit)]


class _Stream:
    """Per-stream state: tracker, buffered input, latest outcome and input problems."""

    def __init__(self, config):
        """Create an empty stream."""
        self.tracker = ScaleTracker(config)
        self.readings = StampMatcher(config.match_tolerance_s, config.queue_size)
        self.last = None  # latest ScaleEstimate (also unusable ones: they carry the reason)
        self.fused = None  # the reading that last updated the tracker
        self.errors = {}  # reason -> count
        self.last_error = None
        self.global_fit = None  # the global fit of the latest guided frame


class ScaleRecovery:
    """
    Scale source of the pipeline: metric scale per stream from sparse depth or LiDAR.

    Thread-safe: subscription callbacks add input while the worker thread estimates.

    :param config: :class:`ScaleRecoveryConfig`
    :param transform_lookup: optional callable ``(target_frame, source_frame, stamp_ns,
        image_stamp_ns) -> (translation, quaternion_xyzw)`` raising :class:`ScaleInputError`
        (e.g. :class:`~marigold_ros.scale_inputs.Tf2TransformLookup` on a Buffer the caller
        fills); default: set by :meth:`attach` to tf2 when available and ``use_tf``, else
        the extrinsic parameters
    """

    def __init__(self, config=None, transform_lookup=None):
        """Create the scale source (no ROS node needed until :meth:`attach`)."""
        self.config = config if config is not None else ScaleRecoveryConfig()
        self._lookup = transform_lookup
        self._transform_source = 'custom' if transform_lookup is not None else 'parameters'
        self._streams = {}
        self._errors = {}
        self._last_error = None
        self._lock = threading.Lock()
        self._logger = None
        self._throttle = KeyedThrottle(self.config.error_throttle_s)
        self._inputs = InputSubscriptions(self.config)

    # ------------------------------------------------------------------ state

    @property
    def errors(self):
        """Return a copy of {reason: count} of input problems since start, all streams."""
        with self._lock:
            return dict(self._errors)

    @property
    def last_error(self):
        """Return the latest :class:`ScaleInputError` of any stream, or None."""
        with self._lock:
            return self._last_error

    @property
    def transform_source(self):
        """Return where LiDAR extrinsics come from: ``'tf2'``, ``'parameters'`` or ``'custom'``."""
        return self._transform_source

    @property
    def points_need_camera(self):
        """Tell whether pairing needs the frame's camera (LiDAR points are projected)."""
        return self.config.source == 'points'

    def last_estimate(self, key=''):
        """Return the latest outcome of :meth:`estimate` for a stream, unusable ones included."""
        with self._lock:
            stream = self._streams.get(key)
        return None if stream is None else stream.last

    def diagnostic_fields(self, key=''):
        """
        Diagnostics of one stream: the estimate's fields plus source and input problems.

        :return: list of (key, value) string pairs (see :func:`status_fields`), then
            ``scale_source``, ``scale_transform`` (points only), ``scale_input_errors``
            (``reason=count, ...`` of this stream) and ``scale_last_error``
        """
        with self._lock:
            stream = self._streams.get(key)
            last = stream.last if stream else None
            errors = dict(stream.errors) if stream else {}
            last_error = stream.last_error if stream else None
            global_fit = stream.global_fit if stream else None
        reason = REASON_NO_SPARSE_INPUT if self.config.source != 'none' else 'source_none'
        out = status_fields(last, reason=reason)
        out.append(('scale_source', self.config.source))
        if self.config.source == 'points':
            out.append(('scale_transform', self._transform_source))
        out.append(('scale_input_errors',
                    ', '.join(f'{k}={v}' for k, v in sorted(errors.items())) or 'none'))
        out.append(('scale_last_error',
                    f'{last_error.reason}: {last_error}' if last_error else ''))
        if self.config.guidance:
            out += _guidance_fields(last, global_fit)
        return out

    def _stream(self, key):
        """Return the state of a stream, created on first use."""
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = _Stream(self.config)
            return stream

    def _report(self, error, fallback=None):
        """
        Count an input problem, remember it and log it (throttled per stream and reason).

        :param fallback: what is used instead, for a warning (None: an error, the depth may
            stay relative)
        """
        stream = self._stream(error.key)
        with self._lock:
            self._errors[error.reason] = self._errors.get(error.reason, 0) + 1
            stream.errors[error.reason] = stream.errors.get(error.reason, 0) + 1
            self._last_error = stream.last_error = error
            logger = self._logger
        if logger is None:
            return
        # Throttled per (stream, reason): rclpy's throttle_duration_sec is per call site, so
        # one frequent problem would hide every other one.
        where = f' [{error.key}]' if error.key else ''
        tail = f'{fallback}' if fallback else \
            'the depth stays relative when no valid scale is left'
        line = self._throttle.report(
            (error.key, error.reason), f'scale recovery{where}: {error.reason}: {error}; '
            f'{tail}')
        if line is not None:
            (logger.warning if fallback else logger.error)(line)

    # ------------------------------------------------------------------ input

    def add_sparse_depth(self, key, msg):
        """Buffer a 16UC1/32FC1 sparse depth Image; a bad one is buffered, counted and raised."""
        self._add(key, sparse_depth_reading(msg, self.config.sparse_depth_scale))

    def add_points(self, key, msg):
        """Buffer a LiDAR PointCloud2 (own frame); a bad one is buffered, counted and raised."""
        self._add(key, points_reading(msg))

    def _add(self, key, reading):
        """Buffer a reading under its stamp; count, log and raise its error if it has one."""
        self._stream(key).readings.add(reading.stamp_ns, reading)
        if reading.error is not None:
            reading.error.key = key
            self._report(reading.error)
            raise reading.error

    # ------------------------------------------------------------------ estimate

    def estimate(self, key, header, relative_depth, camera=None):
        """
        Return the metric scale of a depth frame, or None to stay relative.

        The buffered sparse input closest to the frame stamp (within ``match_tolerance_s``)
        is paired with the relative depth and fed to the stream's tracker; without usable
        input the previous estimate is returned while younger than ``max_stale_s`` (status
        ``stale``, ``reason`` saying why). :meth:`last_estimate` keeps the outcome,
        unusable ones included, for diagnostics.

        :param key: stream key (camera namespace), as given to ``add_*`` / :meth:`attach`
        :param header: std_msgs/Header of the frame (stamp; frame_id = optical frame)
        :param camera: :class:`~marigold_ros.geometry.CameraModel` of the image (any
            resolution with the image's field of view; needed for LiDAR points) or None
        :return: :class:`ScaleEstimate` (``ok`` or ``stale``; a
            :class:`RefinedScaleEstimate` with ``local_refinement``) or None
        :raises ValueError: relative depth not 2-D
        """
        if self.config.source == 'none':
            return None
        rel = np.asarray(relative_depth)
        if rel.ndim != 2 or rel.size == 0:
            raise ValueError(f'relative depth must be a non-empty H x W array, got shape '
                             f'{rel.shape}')
        stamp_s = stamp_to_ns(header.stamp) / NS_PER_S
        stream, reading = self._match(key, header)
        fused_already = reading is not None and reading is stream.fused and \
            self.config.smoothing < 1.0
        if reading is None:
            result = self._hold(stream, stamp_s, REASON_NO_SPARSE_INPUT)
        elif reading.error is not None:
            result = self._hold(stream, stamp_s, reading.error.reason)
        elif fused_already and not self.config.local_refinement:
            # A sensor slower than the camera, with smoothing: its reading already updated
            # the tracker, and fusing it again would weigh it once per camera frame (the
            # smoothing would then depend on the frame rates).  Without smoothing the
            # reading is fitted again against this frame's own relative depth (below).
            result = self._current(stream, stamp_s)
        else:
            try:
                uv, metric = self._pairs(reading, header, rel.shape, camera)
            except ScaleInputError as error:
                error.key = key
                self._report(error)
                result = self._hold(stream, stamp_s, error.reason)
            else:
                if fused_already:
                    result = self._current(stream, stamp_s)  # pairs for the refinement only
                else:
                    result = stream.tracker.update(rel[uv[:, 1], uv[:, 0]], metric, stamp_s)
                    stream.fused = reading
                if self.config.local_refinement and result.status == STATUS_OK:
                    result = RefinedScaleEstimate(
                        **{f.name: getattr(result, f.name) for f in fields(ScaleEstimate)},
                        sparse_uv=uv, sparse_metric=metric, grid_shape=rel.shape)
        stream.last = result
        return result if result.usable else None

    def sparse_points(self, key, header, shape, camera=None):
        """
        Return the sparse metric points of a frame, paired exactly as :meth:`estimate` pairs.

        For sparse guidance, which needs the points before inference: the buffered reading
        matched to the frame stamp, mapped (sparse depth) or projected (LiDAR: tf2 or the
        extrinsic parameters, and ``camera``) into a grid of ``shape``.  Nothing is counted
        or logged here: a frame without points falls back to :meth:`estimate`, which does.

        :param key: stream key, as for :meth:`estimate`
        :param header: std_msgs/Header of the frame (stamp; frame_id = optical frame)
        :param shape: (height, width) of the grid, e.g. the image's
        :param camera: :class:`~marigold_ros.geometry.CameraModel` of the image (LiDAR only)
        :return: (uv int64 (N, 2) column/row in the grid, metric float64 (N,) meters)
        :raises ScaleInputError: no source, no reading within ``match_tolerance_s``
            (``no_sparse_input``), a bad reading (its reason) or one that cannot be paired
        """
        if self.config.source == 'none':
            raise ScaleInputError('source_none', 'scale_recovery.source is none', key)
        _, reading = self._match(key, header)
        if reading is None:
            raise ScaleInputError(REASON_NO_SPARSE_INPUT, 'no sparse input within '
                                  'match_tolerance_s of the frame stamp', key)
        if reading.error is not None:
            raise reading.error
        return self._pairs(reading, header, tuple(shape[:2]), camera)

    def guided_estimate(self, key, header, result):
        """
        Record the scale of a frame made by sparse guidance, for diagnostics, and return it.

        The tracker is left alone: guidance fits each frame on its own.

        :param result: :class:`~marigold_model.guidance.GuidedResult` of the frame
        :return: its :class:`ScaleEstimate` (status ``ok``, reason ``'guided'``)
        """
        estimate = replace(result.scale_estimate(stamp_to_ns(header.stamp) / NS_PER_S),
                           reason=REASON_GUIDED)
        stream = self._stream(key)
        with self._lock:
            stream.last = estimate
            stream.global_fit = result.global_fit
        return estimate

    def guidance_failed(self, key, error):
        """
        Count and log (a throttled warning) why a frame fell back from guidance.

        :param error: the :class:`~marigold_model.guidance.GuidanceError`
        """
        self._report(ScaleInputError(GUIDANCE_REASON_PREFIX + error.reason, str(error), key),
                     'sparse guidance not used for this frame: the global fit is used')

    def _match(self, key, header):
        """Return the stream of ``key`` and its reading matched to the frame stamp (or None)."""
        stream = self._stream(key)
        return stream, stream.readings.match(stamp_to_ns(header.stamp))

    def _current(self, stream, stamp_s):
        """Return the tracker's estimate without a new fit, or unusable with the last reason."""
        return stream.tracker.current(stamp_s) or self._hold(
            stream, stamp_s, getattr(stream.last, 'reason', None) or REASON_NO_SPARSE_INPUT)

    def _hold(self, stream, stamp_s, reason):
        """Previous estimate without a new fit: stale with ``reason``, or unusable."""
        held = stream.tracker.current(stamp_s)
        if held is None:
            return ScaleEstimate(scale=math.nan, shift=math.nan, inlier_ratio=0.0,
                                 residual=math.nan, n_points=0, age_s=math.inf,
                                 status=STATUS_NO_ESTIMATE, reason=reason)
        if reason == REASON_NO_SPARSE_INPUT and held.status == STATUS_OK:
            return held  # sparse input is often slower than the camera: fresh enough
        return replace(held, status=STATUS_STALE, reason=reason)

    def _pairs(self, reading, header, shape, camera):
        """
        Pixels of a grid of ``shape`` (the relative depth's, or the image's) with a reading.

        :return: (uv int64 (N, 2) column/row, metric float64 (N,))
        :raises ScaleInputError: the reading cannot be paired
        """
        height, width = shape
        if reading.kind == 'sparse_depth':
            s_height, s_width = reading.data.shape
            ratio = (s_width / s_height) / (width / height)
            if abs(ratio - 1.0) > _ASPECT_TOLERANCE:
                raise ScaleInputError(
                    REASON_SPARSE_SIZE_MISMATCH, f'sparse depth is {s_width}x{s_height} but '
                    f'the depth is {width}x{height}: a different aspect ratio, so it is not '
                    'registered to the camera')
            return sparse_pixels(reading.data, shape)
        return self._point_pairs(reading, header, shape, camera)

    def _point_pairs(self, reading, header, shape, camera):
        """Transform, project and pair LiDAR points (see :meth:`_pairs`)."""
        height, width = shape
        if camera is None:
            raise ScaleInputError(REASON_NO_CAMERA_INFO, 'LiDAR points need the camera '
                                  'intrinsics: no camera_info for this frame')
        target = str(header.frame_id) or camera.frame_id
        if self._lookup is not None:
            translation, rotation = self._lookup(target, reading.frame_id, reading.stamp_ns,
                                                 stamp_to_ns(header.stamp))
        else:
            translation = self.config.extrinsic_translation
            rotation = self.config.extrinsic_rotation_xyzw
            if (translation, rotation) == IDENTITY_EXTRINSIC and reading.frame_id and target and \
                    reading.frame_id != target:
                # The default is no calibration: a LiDAR frame (x forward, z up) taken as the
                # optical frame (z forward) would pair points with the wrong pixels.
                raise ScaleInputError(
                    REASON_NO_TRANSFORM, f'no transform from the cloud frame '
                    f'{reading.frame_id!r} to the camera frame {target!r}: tf2 is '
                    f'{"off (use_tf false)" if not self.config.use_tf else "not available"} '
                    'and the extrinsic parameters are the identity default; set '
                    'extrinsic_translation / extrinsic_rotation_xyzw')
        rot = quaternion_to_matrix(rotation)
        points = reading.data.astype(np.float64) @ rot.T + np.asarray(translation, np.float64)
        total = points.shape[0]
        # A spinning LiDAR has most points beside or behind the camera: drop those before
        # the (distortion) projection, which costs more than this test.
        points = points[points[:, 2] > MIN_DEPTH]
        if points.shape[0] == 0:
            raise ScaleInputError(
                REASON_POINTS_BEHIND, f'all {total} points of {reading.frame_id!r} are '
                f'behind the camera {target!r}: check the extrinsic / tf')
        try:
            model = scale_camera(camera, width, height)
        except CalibrationError as error:
            raise ScaleInputError(f'camera_{error.reason}', str(error)) from None
        uv, z, inside = project_points(points, model)
        if not np.any(inside):
            raise ScaleInputError(
                REASON_POINTS_OUTSIDE, f'none of the {total} points of {reading.frame_id!r} '
                f'projects into the {width}x{height} image: check the extrinsic / tf')
        pixels = np.rint(uv[inside]).astype(np.int64)
        return pixels, z[inside]

    # ------------------------------------------------------------------ ROS

    def attach(self, node, camera_ns='', qos=10, key=None):
        """
        Subscribe to the sparse input of one camera on a node (once per camera).

        Creates ``<camera_ns>/sparse_depth`` (Image) or ``<camera_ns>/points_in``
        (PointCloud2) according to ``source`` (nothing for ``'none'``), and for points the tf2
        listener when ``use_tf`` and ``tf2_ros`` is importable (else the extrinsic parameters
        are used). Bad messages are logged with the node's logger, at most once per reason
        per ``error_throttle_s``.

        :param camera_ns: camera namespace ('' = the node's namespace); relative topic
        :param key: stream key for this camera (default ``camera_ns``); the pipeline must
            pass the same key to :meth:`estimate`
        """
        key = camera_ns if key is None else key
        self._logger = node.get_logger()
        source = self.config.source
        if source == 'none':
            return []
        if source == 'points' and self._transform_source != 'custom':
            self._lookup = self._inputs.tf2_lookup(node)
            self._transform_source = 'parameters' if self._lookup is None else 'tf2'
        add = self.add_sparse_depth if source == 'sparse_depth' else self.add_points
        return [self._inputs.subscribe(node, camera_ns, lambda msg: add(key, msg), qos)]

    def detach(self):
        """Destroy the subscriptions and tf listener made by :meth:`attach` (node still up)."""
        self._inputs.close()
        self._logger = None
