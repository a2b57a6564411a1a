"""The command line with regions and expected Dice: nnU-Net region models through --dataset-json, --regions on class
probabilities, evaluate per region with NSD, lesion-wise counts and expected-vs-actual Dice, the review list."""

from __future__ import annotations

import json

import numpy as np
import pytest
from generators import make_case, nested_region_probs
from volume_files import files_in, write_nnunet_case, write_sitk_labels

from rankseg_monai.app import evaluation as ev
from rankseg_monai.app import io as rio
from rankseg_monai.app.cli import main
from rankseg_monai.functional import expected_score, rankseg

BRATS_JSON = {"labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
              "regions_class_order": [1, 2, 3]}
LITS = {"liver": [1, 2], "tumour": [2]}



@pytest.fixture
def region_model_folder(tmp_path):
    folder = tmp_path / "nnunet_out"
    cases = {}
    for i in range(2):
        q = nested_region_probs(i)
        write_nnunet_case(folder, f"case_{i}", q)
        cases[f"case_{i}"] = q
    (tmp_path / "dataset.json").write_text(json.dumps(BRATS_JSON))
    return tmp_path, cases


def test_nnunet_region_model_through_dataset_json(region_model_folder, capsys):
    root, cases = region_model_folder
    out = root / "masks"
    rc = main(["predict", str(root / "nnunet_out"), "-o", str(out), "--dataset-json", str(root / "dataset.json"),
               "--flag-below", "0.99", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    regions = {k: v for k, v in BRATS_JSON["labels"].items() if k != "background"}
    for case, q in cases.items():
        mask = rio.load_labels(out / f"{case}.nii.gz").labels
        expected = rankseg(q[None], regions=regions, regions_class_order=[1, 2, 3], region_probs=True,
                           pruning_prob="auto")[0]
        np.testing.assert_array_equal(mask, expected)  # the same as the functional API, label for label
        record = json.loads((out / f"{case}.nii.gz.rankseg.json").read_text())
        assert record["settings"]["options"]["regions"] == {"whole_tumor": [1, 2, 3], "tumor_core": [2, 3],
                                                            "enhancing_tumor": [3]}
        assert record["settings"]["options"]["region_probs"] is True
        est = record["expected_score"]
        assert est["structures"] == ["whole_tumor", "tumor_core", "enhancing_tumor"]
        want = expected_score(q[None], expected[None], regions=regions, region_probs=True)[0]
        np.testing.assert_allclose(est["rankseg"], want, rtol=1e-12)
    rows = ev.read_rows(out / "expected_dice.csv")
    assert len(rows) == 2 * 3 and {r["structure"] for r in rows} == {"whole_tumor", "tumor_core", "enhancing_tumor"}
    assert all(r["review"] in ("0", "1") for r in rows)
    flagged = sorted({r["case"] for r in rows if r["review"] == "1"})
    assert f"review ({len(flagged)} case(s)" in err and all(c in err for c in flagged)
    # resume: nothing to do, the CSV is rebuilt from the records
    (out / "expected_dice.csv").unlink()
    assert main(["predict", str(root / "nnunet_out"), "-o", str(out), "--dataset-json", str(root / "dataset.json"),
                 "--quiet"]) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().err and (out / "expected_dice.csv").exists()


def test_regions_on_class_probabilities_predict_and_evaluate(tmp_path, capsys):
    probs_dir, labels_dir = tmp_path / "probs", tmp_path / "labels"
    labels_dir.mkdir()
    cases = {}
    for i in range(3):
        probs, label, _ = make_case(seed=70 + i)
        write_nnunet_case(probs_dir, f"c{i}", probs)
        write_sitk_labels(labels_dir / f"c{i}.nii.gz", label)
        cases[f"c{i}"] = (probs, label)
    regions = json.dumps(LITS)
    out = tmp_path / "masks"
    assert main(["predict", str(probs_dir), "-o", str(out), "--regions", regions, "--quiet"]) == 0
    for case, (probs, _) in cases.items():
        np.testing.assert_array_equal(rio.load_labels(out / f"{case}.nii.gz").labels,
                                      rankseg(probs[None], regions=LITS, pruning_prob="auto")[0])
    report = tmp_path / "report"
    rc = main(["evaluate", "--probs", str(probs_dir), "--labels", str(labels_dir), "-o", str(report), "--regions",
               regions, "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert files_in(report) == ["differences.png", "evaluation.json", "expected.png", "per_case.csv", "summary.csv"]
    rows = ev.read_rows(report / "per_case.csv")
    assert [(r["case"], r["class"]) for r in rows] == [(c, s) for c in ("c0", "c1", "c2") for s in ("liver", "tumour")]
    for r in rows:  # NSD at 2 mm and expected Dice for both decisions; lesion-wise for the nested region only
        for m in ("argmax", "rankseg"):
            assert 0.0 <= float(r[f"nsd_{m}"]) <= 1.0 and 0.0 <= float(r[f"expected_dice_{m}"]) <= 1.0
            assert np.isnan(float(r[f"lesions_found_{m}"])) == (r["class"] == "liver")
    # the region Dice is the Dice of the union of the region's labels
    probs, label = cases["c0"]
    pred = rankseg(probs[None], regions=LITS, pruning_prob="auto")[0]
    liver = np.isin(pred, [1, 2]), np.isin(label, [1, 2])
    dice = 2 * (liver[0] & liver[1]).sum() / (liver[0].sum() + liver[1].sum())
    assert float(rows[0]["dice_rankseg"]) == pytest.approx(dice, rel=1e-6)
    assert "NSD " in captured.out and "lesions found/missed/FP" in captured.out
    assert "est. Dice (MAE, r)" in captured.out
    summary = ev.read_rows(report / "summary.csv")
    assert [r["class"] for r in summary] == ["liver", "tumour", "all"] and "expected_mae_rankseg" in summary[0]
    # parts merge into the same report, region names included
    parts = tmp_path / "parts"
    for k in range(2):
        assert main(["evaluate", "--probs", str(probs_dir), "--labels", str(labels_dir), "-o", str(parts),
                     "--regions", regions, "--part-id", str(k), "--num-parts", "2", "--quiet"]) == 0
    assert main(["merge-reports", str(parts)]) == 0
    assert (parts / "per_case.csv").read_bytes() == (report / "per_case.csv").read_bytes()
    assert (parts / "summary.csv").read_bytes() == (report / "summary.csv").read_bytes()


def test_dataset_json_class_names_without_regions(tmp_path, capsys):
    probs, label, _ = make_case(seed=80)
    write_nnunet_case(tmp_path / "p", "a", probs)
    (tmp_path / "l").mkdir()
    write_sitk_labels(tmp_path / "l" / "a.nii.gz", label)
    (tmp_path / "ds.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}))
    assert main(["evaluate", "--probs", str(tmp_path / "p"), "--labels", str(tmp_path / "l"), "-o",
                 str(tmp_path / "r"), "--dataset-json", str(tmp_path / "ds.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "liver (1)" in out and "tumour (2)" in out


@pytest.mark.parametrize("extra,match", [
    (["--regions", "{liver"], "not JSON"),
    (["--regions", '[[1, 2], [2, 3]]'], "overlap without one containing the other"),
    (["--region-probs"], "--region-probs need --regions"),
    (["--regions", '[[1, 2], [2]]', "--regions-class-order", "2", "1"], "not one of its own labels"),
    (["--regions", '[[1, 2], [2]]', "--solver", "ba", "--output-mode", "multilabel"], "solver"),
])
def test_region_usage_errors_fail_before_any_case(tmp_path, capsys, extra, match):
    probs, _, _ = make_case(seed=81)
    write_nnunet_case(tmp_path / "p", "a", probs)
    rc = main(["predict", str(tmp_path / "p"), "-o", str(tmp_path / "o"), "--quiet", *extra])
    assert rc == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
