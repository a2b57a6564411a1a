"""``rankseg-monai calibrate``: fit a calibration on labelled validation cases (nnU-Net's cross-validation folds, or
one folder split into folds), score it held out, and write ``calibration.json`` with a report.

Two streaming passes over the cases, one case in memory at a time:

1. read each case once; keep a systematic voxel sample (a fixed total budget, ``--max-voxels``, split evenly over
   the cases, random offset per case) of the calibration inputs (``log p`` / ``logit p``) with their truth, and the
   case's Dice of argmax and of RankSEG with the expected Dice (uncalibrated);
2. fit one calibration per held-out fold (on the samples of the other folds) and one on every sample (the one
   ``calibration.json`` holds); read each case again and score calibrated RankSEG with its fold's calibration (Dice,
   expected Dice) and, with the full fit, the label-free fingerprint of the case.

Memory: one case plus the sample (``--max-voxels`` x channels x 4 bytes), independent of the number of cases.
See ``docs/calibration.md`` ("Calibrate first") and ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .._files import atomic_write, sha256_file
from ..calibrator import Calibration, apply_calibration, calibration_inputs, fingerprint_of, scored_structures
from ..options import RankSEGOptions
from . import cli
from . import io as rio
from .decide import decide, estimate, structure_names

__all__ = ["add_arguments", "run", "fold_assignment", "sample_indices", "fit_calibration", "CALIBRATION_FILE",
           "REPORT_FILES"]

CALIBRATION_FILE = "calibration.json"
REPORT_FILES = ("report.md", "report.csv", "reliability_before.png", "reliability_after.png")
METHOD_CHOICES = ("temperature", "vector")


# ------------------------------------------------------------------------------------------------- options
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``calibrate`` subcommand's options (the decision options are the ones ``predict`` takes)."""
    p.add_argument("--probs", nargs="+", required=True, metavar="DIR",
                   help="folders of validation probabilities (.nii.gz, .mha, .nrrd, nnU-Net .npz + .pkl); several "
                        "folders are folds (e.g. fold_0/validation fold_1/validation ...): each is scored with a fit "
                        "on the others")
    p.add_argument("--labels", required=True, metavar="DIR",
                   help="folder of the reference label maps (nnU-Net: gt_segmentations)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder for calibration.json, report.md, report.csv and the reliability plots")
    p.add_argument("--method", choices=METHOD_CHOICES, default="temperature", type=str.lower,
                   help="temperature (default; one per class with --per-class) or vector (per-class temperature "
                        "and bias)")
    p.add_argument("--per-class", action="store_true", help="one temperature per class or region")
    p.add_argument("--folds", type=int, default=5, metavar="K",
                   help="with one --probs folder: score K folds of its cases (default 5)")
    p.add_argument("--max-voxels", type=int, default=2_000_000, metavar="N",
                   help="voxels sampled for the fit, over all cases together (default 2000000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the voxel sample's offsets (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration.json in OUTDIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--class-names", nargs="+", default=None, metavar="NAME",
                   help="names of the label values 0, 1, 2, ... (background first), for the report")
    cli._add_postfix_option(p)
    cli._add_decision_options(p)


# ------------------------------------------------------------------------------------------------ helpers
def fold_assignment(folders: Sequence[Sequence[Path]], folds: int) -> list[int]:
    """The held-out fold of every case, in the order of the folders' cases: the folder index when there are several
    folders; otherwise case ``i`` (sorted by name) goes to fold ``i % folds`` (``folds`` capped at the number of
    cases).

    >>> fold_assignment([[Path("a"), Path("b"), Path("c")]], 2)
    [0, 1, 0]
    >>> fold_assignment([[Path("a")], [Path("b"), Path("c")]], 5)
    [0, 1, 1]
    """
    if len(folders) > 1:
        return [k for k, cases in enumerate(folders) for _ in cases]
    n = len(folders[0])
    k = min(folds, n)
    return [i % k for i in range(n)]


def sample_indices(num_voxels: int, budget: int, generator: torch.Generator) -> torch.Tensor:
    """A systematic sample of at most about ``budget`` of ``num_voxels`` flat indices, random offset.

    >>> sample_indices(10, 4, torch.Generator().manual_seed(0)).numel() <= 4
    True
    """
    step = max(1, math.ceil(num_voxels / max(budget, 1)))
    offset = int(torch.randint(0, step, (1,), generator=generator)) if step > 1 else 0
    return torch.arange(offset, num_voxels, step)


def _input_kind_and_activation(options: RankSEGOptions, num_channels: int) -> tuple[str, str]:
    kind = options.calibration_kind(num_channels)
    return kind, "softmax" if kind == "class-probabilities" else "sigmoid"


def _truth(label: np.ndarray, options: RankSEGOptions, num_channels: int, kind: str) -> np.ndarray:
    """bool ``(K, *spatial)`` truth per structure of :func:`structure_names` (classes ``0..C-1``, regions, or the
    foreground of a single channel)."""
    tree = options.regions
    if tree is not None:
        return np.stack([np.isin(label, sorted(labels)) for labels in tree.labels])
    if num_channels == 1:
        return (label > 0)[None]
    return np.stack([label == c for c in range(num_channels)])


def _structure_masks(decision: np.ndarray, options: RankSEGOptions, num_channels: int) -> np.ndarray:
    """bool ``(K, *spatial)`` masks of a decision (a label map, a 0/1 map, or multilabel masks)."""
    tree = options.regions
    decision = np.asarray(decision)
    if tree is not None:
        if decision.ndim and decision.shape[0] == len(tree) and options.output_mode == "multilabel":
            return decision.astype(bool)
        return np.stack([np.isin(decision, sorted(labels)) for labels in tree.labels])
    if num_channels == 1:
        return (decision != 0)[None]
    if options.output_mode == "multilabel":
        return decision.astype(bool)
    return np.stack([decision == c for c in range(num_channels)])


def _dice(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    p = pred.reshape(pred.shape[0], -1)
    t = truth.reshape(truth.shape[0], -1)
    inter = np.logical_and(p, t).sum(1, dtype=np.int64)
    total = p.sum(1, dtype=np.int64) + t.sum(1, dtype=np.int64)
    return [float(2 * i / s) if s else 1.0 for i, s in zip(inter, total)]


def _fit_targets(label: np.ndarray, options: RankSEGOptions, num_channels: int, kind: str, idx: np.ndarray
                 ) -> np.ndarray:
    """The truth of the sampled voxels, as the fit takes it: a label map ``(1, k)`` (softmax) or 0/1 masks
    ``(C, k)`` (sigmoid: regions, or channel ``c`` = label ``c``; a single channel = foreground)."""
    flat = label.reshape(-1)[idx]
    if kind == "class-probabilities":
        return flat[None].astype(np.int64)
    return _truth(flat, options, num_channels, kind).astype(np.uint8)


def fit_calibration(z: Sequence[torch.Tensor], y: Sequence[np.ndarray], activation: str, method: str,
                    per_class: bool, *, kind: str, channels: Sequence[Any]) -> tuple[Calibration, dict[str, float]]:
    """Fit on sampled calibration inputs ``z`` (``(C, k)`` per case, :func:`calibration_inputs`) and their truth;
    returns the :class:`Calibration` (without report or fingerprint) and the fit's info."""
    from ..calibration.scaling import fit_temperature, fit_vector_scaling

    ys = [torch.from_numpy(t) for t in y]
    if method == "vector":
        params = fit_vector_scaling(list(z), ys, activation, max_voxels=None)
        cal = Calibration("vector", kind, params["temperature"].tolist(), channels=list(channels),
                          bias=params["bias"].tolist(), version=__version__)
        return cal, {}
    t, info = fit_temperature(list(z), ys, activation, per_class=per_class, max_voxels=None, return_info=True)
    cal = Calibration("per-class-temperature" if per_class else "temperature", kind, t.tolist(),
                      channels=list(channels), version=__version__)
    return cal, {"nll_before": info["nll_before"], "nll_after": info["nll_after"]}


@dataclass
class _Case:
    name: str
    path: Path
    label: Path
    fold: int
    z: torch.Tensor | None = None  # sampled calibration inputs (C, k)
    y: np.ndarray | None = None  # their truth
    dice: dict[str, list[float]] = field(default_factory=dict)
    expected: dict[str, list[float]] = field(default_factory=dict)
    fingerprint: dict[str, list[float]] = field(default_factory=dict)


class CaseFailed(Exception):
    """A case could not be read or checked: the run stops, nothing is written (exit code 1)."""


def _read_case(case: _Case, args: argparse.Namespace, options: RankSEGOptions) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(C, *spatial)`` (activated, validated) and the label map of one case (as ``evaluate``)."""
    try:
        label = rio.load_labels(case.label)
        volume = cli._load(case.path, args, spatial_shape=label.labels.shape)
        rio.check_same_grid(volume.geometry, label.geometry, case.name)
        probs = cli._prepare(volume, args, options)
    except (rio.VolumeError, ValueError, OSError) as exc:
        raise CaseFailed(f"case {case.name!r}: {exc}") from None
    return probs, np.asarray(label.labels)


def _decision_options(options: RankSEGOptions) -> RankSEGOptions:
    """RankSEG's options for scoring: label maps (as ``evaluate``), no activation (the probabilities are ready)."""
    return options.replace(softmax=False, sigmoid=False, temperature=None, calibration=None)


def _score(probs: np.ndarray, truth: np.ndarray, opts: RankSEGOptions, method: str) -> tuple[list[float], list[float]]:
    dec = decide(probs, method, opts)
    masks = _structure_masks(dec, opts, probs.shape[0])
    return _dice(masks, truth), [float(v) for v in estimate(probs, dec, opts)]


# ------------------------------------------------------------------------------------------------ the command
def _validate(args: argparse.Namespace) -> tuple[RankSEGOptions, list[_Case], Path]:
    """Every check before any case is read (a :class:`cli.UsageError`, exit 2, otherwise)."""
    options = cli.decision_options(args)
    cli._names_from_dataset(args)
    if options.metric not in ("dice", "iou"):
        raise cli.UsageError("calibrate scores Dice/IoU decisions: use --metric dice or iou")
    if args.folds < 2:
        raise cli.UsageError(f"--folds must be >= 2 (each fold is scored with a fit on the others), got {args.folds}")
    if args.max_voxels < 1000:
        raise cli.UsageError(f"--max-voxels must be >= 1000 (the fit's sample), got {args.max_voxels}")
    if args.per_class and args.method == "vector":
        raise cli.UsageError("--method vector is already per class: drop --per-class")
    dirs = [Path(d) for d in args.probs]
    for d in dirs:
        if not d.is_dir():
            raise cli.UsageError(f"--probs {d}: not a folder")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise cli.UsageError("--probs names a folder twice; give each fold's folder once")
    labels = cli._label_index(Path(args.labels), args)
    names: dict[Path, str] = {}  # case names (MONAI SaveImage's case folders and --postfix read, as predict does)
    folders: list[list[Path]] = []
    for d in dirs:
        found = cli._find([d], args, rio.PROBABILITY_EXTENSIONS)
        names.update(found)
        folders.append(sorted(found, key=found.__getitem__))
    for d, cases in zip(dirs, folders):
        if not cases:
            raise cli.UsageError(f"no probability files found in {d} (looked for "
                                 f"{', '.join(rio.PROBABILITY_EXTENSIONS)})")
    seen: dict[str, Path] = {}
    for d, cases in zip(dirs, folders):
        for p in cases:
            name = names[p]
            if name in seen:
                raise cli.UsageError(f"case {name!r} is in {seen[name]} and {d}; each case belongs to one fold")
            seen[name] = d
            if name not in labels:
                raise cli.UsageError(f"case {name!r} ({p}) has no label file in {args.labels} (expected {name}.nii.gz, "
                                     ".nii, .mha, .mhd or .nrrd)")
    if sum(map(len, folders)) < 2:
        raise cli.UsageError("calibrate needs at least 2 labelled cases (one fold is scored with a fit on the others)")
    folds = fold_assignment(folders, args.folds)
    paths = [p for cases in folders for p in cases]
    cases = [_Case(names[p], p, labels[names[p]], f) for p, f in zip(paths, folds)]
    outdir = Path(args.output)
    cli._check_outdir(outdir, [*dirs, Path(args.labels)], [*paths, *labels.values()])
    if (outdir / CALIBRATION_FILE).exists() and not args.overwrite:
        raise cli.UsageError(f"{outdir / CALIBRATION_FILE} exists; pass --overwrite to replace it, or choose another "
                             "-o")
    return options, cases, outdir


def run(args: argparse.Namespace) -> int:
    """``rankseg-monai calibrate``; returns the exit code (a :class:`cli.UsageError` for a refused run; 1 when a
    case cannot be read, with nothing written)."""
    options, cases, outdir = _validate(args)
    try:
        return _run(args, options, cases, outdir)
    except CaseFailed as exc:
        cli._err(f"{exc}; nothing written (every case takes part in the fit and the held-out folds: fix or remove "
                 "it, then run the same command again)")
        return 1


def _run(args: argparse.Namespace, options: RankSEGOptions, cases: list[_Case], outdir: Path) -> int:
    t0 = time.perf_counter()
    opts = _decision_options(options)
    n = len(cases)
    budget = max(1, args.max_voxels // n)
    gen = torch.Generator().manual_seed(int(args.seed))
    num_channels = kind = activation = None
    fold_ids = sorted({c.fold for c in cases})
    hashes = []
    # ---- pass 1: samples and the uncalibrated scores
    for case in cli._progress(cases, args, "calibrate (1/2: sample)"):
        probs, label = _read_case(case, args, options)
        if num_channels is None:
            num_channels = probs.shape[0]
            kind, activation = _input_kind_and_activation(options, num_channels)
            try:
                opts.check_classes(num_channels)
            except ValueError as exc:
                raise cli.UsageError(cli._cli_spelling(str(exc))) from None
            names = structure_names(num_channels, opts)
        elif probs.shape[0] != num_channels:
            raise cli.UsageError(f"case {case.name!r} has {probs.shape[0]} channels, the first case {num_channels}: "
                                 "calibrate one model's outputs at a time")
        hashes.extend(f"{p.name}:{sha256_file(p)}" for p in cli._inputs_of(case.path))
        hashes.append(f"{case.label.name}:{sha256_file(case.label)}")
        idx = sample_indices(label.size, budget, gen)
        flat = torch.from_numpy(np.ascontiguousarray(probs).reshape(num_channels, -1))[:, idx]
        case.z = calibration_inputs(flat, activation).float().clone()
        case.y = _fit_targets(label, opts, num_channels, kind, idx.numpy())
        truth = _truth(label, opts, num_channels, kind)
        case.dice["argmax"], _ = _score(probs, truth, opts, "argmax")
        case.dice["rankseg"], case.expected["rankseg"] = _score(probs, truth, opts, "rankseg")
        del probs, label, truth
    # ---- the fits: one per held-out fold and one on everything
    channels = list(names) if opts.regions is not None and kind == "region-probabilities" else \
        (list(range(num_channels)))
    per_class = bool(args.per_class)

    def fit(members: list[_Case]) -> tuple[Calibration, dict[str, float]]:
        return fit_calibration([c.z for c in members], [c.y for c in members], activation, args.method, per_class,
                               kind=kind, channels=channels)

    fold_fits = {f: fit([c for c in cases if c.fold != f])[0] for f in fold_ids}
    full, info = fit(cases)
    # ---- pass 2: held-out calibrated RankSEG, and the fingerprint under the full fit
    fg = scored_structures(num_channels, opts)
    for case in cli._progress(cases, args, "calibrate (2/2: held-out)"):
        probs, label = _read_case(case, args, options)
        truth = _truth(label, opts, num_channels, kind)
        held = apply_calibration(probs, fold_fits[case.fold]).numpy()
        case.dice["calibrated"], case.expected["calibrated"] = _score(held, truth, opts, "rankseg")
        del held
        calibrated = apply_calibration(probs, full).numpy()
        _, exp_full = _score(calibrated, truth, opts, "rankseg")
        case.fingerprint = fingerprint_of(calibrated, exp_full, opts)
        del probs, label, truth, calibrated
    report = _held_out_report(cases, names, fg, fold_ids)
    recommendation = None  # regions: no per-region fallback in the decision (the report still says it)
    if opts.regions is None:
        recommendation = ["rankseg"] * num_channels
        for row in report:
            if row["recommend"] == "argmax":
                recommendation[row["index"]] = "argmax"
    fingerprint = _fingerprint(cases, [names[k] for k in fg])
    fit_info = {"cases": n, "folds": len(fold_ids), "fold_of_case": {c.name: c.fold for c in cases},
                "voxels": int(sum(c.z.shape[1] for c in cases)), "max_voxels": args.max_voxels, "seed": args.seed,
                "inputs_sha256": _digest(hashes), **info,
                "fold_temperatures": {str(f): list(fold_fits[f].temperature) for f in fold_ids},
                "held_out": report}
    cal = Calibration(full.method, full.input_kind, full.temperature, full.channels, bias=full.bias,
                      recommendation=recommendation, fingerprint=fingerprint, fit=fit_info, version=__version__)
    written = _write_outputs(outdir, args, cal, cases, report, fold_fits, activation)
    print(_summary(cal, report, n, time.perf_counter() - t0), file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _digest(items: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(items).encode("utf-8", "surrogateescape")).hexdigest()


def _held_out_report(cases: Sequence[_Case], names: Sequence[Any], fg: Sequence[int], fold_ids: Sequence[int]
                     ) -> list[dict[str, Any]]:
    rows = []
    for k in fg:
        a = np.array([c.dice["argmax"][k] for c in cases])
        r = np.array([c.dice["rankseg"][k] for c in cases])
        cal = np.array([c.dice["calibrated"][k] for c in cases])
        e_before = np.array([c.expected["rankseg"][k] for c in cases])
        e_after = np.array([c.expected["calibrated"][k] for c in cases])
        gain = cal - a
        per_fold = {f: float(np.mean([g for g, c in zip(gain, cases) if c.fold == f])) for f in fold_ids}
        worst_fold = min(per_fold, key=per_fold.get)
        worst_case = int(np.argmin(gain))
        helps = float(cal.mean()) > float(a.mean())
        rows.append({"index": k, "structure": names[k], "cases": len(cases),
                     "dice_argmax": float(a.mean()), "dice_rankseg": float(r.mean()),
                     "dice_calibrated": float(cal.mean()), "gain_vs_argmax": float(gain.mean()),
                     "worst_fold": worst_fold, "worst_fold_gain": per_fold[worst_fold],
                     "worst_case": cases[worst_case].name, "worst_case_gain": float(gain[worst_case]),
                     "expected_dice_mae_before": float(np.abs(e_before - r).mean()),
                     "expected_dice_mae_after": float(np.abs(e_after - cal).mean()),
                     "recommend": "rankseg" if helps else "argmax"})
    return rows


def _fingerprint(cases: Sequence[_Case], structures: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"structures": list(structures), "cases": len(cases)}
    for stat in ("volume", "uncertain", "expected_dice"):
        values = np.array([c.fingerprint[stat] for c in cases], dtype=np.float64)
        out[stat] = {"min": values.min(0).tolist(), "max": values.max(0).tolist(),
                     "median": np.median(values, 0).tolist()}
    return out


def _name(structure: Any, class_names: Sequence[str] | None) -> str:
    if isinstance(structure, int) and class_names and structure < len(class_names):
        return f"{class_names[structure]} ({structure})"
    return str(structure)


def _verdict(row: Mapping[str, Any], name: str, followed: bool) -> str:
    g, wf, wc = row["gain_vs_argmax"], row["worst_fold_gain"], row["worst_case_gain"]
    spread = f"worst fold {row['worst_fold']}: {wf:+.4f}; worst case {row['worst_case']}: {wc:+.4f}"
    note = ""
    if row["dice_calibrated"] < row["dice_rankseg"] - 0.001:
        note = (f" Note: RankSEG on the uncalibrated probabilities scored higher here ({row['dice_rankseg']:.4f} vs "
                f"{row['dice_calibrated']:.4f}): the model may already be calibrated for this class, and a fit on "
                "these cases does not improve it.")
    if row["recommend"] == "rankseg":
        return (f"{name}: calibrated RankSEG beats argmax on held-out cases by {g:+.4f} Dice ({spread}): use "
                f"RankSEG with this calibration.{note}")
    how = ("predict --calibration does, unless --ignore-recommendation" if followed else
           "regions are not switched one by one: decide this dataset with argmax, or accept the loss")
    return (f"{name}: calibrated RankSEG does not beat argmax on held-out cases ({g:+.4f} Dice; {spread}): keep "
            f"argmax for this class ({how}).{note}")


_COLUMNS = ("structure", "cases", "dice_argmax", "dice_rankseg", "dice_calibrated", "gain_vs_argmax", "worst_fold",
            "worst_fold_gain", "worst_case", "worst_case_gain", "expected_dice_mae_before", "expected_dice_mae_after",
            "recommend")


def _report_md(cal: Calibration, report: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None) -> str:
    fit = cal.fit or {}
    params = f"T = {', '.join(f'{t:.4g}' for t in cal.temperature)}"
    if cal.bias is not None:
        params += f"; bias = {', '.join(f'{b:.4g}' for b in cal.bias)}"
    folds = "; ".join(", ".join(f"{t:.4g}" for t in v) for v in fit["fold_temperatures"].values())
    lines = ["# Calibration report (rankseg-monai calibrate)", "",
             f"{cal.method} on {cal.input_kind} ({cal.activation}), fitted on {fit.get('cases')} cases "
             f"({fit.get('voxels')} sampled voxels): {params}.", "",
             f"Held out: {fit.get('folds')} folds; each fold's cases are scored with a fit on the other folds "
             f"(fold temperatures: {folds}).",
             "", "| structure | argmax | RankSEG | calibrated RankSEG | gain vs argmax | worst fold | worst case | "
             "E[Dice] MAE before | after | recommendation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report:
        lines.append(f"| {_name(r['structure'], class_names)} | {r['dice_argmax']:.4f} | {r['dice_rankseg']:.4f} | "
                     f"{r['dice_calibrated']:.4f} | {r['gain_vs_argmax']:+.4f} | {r['worst_fold']}: "
                     f"{r['worst_fold_gain']:+.4f} | {r['worst_case']}: {r['worst_case_gain']:+.4f} | "
                     f"{r['expected_dice_mae_before']:.4f} | {r['expected_dice_mae_after']:.4f} | "
                     f"{r['recommend']} |")
    lines += ["", "Dice: mean over the held-out cases; gains are calibrated RankSEG minus argmax (worst fold: the "
              "fold with the lowest mean gain; worst case: the lowest gain of one case). E[Dice] MAE: mean |expected "
              "Dice - Dice| of RankSEG's mask, uncalibrated (before) and calibrated held out (after).", "",
              "## Verdicts", ""]
    followed = cal.recommendation is not None
    lines += [f"* {_verdict(r, _name(r['structure'], class_names), followed)}" for r in report]
    lines += ["", "A calibration holds for data like these cases only: it does not transfer across a change of "
              "scanner, protocol, resolution or reference definition. `predict --calibration` flags cases whose "
              "label-free fingerprint (expected volume, uncertain share, expected Dice) lies outside these cases'.",
              "", "Reliability before/after (held out, on the sampled voxels): reliability_before.png, "
              "reliability_after.png.", ""]
    return "\n".join(lines)


def _report_csv(report: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in report:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _write_outputs(outdir: Path, args: argparse.Namespace, cal: Calibration, cases: Sequence[_Case],
                   report: Sequence[Mapping[str, Any]], fold_fits: Mapping[int, Calibration], activation: str
                   ) -> list[Path]:
    """Every output, each atomically; the reliability plots from the samples (before: as given; after: each case's
    sample calibrated with its held-out fold's fit)."""
    from ..calibration.report import calibration_report, plot_reliability

    class_names = args.class_names
    mode = "softmax" if activation == "softmax" else "sigmoid"
    before_p = [_probs_of(c.z, activation) for c in cases]
    after_p = [apply_calibration(p, fold_fits[c.fold]) for p, c in zip(before_p, cases)]
    labels = [torch.from_numpy(c.y) for c in cases]
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        written = []
        for tag, probs in (("before", before_p), ("after", after_p)):
            rep = calibration_report(probs, labels, mode=mode, compare_decisions=False)
            keep = [c.index for c in rep.classes if c.index != 0 or mode == "sigmoid"]
            written.append(plot_reliability(rep, outdir / f"reliability_{tag}.png", classes=keep,
                                            title=f"reliability {tag} calibration (held out, sampled voxels)"))
        text = _report_md(cal, report, class_names)
        written.append(atomic_write(outdir / "report.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8")))
        table = _report_csv(report)
        written.append(atomic_write(outdir / "report.csv", lambda tmp: Path(tmp).write_text(table, encoding="utf-8")))
        written.append(cal.save(outdir / CALIBRATION_FILE))  # last: its presence means a finished run
    except OSError as exc:
        raise cli.UsageError(f"cannot write into {outdir}: {exc.strerror or exc}; free space or fix the folder, then "
                             "run the same command again") from None
    return written


def _probs_of(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The sampled probabilities back from their calibration inputs (``softmax(log p)`` = ``p`` after clipping)."""
    return torch.softmax(z, 0) if activation == "softmax" else torch.sigmoid(z)


def _summary(cal: Calibration, report: Sequence[Mapping[str, Any]], n: int, seconds: float) -> str:
    head = f"calibration ({cal.method}, T = {', '.join(f'{t:.4g}' for t in cal.temperature)}) on {n} cases " \
           f"in {seconds:.1f} s; held out:"
    rows = [f"  {r['structure']}: argmax {r['dice_argmax']:.4f}, RankSEG {r['dice_rankseg']:.4f}, calibrated "
            f"RankSEG {r['dice_calibrated']:.4f}, E[Dice] MAE {r['expected_dice_mae_before']:.4f} -> "
            f"{r['expected_dice_mae_after']:.4f}: {r['recommend']}" for r in report]
    return "\n".join([head, *rows])
