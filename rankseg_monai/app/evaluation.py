"""Per-case Dice and HD95 of argmax vs RankSEG decisions, summaries, CSV files and a differences plot.

All metrics come from MONAI: ``monai.metrics.DiceMetric`` and ``HausdorffDistanceMetric(percentile=95)``
(with ``spacing=`` so HD95 is in mm), on one-hot masks of the evaluated classes.  Conventions:

* Dice uses ``ignore_empty=False`` by default: a class absent from the truth scores 1 when the prediction is
  empty too and 0 otherwise (``ignore_empty=True`` gives NaN there, MONAI's default).
* HD95 is NaN when the prediction or the truth is empty (MONAI's rule).  Means and medians skip NaN, so the
  summary also *counts* them (``hd95_undefined_<method>``, ``dice_/nsd_/lesion_dice_undefined_<method>``) and
  counts empty predictions (``empty_pred_<method>``).
* NSD is the published definition (MONAI ``use_subvoxels=True``; ``nsd_style="edge"``: MONAI's default) and 1 when
  both masks are empty (Metrics Reloaded); the lesion-wise Dice is 1 with no lesion on either side (BraTS 2023).
  ``aggregation="nnunet"`` makes Dice, NSD and lesion-wise Dice NaN when both masks are empty and the ``all`` row
  the mean of the class means (``nnUNetv2_evaluate_folder``).  The table of ``docs/cli.md`` names the library
  each number matches.
* A single-channel probability volume is a foreground probability: argmax means ``p > 0.5`` and RankSEG runs in
  multilabel mode; the evaluated class is label ``1``.
* **Differences are always candidate minus baseline (RankSEG minus argmax)**, for Dice and HD95 alike:
  ``dice_diff`` > 0 and ``hd95_diff_mm`` < 0 mean RankSEG is better; ``wins`` count the cases where it is.

The pipeline: :func:`compare_case` (decide with each method, then :func:`evaluate_masks`) per case,
:func:`summarize` over cases, then :func:`format_table`, :func:`write_csv`, :func:`write_summary_csv` and
:func:`plot_differences`.  Every array is a numpy array in the spatial order it was read.  Files are written
atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import VolumeError, atomic_write
from ..metrics import lesion_wise, surface_dice
from ..options import RankSEGOptions, label_range, smallest_label_dtype
from .decide import METHODS, decide, estimate, structure_names

__all__ = [
    "METHODS",
    "decide",
    "check_label_values",
    "default_classes",
    "evaluate_masks",
    "compare_case",
    "case_rows",
    "nan_stats",
    "paired_stats",
    "summarize",
    "format_table",
    "csv_text",
    "write_rows",
    "read_rows",
    "results_from_rows",
    "write_csv",
    "write_summary_csv",
    "plot_differences",
    "plot_expected",
    "OPTIONAL_METRICS",
    "AGGREGATIONS",
    "ClassesError",
]


#: how structures empty in both masks are scored and averaged: see :func:`evaluate_masks` and :func:`summarize`
AGGREGATIONS = ("default", "nnunet")


class ClassesError(ValueError):
    """Classes asked for that the probabilities do not have (the same for every case: a usage error); ``option``
    names the argument (``"classes"`` or ``"lesion_structures"``)."""

    def __init__(self, message: str, option: str = "classes") -> None:
        super().__init__(message)
        self.option = option


def default_classes(num_classes: int) -> list[int]:
    """Foreground classes ``1..C-1``, or ``[1]`` for a single foreground channel."""
    return [1] if num_classes == 1 else list(range(1, num_classes))


def check_label_values(label: np.ndarray, num_classes: int, case: str = "", ignore_label: int | None = None
                       ) -> None:
    """Raise a :class:`VolumeError` unless the truth labels lie in ``[0, C)`` (``{0, 1}`` for one foreground
    channel) or are the ``ignore_label``: a label file that does not belong to these probabilities."""
    top = max(num_classes, 2)
    values = np.unique(label)
    bad = values[((values < 0) | (values >= top)) & (values != (-1 if ignore_label is None else ignore_label))]
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
                   classes: Sequence[Any], *, case: str = "", ignore_empty: bool = False,
                   structures: Mapping[Any, Sequence[int]] | None = None, nsd_tolerance: float | None = None,
                   lesion_structures: Sequence[Any] = (), nsd_style: str = "subvoxel", aggregation: str = "default",
                   lesion_style: str = "plain", lesion_min_size: float | None = None,
                   lesion_dilation: int | None = None, ignore_label: int | None = None) -> dict:
    """Dice and HD95 (mm) of each prediction, per class or per region, and on request NSD and lesion-wise counts.

    Args:
        predictions: ``{method: label map}`` (integer arrays of the label's shape).
        label: the integer truth label map.
        spacing: mm per array axis (HD95 and NSD in mm).
        classes: the structures to score: label values, or the names of ``structures``.
        case: the case name (kept in the result).
        ignore_empty: Dice NaN (MONAI's default) instead of 1/0 when a structure is absent from the truth.
        structures: ``{name: label values}``: a structure's mask is the voxels holding any of its labels (the
            regions LiTS/KiTS/BraTS score); default: each class alone.
        nsd_tolerance: also the normalised surface Dice at this tolerance in mm (:func:`rankseg_monai.metrics.
            surface_dice`, MONAI's ``compute_surface_dice``).
        lesion_structures: structures also scored lesion-wise (:func:`rankseg_monai.metrics.lesion_wise`:
            found, missed and false-positive lesions, lesion-wise Dice).
        nsd_style: ``"subvoxel"`` (the published NSD, key ``"nsd"``) or ``"edge"`` (MONAI's default, key
            ``"nsd_edge"``).
        aggregation: ``"default"``: a structure empty in both masks scores Dice 1, NSD 1 and lesion-wise Dice 1
            (MONAI ``ignore_empty=False``, Metrics Reloaded, BraTS 2023); ``"nnunet"``: NaN for all three
            (nnU-Net's ``compute_metrics``), so means run over the other cases.
        lesion_style, lesion_min_size, lesion_dilation: :func:`rankseg_monai.metrics.lesion_wise`'s ``style``,
            ``min_size`` and ``dilation``.
        ignore_label: nnU-Net's ignore label: voxels holding it in the truth count in no metric (both masks are
            background there).

    Returns:
        a *case result* ``{"case", "classes", "methods", "true_voxels", "metrics": {method: {"dice": [...],
        "hd95": [...], "pred_voxels": [...], ["nsd", "lesion_dice", "lesions_found", "lesions_missed",
        "lesions_fp": [...]]}}}`` (lists per structure; lesion entries are NaN for the other structures).
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    label = np.asarray(label)
    classes = list(classes)
    if not classes:
        raise ValueError("no classes to evaluate: pass at least one label value")
    if structures is None:
        structures = {int(c): [int(c)] for c in classes}
        classes = [int(c) for c in classes]
    missing = [c for c in classes if c not in structures]
    if missing:
        raise ValueError(f"{missing} are not among the structures {list(structures)}")
    stray = [c for c in lesion_structures if c not in classes]
    if stray:
        raise ClassesError(f"lesion-wise structures {stray} are not among the scored structures {classes}",
                           "lesion_structures")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    nan_if_empty = aggregation == "nnunet"
    empty_score = math.nan if nan_if_empty else 1.0
    spacing = [float(s) for s in spacing]
    if len(spacing) != label.ndim:
        raise ValueError(f"spacing {spacing} does not match the {label.ndim}D label map")
    for method, pred in predictions.items():
        if np.shape(pred) != label.shape:
            raise VolumeError(f"case {case!r}: {method} prediction has shape {np.shape(pred)}, labels {label.shape}")
    lesions = set(lesion_structures)
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=ignore_empty)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    nsd_key = "nsd" if nsd_style == "subvoxel" else "nsd_edge"
    keep = None if ignore_label is None else label != ignore_label
    keys = ["dice", "hd95", "pred_voxels"] + ([nsd_key] if nsd_tolerance is not None else []) + (
        ["lesion_dice", "lesions_found", "lesions_missed", "lesions_fp"] if lesions else [])
    metrics: dict[str, dict[str, list]] = {m: {k: [] for k in keys} for m in predictions}
    true_voxels = []
    for c in classes:
        truth = np.isin(label, structures[c])
        if keep is not None:
            truth &= keep
        y = torch.from_numpy(truth)[None, None].to(torch.float32)
        true_voxels.append(int(truth.sum()))
        for method, pred in predictions.items():
            mask = np.isin(np.asarray(pred), structures[c])
            if keep is not None:
                mask &= keep
            p = torch.from_numpy(mask)[None, None].to(torch.float32)
            dice = float(dice_metric(y_pred=p, y=y)[0, 0])
            if nan_if_empty and true_voxels[-1] == 0 and not mask.any():
                dice = math.nan  # nnU-Net: tp + fp + fn == 0
            with warnings.catch_warnings():  # MONAI warns on every empty mask; the NaN it returns is counted
                warnings.simplefilter("ignore")
                hd = float(hd_metric(y_pred=p, y=y, spacing=spacing)[0, 0])
            dice_metric.reset()
            hd_metric.reset()
            out = metrics[method]
            out["dice"].append(dice)
            out["hd95"].append(hd)
            out["pred_voxels"].append(int(mask.sum()))
            if nsd_tolerance is not None:
                out[nsd_key].append(surface_dice(mask, truth, spacing, nsd_tolerance, nsd_style, empty_score))
            if lesions:
                lw = lesion_wise(mask, truth, lesion_min_size, style=lesion_style, spacing=spacing,
                                 dilation=lesion_dilation, empty_score=empty_score) if c in lesions else None
                out["lesion_dice"].append(lw["lesion_dice"] if lw else math.nan)
                for key, field_ in (("lesions_found", "detected"), ("lesions_missed", "missed"),
                                    ("lesions_fp", "false_positive")):
                    out[key].append(float(lw[field_]) if lw else math.nan)
    return {"case": case, "classes": classes, "methods": list(predictions), "true_voxels": true_voxels,
            "metrics": metrics}


def compare_case(probs: np.ndarray, label: np.ndarray, spacing: Sequence[float], classes: Sequence[int] | None = None,
                 *, case: str = "", methods: Sequence[str] = METHODS, ignore_empty: bool = False,
                 return_predictions: bool = False, options: RankSEGOptions | None = None, label_dtype: Any = None,
                 nsd_tolerance: float | None = None, lesion_structures: Sequence[Any] | None = None,
                 estimate: bool = True, ignore_label: int | None = None, scoring: Mapping[str, Any] | None = None,
                 **option_kwargs: Any) -> dict:
    """Decide with each method and score the decisions against ``label``.

    Args:
        probs: probabilities ``(C, *spatial)``.
        label: the integer truth label map ``(*spatial)``; its values must lie in ``[0, C)``.
        spacing: mm per axis.
        classes: label values to score (default: every foreground class ``1..C-1``, ``[1]`` if ``C == 1``).
        case: the case name.
        methods: decisions to compare (``"argmax"``, ``"rankseg"``).
        ignore_empty: see :func:`evaluate_masks`.
        return_predictions: also return ``"predictions": {method: label map}``.
        options: RankSEG's options (or give them as keywords; default ``RankSEGOptions()``, the deployed
            ``pruning_prob="auto"``).  Only label maps are compared: ``output_mode="multilabel"`` is refused for
            ``C > 1``.
        label_dtype: dtype of the decisions (default: the narrowest integer type that holds the labels).
        nsd_tolerance, lesion_structures: see :func:`evaluate_masks`.  With ``options.regions`` the structures are
            the regions (``classes`` then names them; default all), and ``lesion_structures`` defaults to the
            regions that lie inside another one (tumours, enhancing tumour).
        estimate: also the label-free expected Dice of each decision (``expected_dice`` per method:
            :func:`rankseg_monai.functional.expected_score`), to compare with the actual Dice.
        ignore_label: nnU-Net's ignore label: allowed in ``label`` besides ``[0, C)``, its voxels count in no metric.
        scoring: more keywords of :func:`evaluate_masks` (``nsd_style``, ``aggregation``, ``lesion_style``, ...).

    Returns:
        the case result of :func:`evaluate_masks`.
    """
    probs = np.asarray(probs)
    label = np.asarray(label)
    if options is None:
        options = RankSEGOptions(**option_kwargs)
    elif option_kwargs:
        options = options.replace(**option_kwargs)
    if probs.shape[1:] != label.shape:
        raise VolumeError(f"case {case!r}: probabilities have spatial shape {probs.shape[1:]} but labels "
                          f"{label.shape}; resample the labels to the probability grid")
    if options.output_mode == "multilabel" and probs.shape[0] > 1:
        raise ValueError("evaluation compares label maps: use output_mode='multiclass' (or a single foreground "
                         "channel); score multilabel masks per channel yourself")
    num_classes = probs.shape[0]
    tree = options.regions
    structures = None
    if tree is not None:
        top = tree.max_label + 1 if options.region_probs else max(num_classes, tree.max_label + 1)
        check_label_values(label, top, case, ignore_label)
        structures = {name: sorted(labels) for name, labels in zip(tree.names, tree.labels)}
        classes = list(tree.names) if classes is None else list(classes)
        if lesion_structures is None:
            lesion_structures = [tree.names[r] for r in range(len(tree)) if tree.parent[r] >= 0]
        if label_dtype is None:
            label_dtype = smallest_label_dtype(*options.label_bounds(num_classes))
    else:
        check_label_values(label, num_classes, case, ignore_label)
        classes = default_classes(num_classes) if classes is None else [int(c) for c in classes]
        for c in classes:
            if not 0 <= c < max(num_classes, 2):
                raise ClassesError(f"class {c} is outside [0, {max(num_classes, 2)}) for {num_classes}-channel "
                                 "probabilities")
        if label_dtype is None:
            label_dtype = smallest_label_dtype(*label_range(max(num_classes, 2), options.unassigned_policy,
                                                            options.void_index))
    predictions = {m: decide(probs, m, options, label_dtype=label_dtype) for m in methods}
    result = evaluate_masks(predictions, label, spacing, classes, case=case, ignore_empty=ignore_empty,
                            structures=structures, nsd_tolerance=nsd_tolerance,
                            lesion_structures=lesion_structures or (), ignore_label=ignore_label, **dict(scoring or {}))
    if estimate and options.metric in ("dice", "iou"):
        for m, pred in predictions.items():
            result["metrics"][m]["expected_dice"] = _estimates(probs, pred, options, classes)
    if return_predictions:
        result["predictions"] = predictions
    return result


def _estimates(probs: np.ndarray, pred: np.ndarray, options: RankSEGOptions, classes: Sequence[Any]) -> list[float]:
    """The label-free expected Dice of a decision, per scored structure (class label or region name)."""
    est = estimate(probs, pred, options)
    names = structure_names(probs.shape[0], options)
    index = {name: k for k, name in enumerate(names)}
    return [float(est[index[c]]) for c in classes]


# ------------------------------------------------------------------------------------------------- tables


def case_rows(result: Mapping[str, Any], baseline: str = "argmax", candidate: str = "rankseg") -> list[dict]:
    """One flat row per class of a case result: ``case, class, true_voxels, dice_<m>, hd95_<m>, voxels_<m>`` for
    each method, plus ``dice_diff`` and ``hd95_diff_mm`` (both candidate minus baseline) when both are there."""
    rows = []
    paired = baseline in result["metrics"] and candidate in result["metrics"]
    for i, c in enumerate(result["classes"]):
        row: dict[str, Any] = {"case": result["case"], "class": c, "true_voxels": result["true_voxels"][i]}
        for m in result["methods"]:
            vals = result["metrics"][m]
            row[f"dice_{m}"] = vals["dice"][i]
            row[f"hd95_{m}"] = vals["hd95"][i]
            row[f"voxels_{m}"] = vals["pred_voxels"][i]
            for key in OPTIONAL_METRICS:
                if key in vals:
                    row[f"{key}_{m}"] = vals[key][i]
        if paired:
            b, k = result["metrics"][baseline], result["metrics"][candidate]
            row["dice_diff"] = k["dice"][i] - b["dice"][i]
            row["hd95_diff_mm"] = k["hd95"][i] - b["hd95"][i]
        rows.append(row)
    return rows


#: per-structure metrics a case result may hold besides Dice, HD95 and the mask size
OPTIONAL_METRICS = ("nsd", "nsd_edge", "expected_dice", "lesion_dice", "lesions_found", "lesions_missed",
                    "lesions_fp")


def nan_stats(values: Sequence[float]) -> tuple[float, float, int]:
    """``(mean, median, count)`` of the finite values (NaN, NaN, 0 when there is none)."""
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[np.isfinite(arr)]
    if ok.size == 0:
        return math.nan, math.nan, 0
    return float(ok.mean()), float(np.median(ok)), int(ok.size)


def paired_stats(base: Sequence[float], cand: Sequence[float], higher_is_better: bool, tie_tol: float = 1e-9
                 ) -> dict[str, Any]:
    """Paired differences ``cand - base`` over the cases where both are finite.

    Returns ``diff`` (mean difference), ``lo``/``hi`` (its range), ``n`` (pairs) and ``wins``/``losses``/``ties``
    (the candidate is better / worse / within ``tie_tol``; better is higher when ``higher_is_better``).

    Example:
        >>> from rankseg_monai.app.evaluation import paired_stats
        >>> paired_stats([0.5, 0.6, 0.7], [0.6, 0.6, 0.65], higher_is_better=True)["wins"]
        1
    """
    b, k = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    ok = np.isfinite(b) & np.isfinite(k)
    d = (k - b)[ok]
    signed = d if higher_is_better else -d
    wins, losses = int(np.sum(signed > tie_tol)), int(np.sum(signed < -tie_tol))
    empty = d.size == 0
    return {"diff": math.nan if empty else float(d.mean()), "lo": math.nan if empty else float(d.min()),
            "hi": math.nan if empty else float(d.max()), "n": int(d.size), "wins": wins, "losses": losses,
            "ties": int(d.size - wins - losses)}


def summarize(results: Sequence[Mapping[str, Any]], baseline: str = "argmax", candidate: str = "rankseg",
              tie_tol: float = 1e-9, aggregation: str = "default") -> list[dict]:
    """One row per class, then an ``"all"`` row, over case results.

    Columns: ``cases``, ``empty_truth``; per method ``dice_mean_/dice_median_/hd95_mean_/hd95_median_<m>`` (NaN
    skipped), ``dice_n_/hd95_n_<m>`` (defined values), ``empty_pred_<m>``, ``dice_undefined_<m>`` and
    ``hd95_undefined_<m>`` (NaN values, left out of the means; also ``<key>_undefined_<m>`` for NSD and the
    lesion-wise Dice); paired over
    the cases where both are defined (:func:`paired_stats`): ``dice_mean_diff`` and ``hd95_mean_diff_mm``
    (candidate minus baseline), ``<metric>_wins/losses/ties`` (the candidate is better / worse / equal) and
    ``<metric>_paired_n``.

    The ``"all"`` row pools every (case, structure) value; with ``aggregation="nnunet"`` its means are the means of
    the structure rows' means instead (nnU-Net's ``foreground_mean``).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}: use one of {', '.join(AGGREGATIONS)}")
    if not results:
        return []
    methods = list(results[0]["methods"])
    groups: dict[Any, list[tuple[Mapping[str, Any], int]]] = {}
    for res in results:
        if list(res["methods"]) != methods:
            raise ValueError("all case results must hold the same methods")
        for i, c in enumerate(res["classes"]):
            groups.setdefault(c, []).append((res, i))
    keys = list(groups)  # the order the structures come in (classes sorted, regions as given)
    pooled = [item for c in keys for item in groups[c]]
    table = []
    for key, items in [*((c, groups[c]) for c in keys), ("all", pooled)]:
        row: dict[str, Any] = {"class": key, "cases": len(items),
                               "empty_truth": sum(r["true_voxels"][i] == 0 for r, i in items)}
        for m in methods:
            dice = [r["metrics"][m]["dice"][i] for r, i in items]
            hd = [r["metrics"][m]["hd95"][i] for r, i in items]
            row[f"dice_mean_{m}"], row[f"dice_median_{m}"], row[f"dice_n_{m}"] = nan_stats(dice)
            row[f"hd95_mean_{m}"], row[f"hd95_median_{m}"], row[f"hd95_n_{m}"] = nan_stats(hd)
            row[f"empty_pred_{m}"] = sum(r["metrics"][m]["pred_voxels"][i] == 0 for r, i in items)
            row[f"hd95_undefined_{m}"] = int(sum(not math.isfinite(v) for v in hd))
            row[f"dice_undefined_{m}"] = int(sum(not math.isfinite(v) for v in dice))
            extra = items[0][0]["metrics"][m] if items else {}
            for nsd in ("nsd", "nsd_edge"):
                if nsd in extra:
                    vals = [r["metrics"][m][nsd][i] for r, i in items]
                    row[f"{nsd}_mean_{m}"] = nan_stats(vals)[0]
                    row[f"{nsd}_undefined_{m}"] = int(sum(not math.isfinite(v) for v in vals))
            if "lesion_dice" in extra:
                scored = [r["metrics"][m]["lesion_dice"][i] for r, i in items
                          if math.isfinite(r["metrics"][m]["lesions_found"][i])]  # structures scored lesion-wise
                row[f"lesion_dice_mean_{m}"] = nan_stats(scored)[0]
                row[f"lesion_dice_undefined_{m}"] = int(sum(not math.isfinite(v) for v in scored))
                for key in ("lesions_found", "lesions_missed", "lesions_fp"):
                    vals = [r["metrics"][m][key][i] for r, i in items]
                    row[f"{key}_{m}"] = int(sum(v for v in vals if math.isfinite(v))) if any(
                        math.isfinite(v) for v in vals) else math.nan
            if "expected_dice" in extra:
                est = np.array([r["metrics"][m]["expected_dice"][i] for r, i in items], dtype=np.float64)
                act = np.array(dice, dtype=np.float64)
                ok = np.isfinite(est) & np.isfinite(act)
                row[f"expected_dice_mean_{m}"] = float(est[ok].mean()) if ok.any() else math.nan
                row[f"expected_mae_{m}"] = float(np.abs(est - act)[ok].mean()) if ok.any() else math.nan
                row[f"expected_corr_{m}"] = _corr(est[ok], act[ok])
        if baseline in methods and candidate in methods:
            for metric, better_high, suffix in (("dice", True, ""), ("hd95", False, "_mm")):
                base = [r["metrics"][baseline][metric][i] for r, i in items]
                cand = [r["metrics"][candidate][metric][i] for r, i in items]
                st = paired_stats(base, cand, better_high, tie_tol)
                row[f"{metric}_mean_diff{suffix}"] = st["diff"]
                row[f"{metric}_wins"], row[f"{metric}_losses"] = st["wins"], st["losses"]
                row[f"{metric}_ties"], row[f"{metric}_paired_n"] = st["ties"], st["n"]
        table.append(row)
    if aggregation == "nnunet" and len(table) > 1:  # nnU-Net's foreground_mean: the mean of the class means
        means = ("dice_mean_", "hd95_mean_", "nsd_mean_", "nsd_edge_mean_", "lesion_dice_mean_")
        for key in table[-1]:
            if key.startswith(means):
                table[-1][key] = nan_stats([r[key] for r in table[:-1]])[0]
    return table


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation (NaN with fewer than 3 pairs or a constant side)."""
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _class_label(c: Any, class_names: Mapping[int, str] | None) -> str:
    if class_names and not isinstance(c, str) and int(c) in class_names:
        return f"{class_names[int(c)]} ({c})"
    return str(c)


def _with_class_names(rows: Sequence[Mapping[str, Any]], class_names: Mapping[int, str] | None) -> list[dict]:
    """Rows with a ``class_name`` column after ``class`` (unchanged without names)."""
    if not class_names:
        return [dict(r) for r in rows]
    out = []
    for row in rows:
        new: dict[str, Any] = {}
        for k, v in row.items():
            new[k] = v
            if k == "class":
                new["class_name"] = "" if isinstance(v, str) else class_names.get(int(v), "")
        out.append(new)
    return out


def format_table(table: Sequence[Mapping[str, Any]], baseline: str = "argmax", candidate: str = "rankseg",
                 class_names: Mapping[int, str] | None = None, width: int = 120,
                 method_labels: Mapping[str, str] | None = None) -> str:
    """A text table of :func:`summarize` output, one line per class and metric with one column per method (means;
    medians and every other column are in the CSV), so that it fits a terminal ``width`` characters wide whatever
    the metrics; classes are shown by name when ``class_names`` (label value -> name) has them, methods by
    ``method_labels`` (e.g. ``{"argmax": "threshold 0.5"}`` for independent probabilities)."""
    if not table:
        return "(no cases)"
    methods = [k[len("empty_pred_"):] for k in table[0] if k.startswith("empty_pred_")]
    paired = "dice_wins" in table[0]
    shown = {m: (method_labels or {}).get(m, m) for m in (*methods, baseline, candidate)}
    diff_head = f"{shown[candidate]}-{shown[baseline]}"
    header = ["class", "n", "metric", *(shown[m] for m in methods)] + ([diff_head, "W/L/T"] if paired else [])
    nsd = next((k for k in ("nsd", "nsd_edge") if f"{k}_mean_{methods[0]}" in table[0]), None)
    lesions = f"lesions_found_{methods[0]}" in table[0]
    expected = f"expected_mae_{methods[0]}" in table[0]

    def diff(row: Mapping[str, Any], key: str, digits: int, metric: str) -> list[str]:
        if not paired:
            return []
        d = row[key]
        return [f"{d:+.{digits}f}" if math.isfinite(d) else "nan",
                f"{row[f'{metric}_wins']}/{row[f'{metric}_losses']}/{row[f'{metric}_ties']}"]

    lines: list[list[str]] = []
    for row in table:
        metrics: list[tuple[str, list[str], list[str]]] = [
            ("Dice", [_fmt(row[f"dice_mean_{m}"]) for m in methods], diff(row, "dice_mean_diff", 4, "dice")),
            ("HD95 mm", [_fmt(row[f"hd95_mean_{m}"], 2) for m in methods], diff(row, "hd95_mean_diff_mm", 2, "hd95")),
            ("empty masks", [str(row[f"empty_pred_{m}"]) for m in methods], []),
            ("HD95 NaN", [str(row[f"hd95_undefined_{m}"]) for m in methods], []),
        ]
        if nsd:
            metrics.append(("NSD" if nsd == "nsd" else "NSD-edge",
                            [_fmt(row[f"{nsd}_mean_{m}"]) for m in methods], []))
        if lesions:
            metrics.append(("lesions found/missed/FP", [
                "-" if not math.isfinite(row[f"lesions_found_{m}"]) else
                f"{row[f'lesions_found_{m}']}/{row[f'lesions_missed_{m}']}/{row[f'lesions_fp_{m}']}"
                for m in methods], []))
        if expected:
            metrics.append(("est. Dice (MAE, r)", [
                f"{_fmt(row[f'expected_dice_mean_{m}'])} ({_fmt(row[f'expected_mae_{m}'], 3)}, "
                f"{_fmt(row[f'expected_corr_{m}'], 2)})" for m in methods], []))
        for i, (name, cells, extra) in enumerate(metrics):
            first = i == 0
            lines.append([_class_label(row["class"], class_names) if first else "", str(row["cases"]) if first else "",
                          name, *cells, *extra])
    widths = [max(len(h), *(len(r[j]) for r in lines if j < len(r))) for j, h in enumerate(header)]
    left = 3  # class, n and metric are left-aligned

    def render(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    out = [render(header), "-" * len(render(header))]
    out += [render(r).rstrip() for r in lines]
    note = ("Dice, HD95 (mm), NSD: means over defined values; HD95 is NaN when prediction or truth is empty (counted "
            "in 'HD95 NaN'); empty masks: cases with an empty prediction.")
    if paired:
        note += (f" {diff_head}: the paired mean difference over cases where both are defined (Dice: > 0 is better; "
                 f"HD95: < 0 is better); W/L/T count cases where {shown[candidate]} is better/worse/equal.")
    renamed = [f"'{m}' columns hold {shown[m]}" for m in methods if shown[m] != m]
    if renamed:
        note += f" In the CSV files the {', '.join(renamed)}."
    if lesions:
        note += " Lesions (connected components): totals over the cases."
    if nsd:
        note += (" NSD: normalised surface Dice, the published definition (DeepMind surface-distance; MONAI "
                 "compute_surface_dice(use_subvoxels=True))." if nsd == "nsd" else
                 " NSD-edge: normalised surface Dice over edge voxels (MONAI compute_surface_dice's default), not the "
                 "published definition.")
    if expected:
        note += (" est. Dice: the label-free expected Dice of each decision (mean), its mean absolute error against "
                 "the actual Dice and their correlation over cases (r): how far the estimate can be trusted here.")
    note += " Every column, per case and per class, is in the CSV files."
    return "\n".join(out) + "\n" + textwrap.fill(note, width=width)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of dict rows (the union of their keys as columns, in first-seen order; floats exactly, ``repr``)."""
    buf = _stdio.StringIO()
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               protected: Sequence[str | os.PathLike] = ()) -> Path:
    """Write dict rows as CSV (:func:`csv_text`), atomically (UTF-8; bytes of case names that are not UTF-8 are
    written as they are, so they read back the same with :func:`read_rows`)."""
    text = csv_text(rows)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(text)

    return atomic_write(path, write, overwrite=True, protected=protected)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file written by :func:`write_rows` (values as text)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def results_from_rows(rows: Sequence[Mapping[str, str]], methods: Sequence[str]) -> list[dict]:
    """Case results (as :func:`evaluate_masks` returns them) from per-case CSV rows (:func:`case_rows` /
    :func:`write_csv`, read back with :func:`read_rows`): the inverse of :func:`case_rows`, exact because floats
    are written with ``repr``.  Used to merge the reports of ``evaluate --part-id K --num-parts N``."""
    results: dict[str, dict] = {}
    for row in rows:
        case = row["case"]
        res = results.get(case)
        if res is None:
            res = results[case] = {"case": case, "classes": [], "methods": list(methods), "true_voxels": [],
                                   "metrics": {m: {"dice": [], "hd95": [], "pred_voxels": []} for m in methods}}
            for m in methods:
                res["metrics"][m].update({k: [] for k in OPTIONAL_METRICS if f"{k}_{m}" in row})
        try:
            name = row["class"]
            res["classes"].append(int(name) if name.lstrip("-").isdigit() else name)
            res["true_voxels"].append(int(row["true_voxels"]))
            for m in methods:
                res["metrics"][m]["dice"].append(float(row[f"dice_{m}"]))
                res["metrics"][m]["hd95"].append(float(row[f"hd95_{m}"]))
                res["metrics"][m]["pred_voxels"].append(int(row[f"voxels_{m}"]))
                for key in OPTIONAL_METRICS:
                    if key in res["metrics"][m]:
                        res["metrics"][m][key].append(float(row[f"{key}_{m}"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise VolumeError(f"case {case!r}: per-case row {dict(row)} is incomplete or not a number ({exc}); "
                              "the CSV was not written by rankseg-monai evaluate, or it was edited") from exc
    return list(results.values())


def write_csv(results: Sequence[Mapping[str, Any]], path: str | os.PathLike, baseline: str = "argmax",
              candidate: str = "rankseg", protected: Sequence[str | os.PathLike] = (),
              class_names: Mapping[int, str] | None = None) -> Path:
    """Per-case, per-class rows (:func:`case_rows`) as CSV (with a ``class_name`` column when names are given)."""
    rows = [row for res in results for row in case_rows(res, baseline, candidate)]
    return write_rows(_with_class_names(rows, class_names), path, protected)


def write_summary_csv(table: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      protected: Sequence[str | os.PathLike] = (), class_names: Mapping[int, str] | None = None
                      ) -> Path:
    """The :func:`summarize` table as CSV (with a ``class_name`` column when names are given)."""
    return write_rows(_with_class_names(table, class_names), path, protected)


def plot_differences(results: Sequence[Mapping[str, Any]], path: str | os.PathLike, baseline: str = "argmax",
                     candidate: str = "rankseg", protected: Sequence[str | os.PathLike] = (),
                     class_names: Mapping[int, str] | None = None,
                     method_labels: Mapping[str, str] | None = None) -> Path:
    """PNG of the per-case paired differences (candidate minus baseline; Dice: above 0 is better, HD95 in mm:
    below 0 is better) per class; green marks the cases where the candidate is better."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for res in results for row in case_rows(res, baseline, candidate)]
    if rows and "dice_diff" not in rows[0]:
        raise ValueError(f"plot_differences needs both {baseline!r} and {candidate!r} results")
    classes = list(dict.fromkeys(row["class"] for row in rows))
    base, cand = ((method_labels or {}).get(m, m) for m in (baseline, candidate))
    panels = (("dice_diff", f"Dice difference\n({cand} - {base}; > 0: {cand} better)", True),
              ("hd95_diff_mm", f"HD95 difference, mm\n({cand} - {base}; < 0: {cand} better)", False))
    title_chars = max(len(line) for _, title, _ in panels for line in title.splitlines())
    fig = Figure(figsize=(max(7.0, 1.2 * len(classes) + 4, 2 * (0.075 * title_chars + 0.9)), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    for j, (key, title, higher_better) in enumerate(panels):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.axhline(0.0, color="0.5", lw=1)
        for x, c in enumerate(classes):
            vals = np.array([row[key] for row in rows if row["class"] == c], dtype=np.float64)
            ok = vals[np.isfinite(vals)]
            jitter = rng.uniform(-0.15, 0.15, ok.size)
            better = ok > 0 if higher_better else ok < 0
            worse = ok < 0 if higher_better else ok > 0
            colors = np.where(better, "tab:green", np.where(worse, "tab:red", "0.4"))
            ax.scatter(np.full(ok.size, x) + jitter, ok, c=colors, s=18, alpha=0.8)
            if ok.size:
                ax.plot([x - 0.3, x + 0.3], [ok.mean()] * 2, color="k", lw=2)
            undefined = int(vals.size - ok.size)
            if undefined:
                ax.annotate(f"{undefined} NaN", (x, 0), textcoords="offset points", xytext=(0, -14),
                            ha="center", fontsize=7, color="0.3")
        ax.set_xticks(range(len(classes)))
        ax.set_xticklabels([_class_label(c, class_names) for c in classes])
        ax.set_xlabel("class")
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Per-case paired differences over {len(results)} cases (green: {cand} better; bar = mean)",
                 fontsize=9)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    return atomic_write(path, write, overwrite=True, protected=protected)


def plot_expected(results: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                  protected: Sequence[str | os.PathLike] = (), class_names: Mapping[int, str] | None = None,
                  method_labels: Mapping[str, str] | None = None) -> Path:
    """PNG: per case and structure, the label-free expected Dice of each decision against its actual Dice, with
    the identity line, and per structure the mean absolute error and the correlation (can the estimate be trusted
    on this model?)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results or "expected_dice" not in results[0]["metrics"][results[0]["methods"][0]]:
        raise ValueError("plot_expected needs case results with expected_dice (compare_case(..., estimate=True))")
    methods = list(results[0]["methods"])
    classes = list(dict.fromkeys(c for r in results for c in r["classes"]))
    fig = Figure(figsize=(4.2 * len(methods), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    markers = "os^Dv<>p*h"
    for j, m in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), j + 1)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        lines = []
        for k, c in enumerate(classes):
            pairs = [(r["metrics"][m]["expected_dice"][i], r["metrics"][m]["dice"][i]) for r in results
                     for i, cc in enumerate(r["classes"]) if cc == c]
            est, act = (np.array(v, dtype=np.float64) for v in zip(*pairs))
            ok = np.isfinite(est) & np.isfinite(act)
            ax.scatter(est[ok], act[ok], s=20, marker=markers[k % len(markers)], alpha=0.8,
                       label=_class_label(c, class_names))
            if ok.any():
                lines.append(f"{_class_label(c, class_names)}: MAE {np.abs(est - act)[ok].mean():.3f}, "
                             f"r {_corr(est[ok], act[ok]):.2f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("expected Dice (label-free estimate)")
        ax.set_ylabel("actual Dice")
        ax.set_title(f"{(method_labels or {}).get(m, m)}\n" + "\n".join(lines), fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Expected vs actual Dice over {len(results)} cases (on the dashed line the estimate is exact)",
                 fontsize=9)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True, protected=protected)
