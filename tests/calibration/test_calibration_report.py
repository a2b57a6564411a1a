"""rankseg_monai.calibration.report: reliability bins and ECE (against MONAI), the verdicts on calibrated and
flattened models, the sigmoid mode, input checks, the plot."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from generators import calibrated_softmax_cases

from rankseg_monai.calibration import calibration_report, plot_reliability, reliability_bins


@pytest.fixture(scope="module")
def softmax_cases():
    """6 calibrated 3-class cases (true logits, drawn labels)."""
    return calibrated_softmax_cases(6)


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


def test_report_expected_dice_against_actual(softmax_cases):
    """The report's expected Dice of RankSEG's masks equals functional.expected_score per case, and its MAE is the
    mean |estimate - Dice|: small on the calibrated model (at most 0.0135 here), several times larger on the
    flattened one (0.037-0.081)."""
    from rankseg_monai.functional import expected_score, rankseg

    labels = [y for _, y in softmax_cases]
    mae = {}
    for scale in (1.0, 0.3):
        probs = [torch.softmax(z * scale, 0) for z, _ in softmax_cases]
        report = calibration_report(probs, labels)
        est, act = [], []
        for p, y in zip(probs, labels):
            masks = rankseg(p[None], pruning_prob="auto") == torch.arange(3).view(1, 3, *([1] * (p.dim() - 1)))
            truth = y == torch.arange(3).view(3, *([1] * (p.dim() - 1)))
            est.append(expected_score(p[None], masks)[0])
            inter = (masks[0] & truth).flatten(1).sum(1).double()
            total = masks[0].flatten(1).sum(1).double() + truth.flatten(1).sum(1).double()
            act.append(torch.where(total > 0, 2 * inter / total.clamp(min=1), 1.0))
        est, act = torch.stack(est), torch.stack(act)
        for c in report.classes:
            assert c.expected_dice_rankseg == pytest.approx(float(est[:, c.index].mean()), abs=1e-9)
            assert c.expected_dice_mae == pytest.approx(float((est - act)[:, c.index].abs().mean()), abs=1e-9)
        mae[scale] = [c.expected_dice_mae for c in report.classes]
        assert "E[Dice] RankSEG" in str(report)
    assert max(mae[1.0]) < 0.02
    assert min(mae[0.3]) > 2 * max(mae[1.0])
    assert calibration_report(probs, labels, compare_decisions=False).classes[0].expected_dice_mae is None


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
