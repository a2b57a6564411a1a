"""``rankseg-monai calibrate`` on the shipped demo model, end to end through files (issue 20's evidence).

For each distortion ``k`` of the demo UNet's logits (``softmax(k z)``: ``k < 1`` under-confident, ``k > 1``
over-confident) the calibration cases (seeds 2 000 000+) are written as NIfTI probability maps with their labels,
``rankseg-monai calibrate --folds 4`` fits on them, and 8 held-out phantoms (seeds 1 000 000+, never seen by the
fit) are decided with argmax, RankSEG, and calibrated RankSEG as ``predict --calibration`` decides (the same
functions: :func:`rankseg_monai.calibrator.apply_calibration`, the recommendation followed).  Reported per class:
mean Dice, and the mean absolute error of the label-free expected Dice of RankSEG's mask (uncalibrated and
calibrated) against its Dice.

``--shift``: the same on phantoms with another contrast and noise (shifted cases): how many the fingerprint flags,
and whether following the recommendation loses against argmax there.  ``--cost``: time and peak memory of
``calibrate`` (a child process each) over 8 and 16 demo-sized cases, and over fold layouts of larger stand-in
volumes, to show the peak does not grow with the number of cases.

Run: ``python benchmarks/bench_calibrate.py [--cal-cases 16] [--shift] [--cost]`` (one CPU thread; minutes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from rankseg_monai.app.cli import main as cli_main  # noqa: E402
from rankseg_monai.app.decide import decide, estimate  # noqa: E402
from rankseg_monai.calibrator import apply_calibration, fingerprint_of, load_calibration  # noqa: E402
from rankseg_monai.options import RankSEGOptions  # noqa: E402

CLASSES = {1: "organ", 2: "lesion"}


def demo_logits(seeds, **phantom_kwargs):
    """The demo UNet's logits ``(C, X, Y, Z)`` and labels ``(X, Y, Z)`` of phantoms ``seeds``."""
    from monai.inferers import SlidingWindowInferer

    from rankseg_monai.app.demo import load_demo_model
    from rankseg_monai.app.synthetic import make_phantom

    net, meta = load_demo_model()
    inferer = SlidingWindowInferer(roi_size=tuple(meta["roi_size"]), sw_batch_size=4, overlap=0.25, mode="gaussian")
    out = []
    with torch.no_grad():
        for s in seeds:
            ph = make_phantom(s, **phantom_kwargs)
            out.append((inferer(torch.as_tensor(ph.image)[None], net)[0].float(), np.asarray(ph.label[0]), ph.spacing))
    return out


def write_folder(root: Path, cases, k: float, prefix: str) -> tuple[Path, Path]:
    import nibabel as nib

    (root / "probs").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i, (z, label, spacing) in enumerate(cases):
        affine = np.diag([*spacing, 1.0])
        p = torch.softmax(k * z, 0).numpy()
        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(p, 0, -1)), affine),
                 str(root / "probs" / f"{prefix}{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(root / "labels" / f"{prefix}{i:03d}.nii.gz"))
    return root / "probs", root / "labels"


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(pred, truth).sum() / s)


def score(cases, k: float, cal, shifted_flags=None) -> dict:
    """Per class: Dice of argmax / RankSEG / calibrated RankSEG (recommendation followed), expected-Dice MAE."""
    plain = RankSEGOptions()
    with_cal = RankSEGOptions(calibration=cal)
    rows = {c: {m: [] for m in ("argmax", "rankseg", "calibrated", "calibrated_rankseg_only", "e_before", "e_after")}
            for c in CLASSES}
    flagged = []
    for z, label, _ in cases:
        p = torch.softmax(k * z, 0).numpy()
        q = apply_calibration(p, cal).numpy()
        a = decide(p, "argmax", plain)
        r = decide(p, "rankseg", plain)
        rc = decide(q, "rankseg", with_cal)  # what predict --calibration writes
        rc_only = decide(q, "rankseg", plain)
        e_r, e_rc = estimate(p, r, plain), estimate(q, rc, with_cal)
        if cal.fingerprint:
            flagged.append(bool(cal.outside(fingerprint_of(q, e_rc, plain))))
        for c in CLASSES:
            t = label == c
            d = {"argmax": dice(a == c, t), "rankseg": dice(r == c, t), "calibrated": dice(rc == c, t),
                 "calibrated_rankseg_only": dice(rc_only == c, t)}
            for m, v in d.items():
                rows[c][m].append(v)
            rows[c]["e_before"].append(abs(e_r[c] - d["rankseg"]))
            rows[c]["e_after"].append(abs(e_rc[c] - d["calibrated"]))
    return {"rows": {c: {m: float(np.mean(v)) for m, v in r.items()} for c, r in rows.items()}, "flagged": flagged,
            "per_case": rows}


def shift_line(name: str, res: dict) -> str:
    """Flagged cases, and per class the Dice of argmax and of the followed recommendation, with the mean gain over
    argmax on the flagged and on the other cases."""
    flags = np.array(res["flagged"], dtype=bool)
    parts = []
    for c, cname in CLASSES.items():
        gain = np.array(res["per_case"][c]["calibrated"]) - np.array(res["per_case"][c]["argmax"])
        f = f"{gain[flags].mean():+.4f}" if flags.any() else "-"
        u = f"{gain[~flags].mean():+.4f}" if (~flags).any() else "-"
        parts.append(f"{cname}: argmax {res['rows'][c]['argmax']:.4f}, RankSEG {res['rows'][c]['rankseg']:.4f}, "
                     f"followed {res['rows'][c]['calibrated']:.4f} (gain flagged {f}, not flagged {u})")
    return f"|   | {name}: {int(flags.sum())} of {len(flags)} flagged | " + "; ".join(parts) + " |"


def run_calibrate(probs: Path, labels: Path, out: Path, extra=()) -> float:
    t = time.perf_counter()
    code = cli_main(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o", str(out), "--folds", "4",
                     "--quiet", "--overwrite", *extra])
    assert code == 0, code
    return time.perf_counter() - t


def section_distortions(args, tmp: Path) -> None:
    cal_cases = demo_logits(range(2_000_000, 2_000_000 + args.cal_cases))
    test_cases = demo_logits(range(1_000_000, 1_000_000 + args.test_cases))
    shifts = {}
    if args.shift:
        seeds = range(4_000_000, 4_000_000 + args.test_cases)
        shifts["contrast/noise shift"] = demo_logits(seeds, lesion_contrast_hu=(-60.0, -40.0), noise_hu=35.0)
        shifts["2x coarser grid"] = demo_logits(seeds, shape=(32, 32, 16), spacing=(1.6, 1.6, 5.0))
    print(f"\n## Demo UNet, logits x k; calibrate --folds 4 on {args.cal_cases} phantoms, {args.test_cases} held-out "
          "phantoms\n")
    print("| k | method | T | recommendation | class | argmax | RankSEG | calibrated RankSEG | (RankSEG everywhere) "
          "| E[Dice] MAE before | after | calibrate s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in args.k:
        for method, extra in (("temperature", ()), ("per-class", ("--per-class",))):
            root = tmp / f"k{k}_{method}"
            probs, labels = write_folder(root / "cal", cal_cases, k, "cal")
            seconds = run_calibrate(probs, labels, root / "out", extra)
            cal = load_calibration(root / "out" / "calibration.json")
            res = score(test_cases, k, cal)
            t = ", ".join(f"{v:.3f}" for v in cal.temperature)
            for c, name in CLASSES.items():
                r = res["rows"][c]
                print(f"| {k} | {method} | {t} | {cal.recommendation[c]} | {name} | {r['argmax']:.4f} | "
                      f"{r['rankseg']:.4f} | {r['calibrated']:.4f} | {r['calibrated_rankseg_only']:.4f} | "
                      f"{r['e_before']:.4f} | {r['e_after']:.4f} | {seconds:.1f} |")
            print(shift_line("held-out (same source)", res))
            for name, shifted in shifts.items():
                print(shift_line(name, score(shifted, k, cal)))
            sys.stdout.flush()


_CHILD = ("import resource, sys, time, torch; torch.set_num_threads(1); from rankseg_monai.app.cli import main; "
          "t = time.perf_counter(); rc = main(sys.argv[1:]); "
          "print('RESULT', rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")


def child_calibrate(argv) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if not line or line[-1].split()[1] != "0":
        raise RuntimeError(proc.stderr[-2000:])
    _, _, seconds, peak = line[-1].split()
    return float(seconds), float(peak)


def stand_in_folds(root: Path, folds: int, per_fold: int, shape) -> list[Path]:
    """nnU-Net-like folds of synthetic 3-class probabilities (float16 .npz, as nnU-Net writes) with labels."""
    import pickle

    import SimpleITK as sitk

    g = np.random.default_rng(0)
    dirs = []
    (root / "gt").mkdir(parents=True, exist_ok=True)
    for f in range(folds):
        d = root / f"fold_{f}" / "validation"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_fold):
            z = torch.from_numpy(g.normal(0, 2, (3, *shape)).astype(np.float32))
            z[1, : shape[0] // 2] += 3
            p = torch.softmax(z, 0).numpy()
            label = p.argmax(0).astype(np.uint8)
            name = f"f{f}c{i:03d}"
            np.savez_compressed(d / f"{name}.npz", probabilities=np.transpose(p, (0, 3, 2, 1)).astype(np.float16))
            zyx = tuple(int(s) for s in shape[::-1])
            props = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": zyx,
                     "bbox_used_for_cropping": [[0, s] for s in zyx], "shape_after_cropping_and_before_resampling": zyx,
                     "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                                    "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}
            with open(d / f"{name}.pkl", "wb") as fh:
                pickle.dump(props, fh)
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(label, (2, 1, 0))))
            sitk.WriteImage(img, str(root / "gt" / f"{name}.nii.gz"))
        dirs.append(d)
    return dirs


def section_cost(args, tmp: Path) -> None:
    print("\n## Cost of calibrate (child process each; time and peak RSS, one thread)\n")
    print("| inputs | cases | voxels per case | time s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    cases = demo_logits(range(2_000_000, 2_000_016))
    for n in (8, 16):
        probs, labels = write_folder(tmp / f"cost{n}", cases[:n], 1.0, "c")
        s, peak = child_calibrate(["calibrate", "--probs", str(probs), "--labels", str(labels), "-o",
                                   str(tmp / f"cost{n}" / "out"), "--folds", "4", "--quiet"])
        print(f"| demo NIfTI folder | {n} | {np.prod(cases[0][1].shape)} | {s:.1f} | {peak:.0f} |")
    shape = tuple(args.stand_in_shape)
    for folds, per_fold in ((2, args.stand_in_cases), (5, args.stand_in_cases)):
        root = tmp / f"stand{folds}"
        dirs = stand_in_folds(root, folds, per_fold, shape)
        s, peak = child_calibrate(["calibrate", "--probs", *map(str, dirs), "--labels", str(root / "gt"), "-o",
                                   str(root / "out"), "--quiet"])
        print(f"| nnU-Net stand-in folds (float16 .npz) | {folds} x {per_fold} | {int(np.prod(shape))} | {s:.1f} | "
              f"{peak:.0f} |")
        sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=float, nargs="+", default=[0.33, 0.5, 2.0])
    p.add_argument("--cal-cases", type=int, default=16)
    p.add_argument("--test-cases", type=int, default=8)
    p.add_argument("--shift", action="store_true")
    p.add_argument("--cost", action="store_true")
    p.add_argument("--no-distortions", action="store_true")
    p.add_argument("--stand-in-shape", type=int, nargs=3, default=[128, 128, 64])
    p.add_argument("--stand-in-cases", type=int, default=4, help="cases per fold of the stand-in layout")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        if not args.no_distortions:
            section_distortions(args, Path(d))
        if args.cost:
            section_cost(args, Path(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
