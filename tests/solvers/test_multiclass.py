"""Non-overlapping labels (rankseg_monai/solvers/multiclass.py): ``assign`` against the slow exact-increment
oracle ``oracle.multiclass_from_masks`` on random states, and ``argmax_labels`` against ``torch.argmax``.

Thresholds are drawn at random per (batch, class), so every kind of voxel occurs: selected by one class, by
several (overlaps), by none (gaps), classes that select nothing (``+inf``) and inactive (pruned) classes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import random_thresholds_state
from oracle import multiclass_from_masks

from rankseg_monai.solvers._stream import row_statistics
from rankseg_monai.solvers.multiclass import argmax_labels, assign

METRIC_SMOOTH = [("dice", 0.0), ("dice", 0.5), ("iou", 0.0), ("iou", 2.0)]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.float64, torch.float32,
                torch.float16, torch.bfloat16]
VOID = 99  # fits every label dtype above exactly


def _oracle(flat, thr, active, metric, smooth, policy, void_index=VOID):
    p64 = flat.double().cpu().numpy()
    masks = (flat.double() > thr.double()[..., None]).cpu().numpy()
    return np.stack([multiclass_from_masks(p64[b], masks[b], active[b].cpu().numpy(), metric, smooth, policy,
                                           void_index) for b in range(flat.shape[0])])


@pytest.mark.parametrize("metric,smooth", METRIC_SMOOTH)
@pytest.mark.parametrize("policy", ["max_score", "void"])
def test_assign_equals_the_oracle_on_random_states(metric, smooth, policy, device):
    kinds = {"overlap": 0, "gap": 0, "single": 0}
    for seed in range(6):
        flat, thr, active = random_thresholds_state(seed, ties=seed % 2 == 1)  # ties: the lower index must win
        if seed == 4:
            active[1] = False  # a sample without active class: gaps fall back to every class
        flat_d, thr_d = flat.to(device), thr.to(device)
        out = assign(flat_d, thr_d, row_statistics(flat_d), metric, smooth, active.to(device), policy, VOID)
        assert out.dtype == torch.int64 and out.device == flat_d.device and out.shape == (2, 60)
        np.testing.assert_array_equal(out.cpu().numpy(), _oracle(flat, thr, active, metric, smooth, policy))
        k = (flat > thr[..., None]).sum(1)
        kinds["overlap"] += int((k > 1).sum())
        kinds["gap"] += int((k == 0).sum())
        kinds["single"] += int((k == 1).sum())
    assert min(kinds.values()) > 20, kinds  # every case occurred


def test_ties_go_to_the_lowest_class_index(device):
    """Two identical classes: equal increments everywhere, so class 0 wins every contested voxel, never class 3."""
    flat, _, _ = random_thresholds_state(7, ties=True)
    thr = torch.full((2, 4), 0.2, dtype=torch.float64)
    active = torch.ones(2, 4, dtype=torch.bool)
    out = assign(flat.to(device), thr.to(device), row_statistics(flat.to(device)), "dice", 0.0, active.to(device))
    assert not bool((out == 3).any()) and bool((out == 0).any())
    np.testing.assert_array_equal(out.cpu().numpy(), _oracle(flat, thr, active, "dice", 0.0, "max_score"))


@pytest.mark.parametrize("policy", ["max_score", "void"])
def test_no_selection_at_all(policy, device):
    """Every threshold +inf: max_score gives each voxel the active class with the largest increment (all classes
    when none is active), void labels every voxel void_index."""
    flat, _, active = random_thresholds_state(8)
    thr = torch.full((2, 4), float("inf"), dtype=torch.float64)
    active[0] = False
    out = assign(flat.to(device), thr.to(device), row_statistics(flat.to(device)), "dice", 0.0, active.to(device),
                 policy, VOID).cpu()
    if policy == "void":
        assert bool((out == VOID).all())
    else:
        assert set(out[1].tolist()) <= set(torch.nonzero(active[1]).flatten().tolist())
    np.testing.assert_array_equal(out.numpy(), _oracle(flat, thr, active, "dice", 0.0, policy))


@pytest.mark.parametrize("void_index", [-1, 255, 70000])
def test_void_index_values(void_index):
    flat, thr, active = random_thresholds_state(9)
    out = assign(flat, thr, row_statistics(flat), "iou", 0.0, active, "void", void_index)
    expect = _oracle(flat, thr, active, "iou", 0.0, "void", void_index)
    assert (expect == void_index).any()
    np.testing.assert_array_equal(out.numpy(), expect)


@pytest.mark.parametrize("out_dtype", LABEL_DTYPES, ids=str)
def test_every_label_dtype_gives_the_int64_labels(out_dtype, device):
    flat, thr, active = random_thresholds_state(10)
    flat_d = flat.to(device)
    ref = assign(flat, thr, row_statistics(flat), "dice", 0.5, active, "void", VOID)
    out = assign(flat_d, thr.to(device), row_statistics(flat_d), "dice", 0.5, active.to(device), "void", VOID,
                 out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.device == flat_d.device
    assert torch.equal(out.cpu().long(), ref)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunk_size_and_streaming_do_not_change_the_labels(chunk_size, device):
    """Chunks of any size, and a CPU volume streamed through the compute device, give the same labels."""
    flat, thr, active = random_thresholds_state(11, n=200)
    ref = assign(flat, thr, row_statistics(flat), "dice", 0.0, active)
    for on in ("cpu", device):  # data on the CPU or on the device, computed on the device
        x = flat.to(on)
        out = assign(x, thr.to(on), row_statistics(x), "dice", 0.0, active.to(on), device=torch.device(device),
                     chunk_size=chunk_size)
        assert out.device == x.device and torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_probabilities(dtype, device):
    """fp16/bf16/fp32 values are compared with thresholds in their own dtype and scored in float64: the labels are
    the oracle's on the same values."""
    flat, thr, active = random_thresholds_state(12, dtype=dtype)
    assert flat.dtype == dtype and thr.dtype == dtype
    for metric, smooth in METRIC_SMOOTH:
        flat_d = flat.to(device)
        out = assign(flat_d, thr.to(device), row_statistics(flat_d), metric, smooth, active.to(device))
        np.testing.assert_array_equal(out.cpu().numpy(), _oracle(flat, thr, active, metric, smooth, "max_score"))


def test_many_classes_use_wider_class_ids():
    """More than 256 classes (uint8 class ids would wrap): the labels still come from the right classes."""
    rng = np.random.default_rng(13)
    flat = torch.from_numpy(rng.dirichlet(np.full(300, 0.05), size=(1, 40)).transpose(0, 2, 1).copy())
    thr = torch.full((1, 300), 0.2, dtype=torch.float64)
    active = torch.ones(1, 300, dtype=torch.bool)
    out = assign(flat, thr, row_statistics(flat), "dice", 0.0, active)
    assert int(out.max()) >= 256
    np.testing.assert_array_equal(out.numpy(), _oracle(flat, thr, active, "dice", 0.0, "max_score"))


# ---------------------------------------------------------------------------------------------- argmax_labels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_argmax_labels_equals_torch_argmax_first_maximum_wins(dtype, chunk_size, device):
    rng = np.random.default_rng(14)
    x = torch.from_numpy(np.round(rng.uniform(size=(3, 5, 70)) * 4) / 4).to(dtype)  # many ties
    x[0, :, :10] = 0.5  # all classes equal: class 0
    expect = torch.from_numpy(np.argmax(x.float().numpy(), axis=1))  # numpy: the first maximum
    assert torch.equal(torch.argmax(x.float(), 1), expect)
    for on in ("cpu", device):
        got = argmax_labels(x.to(on), device=torch.device(device), chunk_size=chunk_size)
        assert got.dtype == torch.int64 and got.device == x.to(on).device
        assert torch.equal(got.cpu(), expect)
    assert bool((expect[0, :10] == 0).all())


@pytest.mark.parametrize("out_dtype", [torch.uint8, torch.int16, torch.float32], ids=str)
def test_argmax_labels_output_dtype(out_dtype, device):
    x = torch.rand(2, 4, 33, generator=torch.Generator().manual_seed(15)).to(device)
    got = argmax_labels(x, out_dtype=out_dtype)
    assert got.dtype == out_dtype and torch.equal(got.long().cpu(), torch.argmax(x, 1).cpu())
