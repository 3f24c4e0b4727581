"""
Test-time ensembling of affine-invariant depth maps, as in the Marigold paper.

Each member gets its own scale and shift, found jointly by minimising the pairwise RMS
difference of the aligned members plus a small regulariser that pulls the result to [0, 1];
the per-pixel median is the depth and the median absolute deviation its uncertainty. The
objective and solver settings follow diffusers' ``MarigoldDepthPipeline.ensemble_depth``.
"""

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F


def _resize_to_max_edge(depth, max_edge):
    height, width = depth.shape[-2:]
    longest = max(height, width)
    # At least one pixel a side: a tiny max_edge with an extreme aspect ratio gave 0.
    size = (max(1, height * max_edge // longest), max(1, width * max_edge // longest))
    return F.interpolate(depth, size, mode='nearest-exact')


def _median(values):
    """
    Return the median over dim 0, the mean of the two middle values for an even count.

    torch.median (and so diffusers) takes the lower middle value: with two members the
    uncertainty, the absolute deviation from it, was zero everywhere.
    """
    ordered = values.sort(dim=0).values
    middle = values.shape[0] // 2
    if values.shape[0] % 2:
        return ordered[middle:middle + 1]
    return (ordered[middle - 1:middle] + ordered[middle:middle + 1]) / 2


def _median_and_mad(aligned, with_uncertainty):
    median = _median(aligned)
    mad = _median(torch.abs(aligned - median)) if with_uncertainty else None
    return median, mad


def solve_alignment(depth, regularizer=0.02, max_iter=2, tol=1e-3, max_res=1024):
    """
    Find per-member scale and shift that bring the members into agreement.

    The cost is evaluated for all member pairs at once, in float64: BFGS differentiates it by
    finite differences (steps of ~1e-8), which a float32 cost turns into rounding noise, so the
    reference's solution depends on summation order.

    :param depth: [E, 1, H, W] member predictions, E >= 2
    :param regularizer: strength of the pull of the ensemble towards [0, 1]
    :param max_res: longest side the alignment is solved at (None: full size)
    :return: (scale, shift) float64 numpy arrays of length E
    """
    members = depth.shape[0]
    work = depth.to(torch.float64)
    if max_res is not None and max(work.shape[2:]) > max_res:
        work = _resize_to_max_edge(work, max_res)
    flat = work.reshape(members, -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    init_scale = 1.0 / (high - low).clamp(min=1e-6)
    init = torch.cat((init_scale, -init_scale * low)).cpu().numpy().astype(np.float64)
    first, second = torch.combinations(torch.arange(members)).T.numpy()
    # The mean squared difference of two aligned members from the members' means and
    # centred Gram matrix, computed once: s_i^2 C_ii + s_j^2 C_jj - 2 s_i s_j C_ij
    # + (m_i - m_j)^2 with m = s mu + t.  Building every pair's difference image instead
    # took E (E - 1) / 2 image-sized float64 buffers per evaluation (GBs on a GPU).
    mean = flat.mean(dim=1, keepdim=True)
    centred = flat - mean
    gram = (centred @ centred.T / flat.shape[1]).cpu().numpy()
    mean = mean.view(-1).cpu().numpy()

    def cost(param):
        scale, shift = param[:members], param[members:]
        offset = scale * mean + shift
        squared = (scale[first] ** 2 * gram[first, first] + scale[second] ** 2 *
                   gram[second, second] - 2 * scale[first] * scale[second] *
                   gram[first, second] + (offset[first] - offset[second]) ** 2)
        value = float(np.sqrt(np.maximum(squared, 0.0)).sum())
        if regularizer > 0:
            aligned = flat * torch.from_numpy(scale).to(flat).view(members, 1) + \
                torch.from_numpy(shift).to(flat).view(members, 1)
            median = torch.median(aligned, dim=0).values
            value += (median.min().abs().item() + (1.0 - median.max()).abs().item()) * regularizer
        return value

    result = scipy.optimize.minimize(cost, init, method='BFGS', tol=tol,
                                     options={'maxiter': max_iter, 'disp': False})
    return result.x[:members], result.x[members:]


def ensemble_depth(depth, with_uncertainty=True, regularizer=0.02, max_iter=2, tol=1e-3,
                   max_res=1024):
    """
    Combine ensemble members into one relative depth map in [0, 1].

    Members with a non-finite pixel are left out while others remain; the solver settings are
    those of :func:`solve_alignment`.

    :param depth: [E, 1, H, W] member predictions in [0, 1]
    :param with_uncertainty: also return the median absolute deviation
    :return: ([1, 1, H, W] depth, [1, 1, H, W] uncertainty or None)
    """
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f'expected [E, 1, H, W] ensemble members, got {tuple(depth.shape)}')
    # A member with a non-finite pixel (an fp16 overflow in the VAE) would make every scale,
    # shift and median NaN: it is left out while others remain.
    finite = torch.isfinite(depth).flatten(1).all(dim=1)
    if 0 < int(finite.sum()) < depth.shape[0]:
        depth = depth[finite]
    members = depth.shape[0]
    if members == 1:
        return depth, (torch.zeros_like(depth) if with_uncertainty else None)
    scale, shift = solve_alignment(depth, regularizer, max_iter, tol, max_res)
    scale = torch.from_numpy(scale).to(depth).view(members, 1, 1, 1)
    shift = torch.from_numpy(shift).to(depth).view(members, 1, 1, 1)
    merged, uncertainty = _median_and_mad(depth * scale + shift, with_uncertainty)
    low = merged.min()
    span = (merged.max() - low).clamp(min=1e-6)
    merged = (merged - low) / span
    if uncertainty is not None:
        uncertainty = uncertainty / span
    return merged, uncertainty
