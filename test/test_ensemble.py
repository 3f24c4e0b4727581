"""Affine-aligned median ensembling and its uncertainty."""

from marigold_model.ensemble import ensemble_depth, solve_alignment
import pytest
import torch


def _base():
    rows = torch.linspace(0, 1, 24).view(24, 1)
    cols = torch.linspace(0, 1, 32).view(1, 32)
    return (0.6 * rows + 0.4 * cols ** 2).view(1, 1, 24, 32)


def test_affine_copies_merge_to_the_normalised_base():
    """Members that are affine copies of one map ensemble back to it, with zero spread."""
    base = _base()
    affine = [(1.0, 0.0), (0.5, 0.2), (2.0, -0.3), (0.8, 0.1)]
    members = torch.cat([base * s + t for s, t in affine])
    merged, spread = ensemble_depth(members, max_iter=50, regularizer=0.0)
    expected = (base - base.min()) / (base.max() - base.min())
    assert merged.shape == (1, 1, 24, 32)
    assert torch.allclose(merged, expected, atol=2e-3)
    assert spread.max().item() < 2e-3
    assert merged.min().item() == pytest.approx(0.0) and merged.max().item() == pytest.approx(1.0)


def test_spread_grows_with_member_disagreement():
    """Noisier members give a larger median absolute deviation; the median resists one bad one."""
    generator = torch.Generator().manual_seed(0)
    base = _base()
    quiet = base + 0.01 * torch.randn((5, 1, 24, 32), generator=generator)
    loud = base + 0.1 * torch.randn((5, 1, 24, 32), generator=generator)
    _, quiet_spread = ensemble_depth(quiet)
    _, loud_spread = ensemble_depth(loud)
    assert loud_spread.mean() > 3 * quiet_spread.mean()
    # The bad member is the scene mirrored left-right: no scale and shift make it agree with
    # the others (1 - base, used before, is an affine copy: after alignment it agreed with
    # them and the mean passed as well).  Four members agree exactly, so the median is the
    # base; the per-pixel mean is pulled up to 0.12 away by the mirrored one.
    outlier = torch.cat([base.repeat(4, 1, 1, 1), base.flip(-1)])
    merged, _ = ensemble_depth(outlier)
    expected = (base - base.min()) / (base.max() - base.min())
    assert torch.allclose(merged, expected, atol=1e-5)


def test_single_member_and_bad_shape():
    """One member passes through; a wrong shape is refused."""
    base = _base()
    merged, spread = ensemble_depth(base)
    assert torch.equal(merged, base) and spread.abs().max().item() == 0
    with pytest.raises(ValueError, match='E, 1, H, W'):
        ensemble_depth(base[0])


def test_a_member_with_nan_is_left_out_and_tiny_max_res_works():
    """One overflowing member does not blank the frame; a 1-pixel solve size still works."""
    base = _base()
    members = torch.cat([base, 0.5 * base + 0.2, 2.0 * base, base.clone()])
    members[3, 0, 5, 7] = float('nan')
    merged, spread = ensemble_depth(members, max_iter=50, regularizer=0.0)
    expected = (base - base.min()) / (base.max() - base.min())
    assert torch.isfinite(merged).all() and torch.isfinite(spread).all()
    assert torch.allclose(merged, expected, atol=2e-3)
    wide = torch.cat([base, 0.5 * base + 0.2]).repeat(1, 1, 1, 8)  # 24 x 256
    merged, _ = ensemble_depth(wide, max_res=1)
    assert merged.shape == (1, 1, 24, 256) and torch.isfinite(merged).all()


def test_two_members_give_their_midpoint_and_half_their_difference():
    """Two members: the depth is their midpoint and the uncertainty half their difference."""
    generator = torch.Generator().manual_seed(1)
    base = _base()
    pair = base + 0.05 * torch.randn((2, 1, 24, 32), generator=generator)
    merged, spread = ensemble_depth(pair, max_iter=50, regularizer=0.0)
    # The alignment the ensemble uses (the solver is deterministic), applied by hand.
    scale, shift = solve_alignment(pair, regularizer=0.0, max_iter=50)
    first = pair[0] * float(scale[0]) + float(shift[0])
    second = pair[1] * float(scale[1]) + float(shift[1])
    midpoint = (first + second) / 2
    span = midpoint.max() - midpoint.min()
    assert torch.allclose(merged[0], (midpoint - midpoint.min()) / span, atol=1e-5)
    assert torch.allclose(spread[0], (first - second).abs() / 2 / span, atol=1e-5)
    assert spread.mean().item() > 0.005  # the members do differ: not the zero of diffusers


# Three hand-made members in eighths, each spanning exactly 0 to 8, so each one's own
# min-max normalisation (the solver's starting point, kept with max_iter=0) is p / 8.
_P0 = [0, 1, 6, 8, 4, 2]
_P1 = [0, 4, 3, 6, 8, 2]
_P2 = [0, 6, 1, 5, 6, 8]
_P3 = [0, 2, 8, 4, 4, 6]
# (scale, shift) each member is recorded with: the alignment has to undo them.
_RECORDED = [(2.0, 1.0), (0.5, -0.25), (4.0, 3.0), (0.25, 0.5)]


def _members(patterns):
    return torch.cat([(scale * torch.tensor(p, dtype=torch.float32) / 8 + shift).view(1, 1, 2, 3)
                      for p, (scale, shift) in zip(patterns, _RECORDED)])


def _eighths(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 3) / 8


def test_three_members_median_and_median_absolute_deviation_by_hand():
    """
    Per pixel: the median of the aligned members, the median absolute deviation about it.

    Worked in eighths, pixel by pixel (members p0, p1, p2 -> median; |p - median| -> MAD):
    (0, 0, 0) -> 0, MAD 0;  (1, 4, 6) -> 4, (3, 0, 2) -> 2;  (6, 3, 1) -> 3, (3, 0, 2) -> 2;
    (8, 6, 5) -> 6, (2, 0, 1) -> 1;  (4, 8, 6) -> 6, (2, 2, 0) -> 2;  (2, 2, 8) -> 2,
    (0, 0, 6) -> 0.  The median spans 0..6 eighths, so depth = median / 6 and the
    uncertainty = MAD / 6 (both divided by the same span).  The per-pixel mean would be
    (0, 11/3, 10/3, 19/3, 6, 4) and the standard deviation of (1, 4, 6) is 2.05, not 2.
    """
    merged, spread = ensemble_depth(_members([_P0, _P1, _P2]), max_iter=0)
    assert torch.allclose(merged, _eighths([0, 4, 3, 6, 6, 2]) * 8 / 6, atol=1e-5)
    assert torch.allclose(spread, _eighths([0, 2, 2, 1, 2, 0]) * 8 / 6, atol=1e-5)


def test_four_members_take_the_mean_of_the_two_middle_values_by_hand():
    """
    An even count: the median is the mean of the two middle values, for depth and MAD.

    Sorted members per pixel in eighths -> median; sorted |p - median| -> MAD:
    (0, 0, 0, 0) -> 0, 0;  (1, 2, 4, 6) -> 3, (1, 1, 2, 3) -> 1.5;  (1, 3, 6, 8) -> 4.5,
    (1.5, 1.5, 3.5, 3.5) -> 2.5;  (4, 5, 6, 8) -> 5.5, (0.5, 0.5, 1.5, 2.5) -> 1;
    (4, 4, 6, 8) -> 5, (1, 1, 1, 3) -> 1;  (2, 2, 6, 8) -> 4, (2, 2, 2, 4) -> 2.
    The median spans 0..5.5 eighths.  The upper middle value would give (0, 4, 6, 6, 6, 6).
    """
    merged, spread = ensemble_depth(_members([_P0, _P1, _P2, _P3]), max_iter=0)
    assert torch.allclose(merged, _eighths([0, 3, 4.5, 5.5, 5, 4]) * 8 / 5.5, atol=1e-5)
    assert torch.allclose(spread, _eighths([0, 1.5, 2.5, 1, 1, 2]) * 8 / 5.5, atol=1e-5)
