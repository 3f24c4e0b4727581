"""
A time-indexed transform buffer for offline runs: the bag's ``/tf`` and ``/tf_static``.

The live node looks the LiDAR up in a ``tf2_ros.Buffer`` (through
:class:`~marigold_ros.scale_inputs.Tf2TransformLookup`), at the cloud stamp or, with
``scale_recovery.fixed_frame``, from the cloud at its stamp to the camera at the image stamp
(motion compensation).  ``tf2_ros`` is not always importable offline, so
:class:`TransformBuffer` does what that lookup needs of it with tf2's semantics: a tree of
frames (each child one parent), static edges valid at any time, dynamic edges interpolated
between the two samples around the time (linear translation, slerp rotation), time 0 for
the latest time every edge of the chain has, ``ExtrapolationException`` outside the data,
``LookupException`` for frames that are not connected, and tf2's 10 s history.
process_bag feeds it the bag's messages in recording order, ahead of the frames that need
them (the look-ahead), so a lookup sees what the live buffer would have held.
"""

import bisect

from geometry_msgs.msg import TransformStamped
from marigold_ros.geometry import quaternion_to_matrix
import numpy as np

from .stamp_matcher import NS_PER_S
from .static_tf import matrix_to_quaternion

#: The topic of moving transforms.
TF_TOPIC = '/tf'

#: tf2's default history (tf2_ros.Buffer cache_time).
CACHE_NS = 10 * NS_PER_S


class LookupException(Exception):
    """A frame is unknown or the two frames are not connected (as tf2's)."""


class ExtrapolationException(Exception):
    """The time is outside the data of an edge of the chain (as tf2's, matched by name)."""


def _frame(name):
    return str(name).strip().lstrip('/')


def _matrix(translation, rotation):
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(rotation)
    out[:3, 3] = translation
    return out


def slerp(q0, q1, fraction):
    """
    Interpolate two unit quaternions (x, y, z, w) along the shorter arc, as tf2 does.

    :param q0: quaternion at fraction 0
    :param q1: quaternion at fraction 1
    :param fraction: in [0, 1]
    :return: unit quaternion (numpy array of 4)
    """
    q0, q1 = np.asarray(q0, np.float64), np.asarray(q1, np.float64)
    q0, q1 = q0 / np.linalg.norm(q0), q1 / np.linalg.norm(q1)
    dot = float(np.dot(q0, q1))
    if dot < 0.0:
        q1, dot = -q1, -dot
    theta = float(np.arccos(min(dot, 1.0)))
    if theta < 1e-9:  # the same rotation (sin(theta) would divide by ~0)
        return q0
    return (np.sin((1.0 - fraction) * theta) * q0 + np.sin(fraction * theta) * q1) / \
        np.sin(theta)


class _Edge:
    """The samples of one child frame in its parent: static (one, any time) or timed."""

    def __init__(self, parent, static):
        self.parent, self.static = parent, static
        self.stamps, self.values = [], []  # ns, (translation, quaternion); sorted by stamp

    def add(self, stamp_ns, translation, rotation):
        if self.static:
            self.stamps, self.values = [0], [(translation, rotation)]
            return
        at = bisect.bisect_left(self.stamps, stamp_ns)
        if at < len(self.stamps) and self.stamps[at] == stamp_ns:
            self.values[at] = (translation, rotation)
        else:
            self.stamps.insert(at, stamp_ns)
            self.values.insert(at, (translation, rotation))
        # tf2 forgets what is older than its cache time behind the newest sample.
        drop = bisect.bisect_left(self.stamps, self.stamps[-1] - CACHE_NS)
        if drop:
            del self.stamps[:drop], self.values[:drop]

    def matrix(self, stamp_ns, child):
        """Return T_parent_child at a time (0: the newest)."""
        if self.static:
            return _matrix(*self.values[0])
        stamps = self.stamps
        if stamp_ns == 0:
            return _matrix(*self.values[-1])
        if not stamps[0] <= stamp_ns <= stamps[-1]:
            direction = 'past' if stamp_ns < stamps[0] else 'future'
            raise ExtrapolationException(
                f'Lookup would require extrapolation into the {direction}: requested time '
                f'{stamp_ns} ns but the data of {child!r} in {self.parent!r} spans '
                f'[{stamps[0]}, {stamps[-1]}] ns')
        at = bisect.bisect_left(stamps, stamp_ns)
        if stamps[at] == stamp_ns:
            return _matrix(*self.values[at])
        (t0, q0), (t1, q1) = self.values[at - 1], self.values[at]
        fraction = (stamp_ns - stamps[at - 1]) / (stamps[at] - stamps[at - 1])
        translation = np.asarray(t0) + fraction * (np.asarray(t1) - np.asarray(t0))
        return _matrix(translation, slerp(q0, q1, fraction))


class TransformBuffer:
    """
    Transforms over time with tf2's ``lookup_transform`` / ``lookup_transform_full``.

    Times are ``rclpy.time.Time`` objects (anything with ``nanoseconds``), as tf2's.
    """

    def __init__(self):
        """Start empty."""
        self._edges = {}  # child -> _Edge

    @property
    def frames(self):
        """Return the frame names known."""
        return sorted(set(self._edges) | {e.parent for e in self._edges.values()})

    def set_transform(self, parent, child, stamp_ns, translation, rotation, static=False):
        """
        Add one transform (the child's pose in the parent at a time).

        :param parent: parent frame
        :param child: child frame
        :param stamp_ns: its stamp (ignored for static ones)
        :param translation: (x, y, z)
        :param rotation: quaternion (x, y, z, w)
        :param static: valid at any time (``/tf_static``)
        """
        parent, child = _frame(parent), _frame(child)
        edge = self._edges.get(child)
        if edge is None or edge.parent != parent or edge.static != static:
            edge = self._edges[child] = _Edge(parent, static)  # tf2: a frame has one parent
        edge.add(int(stamp_ns), tuple(map(float, translation)), tuple(map(float, rotation)))

    def add_message(self, msg, static=False):
        """
        Add every transform of a tf2_msgs/TFMessage (rclpy or rosbags object).

        :param msg: message with a ``transforms`` list of TransformStamped
        :param static: from ``/tf_static``
        """
        for item in msg.transforms:
            stamp = item.header.stamp
            t, q = item.transform.translation, item.transform.rotation
            self.set_transform(item.header.frame_id, item.child_frame_id,
                               int(stamp.sec) * NS_PER_S + int(stamp.nanosec),
                               (t.x, t.y, t.z), (q.x, q.y, q.z, q.w), static)

    def _chain(self, frame):
        """Return [frame, parent, grandparent, ...] up to the root."""
        chain = [frame]
        while chain[-1] in self._edges and len(chain) <= len(self._edges):
            chain.append(self._edges[chain[-1]].parent)
        return chain

    def _path(self, target, source):
        """Return the edges (children) from source up, and from target up, to their junction."""
        known = self.frames
        for frame in (target, source):
            if frame not in known:
                raise LookupException(f'"{frame}" passed to lookupTransform argument does not '
                                      f'exist (frames: {", ".join(known) or "none"})')
        up_source, up_target = self._chain(source), self._chain(target)
        common = next((f for f in up_source if f in set(up_target)), None)
        if common is None:
            raise LookupException(f'Could not find a connection between {target!r} and '
                                  f'{source!r} because they are not part of the same tree')
        return (up_source[:up_source.index(common)], up_target[:up_target.index(common)])

    def _latest_common_ns(self, children):
        """Return the newest time every timed edge has (0 when all are static)."""
        timed = [self._edges[c].stamps[-1] for c in children if not self._edges[c].static]
        return min(timed) if timed else 0

    def _to_junction(self, children, stamp_ns):
        """Return T_junction_frame for the frame at the start of a chain of children."""
        out = np.eye(4)
        for child in children:
            out = self._edges[child].matrix(stamp_ns, child) @ out
        return out

    def _resolve(self, children, time):
        stamp_ns = int(time.nanoseconds)
        return stamp_ns or self._latest_common_ns(children)

    def lookup_transform(self, target_frame, source_frame, time):
        """
        Return the transform taking points of ``source_frame`` into ``target_frame``.

        :param target_frame: target frame
        :param source_frame: source frame
        :param time: rclpy Time; 0 for the latest common time
        :return: geometry_msgs/TransformStamped stamped with the time used
        :raises LookupException: unknown or unconnected frames
        :raises ExtrapolationException: the time is outside the data
        """
        target, source = _frame(target_frame), _frame(source_frame)
        from_source, from_target = self._path(target, source)
        stamp_ns = self._resolve(from_source + from_target, time)
        matrix = np.linalg.inv(self._to_junction(from_target, stamp_ns)) @ \
            self._to_junction(from_source, stamp_ns)
        return _stamped(target, source, stamp_ns, matrix)

    def lookup_transform_full(self, target_frame, target_time, source_frame, source_time,
                              fixed_frame):
        """
        Return the source at ``source_time`` in the target at ``target_time``, via a fixed frame.

        :param target_frame: target frame
        :param target_time: rclpy Time of the target (0: latest common)
        :param source_frame: source frame
        :param source_time: rclpy Time of the source (0: latest common)
        :param fixed_frame: frame that does not move between the two times
        :return: geometry_msgs/TransformStamped stamped with the target time used
        :raises LookupException: unknown or unconnected frames
        :raises ExtrapolationException: a time is outside the data
        """
        fixed = _frame(fixed_frame)
        in_fixed = []
        for frame, time in ((_frame(target_frame), target_time),
                            (_frame(source_frame), source_time)):
            up, down = self._path(fixed, frame)
            stamp_ns = self._resolve(up + down, time)
            in_fixed.append((stamp_ns, np.linalg.inv(self._to_junction(down, stamp_ns))
                             @ self._to_junction(up, stamp_ns)))
        (target_ns, fixed_target), (_, fixed_source) = in_fixed
        return _stamped(_frame(target_frame), _frame(source_frame), target_ns,
                        np.linalg.inv(fixed_target) @ fixed_source)


def _stamped(target, source, stamp_ns, matrix):
    msg = TransformStamped()
    msg.header.frame_id, msg.child_frame_id = target, source
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), NS_PER_S)
    t = msg.transform.translation
    t.x, t.y, t.z = (float(v) for v in matrix[:3, 3])
    q = msg.transform.rotation
    q.x, q.y, q.z, q.w = (float(v) for v in matrix_to_quaternion(matrix[:3, :3]))
    return msg
