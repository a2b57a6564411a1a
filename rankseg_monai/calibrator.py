"""A fitted calibration of a model's probabilities: :class:`Calibration` (the object every entry carries),
its file ``calibration.json`` (:func:`load_calibration`, :meth:`Calibration.save`) and its one application,
:func:`apply_calibration`.

``rankseg-monai calibrate`` fits it on labelled validation cases (the cross-validation folds); ``predict
--calibration``, ``evaluate --calibration``, ``RankSEG(calibration=...)``, ``RankSEGd``, the handler and the bundle
config apply it to the probabilities before RankSEG decides.  It lives in the core (below the options) so that
:class:`~rankseg_monai.options.RankSEGOptions` can carry it; the fitting lives in
:mod:`rankseg_monai.calibration` and the command in :mod:`rankseg_monai.app.calibrate`.

**Applied to probabilities.**  A calibration scales the *log-probabilities* (softmax) or the *logits of the
probabilities* (sigmoid, region probabilities), which is what files on disk hold:

* softmax: ``q = softmax(log p / T + b)`` over the channels.  ``log p`` differs from the network's logits ``z`` by
  a per-voxel constant (``log p_c = z_c - logsumexp(z)``), so with one temperature this is exactly
  ``softmax(z / T)``: temperature scaling on logits, from the probabilities alone;
* sigmoid: ``q = sigmoid(logit(p) / T + b)`` per channel, exactly ``sigmoid(z / T + b)``.

**Exact 0s and 1s.**  Stored probabilities (float16 in nnU-Net's ``.npz``, rounded NIfTI maps) hold exact 0s and 1s,
whose log / logit is infinite.  Every value is first clipped to ``[EPS, 1 - EPS]`` with :data:`EPS` ``= 2**-24``
(5.96e-8, the smallest positive float16 value, and exact in float32 at both ends): a stored 0 is read as "at most
the smallest value the file could hold".  With ``T < 1`` (the common fix of an under-confident model) a clipped 0
stays below ``EPS``; with ``T > 1`` it rises to at most ``sigmoid(logit(EPS) / T)`` (``T = 2``: 2.4e-4), which is
the most the file can tell.  Values already inside ``[EPS, 1 - EPS]`` are untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._arrays import as_tensor
from ._files import atomic_write

__all__ = [
    "EPS",
    "FORMAT",
    "FORMAT_VERSION",
    "METHODS",
    "INPUT_KINDS",
    "FINGERPRINT_RULES",
    "Calibration",
    "CalibrationMismatch",
    "load_calibration",
    "resolve_calibration",
    "calibration_inputs",
    "apply_calibration",
    "case_fingerprint",
    "scored_structures",
    "structure_probabilities",
    "fingerprint_of",
]

#: probabilities are clipped to ``[EPS, 1 - EPS]`` before log / logit (2**-24: the smallest positive float16)
EPS = 2.0 ** -24
FORMAT = "rankseg-monai/calibration"
FORMAT_VERSION = 1
#: ``temperature``: one ``T``; ``per-class-temperature``: one per channel; ``vector``: per channel ``T`` and bias
METHODS = ("temperature", "per-class-temperature", "vector")
#: what the channels are: class probabilities (softmax), independent channels (sigmoid), region probabilities
INPUT_KINDS = ("class-probabilities", "channel-probabilities", "region-probabilities")
_KIND_ACTIVATION = {"class-probabilities": "softmax", "channel-probabilities": "sigmoid",
                    "region-probabilities": "sigmoid"}
RECOMMENDATIONS = ("rankseg", "argmax")
#: a case is outside the fingerprint of the calibration cases when, for some structure, its expected volume is
#: below ``min / volume_factor`` or above ``max * volume_factor``, its uncertain share above
#: ``max * uncertain_factor + uncertain_slack``, or its expected Dice below ``min - dice_slack``
FINGERPRINT_RULES = {"volume_factor": 1.5, "uncertain_factor": 1.5, "uncertain_slack": 0.005, "dice_slack": 0.05}
_CHUNK = 1 << 20  # voxels per chunk of the application (bounded temporaries)


class CalibrationMismatch(ValueError):
    """The calibration does not fit the data or the options (classes, regions, activation kind, method)."""


def _floats(name: str, values: Any, positive: bool = False) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor | np.ndarray):
        values = np.asarray(values).reshape(-1).tolist()
    if isinstance(values, int | float) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
        raise ValueError(f"calibration {name} must be a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
            raise ValueError(f"calibration {name} values must be finite numbers, got {v!r}")
        if positive and float(v) <= 0:
            raise ValueError(f"calibration {name} values must be > 0, got {v!r}")
        out.append(float(v))
    return tuple(out)


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration (validated on construction; frozen).

    Args:
        method: ``"temperature"``, ``"per-class-temperature"`` or ``"vector"``.
        input_kind: ``"class-probabilities"`` (softmax over the channels, background first),
            ``"channel-probabilities"`` (independent sigmoid channels) or ``"region-probabilities"`` (one sigmoid
            per region, nnU-Net's region models).
        temperature: one value (``"temperature"``) or one per channel.
        channels: the channel names (class labels ``0..C-1`` or region names), their count is the channel count.
        bias: ``"vector"`` only: one bias per channel.
        recommendation: per channel ``"rankseg"`` or ``"argmax"`` (from the held-out report: keep argmax where
            calibrated RankSEG did not beat it); ``None``: RankSEG everywhere.
        fingerprint: label-free statistics of the calibration cases (``{"structures": [...], "<stat>": {"min": [..],
            "max": [..]}}``); ``None``: no flagging.
        fit: how it was fitted (cases, voxels, sha256 of the inputs, NLL, folds), kept for the record.
        version: the package version that wrote it.

    Example:
        >>> import torch
        >>> from rankseg_monai.calibrator import Calibration, apply_calibration
        >>> cal = Calibration("temperature", "class-probabilities", [0.5], channels=[0, 1])
        >>> apply_calibration(torch.tensor([[0.8], [0.2]]), cal)   # softmax(log p / 0.5): sharper
        tensor([[0.9412],
                [0.0588]])
    """

    method: str
    input_kind: str
    temperature: tuple[float, ...]
    channels: tuple[Any, ...]
    bias: tuple[float, ...] | None = None
    recommendation: tuple[str, ...] | None = None
    fingerprint: Mapping[str, Any] | None = field(default=None, compare=False)
    fit: Mapping[str, Any] | None = field(default=None, compare=False)
    version: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.method not in METHODS:
            raise ValueError(f"calibration method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"calibration input_kind {self.input_kind!r}: use one of {', '.join(INPUT_KINDS)}")
        if isinstance(self.channels, str) or not isinstance(self.channels, Sequence) or not self.channels:
            raise ValueError(f"calibration channels must be a non-empty list of names, got {self.channels!r}")
        channels = tuple(c if isinstance(c, str) else int(c) for c in self.channels)
        set_(self, "channels", channels)
        n = len(channels)
        if self.activation == "softmax" and n < 2:
            raise ValueError("a softmax calibration needs at least 2 channels (background first)")
        t = _floats("temperature", self.temperature, positive=True)
        want = 1 if self.method == "temperature" else n
        if len(t) != want:
            raise ValueError(f"calibration method {self.method!r} needs {want} temperature value(s) for {n} channels, "
                             f"got {len(t)}")
        set_(self, "temperature", t)
        if self.method == "vector":
            if self.bias is None:
                raise ValueError("calibration method 'vector' needs a bias per channel")
            b = _floats("bias", self.bias)
            if len(b) != n:
                raise ValueError(f"calibration bias has {len(b)} values for {n} channels")
            set_(self, "bias", b)
        elif self.bias is not None:
            raise ValueError(f"calibration method {self.method!r} has no bias; use method 'vector'")
        if self.recommendation is not None:
            rec = tuple(str(r) for r in self.recommendation)
            if len(rec) != n or any(r not in RECOMMENDATIONS for r in rec):
                raise ValueError(f"calibration recommendation must be one of {RECOMMENDATIONS} per channel ({n}), got "
                                 f"{self.recommendation!r}")
            set_(self, "recommendation", rec)
        if self.fingerprint is not None and not isinstance(self.fingerprint, Mapping):
            raise ValueError("calibration fingerprint must be a mapping")

    # ------------------------------------------------------------------------------------------ derived
    @property
    def activation(self) -> str:
        """``"softmax"`` or ``"sigmoid"``: how the calibrated probabilities are formed."""
        return _KIND_ACTIVATION.get(self.input_kind, "softmax")

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def argmax_channels(self) -> tuple[int, ...]:
        """The channels the held-out report recommends argmax for (empty without a recommendation)."""
        return tuple(i for i, r in enumerate(self.recommendation or ()) if r == "argmax")

    def without_recommendation(self) -> Calibration:
        """A copy that decides every channel with RankSEG (``--ignore-recommendation``)."""
        return dataclasses.replace(self, recommendation=None)

    # ------------------------------------------------------------------------------------------ checks
    def check_channels(self, num_channels: int, where: str = "the data") -> None:
        """:class:`CalibrationMismatch` unless ``num_channels`` is the calibration's channel count."""
        if num_channels != self.num_channels:
            raise CalibrationMismatch(
                f"the calibration was fitted on {self.num_channels} channels ({_names(self.channels)}) but "
                f"{where} has {num_channels}: use the calibration.json fitted for this model (rankseg-monai calibrate "
                "on its validation folds)")

    def check_kind(self, input_kind: str, region_names: Sequence[str] | None = None) -> None:
        """:class:`CalibrationMismatch` unless the data are of the calibration's input kind (and regions)."""
        if input_kind != self.input_kind:
            raise CalibrationMismatch(
                f"the calibration was fitted on {self.input_kind} ({self.activation}) but these inputs are "
                f"{input_kind}: calibrate with the same --regions/--dataset-json/--region-probs/--sigmoid as predict")
        if region_names is not None and self.input_kind == "region-probabilities" \
                and tuple(region_names) != self.channels:
            raise CalibrationMismatch(f"the calibration's regions are {_names(self.channels)}, the data's "
                                      f"{_names(region_names)}: calibrate with the same regions")

    # ------------------------------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "method": self.method, "input_kind": self.input_kind,
                "activation": self.activation, "channels": list(self.channels),
                "temperature": list(self.temperature), "bias": None if self.bias is None else list(self.bias),
                "recommendation": None if self.recommendation is None else list(self.recommendation),
                "fingerprint": None if self.fingerprint is None else dict(self.fingerprint),
                "fit": None if self.fit is None else dict(self.fit), "package_version": self.version}

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        except (TypeError, ValueError) as err:
            raise ValueError(f"calibration is not JSON-serialisable with finite numbers: {err}") from None

    @property
    def sha256(self) -> str:
        """SHA-256 of :meth:`to_json` (the bytes :meth:`save` writes): what run settings and mask records keep."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike, *, protected: Sequence[str | os.PathLike] = ()) -> Path:
        """Write ``calibration.json`` atomically (a file on disk is complete or absent)."""
        text = self.to_json()
        return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), protected=protected)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str = "calibration") -> Calibration:
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise ValueError(f"{where} is not a calibration file (format {FORMAT!r}); write one with "
                             "rankseg-monai calibrate")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where} has calibration-file version {doc.get('version')!r}; this rankseg-monai reads "
                             f"version {FORMAT_VERSION}: fit it again with this version's rankseg-monai calibrate")
        try:
            cal = cls(method=doc.get("method"), input_kind=doc.get("input_kind"), temperature=doc.get("temperature"),
                      channels=doc.get("channels"), bias=doc.get("bias"), recommendation=doc.get("recommendation"),
                      fingerprint=doc.get("fingerprint"), fit=doc.get("fit"), version=doc.get("package_version"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}; fit it again with rankseg-monai calibrate") from None
        if doc.get("activation") not in (None, cal.activation):
            raise ValueError(f"{where}: activation {doc.get('activation')!r} contradicts input_kind "
                             f"{cal.input_kind!r}; fit it again with rankseg-monai calibrate")
        return cal

    # ------------------------------------------------------------------------------------------ fingerprint
    def outside(self, stats: Mapping[str, Sequence[float]]) -> list[str]:
        """Why a case's :func:`case_fingerprint` lies outside the calibration cases' (empty: inside)."""
        fp = self.fingerprint
        if not fp:
            return []
        r = FINGERPRINT_RULES
        names = list(fp.get("structures", []))
        reasons = []
        for k, name in enumerate(names):
            if k >= len(stats.get("volume", ())):
                break
            vol, unc, dice = stats["volume"][k], stats["uncertain"][k], stats["expected_dice"][k]
            lo, hi = fp["volume"]["min"][k], fp["volume"]["max"][k]
            if vol < lo / r["volume_factor"] or vol > hi * r["volume_factor"]:
                reasons.append(f"{name}: expected volume {vol:.0f} voxels outside the calibration cases' "
                               f"{lo:.0f}-{hi:.0f}")
            hi_u = fp["uncertain"]["max"][k]
            if unc > hi_u * r["uncertain_factor"] + r["uncertain_slack"]:
                reasons.append(f"{name}: uncertain share {unc:.3f} above the calibration cases' {hi_u:.3f}")
            lo_d = fp["expected_dice"]["min"][k]
            if dice < lo_d - r["dice_slack"]:
                reasons.append(f"{name}: expected Dice {dice:.3f} below the calibration cases' {lo_d:.3f}")
        return reasons


def _names(names: Sequence[Any]) -> str:
    return ", ".join(map(str, names))


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read and validate ``calibration.json``; a ``ValueError`` naming the fix otherwise."""
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the calibration file ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a calibration file (invalid JSON: {err}); write one with rankseg-monai "
                         "calibrate") from None
    return Calibration.from_dict(doc, str(path))


def resolve_calibration(value: Any) -> Calibration | None:
    """``None``, a :class:`Calibration`, a path to ``calibration.json``, or its dict (e.g. from a bundle config)."""
    if value is None or isinstance(value, Calibration):
        return value
    if isinstance(value, str | os.PathLike):
        return load_calibration(value)
    if isinstance(value, Mapping):
        return Calibration.from_dict(value)
    raise TypeError(f"calibration must be None, a rankseg_monai.calibrator.Calibration, a path to calibration.json "
                    f"or its dict; got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------ application
def calibration_inputs(probs: torch.Tensor, activation: str) -> torch.Tensor:
    """What a calibration scales: ``log p`` (softmax) or ``logit p`` (sigmoid), after clipping ``p`` to
    ``[EPS, 1 - EPS]`` (float32 at least; the one place this transform is done, for fitting and applying)."""
    p = probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs
    p = p.clamp(EPS, 1.0 - EPS)
    return torch.log(p) if activation == "softmax" else torch.log(p) - torch.log1p(-p)


def _per_channel(values: Sequence[float] | None, num_channels: int, x: torch.Tensor) -> torch.Tensor | None:
    if values is None:
        return None
    v = torch.tensor(values, dtype=x.dtype, device=x.device)
    return v.reshape(1, -1, 1) if v.numel() > 1 else v.reshape(1, 1, 1).expand(1, num_channels, 1)


def apply_calibration(probs: Any, calibration: Any, dim: int = 0) -> torch.Tensor:
    """Calibrated probabilities: ``softmax(log p / T + b)`` over ``dim`` or ``sigmoid(logit p / T + b)``.

    The one application of a calibration, used by every entry (CLI, transforms, handler, evaluation, the nnU-Net
    helper).

    Args:
        probs: probabilities (torch, ``MetaTensor`` or numpy), channels along ``dim``.
        calibration: a :class:`Calibration`, a :class:`~rankseg_monai.options.RankSEGOptions` carrying one (its
            ``calibration``), or ``None`` (returns the probabilities as a tensor, unchanged).
        dim: the channel dim (0 for channel-first items, 1 for batches).

    Returns:
        a plain float tensor (float32 at least) of the same shape, on the input's device; computed in chunks of
        voxels, so the temporaries stay small.

    Raises:
        CalibrationMismatch: the channel count differs from the calibration's.
    """
    cal = getattr(calibration, "calibration", calibration) if not isinstance(calibration, Calibration) else calibration
    x, _ = as_tensor(probs, "probs")
    if cal is None:
        return x
    if not isinstance(cal, Calibration):
        raise TypeError(f"calibration must be a rankseg_monai.calibrator.Calibration, got {type(cal).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"probabilities have dtype {x.dtype}: pass floating-point probabilities")
    dim = dim % x.ndim
    num_channels = x.shape[dim]
    cal.check_channels(num_channels)
    out_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    lead = int(np.prod(x.shape[:dim], dtype=np.int64))
    flat = x.reshape(lead, num_channels, -1)
    out = torch.empty(flat.shape, dtype=out_dtype, device=x.device)
    for start in range(0, flat.shape[-1], _CHUNK):
        chunk = calibration_inputs(flat[..., start:start + _CHUNK], cal.activation)
        chunk = chunk / _per_channel(cal.temperature, num_channels, chunk)
        bias = _per_channel(cal.bias, num_channels, chunk)
        if bias is not None:
            chunk = chunk + bias
        out[..., start:start + _CHUNK] = torch.softmax(chunk, 1) if cal.activation == "softmax" \
            else torch.sigmoid(chunk)
    return out.reshape(x.shape)


def case_fingerprint(structure_probs: Any, expected_dice: Sequence[float],
                     band: tuple[float, float] = (0.05, 0.95)) -> dict[str, list[float]]:
    """Label-free statistics of one case per structure: the expected volume ``sum(q)`` (voxels), the share of
    uncertain voxels (``q`` strictly inside ``band``) and the expected Dice (given).  ``structure_probs``
    ``(K, *spatial)`` holds the calibrated probability of each scored structure (a class, a region)."""
    x, _ = as_tensor(structure_probs, "structure_probs")
    flat = x.reshape(x.shape[0], -1)
    volume = [float(v) for v in flat.double().sum(1)]
    inside = ((flat > band[0]) & (flat < band[1])).double()
    uncertain = [float(v) for v in inside.mean(1)] if flat.shape[1] else [0.0] * flat.shape[0]
    return {"volume": volume, "uncertain": uncertain, "expected_dice": [float(v) for v in expected_dice]}


def scored_structures(num_channels: int, options: Any) -> list[int]:
    """Indices of the structures a report scores and a fingerprint keeps, among the decision's structures (the
    regions of ``options.regions``, else the channels): every region, the single foreground channel, or the
    classes but the background (channel 0)."""
    tree = getattr(options, "regions", None)
    if tree is not None:
        return list(range(len(tree)))
    return [0] if num_channels == 1 else list(range(1, num_channels))


def structure_probabilities(probs: Any, options: Any, structures: Sequence[int]) -> torch.Tensor:
    """``(K, *spatial)``: the probability of each structure in ``structures`` (indices as
    :func:`scored_structures`): the channel itself, or for regions from class probabilities the sum of the region's
    classes' (``probs`` channel-first)."""
    x, _ = as_tensor(probs, "probs")
    tree = getattr(options, "regions", None)
    if tree is None or getattr(options, "region_probs", False):
        return x[list(structures)]
    return torch.stack([x[sorted(tree.labels[r])].sum(0) for r in structures])


def fingerprint_of(probs: Any, expected: Sequence[float], options: Any) -> dict[str, list[float]]:
    """:func:`case_fingerprint` of one case's calibrated probabilities ``(C, *spatial)`` under ``options``
    (``expected``: the expected Dice of every structure of the decision, regions or channels; only the scored ones
    are kept)."""
    x, _ = as_tensor(probs, "probs")
    fg = scored_structures(x.shape[0], options)
    return case_fingerprint(structure_probabilities(x, options, fg), [float(expected[k]) for k in fg])
