"""Tutorial 01: sliding-window inference with resampling, then softmax -> Invertd -> RankSEGd -> metrics.

A real pipeline resamples each scan to the model's voxel spacing, runs a sliding window, and must give the
decision (and the metrics) in the scan's *original* grid.  The order that matters:

    softmax  ->  Invertd (interpolate the PROBABILITIES back to the original grid)  ->  RankSEGd  ->  metrics

RankSEG decides from the probabilities of the voxels it will be scored on, so it has to see the original grid;
interpolating probabilities is fine (linear interpolation keeps them in [0, 1] and summing to 1; with spline
interpolation, ``mode=3``, set ``RankSEGd(clamp=True)`` for the small overshoots, MONAI issue #7836).

Here the phantoms of ``rankseg-monai demo`` are drawn on a 1.0 x 1.0 x 2.0 mm grid, while the demo UNet was
trained at 0.8 x 0.8 x 2.5 mm, so ``Spacingd`` really resamples and ``Invertd`` really has work to do.  The same
probabilities are decided three ways: argmax, RankSEG (right order), and RankSEG on the model grid followed by
a nearest-neighbour ``Invertd`` of the mask (the decision made on voxels it is not scored on).

Run:  python tutorials/01_sliding_window_invertd.py        (about 13 s of CPU time; 20-30 s wall on 2 busy cores)
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureTyped,
    Invertd,
    Orientationd,
    Spacingd,
)

from rankseg_monai import RankSEGd
from rankseg_monai.app.demo import load_demo_model
from rankseg_monai.app.synthetic import make_phantom
from rankseg_monai.handlers import HausdorffDistance95Metric

warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI deprecation notices, not ours

NUM_CASES = 3
FIRST_SEED = 1_000_000  # held-out phantoms (the demo model was trained on seeds < 100 000)
NATIVE_SPACING = (1.0, 1.0, 2.0)  # the "scanner" grid: differs from the model's
NATIVE_SHAPE = (52, 52, 40)  # about the field of view of the training phantoms (51 x 51 x 80 mm)
CLASSES = ("organ", "lesion")


def main() -> int:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net, meta = load_demo_model()
    model_spacing, roi, num_classes = tuple(meta["spacing"]), tuple(meta["roi_size"]), meta["arch"]["out_channels"]
    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=4, overlap=0.25, mode="gaussian")

    # pre-processing: resample the image (only) to the model's spacing; the label stays in the original grid
    preprocessing = Compose([
        EnsureTyped(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=model_spacing, mode="bilinear"),
    ])
    # post-processing, in this order: softmax -> Invertd (bilinear, on probabilities) -> decisions
    postprocessing = Compose([
        Activationsd(keys="pred", softmax=True),
        CopyItemsd(keys="pred", names="pred_model_grid"),  # kept only for the "decide first" comparison below
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
        CopyItemsd(keys="pred", names="pred_argmax"),
        AsDiscreted(keys="pred_argmax", argmax=True, to_onehot=num_classes),
        RankSEGd(keys="pred", metric="dice", to_onehot=num_classes),
        AsDiscreted(keys="label", to_onehot=num_classes),
    ])
    # the other order: RankSEG on the model grid, then the mask is inverted with nearest-neighbour interpolation
    decide_first = Compose([
        RankSEGd(keys="pred_model_grid", metric="dice"),
        Invertd(keys="pred_model_grid", transform=preprocessing, orig_keys="image", nearest_interp=True),
        AsDiscreted(keys="pred_model_grid", to_onehot=num_classes),
    ])

    methods = {"argmax": "pred_argmax", "RankSEG": "pred", "RankSEG, decided before Invertd": "pred_model_grid"}
    dice = {m: DiceMetric(include_background=False, reduction="none") for m in methods}
    hd95 = {m: HausdorffDistance95Metric(include_background=False) for m in methods}

    print(f"Tutorial 01: {NUM_CASES} phantoms on a {NATIVE_SHAPE} grid of {NATIVE_SPACING} mm; demo UNet trained at "
          f"{model_spacing} mm; SlidingWindowInferer(roi={roi}, overlap=0.25)")
    for case in range(NUM_CASES):
        ph = make_phantom(FIRST_SEED + case, shape=NATIVE_SHAPE, spacing=NATIVE_SPACING)
        affine = torch.as_tensor(ph.affine, dtype=torch.float64)
        item = {"image": MetaTensor(torch.from_numpy(ph.image), affine=affine),
                "label": MetaTensor(torch.from_numpy(ph.label).float(), affine=affine)}
        item = preprocessing(item)
        with torch.no_grad():
            item["pred"] = inferer(item["image"][None], net)[0]  # (C, *model grid), MetaTensor
        model_grid = tuple(item["pred"].shape[1:])
        item = postprocessing(item)
        item = decide_first(item)
        print(f"  case {case} (seed {FIRST_SEED + case}): original grid {tuple(ph.label.shape[1:])} -> model grid "
              f"{model_grid} -> Invertd {tuple(item['pred'].shape[1:])}, spacing "
              f"{tuple(round(float(s), 3) for s in item['pred'].pixdim)} mm")
        for m, key in methods.items():
            dice[m](y_pred=[item[key]], y=[item["label"]])
            hd95[m](y_pred=[item[key]], y=[item["label"]])  # mm, from each MetaTensor's affine

    results = {m: (dice[m].get_buffer().numpy(), hd95[m].get_buffers()[0].numpy()) for m in methods}
    print()
    print(f"{'class':<8}{'metric':<9}{'argmax':>9}{'RankSEG':>9}{'RankSEG-argmax':>16}{'decided before Invertd':>24}")
    for i, name in enumerate(CLASSES):
        for j, (metric, fmt) in enumerate((("Dice", ".4f"), ("HD95mm", ".2f"))):
            a, r, w = (_nanmean(results[m][j][:, i]) for m in methods)
            print(f"{name:<8}{metric:<9}{a:>9{fmt}}{r:>9{fmt}}{r - a:>+16{fmt}}{w:>24{fmt}}")
    print(f"means over {NUM_CASES} cases, in the original {NATIVE_SPACING} mm grid; HD95: lower is better")
    print(f"time: {time.perf_counter() - t0:.1f} s")
    return 0


def _nanmean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


if __name__ == "__main__":
    raise SystemExit(main())
