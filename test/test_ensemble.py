"""Affine-aligned median ensembling and its uncertainty."""

from marigold_model.ensemble import ensemble_depth
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
    outlier = torch.cat([base.repeat(4, 1, 1, 1), 1 - base])
    merged, _ = ensemble_depth(outlier)
    expected = (base - base.min()) / (base.max() - base.min())
    assert (merged - expected).abs().mean().item() < 0.05


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


def test_two_members_give_their_midpoint_and_a_spread():
    """Two members: the uncertainty is half their difference, not zero."""
    generator = torch.Generator().manual_seed(1)
    base = _base()
    pair = base + 0.05 * torch.randn((2, 1, 24, 32), generator=generator)
    merged, spread = ensemble_depth(pair, max_iter=50, regularizer=0.0)
    assert spread.mean().item() > 0.005  # half the members' difference, not 0
    assert torch.isfinite(merged).all() and merged.min() >= 0 and merged.max() <= 1
