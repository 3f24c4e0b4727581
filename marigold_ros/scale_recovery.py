"""
Metric scale recovery for the node: sparse depth images or LiDAR clouds -> ScaleEstimate.

The ROS side of issue 6; the fitting maths (robust fit, temporal tracking, local refinement)
lives in :mod:`marigold_model.scale_tracking` without ROS. Here:

* :class:`ScaleRecoveryConfig`: the settings (exposed as ROS parameters by the node), with
  the tracker's defaults taken from :class:`ScaleTrackerConfig` (one source of defaults).
* :class:`ScaleRecovery`: the pipeline's scale source. :meth:`~ScaleRecovery.add_sparse_depth`
  and :meth:`~ScaleRecovery.add_points` convert and buffer the sparse input (subscription
  callbacks, or the bag processor), :meth:`~ScaleRecovery.estimate` matches the buffered
  input to a depth frame by stamp, pairs it with the relative depth, updates one
  :class:`ScaleTracker` per stream and returns the estimate (None: stay relative), and
  :meth:`~ScaleRecovery.attach` subscribes on a node.
* :func:`apply_scale`: metric depth and metric uncertainty from an estimate (with the opt-in
  local refinement), :func:`status_fields` for diagnostics.

Every input problem has a short ``reason`` (a diagnostics counter key) and a message naming
it; a bad input never produces a scale: the previous estimate is kept, marked ``stale`` with
that reason, until it is older than ``max_stale_s``, and the depth then stays relative.
"""

from dataclasses import dataclass, fields, replace
import inspect
import math
import threading

from marigold_model.scale_tracking import refine_local, ScaleEstimate, ScaleTracker
from marigold_model.scale_tracking import ScaleTrackerConfig, sparse_pixels, STATUS_NO_ESTIMATE
from marigold_model.scale_tracking import STATUS_OK, STATUS_STALE
import numpy as np
from rclpy.time import Time
from sensor_msgs.msg import Image
from sensor_msgs.msg import PointCloud2

from .conversions import image_to_depth, ImageConversionError, PointCloudConversionError
from .conversions import pointcloud2_to_xyz
from .diagnostics import KeyedThrottle
from .geometry import CalibrationError, MIN_DEPTH, project_points, quaternion_to_matrix
from .geometry import scale_camera
from .stamp_matcher import stamp_to_ns, StampMatcher

#: Values of :attr:`ScaleRecoveryConfig.source`.
SOURCES = ('none', 'sparse_depth', 'points')

#: Topic names (relative to the camera namespace) of the sparse inputs.
TOPICS = {'sparse_depth': 'sparse_depth', 'points': 'points_in'}

# Reasons (diagnostics counter keys). Conversion errors keep the converter's reason behind a
# prefix ('sparse_depth_unknown_encoding', 'points_missing_field', ...).
REASON_NO_SPARSE_INPUT = 'no_sparse_input'
REASON_SPARSE_NO_READINGS = 'sparse_depth_no_readings'
REASON_SPARSE_SIZE_MISMATCH = 'sparse_depth_size_mismatch'
REASON_POINTS_EMPTY = 'points_empty'
REASON_POINTS_BEHIND = 'points_behind_camera'
REASON_POINTS_OUTSIDE = 'points_outside_image'
REASON_NO_CAMERA_INFO = 'no_camera_info'
REASON_NO_TRANSFORM = 'no_transform'
REASON_STALE_TRANSFORM = 'stale_transform'

_NS_PER_S = 1e9
# A sparse depth image registered to the camera covers the same field of view, so its aspect
# ratio matches; 5 % leaves room for rounding in odd downscaled sizes (e.g. 1 px of 41)
# while catching a 16:9 / 4:3 / 16:10 mix-up (>= 17 %), i.e. a sensor not registered at all.
_ASPECT_TOLERANCE = 0.05
# image_to_depth converts 16UC1 with this factor; other factors are applied on top.
_CONVERTER_MM = 0.001

#: Fields whose change needs a new ScaleRecovery (they shape subscriptions and tf setup).
RESTART_FIELDS = ('source', 'use_tf')

#: The extrinsic parameters' default: no calibration given (never used between two frames).
IDENTITY_EXTRINSIC = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))
_TRACKER = ScaleTrackerConfig()
_TRACKER_FIELDS = tuple(f.name for f in fields(ScaleTrackerConfig))


class ScaleInputError(ValueError):
    """
    Sparse input that cannot give a scale (bad message, no transform, no point in view...).

    :param reason: short machine-readable key, used as a diagnostics counter
    :param message: human-readable description naming the problem
    :param key: stream (camera namespace) the input belongs to
    """

    def __init__(self, reason, message, key=''):
        """Store the reason, message and stream key."""
        super().__init__(message)
        self.reason = reason
        self.key = key


@dataclass(frozen=True)
class ScaleRecoveryConfig:
    """
    Settings of :class:`ScaleRecovery` (the node exposes every field as a ROS parameter).

    The tracker settings (``min_points`` to ``seed``) are those of
    :class:`~marigold_model.scale_tracking.ScaleTrackerConfig`, whose defaults they reuse
    (a test checks the mapping); see its documentation, e.g. with
    ``params.field_descriptions(ScaleTrackerConfig)``. ``max_stale_s`` is how long an
    estimate is used without a new accepted fit (sparse input missing or rejected) before
    the depth goes back to relative. Changing a field of :data:`RESTART_FIELDS` needs a new
    :class:`ScaleRecovery` (subscriptions and tf listener); the others can be changed at
    runtime with :meth:`ScaleRecovery.reconfigure`.

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
        sparse points of the frame (:func:`~marigold_model.scale_tracking.refine_local`)
    :param error_throttle_s: at most one log line per problem (reason) per this period
    """

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
    error_throttle_s: float = 5.0
    min_points: int = _TRACKER.min_points
    inlier_threshold_rel: float = _TRACKER.inlier_threshold_rel
    min_inlier_ratio: float = _TRACKER.min_inlier_ratio
    min_rel_span: float = _TRACKER.min_rel_span
    ransac_iterations: int = _TRACKER.ransac_iterations
    smoothing: float = _TRACKER.smoothing
    anchors: tuple = _TRACKER.anchors
    gate_factor: float = _TRACKER.gate_factor
    reinit_after: int = _TRACKER.reinit_after
    stale_after_s: float = _TRACKER.stale_after_s
    max_stale_s: float = _TRACKER.max_stale_s
    seed: int = _TRACKER.seed

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
        self.tracker_config()  # validates the tracker settings

    def tracker_config(self):
        """
        Return the tracker settings as a :class:`ScaleTrackerConfig`.

        :return: ScaleTrackerConfig
        :raises ValueError: a tracker setting is out of range
        """
        return ScaleTrackerConfig(**{name: getattr(self, name) for name in _TRACKER_FIELDS})


@dataclass(frozen=True, eq=False)
class RefinedScaleEstimate(ScaleEstimate):
    """
    A fresh :class:`ScaleEstimate` that also carries the sparse points it was fitted on.

    :meth:`apply` first applies scale and shift, then corrects the result locally towards
    the points (:func:`~marigold_model.scale_tracking.refine_local`). Only produced when
    ``local_refinement`` is on and the frame had its own accepted fit (never for a stale
    estimate: old points do not describe a new frame).

    :param sparse_uv: (N, 2) pixel (column, row) of the points in the relative depth grid
    :param sparse_metric: (N,) metric depth of the points
    :param grid_shape: (height, width) of that grid
    """

    sparse_uv: np.ndarray = None
    sparse_metric: np.ndarray = None
    grid_shape: tuple = None

    def refine(self, metric_depth):
        """
        Correct a globally aligned metric depth locally towards the sparse points.

        :param metric_depth: globally aligned depth (``scale * rel + shift``), H x W
        :return: float32 refined depth (NaN kept)
        :raises ValueError: the depth is not on the grid the points were taken on
        """
        depth = np.asarray(metric_depth)
        if tuple(depth.shape) != tuple(self.grid_shape):
            raise ValueError(f'local refinement points were taken on a {self.grid_shape} grid, '
                             f'the depth is {depth.shape}')
        return refine_local(depth, self.sparse_uv, self.sparse_metric)

    def apply(self, rel_depth):
        """
        Convert relative depth to metric depth, then refine locally (as :func:`apply_scale`).

        :param rel_depth: relative depth, H x W (the grid of the sparse points)
        :return: float32 metric depth, NaN where invalid (REP 118)
        """
        return apply_scale(self, rel_depth)[0]


def apply_scale(estimate, relative_depth, uncertainty=None, max_depth=0.0):
    """
    Turn relative depth (and its uncertainty) into meters with an estimate.

    Metric depth is ``scale * rel + shift``, locally refined when the estimate is a
    :class:`RefinedScaleEstimate`; depths that are not positive, or beyond ``max_depth``,
    become NaN (REP 118). The uncertainty, a spread of relative depth, becomes ``scale *
    uncertainty`` meters (the shift cancels in a spread), times the local correction factor
    when refined, NaN where the depth is NaN. float32 throughout (the pipeline's hot path).

    :param estimate: a usable :class:`ScaleEstimate` (fixed, tracked or refined)
    :param relative_depth: H x W relative depth
    :param uncertainty: H x W relative uncertainty, or None
    :param max_depth: meters; farther depths become NaN (0: no limit)
    :return: (float32 metric depth, float32 metric uncertainty or None)
    :raises ValueError: no usable estimate, or shapes that differ
    """
    if estimate is None or not estimate.usable:
        raise ValueError('no usable metric scale: stay relative (status '
                         f'{getattr(estimate, "status", None)!r})')
    rel = np.asarray(relative_depth)
    if rel.ndim != 2:
        raise ValueError(f'relative depth must be H x W, got shape {rel.shape}')
    metric = rel.astype(np.float32) * np.float32(estimate.scale) + np.float32(estimate.shift)
    with np.errstate(invalid='ignore'):
        metric[~(metric > 0)] = np.nan
    refined = isinstance(estimate, RefinedScaleEstimate) and estimate.sparse_uv is not None
    global_depth = metric
    if refined:
        metric = estimate.refine(global_depth)
    if max_depth > 0:
        with np.errstate(invalid='ignore'):
            metric[metric > max_depth] = np.nan
    if uncertainty is None:
        return metric, None
    unc = np.asarray(uncertainty)
    if unc.shape != rel.shape:
        raise ValueError(f'uncertainty shape {unc.shape} differs from the depth {rel.shape}')
    metric_unc = unc.astype(np.float32) * np.float32(estimate.scale)
    if refined:
        with np.errstate(invalid='ignore', divide='ignore'):
            metric_unc *= metric / global_depth
    metric_unc[np.isnan(metric)] = np.nan
    return metric, metric_unc


def _number(value, digits=4):
    """Format a float for a diagnostics value."""
    return f'{value:.{digits}g}'


def status_fields(estimate, reason=None):
    """
    Diagnostics key/value pairs of a scale estimate (strings, for diagnostic_msgs/KeyValue).

    :param estimate: :class:`ScaleEstimate` or None (no estimate)
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


def _join_topic(namespace, name):
    """Join a camera namespace and a topic name ('' namespace: the relative name)."""
    namespace = str(namespace or '').rstrip('/')
    return f'{namespace}/{name}' if namespace else name


def _is_extrapolation(error):
    """Whether an exception is tf2's ExtrapolationException (by name: tf2 is optional)."""
    return any(cls.__name__ == 'ExtrapolationException' for cls in type(error).__mro__)


def _with_image_stamp(lookup):
    """
    Return a transform lookup that takes the image stamp, adapting one that does not.

    Lookups written for the first interface take (target, source, cloud stamp) only; the
    signature is read once here, not on every frame.

    :param lookup: callable or None
    :return: callable ``(target, source, stamp_ns, image_stamp_ns)``, or None
    """
    if lookup is None:
        return None
    try:
        parameters = inspect.signature(lookup).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): the full interface
        return lookup
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 4 or any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return lookup
    return lambda target, source, stamp_ns, image_stamp_ns: lookup(target, source, stamp_ns)


class Tf2TransformLookup:
    """
    Extrinsic of a cloud from a tf2 Buffer, with a time tolerance.

    The transform is looked up at the cloud stamp (tf2 interpolates); with a
    ``fixed_frame``, from the cloud at its stamp to the camera at the image stamp through
    that frame, which takes out the robot's motion in between. If tf2 cannot reach the
    stamps (``ExtrapolationException``: the tf data ends before or starts after them), the
    newest transform is used when its stamp is within ``tolerance_s`` of the cloud stamp,
    else the lookup fails with ``stale_transform``; any other failure (unknown frame, no
    connection) is ``no_transform``.

    :param buffer: a ``tf2_ros.Buffer`` (or anything with the same ``lookup_transform`` and
        ``lookup_transform_full``)
    :param tolerance_s: largest accepted gap between the newest transform and the cloud
    :param fixed_frame: world-fixed frame for motion compensation, '' for none
    """

    def __init__(self, buffer, tolerance_s, fixed_frame=''):
        """Keep the buffer, the tolerance and the fixed frame."""
        self.buffer = buffer
        self.tolerance_s = float(tolerance_s)
        self.fixed_frame = fixed_frame

    def __call__(self, target_frame, source_frame, stamp_ns, image_stamp_ns=None):
        """
        Return the transform mapping points of ``source_frame`` into ``target_frame``.

        :param target_frame: camera optical frame
        :param source_frame: cloud frame
        :param stamp_ns: cloud stamp in nanoseconds
        :param image_stamp_ns: image stamp in nanoseconds (used with a fixed frame)
        :return: (translation (3,), quaternion xyzw (4,))
        :raises ScaleInputError: ``no_transform`` or ``stale_transform``
        """
        if not target_frame or not source_frame:
            raise ScaleInputError(REASON_NO_TRANSFORM, 'cannot look up a transform with an '
                                  f'empty frame_id (camera {target_frame!r}, cloud '
                                  f'{source_frame!r})')
        cloud_time = Time(nanoseconds=int(stamp_ns))
        moving = bool(self.fixed_frame) and image_stamp_ns is not None
        try:
            if moving:
                stamped = self.buffer.lookup_transform_full(
                    target_frame, Time(nanoseconds=int(image_stamp_ns)), source_frame,
                    cloud_time, self.fixed_frame)
            else:
                stamped = self.buffer.lookup_transform(target_frame, source_frame, cloud_time)
        except Exception as error:  # tf2 exceptions do not share a base importable here
            if not _is_extrapolation(error):
                raise ScaleInputError(REASON_NO_TRANSFORM, f'no transform from '
                                      f'{source_frame!r} to {target_frame!r}: {error}') from None
            if moving:  # odometry a little behind the image: its newest pose, if close
                stamped = self._latest_full(target_frame, source_frame, cloud_time,
                                            image_stamp_ns, error)
            else:
                stamped = self._latest(target_frame, source_frame, stamp_ns, error)
        tf = stamped.transform
        return ((tf.translation.x, tf.translation.y, tf.translation.z),
                (tf.rotation.x, tf.rotation.y, tf.rotation.z, tf.rotation.w))

    def _latest(self, target_frame, source_frame, stamp_ns, cause):
        """Newest transform, if within the tolerance of the cloud stamp."""
        try:
            stamped = self.buffer.lookup_transform(target_frame, source_frame, Time())
        except Exception as error:  # as above
            raise ScaleInputError(REASON_NO_TRANSFORM, f'no transform from {source_frame!r} '
                                  f'to {target_frame!r}: {error}') from None
        return self._check_gap(stamped, stamp_ns, 'cloud', source_frame, target_frame, cause)

    def _latest_full(self, target_frame, source_frame, cloud_time, image_stamp_ns, cause):
        """Return the camera at the newest fixed-frame pose, if close enough to the image."""
        try:
            stamped = self.buffer.lookup_transform_full(target_frame, Time(), source_frame,
                                                        cloud_time, self.fixed_frame)
        except Exception as error:  # as above
            reason = REASON_STALE_TRANSFORM if _is_extrapolation(error) else REASON_NO_TRANSFORM
            raise ScaleInputError(reason, f'no transform from {source_frame!r} at the cloud '
                                  f'stamp to {target_frame!r} through {self.fixed_frame!r}: '
                                  f'{cause}; newest: {error}') from None
        return self._check_gap(stamped, image_stamp_ns, 'image', source_frame, target_frame,
                               cause)

    def _check_gap(self, stamped, stamp_ns, what, source_frame, target_frame, cause):
        """Refuse a transform further than the tolerance from a stamp (0: a static chain)."""
        found_ns = stamp_to_ns(stamped.header.stamp)
        gap_s = abs(found_ns - int(stamp_ns)) / _NS_PER_S
        if found_ns and gap_s > self.tolerance_s:
            raise ScaleInputError(REASON_STALE_TRANSFORM, f'transform {source_frame!r} -> '
                                  f'{target_frame!r} is {gap_s:.3f} s away from the {what} '
                                  f'stamp (tolerance {self.tolerance_s} s): {cause}')
        return stamped


@dataclass(frozen=True)
class _Reading:
    """A buffered sparse input: converted data, or the error it gave."""

    kind: str  # 'sparse_depth' or 'points'
    stamp_ns: int
    frame_id: str
    data: np.ndarray = None  # H x W meters (sparse depth) or (N, 3) finite points
    error: ScaleInputError = None


class _Stream:
    """Per-stream state: tracker, buffered input, latest outcome and input problems."""

    def __init__(self, config):
        """Create an empty stream."""
        self.tracker = ScaleTracker(config.tracker_config())
        self.readings = StampMatcher(config.match_tolerance_s, config.queue_size)
        self.last = None  # latest ScaleEstimate (also unusable ones: they carry the reason)
        self.fused = None  # the reading that last updated the tracker
        self.errors = {}  # reason -> count
        self.last_error = None


class ScaleRecovery:
    """
    Scale source of the pipeline: metric scale per stream from sparse depth or LiDAR.

    Thread-safe: subscription callbacks add input while the worker thread estimates.

    :param config: :class:`ScaleRecoveryConfig`
    :param transform_lookup: optional callable ``(target_frame, source_frame, stamp_ns,
        image_stamp_ns) -> (translation, quaternion_xyzw)`` (or without ``image_stamp_ns``)
        raising :class:`ScaleInputError` (e.g. a :class:`Tf2TransformLookup` on a Buffer the
        caller fills); default: set by :meth:`attach` to tf2 when available and ``use_tf``,
        else the extrinsic parameters
    """

    def __init__(self, config=None, transform_lookup=None):
        """Create the scale source (no ROS node needed until :meth:`attach`)."""
        self.config = config if config is not None else ScaleRecoveryConfig()
        self._lookup = _with_image_stamp(transform_lookup)
        self._transform_source = 'custom' if transform_lookup is not None else 'parameters'
        self._streams = {}
        self._errors = {}
        self._last_error = None
        self._lock = threading.Lock()
        self._logger = None
        self._throttle = KeyedThrottle(self.config.error_throttle_s)
        self._subscriptions = []
        self._node = None
        self._tf_listener = None
        self._tf_ready = False

    # ------------------------------------------------------------------ state

    @property
    def errors(self):
        """
        Count of input problems by reason since start, all streams (a copy).

        :return: dict reason -> count
        """
        with self._lock:
            return dict(self._errors)

    @property
    def last_error(self):
        """
        Return the latest input problem of any stream, or None.

        :return: :class:`ScaleInputError` (``.reason``, ``.key``, ``str()``) or None
        """
        with self._lock:
            return self._last_error

    @property
    def transform_source(self):
        """
        Where LiDAR extrinsics come from.

        :return: ``'tf2'``, ``'parameters'`` or ``'custom'``
        """
        return self._transform_source

    def last_estimate(self, key=''):
        """
        Return the latest outcome of :meth:`estimate` for a stream (unusable ones included).

        :param key: stream key
        :return: :class:`ScaleEstimate` (its ``reason`` says why when not ``ok``) or None
        """
        with self._lock:
            stream = self._streams.get(key)
        return None if stream is None else stream.last

    def diagnostic_fields(self, key=''):
        """
        Diagnostics of one stream: the estimate's fields plus source and input problems.

        :param key: stream key
        :return: list of (key, value) string pairs (see :func:`status_fields`), then
            ``scale_source``, ``scale_transform`` (points only), ``scale_input_errors``
            (``reason=count, ...`` of this stream) and ``scale_last_error``
        """
        with self._lock:
            stream = self._streams.get(key)
            last = stream.last if stream else None
            errors = dict(stream.errors) if stream else {}
            last_error = stream.last_error if stream else None
        reason = REASON_NO_SPARSE_INPUT if self.config.source != 'none' else 'source_none'
        out = status_fields(last, reason=reason)
        out.append(('scale_source', self.config.source))
        if self.config.source == 'points':
            out.append(('scale_transform', self._transform_source))
        out.append(('scale_input_errors',
                    ', '.join(f'{k}={v}' for k, v in sorted(errors.items())) or 'none'))
        out.append(('scale_last_error',
                    f'{last_error.reason}: {last_error}' if last_error else ''))
        return out

    def reconfigure(self, config):
        """
        Take new settings at runtime (e.g. from a parameter change).

        Streams whose tracker settings changed start a new estimate; a new match tolerance
        or queue size drops the buffered input.

        :param config: new :class:`ScaleRecoveryConfig`
        :raises ValueError: a field of :data:`RESTART_FIELDS` changed (needs a new
            ScaleRecovery)
        """
        old = self.config
        for name in RESTART_FIELDS:
            if getattr(config, name) != getattr(old, name):
                raise ValueError(f'{name} cannot change at runtime ({getattr(old, name)!r} -> '
                                 f'{getattr(config, name)!r}): restart the node')
        with self._lock:
            self.config = config
            self._throttle.period_s = config.error_throttle_s
            if isinstance(self._lookup, Tf2TransformLookup):
                self._lookup.tolerance_s = config.transform_tolerance_s
                self._lookup.fixed_frame = config.fixed_frame
            if config.tracker_config() != old.tracker_config():
                for stream in self._streams.values():
                    stream.tracker = ScaleTracker(config.tracker_config())
                    stream.last = None
                    stream.fused = None  # the new tracker has fused nothing yet
            if (config.match_tolerance_s, config.queue_size) != \
                    (old.match_tolerance_s, old.queue_size):
                for stream in self._streams.values():
                    stream.readings = StampMatcher(config.match_tolerance_s, config.queue_size)

    def reset(self, key=None):
        """
        Forget the estimate, buffered input and counts of one stream (None: all streams).

        :param key: stream key or None
        """
        with self._lock:
            keys = list(self._streams) if key is None else [key]
            for k in keys:
                self._streams.pop(k, None)

    def _stream(self, key):
        """Return the state of a stream, created on first use."""
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = _Stream(self.config)
            return stream

    def _report(self, error):
        """Count an input problem, remember it and log it (throttled per stream and reason)."""
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
        allowed, suppressed = self._throttle.allow((error.key, error.reason))
        if allowed:
            where = f' [{error.key}]' if error.key else ''
            more = f' ({suppressed} more since the last report)' if suppressed else ''
            logger.error(f'scale recovery{where}: {error.reason}: {error}{more}; the depth '
                         'stays relative when no valid scale is left')

    # ------------------------------------------------------------------ input

    def add_sparse_depth(self, key, msg):
        """
        Convert and buffer a sparse depth Image (16UC1 or 32FC1, any resolution).

        A bad message is buffered as such too, so a depth frame matched to it reports why.

        :param key: stream key (camera namespace)
        :param msg: sensor_msgs/Image aligned to the camera
        :raises ScaleInputError: ``sparse_depth_<conversion reason>`` (e.g.
            ``sparse_depth_unknown_encoding``, ``sparse_depth_truncated``) or
            ``sparse_depth_no_readings`` (all zero, NaN, inf or negative); counted
        """
        stamp_ns = stamp_to_ns(msg.header.stamp)
        frame_id = str(msg.header.frame_id)
        try:
            depth = self._convert_sparse_depth(msg)
        except ScaleInputError as error:
            error.key = key
            self._store(key, _Reading('sparse_depth', stamp_ns, frame_id, error=error))
            self._report(error)
            raise
        self._store(key, _Reading('sparse_depth', stamp_ns, frame_id, data=depth))

    def add_points(self, key, msg):
        """
        Convert and buffer a LiDAR PointCloud2 (x, y, z FLOAT32 or FLOAT64, its own frame).

        :param key: stream key (camera namespace)
        :param msg: sensor_msgs/PointCloud2
        :raises ScaleInputError: ``points_<conversion reason>`` (``points_missing_field``,
            ``points_unsupported_datatype``, ``points_bad_layout``, ``points_truncated``) or
            ``points_empty`` (no finite point); counted
        """
        stamp_ns = stamp_to_ns(msg.header.stamp)
        frame_id = str(msg.header.frame_id)
        try:
            try:
                # FLOAT64 stays float64: clouds in map / UTM frames need it.
                xyz = pointcloud2_to_xyz(msg, skip_nans=True, dtype=None)
            except PointCloudConversionError as error:
                raise ScaleInputError(f'points_{error.reason}', str(error), key) from None
            if xyz.shape[0] == 0:
                raise ScaleInputError(REASON_POINTS_EMPTY, f'PointCloud2 in {frame_id!r} has '
                                      f'no finite point ({msg.width}x{msg.height})', key)
        except ScaleInputError as error:
            self._store(key, _Reading('points', stamp_ns, frame_id, error=error))
            self._report(error)
            raise
        self._store(key, _Reading('points', stamp_ns, frame_id, data=xyz))

    def _store(self, key, reading):
        """Buffer a reading under its stamp."""
        self._stream(key).readings.add(reading.stamp_ns, reading)

    def _convert_sparse_depth(self, msg):
        """Sparse depth Image -> float32 meters with at least one reading."""
        try:
            depth = image_to_depth(msg)
        except ImageConversionError as error:
            raise ScaleInputError(f'sparse_depth_{error.reason}', f'sparse depth: {error}')
        if str(msg.encoding).strip().upper() == '16UC1' and \
                self.config.sparse_depth_scale != _CONVERTER_MM:
            depth *= np.float32(self.config.sparse_depth_scale / _CONVERTER_MM)
        with np.errstate(invalid='ignore'):
            if not np.any(np.isfinite(depth) & (depth > 0)):
                empty = int((np.isnan(depth) | (depth == 0)).sum())
                n_inf = int(np.isinf(depth).sum())
                raise ScaleInputError(
                    REASON_SPARSE_NO_READINGS, f'sparse depth {msg.width}x{msg.height} '
                    f'{msg.encoding} has no valid reading: {empty} pixels 0 or NaN (no '
                    f'reading), {n_inf} inf, {depth.size - empty - n_inf} negative')
        return depth

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
        :param relative_depth: H x W float relative depth
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
        stamp_ns = stamp_to_ns(header.stamp)
        stamp_s = stamp_ns / _NS_PER_S
        stream = self._stream(key)
        reading = stream.readings.match(stamp_ns)
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
                uv, metric = self._pairs(reading, header, rel, camera)
            except ScaleInputError as error:
                error.key = key
                self._report(error)
                result = self._hold(stream, stamp_s, error.reason)
            else:
                if fused_already:
                    result = self._current(stream, stamp_s)  # pairs for the refinement only
                else:
                    samples = rel[uv[:, 1], uv[:, 0]]
                    tracker = stream.tracker
                    result = tracker.update(samples, metric, stamp_s)
                    with self._lock:
                        # reconfigure() may have replaced the tracker meanwhile: the new
                        # one has not fused this reading.
                        if stream.tracker is tracker:
                            stream.fused = reading
                if self.config.local_refinement and result.status == STATUS_OK:
                    result = RefinedScaleEstimate(
                        **{f.name: getattr(result, f.name) for f in fields(ScaleEstimate)},
                        sparse_uv=uv, sparse_metric=metric, grid_shape=rel.shape)
        stream.last = result
        return result if result.usable else None

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

    def _pairs(self, reading, header, rel, camera):
        """
        Pixels of the relative depth grid with a metric reading.

        :return: (uv int64 (N, 2) column/row, metric float64 (N,))
        :raises ScaleInputError: the reading cannot be paired
        """
        height, width = rel.shape
        if reading.kind == 'sparse_depth':
            s_height, s_width = reading.data.shape
            ratio = (s_width / s_height) / (width / height)
            if abs(ratio - 1.0) > _ASPECT_TOLERANCE:
                raise ScaleInputError(
                    REASON_SPARSE_SIZE_MISMATCH, f'sparse depth is {s_width}x{s_height} but '
                    f'the depth is {width}x{height}: a different aspect ratio, so it is not '
                    'registered to the camera')
            return sparse_pixels(reading.data, rel.shape)
        return self._point_pairs(reading, header, rel.shape, camera)

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
        (PointCloud2) according to ``source`` (nothing for ``'none'``), and for points a
        tf2 Buffer and TransformListener when ``use_tf`` and ``tf2_ros`` is importable
        (else the extrinsic parameters are used, with a warning if ``use_tf`` was asked).
        Bad messages are logged with the node's logger, at most once per reason per
        ``error_throttle_s``.

        :param node: rclpy Node
        :param camera_ns: camera namespace ('' = the node's namespace); relative topic
        :param qos: QoS profile or depth for the subscription
        :param key: stream key for this camera (default ``camera_ns``); the pipeline must
            pass the same key to :meth:`estimate`
        :return: list of the subscriptions created
        """
        key = camera_ns if key is None else key
        source = self.config.source
        self._node = node
        self._logger = node.get_logger()
        if source == 'none':
            return []
        if source == 'points' and self._transform_source != 'custom' and not self._tf_ready:
            self._setup_tf(node)
            self._tf_ready = True
        msg_type = Image if source == 'sparse_depth' else PointCloud2
        add = self.add_sparse_depth if source == 'sparse_depth' else self.add_points

        def callback(msg):
            try:
                add(key, msg)
            except ScaleInputError:
                pass  # counted and logged (throttled) by _report; the frame stays relative

        subscription = node.create_subscription(
            msg_type, _join_topic(camera_ns, TOPICS[source]), callback, qos)
        self._subscriptions.append(subscription)
        return [subscription]

    def _setup_tf(self, node):
        """Use tf2 for extrinsics when asked and available, else the parameters."""
        if not self.config.use_tf:
            self._transform_source = 'parameters'
            return
        try:
            import tf2_ros
        except ImportError:
            self._transform_source = 'parameters'
            node.get_logger().warning(
                'scale recovery: tf2_ros is not importable, using the extrinsic parameters '
                f'(translation {self.config.extrinsic_translation}, rotation xyzw '
                f'{self.config.extrinsic_rotation_xyzw}) for the LiDAR points')
            return
        buffer = tf2_ros.Buffer()
        self._tf_listener = tf2_ros.TransformListener(buffer, node)
        self._lookup = Tf2TransformLookup(buffer, self.config.transform_tolerance_s,
                                          self.config.fixed_frame)
        self._transform_source = 'tf2'

    def detach(self):
        """Destroy the subscriptions and tf listener made by :meth:`attach` (node still up)."""
        node, subscriptions = self._node, self._subscriptions
        self._subscriptions = []
        if node is not None:
            for subscription in subscriptions:
                node.destroy_subscription(subscription)
        if self._tf_listener is not None and hasattr(self._tf_listener, 'unregister'):
            self._tf_listener.unregister()
        self._tf_listener = None
        self._tf_ready = False
        self._logger = None
