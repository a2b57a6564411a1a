"""The calibration object, its file and its one application (rankseg_monai/calibrator.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rankseg_monai.calibrator as calibrator
from rankseg_monai import RankSEG, RankSEGd
from rankseg_monai._files import sha256_file
from rankseg_monai.calibrator import (
    EPS,
    Calibration,
    CalibrationMismatch,
    apply_calibration,
    calibration_inputs,
    load_calibration,
)
from rankseg_monai.functional import decide
from rankseg_monai.options import RankSEGOptions


def _softmax_cal(t, n=3, **kw):
    method = "temperature" if len(t) == 1 else "per-class-temperature"
    return Calibration(method, "class-probabilities", t, channels=list(range(n)), **kw)


def test_temperature_on_log_probabilities_is_temperature_on_logits():
    """softmax(log softmax(z) / T) == softmax(z / T): log p differs from z by a per-voxel constant."""
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(3, 8, 9, 5, generator=g, dtype=torch.float64)
    for t in (0.3, 1.0, 2.5):
        got = apply_calibration(torch.softmax(z, 0), _softmax_cal([t]))
        assert torch.allclose(got, torch.softmax(z / t, 0), atol=1e-12)


def test_sigmoid_scaling_on_probabilities_is_scaling_on_logits():
    g = torch.Generator().manual_seed(1)
    z = 4 * torch.randn(2, 30, generator=g, dtype=torch.float64)
    cal = Calibration("vector", "channel-probabilities", [0.5, 2.0], channels=[0, 1], bias=[0.3, -1.0])
    got = apply_calibration(torch.sigmoid(z), cal)
    want = torch.sigmoid(z / torch.tensor([[0.5], [2.0]], dtype=torch.float64)
                         + torch.tensor([[0.3], [-1.0]], dtype=torch.float64))
    assert torch.allclose(got, want, atol=1e-10)


def test_per_class_softmax_scales_each_log_probability():
    p = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 0)
    t = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    got = apply_calibration(p, _softmax_cal(t.tolist()))
    assert torch.allclose(got, torch.softmax(torch.log(p) / t[:, None], 0), atol=1e-12)
    assert torch.allclose(got.sum(0), torch.ones(50, dtype=torch.float64))


def test_exact_zeros_and_ones_of_float16_files_are_clipped_to_eps():
    """Stored 0 and 1 (float16) give finite results: 0 reads as EPS = 2**-24 (the smallest float16), so with T = 2
    a stored 0 becomes exactly sigmoid(logit(EPS) / 2); values inside [EPS, 1 - EPS] are untouched."""
    assert EPS == 2.0 ** -24 == float(np.finfo(np.float16).smallest_subnormal)
    p = torch.tensor([[0.0, 1.0, 0.25, 6e-8]], dtype=torch.float16)
    z = calibration_inputs(p, "sigmoid")
    assert z.dtype == torch.float32 and bool(torch.isfinite(z).all())
    assert float(z[0, 0]) == pytest.approx(np.log(EPS / (1 - EPS)), rel=1e-6)
    assert float(z[0, 1]) == pytest.approx(-np.log(EPS / (1 - EPS)), rel=1e-6)
    assert float(z[0, 2]) == pytest.approx(np.log(0.25 / 0.75), rel=1e-6)
    flat = Calibration("temperature", "channel-probabilities", [2.0], channels=[0])
    q = apply_calibration(p, flat)
    assert q.dtype == torch.float32 and bool(torch.isfinite(q).all())
    assert float(q[0, 0]) == pytest.approx(1 / (1 + np.sqrt((1 - EPS) / EPS)), rel=1e-5)  # sigmoid(logit(EPS)/2)
    assert float(q[0, 1]) == pytest.approx(1 - float(q[0, 0]), abs=1e-7)
    soft = apply_calibration(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16), _softmax_cal([0.5], 2))
    assert torch.equal(soft, torch.eye(2)) or torch.allclose(soft, torch.eye(2), atol=1e-12)


def test_application_in_chunks_equals_one_piece(monkeypatch):
    p = torch.softmax(torch.randn(1, 3, 7, 11, generator=torch.Generator().manual_seed(3)), 1)
    cal = _softmax_cal([0.7, 1.3, 0.9])
    whole = apply_calibration(p, cal, dim=1)
    monkeypatch.setattr(calibrator, "_CHUNK", 10)
    assert torch.allclose(apply_calibration(p, cal, dim=1), whole, rtol=0, atol=1e-6)
    assert torch.allclose(whole, apply_calibration(p[0], cal, dim=0)[None])


def test_file_round_trip_and_sha256(tmp_path):
    cal = Calibration("vector", "region-probabilities", [0.5, 1.5], channels=["liver", "tumour"], bias=[0.1, -0.2],
                      recommendation=["rankseg", "argmax"],
                      fingerprint={"structures": ["liver", "tumour"], "volume": {"min": [1, 2], "max": [3, 4]}},
                      fit={"cases": 4, "voxels": 1000}, version="x")
    path = cal.save(tmp_path / "calibration.json")
    back = load_calibration(path)
    assert back == cal and back.fingerprint == cal.fingerprint and back.fit == cal.fit
    assert sha256_file(path) == cal.sha256 == back.sha256
    assert back.argmax_channels == (1,) and back.without_recommendation().argmax_channels == ()
    assert json.loads(path.read_text())["activation"] == "sigmoid"


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format="other"), "is not a calibration file"),
    (lambda d: d.update(version=99), "calibration-file version 99; this rankseg-monai reads version 1"),
    (lambda d: d.update(method="platt"), "calibration method 'platt': use one of"),
    (lambda d: d.update(temperature=[1.0, 2.0]), "needs 1 temperature value"),
    (lambda d: d.update(temperature=[-1.0]), "must be > 0"),
    (lambda d: d.update(activation="sigmoid"), "contradicts input_kind"),
    (lambda d: d.update(recommendation=["argmax"]), "recommendation must be one of"),
])
def test_bad_files_are_refused_naming_the_fix(tmp_path, edit, match):
    doc = _softmax_cal([0.5]).to_dict()
    edit(doc)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        load_calibration(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_calibration(path)


def test_mismatches_are_refused_before_any_work():
    cal = _softmax_cal([0.5], n=3)
    with pytest.raises(CalibrationMismatch, match="fitted on 3 channels .* but the data has 4"):
        apply_calibration(torch.full((4, 5), 0.25), cal)
    with pytest.raises(CalibrationMismatch, match="fitted on class-probabilities"):
        RankSEGOptions(sigmoid=True, output_mode="multilabel", calibration=cal)
    with pytest.raises(ValueError, match="fitted on 3 channels"):
        RankSEG(calibration=cal)(torch.full((2, 4, 4), 0.5))
    region = Calibration("temperature", "region-probabilities", [1.0], channels=["a", "b"])
    with pytest.raises(CalibrationMismatch, match="regions are a, b, the data's liver, tumour"):
        RankSEGOptions(regions={"liver": [1, 2], "tumour": [2]}, region_probs=True, calibration=region)


def test_recommended_argmax_class_keeps_argmax_the_others_rankseg():
    """A class whose held-out report recommends argmax gets argmax's mask, less what RankSEG gives to the classes it
    still decides (the guard's rewrite, keeping their claims)."""
    g = torch.Generator().manual_seed(4)
    noise = torch.softmax(0.7 * torch.randn(3, 200, generator=g), 0)
    p = torch.cat([noise, torch.tensor([[0.03, 0.95, 0.02]]).T.expand(3, 200),  # an organ (class 1)
                   torch.tensor([[0.05, 0.05, 0.9]]).T.expand(3, 20),  # a lesion (class 2) in it
                   torch.tensor([[0.05, 0.5, 0.45]]).T.expand(3, 20)], 1)[None]  # its rim: argmax says organ
    plain = decide(p, RankSEGOptions())
    assert not torch.equal(plain == 1, p.argmax(1) == 1)  # RankSEG changes class 1 here
    cal = _softmax_cal([1.0], recommendation=["rankseg", "argmax", "rankseg"])
    out, info = decide(p, RankSEGOptions(calibration=cal), return_info=True)
    am = p.argmax(1)
    # class 1 takes argmax's labels wherever RankSEG or argmax gives it class 1, except where RankSEG gives the voxel
    # to class 2 (still decided by RankSEG): its claims are kept
    touched = ((plain == 1) | (am == 1)) & (plain != 2)
    assert torch.equal(out, torch.where(touched, am, plain))
    assert bool(((am == 1) & (plain == 2)).any())  # the case the rule is about occurs here
    assert torch.equal(out == 1, (am == 1) & (plain != 2))
    assert info["calibration_argmax"].tolist() == [[False, True, False]]
    ignored = RankSEGOptions(calibration=cal.without_recommendation())
    assert torch.equal(decide(p, ignored), plain)


def test_transforms_take_a_path_or_object_and_calibrate_first(tmp_path):
    g = torch.Generator().manual_seed(5)
    z = 0.4 * torch.randn(3, 12, 12, generator=g)
    cal = _softmax_cal([0.4])
    path = cal.save(tmp_path / "calibration.json")
    want = RankSEG(softmax=True, temperature=0.4)(z)
    assert torch.equal(RankSEG(softmax=True, calibration=str(path))(z), want)
    assert torch.equal(RankSEG(calibration=cal)(torch.softmax(z, 0)), want)
    d = RankSEGd(keys="pred", softmax=True, calibration=path, expected_score=True)({"pred": z})
    assert torch.equal(d["pred"], want)
    exp = RankSEG(softmax=True, temperature=0.4, expected_score=True).decide_with_estimates(z)[1]
    assert torch.allclose(d["pred_expected_dice"], exp["rankseg"])


def test_transforms_flag_an_item_outside_the_fingerprint():
    fp = {"structures": [1, 2], "cases": 3, "volume": {"min": [10.0, 10.0], "max": [20.0, 20.0]},
          "uncertain": {"min": [0.0, 0.0], "max": [0.05, 0.05]}, "expected_dice": {"min": [0.8, 0.8], "max": [1, 1]}}
    cal = _softmax_cal([1.0], fingerprint=fp)
    p = torch.zeros(3, 40, 40)
    p[0] = 1.0
    p[:, :4, :4] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # class 1: 16 voxels, inside 10-20
    p[:, 10:14, :4] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # class 2: 16 voxels
    d = RankSEGd(keys="pred", calibration=cal, expected_score=True)({"pred": p})
    assert d["pred_outside_calibration"] == []
    p[:, 20:40] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # class 1 now 816 voxels: far outside
    d = RankSEGd(keys="pred", calibration=cal, expected_score=True)({"pred": p})
    assert len(d["pred_outside_calibration"]) == 1 and d["pred_outside_calibration"][0].startswith(
        "1: expected volume 816 voxels outside the calibration cases' 10-20")
    assert "pred_outside_calibration" not in RankSEGd(keys="pred", calibration=cal)({"pred": p})
