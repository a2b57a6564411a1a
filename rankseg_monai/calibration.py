"""Is RankSEG safe on this model?  Calibration diagnostics, temperature scaling, and a label-free safeguard.

RankSEG picks the mask with the best *expected* Dice/IoU under the model's own probabilities, so it is only as
good as their calibration.  It uses two things the model says: the expected volume ``mu = sum(p)`` of every
class, and how likely the voxels just below ``p = 0.5`` are.  An under-confident model (flattened probabilities,
typical of a briefly trained network or of some Dice-loss models) inflates ``mu`` and the low probabilities
together, and RankSEG then selects a huge mask: on such a model thresholding gave Dice 0.82 and RankSEG 0.24.

This module gives three tools (``docs/calibration.md`` has the measurements):

* :func:`calibration_report` (labelled validation data): per class a reliability curve, the expected calibration
  error (ECE, the same binning as ``monai.metrics.CalibrationErrorMetric``), the expected volume ``sum(p)``
  against the true volume, the fraction of uncertain voxels, optionally the Dice of argmax vs RankSEG on those
  cases, and a plain-language verdict.  :func:`plot_reliability` draws it (PNG, Agg canvas).
* :func:`fit_temperature` (labelled validation data): temperature scaling by minimum negative log-likelihood,
  :func:`save_temperature` / :func:`load_temperature` keep it in a small JSON file, and the ``RankSEG`` /
  ``RankSEGd`` transforms apply it with ``temperature=``.  :func:`fit_vector_scaling` fits a per-class scale
  and bias (Platt / vector scaling) for :func:`apply_vector_scaling`.
* :func:`guarded_rankseg` (no labels, at inference): RankSEG, except for the classes lost in a probability fog
  (more than half of the image uncertain for the class, and RankSEG's mask larger than argmax's); those fall
  back to argmax (multiclass) or ``p > 0.5`` (multilabel).  It catches gross under-confidence only; see
  :class:`Guard`.

Inputs are channel-first items ``(C, *spatial)`` (probabilities or logits, torch or numpy) with label maps
``(1, *spatial)`` (class indices) or one-hot / multi-label masks ``(C, *spatial)``; :func:`guarded_rankseg` takes
batches ``(B, C, *spatial)`` like :func:`rankseg_monai.functional.rankseg`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .functional import numpy_as_tensor, rankseg

__all__ = [
    "UNCERTAIN_BAND",
    "VERDICT_THRESHOLDS",
    "ClassCalibration",
    "CalibrationReport",
    "reliability_bins",
    "calibration_report",
    "plot_reliability",
    "fit_temperature",
    "apply_temperature",
    "fit_vector_scaling",
    "apply_vector_scaling",
    "save_temperature",
    "load_temperature",
    "Guard",
    "guard_statistics",
    "guarded_rankseg",
]

#: probabilities strictly inside this band count as "uncertain"
UNCERTAIN_BAND: tuple[float, float] = (0.05, 0.95)
_FORMAT = "rankseg-monai/temperature"
_CHUNK = 1 << 20  # voxels per chunk of the report's float64 sums
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- inputs
def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return numpy_as_tensor(x)
    if isinstance(x, torch.Tensor):
        return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _as_list(x: Any, name: str) -> list:
    if isinstance(x, torch.Tensor | np.ndarray):
        return [x]
    if isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0:
        return list(x)
    raise TypeError(f"{name} must be a non-empty list of channel-first arrays (C, *spatial), got {type(x).__name__}")


def _check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode.strip().lower() not in ("softmax", "sigmoid"):
        raise ValueError(f"mode must be 'softmax' (mutually exclusive classes) or 'sigmoid' (multilabel), got {mode!r}")
    return mode.strip().lower()


def _targets(label: Any, num_classes: int, spatial: tuple[int, ...], mode: str, case: int) -> torch.Tensor:
    """bool ``(C, N)`` one-vs-rest truth from a label map ``(1, *spatial)`` or masks ``(C, *spatial)``."""
    y = _as_tensor(label, "label")
    where = f"labels[{case}]"
    if tuple(y.shape[1:]) != spatial:
        raise ValueError(f"{where} has shape {tuple(y.shape)}; expected (1, *spatial) or (C, *spatial) with spatial "
                         f"shape {spatial}")
    if y.shape[0] == num_classes and (num_classes > 1 or mode == "sigmoid"):
        if not bool(torch.all((y == 0) | (y == 1))):
            raise ValueError(f"{where} must hold 0/1 masks (one channel per class)")
        t = y.reshape(num_classes, -1) != 0
        if mode == "softmax" and not bool(torch.all(t.sum(0) == 1)):
            raise ValueError(f"{where}: a one-hot label needs exactly one class per voxel in mode='softmax'")
        return t
    if y.shape[0] != 1:
        raise ValueError(f"{where} has {y.shape[0]} channels; expected 1 (label map) or {num_classes} (one-hot)")
    if mode == "sigmoid":
        raise ValueError(f"{where} is a label map but mode='sigmoid' with {num_classes} channels needs one 0/1 mask "
                         "per channel (C, *spatial)")
    flat = y.reshape(-1)
    if flat.is_floating_point():
        if not bool(torch.all(flat == flat.round())):
            raise ValueError(f"{where} is a label map with non-integer values")
        flat = flat.long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        raise ValueError(f"{where} holds labels outside [0, {num_classes}): {int(flat.min())}..{int(flat.max())}")
    return flat.unsqueeze(0) == torch.arange(num_classes, device=flat.device).unsqueeze(1)


def _pairs(xs: Any, labels: Any, mode: str, what: str):
    xs, labels = _as_list(xs, what), _as_list(labels, "labels")
    if len(xs) != len(labels):
        raise ValueError(f"got {len(xs)} {what} but {len(labels)} labels")
    num_classes = None
    for i, (x, y) in enumerate(zip(xs, labels)):
        x = _as_tensor(x, what)
        if x.ndim < 2 or not x.is_floating_point():
            raise ValueError(f"{what}[{i}] must be a floating-point channel-first array (C, *spatial), got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        if num_classes is None:
            num_classes = x.shape[0]
            if mode == "softmax" and num_classes < 2:
                raise ValueError("mode='softmax' needs at least 2 channels; use mode='sigmoid' for a single "
                                 "foreground channel")
        elif x.shape[0] != num_classes:
            raise ValueError(f"{what}[{i}] has {x.shape[0]} channels, {what}[0] has {num_classes}")
        yield i, x.reshape(num_classes, -1), _targets(y, num_classes, tuple(x.shape[1:]), mode, i)


# ---------------------------------------------------------------------------------------------- reliability
def reliability_bins(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15, mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class bin sums ``(count, sum_p, sum_y)`` (float64 ``(C, n_bins)``) of ``probs`` ``(C, N)`` against the
    bool ``target`` ``(C, N)``, over the voxels where ``mask`` (bool ``(C, N)``, default all) is true.

    Bin edges and membership are exactly those of ``monai.metrics.calibration_binning(right=False)`` (float32
    edges ``linspace(0, 1 + eps, n_bins + 1)``, ``torch.bucketize``), only the sums are float64 and can be
    accumulated over cases.
    """
    boundaries = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, n_bins + 1, device=probs.device)
    num_classes = probs.shape[0]
    p32 = probs.float()
    idx = torch.bucketize(p32, boundaries[1:], right=False).clamp(max=n_bins - 1)
    idx = (idx + n_bins * torch.arange(num_classes, device=probs.device).unsqueeze(1)).reshape(-1)
    size = num_classes * n_bins
    w = torch.ones_like(p32, dtype=torch.float64) if mask is None else mask.double()
    count = torch.bincount(idx, weights=w.reshape(-1), minlength=size)
    sum_p = torch.bincount(idx, weights=(p32.double() * w).reshape(-1), minlength=size)
    sum_y = torch.bincount(idx, weights=(target.double() * w).reshape(-1), minlength=size)
    return tuple(t.reshape(num_classes, n_bins) for t in (count, sum_p, sum_y))  # type: ignore[return-value]


@dataclass
class ClassCalibration:
    """Calibration of one class (one-vs-rest), pooled over all cases.

    Attributes:
        index: channel index.
        bin_edges: the ``n_bins + 1`` bin edges.
        bin_count, bin_mean_p, bin_frequency: voxels, mean predicted probability and observed frequency of the
            class per bin (NaN for an empty bin): the reliability curve is ``bin_frequency`` against
            ``bin_mean_p``.
        ece: expected calibration error over all voxels (``sum_b n_b |mean_p_b - freq_b| / N``; MONAI's
            ``CalibrationErrorMetric`` on all cases pooled).  Dominated by the easy voxels far from the object.
        ece_case_mean: MONAI ``CalibrationErrorMetric`` per case, averaged over cases.
        ece_uncertain: the same error restricted to the uncertain voxels (``p`` inside :data:`UNCERTAIN_BAND`),
            the ones RankSEG decides about; NaN without uncertain voxels.
        mean_p_uncertain, frequency_uncertain: mean probability and observed frequency over those voxels
            (frequency < mean: the model over-estimates them, RankSEG will over-segment).
        expected_volume, true_volume: ``sum(p)`` and the number of true voxels, summed over cases.
        volume_ratio: ``expected_volume / true_volume`` (inf for an absent class with ``sum(p) > 0``).
        uncertain_fraction: fraction of all voxels with ``p`` inside the band.
        dice_argmax, dice_rankseg: mean Dice over cases of argmax (``p > 0.5`` in sigmoid mode) and of RankSEG
            (``None`` unless ``compare_decisions``); an empty prediction of an absent class scores 1.
        holds: whether RankSEG's assumptions (calibration of the volume and of the uncertain voxels) hold for
            this class (see :func:`calibration_report`).
        verdict: plain-language verdict, with the Dice comparison as a note.
    """

    index: int
    bin_edges: list[float]
    bin_count: list[int]
    bin_mean_p: list[float]
    bin_frequency: list[float]
    ece: float
    ece_case_mean: float
    ece_uncertain: float
    mean_p_uncertain: float
    frequency_uncertain: float
    expected_volume: float
    true_volume: float
    volume_ratio: float
    uncertain_fraction: float
    dice_argmax: float | None
    dice_rankseg: float | None
    holds: bool
    verdict: str


@dataclass
class CalibrationReport:
    """What :func:`calibration_report` returns: settings, per-class results, and :meth:`format`."""

    mode: str
    n_bins: int
    cases: int
    voxels: int
    thresholds: dict[str, float]
    classes: list[ClassCalibration] = field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        return [c.verdict for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN stays NaN: ``json.dumps`` writes ``NaN``)."""
        return asdict(self)

    def format(self) -> str:
        """A small text table plus the verdicts."""
        head = (f"{'class':>5} {'ECE':>7} {'ECE unc.':>9} {'E[vol]/vol':>11} {'uncertain':>10} {'Dice argmax':>12} "
                f"{'Dice RankSEG':>13}  holds")
        lines = [f"calibration report: {self.cases} cases, {self.voxels} voxels, mode={self.mode}, "
                 f"{self.n_bins} bins", head, "-" * len(head)]
        for c in self.classes:
            da = "-" if c.dice_argmax is None else f"{c.dice_argmax:.4f}"
            dr = "-" if c.dice_rankseg is None else f"{c.dice_rankseg:.4f}"
            lines.append(f"{c.index:>5} {c.ece:>7.4f} {c.ece_uncertain:>9.4f} {c.volume_ratio:>11.3f} "
                         f"{c.uncertain_fraction:>10.1%} {da:>12} {dr:>13}  {'yes' if c.holds else 'NO'}")
        lines.extend(self.verdicts)
        return "\n".join(lines)

    __str__ = format


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-class Dice of bool ``(C, N)`` masks; 1 when both are empty (MONAI ``ignore_empty=False``)."""
    inter = (pred & target).sum(-1).double()
    total = pred.sum(-1).double() + target.sum(-1).double()
    return torch.where(total > 0, 2.0 * inter / total.clamp(min=1), 1.0)


def _decisions(p: torch.Tensor, mode: str, rankseg_kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(C, N)`` masks of argmax / threshold and of RankSEG for one case."""
    num_classes = p.shape[0]
    if mode == "softmax":
        classes = torch.arange(num_classes, device=p.device).unsqueeze(1)
        base = p.argmax(0, keepdim=True) == classes
        kw = {"output_mode": "multiclass", **rankseg_kwargs}
        out = rankseg(p[None], **kw)
        rs = out[0].unsqueeze(0) == classes if out.ndim == 2 else out[0]
    else:
        base = p > 0.5
        kw = {"output_mode": "multilabel", **rankseg_kwargs}
        out = rankseg(p[None], **kw)
        rs = out[0] if out.ndim == 3 else out[0].unsqueeze(0) == torch.arange(num_classes).unsqueeze(1)
    return base, rs


def _verdict(c: ClassCalibration, th: Mapping[str, float]) -> tuple[bool, str]:
    """``holds`` from the calibration criteria alone; the Dice comparison and the uncertain share are notes."""
    problems = []
    vr = c.volume_ratio
    if c.true_volume == 0:
        if c.expected_volume > th["absent_volume"]:
            problems.append(f"the class is absent but the model expects {c.expected_volume:.1f} voxels of it")
    elif not (1.0 / th["volume_ratio"] <= vr <= th["volume_ratio"]):
        how = "over" if vr > 1 else "under"
        problems.append(f"the model expects {vr:.2f}x the true volume (sum(p) {how}-estimates it; RankSEG will "
                        f"{how}-segment)")
    if math.isfinite(c.ece_uncertain) and c.ece_uncertain > th["ece_uncertain"]:
        how = "over" if c.mean_p_uncertain > c.frequency_uncertain else "under"
        problems.append(f"its uncertain voxels are {how}-estimated (mean p {c.mean_p_uncertain:.3f}, observed "
                        f"frequency {c.frequency_uncertain:.3f}, ECE there {c.ece_uncertain:.3f})")
    notes = []
    if c.dice_argmax is not None and c.dice_rankseg is not None:
        notes.append(f"On these cases Dice argmax {c.dice_argmax:.3f} -> RankSEG {c.dice_rankseg:.3f}")
        if problems and c.dice_rankseg < c.dice_argmax - th["dice_loss"]:
            notes[-1] += ": the miscalibration costs Dice"
        elif not problems and c.dice_rankseg < c.dice_argmax - th["dice_loss"]:
            notes[-1] += (" although the class looks calibrated (in multiclass mode RankSEG trades the Dice of "
                          "large classes, e.g. background, for that of the others)")
        notes[-1] += "."
    if c.uncertain_fraction > th["uncertain_fraction"]:
        notes.append(f"{c.uncertain_fraction:.0%} of all voxels are uncertain for this class, more than trained "
                     "networks usually leave; RankSEG's masks will differ a lot from argmax's, and guarded_rankseg "
                     "switches such classes back to argmax when RankSEG grows them.")
    tail = (" " + " ".join(notes)) if notes else ""
    if not problems:
        vol = f"expected/true volume {vr:.2f}" if c.true_volume > 0 else "absent, nothing expected"
        return True, (f"RankSEG's assumptions hold for class {c.index}: {vol}, ECE {c.ece:.4f} (uncertain voxels "
                      f"{c.ece_uncertain:.3f}).{tail}")
    return False, (f"RankSEG's assumptions do not hold for class {c.index}: " + "; ".join(problems)
                   + ". Fit a temperature on held-out labelled cases (fit_temperature) and check again, or use "
                   f"guarded_rankseg / argmax for this class.{tail}")


#: default pass marks of the verdict (see :func:`calibration_report`)
VERDICT_THRESHOLDS: dict[str, float] = {
    "volume_ratio": 1.25,
    "ece_uncertain": 0.10,
    "uncertain_fraction": 0.25,
    "dice_loss": 0.01,
    "absent_volume": 1.0,
}


@torch.no_grad()
def calibration_report(
    probs_list: Any,
    labels_list: Any,
    mode: str = "softmax",
    n_bins: int = 15,
    *,
    compare_decisions: bool = True,
    thresholds: Mapping[str, float] | None = None,
    rankseg_kwargs: Mapping[str, Any] | None = None,
) -> CalibrationReport:
    """Per-class calibration of a model on labelled cases, and whether RankSEG's assumptions hold.

    Args:
        probs_list: list of probabilities ``(C, *spatial)`` (softmax or sigmoid outputs; after
            temperature scaling to check a fitted temperature); a single array is one case.
        labels_list: matching label maps ``(1, *spatial)`` (softmax mode) or 0/1 masks ``(C, *spatial)``.
        mode: ``"softmax"`` (mutually exclusive classes, decisions by argmax and multiclass RankSEG) or
            ``"sigmoid"`` (multilabel, decisions by ``p > 0.5`` and multilabel RankSEG).
        n_bins: bins of the reliability curve (MONAI's binning).
        compare_decisions: also run argmax and RankSEG on every case and report their mean Dice (cheap next to
            inference; the most direct evidence).
        thresholds: override the marks in :data:`VERDICT_THRESHOLDS`.  The class *holds* when ``sum(p)`` is
            within the factor ``volume_ratio`` of the true volume (``absent_volume``: the ``sum(p)`` allowed for a
            class absent from every case) and the calibration error among its uncertain voxels is at most
            ``ece_uncertain``.  Notes (not failures): the Dice comparison (flagged when RankSEG trails argmax by
            more than ``dice_loss``) and an uncertain share above ``uncertain_fraction``.
        rankseg_kwargs: options for :func:`rankseg_monai.functional.rankseg` (default: Dice, RMA).

    Returns:
        a :class:`CalibrationReport`; ``str(report)`` is a table with one verdict per class.
    """
    mode = _check_mode(mode)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    th = dict(VERDICT_THRESHOLDS)
    if thresholds:
        unknown = set(thresholds) - set(th)
        if unknown:
            raise ValueError(f"unknown thresholds {sorted(unknown)}; known: {sorted(th)}")
        th.update({k: float(v) for k, v in thresholds.items()})
    from monai.metrics import CalibrationErrorMetric

    monai_ece = CalibrationErrorMetric(num_bins=n_bins, include_background=True, metric_reduction="none")
    lo, hi = UNCERTAIN_BAND
    acc: dict[str, Any] = {}
    cases = voxels = 0
    dice_a, dice_r = [], []
    for _, p, t in _pairs(probs_list, labels_list, mode, "probs"):
        p = p.double() if p.dtype == torch.float64 else p.float()
        if not bool(torch.isfinite(p).all()) or float(p.min()) < 0 or float(p.max()) > 1:
            raise ValueError("probabilities must be finite and within [0, 1]; pass softmax/sigmoid outputs (use "
                             "apply_temperature to turn logits into probabilities)")
        for start in range(0, p.shape[1], _CHUNK):  # float64 temporaries stay chunk-sized
            pc, tc = p[:, start:start + _CHUNK], t[:, start:start + _CHUNK]
            band = (pc > lo) & (pc < hi)
            sums = {
                "bins": reliability_bins(pc, tc, n_bins),
                "band": (band.sum(-1).double(), torch.where(band, pc.double(), 0.0).sum(-1),
                         (band & tc).sum(-1).double()),
                "band_bins": reliability_bins(pc, tc, n_bins, mask=band),
                "volume": (pc.double().sum(-1), tc.sum(-1).double()),
            }
            for key, value in sums.items():
                acc[key] = value if key not in acc else tuple(a + b for a, b in zip(acc[key], value))
        monai_ece(y_pred=p.float()[None], y=t.float()[None])
        if compare_decisions:
            base, rs = _decisions(p, mode, rankseg_kwargs or {})
            dice_a.append(_dice(base, t))
            dice_r.append(_dice(rs, t))
        cases += 1
        voxels += p.shape[1]
    count, sum_p, sum_y = acc["bins"]
    n_band, sp_band, sy_band = acc["band"]
    _, bp, by = acc["band_bins"]
    mu, vol = acc["volume"]
    ece_cases = monai_ece.aggregate()  # (cases, C), NaN-free for non-empty inputs
    edges = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, n_bins + 1).double().tolist()
    report = CalibrationReport(mode=mode, n_bins=n_bins, cases=cases, voxels=voxels, thresholds=th)
    for k in range(count.shape[0]):
        nonempty = count[k] > 0
        mean_p = torch.where(nonempty, sum_p[k] / count[k].clamp(min=1), float("nan"))
        freq = torch.where(nonempty, sum_y[k] / count[k].clamp(min=1), float("nan"))
        nb = float(n_band[k])
        ece_unc = float((bp[k] - by[k]).abs().sum() / nb) if nb > 0 else math.nan
        m, v = float(mu[k]), float(vol[k])
        c = ClassCalibration(
            index=k,
            bin_edges=edges,
            bin_count=[int(x) for x in count[k].tolist()],
            bin_mean_p=mean_p.tolist(),
            bin_frequency=freq.tolist(),
            ece=float((sum_p[k] - sum_y[k]).abs().sum() / count[k].sum()),
            ece_case_mean=float(ece_cases[:, k].double().nanmean()),
            ece_uncertain=ece_unc,
            mean_p_uncertain=float(sp_band[k]) / nb if nb > 0 else math.nan,
            frequency_uncertain=float(sy_band[k]) / nb if nb > 0 else math.nan,
            expected_volume=m,
            true_volume=v,
            volume_ratio=m / v if v > 0 else (math.inf if m > 0 else math.nan),
            uncertain_fraction=nb / voxels,
            dice_argmax=float(torch.stack(dice_a)[:, k].mean()) if dice_a else None,
            dice_rankseg=float(torch.stack(dice_r)[:, k].mean()) if dice_r else None,
            holds=True,
            verdict="",
        )
        c.holds, c.verdict = _verdict(c, th)
        report.classes.append(c)
    return report


def plot_reliability(report: CalibrationReport, path: str | os.PathLike, classes: Sequence[int] | None = None,
                     dpi: int = 100, title: str | None = None) -> Path:
    """Reliability diagram (observed frequency against predicted probability per bin, with the diagonal) and the
    bin counts (log scale) of every class in ``classes`` (default: all), written as a PNG (Agg canvas, no pyplot
    state; atomic write).  Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = [c for c in report.classes if classes is None or c.index in classes]
    if not chosen:
        raise ValueError(f"no class of the report matches classes={classes!r}")
    fig = Figure(figsize=(3.6 * len(chosen), 5.4))
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, len(chosen), height_ratios=(3, 1), hspace=0.08)
    for j, c in enumerate(chosen):
        ax = fig.add_subplot(gs[0, j])
        axh = fig.add_subplot(gs[1, j], sharex=ax)
        edges = np.asarray(c.bin_edges)
        centres = 0.5 * (edges[:-1] + edges[1:])
        mp, fr, n = np.asarray(c.bin_mean_p), np.asarray(c.bin_frequency), np.asarray(c.bin_count)
        ok = n > 0
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
        ax.bar(centres[ok], fr[ok], width=np.diff(edges)[ok], color="tab:blue", alpha=0.35, edgecolor="tab:blue",
               label="observed frequency")
        ax.plot(mp[ok], fr[ok], "o-", color="tab:red", ms=3, lw=1.2, label="per bin (mean p, frequency)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"class {c.index}: {'holds' if c.holds else 'does NOT hold'}\nECE {c.ece:.4f}, uncertain "
                     f"{c.ece_uncertain:.3f}, E[vol]/vol {c.volume_ratio:.2f}", fontsize=9)
        ax.tick_params(labelbottom=False, labelsize=8)
        if j == 0:
            ax.set_ylabel("observed frequency")
            ax.legend(fontsize=7, loc="upper left")
        axh.bar(centres[ok], n[ok], width=np.diff(edges)[ok], color="0.5")
        axh.set_yscale("log")
        axh.set_xlabel("predicted probability")
        axh.tick_params(labelsize=8)
        if j == 0:
            axh.set_ylabel("voxels")
    fig.suptitle(title or f"reliability ({report.cases} cases, mode={report.mode})", fontsize=10)
    path = Path(path)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)
    return path


# -------------------------------------------------------------------------------------- temperature scaling
def _gather(logits: Any, labels: Any, mode: str, max_voxels: int | None, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(M, C)`` float64 and targets (class indices ``(M,)`` or 0/1 float64 ``(M, C)``) of a systematic
    sample of at most about ``max_voxels`` voxels over all cases (every voxel if they fit)."""
    logits, labels = _as_list(logits, "logits"), _as_list(labels, "labels")
    total = sum(int(np.prod(_as_tensor(x, "logits").shape[1:])) for x in logits)
    step = 1 if not max_voxels or total <= max_voxels else math.ceil(total / max_voxels)
    gen = torch.Generator().manual_seed(int(seed))
    zs, ys = [], []
    for _, z, t in _pairs(logits, labels, mode, "logits"):
        if not bool(torch.isfinite(z).all()):
            raise ValueError("logits must be finite (pass raw network outputs or log-probabilities)")
        n = z.shape[1]
        offset = int(torch.randint(0, step, (1,), generator=gen)) if step > 1 else 0
        idx = torch.arange(offset, n, step, device=z.device)
        zs.append(z[:, idx].double().T.cpu())
        tt = t[:, idx].T.cpu()
        ys.append(tt.double() if mode == "sigmoid" else tt.double().argmax(1))
    return torch.cat(zs), torch.cat(ys)


def _nll(z: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "softmax":
        return torch.nn.functional.cross_entropy(z, y)
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y)


def _lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int) -> int:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return int(opt.state[opt._params[0]].get("n_iter", 0))


def _log_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """log of the temperature bounds ``(low, high)``, checked: ``0 < low < 1 < high < inf``."""
    lo_t, hi_t = (float(b) for b in bounds)
    if not (0 < lo_t < 1 < hi_t < math.inf):
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high < inf, got {bounds}")
    return math.log(lo_t), math.log(hi_t)


def fit_temperature(
    logits: Any,
    labels: Any,
    mode: str = "softmax",
    per_class: bool = False,
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
    max_voxels: int | None = 2_000_000,
    seed: int = 0,
    max_iter: int = 200,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Temperature scaling: the ``T`` that minimises the negative log-likelihood of ``softmax(z / T)`` (or
    ``sigmoid(z / T)``) on labelled held-out cases.

    ``T > 1`` flattens an over-confident model, ``T < 1`` sharpens an under-confident one (the case where plain
    RankSEG over-segments).  Argmax decisions never change with a single ``T``; RankSEG's do.

    Args:
        logits: list of channel-first logits ``(C, *spatial)`` (the network output before softmax/sigmoid;
            log-probabilities work too for a single softmax temperature); a single array is one case.
        labels: matching label maps ``(1, *spatial)`` or 0/1 masks ``(C, *spatial)`` (required for sigmoid with
            ``C > 1``).
        mode: ``"softmax"`` or ``"sigmoid"``, as the model is used.
        per_class: one temperature per channel (``softmax(z_c / T_c)``: vector scaling without bias; with
            log-probability inputs this depends on the per-voxel constant, so pass raw logits) instead of one.
        bounds: ``T`` is kept inside these (the optimisation runs on ``log T`` squashed into the bounds); a
            result at a bound is warned about.
        max_voxels: fit on a systematic sample of about this many voxels over all cases (random offset per
            case, ``seed``); ``None`` uses every voxel.  2e6 voxels estimate ``T`` to well under 1%.
        max_iter: L-BFGS iterations (strong Wolfe line search).
        return_info: also return ``{"nll_before", "nll_after", "voxels", "iterations"}``.

    Returns:
        float64 tensor of temperatures, shape ``(1,)`` or ``(C,)``: pass it as ``temperature=`` to
        ``rankseg_monai.RankSEG`` / ``RankSEGd`` (with ``softmax=True`` / ``sigmoid=True``), or to
        :func:`apply_temperature`; keep it with :func:`save_temperature`.
    """
    mode = _check_mode(mode)
    lo, hi = _log_bounds(bounds)
    z, y = _gather(logits, labels, mode, max_voxels, seed)
    num_classes = z.shape[1]
    k = num_classes if per_class else 1
    u0 = math.log(-lo / hi)  # logit of (0 - lo) / (hi - lo): T = 1 at the start
    u = torch.full((k,), u0, dtype=torch.float64, requires_grad=True)

    def temperature() -> torch.Tensor:
        return torch.exp(lo + (hi - lo) * torch.sigmoid(u))

    def loss() -> torch.Tensor:
        return _nll(z / temperature(), y, mode)

    with torch.no_grad():
        before = float(_nll(z, y, mode))
    with torch.enable_grad():
        iters = _lbfgs([u], loss, max_iter)
    with torch.no_grad():
        T = temperature().detach().clone()
        after = float(_nll(z / T, y, mode))
    if bool(((T <= math.exp(lo) * 1.001) | (T >= math.exp(hi) * 0.999)).any()):
        warnings.warn(f"fitted temperature {T.tolist()} is at the bounds {bounds}: the logits are far from "
                      "calibrated (or the labels do not match them); check calibration_report", stacklevel=2)
    if return_info:
        return T, {"nll_before": before, "nll_after": after, "voxels": int(z.shape[0]), "iterations": iters}
    return T


def _channel_shape(v: torch.Tensor, ndim: int, dim: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = -1 if v.numel() > 1 else 1
    return shape


def apply_temperature(logits: torch.Tensor | np.ndarray, temperature: Any, mode: str = "softmax", dim: int = 0
                      ) -> torch.Tensor:
    """Probabilities ``softmax(z / T, dim)`` or ``sigmoid(z / T)``; ``dim`` is the channel dim (0 for
    channel-first items, 1 for batches); ``temperature`` a scalar or one value per channel."""
    mode = _check_mode(mode)
    z = _as_tensor(logits, "logits")
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    t = torch.as_tensor(temperature, dtype=z.dtype, device=z.device).reshape(-1)
    dim = dim % z.ndim
    if t.numel() not in (1, z.shape[dim]):
        raise ValueError(f"{t.numel()} temperatures for {z.shape[dim]} channels")
    if not bool(torch.all(t > 0)) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()}")
    z = z / t.reshape(_channel_shape(t, z.ndim, dim))
    return torch.softmax(z, dim=dim) if mode == "softmax" else torch.sigmoid(z)


def fit_vector_scaling(
    logits: Any,
    labels: Any,
    mode: str = "softmax",
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
    max_voxels: int | None = 2_000_000,
    seed: int = 0,
    max_iter: int = 200,
) -> dict[str, torch.Tensor]:
    """Per-class scale and bias, ``z_c / T_c + b_c``, by minimum NLL (vector scaling for softmax, Platt scaling
    per channel for sigmoid).  Corrects a biased model (e.g. a Dice-loss model that over-states a class
    everywhere), which a temperature cannot.  Returns ``{"temperature": (C,), "bias": (C,)}`` (float64); apply
    with :func:`apply_vector_scaling`.  For softmax the bias of channel 0 is fixed at 0 (only differences
    matter).  The transforms' ``temperature=`` option cannot carry the bias: apply it before RankSEG."""
    mode = _check_mode(mode)
    lo, hi = _log_bounds(bounds)
    z, y = _gather(logits, labels, mode, max_voxels, seed)
    num_classes = z.shape[1]
    u = torch.full((num_classes,), math.log(-lo / hi), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    fixed = torch.ones(num_classes, dtype=torch.float64)
    if mode == "softmax":
        fixed[0] = 0.0

    def params() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.exp(lo + (hi - lo) * torch.sigmoid(u)), b * fixed

    def loss() -> torch.Tensor:
        T, bias = params()
        return _nll(z / T + bias, y, mode)

    with torch.enable_grad():
        _lbfgs([u, b], loss, max_iter)
    with torch.no_grad():
        T, bias = params()
    return {"temperature": T.detach().clone(), "bias": bias.detach().clone()}


def apply_vector_scaling(logits: torch.Tensor | np.ndarray, params: Mapping[str, Any], mode: str = "softmax",
                         dim: int = 0) -> torch.Tensor:
    """Probabilities from logits with a :func:`fit_vector_scaling` result (``dim``: the channel dim)."""
    mode = _check_mode(mode)
    z = _as_tensor(logits, "logits")
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    dim = dim % z.ndim
    t = torch.as_tensor(params["temperature"], dtype=z.dtype, device=z.device).reshape(-1)
    b = torch.as_tensor(params["bias"], dtype=z.dtype, device=z.device).reshape(-1)
    z = z / t.reshape(_channel_shape(t, z.ndim, dim)) + b.reshape(_channel_shape(b, z.ndim, dim))
    return torch.softmax(z, dim=dim) if mode == "softmax" else torch.sigmoid(z)


# ---------------------------------------------------------------------------------------------- persistence
def _atomic_write(path: Path, write, binary: bool = False) -> None:
    """``write(fileobj)`` into a temporary file beside ``path``, fsync, then ``os.replace`` (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_temperatures(values: Any) -> list[float]:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1) if not isinstance(values, bool) else None
    if t is None or t.numel() == 0:
        raise ValueError(f"temperature must be a positive number or a non-empty sequence of them, got {values!r}")
    if not bool(torch.isfinite(t).all()) or not bool(torch.all(t > 0)):
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()}")
    return [float(v) for v in t.tolist()]


def save_temperature(path: str | os.PathLike, temperature: Any, meta: Mapping[str, Any] | None = None) -> Path:
    """Write temperatures (a scalar, sequence or tensor) and a JSON-serialisable ``meta`` dict (e.g. the model,
    the data, ``mode``, the NLL) to a small JSON file, atomically (temporary file + ``os.replace``)."""
    values = _check_temperatures(temperature)
    meta = dict(meta or {})
    doc = {"format": _FORMAT, "version": _FORMAT_VERSION, "temperature": values, "meta": meta}
    try:
        text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be JSON-serialisable with finite numbers: {err}") from None
    path = Path(path)
    _atomic_write(path, lambda f: f.write(text))
    return path


def load_temperature(path: str | os.PathLike, *, return_meta: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Read a file written by :func:`save_temperature`: a float64 tensor ``(1,)`` or ``(C,)`` (and the meta dict
    with ``return_meta=True``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a temperature file (invalid JSON: {err})") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a temperature file written by rankseg_monai.calibration.save_temperature")
    if doc.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path} has temperature-file version {doc.get('version')!r}; this version reads "
                         f"{_FORMAT_VERSION}")
    t = torch.tensor(_check_temperatures(doc.get("temperature")), dtype=torch.float64)
    meta = doc.get("meta") or {}
    return (t, meta) if return_meta else t


# -------------------------------------------------------------------------------------------------- guard
@dataclass(frozen=True)
class Guard:
    """Settings of the label-free safeguard of :func:`guarded_rankseg`.

    The failure it targets is a *probability fog*: an under-confident model (briefly trained, or flattened by
    its loss) gives a large part of the image small but non-negligible probabilities of a class, ``sum(p)``
    swells, RankSEG's threshold ``t* = f*/2`` sinks below the fog, and the mask floods the image.  Per (batch,
    class), with ``V_r`` / ``V_a`` the voxels of RankSEG's / argmax's mask (``p > 0.5`` in multilabel mode) and
    ``u`` the fraction of the image whose ``p`` lies strictly inside ``band``, the class falls back to argmax
    when all of

    * ``u > max_uncertain``: the class is uncertain over much of the image (a well-trained network is confident
      on most of a volume: 0.4-4% on the demo model, 93% on the model of issue #8);
    * ``V_r > max_growth * V_a``: RankSEG's mask is larger than argmax's (by more than the factor
      ``max_growth``; the default 1 only asks that RankSEG grew the class, which is how a fog hurts).  A class
      argmax never picks but RankSEG paints into a fog is switched too, i.e. emptied.

    No label-free rule can tell a flattened model from a calibrated model of a genuinely ambiguous image: the
    guard only catches gross fog and leaves moderate miscalibration alone (measurements and limits in
    ``docs/calibration.md``).  With labelled cases, :func:`calibration_report` and :func:`fit_temperature` are
    the real remedy.
    """

    max_uncertain: float = 0.5
    max_growth: float = 1.0
    band: tuple[float, float] = UNCERTAIN_BAND

    def __post_init__(self) -> None:
        for name in ("max_uncertain", "max_growth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Guard.{name} must be a finite number >= 0, got {v!r}")
        band = tuple(self.band)
        if len(band) != 2 or not 0.0 <= band[0] < band[1] <= 1.0:
            raise ValueError(f"Guard.band must be (low, high) with 0 <= low < high <= 1, got {self.band!r}")


def _resolve_guard(guard: Any) -> Guard | None:
    if guard is None or guard is False:
        return None
    if guard is True or (isinstance(guard, str) and guard.strip().lower() in ("default", "on", "true")):
        return Guard()
    if isinstance(guard, Guard):
        return guard
    if isinstance(guard, Mapping):
        known = {f.name for f in fields(Guard)}
        unknown = set(guard) - known
        if unknown:
            raise ValueError(f"unknown guard settings {sorted(unknown)}; known: {sorted(known)}")
        return Guard(**dict(guard))
    raise TypeError(f"guard must be None/False (off), True (defaults), a Guard or a dict of its settings; got "
                    f"{guard!r}")


@torch.no_grad()
def guard_statistics(
    probs: torch.Tensor,
    decision: torch.Tensor,
    output_mode: str = "multiclass",
    band: tuple[float, float] = UNCERTAIN_BAND,
    chunk_size: int = 1 << 18,
) -> dict[str, torch.Tensor]:
    """What the guard looks at, per (batch, class) ``(B, C)``: ``mu`` (float64 ``sum p``), ``rankseg_volume`` /
    ``argmax_volume`` (int64 voxels of the masks), ``uncertain_fraction`` (float64, ``p`` inside ``band``), and
    ``argmax``: the baseline decision in the output format (int64 ``(B, *spatial)`` or bool
    ``(B, C, *spatial)``).  ``decision`` is RankSEG's output for ``probs``.  Chunked over voxels."""
    multiclass = output_mode == "multiclass"
    batch, num_classes = probs.shape[:2]
    flat = probs.reshape(batch, num_classes, -1)
    n_vox = flat.shape[-1]
    dec = decision.reshape(batch, -1) if multiclass else decision.reshape(batch, num_classes, -1)
    classes = torch.arange(num_classes, device=flat.device).view(1, -1, 1)
    mu = torch.zeros(batch, num_classes, dtype=torch.float64, device=flat.device)
    unc = torch.zeros_like(mu)
    v_r = torch.zeros(batch, num_classes, dtype=torch.int64, device=flat.device)
    v_a = torch.zeros_like(v_r)
    base = torch.empty(dec.shape, dtype=torch.int64 if multiclass else torch.bool, device=flat.device)
    lo, hi = band
    for start in range(0, n_vox, chunk_size):
        stop = min(n_vox, start + chunk_size)
        p = flat[..., start:stop]
        if multiclass:
            am = p.argmax(1)
            base[:, start:stop] = am
            a_mask = am.unsqueeze(1) == classes
            r_mask = dec[:, start:stop].unsqueeze(1) == classes
        else:
            a_mask = p > 0.5
            base[..., start:stop] = a_mask
            r_mask = dec[..., start:stop]
        v_a += a_mask.sum(-1)
        v_r += r_mask.sum(-1)
        mu += p.double().sum(-1)
        unc += ((p > lo) & (p < hi)).sum(-1)
    return {"mu": mu, "rankseg_volume": v_r, "argmax_volume": v_a, "uncertain_fraction": unc / n_vox,
            "argmax": base.reshape((batch, *probs.shape[2:]) if multiclass else probs.shape)}


@torch.no_grad()
def guarded_rankseg(
    probs: torch.Tensor | np.ndarray,
    guard: Any = True,
    *,
    return_info: bool = False,
    **rankseg_kwargs: Any,
) -> Any:
    """:func:`rankseg_monai.functional.rankseg`, with a label-free fallback to argmax for classes lost in a
    probability fog (see :class:`Guard`).

    Args:
        probs: probabilities ``(B, C, *spatial)`` as for :func:`~rankseg_monai.functional.rankseg`.
        guard: ``True`` (default :class:`Guard` settings), a :class:`Guard`, a dict of its settings, or
            ``None``/``False`` (plain RankSEG).
        return_info: also return a dict of ``(B, C)`` tensors: ``fallback`` (bool, the classes switched to
            argmax) and the :func:`guard_statistics` (without the argmax map).
        **rankseg_kwargs: passed to :func:`~rankseg_monai.functional.rankseg` (``metric``, ``output_mode``,
            ``smooth``, ``pruning_prob``, ...).  With ``metric="acc"`` the guard does nothing.

    Returns:
        what :func:`~rankseg_monai.functional.rankseg` returns (int64 labels ``(B, *spatial)`` or bool masks
        ``(B, C, *spatial)``, numpy for numpy input), plus the info dict with ``return_info=True``.

    In multilabel mode a switched class gets the mask ``p > 0.5``.  In multiclass mode a switched class ``c``
    takes argmax's labels on every voxel that RankSEG or argmax gives to ``c`` (other voxels keep RankSEG's
    labels), so its mask equals argmax's.  Extra cost: one pass over the probabilities (argmax and counts).

    Example:
        >>> import torch
        >>> from rankseg_monai.calibration import guarded_rankseg
        >>> p = torch.full((1, 1, 1000), 0.3); p[..., :100] = 0.9   # an object in a flat 0.3 "fog"
        >>> int(guarded_rankseg(p, guard=False, output_mode="multilabel").sum())   # plain RankSEG: everything
        1000
        >>> int(guarded_rankseg(p, output_mode="multilabel").sum())   # guarded: the object
        100
    """
    cfg = _resolve_guard(guard)
    out = rankseg(probs, **rankseg_kwargs)
    metric = str(rankseg_kwargs.get("metric", "dice")).strip().lower()
    if cfg is None or metric in ("acc", "accuracy"):
        return (out, {}) if return_info else out
    x = probs if isinstance(probs, torch.Tensor) else numpy_as_tensor(probs)
    x = x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x
    if rankseg_kwargs.get("clamp"):
        x = x.clamp(0.0, 1.0)
    dec = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
    dec = dec.to(x.device)
    output_mode = str(rankseg_kwargs.get("output_mode", "multiclass")).strip().lower()
    st = guard_statistics(x, dec, output_mode, tuple(cfg.band))
    base = st.pop("argmax")
    v_r, v_a = st["rankseg_volume"], st["argmax_volume"]
    fallback = (st["uncertain_fraction"] > cfg.max_uncertain) & (v_r > cfg.max_growth * v_a)
    if bool(fallback.any()):
        batch, num_classes = x.shape[:2]
        if output_mode == "multilabel":
            dec = torch.where(fallback.reshape(batch, num_classes, *([1] * (x.ndim - 2))), base, dec)
        else:
            d, a = dec.reshape(batch, -1), base.reshape(batch, -1)
            # a voxel is touched when RankSEG or argmax gives it to a switched class; void labels are never switched
            valid = (d >= 0) & (d < num_classes)
            rs_switched = torch.gather(fallback, 1, d.clamp(0, num_classes - 1)) & valid
            am_switched = torch.gather(fallback, 1, a)
            dec = torch.where(rs_switched | am_switched, a, d).reshape(dec.shape)
        if isinstance(out, np.ndarray):
            out = dec.cpu().numpy()
        else:
            out = dec.to(out.device)
    if return_info:
        return out, {"fallback": fallback, **st}
    return out
