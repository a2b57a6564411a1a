"""RankSEG-RMA core: exactness against float64 oracles and brute force, parity with rankseg 0.0.8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import best_threshold_mask, brute_force_best, multiclass_from_masks, rma_value

from rankseg_monai.functional import rankseg

METRIC_SMOOTH = [("dice", 0.0), ("dice", 1.0), ("dice", 0.1), ("iou", 0.0), ("iou", 1.0)]


def _value(metric, p, mask, s):
    p = np.asarray(p, dtype=np.float64).ravel()
    m = np.asarray(mask).ravel().astype(bool)
    return rma_value(metric, float(p[m].sum()), int(m.sum()), float(p.sum()), s)


@pytest.mark.parametrize("metric,smooth", METRIC_SMOOTH)
def test_brute_force_small(metric, smooth):
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(1, 11))
        kind = trial % 4
        if kind == 0:
            p = rng.uniform(size=n)
        elif kind == 1:
            p = rng.beta(0.5, 0.5, size=n)
        elif kind == 2:
            p = rng.choice([0.1, 0.36, 0.5, 0.9], size=n)  # ties
        else:
            p = rng.uniform(0, 0.3, size=n)
        out = rankseg(torch.tensor(p)[None, None], metric=metric, smooth=smooth, output_mode="multilabel",
                      pruning_prob=0.0)[0, 0].numpy()
        best = brute_force_best(p, metric, smooth)
        got = _value(metric, p, out, smooth)
        assert got == pytest.approx(best, abs=1e-12, rel=1e-12), (p, out)
        if out.any():  # a threshold set: nothing left out that is >= the smallest selected value
            assert np.all(p[~out] < p[out].min())


def test_smooth_dice_not_quasi_concave_counterexample():
    p = torch.tensor([[[0.9, 0.36, 0.36]]], dtype=torch.float64)
    out = rankseg(p, smooth=1.0, output_mode="multilabel", pruning_prob=0.0)
    assert out.tolist() == [[[True, True, True]]]  # argmax tau = 3, not the first local stop tau = 1


def test_pruning_rule_is_strict():
    p = torch.full((1, 1, 100), 0.45)
    assert not rankseg(p, output_mode="multilabel").any()  # 0.0.8 rule: max <= pruning_prob -> empty
    assert rankseg(p, output_mode="multilabel", pruning_prob=0.0).all()  # the exact optimum takes all 100
    p = torch.full((1, 1, 10), 0.5)
    assert not rankseg(p, output_mode="multilabel", pruning_prob=0.5).any()


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.3, 0.36, 0.45, 0.5, 0.55, 0.7, 0.9, 1.0]), min_size=1,
                  max_size=60)
    | st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=60),
    ms=st.sampled_from(METRIC_SMOOTH),
)
def test_property_matches_sorted_oracle(data, ms):
    metric, smooth = ms
    p = np.array(data, dtype=np.float64)
    out = rankseg(torch.tensor(p)[None, None], metric=metric, smooth=smooth, output_mode="multilabel",
                  pruning_prob=0.0)[0, 0].numpy()
    expect = best_threshold_mask(p, metric, smooth)
    assert _value(metric, p, out, smooth) >= _value(metric, p, expect, smooth) - 1e-13
    np.testing.assert_array_equal(out, expect)


def _blobs(shape, rng, classes):
    """Realistic blob-shaped softmax volume: smooth random logits per class."""
    logits = rng.normal(size=(classes, *shape)).astype(np.float32)
    x = torch.from_numpy(logits)[None]
    k = 5
    pad = [k // 2] * (2 * len(shape))
    for _ in range(2):
        x = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(x, pad, mode="replicate"), k, stride=1) \
            if len(shape) == 3 else \
            torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, pad, mode="replicate"), k, stride=1)
    return torch.softmax(x * 12.0, dim=1)


def _inputs():
    rng = np.random.default_rng(7)
    g = torch.Generator().manual_seed(7)
    yield "uniform", torch.rand((2, 3, 20, 20), generator=g)
    yield "beta", torch.from_numpy(rng.beta(0.3, 0.3, size=(1, 2, 30, 30)).astype(np.float32))
    yield "softmax3d", torch.softmax(torch.randn((1, 3, 12, 12, 10), generator=g) * 3, 1)
    yield "blobs3d", _blobs((24, 24, 16), rng, 3)
    yield "blobs2d_c14", _blobs((40, 40), rng, 14)
    yield "near_onehot", torch.softmax(torch.randn((2, 3, 16, 16), generator=g) * 30, 1)
    yield "fp16", torch.softmax(torch.randn((1, 3, 16, 16, 8), generator=g) * 3, 1).half()
    yield "bf16", torch.softmax(torch.randn((1, 3, 16, 16, 8), generator=g) * 3, 1).bfloat16()
    yield "zeros", torch.zeros((1, 2, 8, 8))
    yield "saturated", torch.cat([torch.ones((1, 1, 8, 8)), torch.zeros((1, 1, 8, 8))], 1)
    yield "c1", torch.rand((3, 1, 15, 15), generator=g)
    yield "c2", torch.softmax(torch.randn((2, 2, 15, 15), generator=g), 1)


@pytest.mark.parametrize("name,probs", list(_inputs()))
@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("dice", 1.0)])
def test_multilabel_against_reference(name, probs, metric, smooth):
    """Masks equal rankseg 0.0.8 except where its float32 drift / tie splitting differs; then ours scores >=."""
    from rankseg.functional import rankseg as ref_rankseg

    ours = rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel")
    ref = ref_rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel")
    assert ours.shape == ref.shape and ours.dtype == torch.bool
    p64 = probs.double().reshape(probs.shape[0], probs.shape[1], -1).numpy()
    o, r = ours.reshape(p64.shape).numpy(), ref.reshape(p64.shape).numpy()
    differing = 0
    for b in range(p64.shape[0]):
        for c in range(p64.shape[1]):
            if (o[b, c] != r[b, c]).any():
                differing += 1
                assert _value(metric, p64[b, c], o[b, c], smooth) >= _value(metric, p64[b, c], r[b, c], smooth) - 1e-12
            # ours is always the exact float64 optimum over threshold sets
            if p64[b, c].max() > 0.5:
                np.testing.assert_array_equal(o[b, c], best_threshold_mask(p64[b, c], metric, smooth))
    # drift moves tau by a few voxels at most: the masks agree almost everywhere
    assert (o != r).mean() <= 5e-3, (differing, (o != r).sum())


@pytest.mark.parametrize("name,probs", [(n, p) for n, p in _inputs() if p.shape[1] > 1])
@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("dice", 1.0)])
def test_multiclass_against_reference(name, probs, metric, smooth):
    from rankseg.functional import rankseg as ref_rankseg

    p = probs.double()  # float64: the reference then has no float32 drift, decisions must agree
    ours = rankseg(p, metric=metric, smooth=smooth)
    ref = ref_rankseg(p, metric=metric, smooth=smooth)
    assert ours.dtype == torch.int64 and ours.shape == ref.shape
    ours_ml = rankseg(p, metric=metric, smooth=smooth, output_mode="multilabel")
    ref_ml = ref_rankseg(p, metric=metric, smooth=smooth, output_mode="multilabel")
    if torch.equal(ours_ml, ref_ml):
        mismatch = (ours != ref).double().mean().item()
        assert mismatch <= 1e-3, mismatch


@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("dice", 0.5), ("iou", 2.0)])
@pytest.mark.parametrize("policy", ["max_score", "void"])
def test_multiclass_against_oracle(metric, smooth, policy):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn((2, 4, 9, 9), generator=g, dtype=torch.float64) * 2, 1)
    probs[1, 2] *= 0.2  # a class that is pruned in sample 1
    kwargs = dict(metric=metric, smooth=smooth, unassigned_policy=policy)
    if policy == "void":
        kwargs["void_index"] = 99
    ours = rankseg(probs, **kwargs).reshape(2, -1).numpy()
    masks = rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel").reshape(2, 4, -1).numpy()
    flat = probs.reshape(2, 4, -1).numpy()
    for b in range(2):
        active = flat[b].max(1) > 0.5
        expect = multiclass_from_masks(flat[b], masks[b], active, metric, smooth, policy, 99)
        np.testing.assert_array_equal(ours[b], expect)


def test_all_pruned_sample_falls_back_to_all_classes():
    probs = torch.full((1, 3, 4, 4), 1 / 3, dtype=torch.float64)
    probs[0, 1, 0, 0] = 0.4
    probs[0, 0, 0, 0] = 0.3
    out = rankseg(probs)
    from rankseg.functional import rankseg as ref_rankseg

    assert torch.equal(out, ref_rankseg(probs))


def test_layout_independent():
    g = torch.Generator().manual_seed(11)
    base = torch.softmax(torch.randn((1, 3, 64, 64, 8), generator=g) * 2, 1)
    strided = base.permute(0, 1, 4, 3, 2)
    contiguous = strided.contiguous()
    for metric in ("dice", "iou"):
        a = rankseg(strided, metric=metric, output_mode="multilabel")
        b = rankseg(contiguous, metric=metric, output_mode="multilabel")
        assert torch.equal(a, b)
        assert torch.equal(rankseg(strided, metric=metric), rankseg(contiguous, metric=metric))


@pytest.mark.parametrize("chunk", [7, 100, 1000, None])
def test_chunk_size_does_not_change_result(chunk):
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn((2, 3, 17, 13), generator=g) * 2, 1)
    for metric, smooth in METRIC_SMOOTH:
        ref = rankseg(probs, metric=metric, smooth=smooth)
        assert torch.equal(rankseg(probs, metric=metric, smooth=smooth, chunk_size=chunk), ref)
        ref_ml = rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel")
        got_ml = rankseg(probs, metric=metric, smooth=smooth, output_mode="multilabel", chunk_size=chunk)
        assert torch.equal(got_ml, ref_ml)


def test_float32_accumulation_is_exact_at_scale():
    """2^22 voxels: the float64 optimum, where float32 sums of mu drift."""
    g = torch.Generator().manual_seed(0)
    p = (torch.rand((1, 1, 1 << 22), generator=g) * 0.7).float()
    p[0, 0, :4000] = 0.95
    out = rankseg(p, output_mode="multilabel")[0, 0].numpy()
    expect = best_threshold_mask(p[0, 0].double().numpy(), "dice", 0.0)
    np.testing.assert_array_equal(out, expect)


def test_half_precision_not_upcast_and_matches_float64_of_same_values():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn((1, 3, 32, 32, 8), generator=g) * 3, 1).half()
    for metric, smooth in METRIC_SMOOTH:
        a = rankseg(p, metric=metric, smooth=smooth, output_mode="multilabel")
        b = rankseg(p.double(), metric=metric, smooth=smooth, output_mode="multilabel")
        assert torch.equal(a, b)


def test_numpy_in_numpy_out_and_batch_zero():
    p = np.random.default_rng(0).dirichlet([1, 1, 1], size=(2, 5, 5)).transpose(0, 3, 1, 2)
    out = rankseg(p)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == (2, 5, 5)
    empty = rankseg(torch.zeros((0, 3, 4, 4)))
    assert empty.shape == (0, 4, 4)
    assert rankseg(torch.zeros((0, 3, 4, 4)), output_mode="multilabel").shape == (0, 3, 4, 4)


def test_requires_grad_input():
    p = torch.softmax(torch.randn(1, 3, 8, 8, requires_grad=True), 1)
    out = rankseg(p)
    assert out.dtype == torch.int64 and not out.requires_grad


@pytest.mark.parametrize("metric", ["dice", "iou"])
def test_diffuse_rows_bounded_band_path(metric):
    """Nearly uniform probabilities put almost every voxel in the band: the capped, full-data Dinkelbach path."""
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn((1, 2, 1 << 20), generator=g) * 0.3, 1)
    out = rankseg(probs, metric=metric, output_mode="multilabel", pruning_prob=0.0)[0].numpy()
    for c in range(2):
        np.testing.assert_array_equal(out[c], best_threshold_mask(probs[0, c].double().numpy(), metric, 0.0))
