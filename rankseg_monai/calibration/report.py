"""Is RankSEG safe on this model?  Per-class calibration of a model on labelled cases: :func:`calibration_report`
(reliability curve, ECE, expected against true volume, uncertain share, the Dice of argmax and RankSEG, and a
plain-language verdict) and :func:`plot_reliability` (PNG).

RankSEG picks the mask with the best *expected* Dice/IoU under the model's own probabilities, so it is only as
good as their calibration.  It uses two things the model says: the expected volume ``mu = sum(p)`` of every
class, and how likely the voxels just below ``p = 0.5`` are.  An under-confident model (flattened probabilities,
typical of a briefly trained network or of some Dice-loss models) inflates ``mu`` and the low probabilities
together, and RankSEG then selects a huge mask: on such a model thresholding gave Dice 0.82 and RankSEG 0.24.
The remedies are in :mod:`rankseg_monai.calibration.scaling` (temperature scaling) and
:class:`rankseg_monai.guard.Guard` (a label-free fallback).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_write
from ..activation import check_activation
from ..functional import decide, expected_score
from ..guard import UNCERTAIN_BAND
from ..options import RankSEGOptions
from ._data import pairs

__all__ = [
    "UNCERTAIN_BAND",
    "VERDICT_THRESHOLDS",
    "ClassCalibration",
    "CalibrationReport",
    "reliability_bins",
    "calibration_report",
    "plot_reliability",
]

_CHUNK = 1 << 20  # voxels per chunk of the report's float64 sums


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
        expected_dice_rankseg: mean over cases of the model's own estimate of the Dice of RankSEG's mask
            (:func:`rankseg_monai.functional.expected_score`, no labels; ``None`` unless ``compare_decisions``).
        expected_dice_mae: mean over cases of ``|estimate - Dice|`` for RankSEG's mask: how far the label-free
            per-case estimate (``docs/expected_dice.md``) can be trusted on this model.
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
    expected_dice_rankseg: float | None = None
    expected_dice_mae: float | None = None


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
                f"{'Dice RankSEG':>13} {'E[Dice] RankSEG':>16} {'|E - Dice|':>11}  holds")
        lines = [f"calibration report: {self.cases} cases, {self.voxels} voxels, mode={self.mode}, "
                 f"{self.n_bins} bins", head, "-" * len(head)]
        for c in self.classes:
            da = "-" if c.dice_argmax is None else f"{c.dice_argmax:.4f}"
            dr = "-" if c.dice_rankseg is None else f"{c.dice_rankseg:.4f}"
            ed = "-" if c.expected_dice_rankseg is None else f"{c.expected_dice_rankseg:.4f}"
            mae = "-" if c.expected_dice_mae is None else f"{c.expected_dice_mae:.4f}"
            lines.append(f"{c.index:>5} {c.ece:>7.4f} {c.ece_uncertain:>9.4f} {c.volume_ratio:>11.3f} "
                         f"{c.uncertain_fraction:>10.1%} {da:>12} {dr:>13} {ed:>16} {mae:>11}  "
                         f"{'yes' if c.holds else 'NO'}")
        lines.extend(self.verdicts)
        return "\n".join(lines)

    __str__ = format


def _dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-class Dice of bool ``(C, N)`` masks; 1 when both are empty (MONAI ``ignore_empty=False``)."""
    inter = (pred & target).sum(-1).double()
    total = pred.sum(-1).double() + target.sum(-1).double()
    return torch.where(total > 0, 2.0 * inter / total.clamp(min=1), 1.0)


def _decisions(p: torch.Tensor, mode: str, options: RankSEGOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``(C, N)`` masks of argmax / threshold and of RankSEG for one case."""
    num_classes = p.shape[0]
    classes = torch.arange(num_classes, device=p.device).unsqueeze(1)
    out = decide(p[None], options)[0]
    if mode == "softmax":
        return p.argmax(0, keepdim=True) == classes, out.unsqueeze(0) == classes
    return p > 0.5, out


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
                     "networks usually leave; RankSEG's masks will differ a lot from argmax's, and the guard "
                     "(guard=True) switches such classes back to argmax when RankSEG grows them.")
    tail = (" " + " ".join(notes)) if notes else ""
    if not problems:
        vol = f"expected/true volume {vr:.2f}" if c.true_volume > 0 else "absent, nothing expected"
        return True, (f"RankSEG's assumptions hold for class {c.index}: {vol}, ECE {c.ece:.4f} (uncertain voxels "
                      f"{c.ece_uncertain:.3f}).{tail}")
    return False, (f"RankSEG's assumptions do not hold for class {c.index}: " + "; ".join(problems)
                   + ". Fit a temperature on held-out labelled cases (fit_temperature) and check again, or decide "
                   f"with guard=True (or argmax) for this class.{tail}")


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
            inference; the most direct evidence), and the model's own expected Dice of RankSEG's mask against its
            actual Dice (``expected_dice_rankseg``, ``expected_dice_mae``).
        thresholds: override the marks in :data:`VERDICT_THRESHOLDS`.  The class *holds* when ``sum(p)`` is
            within the factor ``volume_ratio`` of the true volume (``absent_volume``: the ``sum(p)`` allowed for a
            class absent from every case) and the calibration error among its uncertain voxels is at most
            ``ece_uncertain``.  Notes (not failures): the Dice comparison (flagged when RankSEG trails argmax by
            more than ``dice_loss``) and an uncertain share above ``uncertain_fraction``.
        rankseg_kwargs: options of :class:`rankseg_monai.options.RankSEGOptions` for RankSEG's decisions (default:
            Dice, RMA, ``pruning_prob="auto"``: the setting the transforms and the CLI deploy); ``output_mode``
            follows ``mode``.

    Returns:
        a :class:`CalibrationReport`; ``str(report)`` is a table with one verdict per class.
    """
    mode = check_activation(mode)
    options = RankSEGOptions(**{**dict(rankseg_kwargs or {}),
                                "output_mode": "multiclass" if mode == "softmax" else "multilabel"})
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
    dice_a, dice_r, expected_r = [], [], []
    for _, p, t in pairs(probs_list, labels_list, mode, "probs"):
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
            base, rs = _decisions(p, mode, options)
            dice_a.append(_dice(base, t))
            dice_r.append(_dice(rs, t))
            expected_r.append(expected_score(p[None], rs[None], metric="dice", smooth=options.smooth)[0])
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
            expected_dice_rankseg=float(torch.stack(expected_r)[:, k].mean()) if expected_r else None,
            expected_dice_mae=(float((torch.stack(expected_r)[:, k] - torch.stack(dice_r)[:, k]).abs().mean())
                               if expected_r else None),
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
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
