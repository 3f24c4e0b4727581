"""Tests of marigold_ros.scale_recovery: sparse depth / LiDAR messages -> metric scale."""

import dataclasses
import time

# The tracker tests' scenes: the accuracy requirement is checked on exactly their data.
from builders import FakeEstimator, oracle_abs_rel, scale_estimate, sparse_image
from builders import synthetic_scene
from geometry_msgs.msg import TransformStamped
from marigold_model.alignment import abs_rel
from marigold_model.data.synthetic import render_scene
from marigold_model.scale_apply import apply_scale, RefinedScaleEstimate
from marigold_model.scale_tracking import ScaleTrackerConfig
from marigold_ros.conversions import depth_to_image, rgb_to_image
from marigold_ros.geometry import CameraModel, pixel_rays
from marigold_ros.scale_inputs import Tf2TransformLookup
from marigold_ros.scale_recovery import ScaleInputError, ScaleRecovery, ScaleRecoveryConfig
from marigold_ros.scale_recovery import status_fields
from marigold_ros.stamp_matcher import ns_to_stamp
import numpy as np
import pytest
from rclpy.time import Time
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import Image, PointCloud2, PointField
from std_msgs.msg import Header

FRAME = 'camera_optical'
LIDAR = 'lidar'
KEY = 'front'
# LiDAR axes (x forward, y left, z up) -> optical axes (x right, y down, z forward), then a
# small extra tilt and an offset: a realistic, non-trivial extrinsic.
_LIDAR_TO_OPTICAL = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
ROTATION = Rotation.from_euler('xyz', [2.0, -3.0, 1.5], degrees=True).as_matrix() \
    @ _LIDAR_TO_OPTICAL
QUATERNION = tuple(Rotation.from_matrix(ROTATION).as_quat())  # x, y, z, w
TRANSLATION = (0.06, -0.11, -0.04)
PLUMB_BOB = (-0.22, 0.06, 0.0015, -0.001, 0.0)
RATIONAL = (0.8, -0.3, 0.001, -0.0015, 0.02, 1.1, -0.2, 0.05)


def header(stamp_s, frame_id=FRAME):
    """Return a Header at a time in seconds."""
    return Header(stamp=ns_to_stamp(round(stamp_s * 1e9)), frame_id=frame_id)


def depth16(meters, hdr):
    """Return a 16UC1 Image in millimeters (0 = no reading)."""
    mm = np.where(np.isfinite(meters), np.rint(meters * 1000.0), 0).astype('<u2')
    msg = Image(header=hdr, height=mm.shape[0], width=mm.shape[1], encoding='16UC1',
                is_bigendian=0, step=2 * mm.shape[1])
    msg.data = mm.tobytes()
    return msg


def cloud(points, hdr, dtype='<f4', names=('x', 'y', 'z')):
    """Return a PointCloud2 with the given float fields and an extra intensity field."""
    points = np.asarray(points)
    item = np.dtype(dtype).itemsize
    codes = {'<f4': PointField.FLOAT32, '<f8': PointField.FLOAT64, '<i2': PointField.INT16}
    layout = np.dtype([(n, dtype) for n in names] + [('intensity', '<f4')])
    buf = np.zeros(len(points), layout)
    for axis, name in enumerate(names):
        buf[name] = points[:, axis]
    buf['intensity'] = 7.0
    fields = [PointField(name=n, offset=i * item, datatype=codes[dtype], count=1)
              for i, n in enumerate(names)]
    fields.append(PointField(name='intensity', offset=len(names) * item,
                             datatype=PointField.FLOAT32, count=1))
    msg = PointCloud2(header=hdr, height=1, width=len(points), fields=fields,
                      is_bigendian=False, point_step=layout.itemsize,
                      row_step=layout.itemsize * len(points), is_dense=False)
    msg.data = buf.tobytes()
    return msg


def to_lidar(points_optical):
    """Express optical-frame points in the LiDAR frame (inverse of the extrinsic)."""
    return (np.asarray(points_optical) - np.asarray(TRANSLATION)) @ ROTATION


def rendered(seed, height, width):
    """Ground truth of a rendered room and a relative depth (affine of it + 0.2 % noise)."""
    rng = np.random.default_rng(seed)
    sample = render_scene(rng, height=height, width=width)
    gt = sample.depth.astype(np.float64)
    scale, shift = gt.max() - gt.min(), gt.min()
    rel = (gt - shift) / scale + 0.002 * rng.standard_normal(gt.shape)
    return gt, rel, scale, shift, sample.K


def lidar_scene(seed=0, height=120, width=160, n_points=1500, model='plumb_bob',
                coeffs=PLUMB_BOB):
    """
    Render a room seen by a distorted camera (plumb_bob by default), with LiDAR points of it.

    The room is rendered through a pinhole camera (K); the real camera has the same K plus
    plumb_bob distortion, so the depth it sees at a pixel is the pinhole depth at the
    undistorted position of that pixel. The relative depth is on a grid half the camera's
    resolution (as Marigold's output may be). Returns the relative depth (NaN where the
    pixel sees outside the rendering), the distorted camera model, LiDAR points in the
    optical frame, and the true scale and shift.
    """
    rng = np.random.default_rng(seed)
    sample = render_scene(rng, height=height, width=width)
    gt, k = sample.depth.astype(np.float64), sample.K
    camera = CameraModel(width=width, height=height, K=k, D=coeffs, distortion_model=model,
                         frame_id=FRAME)
    low_h, low_w = height // 2, width // 2
    low_k = np.array([[k[0, 0] / 2, 0, (k[0, 2] + 0.5) / 2 - 0.5],
                      [0, k[1, 1] / 2, (k[1, 2] + 0.5) / 2 - 0.5], [0, 0, 1]])
    rx, ry, _ = pixel_rays(low_h, low_w, low_k, coeffs, model)
    u = np.rint(k[0, 0] * rx + k[0, 2])
    v = np.rint(k[1, 1] * ry + k[1, 2])
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    seen = np.full((low_h, low_w), np.nan)
    seen[inside] = gt[v[inside].astype(int), u[inside].astype(int)]
    scale = float(np.nanmax(seen) - np.nanmin(seen))
    shift = float(np.nanmin(seen))
    rel = (seen - shift) / scale
    rows = rng.integers(0, height, n_points)
    cols = rng.integers(0, width, n_points)
    z = gt[rows, cols]
    points = np.stack([(cols - k[0, 2]) / k[0, 0] * z, (rows - k[1, 2]) / k[1, 1] * z, z], 1)
    return rel, camera, points, scale, shift


def sparse_config(**kwargs):
    """Return a config for the sparse depth source."""
    return ScaleRecoveryConfig(source='sparse_depth', **kwargs)


def points_config(**kwargs):
    """Return a config for LiDAR points with the test extrinsic as parameters."""
    kwargs.setdefault('use_tf', False)
    return ScaleRecoveryConfig(source='points', extrinsic_translation=TRANSLATION,
                               extrinsic_rotation_xyzw=QUATERNION, **kwargs)


# Configuration


def test_config_is_a_tracker_config_with_the_input_settings_first():
    config = ScaleRecoveryConfig()
    assert isinstance(config, ScaleTrackerConfig)
    tracker_fields = [f.name for f in dataclasses.fields(ScaleTrackerConfig)]
    names = [f.name for f in dataclasses.fields(config)]
    # The parameter order (config/depth.yaml): source ... error_throttle_s, then the tracker.
    assert names[0] == 'source' and names[-len(tracker_fields):] == tracker_fields
    assert {name: getattr(config, name) for name in tracker_fields} == \
        dataclasses.asdict(ScaleTrackerConfig())
    assert config.source == 'none' and config.sparse_depth_scale == 0.001
    assert not config.local_refinement
    # ROS array parameters arrive as lists: stored as tuples (hashable, frozen).
    listed = ScaleRecoveryConfig(extrinsic_translation=[1, 2, 3], anchors=[0.2, 0.8])
    assert listed.extrinsic_translation == (1.0, 2.0, 3.0) and listed.anchors == (0.2, 0.8)
    for field_type in {type(f.default) for f in dataclasses.fields(config)}:
        assert field_type in (bool, int, float, str, tuple)


@pytest.mark.parametrize('kwargs, match', [
    ({'source': 'lidar'}, 'source'),
    ({'match_tolerance_s': -1.0}, 'match_tolerance_s'),
    ({'queue_size': 0}, 'queue_size'),
    ({'sparse_depth_scale': 0.0}, 'sparse_depth_scale'),
    ({'extrinsic_translation': (0.0, 1.0)}, 'extrinsic_translation'),
    ({'extrinsic_rotation_xyzw': (0.0, 0.0, 0.0, 0.0)}, 'quaternion'),
    ({'smoothing': 0.0}, 'smoothing'),
    ({'stale_after_s': 5.0, 'max_stale_s': 1.0}, 'stale'),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScaleRecoveryConfig(**kwargs)


# Sparse depth images


def test_sparse_depth_16uc1_at_twice_the_resolution():
    gt, rel, scale, shift, _ = rendered(1, 48, 64)
    rng = np.random.default_rng(1)
    fine = np.repeat(np.repeat(gt, 2, axis=0), 2, axis=1)  # 96x128, each pixel = its parent
    fine[rng.random(fine.shape) > 0.02] = np.nan  # 2 % of pixels have a reading
    recovery = ScaleRecovery(sparse_config())
    recovery.add_sparse_depth(KEY, depth16(fine, header(5.0)))
    estimate = recovery.estimate(KEY, header(5.0), rel)
    assert estimate.status == 'ok' and estimate.n_points > 100
    assert estimate.scale == pytest.approx(scale, rel=0.01)
    assert estimate.shift == pytest.approx(shift, abs=0.01 * scale)
    assert abs_rel(apply_scale(estimate, rel)[0], gt) < 0.01
    assert recovery.errors == {} and recovery.last_error is None


def test_sparse_depth_32fc1_at_half_the_resolution_with_nan_and_inf():
    gt, rel, scale, shift, _ = rendered(2, 96, 128)
    rng = np.random.default_rng(2)
    coarse = gt[1::2, 1::2].astype(np.float32)  # pixel centre maps to rel pixel (2c+1, 2r+1)
    drop = rng.random(coarse.shape)
    coarse[drop > 0.1] = 0.0
    coarse[drop > 0.95] = np.nan
    coarse[:2, :2] = np.inf
    recovery = ScaleRecovery(sparse_config())
    recovery.add_sparse_depth(KEY, depth_to_image(coarse, header(1.0)))
    estimate = recovery.estimate(KEY, header(1.0), rel)
    assert estimate.status == 'ok'
    assert estimate.scale == pytest.approx(scale, rel=0.01)
    assert estimate.shift == pytest.approx(shift, abs=0.01 * scale)


def test_sparse_depth_scale_parameter_for_16uc1():
    gt, rel, scale, _, _ = rendered(3, 48, 64)
    sparse = np.where(np.random.default_rng(3).random(gt.shape) < 0.05, gt, np.nan)
    # A sensor writing 0.1 mm units: the same depth is ten times the number.
    recovery = ScaleRecovery(sparse_config(sparse_depth_scale=0.0001))
    recovery.add_sparse_depth(KEY, depth16(sparse * 10.0, header(0.0)))
    assert recovery.estimate(KEY, header(0.0), rel).scale == pytest.approx(scale, rel=0.01)


def test_stamp_matching_uses_the_closest_message_within_tolerance():
    gt, rel, scale, _, _ = rendered(4, 48, 64)
    sparse = np.where(np.random.default_rng(4).random(gt.shape) < 0.05, gt, 0.0)
    recovery = ScaleRecovery(sparse_config(match_tolerance_s=0.05))
    recovery.add_sparse_depth(KEY, depth_to_image(sparse.astype(np.float32), header(1.0)))
    # A message too old for the frame is not used.
    assert recovery.estimate(KEY, header(1.2), rel) is None
    assert recovery.last_estimate(KEY).reason == 'no_sparse_input'
    # Within the tolerance it is; another stream key has its own buffer and tracker.
    assert recovery.estimate(KEY, header(1.04), rel).scale == pytest.approx(scale, rel=0.01)
    assert recovery.estimate('other', header(1.0), rel) is None
    # The closest wins: a bad message 30 ms away loses to a good one 10 ms away...
    with pytest.raises(ScaleInputError):
        recovery.add_sparse_depth(KEY, depth_to_image(np.zeros((4, 4), np.float32),
                                                      header(2.0)))
    recovery.add_sparse_depth(KEY, depth_to_image(sparse.astype(np.float32), header(2.04)))
    assert recovery.estimate(KEY, header(2.03), rel).status == 'ok'
    # ...and when the bad one is the closest, the frame reports its problem.
    held = recovery.estimate(KEY, header(2.005), rel)
    assert held.status == 'stale' and held.reason == 'sparse_depth_no_readings'


# LiDAR points


@pytest.mark.parametrize('model, coeffs', [('plumb_bob', PLUMB_BOB),
                                           ('rational_polynomial', RATIONAL)])
def test_lidar_points_through_extrinsic_parameters_and_distorted_camera(model, coeffs):
    rel, camera, points, scale, shift = lidar_scene(model=model, coeffs=coeffs)
    recovery = ScaleRecovery(points_config())
    recovery.add_points(KEY, cloud(to_lidar(points), header(3.0, LIDAR)))
    estimate = recovery.estimate(KEY, header(3.0), rel, camera)
    assert estimate.status == 'ok' and estimate.inlier_ratio > 0.95
    assert estimate.scale == pytest.approx(scale, rel=0.02)
    assert estimate.shift == pytest.approx(shift, abs=0.02 * scale)
    # The distortion matters: projecting through the pinhole part of the same camera pairs
    # points with the wrong pixels and fits clearly worse.
    pinhole = dataclasses.replace(camera, D=np.zeros(len(coeffs)))
    wrong = ScaleRecovery(points_config())
    wrong.add_points(KEY, cloud(to_lidar(points), header(3.0, LIDAR), dtype='<f8'))
    unmodelled = wrong.estimate(KEY, header(3.0), rel, pinhole)
    assert unmodelled is None or unmodelled.residual > 2.0 * estimate.residual


def test_float64_clouds_in_a_utm_frame_keep_their_precision():
    # A cloud in a map frame at UTM coordinates: float32 would round its points to 0.25-0.5 m.
    rel, camera, points, scale, shift = lidar_scene()
    origin = np.array([412345.25, 5012345.75, 120.0])
    translation = tuple(np.asarray(TRANSLATION) - ROTATION @ origin)
    recovery = ScaleRecovery(dataclasses.replace(points_config(),
                                                 extrinsic_translation=translation))
    recovery.add_points(KEY, cloud(to_lidar(points) + origin, header(3.0, LIDAR), dtype='<f8'))
    estimate = recovery.estimate(KEY, header(3.0), rel, camera)
    assert estimate.status == 'ok' and estimate.inlier_ratio > 0.95
    assert estimate.scale == pytest.approx(scale, rel=0.02)
    assert estimate.shift == pytest.approx(shift, abs=0.02 * scale)


class LookupException(Exception):
    """Stand-in for tf2_ros.LookupException (tf2_ros is optional)."""


class ExtrapolationException(Exception):
    """Stand-in for tf2_ros.ExtrapolationException."""


class FakeBuffer:
    """A tf2 Buffer holding one transform valid over [start_ns, end_ns]."""

    def __init__(self, start_ns=0, end_ns=10**19, frames=(FRAME, LIDAR)):
        """Store the validity interval and the known frame pair."""
        self.start_ns, self.end_ns, self.frames = start_ns, end_ns, frames
        self.calls = []

    def lookup_transform(self, target, source, time):
        """Return the test extrinsic, raising like tf2 outside its data."""
        self.calls.append((target, source, time.nanoseconds))
        if (target, source) != self.frames:
            raise LookupException(f'"{source}" passed to lookupTransform does not exist')
        stamp = time.nanoseconds or self.end_ns  # time 0 = the newest
        if not self.start_ns <= stamp <= self.end_ns:
            raise ExtrapolationException('Lookup would require extrapolation into the future')
        msg = TransformStamped()
        msg.header.stamp = ns_to_stamp(stamp)
        msg.transform.translation.x, msg.transform.translation.y, \
            msg.transform.translation.z = TRANSLATION
        rot = msg.transform.rotation
        rot.x, rot.y, rot.z, rot.w = QUATERNION
        return msg


def test_lidar_points_through_tf2_lookup_at_the_cloud_stamp():
    rel, camera, points, scale, _ = lidar_scene(seed=1)
    buffer = FakeBuffer()
    recovery = ScaleRecovery(points_config(use_tf=True),
                             transform_lookup=Tf2TransformLookup(buffer, 0.1))
    assert recovery.transform_source == 'custom'
    recovery.add_points(KEY, cloud(to_lidar(points), header(3.0, LIDAR)))
    estimate = recovery.estimate(KEY, header(3.01), rel, camera)
    assert estimate.scale == pytest.approx(scale, rel=0.02)
    assert buffer.calls == [(FRAME, LIDAR, 3_000_000_000)]
    # tf data ending 80 ms before the cloud: the newest transform is close enough.
    buffer.end_ns = 2_920_000_000
    assert recovery.estimate(KEY, header(3.0), rel, camera).status == 'ok'


class MovingBuffer(FakeBuffer):
    """A rig moving along the camera's optical axis at ``speed`` m/s through 'odom'."""

    def __init__(self, speed, odom_end_ns=10**19):
        """Keep the speed and where the odometry ends; the extrinsic is the test one."""
        super().__init__()
        self.speed, self.odom_end_ns = speed, odom_end_ns

    def lookup_transform_full(self, target, target_time, source, source_time, fixed):
        """Camera at target_time <- LiDAR at source_time, through the fixed frame."""
        self.calls.append((target, target_time.nanoseconds, source, source_time.nanoseconds,
                           fixed))
        if (target, source, fixed) != (FRAME, LIDAR, 'odom'):
            raise LookupException(f'no path from {source!r} to {target!r} via {fixed!r}')
        target_time = Time(nanoseconds=target_time.nanoseconds or self.odom_end_ns)
        if max(target_time.nanoseconds, source_time.nanoseconds) > self.odom_end_ns:
            raise ExtrapolationException('Lookup would require extrapolation into the future')
        msg = self.lookup_transform(target, source, source_time)
        msg.header.stamp = ns_to_stamp(target_time.nanoseconds)
        # Where the camera was at the cloud stamp, seen from where it is at the image stamp.
        travel = self.speed * (source_time.nanoseconds - target_time.nanoseconds) / 1e9
        msg.transform.translation.z += travel
        return msg


def test_fixed_frame_takes_out_the_motion_between_cloud_and_image():
    rel, camera, points, scale, shift = lidar_scene(seed=3)
    speed, image_s, cloud_s = 15.0, 3.0, 2.96  # 15 m/s, cloud 40 ms before the image
    # The LiDAR saw the scene from 0.6 m further back: every point 0.6 m deeper.
    seen_earlier = points + np.array([0.0, 0.0, speed * (image_s - cloud_s)])
    estimates = {}
    for fixed_frame in ('', 'odom'):
        buffer = MovingBuffer(speed)
        recovery = ScaleRecovery(points_config(use_tf=True, fixed_frame=fixed_frame),
                                 transform_lookup=Tf2TransformLookup(buffer, 0.1, fixed_frame))
        recovery.add_points(KEY, cloud(to_lidar(seen_earlier), header(cloud_s, LIDAR)))
        estimates[fixed_frame] = recovery.estimate(KEY, header(image_s), rel, camera)
    assert buffer.calls[0] == (FRAME, 3_000_000_000, LIDAR, 2_960_000_000, 'odom')
    assert estimates['odom'].shift == pytest.approx(shift, abs=0.02 * scale)
    assert estimates['odom'].scale == pytest.approx(scale, rel=0.02)
    assert abs(estimates[''].shift - shift) > 0.4  # uncompensated: off by the travel
    # Odometry 10 ms behind the image: its newest pose; 0.3 s behind: stale.
    for odom_end_ns, status in ((2_990_000_000, 'ok'), (2_700_000_000, None)):
        recovery = ScaleRecovery(points_config(use_tf=True, fixed_frame='odom'),
                                 transform_lookup=Tf2TransformLookup(
                                     MovingBuffer(speed, odom_end_ns), 0.1, 'odom'))
        recovery.add_points(KEY, cloud(to_lidar(seen_earlier), header(cloud_s, LIDAR)))
        estimate = recovery.estimate(KEY, header(image_s), rel, camera)
        assert (estimate.status if estimate else None) == status, odom_end_ns
        if estimate is None:
            assert recovery.last_estimate(KEY).reason == 'stale_transform'


@pytest.mark.parametrize('buffer, reason', [
    (FakeBuffer(end_ns=2_500_000_000), 'stale_transform'),
    (FakeBuffer(frames=(FRAME, 'base_link')), 'no_transform'),
])
def test_lidar_transform_failures(buffer, reason):
    rel, camera, points, _, _ = lidar_scene(seed=2)
    recovery = ScaleRecovery(points_config(use_tf=True),
                             transform_lookup=Tf2TransformLookup(buffer, 0.1))
    recovery.add_points(KEY, cloud(to_lidar(points), header(3.0, LIDAR)))
    assert recovery.estimate(KEY, header(3.0), rel, camera) is None
    assert recovery.last_estimate(KEY).reason == reason
    assert recovery.errors == {reason: 1}
    assert recovery.last_error.reason == reason and recovery.last_error.key == KEY
    assert LIDAR in str(recovery.last_error)


# Bad input: a reason, a count, and no scale from it


def _sparse_rgb(hdr):
    return rgb_to_image(np.zeros((4, 4, 3), np.uint8), hdr)


def _sparse_truncated(hdr):
    msg = depth_to_image(np.ones((4, 4), np.float32), hdr)
    msg.data = msg.data[:20]
    return msg


BAD_SPARSE = {
    'sparse_depth_unknown_encoding': _sparse_rgb,
    'sparse_depth_truncated': _sparse_truncated,
    'sparse_depth_no_readings': lambda hdr: depth16(np.zeros((8, 8)), hdr),
    'sparse_depth_no_readings/nan': lambda hdr: depth_to_image(
        np.full((8, 8), np.nan, np.float32), hdr),
    'sparse_depth_no_readings/inf': lambda hdr: depth_to_image(
        np.full((8, 8), np.inf, np.float32), hdr),
}


@pytest.mark.parametrize('case', sorted(BAD_SPARSE))
def test_bad_sparse_depth_is_refused_with_its_reason(case):
    reason = case.split('/')[0]
    gt, rel, _, _, _ = rendered(5, 48, 64)
    good = depth_to_image(np.where(gt > 0, gt, 0).astype(np.float32), header(0.0))
    recovery = ScaleRecovery(sparse_config())
    # Without a previous estimate: no scale.
    with pytest.raises(ScaleInputError) as raised:
        recovery.add_sparse_depth(KEY, BAD_SPARSE[case](header(0.0)))
    assert raised.value.reason == reason and raised.value.key == KEY
    assert recovery.estimate(KEY, header(0.0), rel) is None
    assert recovery.last_estimate(KEY).reason == reason
    assert recovery.errors == {reason: 1}
    # With one: kept, marked stale, same scale.
    recovery.add_sparse_depth(KEY, good)
    before = recovery.estimate(KEY, header(0.0), rel)
    with pytest.raises(ScaleInputError):
        recovery.add_sparse_depth(KEY, BAD_SPARSE[case](header(0.1)))
    after = recovery.estimate(KEY, header(0.1), rel)
    assert after.status == 'stale' and after.reason == reason
    assert (after.scale, after.shift) == (before.scale, before.shift)
    assert recovery.errors == {reason: 2}


def test_sparse_depth_of_another_aspect_ratio_is_refused():
    gt, rel, _, _, _ = rendered(6, 48, 64)
    recovery = ScaleRecovery(sparse_config())
    recovery.add_sparse_depth(KEY, depth_to_image(np.ones((45, 80), np.float32), header(0.0)))
    assert recovery.estimate(KEY, header(0.0), rel) is None
    assert recovery.last_estimate(KEY).reason == 'sparse_depth_size_mismatch'
    assert '80x45' in str(recovery.last_error) and '64x48' in str(recovery.last_error)


def _behind(points):
    # Rotated half a turn about the vertical axis: everything is behind the camera.
    return to_lidar(points * np.array([-1.0, 1.0, -1.0]))


def _outside(points):
    # Far to the side of the camera, in front of it.
    return to_lidar(points + np.array([100.0, 0.0, 0.0]))


BAD_POINTS = {
    'points_missing_field': lambda pts, hdr: cloud(to_lidar(pts), hdr, names=('x', 'y')),
    'points_unsupported_datatype': lambda pts, hdr: cloud(to_lidar(pts), hdr, dtype='<i2'),
    'points_empty': lambda pts, hdr: cloud(np.full((5, 3), np.nan), hdr),
    'points_behind_camera': lambda pts, hdr: cloud(_behind(pts), hdr),
    'points_outside_image': lambda pts, hdr: cloud(_outside(pts), hdr),
}


@pytest.mark.parametrize('reason', sorted(BAD_POINTS))
def test_bad_points_are_refused_with_their_reason(reason):
    rel, camera, points, _, _ = lidar_scene(seed=3, n_points=400)
    recovery = ScaleRecovery(points_config())
    recovery.add_points(KEY, cloud(to_lidar(points), header(0.0, LIDAR)))
    before = recovery.estimate(KEY, header(0.0), rel, camera)
    assert before.status == 'ok'
    bad = BAD_POINTS[reason](points, header(0.1, LIDAR))
    try:
        recovery.add_points(KEY, bad)
    except ScaleInputError as error:  # conversion problems are raised at once
        assert error.reason == reason
    after = recovery.estimate(KEY, header(0.1), rel, camera)
    assert after.status == 'stale' and after.reason == reason
    assert (after.scale, after.shift) == (before.scale, before.shift)
    assert recovery.errors == {reason: 1}
    fresh = ScaleRecovery(points_config())
    try:
        fresh.add_points(KEY, bad)
    except ScaleInputError:
        pass
    assert fresh.estimate(KEY, header(0.1), rel, camera) is None
    assert fresh.last_estimate(KEY).reason == reason


def test_identity_default_extrinsic_only_for_clouds_in_the_camera_frame():
    rel, camera, points, scale, _ = lidar_scene(seed=7, n_points=300)
    recovery = ScaleRecovery(ScaleRecoveryConfig(source='points', use_tf=False))
    recovery.add_points(KEY, cloud(points, header(0.0, FRAME)))
    assert recovery.estimate(KEY, header(0.0), rel, camera).scale == \
        pytest.approx(scale, rel=0.02)
    recovery.add_points(KEY, cloud(to_lidar(points), header(1.0, LIDAR)))
    assert recovery.estimate(KEY, header(1.0), rel, camera).reason == 'no_transform'
    assert 'extrinsic_translation' in str(recovery.last_error)


def test_points_without_camera_info():
    rel, _, points, _, _ = lidar_scene(seed=4, n_points=100)
    recovery = ScaleRecovery(points_config())
    recovery.add_points(KEY, cloud(to_lidar(points), header(0.0, LIDAR)))
    assert recovery.estimate(KEY, header(0.0), rel, None) is None
    assert recovery.last_estimate(KEY).reason == 'no_camera_info'


# Accuracy and sequences


def test_accuracy_within_1_1x_of_oracle_through_messages():
    # The requirement end to end: 0.5 % of pixels, 5 % gross outliers, 2 % noise,
    # as a 32FC1 message; mean AbsRel over scenes within 1.1x of the oracle fit.
    recovered, oracle = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        gt, rel = synthetic_scene(rng)
        sparse = sparse_image(rng, gt, fraction=0.005, outlier_rate=0.05, noise=0.02)
        recovery = ScaleRecovery(sparse_config())
        recovery.add_sparse_depth(KEY, depth_to_image(sparse.astype(np.float32), header(0.0)))
        estimate = recovery.estimate(KEY, header(0.0), rel.astype(np.float32))
        metric, _ = apply_scale(estimate, rel)
        recovered.append(abs_rel(metric, gt))
        oracle.append(oracle_abs_rel(rel, gt))
    assert np.mean(recovered) <= 1.1 * np.mean(oracle)


def test_sequence_converges_holds_through_dropout_then_expires():
    rng = np.random.default_rng(9)
    gt, rel = synthetic_scene(rng)
    s_true = np.polyfit(rel.ravel(), gt.ravel(), 1)[0]
    recovery = ScaleRecovery(sparse_config(stale_after_s=0.3, max_stale_s=1.0))
    scales = []
    for k in range(10):  # 10 Hz with sparse input
        sparse = sparse_image(rng, gt).astype(np.float32)
        recovery.add_sparse_depth(KEY, depth_to_image(sparse, header(0.1 * k)))
        estimate = recovery.estimate(KEY, header(0.1 * k), rel)
        assert estimate.status == 'ok'
        scales.append(estimate.scale)
    assert all(abs(s / s_true - 1.0) < 0.03 for s in scales[2:])
    held = scales[-1]
    # The sparse input drops out: held while younger than max_stale_s, stale after 0.3 s.
    for stamp in (1.0, 1.2, 1.3, 1.5, 1.85):
        estimate = recovery.estimate(KEY, header(stamp), rel)
        assert estimate.scale == held
        assert estimate.status == ('ok' if stamp - 0.9 <= 0.3 + 1e-9 else 'stale')
    assert recovery.last_estimate(KEY).reason == 'no_sparse_input'
    assert recovery.estimate(KEY, header(1.95), rel) is None
    assert recovery.last_estimate(KEY).status == 'no_estimate'
    # Back: a fresh fit at once.
    recovery.add_sparse_depth(KEY, depth_to_image(sparse_image(rng, gt).astype(np.float32),
                                                  header(2.5)))
    assert recovery.estimate(KEY, header(2.5), rel).status == 'ok'


def test_a_reading_is_fused_once_however_many_frames_it_matches():
    """A 10 Hz sensor and a 30 Hz camera: each reading updates the tracker once."""
    rng = np.random.default_rng(4)
    gt, rel = synthetic_scene(rng)
    # The scene's scale changes at the second reading.
    readings = [(factor * sparse_image(rng, gt)).astype(np.float32) for factor in (1.0, 1.3)]
    results = {}
    for frames_per_reading in (1, 3):
        recovery = ScaleRecovery(sparse_config(smoothing=0.3))
        for k, sparse in enumerate(readings):
            stamp = 0.1 * k
            recovery.add_sparse_depth(KEY, depth_to_image(sparse, header(stamp)))
            for j in range(frames_per_reading):  # frames 0, 10, 20 ms after the reading
                estimate = recovery.estimate(KEY, header(stamp + 0.01 * j), rel)
        results[frames_per_reading] = estimate
    assert results[3].status == 'ok'
    # Fusing the second reading three times would move the smoothed scale further.
    assert results[3].scale == pytest.approx(results[1].scale, rel=1e-9)


def test_a_slow_reading_is_fitted_to_each_frame_it_matches():
    """Without smoothing, a reading matched by several frames is fitted to each one's depth."""
    rng = np.random.default_rng(5)
    gt, rel = synthetic_scene(rng)
    recovery = ScaleRecovery(sparse_config())
    sparse = sparse_image(rng, gt).astype(np.float32)
    recovery.add_sparse_depth(KEY, depth_to_image(sparse, header(0.0)))
    first = recovery.estimate(KEY, header(0.0), rel)
    # The next frame's prediction is normalised differently (its view's range changed).
    second = recovery.estimate(KEY, header(0.02), 0.5 * rel + 0.2)
    assert first.status == second.status == 'ok'
    assert second.scale == pytest.approx(2.0 * first.scale, rel=0.02)
    assert second.shift == pytest.approx(first.shift - 0.4 * first.scale,
                                         abs=0.02 * first.scale)


def test_source_none_never_estimates():
    recovery = ScaleRecovery()
    assert recovery.estimate(KEY, header(0.0), np.zeros((4, 4))) is None
    with pytest.raises(ValueError, match='H x W'):
        ScaleRecovery(sparse_config()).estimate(KEY, header(0.0), np.zeros(4))


def test_sparse_points_pair_a_frame_as_estimate_does():
    """The points guidance gets before inference are the pairs estimate() fits on."""
    gt, rel, scale, shift, _ = rendered(1, 48, 64)
    fine = np.repeat(np.repeat(gt, 2, axis=0), 2, axis=1)
    fine[np.random.default_rng(1).random(fine.shape) > 0.02] = np.nan
    recovery = ScaleRecovery(sparse_config(match_tolerance_s=0.05))
    recovery.add_sparse_depth(KEY, depth16(fine, header(5.0)))
    uv, metric = recovery.sparse_points(KEY, header(5.01), (48, 64))
    assert uv.shape == (int(np.isfinite(fine).sum()), 2) and metric.shape == uv.shape[:1]
    # Each reading lands on the frame pixel of its parent, in millimetres.
    np.testing.assert_allclose(metric, gt[uv[:, 1], uv[:, 0]], atol=6e-4)
    estimate = recovery.estimate(KEY, header(5.01), rel)
    assert estimate.n_points == len(metric)
    # Any grid: the image's size when the depth is smaller.
    uv_half, metric_half = recovery.sparse_points(KEY, header(5.0), (24, 32))
    assert np.all(uv_half.max(axis=0) <= [31, 23]) and len(metric_half) == len(metric)
    # No reading within the tolerance, or no source: a reason, nothing counted.
    with pytest.raises(ScaleInputError) as error:
        recovery.sparse_points(KEY, header(5.2), (48, 64))
    assert error.value.reason == 'no_sparse_input'
    with pytest.raises(ScaleInputError, match='none'):
        ScaleRecovery().sparse_points(KEY, header(5.0), (48, 64))
    assert recovery.errors == {}


def test_sparse_points_of_lidar_need_the_camera_and_project_like_estimate():
    rel, camera, points, scale, shift = lidar_scene()
    recovery = ScaleRecovery(points_config())
    assert recovery.points_need_camera
    recovery.add_points(KEY, cloud(to_lidar(points), header(3.0, LIDAR)))
    with pytest.raises(ScaleInputError) as error:
        recovery.sparse_points(KEY, header(3.0), rel.shape)
    assert error.value.reason == 'no_camera_info'
    uv, metric = recovery.sparse_points(KEY, header(3.0), rel.shape, camera)
    seen = np.isfinite(rel[uv[:, 1], uv[:, 0]])
    assert seen.mean() > 0.9
    # The projected LiDAR depth is the scene's depth at its pixel (rel * scale + shift).
    error = np.abs(rel[uv[:, 1], uv[:, 0]][seen] * scale + shift - metric[seen]) / metric[seen]
    assert np.median(error) < 0.02
    estimate = recovery.estimate(KEY, header(3.0), rel, camera)
    assert estimate.n_points == int(seen.sum())


def test_guided_estimates_and_fallbacks_in_diagnostics():
    from marigold_model.guidance import GuidanceError, GuidedResult
    recovery = ScaleRecovery(sparse_config(guidance=True))
    fit = scale_estimate(2.0, 0.5, n_points=40)
    result = GuidedResult(depth=np.ones((4, 4), np.float32), scale=2.2, shift=0.4,
                          global_fit=fit, inlier_ratio=0.95, residual=0.01, n_points=40,
                          relative=np.ones((4, 4), np.float32))
    estimate = recovery.guided_estimate(KEY, header(1.0), result)
    assert (estimate.scale, estimate.shift, estimate.reason) == (2.2, 0.4, 'guided')
    assert estimate.usable and recovery.last_estimate(KEY) is estimate
    fields = dict(recovery.diagnostic_fields(KEY))
    assert fields['scale_guidance'] == 'guided' and float(fields['scale']) == 2.2
    assert fields['scale_global_fit'].startswith('scale 2, shift 0.5 m')
    recovery.guidance_failed(KEY, GuidanceError('too_few_points', '3 valid sparse points'))
    assert recovery.errors == {'guidance_too_few_points': 1}
    recovery.estimate(KEY, header(2.0), np.zeros((4, 4)))  # the fallback, no input
    fields = dict(recovery.diagnostic_fields(KEY))
    assert fields['scale_guidance'] == 'global_fit' and fields['scale_global_fit'] == ''
    assert 'guidance_too_few_points=1' in fields['scale_input_errors']
    # Guidance off: no guidance fields (diagnostics as before).
    assert 'scale_guidance' not in dict(ScaleRecovery(sparse_config()).diagnostic_fields(KEY))


# Metric outputs


def test_local_refinement_is_opt_in_and_beats_the_global_fit():
    ratios = []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        gt, rel = synthetic_scene(rng)
        msg = depth_to_image(sparse_image(rng, gt, fraction=0.01).astype(np.float32),
                             header(0.0))
        plain = ScaleRecovery(sparse_config())
        plain.add_sparse_depth(KEY, msg)
        global_estimate = plain.estimate(KEY, header(0.0), rel)
        assert not isinstance(global_estimate, RefinedScaleEstimate)
        local = ScaleRecovery(sparse_config(local_refinement=True))
        local.add_sparse_depth(KEY, msg)
        refined_estimate = local.estimate(KEY, header(0.0), rel)
        assert isinstance(refined_estimate, RefinedScaleEstimate)
        assert refined_estimate.scale == global_estimate.scale
        unc = np.full(rel.shape, 0.01)
        refined, refined_unc = apply_scale(refined_estimate, rel, unc)
        np.testing.assert_array_equal(refined, refined_estimate.apply(rel))
        # The uncertainty follows the local correction factor.
        np.testing.assert_allclose(refined_unc / refined,
                                   0.01 * refined_estimate.scale
                                   / global_estimate.apply(rel), rtol=1e-4)
        ratios.append(abs_rel(refined, gt) / abs_rel(global_estimate.apply(rel), gt))
    assert max(ratios) < 0.9
    # Stale estimates are not refined (old points do not describe the new frame).
    assert not isinstance(local.estimate(KEY, header(1.0), rel), RefinedScaleEstimate)
    with pytest.raises(ValueError, match='grid'):
        refined_estimate.apply(rel[:10])


def test_status_fields_and_diagnostics():
    fields = dict(status_fields(scale_estimate(2.5, 0.1)))
    assert fields['scale_status'] == 'ok' and float(fields['scale']) == 2.5
    assert float(fields['scale_shift']) == pytest.approx(0.1)
    assert set(fields) == {'scale_status', 'scale', 'scale_shift', 'scale_inlier_ratio',
                           'scale_residual', 'scale_points', 'scale_age_s', 'scale_reason'}
    none = dict(status_fields(None, reason='no_transform'))
    assert none['scale_status'] == 'no_estimate' and none['scale_reason'] == 'no_transform'
    recovery = ScaleRecovery(sparse_config())
    with pytest.raises(ScaleInputError):
        recovery.add_sparse_depth(KEY, _sparse_rgb(header(0.0)))
    recovery.estimate(KEY, header(0.0), np.zeros((4, 4)))
    diag = dict(recovery.diagnostic_fields(KEY))
    assert diag['scale_reason'] == 'sparse_depth_unknown_encoding'
    assert diag['scale_input_errors'] == 'sparse_depth_unknown_encoding=1'
    assert 'rgb8' in diag['scale_last_error'] and diag['scale_source'] == 'sparse_depth'
    unseen = dict(recovery.diagnostic_fields('unseen'))
    assert unseen['scale_reason'] == 'no_sparse_input'
    assert unseen['scale_input_errors'] == 'none' and unseen['scale_last_error'] == ''


# attach: subscriptions, tf fallback, throttled logs


class FakeLogger:
    """Record log calls."""

    def __init__(self):
        """Start empty."""
        self.lines = []

    def error(self, message, **kwargs):
        """Record an error line."""
        self.lines.append(('error', message))

    def warning(self, message, **kwargs):
        """Record a warning line."""
        self.lines.append(('warning', message))


class FakeNode:
    """The part of rclpy.Node that attach uses."""

    def __init__(self):
        """Start without subscriptions."""
        self.logger = FakeLogger()
        self.created = []

    def get_logger(self):
        """Return the recording logger."""
        return self.logger

    def create_subscription(self, msg_type, topic, callback, qos):
        """Record a subscription and return its description."""
        self.created.append((msg_type, topic, callback, qos))
        return topic

    def destroy_subscription(self, subscription):
        """Forget a subscription."""
        self.created = [c for c in self.created if c[1] != subscription]


def test_attach_subscribes_and_logs_each_problem_throttled():
    node = FakeNode()
    recovery = ScaleRecovery(sparse_config(error_throttle_s=3600.0))
    assert recovery.attach(node, 'cam', qos=5) == ['cam/sparse_depth']
    (msg_type, topic, callback, qos), = node.created
    assert msg_type is Image and qos == 5
    for _ in range(3):
        callback(_sparse_rgb(header(0.0)))  # no exception escapes the callback
    callback(depth16(np.zeros((4, 4)), header(0.1)))
    assert recovery.errors == {'sparse_depth_unknown_encoding': 3,
                               'sparse_depth_no_readings': 1}
    # One line per reason within the throttle period, naming the problem and the camera.
    assert len(node.logger.lines) == 2
    assert all(level == 'error' and '[cam]' in line for level, line in node.logger.lines)
    assert "'rgb8'" in node.logger.lines[0][1]
    recovery.detach()
    assert node.created == []
    assert ScaleRecovery().attach(FakeNode(), 'cam') == []  # source 'none'


def test_attach_points_uses_parameters_without_tf2(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tf2(name, *args, **kwargs):
        if name == 'tf2_ros':
            raise ImportError('No module named tf2_ros')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_tf2)
    node = FakeNode()
    recovery = ScaleRecovery(points_config(use_tf=True))
    assert recovery.attach(node, '') == ['points_in']
    assert recovery.transform_source == 'parameters'
    assert node.logger.lines[0][0] == 'warning' and 'tf2_ros' in node.logger.lines[0][1]
    assert node.created[0][0] is PointCloud2
    # The parameters are used: the LiDAR scene is recovered.
    rel, camera, points, scale, _ = lidar_scene(seed=5, n_points=300)
    node.created[0][2](cloud(to_lidar(points), header(1.0, LIDAR)))
    assert recovery.estimate('', header(1.0), rel, camera).scale == \
        pytest.approx(scale, rel=0.02)
    quiet = FakeNode()
    ScaleRecovery(points_config(use_tf=False)).attach(quiet, 'cam')
    assert quiet.logger.lines == []


def test_attach_points_starts_one_tf2_listener_and_detach_stops_it(monkeypatch):
    import sys
    import types
    listeners = []

    class TransformListener:
        """Record the listener made on the node, and its unregistering."""

        def __init__(self, buffer, node):
            self.buffer, self.node, self.unregistered = buffer, node, False
            listeners.append(self)

        def unregister(self):
            self.unregistered = True

    fake = types.SimpleNamespace(Buffer=FakeBuffer, TransformListener=TransformListener)
    monkeypatch.setitem(sys.modules, 'tf2_ros', fake)
    node = FakeNode()
    recovery = ScaleRecovery(points_config(use_tf=True))
    recovery.attach(node, 'left')
    recovery.attach(node, 'right')
    assert recovery.transform_source == 'tf2' and len(listeners) == 1
    assert [c[1] for c in node.created] == ['left/points_in', 'right/points_in']
    # The LiDAR extrinsic is looked up in the listener's buffer at the cloud stamp.
    rel, camera, points, scale, _ = lidar_scene(seed=4, n_points=300)
    node.created[0][2](cloud(to_lidar(points), header(1.0, LIDAR)))
    assert recovery.estimate('left', header(1.0), rel, camera).scale == \
        pytest.approx(scale, rel=0.02)
    assert listeners[0].buffer.calls == [(FRAME, LIDAR, 1_000_000_000)]
    recovery.detach()
    assert listeners[0].unregistered and node.created == []


def test_attach_on_an_rclpy_node_receives_messages():
    rclpy = pytest.importorskip('rclpy')
    from rclpy.executors import SingleThreadedExecutor
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = rclpy.create_node('scale_recovery_test', context=context)
        recovery = ScaleRecovery(points_config(use_tf=False))
        recovery.attach(node, 'cam', qos=10, key=KEY)
        assert [s.topic_name for s in node.subscriptions] == ['/cam/points_in']
        publisher = node.create_publisher(PointCloud2, 'cam/points_in', 10)
        rel, camera, points, scale, _ = lidar_scene(seed=6, n_points=300)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        # Discovery first: a cloud published before the subscription matched is lost.
        deadline = time.monotonic() + 60.0  # turns a hang into a failure; never the pass
        while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.02)
        assert publisher.get_subscription_count() == 1
        publisher.publish(cloud(to_lidar(points), header(1.0, LIDAR)))
        estimate = None
        while estimate is None and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.02)
            estimate = recovery.estimate(KEY, header(1.0), rel, camera)
        assert estimate is not None and estimate.scale == pytest.approx(scale, rel=0.02)
        recovery.detach()
        assert list(node.subscriptions) == []
        executor.shutdown()
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


# The pipeline (marigold_ros.pipeline) with this scale source


def test_plugs_into_the_depth_pipeline():
    pipeline_module = pytest.importorskip('marigold_ros.pipeline')
    from marigold_ros.conversions import image_to_depth
    sample = render_scene(np.random.default_rng(8), height=48, width=64)
    gt = sample.depth.astype(np.float64)
    rel = ((gt - gt.min()) / (gt.max() - gt.min())).astype(np.float32)

    camera = CameraModel(width=64, height=48, K=sample.K, frame_id=FRAME)
    recovery = ScaleRecovery(sparse_config(stale_after_s=0.2, max_stale_s=0.5))
    pipeline = pipeline_module.DepthPipeline(
        FakeEstimator(lambda height, width: rel, uncertainty=0.01), scale_source=recovery)

    def frame(stamp):
        hdr = header(stamp)
        return pipeline_module.FrameInput(image=rgb_to_image(sample.rgb, hdr),
                                          camera_info=camera.to_msg(hdr), key=KEY)

    sparse = np.where(np.random.default_rng(8).random(gt.shape) < 0.03, gt, 0.0)
    recovery.add_sparse_depth(KEY, depth_to_image(sparse.astype(np.float32), header(10.0)))
    output, = pipeline.process([frame(10.0)])
    assert output.scale.status == 'ok' and 'no_metric_scale' not in output.notes
    assert abs_rel(image_to_depth(output.metric), gt) < 0.01
    np.testing.assert_allclose(image_to_depth(output.uncertainty),
                               0.01 * output.scale.scale, rtol=1e-5)
    assert output.points is not None
    assert dict(recovery.diagnostic_fields(KEY))['scale_status'] == 'ok'
    # Without sparse input the estimate is held, then the output goes back to relative.
    held, = pipeline.process([frame(10.3)])
    assert held.scale.status == 'stale' and held.metric is not None
    gone, = pipeline.process([frame(10.6)])
    assert gone.scale is None and gone.metric is None and gone.points is None
    assert 'no_metric_scale' in gone.notes
    assert dict(recovery.diagnostic_fields(KEY))['scale_reason'] == 'no_sparse_input'
