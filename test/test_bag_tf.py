"""
Offline /tf (issue 19): the time-indexed transform buffer and motion compensation in bags.

The buffer is checked against transforms computed directly (chains, interpolation, tf2's
errors); then a rig moving through 'odom' is recorded with its LiDAR sweeping 40 ms before
each image, and the offline metric depth is compared with the live node's path on the same
messages: the node's DepthPipeline and ScaleRecovery looking the LiDAR up through
Tf2TransformLookup in a stand-in tf2 buffer that knows the exact motion.
"""

import math

from builtin_interfaces.msg import Time as TimeMsg
from geometry_msgs.msg import TransformStamped
from marigold_model.data.synthetic import render_sequence
from marigold_ros.bag_job import build_run_config
from marigold_ros.bag_processor import process_bag
from marigold_ros.bag_tf import ExtrapolationException, LookupException, slerp
from marigold_ros.bag_tf import TransformBuffer
from marigold_ros.bag_topics import Topics
from marigold_ros.conversions import image_to_depth, pointcloud2_from_depth, rgb_to_image
from marigold_ros.geometry import quaternion_to_matrix
from marigold_ros.node_params import read_node_params
from marigold_ros.pipeline import DepthPipeline, FrameInput
from marigold_ros.scale_inputs import ScaleInputError, Tf2TransformLookup
from marigold_ros.scale_recovery import ScaleRecovery
from marigold_ros.static_tf import matrix_to_quaternion
import numpy as np
import pytest
from rclpy.serialization import serialize_message
from rclpy.time import Time
from std_msgs.msg import Header
from test_bag_processor import _by_topic, _camera_info, _header, _job, _messages, _stamp
from test_bag_processor import _write_bag, HEIGHT, OracleEstimator, PARAMS, STORE, T0
from test_bag_processor import WIDTH

NS = 10 ** 9
SPEED, YAW_RATE = np.array([4.0, 1.0, 0.0]), 0.8  # m/s in odom, rad/s about z
CAM_IN_BASE = ((0.2, 0.0, 1.0), (-0.5, 0.5, -0.5, 0.5))  # optical frame: z forward
LIDAR_IN_BASE = ((0.0, 0.1, 1.3), (0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))
SWEEP_NS = 40 * 10 ** 6  # the cloud is stamped 40 ms before its image


def _matrix(translation, rotation):
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(rotation)
    out[:3, 3] = translation
    return out


def _base_in_odom(stamp_ns):
    """Return the rig's pose: constant velocity and yaw rate (exact under tf2's interpolation)."""
    t = (stamp_ns - T0) / NS
    yaw = YAW_RATE * t
    return _matrix(SPEED * t, (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)))


def _lidar_from_camera(cloud_ns, image_ns):
    """T taking camera points at the image stamp into the LiDAR at the cloud stamp."""
    camera = _base_in_odom(image_ns) @ _matrix(*CAM_IN_BASE)
    lidar = _base_in_odom(cloud_ns) @ _matrix(*LIDAR_IN_BASE)
    return np.linalg.inv(lidar) @ camera


class MotionBuffer:
    """A stand-in tf2 Buffer that knows the motion exactly (the live node's side)."""

    def lookup_transform_full(self, target, target_time, source, source_time, fixed):
        """Camera at target_time <- LiDAR at source_time, through odom."""
        assert (target, source, fixed) == ('cam_optical', 'lidar', 'odom')
        matrix = np.linalg.inv(_lidar_from_camera(source_time.nanoseconds,
                                                  target_time.nanoseconds))
        return _stamped(matrix, target_time.nanoseconds)

    def lookup_transform(self, target, source, time):
        """Camera <- LiDAR at one time."""
        return self.lookup_transform_full(target, time, source, time, 'odom')


def _stamped(matrix, stamp_ns):
    msg = TransformStamped()
    msg.header.stamp = TimeMsg(sec=stamp_ns // NS, nanosec=stamp_ns % NS)
    t, q = msg.transform.translation, msg.transform.rotation
    t.x, t.y, t.z = (float(v) for v in matrix[:3, 3])
    q.x, q.y, q.z, q.w = (float(v) for v in matrix_to_quaternion(matrix[:3, :3]))
    return msg


def _as_matrix(stamped):
    t, q = stamped.transform.translation, stamped.transform.rotation
    return _matrix((t.x, t.y, t.z), (q.x, q.y, q.z, q.w))


def _tf_message(transforms):
    """Return a tf2_msgs/TFMessage (rosbags CDR) of (parent, child, stamp ns, matrix) entries."""
    types = STORE.types
    items = []
    for parent, child, stamp_ns, matrix in transforms:
        translation = (float(v) for v in matrix[:3, 3])
        rotation = (float(v) for v in matrix_to_quaternion(matrix[:3, :3]))
        items.append(types['geometry_msgs/msg/TransformStamped'](
            header=types['std_msgs/msg/Header'](
                stamp=types['builtin_interfaces/msg/Time'](sec=stamp_ns // NS,
                                                           nanosec=stamp_ns % NS),
                frame_id=parent),
            child_frame_id=child,
            transform=types['geometry_msgs/msg/Transform'](
                translation=types['geometry_msgs/msg/Vector3'](*translation),
                rotation=types['geometry_msgs/msg/Quaternion'](*rotation))))
    return bytes(STORE.serialize_cdr(types['tf2_msgs/msg/TFMessage'](transforms=items),
                                     'tf2_msgs/msg/TFMessage'))


# ------------------------------------------------------------------------------ the buffer


def _filled_buffer(start_ns=T0 - NS // 2, end_ns=T0 + NS, period_ns=10 ** 7 + 3 * 10 ** 6):
    buffer = TransformBuffer()
    buffer.set_transform('base_link', 'cam_optical', 0, *CAM_IN_BASE, static=True)
    buffer.set_transform('base_link', 'lidar', 0, *LIDAR_IN_BASE, static=True)
    for stamp in range(start_ns, end_ns + 1, period_ns):
        pose = _base_in_odom(stamp)
        buffer.set_transform('odom', 'base_link', stamp, pose[:3, 3],
                             matrix_to_quaternion(pose[:3, :3]))
    return buffer


def test_lookups_interpolate_and_chain_like_tf2():
    """Between samples: the exact pose of a constant-velocity rig; chains both ways."""
    buffer = _filled_buffer()
    for stamp in (T0 + 1234567, T0 + 250 * 10 ** 6, T0 - 3 * 10 ** 8 + 7):
        time = Time(nanoseconds=stamp)
        found = _as_matrix(buffer.lookup_transform('odom', 'cam_optical', time))
        np.testing.assert_allclose(found, _base_in_odom(stamp) @ _matrix(*CAM_IN_BASE),
                                   atol=1e-9)
        back = _as_matrix(buffer.lookup_transform('lidar', '/odom', time))
        np.testing.assert_allclose(
            back, np.linalg.inv(_base_in_odom(stamp) @ _matrix(*LIDAR_IN_BASE)), atol=1e-9)
    # Static chain only: any time, stamped with it (0 for the newest), as tf2 does.
    static = buffer.lookup_transform('cam_optical', 'lidar', Time(nanoseconds=T0 + 99 * NS))
    assert (static.header.stamp.sec, static.header.stamp.nanosec) == (T0 // NS + 99, 0)
    newest = buffer.lookup_transform('cam_optical', 'lidar', Time()).header.stamp
    assert (newest.sec, newest.nanosec) == (0, 0)
    np.testing.assert_allclose(_as_matrix(static), np.linalg.inv(_matrix(*CAM_IN_BASE))
                               @ _matrix(*LIDAR_IN_BASE), atol=1e-12)
    # Motion between two times, through the fixed frame.
    cloud, image = T0 + 60 * 10 ** 6 + 1, T0 + 100 * 10 ** 6
    full = buffer.lookup_transform_full('cam_optical', Time(nanoseconds=image), 'lidar',
                                        Time(nanoseconds=cloud), 'odom')
    np.testing.assert_allclose(_as_matrix(full), np.linalg.inv(_lidar_from_camera(cloud, image)),
                               atol=1e-9)
    assert full.header.stamp.nanosec == image % NS
    # Time 0: the newest time of the chain.
    newest = buffer.lookup_transform('odom', 'lidar', Time())
    last = max(s for s in range(T0 - NS // 2, T0 + NS + 1, 13 * 10 ** 6))
    assert newest.header.stamp.sec * NS + newest.header.stamp.nanosec == last
    # Errors tf2's way: outside the data, and frames not connected.
    with pytest.raises(ExtrapolationException, match='future'):
        buffer.lookup_transform('odom', 'lidar', Time(nanoseconds=T0 + 2 * NS))
    with pytest.raises(ExtrapolationException, match='past'):
        buffer.lookup_transform('odom', 'lidar', Time(nanoseconds=T0 - NS))
    buffer.set_transform('map', 'gps', 0, (0, 0, 0), (0, 0, 0, 1), static=True)
    with pytest.raises(LookupException, match='not part of the same tree'):
        buffer.lookup_transform('map', 'lidar', Time(nanoseconds=T0))
    with pytest.raises(LookupException, match='does not exist'):
        buffer.lookup_transform('radar', 'lidar', Time(nanoseconds=T0))


def test_slerp_follows_a_constant_rotation_rate():
    for fraction in (0.0, 0.25, 0.7, 1.0):
        angle = 1.2 * fraction
        expected = np.array([0.0, math.sin(angle / 2), 0.0, math.cos(angle / 2)])
        found = slerp((0, 0, 0, 1), (0, math.sin(0.6), 0, math.cos(0.6)), fraction)
        np.testing.assert_allclose(found, expected, atol=1e-12)
    # The shorter arc: q and -q are the same rotation.
    np.testing.assert_allclose(slerp((0, 0, 0, 1), (0, 0, 0, -1), 0.5), (0, 0, 0, 1),
                               atol=1e-12)


def test_tf2_lookup_reads_the_buffer_like_the_live_node():
    """Tf2TransformLookup on the buffer: extrapolation is recognised (stale vs newest)."""
    buffer = _filled_buffer(end_ns=T0 + 5 * 10 ** 8)
    lookup = Tf2TransformLookup(buffer, 0.1, 'odom')
    cloud, image = T0 + 2 * 10 ** 8 - SWEEP_NS, T0 + 2 * 10 ** 8
    translation, rotation = lookup('cam_optical', 'lidar', cloud, image)
    np.testing.assert_allclose(_matrix(translation, rotation),
                               np.linalg.inv(_lidar_from_camera(cloud, image)), atol=1e-9)
    # Data up to T0 + 488 ms; image 62 ms past it: its newest pose (within 0.1 s); 312 ms
    # past: stale.
    lookup('cam_optical', 'lidar', T0 + 45 * 10 ** 7, T0 + 55 * 10 ** 7)
    with pytest.raises(ScaleInputError) as error:
        lookup('cam_optical', 'lidar', T0 + 45 * 10 ** 7, T0 + 8 * 10 ** 8)
    assert error.value.reason == 'stale_transform'
    with pytest.raises(ScaleInputError) as error:
        lookup('cam_optical', 'radar', cloud, image)
    assert error.value.reason == 'no_transform'


def test_history_is_tf2s_ten_seconds():
    buffer = TransformBuffer()
    for second in range(30):
        buffer.set_transform('odom', 'base', second * NS, (second, 0, 0), (0, 0, 0, 1))
    with pytest.raises(ExtrapolationException, match='past'):
        buffer.lookup_transform('odom', 'base', Time(nanoseconds=15 * NS))
    found = buffer.lookup_transform('odom', 'base', Time(nanoseconds=int(25.5 * NS)))
    assert found.transform.translation.x == pytest.approx(25.5)


# ------------------------------------------------------------------------------ in a bag


@pytest.fixture(scope='module')
def scenes():
    """Six frames of an orbiting camera (as in test_bag_processor)."""
    return render_sequence(np.random.default_rng(7), 6, height=HEIGHT, width=WIDTH,
                           motion='orbit')


@pytest.fixture()
def moving_params(tmp_path):
    def write(fixed_frame):
        path = tmp_path / f'params_{fixed_frame or "none"}.yaml'
        path.write_text(PARAMS + '    scale_recovery:\n      source: points\n'
                        f"      fixed_frame: '{fixed_frame}'\n")
        return str(path)
    return write


def _cloud(sample, i):
    """Return the true depth at the image stamp as the LiDAR saw it 40 ms before."""
    fx, fy, cx, cy = sample.K[0, 0], sample.K[1, 1], sample.K[0, 2], sample.K[1, 2]
    v, u = np.mgrid[0:HEIGHT:4, 0:WIDTH:4]
    z = sample.depth[v, u]
    camera = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z, np.ones_like(z)],
                      axis=-1).reshape(-1, 4)
    lidar = (camera @ _lidar_from_camera(_stamp(i) - SWEEP_NS, _stamp(i)).T)[:, :3]
    stamp = _stamp(i) - SWEEP_NS
    header = Header(frame_id='lidar', stamp=TimeMsg(sec=stamp // NS, nanosec=stamp % NS))
    return pointcloud2_from_depth(lidar.reshape(1, -1, 3).astype(np.float32), None, header)


def _moving_bag(path, scenes):
    messages = _messages(scenes)
    messages.append(('/tf_static', 'tf2_msgs/msg/TFMessage', T0 - NS, _tf_message([
        ('base_link', 'cam_optical', 0, _matrix(*CAM_IN_BASE)),
        ('base_link', 'lidar', 0, _matrix(*LIDAR_IN_BASE))])))
    # Odometry at ~77 Hz, off the camera's grid: every lookup interpolates.
    for stamp in range(T0 - NS // 2, _stamp(len(scenes)) + NS // 2, 13 * 10 ** 6):
        messages.append(('/tf', 'tf2_msgs/msg/TFMessage', stamp,
                         _tf_message([('odom', 'base_link', stamp, _base_in_odom(stamp))])))
    for i, sample in enumerate(scenes):
        messages.append(('/lidar/points', 'sensor_msgs/msg/PointCloud2',
                         _stamp(i) - SWEEP_NS + 9000, serialize_message(_cloud(sample, i))))
    return _write_bag(path, 'mcap', sorted(messages, key=lambda m: m[2]))


def test_offline_motion_compensation_equals_the_live_node(tmp_path, scenes, moving_params):
    """A moving rig: /tf through 'odom' gives the live node's metric depth, offline."""
    bag = _moving_bag(tmp_path / 'in', scenes)
    params = moving_params('odom')
    job = _job(bag, tmp_path / 'out', params, points_topic='/lidar/points')
    summary = process_bag(job, estimator=OracleEstimator(scenes))
    assert summary.scale_status == {'ok': len(scenes)}
    assert summary.extrinsic.startswith("/tf and /tf_static through 'odom'")
    offline = _by_topic(tmp_path / 'out')['/cam/depth/image']
    # The live node's path on the same messages, tf2 replaced by the exact motion.
    config = build_run_config(job, Topics('/cam/image_raw', points='/lidar/points'),
                              read_node_params(params))
    recovery = ScaleRecovery(config.scale, Tf2TransformLookup(
        MotionBuffer(), config.scale.transform_tolerance_s, config.scale.fixed_frame))
    pipeline = DepthPipeline(OracleEstimator(scenes), config.output, recovery)
    for i, sample in enumerate(scenes):
        recovery.add_points('/cam/image_raw', _cloud(sample, i))
        frame = FrameInput(image=rgb_to_image(sample.rgb, _header(i)), key='/cam/image_raw',
                           camera_info=_camera_info(sample, i))
        live = pipeline.process([frame])[0]
        assert live.scale is not None and live.scale.status == 'ok'
        np.testing.assert_allclose(image_to_depth(offline[i]), image_to_depth(live.metric),
                                   rtol=1e-6, equal_nan=True)
        truth = sample.depth[sample.valid]
        assert np.nanmean(np.abs(image_to_depth(offline[i])[sample.valid] - truth) / truth) \
            < 0.01
    # Without the fixed frame the 40 ms of motion is not taken out: clearly worse depth.
    process_bag(_job(bag, tmp_path / 'plain', moving_params(''), points_topic='/lidar/points'),
                estimator=OracleEstimator(scenes))
    plain = _by_topic(tmp_path / 'plain')['/cam/depth/image']

    def error(msgs):
        return np.mean([np.nanmean(np.abs(image_to_depth(m)[s.valid] - s.depth[s.valid])
                                   / s.depth[s.valid]) for m, s in zip(msgs, scenes)])
    assert error(plain) > 5 * error(offline)
