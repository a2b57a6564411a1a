"""Issue 23 (a new user's first hour): the folders MONAI writes, whole-run mistakes, option checks and the output
a user reads (``--version``, the evaluate table, the expected-Dice parts)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from generators import make_case
from monai.data import MetaTensor
from monai.transforms import SaveImage
from volume_files import nifti_affine, write_nifti_labels, write_nifti_probs

import rankseg_monai
from rankseg_monai.app import io as rio
from rankseg_monai.app.cli import main
from rankseg_monai.functional import rankseg

AFFINE = nifti_affine(spacing=(0.9, 1.1, 2.0), angles=(0.0, 0.0, 0.0))


def _monai_outputs(tmp_path, **saver_kwargs):
    """Probabilities written by MONAI's own ``SaveImage`` (its layout and naming) and labels ``<case>.nii.gz``."""
    saver = SaveImage(output_dir=str(tmp_path / "saved"), print_log=False, **saver_kwargs)
    (tmp_path / "labels").mkdir()
    cases = {}
    for i in range(3):
        probs, label, _ = make_case(seed=300 + i, shape=(12, 11, 10))
        saver(MetaTensor(torch.from_numpy(probs), affine=torch.from_numpy(AFFINE),
                         meta={"filename_or_obj": f"/data/images/case_{i:03d}.nii.gz"}))
        write_nifti_labels(tmp_path / "labels" / f"case_{i:03d}.nii.gz", label, AFFINE)
        cases[f"case_{i:03d}"] = probs
    return tmp_path / "saved", cases


def _mask(path):
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.parametrize("saver_kwargs, options", [
    ({"output_postfix": "prob"}, []),                                 # case_000/case_000_prob.nii.gz
    ({}, []),                                                         # case_000/case_000_trans.nii.gz (defaults)
    ({"separate_folder": False}, []),                                 # case_000_trans.nii.gz
    ({"separate_folder": False, "output_postfix": "prob"}, ["--postfix", "prob"]),  # case_000_prob.nii.gz
])
def test_monai_saveimage_layout_is_read(tmp_path, capsys, saver_kwargs, options):
    saved, cases = _monai_outputs(tmp_path, **saver_kwargs)
    assert not any(p.name == "case_000.nii.gz" for p in saved.rglob("*"))  # MONAI added its postfix
    assert main(["predict", str(saved), "-o", str(tmp_path / "masks"), "--quiet", *options]) == 0
    assert "3 written" in capsys.readouterr().err
    for case, probs in cases.items():
        np.testing.assert_array_equal(_mask(tmp_path / "masks" / f"{case}.nii.gz"),
                                      rankseg(torch.from_numpy(probs)[None])[0].numpy())
    assert main(["evaluate", "--probs", str(saved), "--labels", str(tmp_path / "labels"), "-o",
                 str(tmp_path / "report"), "--quiet", *options]) == 0
    with open(tmp_path / "report" / "per_case.csv") as fh:
        assert sorted({row["case"] for row in csv.DictReader(fh)}) == sorted(cases)


def test_postfix_is_kept_when_asked_and_names_collisions(tmp_path, capsys):
    saved, _ = _monai_outputs(tmp_path, separate_folder=False)
    assert main(["predict", str(saved), "-o", str(tmp_path / "m"), "--quiet", "--postfix", ""]) == 0
    assert sorted(p.name for p in (tmp_path / "m").glob("*.nii.gz")) == [f"case_00{i}_trans.nii.gz" for i in range(3)]
    # a file named like a case without the postfix is the same case: refused before any work
    write_nifti_probs(saved / "case_000.nii.gz", make_case(seed=1, shape=(12, 11, 10))[0], AFFINE)
    capsys.readouterr()
    assert main(["predict", str(saved), "-o", str(tmp_path / "m2"), "--quiet"]) == 2
    assert "two inputs have the case name 'case_000'" in capsys.readouterr().err


def test_case_names_follow_monai_folder_layout():
    names = rio.case_names(["o/a/a_seg.nii.gz", "o/b/b_seg.nii.gz"])
    assert list(names.values()) == ["a", "b"]
    # a flat folder whose files start with its own name is not MONAI's case-folder layout
    assert list(rio.case_names(["case/case_1.nii.gz", "case/case_2.nii.gz"]).values()) == ["case_1", "case_2"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rankseg-monai {rankseg_monai.__version__}"


@pytest.fixture
def logits_folder(tmp_path):
    folder = tmp_path / "logits"
    folder.mkdir()
    for i in range(3):
        _, label, logits = make_case(seed=400 + i, shape=(12, 11, 10))
        write_nifti_probs(folder / f"l{i}.nii.gz", logits, AFFINE)
    return folder


@pytest.mark.parametrize("options, fix", [
    (["--channels-last"], "pass --softmax"),                      # logits taken for probabilities
    ([], "--channels-last"),                                      # logits: the class axis cannot be guessed
])
def test_a_mistake_of_the_whole_run_is_one_usage_error(logits_folder, tmp_path, capsys, options, fix):
    out = tmp_path / "out"
    assert main(["predict", str(logits_folder), "-o", str(out), "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "FAILED" not in err and fix in err and "first case" in err, err
    assert not out.exists()  # nothing was done


def test_softmax_on_probabilities_stops_evaluate_at_the_first_case(tmp_path, capsys):
    saved, _ = _monai_outputs(tmp_path, output_postfix="prob")
    assert main(["evaluate", "--probs", str(saved), "--labels", str(tmp_path / "labels"), "-o",
                 str(tmp_path / "report"), "--softmax", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "FAILED" not in err and "drop --softmax" in err, err
    assert not (tmp_path / "report").exists()


def test_a_later_case_at_odds_with_the_settings_fails_alone(logits_folder, tmp_path, capsys):
    """Once a case worked, a file that disagrees with the settings is that file's problem: it fails, the others
    are done (exit 1)."""
    probs, _, _ = make_case(seed=9, shape=(12, 11, 10))
    write_nifti_probs(logits_folder / "l9.nii.gz", probs, AFFINE)  # probabilities among logits, sorted last
    assert main(["predict", str(logits_folder), "-o", str(tmp_path / "o"), "--softmax", "--channels-last",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "FAILED l9" in err and "3 written" in err, err


@pytest.mark.parametrize("names, message", [
    (["background", "organ"], "gives 2 names"),                  # too few for 3 classes
    (["background", "organ", "lesion", "extra"], "gives 4 names"),  # too many
    (["background", "organ", ""], "empty name (label value 2)"),
])
def test_class_names_must_name_every_class(tmp_path, capsys, names, message):
    saved, _ = _monai_outputs(tmp_path, output_postfix="prob")
    assert main(["evaluate", "--probs", str(saved), "--labels", str(tmp_path / "labels"), "-o",
                 str(tmp_path / "report"), "--quiet", "--class-names", *names]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and message in err, err
    assert not (tmp_path / "report").exists()
    names_ok = ["background", "organ", "lesion"]
    assert main(["evaluate", "--probs", str(saved), "--labels", str(tmp_path / "labels"), "-o",
                 str(tmp_path / "report"), "--quiet", "--class-names", *names_ok]) == 0


@pytest.mark.parametrize("command, said", [("predict", "finished cases are skipped"),
                                           ("evaluate", "evaluate does not resume")])
def test_ctrl_c_says_what_is_true(tmp_path, capsys, monkeypatch, command, said):
    saved, _ = _monai_outputs(tmp_path, output_postfix="prob")
    from rankseg_monai.app import cli

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupt)
    argv = (["predict", str(saved), "-o", str(tmp_path / "o")] if command == "predict" else
            ["evaluate", "--probs", str(saved), "--labels", str(tmp_path / "labels"), "-o", str(tmp_path / "o")])
    assert main([*argv, "--quiet"]) == 130
    assert said in capsys.readouterr().err


def test_merge_names_every_missing_part(tmp_path, capsys):
    saved, _ = _monai_outputs(tmp_path, output_postfix="prob")
    out = tmp_path / "parts"
    assert main(["evaluate", "--probs", str(saved), "--labels", str(tmp_path / "labels"), "-o", str(out), "--quiet",
                 "--part-id", "1", "--num-parts", "3"]) == 0
    capsys.readouterr()
    assert main(["merge-reports", str(out)]) == 2
    err = capsys.readouterr().err
    assert "parts 0 and 2 of 3 are missing" in err and "evaluation.part-0-of-3.json" in err, err
    assert "evaluation.part-2-of-3.json" in err and "more" not in err


def test_predict_parts_end_with_one_expected_dice_csv(tmp_path, capsys):
    saved, cases = _monai_outputs(tmp_path, output_postfix="prob")
    out = tmp_path / "masks"
    for k in (0, 1):
        assert main(["predict", str(saved), "-o", str(out), "--quiet", "--part-id", str(k), "--num-parts", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count("every part is done") == 1  # written once, by the last part to finish
    with open(out / "expected_dice.csv") as fh:
        whole = list(csv.DictReader(fh))
    parts = []
    for k in (0, 1):
        with open(out / f"expected_dice.part-{k}-of-2.csv") as fh:
            parts += list(csv.DictReader(fh))
    assert sorted({r["case"] for r in whole}) == sorted(cases)
    assert sorted(whole, key=lambda r: (r["case"], r["structure"])) == sorted(parts, key=lambda r: (r["case"],
                                                                                                  r["structure"]))
    # a single-part run writes the same file
    (out / "expected_dice.csv").unlink()
    assert main(["predict", str(saved), "-o", str(out), "--quiet"]) == 0
    with open(out / "expected_dice.csv") as fh:
        assert list(csv.DictReader(fh)) == whole


def test_region_probabilities_report_names_the_threshold_baseline(tmp_path, capsys):
    """With sigmoid region probabilities the baseline is thresholding at 0.5, and the table says so."""
    import json
    import pickle

    folder, labels = tmp_path / "nn", tmp_path / "labels"
    folder.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(5)
    shape = (10, 12, 14)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    for i in range(2):
        r = np.sqrt((grid ** 2).sum(0))
        q = np.stack([1 / (1 + np.exp(-12 * (rad - r) + rng.normal(0, 1, shape))) for rad in (0.6, 0.3)])
        np.savez_compressed(folder / f"c{i}.npz", probabilities=q.astype(np.float32))
        with open(folder / f"c{i}.pkl", "wb") as fh:
            pickle.dump({"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                        "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}, fh)
        label = (r < 0.6).astype(np.uint8) + (r < 0.3)
        import SimpleITK as sitk
        sitk.WriteImage(sitk.GetImageFromArray(label), str(labels / f"c{i}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2], "core": 2},
                                                     "regions_class_order": [1, 2]}))
    assert main(["evaluate", "--probs", str(folder), "--labels", str(labels), "-o", str(tmp_path / "r"), "--quiet",
                 "--dataset-json", str(folder / "dataset.json")]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.5" in out.splitlines()[0] and "rankseg-threshold 0.5" in out
    assert "'argmax' columns hold threshold 0.5" in out.replace("\n", " ")
