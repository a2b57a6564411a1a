"""``rankseg-monai demo``: argmax vs RankSEG on held-out synthetic CT phantoms, end to end in about a minute.

What it does, all on seeded data so every run prints the same numbers on the same machine:

1. generates held-out phantoms (a large organ, class 1, with small low-contrast lesions, class 2; see
   :mod:`rankseg_monai.app.synthetic`), seeds from 1 000 000 up (the shipped model was trained on seeds < 100 000);
2. loads the shipped 3D UNet (``rankseg_monai/data/demo_unet.pt``, trained with cross-entropy by
   ``scripts/train_demo_model.py``) and runs ``monai.inferers.SlidingWindowInferer`` (CUDA if available);
3. softmax, then ``argmax`` vs :func:`rankseg_monai.functional.rankseg` with ``metric="dice"`` and
   ``metric="iou"``;
4. scores every case with MONAI's ``DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)`` (in mm, with
   the phantom's anisotropic spacing) through :mod:`rankseg_monai.app.evaluation` (IoU is ``D / (2 - D)`` of the
   same masks), prints a per-class table with paired differences, wins/losses and empty-mask counts, and writes
   ``per_case_metrics.csv`` and ``demo_figure.png`` to ``--output-dir``.

Run ``rankseg-monai demo`` or ``python -m rankseg_monai.app.demo``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..functional import decide
from ..options import RankSEGOptions, parse_pruning_prob
from . import evaluation as ev
from .synthetic import make_phantom

__all__ = ["add_arguments", "run", "run_cases", "CaseRun", "run_spread", "spread_rows", "format_spread", "draw_seeds",
           "main", "load_demo_model", "infer_probabilities", "per_case_rows", "table_rows",
           "region_table_rows", "format_region_table", "REGIONS",
           "format_table", "make_figure", "DEMO_SEED", "METHODS", "CLASS_NAMES"]

DEMO_SEED = 1_000_000
CLASS_NAMES = ("background", "organ", "lesion")
METHODS = ("argmax", "rankseg_dice", "rankseg_iou")
CSV_NAME = "per_case_metrics.csv"
REGIONS_CSV_NAME = "per_case_regions.csv"
#: the demo's labels scored as LiTS scores liver and tumour: the organ INCLUDING its lesions, and the lesions
REGIONS = {"organ": [1, 2], "lesion": [2]}
REGION_METHODS = ("argmax", "rankseg_classes", "rankseg_regions")
NSD_TOLERANCE_MM = 2.0
PNG_NAME = "demo_figure.png"


def default_checkpoint() -> Path:
    """Path of the shipped demo checkpoint (package data)."""
    return Path(str(resources.files("rankseg_monai") / "data" / "demo_unet.pt"))


def load_demo_model(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """Load the demo UNet; returns ``(model in eval mode, checkpoint dict without the weights)``.

    The checkpoint is a dict ``{"arch": UNet kwargs, "state_dict": ..., "roi_size": ..., "training": ...}``.
    """
    from monai.networks.nets import UNet

    ckpt = torch.load(path or default_checkpoint(), map_location="cpu", weights_only=True)
    net = UNet(**ckpt["arch"])
    net.load_state_dict(ckpt["state_dict"])
    net.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return net, meta


@torch.no_grad()
def infer_probabilities(net: torch.nn.Module, image: np.ndarray | torch.Tensor, roi_size: Sequence[int],
                        device: str | torch.device = "cpu", overlap: float = 0.25, sw_batch_size: int = 4
                        ) -> torch.Tensor:
    """Sliding-window inference on one ``(1, X, Y, Z)`` image; returns softmax probabilities ``(1, C, X, Y, Z)``
    (float32, on ``device``)."""
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap,
                                   mode="gaussian")
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None].to(device)
    return torch.softmax(inferer(x, net).float(), dim=1)


@dataclass
class _Example:
    """What the figure needs from one case."""

    case: int
    image: np.ndarray
    label: np.ndarray
    lesion_prob: np.ndarray
    preds: dict[str, np.ndarray] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options on ``parser`` (used by ``rankseg-monai demo``)."""
    parser.add_argument("--output-dir", type=Path, default=Path("rankseg_demo_output"),
                        help="folder for the CSV and the PNG (created; default: ./rankseg_demo_output)")
    parser.add_argument("--cases", type=int, default=8, help="number of held-out phantoms (default: 8)")
    parser.add_argument("--draws", type=int, default=1,
                        help="repeat over this many draws of --cases phantoms (seeds --seed + d * 1000000) and print "
                             "the spread: per-case wins/losses, the worst case, the mean of each draw (default 1: "
                             "the demo)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED,
                        help=f"seed of the first phantom (default: {DEMO_SEED}; training used seeds < 100000)")
    parser.add_argument("--pruning-prob", type=parse_pruning_prob, default="auto",
                        help="'auto' (default): RankSEG keeps a class when its best mask beats the empty mask's "
                             "expected Dice; a number p: only if its max probability exceeds p (rankseg 0.0.8: "
                             "0.5); 0 disables pruning")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default: 0.25)")
    parser.add_argument("--device", default=None,
                        help="torch device for inference and RankSEG (default: cuda if available, else cpu)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model checkpoint (default: the shipped rankseg_monai/data/demo_unet.pt)")
    parser.add_argument("--fast", action="store_true",
                        help="quick smoke run: no window overlap and a low-resolution figure")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG figure")
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress bar (as for the other commands; --no-progress is the older spelling)")


@dataclass
class CaseRun:
    """What :func:`run_cases` returns: per-case results of the classes (argmax, RankSEG dice and iou) and of the
    LiTS-style regions (argmax, RankSEG on the classes, RankSEG on the regions), the time per step and, when kept,
    what the figure needs."""

    results: list[dict[str, Any]]
    region_results: list[dict[str, Any]]
    timing: dict[str, float]
    examples: list[_Example]


def run_cases(net: torch.nn.Module, meta: dict[str, Any], seeds: Sequence[int], device: torch.device,
              overlap: float, pruning_prob: float | str, progress: bool = True, keep_examples: bool = True,
              desc: str = "cases") -> CaseRun:
    """Phantoms ``seeds`` through the model and the three decisions, each case scored (the demo's loop)."""
    from tqdm import tqdm

    roi = tuple(meta["roi_size"])
    classes = list(range(1, int(meta["arch"]["out_channels"])))
    options = {m: RankSEGOptions(metric=m.split("_")[1], pruning_prob=pruning_prob) for m in METHODS[1:]}
    region_options = RankSEGOptions(regions=REGIONS, pruning_prob=pruning_prob)
    out = CaseRun([], [], dict.fromkeys(("inference", *METHODS, "rankseg_regions", "metrics"), 0.0), [])
    timing = out.timing
    for case, seed in enumerate(tqdm(list(seeds), desc=desc, unit="case", disable=not progress, file=sys.stderr)):
        ph = make_phantom(seed)
        t = time.perf_counter()
        probs = infer_probabilities(net, ph.image, roi, device=device, overlap=overlap)
        timing["inference"] += time.perf_counter() - t
        preds = {}
        for method in METHODS:
            t = time.perf_counter()
            pred = probs.argmax(dim=1) if method == "argmax" else decide(probs, options[method])
            preds[method] = pred[0].cpu().numpy()
            timing[method] += time.perf_counter() - t
        t = time.perf_counter()
        res = ev.evaluate_masks(preds, ph.label[0], ph.spacing, classes, case=str(case))
        res["seed"] = seed
        res["max_prob"] = [float(v) for v in probs.amax(dim=(2, 3, 4))[0, classes].cpu()]
        out.results.append(res)
        timing["metrics"] += time.perf_counter() - t
        t = time.perf_counter()
        region_pred = decide(probs, region_options)[0].cpu().numpy()
        timing["rankseg_regions"] += time.perf_counter() - t
        region_res = ev.evaluate_masks(
            {"argmax": preds["argmax"], "rankseg_classes": preds["rankseg_dice"], "rankseg_regions": region_pred},
            ph.label[0], ph.spacing, list(REGIONS), case=str(case), structures=REGIONS,
            nsd_tolerance=NSD_TOLERANCE_MM, lesion_structures=["lesion"])
        region_res["seed"] = seed
        out.region_results.append(region_res)
        if keep_examples:
            out.examples.append(_Example(case, ph.image[0], ph.label[0], probs[0, -1].cpu().numpy(), preds))
    return out


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args`` (see :func:`add_arguments`); returns the process exit code."""
    if args.cases < 1:
        print("error: --cases must be >= 1", file=sys.stderr)
        return 2
    if args.draws < 1:
        print("error: --draws must be >= 1", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, meta = load_demo_model(args.checkpoint, device)
    roi = tuple(meta["roi_size"])
    overlap = 0.0 if args.fast else args.overlap
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.draws > 1:
        return run_spread(args, net, meta, device, overlap, out_dir)

    print(f"RankSEG demo: {args.cases} held-out phantoms (seeds {args.seed}..{args.seed + args.cases - 1}), "
          f"3D UNet trained with {meta['training']['loss']}, SlidingWindowInferer(roi={roi}, overlap={overlap}) "
          f"on {device}; RankSEG-RMA pruning_prob={args.pruning_prob}")
    cases = run_cases(net, meta, range(args.seed, args.seed + args.cases), device, overlap, args.pruning_prob,
                      progress=not args.quiet, keep_examples=not args.no_plot)
    results, region_results, timing = cases.results, cases.region_results, cases.timing

    csv_path = write_csv(results, out_dir / CSV_NAME)
    regions_path = ev.write_csv(region_results, out_dir / REGIONS_CSV_NAME, baseline="argmax",
                                candidate="rankseg_regions")
    print()
    print(format_table(results))
    print()
    print(format_region_table(region_results))
    print()
    total = time.perf_counter() - t_start
    n = args.cases
    print(f"time: {total:.1f} s in all; per case: inference {timing['inference'] / n:.2f} s, argmax "
          f"{timing['argmax'] / n:.3f} s, RankSEG dice {timing['rankseg_dice'] / n:.3f} s, RankSEG iou "
          f"{timing['rankseg_iou'] / n:.3f} s, RankSEG regions {timing['rankseg_regions'] / n:.3f} s, metrics "
          f"{timing['metrics'] / n:.2f} s")
    print(f"wrote {csv_path} and {regions_path}")
    print(f"These {n} phantoms are one draw: the gain varies from draw to draw (rankseg-monai demo --draws 10 shows "
          "the spread), and HD95 and false-positive lesions can get worse. On your data, run rankseg-monai evaluate "
          "on validation cases first (docs/calibration.md).")
    if not args.no_plot:
        png_path = out_dir / PNG_NAME
        make_figure(results, cases.examples, png_path, dpi=60 if args.fast else 110,
                    title=f"argmax vs RankSEG (dice, pruning_prob={args.pruning_prob}) on {n} held-out phantoms")
        print(f"wrote {png_path}")
    return 0


# ------------------------------------------------------------------------------------------------ spread

#: draw ``d`` of ``--draws`` starts at seed ``--seed + d * DRAW_STRIDE`` (draw 0 is the demo's own phantoms)
DRAW_STRIDE = 1_000_000
SPREAD_CSV_NAME = "spread_per_case.csv"
SPREAD_MD_NAME = "spread.md"


def draw_seeds(first: int, cases: int, draw: int) -> list[int]:
    """The seeds of draw ``draw``: ``cases`` consecutive seeds from ``first + draw * DRAW_STRIDE``.

    >>> draw_seeds(1_000_000, 3, 1)
    [2000000, 2000001, 2000002]
    """
    return [first + draw * DRAW_STRIDE + i for i in range(cases)]


def spread_rows(results: Sequence[dict[str, Any]], region_results: Sequence[dict[str, Any]],
                draw_of: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (class, metric) over every case of every draw: means, the mean paired difference (RankSEG-dice
    minus argmax), the worst and best case (with its seed), wins/losses/ties over cases, and the spread of the
    per-draw mean difference.  Lesion counts (LiTS-style lesion region, RankSEG on the classes) are totals."""
    rows = []
    draws = sorted(set(draw_of))
    draw_idx = np.asarray(draw_of)
    seeds = np.asarray([r["seed"] for r in results])

    def add(name: str, metric: str, a: np.ndarray, b: np.ndarray, higher: bool, total: bool = False) -> None:
        d = b - a
        ok = np.isfinite(d)
        signed = np.where(ok, d if higher else -d, np.nan)
        worst, best = int(np.nanargmin(signed)), int(np.nanargmax(signed))
        stats = ev.paired_stats(a, b, higher)
        per_draw = [float(np.nanmean(d[(draw_idx == k) & ok])) if ((draw_idx == k) & ok).any() else math.nan
                    for k in draws]
        agg = np.nansum if total else np.nanmean
        rows.append({"class": name, "metric": metric, "total": total, "argmax": float(agg(a)),
                     "rankseg": float(agg(b)), "diff": float(agg(d[ok])), "worst": float(d[worst]),
                     "worst_seed": int(seeds[worst]), "best": float(d[best]), "best_seed": int(seeds[best]),
                     "wins": stats["wins"], "losses": stats["losses"], "ties": stats["ties"], "n": stats["n"],
                     "draw_lo": float(np.nanmin(per_draw)), "draw_hi": float(np.nanmax(per_draw)),
                     "draws_worse": int(sum((v < 0) if higher else (v > 0) for v in per_draw)),
                     "higher_is_better": higher})

    for c in results[0]["classes"]:
        name = _class_name(c)
        for metric, key, higher in (("Dice", "dice", True), ("HD95 mm", "hd95", False)):
            add(name, metric, _metric(results, c, "argmax", key), _metric(results, c, "rankseg_dice", key), higher)
    lesion = "lesion"
    for metric, key in (("false-positive lesions", "lesions_fp"), ("missed lesions", "lesions_missed")):
        a = np.asarray([r["metrics"]["argmax"][key][r["classes"].index(lesion)] for r in region_results], float)
        b = np.asarray([r["metrics"]["rankseg_classes"][key][r["classes"].index(lesion)] for r in region_results],
                       float)
        add(lesion, metric, a, b, higher=False, total=True)
    return rows


def format_spread(rows: Sequence[dict[str, Any]], cases: int, draws: int, first_seed: int) -> str:
    """The spread as a Markdown table (README's headline) with a sentence on how it was made."""
    head = ("| class | metric | argmax | RankSEG | RankSEG - argmax | worst case | best case | wins/losses/ties "
            "| mean difference per draw [min, max] |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v: f"{v:.0f}") if r["total"] else ((lambda v: f"{v:.2f}") if "HD95" in r["metric"]
                                                       else (lambda v: f"{v:.4f}"))
        sfmt = (lambda v: f"{v:+.0f}") if r["total"] else ((lambda v: f"{v:+.2f}") if "HD95" in r["metric"]
                                                          else (lambda v: f"{v:+.4f}"))
        dfmt = (lambda v: f"{v:+.2f}") if r["total"] or "HD95" in r["metric"] else (lambda v: f"{v:+.4f}")
        lines.append(f"| {r['class']} | {r['metric']}{' (total)' if r['total'] else ''} | {fmt(r['argmax'])} | "
                     f"{fmt(r['rankseg'])} | {sfmt(r['diff'])} | {sfmt(r['worst'])} (seed {r['worst_seed']}) | "
                     f"{sfmt(r['best'])} (seed {r['best_seed']}) | {r['wins']}/{r['losses']}/{r['ties']} | "
                     f"[{dfmt(r['draw_lo'])}, {dfmt(r['draw_hi'])}], worse in {r['draws_worse']} of {draws} |")
    seeds = ", ".join(f"{first_seed + d * DRAW_STRIDE}+" for d in range(min(draws, 3)))
    lines.append("")
    lines.append(f"{draws} draws of {cases} held-out phantoms ({draws * cases} cases; first seeds {seeds}"
                 f"{', ...' if draws > 3 else ''}), the shipped model, RankSEG(metric='dice'), pruning 'auto'. "
                 "RankSEG - argmax: the mean paired difference (Dice: > 0 is better; HD95 and lesion counts: < 0 is "
                 "better); worst/best case: the single case with the worst/best difference; wins/losses/ties: cases "
                 "where RankSEG is better/worse/equal; per draw: the mean difference of each draw of "
                 f"{cases} cases (a demo run shows one draw). Lesions: connected components of the lesion label, "
                 "totals over all cases. Regenerate: `python scripts/demo_headline.py` (or `rankseg-monai demo "
                 f"--draws {draws} --cases {cases}`).")
    return "\n".join(lines)


def run_spread(args: argparse.Namespace, net: torch.nn.Module, meta: dict[str, Any], device: torch.device,
               overlap: float, out_dir: Path) -> int:
    """``--draws D``: the demo over ``D`` draws of ``--cases`` phantoms; prints the spread table (Markdown) and
    writes it with the per-case rows."""
    t_start = time.perf_counter()
    results, region_results, draw_of = [], [], []
    for d in range(args.draws):
        run = run_cases(net, meta, draw_seeds(args.seed, args.cases, d), device, overlap, args.pruning_prob,
                        progress=not args.quiet, keep_examples=False, desc=f"draw {d + 1}/{args.draws}")
        results += run.results
        region_results += run.region_results
        draw_of += [d] * len(run.results)
    for i, (res, reg) in enumerate(zip(results, region_results)):
        res["case"] = reg["case"] = str(i)
    table = format_spread(spread_rows(results, region_results, draw_of), args.cases, args.draws, args.seed)
    csv_path = write_csv(results, out_dir / SPREAD_CSV_NAME)
    md_path = out_dir / SPREAD_MD_NAME
    md_path.write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"\ntime: {time.perf_counter() - t_start:.1f} s; wrote {md_path} and {csv_path}")
    return 0


def region_table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per region and metric, the mean over cases of each decision (Dice, NSD, lesion-wise Dice) or the totals
    (lesions found / missed / false positive)."""
    out = []
    for i, region in enumerate(results[0]["classes"]):
        rows = {"Dice": "dice", f"NSD@{NSD_TOLERANCE_MM:g}mm": "nsd", "lesion-wise Dice": "lesion_dice",
                "lesions found": "lesions_found", "lesions missed": "lesions_missed",
                "false-positive lesions": "lesions_fp"}
        for label, key in rows.items():
            vals = {m: np.array([r["metrics"][m][key][i] for r in results], dtype=float) for m in REGION_METHODS}
            if all(np.isnan(v).all() for v in vals.values()):
                continue
            total = key.startswith("lesions_")
            out.append({"region": region, "metric": label, "total": total,
                        **{m: float(np.nansum(v)) if total else ev.nan_stats(v)[0] for m, v in vals.items()}})
    return out


def format_region_table(results: Sequence[dict[str, Any]]) -> str:
    """The demo's second table: the same cases scored as LiTS scores them (regions organ = {1, 2}, lesion = {2}),
    for argmax, RankSEG on the classes and RankSEG on the regions."""
    head = f"{'region':<8}{'metric':<24}{'argmax':>9}{'RankSEG classes':>17}{'RankSEG regions':>17}"
    lines = [f"Scored LiTS-style (regions: organ = labels {{1, 2}}, lesion = {{2}}; means over "
             f"{len(results)} cases, lesion counts are totals):", head, "-" * len(head)]
    for row in region_table_rows(results):
        fmt = (lambda v: f"{v:.0f}") if row["total"] else (lambda v: f"{v:.4f}")
        lines.append(f"{row['region']:<8}{row['metric']:<24}{fmt(row['argmax']):>9}"
                     f"{fmt(row['rankseg_classes']):>17}{fmt(row['rankseg_regions']):>17}")
    lines.append("RankSEG classes: RankSEG(metric='dice') on the labels; RankSEG regions: RankSEG(regions=...) on the "
                 "regions the score uses (docs/regions.md).\nNSD: normalised surface Dice at 2 mm; lesions: connected "
                 "components, a found lesion overlaps a predicted one, a false positive overlaps none.")
    return "\n".join(lines)


def _class_name(c: Any) -> str:
    return CLASS_NAMES[c] if isinstance(c, int) and 0 <= c < len(CLASS_NAMES) else str(c)


def iou_from_dice(dice: float) -> float:
    """IoU of the same two masks: ``J = D / (2 - D)`` (exact for sets; NaN stays NaN)."""
    return dice / (2.0 - dice) if math.isfinite(dice) else math.nan


def per_case_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`rankseg_monai.app.evaluation.case_rows` (argmax vs RankSEG-dice: ``dice_diff`` and ``hd95_diff_mm`` are
    RankSEG-dice minus argmax) plus the demo's own columns: ``seed``, ``class_name``, ``max_prob`` of the class,
    ``iou_<method>`` and ``iou_diff`` (RankSEG-iou minus argmax).  Every difference is RankSEG minus argmax."""
    rows = []
    for res in results:
        for i, row in enumerate(ev.case_rows(res, "argmax", "rankseg_dice")):
            row = {"case": row.pop("case"), "seed": res["seed"], "class": row.pop("class"), **row}
            row["class_name"] = _class_name(row["class"])
            row["max_prob"] = res["max_prob"][i]
            for m in res["methods"]:
                row[f"iou_{m}"] = iou_from_dice(res["metrics"][m]["dice"][i])
            row["iou_diff"] = row["iou_rankseg_iou"] - row["iou_argmax"]
            rows.append(row)
    return rows


def write_csv(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write :func:`per_case_rows` (one row per case and foreground class; floats exactly, ``repr``), atomically."""
    return ev.write_rows(per_case_rows(results), path)


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (class, metric) of the printed table: Dice and HD95 compare argmax with RankSEG-dice, IoU
    with RankSEG-iou.  Means skip undefined values (HD95 of an empty mask); paired statistics use the cases
    where both are defined.  Counts come from :func:`rankseg_monai.app.evaluation.summarize`."""
    summary = {row["class"]: row for row in ev.summarize(results, "argmax", "rankseg_dice")}
    out = []
    for c in results[0]["classes"]:
        def values(method: str, metric: str, c: int = c) -> np.ndarray:
            vals = []
            for res in results:
                i = res["classes"].index(c)
                v = res["metrics"][method]["dice" if metric == "iou" else metric][i]
                vals.append(iou_from_dice(v) if metric == "iou" else v)
            return np.asarray(vals, dtype=float)

        s = summary[c]
        for metric, other, high in (("dice", "rankseg_dice", True), ("hd95", "rankseg_dice", False),
                                    ("iou", "rankseg_iou", True)):
            a, b = values("argmax", metric), values(other, metric)
            out.append({"class": c, "class_name": _class_name(c), "metric": metric, "rankseg": other,
                        "mean_argmax": ev.nan_stats(a)[0], "mean_rankseg": ev.nan_stats(b)[0],
                        **ev.paired_stats(a, b, high),
                        "empty_argmax": s["empty_pred_argmax"], "empty_rankseg": s[f"empty_pred_{other}"],
                        "cases": s["cases"]})
    return out


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The printed per-class comparison table."""
    labels = {"dice": "Dice", "hd95": "HD95 mm", "iou": "IoU*"}
    head = (f"{'class':<8}{'metric':<9}{'argmax':>8}{'RankSEG':>9}{'RankSEG-argmax':>16}  {'[min, max]':<19}"
            f"{'wins/losses/ties':>17}{'empty masks':>13}")
    lines = [head, "-" * len(head)]
    for s in table_rows(results):
        fmt = ".2f" if s["metric"] == "hd95" else ".4f"
        rng = f"[{s['lo']:+{fmt}}, {s['hi']:+{fmt}}]" if s["n"] else "-"
        wlt = f"{s['wins']}/{s['losses']}/{s['ties']}"
        empty = f"{s['empty_argmax']}/{s['empty_rankseg']}"
        lines.append(f"{s['class_name']:<8}{labels[s['metric']]:<9}{s['mean_argmax']:>8{fmt}}"
                     f"{s['mean_rankseg']:>9{fmt}}{s['diff']:>+16{fmt}}  {rng:<19}{wlt:>17}{empty:>13}")
    lines.append(f"{len(results)} cases.  Dice, HD95: RankSEG(metric='dice'); IoU*: RankSEG(metric='iou').  "
                 "RankSEG-argmax: mean paired difference (HD95: negative is better);\nwins/losses/ties count cases "
                 "where RankSEG is "
                 "better/worse/equal; empty masks = cases with an empty predicted mask (argmax/RankSEG); HD95 of an "
                 "empty mask is undefined\nand left out of the HD95 means and paired statistics.")
    return "\n".join(lines)


def _metric(results: Sequence[dict[str, Any]], c: int, method: str, metric: str) -> np.ndarray:
    return np.asarray([res["metrics"][method][metric][res["classes"].index(c)] for res in results], dtype=float)


def make_figure(results: Sequence[dict[str, Any]], examples: Sequence[_Example], path: Path, dpi: int = 110,
                title: str = "") -> Path:
    """Slice overlay (image, truth, lesion probability, argmax, RankSEG-dice) of the case whose lesion Dice
    changes most (either sign), and per-case Dice / HD95 changes of every case and class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    lesion = max(results[0]["classes"])
    change = np.abs(_metric(results, lesion, "rankseg_dice", "dice") - _metric(results, lesion, "argmax", "dice"))
    k = int(np.argmax(np.nan_to_num(change, nan=-1.0)))
    ex, res = examples[k], results[k]
    fg = (ex.label == lesion) | (ex.preds["argmax"] == lesion) | (ex.preds["rankseg_dice"] == lesion)
    z = int(np.argmax((ex.label == lesion).sum(axis=(0, 1)) + 0.01 * fg.sum(axis=(0, 1))))
    cmap = ListedColormap([(0, 0, 0, 0), (0.1, 0.6, 1.0, 0.35), (1.0, 0.15, 0.1, 0.75)])

    fig = Figure(figsize=(15, 7.4), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 5, height_ratios=[1.1, 1])
    panels = [(f"case {ex.case}, slice z={z}\n(largest lesion Dice change)", None), ("truth", ex.label),
              ("P(lesion) and true outline", None), ("argmax", ex.preds["argmax"]),
              ("RankSEG (dice)", ex.preds["rankseg_dice"])]
    for i, (name, mask) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(ex.image[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        if i == 2:
            im = ax.imshow(ex.lesion_prob[:, :, z].T, cmap="magma", origin="lower", vmin=0, vmax=1)
            if (ex.label[:, :, z] == lesion).any():
                ax.contour(ex.label[:, :, z].T == lesion, levels=[0.5], colors="cyan", linewidths=0.8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        elif mask is not None:
            ax.imshow(mask[:, :, z].T, cmap=cmap, origin="lower", vmin=0, vmax=2, interpolation="nearest")
            if i > 1:
                if (ex.label[:, :, z] == lesion).any():
                    ax.contour(ex.label[:, :, z].T == lesion, levels=[0.5], colors="yellow", linewidths=0.8)
                d = res["metrics"]["argmax" if i == 3 else "rankseg_dice"]["dice"]
                name = f"{name}: Dice organ {d[0]:.3f},\nlesion {d[-1]:.3f} (whole volume)"
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])

    cases = [int(r["case"]) for r in results]
    x = np.arange(len(cases))
    width = 0.8 / len(results[0]["classes"])
    colors = ("tab:blue", "tab:red", "tab:green", "tab:orange")
    spans = ((0, 2), (2, 5))
    for j, (metric, ylab) in enumerate((("dice", "Dice change (RankSEG - argmax)"),
                                        ("hd95", "HD95 change, mm (RankSEG - argmax; < 0 is better)"))):
        ax = fig.add_subplot(grid[1, spans[j][0]:spans[j][1]])
        for k, c in enumerate(results[0]["classes"]):
            a, b = _metric(results, c, "argmax", metric), _metric(results, c, "rankseg_dice", metric)
            d = b - a
            pos = x + (k - (len(results[0]["classes"]) - 1) / 2) * width
            ax.bar(pos, np.nan_to_num(d), width, color=colors[k % 4], label=_class_name(c))
            for xi, di, bi in zip(pos, d, b):
                if np.isnan(di):  # HD95 undefined: an empty mask
                    ax.text(xi, 0, " empty RankSEG mask" if np.isnan(bi) else " empty argmax mask", ha="center",
                            va="bottom", fontsize=7, rotation=90, color=colors[k % 4])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [str(c) for c in cases])
        ax.set_xlabel("case")
        ax.set_ylabel(ylab, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title + "   (blue: organ, red: lesion; yellow/cyan outline: true lesion)", fontsize=11)
    fig.savefig(path, dpi=dpi)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rankseg_monai.app.demo``."""
    parser = argparse.ArgumentParser(prog="rankseg-monai demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
