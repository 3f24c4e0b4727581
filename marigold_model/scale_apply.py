"""
Metric depth from a scale estimate: the global affine map and the opt-in local refinement.

No ROS here. :func:`apply_scale` turns relative depth and its uncertainty into meters; a
:class:`RefinedScaleEstimate` also carries its frame's sparse points, towards which
:func:`refine_local` corrects the globally aligned depth.
"""

from dataclasses import dataclass
import math

import numpy as np
from scipy import ndimage

from .scale_tracking import ScaleEstimate


def refine_local(metric_depth, sparse_uv, sparse_metric, *, sigma_px=None, spacing_factor=2.0,
                 prior_weight=1.0, space='log', max_residual_rel=0.15):
    """
    Correct a globally aligned depth map locally towards sparse metric readings.

    The residual at each sparse point (``log(sparse / depth)`` in log space, ``sparse -
    depth`` in linear space) is spread over the image by normalised Gaussian convolution, on a
    coarse grid upsampled bilinearly since the correction is smooth. A prior of
    ``prior_weight`` points at zero residual shrinks the correction: it is almost the local
    mean residual where points are dense and fades to zero far from them.

    :param metric_depth: globally aligned metric depth, H x W (NaN / <= 0 = invalid, kept)
    :param sparse_uv: (N, 2) pixel coordinates (column, row) in ``metric_depth``
    :param sparse_metric: (N,) metric depth at those points (NaN / <= 0 ignored)
    :param sigma_px: Gaussian sigma in pixels (default ``spacing_factor`` times the mean
        point spacing ``sqrt(H * W / N)``)
    :param prior_weight: shrinkage towards zero correction, in points
    :param space: ``'log'`` (multiplicative correction) or ``'linear'`` (additive)
    :param max_residual_rel: ignore points with ``|sparse - depth| / sparse`` above this
    :return: float32 H x W refined depth (unchanged if no point is usable)
    :raises ValueError: bad shapes or parameters
    """
    if space not in ('log', 'linear'):
        raise ValueError(f"space must be 'log' or 'linear', got {space!r}")
    if not prior_weight > 0:
        raise ValueError('prior_weight must be > 0')
    depth = np.asarray(metric_depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f'metric_depth must be H x W, got shape {depth.shape}')
    uv = np.asarray(sparse_uv, dtype=np.float64)
    z = np.asarray(sparse_metric, dtype=np.float64).ravel()
    if uv.ndim != 2 or uv.shape[1] != 2 or uv.shape[0] != z.size:
        raise ValueError(f'sparse_uv must be (N, 2) with N = {z.size}, got {uv.shape}')
    height, width = depth.shape

    with np.errstate(invalid='ignore'):
        ok = np.all(np.isfinite(uv), axis=1) & np.isfinite(z) & (z > 0)
    u = np.full(z.size, -1, dtype=np.int64)
    v = np.full(z.size, -1, dtype=np.int64)
    u[ok] = np.rint(uv[ok, 0]).astype(np.int64)
    v[ok] = np.rint(uv[ok, 1]).astype(np.int64)
    ok &= (u >= 0) & (u < width) & (v >= 0) & (v < height)
    base = np.full(z.size, np.nan)
    base[ok] = depth[v[ok], u[ok]]
    with np.errstate(invalid='ignore'):
        ok &= np.isfinite(base) & (base > 0)
        ok &= np.abs(z - base) <= max_residual_rel * z
    if not np.any(ok):
        return depth.astype(np.float32)
    u, v, z, base = u[ok], v[ok], z[ok], base[ok]
    residual = np.log(z / base) if space == 'log' else z - base

    if sigma_px is None:
        sigma_px = spacing_factor * math.sqrt(height * width / z.size)
    sigma_px = float(np.clip(sigma_px, 0.5, 4.0 * max(height, width)))
    # About four coarse cells per sigma is plenty for a Gaussian and keeps the blur cheap.
    factor = max(1, int(sigma_px // 4))
    h_c, w_c = -(-height // factor), -(-width // factor)
    num = np.zeros((h_c, w_c))
    den = np.zeros((h_c, w_c))
    np.add.at(num, (v // factor, u // factor), residual)
    np.add.at(den, (v // factor, u // factor), 1.0)
    sigma_c = sigma_px / factor
    num = ndimage.gaussian_filter(num, sigma_c, mode='constant')
    den = ndimage.gaussian_filter(den, sigma_c, mode='constant')
    # gaussian_filter normalises its kernel to unit sum, so one point contributes about
    # 1 / (2 pi sigma^2) at its own location: express the prior in the same units.
    prior = prior_weight / (2.0 * math.pi * sigma_c * sigma_c)
    coarse = num / (den + prior)

    rows = (np.arange(height) + 0.5) / factor - 0.5
    cols = (np.arange(width) + 0.5) / factor - 0.5
    grid_r, grid_c = np.meshgrid(rows, cols, indexing='ij')
    correction = ndimage.map_coordinates(coarse, [grid_r, grid_c], order=1, mode='nearest')
    with np.errstate(invalid='ignore'):
        refined = depth * np.exp(correction) if space == 'log' else depth + correction
        refined = np.where(np.isfinite(depth) & (depth > 0), refined, depth)
    return refined.astype(np.float32)


@dataclass(frozen=True, eq=False)
class RefinedScaleEstimate(ScaleEstimate):
    """
    A fresh :class:`ScaleEstimate` that also carries the sparse points it was fitted on.

    :meth:`apply` first applies scale and shift, then corrects the result locally towards
    the points (:func:`refine_local`). Made for a frame with its own accepted fit only,
    never for a stale estimate: old points do not describe a new frame.

    :param sparse_uv: (N, 2) pixel (column, row) of the points in the relative depth grid
    :param sparse_metric: (N,) metric depth of the points
    :param grid_shape: (height, width) of that grid
    """

    sparse_uv: np.ndarray = None
    sparse_metric: np.ndarray = None
    grid_shape: tuple = None

    def refine(self, metric_depth):
        """Correct aligned H x W depth towards the points (ValueError if on another grid)."""
        depth = np.asarray(metric_depth)
        if tuple(depth.shape) != tuple(self.grid_shape):
            raise ValueError(f'local refinement points were taken on a {self.grid_shape} grid, '
                             f'the depth is {depth.shape}')
        return refine_local(depth, self.sparse_uv, self.sparse_metric)

    def apply(self, rel_depth):
        """Return float32 metric depth of ``rel_depth``, refined, NaN where invalid (REP 118)."""
        return apply_scale(self, rel_depth)[0]


def apply_scale(estimate, relative_depth, uncertainty=None, max_depth=0.0):
    """
    Turn relative depth (and its uncertainty) into meters with an estimate.

    Metric depth is ``scale * rel + shift``, locally refined when the estimate is a
    :class:`RefinedScaleEstimate`; depths that are not positive, or beyond ``max_depth``,
    become NaN (REP 118). The uncertainty, a spread of relative depth, becomes ``scale *
    uncertainty`` meters (the shift cancels in a spread), times the local correction factor
    when refined, NaN where the depth is NaN. float32 throughout (the pipeline's hot path).

    :param estimate: a usable :class:`ScaleEstimate` (fixed, tracked or refined)
    :param relative_depth: H x W relative depth
    :param uncertainty: H x W relative uncertainty, or None
    :param max_depth: meters; farther depths become NaN (0: no limit)
    :return: (float32 metric depth, float32 metric uncertainty or None)
    :raises ValueError: no usable estimate, or shapes that differ
    """
    if estimate is None or not estimate.usable:
        raise ValueError('no usable metric scale: stay relative (status '
                         f'{getattr(estimate, "status", None)!r})')
    rel = np.asarray(relative_depth)
    if rel.ndim != 2:
        raise ValueError(f'relative depth must be H x W, got shape {rel.shape}')
    metric = rel.astype(np.float32) * np.float32(estimate.scale) + np.float32(estimate.shift)
    with np.errstate(invalid='ignore'):
        metric[~(metric > 0)] = np.nan
    refined = isinstance(estimate, RefinedScaleEstimate) and estimate.sparse_uv is not None
    global_depth = metric
    if refined:
        metric = estimate.refine(global_depth)
    if max_depth > 0:
        with np.errstate(invalid='ignore'):
            metric[metric > max_depth] = np.nan
    if uncertainty is None:
        return metric, None
    unc = np.asarray(uncertainty)
    if unc.shape != rel.shape:
        raise ValueError(f'uncertainty shape {unc.shape} differs from the depth {rel.shape}')
    metric_unc = unc.astype(np.float32) * np.float32(estimate.scale)
    if refined:
        with np.errstate(invalid='ignore', divide='ignore'):
            metric_unc *= metric / global_depth
    metric_unc[np.isnan(metric)] = np.nan
    return metric, metric_unc
