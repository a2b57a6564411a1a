"""Tests of the entry's own options (rankseg_monai/functional.py): the label dtype of multiclass output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import softmax_probs

from rankseg_monai._arrays import numpy_as_tensor
from rankseg_monai.functional import rankseg
from rankseg_monai.options import check_label_dtype, label_range, smallest_label_dtype
from rankseg_monai.solvers._stream import flat_view

LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16, torch.float32,
                torch.float64, "uint8", np.float32, np.dtype("int16")]


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_label_dtype_gives_the_int64_labels_in_that_dtype(label_dtype, kind, device):
    x = softmax_probs((2, 5, 9, 8, 7), seed=1)
    expected = rankseg(x)
    assert expected.dtype == torch.int64
    want = check_label_dtype(label_dtype)
    if kind == "numpy" and want == torch.bfloat16:
        with pytest.raises(ValueError, match="numpy has no bfloat16"):
            rankseg(x.numpy(), label_dtype=label_dtype)
        return
    got = rankseg(x.numpy() if kind == "numpy" else x.to(device), label_dtype=label_dtype)
    if kind == "numpy":
        assert isinstance(got, np.ndarray) and got.dtype == torch.empty(0, dtype=want).numpy().dtype
        got = torch.from_numpy(got)
    assert got.dtype == want and got.device.type == ("cpu" if kind == "numpy" else torch.device(device).type)
    got = got.cpu()
    assert torch.equal(got.long(), expected)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.float32])
def test_label_dtype_with_void_argmax_guard_and_empty_batch(label_dtype, device):
    x = softmax_probs((2, 4, 10, 10), seed=2, device=device)
    void = rankseg(x, unassigned_policy="void")
    assert torch.equal(rankseg(x, unassigned_policy="void", label_dtype=label_dtype).long(), void)
    arg = rankseg(x, metric="acc", solver="argmax")
    got = rankseg(x, metric="acc", solver="argmax", label_dtype=label_dtype)
    assert got.dtype == label_dtype and torch.equal(got.long(), arg) and torch.equal(arg, x.argmax(1))
    # the guard computes int64 labels internally and converts at the end
    fog = torch.full((1, 2, 400), 0.5, device=device)
    fog[:, 1, :40], fog[:, 0, :40] = 0.9, 0.1
    guarded = rankseg(fog, guard=True)
    got = rankseg(fog, guard=True, label_dtype=label_dtype)
    assert got.dtype == label_dtype and torch.equal(got.long(), guarded)
    empty = rankseg(x[:0], label_dtype=label_dtype)
    assert empty.shape == (0, 10, 10) and empty.dtype == label_dtype and empty.device == x.device


def test_label_dtype_does_not_touch_bool_outputs():
    x = softmax_probs((1, 3, 6, 6), seed=3)
    assert rankseg(x, output_mode="multilabel", label_dtype=torch.uint8).dtype == torch.bool
    assert rankseg(x[:, :1], metric="acc", solver="tr", output_mode="multilabel",
                   label_dtype=torch.float32).dtype == torch.bool


def test_label_dtype_that_cannot_hold_the_labels_names_the_fix():
    x = softmax_probs((1, 3, 6, 6), seed=4)
    with pytest.raises(ValueError, match=r"cannot hold the label 255 exactly: use torch.int64"):
        rankseg(x, unassigned_policy="void", label_dtype=torch.int8)  # void_index 255 > 127
    with pytest.raises(ValueError, match=r"cannot hold the label -1 exactly"):
        rankseg(x, unassigned_policy="void", void_index=-1, label_dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"cannot hold the label 299 exactly"):
        rankseg(softmax_probs((1, 300, 4), seed=5), label_dtype=torch.bfloat16)  # bfloat16 is exact up to 256
    with pytest.raises(ValueError, match=r"cannot hold the label 299 exactly"):
        rankseg(softmax_probs((1, 300, 4), seed=5), label_dtype=torch.uint8)
    # the guard path checks the labels it produced
    with pytest.raises(ValueError, match=r"cannot hold the label 299 exactly"):
        rankseg(softmax_probs((1, 300, 40), seed=5), guard=True, label_dtype=torch.bfloat16, pruning_prob=0.0)


@pytest.mark.parametrize("bad", [torch.bool, torch.complex64, "foo", 3.5], ids=str)
def test_label_dtype_that_is_no_label_type_names_the_fix(bad):
    with pytest.raises(ValueError, match="label_dtype"):
        rankseg(softmax_probs((1, 3, 4), seed=6), label_dtype=bad)



def test_label_range_and_smallest_label_dtype():
    assert label_range(3) == (0, 2)
    assert label_range(3, "void") == (0, 255)
    assert label_range(3, "VOID", -1) == (-1, 2)
    assert label_range(300, "max_score", 7) == (0, 299)
    assert smallest_label_dtype(0, 255) == torch.uint8
    assert smallest_label_dtype(-1, 2) == torch.int16
    assert smallest_label_dtype(0, 2**15) == torch.int32
    assert smallest_label_dtype(0, 2**40) == torch.int64
    x = softmax_probs((1, 3, 5, 5), seed=8)
    for policy, void in (("max_score", 255), ("void", 255), ("void", -1), ("void", 70000)):
        dtype = smallest_label_dtype(*label_range(3, policy, void))
        got = rankseg(x, unassigned_policy=policy, void_index=void, label_dtype=dtype)
        assert got.dtype == dtype
        assert torch.equal(got.long(), rankseg(x, unassigned_policy=policy, void_index=void))


# ------------------------------------------------------------------------------------ non-contiguous input
# dim orders of a contiguous (B, X, Y, Z, C) volume shown as (B, C, ...); the last is channels-last
PERMS = [(0, 4, 3, 2, 1), (0, 4, 2, 1, 3), (0, 4, 1, 3, 2), (0, 4, 1, 2, 3)]


@pytest.mark.parametrize("perm", PERMS, ids=str)
@pytest.mark.parametrize("kwargs", [dict(), dict(output_mode="multilabel"), dict(metric="iou", smooth=1.0),
                                    dict(output_mode="multilabel", solver="ba"), dict(metric="acc", solver="argmax"),
                                    dict(unassigned_policy="void", label_dtype=torch.uint8), dict(guard=True)],
                         ids=str)
def test_permuted_input_gives_the_contiguous_decisions(perm, kwargs, device):
    x = softmax_probs((2, 3, 12, 10, 8), seed=10, device=device).permute(0, 2, 3, 4, 1).contiguous().permute(*perm)
    assert not x.is_contiguous() and flat_view(x)[0].data_ptr() == x.data_ptr()
    got, want = rankseg(x, **kwargs), rankseg(x.contiguous(), **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(got.cpu(), rankseg(x.cpu().contiguous(), **kwargs))


def test_strided_and_sliced_inputs():
    x = softmax_probs((1, 3, 12, 10, 8), seed=12)[..., ::2]  # a step along the last dim: still a (strided) view
    assert flat_view(x)[0].data_ptr() == x.data_ptr()
    assert torch.equal(rankseg(x), rankseg(x.contiguous()))
    y = softmax_probs((1, 3, 12, 10, 8), seed=12)[:, :, :, :3]  # a slice of a middle dim: no dim order gives a view
    flat, _ = flat_view(y)
    assert flat.is_contiguous() and flat.data_ptr() != y.data_ptr()
    assert torch.equal(rankseg(y), rankseg(y.contiguous()))


def test_numpy_inputs_are_shared_not_copied():
    base = softmax_probs((1, 3, 8, 7, 6), seed=13).numpy()
    fortran = np.asfortranarray(base)  # what a column-major reader gives
    t = numpy_as_tensor(fortran)
    assert t.data_ptr() == fortran.ctypes.data and flat_view(t)[0].data_ptr() == t.data_ptr()
    assert np.array_equal(rankseg(fortran), rankseg(base))
    flipped = base[..., ::-1]  # negative strides: torch cannot view them, so this one is copied
    assert np.array_equal(numpy_as_tensor(flipped).numpy(), flipped)
    assert np.array_equal(rankseg(flipped), rankseg(np.ascontiguousarray(flipped)))
    swapped = base.astype(base.dtype.newbyteorder(">"))  # big-endian (e.g. from some NIfTI files)
    assert np.array_equal(rankseg(swapped), rankseg(base))
