"""The label-free guard (rankseg_monai/guard.py): fog scenarios end to end, then its rules by hand on tiny inputs,
its settings, its device and chunk invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import ellipsoid_field, fog_cases, softmax_logits, softmax_probs
from oracle import label_dice

from rankseg_monai.functional import guarded_rankseg, rankseg
from rankseg_monai.guard import Guard


# ------------------------------------------------------------------------------------------------- fog scenarios
def test_guard_restores_dice_after_the_collapse():
    """Issue #8: a flattened model (logits / 3.5: every voxel uncertain).  Plain RankSEG loses badly to
    thresholding; the guard switches the class back and matches thresholding exactly."""
    d_thr, d_raw, d_guard = [], [], []
    for p, y in fog_cases(4, 3.5):
        g, info = guarded_rankseg(p[None], output_mode="multilabel", pruning_prob="auto", return_info=True)
        assert bool(info["fallback"].all()) and float(info["uncertain_fraction"]) > 0.9
        raw = rankseg(p[None], output_mode="multilabel", pruning_prob="auto")
        for lst, m in ((d_thr, p > 0.5), (d_raw, raw[0]), (d_guard, g[0])):
            lst.append(label_dice(m.long(), y.long(), 1))
    assert np.mean(d_raw) < np.mean(d_thr) - 0.1
    assert d_guard == d_thr


def test_guard_multiclass_fog_gives_argmax_labels_for_the_switched_class():
    p1, _ = fog_cases(1, 3.5)[0]
    probs = torch.cat([1 - p1, p1])[None]  # two-class softmax of the same fog
    out, info = guarded_rankseg(probs, pruning_prob="auto", return_info=True)
    assert info["fallback"].tolist() == [[False, True]]
    assert torch.equal(out, probs.argmax(1))
    plain = rankseg(probs, pruning_prob="auto")
    assert int((plain == 1).sum()) > int((out == 1).sum())


def test_guard_keeps_rankseg_on_calibrated_output():
    """Calibrated outputs of a reasonably sharp model (edges 0.5-1 voxel, as a trained network's): no switch."""
    for seed in range(3):
        p = torch.softmax(softmax_logits(seed, shape=(32, 32, 24), width=(0.5, 1.0)), 0).float()[None]
        out, info = guarded_rankseg(p, pruning_prob="auto", return_info=True)
        assert not bool(info["fallback"].any())
        assert torch.equal(out, rankseg(p, pruning_prob="auto"))
        assert float(info["uncertain_fraction"].max()) < Guard().max_uncertain


@pytest.mark.parametrize("seed", [0, 2])
def test_guard_switches_only_the_flagged_class(seed):
    """Class 1 is a crisp object, class 2 a small object whose logits are flattened (x 0.3) into a fog that
    RankSEG floods.  Only class 2 is switched: its mask becomes argmax's, and every voxel that neither RankSEG
    nor argmax gives to class 2 keeps RankSEG's label (so class 1 keeps RankSEG's rim)."""
    rng = np.random.default_rng(seed)
    z = torch.zeros(3, 32, 32, 24, dtype=torch.float64)
    z[1] = ellipsoid_field(rng, (32, 32, 24), n=(1, 1), radius=(6, 8)).clamp(-8, 8)
    z[2] = 0.3 * (ellipsoid_field(rng, (32, 32, 24), n=(1, 1), radius=(3, 4)) / 0.5).clamp(-8, 8)
    p = torch.softmax(z, 0).float()[None]
    out, info = guarded_rankseg(p, pruning_prob="auto", return_info=True)
    plain, am = rankseg(p, pruning_prob="auto"), p.argmax(1)
    assert info["fallback"].tolist() == [[False, False, True]]
    assert int((plain == 2).sum()) > 3 * int((am == 2).sum())  # the flood
    assert torch.equal(out == 2, am == 2)
    keep = (plain != 2) & (am != 2)
    assert torch.equal(out[keep], plain[keep])
    assert torch.equal(out == 1, plain == 1) and not torch.equal(out == 1, am == 1)


def test_guard_options_and_passthrough():
    p = torch.full((1, 1, 1000), 0.3)
    p[..., :100] = 0.9
    plain = rankseg(p, output_mode="multilabel")
    assert torch.equal(guarded_rankseg(p, guard=None, output_mode="multilabel"), plain)
    assert torch.equal(guarded_rankseg(p, guard={"max_uncertain": 1.0}, output_mode="multilabel"), plain)
    assert int(guarded_rankseg(p, guard=Guard(), output_mode="multilabel").sum()) == 100
    out_np = guarded_rankseg(p.numpy(), output_mode="multilabel")
    assert isinstance(out_np, np.ndarray) and int(out_np.sum()) == 100
    acc = guarded_rankseg(p, metric="acc", output_mode="multilabel", solver="tr")
    assert torch.equal(acc, p > 0.5)
    with pytest.raises(ValueError, match="unknown guard settings"):
        guarded_rankseg(p, guard={"max_fog": 1})
    with pytest.raises(ValueError, match="max_uncertain"):
        Guard(max_uncertain=-1)
    with pytest.raises(ValueError, match="band"):
        Guard(band=(0.6, 0.4))
    with pytest.raises(TypeError):
        guarded_rankseg(p, guard=3)
    # a fog that argmax leaves empty: RankSEG paints all of it, the guard empties it
    q = torch.full((1, 1, 500), 0.3)
    assert bool(rankseg(q, output_mode="multilabel", pruning_prob=0.0).all())
    assert not bool(guarded_rankseg(q, output_mode="multilabel", pruning_prob=0.0).any())


def test_guard_option_delegates_to_guarded_rankseg():
    import rankseg_monai.calibration as calibration

    fog = softmax_probs((1, 3, 16, 16, 8), seed=0, scale=0.2)
    assert torch.equal(rankseg(fog, guard=True), guarded_rankseg(fog, guard=True))
    assert torch.equal(rankseg(fog, guard=None), rankseg(fog))
    # the calibration package re-exports the core's objects (one implementation)
    assert calibration.guarded_rankseg is guarded_rankseg and calibration.Guard is Guard
