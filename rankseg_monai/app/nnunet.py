"""RankSEG inside nnU-Net v2's predictor: ``rankseg-monai nnunet-predict`` and :class:`RankSEGPredictor`
(see ``docs/nnunet.md``).  The only module that imports ``nnunetv2`` (lazily: ``pip install "rankseg-monai[nnunet]"``).

Where the decision happens.  nnU-Net predicts the logits of the cropped, resampled case, then hands them to an
export worker (a ``spawn`` process pool) running ``export_prediction_from_logits``: resampling back to the
original spacing, the inference nonlinearity, ``LabelManager.convert_logits_to_segmentation`` (argmax, or the
0.5 painting of ``regions_class_order`` for region models), the segmentation put back into the uncropped image,
and the dataset's reader/writer.  Here the function handed to the pool is :func:`export_case` (a
``functools.partial`` carrying a picklable :class:`ExportJob`), which runs nnU-Net's own conversion with a label
manager whose conversion step is :func:`decide_probabilities`, then writes with nnU-Net's own writer (to a
temporary, read back, then put in place with its record).  Everything else is nnU-Net's.

Cropping.  nnU-Net decides on the non-zero box of the image; outside it the probability of background is 1 (of
every region 0), and ``--save_probabilities`` stores the uncropped volume.  Region probabilities are 0 outside the
box and never selected there, so regions are decided on the box.  Class probabilities are not: background is a
class of the multiclass decision, and its selection (threshold, expected-Dice increments) counts the certain
voxels outside the box, so a voxel inside can change label (seen on a test case).  They are decided on the
uncropped volume, in memory (as nnU-Net's own ``--save_probabilities`` path holds it, without writing it).  The
volume is also decided in the array order that ``rankseg-monai predict`` reads the ``.npz`` in, so even ties fall
the same way (tested against ``--save_probabilities`` + ``predict``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._files import VolumeError, discard, sha256_file, stage
from ..options import RankSEGOptions

__all__ = ["INSTALL_HINT", "TESTED_VERSIONS", "NnUNetMissing", "require_nnunet", "ExportJob", "decide_probabilities",
           "export_case", "rankseg_export", "options_for_model", "add_arguments", "cmd_nnunet_predict"]
# also RankSEGPredictor (nnU-Net's nnUNetPredictor subclass), built on first access (module __getattr__)

INSTALL_HINT = 'pip install "rankseg-monai[nnunet]"'
#: the nnunetv2 versions the tests run on (pyproject's ``nnunet`` extra)
TESTED_VERSIONS = (">=2.8.1", "<2.9")
#: what an export returns to the parent for one case
WRITTEN, FAILED = "written", "failed"


class NnUNetMissing(ImportError):
    """nnunetv2 is not installed (or not importable)."""


def require_nnunet() -> str:
    """Import nnunetv2 and return its version; :class:`NnUNetMissing` naming the extra otherwise."""
    try:
        import nnunetv2  # noqa: F401
        from nnunetv2.inference import export_prediction, predict_from_raw_data  # noqa: F401
    except ImportError as exc:
        raise NnUNetMissing(f"nnunet-predict needs nnU-Net v2 ({exc}); install it with {INSTALL_HINT}") from exc
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnunetv2")
    except PackageNotFoundError:  # pragma: no cover - a source checkout on sys.path
        return "unknown"


# ------------------------------------------------------------------------------------------- the decision


def _layout(transpose_backward: Sequence[int] | None, ndim: int) -> list[int]:
    """The spatial axes of nnU-Net's internal array in the order ``rankseg-monai predict`` holds a
    ``--save_probabilities`` volume: nnU-Net's ``transpose_backward`` (the file's array order), then reversed (the
    ``.npz`` is SimpleITK's ``z, y, x``; predict reads ``x, y, z``)."""
    back = list(range(ndim)) if transpose_backward is None else [int(a) for a in transpose_backward]
    return [back[ndim - 1 - k] for k in range(ndim)]


def decide_probabilities(probs: Any, options: RankSEGOptions, *, transpose_backward: Sequence[int] | None = None,
                         estimates: bool = True, crop: tuple[Sequence[Sequence[int]], Sequence[int]] | None = None
                         ) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The RankSEG decision of one nnU-Net case: the one place ``nnunet-predict`` decides (a calibration plugs in
    through ``options``).

    Args:
        probs: probabilities ``(C, *spatial)`` in nnU-Net's internal array order (numpy or CPU tensor): the softmax
            of a label model, or one sigmoid per region of a region model (``options.region_probs``).
        options: the decision options (regions from the model's dataset.json).
        transpose_backward: nnU-Net's plans ``transpose_backward``; the decision is taken in ``predict``'s array
            order so that ties fall as there.
        estimates: also return the record's label-free expected Dice (of RankSEG's and argmax's masks).
        crop: nnU-Net's ``(bbox_used_for_cropping, shape_before_cropping)`` when ``probs`` is the crop box of a
            larger volume.  Class probabilities are then decided on the whole volume, background certain outside
            the box (the background class's own RankSEG selection counts every voxel of the volume), and the box
            of the decision is returned; region probabilities (0 outside) are decided on the box directly.

    Returns:
        the label map ``(*spatial)`` in nnU-Net's order (the narrowest unsigned dtype), and the estimates or
        ``None``.

    Example:
        >>> import numpy as np
        >>> from rankseg_monai.options import RankSEGOptions
        >>> p = np.array([[0.7, 0.2, 0.6], [0.3, 0.8, 0.4]], dtype=np.float32).reshape(2, 3, 1, 1)
        >>> mask, _ = decide_probabilities(p, RankSEGOptions(), estimates=False)
        >>> mask.ravel().tolist()
        [0, 1, 0]
    """
    from .cli import _calibrate_case, _case_estimates, _narrowest
    from .decide import decide

    arr = probs.numpy() if hasattr(probs, "numpy") else np.asarray(probs)
    ndim = arr.ndim - 1
    order = _layout(transpose_backward, ndim)
    axes = (0, *[a + 1 for a in order])
    box = None
    if crop is not None and not options.region_probs:
        bbox, shape = crop
        box = tuple(slice(int(lo), int(hi)) for lo, hi in bbox)
        if tuple(int(n) for n in shape) == tuple(arr.shape[1:]):
            box = None
    if box is not None:  # the uncropped volume, built in predict's order at once (one volume-sized copy, not two)
        view = np.zeros((arr.shape[0], *(int(shape[a]) for a in order)), dtype=np.float32)
        view[0] = 1.0
        view[(slice(None), *(box[a] for a in order))] = arr.transpose(axes)
    else:
        view = np.ascontiguousarray(arr.transpose(axes), dtype=np.float32)
    if options.calibration is not None:  # as predict --calibration on the probabilities nnU-Net would have saved
        view = np.ascontiguousarray(_calibrate_case(view, options), dtype=np.float32)
    mask = decide(view, "rankseg", options, label_dtype=_narrowest(view.shape[0], options))
    extra = _case_estimates(view, mask, options) if estimates and options.metric in ("dice", "iou") else None
    mask = mask.transpose(np.argsort(order))
    if box is not None:
        inside = mask[box]
        if np.count_nonzero(mask) != np.count_nonzero(inside):  # a voxel of probability 0 selected: never
            raise VolumeError("RankSEG labelled a voxel outside nnU-Net's crop box (background probability 1 "
                              "there); please report this with the case")
        mask = inside
    return np.ascontiguousarray(mask), extra


class _RankSEGLabels:
    """nnU-Net's ``LabelManager`` with RankSEG as its conversion step (every other attribute is the manager's)."""

    def __init__(self, manager: Any, options: RankSEGOptions, transpose_backward: Sequence[int], estimates: bool,
                 crop: tuple[Any, Any] | None = None):
        self._manager = manager
        self._crop = crop
        self._options = options
        self._transpose_backward = transpose_backward
        self._estimates = estimates
        self.extra: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def convert_probabilities_to_segmentation(self, probabilities: Any) -> np.ndarray:
        mask, self.extra = decide_probabilities(probabilities, self._options, estimates=self._estimates,
                                                transpose_backward=self._transpose_backward, crop=self._crop)
        return mask

    def convert_logits_to_segmentation(self, logits: Any) -> np.ndarray:
        return self.convert_probabilities_to_segmentation(self._manager.apply_inference_nonlin(logits))


# ---------------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportJob:
    """What an export worker needs besides nnU-Net's own arguments (picklable: it travels to the spawned pool).

    Attributes:
        options: the RankSEG options, or ``None`` for nnU-Net's own decision (argmax / region painting).
        settings: the run settings recorded beside each mask (``None``: no records, e.g. from a user's script).
        inputs: per output file (nnU-Net's truncated name), the hashed input files recorded beside its mask.
        estimates: keep the label-free expected Dice in the records.
    """

    options: RankSEGOptions | None = None
    settings: Mapping[str, Any] | None = None
    inputs: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    estimates: bool = True


def _convert(job: ExportJob, logits: Any, plans_manager: Any, configuration_manager: Any, label_manager: Any,
             properties: dict, return_probabilities: bool = False, num_threads_torch: int | None = None) -> Any:
    """nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` with RankSEG's conversion step;
    returns ``(segmentation, extra)`` (plus nnU-Net's uncropped probabilities with ``return_probabilities``)."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.inference import export_prediction as ep

    threads = default_num_processes if num_threads_torch is None else num_threads_torch
    labels = label_manager
    if job.options is not None:
        crop = (properties["bbox_used_for_cropping"], properties["shape_before_cropping"])
        labels = _RankSEGLabels(label_manager, job.options, plans_manager.transpose_backward, job.estimates, crop)
    out = ep.convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, labels, properties, return_probabilities=return_probabilities,
        num_threads_torch=threads)
    extra = getattr(labels, "extra", None)
    return (*out, extra) if return_probabilities else (out, extra)


def _check_written(rw: Any, tmp: str, seg: np.ndarray, properties: dict, target: Path) -> None:
    """Read the file nnU-Net's writer wrote back with nnU-Net's reader: same labels, same spacing."""
    fix = "; nothing was written for this case (is the disk full? free space and run the same command again)"
    try:
        back, props = rw.read_seg(tmp)
    except Exception as exc:
        raise VolumeError(f"{target}: the written file cannot be read back ({type(exc).__name__}: {exc}){fix}") \
            from exc
    back = np.asarray(back).reshape(seg.shape) if np.size(back) == seg.size else None
    if back is None or not np.array_equal(back, seg):
        raise VolumeError(f"{target}: the written file does not read back as written{fix}")
    if "spacing" in props and not np.allclose(props["spacing"], properties["spacing"], rtol=0, atol=1e-5):
        raise VolumeError(f"{target}: the written file reads back with spacing {props['spacing']}, expected "
                          f"{properties['spacing']}{fix}")


def export_case(job: ExportJob, predicted_logits: Any, properties: dict, configuration_manager: Any,
                plans_manager: Any, dataset_json: dict | str, output_file_truncated: str,
                save_probabilities: bool = False, num_threads_torch: int | None = None) -> dict[str, Any]:
    """nnU-Net's ``export_prediction_from_logits`` (same arguments after ``job``) with RankSEG's decision: the
    mask is written by the dataset's own reader/writer to a temporary, read back, and put in place with its record
    (``job.settings``).  Runs in nnU-Net's export worker; returns ``{"case", "status", ...}`` rather than raising,
    so that one failed case never stops the others."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_pickle

    from . import provenance as prov

    case = os.path.basename(output_file_truncated)
    try:
        if isinstance(dataset_json, str):
            dataset_json = load_json(dataset_json)
        label_manager = plans_manager.get_label_manager(dataset_json)
        out = _convert(job, predicted_logits, plans_manager, configuration_manager, label_manager, properties,
                       save_probabilities, num_threads_torch)
        del predicted_logits
        if save_probabilities:
            seg, probabilities, extra = out
            np.savez_compressed(output_file_truncated + ".npz", probabilities=probabilities)
            save_pickle(properties, output_file_truncated + ".pkl")
            del probabilities
        else:
            seg, extra = out
        seg = np.asarray(seg)
        rw = plans_manager.image_reader_writer_class()
        target = Path(output_file_truncated + dataset_json["file_ending"])
        tmp = stage(target, lambda t: rw.write_seg(seg, t, properties),
                    verify=lambda t: _check_written(rw, t, seg, properties, target))
        if job.settings is None:
            from .._files import commit

            commit(tmp, target)
            return {"case": case, "status": WRITTEN, "mask": str(target)}
        try:
            prov.commit_mask(tmp, target, seg.shape, case=case, inputs=job.inputs.get(output_file_truncated, []),
                             settings=job.settings, extra=extra,
                             verified="written by nnU-Net's reader/writer, read back with it before it was put in "
                                      "place: same labels and spacing")
        finally:
            discard(tmp)
        return {"case": case, "status": WRITTEN, "mask": str(target)}
    except Exception as exc:  # reported by the parent with the case name
        return {"case": case, "status": FAILED, "error": f"{type(exc).__name__}: {exc}"}


@contextlib.contextmanager
def rankseg_export(job: ExportJob) -> Iterator[None]:
    """For the block, nnU-Net's predictor hands :func:`export_case` (and, for in-memory predictions, RankSEG's
    conversion) to its export workers instead of its own functions.

    Process-wide (a module attribute of ``nnunetv2.inference.predict_from_raw_data`` is replaced and restored): do
    not run other nnU-Net predictions in other threads of the same process meanwhile.
    """
    require_nnunet()
    from nnunetv2.inference import predict_from_raw_data as prd

    names = ("export_prediction_from_logits", "convert_predicted_logits_to_segmentation_with_correct_shape")
    missing = [n for n in names if not hasattr(prd, n)]
    if missing:
        raise NnUNetMissing(f"this nnunetv2 has no {missing[0]} in nnunetv2.inference.predict_from_raw_data; use "
                            f"nnunetv2 {','.join(TESTED_VERSIONS)} ({INSTALL_HINT})")
    old = {n: getattr(prd, n) for n in names}
    prd.export_prediction_from_logits = functools.partial(export_case, job)
    prd.convert_predicted_logits_to_segmentation_with_correct_shape = functools.partial(_convert_in_memory, job)
    try:
        yield
    finally:
        for n, f in old.items():
            setattr(prd, n, f)


def _convert_in_memory(job: ExportJob, *args: Any, **kwargs: Any) -> Any:
    """The ``ofile=None`` path of nnU-Net's predictor: the segmentation (and probabilities) as nnU-Net returns
    them, decided by RankSEG."""
    out = _convert(job, *args, **kwargs)
    return out[:-1] if len(out) == 3 else out[0]


def _predictor_class() -> type:
    if "RankSEGPredictor" in globals():
        return globals()["RankSEGPredictor"]
    require_nnunet()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class RankSEGPredictor(nnUNetPredictor):
        """nnU-Net's ``nnUNetPredictor`` whose segmentations are RankSEG's decisions.

        Use it as nnU-Net's predictor, with the RankSEG options::

            predictor = RankSEGPredictor(rankseg_options=RankSEGOptions(metric="dice"), device=torch.device("cpu"))
            predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,))
            predictor.predict_from_files(images_folder, output_folder)

        ``rankseg_options=None`` keeps nnU-Net's own decision.  Region models: pass the regions of the model's
        dataset.json (:func:`options_for_model` does).  ``rankseg_job`` (an :class:`ExportJob`) adds records.
        """

        def __init__(self, *args: Any, rankseg_options: RankSEGOptions | None = None,
                     rankseg_job: ExportJob | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.rankseg_job = rankseg_job or ExportJob(options=rankseg_options, estimates=False)

        def initialize_from_trained_model_folder(self, model_training_output_dir: str, *args: Any, **kwargs: Any):
            super().initialize_from_trained_model_folder(model_training_output_dir, *args, **kwargs)
            opts = self.rankseg_job.options
            if opts is not None and opts.regions is None and self.label_manager.has_regions:
                self.rankseg_job = ExportJob(options_for_model(model_training_output_dir, opts),
                                             self.rankseg_job.settings, self.rankseg_job.inputs,
                                             self.rankseg_job.estimates)

        def predict_from_data_iterator(self, *args: Any, **kwargs: Any):
            with rankseg_export(self.rankseg_job):
                return super().predict_from_data_iterator(*args, **kwargs)

        def predict_single_npy_array(self, *args: Any, **kwargs: Any):
            with rankseg_export(self.rankseg_job):  # converts in-process, through predict_from_raw_data's names
                return super().predict_single_npy_array(*args, **kwargs)

    RankSEGPredictor.__module__ = __name__
    globals()["RankSEGPredictor"] = RankSEGPredictor
    return RankSEGPredictor


def options_for_model(model_folder: str | os.PathLike, options: RankSEGOptions) -> RankSEGOptions:
    """``options`` with the regions, ``regions_class_order`` and region probabilities of a region-trained model
    (its ``dataset.json``); unchanged for a label model."""
    from . import io as rio

    dataset = rio.read_dataset_json(Path(model_folder) / "dataset.json")
    if not dataset.region_based:
        return options
    return options.replace(regions=dataset.regions, regions_class_order=dataset.regions_class_order,
                           region_probs=True, output_mode="multiclass")


def __getattr__(name: str) -> Any:
    if name == "RankSEGPredictor":  # built on first use: nnunetv2 is optional
        return _predictor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ command line


def add_arguments(sub: Any, add_decision_options: Any, add_part_options: Any) -> argparse.ArgumentParser:
    """The ``nnunet-predict`` subcommand (nnU-Net's spellings for nnU-Net's options)."""
    p = sub.add_parser("nnunet-predict", help="nnU-Net v2 inference with RankSEG decisions (no probability files)",
                       description="Run a trained nnU-Net v2 model on a folder of images as nnUNetv2_predict does, "
                                   "with RankSEG deciding the segmentation at nnU-Net's conversion step (after "
                                   "resampling to the original spacing, before un-cropping). Writes what "
                                   "nnUNetv2_predict writes (masks named after the cases, dataset.json, plans.json), "
                                   "plus a record beside each mask (<mask>.rankseg.json) and expected_dice.csv. "
                                   f"Resumable; needs {INSTALL_HINT}.")
    p.add_argument("-i", dest="input", required=True, metavar="IMAGES",
                   help="folder of images named as nnU-Net expects (<case>_0000.nii.gz, ...)")
    p.add_argument("-o", dest="output", required=True, metavar="OUTDIR", help="output folder (created)")
    p.add_argument("-m", dest="model", required=True, metavar="MODEL_FOLDER",
                   help="the trained model folder (holding dataset.json, plans.json and fold_*/), e.g. "
                        "$nnUNet_results/Dataset003_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres")
    p.add_argument("-f", dest="folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to ensemble (default: every fold_N with the checkpoint; 'all' for fold_all)")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="checkpoint file name "
                   "(default: checkpoint_final.pth)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch "
                   "(default 0.5, as nnU-Net)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    p.add_argument("-npp", type=int, default=3, help="processes for preprocessing (default 3, as nnU-Net)")
    p.add_argument("-nps", type=int, default=3, help="processes for resampling, decision and export (default 3)")
    p.add_argument("--continue_prediction", action="store_true",
                   help="accepted for nnU-Net compatibility: finished cases are always skipped (resume); --overwrite "
                        "redoes them")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every case, also those already done, and replace masks made with other settings")
    p.add_argument("--argmax", action="store_true",
                   help="nnU-Net's own decision (argmax, or the painting of regions_class_order): the baseline, with "
                        "this command's records")
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write nnU-Net's <case>.npz + <case>.pkl (as nnUNetv2_predict --save_probabilities)")
    p.add_argument("--flag-below", type=float, default=None, metavar="DICE",
                   help="list the cases whose expected Dice of some class or region is below DICE (a review list)")
    p.add_argument("--quiet", action="store_true", help="hide nnU-Net's progress output")
    add_decision_options(p)
    g = p.add_argument_group("scale-out (nnU-Net's spelling)")
    g.add_argument("-num_parts", dest="num_parts", type=int, default=1, metavar="N",
                   help="split the cases into N parts (default 1)")
    g.add_argument("-part_id", dest="part_id", type=int, default=0, metavar="K",
                   help="do part K (0 <= K < N) of the cases sorted by name: K, K+N, ...")
    del add_part_options  # nnU-Net spells them -num_parts / -part_id
    return p


def _case_lists(folder: Path, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """``{case: [channel files]}`` of an nnU-Net images folder (``<case>_XXXX<file_ending>``)."""
    import re

    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = pattern.match(p.name)
        if m and p.is_file():
            cases.setdefault(m.group(1), {})[int(m.group(2))] = p
    out = {}
    for case, channels in sorted(cases.items()):
        if sorted(channels) != list(range(num_channels)):
            raise VolumeError(f"{folder}: case {case!r} has channels {sorted(channels)}; the model needs "
                              f"{', '.join(f'{case}_{c:04d}{file_ending}' for c in range(num_channels))}")
        out[case] = [channels[c] for c in range(num_channels)]
    return out


def _model_settings(model: Path, folds: Sequence[str] | None, checkpoint: str) -> tuple[dict[str, Any], list[str]]:
    """The model part of the run settings (its files' SHA-256: another model is other settings) and the folds."""
    from .cli import UsageError

    for name in ("dataset.json", "plans.json"):
        if not (model / name).is_file():
            raise UsageError(f"-m {model}: no {name}; pass nnU-Net's trained model folder (e.g. $nnUNet_results/"
                             "DatasetXXX_Name/nnUNetTrainer__nnUNetPlans__3d_fullres)")
    if folds is None:
        found = sorted(int(p.name[5:]) for p in model.glob("fold_*") if p.name[5:].isdigit()
                       and (p / checkpoint).is_file())
        if not found:
            raise UsageError(f"-m {model}: no fold_N/{checkpoint}; train a fold first or pass -f / -chk")
        folds = [str(f) for f in found]
    files = {}
    for f in folds:
        if f != "all" and not f.isdigit():
            raise UsageError(f"-f {f}: a fold is a number or 'all'")
        path = model / f"fold_{f}" / checkpoint
        if not path.is_file():
            raise UsageError(f"-f {f}: {path} does not exist; choose folds that have {checkpoint} (-chk)")
        files[f"fold_{f}/{checkpoint}"] = sha256_file(path)
    files["dataset.json"] = sha256_file(model / "dataset.json")
    files["plans.json"] = sha256_file(model / "plans.json")
    return {"folder": str(model.resolve()), "folds": list(folds), "checkpoint": checkpoint, "sha256": files}, \
        list(folds)


def cmd_nnunet_predict(args: argparse.Namespace) -> int:
    from . import cli
    from . import provenance as prov
    from .cli import UsageError

    for flag, on in (("--softmax", args.softmax), ("--sigmoid", args.sigmoid), ("--force-activation",
                     args.force_activation), ("--channels-last/--channels-first", args.channels_last is not None),
                     ("--dataset-json", args.dataset_json is not None)):
        if on:
            raise UsageError(f"{flag} does not apply to nnunet-predict (nnU-Net applies its own nonlinearity and the "
                             "model's dataset.json gives the labels and regions); drop it")
    if not 0 < args.step_size <= 1:
        raise UsageError(f"-step_size must lie in (0, 1], got {args.step_size}")
    if args.npp < 1 or args.nps < 1:
        raise UsageError("-npp and -nps must be >= 1")
    if args.flag_below is not None and not 0 <= args.flag_below <= 1:
        raise UsageError(f"--flag-below must be a Dice between 0 and 1, got {args.flag_below}")
    model = Path(args.model)
    if not model.is_dir():
        raise UsageError(f"-m {model}: not a folder; pass nnU-Net's trained model folder")
    images = Path(args.input)
    if not images.is_dir():
        raise UsageError(f"-i {images}: not a folder of images")
    try:
        nnunet_version = require_nnunet()
    except NnUNetMissing as exc:
        raise UsageError(str(exc)) from None
    if not nnunet_version.startswith("2.8."):
        print(f"rankseg-monai: warning: nnunetv2 {nnunet_version} is not a tested version "
              f"({','.join(TESTED_VERSIONS)}); the masks are checked against nnU-Net's own only there", file=sys.stderr)
    from . import io as rio

    try:
        dataset = rio.read_dataset_json(model / "dataset.json")
    except VolumeError as exc:
        raise UsageError(f"-m {model}: {exc}") from None
    if dataset.region_based and args.regions is not None:
        raise UsageError(f"-m {model} is region-trained: its regions come from its dataset.json; drop --regions")
    if args.regions is None:  # a region model's regions, order and sigmoid probabilities; class names
        args.dataset_json = str(model / "dataset.json")
    options = cli.decision_options(args)  # every decision option checked before any work
    if options.calibration is not None and args.argmax:
        raise UsageError("--calibration changes RankSEG's decision, not --argmax's; drop one of them")
    if options.calibration is not None:  # the model's channels must be the calibration's, before any case
        channels = len(dataset.regions) if dataset.region_based else len(dataset.class_names)
        try:
            options.check_classes(channels)
        except ValueError as exc:
            raise UsageError(f"--calibration {args.calibration}: {exc}") from None
    args.dataset_json = str(model / "dataset.json")
    cli._names_from_dataset(args)  # the class names of expected_dice.csv
    import json

    doc = json.loads((model / "dataset.json").read_text(encoding="utf-8"))
    file_ending = doc.get("file_ending", ".nii.gz")
    try:
        cases = _case_lists(images, file_ending, len(doc.get("channel_names") or doc.get("modality") or {"0": 0}))
    except VolumeError as exc:
        raise UsageError(str(exc)) from None
    if not cases:
        raise UsageError(f"-i {images}: no images named <case>_0000{file_ending}")
    model_settings, folds = _model_settings(model, args.folds, args.checkpoint)
    outdir = Path(args.output)
    all_inputs = [p for files in cases.values() for p in files]
    cli._check_outdir(outdir, [images, model], all_inputs)
    first = {files[0]: case for case, files in cases.items()}  # <case>_0000: sorted as the cases (nnU-Net's split)
    selected = [first[p] for p in cli.select_part(list(first), args.part_id, args.num_parts)]
    targets = [outdir / f"{c}{file_ending}" for c in selected]
    settings = cli.run_settings(args, options)
    settings.update(decision="argmax" if args.argmax else "rankseg", model=model_settings,
                    nnunet={"version": nnunet_version, "step_size": args.step_size, "tta": not args.disable_tta,
                            "save_probabilities": args.save_probabilities})
    created = not outdir.exists()
    runs = cli._open_outdir(outdir, settings, "nnunet-predict")
    with runs:
        run = cli._PredictRun(args, options, settings, outdir, all_inputs, runs)
        cli._survey(run, targets)
        with contextlib.ExitStack() as claims:
            todo, inputs = [], {}
            for case, target in zip(selected, targets):
                if not claims.enter_context(runs.claim(case)):
                    run.counts["elsewhere"] += 1
                    continue
                hashed = prov.hash_inputs(cases[case])
                if not args.overwrite:
                    status = prov.case_status(target, settings, hashed)
                    if status.state == prov.DONE and (not args.save_probabilities or
                                                      (outdir / f"{case}.npz").is_file()):
                        run.counts["skipped"] += 1
                        continue
                    if status.state in (prov.OTHER_SETTINGS, prov.FOREIGN):
                        run.failed.append(case)
                        print(f"FAILED {case}: {target}: {status.detail or status.state}; pass --overwrite",
                              file=sys.stderr)
                        continue
                    if status.state != prov.ABSENT:
                        print(f"redoing {case}: {status.detail}", file=sys.stderr)
                todo.append(case)
                inputs[str(outdir / case)] = hashed
            if todo:
                job = ExportJob(None if args.argmax else options, settings, inputs, estimates=not args.argmax)
                _run_nnunet(args, model, folds, outdir, file_ending, todo, cases, job, run)
    cli._remove_if_empty(outdir, created)
    return cli._finish_predict(run, targets, [outdir / f"{c}{file_ending}" for c in first.values()])


def _run_nnunet(args: argparse.Namespace, model: Path, folds: Sequence[str], outdir: Path, file_ending: str,
                todo: Sequence[str], cases: Mapping[str, Sequence[Path]], job: ExportJob, run: Any) -> None:
    import torch

    device = torch.device(args.device)
    predictor_cls = _predictor_class()
    quiet = io.StringIO() if args.quiet else None
    started = time.perf_counter()
    with contextlib.redirect_stdout(quiet) if quiet is not None else contextlib.nullcontext():
        predictor = predictor_cls(tile_step_size=args.step_size, use_gaussian=True,
                                  use_mirroring=not args.disable_tta,
                                  perform_everything_on_device=device.type == "cuda",
                                  device=device, verbose=False, allow_tqdm=not args.quiet, rankseg_job=job)
        try:
            predictor.initialize_from_trained_model_folder(str(model), use_folds=tuple(folds),
                                                           checkpoint_name=args.checkpoint)
        except Exception as exc:
            from .cli import UsageError

            raise UsageError(f"-m {model}: nnU-Net cannot load the model ({type(exc).__name__}: {exc})") from None
        try:
            results = predictor.predict_from_files([[str(p) for p in cases[c]] for c in todo],
                                                   [str(outdir / c) for c in todo],
                                                   save_probabilities=args.save_probabilities, overwrite=True,
                                                   num_processes_preprocessing=args.npp,
                                                   num_processes_segmentation_export=args.nps)
        except Exception as exc:  # nnU-Net's preprocessing or inference stopped: which cases made it to disk?
            from . import provenance as prov

            print(f"nnU-Net stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
            results = []
            for c in todo:
                target = outdir / f"{c}{file_ending}"
                ok = prov.case_status(target, job.settings or {}, job.inputs.get(str(outdir / c), [])).state
                results.append({"case": c, "status": WRITTEN} if ok == prov.DONE else
                               {"case": c, "status": FAILED, "error": "not exported before nnU-Net stopped"})
    for res in results or []:
        if res.get("status") == WRITTEN:
            run.counts["written"] += 1
        else:
            run.failed.append(res.get("case", "?"))
            print(f"FAILED {res.get('case')}: {res.get('error')}", file=sys.stderr)
    if not args.quiet:
        print(f"nnU-Net inference and export of {len(todo)} case(s): {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
