"""The label-free guard (rankseg_monai/guard.py): fog scenarios end to end, then its rules by hand on tiny inputs,
its settings, its device and chunk invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import ellipsoid_field, fog_cases, gaussian_logits, softmax_logits, softmax_probs
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


# ------------------------------------------------------------------------------------------ the rule by hand
def _rule(p: torch.Tensor, plain: torch.Tensor, guard: Guard, multiclass: bool):
    """The guard written from its docstring, on one sample: p (C, N) float64, plain = RankSEG's decision (labels (N,)
    or masks (C, N)).  Returns (fallback (C,), uncertain fraction, RankSEG volume, argmax volume, guarded output)."""
    C = p.shape[0]
    lo, hi = guard.band
    u = ((p > lo) & (p < hi)).double().mean(1)
    if multiclass:
        a = p.argmax(0)
        v_r = torch.stack([(plain == c).sum() for c in range(C)])
        v_a = torch.stack([(a == c).sum() for c in range(C)])
    else:
        v_r, v_a = plain.sum(1), (p > 0.5).sum(1)
    fb = (u > guard.max_uncertain) & (v_r > guard.max_growth * v_a)
    if multiclass:
        valid = (plain >= 0) & (plain < C)
        touched = torch.zeros_like(valid)
        touched[valid] = fb[plain[valid]]  # a void label belongs to no class: it is never switched through it
        out = torch.where(touched | fb[a], a, plain)
    else:
        out = torch.where(fb[:, None], p > 0.5, plain)
    return fb, u, v_r, v_a, out


def test_multilabel_rule_by_hand():
    rows = torch.tensor([
        [0.3] * 10,  # fog: RankSEG takes all 10, argmax none -> switched (emptied)
        [0.99] * 2 + [0.3] * 8,  # 80% uncertain, RankSEG 10 > argmax 2 -> switched to the 2 sure voxels
        [0.99] * 3 + [0.01] * 7,  # confident -> kept
        [0.6] * 10,  # uncertain, but RankSEG is no larger than argmax -> kept
    ], dtype=torch.float64)[None]
    plain = rankseg(rows, output_mode="multilabel", pruning_prob=0.0)
    assert plain[0].sum(1).tolist() == [10, 10, 3, 10]
    out, info = guarded_rankseg(rows, output_mode="multilabel", pruning_prob=0.0, return_info=True)
    assert info["fallback"].tolist() == [[True, True, False, False]]
    assert info["uncertain_fraction"].tolist() == [[1.0, 0.8, 0.0, 1.0]]
    assert info["rankseg_volume"].tolist() == [[10, 10, 3, 10]] and info["argmax_volume"].tolist() == [[0, 2, 3, 10]]
    assert out[0].sum(1).tolist() == [0, 2, 3, 10] and torch.equal(out[0, 1], rows[0, 1] > 0.5)
    # the settings move the rule exactly where the docstring says
    strict = guarded_rankseg(rows, guard=Guard(max_growth=5.0), output_mode="multilabel", pruning_prob=0.0,
                             return_info=True)[1]
    assert strict["fallback"].tolist() == [[True, False, False, False]]  # 10 > 5 x 2 is false
    tolerant = guarded_rankseg(rows, guard=Guard(max_uncertain=0.9), output_mode="multilabel", pruning_prob=0.0,
                               return_info=True)[1]
    assert tolerant["fallback"].tolist() == [[True, False, False, False]]  # 0.8 > 0.9 is false
    for guard in (Guard(), Guard(max_growth=5.0), Guard(max_uncertain=0.9), Guard(band=(0.2, 0.7))):
        fb, u, v_r, v_a, expect = _rule(rows[0], plain[0], guard, multiclass=False)
        got, info = guarded_rankseg(rows, guard=guard, output_mode="multilabel", pruning_prob=0.0, return_info=True)
        assert torch.equal(info["fallback"][0], fb) and torch.equal(got[0], expect), guard


def test_the_band_is_open():
    """Values exactly on the band's ends are not uncertain: 0.05 and 0.95 (float64) never count."""
    p = torch.tensor([[[0.95] * 5 + [0.05] * 5]], dtype=torch.float64)
    _, info = guarded_rankseg(p, output_mode="multilabel", pruning_prob=0.0, return_info=True)
    assert info["uncertain_fraction"].tolist() == [[0.0]] and not bool(info["fallback"].any())
    _, info = guarded_rankseg(p, guard=Guard(band=(0.04, 0.96)), output_mode="multilabel", pruning_prob=0.0,
                              return_info=True)
    assert info["uncertain_fraction"].tolist() == [[1.0]]


def test_multiclass_rule_by_hand():
    """A sure object (class 1), a confident background (class 0) and a fog of 30 voxels at p = 0.38 of class 2
    that argmax gives to the background: RankSEG paints the fog with class 2; only class 2 is switched (its fog
    voxels go back to argmax's label), everything else keeps RankSEG's labels."""
    p = torch.zeros(1, 3, 100, dtype=torch.float64)
    for region, values in ((slice(0, 10), [0.05, 0.9, 0.05]), (slice(10, 40), [0.40, 0.22, 0.38]),
                           (slice(40, 100), [0.98, 0.01, 0.01])):
        p[0, :, region] = torch.tensor(values, dtype=torch.float64)[:, None]
    plain = rankseg(p, pruning_prob=0.0)
    assert bool((plain[0, 10:40] == 2).all())  # RankSEG paints the fog
    guard = Guard(max_uncertain=0.25)
    out, info = guarded_rankseg(p, guard=guard, pruning_prob=0.0, return_info=True)
    fb, u, v_r, v_a, expect = _rule(p[0], plain[0], guard, multiclass=True)
    assert fb.tolist() == [False, False, True] and info["fallback"][0].tolist() == fb.tolist()
    assert info["uncertain_fraction"][0].tolist() == pytest.approx([0.3, 0.4, 0.3], abs=1e-15)
    assert info["rankseg_volume"][0].tolist() == [60, 10, 30] and info["argmax_volume"][0].tolist() == [90, 10, 0]
    assert torch.equal(out[0], expect) and not bool((out == 2).any())
    assert bool((out[0, 10:40] == 0).all()) and torch.equal(out[0, :10], plain[0, :10])
    assert torch.equal(out[0, 40:], plain[0, 40:])
    # with the default max_uncertain (0.5) nothing is uncertain enough to switch
    assert torch.equal(guarded_rankseg(p, pruning_prob=0.0), plain)


def test_void_labels_are_never_switched():
    """Under unassigned_policy='void' a void voxel keeps void_index unless argmax gives it to a switched class; a
    void label is never read as a class (255 clipped into the class range would be the switched class 3 here)."""
    p = torch.zeros(1, 4, 132, dtype=torch.float64)
    for region, values in ((slice(0, 10), [0.05, 0.9, 0.0, 0.05]),  # a sure object of class 1
                           (slice(10, 40), [0.40, 0.22, 0.0, 0.38]),  # a fog of class 3, argmax says 0
                           (slice(40, 100), [0.98, 0.01, 0.0, 0.01]),  # background
                           (slice(100, 130), [0.30, 0.10, 0.45, 0.15]),  # argmax says 2, which is pruned: void
                           (slice(130, 132), [0.2, 0.1, 0.1, 0.6])):  # class 3's own two voxels
        p[0, :, region] = torch.tensor(values, dtype=torch.float64)[:, None]
    kwargs = dict(unassigned_policy="void", void_index=255, pruning_prob=0.5)
    guard = Guard(max_uncertain=0.25)
    plain = rankseg(p, **kwargs)
    assert bool((plain[0, 100:130] == 255).all()) and bool((plain[0, 10:40] == 3).all())
    out, info = guarded_rankseg(p, guard=guard, return_info=True, **kwargs)
    fb, _, _, _, expect = _rule(p[0], plain[0], guard, multiclass=True)
    assert info["fallback"][0].tolist() == fb.tolist() == [False, False, False, True]
    assert torch.equal(out[0], expect)
    assert bool((out[0, 100:130] == 255).all())  # void stays void
    assert bool((out[0, 10:40] == 0).all()) and torch.equal(out[0, 130:], plain[0, 130:])
    # a negative void_index is never read as a class either
    out_neg = guarded_rankseg(p, guard=guard, **{**kwargs, "void_index": -1})
    labelled = out[0] != 255
    assert torch.equal(out_neg[0] == -1, ~labelled) and torch.equal(out_neg[0][labelled], out[0][labelled])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("output_mode", ["multiclass", "multilabel"])
def test_rule_on_random_fogs(seed, output_mode):
    z = gaussian_logits((2, 4, 300), seed=seed, scale=[3.0, 0.2, 2.0, 0.4], dtype=torch.float64)
    p = torch.softmax(z, 1) if output_mode == "multiclass" else \
        torch.sigmoid(z * torch.tensor([4.0, 1.0, 3.0, 1.0]).view(1, 4, 1) - 1.0)
    guard = Guard(max_uncertain=0.3)
    plain = rankseg(p, output_mode=output_mode, pruning_prob=0.0)
    out, info = guarded_rankseg(p, guard=guard, output_mode=output_mode, pruning_prob=0.0, return_info=True)
    assert bool(info["fallback"].any()) and not bool(info["fallback"].all())  # some classes switch, some do not
    for b in range(2):
        fb, u, v_r, v_a, expect = _rule(p[b], plain[b], guard, multiclass=output_mode == "multiclass")
        assert torch.equal(info["fallback"][b], fb)
        torch.testing.assert_close(info["uncertain_fraction"][b], u, rtol=0, atol=0)
        assert torch.equal(info["rankseg_volume"][b], v_r) and torch.equal(info["argmax_volume"][b], v_a)
        assert torch.equal(out[b], expect)


# ---------------------------------------------------------------------------------------- device and chunks
def _fog_batch():
    z = gaussian_logits((2, 3, 6, 7, 5), seed=5, scale=[2.0, 0.2, 1.0])  # class 1 flat: a fog
    return torch.softmax(z, 1), torch.sigmoid(z)


def test_guard_runs_on_the_compute_device(device):
    """Data on the device, or a CPU volume streamed through it: the same decision and info as on the CPU; the info
    lives on the compute device.  device='cpu' on CPU data is the same as no device."""
    from rankseg_monai.functional import decide
    from rankseg_monai.options import RankSEGOptions

    for probs, mode in zip(_fog_batch(), ("multiclass", "multilabel")):
        opts = RankSEGOptions(output_mode=mode, guard=True)
        ref, ref_info = decide(probs, opts, return_info=True)
        assert bool(ref_info["fallback"].any()), mode  # the guard acts
        for data, dev in ((probs.to(device), None), (probs, device), (probs, "cpu")):
            out, info = decide(data, opts.replace(device=dev), return_info=True)
            assert out.device == data.device and torch.equal(out.cpu(), ref), (mode, dev)
            assert info["fallback"].device.type == torch.device(dev or data.device).type
            for key in ("fallback", "rankseg_volume", "argmax_volume", "uncertain_fraction"):
                assert torch.equal(info[key].cpu(), ref_info[key]), key


@pytest.mark.parametrize("chunk_size", [1, 13, 100])
def test_guard_does_not_depend_on_the_chunk_size(chunk_size, device):
    for probs, mode in zip(_fog_batch(), ("multiclass", "multilabel")):
        ref, ref_info = guarded_rankseg(probs, output_mode=mode, return_info=True)
        out, info = guarded_rankseg(probs.to(device), output_mode=mode, chunk_size=chunk_size, return_info=True)
        assert torch.equal(out.cpu(), ref)
        assert all(torch.equal(info[k].cpu(), ref_info[k]) for k in ref_info)


# ----------------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_uncertain=-0.1), r"Guard.max_uncertain must be a finite number >= 0"),
    (dict(max_uncertain=float("nan")), r"Guard.max_uncertain must be a finite number >= 0"),
    (dict(max_uncertain=float("inf")), r"Guard.max_uncertain must be a finite number >= 0"),
    (dict(max_uncertain=True), r"Guard.max_uncertain must be a finite number >= 0, got True"),
    (dict(max_uncertain="0.5"), r"Guard.max_uncertain must be a finite number >= 0"),
    (dict(max_growth=-1), r"Guard.max_growth must be a finite number >= 0"),
    (dict(band=(0.6, 0.4)), r"Guard.band must be \(low, high\) with 0 <= low < high <= 1"),
    (dict(band=(0.5, 0.5)), r"Guard.band must be \(low, high\)"),
    (dict(band=(-0.1, 0.5)), r"Guard.band must be \(low, high\)"),
    (dict(band=(0.1, 1.5)), r"Guard.band must be \(low, high\)"),
    (dict(band=(0.1,)), r"Guard.band must be \(low, high\)"),
    (dict(band="ab"), r"Guard.band must be \(low, high\)"),
    (dict(band=None), r"Guard.band must be \(low, high\)"),
], ids=str)
def test_guard_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Guard(**kwargs)


def test_guard_settings_are_normalised():
    g = Guard(max_uncertain=1, max_growth=0, band=[0, 1])
    assert g.band == (0.0, 1.0) and isinstance(g.band, tuple)
    assert Guard(band=np.array([0.1, 0.9])).band == (0.1, 0.9)


def test_resolve_guard_accepted_values():
    from rankseg_monai.guard import resolve_guard

    custom = Guard(max_uncertain=0.3)
    for off in (None, False, "off", " False ", "none"):
        assert resolve_guard(off) is None, off
    for on in (True, "on", "DEFAULT", " true "):
        assert resolve_guard(on) == Guard(), on
    assert resolve_guard(custom) is custom
    assert resolve_guard({"max_uncertain": 0.3}) == custom
    assert resolve_guard({"band": [0.1, 0.9]}) == Guard(band=(0.1, 0.9))
    assert resolve_guard({}) == Guard()
    with pytest.raises(ValueError, match=r"unknown guard settings \['max_fog'\]; known: \['band', 'max_growth', "
                                         r"'max_uncertain'\]"):
        resolve_guard({"max_fog": 1})
    assert resolve_guard(np.bool_(True)) == Guard() and resolve_guard(np.bool_(False)) is None  # like clamp, softmax
    for bad in ("bogus", 1, 0, 0.5, [0.3]):
        with pytest.raises(TypeError, match=r"guard must be None/False \(off\), True \(defaults\), a "
                                            r"rankseg_monai.guard.Guard or a dict of its settings \(max_uncertain, "
                                            r"max_growth, band\)"):
            resolve_guard(bad)
