"""The device output maths (marigold_ros.device_outputs) against the host path of the node."""

import array
from functools import partial

from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import DepthEstimator, processing_size
from marigold_model.scale_apply import RefinedScaleEstimate
from marigold_model.scale_tracking import ScaleEstimate, STATUS_NO_ESTIMATE
from marigold_ros.conversions import image_to_depth, pointcloud2_to_xyz, rgb_to_image
from marigold_ros.device_outputs import cloud_points, DeviceRays, metric_outputs
from marigold_ros.device_outputs import runs_on_device, to_host
from marigold_ros.geometry import CameraModel, scale_camera
from marigold_ros.pipeline import DepthPipeline, fixed_scale_estimate, FrameInput
from marigold_ros.pipeline import OutputConfig
from msg_builders import header
import numpy as np
import pytest
import torch

WIDTH, HEIGHT = 100, 75
RESOLUTION = 48
K = np.array([[82.0, 0.0, 49.3], [0.0, 80.5, 38.1], [0.0, 0.0, 1.0]])
# plumb_bob k1 k2 p1 p2 k3, all nonzero: the rays are undistorted iteratively.
D = np.array([-0.28, 0.09, 0.0012, -0.0008, -0.015])
SCALE, SHIFT, MAX_DEPTH = 3.0, -0.4, 2.0
TOLERANCE_M = 1e-5


_header = partial(header, sec=3, nanosec=7, frame_id='cam_optical')


def _distorted_camera_info():
    return CameraModel(WIDTH, HEIGHT, K, D, 'plumb_bob', frame_id='cam_optical').to_msg(
        _header())


def _decoded(members, seed=0):
    """Smooth decoder-like outputs [E, 1, PH, PW] in [0, 1], padded to a multiple of 8."""
    height, width = processing_size(HEIGHT, WIDTH, RESOLUTION)
    rows, cols = -(-height // 8) * 8, -(-width // 8) * 8
    v, u = np.mgrid[0:rows, 0:cols].astype(np.float32)
    rng = np.random.default_rng(seed)
    maps = [0.5 + 0.4 * np.sin(u / (7 + 2 * e) + rng.uniform(0, 3)) * np.cos(v / 9)
            + 0.02 * rng.standard_normal((rows, cols)) for e in range(members)]
    return torch.from_numpy(np.clip(np.stack(maps)[:, None], 0, 1).astype(np.float32)), \
        (height, width)


class FinishingEstimator:
    """Return DepthEstimator._finish of given decoder outputs: the host path of the node."""

    def __init__(self, decoded, size, inference):
        """Keep the decoder outputs, the processing size and the settings."""
        self.decoded, self.size, self.inference = decoded, size, inference
        self.device = torch.device('cpu')

    def estimate(self, frames, keys=None, device_tensors=False):
        """One DepthResult per frame, made by the estimator's own finishing code."""
        results = [DepthEstimator._finish(None, frame, self.size, self.decoded,
                                          self.inference, {}) for frame in frames]
        for result in results:
            if not device_tensors:
                result.device_depth = result.device_uncertainty = None
        return results


def _host_path(decoded, size, inference, config):
    rgb = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    pipeline = DepthPipeline(FinishingEstimator(decoded, size, inference), config)
    (out,) = pipeline.process([FrameInput(rgb_to_image(rgb, _header()), _distorted_camera_info())])
    return out


def _device_path(decoded, size, inference, config, device='cpu'):
    frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    relative = DepthEstimator._finish(None, frame, size, decoded.to(device), inference, {})
    height, width = relative.depth.shape
    camera = scale_camera(CameraModel.from_msg(_distorted_camera_info()), width, height)
    rays = DeviceRays(device).get(camera)
    estimate = fixed_scale_estimate(config.fixed_scale, config.fixed_shift)
    return relative, metric_outputs(relative.device_depth, estimate, config.max_depth,
                                    relative.device_uncertainty, rays)


def _assert_same_metres(device, host):
    assert device.shape == host.shape and device.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(device), np.isnan(host))
    assert np.nanmax(np.abs(device.astype(np.float64) - host)) <= TOLERANCE_M


def _case(members, match_input):
    """Return the decoder outputs, their processing size and the settings of one case."""
    decoded, size = _decoded(members)
    inference = InferenceConfig(ensemble_size=members, match_input_resolution=match_input)
    config = OutputConfig(fixed_scale=SCALE, fixed_shift=SHIFT, max_depth=MAX_DEPTH)
    return decoded, size, inference, config


@pytest.mark.parametrize('members', [1, 3])
@pytest.mark.parametrize('match_input', [True, False])
def test_device_outputs_equal_the_host_path_with_distortion(members, match_input):
    """Resize, metric depth, uncertainty and cloud equal the node's host path to 1e-5 m."""
    decoded, size, inference, config = _case(members, match_input)
    host = _host_path(decoded, size, inference, config)
    relative, metric = _device_path(decoded, size, inference, config)

    expected_size = (HEIGHT, WIDTH) if match_input else size
    host_relative = image_to_depth(host.relative)
    assert host_relative.shape == expected_size
    np.testing.assert_array_equal(relative.depth, host_relative)

    host_metric = image_to_depth(host.metric)
    # The case exercises both validity rules: non-positive depths and depths beyond max.
    assert np.isnan(host_metric).any() and np.isfinite(host_metric).any()
    assert (SCALE * host_relative + SHIFT > MAX_DEPTH).any()
    assert (SCALE * host_relative + SHIFT <= 0).any()
    _assert_same_metres(metric.metric, host_metric)

    host_xyz = pointcloud2_to_xyz(host.points).reshape(expected_size + (3,))
    assert metric.points.shape == expected_size + (4,)
    _assert_same_metres(metric.points[:, :, :3], host_xyz)
    assert not metric.points[:, :, 3].any()  # the colour word is left to the host

    if members == 1:
        assert relative.uncertainty is None and metric.uncertainty is None
        assert host.uncertainty is None
    else:
        _assert_same_metres(metric.uncertainty, image_to_depth(host.uncertainty))
        assert np.nanmax(metric.uncertainty) > 0


def test_cloud_rays_differ_from_a_pinhole():
    """The distortion matters here: a pinhole cloud would be centimetres off at the edges."""
    decoded, size = _decoded(1)
    inference = InferenceConfig(ensemble_size=1)
    config = OutputConfig(fixed_scale=SCALE, fixed_shift=1.0)
    _, metric = _device_path(decoded, size, inference, config)
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH]
    pinhole_x = (u - K[0, 2]) / K[0, 0] * metric.metric
    assert np.nanmax(np.abs(pinhole_x - metric.points[:, :, 0])) > 0.05


def test_rays_cached_per_camera_and_bounded():
    """One ray grid per camera, reused; the oldest camera goes beyond max_cameras."""
    cache = DeviceRays('cpu', max_cameras=2)
    camera = CameraModel(WIDTH, HEIGHT, K, D, 'plumb_bob')
    first = cache.get(camera)
    assert cache.get(camera) is first
    assert first[0].shape == (HEIGHT, WIDTH) and first[0].dtype == torch.float32
    assert first[2].dtype == torch.bool
    small = cache.get(scale_camera(camera, 50, 37))
    assert small[0].shape == (37, 50)
    cache.get(CameraModel(WIDTH, HEIGHT, K))
    assert cache.get(camera) is not first  # evicted as the oldest, then rebuilt
    np.testing.assert_array_equal(cache.get(camera)[0].numpy(), first[0].numpy())


def test_cloud_of_a_depth_of_another_size_is_refused():
    """Rays of the full-size camera do not fit a depth at the processing size."""
    rays = DeviceRays('cpu').get(CameraModel(WIDTH, HEIGHT, K, D, 'plumb_bob'))
    with pytest.raises(ValueError, match='scaled to the depth resolution'):
        cloud_points(torch.ones(37, 50), rays)


def test_refined_and_unusable_estimates_stay_on_the_host():
    """Local refinement (scipy) has no device version; an unusable scale gives no metric."""
    refined = RefinedScaleEstimate(
        scale=2.0, shift=0.0, inlier_ratio=1.0, residual=0.0, n_points=3, age_s=0.0,
        status='ok', sparse_uv=np.zeros((3, 2)), sparse_metric=np.ones(3), grid_shape=(4, 5))
    assert not runs_on_device(refined)
    assert runs_on_device(fixed_scale_estimate(2.0, 0.0))
    with pytest.raises(ValueError, match='host'):
        metric_outputs(torch.ones(4, 5), refined)
    none = ScaleEstimate(scale=2.0, shift=0.0, inlier_ratio=0.0, residual=0.0, n_points=0,
                         age_s=0.0, status=STATUS_NO_ESTIMATE)
    for unusable in (none, None):
        with pytest.raises(ValueError, match='no usable metric scale'):
            metric_outputs(torch.ones(4, 5), unusable)


def test_to_host_on_the_cpu_shares_memory():
    """CPU tensors are already host memory: no copy, None stays None."""
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    array, nothing = to_host([tensor, None])
    assert nothing is None and np.shares_memory(array, tensor.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_outputs_equal_the_cpu_outputs():
    """On CUDA the same code gives the CPU figures (to 1e-5 m) through pinned buffers."""
    decoded, size = _decoded(3)
    inference = InferenceConfig(ensemble_size=3)
    config = OutputConfig(fixed_scale=SCALE, fixed_shift=SHIFT, max_depth=MAX_DEPTH)
    _, cpu = _device_path(decoded, size, inference, config)
    _, cuda = _device_path(decoded, size, inference, config, device='cuda')
    for name in ('metric', 'uncertainty', 'points'):
        _assert_same_metres(getattr(cuda, name), getattr(cpu, name))


def test_points_land_in_the_cloud_message_buffer_byte_for_byte():
    """Given the message's array('B') as points_out, x y z are the host cloud's bytes."""
    decoded, size = _decoded(1)
    inference = InferenceConfig(ensemble_size=1)
    config = OutputConfig(fixed_scale=SCALE, fixed_shift=SHIFT, max_depth=MAX_DEPTH)
    host = _host_path(decoded, size, inference, config)
    relative = DepthEstimator._finish(None, np.zeros((HEIGHT, WIDTH, 3), np.uint8), size,
                                      decoded[:1], inference, {})
    camera = scale_camera(CameraModel.from_msg(_distorted_camera_info()), WIDTH, HEIGHT)
    data = array.array('B', [0]) * (16 * HEIGHT * WIDTH)
    buffer = np.frombuffer(data, '<f4').reshape(HEIGHT, WIDTH, 4)
    metric = metric_outputs(relative.device_depth, fixed_scale_estimate(SCALE, SHIFT), MAX_DEPTH,
                            rays=DeviceRays('cpu').get(camera), points_out=buffer)
    assert metric.points is buffer or np.shares_memory(metric.points, buffer)
    words = np.frombuffer(data, '<u4').reshape(HEIGHT, WIDTH, 4)
    host_words = np.frombuffer(bytes(host.points.data), '<u4').reshape(HEIGHT, WIDTH, 4)
    assert np.isnan(buffer[:, :, 2]).any()
    np.testing.assert_array_equal(words[:, :, :3], host_words[:, :, :3])
    with pytest.raises(ValueError, match='output buffer'):
        to_host([torch.zeros(2, 3)], [np.zeros((3, 2), np.float32)])


class RefinedScale:
    """A scale source giving a locally refined estimate (host path only)."""

    def estimate(self, key, header, relative_depth, camera):
        """Refine towards three points at the depth image's corners."""
        height, width = relative_depth.shape
        uv = np.array([[0.0, 0.0], [width - 1.0, 0.0], [0.0, height - 1.0]])
        return RefinedScaleEstimate(
            scale=SCALE, shift=SHIFT, inlier_ratio=1.0, residual=0.0, n_points=3, age_s=0.0,
            status='ok', sparse_uv=uv, sparse_metric=np.array([1.0, 1.5, 2.0]),
            grid_shape=(height, width))


def _pipeline_outputs(decoded, size, inference, config, device_outputs, scale_source=None):
    rgb = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    pipeline = DepthPipeline(FinishingEstimator(decoded, size, inference), config,
                             scale_source, device_outputs=device_outputs)
    assert pipeline.device_outputs is device_outputs
    (out,) = pipeline.process([FrameInput(rgb_to_image(rgb, _header()), _distorted_camera_info(),
                                          outputs=frozenset({'relative', 'metric', 'points',
                                                             'uncertainty', 'camera_info'}))])
    return out


@pytest.mark.parametrize('members', [1, 3])
@pytest.mark.parametrize('match_input', [True, False])
def test_pipeline_device_path_publishes_the_host_path_messages(members, match_input):
    """DepthPipeline(device_outputs=True) on the CPU: every message equal, byte for byte."""
    decoded, size, inference, config = _case(members, match_input)
    host = _pipeline_outputs(decoded, size, inference, config, False)
    device = _pipeline_outputs(decoded, size, inference, config, True)
    assert host.points is not None and host.metric is not None
    assert (host.uncertainty is None) == (members == 1)
    for name in ('relative', 'metric', 'uncertainty', 'points', 'camera_info'):
        assert getattr(device, name) == getattr(host, name), name
    words = np.frombuffer(bytes(device.points.data), '<u4').reshape(-1, 4)
    assert words[:, 3].any()  # the colours were written after the device's x y z


def test_pipeline_device_path_leaves_a_refined_scale_to_the_host():
    """A locally refined estimate is applied by scipy on the host, device path or not."""
    decoded, size = _decoded(1)
    inference = InferenceConfig(ensemble_size=1)
    config = OutputConfig(max_depth=MAX_DEPTH)
    host = _pipeline_outputs(decoded, size, inference, config, False, RefinedScale())
    device = _pipeline_outputs(decoded, size, inference, config, True, RefinedScale())
    assert isinstance(device.scale, RefinedScaleEstimate)
    for name in ('metric', 'points'):
        assert getattr(device, name) == getattr(host, name), name


def test_estimator_keeps_device_tensors_only_when_asked(random_model_dir):
    """Results hold device tensors only with device_tensors=True; the same numbers."""
    tiny_estimator = DepthEstimator(EstimatorConfig(ModelConfig(model=random_model_dir,
                                                                device='cpu')))
    rgb = np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    plain = tiny_estimator.estimate(rgb)
    assert plain.device_depth is None and plain.device_uncertainty is None
    kept = tiny_estimator.estimate(rgb, device_tensors=True)
    assert kept.device_depth.device == tiny_estimator.device
    np.testing.assert_array_equal(kept.device_depth.cpu().numpy(), kept.depth)
    assert kept.device_depth.shape == (40, 56)


def test_pipeline_takes_the_device_path_by_default_only_for_cuda():
    """Auto: on for an estimator on CUDA, off on the CPU, where numpy is as fast."""
    class OnDevice:
        def __init__(self, device):
            self.device = torch.device(device)

    assert DepthPipeline(OnDevice('cuda')).device_outputs
    assert not DepthPipeline(OnDevice('cpu')).device_outputs
    assert not DepthPipeline(object()).device_outputs
