"""rankseg_monai.calibration.scaling: temperature and vector scaling (fit, apply) and the temperature JSON file.

Synthetic data (tests/generators.py): a calibrated model's logits ``z`` (soft-edged blobs), the truth drawn
voxel-wise from ``softmax(z)`` / ``sigmoid(z)``, and a miscalibrated model whose logits are ``k z`` for a known
``k``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from generators import CALIBRATION_SHAPE, calibrated_softmax_cases, draw_labels, ellipsoid_field
from oracle import label_dice

from rankseg_monai.calibration import (
    apply_temperature,
    apply_vector_scaling,
    fit_temperature,
    fit_vector_scaling,
    load_temperature,
    save_temperature,
)
from rankseg_monai.functional import rankseg


@pytest.fixture(scope="module")
def softmax_cases():
    """6 calibrated 3-class cases (true logits, drawn labels)."""
    return calibrated_softmax_cases(6)


# ----------------------------------------------------------------------------------------------- temperature fit
def _fisher_rel_se_softmax(logits: list[torch.Tensor], T: float) -> float:
    """Relative standard error of the fitted temperature: 1 / sqrt(Fisher information of beta = 1/T) divided by
    beta, with the information sum_i Var_{softmax(z_i / T)}(z_i)."""
    z = torch.cat([x.reshape(x.shape[0], -1).T for x in logits]).double()
    q = torch.softmax(z / T, 1)
    info = ((q * z**2).sum(1) - (q * z).sum(1) ** 2).sum()
    return float(T / info.sqrt())


@pytest.mark.parametrize("k", [0.4, 2.5])
def test_fit_temperature_recovers_the_distortion_softmax(softmax_cases, k):
    """Model logits = k x calibrated logits: the NLL-optimal temperature is k.  The estimate's error is a
    maximum-likelihood error, so the tolerance is 4 standard errors from the Fisher information (computed here,
    about 1%) plus the optimiser's tolerance; the standard error itself must be small for the test to mean
    something."""
    logits = [z * k for z, _ in softmax_cases[:3]]
    labels = [y for _, y in softmax_cases[:3]]
    T, info = fit_temperature(logits, labels, max_voxels=None, return_info=True)
    assert T.dtype == torch.float64 and T.shape == (1,)
    se = _fisher_rel_se_softmax(logits, float(T))
    assert se < 0.02
    assert abs(float(T) / k - 1) < 4 * se + 1e-4
    assert info["nll_after"] < info["nll_before"] and info["voxels"] == 3 * math.prod(CALIBRATION_SHAPE)
    # a systematic subsample estimates the same temperature within its (larger) standard error
    T_sub = fit_temperature(logits, labels, max_voxels=20_000)
    assert abs(float(T_sub) / k - 1) < 4 * se * math.sqrt(3 * math.prod(CALIBRATION_SHAPE) / 20_000) + 1e-4


def test_fit_temperature_per_class_sigmoid_recovers_each_channel():
    """Two sigmoid channels distorted by different factors; per_class=True recovers both (Fisher tolerance)."""
    rng = np.random.default_rng(7)
    ks = (0.5, 2.0)
    logits, labels, zs = [], [], []
    for _ in range(3):
        z = torch.stack([(ellipsoid_field(rng) / 0.8).clamp(-7, 7) for _ in ks])
        y = torch.from_numpy(rng.random(z.shape)) < torch.sigmoid(z)
        logits.append(z * torch.tensor(ks, dtype=torch.float64).view(-1, 1, 1, 1))
        labels.append(y.to(torch.uint8))
        zs.append(z)
    T = fit_temperature(logits, labels, mode="sigmoid", per_class=True, max_voxels=None)
    assert T.shape == (2,)
    for c, k in enumerate(ks):
        z = torch.cat([x[c].reshape(-1) for x in zs])  # calibrated logits; information of beta at the truth
        p = torch.sigmoid(z)
        se = float(1.0 / (z**2 * p * (1 - p)).sum().sqrt())  # relative SE of beta = SE of T/k
        assert se < 0.03
        assert abs(float(T[c]) / k - 1) < 4 * se + 1e-4
    single = fit_temperature(logits, labels, mode="sigmoid")
    assert single.shape == (1,) and 0.5 < float(single) < 2.0


def test_fit_vector_scaling_recovers_scale_and_bias():
    rng = np.random.default_rng(8)
    zs, labels = [], []
    for _ in range(3):
        z = (ellipsoid_field(rng) / 0.8).clamp(-7, 7)[None]
        zs.append(z)
        labels.append((torch.from_numpy(rng.random(z.shape)) < torch.sigmoid(z)).long())
    k, b = 0.5, 1.5  # model logits = k z + b  ->  z = model / k - b / k
    params = fit_vector_scaling([k * z + b for z in zs], labels, mode="sigmoid", max_voxels=None)
    assert float(params["temperature"][0]) == pytest.approx(k, rel=0.05)
    assert float(params["bias"][0]) == pytest.approx(-b / k, abs=0.15)
    p = apply_vector_scaling(k * zs[0] + b, params, mode="sigmoid")
    assert float((p - torch.sigmoid(zs[0])).abs().max()) < 0.05


def test_apply_temperature_matches_the_transform_option(tmp_path, softmax_cases):
    from rankseg_monai.transforms import RankSEG

    z = softmax_cases[0][0].float() * 0.4
    T = torch.tensor([0.4], dtype=torch.float64)
    path = save_temperature(tmp_path / "t.json", T, {"model": "test"})
    loaded = load_temperature(path)
    probs = apply_temperature(z, loaded)
    torch.testing.assert_close(probs, torch.softmax(z / 0.4, 0))
    out = RankSEG(softmax=True, temperature=loaded)(z)
    assert torch.equal(out[0].long(), rankseg(probs[None])[0])
    batched = apply_temperature(z[None], torch.tensor([0.3, 0.4, 0.5]), dim=1)
    torch.testing.assert_close(batched[0], torch.softmax(z / torch.tensor([0.3, 0.4, 0.5]).view(3, 1, 1, 1), 0))


def test_fit_temperature_rejects_bad_input(softmax_cases):
    z, y = softmax_cases[0]
    with pytest.raises(ValueError, match="mode"):
        fit_temperature([z], [y], mode="relu")
    with pytest.raises(ValueError, match="labels"):
        fit_temperature([z], [y + 3])
    with pytest.raises(ValueError, match="got 2 logits but 1 labels"):
        fit_temperature([z, z], [y])
    with pytest.raises(ValueError, match="at least 2 channels"):
        fit_temperature([z[:1]], [y])
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature([z], [y], bounds=(2.0, 3.0))
    with pytest.warns(UserWarning, match="bounds"):
        fit_temperature([z * 100], [y], bounds=(0.5, 2.0))


# ----------------------------------------------------------------------------------- decisions after calibration
def test_calibrated_rankseg_beats_argmax_and_uncalibrated_rankseg_does_not(softmax_cases):
    """Flattened model (k = 0.4).  A temperature fitted on 2 cases, applied to 4 others with 3 drawn truths each
    (24 Dice values per class): calibrated RankSEG beats argmax on average, by more than 3 standard errors of
    the paired difference; uncalibrated RankSEG on the same cases loses to argmax."""
    k = 0.4
    T = fit_temperature([z * k for z, _ in softmax_cases[:2]], [y for _, y in softmax_cases[:2]])
    gain_cal, gain_raw = [], []
    rng = np.random.default_rng(5)
    for z, _ in softmax_cases[2:]:
        p = torch.softmax(z * k, 0).float()[None]
        pc = torch.softmax(z * k / T, 0).float()[None]
        am, raw, cal = p.argmax(1)[0], rankseg(p, pruning_prob="auto")[0], rankseg(pc, pruning_prob="auto")[0]
        for _ in range(3):
            y = draw_labels(torch.softmax(z, 0), rng)[0]
            for c in (1, 2):
                gain_cal.append(label_dice(cal, y, c) - label_dice(am, y, c))
                gain_raw.append(label_dice(raw, y, c) - label_dice(am, y, c))
    gain_cal, gain_raw = np.asarray(gain_cal), np.asarray(gain_raw)
    se = gain_cal.std(ddof=1) / math.sqrt(len(gain_cal))
    assert gain_cal.mean() > 3 * se
    assert gain_raw.mean() < 0


# ------------------------------------------------------------------------------------------------------ the file
def test_temperature_json_round_trip(tmp_path):
    T = torch.tensor([0.731, 1.25, 2.0], dtype=torch.float64)
    meta = {"model": "unet", "mode": "softmax", "nll": [0.1, 0.09]}
    path = save_temperature(tmp_path / "sub" / "temperature.json", T, meta)
    assert sorted(os.listdir(path.parent)) == ["temperature.json"]  # no temporary file left
    doc = json.loads(path.read_text())
    assert doc["format"] == "rankseg-monai/temperature" and doc["version"] == 1
    loaded, m = load_temperature(path, return_meta=True)
    assert loaded.dtype == torch.float64 and torch.equal(loaded, T) and m == meta
    save_temperature(path, 1.5)  # overwrite, scalar
    assert torch.equal(load_temperature(path), torch.tensor([1.5], dtype=torch.float64))
    for bad in (0.0, -1.0, float("nan"), [], [1.0, float("inf")]):
        with pytest.raises(ValueError):
            save_temperature(tmp_path / "bad.json", bad)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_temperature(tmp_path / "bad.json", 1.0, {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a temperature file"):
        load_temperature(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        load_temperature(tmp_path / "broken.json")
