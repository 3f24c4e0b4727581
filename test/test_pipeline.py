"""Tests of marigold_ros.pipeline: messages in, depth / camera info / cloud messages out."""

from dataclasses import replace
from functools import partial
import math

from builders import FakeEstimator, random_rgb, scale_estimate
from marigold_model.estimator import EstimatorOutOfMemory
from marigold_ros.conversions import image_to_depth, pointcloud2_from_depth, pointcloud2_to_xyz
from marigold_ros.conversions import rgb_to_compressed, rgb_to_image
from marigold_ros.geometry import CameraModel, Roi, unproject_depth
from marigold_ros.node_params import OUTPUT_NAMES, OutputConfig
from marigold_ros.pipeline import DepthPipeline, FrameError, FrameInput
from marigold_ros.pipeline import NOTE_BAD_CAMERA_INFO, NOTE_NO_CAMERA_INFO
from marigold_ros.pipeline import NOTE_NO_METRIC_SCALE, organized_cloud
from marigold_ros.scale_recovery import ScaleRecovery, ScaleRecoveryConfig
from msg_builders import header
import numpy as np
import pytest
from sensor_msgs.msg import Image

H, W = 30, 40
K = np.array([[35.0, 0.0, 19.25], [0.0, 36.0, 14.75], [0.0, 0.0, 1.0]])
FRAME = 'camera_optical_frame'

_header = partial(header, sec=10, nanosec=5, frame_id=FRAME)


def _camera(width=W, height=H, k=K, **kwargs):
    return CameraModel(width, height, k, frame_id=FRAME, **kwargs).to_msg(_header())


class ConstantScale:
    """Scale source returning a fixed estimate (and recording its arguments)."""

    def __init__(self, scale=None, error=None):
        """Keep the estimate to return."""
        self.scale = scale
        self.error = error
        self.calls = []

    def estimate(self, key, header, relative_depth, camera):
        """Return the stored estimate."""
        self.calls.append((key, header, relative_depth.shape, camera))
        if self.error is not None:
            raise self.error
        return self.scale


def _one(pipeline, frame):
    (result,) = pipeline.process([frame])
    return result


# ---------------------------------------------------------------- geometry


def _plane_depth(normal, distance, height, width, k):
    """Depth z of the plane n . p = d seen through pixel centres of a pinhole camera."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    return distance / (rays @ np.asarray(normal, np.float64)), rays


def test_cloud_geometry_exact_on_a_plane():
    """Every cloud point is the pixel's ray times its depth and lies on the true plane."""
    normal = np.array([0.1, -0.4, 1.0]) / np.linalg.norm([0.1, -0.4, 1.0])
    distance = 2.5
    z, rays = _plane_depth(normal, distance, H, W, K)
    scale, shift = 4.0, 0.5
    relative = ((z - shift) / scale).astype(np.float32)
    rgb = random_rgb(H, W)
    pipeline = DepthPipeline(FakeEstimator(lambda h, w: relative),
                             OutputConfig(fixed_scale=scale, fixed_shift=shift))
    out = _one(pipeline, FrameInput(rgb_to_image(rgb, _header()), _camera()))

    cloud = out.points
    assert (cloud.height, cloud.width, cloud.point_step, cloud.row_step) == (H, W, 16, 16 * W)
    assert not cloud.is_dense
    assert [f.name for f in cloud.fields] == ['x', 'y', 'z', 'rgb']
    assert cloud.header.frame_id == FRAME and cloud.header.stamp == _header().stamp
    xyz = pointcloud2_to_xyz(cloud).reshape(H, W, 3).astype(np.float64)
    expected = rays * (scale * relative.astype(np.float64) + shift)[..., None]
    np.testing.assert_allclose(xyz, expected, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(xyz @ normal, distance, rtol=1e-5)
    packed = np.frombuffer(bytes(cloud.data), '<u4').reshape(H, W, 4)[:, :, 3]
    colours = np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], -1)
    np.testing.assert_array_equal(colours, rgb)
    metric = image_to_depth(out.metric)
    np.testing.assert_allclose(metric, z, rtol=1e-5)
    assert out.scale.scale == scale and out.scale.reason == 'fixed'


def test_invalid_metric_depth_is_nan_in_image_and_cloud():
    """Non-positive and too far depths become NaN points (is_dense false)."""
    relative = np.full((H, W), 0.5, np.float32)
    relative[0, :5] = 0.0   # -> 0 m: no reading
    relative[1, :5] = 1.0   # -> 20 m: beyond max_depth
    pipeline = DepthPipeline(FakeEstimator(lambda h, w: relative),
                             OutputConfig(fixed_scale=20.0, max_depth=15.0))
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera()))
    metric = image_to_depth(out.metric)
    assert np.isnan(metric[:2, :5]).all() and np.isfinite(metric[2:]).all()
    xyz = pointcloud2_to_xyz(out.points).reshape(H, W, 3)
    assert np.isnan(xyz[:2, :5]).all() and np.isfinite(xyz[2:]).all()


def test_fast_cloud_is_byte_identical_to_the_reference_builder():
    """organized_cloud == pointcloud2_from_depth(unproject_depth(...)), with distortion."""
    camera = CameraModel(W, H, K, D=[0.1, -0.05, 0.001, 0.002, 0.0],
                         distortion_model='plumb_bob', frame_id=FRAME)
    depth = np.random.default_rng(2).uniform(0.5, 4.0, (H, W)).astype(np.float32)
    depth[0, :7] = np.nan
    depth[3, 2:5] = 0.0
    rgb = random_rgb(H, W, seed=3)
    fast = organized_cloud(depth, camera, rgb, _header())
    reference = pointcloud2_from_depth(unproject_depth(depth, camera), rgb, _header())
    assert bytes(fast.data) == bytes(reference.data)
    assert (fast.fields, fast.point_step, fast.row_step, fast.is_dense) == (
        reference.fields, reference.point_step, reference.row_step, reference.is_dense)


@pytest.mark.parametrize('height, width', [(1, 1), (1, 2), (3, 5)])
def test_fast_cloud_colours_at_tiny_sizes(height, width):
    """The last pixel's colour is packed on its own (no byte after it): tiny images too."""
    k = np.array([[2.0, 0.0, width / 2], [0.0, 2.0, height / 2], [0.0, 0.0, 1.0]])
    camera = CameraModel(width, height, k, frame_id=FRAME)
    depth = np.full((height, width), 2.0, np.float32)
    rgb = np.random.default_rng(height * 10 + width).integers(
        0, 256, (height, width, 3), dtype=np.uint8)
    fast = organized_cloud(depth, camera, rgb, _header())
    reference = pointcloud2_from_depth(unproject_depth(depth, camera), rgb, _header())
    assert bytes(fast.data) == bytes(reference.data)


@pytest.mark.parametrize('rectified', [False, True])
def test_rectified_input_takes_the_camera_from_p(rectified):
    """image_rect + its raw camera_info: rays and depth/camera_info from P, no distortion."""
    p = np.array([[30.0, 0.0, 20.5, 0.0], [0.0, 31.0, 15.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    info = _camera(D=[-0.2, 0.05, 0.001, 0.0, 0.0], distortion_model='plumb_bob', P=p)
    pipeline = DepthPipeline(FakeEstimator(), OutputConfig(fixed_scale=2.0,
                                                           rectified_input=rectified))
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), info))
    metric = image_to_depth(out.metric)
    if rectified:
        camera = CameraModel(W, H, p[:, :3], frame_id=FRAME)
        assert not any(out.camera_info.d) and list(out.camera_info.k) == p[:, :3].ravel().tolist()
    else:
        camera = CameraModel.from_msg(info)
        assert list(out.camera_info.d) == list(info.d)
    assert list(out.camera_info.p) == p.ravel().tolist()
    expected = unproject_depth(metric, camera)
    np.testing.assert_allclose(pointcloud2_to_xyz(out.points).reshape(H, W, 3), expected,
                               rtol=1e-5, atol=1e-6)


def test_apply_scale_float32_matches_scale_estimate():
    """The pipeline's float32 conversion equals ScaleEstimate.apply within float32 rounding."""
    from marigold_model.scale_apply import apply_scale
    rel = np.random.default_rng(1).uniform(-0.1, 1.0, (20, 30)).astype(np.float32)
    fast, _ = apply_scale(scale_estimate(3.0, -0.2, n_points=100), rel)
    slow = scale_estimate(3.0, -0.2, n_points=100).apply(rel)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(slow))
    np.testing.assert_allclose(fast[np.isfinite(fast)], slow[np.isfinite(slow)], rtol=1e-6)


# ---------------------------------------------------------------- camera info scaling


def test_camera_info_scaled_to_depth_resolution():
    """K, P, size follow the depth resolution with the pixel-centre convention."""
    out_h, out_w = 15, 20
    pipeline = DepthPipeline(FakeEstimator(out_size=(out_h, out_w)),
                             OutputConfig(fixed_scale=1.0, fixed_shift=1.0))
    rgb = random_rgb(H, W)
    out = _one(pipeline, FrameInput(rgb_to_image(rgb, _header()), _camera()))
    info = out.camera_info
    assert (info.width, info.height) == (out_w, out_h)
    s = 0.5
    k = np.array(info.k).reshape(3, 3)
    np.testing.assert_allclose(k, [[K[0, 0] * s, 0, (K[0, 2] + 0.5) * s - 0.5],
                                   [0, K[1, 1] * s, (K[1, 2] + 0.5) * s - 0.5], [0, 0, 1]])
    np.testing.assert_allclose(np.array(info.p).reshape(3, 4)[:, :3], k)
    assert info.header.frame_id == FRAME
    # The depth image, the camera info and the cloud share the published resolution.
    assert (out.relative.width, out.relative.height) == (out_w, out_h)
    assert (out.points.width, out.points.height) == (out_w, out_h)


def test_binning_and_roi_folded_into_published_camera_info():
    """A binned ROI camera_info matches its smaller image; the output has binning 0."""
    full = CameraModel(160, 120, K * [[4, 1, 4], [1, 4, 4], [1, 1, 1]], frame_id=FRAME,
                       binning_x=2, binning_y=2, roi=Roi(20, 10, 80, 60))
    pipeline = DepthPipeline(FakeEstimator(), OutputConfig(fixed_scale=1.0))
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()),
                                    full.to_msg(_header())))
    assert out.problems == ()
    info = out.camera_info
    assert (info.width, info.height, info.binning_x, info.binning_y) == (W, H, 0, 0)
    assert (info.roi.width, info.roi.height) == (0, 0)
    k = np.array(info.k).reshape(3, 3)
    np.testing.assert_allclose(k[0, 0], K[0, 0] * 2)
    np.testing.assert_allclose(k[0, 2], (K[0, 2] * 4 - 20 + 0.5) * 0.5 - 0.5)


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_colour_encodings_reach_the_estimator_as_rgb(encoding):
    """Colour encodings arrive at the model as the same RGB."""
    rgb = random_rgb(H, W)
    estimator = FakeEstimator()
    out = _one(DepthPipeline(estimator), FrameInput(rgb_to_image(rgb, _header(), encoding)))
    np.testing.assert_array_equal(estimator.calls[0][0][0], rgb)
    assert out.relative.encoding == '32FC1'


@pytest.mark.parametrize('encoding', ['mono8', 'mono16'])
def test_mono_encodings_replicated_to_three_channels(encoding):
    """mono8 / mono16 become grey RGB."""
    grey = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    arr = grey if encoding == 'mono8' else grey.astype(np.uint16) * 257
    estimator = FakeEstimator()
    _one(DepthPipeline(estimator), FrameInput(rgb_to_image(arr, _header(), encoding)))
    seen = estimator.calls[0][0][0]
    np.testing.assert_array_equal(seen, np.repeat(grey[:, :, None], 3, axis=2))


@pytest.mark.parametrize('encoding', ['yuv422', 'yuv422_yuy2'])
def test_yuv_encodings(encoding):
    """UYVY and YUYV of a mid-grey frame decode to mid-grey."""
    macro = [128, 126, 128, 126] if encoding == 'yuv422' else [126, 128, 126, 128]
    data = np.tile(np.array(macro, np.uint8), H * W // 2)
    msg = Image(header=_header(), height=H, width=W, encoding=encoding, step=2 * W,
                data=data.tobytes())
    estimator = FakeEstimator()
    out = _one(DepthPipeline(estimator), FrameInput(msg))
    assert not isinstance(out, FrameError)
    assert np.abs(estimator.calls[0][0][0].astype(int) - 128).max() <= 2


@pytest.mark.parametrize('fmt', ['png', 'jpeg'])
def test_compressed_images(fmt):
    """PNG is exact, JPEG close."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, :W // 2] = (200, 30, 60)
    estimator = FakeEstimator()
    out = _one(DepthPipeline(estimator), FrameInput(rgb_to_compressed(rgb, _header(), fmt)))
    assert out.header.frame_id == FRAME
    seen = estimator.calls[0][0][0].astype(int)
    assert np.abs(seen - rgb).max() <= (0 if fmt == 'png' else 40)


def test_row_padding_honoured():
    """A step larger than width * 3 is read row by row."""
    rgb = random_rgb(H, W)
    rows = np.zeros((H, W * 3 + 8), np.uint8)
    rows[:, :W * 3] = rgb.reshape(H, -1)
    msg = Image(header=_header(), height=H, width=W, encoding='rgb8', step=W * 3 + 8,
                data=rows.tobytes())
    estimator = FakeEstimator()
    _one(DepthPipeline(estimator), FrameInput(msg))
    np.testing.assert_array_equal(estimator.calls[0][0][0], rgb)


# ---------------------------------------------------------------- bad input


def _image(**changes):
    msg = rgb_to_image(random_rgb(H, W), _header())
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize('msg, reason', [
    (_image(width=0, height=0, data=b''), 'empty'),
    (_image(data=bytes(10)), 'truncated'),
    (_image(step=W * 3 - 1), 'bad_step'),
    (_image(encoding='16UC1'), 'unknown_encoding'),
    (_image(encoding='hsv8'), 'unknown_encoding'),
    (_image(header=_header(frame_id='')), 'empty_frame_id'),
    (_image(header=_header(sec=0, nanosec=0)), 'zero_stamp'),
])
def test_bad_images_become_frame_errors(msg, reason):
    """Each bad image gives a FrameError with its reason; the other frames go on."""
    estimator = FakeEstimator()
    good = FrameInput(rgb_to_image(random_rgb(H, W), _header()), key='b')
    bad, ok = DepthPipeline(estimator).process([FrameInput(msg, key='a'), good])
    assert isinstance(bad, FrameError) and bad.reason == reason and bad.key == 'a'
    assert str(bad)
    assert ok.relative is not None and len(estimator.calls[0][0]) == 1


def test_corrupt_compressed_and_size_limit():
    """Corrupt JPEG bytes and images above max_input_pixels are refused."""
    corrupt = rgb_to_compressed(random_rgb(H, W), _header(), 'jpeg')
    corrupt.data = bytes(corrupt.data)[:20] + b'garbage'
    pipeline = DepthPipeline(FakeEstimator(), OutputConfig(max_input_pixels=W * H - 1))
    big = rgb_to_image(random_rgb(H, W), _header())
    errors = pipeline.process([FrameInput(corrupt), FrameInput(big)])
    assert [e.reason for e in errors] == ['corrupt_compressed', 'too_large']
    assert 'max_pixels' in str(errors[1])


def _camera_with_k(k):
    msg = _camera()
    msg.k = [float(v) for v in np.ravel(k)]
    return msg


@pytest.mark.parametrize('camera_info, reason', [
    (_camera_with_k(np.zeros(9)), 'camera_info_uncalibrated'),
    (_camera_with_k([math.nan, 0, 10, 0, 30, 10, 0, 0, 1]), 'camera_info_bad_focal_length'),
    (_camera(width=W + 2), 'camera_info_size_mismatch'),
])
def test_bad_camera_info_keeps_relative_depth(camera_info, reason):
    """An unusable camera_info is a problem with a reason; relative depth still comes."""
    pipeline = DepthPipeline(FakeEstimator(), OutputConfig(fixed_scale=2.0))
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), camera_info))
    assert [p[0] for p in out.problems] == [reason]
    assert NOTE_BAD_CAMERA_INFO in out.notes
    assert out.relative is not None and out.metric is not None
    assert out.points is None and out.camera_info is None


# ---------------------------------------------------------------- what is (not) published


def test_without_camera_info_or_scale_only_relative_depth():
    """No camera_info and no scale: relative depth only, notes say why."""
    out = _one(DepthPipeline(FakeEstimator(uncertainty=0.1)),
               FrameInput(rgb_to_image(random_rgb(H, W), _header())))
    assert out.notes == (NOTE_NO_CAMERA_INFO, NOTE_NO_METRIC_SCALE)
    assert out.metric is None and out.points is None and out.camera_info is None
    relative = image_to_depth(out.relative)
    assert relative.min() >= 0.0 and relative.max() <= 1.0
    # Uncertainty in relative units when no scale is known.
    np.testing.assert_allclose(image_to_depth(out.uncertainty), 0.1)
    assert out.header is out.relative.header


def test_relative_depth_never_published_as_meters():
    """With camera info but no scale: camera info yes, metric depth and cloud no."""
    out = _one(DepthPipeline(FakeEstimator()),
               FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera()))
    assert out.camera_info is not None
    assert out.metric is None and out.points is None
    assert out.notes == (NOTE_NO_METRIC_SCALE,)


def _payload(msg):
    """Bytes that identify a message: the data, or K of a CameraInfo."""
    return bytes(np.asarray(msg.k)) if hasattr(msg, 'k') else bytes(msg.data)


@pytest.mark.parametrize('wanted', [frozenset(), frozenset({'points'}),
                                    frozenset({'relative', 'camera_info'}),
                                    frozenset({'uncertainty'})])
def test_only_the_outputs_asked_for_are_built(wanted):
    """FrameInput.outputs limits the messages; the scale is estimated whatever is asked."""
    source = ConstantScale(scale_estimate(2.0, 0.5, n_points=100))
    pipeline = DepthPipeline(FakeEstimator(uncertainty=0.1), scale_source=source)
    rgb = rgb_to_image(random_rgb(H, W), _header())
    full = _one(pipeline, FrameInput(rgb, _camera()))
    part = _one(pipeline, FrameInput(rgb, _camera(), outputs=wanted))
    assert len(source.calls) == 2 and part.scale is full.scale
    for name in OUTPUT_NAMES:
        built = getattr(part, name)
        if name in wanted:
            assert _payload(built) == _payload(getattr(full, name)), name
        else:
            assert built is None, name
    # Uncertainty alone is still in meters (the metric conversion runs for it).
    if 'uncertainty' in wanted:
        np.testing.assert_allclose(image_to_depth(part.uncertainty), 0.2, rtol=1e-6)


def test_uncertainty_in_meters_with_a_scale_and_switches():
    """Uncertainty scales with the metric scale; publish switches drop outputs."""
    pipeline = DepthPipeline(FakeEstimator(uncertainty=0.1),
                             OutputConfig(fixed_scale=3.0, fixed_shift=1.0))
    frame = FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera())
    np.testing.assert_allclose(image_to_depth(_one(pipeline, frame).uncertainty), 0.3,
                               rtol=1e-6)
    pipeline.output_config = OutputConfig(fixed_scale=3.0, publish_points=False,
                                          publish_uncertainty=False)
    out = _one(pipeline, frame)
    assert out.points is None and out.uncertainty is None and out.metric is not None


def test_scale_source_hook():
    """The scale source gets key, header, depth and the scaled camera; its scale is used."""
    source = ConstantScale(scale_estimate(2.0, 0.5, n_points=100))
    pipeline = DepthPipeline(FakeEstimator(lambda h, w: np.full((h, w), 0.25, np.float32)),
                             scale_source=source)
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera(),
                                    key='cam1'))
    key, header, shape, camera = source.calls[0]
    assert (key, shape, camera.width, camera.height) == ('cam1', (H, W), W, H)
    assert header.frame_id == FRAME
    np.testing.assert_allclose(image_to_depth(out.metric), 1.0)
    assert out.points is not None and out.scale.scale == 2.0
    # A fixed scale wins over the source; an unusable estimate stays relative.
    pipeline.output_config = OutputConfig(fixed_scale=4.0)
    np.testing.assert_allclose(image_to_depth(_one(pipeline, FrameInput(
        rgb_to_image(random_rgb(H, W), _header()), _camera())).metric), 1.0)
    pipeline.output_config = OutputConfig()
    assert out.scale_reason == ''
    source.scale = replace(scale_estimate(math.nan, math.nan, status='no_estimate',
                                          n_points=100), reason='low_inlier_ratio')
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera()))
    assert out.metric is None and NOTE_NO_METRIC_SCALE in out.notes
    assert out.scale_reason == 'low_inlier_ratio'


def test_no_scale_reason_comes_from_the_scale_recovery():
    """A frame the scale recovery gives no scale (None) still says why, from its last outcome."""
    recovery = ScaleRecovery(ScaleRecoveryConfig(source='sparse_depth'))
    pipeline = DepthPipeline(FakeEstimator(), scale_source=recovery)
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera()))
    assert out.scale is None and out.scale_reason == 'no_sparse_input'


def test_locally_refined_scale_uses_scale_recovery_apply():
    """A RefinedScaleEstimate is applied with scale recovery's own (refining) apply."""
    from marigold_model.scale_apply import apply_scale as apply_refined
    from marigold_model.scale_apply import RefinedScaleEstimate
    relative = np.tile(np.linspace(0.2, 0.8, W, dtype=np.float32), (H, 1))
    uv = np.array([[5, 5], [30, 20], [20, 10]])
    refined = RefinedScaleEstimate(
        scale=2.0, shift=0.5, inlier_ratio=1.0, residual=0.0, n_points=3, age_s=0.0,
        status='ok', sparse_uv=uv, sparse_metric=np.array([1.2, 2.4, 1.6]),
        grid_shape=(H, W))
    pipeline = DepthPipeline(FakeEstimator(lambda h, w: relative, uncertainty=0.1),
                             scale_source=ConstantScale(refined))
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera()))
    expected, spread = apply_refined(refined, relative, np.full((H, W), 0.1, np.float32))
    np.testing.assert_allclose(image_to_depth(out.metric), expected, rtol=1e-6)
    np.testing.assert_allclose(image_to_depth(out.uncertainty), spread, rtol=1e-6)
    assert not np.allclose(expected, 2.0 * relative + 0.5)  # the refinement did something


def test_scale_source_failure_is_a_problem_not_a_crash():
    """An exception in the scale source leaves the frame relative with a problem."""
    pipeline = DepthPipeline(FakeEstimator(), scale_source=ConstantScale(
        error=RuntimeError('boom')))
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera()))
    assert out.problems[0][0] == 'scale_source_error' and 'boom' in out.problems[0][1]
    assert out.relative is not None and out.metric is None
    assert out.scale_reason == 'scale_source_error'


# ---------------------------------------------------------------- batching and errors


def test_one_estimator_call_per_batch_with_keys():
    """Frames of several cameras (any sizes) go to the model in one call, keyed."""
    estimator = FakeEstimator()
    frames = [FrameInput(rgb_to_image(random_rgb(H, W), _header()), key='left'),
              FrameInput(rgb_to_image(random_rgb(20, 24), _header()), key='right')]
    outputs = DepthPipeline(estimator).process(frames)
    assert len(estimator.calls) == 1 and estimator.calls[0][1] == ['left', 'right']
    assert [(o.key, o.relative.width) for o in outputs] == [('left', W), ('right', 24)]
    assert all(o.timings['estimator'] >= 0 and 'decode' in o.timings for o in outputs)


@pytest.mark.parametrize('error, reason', [
    (EstimatorOutOfMemory('cuda ran out of memory'), 'out_of_memory'),
    (ValueError('frame too large'), 'estimator_rejected'),
])
def test_estimator_failures_become_frame_errors(error, reason):
    """Out of memory and rejected frames are reported per frame."""
    results = DepthPipeline(FakeEstimator(error=error)).process(
        [FrameInput(rgb_to_image(random_rgb(H, W), _header()), key='k')])
    assert results[0].reason == reason and results[0].key == 'k'


def test_output_config_validation():
    """Bad output settings raise ValueError naming the field."""
    for kwargs, name in [({'fixed_scale': -1.0}, 'fixed_scale'),
                         ({'fixed_shift': math.inf}, 'fixed_shift'),
                         ({'max_depth': -2.0}, 'max_depth'),
                         ({'max_input_pixels': 0}, 'max_input_pixels')]:
        with pytest.raises(ValueError, match=name):
            OutputConfig(**kwargs)


def test_with_the_tiny_model(random_model_dir):
    """The real estimator through the pipeline: shapes, range, batch of two sizes."""
    from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
    from marigold_model.estimator import DepthEstimator
    estimator = DepthEstimator(EstimatorConfig(
        ModelConfig(model=random_model_dir, device='cpu'),
        InferenceConfig(processing_resolution=32, ensemble_size=2)))
    frames = [FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera(), key='a'),
              FrameInput(rgb_to_image(random_rgb(24, 32), _header()), key='b')]
    first, second = DepthPipeline(estimator, OutputConfig(fixed_scale=2.0)).process(frames)
    relative = image_to_depth(first.relative)
    assert relative.shape == (H, W) and 0.0 <= relative.min() <= relative.max() <= 1.0
    assert first.points.height == H and first.uncertainty is not None
    assert (second.relative.height, second.relative.width) == (24, 32)
    assert second.points is None and NOTE_NO_CAMERA_INFO in second.notes


def test_depth_colored_only_when_asked_for():
    """depth/colored: relative depth without a scale, metric with one; never by default."""
    from marigold_model.data.synthetic import colorize_depth
    from marigold_ros.conversions import image_to_rgb
    rgb = rgb_to_image(random_rgb(H, W), _header())
    pipeline = DepthPipeline(FakeEstimator())
    assert _one(pipeline, FrameInput(rgb, _camera())).colored is None  # process_bag's way
    relative = _one(pipeline, FrameInput(rgb, _camera(), outputs=frozenset({'colored'})))
    depth = np.linspace(0.1, 0.9, H * W, dtype=np.float32).reshape(H, W)
    assert relative.colored.encoding == 'rgb8' and relative.colored.header == rgb.header
    np.testing.assert_array_equal(image_to_rgb(relative.colored),
                                  colorize_depth(depth, np.isfinite(depth)))
    # Fixed range in meters over the metric depth (2 * relative): near yellow, far purple.
    config = OutputConfig(fixed_scale=2.0, colored_range_min=0.2, colored_range_max=1.8)
    metric = _one(DepthPipeline(FakeEstimator(), config),
                  FrameInput(rgb, _camera(), outputs=frozenset({'colored'})))
    colours = image_to_rgb(metric.colored)
    np.testing.assert_array_equal(colours, colorize_depth(2 * depth, None, (0.2, 1.8)))
    assert tuple(colours[0, 0]) == (252, 255, 164) and tuple(colours[-1, -1]) == (10, 7, 40)


def test_implausible_calibration_is_a_problem_not_a_refusal():
    """A camera_info with fx/fy = 3 still gives the cloud, and the frame reports why."""
    k = K.copy()
    k[1, 1] = K[0, 0] / 3.0
    pipeline = DepthPipeline(FakeEstimator(), OutputConfig(fixed_scale=1.0))
    out = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera(k=k)))
    assert out.points is not None and out.camera_info is not None
    reasons = dict(out.problems)
    assert 'fx/fy' in reasons['camera_info_implausible']
    plain = _one(pipeline, FrameInput(rgb_to_image(random_rgb(H, W), _header()), _camera()))
    assert plain.problems == ()
