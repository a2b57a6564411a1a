"""Command line: ``rankseg-monai predict | evaluate | merge-reports | calibrate | nnunet-predict | demo`` (see
``docs/cli.md``; ``nnunet-predict`` lives in :mod:`rankseg_monai.app.nnunet`, ``docs/nnunet.md``).

Exit codes: 0 success; 1 some case failed (the others were still done); 2 usage error or unusable output folder
(nothing was done, or, when the final report cannot be written, nothing was kept); 130 interrupted.

Layout, so that options and per-case outputs are added in one place each:

* :func:`build_parser` and ``_add_*_options``: the options;
* :func:`decision_options` (the validated ``RankSEGOptions``) and :func:`run_settings` (every setting that makes a
  mask or report what it is, recorded beside each mask and report and compared on resume);
* :func:`_open_outdir`: output-folder checks, the folder lock, stale temporaries;
* :func:`_predict_case` / :func:`_write_case` (``predict``) and :func:`_evaluate_case` / :func:`_write_report`
  (``evaluate``, ``merge-reports``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._files import clean_temporaries, commit, discard, sha256_file, stage
from ..options import RankSEGOptions, parse_pruning_prob, smallest_label_dtype, supported_solvers
from ..solvers.pruning import AUTO_MODES
from . import io as rio
from . import provenance as prov
from .decide import activate_case, decide, estimate, structure_names
from .runlock import FolderRuns, RunConflict, is_claim

__all__ = ["main", "build_parser", "decision_options", "run_settings", "select_part", "UsageError",
           "LEGACY_SETTINGS_FILE", "REPORT_FILE"]

#: settings file of versions before per-mask records; a folder holding it is recognised, its masks are redone
LEGACY_SETTINGS_FILE = "rankseg_predict.json"
#: what ``evaluate`` records beside its report (settings, version, cases, files and their SHA-256)
REPORT_FILE = "evaluation.json"
REPORT_KIND = "rankseg-monai evaluation"
SOLVER_CHOICES = ("rma", "ba", "trna", "ba+trna", "exact")
#: choices of evaluate, spelled here so that the parser does not import MONAI (metrics.NSD_STYLES,
#: metrics.LESION_STYLES, evaluation.AGGREGATIONS; a test keeps them equal)
NSD_STYLES = ("subvoxel", "edge")
LESION_STYLES = ("plain", "brats2023")
AGGREGATIONS = ("default", "nnunet")


class UsageError(Exception):
    """Bad arguments or folders: reported before any case is processed (exit code 2)."""


# ------------------------------------------------------------------------------------------------- parser


def _pruning_arg(text: str) -> float | str:
    try:
        return parse_pruning_prob(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(_cli_spelling(str(err))) from None


def _add_decision_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decision (RankSEG) options")
    g.add_argument("--metric", choices=("dice", "iou"), default="dice", type=str.lower,
                   help="metric to optimise (default: dice)")
    g.add_argument("--solver", choices=SOLVER_CHOICES, default="rma", type=str.lower,
                   help="rma (default), or for --metric dice with --output-mode multilabel: ba, trna, ba+trna, exact")
    g.add_argument("--output-mode", choices=("multiclass", "multilabel"), default=None, type=str.lower,
                   help="multiclass: one label map (default for C > 1, except with --sigmoid); multilabel: one mask "
                        "per class, written as a 4D (X, Y, Z, C) volume (the default with --sigmoid). A "
                        "single-channel input is a foreground probability and gives a 0/1 mask")
    act = g.add_mutually_exclusive_group()
    act.add_argument("--softmax", action="store_true", help="the files hold logits: apply softmax over classes")
    act.add_argument("--sigmoid", action="store_true",
                     help="the files hold logits: apply a sigmoid per class (independent classes: multilabel)")
    g.add_argument("--force-activation", action="store_true",
                   help="apply --softmax/--sigmoid even to files whose values already look like probabilities "
                        "(all in [0, 1]); without it such files are refused")
    g.add_argument("--clamp", action="store_true",
                   help="clip values up to 0.01 outside [0, 1] (float rounding, spline interpolation) to [0, 1]")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where RankSEG computes (default: cpu)")
    g.add_argument("--pruning-prob", type=_pruning_arg, default="auto",
                   help=f"{', '.join(AUTO_MODES)} ('auto' is the default: keep a class when its best mask beats the "
                        "empty mask's expected Dice; -independent/-correlated choose the model of the voxels), or a "
                        "number p in [0, 1]: keep a class only if its maximum probability exceeds p (rankseg 0.0.8: "
                        "0.5); 0 disables pruning")
    g.add_argument("--smooth", type=float, default=0.0, help="smoothing constant of the metric (default 0)")
    ch = g.add_mutually_exclusive_group()
    ch.add_argument("--channels-last", dest="channels_last", action="store_const", const=True, default=None,
                    help="4D NIfTI files are (X, Y, Z, C) (guessed only when exactly one reading fits)")
    ch.add_argument("--channels-first", dest="channels_last", action="store_const", const=False,
                    help="4D NIfTI files are (C, X, Y, Z)")
    g.add_argument("--sum-tolerance", type=float, default=1e-2,
                   help="multiclass: largest accepted |sum over classes - 1| per voxel (default 0.01)")
    r = p.add_argument_group("regions (decide on what LiTS/KiTS/BraTS score; docs/regions.md)")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--regions", type=_json_arg, default=None, metavar="JSON",
                     help='nested regions in nnU-Net\'s dataset.json form, e.g. \'{"liver": [1, 2], "tumour": [2]}\' '
                          "or '[[1, 2], [2]]': one label map whose regions maximise the summed expected Dice")
    src.add_argument("--dataset-json", default=None, metavar="PATH",
                     help="nnU-Net's dataset.json: class names from its labels and, for a region-based dataset "
                          "(a label entry is a list), its regions and regions_class_order, the files then holding "
                          "one sigmoid probability per region (nnU-Net's --save_probabilities of region models)")
    r.add_argument("--regions-class-order", type=int, nargs="+", default=None, metavar="LABEL",
                   help="the label painted for each region (nnU-Net's regions_class_order), with --regions")
    r.add_argument("--region-probs", action="store_true",
                   help="with --regions: the channels are region probabilities (one sigmoid per region, in the order "
                        "of the regions) rather than class probabilities")


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (rankseg-monai calibrate; docs/calibration.md)")
    g.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration.json of rankseg-monai calibrate: calibrate the probabilities before RankSEG, keep "
                        "argmax for the classes its held-out report recommends it for, and flag cases outside its "
                        "fingerprint")
    g.add_argument("--ignore-recommendation", action="store_true",
                   help="with --calibration: decide every class with RankSEG, also those the report recommends "
                        "argmax for")


def _json_arg(text: str) -> Any:
    try:
        value = json.loads(text)
        if not isinstance(value, dict | list):
            raise argparse.ArgumentTypeError(f"{text.strip()} is not a set of regions; give e.g. "
                                             "'{\"liver\": [1, 2], \"tumour\": [2]}' or '[[1, 2], [2]]'")
        return value
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}); e.g. '{{\"liver\": [1, 2], \"tumour\": [2]}}'") from None
    except RecursionError:
        raise argparse.ArgumentTypeError("nested too deeply; regions are e.g. '{\"liver\": [1, 2], \"tumour\": [2]}'"
                                         ) from None


def _add_part_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out (as nnU-Net's nnUNetv2_predict)")
    g.add_argument("--part-id", type=int, default=0, metavar="K",
                   help="do part K (0 <= K < N) of the cases sorted by name: cases K, K+N, K+2N, ...")
    g.add_argument("--num-parts", type=int, default=1, metavar="N", help="split the cases into N parts (default 1)")


def _add_postfix_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--postfix", default=rio.SAVEIMAGE_POSTFIX, metavar="POSTFIX",
                   help="MONAI SaveImage's output_postfix, dropped from case names: case_000_POSTFIX.nii.gz is case "
                        f"case_000 (default: '{rio.SAVEIMAGE_POSTFIX}', SaveImage's default; '' keeps every name). "
                        "Case folders as SaveImage writes them (case_000/case_000_prob.nii.gz) are found and "
                        "named after the folder whatever the postfix")


def build_parser(demo_module: Any = None, calibrate_module: Any = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankseg-monai",
        description="RankSEG decisions (Dice/IoU-optimal masks) from probability volumes on disk.")
    parser.add_argument("--version", action="version", version=f"rankseg-monai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pred = sub.add_parser("predict", help="probability volumes -> RankSEG masks",
                          description="Write one RankSEG mask per case, named after the case, into OUTDIR, each with "
                                      "a record of its settings, inputs and version (<mask>.rankseg.json). Cases "
                                      "whose mask matches its record, the settings and the inputs are skipped "
                                      "(resumable); --overwrite redoes them.")
    pred.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="probability files (.nii.gz, .nii, .mha, .mhd, .nrrd, nnU-Net .npz + .pkl) or folders")
    pred.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    pred.add_argument("--format", choices=rio.OUTPUT_FORMATS, default=None,
                      help="mask file format (default: the input's own; mha for .mhd, nrrd for .nhdr, nii.gz for "
                           "nnU-Net .npz)")
    pred.add_argument("--overwrite", action="store_true",
                      help="redo every case, also those already done, and replace masks made with other settings")
    pred.add_argument("--quiet", action="store_true", help="no progress bar")
    pred.add_argument("--flag-below", type=float, default=None, metavar="DICE",
                      help="list the cases whose expected Dice (the model's own label-free estimate, in "
                           "expected_dice.csv) of some class or region is below DICE: a review list")
    _add_postfix_option(pred)
    _add_decision_options(pred)
    _add_calibration_options(pred)
    _add_part_options(pred)

    ev = sub.add_parser("evaluate", help="per-case Dice/HD95 of argmax vs RankSEG, summary, CSV and plot",
                        description="Compare argmax and RankSEG decisions (--probs) or score existing masks "
                                    "(--pred) against labels; writes per_case.csv, summary.csv, differences.png "
                                    "(differences are RankSEG minus argmax), expected.png (the label-free expected "
                                    "Dice against the actual one) and evaluation.json, and prints a summary table.")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--probs", metavar="DIR", help="folder of probability volumes (argmax vs RankSEG)")
    src.add_argument("--pred", metavar="DIR", help="folder of label-map masks to score as they are")
    ev.add_argument("--labels", required=True, metavar="DIR", help="folder of ground-truth label maps")
    ev.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the CSV files and plot")
    ev.add_argument("--classes", type=int, nargs="+", default=None,
                    help="label values to score (default: every foreground class)")
    ev.add_argument("--class-names", nargs="+", default=None, metavar="NAME",
                    help="names of the label values 0, 1, 2, ... in order (background first), for the table and CSVs")
    ev.add_argument("--nsd-tolerance", type=float, default=2.0, metavar="MM",
                    help="tolerance of the normalised surface Dice in mm (default 2; 0 leaves NSD out)")
    ev.add_argument("--nsd-style", choices=NSD_STYLES, default="subvoxel",
                    help="subvoxel (default): the published NSD (DeepMind surface-distance, MONAI use_subvoxels=True); "
                         "edge: MONAI's default over edge voxels (column nsd_edge_<method>)")
    ev.add_argument("--aggregation", choices=AGGREGATIONS, default="default",
                    help="default: a structure empty in both masks scores Dice 1, NSD 1, lesion-wise Dice 1; nnunet: "
                         "NaN there and means over the other cases, the 'all' row the mean of the class means "
                         "(nnUNetv2_evaluate_folder's summary)")
    ev.add_argument("--lesion-wise", nargs="+", default=None, metavar="NAME",
                    help="score these classes (label values) or regions (names) lesion-wise as well: found, missed "
                         "and false-positive lesions, lesion-wise Dice (default: with regions, those inside another "
                         "region)")
    ev.add_argument("--lesion-wise-style", choices=LESION_STYLES, default="plain",
                    help="plain (default): connected components as they are; brats2023: the BraTS 2023 evaluation "
                         "(truth dilated --lesion-dilation times to merge nearby lesions, lesions of at most "
                         "--lesion-min-size mm^3 not scored)")
    ev.add_argument("--lesion-min-size", type=float, default=None, metavar="SIZE",
                    help="plain: ignore components smaller than SIZE voxels (default 0); brats2023: leave out true "
                         "lesions of at most SIZE mm^3 (default 50)")
    ev.add_argument("--lesion-dilation", type=int, default=None, metavar="N",
                    help="brats2023: dilation iterations of the truth (default 3; BraTS-MEN and -MET use 1)")
    ev.add_argument("--ignore-empty", action="store_true",
                    help="Dice is NaN (not 1 or 0) for classes absent from the labels (MONAI's default)")
    ev.add_argument("--skip-failed", action="store_true",
                    help="write the reports for the cases that worked even if others failed (exit code still 1)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_postfix_option(ev)
    _add_decision_options(ev)
    _add_calibration_options(ev)
    _add_part_options(ev)

    merge = sub.add_parser("merge-reports", help="merge the parts of evaluate --part-id/--num-parts into one report",
                           description="Read the part reports that evaluate --part-id K --num-parts N wrote into DIR "
                                       "(per_case.part-K-of-N.csv + evaluation.part-K-of-N.json), check that every "
                                       "part is there, made with the same settings and unchanged, and write "
                                       "per_case.csv, summary.csv, differences.png, expected.png and evaluation.json "
                                       "(the files one evaluate run over every case writes).")
    merge.add_argument("folder", metavar="DIR", help="the -o folder of the evaluate parts")
    merge.add_argument("-o", "--output", default=None, metavar="OUTDIR",
                       help="where to write the report (default: DIR)")

    cal = sub.add_parser("calibrate", help="fit calibration.json on labelled validation folds, with a held-out report",
                         description="Fit a temperature (or vector scaling) on validation probabilities and their "
                                     "labels (nnU-Net's fold_K/validation folders and gt_segmentations), score "
                                     "argmax, RankSEG and calibrated RankSEG on held-out folds, and write "
                                     "calibration.json, report.md, report.csv and reliability plots into OUTDIR.")
    if calibrate_module is not None:
        calibrate_module.add_arguments(cal)

    _add_calibration_options(_load_nnunet().add_arguments(sub, _add_decision_options, _add_part_options))

    demo = sub.add_parser("demo", help="argmax vs RankSEG on synthetic CT phantoms with the shipped model",
                          description="End-to-end demonstration on embedded data (no download): seeded CT-like "
                                      "phantoms, the shipped 3D UNet, sliding-window inference, argmax vs RankSEG "
                                      "(Dice and IoU); prints a per-class table and writes a CSV and a figure.")
    if demo_module is not None:
        demo_module.add_arguments(demo)
    return parser


# ---------------------------------------------------------------------------------------------- settings

_OPTION_FLAGS = {"output_mode": "--output-mode", "pruning_prob": "--pruning-prob", "smooth": "--smooth",
                 "metric": "--metric", "solver": "--solver", "device": "--device", "softmax": "--softmax",
                 "sigmoid": "--sigmoid", "clamp": "--clamp"}


def _cli_spelling(message: str) -> str:
    """A ``RankSEGOptions`` message in the command line's own words (``output_mode='x'`` -> ``--output-mode x``)."""
    for name, flag in _OPTION_FLAGS.items():
        message = re.sub(rf"(?<![\w-]){name}=('?)([^',;)\s]*)\1", lambda m, f=flag: f"{f} {m.group(2)}", message)
        message = re.sub(rf"^{name}\b", flag, message)
    return re.sub(r"'(RMA|BA\+TRNA|BA|TRNA)'", lambda m: m.group(1).lower(), message)


def _output_mode(args: argparse.Namespace) -> str:
    if args.output_mode is not None:
        return args.output_mode
    return "multilabel" if args.sigmoid else "multiclass"


def decision_options(args: argparse.Namespace) -> RankSEGOptions:
    """Every decision option of the command line, validated once before any case runs; a :class:`UsageError`
    (exit 2) in the command line's own spelling otherwise."""
    for flag, value in (("--sum-tolerance", args.sum_tolerance), ("--smooth", args.smooth)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
    mode = _output_mode(args)
    if args.sigmoid and mode == "multiclass":
        raise UsageError("--sigmoid gives independent per-class probabilities, not a label map: drop --output-mode "
                         "multiclass (--sigmoid writes one mask per class), or use --softmax for a label map")
    allowed = supported_solvers(args.metric, mode)
    if args.solver not in allowed:
        extra = (" (ba, trna, ba+trna and exact need --metric dice --output-mode multilabel)"
                 if args.solver != "rma" else "")
        raise UsageError(f"--solver {args.solver} does not work with --metric {args.metric} --output-mode {mode}; "
                         f"use --solver {' or '.join(allowed)}{extra}")
    if args.force_activation and not (args.softmax or args.sigmoid):
        raise UsageError("--force-activation only applies with --softmax or --sigmoid")
    regions, order, region_probs = _region_settings(args)
    if regions is not None and args.output_mode is None:
        mode = "multiclass"  # a label map, as nnU-Net writes for region models, also from sigmoids
    if regions is not None and args.sigmoid and not region_probs:
        raise UsageError("--sigmoid with --regions: regions on class probabilities take a softmax over the classes "
                         "(--softmax); for one sigmoid logit per region add --region-probs")
    if regions is not None and args.command == "evaluate":
        if args.classes is not None:
            raise UsageError("--classes picks label values; with --regions (or a region --dataset-json) every region "
                             "is scored: drop --classes")
        if mode == "multilabel":
            raise UsageError("evaluate compares label maps: drop --output-mode multilabel (the regions of the label "
                             "map are scored)")
    calibration = _calibration(args)
    try:
        options = RankSEGOptions(metric=args.metric, solver=args.solver, output_mode=mode, smooth=args.smooth,
                                 pruning_prob=args.pruning_prob, softmax=args.softmax, sigmoid=args.sigmoid,
                                 clamp=args.clamp, device=args.device, regions=regions, regions_class_order=order,
                                 region_probs=region_probs, calibration=calibration)
    except (TypeError, ValueError) as exc:
        prefix = f"--calibration {args.calibration}: " if calibration is not None and "calibrat" in str(exc) else ""
        raise UsageError(prefix + _cli_spelling(_region_spelling(str(exc)))) from None
    tree = options.regions
    if tree is not None and region_probs and mode == "multiclass" and any(v is None for v in tree.label_of_node()):
        several = [n for n, own in zip(tree.names, tree.own) if len(own) > 1]
        raise UsageError(f"regions {several} have several labels of their own: give --regions-class-order (the label "
                         "painted for each region) to write a label map from region probabilities")
    return options


def _region_spelling(message: str) -> str:
    """A region message in the command line's words."""
    return message.replace("regions_class_order", "--regions-class-order").replace("region_probs=True",
                                                                                 "--region-probs")


def _calibration(args: argparse.Namespace) -> Any:
    """The --calibration file, loaded and validated (``None`` without it); --ignore-recommendation drops its
    per-class argmax recommendation."""
    path = getattr(args, "calibration", None)
    if path is None:
        if getattr(args, "ignore_recommendation", False):
            raise UsageError("--ignore-recommendation only applies with --calibration")
        return None
    from ..calibrator import load_calibration

    try:
        cal = load_calibration(path)
    except ValueError as exc:
        raise UsageError(f"--calibration {exc}") from None
    return cal.without_recommendation() if args.ignore_recommendation else cal


def _dataset(args: argparse.Namespace) -> rio.DatasetJson | None:
    if getattr(args, "dataset_json", None) is None:
        return None
    try:
        return rio.read_dataset_json(args.dataset_json)
    except rio.VolumeError as exc:
        raise UsageError(f"--dataset-json {exc}") from None


def _region_settings(args: argparse.Namespace) -> tuple[Any, Any, bool]:
    """``(regions, regions_class_order, region_probs)`` from --regions / --dataset-json."""
    dataset = _dataset(args)
    if dataset is not None:
        if args.regions_class_order is not None or args.region_probs:
            raise UsageError("--dataset-json gives the regions, their order and the kind of probabilities itself: drop "
                             "--regions-class-order / --region-probs")
        if not dataset.region_based:
            return None, None, False
        return dataset.regions, dataset.regions_class_order, True
    if args.regions is None and (args.regions_class_order is not None or args.region_probs):
        raise UsageError("--regions-class-order and --region-probs need --regions (or --dataset-json)")
    return args.regions, args.regions_class_order, bool(args.region_probs)


def run_settings(args: argparse.Namespace, options: RankSEGOptions | None) -> dict[str, Any]:
    """Everything that makes a mask (``predict``) or a report (``evaluate``) what it is: recorded beside it and
    compared on resume / merge.  The one place to add a setting."""
    settings: dict[str, Any] = {"command": args.command}
    if options is not None:
        settings["options"] = options.to_dict()
        settings["channels_last"] = args.channels_last
        if options.regions is not None:  # the channels map to the regions in this order (settings compare sorted)
            settings["region_order"] = list(options.regions.names)
        if getattr(args, "calibration", None) is not None:
            settings["calibration"] = {"sha256": sha256_file(args.calibration),
                                       "ignore_recommendation": bool(args.ignore_recommendation)}
    if args.command == "evaluate":
        settings.update(source="probs" if args.probs else "pred", classes=args.classes,
                        ignore_empty=args.ignore_empty, class_names=args.class_names,
                        nsd_tolerance=args.nsd_tolerance or None, lesion_wise=args.lesion_wise,
                        nsd_style=args.nsd_style, aggregation=args.aggregation,
                        lesion_wise_style=args.lesion_wise_style, lesion_min_size=args.lesion_min_size,
                        lesion_dilation=args.lesion_dilation, ignore_label=_ignore_label(args))
    return settings


def _settings_key(settings: Mapping[str, Any]) -> str:
    text = json.dumps({"settings": settings, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _ignore_label(args: argparse.Namespace) -> int | None:
    """nnU-Net's ignore label from --dataset-json (its voxels count in no metric)."""
    dataset = _dataset(args)
    return None if dataset is None else dataset.ignore_label


def _names_from_dataset(args: argparse.Namespace) -> None:
    """--class-names from --dataset-json's labels when not given (label value order, gaps named by value)."""
    dataset = _dataset(args)
    if dataset is None or getattr(args, "class_names", None) is not None or not dataset.class_names:
        return
    top = max(dataset.class_names)
    args.class_names = [dataset.class_names.get(v, str(v)) for v in range(top + 1)]


def _check_class_names(args: argparse.Namespace, options: RankSEGOptions, num_classes: int, path: Path) -> None:
    """--class-names names every label value 0..C-1 of class probabilities, no more, no fewer (a settings mistake:
    the first case stops the run with a usage error)."""
    names = getattr(args, "class_names", None)
    if names is None or options.region_probs or len(names) == num_classes:
        return
    raise rio.SettingsError(f"{path}: --class-names gives {len(names)} names ({' '.join(names)}) for "
                            f"{num_classes} classes (label values 0..{num_classes - 1}, background first); give "
                            "one name per class")


def _class_names(names: Sequence[str] | None) -> dict[int, str] | None:
    return {i: n for i, n in enumerate(names)} if names else None


def select_part(cases: Sequence[Path], part_id: int, num_parts: int, names: Mapping[Path, str] | None = None
                ) -> list[Path]:
    """Part ``part_id`` of ``num_parts`` of the cases sorted by case name: cases ``K, K+N, K+2N, ...`` (as
    ``nnUNetv2_predict -part_id K -num_parts N``), the same split on every machine.

    >>> select_part([Path("c.nii.gz"), Path("a.nii.gz"), Path("b.nii.gz")], 0, 2)
    [PosixPath('a.nii.gz'), PosixPath('c.nii.gz')]
    """
    if num_parts < 1:
        raise UsageError(f"--num-parts must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise UsageError(f"--part-id must lie in [0, {num_parts}) for --num-parts {num_parts}, got {part_id}")
    if num_parts == 1:
        return list(cases)
    return sorted(cases, key=names.__getitem__ if names else rio.case_name)[part_id::num_parts]


# ------------------------------------------------------------------------------------------------ helpers


def _err(msg: str) -> None:
    print(f"rankseg-monai: error: {msg}", file=sys.stderr)


def _progress(items: Sequence[Any], args: argparse.Namespace, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="case", disable=True if args.quiet else None, file=sys.stderr)


def _report(bar: Any, msg: str) -> None:
    if hasattr(bar, "write"):
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def _default_format(path: Path) -> str:
    name = path.name.lower()
    for ext, fmt in ((".nii.gz", "nii.gz"), (".nii", "nii"), (".mha", "mha"), (".mhd", "mha"), (".nrrd", "nrrd"),
                     (".nhdr", "nrrd")):
        if name.endswith(ext):
            return fmt
    return "nii.gz"


def _inputs_of(path: Path) -> list[Path]:
    """The files read for one case: the input and its existing companions (``.pkl``, ``.raw``)."""
    return [path, *(p for p in rio.companion_files(path) if p.is_file())]


def _protected(cases: Sequence[Path]) -> list[Path]:
    out = []
    for path in cases:
        out.append(path)
        out.extend(rio.companion_files(path))
    return out


def _check_outdir(outdir: Path, input_dirs: Sequence[Path], inputs: Sequence[Path]) -> None:
    """Refuse (before any work) an output folder that is a file, an input folder or holds an input file."""
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir}: exists and is not a folder; choose another -o")
    for parent in outdir.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"-o {outdir}: {parent} is a file, not a folder; choose another -o")
    resolved = outdir.resolve()
    for item in input_dirs:
        if item.resolve() == resolved:
            raise UsageError(f"-o {outdir} is an input folder; write to another folder (inputs are never written)")
    for path in inputs:
        if path.resolve().parent == resolved:
            raise UsageError(f"-o {outdir} holds the input {path}; write to another folder (inputs are never "
                             "written)")


def _remove_if_empty(outdir: Path, created: bool) -> None:
    """Remove the output folder when this run created it and wrote nothing there (nothing done, nothing left)."""
    if created:
        try:
            outdir.rmdir()
        except OSError:
            pass


def _open_outdir(outdir: Path, settings: Mapping[str, Any], command: str) -> FolderRuns:
    """Create the output folder, register this run in it (refused when a run with other settings is writing
    there) and remove the temporaries that killed runs left; a :class:`UsageError` when the folder is unusable."""
    description = {"command": f"rankseg-monai {command}", "settings": settings, "version": __version__}
    runs = FolderRuns(outdir, _settings_key(settings), description,
                      warn=lambda msg: print(f"rankseg-monai: warning: {msg}", file=sys.stderr))
    try:
        runs.open()
    except RunConflict as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write into -o {outdir}: {exc.strerror or exc}; choose another -o or fix its "
                         "permissions") from None
    try:
        if runs.alone or not runs.locked:  # alone: every temporary there is stale; no locks: only older ones
            removed = clean_temporaries(outdir, older_than=None if runs.alone else time.time(),
                                        extra=is_claim if runs.alone else None)
            if removed:
                print(f"removed {len(removed)} stale temporary file(s) of an interrupted run from {outdir}",
                      file=sys.stderr)
    except OSError as exc:
        runs.close()
        raise UsageError(f"cannot clean -o {outdir}: {exc}") from None
    return runs


# ---------------------------------------------------------------------------------------------- one case


def _prepare(volume: rio.ProbabilityVolume, args: argparse.Namespace, options: RankSEGOptions) -> np.ndarray:
    """Activation and value checks for one case."""
    probs = volume.probabilities
    where = str(volume.path)
    if options.activation is not None:
        if not np.all(np.isfinite(probs)):
            raise rio.VolumeError(f"{where}: logits contain NaN or inf; check the model export")
        if options.softmax and probs.shape[0] == 1:
            raise rio.VolumeError(f"{where}: --softmax over a single channel gives 1 everywhere; use --sigmoid")
        if not args.force_activation:
            rio.check_logits(probs, where=where, activation=options.activation, sum_tolerance=args.sum_tolerance)
        probs = activate_case(probs, options)
    if options.clamp:
        probs = rio.clip_overshoot(probs, where=where)
    mode = "multilabel" if options.region_probs else options.output_mode  # region probabilities need not sum to 1
    rio.validate_probabilities(probs, where=where, output_mode=mode, sum_tolerance=args.sum_tolerance)
    return probs


def _find(inputs: Sequence[str | Path], args: argparse.Namespace, extensions: Sequence[str]) -> dict[Path, str]:
    """The input files and their case names (MONAI SaveImage's case folders and --postfix read,
    :func:`rankseg_monai.app.io.case_names`), in the order found."""
    return rio.case_names(rio.find_cases(inputs, extensions, postfix=args.postfix), args.postfix)


def _stop_if_settings(exc: Exception, done: int) -> None:
    """A mistake in the command's settings (:class:`rankseg_monai.app.io.SettingsError`: logits without --softmax,
    --softmax on probabilities, the class axis not named) found on the first case becomes one usage error (exit 2)
    instead of one identical failure per case; on a later case it is that case's failure (its file differs)."""
    if done == 0 and isinstance(exc, rio.SettingsError):
        raise UsageError(f"{exc} (stopped at the first case: these settings would fail every case; nothing was "
                         "written)") from None


def _load(path: Path, args: argparse.Namespace, spatial_shape: Sequence[int] | None = None,
          case: str | None = None) -> rio.ProbabilityVolume:
    volume = rio.load_probabilities(path, channels_last=args.channels_last, spatial_shape=spatial_shape,
                                    sum_tolerance=args.sum_tolerance)
    if case is not None:
        volume.case = case
    return volume


# ---------------------------------------------------------------------------------------------- predict


@dataclass
class _PredictRun:
    args: argparse.Namespace
    options: RankSEGOptions
    settings: dict[str, Any]
    outdir: Path
    protected: list[Path]
    runs: FolderRuns
    counts: dict[str, int] = field(default_factory=lambda: {"written": 0, "skipped": 0, "elsewhere": 0})
    failed: list[str] = field(default_factory=list)


def _narrowest(num_classes: int, options: RankSEGOptions) -> Any:
    """The narrowest integer dtype of a label map of ``num_classes`` classes (what the mask file holds anyway)."""
    return smallest_label_dtype(*options.label_bounds(max(num_classes, 2)))


def _survey(run: _PredictRun, targets: Sequence[Path]) -> None:
    """Refuse (unless --overwrite) a folder holding masks made with other settings or masks without a record; refuse
    always a mask or record path that is not a file (nothing could be written there)."""
    for target in targets:
        for path in (target, prov.record_path(target)):
            if path.exists() and not path.is_file():
                raise UsageError(f"{path} is a folder (or not a file): no mask or record can be written there; move "
                                 "it away or choose another -o")
    other, foreign = [], []
    for rec in sorted(run.outdir.glob("*" + prov.RECORD_SUFFIX)):
        mask = rec.with_name(rec.name[: -len(prov.RECORD_SUFFIX)])
        status = prov.case_status(mask, run.settings)
        if status.state == prov.OTHER_SETTINGS:
            other.append((mask, status.detail))
    for target in targets:
        status = prov.case_status(target, run.settings)
        if status.state == prov.FOREIGN:
            foreign.append((target, status.detail))
    outdir = run.outdir
    if run.args.overwrite:
        mine = {t.name for t in targets}
        kept = [m for m, _ in other if m.name not in mine]
        if kept:
            print(f"rankseg-monai: warning: {outdir} keeps {len(kept)} mask(s) of other cases made with other "
                  f"settings (e.g. {kept[0].name}); each has its record", file=sys.stderr)
        return
    if other:
        mask, detail = other[0]
        raise UsageError(f"{outdir} holds {len(other)} mask(s) made with other settings (e.g. {mask.name}: {detail}); "
                         "pass --overwrite to redo them, or choose another -o (a folder never mixes settings)")
    if foreign:
        mask, detail = foreign[0]
        legacy = " (and a settings file of an older rankseg-monai)" if (outdir / LEGACY_SETTINGS_FILE).exists() else ""
        raise UsageError(f"{outdir} holds {len(foreign)} file(s) named like the masks but without a valid record "
                         f"(e.g. {mask.name}: {detail}){legacy}: not written by this version of rankseg-monai "
                         "predict; pass --overwrite to replace them, or choose another -o")


def _write_case(run: _PredictRun, volume: rio.ProbabilityVolume, mask: np.ndarray, target: Path,
                inputs: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The one place a case is written: the mask (verified) and its record, together (``extra``: per-case results
    kept in the record, e.g. the expected Dice)."""
    return prov.write_mask(mask, volume.geometry, target, case=volume.case, inputs=inputs, settings=run.settings,
                           protected=run.protected, extra=extra)


EXPECTED_KEY = "expected_score"


def _case_estimates(probs: np.ndarray, mask: np.ndarray, options: RankSEGOptions) -> dict[str, Any]:
    """The record's label-free expected Dice (IoU for --metric iou) of RankSEG's mask and of argmax's, per class
    or region; with a calibration also whether the case lies outside its fingerprint (and why)."""
    names = structure_names(probs.shape[0], options)
    baseline = decide(probs, "argmax", options, label_dtype=_narrowest(probs.shape[0], options))
    expected = [float(v) for v in estimate(probs, mask, options)]
    out: dict[str, Any] = {EXPECTED_KEY: {"metric": options.metric, "structures": names, "rankseg": expected,
                                          "argmax": [float(v) for v in estimate(probs, baseline, options)]}}
    cal = options.calibration
    if cal is not None:
        from ..calibrator import fingerprint_of

        stats = fingerprint_of(probs, expected, options)
        out[CALIBRATION_KEY] = {"sha256": cal.sha256, "argmax_channels": list(cal.argmax_channels),
                                "fingerprint": stats, "outside": cal.outside(stats)}
    return out


CALIBRATION_KEY = "calibration"


def _calibrate_case(probs: np.ndarray, options: RankSEGOptions) -> np.ndarray:
    """The probabilities calibrated with ``options.calibration`` (unchanged without one)."""
    if options.calibration is None:
        return probs
    from ..calibrator import apply_calibration

    return apply_calibration(probs, options.calibration).numpy()


def _check_calibration(path: Path, args: argparse.Namespace, options: RankSEGOptions) -> None:
    """With --calibration: the first case's channels must match the calibration's (a usage error before any case)."""
    if options.calibration is None:
        return
    try:
        volume = _load(path, args)
    except rio.VolumeError:
        return  # that case fails on its own, with its reason
    try:
        options.check_classes(volume.probabilities.shape[0])
    except ValueError as exc:
        raise UsageError(f"--calibration {args.calibration}: {exc}") from None


def _expected_rows(targets: Sequence[Path], class_names: Mapping[int, str] | None, flag_below: float | None
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of ``expected_dice.csv`` (one per case and foreground class or region) from the masks' records, and the
    cases flagged for review."""
    rows, flagged = [], []
    for target in targets:
        try:
            record = prov.read_record(target)
        except prov.RecordError:  # an unreadable record: its case failed or is redone next time
            continue
        est = (record or {}).get(EXPECTED_KEY)
        if not est:
            continue
        outside = "; ".join(((record or {}).get(CALIBRATION_KEY) or {}).get("outside") or [])
        low = bool(outside)
        for k, name in enumerate(est["structures"]):
            if isinstance(name, int) and name == 0 and len(est["structures"]) > 1:
                continue  # the background of a label map
            row = {"case": record["case"], "structure": name}
            if class_names and isinstance(name, int):
                row["name"] = class_names.get(name, "")
            row[f"expected_{est['metric']}_rankseg"] = est["rankseg"][k]
            row[f"expected_{est['metric']}_argmax"] = est["argmax"][k]
            row["expected_gain"] = est["rankseg"][k] - est["argmax"][k]
            if CALIBRATION_KEY in record:
                row["outside_calibration"] = outside
            if flag_below is not None:
                row["review"] = int(est["rankseg"][k] < flag_below)
                low |= est["rankseg"][k] < flag_below
            rows.append(row)
        if low:
            flagged.append(record["case"])
    return rows, flagged


def _predict_case(run: _PredictRun, path: Path, case: str, target: Path, bar: Any) -> str:
    """Decide and write one case, or skip it; returns ``"written"``, ``"skipped"`` or ``"elsewhere"``."""
    with run.runs.claim(target.name) as mine:  # the mask file, format included: a run writing another format
        # of the same case into the folder writes its own file
        if not mine:
            return "elsewhere"
        inputs = prov.hash_inputs(_inputs_of(path))
        if not run.args.overwrite:
            status = prov.case_status(target, run.settings, inputs)
            if status.state == prov.DONE:
                return "skipped"
            if status.state in (prov.OTHER_SETTINGS, prov.FOREIGN):  # appeared since the survey
                raise rio.VolumeError(f"{target}: {status.detail or status.state}; pass --overwrite to replace it")
            if status.state != prov.ABSENT:
                _report(bar, f"redoing {case}: {status.detail}")
        volume = _load(path, run.args, case=case)
        probs = _calibrate_case(_prepare(volume, run.args, run.options), run.options)
        # the narrowest labels straight from the solver (uint8: 8x less than int64; the file takes the
        # narrowest type anyway)
        mask = decide(probs, "rankseg", run.options, label_dtype=_narrowest(probs.shape[0], run.options))
        extra = _case_estimates(probs, mask, run.options) if run.options.metric in ("dice", "iou") else None
        _write_case(run, volume, mask, target, inputs, extra)
        return "written"


def cmd_predict(args: argparse.Namespace) -> int:
    options = decision_options(args)
    _names_from_dataset(args)
    if args.flag_below is not None and not (math.isfinite(args.flag_below) and 0 <= args.flag_below <= 1):
        raise UsageError(f"--flag-below must be a Dice between 0 and 1, got {args.flag_below}")
    names = _find(args.inputs, args, rio.PROBABILITY_EXTENSIONS)
    cases = list(names)
    if not cases:
        raise UsageError(f"no probability files found in {', '.join(args.inputs)} (looked for "
                         f"{', '.join(rio.PROBABILITY_EXTENSIONS)})")
    outdir = Path(args.output)
    _check_outdir(outdir, [Path(i) for i in args.inputs if Path(i).is_dir()], cases)
    all_targets = [rio.mask_path(outdir, names[p], args.format or _default_format(p)) for p in cases]
    cases = select_part(cases, args.part_id, args.num_parts, names)
    targets = [rio.mask_path(outdir, names[p], args.format or _default_format(p)) for p in cases]
    if cases:
        _check_calibration(cases[0], args, options)
    settings = run_settings(args, options)
    created = not outdir.exists()
    try:
        runs = _open_outdir(outdir, settings, "predict")
    except UsageError:
        _remove_if_empty(outdir, created)
        raise
    try:
        with runs:
            run = _PredictRun(args, options, settings, outdir, _protected(cases), runs)
            _survey(run, targets)
            bar = _progress(list(zip(cases, targets)), args, "rankseg")
            for path, target in bar:
                try:
                    run.counts[_predict_case(run, path, names[path], target, bar)] += 1
                except Exception as exc:  # one bad case never stops the others (KeyboardInterrupt does)
                    _stop_if_settings(exc, done=sum(run.counts.values()) + len(run.failed))
                    run.failed.append(names[path])
                    _report(bar, f"FAILED {names[path]}: {type(exc).__name__}: {exc}")
    finally:
        _remove_if_empty(outdir, created)
    return _finish_predict(run, targets, all_targets)


def _finish_predict(run: _PredictRun, targets: Sequence[Path], all_targets: Sequence[Path] | None = None) -> int:
    """``expected_dice.csv``, the summary line and the exit code of a predict run (also ``nnunet-predict``);
    ``all_targets``: the masks of every part of a split run (the last part to finish writes the whole CSV)."""
    args = run.args
    _write_expected(run, targets)
    if all_targets is not None and args.num_parts > 1 and _all_done(all_targets, run.settings):
        _write_expected(run, all_targets, whole=True)
    c = run.counts
    part = f" (part {args.part_id} of {args.num_parts})" if args.num_parts > 1 else ""
    line = f"masks in {run.outdir}{part}: {c['written']} written, {c['skipped']} skipped (up to date), " \
           f"{len(run.failed)} failed"
    if c["elsewhere"]:
        line += f", {c['elsewhere']} left to another run writing them now"
    print(line, file=sys.stderr)
    if run.failed:
        print(f"failed (reasons above): {', '.join(run.failed)}", file=sys.stderr)
    return 1 if run.failed else 0


def _all_done(targets: Sequence[Path], settings: Mapping[str, Any]) -> bool:
    """Every mask is there with a record of these settings (the parts of a split run have all finished)."""
    for target in targets:
        try:
            record = prov.read_record(target)
        except prov.RecordError:
            return False
        if record is None or not target.is_file() or prov.settings_difference(record, settings):
            return False
    return True


def _write_expected(run: _PredictRun, targets: Sequence[Path], whole: bool = False) -> None:
    """``expected_dice[.part-K-of-N].csv`` beside the masks, rebuilt from their records (so resumed cases are
    in it too), and the review list of --flag-below; ``whole``: ``expected_dice.csv`` of every part's cases."""
    from .evaluation import write_rows

    args = run.args
    names = _class_names(getattr(args, "class_names", None))
    rows, flagged = _expected_rows(targets, names, args.flag_below)
    if not rows:
        return
    part = (args.part_id, args.num_parts) if args.num_parts > 1 and not whole else None
    path = run.outdir / f"expected_{run.options.metric}{_part_suffix(part)}.csv"
    try:
        write_rows(rows, path, protected=run.protected)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}; free space or fix the folder, then run the "
                         "same command again (finished masks are kept)") from None
    what = f"every part is done: all {len(targets)} cases" if whole else "per case and structure"
    print(f"wrote {path} (label-free expected {run.options.metric}, {what})", file=sys.stderr)
    why = [f"an expected {run.options.metric} below {args.flag_below:g}"] if args.flag_below is not None else []
    if run.options.calibration is not None:
        why.append("a fingerprint outside the calibration cases' (column outside_calibration)")
    if why:
        if flagged:
            print(f"review ({len(flagged)} case(s) with {' or '.join(why)}): {', '.join(flagged)}", file=sys.stderr)
        else:
            print(f"review: no case has {' or '.join(why)}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- evaluate


def _label_index(labels_dir: Path, args: argparse.Namespace) -> dict[str, Path]:
    if not labels_dir.is_dir():
        raise UsageError(f"--labels {labels_dir}: not a folder")
    return {case: p for p, case in _find([labels_dir], args, rio.LABEL_EXTENSIONS).items()}


def _evaluate_case(path: Path, case: str, labels: Mapping[str, Path], args: argparse.Namespace,
                   options: RankSEGOptions, classes: Sequence[int] | None) -> dict:
    from . import evaluation as ev

    if case not in labels:
        raise rio.VolumeError(f"case {case!r}: no label file in {args.labels} (expected {case}.nii.gz, .nii, .mha, "
                              ".mhd or .nrrd)")
    label = rio.load_labels(labels[case])
    nsd = args.nsd_tolerance or None
    lesions = None if args.lesion_wise is None else [int(v) if v.isdigit() else v for v in args.lesion_wise]
    scoring = {"nsd_style": args.nsd_style, "aggregation": args.aggregation, "lesion_style": args.lesion_wise_style,
               "lesion_min_size": args.lesion_min_size, "lesion_dilation": args.lesion_dilation}
    ignore = _ignore_label(args)
    if args.probs:
        volume = _load(path, args, spatial_shape=label.labels.shape, case=case)
        rio.check_same_grid(volume.geometry, label.geometry, case)
        probs = _prepare(volume, args, options)
        _check_class_names(args, options, probs.shape[0], path)
        plain = options.replace(calibration=None)
        result = ev.compare_case(probs, label.labels, volume.spacing, classes, case=case,
                                 ignore_empty=args.ignore_empty, options=plain, nsd_tolerance=nsd,
                                 lesion_structures=lesions, ignore_label=ignore, scoring=scoring)
        if options.calibration is not None:  # calibrated RankSEG beside argmax and RankSEG
            calibrated = ev.compare_case(_calibrate_case(probs, options), label.labels, volume.spacing, classes,
                                         case=case, methods=("rankseg",), ignore_empty=args.ignore_empty,
                                         options=options, nsd_tolerance=nsd, lesion_structures=lesions,
                                         ignore_label=ignore, scoring=scoring)
            result["methods"].append(CALIBRATED_METHOD)
            result["metrics"][CALIBRATED_METHOD] = calibrated["metrics"]["rankseg"]
        return result
    pred = rio.load_labels(path)
    rio.check_same_grid(pred.geometry, label.geometry, case)
    tree = options.regions
    structures = None if tree is None else {n: sorted(lab) for n, lab in zip(tree.names, tree.labels)}
    if tree is not None and lesions is None:
        lesions = [tree.names[r] for r in range(len(tree)) if tree.parent[r] >= 0]
    return ev.evaluate_masks({"pred": pred.labels}, label.labels, label.spacing,
                             classes if tree is None else (classes or list(tree.names)), case=case,
                             ignore_empty=args.ignore_empty, structures=structures, nsd_tolerance=nsd,
                             lesion_structures=lesions or (), ignore_label=ignore, **scoring)


CALIBRATED_METHOD = "rankseg_calibrated"


def _method_labels(settings: Mapping[str, Any]) -> dict[str, str]:
    """How the report shows its methods: the baseline ``argmax`` is ``p > 0.5`` per channel for independent (sigmoid,
    multilabel) or region probabilities (:func:`rankseg_monai.app.decide.decide`), shown as ``threshold 0.5``."""
    opts = settings.get("options") or {}
    if opts.get("region_probs") or opts.get("sigmoid") or opts.get("output_mode") == "multilabel":
        return {"argmax": "threshold 0.5"}
    return {}


def _part_suffix(part: tuple[int, int] | None) -> str:
    return "" if part is None else f".part-{part[0]}-of-{part[1]}"


#: the files of a whole report (a part's are per_case.part-K-of-N.csv and evaluation.part-K-of-N.json)
REPORT_FILES = ("per_case.csv", "summary.csv", "differences.png", "expected.png", REPORT_FILE)


def _write_report(outdir: Path, results: Sequence[dict], settings: Mapping[str, Any], *, methods: Sequence[str],
                  cases: Sequence[str], failed: Mapping[str, str], part: tuple[int, int] | None,
                  protected: Sequence[Path] = (), parts: Sequence[str] = (), extra: Mapping[str, Any] | None = None
                  ) -> list[Path]:
    """The one place an evaluation report is written: the per-case CSV and, for a whole report (not a part), the
    summary CSV, the table on standard output and the plot; then ``evaluation[.part-K-of-N].json`` with the settings,
    version, cases, failures, ``extra`` fields and the SHA-256 of every file written.

    A report is replaced whole or not at all: every file is first written to a hidden temporary beside its place
    (and read back); only when all are there is the old report's record removed, the files of the old report that
    the new one does not have removed, and the new files moved into place, the record last.  An ``OSError`` leaves
    the old report as it was and becomes a :class:`UsageError` (exit 2) naming the file."""
    from . import evaluation as ev

    names = _class_names(settings.get("class_names"))
    labels = _method_labels(settings)
    suffix = _part_suffix(part)
    record_name = f"{Path(REPORT_FILE).stem}{suffix}.json"
    staged: dict[str, Path] = {}
    current = outdir / f"per_case{suffix}.csv"

    def put(name: str, write: Any) -> None:
        nonlocal current
        current = outdir / name
        staged[name] = stage(current, lambda tmp: write(Path(tmp)))

    try:
        put(f"per_case{suffix}.csv", lambda tmp: ev.write_csv(results, tmp, protected=protected, class_names=names))
        if part is None:
            table = ev.summarize(results, aggregation=settings.get("aggregation") or "default")
            print(ev.format_table(table, class_names=names, method_labels=labels))
            put("summary.csv", lambda tmp: ev.write_summary_csv(table, tmp, protected=protected, class_names=names))
            if "argmax" in methods and "rankseg" in methods:
                put("differences.png", lambda tmp: ev.plot_differences(results, tmp, protected=protected,
                                                                       class_names=names, method_labels=labels))
            if "expected_dice" in results[0]["metrics"][methods[0]]:
                put("expected.png", lambda tmp: ev.plot_expected(results, tmp, protected=protected,
                                                                 class_names=names, method_labels=labels))
        record = {"record": REPORT_KIND, "version": __version__, "settings": dict(settings),
                  "part": list(part) if part else None, "methods": list(methods), "cases": list(cases),
                  "failed": dict(failed), "merged_from": list(parts), **dict(extra or {}),
                  "files": {name: sha256_file(tmp) for name, tmp in staged.items()},
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        text = json.dumps(record, indent=1) + "\n"
        put(record_name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        old = REPORT_FILES if part is None else (f"per_case{suffix}.csv", record_name)
        current = outdir / record_name
        (outdir / record_name).unlink(missing_ok=True)  # from here on no record vouches for the old files
        for name in old:
            if name not in staged:
                current = outdir / name
                (outdir / name).unlink(missing_ok=True)
        written = []
        for name in [*(n for n in staged if n != record_name), record_name]:
            current = outdir / name
            written.append(commit(staged.pop(name), outdir / name))
    except OSError as exc:
        raise UsageError(f"cannot write {current}: {exc.strerror or exc}; free space or fix the folder, then run "
                         "the same command again (an earlier report there is kept unless it was being replaced)"
                         ) from None
    finally:
        discard(*staged.values())
    return written


def cmd_evaluate(args: argparse.Namespace) -> int:
    options = decision_options(args)
    _names_from_dataset(args)
    if not (math.isfinite(args.nsd_tolerance) and args.nsd_tolerance >= 0):
        raise UsageError(f"--nsd-tolerance must be a finite number of mm >= 0 (0 leaves NSD out), got "
                         f"{args.nsd_tolerance}")
    _check_scoring(args, options)
    source = Path(args.probs or args.pred)
    if not source.is_dir():
        raise UsageError(f"{'--probs' if args.probs else '--pred'} {source}: not a folder")
    names = _find([source], args, rio.PROBABILITY_EXTENSIONS if args.probs else rio.LABEL_EXTENSIONS)
    cases = list(names)
    if not cases:
        raise UsageError(f"no files found in {source}")
    labels = _label_index(Path(args.labels), args)
    outdir = Path(args.output)
    _check_outdir(outdir, [source, Path(args.labels)], [*cases, *labels.values()])
    if options.calibration is not None:
        if args.pred:
            raise UsageError("--calibration applies to probabilities: use --probs (masks are scored as they are)")
        _check_calibration(sorted(cases, key=names.__getitem__)[0], args, options)
    if args.class_names is not None and len(set(args.class_names)) != len(args.class_names):
        raise UsageError("--class-names holds a name twice; give one name per label value 0, 1, 2, ...")
    if args.class_names is not None and not all(n.strip() for n in args.class_names):
        empty = [n.strip() for n in args.class_names].index("")
        raise UsageError(f"--class-names holds an empty name (label value {empty}); give one name per label value "
                         "0, 1, 2, ...")
    part = (args.part_id, args.num_parts) if args.num_parts > 1 else None
    if part and args.pred and args.classes is None:
        raise UsageError("--pred with --num-parts needs --classes (each part would otherwise score the classes found "
                         "in its own cases, and the parts could not be merged)")
    all_cases = cases = sorted(cases, key=names.__getitem__)  # the order of the rows, also of merged parts
    cases = select_part(cases, args.part_id, args.num_parts, names)
    protected = _protected(all_cases) + list(labels.values())
    settings = run_settings(args, options)
    created = not outdir.exists()
    try:
        return _evaluate_into(outdir, args, options, settings, {p: names[p] for p in cases}, labels, part,
                              protected, [names[p] for p in all_cases])
    finally:
        _remove_if_empty(outdir, created)


def _check_scoring(args: argparse.Namespace, options: RankSEGOptions) -> None:
    """The scoring options of evaluate, before any case."""
    if args.aggregation == "nnunet" and args.ignore_empty:
        raise UsageError("--ignore-empty and --aggregation nnunet both say how empty structures score: pick one "
                         "(nnunet: NaN only when both masks are empty)")
    size = args.lesion_min_size
    if size is not None and not (math.isfinite(size) and size >= 0):
        raise UsageError(f"--lesion-min-size must be a finite number >= 0, got {size}")
    if args.lesion_dilation is not None:
        if args.lesion_wise_style != "brats2023":
            raise UsageError("--lesion-dilation applies to --lesion-wise-style brats2023 only")
        if args.lesion_dilation < 0:
            raise UsageError(f"--lesion-dilation must be >= 0, got {args.lesion_dilation}")
    if args.lesion_wise is None:
        return
    tree = options.regions
    for name in args.lesion_wise:
        if tree is not None:
            if name not in tree.names:
                raise UsageError(f"--lesion-wise {name}: not one of the regions ({', '.join(tree.names)})")
        elif not name.isdigit() or int(name) < 1:
            raise UsageError(f"--lesion-wise {name}: name a foreground label value (1, 2, ...) to score, or give "
                             "--regions to score regions by name")
        elif args.classes is not None and int(name) not in args.classes:
            raise UsageError(f"--lesion-wise {name}: not among --classes {' '.join(map(str, args.classes))}")


def _evaluate_into(outdir: Path, args: argparse.Namespace, options: RankSEGOptions, settings: dict[str, Any],
                   cases: Mapping[Path, str], labels: Mapping[str, Path], part: tuple[int, int] | None,
                   protected: Sequence[Path], all_cases: Sequence[str] = ()) -> int:
    from . import evaluation as ev

    with _open_outdir(outdir, settings, "evaluate"):
        classes = args.classes
        ignore = _ignore_label(args)
        if args.pred and classes is None and options.regions is None:  # one class list for all: the values anywhere
            found: set[int] = set()
            for path in [*cases, *(labels[c] for c in cases.values() if c in labels)]:
                try:
                    found |= {int(v) for v in np.unique(rio.load_labels(path).labels) if v > 0 and v != ignore}
                except Exception:
                    pass  # reported with its case below
            classes = sorted(found) or [1]
        if args.pred and args.class_names is not None and options.regions is None:
            if max(classes) >= len(args.class_names):
                raise UsageError(f"--class-names gives {len(args.class_names)} names (label values 0.."
                                 f"{len(args.class_names) - 1}), but label value {max(classes)} is scored; give one "
                                 "name per label value 0, 1, 2, ...")
        results, failed = [], {}
        bar = _progress(list(cases), args, "evaluate")
        for path in bar:
            case = cases[path]
            try:
                results.append(_evaluate_case(path, case, labels, args, options, classes))
            except ev.ClassesError as exc:  # the same for every case: a usage error
                flag = (f"--classes {' '.join(map(str, classes or []))}" if exc.option == "classes" else
                        f"--lesion-wise {' '.join(args.lesion_wise or [])}")
                raise UsageError(f"{flag}: {exc}") from None
            except Exception as exc:  # one bad case never stops the others
                _stop_if_settings(exc, done=len(results) + len(failed))
                failed[case] = f"{type(exc).__name__}: {exc}"
                _report(bar, f"FAILED {case}: {failed[case]}")
        if failed and not args.skip_failed:
            _err(f"{len(failed)} of {len(cases)} cases failed ({', '.join(failed)}; reasons above); no report written "
                 "(fix them, or pass --skip-failed to report on the others)")
            return 1
        if not results:
            _err("no case could be evaluated; no report written")
            return 1
        methods = list(results[0]["methods"])
        extra = None
        if part:  # what a merge checks: the whole case list, where the inputs were and what they held
            done = {r["case"] for r in results}
            extra = {"all_cases": list(all_cases),
                     "sources": {"probs" if args.probs else "pred": str(Path(args.probs or args.pred).resolve()),
                                 "labels": str(Path(args.labels).resolve())},
                     "inputs": {case: prov.hash_inputs([*_inputs_of(p), labels[case]])
                                for p, case in cases.items() if case in done}}
        written = _write_report(outdir, results, settings, methods=methods, cases=[r["case"] for r in results],
                                failed=failed, part=part, protected=protected, extra=extra)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if part:
        print(f"part {part[0]} of {part[1]} done; when every part is done: rankseg-monai merge-reports {outdir}",
              file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------- merge-reports


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable ({exc}); run that part of evaluate again") from None
    if not isinstance(data, dict) or data.get("record") != REPORT_KIND:
        raise UsageError(f"{path}: not a report record of rankseg-monai evaluate")
    return data


def _part_record(path: Path) -> dict[str, Any]:
    """A part's record with the fields a merge reads checked (a malformed one: a :class:`UsageError` naming it)."""
    rec = _read_json(path)
    shapes = (("settings", dict), ("methods", list), ("files", dict), ("cases", list), ("failed", dict),
              ("all_cases", list), ("sources", dict), ("inputs", dict))
    for key, kind in shapes:
        value = rec.get(key)
        if not isinstance(value, kind) or (key == "methods" and not value):
            raise UsageError(f"{path}: malformed part record ({key} is {value!r}, expected a {kind.__name__}); it "
                             "was not written by this version of rankseg-monai evaluate, or it was edited: run that "
                             "part again")
    if not all(isinstance(m, str) for m in rec["methods"]) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in rec["files"].items()):
        raise UsageError(f"{path}: malformed part record (methods or files); run that part again")
    return rec


def _check_part_inputs(records: Sequence[Mapping[str, Any]], paths: Sequence[Path], n: int) -> None:
    """Every part was made over the same case list and input folders, holds its own share of the cases, and its
    inputs still hold what they held then (each input still there is hashed again)."""
    first = records[0]
    for k, rec in enumerate(records):
        if rec["all_cases"] != first["all_cases"]:
            gone = sorted(set(first["all_cases"]) ^ set(rec["all_cases"]))
            raise UsageError(f"part {k} of {n} ({paths[k].name}) was made over another case list than part 0 "
                             f"(differing: {', '.join(map(str, gone[:5]))}); run every part over the same folders")
        if rec["sources"] != first["sources"]:
            raise UsageError(f"part {k} of {n} ({paths[k].name}) was made from other input folders than part 0 "
                             f"({rec['sources']} vs {first['sources']}); run every part with the same inputs")
        share = sorted(first["all_cases"])[k::n]
        if sorted([*rec["cases"], *rec["failed"]]) != share:
            raise UsageError(f"part {k} of {n} ({paths[k].name}) holds cases {rec['cases']} (failed: "
                             f"{list(rec['failed'])}) but its share is {share}; run that part again")
        for case, entries in rec["inputs"].items():
            for entry in entries if isinstance(entries, list) else []:
                path = Path(str(entry.get("path", ""))) if isinstance(entry, dict) else None
                if path is not None and path.is_file() and sha256_file(path) != entry.get("sha256"):
                    raise UsageError(f"part {k} of {n} ({paths[k].name}): the input {path} of case {case!r} changed "
                                     "since that part ran (another model's output?); run that part again")


def cmd_merge_reports(args: argparse.Namespace) -> int:
    from . import evaluation as ev

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    pattern = re.compile(r"^evaluation\.part-(\d+)-of-(\d+)\.json$")
    found = {}
    for p in sorted(folder.iterdir()):
        m = pattern.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        raise UsageError(f"{folder} holds no evaluation.part-K-of-N.json; run evaluate --part-id K --num-parts N "
                         f"-o {folder} for every K first")
    totals = sorted({n for _, n in found})
    if len(totals) > 1:
        raise UsageError(f"{folder} holds parts of splits into {' and '.join(map(str, totals))} parts; keep one split")
    n = totals[0]
    missing = [k for k in range(n) if (k, n) not in found]
    if missing:
        ks = " and ".join(", ".join(map(str, missing)).rsplit(", ", 1))
        files = ", ".join(f"evaluation.part-{k}-of-{n}.json" for k in missing)
        raise UsageError(f"{'part' if len(missing) == 1 else 'parts'} {ks} of {n} "
                         f"{'is' if len(missing) == 1 else 'are'} missing in {folder} ({files}): run evaluate "
                         f"--part-id K --num-parts {n} -o {folder} for K = {ks}, then merge again")
    records = [_part_record(found[(k, n)]) for k in range(n)]
    first = records[0]
    for k, rec in enumerate(records):
        for key in ("settings", "version", "methods"):
            if json.dumps(rec.get(key), sort_keys=True) != json.dumps(first.get(key), sort_keys=True):
                raise UsageError(f"part {k} of {n} was made with other {key} than part 0 ({rec.get(key)!r} vs "
                                 f"{first.get(key)!r}); run every part with the same command")
    _check_part_inputs(records, [found[(k, n)] for k in range(n)], n)
    results, failed, seen = [], {}, {}
    methods = list(first["methods"])
    for k, rec in enumerate(records):
        csv_path = folder / f"per_case.part-{k}-of-{n}.csv"
        expected = (rec.get("files") or {}).get(csv_path.name)
        if not csv_path.is_file() or expected != sha256_file(csv_path):
            raise UsageError(f"{csv_path} is missing or does not match its record (changed or truncated); run part "
                             f"{k} of {n} again")
        part_results = ev.results_from_rows(ev.read_rows(csv_path), methods)
        for res in part_results:
            if res["case"] in seen:
                raise UsageError(f"case {res['case']!r} is in parts {seen[res['case']]} and {k}; run every part with "
                                 "the same inputs")
            seen[res["case"]] = k
        results.extend(part_results)
        failed.update(rec.get("failed") or {})
    results.sort(key=lambda r: r["case"])  # the order of one evaluate run over every case
    if not results:
        raise UsageError(f"the parts in {folder} hold no evaluated case")
    outdir = Path(args.output) if args.output else folder
    settings = first["settings"]
    with _open_outdir(outdir, {**settings, "merged": True}, "merge-reports"):
        written = _write_report(outdir, results, settings, methods=methods, cases=[r["case"] for r in results],
                                failed=failed, part=None, parts=[found[(k, n)].name for k in range(n)])
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if failed:
        print(f"{len(failed)} case(s) failed in the parts and are not in the report: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------- main


def _first_command(argv: Sequence[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
        if a in ("-h", "--help"):
            return None
    return None


def _load_demo() -> Any:
    import importlib

    try:
        module = importlib.import_module("rankseg_monai.app.demo")
    except ModuleNotFoundError as exc:
        if exc.name in ("rankseg_monai.app.demo",):
            raise UsageError("the demo is not available in this installation (rankseg_monai/app/demo.py is missing); "
                             "update rankseg-monai") from exc
        raise UsageError(f"the demo needs a module that is not installed: {exc.name} ({exc})") from exc
    for fn in ("add_arguments", "run"):
        if not callable(getattr(module, fn, None)):
            raise UsageError(f"rankseg_monai.app.demo has no {fn}() function; update rankseg-monai")
    return module


def _load_calibrate() -> Any:
    """``rankseg_monai.app.calibrate`` (it uses this module's helpers, so it is loaded here by name, as the demo)."""
    import importlib

    return importlib.import_module("rankseg_monai.app.calibrate")


def _load_nnunet() -> Any:
    """``rankseg_monai.app.nnunet``, loaded by name as the demo is: a command built on this module's parts (it imports
    this module; nnunetv2 itself only when the command runs)."""
    import importlib

    return importlib.import_module("rankseg_monai.app.nnunet")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        if not sys.warnoptions:  # MONAI's deprecation notices are not the user's to fix (-W still shows them)
            warnings.simplefilter("ignore", FutureWarning)
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        first = _first_command(argv)
        demo = _load_demo() if first == "demo" else None
        calibrate = _load_calibrate() if first == "calibrate" else None
        parser = build_parser(demo, calibrate)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return int(exc.code) if isinstance(exc.code, int) else 2
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "merge-reports":
            return cmd_merge_reports(args)
        if args.command == "calibrate":
            return int(calibrate.run(args))
        if args.command == "nnunet-predict":
            return int(_load_nnunet().cmd_nnunet_predict(args))
        return int(demo.run(args) or 0)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except rio.VolumeError as exc:  # raised before any case ran (e.g. finding the inputs)
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err(INTERRUPTED.get(_first_command(argv) or "", "interrupted"))
        return 130


#: what is true after Ctrl-C, per command
INTERRUPTED = {
    "predict": "interrupted; finished masks are complete (writes are atomic): run the same command again to do the "
               "rest (finished cases are skipped)",
    "evaluate": "interrupted before the report was complete; evaluate does not resume: run the same command again "
                "to evaluate every case anew (split long evaluations with --part-id/--num-parts: finished parts stay)",
    "merge-reports": "interrupted; nothing was merged (the parts are unchanged): run the same command again",
    "demo": "interrupted",
}


if __name__ == "__main__":  # pragma: no cover
    # run the package's module, not this __main__ copy: modules it imports (nnunet) raise its UsageError
    from rankseg_monai.app.cli import main as _package_main

    raise SystemExit(_package_main())
