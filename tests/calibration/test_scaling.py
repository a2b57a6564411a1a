"""rankseg_monai.calibration: reliability report, temperature scaling, the guard, and the JSON file.

Synthetic data: a calibrated model's logits ``z`` (soft-edged blobs), the truth drawn voxel-wise from
``softmax(z)`` / ``sigmoid(z)``, and a miscalibrated model whose logits are ``k z`` for a known ``k``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from rankseg_monai.calibration import (
    Guard,
    apply_temperature,
    apply_vector_scaling,
    calibration_report,
    fit_temperature,
    fit_vector_scaling,
    guarded_rankseg,
    load_temperature,
    plot_reliability,
    reliability_bins,
    save_temperature,
)
from rankseg_monai.functional import rankseg

torch.set_num_threads(1)
SHAPE = (24, 24, 16)


def _blobs(rng: np.random.Generator, shape=SHAPE, n=(1, 3), radius=(2.5, 6.0)) -> torch.Tensor:
    """Signed-distance-like field (voxels, > 0 inside) of the union of a few random ellipsoids."""
    grids = np.meshgrid(*[np.arange(s) + 0.5 for s in shape], indexing="ij")
    d = np.full(shape, -np.inf)
    for _ in range(int(rng.integers(n[0], n[1] + 1))):
        R = rng.uniform(*radius) * rng.uniform(0.7, 1.3, 3)
        c = [rng.uniform(min(R[i] + 1, s / 2), max(s - R[i] - 1, s / 2)) for i, s in enumerate(shape)]
        d = np.maximum(d, (1 - np.sqrt(sum(((g - ci) / Ri) ** 2 for g, ci, Ri in zip(grids, c, R)))) * R.min())
    return torch.from_numpy(d)


def softmax_logits(seed: int, shape=SHAPE, width=(0.6, 2.0)) -> torch.Tensor:
    """Calibrated 3-class logits: background 0, two foreground classes with soft edges (``width`` voxels),
    saturating at +-L."""
    rng = np.random.default_rng(seed)
    z = torch.zeros(3, *shape, dtype=torch.float64)
    for c in (1, 2):
        z[c] = (_blobs(rng, shape) / rng.uniform(*width)).clamp(-rng.uniform(4, 8), rng.uniform(4, 8))
    return z


def draw_labels(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(1, *spatial) label map drawn voxel-wise from the class probabilities (C, *spatial)."""
    flat = p.reshape(p.shape[0], -1).double()
    u = torch.from_numpy(rng.random(flat.shape[1]))
    return (u[None] > torch.cumsum(flat, 0)).sum(0).clamp(max=p.shape[0] - 1).reshape(1, *p.shape[1:])


def dice(pred: torch.Tensor, truth: torch.Tensor, c: int) -> float:
    a, b = pred == c, truth == c
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / s


@pytest.fixture(scope="module")
def softmax_cases():
    """6 calibrated 3-class cases (true logits, drawn labels)."""
    out = []
    for seed in range(6):
        z = softmax_logits(seed)
        out.append((z, draw_labels(torch.softmax(z, 0), np.random.default_rng(100 + seed))))
    return out


# --------------------------------------------------------------------------------------- temperature fit
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
    assert info["nll_after"] < info["nll_before"] and info["voxels"] == 3 * math.prod(SHAPE)
    # a systematic subsample estimates the same temperature within its (larger) standard error
    T_sub = fit_temperature(logits, labels, max_voxels=20_000)
    assert abs(float(T_sub) / k - 1) < 4 * se * math.sqrt(3 * math.prod(SHAPE) / 20_000) + 1e-4


def test_fit_temperature_per_class_sigmoid_recovers_each_channel():
    """Two sigmoid channels distorted by different factors; per_class=True recovers both (Fisher tolerance)."""
    rng = np.random.default_rng(7)
    ks = (0.5, 2.0)
    logits, labels, zs = [], [], []
    for _ in range(3):
        z = torch.stack([(_blobs(rng) / 0.8).clamp(-7, 7) for _ in ks])
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
        z = (_blobs(rng) / 0.8).clamp(-7, 7)[None]
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


# ------------------------------------------------------------------------- decisions after calibration
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
                gain_cal.append(dice(cal, y, c) - dice(am, y, c))
                gain_raw.append(dice(raw, y, c) - dice(am, y, c))
    gain_cal, gain_raw = np.asarray(gain_cal), np.asarray(gain_raw)
    se = gain_cal.std(ddof=1) / math.sqrt(len(gain_cal))
    assert gain_cal.mean() > 3 * se
    assert gain_raw.mean() < 0


# ----------------------------------------------------------------------------------------------- the guard
def _fog_cases(n: int, f: float):
    """Sigmoid model with a sharp calibrated object, flattened by 1/f into a probability fog; truths drawn from
    the calibrated probabilities."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        z = (_blobs(rng, (32, 32, 24), n=(1, 2), radius=(6, 9)) / 0.5).clamp(-9, 9)[None]
        y = torch.from_numpy(rng.random(z.shape)) < torch.sigmoid(z)
        out.append((torch.sigmoid(z / f).float(), y))
    return out


def test_guard_restores_dice_after_the_collapse():
    """Issue #8: a flattened model (logits / 3.5: every voxel uncertain).  Plain RankSEG loses badly to
    thresholding; the guard switches the class back and matches thresholding exactly."""
    d_thr, d_raw, d_guard = [], [], []
    for p, y in _fog_cases(4, 3.5):
        g, info = guarded_rankseg(p[None], output_mode="multilabel", pruning_prob="auto", return_info=True)
        assert bool(info["fallback"].all()) and float(info["uncertain_fraction"]) > 0.9
        raw = rankseg(p[None], output_mode="multilabel", pruning_prob="auto")
        for lst, m in ((d_thr, p > 0.5), (d_raw, raw[0]), (d_guard, g[0])):
            lst.append(dice(m.long(), y.long(), 1))
    assert np.mean(d_raw) < np.mean(d_thr) - 0.1
    assert d_guard == d_thr


def test_guard_multiclass_fog_gives_argmax_labels_for_the_switched_class():
    p1, _ = _fog_cases(1, 3.5)[0]
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
    z[1] = _blobs(rng, (32, 32, 24), n=(1, 1), radius=(6, 8)).clamp(-8, 8)
    z[2] = 0.3 * (_blobs(rng, (32, 32, 24), n=(1, 1), radius=(3, 4)) / 0.5).clamp(-8, 8)
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


# ------------------------------------------------------------------------------------------------- report
def test_reliability_bins_and_ece_agree_with_monai():
    from monai.metrics import CalibrationErrorMetric

    g = torch.Generator().manual_seed(3)
    probs = [torch.softmax(torch.randn(3, 10, 12, generator=g) * 2, 0) for _ in range(3)]
    labels = [torch.randint(0, 3, (1, 10, 12), generator=g) for _ in range(3)]
    onehot = [(y == torch.arange(3).view(3, 1, 1)).float() for y in labels]
    report = calibration_report(probs, labels, n_bins=10, compare_decisions=False)
    # pooled over cases == MONAI on the cases concatenated along a spatial dim
    metric = CalibrationErrorMetric(num_bins=10, metric_reduction="none")
    monai_pooled = metric(torch.cat(probs, 1)[None], torch.cat(onehot, 1)[None])[0]
    for c in range(3):
        assert report.classes[c].ece == pytest.approx(float(monai_pooled[c]), abs=1e-6)
    per_case = CalibrationErrorMetric(num_bins=10, metric_reduction="none")
    for p, y in zip(probs, onehot):
        per_case(p[None], y[None])
    for c in range(3):
        assert report.classes[c].ece_case_mean == pytest.approx(float(per_case.aggregate()[:, c].mean()), abs=1e-6)
    # the bins themselves equal MONAI's calibration_binning
    from monai.metrics.calibration import calibration_binning

    count, sum_p, sum_y = reliability_bins(probs[0].reshape(3, -1), onehot[0].reshape(3, -1) > 0, 10)
    mp, mg, cnt = calibration_binning(probs[0][None], onehot[0][None], num_bins=10)
    torch.testing.assert_close(count, cnt[0].double())
    ok = cnt[0] > 0
    torch.testing.assert_close((sum_p / count.clamp(min=1))[ok], mp[0][ok].double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close((sum_y / count.clamp(min=1))[ok], mg[0][ok].double(), atol=1e-6, rtol=1e-6)


def test_report_on_calibrated_and_flattened_models(softmax_cases, tmp_path):
    probs = [torch.softmax(z, 0) for z, _ in softmax_cases]
    labels = [y for _, y in softmax_cases]
    good = calibration_report(probs, labels)
    for c in good.classes:
        # sum(p) is the expected volume: the drawn volume is within a few Poisson-binomial SDs (< 3% here)
        assert c.volume_ratio == pytest.approx(1.0, abs=0.03)
        assert c.holds and c.verdict.startswith(f"RankSEG's assumptions hold for class {c.index}")
        ok = np.asarray(c.bin_count) > 2000
        assert np.allclose(np.asarray(c.bin_mean_p)[ok], np.asarray(c.bin_frequency)[ok], atol=0.05)
    assert good.classes[1].dice_rankseg > good.classes[1].dice_argmax
    flat = calibration_report([torch.softmax(z * 0.3, 0) for z, _ in softmax_cases], labels)
    for c in flat.classes[1:]:
        assert not c.holds and c.volume_ratio > 1.5
        assert "do not hold" in c.verdict and "over-segment" in c.verdict and "fit_temperature" in c.verdict
        assert c.dice_rankseg < c.dice_argmax
    text = str(flat)
    assert "NO" in text and "E[vol]/vol" in text
    json.dumps(flat.to_dict())  # serialisable
    png = plot_reliability(flat, tmp_path / "rel.png", classes=[1, 2])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f for f in os.listdir(tmp_path) if f != "rel.png"] == []


def test_report_sigmoid_mode_and_input_checks():
    p = torch.full((2, 4, 4), 0.5)
    y = torch.zeros(2, 4, 4, dtype=torch.uint8)
    y[0, :2] = 1
    rep = calibration_report([p], [y], mode="sigmoid", n_bins=5)
    assert [c.true_volume for c in rep.classes] == [8.0, 0.0]
    assert rep.classes[1].volume_ratio == math.inf and not rep.classes[1].holds
    with pytest.raises(ValueError, match="label map but mode='sigmoid'"):
        calibration_report([p], [torch.zeros(1, 4, 4, dtype=torch.long)], mode="sigmoid")
    with pytest.raises(ValueError, match="within"):
        calibration_report([p * 3], [y], mode="sigmoid")
    with pytest.raises(ValueError, match="0/1"):
        calibration_report([p], [y * 2], mode="sigmoid")
    with pytest.raises(ValueError, match="exactly one class"):
        calibration_report([p], [y], mode="softmax")


# ------------------------------------------------------------------------------------------------ the file
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
