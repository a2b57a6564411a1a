"""solver='exact': exact expected Dice, checked against brute force over all masks and all truths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import noisy_ball
from oracle import brute_force_expected_dice, mask_expected_dice, pb_pmf, splits_tie_group

from rankseg_monai.functional import rankseg
from rankseg_monai.solvers import exact as exact_mod
from rankseg_monai.solvers._stream import row_statistics


def solve(x, smooth=0.0, pruning_prob=0.0):
    return rankseg(x, metric="dice", output_mode="multilabel", solver="exact", smooth=smooth,
                   pruning_prob=pruning_prob)


def test_poisson_binomial_and_leave_one_out_laws():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=120), [0.0, 1.0, 0.5, 0.5, 1e-12, 1 - 1e-12]])
    pmf = exact_mod.poisson_binomial_pmf(p)
    np.testing.assert_allclose(pmf, pb_pmf(p), rtol=1e-12, atol=1e-16)
    q = exact_mod.leave_one_out_pmfs(pmf, p)  # columns in the order of p (not sorted)
    assert q.shape == (p.size, p.size)
    for j in range(0, p.size, 5):
        np.testing.assert_allclose(q[:, j], pb_pmf(np.delete(p, j)), rtol=0, atol=1e-14)
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-13)


@pytest.mark.parametrize("smooth", [0.0, 0.3, 1.0, 7.0])
def test_scores_equal_brute_force_expectation(smooth):
    """E[Dice] of every top-tau mask equals the brute-force expectation over all 2^n truths."""
    rng = np.random.default_rng(int(smooth * 10) + 1)
    for _ in range(12):
        n = int(rng.integers(1, 10))
        p = np.sort(rng.uniform(size=n))[::-1]
        masks, values = brute_force_expected_dice(p, smooth)
        top = np.array([values[int(np.flatnonzero((masks == (np.arange(n) < t)).all(1))[0])] for t in range(n + 1)])
        scores = exact_mod.exact_scores(p, smooth)
        expected = top if smooth < 1 else smooth * (top - 1.0)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12 * max(1.0, smooth))
        # ranking theorem: the best top-tau mask is the best of all 2^n masks
        assert top.max() >= values.max() - 1e-12


def test_hits_brute_force_optimum(device):
    rng = np.random.default_rng(7)
    for case in range(40):
        n = int(rng.integers(5, 11))
        smooth = float(rng.choice([0.0, 0.5, 2.0]))
        p = rng.uniform(size=n) ** float(rng.choice([0.5, 1.0, 3.0]))
        masks, values = brute_force_expected_dice(p, smooth)
        got = solve(torch.from_numpy(p[None, None]).to(device), smooth).cpu().numpy().ravel()
        value = values[int(np.flatnonzero((masks == got).all(1))[0])]
        assert value >= values.max() - 1e-12, (case, p, smooth)


def test_zero_probabilities_and_convention():
    # 0/0 := 0: with s = 0 the empty mask scores 0, so any voxel with p > 0 is worth selecting here
    x = torch.tensor([[[0.3, 0.0, 0.0]]], dtype=torch.float64)
    assert solve(x).tolist() == [[[True, False, False]]]
    assert exact_mod.exact_scores(np.array([0.3]), 0.0, total=3)[0] == 0.0
    # zeros are never selected (they only enlarge the denominator); full-mask candidate is scored right
    p = np.array([0.9, 0.2, 0.0, 0.0])
    scores = exact_mod.exact_scores(p[:2], 0.5, total=4)
    assert scores.size == 4
    assert scores[-1] == pytest.approx(mask_expected_dice(p, np.ones(4, bool), 0.5), abs=1e-14)
    assert not solve(torch.from_numpy(p[None, None]), 0.5)[0, 0, 2:].any()


def test_ties_are_never_split_and_best_boundary_is_chosen():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(4, 10))
        p = np.round(rng.uniform(size=n) * 4) / 4
        p[0] = 1.0
        smooth = float(rng.choice([0.0, 1.0]))
        got = solve(torch.from_numpy(p[None, None]), smooth).numpy().ravel()
        assert not splits_tie_group(p, got)
        levels = np.unique(p)
        threshold_masks = [p > t for t in np.concatenate([[-1.0], levels])]
        best = max(mask_expected_dice(p, m, smooth) for m in threshold_masks)
        assert mask_expected_dice(p, got, smooth) >= best - 1e-12


def test_matches_oracle_on_moderate_rows_and_beats_or_ties_trna():
    x = noisy_ball((12, 12), seed=2, sharp=6.0, noise=1.5)
    p = x.flatten().numpy()
    got = solve(x).numpy().ravel()
    desc = np.sort(p)[::-1]
    exact_best = mask_expected_dice(p, got, 0.0)
    for t in range(0, p.size + 1, 7):  # spot checks of other top-tau masks with the independent oracle
        assert mask_expected_dice(desc, np.arange(p.size) < t, 0.0) <= exact_best + 1e-12
    trna = rankseg(x, metric="dice", output_mode="multilabel", solver="trna", pruning_prob=0.0).numpy().ravel()
    assert exact_best >= mask_expected_dice(p, trna, 0.0) - 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_strides_and_contract(dtype, device):
    x = noisy_ball((7, 6), seed=4, sharp=6.0, noise=1.0).to(dtype).flatten(2).repeat(2, 2, 1).to(device)
    x[1, 0] *= 0.3
    stats = row_statistics(x)
    active = stats.vmax > 0.5
    thr = exact_mod.exact_thresholds(x, stats, 0.0, active)
    assert thr.shape == (2, 2) and thr.dtype == dtype and thr.device == x.device and torch.isinf(thr[1, 0])
    assert torch.equal(x > thr[..., None], solve(x, pruning_prob=0.5))
    assert torch.equal(solve(x), solve(x.double()))
    assert torch.equal(solve(x).cpu(), solve(x.cpu()))
    strided = torch.repeat_interleave(x, 2, dim=-1)[..., ::2]  # the same values as a strided view
    assert not strided.is_contiguous()
    assert torch.equal(solve(strided), solve(x))


def test_refuses_rows_beyond_the_limit():
    n = exact_mod.EXACT_MAX_VOXELS + 1
    x = torch.full((1, 2, n), 0.7)
    with pytest.raises(ValueError, match=r"trna.*rma|rma.*trna") as err:
        solve(x)
    assert str(exact_mod.EXACT_MAX_VOXELS) in str(err.value)
    y = torch.zeros(1, 1, n + 50)
    y[..., :100] = 0.8  # zeros do not count towards the limit
    assert solve(y).sum() == 100


def test_multiclass_exact_is_rejected():
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="not supported"):
        rankseg(x, metric="dice", output_mode="multiclass", solver="exact")
