"""The RMA formulas (rankseg_monai/solvers/objectives.py) against the float64 oracles written from the formulas:
the objective, its upper bound over non-empty selections, the Dinkelbach threshold, the increment of a class's
objective when a voxel joins its unique set, and the band bound of smoothed Dice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from generators import random_rows, random_selection_state
from oracle import brute_force_best, mask_rma_value, rma_value

from rankseg_monai.solvers.objectives import (
    dice_increment_bound,
    dinkelbach_threshold,
    increment_score,
    rma_score,
    rma_score_bound,
)

METRIC_SMOOTH = [("dice", 0.0), ("dice", 1.0), ("dice", 0.1), ("iou", 0.0), ("iou", 1.0), ("iou", 2.0)]


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ------------------------------------------------------------------------------------------------ rma_score


@pytest.mark.parametrize("metric,smooth", METRIC_SMOOTH)
def test_rma_score_equals_the_oracle(metric, smooth, device):
    rng = np.random.default_rng(0)
    S, n, mu, expect = [], [], [], []
    for p in random_rows(rng, 200):
        mask = rng.random(p.size) < 0.5
        S.append(p[mask].sum())
        n.append(mask.sum())
        mu.append(p.sum())
        expect.append(mask_rma_value(metric, p, mask, smooth))
    got = rma_score(metric, _t(S).to(device), _t(n).to(device), _t(mu).to(device), smooth)
    assert got.dtype == torch.float64 and got.device.type == torch.device(device).type
    np.testing.assert_allclose(got.cpu().numpy(), expect, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("smooth", [0.0, 0.5])
def test_rma_score_zero_over_zero_and_empty_masks(smooth):
    """An empty mask of an all-zero row: Dice 2*0/1 (+ s/s = 1 with smoothing), IoU 0/0 := 0 without smoothing and
    s/s = 1 with it; an empty mask of a non-empty row scores s/(mu + s)."""
    zero = torch.zeros(1, dtype=torch.float64)
    for metric in ("dice", "iou"):
        got = float(rma_score(metric, zero, zero, zero, smooth))
        assert got == rma_value(metric, 0.0, 0, 0.0, smooth) == (1.0 if smooth > 0 else 0.0), metric
        got = float(rma_score(metric, zero, zero, torch.tensor([3.0], dtype=torch.float64), smooth))
        assert got == pytest.approx(smooth / (3.0 + smooth), abs=1e-16)
    # IoU of the whole row: (mu + s) / (n + s)
    got = rma_score("iou", _t([2.0]), _t([4.0]), _t([2.0]), smooth)
    assert float(got) == pytest.approx((2.0 + smooth) / (4.0 + smooth), rel=1e-15)


def test_rma_score_broadcasts_rows():
    """(B, C) statistics against (B, 1) totals, as the solvers call it."""
    S = _t([[0.5, 1.0, 0.0], [2.0, 0.0, 0.3]])
    n = _t([[1, 2, 0], [3, 0, 1]])
    mu = _t([[2.0], [4.0]])
    for metric, smooth in METRIC_SMOOTH:
        got = rma_score(metric, S, n, mu, smooth)
        assert got.shape == (2, 3)
        for b, c in itertools.product(range(2), range(3)):
            assert float(got[b, c]) == pytest.approx(
                rma_value(metric, float(S[b, c]), int(n[b, c]), float(mu[b, 0]), smooth), rel=1e-15, abs=1e-16)


# ------------------------------------------------------------------------------------------ rma_score_bound


@pytest.mark.parametrize("metric,smooth", METRIC_SMOOTH)
def test_score_bound_is_above_every_nonempty_mask_by_brute_force(metric, smooth):
    rng = np.random.default_rng(1)
    for p in random_rows(rng, 60, 1, 10):
        bound = float(rma_score_bound(metric, _t(p.sum()), _t(p.max()), smooth))
        best = brute_force_best(p, metric, smooth, nonempty=True)
        assert best <= bound + 1e-12, (p, best, bound)


@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("dice", 1.0), ("iou", 0.0), ("iou", 2.0)])
def test_score_bound_is_above_every_selection(metric, smooth):
    """Larger rows: every top-k set (the solver's candidates, the best for each size) and random sets."""
    rng = np.random.default_rng(4)
    for case in range(40):
        n_vox = int(rng.integers(1, 60))
        p = rng.beta(rng.uniform(0.1, 2), rng.uniform(0.5, 30), size=n_vox) * rng.uniform(0.01, 1)
        mu, vmax = torch.tensor(p.sum()), torch.tensor(p.max())
        bound = float(rma_score_bound(metric, mu, vmax, smooth))
        desc = np.sort(p)[::-1]
        sets = [desc[:k] for k in range(1, n_vox + 1)]  # every top-k set (the solver's candidates)
        sets += [p[rng.random(n_vox) < 0.5] for _ in range(20)]  # and random ones
        for sel in sets:
            if sel.size == 0:
                continue
            f = rma_value(metric, float(sel.sum()), int(sel.size), float(p.sum()), smooth)
            assert f <= bound + 1e-12, (case, metric, smooth, f, bound)


@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("iou", 1.5)])
def test_score_bound_is_tight_on_uniform_rows(metric, smooth):
    """On a row of equal values (mu / vmax an integer) the bound is attained by the best selection: it is as
    small as a bound from (mu, vmax) can be."""
    for n, v in ((1, 0.7), (5, 0.3), (12, 0.05), (40, 0.9)):
        p = np.full(n, v)
        bound = float(rma_score_bound(metric, _t(p.sum()), _t(v), smooth))
        best = max(rma_value(metric, k * v, k, p.sum(), smooth) for k in range(1, n + 1))
        assert bound == pytest.approx(best, rel=1e-12), (n, v)


@pytest.mark.parametrize("metric,smooth", METRIC_SMOOTH)
def test_score_bound_of_all_zero_rows(metric, smooth):
    """vmax = 0: every selection has S = 0; the bound is the value of one selected zero."""
    for n in (1, 3, 10):
        bound = float(rma_score_bound(metric, _t(0.0), _t(0.0), smooth))
        best = max(rma_value(metric, 0.0, k, 0.0, smooth) for k in range(1, n + 1))
        assert best <= bound + 1e-15
        assert bound == pytest.approx(rma_value(metric, 0.0, 1, 0.0, smooth), abs=1e-15)


# ------------------------------------------------------------------------------------------------ Dinkelbach


@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("iou", 1.0)])
def test_dinkelbach_threshold_maximises_the_parametric_objective(metric, smooth):
    """{p > t(f)} maximises N - f D over all 2^n masks (N, D: numerator and denominator of the objective); at the
    optimum f* it is an optimal mask (the Dinkelbach fixed point)."""

    def num_den(p, m):
        S, k, mu = float(p[m].sum()), int(m.sum()), float(p.sum())
        return (2.0 * S, mu + k + 1.0) if metric == "dice" else (S + smooth, mu - S + k + smooth)

    rng = np.random.default_rng(2)
    for p in random_rows(rng, 40, 1, 9):
        masks = [np.array(bits, dtype=bool) for bits in itertools.product((0, 1), repeat=p.size)]
        for f in [*rng.uniform(0, 1, 3), brute_force_best(p, metric, smooth)]:
            t = float(dinkelbach_threshold(metric, _t(f)))
            n_t, d_t = num_den(p, p > t)
            best = max(n - f * d for n, d in (num_den(p, m) for m in masks))
            assert n_t - f * d_t == pytest.approx(best, abs=1e-12), (p, f, t)
        f_star = brute_force_best(p, metric, smooth)
        t_star = float(dinkelbach_threshold(metric, _t(f_star)))
        if f_star > rma_value(metric, 0.0, 0, float(p.sum()), smooth):  # a non-empty optimum
            assert mask_rma_value(metric, p, p > t_star, smooth) == pytest.approx(f_star, rel=1e-12)


def test_dinkelbach_threshold_formulas():
    f = _t([0.0, 0.3, 0.8, 1.0])
    torch.testing.assert_close(dinkelbach_threshold("dice", f), f / 2, rtol=0, atol=0)
    torch.testing.assert_close(dinkelbach_threshold("iou", f), f / (1 + f), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- increments


@pytest.mark.parametrize("metric,smooth", METRIC_SMOOTH)
def test_increment_score_is_the_exact_change_of_the_multiclass_objective(metric, smooth, device):
    """The multiclass objective is the sum over classes of the RMA objective of each class's unique set (the voxels
    it selects alone).  Giving a voxel that no class holds alone to class c changes it by increment_score."""
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(12):
        C, N = int(rng.integers(2, 5)), int(rng.integers(4, 16))
        probs, masks = random_selection_state(rng, C, N)
        alone = masks & (masks.sum(0) == 1)[None]
        before = sum(mask_rma_value(metric, probs[c], alone[c], smooth) for c in range(C))
        M, T, mu = (probs * alone).sum(1), alone.sum(1).astype(np.float64), probs.sum(1)
        for i in np.flatnonzero(alone.sum(0) == 0):  # voxels in nobody's unique set: overlaps and gaps
            got = increment_score(metric, _t(probs[:, i]).to(device), _t(M).to(device), _t(T).to(device),
                                  _t(mu).to(device), smooth).cpu().numpy()
            for c in range(C):
                after_sets = alone.copy()
                after_sets[c, i] = True
                after = sum(mask_rma_value(metric, probs[k], after_sets[k], smooth) for k in range(C))
                assert got[c] == pytest.approx(after - before, rel=1e-11, abs=1e-14), (metric, smooth, c, i)
                checked += 1
    assert checked > 100


def test_increment_score_of_an_empty_class():
    """A class with no probability mass and an empty unique set: adding a zero changes nothing (IoU 0/0 := 0)."""
    z = torch.zeros(1, dtype=torch.float64)
    for metric, smooth in METRIC_SMOOTH:
        expect = rma_value(metric, 0.0, 1, 0.0, smooth) - rma_value(metric, 0.0, 0, 0.0, smooth)
        assert float(increment_score(metric, z, z, z, z, smooth)) == pytest.approx(expect, abs=1e-15)


@pytest.mark.parametrize("smooth", [0.1, 1.0, 5.0])
def test_dice_increment_bound(smooth):
    """Smoothed Dice: with t_A the optimal threshold of the first term alone (Dice s = 0 on mu + s), every
    probability above dice_increment_bound(t_A) increases the objective from every state (every subset of the row
    being its current selection)."""
    rng = np.random.default_rng(5)
    positive = 0
    for p in random_rows(rng, 60, 1, 12):
        mu = float(p.sum())
        desc = np.sort(p)[::-1]
        s_k = np.concatenate([[0.0], np.cumsum(desc)])
        t_a = max(2.0 * s_k / (mu + smooth + np.arange(p.size + 1) + 1.0)) / 2.0  # top-k sets suffice (ranking)
        bound = float(dice_increment_bound(_t(t_a), _t(mu), smooth))
        qs = np.concatenate([p[p > bound], rng.uniform(min(bound, 1.0), 1.0, 5)])
        qs = qs[qs > bound]
        for bits in itertools.product((0, 1), repeat=p.size):  # every state
            m = np.array(bits, dtype=bool)
            S, n = float(p[m].sum()), int(m.sum())
            for q in qs:
                delta = rma_value("dice", S + q, n + 1, mu, smooth) - rma_value("dice", S, n, mu, smooth)
                assert delta > 0, (p, bits, q, bound)
                positive += 1
    assert positive > 1000  # the bound is below 1 often enough for the check to mean something
