"""``rankseg-monai nnunet-predict`` against nnU-Net v2's own predictor, on a tiny model made by nnU-Net's own code
(tests/nnunet_fixture.py: nnU-Net's planning and preprocessing, its trainer's network and checkpoint).

Oracles: ``--argmax`` gives the bytes ``nnUNetv2_predict`` writes; RankSEG gives the bytes of
``nnUNetv2_predict --save_probabilities`` followed by ``rankseg-monai predict`` on that folder; for a label model and
a region-trained model, on a case nnU-Net crops (zero border) and one it does not, with resampling at export (the
test images' spacing differs from the plans').  The nnU-Net tests need ``nnunetv2`` (tools/test.sh installs the
``nnunet`` extra); the others run without it.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from rankseg_monai._files import is_temporary
from rankseg_monai.app import cli
from rankseg_monai.app import provenance as prov
from rankseg_monai.app.nnunet import INSTALL_HINT, decide_probabilities
from rankseg_monai.options import RankSEGOptions

HAVE_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_nnunet = pytest.mark.skipif(not HAVE_NNUNET, reason=f"nnunetv2 is not installed ({INSTALL_HINT}; tools/test.sh "
                                                          "installs it)")
CASES = {"plain": (0, 0), "cropped": (1, 5)}  # name -> (seed offset, zero border: nnU-Net crops it away)
COMMON = ["-npp", "1", "-nps", "1", "--quiet"]


def _nnunet_predict(model: Path, images: Path, out: Path, save_probabilities: bool = False) -> None:
    """nnUNetv2_predict, in-process (what its console script runs, without the start-up)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    predictor.predict_from_files(str(images), str(out), save_probabilities=save_probabilities,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)


@pytest.fixture(scope="session")
def nnunet_runs(tmp_path_factory):
    """The label and the region model, test images, and every run compared below (each made once)."""
    import nnunet_fixture as fx

    root = tmp_path_factory.mktemp("nnunet")
    label_model = fx.build_model(root / "work")
    models = {"labels": label_model, "regions": fx.region_model(label_model, root / "regions_model")}
    images = root / "images"
    fx.write_images(images, CASES)
    runs = {}
    for kind, model in models.items():
        out = root / kind
        _nnunet_predict(model, images, out / "nnunet")
        _nnunet_predict(model, images, out / "nnunet_probs", save_probabilities=True)
        predict_args = ["predict", str(out / "nnunet_probs"), "-o", str(out / "predict"), "--quiet",
                        "--dataset-json", str(model / "dataset.json")]
        assert cli.main(predict_args) == 0
        for name, extra in (("ours", []), ("ours_argmax", ["--argmax"])):
            assert cli.main(["nnunet-predict", "-i", str(images), "-o", str(out / name), "-m", str(model), "-f", "0",
                             *COMMON, *extra]) == 0
        runs[kind] = out
    return {"models": models, "images": images, "runs": runs, "root": root}


def _labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@needs_nnunet
@pytest.mark.parametrize("kind", ["labels", "regions"])
def test_argmax_is_nnunets_own_output(nnunet_runs, kind):
    out = nnunet_runs["runs"][kind]
    for case in CASES:
        assert (out / "ours_argmax" / f"{case}.nii.gz").read_bytes() == (out / "nnunet" / f"{case}.nii.gz").read_bytes()
    for name in ("dataset.json", "plans.json"):  # what nnUNetv2_predict copies beside the masks
        assert json.loads((out / "ours" / name).read_text()) == json.loads((out / "nnunet" / name).read_text())


@needs_nnunet
@pytest.mark.parametrize("kind", ["labels", "regions"])
def test_rankseg_equals_save_probabilities_then_predict(nnunet_runs, kind):
    out = nnunet_runs["runs"][kind]
    changed = 0
    for case in CASES:
        ours = out / "ours" / f"{case}.nii.gz"
        assert ours.read_bytes() == (out / "predict" / f"{case}.nii.gz").read_bytes()
        changed += int(np.sum(_labels(ours) != _labels(out / "nnunet" / f"{case}.nii.gz")))
        record = prov.read_record(ours)
        assert record["settings"]["decision"] == "rankseg" and record["mask"] == ours.name
        assert [e["file"] for e in record["inputs"]] == [f"{case}_0000.nii.gz"]
    assert changed > 0  # RankSEG decided differently from argmax somewhere: the comparison is not vacuous
    # nnU-Net wrote no probability files here; predict's did
    assert not list((out / "ours").glob("*.npz")) and list((out / "nnunet_probs").glob("*.npz"))
    rows = {(r["case"], r["structure"]): r for r in csv.DictReader(open(out / "ours" / "expected_dice.csv"))}
    ref = {(r["case"], r["structure"]): r for r in csv.DictReader(open(out / "predict" / "expected_dice.csv"))}
    assert rows.keys() == ref.keys() and len(rows) == 2 * len(CASES)
    for key, row in rows.items():  # foreground expected Dice is the whole volume's (sums in another order)
        assert float(row["expected_dice_rankseg"]) == pytest.approx(float(ref[key]["expected_dice_rankseg"]), abs=1e-12)


@needs_nnunet
def test_calibration_equals_predict_calibration(nnunet_runs, tmp_path, capsys):
    """nnunet-predict --calibration decides as predict --calibration on nnU-Net's saved probabilities (the
    calibration applied to the same probabilities, argmax kept for the class it recommends argmax for); a
    calibration of other channels is refused before any work."""
    from rankseg_monai.calibrator import Calibration

    model, out = nnunet_runs["models"]["labels"], nnunet_runs["runs"]["labels"]
    cal = Calibration("per-class-temperature", "class-probabilities", [1.0, 0.5, 2.0], channels=[0, 1, 2],
                      recommendation=["rankseg", "rankseg", "argmax"])
    path = cal.save(tmp_path / "calibration.json")
    ours, ref = tmp_path / "ours", tmp_path / "predict"
    assert cli.main(["nnunet-predict", "-i", str(nnunet_runs["images"]), "-o", str(ours), "-m", str(model), "-f", "0",
                     *COMMON, "--calibration", str(path)]) == 0
    assert cli.main(["predict", str(out / "nnunet_probs"), "-o", str(ref), "--quiet", "--dataset-json",
                     str(model / "dataset.json"), "--calibration", str(path)]) == 0
    differs = 0
    for case in CASES:
        mask = ours / f"{case}.nii.gz"
        assert mask.read_bytes() == (ref / f"{case}.nii.gz").read_bytes()
        differs += int(np.sum(_labels(mask) != _labels(out / "ours" / f"{case}.nii.gz")))
        assert prov.read_record(mask)["settings"]["calibration"]["sha256"] == cal.sha256
    assert differs > 0  # the calibration changed the decision: the comparison is not vacuous
    wrong = Calibration("temperature", "class-probabilities", [0.5], channels=[0, 1]).save(tmp_path / "wrong.json")
    capsys.readouterr()
    assert cli.main(["nnunet-predict", "-i", str(nnunet_runs["images"]), "-o", str(tmp_path / "refused"), "-m",
                     str(model), "-f", "0", *COMMON, "--calibration", str(wrong)]) == 2
    assert "--calibration" in capsys.readouterr().err and not (tmp_path / "refused").exists()


@needs_nnunet
def test_geometry_and_cropping(nnunet_runs):
    import SimpleITK as sitk

    out = nnunet_runs["runs"]["labels"]
    for case in CASES:
        image = sitk.ReadImage(str(nnunet_runs["images"] / f"{case}_0000.nii.gz"))
        mask = sitk.ReadImage(str(out / "ours" / f"{case}.nii.gz"))
        assert mask.GetSize() == image.GetSize()
        assert mask.GetSpacing() == image.GetSpacing() and mask.GetOrigin() == image.GetOrigin()
        assert mask.GetDirection() == image.GetDirection()
        assert mask.GetPixelID() == sitk.sitkUInt8
    with open(out / "nnunet_probs" / "cropped.pkl", "rb") as fh:
        props = pickle.load(fh)
    bbox, full = props["bbox_used_for_cropping"], props["shape_before_cropping"]
    assert any(hi - lo < n for (lo, hi), n in zip(bbox, full))  # nnU-Net did crop that case
    assert not np.any(_labels(out / "ours" / "cropped.nii.gz")[:5])  # outside the box: background


@needs_nnunet
def test_resume_damage_and_other_settings(nnunet_runs, tmp_path, capsys):
    model, images = nnunet_runs["models"]["labels"], nnunet_runs["images"]
    out = tmp_path / "out"
    args = ["nnunet-predict", "-i", str(images), "-o", str(out), "-m", str(model), *COMMON]
    assert cli.main([*args, "-num_parts", "2", "-part_id", "1"]) == 0  # cases sorted: cropped (0), plain (1)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["plain.nii.gz"]
    reference = nnunet_runs["runs"]["labels"] / "ours"
    assert (out / "plain.nii.gz").read_bytes() == (reference / "plain.nii.gz").read_bytes()
    assert cli.main([*args, "--continue_prediction"]) == 0
    assert "1 written, 1 skipped" in capsys.readouterr().err
    before = (out / "cropped.nii.gz").read_bytes()
    (out / "plain.nii.gz").write_bytes(before)  # damaged: bytes that do not match its record
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "redoing plain" in err and "1 written, 1 skipped" in err
    assert (out / "plain.nii.gz").read_bytes() == (reference / "plain.nii.gz").read_bytes()
    assert cli.main([*args, "--flag-below", "1"]) == 0  # nothing redone; the review list from the records
    err = capsys.readouterr().err
    assert "2 skipped" in err and "review (2 case(s) with an expected dice below 1): cropped, plain" in err
    rows = list(csv.DictReader(open(out / "expected_dice.csv")))
    assert len(rows) == 4 and {r["review"] for r in rows} == {"1"} and {r["name"] for r in rows} == {"outer", "inner"}
    assert cli.main([*args, "--metric", "iou"]) == 2  # a folder never mixes settings
    assert "other settings" in capsys.readouterr().err


@needs_nnunet
def test_save_probabilities_as_nnunet(nnunet_runs, tmp_path):
    """--save_probabilities: nnU-Net's .npz/.pkl as nnUNetv2_predict --save_probabilities writes them, beside the
    RankSEG masks."""
    out = tmp_path / "out"
    model, ref = nnunet_runs["models"]["labels"], nnunet_runs["runs"]["labels"]
    assert cli.main(["nnunet-predict", "-i", str(nnunet_runs["images"]), "-o", str(out), "-m", str(model), *COMMON,
                     "--save_probabilities"]) == 0
    for case in CASES:
        with np.load(out / f"{case}.npz") as ours, np.load(ref / "nnunet_probs" / f"{case}.npz") as theirs:
            np.testing.assert_array_equal(ours["probabilities"], theirs["probabilities"])
        assert (out / f"{case}.nii.gz").read_bytes() == (ref / "ours" / f"{case}.nii.gz").read_bytes()


@needs_nnunet
def test_unreadable_image_fails_without_partial_files(nnunet_runs, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "plain_0000.nii.gz").write_bytes((nnunet_runs["images"] / "plain_0000.nii.gz").read_bytes())
    (images / "zbroken_0000.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    argv = ["nnunet-predict", "-i", str(images), "-o", str(out), "-m", str(nnunet_runs["models"]["labels"]), *COMMON]
    assert cli.main(argv) == 1
    assert "zbroken" in capsys.readouterr().err.splitlines()[-1]
    assert not (out / "zbroken.nii.gz").exists()
    assert not [p for p in out.iterdir() if is_temporary(p.name)]
    if (out / "plain.nii.gz").exists():  # exported before nnU-Net stopped (timing): then complete, with its record
        ref = nnunet_runs["runs"]["labels"] / "ours" / "plain.nii.gz"
        assert (out / "plain.nii.gz").read_bytes() == ref.read_bytes()
        assert prov.read_record(out / "plain.nii.gz")["mask_sha256"]


@needs_nnunet
def test_python_entry_in_memory(nnunet_runs):
    """RankSEGPredictor in a user's script, through nnU-Net's in-memory path (predict_single_npy_array)."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from rankseg_monai.app.nnunet import RankSEGPredictor

    for kind in ("labels", "regions"):
        predictor = RankSEGPredictor(rankseg_options=RankSEGOptions(), device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(nnunet_runs["models"][kind]), use_folds=(0,))
        image, props = SimpleITKIO().read_images([str(nnunet_runs["images"] / "cropped_0000.nii.gz")])
        seg = predictor.predict_single_npy_array(image, props)
        np.testing.assert_array_equal(seg, _labels(nnunet_runs["runs"][kind] / "ours" / "cropped.nii.gz"))


@needs_nnunet
def test_usage_errors_before_any_work(nnunet_runs, tmp_path, capsys):
    model, images = nnunet_runs["models"], nnunet_runs["images"]
    base = ["nnunet-predict", "-i", str(images), "-o", str(tmp_path / "o"), *COMMON]
    cases = [([*base, "-m", str(model["labels"]), "--softmax"], "--softmax does not apply"),
             ([*base, "-m", str(tmp_path / "nope")], "not a folder"),
             ([*base, "-m", str(model["regions"]), "--regions", '[[1, 2]]'], "region-trained"),
             ([*base, "-m", str(model["labels"]), "-f", "3"], "fold_3"),
             ([*base, "-m", str(model["labels"]), "-step_size", "0"], "-step_size")]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_missing_nnunet_names_the_extra(monkeypatch, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "i").mkdir()
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ImportError
    argv = ["nnunet-predict", "-i", str(tmp_path / "i"), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "m")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and INSTALL_HINT in err[0]


def test_only_the_nnunet_module_imports_nnunetv2():
    package = Path(cli.__file__).resolve().parents[1]
    importers = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == "nnunetv2" for n in names):
                importers.append(path.relative_to(package).as_posix())
    assert sorted(set(importers)) == ["app/nnunet.py"]


def _pad(probs: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...], background: float) -> np.ndarray:
    full = np.zeros((probs.shape[0], *shape), np.float32)
    full[0] = background
    full[(slice(None), *box)] = probs
    return full


@pytest.mark.parametrize("options", [
    RankSEGOptions(), RankSEGOptions(metric="iou"), RankSEGOptions(pruning_prob="auto-correlated"),
    RankSEGOptions(pruning_prob=0.5), RankSEGOptions(smooth=1.0),
    RankSEGOptions(regions={"whole": [1, 2], "core": [2]}, regions_class_order=[1, 2], region_probs=True),
], ids=["dice-auto", "iou", "auto-correlated", "p0.5", "smooth", "regions"])
def test_deciding_on_the_crop_is_deciding_on_the_volume(options):
    """nnU-Net decides on its crop box; outside it background is certain.  The decision of the box, put back, must
    be the decision on the whole volume (what predict takes from --save_probabilities), for every pruning mode."""
    rng = np.random.default_rng(3)
    shape, box = (9, 11, 10), (slice(2, 7), slice(1, 9), slice(3, 10))
    for trial in range(20):
        inner = tuple(s.stop - s.start for s in box)
        logits = rng.normal(0, 1 + trial % 4, (3, *inner)).astype(np.float32)
        if options.region_probs:  # two sigmoids, nested regions
            probs = 1 / (1 + np.exp(-logits[:2]))
            probs[1] = np.minimum(probs[1], probs[0])
            full = _pad(probs, box, shape, 0.0)
        else:
            e = np.exp(logits - logits.max(0))
            probs = e / e.sum(0)
            full = _pad(probs, box, shape, 1.0)
        bbox = [(b.start, b.stop) for b in box]
        mask_box, _ = decide_probabilities(probs, options, estimates=False, crop=(bbox, shape))
        mask_full, _ = decide_probabilities(full, options, estimates=False)
        put_back = np.zeros(shape, mask_box.dtype)
        put_back[box] = mask_box
        np.testing.assert_array_equal(put_back, mask_full)
