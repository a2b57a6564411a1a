"""Every option of a RankSEG decision, parsed and validated once: :class:`RankSEGOptions`.

The functional API, the MONAI transforms and handler, the CLI and the evaluation all build one
:class:`RankSEGOptions` (a frozen dataclass) and pass it down; nothing below re-parses an option.  Checks that
need the number of classes (``void_index`` inside ``[0, C)``, a label dtype too narrow for ``C`` labels, a
single-channel multiclass input) run once per call in :meth:`RankSEGOptions.check_classes`.

Defaults are the same everywhere, with one deliberate exception: :func:`rankseg_monai.functional.rankseg` keeps
rankseg 0.0.8's ``pruning_prob=0.5`` (:data:`PARITY_PRUNING_PROB`) so that it gives 0.0.8's decisions for 0.0.8's
arguments.  Every other entry (``RankSEGOptions()``, the transforms, the handler, the CLI, the evaluation, the
calibration report and the demo) uses ``pruning_prob="auto"`` (:data:`DEFAULT_PRUNING_PROB`), which
``docs/calibration.md`` measures against 0.5 and 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .activation import check_temperature
from .calibrator import Calibration, resolve_calibration
from .guard import Guard, resolve_guard
from .solvers.pruning import AUTO_MODES
from .solvers.regions import RegionTree
from .solvers.validation import check_choice, check_int, check_real

__all__ = [
    "METRICS",
    "METRIC_ALIASES",
    "SOLVERS",
    "OUTPUT_MODES",
    "UNASSIGNED_POLICIES",
    "DEFAULT_PRUNING_PROB",
    "PARITY_PRUNING_PROB",
    "DEFAULT_VOID_INDEX",
    "RankSEGOptions",
    "parse_pruning_prob",
    "parse_device",
    "check_bool",
    "check_label_dtype",
    "check_label_capacity",
    "label_range",
    "smallest_label_dtype",
    "supported_solvers",
    "solver_name",
]

METRICS = ("dice", "iou", "acc")
SOLVERS = ("rma", "ba", "trna", "ba+trna", "exact", "tr", "argmax")
OUTPUT_MODES = ("multiclass", "multilabel")
UNASSIGNED_POLICIES = ("max_score", "void")
METRIC_ALIASES = {"accuracy": "acc", "jaccard": "iou"}
_DISPLAY = {"rma": "RMA", "ba": "BA", "trna": "TRNA", "ba+trna": "BA+TRNA", "exact": "exact", "tr": "TR",
            "argmax": "argmax"}

#: ``pruning_prob`` of every entry except :func:`rankseg_monai.functional.rankseg`
DEFAULT_PRUNING_PROB = "auto"
#: ``pruning_prob`` of :func:`rankseg_monai.functional.rankseg`: rankseg 0.0.8's default, for parity
PARITY_PRUNING_PROB = 0.5
DEFAULT_VOID_INDEX = 255

#: largest integer ``n`` such that every integer in ``[-n, n]`` is exact in the floating dtype
_FLOAT_EXACT_INT = {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24, torch.float64: 2**53}


# ------------------------------------------------------------------------------------------ single options
def solver_name(solver: str) -> str:
    """How messages spell a solver (``"RMA"``, ``"BA+TRNA"``, ...)."""
    return _DISPLAY.get(solver, solver)


def parse_pruning_prob(value: Any) -> float | str:
    """A ``pruning_prob``: a number in ``[0, 1]`` (or its text, from a command line or config) or an ``"auto"`` mode.

    >>> parse_pruning_prob("0.5"), parse_pruning_prob(" Auto ")
    (0.5, 'auto')
    """
    if isinstance(value, str):
        key = value.strip().lower()
        if key in AUTO_MODES:
            return key
        try:
            value = float(key)
        except ValueError:
            raise ValueError(f"pruning_prob {value!r}: use a number in [0, 1] or one of "
                             f"{', '.join(map(repr, AUTO_MODES))}") from None
    value = check_real("pruning_prob", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"pruning_prob must lie in [0, 1] (or be one of {', '.join(map(repr, AUTO_MODES))}), got "
                         f"{value}")
    return value


def parse_device(device: Any) -> torch.device | None:
    """``None`` (compute where the input lives) or a usable ``torch.device``; names the fix otherwise."""
    if device is None:
        return None
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be None, a string such as 'cpu' or 'cuda:0', or a torch.device; got "
                        f"{type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a torch device: use 'cpu', 'cuda' or 'cuda:N' (or None to "
                         "compute where the input lives)") from None
    if dev.type == "meta":
        raise ValueError("device='meta' holds no values to decide on: use 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but torch sees no CUDA device: use device='cpu' (or None), or "
                         "install a CUDA build of PyTorch (see the README)")
    return dev


def check_bool(name: str, value: Any) -> bool:
    """A bool (numpy bools too); ints and strings are refused, so a config typo cannot flip an option."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_label_dtype(label_dtype: Any) -> torch.dtype:
    """The torch dtype of a label map from a torch dtype, a numpy dtype or a name (``"uint8"``, ``"float32"``)."""
    if isinstance(label_dtype, str) and label_dtype.startswith("torch."):  # as to_dict() writes it
        label_dtype = getattr(torch, label_dtype[len("torch."):], label_dtype)
    if isinstance(label_dtype, torch.dtype):
        dtype = label_dtype
    else:
        try:
            dtype = torch.from_numpy(np.empty(0, dtype=np.dtype(label_dtype))).dtype
        except (TypeError, ValueError):
            raise ValueError(
                f"label_dtype={label_dtype!r} is not a dtype: use e.g. torch.int64 (default), torch.uint8 or "
                "torch.float32"
            ) from None
    if dtype == torch.bool or dtype.is_complex or (dtype.is_floating_point and dtype not in _FLOAT_EXACT_INT):
        raise ValueError(
            f"label_dtype={dtype} cannot hold class labels: use an integer dtype (torch.int64, torch.uint8, ...) "
            "or float16/bfloat16/float32/float64"
        )
    return dtype


def check_label_capacity(dtype: torch.dtype, low: int, high: int, name: str = "label_dtype") -> None:
    """Raise a ``ValueError`` naming the fix unless ``dtype`` holds every integer label in ``low..high`` exactly
    (``torch.bool`` holds 0 and 1)."""
    if dtype == torch.bool:
        lo_ok, hi_ok = low >= 0, high <= 1
    elif dtype.is_floating_point:
        lo_ok, hi_ok = -_FLOAT_EXACT_INT[dtype] <= low, high <= _FLOAT_EXACT_INT[dtype]
    else:
        info = torch.iinfo(dtype)
        lo_ok, hi_ok = info.min <= low, high <= info.max
    if not (lo_ok and hi_ok):
        raise ValueError(
            f"{name}={dtype} cannot hold the label {low if not lo_ok else high} exactly: use torch.int64 (or "
            f"another dtype that holds labels {low}..{high})"
        )


def label_range(num_classes: int, unassigned_policy: str = "max_score", void_index: int = DEFAULT_VOID_INDEX
                ) -> tuple[int, int]:
    """Smallest and largest label a multiclass map of ``num_classes`` classes can hold (``void_index`` included
    under ``unassigned_policy="void"``)."""
    if check_choice("unassigned_policy", unassigned_policy, UNASSIGNED_POLICIES) == "void":
        return min(0, void_index), max(num_classes - 1, void_index)
    return 0, num_classes - 1


def smallest_label_dtype(low: int, high: int) -> torch.dtype:
    """The narrowest of uint8, int16, int32, int64 that holds every label in ``low..high``.

    >>> smallest_label_dtype(0, 2), smallest_label_dtype(0, 300)
    (torch.uint8, torch.int16)
    """
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return torch.int64


def supported_solvers(metric: str, output_mode: str, num_classes: int | None = None) -> tuple[str, ...]:
    """Solvers accepted for a metric/output-mode pair (rankseg 0.0.8's table, plus ``exact`` for Dice);
    ``num_classes=None``: those some class count accepts."""
    if metric == "dice":
        return ("rma",) if output_mode == "multiclass" else ("rma", "ba", "trna", "ba+trna", "exact")
    if metric == "iou":
        return ("rma",)
    if output_mode == "multiclass":
        return ("argmax",)
    return ("tr",) if num_classes == 1 else ("tr", "argmax")


# ------------------------------------------------------------------------------------------ the options
@dataclass(frozen=True)
class RankSEGOptions:
    """The validated options of a RankSEG decision.  Build it once; every layer passes it down unchanged.

    Values are normalised on construction (names lower-cased, ``device`` a ``torch.device``, ``guard`` a
    :class:`~rankseg_monai.guard.Guard` or ``None``, ``label_dtype`` a torch dtype, ``temperature`` a float or a
    tuple) and every combination that no input accepts raises here, with a message that names the fix.
    :meth:`replace` makes a changed copy (validated again).

    Args:
        metric: ``"dice"`` (default), ``"iou"`` or ``"acc"`` (with ``solver="argmax"``/``"tr"``).
        smooth: the smoothing constant of the metric (``>= 0``).
        output_mode: ``"multiclass"`` (one label map) or ``"multilabel"`` (one mask per channel).
        solver: ``"rma"`` (default), ``"ba"``, ``"trna"``, ``"ba+trna"``, ``"exact"`` (multilabel Dice),
            ``"argmax"``/``"tr"`` (``metric="acc"``).
        pruning_prob: ``"auto"`` (default), ``"auto-independent"``, ``"auto-correlated"`` or a number in
            ``[0, 1]`` (a class is kept only if its largest probability is above it; ``0``: no pruning).
        unassigned_policy: multiclass; ``"max_score"`` or ``"void"``.
        void_index: label of unassigned voxels under ``"void"`` (must lie outside ``[0, C)``).
        eps: tail probability of BA/TRNA's truncated law, ``0 < eps < 1``.
        clamp: clip values to ``[0, 1]`` first (spline overshoots up to ``1e-2``).
        device: where to compute (``None``: where the input lives).
        chunk_size: voxels per class and chunk of the streaming passes (``None``: automatic).
        guard: ``None``/``False``, ``True``, a :class:`~rankseg_monai.guard.Guard` or a dict of its settings.
        label_dtype: dtype of a multiclass label map (default int64).
        softmax, sigmoid: the input holds logits: apply this activation first (MONAI transforms and the CLI).
        temperature: divide logits by it before the activation (a positive scalar or one per channel).
        regions: decide on nested regions instead of classes (nnU-Net's ``dataset.json`` form: a mapping
            ``{name: labels}`` or a list of label lists, e.g. LiTS ``{"liver": [1, 2], "tumour": [2]}``); stored as
            a :class:`~rankseg_monai.solvers.regions.RegionTree`.  See ``docs/regions.md``.
        regions_class_order: the label painted for each region (nnU-Net's ``regions_class_order``); needed for a
            label map from region probabilities when a region has several labels of its own.
        region_probs: the channels are region probabilities (one sigmoid channel per region, in the order of
            ``regions``, as nnU-Net region models and MONAI's BraTS pipeline output) instead of class
            probabilities (softmax over the classes, background included: a region's probability is the sum of
            its classes').  Never guessed from the data.
        calibration: a fitted :class:`~rankseg_monai.calibrator.Calibration` (or the path of its
            ``calibration.json``, or its dict): the probabilities are calibrated (after any activation) with
            :func:`~rankseg_monai.calibrator.apply_calibration` wherever the temperature is applied, and the
            decision keeps argmax for the classes its recommendation says (``docs/calibration.md``).  Its input
            kind must match these options (:meth:`calibration_kind`).

    Example:
        >>> from rankseg_monai.options import RankSEGOptions
        >>> opts = RankSEGOptions(metric="IoU", pruning_prob="0.5")
        >>> opts.metric, opts.pruning_prob
        ('iou', 0.5)
        >>> RankSEGOptions(device="cdua")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: device='cdua' is not a torch device: use 'cpu', 'cuda' or 'cuda:N' ...
    """

    metric: str = "dice"
    smooth: float = 0.0
    output_mode: str = "multiclass"
    solver: str = "rma"
    pruning_prob: float | str = DEFAULT_PRUNING_PROB
    unassigned_policy: str = "max_score"
    void_index: int = DEFAULT_VOID_INDEX
    eps: float = 1e-4
    clamp: bool = False
    device: torch.device | None = None
    chunk_size: int | None = None
    guard: Guard | None = None
    label_dtype: torch.dtype = torch.int64
    softmax: bool = False
    sigmoid: bool = False
    temperature: float | tuple[float, ...] | None = None
    regions: RegionTree | None = None
    regions_class_order: tuple[int, ...] | None = None
    region_probs: bool = False
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "metric", check_choice("metric", self.metric, METRICS, METRIC_ALIASES))
        set_(self, "smooth", check_real("smooth", self.smooth, low=0.0))
        set_(self, "output_mode", check_choice("output_mode", self.output_mode, OUTPUT_MODES))
        set_(self, "solver", check_choice("solver", self.solver, SOLVERS))
        set_(self, "pruning_prob", parse_pruning_prob(self.pruning_prob))
        set_(self, "unassigned_policy", check_choice("unassigned_policy", self.unassigned_policy,
                                                     UNASSIGNED_POLICIES))
        set_(self, "void_index", check_int("void_index", self.void_index))
        eps = check_real("eps", self.eps)
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must lie strictly between 0 and 1, got {eps}")
        set_(self, "eps", eps)
        set_(self, "clamp", check_bool("clamp", self.clamp))
        set_(self, "device", parse_device(self.device))
        if self.chunk_size is not None and check_int("chunk_size", self.chunk_size) <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size}")
        set_(self, "guard", resolve_guard(self.guard))
        set_(self, "label_dtype", check_label_dtype(self.label_dtype))
        set_(self, "softmax", check_bool("softmax", self.softmax))
        set_(self, "sigmoid", check_bool("sigmoid", self.sigmoid))
        set_(self, "temperature", check_temperature(self.temperature))
        set_(self, "region_probs", check_bool("region_probs", self.region_probs))
        if self.regions is not None:
            tree = RegionTree.parse(self.regions, self.regions_class_order)
            set_(self, "regions", tree)
            set_(self, "regions_class_order", tree.paint)
        elif self.regions_class_order is not None:
            raise ValueError("regions_class_order needs regions: give the regions it paints (nnU-Net's dataset.json "
                             "labels)")
        set_(self, "calibration", resolve_calibration(self.calibration))
        self._check_combination()

    def _check_combination(self) -> None:
        allowed = supported_solvers(self.metric, self.output_mode)
        if self.solver not in allowed:
            raise ValueError(
                f"solver {solver_name(self.solver)!r} is not supported for metric={self.metric!r} with "
                f"output_mode={self.output_mode!r}; supported solvers: {', '.join(map(solver_name, allowed))}"
            )
        if self.output_mode == "multilabel" and self.unassigned_policy != "max_score":
            raise ValueError("unassigned_policy='void' only applies to output_mode='multiclass'")
        if self.void_index != DEFAULT_VOID_INDEX and (self.output_mode != "multiclass"
                                                      or self.unassigned_policy != "void"):
            raise ValueError("a non-default void_index requires output_mode='multiclass' and unassigned_policy='void'")
        if not -(2**63) <= self.void_index < 2**63:
            raise ValueError("void_index must fit in int64")
        if self.softmax and self.sigmoid:
            raise ValueError(
                "softmax=True and sigmoid=True are mutually exclusive: use softmax for mutually exclusive classes "
                "(output_mode='multiclass') or sigmoid for independent channels (output_mode='multilabel')"
            )
        if self.regions is not None:
            if self.solver != "rma" or self.metric == "acc":
                raise ValueError(f"regions are decided with solver='rma' and metric='dice' or 'iou' (got "
                                 f"solver={self.solver!r}, metric={self.metric!r})")
            if self.unassigned_policy != "max_score":
                raise ValueError("unassigned_policy='void' does not apply to regions: every voxel is decided (voxels "
                                 "in no region are background, label 0)")
            if self.guard is not None:
                raise ValueError("the guard does not apply to regions: drop guard, or decide the classes without "
                                 "regions")
        elif self.region_probs:
            raise ValueError("region_probs=True needs regions: give the region of each channel (e.g. "
                             "regions=[[1, 2, 3], [2, 3], [3]] for BraTS WT, TC, ET)")
        if self.temperature is not None and not (self.softmax or self.sigmoid):
            raise ValueError(
                "temperature scales logits before the activation: set softmax=True (or sigmoid=True) together with "
                "temperature, or drop temperature if the input already holds probabilities"
            )

        if self.calibration is not None:
            self.calibration.check_kind(self.calibration_kind(self.calibration.num_channels),
                                        None if self.regions is None
                                        else list(self.regions.names))
            if self.metric == "acc":
                raise ValueError("a calibration changes RankSEG's Dice/IoU decisions; metric='acc' is argmax "
                                 "(drop calibration)")

    # ------------------------------------------------------------------------------------------ derived
    def calibration_kind(self, num_channels: int | None = None) -> str:
        """What the (activated) channels are, as a calibration names it: ``"region-probabilities"`` (one sigmoid
        per region), ``"channel-probabilities"`` (independent channels: ``sigmoid``, multilabel decisions, or a
        single foreground channel) or ``"class-probabilities"`` (a softmax over the classes)."""
        if self.region_probs:
            return "region-probabilities"
        if self.regions is None and (self.sigmoid or num_channels == 1
                                     or (self.output_mode == "multilabel" and not self.softmax)):
            return "channel-probabilities"
        return "class-probabilities"

    @property
    def activation(self) -> str | None:
        """``"softmax"``, ``"sigmoid"`` or ``None`` (the input holds probabilities)."""
        return "softmax" if self.softmax else "sigmoid" if self.sigmoid else None

    @property
    def auto_pruning(self) -> bool:
        """Whether ``pruning_prob`` is one of the ``"auto"`` modes."""
        return isinstance(self.pruning_prob, str)

    def label_bounds(self, num_classes: int) -> tuple[int, int]:
        """Smallest and largest label of a multiclass map of ``num_classes`` classes (channels) under these
        options."""
        if self.regions is not None:
            return 0, self.regions.max_label if self.region_probs else max(num_classes - 1, self.regions.max_label)
        return label_range(num_classes, "max_score" if self.metric == "acc" else self.unassigned_policy,
                           self.void_index)

    def check_classes(self, num_classes: int) -> None:
        """The checks that need the number of classes ``C`` (run once per call, before any pass)."""
        if self.calibration is not None:
            self.calibration.check_kind(self.calibration_kind(num_classes))
            self.calibration.check_channels(num_classes)
        if self.regions is not None:
            if self.region_probs:
                self.regions.check_region_channels(num_classes, label_map=self.output_mode == "multiclass")
            else:
                self.regions.check_classes(num_classes)
            if self.output_mode == "multiclass":
                check_label_capacity(self.label_dtype, *self.label_bounds(num_classes))
            return
        allowed = supported_solvers(self.metric, self.output_mode, num_classes)
        if self.solver not in allowed:
            raise ValueError(
                f"solver {solver_name(self.solver)!r} is not supported for metric={self.metric!r} with "
                f"output_mode={self.output_mode!r}, single-channel input; supported solvers: "
                f"{', '.join(map(solver_name, allowed))}"
            )
        if self.output_mode != "multiclass":
            return
        if num_classes == 1:
            raise ValueError(
                "a single-channel input cannot give a multiclass label map: use output_mode='multilabel' for a "
                "foreground mask, or pass background and foreground channels"
            )
        if self.unassigned_policy == "void" and 0 <= self.void_index < num_classes:
            raise ValueError(f"void_index={self.void_index} is a class index; choose a value outside "
                             f"[0, {num_classes})")
        check_label_capacity(self.label_dtype, *self.label_bounds(num_classes))

    def replace(self, **changes: Any) -> RankSEGOptions:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-serialisable values (for settings files and logs)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.device | torch.dtype):
                v = str(v)
            elif isinstance(v, Guard):
                v = dataclasses.asdict(v)
                v["band"] = list(v["band"])
            elif isinstance(v, Calibration):
                v = {"sha256": v.sha256, "method": v.method, "input_kind": v.input_kind,
                     "argmax_channels": list(v.argmax_channels)}
            elif isinstance(v, RegionTree):
                v = {name: sorted(labels) for name, labels in zip(v.names, v.labels)}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out
