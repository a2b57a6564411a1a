"""Tutorial 04: nnU-Net-style probability files through ``rankseg-monai predict`` and ``rankseg-monai evaluate``.

``nnUNetv2_predict ... --save_probabilities`` writes, per case, ``<case>.npz`` (one array ``probabilities``,
``(C, z, y, x)`` float32, the softmax) and ``<case>.pkl`` (the case properties, with ``sitk_stuff`` = spacing,
origin and direction for SimpleITK-read data), next to its own argmax segmentation ``<case>.nii.gz``.

Here the demo UNet plays nnU-Net: its sliding-window softmax on the first three held-out phantoms of
``rankseg-monai demo`` is written in exactly that layout (plus the ground truth as ``labelsTs/<case>.nii.gz`` on
the same grid), and then the command line does the rest:

    cd rankseg_tutorial_04
    rankseg-monai predict  nnunet_out -o rankseg_masks
    rankseg-monai evaluate --probs nnunet_out --labels labelsTs -o report --class-names background organ lesion

(run as ``python -m rankseg_monai.app.cli ...`` so the script works without the console script on ``PATH``).

Everything is written to ``./rankseg_tutorial_04/`` (or the folder given as the first argument) and kept there.

Run:  python tutorials/04_nnunet_cli.py        (about 21 s of CPU time, two CLI subprocesses included; 25-45 s wall on
2 busy cores)
"""

from __future__ import annotations

import csv
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from rankseg_monai.app.demo import infer_probabilities, load_demo_model
from rankseg_monai.app.synthetic import make_phantom
from rankseg_monai.functional import rankseg

warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI deprecation notices, not ours

NUM_CASES = 3
OUTPUT_DIR = "rankseg_tutorial_04"  # in the current folder, or the first command-line argument
FIRST_SEED = 1_000_000  # held-out phantoms (the demo model was trained on seeds < 100 000)
ORIGIN = (-25.6, -25.6, -40.0)  # ITK (LPS) origin in mm; any value works, it only has to be the same everywhere
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def sitk_image(array_xyz: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))  # ITK arrays are z, y, x
    img.SetSpacing(spacing)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return img


def write_nnunet_case(folder: Path, case: str, probs_cxyz: np.ndarray, spacing: tuple[float, ...]) -> None:
    """What nnU-Net v2 --save_probabilities writes for one 3D case read with SimpleITKIO."""
    np.savez_compressed(folder / f"{case}.npz", probabilities=np.transpose(probs_cxyz, (0, 3, 2, 1)).astype(np.float32))
    shape_zyx = tuple(int(s) for s in probs_cxyz.shape[1:][::-1])
    properties = {
        "sitk_stuff": {"spacing": tuple(spacing), "origin": ORIGIN, "direction": DIRECTION},
        "spacing": [float(s) for s in spacing[::-1]],  # nnU-Net's own (z, y, x) spacing
        "shape_before_cropping": shape_zyx,
        "bbox_used_for_cropping": [[0, s] for s in shape_zyx],
        "shape_after_cropping_and_before_resampling": shape_zyx,
    }
    with open(folder / f"{case}.pkl", "wb") as f:
        pickle.dump(properties, f)
    argmax = np.argmax(probs_cxyz, axis=0).astype(np.uint8)  # nnU-Net's own segmentation, ignored by rankseg-monai
    sitk.WriteImage(sitk_image(argmax, spacing), str(folder / f"{case}.nii.gz"))


def cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rankseg_monai.app.cli", *args]
    print(f"\n$ rankseg-monai {' '.join(args)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.stdout.strip():
        print(proc.stdout.rstrip())
    if proc.stderr.strip():
        print("\n".join(f"  [stderr] {line}" for line in proc.stderr.strip().splitlines()[-3:]))
    if proc.returncode != 0:
        raise SystemExit(f"rankseg-monai {args[0]} failed with exit code {proc.returncode}")
    return proc


def main() -> int:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net, meta = load_demo_model()
    print(f"Tutorial 04: nnU-Net-style probabilities of {NUM_CASES} held-out phantoms (seeds {FIRST_SEED}.."
          f"{FIRST_SEED + NUM_CASES - 1}) through the rankseg-monai command line")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else OUTPUT_DIR)  # kept for you to look at
    nnunet_out, labels_dir = out / "nnunet_out", out / "labelsTs"
    nnunet_out.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    probs_by_case = {}
    for i in range(NUM_CASES):
        case = f"phantom_{FIRST_SEED + i}"
        ph = make_phantom(FIRST_SEED + i)
        probs = infer_probabilities(net, ph.image, meta["roi_size"], overlap=0.25)[0].numpy()  # (C, x, y, z)
        write_nnunet_case(nnunet_out, case, probs, ph.spacing)
        sitk.WriteImage(sitk_image(ph.label[0].astype(np.uint8), ph.spacing), str(labels_dir / f"{case}.nii.gz"))
        probs_by_case[case] = probs
    print(f"wrote {nnunet_out.name}/: {', '.join(sorted(p.name for p in nnunet_out.iterdir()))}")

    cli("predict", str(nnunet_out), "-o", str(out / "rankseg_masks"), "--quiet")
    masks = sorted((out / "rankseg_masks").glob("*.nii.gz"))
    print(f"masks: {', '.join(p.name for p in masks)} (each with its record <mask>.rankseg.json: settings, "
          "version, SHA-256 of the inputs and of the mask)")
    # check one mask against the Python API on the same probabilities (files are x, y, z after transposing)
    case = masks[0].name[: -len(".nii.gz")]
    on_disk = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(masks[0]))), (2, 1, 0))
    direct = rankseg(torch.from_numpy(probs_by_case[case])[None], metric="dice")[0].numpy()
    print(f"{case}: mask on disk == rankseg_monai.functional.rankseg(probabilities): "
          f"{bool(np.array_equal(on_disk, direct))}")

    cli("evaluate", "--probs", str(nnunet_out), "--labels", str(labels_dir), "-o", str(out / "report"), "--quiet",
        "--class-names", "background", "organ", "lesion")
    with open(out / "report" / "summary.csv", newline="") as f:
        summary = {row["class"]: row for row in csv.DictReader(f)}
    print(f"report/: {', '.join(sorted(p.name for p in (out / 'report').iterdir()))}")

    print()
    print(f"{'class':<8}{'metric':<9}{'argmax':>9}{'RankSEG':>9}{'RankSEG-argmax':>16}")
    for cls, name in (("1", "organ"), ("2", "lesion")):
        row = summary[cls]
        for metric, label, fmt in (("dice", "Dice", ".4f"), ("hd95", "HD95mm", ".2f")):
            a, r = float(row[f"{metric}_mean_argmax"]), float(row[f"{metric}_mean_rankseg"])
            print(f"{name:<8}{label:<9}{a:>9{fmt}}{r:>9{fmt}}{r - a:>+16{fmt}}")
    print(f"means over {NUM_CASES} cases from report/summary.csv (rankseg-monai evaluate); RankSEG-argmax is RankSEG "
          "minus argmax, as in the report's dice_diff/hd95_diff_mm (HD95: lower is better)")
    print(f"time: {time.perf_counter() - t0:.1f} s")
    print(f"the files are kept in {out}/: nnunet_out/ (the inputs), labelsTs/, rankseg_masks/ (masks and records) and "
          "report/ (open differences.png and expected.png); running the tutorial again reuses the folder")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
