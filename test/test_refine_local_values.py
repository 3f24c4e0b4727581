"""
Values of marigold_model.scale_apply.refine_local against a plain float64 loop (issue 18).

The reference below spells out the documented algorithm pixel by pixel: residuals of the
usable points summed on a grid of ``factor``-pixel cells, a zero-padded Gaussian (scipy's
kernel: truncated at 4 sigma, unit sum) over sums and counts, a prior of ``prior_weight``
points at zero residual, and bilinear upsampling with the edges held.
"""

import math
import re
import warnings

from marigold_model.scale_apply import refine_local
import numpy as np
import pytest


def _kernel(sigma):
    radius = int(4.0 * sigma + 0.5)
    weights = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(weights)
    return radius, [w / total for w in weights]


def _blur(grid, sigma):
    """Zero-padded separable Gaussian of a list-of-lists grid."""
    radius, weights = _kernel(sigma)
    rows, cols = len(grid), len(grid[0])
    tmp = [[sum(weights[k + radius] * grid[r + k][c]
                for k in range(-radius, radius + 1) if 0 <= r + k < rows)
            for c in range(cols)] for r in range(rows)]
    return [[sum(weights[k + radius] * tmp[r][c + k]
                 for k in range(-radius, radius + 1) if 0 <= c + k < cols)
             for c in range(cols)] for r in range(rows)]


def _lerp_held(line_at, n, x):
    """Linear interpolation of line_at(0..n-1) at x, the end values held outside."""
    x = min(max(x, 0.0), n - 1.0)
    i = min(int(math.floor(x)), n - 1)
    t = x - i
    if t == 0.0:
        return line_at(i)
    return (1.0 - t) * line_at(i) + t * line_at(i + 1)


def _reference(depth, points, sigma, space='log', prior_weight=1.0):
    """
    Refine ``depth`` (list of lists) towards ``points``: (column, row, metric) of usable points.

    ``sigma`` is the (already clipped) sigma in pixels.
    """
    height, width = len(depth), len(depth[0])
    factor = max(1, int(sigma // 4))
    h_c, w_c = -(-height // factor), -(-width // factor)
    num = [[0.0] * w_c for _ in range(h_c)]
    den = [[0.0] * w_c for _ in range(h_c)]
    for col, row, metric in points:
        base = depth[row][col]
        res = math.log(metric / base) if space == 'log' else metric - base
        num[row // factor][col // factor] += res
        den[row // factor][col // factor] += 1.0
    sigma_c = sigma / factor
    num, den = _blur(num, sigma_c), _blur(den, sigma_c)
    prior = prior_weight / (2.0 * math.pi * sigma_c ** 2)
    coarse = [[num[r][c] / (den[r][c] + prior) for c in range(w_c)] for r in range(h_c)]
    out = []
    for r in range(height):
        y = (r + 0.5) / factor - 0.5
        line = []
        for c in range(width):
            x = (c + 0.5) / factor - 0.5
            corr = _lerp_held(lambda i: _lerp_held(lambda j: coarse[i][j], w_c, x), h_c, y)
            d = depth[r][c]
            if not (math.isfinite(d) and d > 0):
                line.append(d)
            else:
                line.append(d * math.exp(corr) if space == 'log' else d + corr)
        out.append(line)
    return np.array(out, dtype=np.float32)


def _ramp(height, width):
    rows, cols = np.mgrid[0:height, 0:width]
    return 2.0 + 0.1 * rows + 0.03 * cols


def _check(depth, uv, metric, usable, sigma, **kwargs):
    """Compare refine_local with the reference; ``usable`` are the indices it must keep."""
    ref_kwargs = {k: kwargs[k] for k in ('space', 'prior_weight') if k in kwargs}
    points = [(int(round(uv[i][0])), int(round(uv[i][1])), metric[i]) for i in usable]
    expected = _reference(depth.tolist(), points, sigma, **ref_kwargs)
    got = refine_local(depth, np.array(uv, dtype=np.float64), np.array(metric), **kwargs)
    assert got.dtype == np.float32 and got.shape == depth.shape
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=0, equal_nan=True)
    return got


@pytest.mark.parametrize('space', ['log', 'linear'])
@pytest.mark.parametrize('sigma, shape', [
    (2.5, (7, 9)),     # one pixel per cell
    (9.0, (11, 13)),   # two pixels per cell, a partial last cell in both directions
    (13.0, (10, 14)),  # three pixels per cell
])
def test_refine_local_matches_a_plain_loop(space, sigma, shape):
    depth = _ramp(*shape)
    height, width = shape
    uv = [[1.0, 1.0], [width - 2.0, 2.0], [3.0, height - 1.0], [width - 1.0, height - 1.0],
          [4.0, 4.0], [4.0, 4.0]]  # a repeated pixel counts twice
    metric = [depth[int(v)][int(u)] * f for (u, v), f in
              zip(uv, (1.1, 0.92, 1.05, 0.87, 1.12, 1.03))]
    _check(depth, uv, metric, range(len(uv)), sigma, sigma_px=sigma, space=space)
    _check(depth, uv, metric, range(len(uv)), sigma, sigma_px=sigma, space=space,
           prior_weight=0.3)
    _check(depth, uv, metric, range(len(uv)), sigma, sigma_px=sigma, space=space,
           prior_weight=4.0)


def test_refine_local_default_sigma_is_the_point_spacing():
    depth = _ramp(12, 15)
    uv = [[2.0, 3.0], [11.0, 8.0], [7.0, 10.0]]
    metric = [depth[3, 2] * 1.1, depth[8, 11] * 0.9, depth[10, 7] * 1.04]
    spacing = math.sqrt(12 * 15 / 3)
    _check(depth, uv, metric, range(3), 2.0 * spacing)
    _check(depth, uv, metric, range(3), 0.7 * spacing, spacing_factor=0.7)
    _check(depth, uv, metric, range(3), 2.0 * spacing, space='linear', prior_weight=2.5)


def test_refine_local_clips_sigma():
    depth = _ramp(6, 8)
    uv = [[2.0, 1.0], [6.0, 4.0]]
    metric = [depth[1, 2] * 1.1, depth[4, 6] * 0.95]
    # Below half a pixel: half a pixel.  Above four times the longest side: that.
    for given, used in ((0.1, 0.5), (0.5, 0.5), (0.8, 0.8), (31.0, 31.0), (32.0, 32.0),
                        (35.0, 32.0), (300.0, 32.0)):
        _check(depth, uv, metric, range(2), used, sigma_px=given)
    tall = _ramp(9, 5)
    uv = [[1.0, 2.0], [3.0, 7.0]]
    metric = [tall[2, 1] * 1.1, tall[7, 3] * 0.95]
    _check(tall, uv, metric, range(2), 36.0, sigma_px=39.0)


def test_refine_local_uses_only_usable_points():
    depth = _ramp(8, 10)
    depth[5, 5] = np.nan
    depth[6, 2] = 0.0
    depth[1, 8] = -1.0
    base = depth.tolist()
    uv = [
        [1.4, 2.4],        # 0: rounds to (1, 2)
        [8.6, 6.6],        # 1: rounds to (9, 7), the last pixel
        [-0.4, 0.4],       # 2: rounds to (0, 0)
        [-0.6, 3.0],       # 3: rounds to column -1: outside
        [9.6, 3.0],        # 4: column 10: outside
        [3.0, -0.6],       # 5: row -1: outside
        [3.0, 7.6],        # 6: row 8: outside
        [np.nan, 1.0],     # 7: no position
        [2.0, np.inf],     # 8: no position
        [4.0, 4.0],        # 9: metric NaN
        [4.0, 5.0],        # 10: metric 0
        [5.0, 4.0],        # 11: metric negative
        [5.0, 5.0],        # 12: depth NaN there
        [2.0, 6.0],        # 13: depth 0 there
        [8.0, 1.0],        # 14: depth negative there
        [6.0, 2.0],        # 15: metric inf
    ]
    metric = [base[2][1] * 1.1, base[7][9] * 0.9, base[0][0] * 1.05, 3.0, 3.0, 3.0, 3.0,
              3.0, 3.0, np.nan, 0.0, -3.0, 3.0, 3.0, 3.0, np.inf]
    refined = _check(depth, uv, metric, [0, 1, 2], 3.0, sigma_px=3.0)
    assert np.isnan(refined[5, 5]) and refined[6, 2] == 0.0 and refined[1, 8] == -1.0
    # The default sigma counts the usable points only.
    _check(depth, uv, metric, [0, 1, 2], 2.0 * math.sqrt(80 / 3))


def test_refine_local_residual_limit_is_inclusive():
    depth = np.full((6, 7), 3.0)
    depth[1, 5] = 5.0
    # |4 - 3| = |4 - 5| = 1 = 0.25 * 4: kept; 2.9 is 1.1 away: ignored.
    uv = [[1.0, 1.0], [5.0, 1.0], [3.0, 4.0]]
    depth[4, 3] = 2.9
    metric = [4.0, 4.0, 4.0]
    _check(depth, uv, metric, [0, 1], 2.0, sigma_px=2.0, max_residual_rel=0.25)
    # The default limit is 15 %: 3.4 (11.8 %) is kept, 4.0 (25 %) is not.
    _check(depth, uv, [3.4, 4.0, 3.0], [0, 2], 2.0, sigma_px=2.0)
    # A single usable point still refines; none leaves the depth as it is (float32).
    _check(depth, uv[:1], [3.3], [0], 2.0, sigma_px=2.0)
    unchanged = refine_local(depth, uv, [9.0, 9.0, 9.0], sigma_px=2.0)
    assert unchanged.dtype == np.float32
    np.testing.assert_array_equal(unchanged, depth.astype(np.float32))


def test_refine_local_accepts_lists_and_column_metric():
    depth = _ramp(5, 6)
    uv = [[1.0, 1.0], [4.0, 3.0]]
    metric = [[depth[1, 1] * 1.1], [depth[3, 4] * 0.9]]  # (N, 1): flattened
    expected = _reference(depth.tolist(), [(1, 1, metric[0][0]), (4, 3, metric[1][0])], 2.0)
    got = refine_local(depth.tolist(), uv, metric, sigma_px=2.0)
    np.testing.assert_allclose(got, expected, rtol=3e-7)


def test_refine_local_errors():
    depth = np.ones((4, 5))
    one = (np.zeros((1, 2)), np.ones(1))
    with pytest.raises(ValueError, match=r"^space must be 'log' or 'linear', got 'cubic'$"):
        refine_local(depth, *one, space='cubic')
    for weight in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=r'^prior_weight must be > 0$'):
            refine_local(depth, *one, prior_weight=weight)
    assert refine_local(depth, *one, prior_weight=1e-9).shape == (4, 5)
    with pytest.raises(ValueError, match=r'^metric_depth must be H x W, got shape \(4, 5, 1\)$'):
        refine_local(depth[..., None], *one)
    with pytest.raises(ValueError, match=r'^metric_depth must be H x W, got shape \(5,\)$'):
        refine_local(np.ones(5), *one)
    bad_uv = {(2,): np.zeros(2), (1, 3): np.zeros((1, 3)), (2, 2): np.zeros((2, 2)),
              (1, 2, 1): np.zeros((1, 2, 1))}
    for shape, uv in bad_uv.items():
        with pytest.raises(ValueError, match=r'^sparse_uv must be \(N, 2\) with N = 1, got '
                           + re.escape(str(shape)) + '$'):
            refine_local(depth, uv, np.ones(1))


def test_refine_local_below_one_meter():
    depth = 0.3 + 0.05 * _ramp(6, 7)  # 0.4 to 0.69 m
    uv = [[1.0, 1.0], [5.0, 4.0], [3.0, 2.0]]
    metric = [depth[1, 1] * 1.1, depth[4, 5] * 0.9, depth[2, 3] * 1.05]
    for space in ('log', 'linear'):
        refined = _check(depth, uv, metric, range(3), 2.0, sigma_px=2.0, space=space)
        assert np.all(refined != depth.astype(np.float32))


def test_refine_local_keeps_invalid_pixels_in_linear_space():
    depth = _ramp(6, 7)
    depth[2, 2], depth[3, 3], depth[4, 1] = 0.0, np.nan, -0.5
    uv = [[1.0, 1.0], [4.0, 4.0]]
    metric = [depth[1, 1] + 0.2, depth[4, 4] + 0.1]
    refined = _check(depth, uv, metric, range(2), 2.0, sigma_px=2.0, space='linear')
    assert refined[2, 2] == 0.0 and np.isnan(refined[3, 3]) and refined[4, 1] == -0.5


def test_refine_local_without_residual_limit_still_skips_invalid_points():
    depth = _ramp(6, 7)
    depth[2, 2], depth[3, 3], depth[4, 1] = 0.0, np.nan, -0.5
    # Points on pixels without depth, and a metric 0, pass no limit; 3x and 1/4 do.
    uv = [[2.0, 2.0], [3.0, 3.0], [1.0, 4.0], [5.0, 1.0], [1.0, 1.0], [5.0, 5.0]]
    metric = [2.0, 2.0, 2.0, 0.0, depth[1, 1] * 3.0, depth[5, 5] * 0.25]
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing to warn about: no 0 * inf
        for space in ('log', 'linear'):
            _check(depth, uv, metric, [4, 5], 2.0, sigma_px=2.0, space=space,
                   max_residual_rel=math.inf)


def test_refine_local_clips_sigma_on_a_single_coarse_cell():
    # Beyond four times the longest side the coarse grid is one cell whichever sigma, and the
    # prior cancels the kernel's peak: only its truncation at 4 sigma, rounded, tells the
    # clipped 32 (4 coarse px, radius 16) from 34 or 38 (4.25 / 4.22, radius 17): 2e-6.
    depth = _ramp(6, 8)
    uv = [[2.0, 1.0]]
    metric = [depth[1, 2] * 20.0]
    _check(depth, uv, metric, [0], 32.0, sigma_px=34.0, max_residual_rel=math.inf)
    _check(depth, uv, metric, [0], 32.0, sigma_px=38.0, max_residual_rel=math.inf)


def test_refine_local_residual_limit_in_float64_whatever_the_metric_dtype():
    # |4 - 3.4| is 0.6 + 1e-16 in float64, above 0.15 * 4; 0.15 * 4 in float32 (or float16)
    # would round up and admit it.
    depth = np.full((4, 5), 3.4)
    for dtype in (np.float16, np.float32, np.float64):
        refined = refine_local(depth, [[1.0, 1.0]], np.array([4.0], dtype), sigma_px=2.0)
        np.testing.assert_array_equal(refined, depth.astype(np.float32))
