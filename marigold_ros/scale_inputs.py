"""
The sparse inputs of scale recovery on ROS: messages to readings, subscriptions and tf2.

Sparse depth images and LiDAR clouds become :class:`Reading` objects (converted data, or the
:class:`ScaleInputError` they gave); :class:`InputSubscriptions` subscribes to them on a node
and starts the tf2 listener behind :class:`Tf2TransformLookup` for the LiDAR extrinsic.
"""

from dataclasses import dataclass

from marigold_model.errors import ReasonError
import numpy as np
from rclpy.time import Time
from sensor_msgs.msg import Image
from sensor_msgs.msg import PointCloud2

from .conversions import image_to_depth, ImageConversionError, PointCloudConversionError
from .conversions import pointcloud2_to_xyz
from .node_params import join_topic
from .stamp_matcher import NS_PER_S, stamp_to_ns

#: Topic names (relative to the camera namespace) of the sparse inputs.
TOPICS = {'sparse_depth': 'sparse_depth', 'points': 'points_in'}

# Reasons (diagnostics counter keys). Conversion errors keep the converter's reason behind a
# prefix ('sparse_depth_unknown_encoding', 'points_missing_field', ...).
REASON_SPARSE_NO_READINGS = 'sparse_depth_no_readings'
REASON_POINTS_EMPTY = 'points_empty'
REASON_NO_TRANSFORM = 'no_transform'
REASON_STALE_TRANSFORM = 'stale_transform'

# image_to_depth converts 16UC1 with this factor; other factors are applied on top.
_CONVERTER_MM = 0.001


class ScaleInputError(ReasonError):
    """Sparse input that cannot give a scale (bad message, no transform, no point in view...)."""


@dataclass(frozen=True)
class Reading:
    """A buffered sparse input: converted data, or the error it gave."""

    kind: str  # 'sparse_depth' or 'points'
    stamp_ns: int
    frame_id: str
    data: np.ndarray = None  # H x W meters (sparse depth) or (N, 3) finite points
    error: ScaleInputError = None


def sparse_depth_reading(msg, sparse_depth_scale):
    """
    Convert a sparse depth Image (16UC1 or 32FC1, any resolution) to meters.

    :param sparse_depth_scale: meters per unit of 16UC1
    :return: :class:`Reading` with H x W float32 meters, or with the error: reason
        ``sparse_depth_<conversion reason>`` (e.g. ``sparse_depth_unknown_encoding``) or
        ``sparse_depth_no_readings`` (all zero, NaN, inf or negative)
    """
    stamp_ns, frame_id = stamp_to_ns(msg.header.stamp), str(msg.header.frame_id)
    try:
        depth = image_to_depth(msg)
    except ImageConversionError as error:
        return Reading('sparse_depth', stamp_ns, frame_id, error=ScaleInputError(
            f'sparse_depth_{error.reason}', f'sparse depth: {error}'))
    if str(msg.encoding).strip().upper() == '16UC1' and sparse_depth_scale != _CONVERTER_MM:
        depth *= np.float32(sparse_depth_scale / _CONVERTER_MM)
    with np.errstate(invalid='ignore'):
        if not np.any(np.isfinite(depth) & (depth > 0)):
            empty = int((np.isnan(depth) | (depth == 0)).sum())
            n_inf = int(np.isinf(depth).sum())
            return Reading('sparse_depth', stamp_ns, frame_id, error=ScaleInputError(
                REASON_SPARSE_NO_READINGS, f'sparse depth {msg.width}x{msg.height} '
                f'{msg.encoding} has no valid reading: {empty} pixels 0 or NaN (no '
                f'reading), {n_inf} inf, {depth.size - empty - n_inf} negative'))
    return Reading('sparse_depth', stamp_ns, frame_id, data=depth)


def points_reading(msg):
    """
    Convert a LiDAR PointCloud2 (x, y, z FLOAT32 or FLOAT64, its own frame) to points.

    :return: :class:`Reading` with the (N, 3) finite points, or with the error: reason
        ``points_<conversion reason>`` (``points_missing_field``, ``points_truncated``...)
        or ``points_empty`` (no finite point)
    """
    stamp_ns, frame_id = stamp_to_ns(msg.header.stamp), str(msg.header.frame_id)
    try:
        # FLOAT64 stays float64: clouds in map / UTM frames need it.
        xyz = pointcloud2_to_xyz(msg, skip_nans=True, dtype=None)
    except PointCloudConversionError as error:
        return Reading('points', stamp_ns, frame_id,
                       error=ScaleInputError(f'points_{error.reason}', str(error)))
    if xyz.shape[0] == 0:
        return Reading('points', stamp_ns, frame_id, error=ScaleInputError(
            REASON_POINTS_EMPTY, f'PointCloud2 in {frame_id!r} has no finite point '
            f'({msg.width}x{msg.height})'))
    return Reading('points', stamp_ns, frame_id, data=xyz)


def _is_extrapolation(error):
    """Whether an exception is tf2's ExtrapolationException (by name: tf2 is optional)."""
    return any(cls.__name__ == 'ExtrapolationException' for cls in type(error).__mro__)


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
        gap_s = abs(found_ns - int(stamp_ns)) / NS_PER_S
        if found_ns and gap_s > self.tolerance_s:
            raise ScaleInputError(REASON_STALE_TRANSFORM, f'transform {source_frame!r} -> '
                                  f'{target_frame!r} is {gap_s:.3f} s away from the {what} '
                                  f'stamp (tolerance {self.tolerance_s} s): {cause}')
        return stamped


class InputSubscriptions:
    """
    The sparse input subscriptions of one scale source on a node, and its tf2 listener.

    :param config: :class:`~marigold_ros.scale_recovery.ScaleRecoveryConfig`
    """

    def __init__(self, config):
        """Hold the settings; nothing is created before :meth:`subscribe`."""
        self.config = config
        self._node = None
        self._subscriptions = []
        self._tf_listener = None
        self._tf_checked = False
        self._tf_lookup = None

    def subscribe(self, node, camera_ns, add, qos=10):
        """
        Subscribe to a camera's sparse input (``source`` decides the topic and type).

        :param add: callable(msg) buffering a message; its :class:`ScaleInputError` is
            dropped here (the caller has counted and logged it)
        """
        source = self.config.source
        msg_type = Image if source == 'sparse_depth' else PointCloud2

        def callback(msg):
            try:
                add(msg)
            except ScaleInputError:
                pass  # the frame stays relative

        self._node = node
        subscription = node.create_subscription(
            msg_type, join_topic(camera_ns, TOPICS[source]), callback, qos)
        self._subscriptions.append(subscription)
        return subscription

    def tf2_lookup(self, node):
        """
        Return the tf2 lookup of the LiDAR extrinsic, starting a listener on the first call.

        :return: :class:`Tf2TransformLookup`, or None when ``use_tf`` is off or ``tf2_ros``
            is not importable (warned): the extrinsic parameters are then used
        """
        if self._tf_checked:
            return self._tf_lookup
        self._tf_checked = True
        if not self.config.use_tf:
            return None
        try:
            import tf2_ros
        except ImportError:
            node.get_logger().warning(
                'scale recovery: tf2_ros is not importable, using the extrinsic parameters '
                f'(translation {self.config.extrinsic_translation}, rotation xyzw '
                f'{self.config.extrinsic_rotation_xyzw}) for the LiDAR points')
            return None
        buffer = tf2_ros.Buffer()
        self._tf_listener = tf2_ros.TransformListener(buffer, node)
        self._tf_lookup = Tf2TransformLookup(buffer, self.config.transform_tolerance_s,
                                             self.config.fixed_frame)
        return self._tf_lookup

    def close(self):
        """Destroy the subscriptions and the tf listener (the node stays up)."""
        node, subscriptions = self._node, self._subscriptions
        self._subscriptions = []
        if node is not None:
            for subscription in subscriptions:
                node.destroy_subscription(subscription)
        if self._tf_listener is not None and hasattr(self._tf_listener, 'unregister'):
            self._tf_listener.unregister()
        self._tf_listener = None
        self._tf_checked = False
        self._tf_lookup = None
