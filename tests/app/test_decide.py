"""``app.decide``'s argmax baseline (the ``argmax`` column of ``evaluate``, ``predict --solver argmax``, the records'
argmax estimate): numpy's ``argmax`` over the class axis, labels and region masks, first maximum on ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankseg_monai.app.decide import decide
from rankseg_monai.options import RankSEGOptions
from rankseg_monai.solvers.regions import RegionTree, nodes_from_labels, region_masks


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("label_dtype", [None, torch.uint8, torch.int32])
def test_argmax_is_numpys_with_ties(dtype, label_dtype):
    rng = np.random.default_rng(3)
    probs = (rng.integers(0, 4, (4, 6, 7, 5)) / 4).astype(dtype)  # many exact ties
    probs[:, 0, 0, 0] = 0.25  # all four classes tied: label 0
    out = decide(probs, "argmax", RankSEGOptions(), label_dtype=label_dtype)
    assert np.array_equal(out, np.argmax(probs, axis=0))
    assert out.dtype == (np.int64 if label_dtype is None else np.dtype(str(label_dtype).split(".")[-1]))
    assert out[0, 0, 0] == 0
    strided = np.moveaxis(np.moveaxis(probs, 0, -1).copy(), -1, 0)  # a non-contiguous view of the same values
    assert np.array_equal(decide(strided, "argmax", RankSEGOptions()), np.argmax(probs, axis=0))


def test_argmax_as_region_masks_is_numpys():
    rng = np.random.default_rng(4)
    probs = (rng.integers(0, 3, (3, 5, 6, 4)) / 2).astype(np.float32)
    spec = {"liver": [1, 2], "tumour": [2]}
    opts = RankSEGOptions(regions=spec, output_mode="multilabel")
    tree = RegionTree.parse(spec)
    labels = torch.from_numpy(np.argmax(probs, axis=0).reshape(1, -1))
    expected = region_masks(nodes_from_labels(labels, tree, 3), tree).reshape(2, 5, 6, 4).numpy()
    assert np.array_equal(decide(probs, "argmax", opts), expected)
