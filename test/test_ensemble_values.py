"""Ensembling against hand-computed values and an independent pair-by-pair reference."""

import itertools
import math
import warnings

from marigold_model.ensemble import _median, ensemble_depth, solve_alignment
import numpy as np
import pytest
import scipy.optimize
import torch


def test_median_of_odd_and_even_counts_by_hand():
    """Odd count: the middle value; even count: the mean of the two middle values."""
    # Three columns so that a count-parity test on the wrong axis would be caught.
    four = torch.tensor([[8.0, 1.0, 2.0], [1.0, 2.0, 4.0], [4.0, 8.0, 1.0], [2.0, 4.0, 8.0]])
    assert torch.equal(_median(four), torch.tensor([[3.0, 3.0, 3.0]]))  # (2 + 4) / 2
    three = torch.tensor([[9.0, 5.0], [1.0, 7.0], [5.0, 6.0]])
    assert torch.equal(_median(three), torch.tensor([[5.0, 6.0]]))


def _nearest_exact(images, height, width):
    """Resample [E, H, W] to height x width, source index floor((i + 0.5) * in / out)."""
    rows = np.minimum(((np.arange(height) + 0.5) * images.shape[1] / height).astype(int),
                      images.shape[1] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * images.shape[2] / width).astype(int),
                      images.shape[2] - 1)
    return images[:, rows][:, :, cols]


def _lower_median(values):
    """torch.median's middle value: the lower one for an even count (diffusers' choice)."""
    return np.sort(values, axis=0)[(values.shape[0] - 1) // 2]


def _reference_alignment(depth, regularizer=0.02, max_iter=2, tol=1e-3, size=None):
    """
    Solve diffusers' objective pair by pair, in float64.

    The sum of pairwise RMS differences plus the regulariser pulling the lower median to
    [0, 1]; BFGS from the min-max normalisation.
    """
    images = depth[:, 0].astype(np.float64)
    if size is not None:
        images = _nearest_exact(images, *size)
    flat = images.reshape(images.shape[0], -1)
    members = flat.shape[0]
    low, high = flat.min(axis=1), flat.max(axis=1)
    scale0 = 1.0 / np.maximum(high - low, 1e-6)
    init = np.concatenate([scale0, -scale0 * low])

    def cost(param):
        aligned = flat * param[:members, None] + param[members:, None]
        value = 0.0
        for i, j in itertools.combinations(range(members), 2):
            value += math.sqrt(np.mean((aligned[i] - aligned[j]) ** 2))
        if regularizer > 0:
            median = _lower_median(aligned)
            value += (abs(median.min()) + abs(1.0 - median.max())) * regularizer
        return value

    with warnings.catch_warnings():
        warnings.simplefilter('error')
        result = scipy.optimize.minimize(cost, init, method='BFGS', tol=tol,
                                         options={'maxiter': max_iter})
    return result.x[:members], result.x[members:]


def _members(count, height, width, seed):
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.linspace(0, 1, height), np.linspace(0, 1, width) ** 2)
    members = [a * base + b + 0.05 * rng.standard_normal((height, width))
               for a, b in zip(rng.uniform(0.5, 2, count), rng.uniform(-0.3, 0.3, count))]
    return np.stack(members)[:, None].astype(np.float32)


@pytest.mark.parametrize('shape, kwargs, size', [
    ((3, 6, 8), {}, None),  # the defaults, no resizing
    ((3, 2, 1025), {}, (1, 1024)),  # longest side just above the default 1024: resized
    ((3, 1030, 3), {}, (1024, 2)),  # tall: the height decides
    ((3, 5, 40), {'max_res': 16}, (2, 16)),  # 5 * 16 / 40 = 2 rows
    ((3, 5, 40), {'max_res': 40}, None),  # longest side equal to max_res: not resized
    ((3, 3, 7), {'max_res': 1}, (1, 1)),  # one pixel: at least one a side
    ((4, 6, 8), {'regularizer': 0.5, 'max_iter': 5, 'tol': 1e-6}, None),
    ((3, 6, 8), {'max_iter': 50, 'tol': 0.5}, None),  # the tolerance, not max_iter, stops
])
def test_solve_alignment_equals_pair_by_pair_reference(shape, kwargs, size):
    """The Gram-matrix cost and its solver settings give diffusers' pair-by-pair solution."""
    depth = _members(*shape, seed=sum(shape))
    settings = {'regularizer': 0.02, 'max_iter': 2, 'tol': 1e-3, **kwargs}
    settings.pop('max_res', None)
    expected = _reference_alignment(depth, size=size, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # an unknown solver option warns
        got = solve_alignment(torch.from_numpy(depth), **kwargs)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6, atol=1e-7)


def _reference_ensemble(depth, size=None, **settings):
    scale, shift = _reference_alignment(depth, size=size, **settings)
    aligned = depth[:, 0].astype(np.float64) * scale[:, None, None] + shift[:, None, None]
    median = np.median(aligned, axis=0)  # the mean of the two middle values if even
    mad = np.median(np.abs(aligned - median), axis=0)
    span = median.max() - median.min()
    return (median - median.min()) / span, mad / span


@pytest.mark.parametrize('count', [3, 4])
def test_ensemble_depth_defaults_equal_reference(count):
    """Default settings: median of the aligned members scaled to [0, 1], MAD on that scale."""
    depth = _members(count, 2, 1025, seed=count)
    expected_depth, expected_mad = _reference_ensemble(depth, size=(1, 1024))
    merged, mad = ensemble_depth(torch.from_numpy(depth))
    assert merged.shape == mad.shape == (1, 1, 2, 1025)
    np.testing.assert_allclose(merged[0, 0].numpy(), expected_depth, atol=2e-6)
    np.testing.assert_allclose(mad[0, 0].numpy(), expected_mad, atol=2e-6)


@pytest.mark.parametrize('settings', [{'regularizer': 0.3, 'max_iter': 1, 'tol': 1e-9},
                                      {'regularizer': 0.3, 'max_iter': 50, 'tol': 0.5}])
def test_ensemble_depth_passes_every_setting_on(settings):
    """Regulariser, iterations, tolerance and solve size all reach the solver."""
    depth = _members(3, 5, 40, seed=11)
    expected_depth, expected_mad = _reference_ensemble(depth, size=(2, 16), **settings)
    merged, mad = ensemble_depth(torch.from_numpy(depth), max_res=16, **settings)
    np.testing.assert_allclose(merged[0, 0].numpy(), expected_depth, atol=2e-6)
    np.testing.assert_allclose(mad[0, 0].numpy(), expected_mad, atol=2e-6)


def test_non_finite_members_are_dropped_by_member():
    """A member with one NaN pixel is left out; a lone finite member passes through."""
    depth = _members(3, 6, 8, seed=3)
    poisoned = depth.copy()
    poisoned[2, 0, 1, 1] = np.nan
    expected_depth, expected_mad = _reference_ensemble(depth[:2])
    merged, mad = ensemble_depth(torch.from_numpy(poisoned))
    np.testing.assert_allclose(merged[0, 0].numpy(), expected_depth, atol=2e-6)
    np.testing.assert_allclose(mad[0, 0].numpy(), expected_mad, atol=2e-6)
    merged, mad = ensemble_depth(torch.from_numpy(poisoned[1:]))
    assert torch.equal(merged, torch.from_numpy(depth[1:2])) and not mad.any()
    all_nan = torch.full((2, 1, 3, 4), float('nan'))
    merged, _ = ensemble_depth(all_nan)  # nothing finite to keep: all members stay
    assert merged.shape == (1, 1, 3, 4)


def test_without_uncertainty_and_bad_shapes():
    """with_uncertainty=False returns None; anything but [E, 1, H, W] is refused."""
    depth = torch.from_numpy(_members(3, 6, 8, seed=4))
    assert ensemble_depth(depth, with_uncertainty=False)[1] is None
    assert ensemble_depth(depth[:1], with_uncertainty=False)[1] is None
    for shape in ((2, 2, 4, 4), (2, 1, 5)):
        with pytest.raises(ValueError, match='E, 1, H, W'):
            ensemble_depth(torch.zeros(shape))


def test_no_max_res_solves_at_full_size():
    """max_res=None never resizes: the same result as a limit above the image's size."""
    depth = np.random.default_rng(7).uniform(0.1, 1.0, (3, 1, 6, 9)).astype(np.float32)
    unlimited = ensemble_depth(torch.from_numpy(depth), max_res=None)
    large = ensemble_depth(torch.from_numpy(depth), max_res=64)
    for a, b in zip(unlimited, large):
        assert torch.equal(a, b)
