"""`rankseg-monai predict | evaluate | demo` end to end on real files (called in-process through main())."""

from __future__ import annotations

import csv
import math
import sys
import types

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from generators import make_case
from oracle import monai_dice_hd95
from volume_files import (
    ITK_DIRECTION,
    ITK_ORIGIN,
    ITK_SPACING,
    files_in,
    nifti_affine,
    sitk_xyz,
    write_nifti_labels,
    write_nifti_probs,
    write_nnunet_case,
    write_sitk_labels,
    write_sitk_probs,
)

from rankseg_monai.app.cli import main
from rankseg_monai.functional import rankseg


def expected_mask(probs_cxyz: np.ndarray, **kwargs) -> np.ndarray:
    kwargs.setdefault("pruning_prob", "auto")  # the CLI's default
    return rankseg(probs_cxyz[None], **kwargs)[0]


@pytest.fixture
def inputs(tmp_path):
    """A NIfTI folder (two cases), a loose MHA file and an nnU-Net folder; each with its probabilities."""
    cases = {}
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    for i, name in enumerate(("n1", "n2")):
        probs, label, _ = make_case(seed=10 + i)
        write_nifti_probs(nifti / f"{name}.nii.gz", probs, nifti_affine())
        cases[name] = (probs, label)
    probs, label, _ = make_case(seed=20)
    write_sitk_probs(tmp_path / "m1.mha", probs)
    cases["m1"] = (probs, label)
    probs, label, _ = make_case(seed=30)
    write_nnunet_case(tmp_path / "nnunet", "u1", probs)
    cases["u1"] = (probs, label)
    return tmp_path, cases


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_end_to_end(inputs, capsys):
    root, cases = inputs
    before = snapshot(root)
    out = root / "out"
    rc = main(["predict", str(root / "nifti"), str(root / "m1.mha"), str(root / "nnunet"), "-o", str(out)])
    assert rc == 0
    masks = ["n1.nii.gz", "n2.nii.gz", "m1.mha", "u1.nii.gz"]
    # each mask with its record, and the label-free expected Dice of every case
    assert files_in(out) == sorted(masks + [m + ".rankseg.json" for m in masks] + ["expected_dice.csv"])
    assert "4 written, 0 skipped" in capsys.readouterr().err
    # masks equal the functional API on the same probabilities, geometry is the input's
    for name in ("n1", "n2"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        src = nib.load(str(root / "nifti" / f"{name}.nii.gz"))
        assert img.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(np.asarray(img.dataobj), expected_mask(cases[name][0]))
        np.testing.assert_array_equal(img.affine, src.affine)
        assert img.header.get_sform(coded=True)[1] == src.header.get_sform(coded=True)[1]
    ref = sitk.ReadImage(str(root / "m1.mha"))
    img = sitk.ReadImage(str(out / "m1.mha"))
    assert (img.GetSpacing(), img.GetOrigin(), img.GetDirection()) == (ref.GetSpacing(), ref.GetOrigin(),
                                                                      ref.GetDirection())
    np.testing.assert_array_equal(sitk_xyz(out / "m1.mha"), expected_mask(cases["m1"][0]))
    img = sitk.ReadImage(str(out / "u1.nii.gz"))  # nnU-Net: geometry from the .pkl's sitk_stuff
    np.testing.assert_allclose(img.GetSpacing(), ITK_SPACING, atol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), ITK_ORIGIN, atol=1e-5)
    np.testing.assert_allclose(img.GetDirection(), ITK_DIRECTION, atol=1e-6)
    np.testing.assert_array_equal(sitk_xyz(out / "u1.nii.gz"), expected_mask(cases["u1"][0]))
    # nnU-Net's own argmax segmentation was neither read as probabilities nor touched; no input changed
    assert snapshot(root / "nifti") == {k[len("nifti/"):]: v for k, v in before.items() if k.startswith("nifti/")}
    assert {k: v for k, v in snapshot(root).items() if not k.startswith("out/")} == before


def test_predict_options_reach_the_solver(inputs):
    root, cases = inputs
    out = root / "out"
    rc = main(["predict", str(root / "m1.mha"), "-o", str(out), "--metric", "iou", "--pruning-prob", "0",
               "--format", "nrrd", "--quiet"])
    assert rc == 0
    np.testing.assert_array_equal(sitk_xyz(out / "m1.nrrd"),
                                  expected_mask(cases["m1"][0], metric="iou", pruning_prob=0.0))
    rc = main(["predict", str(root / "m1.mha"), "-o", str(root / "ml"), "--output-mode", "multilabel"])
    assert rc == 0
    img = sitk.ReadImage(str(root / "ml" / "m1.mha"))
    assert img.GetNumberOfComponentsPerPixel() == 3
    got = np.transpose(sitk.GetArrayFromImage(img), (3, 2, 1, 0)).astype(bool)
    np.testing.assert_array_equal(got, expected_mask(cases["m1"][0], output_mode="multilabel"))


def test_predict_logits_need_softmax(tmp_path, capsys):
    probs, _, logits = make_case(seed=40)
    write_nifti_probs(tmp_path / "lg.nii.gz", logits, nifti_affine())
    rc = main(["predict", str(tmp_path / "lg.nii.gz"), "-o", str(tmp_path / "o1"), "--channels-last"])
    err = capsys.readouterr().err
    assert rc == 2 and "--softmax" in err and "lg.nii.gz" in err  # a settings mistake: a usage error
    assert not (tmp_path / "o1").exists()  # no mask, no record, no temporary file
    # logits do not sum to one over any axis: the class axis of a 4D NIfTI is not guessed (issue 13, item 6)
    rc = main(["predict", str(tmp_path / "lg.nii.gz"), "-o", str(tmp_path / "o2"), "--softmax", "--channels-last"])
    assert rc == 0
    soft = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "o2" / "lg.nii.gz")).dataobj),
                                  expected_mask(soft))
    # probabilities that do not sum to one: name both fixes
    write_nifti_probs(tmp_path / "half.nii.gz", probs * 0.5, nifti_affine())
    rc = main(["predict", str(tmp_path / "half.nii.gz"), "-o", str(tmp_path / "o3"), "--channels-last"])
    err = capsys.readouterr().err
    assert rc == 1 and "do not sum to 1" in err and "--output-mode multilabel" in err


def test_predict_single_foreground_channel(tmp_path):
    probs, _, _ = make_case(seed=45, num_classes=2)
    nib.save(nib.Nifti1Image(probs[1], nifti_affine()), str(tmp_path / "fg.nii.gz"))  # 3D: P(foreground)
    assert main(["predict", str(tmp_path / "fg.nii.gz"), "-o", str(tmp_path / "o"), "--quiet"]) == 0
    img = nib.load(str(tmp_path / "o" / "fg.nii.gz"))
    expected = rankseg(probs[1][None, None], output_mode="multilabel")[0, 0]
    assert img.get_data_dtype() == np.uint8 and expected.any() and not expected.all()
    np.testing.assert_array_equal(np.asarray(img.dataobj), expected.astype(np.uint8))


def test_resume_and_overwrite(inputs, capsys):
    root, cases = inputs
    out = root / "out"
    assert main(["predict", str(root / "nifti"), "-o", str(out)]) == 0
    target = out / "n1.nii.gz"
    tampered = nib.Nifti1Image(np.zeros(cases["n1"][0].shape[1:], np.uint8), np.eye(4))
    nib.save(tampered, str(target))
    (out / "n2.nii.gz").unlink()
    capsys.readouterr()
    # resumes: n2 redone; n1 no longer matches its record, so it is redone too (issue 13, item 1)
    assert main(["predict", str(root / "nifti"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "2 written, 0 skipped" in err and "redoing n1: the mask's bytes do not match its record" in err
    for name in ("n1", "n2"):
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj),
                                      expected_mask(cases[name][0]))
    assert main(["predict", str(root / "nifti"), "-o", str(out)]) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().err
    # other settings: refuse to mix, unless --overwrite
    assert main(["predict", str(root / "nifti"), "-o", str(out), "--metric", "iou"]) == 2
    assert "other settings (e.g. n1.nii.gz: options.metric: 'dice' -> 'iou')" in capsys.readouterr().err
    assert main(["predict", str(root / "nifti"), "-o", str(out), "--overwrite"]) == 0
    assert "2 written, 0 skipped" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(nib.load(str(target)).dataobj), expected_mask(cases["n1"][0]))
    # a folder with files not written by predict
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "n1.nii.gz").write_bytes(b"x")
    assert main(["predict", str(root / "nifti"), "-o", str(foreign)]) == 2
    assert "without a valid record (e.g. n1.nii.gz: no n1.nii.gz.rankseg.json)" in capsys.readouterr().err
    assert (foreign / "n1.nii.gz").read_bytes() == b"x"


def test_never_writes_over_inputs(inputs, capsys):
    root, _ = inputs
    before = snapshot(root)
    assert main(["predict", str(root / "nifti"), "-o", str(root / "nifti"), "--overwrite"]) == 2
    assert "is an input folder" in capsys.readouterr().err
    assert main(["predict", str(root / "m1.mha"), "-o", str(root), "--overwrite"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert snapshot(root) == before


def test_one_bad_case_does_not_stop_the_others(inputs, capsys):
    root, cases = inputs
    folder = root / "nifti"
    data = (folder / "n2.nii.gz").read_bytes()
    (folder / "bad.nii.gz").write_bytes(data[: len(data) // 2])  # truncated
    out = root / "out"
    rc = main(["predict", str(folder), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED bad" in err and "corrupt" in err and "2 written, 0 skipped (up to date), 1 failed" in err
    assert files_in(out) == sorted(["n1.nii.gz", "n2.nii.gz", "n1.nii.gz.rankseg.json", "n2.nii.gz.rankseg.json",
                                    "expected_dice.csv"])
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "n2.nii.gz")).dataobj), expected_mask(cases["n2"][0]))


def test_usage_errors(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "-o", str(tmp_path / "o")]) == 2
    assert "no probability files found" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--pruning-prob", "2"]) == 2
    assert main(["predict"]) == 2
    assert main(["--help"]) == 0
    assert not (tmp_path / "o").exists()
    if not torch.cuda.is_available():
        assert main(["predict", str(tmp_path / "empty"), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def _same(a: str, b: float) -> bool:
    return (math.isnan(float(a)) and math.isnan(b)) or float(a) == b


@pytest.fixture
def eval_inputs(tmp_path):
    """nnU-Net probabilities (sitk geometry) with NIfTI labels, plus MHA probabilities with MHA labels."""
    probs_dir, labels_dir = tmp_path / "probs", tmp_path / "labels"
    labels_dir.mkdir()
    cases = {}
    for i, name in enumerate(("a", "b")):
        probs, label, _ = make_case(seed=50 + i)
        write_nnunet_case(probs_dir, name, probs)
        write_sitk_labels(labels_dir / f"{name}.nii.gz", label)  # same grid, other reader (nibabel) on read
        cases[name] = (probs, label)
    probs, label, _ = make_case(seed=60)
    write_sitk_probs(probs_dir / "c.mha", probs, spacing=(1.0, 0.5, 2.0))
    write_sitk_labels(labels_dir / "c.mha", label, spacing=(1.0, 0.5, 2.0))
    cases["c"] = (probs, label)
    return tmp_path, cases


def test_evaluate_probs_matches_monai(eval_inputs, capsys):
    root, cases = eval_inputs
    out = root / "report"
    rc = main(["evaluate", "--probs", str(root / "probs"), "--labels", str(root / "labels"), "-o", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert files_in(out) == ["differences.png", "evaluation.json", "expected.png", "per_case.csv", "summary.csv"]
    head = captured.out.splitlines()[0].split()
    assert head[:5] == ["class", "n", "metric", "argmax", "rankseg"] and "rankseg-argmax" in head, captured.out
    assert "HD95 NaN" in captured.out and max(map(len, captured.out.splitlines())) <= 120
    with open(out / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["case"], r["class"]) for r in rows] == [(c, k) for c in "abc" for k in ("1", "2")]
    spacings = {"a": ITK_SPACING, "b": ITK_SPACING, "c": (1.0, 0.5, 2.0)}
    for name, (probs, label) in cases.items():
        preds = {"argmax": probs.argmax(0), "rankseg": expected_mask(probs)}
        for method, pred in preds.items():
            dice, hd = monai_dice_hd95(pred, label, [1, 2], spacings[name])
            got = [r for r in rows if r["case"] == name]
            for k in range(2):
                assert _same(got[k][f"dice_{method}"], dice[k])
                assert _same(got[k][f"hd95_{method}"], hd[k])
    with open(out / "summary.csv", newline="") as fh:
        summary = list(csv.DictReader(fh))
    allrow = summary[-1]
    assert allrow["class"] == "all" and allrow["cases"] == "6"
    dice_diff = np.mean([float(r["dice_rankseg"]) - float(r["dice_argmax"]) for r in rows])
    assert float(allrow["dice_mean_diff"]) == pytest.approx(dice_diff)
    assert int(allrow["dice_wins"]) + int(allrow["dice_losses"]) + int(allrow["dice_ties"]) == 6


def test_evaluate_mismatch_writes_nothing(eval_inputs, capsys):
    root, cases = eval_inputs
    probs, label = cases["c"]
    write_sitk_labels(root / "labels" / "c.mha", label, spacing=(1.0, 0.5, 2.0), origin=(5.0, 0.0, 0.0))
    out = root / "report"
    rc = main(["evaluate", "--probs", str(root / "probs"), "--labels", str(root / "labels"), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "case 'c': probabilities and labels are on different grids" in err and "ResampleToMatch" in err
    assert "no report written" in err and not out.exists()
    # --skip-failed reports on the others, still exit 1
    rc = main(["evaluate", "--probs", str(root / "probs"), "--labels", str(root / "labels"), "-o", str(out),
               "--skip-failed"])
    assert rc == 1
    with open(out / "per_case.csv", newline="") as fh:
        assert sorted({r["case"] for r in csv.DictReader(fh)}) == ["a", "b"]


def test_evaluate_label_errors(eval_inputs, capsys):
    root, cases = eval_inputs
    probs, label = cases["a"]
    bad = label.copy()
    bad[0, 0, 0] = 9
    write_sitk_labels(root / "labels" / "a.nii.gz", bad)
    (root / "labels" / "b.nii.gz").unlink()
    write_sitk_labels(root / "labels" / "c.mha", cases["c"][1][:, :, :-1], spacing=(1.0, 0.5, 2.0))
    out = root / "report"
    rc = main(["evaluate", "--probs", str(root / "probs"), "--labels", str(root / "labels"), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert "values (9) outside the class range [0, 3)" in err
    assert "case 'b': no label file" in err
    assert "case 'c': probabilities have spatial shape (20, 18, 16) but labels (20, 18, 15)" in err


def test_evaluate_pred_masks(eval_inputs, capsys):
    root, cases = eval_inputs
    assert main(["predict", str(root / "probs"), "-o", str(root / "masks"), "--quiet"]) == 0
    out = root / "report"
    rc = main(["evaluate", "--pred", str(root / "masks"), "--labels", str(root / "labels"), "-o", str(out),
               "--classes", "2"])
    assert rc == 0, capsys.readouterr().err
    assert files_in(out) == ["evaluation.json", "per_case.csv", "summary.csv"]
    with open(out / "per_case.csv", newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == ["a", "b", "c"]
    for name, (probs, label) in cases.items():
        spacing = ITK_SPACING if name != "c" else (1.0, 0.5, 2.0)
        dice, hd = monai_dice_hd95(expected_mask(probs), label, [2], spacing)
        assert rows[name]["class"] == "2"
        assert _same(rows[name]["dice_pred"], dice[0]) and _same(rows[name]["hd95_pred"], hd[0])


def test_evaluate_nifti_labels_for_nifti_probs(tmp_path):
    probs, label, _ = make_case(seed=70)
    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    write_nifti_probs(tmp_path / "p" / "x.nii.gz", probs, nifti_affine())
    write_nifti_labels(tmp_path / "l" / "x.nii.gz", label, nifti_affine())
    assert main(["evaluate", "--probs", str(tmp_path / "p"), "--labels", str(tmp_path / "l"), "-o",
                 str(tmp_path / "r"), "--classes", "1", "--quiet"]) == 0
    with open(tmp_path / "r" / "per_case.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    spacing = np.linalg.norm(nib.load(str(tmp_path / "p" / "x.nii.gz")).affine[:3, :3], axis=0)
    dice, hd = monai_dice_hd95(expected_mask(probs), label, [1], spacing)
    assert _same(row["dice_rankseg"], dice[0]) and _same(row["hd95_rankseg"], hd[0])


def test_demo_subcommand(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rankseg_monai.app.demo", None)
    assert main(["demo"]) == 2
    assert "rankseg_monai/app/demo.py is missing" in capsys.readouterr().err

    calls = []
    fake = types.ModuleType("rankseg_monai.app.demo")
    fake.add_arguments = lambda parser: parser.add_argument("--cases", type=int, default=3)
    fake.run = lambda args: calls.append(args) or 7
    monkeypatch.setitem(sys.modules, "rankseg_monai.app.demo", fake)
    assert main(["demo", "--cases", "5"]) == 7
    assert calls[0].command == "demo" and calls[0].cases == 5
