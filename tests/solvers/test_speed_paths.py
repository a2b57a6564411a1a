"""Every fast path of the solvers gives the decisions of its reference path, bit for bit (issue 15).

The fast paths and what they replace:

* ``auto_active_from_solution`` (auto pruning decided from the solver's mask sums and certified bounds of
  ``log P(absent)``) vs ``auto_active_from_thresholds`` (one float64 pass over the volume);
* ``band_select(above=...)`` (the sums above 1/2 taken from the statistics pass; on the CPU only the rows whose
  chunk maximum reaches the band are scanned) vs the full scan;
* ``multiclass.assign`` in one pass (positions of unresolved voxels kept) vs its second pass (cap 0);
* ``row_statistics``' fused sums vs the direct float64 sums of ``x * (x > 1/2)``.

Inputs are many-class softmax volumes with blobs of many sizes and most classes absent, ties, void, every pruning
mode, chunk sizes, fp16/bf16, permuted input and B > 1.  No timings here: speed is measured in ``benchmarks/``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from oracle import multiclass_from_masks

from rankseg_monai.functional import rankseg
from rankseg_monai.options import RankSEGOptions
from rankseg_monai.solvers import multiclass, pruning, rma
from rankseg_monai.solvers._stream import flat_view, iter_chunks, row_statistics
from rankseg_monai.solvers.objectives import rma_score


def blobs(num_classes: int, spatial: tuple[int, ...], seed: int, batch: int = 1) -> torch.Tensor:
    """Softmax of a background, one soft blob per present class (radii from 1 to a third of the volume), a few
    faint "ghost" classes (max p < 1/2) and absent ones (p ~ 1e-5 everywhere), plus voxel noise."""
    g = torch.Generator().manual_seed(seed)
    ndim = len(spatial)
    out = []
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij")
    for _ in range(batch):
        logits = torch.randn((num_classes, *spatial), generator=g) * 0.5
        logits[0] += 2.0
        logits[1:] -= 9.0
        for c in range(1, num_classes):
            kind = float(torch.rand((), generator=g))
            if kind < 0.2:
                continue
            peak = 16.0 if kind > 0.4 else 8.5
            r = 1.0 + float(torch.rand((), generator=g)) * max(1.0, min(spatial) / 3 - 1)
            center = [float(torch.rand((), generator=g)) * (s - 1) for s in spatial]
            d = torch.sqrt(sum((grids[k] - center[k]) ** 2 for k in range(ndim))) / r
            logits[c] += peak * torch.sigmoid((1.0 - d) * r / 1.2)
        out.append(torch.softmax(logits, 0))
    return torch.stack(out)


def ties(num_classes: int, spatial: tuple[int, ...], seed: int, batch: int = 1) -> torch.Tensor:
    """Probabilities on a grid of 1/16: many exactly equal values across and within classes."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randint(0, 5, (batch, num_classes, *spatial), generator=g).float(), 1)
    return (p * 16).round() / 16


CASES = {
    "c3": lambda: blobs(3, (14, 12, 10), 0),
    "c14": lambda: blobs(14, (16, 14, 12), 1),
    "c105": lambda: blobs(105, (12, 12, 10), 2),
    "c14_2d": lambda: blobs(14, (40, 36), 3),
    "c14_b2": lambda: blobs(14, (12, 12, 8), 4, batch=2),
    "ties": lambda: ties(6, (10, 10, 8), 5, batch=2),
}
PRUNING = [0.5, 0.0, "auto", "auto-independent", "auto-correlated"]


# ------------------------------------------------------------------------------------------ end to end
def _reference_paths(monkeypatch) -> None:
    """Route every fast path to its reference path (the float64 pruning pass, the full band scan, the second
    labelling pass)."""
    def pass_based(flat, thr, stats, metric, smooth, S, n, known=None, band=None, device=None, chunk_size=None,
                   clamp=False, absence="independent"):
        return pruning.auto_active_from_thresholds(flat, thr, stats, metric, smooth, device=device,
                                                   chunk_size=chunk_size, clamp=clamp, absence=absence)

    full_band = rma.band_select

    def full_scan(*args, above=None, **kwargs):
        return full_band(*args, **kwargs)

    monkeypatch.setattr(pruning, "auto_active_from_solution", pass_based)
    monkeypatch.setattr(rma, "band_select", full_scan)
    monkeypatch.setattr(multiclass, "_pending_cap", lambda batch, n_vox: 0)
    monkeypatch.setattr(multiclass._Resolver, "restrict", False)


def _decide_both(monkeypatch, x, **kwargs):
    fast = rankseg(x, **kwargs)
    with monkeypatch.context() as m:
        _reference_paths(m)
        ref = rankseg(x, **kwargs)
    return fast, ref


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pruning_prob", PRUNING)
def test_fast_paths_give_the_reference_decisions(case, pruning_prob, device, monkeypatch):
    x = CASES[case]().to(device)
    for metric, smooth, mode in (("dice", 0.0, "multiclass"), ("iou", 0.0, "multiclass"), ("dice", 1.0, "multiclass"),
                                 ("iou", 1.0, "multilabel"), ("dice", 0.0, "multilabel")):
        fast, ref = _decide_both(monkeypatch, x, metric=metric, smooth=smooth, output_mode=mode,
                                 pruning_prob=pruning_prob)
        assert fast.device == x.device and fast.dtype == ref.dtype
        assert torch.equal(fast, ref), (case, pruning_prob, metric, smooth, mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fast_paths_in_low_and_high_precision(dtype, device, monkeypatch):
    for case in ("c14", "c105", "ties"):
        x = CASES[case]().to(device=device, dtype=dtype)
        for kwargs in ({}, {"pruning_prob": "auto"}, {"pruning_prob": "auto", "metric": "iou", "smooth": 1.0},
                       {"pruning_prob": 0.0, "output_mode": "multilabel"}):
            fast, ref = _decide_both(monkeypatch, x, **kwargs)
            assert torch.equal(fast, ref), (case, dtype, kwargs)


@pytest.mark.parametrize("chunk_size", [7, 100, 1000])
def test_fast_paths_with_chunks_void_clamp_and_labels(chunk_size, device, monkeypatch):
    for case in ("c14", "c105", "c14_b2", "ties"):
        x = CASES[case]().to(device)
        for kwargs in ({"pruning_prob": "auto", "unassigned_policy": "void", "label_dtype": torch.uint8},
                       {"pruning_prob": 0.5, "smooth": 1.0, "label_dtype": torch.float32},
                       {"pruning_prob": "auto-independent", "metric": "iou"}):
            fast, ref = _decide_both(monkeypatch, x, chunk_size=chunk_size, **kwargs)
            assert torch.equal(fast, ref), (case, chunk_size, kwargs)
        over = (x * 1.004).clamp(max=1.004)  # spline overshoots: clamp=True
        fast, ref = _decide_both(monkeypatch, over, chunk_size=chunk_size, clamp=True, pruning_prob="auto")
        assert torch.equal(fast, ref)


def test_fast_paths_on_a_permuted_view(device, monkeypatch):
    x = CASES["c14"]().to(device)
    view = x.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)  # same values, another memory order
    assert not view.is_contiguous() and torch.equal(view, x)
    for kwargs in ({}, {"pruning_prob": "auto"}, {"output_mode": "multilabel", "pruning_prob": "auto"}):
        fast, ref = _decide_both(monkeypatch, view, **kwargs)
        assert torch.equal(fast, ref)
        assert torch.equal(fast, rankseg(x, **kwargs))


# ------------------------------------------------------------------------------------------ auto pruning
def _solve(x, metric, smooth, absence, chunk_size=None):
    flat, _ = flat_view(x)
    stats = row_statistics(flat, chunk_size=chunk_size)
    active = (stats.vmax > 0) & pruning.auto_candidates(stats, metric, smooth, absence)
    sol = rma.rma_solve(flat, stats, metric, smooth, active, chunk_size=chunk_size, band_summary=True)
    return flat, stats, sol


@pytest.mark.parametrize("case", sorted(CASES))
def test_solution_sums_are_those_of_the_mask(case, device):
    """The solver's ``n`` is the exact size of ``p > thr`` and its ``S`` the same sum up to float64 rounding."""
    x = CASES[case]().to(device)
    for metric, smooth in itertools.product(("dice", "iou"), (0.0, 1.0)):
        flat, stats, sol = _solve(x, metric, smooth, "mixed")
        S, n, _ = pruning.selection_summary(flat, sol.thr)
        assert bool(sol.known.all())
        assert torch.equal(sol.n.double(), n)
        torch.testing.assert_close(sol.S, S, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_log_absent_bounds_bracket_the_exact_sum(case, device):
    x = CASES[case]().to(device)
    x[..., 0] = torch.where(torch.arange(x.shape[1], device=device) == 1, 1.0, 0.0).reshape(1, -1, *[1] *
                                                                                          (x.ndim - 3))
    for metric in ("dice", "iou"):
        flat, stats, sol = _solve(x, metric, 0.0, "independent")
        exact = torch.log1p(-flat.double()).sum(-1)
        for band in (None, sol.band):
            low, high = pruning.log_absent_bounds(stats, band)
            assert bool((low <= exact * (1 - 1e-9) + 1e-12).all()), (low - exact).max()
            assert bool((exact <= high * (1 - 1e-9) + 1e-12).all()), (exact - high).max()
        assert bool(torch.isinf(exact[:, 1]).all())
        assert bool(torch.isinf(pruning.log_absent_bounds(stats)[0][:, 1]).all())


@pytest.mark.parametrize("absence", pruning.ABSENCE_MODELS)
def test_certified_pruning_equals_the_pass(absence, device, monkeypatch):
    """Row by row, the certified shortcut and the pass agree; and on these network-like volumes the shortcut
    decides (the pass is not needed)."""
    original = pruning.auto_active_from_thresholds
    calls: list[int] = []
    monkeypatch.setattr(pruning, "auto_active_from_thresholds", lambda *a, **k: calls.append(1) or original(*a, **k))
    shortcut_decided = 0
    for case, (metric, smooth) in itertools.product(sorted(CASES), (("dice", 0.0), ("iou", 0.0), ("dice", 1.0))):
        x = CASES[case]().to(device)
        flat, stats, sol = _solve(x, metric, smooth, absence)
        ref = original(flat, sol.thr, stats, metric, smooth, absence=absence)
        calls.clear()
        got = pruning.auto_active_from_solution(flat, sol.thr, stats, metric, smooth, sol.S, sol.n, sol.known,
                                                sol.band, absence=absence)
        assert torch.equal(got, ref), (case, metric, smooth)
        shortcut_decided += not calls
    assert shortcut_decided >= 15  # of 18 (18 when written): the shortcut does its job on network-like volumes


def test_certified_pruning_falls_back_when_it_cannot_decide(device, monkeypatch):
    """A row whose bracket straddles the comparison (or whose sums are unknown) sends every row to the pass."""
    x = CASES["c14"]().to(device)
    flat, stats, sol = _solve(x, "dice", 0.0, "mixed")
    ref = pruning.auto_active_from_thresholds(flat, sol.thr, stats, "dice", 0.0, absence="mixed")
    calls = []
    original = pruning.auto_active_from_thresholds
    monkeypatch.setattr(pruning, "auto_active_from_thresholds", lambda *a, **k: calls.append(1) or original(*a, **k))
    unknown = sol.known.clone()
    unknown[0, 1] = False
    assert torch.equal(pruning.auto_active_from_solution(flat, sol.thr, stats, "dice", 0.0, sol.S, sol.n, unknown,
                                                         sol.band, absence="mixed"), ref)
    assert len(calls) == 1
    # a row whose best value sits on the baseline (S nudged to the exact boundary) cannot be certified
    row = int(torch.nonzero(sol.n[0] > 0)[0])
    base = pruning._empty_baseline(stats, torch.log1p(-flat.double()).sum(-1), 0.0, "mixed")[0, row]
    S = sol.S.clone()
    S[0, row] = float(base) * (stats.mu[0, row] + sol.n[0, row] + 1.0) / 2.0  # Dice s=0: f = 2 S / (mu + n + 1)
    assert math.isclose(float(rma_score("dice", S, sol.n.double(), stats.mu, 0.0)[0, row]), float(base),
                        rel_tol=1e-12)
    pruning.auto_active_from_solution(flat, sol.thr, stats, "dice", 0.0, S, sol.n, sol.known, sol.band,
                                      absence="mixed")
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ band pass
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [None, 9, 300])
def test_band_pass_with_known_sums_extracts_the_same_band(case, chunk_size, device):
    x = CASES[case]().to(device)
    flat, _ = flat_view(x)
    stats = row_statistics(flat, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(0)
    low = (torch.rand(flat.shape[:2], generator=g, dtype=torch.float64) * 0.4).to(device)
    low[..., ::3] = 0.5  # closed rows (lo = hi), as pruned rows are
    high = torch.full_like(low, 0.5)
    full = rma.band_select(flat, low, high, chunk_size=chunk_size)
    fast = rma.band_select(flat, low, high, chunk_size=chunk_size, above=(stats.s_half, stats.n_half))
    for a, b in zip(full, fast, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for cap in (0, 5, 200):  # the switch to sums mid-pass
        full = rma.band_select(flat, low, high, chunk_size=chunk_size, cap=cap)
        fast = rma.band_select(flat, low, high, chunk_size=chunk_size, cap=cap, above=(stats.s_half, stats.n_half))
        for a, b in zip(full, fast, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_statistics_sums_above_half_are_the_direct_sums(device):
    for case, dtype, chunk_size in itertools.product(("c14", "ties", "c105"), (torch.float32, torch.float16,
                                                                                torch.bfloat16), (None, 11)):
        flat, _ = flat_view(CASES[case]().to(device=device, dtype=dtype))
        stats = row_statistics(flat, chunk_size=chunk_size)
        s_half = torch.zeros_like(stats.mu)
        n_half = torch.zeros_like(stats.n_half)
        for _, _, chunk in iter_chunks(flat, chunk_size=chunk_size):
            above = chunk > 0.5
            s_half += (chunk * above).sum(-1, dtype=torch.float64)
            n_half += torch.count_nonzero(above, dim=-1)
        assert torch.equal(stats.s_half, s_half) and torch.equal(stats.n_half, n_half)


# ------------------------------------------------------------------------------------------ labelling
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("policy", ["max_score", "void"])
def test_one_pass_labelling_equals_the_two_pass_labelling(case, policy, device, monkeypatch):
    x = CASES[case]().to(device)
    flat, _ = flat_view(x)
    for chunk_size, pp, metric, smooth in itertools.product((None, 13), (0.5, "auto"), ("dice", "iou"), (0.0, 1.0)):
        opts = RankSEGOptions(pruning_prob=pp, metric=metric, smooth=smooth, chunk_size=chunk_size)
        stats = row_statistics(flat, chunk_size=chunk_size)
        active = stats.vmax > 0.5 if pp == 0.5 else stats.vmax > 0
        thr = rma.rma_thresholds(flat, stats, metric, smooth, active, chunk_size=chunk_size)
        args = (flat, thr, stats, metric, smooth, active, policy, 255)
        one = multiclass.assign(*args, chunk_size=chunk_size, out_dtype=torch.int16)
        for cap in (0, 3):  # everything, or all but the first few voxels, through the second pass
            with monkeypatch.context() as m:
                m.setattr(multiclass, "_pending_cap", lambda batch, n_vox, cap=cap: cap)
                two = multiclass.assign(*args, chunk_size=chunk_size, out_dtype=torch.int16)
            assert torch.equal(one, two), (case, policy, opts, cap)


@pytest.mark.parametrize("policy", ["max_score", "void"])
def test_labelling_with_thresholds_the_activity_does_not_explain(policy, device, monkeypatch):
    """``assign`` is public: finite thresholds on inactive classes, a sample with no active class, ties and many
    classes.  One pass, the second pass and the unrestricted increments all give the oracle's labels."""
    g = torch.Generator().manual_seed(9)
    for num_classes, n_vox, seed in ((5, 300, 0), (40, 200, 1), (300, 120, 2)):
        probs = torch.softmax(torch.randn((2, num_classes, n_vox), generator=g) * 2, 1)
        if seed == 0:
            probs = (probs * 8).round() / 8  # ties: the lower class index must win
        thr = torch.rand((2, num_classes), generator=g, dtype=torch.float64) * 0.6
        thr[torch.rand((2, num_classes), generator=g) < 0.5] = float("inf")
        active = torch.rand((2, num_classes), generator=g) < 0.3
        active[1] = False  # no active class: unselected voxels fall back to every class
        flat = probs.to(device)
        stats = row_statistics(flat)
        expected = torch.from_numpy(np.stack([
            multiclass_from_masks(probs[b].double().numpy(), (probs[b].double() > thr[b, :, None]).numpy(),
                                  active[b].numpy(), "dice", 0.0, policy) for b in range(2)]))
        results = [multiclass.assign(flat, thr.to(device), stats, "dice", 0.0, active.to(device), policy)]
        with monkeypatch.context() as m:
            m.setattr(multiclass, "_pending_cap", lambda batch, n: 0)
            results.append(multiclass.assign(flat, thr.to(device), stats, "dice", 0.0, active.to(device), policy))
            m.setattr(multiclass._Resolver, "restrict", False)
            results.append(multiclass.assign(flat, thr.to(device), stats, "dice", 0.0, active.to(device), policy))
        for out in results:
            assert torch.equal(out.cpu(), expected), (num_classes, policy)


@pytest.mark.parametrize("batch,num_classes", [(1, 105), (2, 105), (3, 20), (2, 300)])
def test_selection_on_the_rows_that_reach_their_threshold(batch, num_classes, device):
    """Counting and labelling only the rows whose chunk maximum exceeds their threshold gives the full selection's
    ``k`` and labels everywhere (not only where ``k == 1``)."""
    g = torch.Generator().manual_seed(batch * 1000 + num_classes)
    ids = multiclass._class_ids(num_classes, torch.device(device))
    for _ in range(10):
        chunk = torch.softmax(torch.randn((batch, num_classes, 300), generator=g) * 3, 1).to(device)
        thr = (torch.rand((batch, num_classes, 1), generator=g) * 0.5 + 0.2).to(device)
        thr[torch.rand((batch, num_classes, 1), generator=g) < 0.6] = float("inf")
        _, k, labels = multiclass._selection(chunk, thr, ids)
        for row_max in (chunk.amax(-1), None):
            k2, labels2 = multiclass._selection_count_labels(chunk, thr, ids, row_max)
            assert torch.equal(k, k2) and torch.equal(labels, labels2)


def test_statistics_keep_the_chunk_maxima_of_their_own_chunks(device):
    flat, _ = flat_view(CASES["c14_b2"]().to(device))
    for chunk_size, clamp in ((None, False), (50, True)):
        stats = row_statistics(flat, chunk_size=chunk_size, clamp=clamp)
        chunks = [c for _, _, c in iter_chunks(flat, chunk_size=chunk_size, clamp=clamp)]
        assert torch.equal(stats.chunk_max, torch.stack([c.amax(-1) for c in chunks], -1))
        assert stats.maxima_for(flat, torch.device(device), chunk_size) is stats.chunk_max
        assert stats.maxima_for(flat, torch.device(device), 7) is None  # other chunks: not used


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_code_paths_of_a_gpu_give_the_same_decisions(case, monkeypatch):
    """A GPU runs the full-volume ops (no row selection: it would cost a host sync per chunk).  Switched off on the
    CPU, those code paths give the same decisions as the row-selective ones."""
    from rankseg_monai.solvers import _stream

    x = CASES[case]()
    kwargs_list = [{}, {"pruning_prob": "auto"}, {"pruning_prob": "auto", "metric": "iou", "smooth": 1.0},
                   {"pruning_prob": 0.0, "output_mode": "multilabel"}, {"pruning_prob": "auto", "chunk_size": 29,
                                                                        "unassigned_policy": "void"}]
    selective = [rankseg(x, **kw) for kw in kwargs_list]
    monkeypatch.setattr(_stream, "row_selective", lambda device: False)
    for kw, expected in zip(kwargs_list, selective, strict=True):
        assert torch.equal(rankseg(x, **kw), expected), kw
