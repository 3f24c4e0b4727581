"""
Scale and shift alignment of affine-invariant depth, depth metrics and normalisation.

Marigold predicts relative depth ``r``; metric depth is ``d ~= s * r + t`` for an unknown
scale ``s > 0`` and shift ``t``. This module fits ``s`` and ``t`` (least squares, RANSAC or
IRLS), computes the standard depth metrics with the Marigold paper's evaluation protocol, and
the 2 % / 98 % percentile normalisation used in training. Numpy only, float64 throughout.
"""

from dataclasses import dataclass
import math

import numpy as np

from .errors import ReasonError

REASON_TOO_FEW_POINTS = 'too_few_points'
REASON_DEGENERATE_RANGE = 'degenerate_range'
REASON_NEGATIVE_SCALE = 'negative_scale'
REASON_TOO_FEW_INLIERS = 'too_few_inliers'
REASON_EMPTY_MASK = 'empty_mask'
REASON_NONFINITE_PREDICTION = 'nonfinite_prediction'

METHODS = ('ransac', 'irls')
LOSSES = ('huber', 'cauchy')

# Relative tolerance below which the spread of the prediction counts as zero: at this level
# the normal equations lose all significant digits of float64.
_DEGENERATE_REL_STD = 1e-9
# Hypotheses x points evaluated at once when scoring RANSAC, to bound memory (~32 MB).
_SCORE_BLOCK = 1 << 22
# Huber and Cauchy weights with a residual scale of 1.4826 * MAD are standard; this factor
# widens the adaptive IRLS scale so inliers of a Gaussian-noise model keep weight ~1.
_IRLS_SCALE_MAD = 2.5 * 1.4826
_MAX_REFINE_ROUNDS = 5


class AlignmentError(ReasonError):
    """
    A fit or metric is impossible on the given data; the text reads 'reason: message'.

    ``reason`` is one of the ``REASON_*`` constants (callers may add their own, e.g. the scale
    tracker's ``'low_inlier_ratio'``).
    """

    reason_in_text = True


@dataclass(frozen=True)
class FitResult:
    """
    Outcome of a robust fit ``metric ~= scale * rel + shift``.

    :param scale: fitted scale (> 0)
    :param shift: fitted shift (metric units)
    :param inlier_ratio: inliers / valid points, in [0, 1]
    :param residual: RMS relative residual ``|s r + t - d| / d`` over the inliers
    :param n_points: valid points used (finite, target > 0, inside the mask)
    :param n_inliers: points whose relative residual is below the threshold
    """

    scale: float
    shift: float
    inlier_ratio: float
    residual: float
    n_points: int
    n_inliers: int

    def apply(self, rel_depth):
        """Return ``scale * rel_depth + shift`` as float64."""
        return self.scale * np.asarray(rel_depth, dtype=np.float64) + self.shift


def _valid_pairs(pred, target, mask=None):
    """Return the flat finite pairs inside the mask, and the selection over the flat arrays."""
    p = np.asarray(pred, dtype=np.float64)
    d = np.asarray(target, dtype=np.float64)
    if p.shape != d.shape:
        raise ValueError(f'pred shape {p.shape} differs from target shape {d.shape}')
    valid = np.isfinite(p) & np.isfinite(d)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != p.shape:
            raise ValueError(f'mask shape {m.shape} differs from pred shape {p.shape}')
        valid &= m.astype(bool)
    valid = valid.ravel()
    return p.ravel()[valid], d.ravel()[valid], valid


def _weighted_lsq(p, d, w=None):
    """Solve ``min sum w (s p + t - d)^2`` for (s, t) in centred form, for numerical stability."""
    if p.size < 2:
        raise AlignmentError(REASON_TOO_FEW_POINTS,
                             f'{p.size} valid point(s), at least 2 are needed')
    if w is None:
        w_sum = float(p.size)
        p_mean, d_mean = p.mean(), d.mean()
        dp = p - p_mean
        var = float(np.dot(dp, dp))
        cov = float(np.dot(dp, d - d_mean))
    else:
        w_sum = float(w.sum())
        if not w_sum > 0.0:
            raise AlignmentError(REASON_TOO_FEW_POINTS, 'all weights are zero')
        p_mean = float(np.dot(w, p)) / w_sum
        d_mean = float(np.dot(w, d)) / w_sum
        dp = p - p_mean
        wdp = w * dp
        var = float(np.dot(wdp, dp))
        cov = float(np.dot(wdp, d - d_mean))
    scale_p = float(np.max(np.abs(p)))
    if not var / w_sum > (_DEGENERATE_REL_STD * scale_p) ** 2:
        raise AlignmentError(REASON_DEGENERATE_RANGE,
                             'the prediction has (almost) no variance over the valid points')
    s = cov / var
    return s, float(d_mean - s * p_mean)


def fit_scale_shift(pred, target, mask=None, weights=None):
    """
    Fit ``target ~= scale * pred + shift`` by weighted least squares.

    Non-finite pairs, pixels outside ``mask`` and pixels of zero weight are ignored. A negative
    scale is returned as fitted (the evaluation protocol keeps it; use
    :func:`fit_scale_shift_robust` to reject it).

    :param weights: optional non-negative weights, broadcastable to the shape of ``pred``
    :return: (scale, shift) as Python floats
    :raises AlignmentError: ``too_few_points`` (< 2 valid points) or ``degenerate_range``
        (the prediction is constant over the valid points)
    :raises ValueError: shapes differ or weights are negative
    """
    p_arr = np.asarray(pred, dtype=np.float64)
    w_flat = None
    if weights is not None:
        w_arr = np.asarray(weights, dtype=np.float64)
        try:
            w_arr = np.broadcast_to(w_arr, p_arr.shape)
        except ValueError:
            raise ValueError(f'weights shape {w_arr.shape} does not broadcast to '
                             f'{p_arr.shape}') from None
        if np.any(w_arr < 0):
            raise ValueError('weights must be non-negative')
        w_ok = np.isfinite(w_arr) & (w_arr > 0)
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != p_arr.shape:
                raise ValueError(f'mask shape {m.shape} differs from pred shape {p_arr.shape}')
            w_ok &= m.astype(bool)
        mask = w_ok
        p, d, valid = _valid_pairs(p_arr, target, mask)
        w_flat = w_arr.ravel()[valid]
    else:
        p, d, _ = _valid_pairs(p_arr, target, mask)
    s, t = _weighted_lsq(p, d, w_flat)
    return float(s), float(t)


def _generator(rng):
    """Return a Generator for ``rng`` (a Generator, a seed, or ``None`` for seed 0)."""
    if isinstance(rng, np.random.Generator):
        return rng
    # A fixed default seed keeps results reproducible run to run (the bag processor relies
    # on identical outputs for identical inputs).
    return np.random.default_rng(0 if rng is None else rng)


def _rel_residual(s, t, p, d):
    """Return the signed relative residual ``(s p + t - d) / d``."""
    return (s * p + t - d) / d


def _robust_weights(e, c, loss):
    """Return the IRLS weights ``psi(e) / e`` of a robust loss at scale ``c``, in (0, 1]."""
    a = np.abs(e) / c
    if loss == 'huber':
        return 1.0 / np.maximum(a, 1.0)
    return 1.0 / (1.0 + a * a)


def _ransac(p, d, threshold_rel, iterations, gen, score_points):
    """
    Return (scale, shift) of the best 2-point hypothesis by MSAC score.

    Hypotheses are drawn and scored on at most ``score_points`` random points: a dense depth
    image gives 10^5 points, a few thousand rank hypotheses just as well, and the refinement
    uses them all.
    """
    if p.size > score_points:
        subset = gen.choice(p.size, score_points, replace=False)
        p, d = p[subset], d[subset]
    n = p.size
    i = gen.integers(0, n, size=iterations)
    j = gen.integers(0, n - 1, size=iterations)
    j = j + (j >= i)  # a distinct second point, uniformly
    dp = p[j] - p[i]
    ok = dp != 0.0
    s = np.zeros(iterations)
    s[ok] = (d[j][ok] - d[i][ok]) / dp[ok]
    ok &= s > 0.0
    if not np.any(ok):
        raise AlignmentError(REASON_NEGATIVE_SCALE,
                             'no sampled point pair has depth increasing with the prediction')
    s = s[ok]
    t = d[i][ok] - s * p[i][ok]
    inv_d = 1.0 / d
    thr2 = threshold_rel * threshold_rel
    cost = np.empty(s.size)
    block = max(1, _SCORE_BLOCK // n)
    for k in range(0, s.size, block):
        e = (s[k:k + block, None] * p + t[k:k + block, None]) * inv_d - 1.0
        # MSAC rather than an inlier count: ties are broken by how well the inliers fit.
        cost[k:k + block] = np.minimum(e * e, thr2).sum(axis=1)
    best = int(np.argmin(cost))
    return float(s[best]), float(t[best])


def _refine_on_inliers(s, t, p, d, threshold_rel, min_inliers):
    """
    Re-fit on the inliers and re-classify until the inlier set is stable.

    The fit is weighted by ``1 / d^2`` so it minimises the squared *relative* residual, the
    quantity the inlier test and AbsRel use (and the best linear unbiased estimate under
    multiplicative noise).
    """
    w = 1.0 / (d * d)
    inliers = np.abs(_rel_residual(s, t, p, d)) < threshold_rel
    for _ in range(_MAX_REFINE_ROUNDS):
        if inliers.sum() < max(2, min_inliers):
            raise AlignmentError(REASON_TOO_FEW_INLIERS,
                                 f'{int(inliers.sum())} inlier(s) of {p.size} points at '
                                 f'threshold {threshold_rel}, at least {min_inliers} needed')
        s, t = _weighted_lsq(p[inliers], d[inliers], w[inliers])
        updated = np.abs(_rel_residual(s, t, p, d)) < threshold_rel
        if np.array_equal(updated, inliers):
            break
        inliers = updated
    return s, t


def _irls(s, t, p, d, loss, scale_floor, iterations, adaptive):
    """
    Run IRLS on the relative residual; return (scale, shift).

    :param scale_floor: loss scale (the minimum loss scale if ``adaptive``)
    :param adaptive: estimate the loss scale from the MAD of the residuals each step
    """
    w_rel = 1.0 / (d * d)
    for _ in range(iterations):
        e = _rel_residual(s, t, p, d)
        c = scale_floor
        if adaptive:
            # Start wide (a least-squares start may be far off) and tighten as it improves.
            c = max(scale_floor, _IRLS_SCALE_MAD * float(np.median(np.abs(e))))
        s_new, t_new = _weighted_lsq(p, d, w_rel * _robust_weights(e, c, loss))
        converged = (abs(s_new - s) <= 1e-12 * abs(s)
                     and abs(t_new - t) <= 1e-12 * (abs(t) + abs(s)))
        s, t = s_new, t_new
        if converged:
            break
    return s, t


def fit_scale_shift_robust(pred, target, mask=None, *, method='ransac', threshold_rel=0.05,
                           iterations=200, min_inliers=3, loss=None, irls_iterations=20,
                           min_span=1e-6, score_points=4096, rng=None):
    """
    Fit ``target ~= scale * pred + shift`` robustly to outliers, with ``scale > 0``.

    Residuals are relative, ``|s r + t - d| / d``, so only pairs with ``target > 0`` count.

    ``method='ransac'``: score ``iterations`` 2-point hypotheses (MSAC), re-fit on the inliers
    of the best one until the inlier set is stable, then, if ``loss`` is given, polish with
    IRLS on all points at loss scale ``threshold_rel``.

    ``method='irls'``: start from least squares on all points and reweight with ``loss``
    (default ``'cauchy'``), the loss scale shrinking from a MAD estimate down to
    ``threshold_rel``. No sampling; weaker than RANSAC against many gross outliers.

    :param threshold_rel: inlier threshold on the relative residual (0.05 = 5 %)
    :param min_inliers: minimum number of inliers for a valid fit (>= 2)
    :param min_span: minimum ``max(pred) - min(pred)`` over the valid points, and minimum
        10th-to-90th percentile range of ``pred`` over the final inliers
    :param score_points: RANSAC draws and scores hypotheses on at most this many points
    :param rng: ``numpy.random.Generator``, int seed, or ``None`` (seed 0: deterministic)
    :return: :class:`FitResult`
    :raises AlignmentError: ``too_few_points``, ``degenerate_range``, ``negative_scale`` or
        ``too_few_inliers``
    :raises ValueError: invalid arguments or shapes
    """
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    if loss is not None and loss not in LOSSES:
        raise ValueError(f'loss must be None or one of {LOSSES}, got {loss!r}')
    if not (math.isfinite(threshold_rel) and threshold_rel > 0):
        raise ValueError(f'threshold_rel must be a positive number, got {threshold_rel}')
    if iterations < 1 or irls_iterations < 0 or score_points < 2:
        raise ValueError('need iterations >= 1, irls_iterations >= 0 and score_points >= 2')
    if min_inliers < 2:
        raise ValueError(f'min_inliers must be >= 2, got {min_inliers}')
    if not min_span >= 0:
        raise ValueError(f'min_span must be >= 0, got {min_span}')

    p, d, _ = _valid_pairs(pred, target, mask)
    positive = d > 0
    p, d = p[positive], d[positive]
    n = p.size
    if n < max(2, min_inliers):
        raise AlignmentError(REASON_TOO_FEW_POINTS,
                             f'{n} valid point(s), at least {max(2, min_inliers)} needed')
    span = float(p.max() - p.min())
    if not span > min_span:
        raise AlignmentError(REASON_DEGENERATE_RANGE,
                             f'prediction span {span:.3g} over the valid points is not above '
                             f'{min_span:.3g}')

    if method == 'ransac':
        s, t = _ransac(p, d, threshold_rel, iterations, _generator(rng), score_points)
        s, t = _refine_on_inliers(s, t, p, d, threshold_rel, min_inliers)
        if loss is not None and irls_iterations > 0:
            s, t = _irls(s, t, p, d, loss, threshold_rel, irls_iterations, adaptive=False)
    else:
        s, t = _weighted_lsq(p, d, 1.0 / (d * d))
        s, t = _irls(s, t, p, d, loss or 'cauchy', threshold_rel, max(1, irls_iterations),
                     adaptive=True)

    if not s > 0:
        raise AlignmentError(REASON_NEGATIVE_SCALE,
                             f'fitted scale {s:.3g} is not positive (is the input disparity '
                             'or inverted?)')
    e = np.abs(_rel_residual(s, t, p, d))
    inliers = e < threshold_rel
    n_inliers = int(inliers.sum())
    if n_inliers < min_inliers:
        raise AlignmentError(REASON_TOO_FEW_INLIERS,
                             f'{n_inliers} inlier(s) of {n} points at threshold '
                             f'{threshold_rel}, at least {min_inliers} needed')
    # The span of all points can come from outliers alone: points on one wall plus some
    # clutter let a line through the wall and whichever clutter points happen to lie near
    # it win, with a wild scale.  So the inliers must spread too, and not through a few
    # of them only: their 10th to 90th percentile range must exceed min_span.
    low, high = np.percentile(p[inliers], [10.0, 90.0])
    if not high - low > min_span:
        raise AlignmentError(REASON_DEGENERATE_RANGE,
                             f'prediction range {high - low:.3g} (10th to 90th percentile) '
                             f'over the {n_inliers} inliers is not above {min_span:.3g}')
    residual = float(np.sqrt(np.mean(e[inliers] ** 2)))
    return FitResult(scale=float(s), shift=float(t), inlier_ratio=n_inliers / n,
                     residual=residual, n_points=int(n), n_inliers=n_inliers)


def _metric_pairs(pred, gt, mask):
    """Return the (pred, gt) values a metric uses: finite, ``gt > 0``, inside the mask."""
    p, g, _ = _valid_pairs(pred, gt, mask)
    positive = g > 0
    if not np.any(positive):
        raise AlignmentError(REASON_EMPTY_MASK, 'no valid pixel (finite, gt > 0, in the mask)')
    return p[positive], g[positive]


def abs_rel(pred, gt, mask=None):
    """Return AbsRel ``mean(|pred - gt| / gt)``; raise ``empty_mask`` if no pixel is valid."""
    p, g = _metric_pairs(pred, gt, mask)
    return float(np.mean(np.abs(p - g) / g))


def sq_rel(pred, gt, mask=None):
    """Return SqRel ``mean((pred - gt)^2 / gt)``; raise ``empty_mask`` if no pixel is valid."""
    p, g = _metric_pairs(pred, gt, mask)
    return float(np.mean((p - g) ** 2 / g))


def rmse(pred, gt, mask=None):
    """Return RMSE ``sqrt(mean((pred - gt)^2))`` in depth units."""
    p, g = _metric_pairs(pred, gt, mask)
    return float(np.sqrt(np.mean((p - g) ** 2)))


def delta_accuracy(pred, gt, mask=None, threshold=1.25):
    """
    Return the fraction of pixels with ``max(pred / gt, gt / pred) < threshold``.

    Pixels with ``pred <= 0`` always fail. Pixels with non-finite values, ``gt <= 0`` or outside
    ``mask`` are excluded; :class:`AlignmentError` ``empty_mask`` if none is left.
    """
    p, g = _metric_pairs(pred, gt, mask)
    ratio = np.full(p.shape, np.inf)
    pos = p > 0
    ratio[pos] = np.maximum(p[pos] / g[pos], g[pos] / p[pos])
    return float(np.mean(ratio < threshold))


def delta1(pred, gt, mask=None):
    """Return the delta-1 accuracy (threshold 1.25)."""
    return delta_accuracy(pred, gt, mask, 1.25)


def delta2(pred, gt, mask=None):
    """Return the delta-2 accuracy (threshold ``1.25 ** 2``)."""
    return delta_accuracy(pred, gt, mask, 1.25 ** 2)


def delta3(pred, gt, mask=None):
    """Return the delta-3 accuracy (threshold ``1.25 ** 3``)."""
    return delta_accuracy(pred, gt, mask, 1.25 ** 3)


def depth_metrics(pred, gt, mask=None):
    """Return ``abs_rel``, ``sq_rel``, ``rmse``, ``delta1``, ``delta2``, ``delta3`` in a dict."""
    return {
        'abs_rel': abs_rel(pred, gt, mask),
        'sq_rel': sq_rel(pred, gt, mask),
        'rmse': rmse(pred, gt, mask),
        'delta1': delta1(pred, gt, mask),
        'delta2': delta2(pred, gt, mask),
        'delta3': delta3(pred, gt, mask),
    }


def evaluate_affine_invariant(pred_rel, gt, valid=None, min_depth=1e-3, max_depth=np.inf):
    """
    Evaluate affine-invariant depth of one image with the standard protocol.

    Valid pixels are those in ``valid`` with a finite ``min_depth < gt < max_depth``, as in
    Marigold's evaluation: the ground truth decides, so a prediction with holes cannot score
    as if it were complete. On them the prediction is aligned to ``gt`` by least squares,
    clipped to ``[min_depth, max_depth]``, and the metrics computed. Average the results over
    images for a data set score.

    :param valid: optional boolean mask (e.g. the data set's crop and sensor mask)
    :param max_depth: upper depth bound of the data set (e.g. 10 m NYUv2, 80 m KITTI)
    :return: dict of :func:`depth_metrics` plus ``scale``, ``shift`` and ``n_valid``
    :raises AlignmentError: ``empty_mask`` if no pixel is valid, ``nonfinite_prediction`` if
        the prediction is NaN or inf on a valid pixel, or a fit failure
    :raises ValueError: ``min_depth >= max_depth`` or shapes differ
    """
    if not min_depth < max_depth:
        raise ValueError(f'min_depth {min_depth} must be below max_depth {max_depth}')
    p = np.asarray(pred_rel, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f'pred_rel shape {p.shape} differs from gt shape {g.shape}')
    with np.errstate(invalid='ignore'):
        m = np.isfinite(g) & (g > min_depth) & (g < max_depth)
    if valid is not None:
        v = np.asarray(valid)
        if v.shape != p.shape:
            raise ValueError(f'valid shape {v.shape} differs from pred_rel shape {p.shape}')
        m &= v.astype(bool)
    if not np.any(m):
        raise AlignmentError(REASON_EMPTY_MASK,
                             f'no valid pixel with {min_depth} < gt < {max_depth}')
    holes = int(np.count_nonzero(m & ~np.isfinite(p)))
    if holes:
        raise AlignmentError(REASON_NONFINITE_PREDICTION,
                             f'the prediction is NaN or inf on {holes} of the {int(m.sum())} '
                             'pixels with ground truth')
    s, t = fit_scale_shift(p, g, m)
    aligned = np.clip(s * p + t, min_depth, max_depth)
    result = depth_metrics(aligned, g, m)
    result.update(scale=s, shift=t, n_valid=int(m.sum()))
    return result


def normalize_percentile(depth, valid=None, low=0.02, high=0.98, fill=0.0):
    """
    Map the depth of one sample to [-1, 1] with its percentiles, as Marigold training does.

    The ``low`` / ``high`` quantiles (linear interpolation, like ``torch.quantile``) of the
    valid pixels map to -1 / 1; values beyond are clipped. Invalid pixels (outside ``valid``
    or non-finite) are set to ``fill`` so the encoder never sees NaN; mask them in the loss.
    A sample whose valid depth is constant maps to 0 on its valid pixels.

    :return: float32 array of the same shape
    :raises AlignmentError: ``empty_mask`` if no pixel is valid
    :raises ValueError: bad quantiles or shapes
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f'need 0 <= low < high <= 1, got low={low}, high={high}')
    d = np.asarray(depth, dtype=np.float64)
    m = np.isfinite(d)
    if valid is not None:
        v = np.asarray(valid)
        if v.shape != d.shape:
            raise ValueError(f'valid shape {v.shape} differs from depth shape {d.shape}')
        m &= v.astype(bool)
    if not np.any(m):
        raise AlignmentError(REASON_EMPTY_MASK, 'no valid depth pixel to normalise')
    d_low, d_high = np.quantile(d[m], [low, high])
    span = float(d_high - d_low)
    out = np.full(d.shape, float(fill), dtype=np.float64)
    if span > _DEGENERATE_REL_STD * max(abs(d_low), abs(d_high)):
        out[m] = np.clip((d[m] - d_low) / span * 2.0 - 1.0, -1.0, 1.0)
    else:
        out[m] = 0.0
    return out.astype(np.float32)
