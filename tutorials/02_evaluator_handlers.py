"""Tutorial 02: an Ignite ``SupervisedEvaluator`` with ``RankSEGHandler``, ``MeanDice`` and ``HausdorffDistance95``.

Two evaluators run on the same data, model and sliding window; only the decision differs:

* argmax:  ``postprocessing = [Activationsd(softmax), AsDiscreted(pred: argmax + one-hot), AsDiscreted(label:
  one-hot)]``, as in the MONAI model-zoo bundles;
* RankSEG: the same ``postprocessing`` without the argmax, plus ``val_handlers=[RankSEGHandler(to_onehot=3)]``.

``RankSEGHandler`` runs at ``IterationEvents.MODEL_COMPLETED``, after the engine's (decollating) post-processing
and before the metric handlers update at ``ITERATION_COMPLETED``, so ``MeanDice`` and ``HausdorffDistance95`` score
the RankSEG masks.  ``HausdorffDistance95`` reads each case's voxel spacing from ``MetaTensor.pixdim``, so HD95 is
in millimetres (MONAI's ``HausdorffDistance`` handler cannot pass a spacing and measures in voxels).

The data are the first three held-out phantoms of ``rankseg-monai demo`` (in memory, as ``MetaTensor``s with
their 0.8 x 0.8 x 2.5 mm affine).

Run:  python tutorials/02_evaluator_handlers.py        (about 9 s of CPU time; 10-20 s wall on 2 busy cores)
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.inferers import SlidingWindowInferer
from monai.transforms import Activationsd, AsDiscreted, Compose

from rankseg_monai import HausdorffDistance95, RankSEGHandler
from rankseg_monai.app.demo import load_demo_model
from rankseg_monai.app.synthetic import make_phantom

warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI deprecation notices, not ours

NUM_CASES = 3
FIRST_SEED = 1_000_000  # held-out phantoms (the demo model was trained on seeds < 100 000)
CLASSES = ("organ", "lesion")


def make_evaluator(net: torch.nn.Module, loader: DataLoader, inferer: SlidingWindowInferer, num_classes: int,
                   decision: str) -> SupervisedEvaluator:
    if decision == "argmax":
        postprocessing = Compose([
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=num_classes),
        ])
        handlers = []
    else:  # the decision moves out of postprocessing into a handler
        postprocessing = Compose([
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys="label", to_onehot=num_classes),
        ])
        handlers = [RankSEGHandler(keys="pred", metric="dice", to_onehot=num_classes)]
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=net,
        inferer=inferer,
        postprocessing=postprocessing,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        additional_metrics={"hd95": HausdorffDistance95(output_transform=from_engine(["pred", "label"]))},
        val_handlers=handlers,
        amp=False,
    )


def main() -> int:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    net, meta = load_demo_model()
    num_classes = meta["arch"]["out_channels"]
    inferer = SlidingWindowInferer(roi_size=tuple(meta["roi_size"]), sw_batch_size=4, overlap=0.25, mode="gaussian")

    data = []
    for i in range(NUM_CASES):
        ph = make_phantom(FIRST_SEED + i)
        affine = torch.as_tensor(ph.affine, dtype=torch.float64)
        data.append({"image": MetaTensor(torch.from_numpy(ph.image), affine=affine),
                     "label": MetaTensor(torch.from_numpy(ph.label).float(), affine=affine)})
    loader = DataLoader(Dataset(data), batch_size=1, num_workers=0)

    print(f"Tutorial 02: SupervisedEvaluator on {NUM_CASES} held-out phantoms (seeds {FIRST_SEED}.."
          f"{FIRST_SEED + NUM_CASES - 1}), demo UNet, SlidingWindowInferer(roi={tuple(meta['roi_size'])}, "
          "overlap=0.25)")
    state = {}
    for decision in ("argmax", "RankSEG"):
        evaluator = make_evaluator(net, loader, inferer, num_classes, decision)
        evaluator.run()
        st = evaluator.state
        state[decision] = st
        print(f"  {decision:<8} metrics: dice={st.metrics['dice']:.4f} (mean over classes), "
              f"hd95={st.metrics['hd95']:.2f} mm, hd95_empty={st.metrics['hd95_empty']} (case, class) pairs with an "
              "empty mask")

    print()
    print(f"{'class':<8}{'metric':<9}{'argmax':>9}{'RankSEG':>9}{'RankSEG-argmax':>16}")
    for i, name in enumerate(CLASSES):
        for key, label, fmt in (("dice", "Dice", ".4f"), ("hd95", "HD95mm", ".2f")):
            a, r = (_nanmean(state[d].metric_details[key][:, i]) for d in ("argmax", "RankSEG"))
            print(f"{name:<8}{label:<9}{a:>9{fmt}}{r:>9{fmt}}{r - a:>+16{fmt}}")
    lesion = {d: " ".join(f"{v:.3f}" for v in state[d].metric_details["dice"][:, 1].tolist()) for d in state}
    print(f"lesion Dice per case: argmax {lesion['argmax']}; RankSEG {lesion['RankSEG']}")
    print(f"means over {NUM_CASES} cases (engine.state.metric_details); HD95: lower is better")
    print(f"time: {time.perf_counter() - t0:.1f} s")
    return 0


def _nanmean(values: torch.Tensor) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


if __name__ == "__main__":
    raise SystemExit(main())
