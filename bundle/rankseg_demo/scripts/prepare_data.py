"""Data and reporting helpers of the ``rankseg_demo`` bundle (loaded by path from the configs, see below).

The bundle's configs load this file with ``runpy.run_path(<bundle_root>/scripts/prepare_data.py)`` instead of
``import scripts``: the bundle root is put on ``sys.path`` only when ``ConfigWorkflow.run()`` starts, and a
top-level package called ``scripts`` collides with other bundles' (and this repository's own ``scripts/``).

* :func:`phantom_datalist` writes seeded synthetic CT phantoms (``rankseg_monai.app.synthetic``, the cases of
  ``rankseg-monai demo``) as NIfTI files the first time it is asked for them, and returns the usual MONAI datalist
  ``[{"image": ..., "label": ...}, ...]``; the configs read the files with ``LoadImaged`` like a real data set.
* :func:`print_report` prints per-class Dice and HD95 of the finished evaluator (and which decision it used).

Also a command line: ``python scripts/prepare_data.py --dataset-dir data --cases 8`` writes the phantoms.
"""

from __future__ import annotations

import argparse
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FIRST_SEED = 1_000_000  # rankseg-monai demo's held-out seeds (the demo model was trained on seeds < 100 000)
CLASS_NAMES = ("background", "organ", "lesion")


def _case_name(seed: int) -> str:
    return f"phantom_{seed}"


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write atomically (temporary name, then rename), so an existing file is always complete."""
    import nibabel as nib

    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}_{path.name}")
    try:
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def phantom_datalist(dataset_dir: str | os.PathLike, num_cases: int = 8, first_seed: int = FIRST_SEED,
                     images: str = "imagesTs", labels: str = "labelsTs") -> list[dict[str, str]]:
    """``[{"image": <dataset_dir>/imagesTs/phantom_<seed>.nii.gz, "label": <dataset_dir>/labelsTs/...}]`` for
    seeds ``first_seed .. first_seed + num_cases - 1``; missing files are generated first.

    Images are float32 in ``[0, 1]`` (already CT-windowed), labels uint8 (0 background, 1 organ, 2 lesion), both
    on a 64 x 64 x 32 grid of 0.8 x 0.8 x 2.5 mm with a diagonal (RAS) affine.
    """
    num_cases, first_seed = int(num_cases), int(first_seed)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    root = Path(dataset_dir)
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / labels).mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(first_seed, first_seed + num_cases):
        img_path = root / images / f"{_case_name(seed)}.nii.gz"
        lab_path = root / labels / f"{_case_name(seed)}.nii.gz"
        if not (img_path.exists() and lab_path.exists()):
            from rankseg_monai.app.synthetic import make_phantom

            ph = make_phantom(seed)
            _save_nifti(ph.image[0].astype(np.float32), ph.affine, img_path)
            _save_nifti(ph.label[0].astype(np.uint8), ph.affine, lab_path)
        out.append({"image": str(img_path), "label": str(lab_path)})
    return out


def _decision(transform: Any) -> str:
    """Name the decision step found in a (nested) ``Compose``: RankSEG or argmax."""
    from monai.transforms import AsDiscreted, Compose

    from rankseg_monai.transforms import RankSEGd

    if isinstance(transform, Compose):
        names = [_decision(t) for t in transform.transforms]
        names = [n for n in names if n]
        return " + ".join(names)
    if isinstance(transform, RankSEGd):
        r = transform.rankseg[0]
        regions = "" if r.regions is None else ", regions=" + repr(
            {n: sorted(lab) for n, lab in zip(r.regions.names, r.regions.labels)})
        return f"RankSEG(metric={r.metric!r}, solver={r.solver!r}, pruning_prob={r.pruning_prob!r}{regions})"
    if isinstance(transform, AsDiscreted):
        if any(transform.argmax):
            return "argmax"
    return ""


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def print_report(evaluator: Any, postprocessing: Any = None, dice_key: str = "val_mean_dice",
                 hd_key: str = "val_hd95", class_names: Sequence[str] = CLASS_NAMES[1:]) -> dict[str, Any]:
    """Print and return per-class mean Dice / HD95 (mm) of a finished evaluator (``metric_details``).

    Returns ``{"decision": str, "cases": int, "dice": {class: mean}, "hd95": {class: mean}, "hd95_nan": {...}}``.
    """
    details = evaluator.state.metric_details
    dice = details[dice_key].detach().cpu().double().numpy()
    hd = details[hd_key].detach().cpu().double().numpy() if hd_key in details else None
    decision = _decision(postprocessing) if postprocessing is not None else "?"
    report: dict[str, Any] = {"decision": decision, "cases": int(dice.shape[0]), "dice": {}, "hd95": {},
                              "hd95_nan": {}}
    print(f"rankseg_demo bundle: {dice.shape[0]} cases, decision: {decision}")
    for i, name in enumerate(class_names[: dice.shape[1]]):
        report["dice"][name] = _mean(dice[:, i].tolist())
        line = f"  {name:<8} Dice {report['dice'][name]:.4f}"
        if hd is not None:
            report["hd95"][name] = _mean(hd[:, i].tolist())
            report["hd95_nan"][name] = int(np.isnan(hd[:, i]).sum())
            line += f"   HD95 {report['hd95'][name]:.2f} mm ({report['hd95_nan'][name]} undefined)"
        print(line)
    print(f"  metrics: {dice_key}={evaluator.state.metrics.get(dice_key, math.nan):.4f}"
          + (f", {hd_key}={evaluator.state.metrics.get(hd_key, math.nan):.2f} mm" if hd is not None else ""))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the rankseg_demo bundle's synthetic phantoms as NIfTI.")
    p.add_argument("--dataset-dir", default=str(Path(__file__).resolve().parents[1] / "data"),
                   help="folder for imagesTs/ and labelsTs/ (default: <bundle>/data)")
    p.add_argument("--cases", type=int, default=8, help="number of cases (default 8)")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED, help=f"seed of the first case ({FIRST_SEED})")
    args = p.parse_args(argv)
    items = phantom_datalist(args.dataset_dir, args.cases, args.first_seed)
    print(f"{len(items)} cases in {args.dataset_dir}: {items[0]['image']} ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
