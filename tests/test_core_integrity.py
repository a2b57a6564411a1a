"""Issue 13 (run integrity), below the command line: wrong results with no error (items 7, 8, 9) and messages
that did not name the problem (item 18).  Each test is a reproducer from the issue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from rankseg_monai import HausdorffDistance95Metric, RankSEG, RankSEGd
from rankseg_monai.calibration import fit_temperature, load_temperature
from rankseg_monai.functional import rankseg


def _probs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(shape, generator=g) * 3, 0)


# ------------------------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize("kwargs, classes", [
    (dict(dtype=torch.uint8), 300),
    (dict(dtype=torch.uint8, unassigned_policy="void", void_index=65536), 3),
    (dict(dtype=torch.int16, unassigned_policy="void", void_index=65536), 3),
    (dict(dtype=torch.float16), 3000),
    (dict(dtype=torch.bool), 3),
    (dict(dtype=torch.uint8, guard=True), 300),
], ids=str)
def test_transform_output_dtype_must_hold_every_label(kwargs, classes):
    x = _probs((classes, 3, 2))
    with pytest.raises(ValueError, match="cannot hold the label"):
        RankSEG(**kwargs)(x)
    with pytest.raises(ValueError, match="cannot hold the label"):
        RankSEGd(keys="p", **kwargs)({"p": x})


# ------------------------------------------------------------------------------------------------- item 8


@pytest.mark.filterwarnings("ignore:HausdorffDistance95. no MetaTensor spacing")
@pytest.mark.parametrize("bad, what", [(0.75, "y_pred"), (2.0, "y_pred"), (0.5, "y")])
def test_hd95_refuses_masks_that_are_not_binary(bad, what):
    pred = torch.zeros(1, 2, 8, 8)
    pred[0, 1, 2:5, 2:5] = 1
    pred[0, 0] = 1 - pred[0, 1]
    label = pred.clone()
    (pred if what == "y_pred" else label)[0, 1, 3, 3] = bad
    metric = HausdorffDistance95Metric(require_spacing=False)
    with pytest.raises(ValueError, match=f"{what} holds values other than 0 and 1 .*{bad}.*AsDiscrete"):
        metric(pred, label)
    assert metric.get_buffers() is None  # nothing recorded
    good = HausdorffDistance95Metric(require_spacing=False)
    good(pred.clamp(0, 1).round(), label.clamp(0, 1).round())
    assert torch.isfinite(good.aggregate())


def test_hd95_accepts_bool_and_metatensor_masks():
    pred = torch.zeros(1, 2, 6, 6, dtype=torch.bool)
    pred[0, 1, 1:3, 1:3] = True
    pred[0, 0] = ~pred[0, 1]
    metric = HausdorffDistance95Metric()
    out = metric([MetaTensor(pred[0].float(), affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])))],
                 [pred[0]])
    assert out.shape == (1, 1) and float(out[0, 0]) == 0.0


# ------------------------------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("shape", [(2, 0, 4), (2, 3, 0)])
def test_fit_temperature_on_zero_voxels_raises(shape):
    logits = torch.zeros(shape)
    labels = torch.zeros((1, *shape[1:]))
    with pytest.raises(ValueError, match="no voxels to fit on"):
        fit_temperature([logits], [labels])


# ------------------------------------------------------------------------------------------------ item 18


def test_meta_tensors_and_the_meta_device_name_the_fix():
    x = torch.empty(2, 3, 3, device="meta")
    with pytest.raises(ValueError, match="meta tensor .*pass the probabilities on 'cpu' or 'cuda'"):
        RankSEG()(x)
    with pytest.raises(ValueError, match="meta tensor"):
        rankseg(x[None])
    with pytest.raises(ValueError, match="device='meta' holds no values"):
        RankSEG(device="meta")


@pytest.mark.parametrize("array, match", [
    (np.empty((2, 3, 3), dtype=object), "dtype object"),
    (np.zeros((2, 3, 3), dtype=np.longdouble), "astype\\(np.float32\\)"),
])
def test_numpy_arrays_torch_cannot_hold_name_the_fix(array, match):
    if array.dtype == np.longdouble and np.dtype(np.longdouble) == np.dtype(np.float64):
        pytest.skip("longdouble is float64 on this platform")  # then it is a valid input
    with pytest.raises(TypeError, match=match):
        RankSEG()(array)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", b'{"temperature": "hot"}', b"[1, 2"])
def test_load_temperature_on_garbage_names_the_file(tmp_path, content):
    path = tmp_path / "t.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="t.json"):
        load_temperature(path)


@pytest.mark.parametrize("guard", [False, True])
def test_bfloat16_output_with_numpy_input_names_the_fix(guard):
    x = _probs((3, 4, 4)).numpy()
    with pytest.raises(ValueError, match="bfloat16 has no numpy dtype"):
        RankSEG(dtype=torch.bfloat16, guard=guard)(x)
    with pytest.raises(ValueError, match="numpy has no bfloat16"):
        rankseg(x[None], guard=guard, label_dtype=torch.bfloat16)
    assert RankSEG(dtype=torch.bfloat16, guard=guard)(torch.from_numpy(x)).dtype == torch.bfloat16


def test_overshoot_message_shows_every_digit_and_suggests_clamp():
    x = torch.full((1, 2, 3, 3), 0.5)
    x[0, 0, 0, 0] = 1 + 1e-7  # float32: 1.00000012
    with pytest.raises(ValueError) as info:
        rankseg(x)
    msg = str(info.value)
    assert "max 1.0000001192092896" in msg and "clamp=True" in msg and "not logits" in msg
    x[0, 0, 0, 0] = 4.0
    with pytest.raises(ValueError, match="max 4.0\\).*softmax=True"):
        rankseg(x)
