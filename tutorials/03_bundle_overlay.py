"""Tutorial 03: the example MONAI bundle ``bundle/rankseg_demo`` and the RankSEG overlay configs.

A model-zoo bundle decides with ``AsDiscreted(argmax=True)`` at a fixed key path (in ``spleen_ct_segmentation``:
``postprocessing#transforms#2`` of ``inference.json`` and ``validate#postprocessing#transforms#2`` of
``train.json`` + ``evaluate.json``).  An overlay config replaces just that entry when it is listed after the
bundle's own configs, so RankSEG goes in without editing the bundle:

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json',
                                              '<repo>/bundle/rankseg_overlay_evaluate.json']"

This script

1. shows the entry before and after the overlay (``monai.bundle.ConfigParser``), for ``inference.json`` and for
   the evaluation config;
2. runs the example bundle's evaluation twice on the first three demo phantoms (written as NIfTI by the bundle's
   ``scripts/prepare_data.py`` into a temporary folder): in model-zoo form (``evaluate.json`` + ``argmax.json``,
   which puts the spleen-style ``AsDiscreted(argmax=True)`` back) and with ``rankseg_overlay_evaluate.json`` on
   top; ``MeanDice`` and ``rankseg_monai.HausdorffDistance95`` score both.

Run:  python tutorials/03_bundle_overlay.py        (about 9 s of CPU time; 10-20 s wall on 2 busy cores)
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser, ConfigWorkflow

warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI deprecation notices, not ours
warnings.filterwarnings("ignore", message="parsing config_file")  # MONAI's notice on trusting config files

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle" / "rankseg_demo"
CONFIGS = BUNDLE / "configs"
EVALUATE, ARGMAX, INFERENCE = CONFIGS / "evaluate.json", CONFIGS / "argmax.json", CONFIGS / "inference.json"
OVERLAY = ROOT / "bundle" / "rankseg_overlay.json"  # for inference.json-style configs
OVERLAY_EVALUATE = ROOT / "bundle" / "rankseg_overlay_evaluate.json"  # for train.json + evaluate.json-style configs
NUM_CASES = 3
CLASSES = ("organ", "lesion")


def show(title: str, entry: object) -> None:
    print(f"  {title}: {json.dumps(entry)}")


def main() -> int:
    t0 = time.perf_counter()
    print("Tutorial 03: bundle/rankseg_demo and the RankSEG overlays")

    # 1a. inference.json: a model-zoo-style argmax entry, then the overlay on top
    key = "postprocessing#transforms#2"
    parser = ConfigParser()
    parser.read_config(str(INFERENCE))
    parser[key] = {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}  # what spleen_ct_segmentation has
    show(f"inference {key}, model-zoo style", parser[key])
    parser.update(ConfigParser.load_config_file(str(OVERLAY)))  # = listing the overlay last in --config_file
    show(f"inference {key}, + {OVERLAY.name}", parser[key])
    print(f"    -> instantiates {type(parser.get_parsed_content(key)).__name__}")

    # 1b. the evaluation config: evaluate.json + argmax.json (model-zoo form), then + the evaluate overlay
    key = "validate#postprocessing#transforms#2"
    for files in ([EVALUATE, ARGMAX], [EVALUATE, ARGMAX, OVERLAY_EVALUATE]):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        show(f"{' + '.join(f.name for f in files)}: {key}", parser[key])
    step = parser.get_parsed_content(key)
    print(f"    -> instantiates {type(step).__name__}({', '.join(type(t).__name__ for t in step.transforms)}), "
          f"to_onehot={step.transforms[0].rankseg[0].to_onehot} (from @network_def#out_channels)")

    # 2. run both evaluations on the same NIfTI phantoms
    details = {}
    with tempfile.TemporaryDirectory(prefix="rankseg_bundle_") as tmp:
        runs = {"argmax": [EVALUATE, ARGMAX], "RankSEG": [EVALUATE, ARGMAX, OVERLAY_EVALUATE]}
        for name, files in runs.items():
            print(f"\nrunning {' + '.join(f.name for f in files)}  ({NUM_CASES} cases)")
            workflow = ConfigWorkflow(
                config_file=[str(f) for f in files], meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
                workflow_type=None, bundle_root=str(BUNDLE), dataset_dir=f"{tmp}/data", output_dir=f"{tmp}/eval_{name}",
                num_cases=NUM_CASES,
            )
            workflow.initialize()
            workflow.run()  # the bundle's "run" list also prints its own per-class report
            workflow.finalize()
            state = workflow.parser.get_parsed_content("validate#evaluator").state
            details[name] = {k: state.metric_details[k].numpy() for k in ("val_mean_dice", "val_hd95")}
            saved = sorted(p.name for p in Path(f"{tmp}/eval_{name}").iterdir())
            print(f"  MetricsSaver wrote: {', '.join(saved)}")

    print()
    print(f"{'class':<8}{'metric':<9}{'argmax':>9}{'RankSEG':>9}{'RankSEG-argmax':>16}")
    for i, cls in enumerate(CLASSES):
        for k, label, fmt in (("val_mean_dice", "Dice", ".4f"), ("val_hd95", "HD95mm", ".2f")):
            a, r = (_nanmean(details[d][k][:, i]) for d in ("argmax", "RankSEG"))
            print(f"{cls:<8}{label:<9}{a:>9{fmt}}{r:>9{fmt}}{r - a:>+16{fmt}}")
    print(f"means over {NUM_CASES} cases; argmax = evaluate.json + argmax.json, RankSEG = the same + "
          f"{OVERLAY_EVALUATE.name}; HD95: lower is better")
    print("\nthe same from a shell (from the repository root):")
    print("  python -m monai.bundle run --config_file bundle/rankseg_demo/configs/evaluate.json "
          "--bundle_root bundle/rankseg_demo")
    print("  python -m monai.bundle run --config_file \"['bundle/rankseg_demo/configs/evaluate.json',"
          "'bundle/rankseg_demo/configs/argmax.json']\" --bundle_root bundle/rankseg_demo")
    print(f"time: {time.perf_counter() - t0:.1f} s")
    return 0


def _nanmean(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


if __name__ == "__main__":
    raise SystemExit(main())
