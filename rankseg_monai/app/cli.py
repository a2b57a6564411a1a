"""Command line: ``rankseg-monai predict | evaluate | demo`` (see ``docs/cli.md``).

Exit codes: 0 success; 1 some case failed (the others were still done); 2 usage error (nothing was done).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..options import RankSEGOptions, parse_pruning_prob, smallest_label_dtype
from . import io as rio
from .decide import activate_case, decide

__all__ = ["main", "build_parser"]

SETTINGS_FILE = "rankseg_predict.json"
_CASE_ERRORS = (ValueError, TypeError, OSError, RuntimeError, MemoryError, KeyError, IndexError)


class UsageError(Exception):
    """Bad arguments or folders: reported before any case is processed (exit code 2)."""


# ------------------------------------------------------------------------------------------------- parser


def _add_decision_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decision (RankSEG) options")
    g.add_argument("--metric", choices=("dice", "iou"), default="dice", help="metric to optimise (default: dice)")
    g.add_argument("--solver", default="rma",
                   help="rma (default), or for Dice with --output-mode multilabel: ba, trna, ba+trna, exact")
    g.add_argument("--output-mode", choices=("multiclass", "multilabel"), default=None,
                   help="multiclass: one label map (default for C > 1); multilabel: one mask per class, written as "
                        "a 4D (X, Y, Z, C) volume. A single-channel input is a foreground probability and gives a "
                        "0/1 mask")
    act = g.add_mutually_exclusive_group()
    act.add_argument("--softmax", action="store_true", help="the files hold logits: apply softmax over classes")
    act.add_argument("--sigmoid", action="store_true", help="the files hold logits: apply a sigmoid per class")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where RankSEG computes (default: cpu)")
    g.add_argument("--pruning-prob", type=_pruning_arg, default="auto",
                   help="'auto' (default): keep a class when its best mask beats the empty mask's expected Dice; "
                        "a number p: keep it only if its maximum probability exceeds p (rankseg 0.0.8: 0.5); "
                        "0 disables pruning")
    g.add_argument("--smooth", type=float, default=0.0, help="smoothing constant of the metric (default 0)")
    ch = g.add_mutually_exclusive_group()
    ch.add_argument("--channels-last", dest="channels_last", action="store_const", const=True, default=None,
                    help="4D NIfTI files are (X, Y, Z, C) (detected when not given)")
    ch.add_argument("--channels-first", dest="channels_last", action="store_const", const=False,
                    help="4D NIfTI files are (C, X, Y, Z)")
    g.add_argument("--sum-tolerance", type=float, default=1e-2,
                   help="multiclass: largest accepted |sum over classes - 1| per voxel (default 0.01)")


def build_parser(demo_module: Any = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankseg-monai",
        description="RankSEG decisions (Dice/IoU-optimal masks) from probability volumes on disk.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pred = sub.add_parser("predict", help="probability volumes -> RankSEG masks",
                          description="Write one RankSEG mask per case, named after the case, into OUTDIR. "
                                      "Cases already written are skipped (resumable); --overwrite redoes them.")
    pred.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="probability files (.nii.gz, .nii, .mha, .mhd, .nrrd, nnU-Net .npz + .pkl) or folders")
    pred.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created)")
    pred.add_argument("--format", choices=rio.OUTPUT_FORMATS, default=None,
                      help="mask file format (default: the input's own; mha for .mhd, nrrd for .nhdr, nii.gz for "
                           "nnU-Net .npz)")
    pred.add_argument("--overwrite", action="store_true", help="redo cases whose mask exists already")
    pred.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_decision_options(pred)

    ev = sub.add_parser("evaluate", help="per-case Dice/HD95 of argmax vs RankSEG, summary, CSV and plot",
                        description="Compare argmax and RankSEG decisions (--probs) or score existing masks "
                                    "(--pred) against labels; writes per_case.csv, summary.csv and differences.png.")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--probs", metavar="DIR", help="folder of probability volumes (argmax vs RankSEG)")
    src.add_argument("--pred", metavar="DIR", help="folder of label-map masks to score as they are")
    ev.add_argument("--labels", required=True, metavar="DIR", help="folder of ground-truth label maps")
    ev.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the CSV files and plot")
    ev.add_argument("--classes", type=int, nargs="+", default=None,
                    help="label values to score (default: every foreground class)")
    ev.add_argument("--ignore-empty", action="store_true",
                    help="Dice is NaN (not 1 or 0) for classes absent from the labels (MONAI's default)")
    ev.add_argument("--skip-failed", action="store_true",
                    help="write the reports for the cases that worked even if others failed (exit code still 1)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_decision_options(ev)

    demo = sub.add_parser("demo", help="argmax vs RankSEG on synthetic CT phantoms with the shipped model",
                          description="End-to-end demonstration on embedded data (no download): seeded CT-like "
                                      "phantoms, the shipped 3D UNet, sliding-window inference, argmax vs RankSEG "
                                      "(Dice and IoU); prints a per-class table and writes a CSV and a figure.")
    if demo_module is not None:
        demo_module.add_arguments(demo)
    return parser


# ---------------------------------------------------------------------------------------------- helpers


def _err(msg: str) -> None:
    print(f"rankseg-monai: error: {msg}", file=sys.stderr)


def _pruning_arg(text: str) -> float | str:
    try:
        return parse_pruning_prob(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _options(args: argparse.Namespace) -> RankSEGOptions:
    """Every decision option of the command line, validated once before any case runs (exit 2 otherwise)."""
    if args.sum_tolerance < 0 or args.sum_tolerance != args.sum_tolerance:
        raise UsageError(f"--sum-tolerance must be a number >= 0, got {args.sum_tolerance}")
    try:
        return RankSEGOptions(metric=args.metric, solver=args.solver, output_mode=args.output_mode or "multiclass",
                              smooth=args.smooth, pruning_prob=args.pruning_prob, softmax=args.softmax,
                              sigmoid=args.sigmoid, device=args.device)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _prepare(volume: rio.ProbabilityVolume, args: argparse.Namespace, options: RankSEGOptions) -> np.ndarray:
    """Activation and value checks for one case."""
    probs = volume.probabilities
    where = str(volume.path)
    if options.activation is not None:
        if not np.all(np.isfinite(probs)):
            raise rio.VolumeError(f"{where}: logits contain NaN or inf; check the model export")
        if options.softmax and probs.shape[0] == 1:
            raise rio.VolumeError(f"{where}: --softmax over a single channel gives 1 everywhere; use --sigmoid")
        probs = activate_case(probs, options)
    if args.sigmoid and args.output_mode is None and probs.shape[0] > 1:
        raise rio.VolumeError(f"{where}: --sigmoid gives independent class probabilities; pass --output-mode "
                              "multilabel (one mask per class), or --output-mode multiclass for a label map anyway")
    check_mode = "multilabel" if (args.sigmoid or args.output_mode == "multilabel") else "multiclass"
    rio.validate_probabilities(probs, where=where, output_mode=check_mode, sum_tolerance=args.sum_tolerance)
    return probs


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


def _protected(cases: Sequence[Path]) -> list[Path]:
    out = []
    for path in cases:
        out.append(path)
        out.extend(rio.companion_files(path))
    return out


# ---------------------------------------------------------------------------------------------- predict


def _narrowest(num_classes: int, options: RankSEGOptions) -> Any:
    """The narrowest integer dtype of a label map of ``num_classes`` classes (what the mask file holds anyway)."""
    return smallest_label_dtype(*options.label_bounds(max(num_classes, 2)))


def _settings(args: argparse.Namespace) -> dict:
    return {"metric": args.metric, "solver": args.solver.lower(), "output_mode": args.output_mode,
            "softmax": args.softmax, "sigmoid": args.sigmoid, "pruning_prob": args.pruning_prob,
            "smooth": args.smooth, "channels_last": args.channels_last}


def _check_outdir(outdir: Path, inputs: Sequence[str], cases: Sequence[Path]) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"-o {outdir}: exists and is not a folder")
    resolved = outdir.resolve()
    for item in inputs:
        p = Path(item).resolve()
        if p == resolved:
            raise UsageError(f"-o {outdir} is an input folder; write the masks to another folder (inputs are never "
                             "overwritten)")
    for path in cases:
        if path.resolve().parent == resolved:
            raise UsageError(f"-o {outdir} holds the input {path}; write the masks to another folder (inputs are "
                             "never overwritten)")


def _check_settings(outdir: Path, args: argparse.Namespace, targets: Sequence[Path]) -> None:
    """Resuming is only safe with the same settings: refuse a mix unless --overwrite."""
    existing = [t for t in targets if t.exists()]
    settings_path = outdir / SETTINGS_FILE
    if args.overwrite or not existing:
        return
    if not settings_path.exists():
        raise UsageError(f"{outdir} already holds {existing[0].name} but no {SETTINGS_FILE} (not written by "
                         "rankseg-monai predict); pass --overwrite to replace such files, or choose another -o")
    try:
        old = json.loads(settings_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{settings_path}: unreadable ({exc}); delete it or pass --overwrite") from exc
    new = _settings(args)
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"{outdir} holds masks made with other settings ({shown}); pass --overwrite to redo them, "
                         "or choose another -o")


def cmd_predict(args: argparse.Namespace) -> int:
    options = _options(args)
    cases = rio.find_cases(args.inputs)
    if not cases:
        raise UsageError(f"no probability files found in {', '.join(args.inputs)} (looked for "
                         f"{', '.join(rio.PROBABILITY_EXTENSIONS)})")
    outdir = Path(args.output)
    _check_outdir(outdir, args.inputs, cases)
    targets = [rio.mask_path(outdir, rio.case_name(p), args.format or _default_format(p)) for p in cases]
    _check_settings(outdir, args, targets)
    protected = _protected(cases)
    outdir.mkdir(parents=True, exist_ok=True)
    settings = json.dumps(_settings(args), indent=2) + "\n"
    if not (outdir / SETTINGS_FILE).exists() or args.overwrite:
        rio.atomic_write(outdir / SETTINGS_FILE, lambda tmp: Path(tmp).write_text(settings), protected=protected)

    written, skipped, failed = 0, 0, []
    bar = _progress(list(zip(cases, targets)), args, "rankseg")
    for path, target in bar:
        case = rio.case_name(path)
        if target.exists() and not args.overwrite:
            skipped += 1
            continue
        try:
            volume = rio.load_probabilities(path, channels_last=args.channels_last)
            probs = _prepare(volume, args, options)
            # the narrowest labels straight from the solver (uint8: 8x less than int64; the file takes the
            # narrowest type anyway)
            mask = decide(probs, "rankseg", options, label_dtype=_narrowest(probs.shape[0], options))
            rio.save_mask(mask, volume.geometry, target, overwrite=True, protected=protected)
            written += 1
        except _CASE_ERRORS as exc:
            failed.append((case, exc))
            _report(bar, f"FAILED {case}: {exc}")
    print(f"{written} written, {skipped} skipped (already in {outdir}), {len(failed)} failed", file=sys.stderr)
    for case, exc in failed:
        print(f"  {case}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------- evaluate


def _label_index(labels_dir: Path) -> dict[str, Path]:
    if not labels_dir.is_dir():
        raise UsageError(f"--labels {labels_dir}: not a folder")
    return {rio.case_name(p): p for p in rio.find_cases([labels_dir], rio.LABEL_EXTENSIONS)}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluation as ev

    options = _options(args)
    source = Path(args.probs or args.pred)
    if not source.is_dir():
        raise UsageError(f"{'--probs' if args.probs else '--pred'} {source}: not a folder")
    cases = rio.find_cases([source], rio.PROBABILITY_EXTENSIONS if args.probs else rio.LABEL_EXTENSIONS)
    if not cases:
        raise UsageError(f"no files found in {source}")
    labels = _label_index(Path(args.labels))
    outdir = Path(args.output)
    protected = _protected(cases) + list(labels.values())
    classes = args.classes
    if args.pred and classes is None:  # one class list for every case: the values present anywhere
        found: set[int] = set()
        for path in [*cases, *(labels[rio.case_name(p)] for p in cases if rio.case_name(p) in labels)]:
            try:
                found |= {int(v) for v in np.unique(rio.load_labels(path).labels) if v > 0}
            except _CASE_ERRORS:
                pass  # reported with its case below
        classes = sorted(found) or [1]

    results, failed = [], []
    bar = _progress(cases, args, "evaluate")
    for path in bar:
        case = rio.case_name(path)
        try:
            if case not in labels:
                raise rio.VolumeError(f"case {case!r}: no label file in {args.labels} (expected {case}.nii.gz, "
                                      ".nii, .mha, .mhd or .nrrd)")
            label = rio.load_labels(labels[case])
            if args.probs:
                volume = rio.load_probabilities(path, channels_last=args.channels_last)
                rio.check_same_grid(volume.geometry, label.geometry, case)
                probs = _prepare(volume, args, options)
                result = ev.compare_case(probs, label.labels, volume.spacing, classes, case=case,
                                         ignore_empty=args.ignore_empty, options=options)
            else:
                pred = rio.load_labels(path)
                rio.check_same_grid(pred.geometry, label.geometry, case)
                result = ev.evaluate_masks({"pred": pred.labels}, label.labels, label.spacing, classes, case=case,
                                           ignore_empty=args.ignore_empty)
            results.append(result)
        except _CASE_ERRORS as exc:
            failed.append((case, exc))
            _report(bar, f"FAILED {case}: {exc}")
    for case, exc in failed:
        print(f"  {case}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if failed and not args.skip_failed:
        _err(f"{len(failed)} of {len(cases)} cases failed; no report written (fix them, or pass --skip-failed to "
             "report on the others)")
        return 1
    if not results:
        _err("no case could be evaluated; no report written")
        return 1
    table = ev.summarize(results)
    print(ev.format_table(table))
    outdir.mkdir(parents=True, exist_ok=True)
    written = [ev.write_csv(results, outdir / "per_case.csv", protected=protected),
               ev.write_summary_csv(table, outdir / "summary.csv", protected=protected)]
    if args.probs:
        written.append(ev.plot_differences(results, outdir / "differences.png", protected=protected))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        demo = _load_demo() if _first_command(argv) == "demo" else None
        parser = build_parser(demo)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return int(exc.code) if isinstance(exc.code, int) else 2
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return int(demo.run(args) or 0)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except rio.VolumeError as exc:  # raised before any case ran (e.g. finding the inputs)
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted; finished masks are complete (writes are atomic): run the same command again to resume")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

