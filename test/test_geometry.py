"""Tier-1 tests of marigold_ros.geometry: camera model, scaling, distortion, transforms."""

from functools import partial
import math

from marigold_ros.geometry import CalibrationError
from marigold_ros.geometry import CameraModel
from marigold_ros.geometry import distort_normalized
from marigold_ros.geometry import pixel_rays
from marigold_ros.geometry import project_points
from marigold_ros.geometry import quaternion_to_matrix
from marigold_ros.geometry import Roi
from marigold_ros.geometry import scale_camera
from marigold_ros.geometry import transform_points
from marigold_ros.geometry import undistort_normalized
from marigold_ros.geometry import unproject_depth
from msg_builders import camera_info
import numpy as np
import pytest
from std_msgs.msg import Header

FX, FY, CX, CY = 80.0, 90.0, 31.5, 22.0
W, H = 64, 48
K = np.array([[FX, 0.0, CX], [0.0, FY, CY], [0.0, 0.0, 1.0]])

PLUMB_BOB = [-0.28, 0.07, 0.001, -0.0015, 0.01]
RATIONAL = [0.3, -0.05, 0.0008, 0.0012, 0.002, 0.65, -0.02, 0.004]


_info = partial(camera_info, K, W, H)  # the test camera; keyword fields are set as given


# ----------------------------------------------------------------- unprojection


def test_fronto_parallel_plane_exact():
    d = 2.5
    points = unproject_depth(np.full((H, W), d, np.float32), K)
    assert points.shape == (H, W, 3) and points.dtype == np.float32
    assert np.all(points[:, :, 2] == np.float32(d))
    v, u = np.mgrid[0:H, 0:W]
    np.testing.assert_allclose(points[:, :, 0], (u - CX) * d / FX, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(points[:, :, 1], (v - CY) * d / FY, rtol=1e-6, atol=1e-6)


def test_tilted_plane_satisfies_plane_equation():
    normal = np.array([0.3, -0.2, 1.0])
    c = 3.0
    v, u = np.mgrid[0:H, 0:W]
    # Independent pinhole: the ray through (u, v) is ((u - cx) / fx, (v - cy) / fy, 1).
    ray_dot_n = normal[0] * (u - CX) / FX + normal[1] * (v - CY) / FY + normal[2]
    depth = (c / ray_dot_n).astype(np.float32)
    points = unproject_depth(depth, K).astype(np.float64)
    residual = points @ normal - c
    assert np.max(np.abs(residual)) < 1e-5 * c


def test_invalid_depth_gives_nan_points():
    depth = np.ones((H, W), np.float32)
    depth[0, 0] = np.nan
    depth[1, 1] = 0.0
    depth[2, 2] = -1.0
    depth[3, 3] = np.inf
    points = unproject_depth(depth, K)
    for r in range(4):
        assert np.all(np.isnan(points[r, r]))
    assert np.isfinite(points).all(axis=2).sum() == H * W - 4


def test_pixel_rays_are_cached_and_read_only():
    first = pixel_rays(H, W, K)
    second = pixel_rays(H, W, K.copy())
    assert first[0] is second[0]
    assert not first[0].flags.writeable


def test_unproject_with_model_checks_size():
    model = CameraModel.from_msg(_info())
    assert unproject_depth(np.ones((H, W), np.float32), model).shape == (H, W, 3)
    with pytest.raises(ValueError, match='scale_camera'):
        unproject_depth(np.ones((H // 2, W // 2), np.float32), model)


# ----------------------------------------------------------------- camera model


def test_from_msg_to_msg_round_trip_and_zero_p():
    model = CameraModel.from_msg(_info(p=[0.0] * 12, d=PLUMB_BOB))
    np.testing.assert_array_equal(model.P, np.hstack([K, np.zeros((3, 1))]))
    assert model.frame_id == 'cam_optical' and model.has_distortion
    msg = model.to_msg(Header(frame_id='other'))
    assert msg.header.frame_id == 'other'
    back = CameraModel.from_msg(msg)
    np.testing.assert_array_equal(back.K, model.K)
    np.testing.assert_array_equal(back.D, PLUMB_BOB)
    assert back.distortion_model == 'plumb_bob' and (back.width, back.height) == (W, H)
    with pytest.raises(ValueError):
        model.K[0, 0] = 1.0  # read-only


@pytest.mark.parametrize('overrides, reason', [
    ({'k': [0.0] * 9}, 'uncalibrated'),
    ({'k': [0.0, 0, CX, 0, FY, CY, 0, 0, 1]}, 'bad_focal_length'),
    ({'k': [FX, 0, CX, 0, 0.0, CY, 0, 0, 1]}, 'bad_focal_length'),
    ({'k': [math.nan, 0, CX, 0, FY, CY, 0, 0, 1]}, 'bad_focal_length'),
    ({'k': [math.inf, 0, CX, 0, FY, CY, 0, 0, 1]}, 'bad_focal_length'),
    ({'k': [FX, 0, math.nan, 0, FY, CY, 0, 0, 1]}, 'bad_principal_point'),
    ({'width': 0}, 'bad_size'),
    ({'height': 0}, 'bad_size'),
    ({'distortion_model': 'fancy', 'd': [0.1, 0.0]}, 'unknown_distortion_model'),
    ({'d': [0.1, 0.0, 0.0, 0.0, 0.0, 0.3]}, 'bad_distortion'),
    ({'d': [math.nan] * 5}, 'bad_distortion'),
])
def test_bad_calibration_rejected(overrides, reason):
    with pytest.raises(CalibrationError) as err:
        CameraModel.from_msg(_info(**overrides))
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


def test_bad_roi_rejected():
    msg = _info()
    msg.roi.x_offset, msg.roi.width, msg.roi.height = 40, 40, 10
    with pytest.raises(CalibrationError) as err:
        CameraModel.from_msg(msg)
    assert err.value.reason == 'bad_roi'


# ----------------------------------------------------------------- scaling


def _ray(k, u, v):
    """Independent pinhole ray (x / z, y / z) through a possibly fractional pixel."""
    return (u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1]


def test_half_size_gives_same_rays_at_corresponding_pixels():
    model = CameraModel.from_msg(_info(p=[FX, 0, CX, -8.0, 0, FY, CY, 0, 0, 0, 1, 0]))
    half = scale_camera(model, W // 2, H // 2)
    assert (half.width, half.height) == (W // 2, H // 2)
    # Pixel-centre convention chosen for bilinear align_corners=False resizing.
    assert half.cx == pytest.approx((CX + 0.5) / 2 - 0.5)
    assert half.fx == pytest.approx(FX / 2) and half.fy == pytest.approx(FY / 2)
    assert half.P[0, 3] == pytest.approx(-4.0) and half.P[0, 2] == pytest.approx(half.cx)
    rx, ry, ok = pixel_rays(half.height, half.width, half.K)
    assert ok.all()
    v, u = np.mgrid[0:H // 2, 0:W // 2]
    # Output pixel (u', v') is interpolated from input point (2 u' + 0.5, 2 v' + 0.5).
    ex, ey = _ray(K, 2 * u + 0.5, 2 * v + 0.5)
    np.testing.assert_allclose(rx, ex, atol=1e-6)
    np.testing.assert_allclose(ry, ey, atol=1e-6)
    # Same 3-D points from a constant depth at corresponding pixels.
    pts = unproject_depth(np.full((H // 2, W // 2), 4.0, np.float32), half)
    np.testing.assert_allclose(pts[:, :, 0], ex * 4.0, atol=1e-5)
    assert scale_camera(model, W, H).K.tolist() == model.K.tolist()


def test_binning_and_roi_folded_into_intrinsics():
    full_w, full_h = 640, 480
    k = np.array([[500.0, 0.0, 320.5], [0.0, 510.0, 240.25], [0.0, 0.0, 1.0]])
    msg = _info(width=full_w, height=full_h, k=k.ravel().tolist(),
                p=np.hstack([k, np.zeros((3, 1))]).ravel().tolist(), binning_x=2,
                binning_y=2)
    msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height = 100, 50, 320, 240
    model = CameraModel.from_msg(msg)
    eff = model.effective()
    assert (eff.width, eff.height) == (160, 120)
    assert eff.binning_x == 0 and eff.binning_y == 0 and eff.roi == Roi()
    out = scale_camera(model, 160, 120)
    info = out.to_msg(Header(frame_id='cam_optical'))
    assert info.binning_x == 0 and info.roi.width == 0 and (info.width, info.height) == (
        160, 120)
    # Binned pixel (j, i) averages raw pixels 2j..2j+1 of the ROI: its centre is the raw
    # point (100 + 2 j + 0.5, 50 + 2 i + 0.5).
    rx, ry, _ = pixel_rays(120, 160, np.asarray(info.k).reshape(3, 3))
    i, j = np.mgrid[0:120, 0:160]
    ex, ey = _ray(k, 100 + 2 * j + 0.5, 50 + 2 * i + 0.5)
    np.testing.assert_allclose(rx, ex, atol=1e-6)
    np.testing.assert_allclose(ry, ey, atol=1e-6)
    # And scaling the binned image further by 1/2 composes.
    quarter = scale_camera(model, 80, 60)
    rx, ry, _ = pixel_rays(60, 80, quarter.K)
    i, j = np.mgrid[0:60, 0:80]
    ex, ey = _ray(k, 100 + 4 * j + 1.5, 50 + 4 * i + 1.5)
    np.testing.assert_allclose(rx, ex, atol=1e-6)


def test_scale_camera_rejects_bad_size():
    with pytest.raises(ValueError):
        scale_camera(CameraModel.from_msg(_info()), 0, 10)


# ----------------------------------------------------------------- distortion


def _plumb_bob_reference(x, y, d):
    """Hand-written Brown-Conrady formula (OpenCV order k1 k2 p1 p2 k3), scalar."""
    k1, k2, p1, p2, k3 = d
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def _rational_reference(x, y, d):
    k1, k2, p1, p2, k3, k4, k5, k6 = d
    r2 = x * x + y * y
    radial = (1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3) / (
        1 + k4 * r2 + k5 * r2 ** 2 + k6 * r2 ** 3)
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


_POINTS = [(0.0, 0.0, 2.0), (0.3, -0.2, 1.5), (-0.5, 0.35, 2.2), (0.1, 0.05, 0.7)]


@pytest.mark.parametrize('model_name, coeffs, reference', [
    ('plumb_bob', PLUMB_BOB, _plumb_bob_reference),
    ('rational_polynomial', RATIONAL, _rational_reference),
])
def test_projection_matches_hand_written_formula(model_name, coeffs, reference):
    model = CameraModel.from_msg(_info(distortion_model=model_name, d=coeffs))
    uv, z, mask = project_points(np.array(_POINTS), model)
    assert mask.all()
    for (px, py, pz), (u, v), depth in zip(_POINTS, uv, z):
        xd, yd = reference(px / pz, py / pz, coeffs)
        assert u == pytest.approx(FX * xd + CX, abs=1e-9)
        assert v == pytest.approx(FY * yd + CY, abs=1e-9)
        assert depth == pz


def test_projection_matches_opencv():
    cv2 = pytest.importorskip(
        'cv2', reason='OpenCV is the reference here: pip install opencv-python-headless '
        '(requirements-dev.txt, which `make test` installs)')
    for name, coeffs in (('plumb_bob', PLUMB_BOB), ('rational_polynomial', RATIONAL)):
        model = CameraModel.from_msg(_info(distortion_model=name, d=coeffs))
        pts = np.array(_POINTS)
        expected, _ = cv2.projectPoints(pts, np.zeros(3), np.zeros(3), K, np.array(coeffs))
        uv, _, _ = project_points(pts, model)
        np.testing.assert_allclose(uv, expected.reshape(-1, 2), atol=1e-6)


def test_equidistant_distortion_formula():
    coeffs = [0.1, -0.02, 0.003, -0.0004]
    x, y = 0.4, -0.3
    r = math.hypot(x, y)
    theta = math.atan(r)
    theta_d = theta * (1 + coeffs[0] * theta ** 2 + coeffs[1] * theta ** 4
                       + coeffs[2] * theta ** 6 + coeffs[3] * theta ** 8)
    xd, yd = distort_normalized(x, y, coeffs, 'equidistant')
    assert xd == pytest.approx(x * theta_d / r, abs=1e-12)
    assert yd == pytest.approx(y * theta_d / r, abs=1e-12)


@pytest.mark.parametrize('model_name, coeffs', [
    ('plumb_bob', PLUMB_BOB), ('rational_polynomial', RATIONAL),
    ('equidistant', [0.1, -0.02, 0.003, -0.0004]),
])
def test_unproject_project_round_trip_with_distortion(model_name, coeffs):
    model = CameraModel.from_msg(_info(distortion_model=model_name, d=coeffs))
    depth = np.full((H, W), 3.0, np.float32)
    points = unproject_depth(depth, model)
    assert np.isfinite(points).all()
    uv, _, mask = project_points(points.reshape(-1, 3), model)
    assert mask.all()
    v, u = np.mgrid[0:H, 0:W]
    np.testing.assert_allclose(uv[:, 0], u.ravel(), atol=1e-3)
    np.testing.assert_allclose(uv[:, 1], v.ravel(), atol=1e-3)
    # Undistortion on its own inverts distortion to numerical precision.
    xd, yd = distort_normalized(0.2, -0.15, coeffs, model_name)
    x, y = undistort_normalized(xd, yd, coeffs, model_name)
    assert (float(x), float(y)) == pytest.approx((0.2, -0.15), abs=1e-9)


def test_equidistant_with_zero_coefficients_maps_by_angle():
    # A fisheye calibrated as k1..k4 = 0 is not a pinhole: the image radius is the angle.
    for d in ([0.0] * 4, []):
        model = CameraModel.from_msg(_info(distortion_model='equidistant', d=d))
        assert model.has_distortion
        points = unproject_depth(np.full((H, W), 2.0, np.float32), model)
        u = W - 1
        theta = (u - CX) / FX  # normalised image radius on the row through the centre
        row = int(CY)
        ray = points[row, u, 0] / points[row, u, 2]
        assert ray == pytest.approx(math.tan(theta), rel=1e-5)
        uv, _, mask = project_points(points.reshape(-1, 3), model)
        assert mask.all()
        v, u_grid = np.mgrid[0:H, 0:W]
        np.testing.assert_allclose(uv[:, 0], u_grid.ravel(), atol=1e-3)
        np.testing.assert_allclose(uv[:, 1], v.ravel(), atol=1e-3)
    # plumb_bob with zero coefficients stays the pinhole.
    assert not CameraModel.from_msg(_info()).has_distortion


def test_projection_masks_behind_outside_and_folded_points():
    model = CameraModel.from_msg(_info())
    pts = np.array([[0.0, 0.0, 1.0],        # principal point: inside
                    [0.0, 0.0, -1.0],       # behind
                    [0.0, 0.0, 0.0],        # on the camera centre
                    [10.0, 0.0, 1.0],       # far right, outside
                    [np.nan, 0.0, 1.0]])    # invalid
    uv, z, mask = project_points(pts, model)
    assert mask.tolist() == [True, False, False, False, False]
    assert uv[0].tolist() == [CX, CY] and z[1] == -1.0
    # Strong barrel distortion r (1 - 0.5 r^2) folds back beyond r = 1 / sqrt(1.5) ~ 0.82:
    # a point at r = 1.4 (xd = 0.028) would land near the image centre and must be rejected.
    folded = CameraModel.from_msg(_info(d=[-0.5, 0.0, 0.0, 0.0, 0.0]))
    far = np.array([[1.4, 0.0, 1.0]])
    xd, _ = distort_normalized(1.4, 0.0, [-0.5, 0, 0, 0, 0], 'plumb_bob')
    assert 0 <= FX * xd + CX < W  # the naive projection lands inside the image...
    assert not project_points(far, folded)[2][0]  # ...but is rejected
    assert project_points(np.array([[0.1, 0.0, 1.0]]), folded)[2][0]


def test_projection_uses_binning_and_roi():
    msg = _info(binning_x=2, binning_y=2)
    model = CameraModel.from_msg(msg)
    uv, _, mask = project_points(np.array([[0.0, 0.0, 1.0]]), model)
    assert mask[0]
    assert uv[0].tolist() == pytest.approx([(CX + 0.5) / 2 - 0.5, (CY + 0.5) / 2 - 0.5])


# ----------------------------------------------------------------- transforms


def test_quaternion_rotation_and_translation():
    s = math.sin(math.pi / 4)
    q = (0.0, 0.0, s, s)  # +90 degrees about z
    out = transform_points(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]]), (1.0, 2.0, 3.0), q)
    np.testing.assert_allclose(out, [[1.0, 3.0, 3.0], [0.0, 2.0, 5.0]], atol=1e-12)
    # Not normalised: same rotation.
    scaled = transform_points(np.array([[1.0, 0.0, 0.0]]), (0, 0, 0), np.array(q) * 3)
    np.testing.assert_allclose(scaled, [[0.0, 1.0, 0.0]], atol=1e-12)
    # float32 stays float32; a rotation matrix is orthonormal with det 1.
    pts32 = np.ones((4, 3), np.float32)
    assert transform_points(pts32, (0, 0, 0), (0.1, 0.2, 0.3, 0.9)).dtype == np.float32
    rot = quaternion_to_matrix((0.1, 0.2, 0.3, 0.9))
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)


def test_transform_inverse_round_trip_and_bad_input():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(50, 3))
    q = np.array([0.2, -0.4, 0.1, 0.85])
    t = np.array([0.5, -1.0, 2.0])
    moved = transform_points(pts, t, q)
    q_inv = np.array([-q[0], -q[1], -q[2], q[3]])
    back = transform_points(moved - t, (0, 0, 0), q_inv)
    np.testing.assert_allclose(back, pts, atol=1e-12)
    with pytest.raises(ValueError):
        transform_points(pts, t, (0, 0, 0, 0))
    with pytest.raises(ValueError):
        transform_points(pts[:, :2], t, q)


def test_implausible_calibration_is_named_not_refused():
    """Huge skew, fx/fy far from 1, a principal point outside, absurd distortion: listed."""
    good = CameraModel(640, 480, [[500.0, 0.0, 320.0], [0.0, 502.0, 240.0], [0, 0, 1]],
                       D=[-0.3, 0.1, 0.0, 0.0, 0.0], distortion_model='plumb_bob')
    assert good.implausibilities() == []
    bad = CameraModel(640, 480, [[500.0, 90.0, 900.0], [0.0, 150.0, 240.0], [0, 0, 1]],
                      D=[-0.3, 4000.0, 0.0, 0.0, 0.0], distortion_model='plumb_bob')
    found = bad.implausibilities()  # still a CameraModel: warn, don't refuse
    assert len(found) == 4, found
    assert any('skew' in text for text in found)
    assert any('fx/fy' in text and '3.33' in text for text in found)
    assert any('principal point (900, 240)' in text for text in found)
    assert any('distortion' in text and '4000' in text for text in found)


# ------------------------------------------------ values the mutation run asked for


def test_to_msg_defaults_plain_pinhole_and_roi_by_hand():
    """No header: the model's frame; no distortion: plumb_bob with 5 zeros; ROI copied."""
    roi = Roi(x_offset=4, y_offset=6, width=32, height=24, do_rectify=True)
    model = CameraModel(W, H, K, roi=roi, frame_id='cam_optical')
    msg = model.to_msg()
    assert msg.header.frame_id == 'cam_optical'
    assert msg.distortion_model == 'plumb_bob' and list(msg.d) == [0.0] * 5
    assert (msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height,
            msg.roi.do_rectify) == (4, 6, 32, 24, True)
    # A named model with zero coefficients keeps its name and its own number of zeros.
    plain = CameraModel(W, H, K, D=[0.0] * 8, distortion_model='rational_polynomial')
    assert not plain.has_distortion
    msg = plain.to_msg()
    assert msg.distortion_model == 'rational_polynomial' and list(msg.d) == [0.0] * 8


def test_calibration_error_carries_its_message():
    """The message names the problem (str of the error), the reason is the key."""
    with pytest.raises(CalibrationError, match='^camera size must be positive, got 0x48$') as err:
        CameraModel.from_msg(_info(width=0))
    assert err.value.reason == 'bad_size'


def test_quaternion_edge_cases_by_hand():
    """A norm of exactly 1e-12 is still a rotation (x by 180 degrees); below is refused."""
    np.testing.assert_allclose(quaternion_to_matrix([1e-12, 0.0, 0.0, 0.0]),
                               np.diag([1.0, -1.0, -1.0]), atol=1e-12)
    with pytest.raises(ValueError, match='^quaternion has zero norm$'):
        quaternion_to_matrix([1e-13, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r'^quaternion must be 4 finite values \(x, y, z, w\), '
                                         r'got \[0.0, 0.0, 1.0\]$'):
        quaternion_to_matrix([0.0, 0.0, 1.0])


def test_transform_points_image_shaped_and_messages():
    """(H, W, 3) points transform per point; bad shapes are named."""
    points = np.arange(12, dtype=np.float64).reshape(2, 2, 3)
    # 90 degrees about z: (x, y, z) -> (-y, x, z), then + (1, 2, 3).
    s = math.sqrt(0.5)
    out = transform_points(points, [1, 2, 3], [0.0, 0.0, s, s])
    expected = np.stack([1 - points[..., 1], 2 + points[..., 0], 3 + points[..., 2]], axis=-1)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    with pytest.raises(ValueError, match=r'^points must have shape \(\.\.\., 3\), got \(2, 4\)$'):
        transform_points(np.zeros((2, 4)), [0, 0, 0], [0, 0, 0, 1])
    with pytest.raises(ValueError, match='^translation must have 3 values, got 2$'):
        transform_points(np.zeros((2, 3)), [0, 0], [0, 0, 0, 1])


def test_scale_camera_size_limits_by_hand():
    """One pixel a side is a valid size; zero in either is refused, naming the size."""
    model = CameraModel.from_msg(_info())
    thin = scale_camera(model, 1, H)  # sx = 1 / 64: fx 80 / 64, cx (31.5 + 0.5) / 64 - 0.5
    assert (thin.width, thin.height) == (1, H)
    np.testing.assert_allclose(thin.K, [[1.25, 0, 0.0], [0, FY, CY], [0, 0, 1]], atol=1e-12)
    flat = scale_camera(model, W, 1)  # sy = 1 / 48: fy 90 / 48, cy 22.5 / 48 - 0.5
    np.testing.assert_allclose(flat.K, [[FX, 0, CX], [0, 1.875, -0.03125], [0, 0, 1]],
                               atol=1e-12)
    for size, text in (((0, 10), '0x10'), ((10, 0), '10x0')):
        with pytest.raises(ValueError, match=f'^new size must be positive, got {text}$'):
            scale_camera(model, *size)


def test_undistort_strong_barrel_by_hand():
    """k1 = -0.3: r_d = r (1 - 0.3 r^2) peaks at 0.703; beyond it there is no inverse (NaN)."""
    xd = np.array([0.3, 0.6, 0.45, 0.9, 0.05])
    yd = np.array([0.0, 0.0, 0.3, 0.0, -0.6])
    x, y = undistort_normalized(xd, yd, [-0.3, 0.0, 0.0, 0.0, 0.0], 'plumb_bob')
    ok = np.arange(5) != 3
    assert np.isnan(x[3]) and np.isnan(y[3])
    assert np.isfinite(x[ok]).all() and np.isfinite(y[ok]).all()
    r2 = x[ok] ** 2 + y[ok] ** 2  # the forward model, written out
    np.testing.assert_allclose(x[ok] * (1 - 0.3 * r2), xd[ok], atol=1e-9)
    np.testing.assert_allclose(y[ok] * (1 - 0.3 * r2), yd[ok], atol=1e-9)
    assert (r2 < 1 / 0.9).all()  # on the rising branch, r < sqrt(1 / 0.9)


# Mutation-testing follow-ups (issue 18): lens distortion values and bounds.


def test_distortion_returns_float64_and_handles_the_centre():
    x, y = distort_normalized(np.array([1, 0]), np.array([0, 2]), [], 'plumb_bob')
    assert x.dtype == np.float64 and y.dtype == np.float64
    assert x.tolist() == [1.0, 0.0] and y.tolist() == [0.0, 2.0]
    # Equidistant at and next to the axis: theta / r -> 1 (atan(r) = r to 1e-26 here).
    xd, yd = distort_normalized(np.array([0.0, 1e-13]), np.array([0.0, 0.0]), [], 'equidistant')
    assert xd.tolist() == [0.0, 1e-13] and yd.tolist() == [0.0, 0.0]


def test_equidistant_zero_coefficients_undistort_by_tangent():
    x, y = undistort_normalized(np.array([0.5, 0.0]), np.array([0.0, -1.2]), [0.0] * 4,
                                'equidistant')
    assert x == pytest.approx([math.tan(0.5), 0.0], abs=1e-9)
    assert y == pytest.approx([0.0, -math.tan(1.2)], abs=1e-9)


def test_equidistant_fold_back_is_the_equidistant_ones():
    """k1 = -0.5: theta (1 - theta^2 / 2) rises up to theta = sqrt(2 / 3), r = tan(0.8165)."""
    from marigold_ros.distortion import beyond_monotonic
    coeffs = [-0.5, 0.0, 0.0, 0.0]
    # r = 0.9 is inside (as plumb_bob k1 = -0.5 it would be past that model's 0.8165).
    assert not beyond_monotonic(np.array([0.9]), coeffs, 'equidistant')[0]
    assert beyond_monotonic(np.array([1.1]), coeffs, 'equidistant')[0]
    xd, yd = distort_normalized(0.9, 0.0, coeffs, 'equidistant')
    x, y = undistort_normalized(xd, yd, coeffs, 'equidistant')
    assert (float(x), float(y)) == pytest.approx((0.9, 0.0), abs=1e-9)


def test_monotonic_limit_is_inclusive():
    from marigold_ros.distortion import _monotonic_radius, beyond_monotonic
    coeffs = (-0.5, 0.0, 0.0, 0.0, 0.0)
    limit = _monotonic_radius(coeffs, 'plumb_bob')
    assert limit == pytest.approx(1.0 / math.sqrt(1.5), abs=2e-4)
    radii = np.array([limit, np.nextafter(limit, 1.0)])
    assert beyond_monotonic(radii, coeffs, 'plumb_bob').tolist() == [False, True]


@pytest.mark.parametrize('model_name, coeffs', [
    ('plumb_bob', [-0.4, 0.15, 0.02, -0.03, 0.0]),
    ('rational_polynomial', [0.5, -0.2, 0.01, 0.02, 0.05, 0.3, -0.1, 0.02]),
    ('equidistant', [0.3, -0.2, 0.05, -0.01]),
])
def test_strong_distortion_undistorts_everywhere_inside_the_fold(model_name, coeffs):
    """Off-axis points of a strong model: Newton with the right Jacobian converges."""
    from marigold_ros.distortion import _monotonic_radius
    limit = min(_monotonic_radius(tuple(coeffs), model_name), 2.0)
    angle = np.linspace(0.0, 2.0 * np.pi, 24, endpoint=False)
    radius = np.linspace(0.05, 0.97 * limit, 15)
    x = (radius[:, None] * np.cos(angle)).ravel()
    y = (radius[:, None] * np.sin(angle)).ravel()
    xd, yd = distort_normalized(x, y, coeffs, model_name)
    xu, yu = undistort_normalized(xd, yd, coeffs, model_name)
    np.testing.assert_allclose(xu, x, atol=1e-9)
    np.testing.assert_allclose(yu, y, atol=1e-9)


def test_a_distorted_radius_the_model_never_reaches_is_nan():
    # Equidistant k1 = -0.5 reaches at most theta_d = 0.8165 (1 - 1 / 3) = 0.544.
    x, y = undistort_normalized(np.array([0.6, 0.3]), np.array([0.0, 0.0]), [-0.5, 0, 0, 0],
                                'equidistant')
    assert np.isnan(x[0]) and np.isnan(y[0]) and x.dtype == np.float64
    assert x[1] == pytest.approx(0.3 / 0.3 * float(np.tan(_theta_of(0.3))), abs=1e-9)


def _theta_of(theta_d):
    """Solve theta - theta^3 / 2 = theta_d by bisection on [0, sqrt(2 / 3)]."""
    low, high = 0.0, math.sqrt(2.0 / 3.0)
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if mid - 0.5 * mid ** 3 < theta_d else (low, mid)
    return 0.5 * (low + high)


# Mutation-testing follow-ups (issue 18, second pass): the rectified camera, validation.


def test_rectified_camera_is_p_without_distortion_or_rotation():
    """image_rect's camera: K = P's left 3x3, no D, R = I; P (with the baseline) is kept."""
    p = [[70.0, 0.0, 30.0, -7.0], [0.0, 72.0, 20.5, 0.0], [0.0, 0.0, 1.0, 0.0]]
    c, s = math.cos(0.1), math.sin(0.1)
    raw = CameraModel(W, H, K, D=RATIONAL, distortion_model='rational_polynomial', P=p,
                      R=[[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], binning_x=2,
                      roi=Roi(2, 4, 40, 30), frame_id='cam_optical')
    rect = raw.rectified()
    assert rect.K.tolist() == [[70.0, 0.0, 30.0], [0.0, 72.0, 20.5], [0.0, 0.0, 1.0]]
    assert rect.P.tolist() == p and rect.R.tolist() == np.eye(3).tolist()
    assert rect.D.tolist() == [] and rect.distortion_model == 'plumb_bob'
    assert not rect.has_distortion
    assert (rect.width, rect.height, rect.binning_x, rect.roi, rect.frame_id) == (
        W, H, 2, Roi(2, 4, 40, 30), 'cam_optical')
    msg = rect.to_msg()
    assert msg.distortion_model == 'plumb_bob' and list(msg.d) == []
    assert list(msg.r) == np.eye(3).ravel().tolist()
    assert raw.K.tolist() == K.tolist() and raw.R[0, 1] == -s  # the raw model is unchanged
    # The rectified K is a copy: writing to it (it is read-only) cannot reach P.
    assert not rect.K.flags.writeable and not np.shares_memory(rect.K, raw.P)


def test_rectified_camera_from_an_unusable_p_is_named():
    """A P whose left 3x3 is no camera matrix: the reason is kept, the message says why."""
    p = [[70.0, 0.0, 30.0, 0.0], [0.0, 72.0, 20.5, 0.0], [0.0, 0.5, 1.0, 0.0]]
    raw = CameraModel(W, H, K, P=p)
    with pytest.raises(CalibrationError) as err:
        raw.rectified()
    assert err.value.reason == 'bad_principal_point'
    assert str(err.value).startswith('rectified input: the camera comes from P, which is not '
                                     'usable: K must be finite upper triangular with K[2,2] = 1')
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_implausibility_limits_are_inclusive_by_hand():
    """Skew 0.1 fx, fx/fy 2 or 1/2, a principal point on the border, |D| 100: still plausible."""
    def problems(k, d=(0.0,) * 5, width=640, height=480):
        return CameraModel(width, height, k, D=list(d),
                           distortion_model='plumb_bob').implausibilities()

    assert problems([[500.0, 50.0, 320.0], [0.0, 500.0, 240.0], [0, 0, 1]]) == []
    assert problems([[500.0, -50.0, 320.0], [0.0, 500.0, 240.0], [0, 0, 1]]) == []
    assert problems([[500.0, 0.0, 320.0], [0.0, 250.0, 240.0], [0, 0, 1]]) == []
    assert problems([[250.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0, 0, 1]]) == []
    for cx, cy in ((0.0, 0.0), (640.0, 480.0), (0.0, 480.0), (640.0, 0.0)):
        assert problems([[500.0, 0.0, cx], [0.0, 500.0, cy], [0, 0, 1]]) == [], (cx, cy)
    plain = [[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0, 0, 1]]
    assert problems(plain, d=(-100.0, 100.0, 0.0, 0.0, 0.0)) == []
    # Just past each limit: named, with the numbers worked out by hand.
    skew = problems([[500.0, 60.0, 320.0], [0.0, 500.0, 240.0], [0, 0, 1]])
    assert skew == ['skew K[0,1]=60 is 0.12 of fx=500 (real cameras: ~0)']
    assert problems([[500.0, 0.0, 320.0], [0.0, 249.0, 240.0], [0, 0, 1]]) == [
        'fx/fy = 500/249 = 2.01 (square pixels: ~1)']
    assert problems([[249.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0, 0, 1]]) == [
        'fx/fy = 249/500 = 0.498 (square pixels: ~1)']
    for cx, cy in ((-0.5, 240.0), (640.5, 240.0), (320.0, -0.5), (320.0, 480.5)):
        assert problems([[500.0, 0.0, cx], [0.0, 500.0, cy], [0, 0, 1]]) == [
            f'principal point ({cx:g}, {cy:g}) is outside the 640x480 image'], (cx, cy)
    assert problems(plain, d=(0.0, -100.5, 0.0, 0.0, 0.0)) == [
        'distortion D=[0.0, -100.5, 0.0, 0.0, 0.0] has |coefficients| above 100']
    # A tiny skew is plausible whatever fx is (the limit scales with fx, it is not 0.1 / fx).
    assert problems([[500.0, 1.0, 320.0], [0.0, 500.0, 240.0], [0, 0, 1]]) == []


def test_from_msg_keeps_the_rectification_and_the_roi_flag():
    """R and roi.do_rectify come from the message, not their defaults."""
    c, s = math.cos(0.2), math.sin(0.2)
    r = [1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c]
    msg = _info(r=r)
    msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height = 2, 4, 40, 30
    msg.roi.do_rectify = True
    model = CameraModel.from_msg(msg)
    assert model.R.shape == (3, 3) and model.R.ravel().tolist() == r
    assert model.K.shape == (3, 3) and model.P.shape == (3, 4) and model.D.shape == (5,)
    assert model.roi == Roi(2, 4, 40, 30, True)
    assert CameraModel.from_msg(model.to_msg()).R.ravel().tolist() == r


def test_unproject_depth_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r'^depth must be HxW, got shape \(2, 3, 1\)$'):
        unproject_depth(np.ones((2, 3, 1), np.float32), K)
    # Coefficients without a model name: the name is '' (not a supported model).
    with pytest.raises(CalibrationError, match="^distortion model '' is not supported"):
        unproject_depth(np.ones((H, W), np.float32), K, D=PLUMB_BOB)


def test_unproject_float64_depth_is_read_as_float32():
    """A float64 depth gives the points of its float32 rounding (the 32FC1 the node publishes)."""
    rng = np.random.default_rng(3)
    depth = rng.uniform(0.3, 7.0, (H, W))
    points = unproject_depth(depth, K)
    depth32 = depth.astype(np.float32)
    rx, ry, _ = pixel_rays(H, W, K)
    assert points[:, :, 0].tolist() == (rx * depth32).tolist()  # float32 products
    assert points[:, :, 1].tolist() == (ry * depth32).tolist()
    assert points[:, :, 2].tolist() == depth32.tolist()
    # (Multiplied in float64 and rounded once, some x differ in the last bit.)
    assert ((rx * depth).astype(np.float32) != rx * depth32).any()


def test_project_points_computes_in_float64_for_float32_points():
    """float32 points: uv and z as for the same values in float64 (z float64, as documented)."""
    pts = np.array([[0.3, -0.2, 1.7], [-0.45, 0.3, 2.3], [0.01, 0.02, 0.9]], np.float32)
    model = CameraModel.from_msg(_info(distortion_model='plumb_bob', d=PLUMB_BOB))
    uv32, z32, mask32 = project_points(pts, model)
    uv64, z64, mask64 = project_points(pts.astype(np.float64), model)
    assert z32.dtype == np.float64 and uv32.dtype == np.float64
    assert uv32.tolist() == uv64.tolist() and z32.tolist() == z64.tolist()
    assert mask32.tolist() == mask64.tolist() == [True] * 3
    # A flat (3 N,) list of coordinates is N points.
    uv, z, _ = project_points(pts.ravel().tolist(), model)
    assert uv.shape == (3, 2) and z.tolist() == z64.tolist()


_P0 = [[FX, 0.0, CX, 0.0], [0.0, FY, CY, 0.0], [0.0, 0.0, 1.0, 0.0]]


@pytest.mark.parametrize('fields, reason, message', [
    ({'width': -1}, 'bad_size', 'camera size must be positive, got -1x48'),
    ({'height': -3}, 'bad_size', 'camera size must be positive, got 64x-3'),
    ({'K': np.zeros((3, 3))}, 'uncalibrated', 'camera K is all zeros (uncalibrated)'),
    ({'K': [[FX, 0, CX], [0, -FY, CY], [0, 0, 1]]}, 'bad_focal_length',
     'focal lengths must be finite and > 0, got fx=80.0 fy=-90.0'),
    ({'K': [[FX, 0, CX], [0, math.inf, CY], [0, 0, 1]]}, 'bad_focal_length',
     'focal lengths must be finite and > 0, got fx=80.0 fy=inf'),
    ({'K': [[FX, 0, CX], [0, FY, CY], [0, 0, 2]]}, 'bad_principal_point',
     'K must be finite upper triangular with K[2,2] = 1, got [[80.0, 0.0, 31.5], '
     '[0.0, 90.0, 22.0], [0.0, 0.0, 2.0]]'),
    ({'K': [[FX, 0, CX], [0, FY, CY], [0.1, 0, 1]]}, 'bad_principal_point', None),
    ({'K': [[FX, 0, CX], [0, FY, CY], [0, 0.1, 1]]}, 'bad_principal_point', None),
    ({'K': [[FX, 0, CX], [0.1, FY, CY], [0, 0, 1]]}, 'bad_principal_point', None),
    ({'K': [[FX, 0, CX], [0, FY, math.inf], [0, 0, 1]]}, 'bad_principal_point', None),
    ({'P': np.array(_P0) * [[1], [1], [1]] + [[0, 0, 0, math.nan], [0] * 4, [0] * 4]},
     'bad_projection', None),
    ({'P': [[0.0, 0, CX, 0], [0, FY, CY, 0], [0, 0, 1, 0]]}, 'bad_projection',
     'invalid P [[0.0, 0.0, 31.5, 0.0], [0.0, 90.0, 22.0, 0.0], [0.0, 0.0, 1.0, 0.0]]'),
    ({'P': [[FX, 0, CX, 0], [0, 0.0, CY, 0], [0, 0, 1, 0]]}, 'bad_projection', None),
    ({'P': [[FX, 0, CX, 0], [0, -1.0, CY, 0], [0, 0, 1, 0]]}, 'bad_projection', None),
    ({'D': [0.0, math.inf]}, 'bad_distortion', 'non-finite D [0.0, inf]'),
    ({'D': [0.1], 'distortion_model': 'fisheye'}, 'unknown_distortion_model',
     "distortion model 'fisheye' with non-zero D is not supported; supported: plumb_bob, "
     'rational_polynomial, equidistant'),
    ({'D': [0.1], 'distortion_model': ''}, 'unknown_distortion_model', None),
    ({'D': [0.1, 0, 0, 0, 0.2], 'distortion_model': 'equidistant'}, 'bad_distortion',
     'equidistant takes 4 coefficients, got non-zero D[4:] in [0.1, 0.0, 0.0, 0.0, 0.2]'),
    ({'D': [0.0] * 5 + [0.3], 'distortion_model': 'plumb_bob'}, 'bad_distortion', None),
    ({'D': [0.0] * 8 + [0.3], 'distortion_model': 'rational_polynomial'}, 'bad_distortion',
     None),
    ({'binning_x': -1}, 'bad_binning', 'binning must be >= 0, got -1, 0'),
    ({'binning_y': -2}, 'bad_binning', 'binning must be >= 0, got 0, -2'),
    ({'roi': Roi(-1, 0, 10, 10)}, 'bad_roi', 'ROI (-1, 0, 10, 10, False) does not fit in 64x48'),
    ({'roi': Roi(0, -1, 10, 10)}, 'bad_roi', None),
    ({'roi': Roi(55, 0, 10, 10)}, 'bad_roi', None),
    ({'roi': Roi(0, 39, 10, 10)}, 'bad_roi', None),
    ({'binning_x': 65}, 'bad_binning', 'binning 65x1 leaves no pixels of 64x48'),
    ({'binning_y': 49}, 'bad_binning', 'binning 1x49 leaves no pixels of 64x48'),
    ({'binning_x': 11, 'roi': Roi(0, 0, 10, 10)}, 'bad_binning',
     'binning 11x1 leaves no pixels of 10x10'),
    ({'binning_y': 11, 'roi': Roi(0, 0, 10, 10)}, 'bad_binning', None),
])
def test_each_refusal_names_its_reason_by_hand(fields, reason, message):
    args = {'width': W, 'height': H, 'K': K, **fields}
    with pytest.raises(CalibrationError) as err:
        CameraModel(**args)
    assert err.value.reason == reason
    if message is not None:
        assert str(err.value) == message


def test_limits_of_a_valid_calibration_by_hand():
    """A ROI flush with the image edges, binning down to one pixel, zero D beyond the model."""
    CameraModel(W, H, K, roi=Roi(54, 38, 10, 10))
    CameraModel(W, H, K, roi=Roi(0, 0, W, H))
    one = CameraModel(W, H, K, binning_x=64, binning_y=48).effective()
    assert (one.width, one.height) == (1, 1)
    assert (CameraModel(W, H, K, binning_x=10, binning_y=10,
                        roi=Roi(0, 0, 10, 10)).effective().width) == 1
    CameraModel(W, H, K, D=PLUMB_BOB + [0.0] * 3, distortion_model='plumb_bob')
    CameraModel(W, H, K, D=[0.1, 0, 0, 0], distortion_model='equidistant')
    CameraModel(W, H, K, D=[0.0] * 5, distortion_model='fisheye')  # zero D: any name
    # An inactive ROI (width or height 0) is not checked against the image.
    CameraModel(W, H, K, roi=Roi(100, 100, 0, 10))
    CameraModel(W, H, K, roi=Roi(100, 100, 10, 0))


def test_construction_normalises_fields_by_hand():
    """Numbers become ints and float64, a 4-value ROI gets do_rectify False, names are stripped."""
    model = CameraModel(64.0, 48.0, K.tolist(), D=(0.1, 0.0, 0.0, 0.0, 0.0),
                        distortion_model=' plumb_bob\n', binning_x=2.0, binning_y=1.0,
                        roi=(2.0, 4.0, 40.0, 30.0), P=None, R=np.zeros((3, 3)))
    assert (model.width, model.height, model.binning_x, model.binning_y) == (64, 48, 2, 1)
    assert all(type(v) is int for v in (model.width, model.height, model.binning_x,
                                        model.binning_y) + tuple(model.roi[:4]))
    assert model.roi == Roi(2, 4, 40, 30, False) and model.roi.do_rectify is False
    assert model.distortion_model == 'plumb_bob'
    assert model.K.dtype == model.D.dtype == model.P.dtype == model.R.dtype == np.float64
    assert model.D.tolist() == [0.1, 0.0, 0.0, 0.0, 0.0] and model.R.tolist() == np.eye(
        3).tolist()
    assert model.P.tolist() == [[FX, 0, CX, 0], [0, FY, CY, 0], [0, 0, 1, 0]]
    for arr in (model.K, model.D, model.P, model.R):
        assert not arr.flags.writeable
    ints = CameraModel(W, H, [[80, 0, 31], [0, 90, 22], [0, 0, 1]],
                       R=[[1, 0, 0], [0, 0, -1], [0, 1, 0]], P=[[80, 0, 31, -8], [0, 90, 22, 0],
                                                                [0, 0, 1, 0]])
    assert ints.K.dtype == ints.R.dtype == ints.P.dtype == np.float64
    assert ints.R.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
    flagged = CameraModel(W, H, K, roi=(1, 1, 4, 4, 1))
    assert flagged.roi.do_rectify is True
    assert CameraModel(W, H, K, D=[[0.1], [0.2]], distortion_model='plumb_bob').D.tolist() == [
        0.1, 0.2]
    assert CameraModel(W, H, K).D.tolist() == []  # the default D: none


def test_distortion_coefficients_padded_to_the_model_by_hand():
    def coeffs(d, name):
        return CameraModel(W, H, K, D=d, distortion_model=name).distortion_coefficients()

    assert coeffs([0.1, 0.2], 'plumb_bob').tolist() == [0.1, 0.2, 0.0, 0.0, 0.0]
    assert coeffs([0.1] + [0.0] * 7, 'plumb_bob').tolist() == [0.1, 0.0, 0.0, 0.0, 0.0]
    assert coeffs([0.1], 'rational_polynomial').tolist() == [0.1] + [0.0] * 7
    assert coeffs([], 'equidistant').tolist() == [0.0] * 4
    assert coeffs([0.0, 0.3, 0.0, 0.0, 0.0], 'equidistant').tolist() == [0.0, 0.3, 0.0, 0.0]
    assert coeffs([0.0] * 5, 'plumb_bob').tolist() == []


def test_effective_without_binning_or_roi_by_hand():
    """Nothing to fold: the same model; binning 1 (no binning) is written as 0."""
    model = CameraModel(W, H, K, P=_P0)
    assert model.effective() is model
    for bx, by, roi in ((1, 1, Roi(0, 0, 0, 0, True)), (1, 0, Roi()), (0, 1, Roi()),
                        (0, 0, Roi(5, 5, 0, 0)), (0, 0, Roi(0, 0, 10, 0, True))):
        ones = CameraModel(W, H, K, binning_x=bx, binning_y=by, roi=roi)
        eff = ones.effective()
        assert (eff.binning_x, eff.binning_y, eff.roi) == (0, 0, Roi())
        assert eff.K.tolist() == K.tolist() and (eff.width, eff.height) == (W, H)
    # A ROI alone: a crop; binning in y alone: rows only.
    p = [[70.0, 0.0, 30.0, -7.0], [0.0, 72.0, 20.5, 0.0], [0.0, 0.0, 1.0, 0.0]]
    crop = CameraModel(W, H, K, P=p, roi=Roi(10, 6, 40, 30)).effective()
    assert (crop.width, crop.height) == (40, 30)
    assert crop.K.tolist() == [[FX, 0, CX - 10], [0, FY, CY - 6], [0, 0, 1]]
    assert crop.P.tolist() == [[70.0, 0, 20.0, -7.0], [0, 72.0, 14.5, 0], [0, 0, 1, 0]]
    rows = CameraModel(W, H, K, binning_y=3).effective()
    assert (rows.width, rows.height) == (W, 16)
    np.testing.assert_allclose(rows.K, [[FX, 0, CX], [0, FY / 3, (CY + 0.5) / 3 - 0.5],
                                        [0, 0, 1]], atol=1e-12)


def test_pixel_rays_with_skew_and_refusals_by_hand():
    k = np.array([[50.0, 5.0, 3.0], [0.0, 40.0, 2.0], [0.0, 0.0, 1.0]])
    rx, ry, ok = pixel_rays(4, 6, k)
    v, u = np.mgrid[0:4, 0:6]
    y = (v - 2.0) / 40.0
    np.testing.assert_allclose(ry, y, rtol=1e-6)
    np.testing.assert_allclose(rx, (u - 3.0 - 5.0 * y) / 50.0, rtol=1e-6, atol=1e-9)
    assert rx.dtype == ry.dtype == np.float32 and ok.dtype == bool and ok.all()
    assert not (ry.flags.writeable or ok.flags.writeable)
    with pytest.raises(CalibrationError, match="^distortion model '' is not supported"):
        pixel_rays(4, 6, k, [0.1])  # coefficients without a model name
    with pytest.raises(ValueError, match='^K must have 9 elements, got 8$'):
        pixel_rays(4, 6, np.ones(8))
    with pytest.raises(CalibrationError, match="^distortion model 'fisheye' is not supported; "
                                               'supported: plumb_bob, rational_polynomial, '
                                               'equidistant$') as err:
        pixel_rays(4, 6, k, [0.1], 'fisheye')
    assert err.value.reason == 'unknown_distortion_model'
    # Zero coefficients of a pinhole model are no distortion, whatever the name.
    assert pixel_rays(4, 6, k, [0.0] * 5, 'fisheye')[0].tolist() == rx.tolist()
    # Distorted rays: the undistorted point of each pixel, float32.
    d = [-0.2, 0.05, 0.0, 0.0, 0.0]
    drx, dry, dok = pixel_rays(4, 6, k, d, 'plumb_bob')
    xd, yd = distort_normalized(drx.astype(np.float64), dry.astype(np.float64), d, 'plumb_bob')
    np.testing.assert_allclose(yd, y, atol=1e-6)
    np.testing.assert_allclose(xd, (u - 3.0 - 5.0 * y) / 50.0, atol=1e-6)
    assert dok.all()


def test_quaternion_matches_the_axis_angle_rotation():
    """R(q) against Rodrigues' formula for the axis and angle of q (an independent route)."""
    rng = np.random.default_rng(7)
    for q in [(0.1, 0.2, 0.3, 0.9), (-0.5, 0.4, -0.3, 0.2), *rng.normal(size=(5, 4))]:
        q = np.asarray(q, np.float64)
        unit = q / np.linalg.norm(q)
        angle = 2.0 * math.acos(np.clip(unit[3], -1.0, 1.0))
        axis = unit[:3] / np.linalg.norm(unit[:3])
        cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                          [-axis[1], axis[0], 0]])
        expected = (math.cos(angle) * np.eye(3) + math.sin(angle) * cross
                    + (1 - math.cos(angle)) * np.outer(axis, axis))
        np.testing.assert_allclose(quaternion_to_matrix(q), expected, atol=1e-12)
        np.testing.assert_allclose(quaternion_to_matrix(list(q * 2.5)), expected, atol=1e-12)
    with pytest.raises(ValueError, match=r'^quaternion must be 4 finite values \(x, y, z, w\), '
                                         r'got \[0.0, nan, 0.0, 1.0\]$'):
        quaternion_to_matrix([0.0, math.nan, 0.0, 1.0])
    with pytest.raises(ValueError, match=r'got \[0.0, 0.0, 1.0\]$'):  # read as float64
        quaternion_to_matrix([0, 0, 1])
    with pytest.raises(ValueError, match='finite'):
        quaternion_to_matrix([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert quaternion_to_matrix([[0.0, 0.0], [0.0, 1.0]]).tolist() == np.eye(3).tolist()


def test_small_focal_lengths_are_valid():
    """A focal length below one pixel (a thumbnail of a wide lens) is still > 0."""
    tiny = CameraModel(4, 3, [[0.5, 0.0, 1.5], [0.0, 0.25, 1.0], [0.0, 0.0, 1.0]],
                       P=[[1.0, 0.0, 1.5, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert (tiny.fx, tiny.fy, tiny.P[0, 0], tiny.P[1, 1]) == (0.5, 0.25, 1.0, 1.0)
    CameraModel(4, 3, [[1.0, 0.0, 1.5], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]],
                P=[[0.5, 0.0, 1.5, 0.0], [0.0, 0.75, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


# A camera whose pixel borders fall on exact binary fractions: u = 64 x + 31.5.
_EXACT = CameraModel(64, 48, [[64.0, 0.0, 31.5], [0.0, 64.0, 23.5], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize('x, y, inside', [
    (-0.5, 0.0, True),            # u = -0.5: the left edge of pixel 0
    (-0.5078125, 0.0, False),     # u = -1.0
    (0.4921875, 0.0, True),       # u = 63.0, the last column
    (0.5, 0.0, False),            # u = 63.5 = width - 0.5
    (0.5078125, 0.0, False),      # u = 64.0
    (0.0, -0.375, True),          # v = -0.5
    (0.0, -0.3828125, False),     # v = -1.0
    (0.0, 0.375, False),          # v = 47.5 = height - 0.5
    (0.0, 0.3828125, False),      # v = 48.0
    (0.0, 0.3671875, True),       # v = 47.0, the last row
    (-0.6, 0.1, False),           # u = -6.9 with v inside
    (0.1, -0.4, False),           # v = -2.1 with u inside
])
def test_projection_image_borders_by_hand(x, y, inside):
    """Inside is -0.5 <= u < width - 0.5 and the same for v (np.rint(uv) is a pixel)."""
    uv, _, mask = project_points(np.array([[x, y, 1.0]]), _EXACT)
    assert uv[0].tolist() == [64.0 * x + 31.5, 64.0 * y + 23.5]
    assert mask.tolist() == [inside]


def test_projection_minimum_depth_and_skew_by_hand():
    """A depth of MIN_DEPTH is too close (no pixel); skew adds K[0,1] y to u."""
    from marigold_ros.geometry import MIN_DEPTH
    uv, z, mask = project_points(np.array([[0.0, 0.0, MIN_DEPTH], [0.0, 0.0, 2e-6]]), _EXACT)
    assert mask.tolist() == [False, True] and np.isnan(uv[0]).all()
    assert uv[1].tolist() == [31.5, 23.5] and z.tolist() == [MIN_DEPTH, 2e-6]
    skewed = CameraModel(64, 48, [[64.0, 4.0, 31.5], [0.0, 64.0, 23.5], [0.0, 0.0, 1.0]])
    uv, _, _ = project_points(np.array([[0.25, 0.125, 1.0], [0.0, -0.25, 2.0]]), skewed)
    assert uv.tolist() == [[64 * 0.25 + 4 * 0.125 + 31.5, 64 * 0.125 + 23.5],
                           [4 * -0.125 + 31.5, 64 * -0.125 + 23.5]]


def test_projection_fold_limit_is_the_equidistant_ones():
    """Equidistant k1 = -0.5 rises up to r = tan(0.8165) = 1.07: r = 0.9 still projects."""
    wide = CameraModel(200, 100, [[80.0, 0.0, 31.5], [0.0, 80.0, 49.5], [0.0, 0.0, 1.0]],
                       D=[-0.5, 0.0, 0.0, 0.0], distortion_model='equidistant')
    theta = math.atan(0.9)
    uv, _, mask = project_points(np.array([[0.9, 0.0, 1.0], [1.2, 0.0, 1.0]]), wide)
    assert uv[0, 0] == pytest.approx(80.0 * theta * (1 - 0.5 * theta ** 2) + 31.5, abs=1e-9)
    assert mask.tolist() == [True, False]  # r = 1.2 is past the fold
