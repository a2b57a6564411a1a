"""``rankseg-monai calibrate`` end to end (nnU-Net fold layout, NIfTI folders), and ``predict``/``evaluate
--calibration``: recovery of a known distortion, the held-out split, refusals (exit 2, nothing written), the
sample budget, resume with another calibration, the recommendation and the fingerprint."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from volume_files import (  # noqa: E402
    files_in,
    nifti_affine,
    sitk_xyz,
    write_nifti_labels,
    write_nifti_probs,
    write_nnunet_case,
    write_sitk_labels,
)

from rankseg_monai.app import calibrate as rcal  # noqa: E402
from rankseg_monai.app.cli import main  # noqa: E402
from rankseg_monai.calibrator import load_calibration  # noqa: E402
from rankseg_monai.functional import decide  # noqa: E402
from rankseg_monai.options import RankSEGOptions  # noqa: E402

SHAPE = (24, 24, 12)


def _case(seed: int, k: float, shape=SHAPE, radius=(3.0, 6.0)):
    """Calibrated 3-class logits z (two soft blobs), the truth drawn voxel by voxel from softmax(z), and the
    distorted model's probabilities softmax(k z)."""
    g = np.random.default_rng(seed)
    x = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).astype(float)
    z = np.zeros((3, *shape))
    for c in (1, 2):
        ctr = g.uniform(2, np.array(shape) - 2)
        r = g.uniform(*radius)
        d = np.sqrt((((x - ctr[:, None, None, None]) / np.array([1, 1, 0.7])[:, None, None, None]) ** 2).sum(0))
        z[c] = 1.5 * (r - d) + g.normal(0, 0.3, shape)
    p = torch.softmax(torch.from_numpy(z), 0).numpy()
    label = (g.random(shape)[None] > np.cumsum(p, 0)).sum(0).clip(0, 2).astype(np.uint8)
    return torch.softmax(torch.from_numpy(k * z), 0).numpy().astype(np.float32), label


def _nnunet_folds(root: Path, k: float, folds=5, per_fold=2, seed=0) -> list[Path]:
    dirs = []
    for f in range(folds):
        d = root / f"fold_{f}" / "validation"
        for i in range(per_fold):
            probs, label = _case(seed + 100 * f + i, k)
            write_nnunet_case(d, f"c{f}{i}", probs)
            (root / "gt_segmentations").mkdir(parents=True, exist_ok=True)
            write_sitk_labels(root / "gt_segmentations" / f"c{f}{i}.nii.gz", label)
        dirs.append(d)
    return dirs


def _nifti_folder(root: Path, k: float, n: int, seed=1000, prefix="case", **kw) -> tuple[Path, Path]:
    affine = nifti_affine()
    (root / "probs").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        probs, label = _case(seed + i, k, **kw)
        write_nifti_probs(root / "probs" / f"{prefix}{i}.nii.gz", probs, affine)
        write_nifti_labels(root / "labels" / f"{prefix}{i}.nii.gz", label, affine)
    return root / "probs", root / "labels"


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """5 nnU-Net folds of an under-confident model (logits x 0.5), calibrated once."""
    root = tmp_path_factory.mktemp("nnunet")
    dirs = _nnunet_folds(root, 0.5)
    out = root / "calib"
    code = main(["calibrate", "--probs", *map(str, dirs), "--labels", str(root / "gt_segmentations"), "-o", str(out),
                 "--quiet"])
    assert code == 0
    return root, dirs, out


def test_nnunet_folds_recover_a_known_temperature_within_2_percent(nnunet):
    root, dirs, out = nnunet
    assert files_in(out) == ["calibration.json", "reliability_after.png", "reliability_before.png", "report.csv",
                             "report.md"]
    cal = load_calibration(out / "calibration.json")
    assert cal.method == "temperature" and cal.input_kind == "class-probabilities" and cal.channels == (0, 1, 2)
    assert abs(cal.temperature[0] / 0.5 - 1) < 0.02
    assert cal.fit["cases"] == 10 and cal.fit["folds"] == 5
    assert cal.fit["fold_of_case"] == {f"c{f}{i}": f for f in range(5) for i in range(2)}
    for t in cal.fit["fold_temperatures"].values():  # each held-out fold's fit (on the 4 others) recovers it too
        assert abs(t[0] / 0.5 - 1) < 0.04
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["structure"] for r in rows] == ["1", "2"]
    for r in rows:  # the under-confident model: RankSEG loses, calibrated RankSEG does not
        assert float(r["dice_rankseg"]) < float(r["dice_argmax"]) < float(r["dice_calibrated"])
        assert float(r["expected_dice_mae_after"]) < float(r["expected_dice_mae_before"])
        assert r["recommend"] == "rankseg"
    text = (out / "report.md").read_text()
    assert "calibrated RankSEG beats argmax on held-out cases" in text and "does not transfer" in text


def test_predict_with_the_calibration_decides_on_calibrated_probabilities(nnunet, tmp_path):
    root, dirs, out = nnunet
    cal = load_calibration(out / "calibration.json")
    pred = tmp_path / "pred"
    assert main(["predict", str(dirs[0]), "-o", str(pred), "--calibration", str(out / "calibration.json"),
                 "--quiet"]) == 0
    from rankseg_monai.app import io as rio

    for name in ("c00", "c01"):
        probs = rio.load_probabilities(dirs[0] / f"{name}.npz").probabilities
        q = torch.softmax(torch.log(torch.from_numpy(probs).double().clamp_min(2.0 ** -24)) / cal.temperature[0], 0)
        want = decide(q[None].float(), RankSEGOptions())[0].numpy()
        assert np.array_equal(sitk_xyz(pred / f"{name}.nii.gz"), want)
        record = json.loads((pred / f"{name}.nii.gz.rankseg.json").read_text())
        assert record["calibration"]["sha256"] == cal.sha256
        assert json.dumps(cal.sha256) in json.dumps(record["settings"])
    rows = list(csv.DictReader((pred / "expected_dice.csv").open()))
    assert "outside_calibration" in rows[0]


def test_resume_with_another_calibration_redoes_the_cases(nnunet, tmp_path, capsys):
    root, dirs, out = nnunet
    pred = tmp_path / "pred"
    assert main(["predict", str(dirs[1]), "-o", str(pred), "--calibration", str(out / "calibration.json"),
                 "--quiet"]) == 0
    doc = json.loads((out / "calibration.json").read_text())
    doc["temperature"] = [0.8]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["predict", str(dirs[1]), "-o", str(pred), "--calibration", str(other), "--quiet"]) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert main(["predict", str(dirs[1]), "-o", str(pred), "--calibration", str(other), "--quiet",
                 "--overwrite"]) == 0
    assert "2 written" in capsys.readouterr().err


def test_evaluate_shows_calibrated_rankseg_beside_argmax_and_rankseg(nnunet, tmp_path):
    root, dirs, out = nnunet
    ev = tmp_path / "ev"
    assert main(["evaluate", "--probs", str(dirs[2]), "--labels", str(root / "gt_segmentations"), "-o", str(ev),
                 "--calibration", str(out / "calibration.json"), "--quiet", "--nsd-tolerance", "0"]) == 0
    rows = list(csv.DictReader((ev / "summary.csv").open()))
    for key in ("dice_mean_argmax", "dice_mean_rankseg", "dice_mean_rankseg_calibrated",
                "expected_mae_rankseg", "expected_mae_rankseg_calibrated"):
        assert key in rows[0]
    last = rows[-1]
    assert float(last["expected_mae_rankseg_calibrated"]) < float(last["expected_mae_rankseg"])


def test_one_folder_is_split_into_k_folds_and_the_sample_budget_holds(tmp_path):
    probs, labels = _nifti_folder(tmp_path, 2.0, n=6)
    out = tmp_path / "out"
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out), "--folds", "3",
                 "--max-voxels", "3000", "--per-class", "--quiet"]) == 0
    cal = load_calibration(out / "calibration.json")
    assert cal.method == "per-class-temperature" and len(cal.temperature) == 3
    assert cal.fit["fold_of_case"] == {f"case{i}": i % 3 for i in range(6)}
    assert cal.fit["voxels"] <= 3000  # the fit's sample: a fixed budget over all cases, not every voxel
    assert 0.5 * 3000 <= cal.fit["voxels"]


def test_sample_indices_and_fold_assignment():
    g = torch.Generator().manual_seed(0)
    for n, budget in ((10, 4), (1000, 1000), (5, 100), (12345, 77)):
        idx = rcal.sample_indices(n, budget, g)
        assert min(n, budget) // 2 <= idx.numel() <= budget
        assert bool((idx >= 0).all() and (idx < n).all()) and bool((idx.diff() > 0).all())
    assert rcal.fold_assignment([[Path(c) for c in "abcde"]], 5) == [0, 1, 2, 3, 4]
    assert rcal.fold_assignment([[Path(c) for c in "abc"]], 5) == [0, 1, 2]  # capped at the number of cases
    assert rcal.fold_assignment([[Path("a")], [Path("b"), Path("c")], [Path("d")]], 2) == [0, 1, 1, 2]


@pytest.fixture()
def small(tmp_path):
    probs, labels = _nifti_folder(tmp_path, 1.0, n=2, shape=(10, 10, 6), radius=(2.0, 3.0))
    return probs, labels


@pytest.mark.parametrize("extra,match", [
    (["--folds", "1"], "--folds must be >= 2"),
    (["--max-voxels", "10"], "--max-voxels must be >= 1000"),
    (["--per-class", "--method", "vector"], "--method vector is already per class"),
    (["--metric", "iou", "--solver", "ba"], "--solver ba does not work"),
])
def test_bad_options_are_refused_before_any_work(small, tmp_path, capsys, extra, match):
    probs, labels = small
    out = tmp_path / "out"
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_labels_duplicate_cases_and_existing_output_are_refused(small, tmp_path, capsys):
    probs, labels = small
    out = tmp_path / "out"
    (labels / "case1.nii.gz").rename(tmp_path / "case1.nii.gz")
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out)]) == 2
    assert "case 'case1'" in capsys.readouterr().err and not out.exists()
    (tmp_path / "case1.nii.gz").rename(labels / "case1.nii.gz")
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "case0.nii.gz").write_bytes((probs / "case0.nii.gz").read_bytes())
    assert main(["calibrate", "--probs", str(probs), str(twin), "--labels", str(labels), "-o", str(out)]) == 2
    assert "each case belongs to one fold" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "calibration.json").write_text("{}")
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and files_in(out) == ["calibration.json"]


def test_mismatched_or_broken_calibration_files_are_refused_before_any_case(small, tmp_path, capsys):
    probs, labels = small
    four = {"format": "rankseg-monai/calibration", "version": 1, "method": "temperature",
            "input_kind": "class-probabilities", "temperature": [0.5], "channels": [0, 1, 2, 3]}
    cases = [("four.json", json.dumps(four), [], "fitted on 4 channels"),
             ("kind.json", json.dumps({**four, "channels": [0, 1, 2]}), ["--output-mode", "multilabel"],
              "fitted on class-probabilities"),
             ("bad.json", "{oops", [], "invalid JSON"),
             ("missing.json", None, [], "cannot read the calibration file")]
    for name, text, extra, match in cases:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        for cmd in (["predict", str(probs)], ["evaluate", "--probs", str(probs), "--labels", str(labels)]):
            out = tmp_path / f"out_{name}"
            assert main([*cmd, "-o", str(out), "--calibration", str(path), *extra]) == 2, (name, cmd)
            err = capsys.readouterr().err
            assert match in err and len(err.strip().splitlines()) == 1, err
            assert not out.exists()
    assert main(["predict", str(probs), "-o", str(tmp_path / "x"), "--ignore-recommendation"]) == 2
    assert "only applies with --calibration" in capsys.readouterr().err


def test_predict_follows_the_recommendation_unless_told_otherwise(small, tmp_path):
    probs, _ = small
    path = tmp_path / "cal.json"
    doc = {"format": "rankseg-monai/calibration", "version": 1, "method": "temperature",
           "input_kind": "class-probabilities", "temperature": [1.0], "channels": [0, 1, 2],
           "recommendation": ["rankseg", "argmax", "rankseg"]}
    path.write_text(json.dumps(doc))
    from rankseg_monai.app import io as rio

    p = rio.load_probabilities(probs / "case0.nii.gz").probabilities
    plain = decide(torch.from_numpy(p)[None], RankSEGOptions())[0].numpy()
    argmax = p.argmax(0)
    followed = np.where(((plain == 1) | (argmax == 1)) & (plain != 2), argmax, plain)
    for extra, want in (([], followed), (["--ignore-recommendation"], plain)):
        out = tmp_path / f"pred{len(extra)}"
        assert main(["predict", str(probs), "-o", str(out), "--calibration", str(path), "--quiet", *extra]) == 0
        from volume_files import nib

        mask = np.asarray(nib.load(str(out / "case0.nii.gz")).dataobj)
        assert np.array_equal(mask, want)
    assert not np.array_equal(followed, plain)


def test_fingerprint_flags_shifted_cases(tmp_path, capsys):
    probs, labels = _nifti_folder(tmp_path / "cal", 1.0, n=4)
    out = tmp_path / "out"
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out), "--folds", "2",
                 "--quiet"]) == 0
    # flat (x 0.25) probabilities of much larger objects than the calibration cases'
    shifted, _ = _nifti_folder(tmp_path / "shift", 0.25, n=2, seed=5000, prefix="shifted", radius=(8.0, 9.0))
    pred = tmp_path / "pred"
    capsys.readouterr()
    assert main(["predict", str(shifted), str(probs), "-o", str(pred), "--calibration", str(out / "calibration.json"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    rows = list(csv.DictReader((pred / "expected_dice.csv").open()))
    outside = {r["case"] for r in rows if r["outside_calibration"]}
    assert outside == {"shifted0", "shifted1"}  # the calibration cases themselves lie inside, by construction
    record = json.loads((pred / "shifted0.nii.gz.rankseg.json").read_text())
    assert record["calibration"]["outside"] and "expected volume" in " ".join(record["calibration"]["outside"])
    assert "review (2 case(s)" in err and "shifted0, shifted1" in err


def test_regions_from_class_and_from_region_probabilities(tmp_path, capsys):
    """LiTS-like regions: calibrate and predict with --regions on class probabilities (a softmax calibration, the
    report per region, no per-region recommendation) and on region probabilities (one sigmoid per region)."""
    regions = '{"liver": [1, 2], "tumour": [2]}'
    probs, labels = _nifti_folder(tmp_path / "cls", 0.5, n=4)
    out = tmp_path / "cal_cls"
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out), "--folds", "2",
                 "--regions", regions, "--quiet"]) == 0
    cal = load_calibration(out / "calibration.json")
    assert cal.input_kind == "class-probabilities" and cal.recommendation is None
    assert abs(cal.temperature[0] / 0.5 - 1) < 0.05
    assert [r["structure"] for r in csv.DictReader((out / "report.csv").open())] == ["liver", "tumour"]
    assert cal.fingerprint["structures"] == ["liver", "tumour"]
    assert main(["predict", str(probs), "-o", str(tmp_path / "p_cls"), "--regions", regions, "--calibration",
                 str(out / "calibration.json"), "--quiet"]) == 0

    # region probabilities: q_liver = p1 + p2, q_tumour = p2 of the same cases
    import nibabel as nib

    rp = tmp_path / "reg" / "probs"
    rp.mkdir(parents=True)
    for f in sorted(probs.iterdir()):
        img = nib.load(str(f))
        p = np.asarray(img.dataobj)  # (X, Y, Z, C)
        q = np.stack([p[..., 1] + p[..., 2], p[..., 2]], -1).clip(0, 1)
        nib.save(nib.Nifti1Image(q.astype(np.float32), img.affine), str(rp / f.name))
    out2 = tmp_path / "cal_reg"
    assert main(["calibrate", "--probs", str(rp), "--labels", str(labels), "-o", str(out2), "--folds", "2",
                 "--regions", regions, "--region-probs", "--per-class", "--quiet"]) == 0
    cal2 = load_calibration(out2 / "calibration.json")
    assert cal2.input_kind == "region-probabilities" and cal2.channels == ("liver", "tumour")
    assert cal2.method == "per-class-temperature" and len(cal2.temperature) == 2
    assert main(["predict", str(rp), "-o", str(tmp_path / "p_reg"), "--regions", regions, "--region-probs",
                 "--calibration", str(out2 / "calibration.json"), "--quiet", "--channels-last"]) == 0
    capsys.readouterr()
    # the same file with class probabilities (no --region-probs): refused before any case, nothing written
    assert main(["predict", str(probs), "-o", str(tmp_path / "p_bad"), "--regions", regions, "--calibration",
                 str(out2 / "calibration.json")]) == 2
    assert "fitted on region-probabilities" in capsys.readouterr().err
    assert not (tmp_path / "p_bad").exists()


def test_bundle_overlay_and_handler_take_a_calibration_file(tmp_path):
    from monai.bundle import ConfigParser

    from rankseg_monai import RankSEGd, RankSEGHandler

    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"format": "rankseg-monai/calibration", "version": 1, "method": "temperature",
                                "input_kind": "class-probabilities", "temperature": [0.5], "channels": [0, 1, 2]}))
    overlay = Path(__file__).resolve().parents[2] / "bundle" / "rankseg_overlay.json"
    config = ConfigParser.load_config_file(str(overlay))
    config["decision"] = config.pop("postprocessing#transforms#2")  # the entry the overlay puts in
    parser = ConfigParser(config)
    parser.update({"rankseg_calibration": str(path)})  # = --rankseg_calibration path
    rs = parser.get_parsed_content("decision")
    assert isinstance(rs, RankSEGd) and rs.rankseg[0].calibration == load_calibration(path)
    handler = RankSEGHandler(keys="pred", calibration=str(path))
    p = torch.softmax(torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0)), 0)
    want = RankSEGd(keys="pred", calibration=path)({"pred": p})["pred"]
    assert torch.equal(handler.transform({"pred": p})["pred"], want)


def test_cases_are_streamed_one_at_a_time(tmp_path, monkeypatch):
    """No case's probabilities outlive its turn: when a case is read, every earlier case's array is gone (what stays
    is the bounded sample)."""
    import gc
    import weakref

    probs, labels = _nifti_folder(tmp_path, 0.7, n=5, shape=(12, 12, 6), radius=(2.0, 3.0))
    alive, reads = [], []
    original = rcal._read_case

    def tracked(*a, **kw):
        gc.collect()
        reads.append(sum(r() is not None for r in alive))
        p, label = original(*a, **kw)
        alive.append(weakref.ref(p))
        return p, label

    monkeypatch.setattr(rcal, "_read_case", tracked)
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(tmp_path / "out"),
                 "--folds", "2", "--quiet"]) == 0
    assert len(reads) == 10 and reads == [0] * 10  # two passes over 5 cases, never two cases in memory


def test_an_unreadable_case_stops_the_run_with_nothing_written(small, tmp_path, capsys):
    probs, labels = small
    (probs / "case1.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    assert main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "case 'case1'" in err and "nothing written" in err
    assert not (out / "calibration.json").exists() and files_in(out) == []
