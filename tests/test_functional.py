"""Tests of the entry's own options (rankseg_monai/functional.py): the label dtype of multiclass output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankseg_monai.functional import check_label_dtype, label_range, rankseg, smallest_label_dtype


def _probs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * 2.0, dim=1)


LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16, torch.float32,
                torch.float64, "uint8", np.float32, np.dtype("int16")]


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_label_dtype_gives_the_int64_labels_in_that_dtype(label_dtype, kind):
    x = _probs((2, 5, 9, 8, 7), seed=1)
    expected = rankseg(x)
    assert expected.dtype == torch.int64
    want = check_label_dtype(label_dtype)
    if kind == "numpy" and want == torch.bfloat16:
        with pytest.raises(ValueError, match="numpy has no bfloat16"):
            rankseg(x.numpy(), label_dtype=label_dtype)
        return
    got = rankseg(x.numpy() if kind == "numpy" else x, label_dtype=label_dtype)
    if kind == "numpy":
        assert isinstance(got, np.ndarray) and got.dtype == torch.empty(0, dtype=want).numpy().dtype
        got = torch.from_numpy(got)
    assert got.dtype == want
    assert torch.equal(got.long(), expected)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.float32])
def test_label_dtype_with_void_argmax_guard_and_empty_batch(label_dtype):
    x = _probs((2, 4, 10, 10), seed=2)
    void = rankseg(x, unassigned_policy="void")
    assert torch.equal(rankseg(x, unassigned_policy="void", label_dtype=label_dtype).long(), void)
    arg = rankseg(x, metric="acc", solver="argmax")
    got = rankseg(x, metric="acc", solver="argmax", label_dtype=label_dtype)
    assert got.dtype == label_dtype and torch.equal(got.long(), arg) and torch.equal(arg, x.argmax(1))
    # the guard computes int64 labels internally and converts at the end
    fog = torch.full((1, 2, 400), 0.5)
    fog[:, 1, :40], fog[:, 0, :40] = 0.9, 0.1
    guarded = rankseg(fog, guard=True)
    got = rankseg(fog, guard=True, label_dtype=label_dtype)
    assert got.dtype == label_dtype and torch.equal(got.long(), guarded)
    empty = rankseg(x[:0], label_dtype=label_dtype)
    assert empty.shape == (0, 10, 10) and empty.dtype == label_dtype


def test_label_dtype_does_not_touch_bool_outputs():
    x = _probs((1, 3, 6, 6), seed=3)
    assert rankseg(x, output_mode="multilabel", label_dtype=torch.uint8).dtype == torch.bool
    assert rankseg(x[:, :1], metric="acc", solver="tr", output_mode="multilabel",
                   label_dtype=torch.float32).dtype == torch.bool


def test_label_dtype_that_cannot_hold_the_labels_names_the_fix():
    x = _probs((1, 3, 6, 6), seed=4)
    with pytest.raises(ValueError, match=r"cannot hold the label 255 exactly: use torch.int64"):
        rankseg(x, unassigned_policy="void", label_dtype=torch.int8)  # void_index 255 > 127
    with pytest.raises(ValueError, match=r"cannot hold the label -1 exactly"):
        rankseg(x, unassigned_policy="void", void_index=-1, label_dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"cannot hold the label 299 exactly"):
        rankseg(_probs((1, 300, 4), seed=5), label_dtype=torch.bfloat16)  # bfloat16 is exact up to 256
    with pytest.raises(ValueError, match=r"cannot hold the label 299 exactly"):
        rankseg(_probs((1, 300, 4), seed=5), label_dtype=torch.uint8)
    # the guard path checks the labels it produced
    with pytest.raises(ValueError, match=r"cannot hold the label 299 exactly"):
        rankseg(_probs((1, 300, 40), seed=5), guard=True, label_dtype=torch.bfloat16, pruning_prob=0.0)


@pytest.mark.parametrize("bad", [torch.bool, torch.complex64, "foo", 3.5], ids=str)
def test_label_dtype_that_is_no_label_type_names_the_fix(bad):
    with pytest.raises(ValueError, match="label_dtype"):
        rankseg(_probs((1, 3, 4), seed=6), label_dtype=bad)



def test_label_range_and_smallest_label_dtype():
    assert label_range(3) == (0, 2)
    assert label_range(3, "void") == (0, 255)
    assert label_range(3, "VOID", -1) == (-1, 2)
    assert label_range(300, "max_score", 7) == (0, 299)
    assert smallest_label_dtype(0, 255) == torch.uint8
    assert smallest_label_dtype(-1, 2) == torch.int16
    assert smallest_label_dtype(0, 2**15) == torch.int32
    assert smallest_label_dtype(0, 2**40) == torch.int64
    x = _probs((1, 3, 5, 5), seed=8)
    for policy, void in (("max_score", 255), ("void", 255), ("void", -1), ("void", 70000)):
        dtype = smallest_label_dtype(*label_range(3, policy, void))
        got = rankseg(x, unassigned_policy=policy, void_index=void, label_dtype=dtype)
        assert got.dtype == dtype
        assert torch.equal(got.long(), rankseg(x, unassigned_policy=policy, void_index=void))
