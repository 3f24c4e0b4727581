"""Tests of marigold_model.scale_apply: metric depth from an estimate, local refinement."""

import math

from builders import scale_estimate, sparse_image, synthetic_scene
from marigold_model.alignment import abs_rel
from marigold_model.scale_apply import apply_scale, refine_local
from marigold_model.scale_tracking import sample_sparse_pairs, ScaleEstimate, ScaleTracker
from marigold_model.scale_tracking import sparse_pixels
import numpy as np
import pytest


def test_apply_scale_depth_and_uncertainty_in_meters():
    estimate = scale_estimate(4.0, 0.5)
    rel = np.array([[0.0, 0.5], [1.0, np.nan]], np.float32)
    unc = np.array([[0.01, 0.02], [0.03, 0.04]], np.float32)
    metric, metric_unc = apply_scale(estimate, rel, unc)
    assert metric.dtype == np.float32 and metric_unc.dtype == np.float32
    np.testing.assert_allclose(metric[:, 0], [0.5, 4.5])
    np.testing.assert_allclose(metric_unc[0], [0.04, 0.08])
    assert np.isnan(metric[1, 1]) and np.isnan(metric_unc[1, 1])
    assert apply_scale(estimate, rel)[1] is None
    assert np.isnan(rel[1, 1]) and rel[0, 1] == 0.5  # input untouched
    # Depth <= 0 is no reading (REP 118), and so is depth beyond max_depth.
    negative, negative_unc = apply_scale(scale_estimate(1.0, -0.25), rel, unc)
    assert np.isnan(negative[0, 0]) and np.isnan(negative_unc[0, 0])
    near, near_unc = apply_scale(estimate, rel, unc, max_depth=2.0)
    assert near[0, 0] == 0.5 and np.isnan(near[0, 1]) and np.isnan(near_unc[0, 1])
    unusable = ScaleEstimate(scale=math.nan, shift=math.nan, inlier_ratio=0.0,
                             residual=math.nan, n_points=0, age_s=math.inf,
                             status='no_estimate')
    for est in (None, unusable):
        with pytest.raises(ValueError, match='relative'):
            apply_scale(est, rel)
    with pytest.raises(ValueError, match='shape'):
        apply_scale(estimate, rel, unc[:1])


def test_local_refinement_beats_the_global_fit():
    ratios = []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        gt, rel = synthetic_scene(rng)
        sparse = sparse_image(rng, gt, fraction=0.01)
        estimate = ScaleTracker().update(*sample_sparse_pairs(rel, sparse), 0.0)
        global_depth = estimate.apply(rel)
        uv, values = sparse_pixels(sparse, rel.shape)
        refined = refine_local(global_depth, uv, values)
        ratios.append(abs_rel(refined, gt) / abs_rel(global_depth, gt))
    assert max(ratios) < 0.9


def test_refine_local_corrects_near_points_and_fades_far_away():
    depth = np.full((60, 80), 4.0)
    # A grid of points in the left quarter all reading 10 % farther than the global fit.
    rows, cols = np.mgrid[2:60:4, 1:20:4]
    uv = np.stack([cols.ravel(), rows.ravel()], axis=1)
    refined = refine_local(depth, uv, np.full(len(uv), 4.4), sigma_px=8.0)
    assert refined.dtype == np.float32 and refined.shape == depth.shape
    assert refined[30, 9] == pytest.approx(4.4, rel=0.01)
    assert refined[30, 79] == pytest.approx(4.0, rel=1e-4)
    # Linear space gives the same here (a constant offset), gross outliers are ignored.
    z = np.full(len(uv), 4.4)
    z[::5] = 20.0
    linear = refine_local(depth, uv, z, sigma_px=8.0, space='linear')
    assert linear[30, 9] == pytest.approx(4.4, rel=0.01)


def test_refine_local_keeps_invalid_pixels_and_handles_no_points():
    depth = np.full((10, 12), 2.0)
    depth[0, 0] = np.nan
    depth[0, 1] = 0.0
    refined = refine_local(depth, np.array([[5.0, 5.0], [100.0, 3.0]]), np.array([2.2, 3.0]))
    assert np.isnan(refined[0, 0]) and refined[0, 1] == 0.0
    assert refined[5, 5] > 2.0
    unchanged = refine_local(depth, np.zeros((0, 2)), np.zeros(0))
    np.testing.assert_array_equal(unchanged, depth.astype(np.float32))
    with pytest.raises(ValueError):
        refine_local(depth, np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError):
        refine_local(depth, np.zeros((1, 2)), np.ones(1), space='cubic')


# Mutation-testing follow-ups (issue 18): apply_scale bounds and messages.


def _fixed_estimate(scale, shift, status='ok'):
    return ScaleEstimate(scale=scale, shift=shift, inlier_ratio=1.0, residual=0.0,
                         n_points=10, age_s=0.0, status=status)


def test_apply_scale_messages():
    with pytest.raises(ValueError, match=r'^no usable metric scale: stay relative \(status '
                       r"'no_estimate'\)$"):
        apply_scale(_fixed_estimate(math.nan, math.nan, 'no_estimate'), np.ones((2, 2)))
    with pytest.raises(ValueError, match=r'\(status None\)$'):
        apply_scale(None, np.ones((2, 2)))
    with pytest.raises(ValueError, match=r'^relative depth must be H x W, got shape \(4,\)$'):
        apply_scale(_fixed_estimate(2.0, 0.0), np.ones(4))


def test_apply_scale_zero_and_max_depth_bounds():
    # 2 r - 1 on r = 0.5, 0.75, 1.0, 1.25: 0 (not positive: NaN), 0.5, 1.0, 1.5.
    rel = np.array([[0.5, 0.75], [1.0, 1.25]])
    depth, _ = apply_scale(_fixed_estimate(2.0, -1.0), rel)
    assert np.isnan(depth[0, 0]) and depth[0, 1] == 0.5 and depth[1].tolist() == [1.0, 1.5]
    # max_depth 1.0 (below 1 m limits too): 1.0 is kept, 1.5 is beyond.
    depth, _ = apply_scale(_fixed_estimate(2.0, -1.0), rel, max_depth=1.0)
    assert depth[0, 1] == 0.5 and depth[1, 0] == 1.0 and np.isnan(depth[1, 1])
    depth, _ = apply_scale(_fixed_estimate(2.0, -1.0), rel, max_depth=0.75)
    assert depth[0, 1] == 0.5 and np.isnan(depth[1]).all()
