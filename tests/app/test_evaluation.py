"""rankseg_monai.app.evaluation: values equal MONAI's metrics; summaries count NaN and empty predictions."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from generators import make_case
from oracle import monai_dice_hd95

from rankseg_monai.app import evaluation as ev
from rankseg_monai.app.io import VolumeError
from rankseg_monai.functional import rankseg

SPACING = (0.7, 1.1, 2.5)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (math.isnan(x) and math.isnan(y)) or x == y, (a, b)


@pytest.fixture(scope="module")
def case():
    return make_case(seed=3, num_classes=4)


def test_compare_case_equals_monai_on_functional_output(case):
    probs, label, _ = case
    res = ev.compare_case(probs, label, SPACING, case="c3", return_predictions=True)
    assert res["classes"] == [1, 2, 3] and res["methods"] == ["argmax", "rankseg"]
    expected_rankseg = rankseg(probs[None], metric="dice", pruning_prob="auto")[0]  # the deployed default
    np.testing.assert_array_equal(res["predictions"]["rankseg"], expected_rankseg)
    np.testing.assert_array_equal(res["predictions"]["argmax"], probs.argmax(0))
    assert not np.array_equal(expected_rankseg, probs.argmax(0))  # the comparison is not vacuous
    for method, pred in (("argmax", probs.argmax(0)), ("rankseg", expected_rankseg)):
        dice, hd = monai_dice_hd95(pred, label, [1, 2, 3], SPACING)
        assert_same(res["metrics"][method]["dice"], dice)
        assert_same(res["metrics"][method]["hd95"], hd)
        assert res["metrics"][method]["pred_voxels"] == [int((pred == c).sum()) for c in (1, 2, 3)]
    assert res["true_voxels"] == [int((label == c).sum()) for c in (1, 2, 3)]
    rows = ev.case_rows(res)
    assert [r["class"] for r in rows] == [1, 2, 3]
    for i, r in enumerate(rows):
        # one convention for both metrics: RankSEG minus argmax
        assert r["dice_diff"] == res["metrics"]["rankseg"]["dice"][i] - res["metrics"]["argmax"]["dice"][i]
        assert r["hd95_diff_mm"] == res["metrics"]["rankseg"]["hd95"][i] - res["metrics"]["argmax"]["hd95"][i]


def test_decisions_in_a_narrow_label_dtype(case):
    probs, label, _ = case
    for method in ("argmax", "rankseg"):
        wide = ev.decide(probs, method)
        assert wide.dtype == np.int64  # the default is unchanged
        for dtype in (np.uint8, np.int16, "float32"):
            narrow = ev.decide(probs, method, label_dtype=dtype)
            assert narrow.dtype == np.dtype(dtype) and np.array_equal(narrow, wide)
    with pytest.raises(ValueError, match="cannot hold the label"):
        ev.decide(np.full((300, 2, 2), 1 / 300, dtype=np.float32), "argmax", label_dtype=np.int8)
    fg = probs[1:2]  # one foreground channel: binary 0/1 in the requested dtype
    assert ev.decide(fg, "rankseg", label_dtype=np.uint8).dtype == np.uint8
    # compare_case decides in uint8 here (4 classes) and scores exactly as with int64 maps
    res = ev.compare_case(probs, label, SPACING, return_predictions=True)
    assert all(p.dtype == np.uint8 for p in res["predictions"].values())
    res64 = ev.compare_case(probs, label, SPACING, label_dtype=np.int64)
    for method in ("argmax", "rankseg"):
        for key in ("dice", "hd95", "pred_voxels"):
            assert_same(res["metrics"][method][key], res64["metrics"][method][key])


def test_iou_options_reach_the_solver(case):
    probs, label, _ = case
    res = ev.compare_case(probs, label, SPACING, classes=[2], metric="iou", pruning_prob=0.0,
                          methods=("rankseg",), return_predictions=True)
    np.testing.assert_array_equal(res["predictions"]["rankseg"],
                                  rankseg(probs[None], metric="iou", pruning_prob=0.0)[0])
    assert res["classes"] == [2] and list(res["metrics"]) == ["rankseg"]


def test_pruned_class_gives_empty_prediction_and_nan_hd95():
    # class 2 is the argmax in a small region but never above 0.5: RankSEG's pruning empties it
    shape = (12, 12, 12)
    probs = np.zeros((3, *shape), np.float32)
    probs[0] = 0.9
    probs[1] = 0.1
    probs[:, 2:5, 2:5, 2:5] = np.array([0.30, 0.25, 0.45], np.float32)[:, None, None, None]
    probs[:, 7:10, 7:10, 7:10] = np.array([0.05, 0.9, 0.05], np.float32)[:, None, None, None]
    label = np.zeros(shape, np.int64)
    label[2:5, 2:5, 2:5] = 2
    label[7:10, 7:10, 7:9] = 1
    res = ev.compare_case(probs, label, (1.0, 1.0, 1.0), case="p", pruning_prob=0.5)  # rankseg 0.0.8's rule
    assert res["metrics"]["argmax"]["pred_voxels"][1] == 27
    assert res["metrics"]["rankseg"]["pred_voxels"][1] == 0
    assert res["metrics"]["argmax"]["dice"][1] == 1.0 and res["metrics"]["rankseg"]["dice"][1] == 0.0
    assert math.isnan(res["metrics"]["rankseg"]["hd95"][1]) and res["metrics"]["argmax"]["hd95"][1] == 0.0

    table = ev.summarize([res, res])
    row2 = next(r for r in table if r["class"] == 2)
    assert row2["empty_pred_rankseg"] == 2 and row2["empty_pred_argmax"] == 0
    assert row2["hd95_undefined_rankseg"] == 2 and row2["hd95_n_rankseg"] == 0
    assert math.isnan(row2["hd95_mean_rankseg"]) and row2["hd95_paired_n"] == 0
    assert row2["dice_losses"] == 2 and row2["dice_mean_diff"] == -1.0


def test_summarize_counts_by_hand():
    def result(case, da, dr, ha, hr, va, vr, truth):
        return {"case": case, "classes": [1], "methods": ["argmax", "rankseg"], "true_voxels": [truth],
                "metrics": {"argmax": {"dice": [da], "hd95": [ha], "pred_voxels": [va]},
                            "rankseg": {"dice": [dr], "hd95": [hr], "pred_voxels": [vr]}}}

    nan = math.nan
    results = [
        result("a", 0.5, 0.7, 4.0, 2.0, 10, 12, 11),   # RankSEG better on both
        result("b", 0.8, 0.6, 1.0, 3.0, 10, 9, 11),    # worse on both
        result("c", 0.6, 0.6, 2.0, 2.0, 10, 10, 11),   # tie
        result("d", 0.0, 0.4, nan, 5.0, 0, 3, 4),      # argmax empty: HD95 undefined for argmax
        result("e", 1.0, 1.0, nan, nan, 0, 0, 0),      # empty truth, both empty
    ]
    table = ev.summarize(results)
    assert [r["class"] for r in table] == [1, "all"]
    row = table[0]
    assert row["cases"] == 5 and row["empty_truth"] == 1
    assert row["dice_mean_argmax"] == pytest.approx((0.5 + 0.8 + 0.6 + 0.0 + 1.0) / 5)
    assert row["dice_median_rankseg"] == pytest.approx(0.6)
    assert row["dice_mean_diff"] == pytest.approx((0.2 - 0.2 + 0 + 0.4 + 0) / 5)
    assert (row["dice_wins"], row["dice_losses"], row["dice_ties"]) == (2, 1, 2)
    assert row["hd95_n_argmax"] == 3 and row["hd95_undefined_argmax"] == 2 and row["hd95_undefined_rankseg"] == 1
    assert row["hd95_mean_argmax"] == pytest.approx(7.0 / 3) and row["hd95_mean_rankseg"] == pytest.approx(3.0)
    assert row["hd95_paired_n"] == 3 and row["hd95_mean_diff_mm"] == pytest.approx((-2.0 + 2.0 + 0.0) / 3)
    assert (row["hd95_wins"], row["hd95_losses"], row["hd95_ties"]) == (1, 1, 1)
    assert row["empty_pred_argmax"] == 2 and row["empty_pred_rankseg"] == 1
    text = ev.format_table(table)
    assert "2/1/2" in text and "HD95 NaN" in text
    assert [line.split()[0] for line in text.splitlines()[2:] if line[:1].strip()][:2] == ["1", "all"]


def test_csv_and_plot(tmp_path, case):
    probs, label, _ = case
    results = [ev.compare_case(probs, label, SPACING, case="x"),
               ev.compare_case(*make_case(seed=4, num_classes=4)[:2], SPACING, case="y")]
    path = ev.write_csv(results, tmp_path / "per_case.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case"], r["class"]) for r in rows] == [(c, str(k)) for c in "xy" for k in (1, 2, 3)]
    flat = [r for res in results for r in ev.case_rows(res)]
    for r, ref in zip(rows, flat):
        for key in ("dice_argmax", "dice_rankseg", "hd95_argmax", "hd95_rankseg", "dice_diff", "hd95_diff_mm"):
            assert float(r[key]) == ref[key] or (math.isnan(float(r[key])) and math.isnan(ref[key]))
    table = ev.summarize(results)
    ev.write_summary_csv(table, tmp_path / "summary.csv")
    with open(tmp_path / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    assert [r["class"] for r in summary] == ["1", "2", "3", "all"]
    png = ev.plot_differences(results, tmp_path / "differences.png")
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(head[16:20], "big") >= 700 and int.from_bytes(head[20:24], "big") == 440
    assert sorted(p.name for p in tmp_path.iterdir()) == ["differences.png", "per_case.csv", "summary.csv"]


def test_binary_single_channel():
    probs, label, _ = make_case(seed=5, num_classes=2)
    fg = probs[1:]
    res = ev.compare_case(fg, label, SPACING, return_predictions=True)
    assert res["classes"] == [1]
    np.testing.assert_array_equal(res["predictions"]["argmax"], (fg[0] > 0.5).astype(np.int64))
    expected = rankseg(fg[None], output_mode="multilabel", pruning_prob="auto")[0, 0]
    np.testing.assert_array_equal(res["predictions"]["rankseg"], expected.astype(np.int64))
    masks = ev.decide(probs, output_mode="multilabel")
    assert masks.dtype == bool and masks.shape == probs.shape


def test_errors_name_the_fix(case):
    probs, label, _ = case
    bad = label.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(VolumeError, match=r"values \(7\) outside the class range \[0, 4\)"):
        ev.compare_case(probs, bad, SPACING)
    with pytest.raises(VolumeError, match="resample the labels"):
        ev.compare_case(probs, label[:, :, :-1], SPACING)
    with pytest.raises(ValueError, match="outside"):
        ev.compare_case(probs, label, SPACING, classes=[5])
    with pytest.raises(ValueError, match="output_mode='multiclass'"):
        ev.compare_case(probs, label, SPACING, output_mode="multilabel")
    with pytest.raises(ValueError, match="spacing"):
        ev.evaluate_masks({"a": label}, label, (1.0, 1.0), [1])
