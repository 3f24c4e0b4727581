"""Tests of marigold_model.alignment: least squares, robust fits, metrics, normalisation."""

import math
import pickle

from marigold_model.alignment import abs_rel, AlignmentError, delta1, delta2, delta3
from marigold_model.alignment import delta_accuracy, depth_metrics, evaluate_affine_invariant
from marigold_model.alignment import fit_scale_shift, fit_scale_shift_robust, FitResult
from marigold_model.alignment import METHODS, normalize_percentile, rmse, sq_rel
import numpy as np
import pytest


def _outlier_data(seed, n=400, scale=2.5, shift=0.7, outlier_rate=0.3, noise=0.01):
    """Points on ``d = scale * r + shift`` with multiplicative noise and gross outliers."""
    rng = np.random.default_rng(seed)
    rel = rng.uniform(0.0, 1.0, n)
    depth = (scale * rel + shift) * (1.0 + noise * rng.standard_normal(n))
    bad = rng.permutation(n)[:int(round(outlier_rate * n))]
    # Gross outliers: off by a factor 1.5 to 5, up or down.
    factor = np.exp(rng.choice([-1.0, 1.0], bad.size) * rng.uniform(0.4, 1.6, bad.size))
    depth[bad] *= factor
    return rel, depth


# Least squares


def test_lsq_exact_hand_case():
    # 3 = 2*1 + 1, 5 = 2*2 + 1, 7 = 2*3 + 1
    s, t = fit_scale_shift([1.0, 2.0, 3.0], [3.0, 5.0, 7.0])
    assert s == pytest.approx(2.0, abs=1e-12)
    assert t == pytest.approx(1.0, abs=1e-12)


def test_lsq_hand_computed_with_residuals():
    # pred [0, 1, 2], target [0, 2, 1]: mean p = 1, mean d = 1, cov = 1, var = 2
    s, t = fit_scale_shift(np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 1.0]))
    assert s == pytest.approx(0.5)
    assert t == pytest.approx(0.5)


def test_lsq_any_shape_mask_and_nan():
    pred = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    target = 3.0 * pred - 2.0
    target[0, 0, 0] = np.nan  # ignored: not finite
    target[1, 2, 1] = 1e6  # ignored: masked out
    mask = np.ones(pred.shape, dtype=bool)
    mask[1, 2, 1] = False
    s, t = fit_scale_shift(pred, target, mask)
    assert (s, t) == pytest.approx((3.0, -2.0))


def test_lsq_weights_select_points():
    # Zero weight removes the third point; the first two define the line exactly.
    s, t = fit_scale_shift([0.0, 1.0, 2.0], [1.0, 3.0, 100.0], weights=[1.0, 1.0, 0.0])
    assert (s, t) == pytest.approx((2.0, 1.0))
    # Weighted: pred [0, 1], target [0, 1] plus a heavy point (2, 4).
    s, t = fit_scale_shift([0.0, 1.0, 2.0], [0.0, 1.0, 4.0], weights=[1.0, 1.0, 2.0])
    # Weighted means p = 5/4, d = 9/4; var = (25 + 1 + 2 * 9) / 16, cov = (45 + 5 + 2 * 21) / 16
    assert s == pytest.approx(92.0 / 44.0)
    assert t == pytest.approx(9.0 / 4.0 - 92.0 / 44.0 * 5.0 / 4.0)


def test_lsq_keeps_negative_scale():
    s, t = fit_scale_shift([0.0, 1.0, 2.0], [5.0, 3.0, 1.0])
    assert (s, t) == pytest.approx((-2.0, 5.0))


@pytest.mark.parametrize('pred, target, reason', [
    ([1.0], [2.0], 'too_few_points'),
    ([1.0, np.nan], [2.0, 3.0], 'too_few_points'),
    ([0.5, 0.5, 0.5], [1.0, 2.0, 3.0], 'degenerate_range'),
    ([0.0, 0.0], [1.0, 2.0], 'degenerate_range'),
])
def test_lsq_errors(pred, target, reason):
    with pytest.raises(AlignmentError) as info:
        fit_scale_shift(pred, target)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    assert reason in str(info.value)


def test_lsq_bad_input_raises_value_error():
    with pytest.raises(ValueError, match='shape'):
        fit_scale_shift([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match='non-negative'):
        fit_scale_shift([1.0, 2.0], [1.0, 2.0], weights=[1.0, -1.0])


def test_alignment_error_pickles_with_reason():
    error = pickle.loads(pickle.dumps(AlignmentError('degenerate_range', 'flat')))
    assert error.reason == 'degenerate_range'
    assert str(error) == 'degenerate_range: flat'


# Robust fits


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ransac_recovers_with_30_percent_outliers(seed):
    rel, depth = _outlier_data(seed)
    s_lsq, t_lsq = fit_scale_shift(rel, depth)
    # Plain least squares is visibly pulled off (at r = 0 or r = 1).
    assert max(abs(t_lsq - 0.7), abs(s_lsq + t_lsq - 3.2)) > 0.15
    fit = fit_scale_shift_robust(rel, depth, rng=seed)
    assert isinstance(fit, FitResult)
    assert fit.scale == pytest.approx(2.5, rel=0.02)
    assert fit.shift == pytest.approx(0.7, abs=0.03)
    assert fit.n_points == 400
    assert 0.65 <= fit.inlier_ratio <= 0.75
    assert fit.n_inliers == round(fit.inlier_ratio * fit.n_points)
    assert 0.0 < fit.residual < 0.02


@pytest.mark.parametrize('method, loss', [('ransac', 'cauchy'), ('ransac', 'huber'),
                                          ('irls', None)])
def test_robust_variants_recover(method, loss):
    rel, depth = _outlier_data(5, outlier_rate=0.2)
    fit = fit_scale_shift_robust(rel, depth, method=method, loss=loss)
    assert fit.scale == pytest.approx(2.5, rel=0.03)
    assert fit.shift == pytest.approx(0.7, abs=0.04)


def test_ransac_scores_a_subset_of_dense_input():
    rel, depth = _outlier_data(4, n=50000, outlier_rate=0.3)
    fit = fit_scale_shift_robust(rel, depth, score_points=500)
    assert fit.n_points == 50000  # the refinement and the statistics use every point
    assert fit.scale == pytest.approx(2.5, rel=0.005)
    assert fit.inlier_ratio == pytest.approx(0.7, abs=0.005)


def test_robust_exact_data_and_apply():
    rel = np.linspace(0.0, 1.0, 11)
    fit = fit_scale_shift_robust(rel, 4.0 * rel + 1.0)
    assert (fit.scale, fit.shift) == pytest.approx((4.0, 1.0))
    assert fit.inlier_ratio == 1.0
    assert fit.residual == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(fit.apply([0.0, 0.5]), [1.0, 3.0])


def test_robust_is_deterministic_for_a_seed():
    rel, depth = _outlier_data(3, outlier_rate=0.45, noise=0.03)
    first = fit_scale_shift_robust(rel, depth, iterations=20, rng=7)
    again = fit_scale_shift_robust(rel, depth, iterations=20, rng=np.random.default_rng(7))
    assert first == again
    assert fit_scale_shift_robust(rel, depth, iterations=20) == \
        fit_scale_shift_robust(rel, depth, iterations=20)


def test_robust_ignores_non_positive_targets_and_mask():
    rel = np.linspace(0.0, 1.0, 20)
    depth = 2.0 * rel + 1.0
    depth[:3] = [0.0, -1.0, np.nan]
    mask = np.ones(20, dtype=bool)
    mask[3] = False
    fit = fit_scale_shift_robust(rel, depth, mask)
    assert fit.n_points == 16
    assert (fit.scale, fit.shift) == pytest.approx((2.0, 1.0))


@pytest.mark.parametrize('rel, depth, kwargs, reason', [
    ([0.1, 0.2], [1.0, 2.0], {}, 'too_few_points'),  # fewer than min_inliers=3
    ([0.1], [1.0], {'min_inliers': 2}, 'too_few_points'),
    ([0.1, 0.2, 0.3], [1.0, 0.0, -1.0], {}, 'too_few_points'),  # targets <= 0 ignored
    ([0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0], {}, 'degenerate_range'),
    ([0.5, 0.51, 0.52], [1.0, 2.0, 3.0], {'min_span': 0.05}, 'degenerate_range'),
    ([0.0, 0.5, 1.0, 0.2], [5.0, 3.0, 1.0, 4.2], {}, 'negative_scale'),  # inverted depth
])
def test_robust_errors(rel, depth, kwargs, reason):
    with pytest.raises(AlignmentError) as info:
        fit_scale_shift_robust(np.array(rel), np.array(depth), **kwargs)
    assert info.value.reason == reason


@pytest.mark.parametrize('seed', range(5))
def test_robust_refuses_a_scale_pinned_by_one_wall_and_clutter(seed):
    """Points on one wall plus clutter: the span is the clutter's, no scale is pinned."""
    rng = np.random.default_rng(seed)
    wall_rel = 0.5 + rng.uniform(-0.002, 0.002, 60)
    wall_depth = 4.0 + rng.normal(0.0, 0.01, 60)
    clutter_rel, clutter_depth = rng.uniform(0.0, 1.0, 15), rng.uniform(1.0, 10.0, 15)
    with pytest.raises(AlignmentError) as error:
        fit_scale_shift_robust(np.concatenate([wall_rel, clutter_rel]),
                               np.concatenate([wall_depth, clutter_depth]),
                               threshold_rel=0.1, min_span=0.05, rng=seed)
    assert error.value.reason == 'degenerate_range'


def test_robust_negative_scale_after_irls():
    rel = np.linspace(0.0, 1.0, 30)
    with pytest.raises(AlignmentError) as info:
        fit_scale_shift_robust(rel, 10.0 - 5.0 * rel, method='irls')
    assert info.value.reason == 'negative_scale'


def test_robust_too_few_inliers():
    # Six points, no three on a common line within 5 %: no consensus.
    rel = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    depth = np.array([1.0, 3.0, 2.0, 6.0, 3.5, 9.0])
    with pytest.raises(AlignmentError) as info:
        fit_scale_shift_robust(rel, depth, min_inliers=4)
    assert info.value.reason == 'too_few_inliers'


@pytest.mark.parametrize('kwargs', [{'method': 'svd'}, {'loss': 'l3'}, {'threshold_rel': 0.0},
                                    {'iterations': 0}, {'min_inliers': 1}, {'score_points': 1},
                                    {'threshold_rel': math.nan}])
def test_robust_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        fit_scale_shift_robust([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], **kwargs)


# Metrics


def test_abs_rel_sq_rel_rmse_by_hand():
    pred = np.array([1.0, 2.0, 6.0])
    gt = np.array([2.0, 2.0, 4.0])
    # |1-2|/2 = 0.5, 0, |6-4|/4 = 0.5 -> mean 1/3
    assert abs_rel(pred, gt) == pytest.approx(1.0 / 3.0)
    # 1/2, 0, 4/4 -> mean 0.5
    assert sq_rel(pred, gt) == pytest.approx(0.5)
    # sqrt((1 + 0 + 4) / 3)
    assert rmse(pred, gt) == pytest.approx(math.sqrt(5.0 / 3.0))


def test_metrics_ignore_invalid_and_masked():
    pred = np.array([[1.0, 100.0], [3.0, 7.0]])
    gt = np.array([[1.0, 0.0], [np.nan, 5.0]])  # gt 0 and NaN are invalid
    assert abs_rel(pred, gt) == pytest.approx((0.0 + 0.4) / 2)
    mask = np.array([[True, True], [True, False]])
    assert abs_rel(pred, gt, mask) == pytest.approx(0.0)


def test_delta_boundaries():
    gt = np.array([4.0, 4.0, 4.0, 5.0, 4.0, 4.0])
    # ratios: 1 (pass), exactly 1.25 (fails: strict), 1.24975 (pass), 5 / 4 = 1.25 with the
    # prediction below (fails), 4 / 3.3 (pass), negative prediction (always fails)
    pred = np.array([4.0, 5.0, 4.999, 4.0, 3.3, -4.0])
    assert delta1(pred, gt) == pytest.approx(3.0 / 6.0)
    # 1.5625 threshold: everything but the negative prediction
    assert delta2(pred, gt) == pytest.approx(5.0 / 6.0)
    # 1.25 ** 3 = 1.953125 exactly (fails), 1.9 (passes)
    assert delta3(np.array([4.0 * 1.25 ** 3, 4.0 * 1.9]), gt[:2]) == pytest.approx(0.5)
    assert delta1(np.array([0.0]), np.array([1.0])) == 0.0


def test_depth_metrics_perfect_prediction():
    gt = np.linspace(1.0, 10.0, 50)
    metrics = depth_metrics(gt, gt)
    assert metrics['abs_rel'] == 0.0 and metrics['rmse'] == 0.0 and metrics['sq_rel'] == 0.0
    assert metrics['delta1'] == metrics['delta2'] == metrics['delta3'] == 1.0


@pytest.mark.parametrize('metric', [abs_rel, sq_rel, rmse, delta1, delta2, delta3])
def test_metrics_empty_mask(metric):
    with pytest.raises(AlignmentError) as info:
        metric(np.ones(4), np.ones(4), np.zeros(4, dtype=bool))
    assert info.value.reason == 'empty_mask'


def test_evaluate_affine_invariant_recovers_affine_prediction():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 10.0, (16, 20))
    rel = (gt - 0.5) / 9.5  # affine in gt: perfect after alignment
    valid = np.ones(gt.shape, dtype=bool)
    valid[0] = False
    result = evaluate_affine_invariant(rel, gt, valid, min_depth=1e-3, max_depth=80.0)
    assert result['abs_rel'] == pytest.approx(0.0, abs=1e-12)
    assert result['delta1'] == 1.0
    assert (result['scale'], result['shift']) == pytest.approx((9.5, 0.5))
    assert result['n_valid'] == 15 * 20


def test_evaluate_affine_invariant_clips_and_masks_range():
    gt = np.array([1.0, 2.0, 3.0, 50.0])
    rel = np.array([0.0, 0.5, 1.0, 0.0])
    # gt 50 is beyond max_depth: excluded from fit and metrics.
    result = evaluate_affine_invariant(rel, gt, None, min_depth=0.5, max_depth=10.0)
    assert result['n_valid'] == 3
    assert result['abs_rel'] == pytest.approx(0.0, abs=1e-12)
    # The aligned prediction at rel = 0 is 0.911 (by hand: s = 1.3 / 0.62, t = 1.75 - 0.4 s),
    # below min_depth = 0.95: it is clipped up before the metrics.
    rel2 = np.array([0.0, 0.5, 1.0, 0.1])
    gt2 = np.array([1.0, 2.0, 3.0, 1.0])
    out = evaluate_affine_invariant(rel2, gt2, np.ones(4, dtype=bool), 0.95, 10.0)
    assert (out['scale'], out['shift']) == pytest.approx((1.3 / 0.62, 1.75 - 0.4 * 1.3 / 0.62))
    raw = out['scale'] * rel2 + out['shift']
    clipped = np.clip(raw, 0.95, 10.0)
    assert raw[0] < 0.95
    assert out['abs_rel'] == pytest.approx(np.mean(np.abs(clipped - gt2) / gt2))
    assert out['abs_rel'] != pytest.approx(np.mean(np.abs(raw - gt2) / gt2))


def test_evaluate_affine_invariant_errors():
    with pytest.raises(AlignmentError) as info:
        evaluate_affine_invariant(np.ones(3), np.full(3, 100.0), None, 0.1, 10.0)
    assert info.value.reason == 'empty_mask'
    with pytest.raises(ValueError, match='min_depth'):
        evaluate_affine_invariant(np.ones(3), np.ones(3), None, 10.0, 1.0)
    # Holes in the prediction where there is ground truth are a failure, not fewer pixels.
    rel = np.array([0.0, 0.5, np.nan, 1.0])
    with pytest.raises(AlignmentError, match='1 of the 4') as info:
        evaluate_affine_invariant(rel, np.array([1.0, 2.0, 2.5, 3.0]), None, 0.5, 10.0)
    assert info.value.reason == 'nonfinite_prediction'
    # Where the ground truth is missing, the prediction is not looked at.
    result = evaluate_affine_invariant(rel, np.array([1.0, 2.0, np.nan, 3.0]), None, 0.5, 10.0)
    assert result['n_valid'] == 3 and result['abs_rel'] == pytest.approx(0.0, abs=1e-12)


# Percentile normalisation


def test_normalize_percentile_maps_quantiles():
    depth = np.arange(101, dtype=np.float64).reshape(1, 101)  # 2 % -> 2.0, 98 % -> 98.0
    out = normalize_percentile(depth)
    assert out.dtype == np.float32
    assert out[0, 2] == pytest.approx(-1.0) and out[0, 98] == pytest.approx(1.0)
    assert out[0, 50] == pytest.approx(0.0)
    assert out[0, 0] == -1.0 and out[0, 100] == 1.0  # clipped
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_normalize_percentile_uses_valid_pixels_only():
    depth = np.array([1.0, 2.0, 3.0, 1000.0, np.nan])
    valid = np.array([True, True, True, False, True])
    out = normalize_percentile(depth, valid, low=0.0, high=1.0, fill=-5.0)
    np.testing.assert_allclose(out, [-1.0, 0.0, 1.0, -5.0, -5.0])


def test_normalize_percentile_constant_and_empty():
    np.testing.assert_array_equal(normalize_percentile(np.full((2, 2), 3.0)), 0.0)
    with pytest.raises(AlignmentError):
        normalize_percentile(np.ones(3), np.zeros(3, dtype=bool))
    with pytest.raises(ValueError):
        normalize_percentile(np.ones(3), low=0.5, high=0.5)


# Values the mutation run asked for, computed by hand or with numpy's polyfit.

# Ratios max(p / g, g / p): 1.2, 1.5, 1.9, 2.0, inf (p <= 0), 1.25 (strict: fails delta1).
_PRED = np.array([1.2, 3.0, 1.9, 2.0, -1.0, 0.8, 100.0])
_GT = np.array([1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
_MASK = np.array([True] * 6 + [False])  # the last pixel's error must not count


def test_metrics_by_hand_with_a_mask():
    """Errors 0.2, 1, 0.9, 1, -2, -0.2 over gt 1, 2, 1, 1, 1, 1; the masked pixel is out."""
    expected = {
        'abs_rel': (0.2 + 0.5 + 0.9 + 1 + 2 + 0.2) / 6,
        'sq_rel': (0.04 + 0.5 + 0.81 + 1 + 4 + 0.04) / 6,
        'rmse': math.sqrt((0.04 + 1 + 0.81 + 1 + 4 + 0.04) / 6),
        'delta1': 1 / 6, 'delta2': 3 / 6, 'delta3': 4 / 6,  # 1.5625, 1.953125
    }
    got = depth_metrics(_PRED, _GT, _MASK)
    assert got == pytest.approx(expected, rel=1e-12)
    assert delta_accuracy(_PRED, _GT, _MASK) == pytest.approx(1 / 6)  # default 1.25
    assert delta_accuracy(_PRED, _GT, _MASK, threshold=2.5) == pytest.approx(5 / 6)


def _polyfit_metrics(p, g, min_depth, max_depth):
    scale, shift = np.polyfit(p, g, 1)
    aligned = np.clip(scale * p + shift, min_depth, max_depth)
    ratio = np.maximum(aligned / g, g / aligned)
    return {'abs_rel': np.mean(np.abs(aligned - g) / g),
            'rmse': math.sqrt(np.mean((aligned - g) ** 2)),
            'delta1': np.mean(ratio < 1.25), 'scale': scale, 'shift': shift,
            'n_valid': p.size}


def test_evaluate_affine_invariant_bounds_and_clipping():
    """Only min_depth < gt < max_depth and valid count; the aligned depth is clipped."""
    pred = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    gt = np.array([0.5, 0.4, 3.0, 4.2, 8.0, 5.5, np.nan, 9.0])
    valid = np.array([True, True, True, True, True, True, True, False])
    # gt 0.4 and 8.0 equal the bounds: out, as are the NaN and 9.0 (outside valid).
    keep = np.array([0, 2, 3, 5])
    got = evaluate_affine_invariant(pred, gt, valid, min_depth=0.4, max_depth=8.0)
    expected = _polyfit_metrics(pred[keep], gt[keep], 0.4, 8.0)
    assert got['n_valid'] == 4
    for key in ('abs_rel', 'rmse', 'delta1', 'scale', 'shift'):
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    # Clipping: the fit gives 0.255 and 5.857 at the ends, clipped to 0.3 and 5.6.
    got = evaluate_affine_invariant(pred, gt, valid, min_depth=0.3, max_depth=5.6)
    keep = np.array([0, 1, 2, 3, 5])
    expected = _polyfit_metrics(pred[keep], gt[keep], 0.3, 5.6)
    assert got['abs_rel'] == pytest.approx(expected['abs_rel'], rel=1e-9)
    assert got['rmse'] == pytest.approx(expected['rmse'], rel=1e-9)
    # The default min_depth is 1e-3: gt 0.5 and 0.4 count.
    assert evaluate_affine_invariant(pred, gt, valid)['n_valid'] == 6


def test_evaluate_affine_invariant_messages():
    """Equal bounds are refused; shapes and holes are named."""
    pred, gt = np.arange(4.0), np.arange(1.0, 5.0)
    with pytest.raises(ValueError, match='^min_depth 1 must be below max_depth 1$'):
        evaluate_affine_invariant(pred, gt, min_depth=1, max_depth=1)
    with pytest.raises(ValueError, match=r'^pred_rel shape \(3,\) differs from gt shape \(4,\)$'):
        evaluate_affine_invariant(pred[:3], gt)
    with pytest.raises(ValueError, match=r'^valid shape \(3,\) differs from pred_rel shape'):
        evaluate_affine_invariant(pred, gt, valid=np.ones(3, bool))
    with pytest.raises(AlignmentError, match=r'no valid pixel with 5 < gt < inf$'):
        evaluate_affine_invariant(pred, gt, min_depth=5)
    with pytest.raises(AlignmentError,
                       match=r'NaN or inf on 1 of the 4 pixels with ground truth$'):
        evaluate_affine_invariant(np.array([0.0, 1.0, np.nan, 3.0]), gt)


def test_normalize_percentile_by_hand():
    """0..100: the 2nd and 98th percentiles (2, 98) map to -1 and 1; fill and flat cases."""
    depth = np.arange(101.0)
    out = normalize_percentile(depth)
    np.testing.assert_allclose(out, np.clip((depth - 2) / 96 * 2 - 1, -1, 1), atol=1e-6)
    valid = depth != 50
    assert normalize_percentile(depth, valid)[50] == 0.0  # the default fill
    assert not normalize_percentile(np.zeros(4)).any()  # zero span: 0, not NaN
    # A span of 1e-10 at 1000 is below 1e-9 of the depth: flat, not stretched to +-1.
    assert not normalize_percentile(1000.0 + np.array([0.0, 1e-10, 0.0, 1e-10])).any()
    with pytest.raises(ValueError, match=r'^need 0 <= low < high <= 1, got low=0.5, high=1.5$'):
        normalize_percentile(depth, low=0.5, high=1.5)
    with pytest.raises(ValueError, match=r'^valid shape \(3,\) differs from depth shape'):
        normalize_percentile(depth, np.ones(3, bool))
    with pytest.raises(AlignmentError, match='^empty_mask: no valid depth pixel to normalise$'):
        normalize_percentile(np.full(3, np.nan))


def test_alignment_error_pickles_a_message_with_its_own_separator():
    """A message containing ': ' or leading spaces survives pickling unchanged."""
    error = pickle.loads(pickle.dumps(AlignmentError('too_few_points', ' n: 1, need: 2')))
    assert error.reason == 'too_few_points'
    assert str(error) == 'too_few_points:  n: 1, need: 2'


def test_robust_weights_by_hand():
    """Huber: 1 / max(|e| / c, 1); Cauchy: 1 / (1 + (e / c)^2)."""
    from marigold_model.alignment import _robust_weights
    e = np.array([0.5, -1.5, 4.0])
    np.testing.assert_allclose(_robust_weights(e, 1.0, 'huber'), [1.0, 1 / 1.5, 0.25])
    np.testing.assert_allclose(_robust_weights(e, 2.0, 'huber'), [1.0, 1.0, 0.5])
    np.testing.assert_allclose(_robust_weights(e, 1.0, 'cauchy'), [0.8, 1 / 3.25, 1 / 17])


def test_fit_result_apply_is_float64_by_hand():
    """float32 relative depth maps to float64 metres (no float32 rounding of 3 * 0.1 + 1)."""
    fit = FitResult(scale=3.0, shift=1.0, inlier_ratio=1.0, residual=0.0, n_points=2,
                    n_inliers=2)
    out = fit.apply(np.array([0.1, 2.0], np.float32))
    assert out.dtype == np.float64
    assert out.tolist() == [3.0 * float(np.float32(0.1)) + 1.0, 7.0]


@pytest.mark.parametrize('loss', ['huber', 'cauchy'])
def test_irls_result_is_its_own_reweighted_fit(loss):
    """
    IRLS stops at a fixed point: refitting with the weights of its own residuals returns it.

    The weights are written out (relative residual e, scale c = max(threshold, 2.5 * 1.4826 *
    median |e|), loss weight times 1 / d^2) and the refit is numpy's polyfit.
    """
    rng = np.random.default_rng(4)
    p = rng.uniform(0.1, 1.0, 300)
    d = 2.0 * p + 0.5
    d *= 1 + 0.01 * rng.standard_normal(300)
    d[:30] *= rng.uniform(1.5, 3.0, 30)  # gross outliers
    fit = fit_scale_shift_robust(p, d, method='irls', loss=loss, threshold_rel=0.02,
                                 irls_iterations=20)
    e = (fit.scale * p + fit.shift - d) / d
    a = np.abs(e) / max(0.02, 2.5 * 1.4826 * np.median(np.abs(e)))
    robust = 1 / np.maximum(a, 1.0) if loss == 'huber' else 1 / (1 + a * a)
    scale, shift = np.polyfit(p, d, 1, w=np.sqrt(robust / d ** 2))
    assert fit.scale == pytest.approx(scale, rel=1e-9)
    assert fit.shift == pytest.approx(shift, rel=1e-9, abs=1e-12)


# Mutation-testing follow-ups (issue 18): messages, defaults, bounds, precision.


@pytest.mark.parametrize('kwargs, message', [
    ({'method': 'svd'}, r"^method must be one of \('ransac', 'irls'\), got 'svd'$"),
    ({'loss': 'l3'}, r"^loss must be None or one of \('huber', 'cauchy'\), got 'l3'$"),
    ({'threshold_rel': -1.0}, '^threshold_rel must be a positive number, got -1.0$'),
    ({'threshold_rel': math.inf}, '^threshold_rel must be a positive number, got inf$'),
    ({'iterations': 0}, '^need iterations >= 1, irls_iterations >= 0 and score_points >= 2$'),
    ({'irls_iterations': -1}, '^need iterations >= 1, irls_iterations >= 0'),
    ({'score_points': 1}, '^need iterations >= 1, irls_iterations >= 0'),
    ({'min_inliers': 1}, '^min_inliers must be >= 2, got 1$'),
    ({'min_span': -0.1}, '^min_span must be >= 0, got -0.1$'),
    ({'min_span': math.nan}, '^min_span must be >= 0, got nan$'),
])
def test_robust_argument_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_scale_shift_robust([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], **kwargs)


@pytest.mark.parametrize('kwargs', [{'iterations': 1}, {'irls_iterations': 0},
                                    {'score_points': 2}, {'min_inliers': 2}, {'min_span': 0.0},
                                    {'threshold_rel': 1e-3}])
def test_robust_accepts_the_argument_bounds(kwargs):
    fit = fit_scale_shift_robust([0.0, 1.0, 2.0], [1.0, 3.0, 5.0], **kwargs)
    assert (fit.scale, fit.shift) == pytest.approx((2.0, 1.0))


@pytest.mark.parametrize('rel, depth, kwargs, message', [
    ([0.1, 0.2], [1.0, 2.0], {}, '^too_few_points: 2 valid point[(]s[)], at least 3 needed$'),
    ([0.1], [1.0], {'min_inliers': 2},
     '^too_few_points: 1 valid point[(]s[)], at least 2 needed$'),
    ([0.5, 0.5, 0.5], [1.0, 2.0, 3.0], {}, '^degenerate_range: prediction span 0 over the '
     'valid points is not above 1e-06$'),
    ([0.5, 0.51, 0.52], [1.0, 2.0, 3.0], {'min_span': 0.05},
     '^degenerate_range: prediction span 0.02 over the valid points is not above 0.05$'),
    ([0.0, 0.5, 1.0, 0.2], [5.0, 3.0, 1.0, 4.2], {}, '^negative_scale: no sampled point pair '
     'has depth increasing with the prediction$'),
    ([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [1.0, 3.0, 2.0, 6.0, 3.5, 9.0], {'min_inliers': 4},
     r'^too_few_inliers: \d inlier[(]s[)] of 6 points at threshold 0.05, at least 4 needed$'),
])
def test_robust_error_messages(rel, depth, kwargs, message):
    with pytest.raises(AlignmentError, match=message):
        fit_scale_shift_robust(np.array(rel), np.array(depth), **kwargs)


def test_robust_negative_scale_message_after_irls():
    rel = np.linspace(0.0, 1.0, 30)
    with pytest.raises(AlignmentError, match=r'^negative_scale: fitted scale -5 is not '
                       r'positive \(is the input disparity or inverted\?\)$'):
        fit_scale_shift_robust(rel, 10.0 - 5.0 * rel, method='irls')


def test_robust_inlier_spread_message():
    # 40 points at r = 0.5 on one depth, 2 elsewhere: inliers without spread.
    rel = np.r_[np.full(40, 0.5), 0.0, 1.0]
    depth = np.r_[np.full(40, 3.0), 1.0, 9.0]
    for method in METHODS:
        with pytest.raises(AlignmentError, match=r'^degenerate_range: prediction range 0 \(10th '
                           r'to 90th percentile\) over the 4[012] inliers is not above 1e-06$'):
            fit_scale_shift_robust(rel, depth, method=method)


def test_robust_defaults_and_subset_bound():
    """Defaults are 200 hypotheses; a subset is drawn only above score_points."""
    rng = np.random.default_rng(1)
    rel = rng.uniform(0.0, 1.0, 300)
    depth = (2.0 * rel + 1.0) * np.exp(0.15 * rng.standard_normal(300))

    def scale(**kwargs):
        kwargs.setdefault('rng', 3)
        return fit_scale_shift_robust(rel, depth, threshold_rel=0.05, **kwargs).scale

    assert scale() == scale(iterations=200) != scale(iterations=201)
    assert scale(score_points=300) == scale(score_points=301) != scale(score_points=299)
    assert scale(rng=None) == scale(rng=0) != scale(rng=1)


def test_robust_residual_is_the_rms_relative_residual_of_the_inliers():
    rng = np.random.default_rng(2)
    rel = rng.uniform(0.0, 1.0, 200)
    depth = (2.0 * rel + 1.0) * (1.0 + 0.02 * rng.standard_normal(200))
    depth[:20] *= 3.0
    fit = fit_scale_shift_robust(rel, depth, threshold_rel=0.1)
    e = np.abs((fit.scale * rel + fit.shift - depth) / depth)
    inliers = e < 0.1
    assert fit.n_inliers == inliers.sum() and fit.n_points == 200
    assert fit.inlier_ratio == inliers.sum() / 200
    assert fit.residual == pytest.approx(math.sqrt(np.mean(e[inliers] ** 2)), rel=1e-12)


def test_float32_input_is_evaluated_in_float64():
    rng = np.random.default_rng(6)
    pred = rng.uniform(0.0, 1.0, (20, 30)).astype(np.float32)
    gt = (3.0 * pred + 1.0 + rng.uniform(-0.3, 0.3, pred.shape)).astype(np.float32)
    got = evaluate_affine_invariant(pred, gt)
    want = evaluate_affine_invariant(pred.astype(np.float64), gt.astype(np.float64))
    assert got == want
    depth = rng.uniform(0.5, 10.0, (20, 30)).astype(np.float32)
    assert np.array_equal(normalize_percentile(depth),
                          normalize_percentile(depth.astype(np.float64)))


def test_lsq_weights_and_mask_together():
    p = np.array([0.0, 1.0, 2.0, 3.0])
    d = np.array([1.0, 3.0, 100.0, -50.0])
    # Point 2 has no weight (NaN), point 3 is masked out: the line through points 0 and 1.
    got = fit_scale_shift(p, d, mask=[True, True, True, False], weights=[1.0, 1.0, np.nan, 1.0])
    assert got == pytest.approx((2.0, 1.0), abs=1e-12)
    # A point of zero weight is no point: one is left.
    with pytest.raises(AlignmentError, match=r'^too_few_points: 1 valid point\(s\), at least 2 '
                       'are needed$'):
        fit_scale_shift([0.0, 1.0], [1.0, 2.0], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match=r'^weights shape \(3,\) does not broadcast to \(2,\)$'):
        fit_scale_shift([0.0, 1.0], [1.0, 2.0], weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match='^weights must be non-negative$'):
        fit_scale_shift([0.0, 1.0], [1.0, 2.0], weights=[1.0, -1.0])
    for weights in (None, [1.0, 1.0]):
        with pytest.raises(ValueError,
                           match=r'^mask shape \(3,\) differs from pred shape \(2,\)$'):
            fit_scale_shift([0.0, 1.0], [1.0, 2.0], mask=[True] * 3, weights=weights)


def test_lsq_degenerate_below_a_relative_spread_of_1e_9():
    # Two points 1e-10 apart around 1: a standard deviation of 5e-11 relative, degenerate.
    message = ('^degenerate_range: the prediction has [(]almost[)] no variance over the valid '
               'points$')
    with pytest.raises(AlignmentError, match=message):
        fit_scale_shift([1.0, 1.0 + 1e-10], [1.0, 2.0])
    with pytest.raises(AlignmentError, match=message):  # weights do not change that
        fit_scale_shift([1.0, 1.0 + 1e-10], [1.0, 2.0], weights=[1e6, 1e6])
    # 1e-6 apart (5e-7 relative): a fit, slope 1 / 1e-6.
    assert fit_scale_shift([1.0, 1.0 + 1e-6], [1.0, 2.0])[0] == pytest.approx(1e6, rel=1e-6)
    with pytest.raises(AlignmentError, match=r'^too_few_points: 1 valid point\(s\), at least 2'):
        fit_scale_shift([1.0], [2.0])


def test_float32_pairs_are_used_in_float64():
    rng = np.random.default_rng(8)
    pred = rng.uniform(0.5, 1.0, 500).astype(np.float32)
    gt = (pred * np.float32(3.3) + rng.uniform(0.0, 0.5, 500)).astype(np.float32)
    p64, g64 = pred.astype(np.float64), gt.astype(np.float64)
    assert depth_metrics(pred, gt) == depth_metrics(p64, g64)
    assert fit_scale_shift(pred, gt) == fit_scale_shift(p64, g64)
    w32 = rng.uniform(0.1, 1.0, 500).astype(np.float32)
    w64 = w32.astype(np.float64)
    assert fit_scale_shift(pred, gt, weights=w32) == fit_scale_shift(p64, g64, weights=w64)
    assert fit_scale_shift_robust(pred, gt) == fit_scale_shift_robust(p64, g64)


def test_ransac_draws_every_pair_uniformly():
    """Three points, each pair's line alone: one hypothesis picks a pair, 1 / 3 each."""
    p, d = np.array([0.0, 0.5, 1.0]), np.array([1.0, 2.0, 4.0])  # slopes 2, 4 and 3
    counts = {}
    for seed in range(600):
        fit = fit_scale_shift_robust(p, d, iterations=1, min_inliers=2, rng=seed)
        assert fit.n_inliers == 2
        counts[round(fit.scale, 6)] = counts.get(round(fit.scale, 6), 0) + 1
    assert sorted(counts) == [2.0, 3.0, 4.0]
    assert all(abs(c / 600 - 1 / 3) < 0.06 for c in counts.values())
    # Two points: always the distinct pair.
    for seed in range(20):
        fit = fit_scale_shift_robust([0.0, 1.0], [1.0, 3.0], iterations=1, min_inliers=2,
                                     rng=seed)
        assert (fit.scale, fit.shift) == pytest.approx((2.0, 1.0))


def test_ransac_with_no_increasing_pair_and_a_flat_irls_fit():
    with pytest.raises(AlignmentError, match='^negative_scale: no sampled point pair has depth '
                       'increasing with the prediction$'):
        fit_scale_shift_robust([0.0, 1.0, 2.0], [5.0, 5.0, 5.0])
    with pytest.raises(AlignmentError, match='^negative_scale: fitted scale 0 is not positive'):
        fit_scale_shift_robust([0.0, 1.0, 2.0], [5.0, 5.0, 5.0], method='irls')


def test_refinement_is_the_relative_least_squares_fit_of_the_inliers():
    rng = np.random.default_rng(9)
    rel = rng.uniform(0.0, 1.0, 100)
    depth = (2.0 * rel + 0.5) * (1.0 + 0.05 * rng.standard_normal(100))
    fit = fit_scale_shift_robust(rel, depth, threshold_rel=0.9)  # every point an inlier
    assert fit.n_inliers == 100
    want = fit_scale_shift(rel, depth, weights=1.0 / depth ** 2)
    assert (fit.scale, fit.shift) == pytest.approx(want, rel=1e-12)
    assert want != pytest.approx(fit_scale_shift(rel, depth), rel=1e-6)


def test_exactly_min_inliers_are_enough():
    p = np.array([0.0, 0.5, 1.0, 0.2, 0.7])
    d = np.array([1.0, 2.0, 3.0, 50.0, 0.01])
    fit = fit_scale_shift_robust(p, d, min_inliers=3)
    assert fit.n_inliers == 3 and (fit.scale, fit.shift) == pytest.approx((2.0, 1.0))
    fit = fit_scale_shift_robust([0.0, 1.0], [1.0, 3.0], min_inliers=2)
    assert fit.n_points == 2 and (fit.scale, fit.shift) == pytest.approx((2.0, 1.0))
    with pytest.raises(AlignmentError, match=r'^too_few_inliers: \d inlier\(s\) of 6 points at '
                       'threshold 0.05, at least 4 needed$'):
        fit_scale_shift_robust([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [1.0, 3.0, 2.0, 6.0, 3.5, 9.0],
                               method='irls', min_inliers=4)


def test_span_messages_name_the_values():
    p = np.arange(11.0) / 10.0
    with pytest.raises(AlignmentError, match='^degenerate_range: prediction span 1 over the '
                       'valid points is not above 1$'):
        fit_scale_shift_robust(p, 2.0 * p + 1.0, min_span=1.0)
    # 10th percentile 0.1, 90th 0.9: a range of 0.8 over the 11 inliers.
    with pytest.raises(AlignmentError, match=r'^degenerate_range: prediction range 0.8 \(10th '
                       r'to 90th percentile\) over the 11 inliers is not above 0.9$'):
        fit_scale_shift_robust(p, 2.0 * p + 1.0, min_span=0.9)
    with pytest.raises(AlignmentError, match=r'^empty_mask: no valid pixel \(finite, gt > 0, '
                       r'in the mask\)$'):
        abs_rel([1.0], [0.0])


def test_irls_polish_and_iteration_floor():
    rng = np.random.default_rng(10)
    rel = rng.uniform(0.0, 1.0, 200)
    depth = (2.0 * rel + 0.5) * (1.0 + 0.05 * rng.standard_normal(200))
    depth[:20] *= 2.0
    plain = fit_scale_shift_robust(rel, depth, threshold_rel=0.1)
    # One Huber step from the RANSAC fit: weights 1 / d^2 times 1 / max(|e| / 0.1, 1).
    e = (plain.scale * rel + plain.shift - depth) / depth
    huber = 1.0 / np.maximum(np.abs(e) / 0.1, 1.0)
    want = fit_scale_shift(rel, depth, weights=huber / depth ** 2)
    got = fit_scale_shift_robust(rel, depth, threshold_rel=0.1, loss='huber', irls_iterations=1)
    assert (got.scale, got.shift) == pytest.approx(want, rel=1e-12)
    # The IRLS method runs at least one step.
    assert fit_scale_shift_robust(rel, depth, method='irls', irls_iterations=0) == \
        fit_scale_shift_robust(rel, depth, method='irls', irls_iterations=1) != \
        fit_scale_shift_robust(rel, depth, method='irls', irls_iterations=2)


def test_robust_default_score_points_is_4096():
    rng = np.random.default_rng(12)
    rel = rng.uniform(0.0, 1.0, 4097)
    depth = (2.0 * rel + 1.0) * np.exp(0.15 * rng.standard_normal(4097))
    fit = fit_scale_shift_robust(rel, depth, threshold_rel=0.05, iterations=20)
    assert fit == fit_scale_shift_robust(rel, depth, threshold_rel=0.05, iterations=20,
                                         score_points=4096)
    assert fit != fit_scale_shift_robust(rel, depth, threshold_rel=0.05, iterations=20,
                                         score_points=4097)


def test_robust_subset_is_drawn_without_replacement():
    # Three points on one line, scored on two of them with one hypothesis: always a pair.
    for seed in range(30):
        fit = fit_scale_shift_robust([0.0, 0.5, 1.0], [1.0, 2.0, 3.0], iterations=1,
                                     min_inliers=2, score_points=2, rng=seed)
        assert (fit.scale, fit.shift) == pytest.approx((2.0, 1.0))


def test_robust_default_polish_is_20_steps_and_zero_threshold_refused():
    rng = np.random.default_rng(0)
    rel = rng.uniform(0.0, 1.0, 300)
    depth = (2.0 * rel + 1.0) * np.exp(0.15 * rng.standard_normal(300))
    depth[:60] *= 3.0

    def fit(**kwargs):
        return fit_scale_shift_robust(rel, depth, threshold_rel=0.05, loss='huber', **kwargs)

    assert fit() == fit(irls_iterations=20) != fit(irls_iterations=21)
    with pytest.raises(ValueError, match='^threshold_rel must be a positive number, got 0.0$'):
        fit_scale_shift_robust(rel, depth, threshold_rel=0.0)


def test_irls_method_starts_from_the_relative_least_squares_fit():
    """One step: Cauchy weights at the MAD scale (2.5 * 1.4826 * median |e|) of that start."""
    rng = np.random.default_rng(11)
    rel = rng.uniform(0.0, 1.0, 200)
    depth = (2.0 * rel + 0.5) * (1.0 + 0.05 * rng.standard_normal(200))
    depth[:30] *= 2.0
    s0, t0 = fit_scale_shift(rel, depth, weights=1.0 / depth ** 2)
    e = (s0 * rel + t0 - depth) / depth
    c = max(0.05, 2.5 * 1.4826 * np.median(np.abs(e)))
    want = fit_scale_shift(rel, depth, weights=1.0 / depth ** 2 / (1.0 + (e / c) ** 2))
    got = fit_scale_shift_robust(rel, depth, method='irls', irls_iterations=1)
    assert (got.scale, got.shift) == pytest.approx(want, rel=1e-12)


def test_inlier_range_exactly_min_span_is_degenerate():
    p = np.arange(11.0) / 10.0  # 10th to 90th percentile: 0.9 - 0.1 = 0.8 exactly
    with pytest.raises(AlignmentError, match='^degenerate_range: prediction range 0.8'):
        fit_scale_shift_robust(p, 2.0 * p + 1.0, min_span=0.8)
    assert fit_scale_shift_robust(p, 2.0 * p + 1.0, min_span=0.79).n_inliers == 11


def test_float32_ground_truth_is_compared_in_float64():
    # float32(0.001) is 0.0010000000475: above min_depth 1e-3, so the pixel is valid.
    gt = np.array([0.001, 1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    pred = np.array([0.0, 1.0, 2.0, 3.0, 4.5])
    assert evaluate_affine_invariant(pred, gt)['n_valid'] == 5
    assert evaluate_affine_invariant(pred, gt.astype(np.float64)) == \
        evaluate_affine_invariant(pred, gt)
