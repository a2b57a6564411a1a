"""Issue 13 (run integrity), the command line: every mask on disk is right, complete and traceable to its settings,
or absent; one bad case never stops the others; bad options and unusable output folders fail before any work.

Crashes, kills and concurrent runs use real subprocesses (``python -m rankseg_monai.app.cli``, held at a gate the
test opens where a run must be caught in the middle: no timing); a full disk is fault-injected into the writer,
and a real small file system is used when ``RANKSEG_TEST_SMALL_FS`` names one (opt-in, see the test)."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from generators import make_case
from volume_files import (
    files_in,
    nifti_affine,
    write_nifti_labels,
    write_nifti_probs,
    write_nnunet_case,
    write_sitk_labels,
    write_sitk_probs,
)

import rankseg_monai
from rankseg_monai._files import sha256_file
from rankseg_monai.app import cli
from rankseg_monai.app import io as rio
from rankseg_monai.app import provenance as prov
from rankseg_monai.app.cli import main
from rankseg_monai.functional import rankseg

ROOT = Path(rankseg_monai.__file__).resolve().parents[1]
NAMES = [f"c{i}" for i in range(6)]
#: how long a subprocess may take before the test calls it hung (a guard against hangs, not a timing assumption:
#: under `nice -n 10` beside busy loops one run of the command line took minutes)
HANG = 3600

#: runs the command line with RankSEG's decision (or the NIfTI writer) slowed down by $DELAY seconds per case, so
#: that a test can catch the run in the middle; with $GATE, the decision call number $GATE_AT (0-based; a case
#: makes two: RankSEG's mask, then argmax's for the expected Dice; with $WHERE=write: the NIfTI write number $GATE_AT,
#: after writing its temporary file) first creates the file $GATE.waiting and then
#: waits until the test creates the file $GATE: the test holds the run at a known point for as long as it needs,
#: however slow the machine (no timing)
SLOW = """
import os, sys, time
import rankseg_monai.app.cli as cli, rankseg_monai.app.io as rio
delay, where = float(os.environ["DELAY"]), os.environ.get("WHERE", "decide")
gate, gate_at, calls = os.environ.get("GATE"), int(os.environ.get("GATE_AT", "0")), [0]
def hold():
    if gate and calls[0] == gate_at:
        open(gate + ".waiting", "w").close()
        start = time.time()
        while not os.path.exists(gate):
            if time.time() - start > 3600:
                sys.exit("the test never opened the gate")
            time.sleep(0.02)
    calls[0] += 1
if where == "decide":
    real = cli.decide
    def slow(*a, **k):
        hold()
        time.sleep(delay)
        return real(*a, **k)
    cli.decide = slow
else:
    real = rio._write_nifti
    def slow(*a, **k):
        real(*a, **k)
        hold()
        time.sleep(delay)
    rio._write_nifti = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def expected(probs_cxyz: np.ndarray, **kwargs) -> np.ndarray:
    kwargs.setdefault("pruning_prob", "auto")  # the CLI's default
    return rankseg(torch.from_numpy(probs_cxyz)[None], **kwargs)[0].numpy()


def nifti_mask(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def masks(folder: Path) -> list[str]:
    return sorted(n for n in files_in(folder) if not n.startswith(".") and n.endswith(("nii.gz", "nii", "mha", "nrrd")))


def record(mask: Path) -> dict:
    return json.loads(prov.record_path(mask).read_text())


def assert_consistent(folder: Path) -> dict[str, str]:
    """Every mask in ``folder`` has a record matching its bytes; returns {mask name: metric}."""
    out = {}
    for name in masks(folder):
        rec = record(folder / name)
        assert rec["mask_sha256"] == sha256_file(folder / name), name
        out[name] = rec["settings"]["options"]["metric"]
    return out


@pytest.fixture
def cases(tmp_path):
    """Six small NIfTI probability files (channels-last) and their probabilities."""
    folder = tmp_path / "in"
    folder.mkdir()
    out = {}
    for i, name in enumerate(NAMES):
        probs, label, _ = make_case(seed=100 + i, shape=(12, 11, 10))
        write_nifti_probs(folder / f"{name}.nii.gz", probs, nifti_affine())
        out[name] = (probs, label)
    return folder, out


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_cli(*args: str, delay: float = 0.0, where: str = "decide", wait: bool = True, gate: Path | None = None,
            gate_at: int = 0, **kw):
    slow = delay or gate is not None
    cmd = [sys.executable, "-c", SLOW, *args] if slow else [sys.executable, "-m", "rankseg_monai.app.cli", *args]
    env = _env()
    env["DELAY"], env["WHERE"] = str(delay), where
    if gate is not None:
        env["GATE"], env["GATE_AT"] = str(gate), str(gate_at)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=HANG)
    return proc.returncode, out, err


def held(gate: Path, proc: subprocess.Popen) -> None:
    """Wait until the run ``proc`` started with ``gate`` is held at its gate (or fail if it ended first)."""
    wait_for(lambda: Path(f"{gate}.waiting").exists() or proc.poll() is not None, timeout=HANG, what="the gate")
    assert proc.poll() is None, f"the run ended before its gate: {proc.communicate()}"


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    start = time.time()
    while not condition():
        if time.time() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------- item 1


def _truncating(real):
    def write(img, path, *args, **kwargs):
        real(img, path, *args, **kwargs)
        with open(path, "r+b") as fh:
            fh.truncate(4096 if os.path.getsize(path) > 8192 else os.path.getsize(path) // 2)

    return write


@pytest.mark.parametrize("fmt", ["nrrd", "nii", "mha", "nii.gz"])
def test_disk_full_mask_is_not_written_and_rerun_redoes_it(cases, tmp_path, monkeypatch, capsys, fmt):
    folder, data = cases
    out = tmp_path / "out"
    calls = []
    real_sitk, real_nib = sitk.WriteImage, nib.save

    def flaky(real):
        def write(*args, **kwargs):  # the second mask written lands truncated, as on a full disk
            calls.append(1)
            return (_truncating(real) if len(calls) == 2 else real)(*args, **kwargs)
        return write

    monkeypatch.setattr(sitk, "WriteImage", flaky(real_sitk))
    monkeypatch.setattr(nib, "save", flaky(real_nib))
    assert main(["predict", str(folder), "-o", str(out), "--format", fmt, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "FAILED c1:" in err and "read back" in err and "5 written" in err
    assert masks(out) == [f"{n}.{fmt}" for n in NAMES if n != "c1"]  # nothing for c1, no temporary
    assert not any(n.startswith(".") for n in files_in(out))
    monkeypatch.undo()  # space freed: the same command finishes the run
    assert main(["predict", str(folder), "-o", str(out), "--format", fmt, "--quiet"]) == 0
    assert "1 written, 5 skipped" in capsys.readouterr().err
    back, _ = rio.read_mask(out / f"c1.{fmt}")
    np.testing.assert_array_equal(back, expected(data["c1"][0]))


@pytest.mark.skipif(not os.environ.get("RANKSEG_TEST_SMALL_FS"), reason="opt-in: set RANKSEG_TEST_SMALL_FS to an "
                    "empty folder on a file system of 8 kB, e.g. `mount -t tmpfs -o size=8k tmpfs DIR` (as root)")
@pytest.mark.parametrize("fmt", ["nrrd", "nii", "mha", "nii.gz"])
def test_real_full_disk(tmp_path, fmt):
    """On a real 8 kB tmpfs a (60, 60, 60) mask does not fit (15 kB compressed, 216 kB as .nii): SimpleITK's
    writers left truncated files without raising (exit 0 before the fix); now the case fails and nothing is left,
    and the same command finishes the run once there is space."""
    small = Path(os.environ["RANKSEG_TEST_SMALL_FS"]) / f"out_{fmt.replace('.', '')}"
    probs, _, _ = make_case(seed=1, shape=(60, 60, 60))
    src = write_sitk_probs(tmp_path / "case.mha", probs)
    try:
        rc, _, err = run_cli("predict", str(src), "-o", str(small), "--format", fmt, "--quiet")
        assert rc == 1 and "FAILED case" in err, err
        assert masks(small) == [] and not any(".rankseg-tmp-" in n for n in files_in(small))
    finally:
        subprocess.run(["rm", "-rf", str(small)], check=False)
    rc, _, err = run_cli("predict", str(src), "-o", str(tmp_path / "roomy"), "--format", fmt, "--quiet")
    assert rc == 0, err
    np.testing.assert_array_equal(rio.read_mask(tmp_path / "roomy" / f"case.{fmt}")[0], expected(probs))


# ------------------------------------------------------------------------------------------------- item 2


def test_every_mask_has_a_record_of_settings_inputs_and_version(cases, tmp_path):
    folder, data = cases
    out = tmp_path / "out"
    assert main(["predict", str(folder / "c0.nii.gz"), "-o", str(out), "--metric", "iou", "--quiet"]) == 0
    rec = record(out / "c0.nii.gz")
    assert rec["version"] == rankseg_monai.__version__ and rec["case"] == "c0"
    assert rec["settings"]["options"]["metric"] == "iou" and rec["settings"]["command"] == "predict"
    assert rec["inputs"][0]["file"] == "c0.nii.gz"
    assert rec["inputs"][0]["sha256"] == sha256_file(folder / "c0.nii.gz")
    assert rec["mask_sha256"] == sha256_file(out / "c0.nii.gz") and "read back" in rec["verified"]


def test_concurrent_runs_with_other_settings_do_not_mix(cases, tmp_path):
    folder, data = cases
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = run_cli("predict", str(folder), "-o", str(out), "--metric", "dice", "--quiet", wait=False, gate=gate)
    held(gate, first)  # the first run is deciding its first case (claimed), and stays there until the gate opens
    rc, _, err = run_cli("predict", str(folder), "-o", str(out), "--metric", "iou", "--quiet")
    assert rc == 2 and "another rankseg-monai run" in err and "with other settings" in err, err
    gate.touch()
    _, err1 = first.communicate(timeout=HANG)
    assert first.returncode == 0, err1
    assert set(assert_consistent(out).values()) == {"dice"} and len(masks(out)) == 6
    # later: the iou run is refused (the folder holds dice masks), a dice run skips everything
    rc, _, err = run_cli("predict", str(folder), "-o", str(out), "--metric", "iou", "--quiet")
    assert rc == 2 and "made with other settings" in err and "'dice' -> 'iou'" in err
    assert main(["predict", str(folder), "-o", str(out), "--quiet"]) == 0


def test_concurrent_runs_with_the_same_settings_share_the_work(cases, tmp_path):
    folder, data = cases
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = run_cli("predict", str(folder), "-o", str(out), "--quiet", wait=False, gate=gate)
    held(gate, first)  # the first run holds the claim of c0 until the gate opens
    rc, _, err2 = run_cli("predict", str(folder), "-o", str(out), "--quiet")
    assert rc == 0 and "5 written" in err2 and "1 left to another run writing them now" in err2, err2
    gate.touch()
    _, err1 = first.communicate(timeout=HANG)
    assert first.returncode == 0 and "1 written, 5 skipped" in err1, err1  # every case written exactly once
    assert set(assert_consistent(out).values()) == {"dice"}
    for name in NAMES:
        np.testing.assert_array_equal(nifti_mask(out / f"{name}.nii.gz"), expected(data[name][0]))
    assert not any(n.startswith(".") for n in files_in(out))  # locks and claims gone with the last run


def test_kill_during_overwrite_never_leaves_a_mixed_folder_that_resumes(cases, tmp_path):
    folder, data = cases
    out, gate = tmp_path / "out", tmp_path / "gate"
    assert main(["predict", str(folder), "-o", str(out), "--quiet"]) == 0
    # held in the decision of the second case: the first iou mask is written, the others are still dice
    proc = run_cli("predict", str(folder), "-o", str(out), "--metric", "iou", "--overwrite", "--quiet", wait=False,
                   gate=gate, gate_at=2)
    held(gate, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG)
    metrics = assert_consistent(out)  # each mask matches its record
    assert set(metrics.values()) == {"dice", "iou"}
    # the resume without --overwrite does not skip the dice masks as if they were iou: it refuses
    rc, _, err = run_cli("predict", str(folder), "-o", str(out), "--metric", "iou", "--quiet")
    assert rc == 2 and "made with other settings" in err and "--overwrite" in err
    assert main(["predict", str(folder), "-o", str(out), "--metric", "iou", "--overwrite", "--quiet"]) == 0
    assert set(assert_consistent(out).values()) == {"iou"} and len(masks(out)) == 6
    for name in NAMES:
        np.testing.assert_array_equal(nifti_mask(out / f"{name}.nii.gz"), expected(data[name][0], metric="iou"))


def test_a_run_where_every_case_fails_records_nothing(tmp_path, capsys):
    folder = tmp_path / "logits"
    folder.mkdir()
    logits = {}
    for i in range(2):
        _, _, lg = make_case(seed=200 + i)
        write_nifti_probs(folder / f"l{i}.nii.gz", lg, nifti_affine())
        logits[f"l{i}"] = lg
    out = tmp_path / "out"
    wrong = ["predict", str(folder), "-o", str(out), "--channels-last", "--quiet"]
    right = wrong + ["--softmax"]
    assert main(wrong) == 2 and not out.exists()  # a usage error at the first case, no folder: nothing was done
    assert main(right) == 0
    assert "2 written" in capsys.readouterr().err
    assert main(wrong) == 2  # the wrong command is refused now ...
    assert "options.softmax: True -> False" in capsys.readouterr().err
    assert main(right) == 0  # ... and the right one accepted
    assert "0 written, 2 skipped" in capsys.readouterr().err
    soft = torch.softmax(torch.from_numpy(logits["l0"]), 0).numpy()
    np.testing.assert_array_equal(nifti_mask(out / "l0.nii.gz"), expected(soft))


def test_resume_redoes_masks_whose_input_or_bytes_changed(cases, tmp_path, capsys):
    folder, data = cases
    out = tmp_path / "out"
    assert main(["predict", str(folder), "-o", str(out), "--quiet"]) == 0
    probs, _, _ = make_case(seed=999, shape=(12, 11, 10))
    write_nifti_probs(folder / "c2.nii.gz", probs, nifti_affine())  # re-exported input
    (out / "c4.nii.gz").write_bytes((out / "c4.nii.gz").read_bytes()[:100])  # damaged mask
    (out / "c5.nii.gz").unlink()
    capsys.readouterr()
    assert main(["predict", str(folder), "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "3 written, 3 skipped" in err
    assert "redoing c2: the input files changed" in err and "redoing c4: the mask's bytes" in err
    np.testing.assert_array_equal(nifti_mask(out / "c2.nii.gz"), expected(probs))
    np.testing.assert_array_equal(nifti_mask(out / "c4.nii.gz"), expected(data["c4"][0]))
    assert_consistent(out)


def test_masks_of_another_version_are_not_taken_as_done(cases, tmp_path, capsys):
    folder, _ = cases
    out = tmp_path / "out"
    assert main(["predict", str(folder / "c0.nii.gz"), "-o", str(out), "--quiet"]) == 0
    rec_path = prov.record_path(out / "c0.nii.gz")
    rec = json.loads(rec_path.read_text())
    rec["version"] = "0.0.1"
    rec_path.write_text(json.dumps(rec))
    assert main(["predict", str(folder / "c0.nii.gz"), "-o", str(out), "--quiet"]) == 2
    assert "rankseg-monai version: '0.0.1' ->" in capsys.readouterr().err


def test_a_folder_of_masks_without_records_is_refused(cases, tmp_path, capsys):
    folder, _ = cases
    out = tmp_path / "out"
    out.mkdir()
    (out / "rankseg_predict.json").write_text('{"metric": "dice"}')  # a folder of an older version
    (out / "c0.nii.gz").write_bytes(b"old")
    assert main(["predict", str(folder), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "without a valid record" in err and "older rankseg-monai" in err
    assert (out / "c0.nii.gz").read_bytes() == b"old"
    assert main(["predict", str(folder), "-o", str(out), "--quiet", "--overwrite"]) == 0
    assert_consistent(out)


# ------------------------------------------------------------------------------------------------- item 3


def test_stale_temporaries_of_a_killed_run_are_removed(cases, tmp_path):
    folder, _ = cases
    out = tmp_path / "out"
    gate = tmp_path / "gate"  # never opened: the run is killed while its first mask is a temporary
    proc = run_cli("predict", str(folder), "-o", str(out), "--quiet", where="write", wait=False, gate=gate)
    held(gate, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=HANG)
    assert any(n.startswith(".c0.rankseg-tmp-") for n in files_in(out))
    rc, _, err = run_cli("predict", str(folder), "-o", str(out), "--quiet")
    assert rc == 0 and "removed" in err and "stale temporary" in err, err
    assert not any(n.startswith(".") for n in files_in(out))
    assert len(masks(out)) == 6


def test_temporaries_of_a_running_run_are_kept(cases, tmp_path):
    """A second run with the same settings joins the first: it removes nothing the first is writing."""
    folder, _ = cases
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    proc = run_cli("predict", str(folder / "c0.nii.gz"), "-o", str(out), "--quiet", where="write", wait=False,
                   gate=gate)
    held(gate, proc)  # its mask is a temporary in the folder until the gate opens
    assert any(".rankseg-tmp-" in n for n in files_in(out))
    rc, _, err = run_cli("predict", str(folder / "c1.nii.gz"), "-o", str(out), "--quiet")
    assert rc == 0 and "removed" not in err, err
    assert any(".rankseg-tmp-" in n for n in files_in(out))
    gate.touch()
    _, err0 = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, err0
    assert masks(out) == ["c0.nii.gz", "c1.nii.gz"]
    assert_consistent(out)


# --------------------------------------------------------------------------------------------- items 4, 5


@pytest.fixture
def overshoot(tmp_path):
    """Probabilities whose maximum is 1.0000001 (float32 rounding), as a 3-class channels-last NIfTI."""
    probs, _, _ = make_case(seed=7)
    k = np.unravel_index(np.argmax(probs[0]), probs.shape[1:])
    probs[(0, *k)] = np.float32(1) + np.float32(1e-7)
    return write_nifti_probs(tmp_path / "p.nii.gz", probs, nifti_affine()), probs


def test_a_rounding_overshoot_suggests_clamp_not_softmax(overshoot, tmp_path, capsys):
    path, probs = overshoot
    assert main(["predict", str(path), "-o", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "max 1.0000001" in err and "--clamp" in err and "pass --softmax" not in err
    # the old advice (--softmax) would apply softmax to probabilities: refused now
    assert main(["predict", str(path), "-o", str(tmp_path / "o"), "--softmax", "--quiet"]) == 2
    assert "look like probabilities already" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["predict", str(path), "-o", str(tmp_path / "o"), "--clamp", "--quiet"]) == 0
    np.testing.assert_array_equal(nifti_mask(tmp_path / "o" / "p.nii.gz"), expected(np.clip(probs, 0, 1)))
    assert record(tmp_path / "o" / "p.nii.gz")["settings"]["options"]["clamp"] is True


@pytest.mark.parametrize("activation, extra", [("--softmax", []), ("--sigmoid", ["--output-mode", "multilabel"])])
def test_activation_over_probabilities_is_refused(cases, tmp_path, capsys, activation, extra):
    folder, data = cases
    out = tmp_path / "o"
    assert main(["predict", str(folder / "c0.nii.gz"), "-o", str(out), activation, *extra, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{activation} was given" in err and "--force-activation" in err and not out.exists()
    assert main(["predict", str(folder / "c0.nii.gz"), "-o", str(out), activation, *extra, "--force-activation",
                 "--quiet"]) == 0


# ------------------------------------------------------------------------------------------------- item 6


def test_channels_last_file_with_a_size_one_axis_gives_the_right_mask(tmp_path):
    probs, _, _ = make_case(seed=8, shape=(1, 30, 30), num_classes=2)
    write_nifti_probs(tmp_path / "a.nii.gz", probs, nifti_affine())  # (1, 30, 30, 2) on disk
    assert main(["predict", str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "o"), "--quiet"]) == 0
    got = nifti_mask(tmp_path / "o" / "a.nii.gz")
    assert got.shape == (1, 30, 30)
    np.testing.assert_array_equal(got, expected(probs))


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_sum_tolerance_must_be_finite(cases, tmp_path, capsys, value):
    folder, _ = cases
    assert main(["predict", str(folder), "-o", str(tmp_path / "o"), "--sum-tolerance", value]) == 2
    assert "--sum-tolerance must be a finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_reads_the_class_axis_from_the_label_grid(tmp_path):
    """Logits (1, 30, 30, 2) on disk: the sums cannot tell, the label map's (1, 30, 30) grid can (before: read as
    one channel on a (30, 30, 2) grid)."""
    probs, label, logits = make_case(seed=9, shape=(1, 30, 30), num_classes=2)
    (tmp_path / "lg").mkdir()
    (tmp_path / "lab").mkdir()
    write_nifti_probs(tmp_path / "lg" / "a.nii.gz", logits, nifti_affine())
    write_nifti_labels(tmp_path / "lab" / "a.nii.gz", label, nifti_affine())
    rc = main(["evaluate", "--probs", str(tmp_path / "lg"), "--labels", str(tmp_path / "lab"), "-o",
               str(tmp_path / "r"), "--softmax", "--quiet"])
    assert rc == 0
    with open(tmp_path / "r" / "per_case.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert int(row["true_voxels"]) == int((label == 1).sum())


# ----------------------------------------------------------------------------------------- items 10-12


def test_a_file_name_simpleitk_cannot_take_fails_alone(tmp_path):
    probs, _, _ = make_case(seed=11)
    folder = tmp_path / "in"
    folder.mkdir()
    write_sitk_probs(folder / "good.mha", probs)
    os.rename(write_sitk_probs(folder / "x.mha", probs), os.fsencode(str(folder)) + b"/caf\xe9.mha")
    rc, _, err = run_cli("predict", str(folder), "-o", str(tmp_path / "o"), "--quiet")
    assert rc == 1, err  # before: SIGABRT (rc -6), later cases never ran
    assert "not valid UTF-8" in err and "1 written" in err
    assert masks(tmp_path / "o") == ["good.mha"]
    # a NIfTI input with such a name can still be written as .mha (SimpleITK only sees the temporary's name)
    nif = tmp_path / "nif"
    nif.mkdir()
    os.rename(write_nifti_probs(nif / "x.nii.gz", probs, nifti_affine()), os.fsencode(str(nif)) + b"/caf\xe9.nii.gz")
    rc, _, err = run_cli("predict", str(nif), "-o", str(tmp_path / "o2"), "--format", "mha", "--quiet")
    assert rc == 0, err
    assert os.listdir(os.fsencode(str(tmp_path / "o2"))) and b"caf\xe9.mha" in os.listdir(
        os.fsencode(str(tmp_path / "o2")))


def test_mhd_with_a_data_file_in_a_sub_folder(tmp_path, capsys):
    probs, _, _ = make_case(seed=12)
    folder = tmp_path / "in"
    folder.mkdir()
    write_sitk_probs(folder / "case.mhd", probs)
    (folder / "raw").mkdir()
    (folder / "case.raw").rename(folder / "raw" / "case.raw")
    header = (folder / "case.mhd").read_text().replace("ElementDataFile = case.raw", "ElementDataFile = raw/case.raw")
    (folder / "case.mhd").write_text(header)
    assert main(["predict", str(folder), "-o", str(tmp_path / "o"), "--quiet"]) == 0
    assert [e["file"] for e in record(tmp_path / "o" / "case.mha")["inputs"]] == ["case.mhd", "case.raw"]


def test_nan_affine_in_a_pkl_fails_that_case_only(tmp_path, capsys):
    import pickle

    probs, _, _ = make_case(seed=13)
    nn = tmp_path / "nn"
    for name in ("a", "b"):
        write_nnunet_case(nn, name, probs, nibabel_affine=nifti_affine())
    with open(nn / "a.pkl", "rb") as fh:
        props = pickle.load(fh)
    props["nibabel_stuff"]["original_affine"][0, 0] = np.nan
    with open(nn / "a.pkl", "wb") as fh:
        pickle.dump(props, fh)
    assert main(["predict", str(nn), "-o", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "FAILED a:" in err and "a.pkl" in err and "original_affine" in err
    assert masks(tmp_path / "o") == ["b.nii.gz"]
    assert [e["file"] for e in record(tmp_path / "o" / "b.nii.gz")["inputs"]] == ["b.npz", "b.pkl"]


# ------------------------------------------------------------------------------------------------ item 14


@pytest.fixture
def eval_dirs(tmp_path):
    probs_dir, labels_dir = tmp_path / "probs", tmp_path / "labels"
    probs_dir.mkdir()
    labels_dir.mkdir()
    data = {}
    for i, name in enumerate(("a", "b", "c", "d")):
        probs, label, _ = make_case(seed=300 + i, shape=(12, 11, 10))
        write_sitk_probs(probs_dir / f"{name}.mha", probs)
        write_sitk_labels(labels_dir / f"{name}.mha", label)
        data[name] = (probs, label)
    return probs_dir, labels_dir, data


def _evaluate(eval_dirs, out, *extra):
    probs_dir, labels_dir, _ = eval_dirs
    return main(["evaluate", "--probs", str(probs_dir), "--labels", str(labels_dir), "-o", str(out), "--quiet",
                 *extra])


def _count_cases(monkeypatch):
    calls = []
    real = cli._evaluate_case
    monkeypatch.setattr(cli, "_evaluate_case", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_evaluate_output_folder_problems_fail_before_any_work(eval_dirs, tmp_path, monkeypatch, capsys):
    calls = _count_cases(monkeypatch)
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "afile", "exists and is not a folder"),
                         (tmp_path / "afile" / "sub", "is a file, not a folder"),
                         (eval_dirs[0], "is an input folder"), (eval_dirs[1], "is an input folder")):
        assert _evaluate(eval_dirs, out) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # one line
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".rankseg.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert _evaluate(eval_dirs, tmp_path / "ro") == 2
    err = capsys.readouterr().err
    assert "cannot write into -o" in err and "Permission denied" in err and err.count("\n") == 1
    assert calls == []


def test_evaluate_full_disk_when_writing_the_report(eval_dirs, tmp_path, monkeypatch, capsys):
    from rankseg_monai.app import evaluation as ev

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ev, "atomic_write", full)
    assert _evaluate(eval_dirs, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "per_case.csv: No space left on device" in err and "Traceback" not in err
    assert files_in(tmp_path / "r") == []


def test_predict_output_folder_problems(cases, tmp_path, monkeypatch, capsys):
    folder, _ = cases
    (tmp_path / "afile").write_text("x")
    assert main(["predict", str(folder), "-o", str(tmp_path / "afile" / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".rankseg.lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["predict", str(folder), "-o", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err
    assert "cannot write into -o" in err and "Read-only file system" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--smooth", "nan"], "--smooth must be a finite number >= 0, got nan"),
    (["--solver", "foo"], "argument --solver: invalid choice: 'foo'"),
    (["--solver", "ba"], "--solver ba does not work with --metric dice --output-mode multiclass; use --solver rma"),
    (["--solver", "BA", "--metric", "iou", "--output-mode", "multilabel"], "--solver ba does not work with --metric "
                                                                           "iou"),
    (["--sigmoid", "--output-mode", "multiclass"], "--sigmoid gives independent per-class probabilities"),
    (["--pruning-prob", "2"], "--pruning-prob must lie in [0, 1]"),
    (["--force-activation"], "--force-activation only applies with --softmax or --sigmoid"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_bad_options_are_usage_errors_before_any_case(eval_dirs, tmp_path, monkeypatch, capsys, command, args,
                                                      message):
    calls = _count_cases(monkeypatch)
    probs_dir, labels_dir, _ = eval_dirs
    head = ["predict", str(probs_dir)] if command == "predict" else ["evaluate", "--probs", str(probs_dir),
                                                                     "--labels", str(labels_dir)]
    assert main([*head, "-o", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "FAILED" not in err and calls == [] and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ item 17


def test_pruning_help_lists_every_auto_mode(capsys):
    assert main(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "auto, auto-independent, auto-correlated" in text


def test_count_line_and_failures_printed_once(cases, tmp_path, capsys):
    folder, _ = cases
    data = (folder / "c0.nii.gz").read_bytes()
    (folder / "bad.nii.gz").write_bytes(data[: len(data) // 2])
    assert main(["predict", str(folder), "-o", str(tmp_path / "m2"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("could not read the file") == 1, err
    assert f"masks in {tmp_path / 'm2'}: 6 written, 0 skipped (up to date), 1 failed" in err
    assert "failed (reasons above): bad" in err


def test_evaluate_names_classes(eval_dirs, tmp_path, capsys):
    assert _evaluate(eval_dirs, tmp_path / "r", "--class-names", "background", "organ", "lesion") == 0
    out = capsys.readouterr().out
    assert "organ (1)" in out and "lesion (2)" in out
    with open(tmp_path / "r" / "per_case.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class_name"] for r in rows[:2]] == ["organ", "lesion"]
    assert "rankseg-argmax" in out.splitlines()[0]  # the difference convention is named in the table's header


# ----------------------------------------------------------------------------------------------- scale-out


def test_predict_parts_split_the_cases(cases, tmp_path, capsys):
    folder, data = cases
    out = tmp_path / "out"
    done = []
    for k in range(3):
        assert main(["predict", str(folder), "-o", str(out), "--part-id", str(k), "--num-parts", "3", "--quiet"]) == 0
        now = masks(out)
        done.append(sorted(set(now) - {m for d in done for m in d}))
    assert done == [["c0.nii.gz", "c3.nii.gz"], ["c1.nii.gz", "c4.nii.gz"], ["c2.nii.gz", "c5.nii.gz"]]
    assert "(part 2 of 3)" in capsys.readouterr().err
    assert main(["predict", str(folder), "-o", str(out), "--part-id", "3", "--num-parts", "3"]) == 2
    assert "--part-id must lie in [0, 3)" in capsys.readouterr().err


def test_evaluate_parts_merge_into_the_single_run_report(eval_dirs, tmp_path, capsys):
    assert _evaluate(eval_dirs, tmp_path / "whole") == 0
    parts = tmp_path / "parts"
    for k in range(3):
        assert _evaluate(eval_dirs, parts, "--part-id", str(k), "--num-parts", "3") == 0
    assert "merge-reports" in capsys.readouterr().err
    assert not (parts / "per_case.csv").exists()
    assert main(["merge-reports", str(parts)]) == 0
    table = capsys.readouterr().out
    for name in ("per_case.csv", "summary.csv"):
        assert (parts / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    assert "rankseg-argmax" in table and (parts / "differences.png").is_file()
    merged = json.loads((parts / "evaluation.json").read_text())
    assert merged["cases"] == ["a", "b", "c", "d"] and len(merged["merged_from"]) == 3


def test_merge_reports_refuses_incomplete_or_changed_parts(eval_dirs, tmp_path, capsys):
    parts = tmp_path / "parts"
    for k in (0, 2):
        assert _evaluate(eval_dirs, parts, "--part-id", str(k), "--num-parts", "3") == 0
    assert main(["merge-reports", str(parts)]) == 2
    assert "part 1 of 3 is missing" in capsys.readouterr().err
    assert _evaluate(eval_dirs, parts, "--part-id", "1", "--num-parts", "3") == 0
    csv_path = parts / "per_case.part-1-of-3.csv"
    csv_path.write_text(csv_path.read_text()[:-20])  # truncated
    assert main(["merge-reports", str(parts)]) == 2
    assert "does not match its record (changed or truncated); run part 1 of 3 again" in capsys.readouterr().err
    assert _evaluate(eval_dirs, parts, "--part-id", "1", "--num-parts", "3", "--metric", "iou") == 0
    assert main(["merge-reports", str(parts)]) == 2
    assert "part 1 of 3 was made with other settings than part 0" in capsys.readouterr().err
    assert not (parts / "per_case.csv").exists()


def test_evaluate_pred_parts_need_classes(eval_dirs, tmp_path, capsys):
    probs_dir, labels_dir, _ = eval_dirs
    assert main(["evaluate", "--pred", str(labels_dir), "--labels", str(labels_dir), "-o", str(tmp_path / "r"),
                 "--num-parts", "2", "--part-id", "0"]) == 2
    assert "--pred with --num-parts needs --classes" in capsys.readouterr().err
