"""The one activation (rankseg_monai/activation.py): activate() is softmax/sigmoid of z / T + b, and every entry
that turns logits into probabilities (calibration's apply_temperature / apply_vector_scaling, the transforms'
softmax/sigmoid/temperature, the CLI's activate_case) gives its bits exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import gaussian_logits
from monai.data import MetaTensor

import rankseg_monai.transforms as transforms_mod
from rankseg_monai import RankSEG, RankSEGd
from rankseg_monai.activation import activate, check_activation, check_temperature
from rankseg_monai.app.decide import activate_case
from rankseg_monai.calibration import apply_temperature, apply_vector_scaling
from rankseg_monai.options import RankSEGOptions


def _logits(shape=(3, 5, 4), seed=0, device="cpu") -> torch.Tensor:
    return gaussian_logits(shape, seed, 3.0, device=device)


def _view(values, ndim, dim, dtype, device):
    shape = [1] * ndim
    shape[dim] = -1
    return torch.tensor(values, dtype=dtype, device=device).reshape(shape)


# ------------------------------------------------------------------------------------------------- activate


def test_activate_is_softmax_or_sigmoid_of_scaled_shifted_logits(device):
    z = _logits(device=device)
    assert torch.equal(activate(z, "softmax"), torch.softmax(z, 0))
    assert torch.equal(activate(z, "sigmoid"), torch.sigmoid(z))
    assert torch.equal(activate(z, "softmax", 2.5), torch.softmax(z / 2.5, 0))
    assert torch.equal(activate(z, "sigmoid", 0.7), torch.sigmoid(z / 0.7))
    t, b = [0.5, 1.0, 2.0], [0.1, -0.3, 1.2]
    tv, bv = _view(t, 3, 0, z.dtype, device), _view(b, 3, 0, z.dtype, device)
    assert torch.equal(activate(z, "softmax", t), torch.softmax(z / tv, 0))
    assert torch.equal(activate(z, "softmax", t, b), torch.softmax(z / tv + bv, 0))
    assert torch.equal(activate(z, "sigmoid", t, b), torch.sigmoid(z / tv + bv))
    assert torch.equal(activate(z, "sigmoid", None, b), torch.sigmoid(z + bv))
    assert torch.equal(activate(z, "softmax", None, 0.5), torch.softmax(z + 0.5, 0))
    # a tensor / numpy temperature is read per channel like a list
    assert torch.equal(activate(z, "softmax", torch.tensor(t)), activate(z, "softmax", t))
    assert torch.equal(activate(z, "softmax", np.array(t)), activate(z, "softmax", t))
    assert torch.equal(activate(z, "softmax", [2.5]), activate(z, "softmax", 2.5))  # one value for all
    out = activate(z, "softmax")
    assert out.device == z.device and out.dtype == torch.float32


def test_activate_dim_for_batches(device):
    z = _logits((2, 3, 4, 4), seed=1, device=device)
    t = [0.5, 1.0, 2.0]
    assert torch.equal(activate(z, "softmax", t, dim=1), torch.softmax(z / _view(t, 4, 1, z.dtype, device), 1))
    assert torch.equal(activate(z, "softmax", dim=-3), torch.softmax(z, 1))
    # per item == batched
    for i in range(2):
        assert torch.equal(activate(z, "softmax", t, dim=1)[i], activate(z[i], "softmax", t, dim=0))


def test_activate_numpy_and_metatensor_inputs():
    z = _logits(seed=2)
    for x in (z.numpy(), MetaTensor(z.clone(), affine=torch.eye(4))):
        out = activate(x, "softmax", 1.5)
        assert type(out) is torch.Tensor and torch.equal(out, torch.softmax(z / 1.5, 0))
    assert activate(z.double().numpy(), "sigmoid").dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_promoted_to_float32(dtype, device):
    z = _logits(seed=3, device=device).to(dtype)
    out = activate(z, "softmax", [1.0, 2.0, 0.5])
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.softmax(z.float() / _view([1.0, 2.0, 0.5], 3, 0, torch.float32, device), 0))
    assert torch.equal(activate(z, "sigmoid"), torch.sigmoid(z.float()))


def test_activate_errors():
    z = _logits()
    with pytest.raises(ValueError, match=r"mode must be 'softmax' \(mutually exclusive classes\) or 'sigmoid'"):
        activate(z, "relu")
    with pytest.raises(ValueError, match=r"temperature has 2 values but the input has 3 channels: give one value per "
                                         r"channel or a single scalar"):
        activate(z, "softmax", [1.0, 2.0])
    with pytest.raises(ValueError, match=r"bias has 4 values but the input has 3 channels"):
        activate(z, "softmax", None, [0.0] * 4)
    with pytest.raises(TypeError, match=r"logits have dtype torch.int64: pass the network's floating-point output"):
        activate(torch.zeros(3, 4, dtype=torch.int64), "softmax")
    with pytest.raises(ValueError, match=r"temperature values must be finite and > 0"):
        activate(z, "softmax", 0.0)


def test_check_temperature_and_activation():
    assert check_temperature(None) is None
    assert check_temperature(2) == 2.0 and type(check_temperature(2)) is float
    assert check_temperature([1.5, 2]) == (1.5, 2.0)
    assert check_temperature(np.array([1.5, 2.0])) == (1.5, 2.0)
    assert check_temperature(torch.tensor(3.0)) == 3.0
    assert check_temperature(np.float32(0.5)) == 0.5
    for bad, exc, match in (
        (0.0, ValueError, r"finite and > 0"),
        (-1, ValueError, r"finite and > 0"),
        (float("nan"), ValueError, r"finite and > 0"),
        (float("inf"), ValueError, r"finite and > 0"),
        ([1.0, 0.0], ValueError, r"finite and > 0"),
        ([], ValueError, r"empty sequence: give one positive value per channel, or a scalar"),
        ("hot", TypeError, r"temperature must be a positive number or a sequence of positive numbers"),
        (True, TypeError, r"temperature must be a positive number"),
        ({1.0}, TypeError, r"non-empty sequence of them \(one per channel\)"),
        ([1.0, "a"], TypeError, r"temperature values must be real numbers"),
        ([1.0, True], TypeError, r"temperature values must be real numbers"),
    ):
        with pytest.raises(exc, match=match):
            check_temperature(bad)
    assert check_activation(" Softmax ") == "softmax" and check_activation("SIGMOID") == "sigmoid"
    for bad in ("relu", None, 1):
        with pytest.raises(ValueError, match="mode must be 'softmax'"):
            check_activation(bad)


# ------------------------------------------------------------------------------------- one implementation


def test_calibration_applies_the_same_bits():
    z = _logits((3, 6, 5, 4), seed=4)
    for mode in ("softmax", "sigmoid"):
        for t in (1.7, [0.5, 1.0, 2.0], torch.tensor([0.8], dtype=torch.float64)):
            assert torch.equal(apply_temperature(z, t, mode), activate(z, mode, t))
        params = {"temperature": torch.tensor([0.5, 1.0, 2.0]), "bias": torch.tensor([0.1, -0.3, 1.2])}
        assert torch.equal(apply_vector_scaling(z, params, mode), activate(z, mode, params["temperature"],
                                                                           params["bias"]))
        assert torch.equal(apply_temperature(z[None], [0.5, 1.0, 2.0], mode, dim=1),
                           activate(z[None], mode, [0.5, 1.0, 2.0], dim=1))


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_transforms_and_cli_decide_on_the_same_bits(monkeypatch, mode, device):
    """What RankSEG / RankSEGd hand to the solver after their activation is activate()'s output, bit for bit; the
    CLI's activate_case too."""
    seen = []
    real = transforms_mod.decide

    def spy(probs, options=None, **kwargs):
        seen.append(probs.clone())
        return real(probs, options, **kwargs)

    monkeypatch.setattr(transforms_mod, "decide", spy)
    z = _logits((3, 6, 5, 4), seed=5, device=device)
    output_mode = "multiclass" if mode == "softmax" else "multilabel"
    for t in (None, 2.5, [0.5, 1.0, 2.0]):
        kwargs = {mode: True, "temperature": t, "output_mode": output_mode}
        expect = activate(z, mode, t)
        for transform in (RankSEG(**kwargs), lambda x, kw=kwargs: RankSEGd(keys="pred", **kw)({"pred": x})["pred"]):
            seen.clear()
            transform(z)
            assert len(seen) == 1 and torch.equal(seen[0], expect[None]), (mode, t)
        opts = RankSEGOptions(**kwargs)
        assert np.array_equal(activate_case(z.cpu().numpy(), opts), activate(z.cpu(), mode, t).numpy())
    seen.clear()
    probs = activate(z, mode)
    RankSEG(output_mode=output_mode)(probs)  # no activation: the probabilities reach the solver as they are
    assert torch.equal(seen[0], probs[None])
