"""The benchmarks' stand-in estimator (bench/stand_in.py) satisfies the depth pipeline."""

from pathlib import Path

from builders import load_script
from builtin_interfaces.msg import Time
from marigold_model.config import EstimatorConfig, InferenceConfig, ModelConfig
from marigold_model.estimator import processing_size
from marigold_ros.conversions import image_to_depth, pointcloud2_to_xyz, rgb_to_image
from marigold_ros.geometry import CameraModel
from marigold_ros.pipeline import DepthPipeline, FrameError, FrameInput, OutputConfig
import numpy as np
import pytest
from std_msgs.msg import Header

BENCH = Path(__file__).resolve().parent.parent / 'bench'


stand_in = load_script(BENCH / 'stand_in.py', 'stand_in')
H, W = 48, 64
K = np.array([[60.0, 0.0, 31.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]])


def _frame(key='cam', rgb=None):
    header = Header(stamp=Time(sec=5, nanosec=1), frame_id='cam_optical')
    rgb = np.full((H, W, 3), 120, np.uint8) if rgb is None else rgb
    info = CameraModel(W, H, K, frame_id='cam_optical').to_msg(header)
    return FrameInput(rgb_to_image(rgb, header), info, key)


def test_pipeline_runs_one_frame_with_the_stand_in():
    """Relative, metric, uncertainty and cloud come out, after the stand-in's time."""
    inference = InferenceConfig(ensemble_size=3, processing_resolution=32)
    estimator = stand_in.StandInEstimator(20, EstimatorConfig(inference=inference))
    pipeline = DepthPipeline(estimator, OutputConfig(fixed_scale=2.0, fixed_shift=0.5))
    (out,) = pipeline.process([_frame()])
    assert not isinstance(out, FrameError)
    relative = image_to_depth(out.relative)
    assert relative.shape == (H, W)
    assert relative.min() == 0.0 and relative.max() == 1.0
    assert (np.diff(relative[:, W // 2]) < 0).all()  # far at the top, near at the bottom
    np.testing.assert_allclose(image_to_depth(out.metric), 2.0 * relative + 0.5, rtol=1e-6)
    spread = image_to_depth(out.uncertainty)
    assert spread.shape == (H, W) and (spread > 0).all()
    xyz = pointcloud2_to_xyz(out.points)
    assert xyz.shape == (H * W, 3) and np.isfinite(xyz).all()
    # time.sleep waits at least the time asked for: a lower bound, never flaky.
    assert out.timings['estimator'] >= 0.020 and out.timings['stand_in'] >= 0.020
    assert estimator.calls == 1 and estimator.frames == 1 and estimator.warm_keys == {'cam'}


def test_stand_in_follows_the_settings():
    """Output size, ensemble spread and defaults behave as the real estimator's."""
    estimator = stand_in.StandInEstimator(0, default_steps=2, default_resolution=40)
    assert estimator.resolved_settings() == (2, 40)
    frames = [np.zeros((H, W, 3), np.uint8), np.zeros((30, 20, 3), np.uint8)]
    results = estimator.estimate(frames, keys=['a', 'b'])
    assert [r.depth.shape for r in results] == [(H, W), (30, 20)]
    assert results[0].processing_size == processing_size(H, W, 40)
    assert all(r.uncertainty is None for r in results)
    estimator.set_inference(InferenceConfig(match_input_resolution=False, ensemble_size=2,
                                            processing_resolution=-1, denoising_steps=3))
    assert estimator.resolved_settings() == (3, 0)
    result = estimator.estimate(frames[1])
    assert result.depth.shape == (30, 20) and result.uncertainty.shape == (30, 20)
    estimator.set_inference(InferenceConfig(match_input_resolution=False))
    assert estimator.estimate(frames[0]).depth.shape == processing_size(H, W, 40)
    estimator.reset_warm_start('a')
    assert estimator.warm_keys == {'b'}
    estimator.reset_warm_start()
    assert not estimator.warm_keys


def test_stand_in_refuses_what_the_estimator_refuses():
    """Bad settings and frames raise ValueError, which the pipeline turns into FrameError."""
    estimator = stand_in.StandInEstimator(0)
    with pytest.raises(ValueError, match='ensemble_size'):
        estimator.set_inference(InferenceConfig(ensemble_size=0))
    with pytest.raises(ValueError, match='no frames'):
        estimator.estimate([])
    with pytest.raises(ValueError, match='milliseconds'):
        stand_in.StandInEstimator(-1)
    (out,) = DepthPipeline(estimator).process([_frame(rgb=np.zeros((H, W, 3), np.uint8))])
    assert not isinstance(out, FrameError)
    tiny = EstimatorConfig(ModelConfig(max_input_pixels=100))
    (out,) = DepthPipeline(stand_in.StandInEstimator(0, tiny)).process([_frame()])
    assert isinstance(out, FrameError) and out.reason == 'estimator_rejected'


def test_each_result_owns_its_depth():
    """Results are independent writable arrays, as the real estimator's."""
    estimator = stand_in.StandInEstimator(0)
    first, second = estimator.estimate([np.zeros((H, W, 3), np.uint8)] * 2)
    first.depth[:] = -1.0
    assert second.depth.min() == 0.0 and second.depth.flags.writeable
