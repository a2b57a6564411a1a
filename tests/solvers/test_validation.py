"""Bad input gets a clear error that names the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import softmax_probs

from rankseg_monai.functional import rankseg

GOOD = softmax_probs((1, 3, 4, 4), seed=0, scale=1.0)


@pytest.mark.parametrize(
    "probs,exc,match",
    [
        (torch.tensor([[[0.2, float("nan")]]]), ValueError, "NaN or inf"),
        (torch.tensor([[[0.2, float("inf")]]]), ValueError, "NaN or inf"),
        (torch.tensor([[[0.2, 1.5]]]), ValueError, "softmax=True"),
        (torch.tensor([[[-0.2, 0.5]]]), ValueError, "outside \\[0, 1\\]"),
        (torch.rand(3, 4), ValueError, "batch, classes"),
        (torch.ones((1, 2, 4), dtype=torch.int64), TypeError, "floating-point"),
        (torch.ones((1, 2, 4), dtype=torch.complex64), TypeError, "complex"),
        (np.ones((1, 2, 4), dtype=np.int32), TypeError, "floating-point"),
        (torch.rand(1, 0, 4), ValueError, "no classes"),
        (torch.rand(1, 2, 0), ValueError, "empty spatial"),
        ([[0.1, 0.2]], TypeError, "torch.Tensor, MetaTensor or numpy"),
    ],
)
def test_bad_probabilities(probs, exc, match, device):
    if isinstance(probs, torch.Tensor):
        probs = probs.to(device)
    with pytest.raises(exc, match=match):
        rankseg(probs, output_mode="multilabel")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"metric": "hd95"}, ValueError, "unknown metric"),
        ({"metric": 3}, TypeError, "metric must be a string"),
        ({"solver": "magic"}, ValueError, "unknown solver"),
        ({"output_mode": "overlap"}, ValueError, "unknown output_mode"),
        ({"smooth": -1.0}, ValueError, "smooth must be >= 0"),
        ({"smooth": float("nan")}, ValueError, "finite"),
        ({"pruning_prob": 1.5}, ValueError, "pruning_prob must lie in \\[0, 1\\]"),
        ({"pruning_prob": -0.1}, ValueError, "pruning_prob must lie in \\[0, 1\\]"),
        ({"pruning_prob": True}, TypeError, "real number"),
        ({"unassigned_policy": "void", "void_index": 1}, ValueError, "class index"),
        ({"void_index": 7}, ValueError, "requires output_mode='multiclass' and unassigned_policy='void'"),
        ({"solver": "ba"}, ValueError, "supported solvers: RMA"),
        ({"metric": "iou", "solver": "trna"}, ValueError, "supported solvers: RMA"),
        ({"eps": 0.0}, ValueError, "eps must lie strictly between 0 and 1"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rankseg(GOOD, **kwargs)


def test_single_channel_multiclass_names_the_fix():
    with pytest.raises(ValueError, match="output_mode='multilabel'"):
        rankseg(torch.rand(1, 1, 4, 4))


def test_options_are_case_insensitive():
    a = rankseg(GOOD, metric=" Dice ", solver="RMA", output_mode="MultiClass")
    assert torch.equal(a, rankseg(GOOD))
    assert torch.equal(rankseg(GOOD, metric="Accuracy", solver="ARGMAX"), GOOD.argmax(1))


def test_clamp_tolerates_small_overshoot_only(device):
    p = GOOD.clone().to(device)
    p[0, 0, 0, 0] = 1.0 + 1e-6
    p[0, 1, 0, 0] = -1e-6
    with pytest.raises(ValueError, match="clamp=True"):
        rankseg(p)
    out = rankseg(p, clamp=True)
    assert torch.equal(out, rankseg(p.clamp(0, 1)))
    p[0, 0, 1, 1] = 3.0
    with pytest.raises(ValueError, match="outside"):
        rankseg(p, clamp=True)


def test_accuracy_metric_matches_reference():
    from rankseg.functional import rankseg as ref

    p = softmax_probs((2, 4, 6, 6), seed=1, scale=1.0)
    assert torch.equal(rankseg(p, metric="acc", solver="argmax"), ref(p, metric="acc", solver="argmax"))
    assert torch.equal(rankseg(p, metric="acc", solver="tr", output_mode="multilabel"),
                       ref(p, metric="acc", solver="tr", output_mode="multilabel"))
    with pytest.warns(UserWarning, match="one-hot"):
        ours = rankseg(p, metric="acc", solver="argmax", output_mode="multilabel")
    with pytest.warns(UserWarning):
        assert torch.equal(ours, ref(p, metric="acc", solver="argmax", output_mode="multilabel"))
    single = torch.rand(2, 1, 5, 5)
    assert torch.equal(rankseg(single, metric="acc", solver="tr", output_mode="multilabel"), single > 0.5)


def test_parse_pruning_prob():
    from rankseg_monai.options import parse_pruning_prob

    assert parse_pruning_prob("0.3") == 0.3
    assert parse_pruning_prob(" AUTO ") == "auto"
    assert parse_pruning_prob("auto-independent") == "auto-independent"
    with pytest.raises(ValueError, match="number in \\[0, 1\\] or one of"):
        parse_pruning_prob("sometimes")
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
        parse_pruning_prob("1.5")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no CUDA device exists")
def test_cuda_device_without_cuda_names_the_fix():
    with pytest.raises(ValueError, match="device='cpu'"):
        rankseg(GOOD, device="cuda")
