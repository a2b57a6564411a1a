"""RankSEG-RMA core: exactness against float64 oracles and brute force, parity with rankseg 0.0.8.

Tests that take the ``device`` fixture build their inputs on that device and compare with the CPU oracles (or
with rankseg 0.0.8 on the CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEVICES
from generators import random_rows, rma_inputs, softmax_probs
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import best_threshold_mask, brute_force_best, mask_rma_value, multiclass_from_masks

from rankseg_monai.functional import rankseg

METRIC_SMOOTH = [("dice", 0.0), ("dice", 1.0), ("dice", 0.1), ("iou", 0.0), ("iou", 1.0)]


def _multilabel(p: np.ndarray, device, **kwargs) -> np.ndarray:
    """Multilabel decision of one row ``p`` computed on ``device``, back as a numpy bool row."""
    x = torch.tensor(p, device=device)[None, None]
    return rankseg(x, output_mode="multilabel", **kwargs)[0, 0].cpu().numpy()


@pytest.mark.parametrize("metric,smooth", METRIC_SMOOTH)
def test_brute_force_small(metric, smooth, device):
    rng = np.random.default_rng(1)
    for p in random_rows(rng, 40):  # uniform, U-shaped, quantised (ties, exact 0 and 1), faint, beta
        out = _multilabel(p, device, metric=metric, smooth=smooth, pruning_prob=0.0)
        best = brute_force_best(p, metric, smooth)
        got = mask_rma_value(metric, p, out, smooth)
        assert got == pytest.approx(best, abs=1e-12, rel=1e-12), (p, out)
        if out.any():  # a threshold set: nothing left out that is >= the smallest selected value
            assert np.all(p[~out] < p[out].min())


def test_smooth_dice_not_quasi_concave_counterexample(device):
    p = torch.tensor([[[0.9, 0.36, 0.36]]], dtype=torch.float64, device=device)
    out = rankseg(p, smooth=1.0, output_mode="multilabel", pruning_prob=0.0)
    assert out.tolist() == [[[True, True, True]]]  # argmax tau = 3, not the first local stop tau = 1


def test_pruning_rule_is_strict(device):
    p = torch.full((1, 1, 100), 0.45, device=device)
    assert not rankseg(p, output_mode="multilabel").any()  # 0.0.8 rule: max <= pruning_prob -> empty
    assert rankseg(p, output_mode="multilabel", pruning_prob=0.0).all()  # the exact optimum takes all 100
    p = torch.full((1, 1, 10), 0.5, device=device)
    assert not rankseg(p, output_mode="multilabel", pruning_prob=0.5).any()


@pytest.mark.parametrize("device", DEVICES)  # hypothesis cannot take a function-scoped fixture
@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.3, 0.36, 0.45, 0.5, 0.55, 0.7, 0.9, 1.0]), min_size=1,
                  max_size=60)
    | st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=60),
    ms=st.sampled_from(METRIC_SMOOTH),
)
def test_property_matches_sorted_oracle(device, data, ms):
    metric, smooth = ms
    p = np.array(data, dtype=np.float64)
    out = _multilabel(p, device, metric=metric, smooth=smooth, pruning_prob=0.0)
    expect = best_threshold_mask(p, metric, smooth)
    assert mask_rma_value(metric, p, out, smooth) >= mask_rma_value(metric, p, expect, smooth) - 1e-13
    np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("name,probs", list(rma_inputs()))
@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("dice", 1.0)])
def test_multilabel_against_reference(name, probs, metric, smooth, device):
    """Masks equal rankseg 0.0.8 except where its float32 drift / tie splitting differs; then ours scores >=."""
    from rankseg.functional import rankseg as ref_rankseg

    ours = rankseg(probs.to(device), metric=metric, smooth=smooth, output_mode="multilabel").cpu()
    ref = ref_rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel")
    assert ours.shape == ref.shape and ours.dtype == torch.bool
    p64 = probs.double().reshape(probs.shape[0], probs.shape[1], -1).numpy()
    o, r = ours.reshape(p64.shape).numpy(), ref.reshape(p64.shape).numpy()
    differing = exact_rows = 0
    for b in range(p64.shape[0]):
        for c in range(p64.shape[1]):
            if (o[b, c] != r[b, c]).any():
                differing += 1
                assert (mask_rma_value(metric, p64[b, c], o[b, c], smooth)
                        >= mask_rma_value(metric, p64[b, c], r[b, c], smooth) - 1e-12)
            # ours is always the exact float64 optimum over threshold sets (rows kept by the 0.5 pruning)
            if p64[b, c].max() > 0.5:
                np.testing.assert_array_equal(o[b, c], best_threshold_mask(p64[b, c], metric, smooth))
                exact_rows += 1
            else:
                assert not o[b, c].any()  # pruned
    assert exact_rows > 0 or name == "zeros"  # the oracle comparison ran
    # drift moves tau by a few voxels at most: the masks agree almost everywhere
    assert (o != r).mean() <= 5e-3, (differing, (o != r).sum())


@pytest.mark.parametrize("name,probs", [(n, p) for n, p in rma_inputs() if p.shape[1] > 1])
@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("dice", 1.0)])
def test_multiclass_against_reference(name, probs, metric, smooth, device):
    """In float64 the reference has no float32 drift: the per-class masks must be 0.0.8's, and the labels built
    from them agree on all but a tiny fraction of voxels (increments computed in another order)."""
    from rankseg.functional import rankseg as ref_rankseg

    p = probs.double()
    ours = rankseg(p.to(device), metric=metric, smooth=smooth).cpu()
    ref = ref_rankseg(p, metric=metric, smooth=smooth)
    assert ours.dtype == torch.int64 and ours.shape == ref.shape
    ours_ml = rankseg(p.to(device), metric=metric, smooth=smooth, output_mode="multilabel").cpu()
    ref_ml = ref_rankseg(p, metric=metric, smooth=smooth, output_mode="multilabel")
    # asserted, not assumed: if the masks ever diverged the label comparison below must not go quiet
    assert torch.equal(ours_ml, ref_ml), int((ours_ml != ref_ml).sum())
    mismatch = (ours != ref).double().mean().item()
    assert mismatch <= 1e-3, mismatch


@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("dice", 0.5), ("iou", 2.0)])
@pytest.mark.parametrize("policy", ["max_score", "void"])
def test_multiclass_against_oracle(metric, smooth, policy, device):
    probs = softmax_probs((2, 4, 9, 9), seed=3, logits_dtype=torch.float64)
    probs[1, 2] *= 0.2  # a class that is pruned in sample 1
    kwargs = dict(metric=metric, smooth=smooth, unassigned_policy=policy)
    if policy == "void":
        kwargs["void_index"] = 99
    ours = rankseg(probs.to(device), **kwargs).cpu().reshape(2, -1).numpy()
    masks = rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel").reshape(2, 4, -1).numpy()
    flat = probs.reshape(2, 4, -1).numpy()
    for b in range(2):
        active = flat[b].max(1) > 0.5
        expect = multiclass_from_masks(flat[b], masks[b], active, metric, smooth, policy, 99)
        np.testing.assert_array_equal(ours[b], expect)


def test_all_pruned_sample_falls_back_to_all_classes(device):
    from rankseg.functional import rankseg as ref_rankseg

    probs = torch.full((1, 3, 4, 4), 1 / 3, dtype=torch.float64)
    probs[0, 1, 0, 0] = 0.4
    probs[0, 0, 0, 0] = 0.3
    out = rankseg(probs.to(device)).cpu()
    assert torch.equal(out, ref_rankseg(probs))


def test_layout_independent(device):
    base = softmax_probs((1, 3, 64, 64, 8), seed=11, device=device)
    strided = base.permute(0, 1, 4, 3, 2)
    contiguous = strided.contiguous()
    for metric in ("dice", "iou"):
        a = rankseg(strided, metric=metric, output_mode="multilabel")
        b = rankseg(contiguous, metric=metric, output_mode="multilabel")
        assert torch.equal(a, b)
        assert torch.equal(rankseg(strided, metric=metric), rankseg(contiguous, metric=metric))


@pytest.mark.parametrize("chunk", [7, 100, 1000, None])
def test_chunk_size_does_not_change_result(chunk, device):
    probs = softmax_probs((2, 3, 17, 13), seed=5)
    on_device = probs.to(device)
    for metric, smooth in METRIC_SMOOTH:
        ref = rankseg(probs, metric=metric, smooth=smooth)
        assert torch.equal(rankseg(on_device, metric=metric, smooth=smooth, chunk_size=chunk).cpu(), ref)
        ref_ml = rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel")
        got_ml = rankseg(on_device, metric=metric, smooth=smooth, output_mode="multilabel", chunk_size=chunk)
        assert torch.equal(got_ml.cpu(), ref_ml)


def test_float32_accumulation_is_exact_at_scale(device):
    """2^22 voxels: the float64 optimum, where float32 sums of mu drift."""
    g = torch.Generator().manual_seed(0)
    p = (torch.rand((1, 1, 1 << 22), generator=g) * 0.7).float()
    p[0, 0, :4000] = 0.95
    out = rankseg(p.to(device), output_mode="multilabel")[0, 0].cpu().numpy()
    expect = best_threshold_mask(p[0, 0].double().numpy(), "dice", 0.0)
    np.testing.assert_array_equal(out, expect)


def test_half_precision_not_upcast_and_matches_float64_of_same_values(device):
    p = softmax_probs((1, 3, 32, 32, 8), seed=2, scale=3.0, dtype=torch.float16, device=device)
    for metric, smooth in METRIC_SMOOTH:
        a = rankseg(p, metric=metric, smooth=smooth, output_mode="multilabel")
        b = rankseg(p.double().cpu(), metric=metric, smooth=smooth, output_mode="multilabel")
        assert torch.equal(a.cpu(), b)


def test_numpy_in_numpy_out_and_batch_zero():
    p = np.random.default_rng(0).dirichlet([1, 1, 1], size=(2, 5, 5)).transpose(0, 3, 1, 2)
    out = rankseg(p)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == (2, 5, 5)
    empty = rankseg(torch.zeros((0, 3, 4, 4)))
    assert empty.shape == (0, 4, 4)
    assert rankseg(torch.zeros((0, 3, 4, 4)), output_mode="multilabel").shape == (0, 3, 4, 4)


def test_requires_grad_input(device):
    logits = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
    p = torch.softmax(logits, 1)
    out = rankseg(p)
    assert out.dtype == torch.int64 and not out.requires_grad and out.device == p.device
    assert torch.equal(out.cpu(), rankseg(p.detach().cpu()))


@pytest.mark.parametrize("metric", ["dice", "iou"])
def test_diffuse_rows_bounded_band_path(metric, device):
    """Nearly uniform probabilities put almost every voxel in the band: the capped, full-data Dinkelbach path."""
    probs = softmax_probs((1, 2, 1 << 20), seed=4, scale=0.3)
    out = rankseg(probs.to(device), metric=metric, output_mode="multilabel", pruning_prob=0.0)[0].cpu().numpy()
    for c in range(2):
        np.testing.assert_array_equal(out[c], best_threshold_mask(probs[0, c].double().numpy(), metric, 0.0))
