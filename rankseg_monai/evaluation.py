"""Per-case Dice and HD95 of argmax vs RankSEG decisions, summaries, CSV files and a gains plot.

All metrics come from MONAI: ``monai.metrics.DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)``
(with ``spacing=`` so HD95 is in mm), on one-hot masks of the evaluated classes.  Conventions:

* Dice uses ``ignore_empty=False`` by default: a class absent from the truth scores 1 when the prediction is
  empty too and 0 otherwise (``ignore_empty=True`` gives NaN there, MONAI's default).
* HD95 is NaN when the prediction or the truth is empty (MONAI's rule).  Means and medians skip NaN, so the
  summary also *counts* them (``hd95_undefined_<method>``) and counts empty predictions (``empty_pred_<method>``).
* A single-channel probability volume is a foreground probability: argmax means ``p > 0.5`` and RankSEG runs in
  multilabel mode; the evaluated class is label ``1``.

Functions (the demo and the CLI both use these; every array is a numpy array, spatial order as read):

``decide(probs, method="rankseg", *, metric="dice", solver="rma", output_mode=None, smooth=0.0,
pruning_prob=0.5, device=None, label_dtype=np.int64, **rankseg_kwargs) -> np.ndarray``
    ``probs`` ``(C, *spatial)``.  ``method`` ``"argmax"`` or ``"rankseg"``.  Returns a label map
    ``(*spatial)`` of ``label_dtype`` (multiclass; binary 0/1 when ``C == 1``) or bool masks ``(C, *spatial)``
    (multilabel).  A ``label_dtype`` that cannot hold every label raises a ``ValueError`` naming the fix.

``evaluate_masks(predictions, label, spacing, classes, *, case="", ignore_empty=False) -> dict``
    ``predictions`` ``{method: label map}``; ``label`` integer label map; ``spacing`` mm per axis; ``classes``
    label values to score.  Returns a *case result*: ``{"case", "classes", "methods", "true_voxels",
    "metrics": {method: {"dice": [...], "hd95": [...], "pred_voxels": [...]}}}`` (lists per class).

``compare_case(probs, label, spacing, classes=None, *, case="", methods=("argmax", "rankseg"),
ignore_empty=False, return_predictions=False, **decide_kwargs) -> dict``
    Checks the labels against the class range, makes each method's decision with :func:`decide` (in the
    narrowest integer type that holds the labels, unless ``label_dtype`` is given) and scores them with
    :func:`evaluate_masks`.  ``classes=None``: every foreground class ``1..C-1`` (``[1]`` if
    ``C == 1``).  With ``return_predictions=True`` the result also holds ``"predictions": {method: map}``.

``case_rows(result, baseline="argmax", candidate="rankseg") -> list[dict]``
    One flat row per class: ``case, class, true_voxels, dice_<m>, hd95_<m>, voxels_<m>`` for each method,
    plus ``dice_gain`` (candidate - baseline) and ``hd95_gain_mm`` (baseline - candidate) when both methods
    are present: positive means the candidate (RankSEG) is better.

``summarize(results, baseline="argmax", candidate="rankseg", tie_tol=1e-9) -> list[dict]``
    One row per class, then a pooled ``"all"`` row: ``cases``, ``empty_truth``, per method
    ``dice_mean_/dice_median_/hd95_mean_/hd95_median_<m>`` (NaN skipped), ``dice_n_/hd95_n_<m>`` (defined
    values), ``empty_pred_<m>``, ``hd95_undefined_<m>``; paired over the cases where both are defined:
    ``dice_mean_gain`` (mean of candidate - baseline), ``hd95_mean_gain_mm`` (mean of baseline - candidate),
    ``<metric>_wins/losses/ties`` and ``<metric>_paired_n``.  Gains and wins are positive when the candidate
    is better (higher Dice, lower HD95); |difference| <= tie_tol is a tie.

``format_table(table) -> str``; ``write_csv(results, path, ...)`` (per-case rows); ``write_summary_csv(table,
path)``; ``plot_gains(results, path, baseline="argmax", candidate="rankseg") -> Path`` (PNG, Agg canvas, no
pyplot state).  Files are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .functional import check_label_dtype, label_range, rankseg, smallest_label_dtype
from .functional import check_label_range as _check_dtype_range
from .io import VolumeError, atomic_write

__all__ = [
    "METHODS",
    "decide",
    "check_label_range",
    "default_classes",
    "evaluate_masks",
    "compare_case",
    "case_rows",
    "summarize",
    "format_table",
    "write_csv",
    "write_summary_csv",
    "plot_gains",
]

METHODS = ("argmax", "rankseg")


def decide(probs: np.ndarray, method: str = "rankseg", *, metric: str = "dice", solver: str = "rma",
           output_mode: str | None = None, smooth: float = 0.0, pruning_prob: float = 0.5,
           device: str | None = None, label_dtype: Any = np.int64, **rankseg_kwargs: Any) -> np.ndarray:
    """One decision for one case; see the module docstring."""
    probs = np.asarray(probs)
    if probs.ndim < 2:
        raise ValueError(f"probs has shape {probs.shape}: expected (C, *spatial)")
    num_classes = probs.shape[0]
    binary = num_classes == 1 and output_mode in (None, "binary")
    mode = "multilabel" if binary else (output_mode or "multiclass")
    dtype = check_label_dtype(label_dtype)
    if dtype == torch.bfloat16:
        raise ValueError("label_dtype=bfloat16: numpy has no bfloat16; use np.uint8, np.int64 or np.float32")
    _check_dtype_range(dtype, 0, max(num_classes - 1, 1))
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    if method == "argmax":
        if mode == "multilabel":
            masks = probs > 0.5
            return masks[0].astype(np_dtype) if binary else masks
        return np.argmax(probs, axis=0).astype(np_dtype, copy=False)
    if method != "rankseg":
        raise ValueError(f"unknown method {method!r}: use 'argmax' or 'rankseg'")
    out = rankseg(probs[None], metric=metric, smooth=smooth, output_mode=mode, solver=solver,
                  pruning_prob=pruning_prob, device=device, label_dtype=dtype, **rankseg_kwargs)
    out = np.asarray(out)[0]
    return out[0].astype(np_dtype) if binary else out


def default_classes(num_classes: int) -> list[int]:
    """Foreground classes ``1..C-1``, or ``[1]`` for a single foreground channel."""
    return [1] if num_classes == 1 else list(range(1, num_classes))


def check_label_range(label: np.ndarray, num_classes: int, case: str = "") -> None:
    """Labels must lie in ``[0, C)`` (``{0, 1}`` for one foreground channel)."""
    top = max(num_classes, 2)
    values = np.unique(label)
    bad = values[(values < 0) | (values >= top)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise VolumeError(
            f"case {case!r}: labels hold values ({shown}) outside the class range [0, {top}) of the "
            f"{num_classes}-channel probabilities; check that the label file belongs to these probabilities (the "
            "channels must include background), or relabel/merge classes first"
        )


def _mask(label: np.ndarray, c: int) -> torch.Tensor:
    """(1, 1, *spatial) float mask of one class: MONAI's one-hot layout, one class at a time (memory ~ 1 volume)."""
    return torch.from_numpy(np.asarray(label) == c)[None, None].to(torch.float32)


def evaluate_masks(predictions: Mapping[str, np.ndarray], label: np.ndarray, spacing: Sequence[float],
                   classes: Sequence[int], *, case: str = "", ignore_empty: bool = False) -> dict:
    """Dice and HD95 (mm) per class for each prediction; see the module docstring."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    label = np.asarray(label)
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("no classes to evaluate: pass at least one label value")
    spacing = [float(s) for s in spacing]
    if len(spacing) != label.ndim:
        raise ValueError(f"spacing {spacing} does not match the {label.ndim}D label map")
    for method, pred in predictions.items():
        if np.shape(pred) != label.shape:
            raise VolumeError(f"case {case!r}: {method} prediction has shape {np.shape(pred)}, labels {label.shape}")
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=ignore_empty)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    metrics: dict[str, dict[str, list]] = {m: {"dice": [], "hd95": [], "pred_voxels": []} for m in predictions}
    true_voxels = []
    for c in classes:
        y = _mask(label, c)
        true_voxels.append(int(y.sum()))
        for method, pred in predictions.items():
            p = _mask(pred, c)
            dice = float(dice_metric(y_pred=p, y=y)[0, 0])
            with warnings.catch_warnings():  # MONAI warns on every empty mask; the NaN it returns is counted
                warnings.simplefilter("ignore")
                hd = float(hd_metric(y_pred=p, y=y, spacing=spacing)[0, 0])
            dice_metric.reset()
            hd_metric.reset()
            metrics[method]["dice"].append(dice)
            metrics[method]["hd95"].append(hd)
            metrics[method]["pred_voxels"].append(int(p.sum()))
    return {"case": case, "classes": classes, "methods": list(predictions), "true_voxels": true_voxels,
            "metrics": metrics}


def compare_case(probs: np.ndarray, label: np.ndarray, spacing: Sequence[float], classes: Sequence[int] | None = None,
                 *, case: str = "", methods: Sequence[str] = METHODS, ignore_empty: bool = False,
                 return_predictions: bool = False, **decide_kwargs: Any) -> dict:
    """Decide with each method and score against ``label``; see the module docstring."""
    probs = np.asarray(probs)
    label = np.asarray(label)
    if probs.shape[1:] != label.shape:
        raise VolumeError(f"case {case!r}: probabilities have spatial shape {probs.shape[1:]} but labels "
                          f"{label.shape}; resample the labels to the probability grid")
    if decide_kwargs.get("output_mode") == "multilabel" and probs.shape[0] > 1:
        raise ValueError("evaluation compares label maps: use output_mode='multiclass' (or a single foreground "
                         "channel); score multilabel masks per channel yourself")
    num_classes = probs.shape[0]
    check_label_range(label, num_classes, case)
    classes = default_classes(num_classes) if classes is None else [int(c) for c in classes]
    for c in classes:
        if not 0 <= c < max(num_classes, 2):
            raise ValueError(f"class {c} is outside [0, {max(num_classes, 2)}) for {num_classes}-channel "
                             "probabilities")
    decide_kwargs.setdefault("label_dtype", smallest_label_dtype(*label_range(max(num_classes, 2))))
    predictions = {m: decide(probs, m, **decide_kwargs) for m in methods}
    result = evaluate_masks(predictions, label, spacing, classes, case=case, ignore_empty=ignore_empty)
    if return_predictions:
        result["predictions"] = predictions
    return result


# ------------------------------------------------------------------------------------------------- tables


def case_rows(result: Mapping[str, Any], baseline: str = "argmax", candidate: str = "rankseg") -> list[dict]:
    """Flat per-class rows of one case result; see the module docstring."""
    rows = []
    paired = baseline in result["metrics"] and candidate in result["metrics"]
    for i, c in enumerate(result["classes"]):
        row: dict[str, Any] = {"case": result["case"], "class": c, "true_voxels": result["true_voxels"][i]}
        for m in result["methods"]:
            vals = result["metrics"][m]
            row[f"dice_{m}"] = vals["dice"][i]
            row[f"hd95_{m}"] = vals["hd95"][i]
            row[f"voxels_{m}"] = vals["pred_voxels"][i]
        if paired:
            b, k = result["metrics"][baseline], result["metrics"][candidate]
            row["dice_gain"] = k["dice"][i] - b["dice"][i]
            row["hd95_gain_mm"] = b["hd95"][i] - k["hd95"][i]
        rows.append(row)
    return rows


def _stats(values: list[float]) -> tuple[float, float, int]:
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[np.isfinite(arr)]
    if ok.size == 0:
        return math.nan, math.nan, 0
    return float(ok.mean()), float(np.median(ok)), int(ok.size)


def _paired(base: list[float], cand: list[float], higher_is_better: bool, tie_tol: float
            ) -> tuple[float, int, int, int, int]:
    b, k = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    ok = np.isfinite(b) & np.isfinite(k)
    gain = (k - b)[ok] if higher_is_better else (b - k)[ok]
    wins = int(np.sum(gain > tie_tol))
    losses = int(np.sum(gain < -tie_tol))
    ties = int(gain.size - wins - losses)
    mean = float(np.mean(gain)) if gain.size else math.nan
    return mean, wins, losses, ties, int(gain.size)


def summarize(results: Sequence[Mapping[str, Any]], baseline: str = "argmax", candidate: str = "rankseg",
              tie_tol: float = 1e-9) -> list[dict]:
    """Per-class (then pooled ``"all"``) summary of case results; see the module docstring."""
    if not results:
        return []
    methods = list(results[0]["methods"])
    groups: dict[Any, list[tuple[Mapping[str, Any], int]]] = {}
    for res in results:
        if list(res["methods"]) != methods:
            raise ValueError("all case results must hold the same methods")
        for i, c in enumerate(res["classes"]):
            groups.setdefault(c, []).append((res, i))
    keys = sorted(groups)
    pooled = [item for c in keys for item in groups[c]]
    table = []
    for key, items in [*((c, groups[c]) for c in keys), ("all", pooled)]:
        row: dict[str, Any] = {"class": key, "cases": len(items),
                               "empty_truth": sum(r["true_voxels"][i] == 0 for r, i in items)}
        for m in methods:
            dice = [r["metrics"][m]["dice"][i] for r, i in items]
            hd = [r["metrics"][m]["hd95"][i] for r, i in items]
            row[f"dice_mean_{m}"], row[f"dice_median_{m}"], row[f"dice_n_{m}"] = _stats(dice)
            row[f"hd95_mean_{m}"], row[f"hd95_median_{m}"], row[f"hd95_n_{m}"] = _stats(hd)
            row[f"empty_pred_{m}"] = sum(r["metrics"][m]["pred_voxels"][i] == 0 for r, i in items)
            row[f"hd95_undefined_{m}"] = int(sum(not math.isfinite(v) for v in hd))
        if baseline in methods and candidate in methods:
            for metric, better_high, suffix in (("dice", True, ""), ("hd95", False, "_mm")):
                base = [r["metrics"][baseline][metric][i] for r, i in items]
                cand = [r["metrics"][candidate][metric][i] for r, i in items]
                mean, wins, losses, ties, n = _paired(base, cand, better_high, tie_tol)
                row[f"{metric}_mean_gain{suffix}"] = mean
                row[f"{metric}_wins"], row[f"{metric}_losses"], row[f"{metric}_ties"] = wins, losses, ties
                row[f"{metric}_paired_n"] = n
        table.append(row)
    return table


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(table: Sequence[Mapping[str, Any]], baseline: str = "argmax", candidate: str = "rankseg") -> str:
    """A fixed-width text table of :func:`summarize` output (means; medians and counts are in the CSV)."""
    if not table:
        return "(no cases)"
    methods = [k[len("empty_pred_"):] for k in table[0] if k.startswith("empty_pred_")]
    paired = "dice_wins" in table[0]
    header = ["class", "n"]
    for m in methods:
        header += [f"Dice {m}"]
    if paired:
        header += ["Dice gain", "W/L/T"]
    for m in methods:
        header += [f"HD95 {m}"]
    if paired:
        header += ["HD95 gain", "W/L/T"]
    header += [f"empty {m}" for m in methods] + [f"HD95 NaN {m}" for m in methods]
    lines = []
    for row in table:
        cells = [str(row["class"]), str(row["cases"])]
        cells += [_fmt(row[f"dice_mean_{m}"]) for m in methods]
        if paired:
            cells += [f"{row['dice_mean_gain']:+.4f}" if math.isfinite(row["dice_mean_gain"]) else "nan",
                      f"{row['dice_wins']}/{row['dice_losses']}/{row['dice_ties']}"]
        cells += [_fmt(row[f"hd95_mean_{m}"], 2) for m in methods]
        if paired:
            d = row["hd95_mean_gain_mm"]
            cells += [f"{d:+.2f}" if math.isfinite(d) else "nan",
                      f"{row['hd95_wins']}/{row['hd95_losses']}/{row['hd95_ties']}"]
        cells += [str(row[f"empty_pred_{m}"]) for m in methods]
        cells += [str(row[f"hd95_undefined_{m}"]) for m in methods]
        lines.append(cells)
    widths = [max(len(h), *(len(r[j]) for r in lines)) for j, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines]
    note = ("Dice/HD95: means over defined values (HD95 in mm; NaN when prediction or truth is empty, counted in "
            "'HD95 NaN').")
    if paired:
        note += (f" Paired over cases where both are defined: Dice gain = {candidate} - {baseline}, HD95 gain = "
                 f"{baseline} - {candidate} (mm); positive gains and W(ins) mean {candidate} is better.")
    return "\n".join(out) + "\n" + note


def _write_text(path: str | os.PathLike, text: str, protected: Sequence[str | os.PathLike] = ()) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, write, overwrite=True, protected=protected)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = _stdio.StringIO()
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def write_csv(results: Sequence[Mapping[str, Any]], path: str | os.PathLike, baseline: str = "argmax",
              candidate: str = "rankseg", protected: Sequence[str | os.PathLike] = ()) -> Path:
    """Per-case, per-class rows (:func:`case_rows`) as CSV; floats are written exactly (``repr``)."""
    rows = [row for res in results for row in case_rows(res, baseline, candidate)]
    return _write_text(path, _csv_text(rows), protected)


def write_summary_csv(table: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      protected: Sequence[str | os.PathLike] = ()) -> Path:
    """The :func:`summarize` table as CSV."""
    return _write_text(path, _csv_text(table), protected)


def plot_gains(results: Sequence[Mapping[str, Any]], path: str | os.PathLike, baseline: str = "argmax",
               candidate: str = "rankseg", protected: Sequence[str | os.PathLike] = ()) -> Path:
    """PNG of per-case paired gains (Dice: candidate - baseline; HD95: baseline - candidate, mm) per class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for res in results for row in case_rows(res, baseline, candidate)]
    if rows and "dice_gain" not in rows[0]:
        raise ValueError(f"plot_gains needs both {baseline!r} and {candidate!r} results")
    classes = sorted({row["class"] for row in rows})
    fig = Figure(figsize=(max(6.0, 1.2 * len(classes) + 3), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    panels = (("dice_gain", f"Dice gain ({candidate} - {baseline})"),
              ("hd95_gain_mm", f"HD95 gain, mm ({baseline} - {candidate})"))
    for j, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.axhline(0.0, color="0.5", lw=1)
        for x, c in enumerate(classes):
            vals = np.array([row[key] for row in rows if row["class"] == c], dtype=np.float64)
            ok = vals[np.isfinite(vals)]
            jitter = rng.uniform(-0.15, 0.15, ok.size)
            colors = np.where(ok > 0, "tab:green", np.where(ok < 0, "tab:red", "0.4"))
            ax.scatter(np.full(ok.size, x) + jitter, ok, c=colors, s=18, alpha=0.8)
            if ok.size:
                ax.plot([x - 0.3, x + 0.3], [ok.mean()] * 2, color="k", lw=2)
            undefined = int(vals.size - ok.size)
            if undefined:
                ax.annotate(f"{undefined} NaN", (x, 0), textcoords="offset points", xytext=(0, -14),
                            ha="center", fontsize=7, color="0.3")
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels([str(c) for c in classes])
        ax.set_xlabel("class")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Per-case paired gains over {len(results)} cases (above 0: {candidate} better; bar = mean)",
                 fontsize=9)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    return atomic_write(path, write, overwrite=True, protected=protected)
