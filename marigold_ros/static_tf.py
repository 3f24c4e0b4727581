"""
Static transforms recorded in a bag (``/tf_static``) as the LiDAR extrinsic for scale recovery.

The live node asks tf2 where the LiDAR is; offline there is no tf2 buffer, but a recording
of a sensor rig carries the same static transforms on ``/tf_static``.  :class:`StaticTransforms`
chains them (in either direction) and serves them through the ``transform_lookup`` interface
of :class:`~marigold_ros.scale_recovery.ScaleRecovery`; frames it cannot connect fall back to
the extrinsic parameters, as the node does without tf2.
"""

from collections import deque

from marigold_ros.geometry import quaternion_to_matrix
import numpy as np

#: The topic static transforms are recorded on.
TF_STATIC_TOPIC = '/tf_static'


def matrix_to_quaternion(rotation):
    """
    Return the quaternion (x, y, z, w) of a 3x3 rotation matrix (w >= 0).

    :param rotation: 3x3 rotation matrix
    :return: numpy array of 4 values
    """
    r = np.asarray(rotation, np.float64)
    trace = np.trace(r)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [(r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s,
             0.25 * s]
    else:
        i = int(np.argmax(np.diag(r)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + r[i, i] - r[j, j] - r[k, k])
        q = [0.0, 0.0, 0.0, (r[k, j] - r[j, k]) / s]
        q[i] = 0.25 * s
        q[j] = (r[j, i] + r[i, j]) / s
        q[k] = (r[k, i] + r[i, k]) / s
    q = np.asarray(q)
    return -q if q[3] < 0 else q


def _frame(name):
    return str(name).strip().lstrip('/')


class StaticTransforms:
    """
    A graph of static transforms with lookups along any chain of them.

    :param transforms: iterable of (parent frame, child frame, translation (3), quaternion
        (x, y, z, w)): the child's pose in the parent (``p_parent = R p_child + t``), as in
        geometry_msgs/TransformStamped
    :param fallback: (translation, quaternion) returned for frames that are not connected,
        or None to raise
    """

    def __init__(self, transforms=(), fallback=None):
        """Index the transforms by frame (the latest one wins for a repeated pair)."""
        self._edges = {}
        for parent, child, translation, rotation in transforms:
            matrix = np.eye(4)
            matrix[:3, :3] = quaternion_to_matrix(rotation)
            matrix[:3, 3] = np.asarray(translation, np.float64)
            parent, child = _frame(parent), _frame(child)
            self._edges.setdefault(parent, {})[child] = matrix
            self._edges.setdefault(child, {})[parent] = np.linalg.inv(matrix)
        self.fallback = fallback

    @classmethod
    def from_messages(cls, messages, fallback=None):
        """
        Build from tf2_msgs/TFMessage messages (rclpy or rosbags objects).

        :param messages: iterable of messages with a ``transforms`` list
        :param fallback: see the class
        :return: StaticTransforms
        """
        found = []
        for msg in messages:
            for item in msg.transforms:
                t, q = item.transform.translation, item.transform.rotation
                found.append((item.header.frame_id, item.child_frame_id, (t.x, t.y, t.z),
                              (q.x, q.y, q.z, q.w)))
        return cls(found, fallback)

    @property
    def frames(self):
        """Return the frame names known."""
        return sorted(self._edges)

    def matrix(self, target, source):
        """
        Return the 4x4 transform taking points from ``source`` into ``target``, or None.

        :param target: target frame
        :param source: source frame
        :return: 4x4 float64 matrix or None when the frames are not connected
        """
        target, source = _frame(target), _frame(source)
        if target == source:
            return np.eye(4)
        # Breadth-first from the target: T_target_frame for every frame reached.
        reached = {target: np.eye(4)}
        todo = deque([target])
        while todo:
            frame = todo.popleft()
            for other, edge in self._edges.get(frame, {}).items():
                if other not in reached:
                    # edge = T_frame_other, so T_target_other = T_target_frame @ edge.
                    reached[other] = reached[frame] @ edge
                    if other == source:
                        return reached[other]
                    todo.append(other)
        return None

    def __call__(self, target_frame, source_frame, stamp_ns, image_stamp_ns=None):
        """
        Look a transform up (the ScaleRecovery ``transform_lookup`` interface).

        :param target_frame: camera optical frame
        :param source_frame: LiDAR frame
        :param stamp_ns: cloud stamp (static transforms do not depend on it)
        :param image_stamp_ns: image stamp (likewise)
        :return: (translation (3), quaternion (x, y, z, w))
        :raises ScaleInputError: 'no_transform' when not connected and no fallback
        """
        matrix = self.matrix(target_frame, source_frame)
        if matrix is None:
            if self.fallback is not None:
                return self.fallback
            from .scale_inputs import REASON_NO_TRANSFORM, ScaleInputError
            raise ScaleInputError(REASON_NO_TRANSFORM, f'no static transform from '
                                  f'{source_frame!r} to {target_frame!r} in {TF_STATIC_TOPIC} '
                                  f'(frames: {", ".join(self.frames) or "none"})')
        return matrix[:3, 3].copy(), matrix_to_quaternion(matrix[:3, :3])
