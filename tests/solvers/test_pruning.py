"""pruning_prob="auto" (rankseg_monai/solvers/pruning.py): keep a class iff its best non-empty mask beats the
empty mask in expectation, the empty mask scoring P(class absent) (empty/empty Dice = 1).  P(absent) is
prod(1 - p) ("auto-independent"), 1 - max p ("auto-correlated") or their average ("auto")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from generators import faint_blob_maps
from oracle import dice_ignore_empty_false, mask_expected_dice

from rankseg_monai.functional import rankseg
from rankseg_monai.solvers import pruning
from rankseg_monai.solvers._stream import row_statistics
from rankseg_monai.solvers.objectives import rma_score

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- building blocks
def _log_prob_absent(flat, chunk_size=None, device=None):
    thr = torch.full(flat.shape[:2], float("inf"), device=flat.device)
    return pruning.selection_summary(flat, thr, device=device, chunk_size=chunk_size)[2]


def test_log_prob_absent_matches_direct_sum_and_is_chunk_invariant(device):
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(2, 3, 1000, generator=g) * 0.3
    flat[1, 2, 7] = 1.0  # certainly present: log P0 = -inf
    direct = torch.log1p(-flat.double()).sum(-1)
    for chunk, data, dev in ((None, flat, None), (7, flat.to(device), None), (37, flat, torch.device(device)),
                             (1000, flat.to(device), None)):
        out = _log_prob_absent(data, chunk_size=chunk, device=dev).cpu()
        assert out.dtype == torch.float64 and out.shape == (2, 3)
        finite = torch.isfinite(direct)
        torch.testing.assert_close(out[finite], direct[finite], rtol=1e-12, atol=1e-9)
        assert out[1, 2] == float("-inf")


def test_selection_summary_counts_the_threshold_mask(device):
    g = torch.Generator().manual_seed(1)
    flat = torch.rand(1, 2, 500, generator=g)
    thr = torch.tensor([[0.3, float("inf")]])
    S, n, logp0 = (t.cpu() for t in pruning.selection_summary(flat.to(device), thr.to(device), chunk_size=64))
    sel = flat[0, 0] > 0.3
    assert n[0, 0] == sel.sum() and n[0, 1] == 0
    assert S[0, 0] == pytest.approx(float(flat[0, 0][sel].double().sum()), rel=1e-12)
    torch.testing.assert_close(logp0, torch.log1p(-flat.double()).sum(-1))


def test_empty_value_is_p_absent_without_smoothing_and_grows_with_it():
    logp0 = torch.tensor([[math.log(0.2), math.log(0.9)]], dtype=torch.float64)
    mu = torch.tensor([[3.0, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(pruning.empty_value(logp0, mu, 0.0), torch.tensor([[0.2, 0.9]], dtype=torch.float64))
    v = pruning.empty_value(logp0, mu, 1.0)
    # P0 + (1 - P0) s / (mu / (1 - P0) + s)
    expect = torch.tensor([[0.2 + 0.8 / (3.0 / 0.8 + 1.0), 0.9 + 0.1 / (0.1 / 0.1 + 1.0)]], dtype=torch.float64)
    torch.testing.assert_close(v, expect)


def test_auto_active_agrees_with_exact_expected_dice_on_small_rows():
    """On rows small enough to enumerate every (independent) truth, 'auto-independent' keeps a class exactly when
    the exact expected Dice of the solver's mask beats that of the empty mask (rows with a clear margin)."""
    rows = {
        "one voxel at 0.3": [0.3],  # E[Dice(empty)] 0.7 > E[Dice({v})] 0.3: prune
        "one voxel at 0.6": [0.6],  # 0.4 < 0.6: keep
        "three at 0.2": [0.2, 0.2, 0.2],  # P0 0.512
        "eight at 0.45": [0.45] * 8,  # P0 0.008: keep
        "mixed": [0.7, 0.1, 0.05, 0.05],
        "faint pair": [0.15, 0.1],  # P0 0.765: prune
    }
    for name, vals in rows.items():
        p = torch.tensor(vals, dtype=torch.float64).view(1, 1, -1)
        mask = rankseg(p, output_mode="multilabel", pruning_prob=0.0)[0, 0].numpy()
        kept = bool(rankseg(p, output_mode="multilabel", pruning_prob="auto-independent")[0, 0].any())
        e_mask = mask_expected_dice(np.asarray(vals), mask, 0.0, empty=1.0)
        e_empty = float(np.prod(1 - np.asarray(vals)))
        assert abs(e_mask - e_empty) > 0.05, name  # the rows have a clear answer
        assert kept == (e_mask > e_empty), (name, e_mask, e_empty)


def test_auto_active_from_thresholds_matches_the_pieces(device):
    g = torch.Generator().manual_seed(2)
    flat = (torch.rand(2, 3, 300, generator=g) ** 3).float().to(device)
    flat[0, 1] *= 0.01  # a faint row: pruned
    stats = row_statistics(flat)
    from rankseg_monai.solvers.rma import rma_thresholds

    thr = rma_thresholds(flat, stats, "dice", 0.0, torch.ones(2, 3, dtype=torch.bool, device=device))
    active = pruning.auto_active_from_thresholds(flat, thr, stats, "dice", 0.0, chunk_size=50)
    S, n, logp0 = pruning.selection_summary(flat, thr)
    best = rma_score("dice", S, n, stats.mu, 0.0)
    torch.testing.assert_close(active, pruning.auto_active(stats, best, logp0) & (n > 0))
    assert not bool(active[0, 1]) and bool(active[1].all())


def test_candidates_skip_only_rows_that_auto_would_prune(monkeypatch, device):
    """Not solving rows the rule can never keep changes no decision (and does skip rows)."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 12, 10, 9, 8, generator=g).to(device)
    logits[:, :6] -= 6.0  # six clearly absent classes (max p of a few percent)
    x = torch.softmax(logits, 1)
    stats = row_statistics(x.flatten(2))
    assert not bool(pruning.auto_candidates(stats, "dice", 0.0, "mixed")[:, :6].any())
    assert bool(pruning.auto_candidates(stats, "dice", 0.0, "mixed")[:, 6:].all())
    settings = [dict(metric="dice"), dict(metric="iou"), dict(metric="dice", smooth=1.0),
                dict(output_mode="multilabel"), dict(output_mode="multilabel", solver="ba")]
    runs = [(pp, kw) for pp in ("auto", "auto-correlated", "auto-independent") for kw in settings]
    results = [rankseg(x, pruning_prob=pp, **kw) for pp, kw in runs]
    monkeypatch.setattr(pruning, "auto_candidates", lambda stats, *a, **k: stats.vmax > 0)  # solve every row
    for (pp, kw), got in zip(runs, results):
        assert torch.equal(got, rankseg(x, pruning_prob=pp, **kw)), (pp, kw)


def test_absence_models():
    """P(absent): independent prod(1 - p) <= mixed <= correlated 1 - max p; the keep threshold follows."""
    flat = torch.zeros(1, 1, 50)
    flat[0, 0, :20] = 0.3  # max 0.3, prod(1 - p) = 0.7^20 ~ 8e-4
    stats = row_statistics(flat)
    logp0 = _log_prob_absent(flat)
    for best, expect in ((0.2, {"independent": True, "mixed": False, "correlated": False}),
                         (0.5, {"independent": True, "mixed": True, "correlated": False}),
                         (0.71, {"independent": True, "mixed": True, "correlated": True})):
        b = torch.tensor([[best]], dtype=torch.float64)
        got = {m: bool(pruning.auto_active(stats, b, logp0, absence=m)) for m in pruning.ABSENCE_MODELS}
        assert got == expect, best
    with pytest.raises(ValueError, match="absence"):
        pruning.auto_active(stats, torch.ones(1, 1, dtype=torch.float64), logp0, absence="bayes")
    assert pruning.AUTO_MODES == {"auto": "mixed", "auto-independent": "independent",
                                  "auto-correlated": "correlated"}


def test_all_zero_row_is_inactive():
    stats = row_statistics(torch.zeros(1, 2, 10))
    out = pruning.auto_active(stats, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64))
    assert not bool(out.any())


# --------------------------------------------------------------------------------------- functional entry
def test_functional_accepts_auto_and_rejects_other_strings():
    p = torch.full((1, 2, 4), 0.5)
    for mode in ("AUTO", "auto-independent", " auto-correlated "):
        assert rankseg(p, pruning_prob=mode).shape == (1, 4)
    with pytest.raises(ValueError, match="pruning_prob"):
        rankseg(p, pruning_prob="yes")
    with pytest.raises(ValueError):
        rankseg(p, pruning_prob=1.5)
    with pytest.raises(TypeError):
        rankseg(p, pruning_prob=None)


def test_auto_with_numpy_half_and_iou():
    p = np.full((1, 1, 100), 0.45, np.float16)
    out = rankseg(p, output_mode="multilabel", pruning_prob="auto")
    assert isinstance(out, np.ndarray) and out.all()
    assert bool(rankseg(torch.full((1, 1, 100), 0.45), metric="iou", output_mode="multilabel",
                        pruning_prob="auto").all())
    with torch.no_grad():
        specks = torch.zeros(1, 1, 100)
        specks[..., :2] = 0.1
        assert not bool(rankseg(specks, metric="iou", output_mode="multilabel", pruning_prob="auto").any())
        assert bool(rankseg(specks, metric="iou", output_mode="multilabel", pruning_prob=0.0).any())


# ------------------------------------------------------------------------------------------------ scenarios
def test_scenario_uniform_045_is_kept_with_its_exact_expected_dice():
    """100 voxels at 0.45: rankseg 0.0.8's pruning empties the class (Dice ~ 0); 'auto' keeps all 100, whose
    exact expected Dice (X ~ Binomial(100, 0.45)) is 0.619."""
    p = torch.full((1, 1, 100), 0.45)
    assert not bool(rankseg(p, output_mode="multilabel", pruning_prob=0.5).any())
    auto = rankseg(p, output_mode="multilabel", pruning_prob="auto")
    assert bool(auto.all())
    for mode in ("auto-independent", "auto-correlated"):  # 0.616 > 0.55 = 1 - max p: even the bound keeps it
        assert bool(rankseg(p, output_mode="multilabel", pruning_prob=mode).all())
    from scipy.stats import binom

    x = np.arange(101)
    exact = float(np.sum(binom.pmf(x, 100, 0.45) * 2 * x / (x + 100)))
    assert exact == pytest.approx(0.619, abs=5e-4)
    rng = np.random.default_rng(0)
    truth = torch.from_numpy(rng.random((4000, 100)) < 0.45)
    mc = float(dice_ignore_empty_false(auto[0, 0].expand(4000, -1), truth).mean())
    assert mc == pytest.approx(exact, abs=0.005)  # MC standard error ~ 0.0006


def test_scenario_region_keeps_class_2():
    """A 256-voxel region with class probabilities (0.30, 0.25, 0.45) inside a confident background: pruning 0.5
    hands it to class 0 and class 2 disappears; 'auto' (like pruning 0 and argmax) gives it to class 2."""
    q = torch.zeros(1, 3, 16, 16, 16)
    q[0, 0], q[0, 1], q[0, 2] = 0.98, 0.01, 0.01
    q[0, :, :4, :8, :8] = torch.tensor([0.30, 0.25, 0.45])[:, None, None, None]
    region = torch.zeros(16, 16, 16, dtype=torch.bool)
    region[:4, :8, :8] = True
    labels = {pp: rankseg(q, pruning_prob=pp)[0] for pp in (0.5, 0.0, "auto", "auto-independent", "auto-correlated")}
    assert not bool((labels[0.5] == 2).any())
    for pp in (0.0, "auto", "auto-independent", "auto-correlated"):
        assert bool((labels[pp][region] == 2).all()) and not bool((labels[pp][~region] == 2).any())
    # Monte-Carlo Dice of class 2 with the truth drawn voxel-wise from q
    rng = np.random.default_rng(1)
    flat = q[0].reshape(3, -1)
    cum = torch.cumsum(flat, 0)
    d = {pp: [] for pp in labels} | {"argmax": []}
    am = q.argmax(1)[0].reshape(-1)
    for _ in range(300):
        y = (torch.from_numpy(rng.random(flat.shape[1])).float()[None] > cum).sum(0).clamp(max=2)
        for key, lab in list(labels.items()) + [("argmax", am)]:
            d[key].append(float(dice_ignore_empty_false((lab.reshape(-1) == 2)[None], (y == 2)[None])[0]))
    mean = {k: float(np.mean(v)) for k, v in d.items()}
    assert mean[0.5] < 0.01
    assert mean["auto"] == pytest.approx(mean["argmax"], abs=1e-12)
    assert mean["auto"] > 0.55


def test_absent_speck_is_pruned_and_that_pays_under_ignore_empty_false():
    """A faint speck (mu ~ 0.4): the class is absent in ~2/3 of the truths.  'auto' predicts empty (expected
    Dice = P0), pruning 0 paints the speck; both decisions are checked against Monte-Carlo Dice."""
    p = torch.zeros(1, 1, 8, 8, 8)
    p[0, 0, 3:5, 3:5, 3] = torch.tensor([[0.15, 0.1], [0.1, 0.05]])
    auto = rankseg(p, output_mode="multilabel", pruning_prob="auto")
    zero = rankseg(p, output_mode="multilabel", pruning_prob=0.0)
    assert not bool(auto.any()) and bool(zero.any())
    for mode in ("auto-independent", "auto-correlated"):
        assert not bool(rankseg(p, output_mode="multilabel", pruning_prob=mode).any())
    p0 = float(torch.prod(1 - p.double()))
    rng = np.random.default_rng(2)
    truth = torch.from_numpy(rng.random((20000, 512)) < p.reshape(1, -1).numpy())
    d_auto = float(dice_ignore_empty_false(auto.reshape(1, -1).expand(20000, -1), truth).mean())
    d_zero = float(dice_ignore_empty_false(zero.reshape(1, -1).expand(20000, -1), truth).mean())
    assert d_auto == pytest.approx(p0, abs=0.01)
    assert d_auto > d_zero + 0.3


def test_auto_on_calibrated_synthetic_data():
    """Truth drawn voxel by voxel from the probabilities (RankSEG's own model) over faint blobs and specks:
    'auto-independent' is exact there and has the best mean Dice (ignore_empty=False), never much below no
    pruning case by case; 'auto' (mixed) sits between it and rankseg's 0.5, which erases the faint classes."""
    rng = np.random.default_rng(3)
    modes = (0.5, 0.0, "auto-independent", "auto")
    scores = {m: [] for m in modes}
    for p in faint_blob_maps(rng, 24):
        preds = {pp: rankseg(p, output_mode="multilabel", pruning_prob=pp)[0] for pp in modes}
        truth = torch.from_numpy(rng.random((200, p.shape[-1])) < p[0].numpy())
        for pp, m in preds.items():
            scores[pp].append(float(dice_ignore_empty_false(m.expand(200, -1), truth).mean()))
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    diff = np.asarray(scores["auto-independent"]) - np.asarray(scores[0.0])
    assert mean["auto-independent"] > mean[0.0] > mean[0.5] + 0.05
    assert diff.min() > -0.02
    assert mean[0.5] < mean["auto"] < mean["auto-independent"]


def test_auto_prunes_a_false_positive_blob_when_the_truth_is_all_or_nothing():
    """A network's false-positive blob: 300 voxels at p = 0.2 (sum p = 60, prod(1 - p) ~ 1e-29; RMA value of the
    blob 0.33).  If the truth is the whole blob with probability 0.2 and nothing otherwise (fully correlated),
    keeping it scores 0.2 on average and the empty mask 0.8: 'auto' (empty worth 0.4) and 'auto-correlated'
    (0.8) prune, 'auto-independent' (like pruning 0) keeps it.  Under voxel-independent truth the blob would be
    worth keeping (Dice ~ 0.33): the two models disagree, which is why 'auto' averages them."""
    p = torch.zeros(1, 1, 2000)
    p[..., :300] = 0.2
    kept = {m: bool(rankseg(p, output_mode="multilabel", pruning_prob=m).any())
            for m in ("auto", "auto-correlated", "auto-independent")}
    assert kept == {"auto": False, "auto-correlated": False, "auto-independent": True}
    rng = np.random.default_rng(4)
    present = torch.from_numpy(rng.random(4000) < 0.2)
    truth = present[:, None] & (p[0] > 0)  # (4000, 2000)
    d_keep = float(dice_ignore_empty_false((p[0] > 0).expand(4000, -1), truth).mean())
    d_empty = float(dice_ignore_empty_false(torch.zeros(4000, 2000, dtype=torch.bool), truth).mean())
    assert d_keep == pytest.approx(0.2, abs=0.02) and d_empty == pytest.approx(0.8, abs=0.02)
