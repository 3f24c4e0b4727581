"""Sparse guidance (Marigold-DC) on the bundled model: accuracy, determinism, refusals."""

from marigold_model.alignment import abs_rel
from marigold_model.config import (BUNDLED_TINY_MODEL, EstimatorConfig, GuidanceConfig,
                                   InferenceConfig, ModelConfig)
from marigold_model.data.synthetic import SyntheticDataset
from marigold_model.estimator import DepthEstimator
from marigold_model.guidance import GuidanceError, sparse_points, SparseGuidance
from marigold_model.scale_tracking import sample_sparse_pairs, ScaleTracker
import numpy as np
import pytest

# Scenes no training run of the bundled model used (it trained on seed 1).
HELD_OUT_SEED = 2_000_001


@pytest.fixture(scope='module')
def estimator():
    """Return the bundled tiny model on the CPU at its own resolution."""
    return DepthEstimator(EstimatorConfig(ModelConfig(model=BUNDLED_TINY_MODEL, device='cpu'),
                                          InferenceConfig(seed=0)))


@pytest.fixture(scope='module')
def scenes():
    """Three held-out 48x64 rooms with sparse readings: 2 % of pixels, 2 % noise, outliers."""
    data = SyntheticDataset(length=3, seed=HELD_OUT_SEED, height=48, width=64)
    rng = np.random.default_rng(5)
    out = []
    for i in range(len(data)):
        sample = data[i]
        index = rng.choice(np.flatnonzero(sample.valid), 61, replace=False)
        truth = sample.depth.ravel()[index].astype(np.float64)
        values = truth * (1 + 0.02 * rng.standard_normal(index.size))
        values[:3] *= np.array([2.0, 0.5, 3.0])  # gross outliers
        sparse = np.zeros(sample.depth.shape)
        sparse.ravel()[index] = values
        out.append((sample, sparse))
    return out


def test_guided_depth_beats_the_global_fit(estimator, scenes):
    guidance = SparseGuidance(estimator, GuidanceConfig(denoising_steps=6))
    global_errors, guided_errors, failed_fits = [], [], 0
    for sample, sparse in scenes:
        relative = estimator.estimate(sample.rgb).depth
        fit = ScaleTracker().update(*sample_sparse_pairs(relative, sparse), 0.0)
        # A fit that fails (bench/guidance.py's protocol) is scored as the points' median.
        fitted = (fit.apply(relative) if fit.usable
                  else np.full(relative.shape, np.median(sparse[sparse > 0])))
        global_errors.append(abs_rel(fitted, sample.depth, sample.valid))
        failed_fits += not fit.usable
        if not fit.usable:  # guidance starts from the same fit: it cannot run either
            with pytest.raises(GuidanceError, match=fit.reason):
                guidance.estimate(sample.rgb, sparse)
            guided_errors.append(global_errors[-1])
            continue
        result = guidance.estimate(sample.rgb, sparse)
        assert result.depth.shape == sample.depth.shape
        assert result.n_points == 61
        assert result.global_fit.n_points == 61 and result.scale > 0
        assert 0.5 <= result.inlier_ratio <= 1.0
        np.testing.assert_allclose(result.scale_estimate().apply(result.relative),
                                   result.depth, rtol=1e-5)
        guided_errors.append(abs_rel(result.depth, sample.depth, sample.valid))
    # With the v4 bundled model every fit runs and guidance measured 0.073, 0.064 and 0.033
    # against 0.161, 0.095 and 0.044. With v3 the third scene's fit failed (negative scale:
    # its relative depth ran against the points) and both were scored as the median.
    assert failed_fits <= 1
    assert np.mean(guided_errors) < 0.85 * np.mean(global_errors)
    assert all(guided < fitted for guided, fitted in zip(guided_errors, global_errors)
               if guided != fitted)
    assert sum(guided < fitted for guided, fitted in zip(guided_errors, global_errors)) >= 2


def test_same_seed_same_depth_other_seed_other_depth(estimator, scenes):
    sample, sparse = scenes[0]
    guidance = SparseGuidance(estimator, GuidanceConfig(denoising_steps=2))
    first = guidance.estimate(sample.rgb, sparse, seed=4)
    again = guidance.estimate(sample.rgb, sparse, seed=4)
    other = guidance.estimate(sample.rgb, sparse, seed=5)
    np.testing.assert_array_equal(first.depth, again.depth)
    assert first.scale == again.scale and first.losses == again.losses
    assert np.nanmax(np.abs(first.depth - other.depth)) > 1e-4


def test_points_as_pixels_give_the_same_depth_as_an_image(estimator, scenes):
    sample, sparse = scenes[1]
    rows, cols = np.nonzero(sparse)
    guidance = SparseGuidance(estimator, GuidanceConfig(denoising_steps=1))
    from_image = guidance.estimate(sample.rgb, sparse)
    from_pixels = guidance.estimate(sample.rgb, uv=np.stack([cols, rows], axis=1),
                                    values=sparse[rows, cols])
    np.testing.assert_allclose(from_pixels.depth, from_image.depth, rtol=1e-5)


def test_too_few_points_are_refused(estimator, scenes):
    sample, sparse = scenes[0]
    few = np.zeros_like(sparse)
    rows, cols = np.nonzero(sparse)
    few[rows[:5], cols[:5]] = sparse[rows[:5], cols[:5]]
    with pytest.raises(GuidanceError) as error:
        SparseGuidance(estimator).estimate(sample.rgb, few)
    assert error.value.reason == 'too_few_points'


def test_sparse_points_normalises_both_inputs():
    image = np.zeros((4, 8))
    image[1, 2] = 3.0
    image[3, 7] = np.nan
    xy, z = sparse_points(image)
    np.testing.assert_allclose(xy, [[2.5 / 8, 1.5 / 4]])
    np.testing.assert_allclose(z, [3.0])
    xy, z = sparse_points(uv=np.array([[2.0, 1.0], [50.0, 1.0], [1.0, 1.0]]),
                          values=np.array([3.0, 2.0, 0.0]), frame_shape=(4, 8))
    np.testing.assert_allclose(xy, [[2.5 / 8, 1.5 / 4]])
    with pytest.raises(ValueError, match='either'):
        sparse_points(image, uv=np.zeros((1, 2)), values=np.ones(1))
    with pytest.raises(ValueError, match='frame_shape'):
        sparse_points(uv=np.zeros((1, 2)), values=np.ones(1))


@pytest.mark.parametrize('changes, field', [
    ({'denoising_steps': 0}, 'denoising_steps'),
    ({'iterations_per_step': 0}, 'iterations_per_step'),
    ({'refine_iterations': -1}, 'refine_iterations'),
    ({'latent_lr': 0.0}, 'latent_lr'),
    ({'affine_lr': float('nan')}, 'affine_lr'),
    ({'loss': 'l2'}, 'loss'),
    ({'outlier_threshold_rel': -0.1}, 'outlier_threshold_rel'),
    ({'min_points': 1}, 'min_points'),
    ({'min_inlier_ratio': 1.5}, 'min_inlier_ratio'),
])
def test_bad_settings_are_refused_when_made(changes, field):
    with pytest.raises(ValueError, match=field):
        GuidanceConfig(**changes)
