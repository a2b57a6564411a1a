"""Automatic class pruning for RankSEG (``pruning_prob="auto"``): keep a class only when a non-empty mask is
expected to score better than the empty one.  Pure torch, no MONAI import.

Why: rankseg 0.0.8 empties every class whose maximum probability is ``<= pruning_prob`` (0.5).  That erases
classes the model is honestly unsure about (100 voxels all at ``p = 0.45``: the empty mask scores 0, selecting
all 100 has expected Dice 0.619), while ``pruning_prob = 0`` paints false-positive specks into cases where the
class is absent (and under ``DiceMetric(ignore_empty=False)`` an empty prediction of an absent class scores 1).

The rule, per (batch, class) row, with ``Y`` the unknown truth and ``P0 = P(Y empty)``:

* empty mask: Dice/IoU is 1 when the truth is empty too (MONAI ``ignore_empty=False``), ``s / (|Y| + s)``
  otherwise, so ``E[score(empty)] = P0 + (1 - P0) E[s / (|Y| + s) | Y non-empty]``; the conditional
  expectation is approximated as RMA does, ``s / (mu / (1 - P0) + s)`` (``mu = sum p``).  For ``s = 0`` the
  value is exactly ``P0``.
* best non-empty mask: the RMA objective ``f*`` of the solver's mask (``objectives.rma_score``), which already
  scores the event "truth empty" as 0 (``s = 0``).
* keep the class iff ``f* > E[score(empty)]`` (strict, so an all-zero row stays empty).

``P0`` is not determined by the per-voxel probabilities: it depends on how the voxels depend on each other.
Every dependence gives a value in ``[max(0, 1 - sum p), 1 - max p]`` (Fréchet bounds).  Three models
(:data:`ABSENCE_MODELS`):

* ``"independent"``: ``prod(1 - p)``, RankSEG's own model.  Best when the truth really is drawn voxel by voxel,
  but it vanishes once ``sum p >> 1``: on a real network whose false-positive blobs carry ``sum p`` of a few
  hundred voxels it never prunes (the same as ``pruning_prob = 0``).
* ``"correlated"``: ``1 - max p``, the upper bound, exact when the class is there or not as a whole.
* ``"mixed"``: the equal-weight average of the two, ``(prod(1 - p) + 1 - max p) / 2``.  This is what
  ``pruning_prob="auto"`` uses: it had the smallest worst-case loss over the calibrated synthetic cases, the
  reference scenarios and the demo network with lesion-free cases (``docs/calibration.md``).

Cost: usually none beyond the solver.  The rule needs the selection's sum/size and ``log prod(1 - p)``;
:func:`auto_active_from_solution` takes the first from the RMA solver and brackets the second from the statistics
and band passes (:func:`log_absent_bounds`), which decides a row whenever the brackets do not straddle the
comparison (almost always).  Otherwise, and for the other solvers, :func:`auto_active_from_thresholds` makes one
extra chunked float64 pass over the volume after the thresholds are known; both give the same result.

Without MONAI's ``ignore_empty=False`` convention (``True``, MONAI's default: an empty truth is skipped), the empty
mask never scores and ``pruning_prob=0`` is the consistent choice.
"""

from __future__ import annotations

from typing import Any

import torch

from ._stream import RowStats, iter_chunks
from .objectives import rma_score, rma_score_bound

__all__ = ["ABSENCE_MODELS", "AUTO_MODES", "selection_summary", "empty_value", "log_absence", "auto_active",
           "auto_active_from_thresholds", "auto_active_from_solution", "auto_candidates", "log_absent_bounds"]


@torch.no_grad()
def selection_summary(
    flat: torch.Tensor,
    thr: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: ``(S, n, log_p_absent)`` per row (float64, float64, float64; ``(B, C)`` on ``device``).

    ``S``/``n`` are the sum and size of the mask ``flat > thr`` (``thr`` as returned by the threshold solvers, in
    ``flat``'s dtype; ``+inf`` gives an empty mask), ``log_p_absent`` is ``log P(class absent) = sum log1p(-p)``
    (``-inf`` when some ``p = 1``).
    """
    device = flat.device if device is None else torch.device(device)
    shape = flat.shape[:2]
    thr_d = thr.to(device=device, dtype=flat.dtype).unsqueeze(-1)
    S = torch.zeros(shape, dtype=torch.float64, device=device)
    n = torch.zeros(shape, dtype=torch.int64, device=device)
    logp0 = torch.zeros(shape, dtype=torch.float64, device=device)
    for _, _, chunk in iter_chunks(flat, device, chunk_size, clamp):
        c64 = chunk.double()
        sel = chunk > thr_d
        S += (c64 * sel).sum(-1)
        n += sel.sum(-1)
        logp0 += torch.log1p(-c64).sum(-1)
    return S, n.double(), logp0


def empty_value(log_p_absent: torch.Tensor, mu: torch.Tensor, smooth: float = 0.0) -> torch.Tensor:
    """Expected Dice (or IoU) of the empty mask when an empty-vs-empty score counts as 1 (float64 ``(B, C)``).

    ``P0 + (1 - P0) s / (mu / (1 - P0) + s)``; exactly ``P0 = exp(log_p_absent)`` for ``smooth = 0``.
    """
    p0 = torch.exp(log_p_absent)
    if smooth == 0:
        return p0
    present = -torch.expm1(log_p_absent)  # 1 - P0, accurate when P0 is close to 1
    safe = torch.where(present > 0, present, 1.0)
    cond_mean = torch.where(present > 0, mu / safe, 0.0)
    return p0 + present * (smooth / (cond_mean + smooth))


#: models of P(class absent), see the module docstring
ABSENCE_MODELS = ("independent", "correlated", "mixed")
#: the string values of ``rankseg(pruning_prob=...)`` and the absence model each one uses
AUTO_MODES = {"auto": "mixed", "auto-independent": "independent", "auto-correlated": "correlated"}


def auto_active(
    stats: RowStats,
    best_value: torch.Tensor,
    log_p_absent: torch.Tensor,
    smooth: float = 0.0,
    absence: str = "independent",
) -> torch.Tensor:
    """bool ``(B, C)``: keep row (b, c) iff its best non-empty mask beats the empty mask in expectation.

    Args:
        stats: the rows' :class:`~rankseg_monai.solvers._stream.RowStats` (``mu`` and ``vmax`` are used).
        best_value: float64 ``(B, C)``, the RMA objective of the solver's mask of each row (computed with every
            row active, e.g. ``rma_score(metric, S, n, mu, smooth)`` from :func:`selection_summary`).
        log_p_absent: float64 ``(B, C)`` from :func:`selection_summary`.
        smooth: the metric's smoothing constant.
        absence: the model of ``P(class absent)`` (:data:`ABSENCE_MODELS`): ``"independent"`` (the default
            here; ``prod(1 - p)``, RankSEG's own model), ``"correlated"`` (``1 - max p``, the Fréchet upper
            bound, exact when the class is present or absent as a whole) or ``"mixed"`` (their average, what
            ``pruning_prob="auto"`` uses).
    """
    baseline = _empty_baseline(stats, log_p_absent.to(best_value.device), smooth, absence)
    return (best_value > baseline) & (stats.vmax.to(best_value.device) > 0)


def log_absence(log_p_independent: torch.Tensor, vmax: torch.Tensor, absence: str = "mixed") -> torch.Tensor:
    """``log P(class absent)`` under an absence model (:data:`ABSENCE_MODELS`), float64 ``(B, C)``, from
    ``sum log1p(-p)`` (the independent model, :func:`selection_summary`) and the row's largest probability."""
    if absence not in ABSENCE_MODELS:
        raise ValueError(f"absence must be one of {ABSENCE_MODELS}, got {absence!r}")
    if absence == "independent":
        return log_p_independent
    if absence == "correlated":
        return torch.log1p(-vmax.clamp(0.0, 1.0))
    corr = 1.0 - vmax.clamp(0.0, 1.0)
    return torch.log(0.5 * corr + 0.5 * torch.exp(log_p_independent))  # log(0) = -inf: never absent


def _empty_baseline(stats: RowStats, log_p_absent: torch.Tensor, smooth: float, absence: str) -> torch.Tensor:
    """``E[score(empty)]`` of every row under the absence model (float64 on ``log_p_absent``'s device); non-decreasing
    in ``log_p_absent`` (and independent of it for ``"correlated"``)."""
    device = log_p_absent.device
    return empty_value(log_absence(log_p_absent, stats.vmax.to(device), absence), stats.mu.to(device), smooth)


def auto_candidates(stats: RowStats, metric: str, smooth: float, absence: str = "mixed") -> torch.Tensor:
    """bool ``(B, C)``: the rows :func:`auto_active` could keep, known before solving (from ``mu`` and ``vmax``).

    A row's best objective is at most :func:`~rankseg_monai.solvers.objectives.rma_score_bound`, and the empty
    mask's expected score is at least ``P0``, which is at least ``1 - max p`` (``"correlated"``) or half of it
    (``"mixed"``).  A row whose bound is below that can never be kept, so it need not be solved: the result is
    the same, and a class that is clearly absent (all its probabilities small, as for most of the classes of
    a whole-body model on one scan) costs no band pass.  ``"independent"`` has no such floor: every row stays.
    """
    vmax = stats.vmax.clamp(0.0, 1.0)
    if absence == "independent":
        return vmax > 0
    floor = 1.0 - vmax if absence == "correlated" else 0.5 * (1.0 - vmax)
    bound = rma_score_bound(metric, stats.mu, vmax, smooth)
    return (vmax > 0) & (bound >= floor - 1e-9)  # margin: far above rounding, so no row is dropped by it


@torch.no_grad()
def auto_active_from_thresholds(
    flat: torch.Tensor,
    thr: torch.Tensor,
    stats: RowStats,
    metric: str,
    smooth: float,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    absence: str = "independent",
) -> torch.Tensor:
    """The whole rule in one call: ``thr`` are the thresholds solved with every row active; returns the bool
    ``(B, C)`` activity on ``flat``'s device (one extra pass over ``flat``).  ``metric`` is ``"dice"`` or
    ``"iou"``; ``absence`` as in :func:`auto_active`."""
    S, n, logp0 = selection_summary(flat, thr, device=device, chunk_size=chunk_size, clamp=clamp)
    mu = stats.mu.to(S.device)
    best = rma_score(metric, S, n, mu, smooth)
    # a row whose mask came out empty keeps its empty mask either way; it is inactive for the multiclass fallback
    best = torch.where(n > 0, best, torch.full_like(best, float("-inf")))
    return auto_active(stats, best, logp0, smooth, absence).to(flat.device)


#: relative slack of the certified shortcut of :func:`auto_active_from_solution`: far above the rounding of any
#: float64 sum the decision compares (``n 2^-53`` for ``n`` terms), so a row is only certified when the exact pass
#: could not decide otherwise
_CERTIFY_REL = 1e-6


def log_absent_bounds(stats: RowStats, band: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds ``(low, high)`` of the exact ``log P(class absent) = sum log1p(-p)`` of every row (float64 ``(B, C)``),
    from the statistics pass and, when given, the band (no pass over the volume).

    ``log(1 - p)`` is concave: it lies below its tangents (``log(1 - p) <= -p`` at 0, ``log 1/2 - 2 (p - 1/2)`` at
    1/2) and above its chords (from 0 to ``h`` for ``p <= h``, from 1/2 to ``max p`` above one half).  The count and
    sum of the values above one half come from ``stats`` (RMA's statistics pass); ``band``, a
    :class:`~rankseg_monai.solvers.rma.BandSummary`, gives the exact sum over ``(low, 1/2]`` and ``h = low`` for the
    rest, which makes the bracket narrow where it matters (rows with a few uncertain voxels).  Without the
    statistics above one half, the chord from 0 to ``max p`` bounds every value.  The caller widens the bounds
    for rounding.
    """
    vmax = stats.vmax.clamp(0.0, 1.0)
    mu = stats.mu
    if stats.s_half is None:
        slope = torch.where(vmax > 0, torch.log1p(-vmax) / torch.where(vmax > 0, vmax, 1.0), 0.0)
        low = torch.where(vmax > 0, mu * slope, 0.0)
        return torch.where(torch.isnan(low), float("-inf"), low), -mu
    n_half = stats.n_half.to(mu.device).double()
    s_half = stats.s_half.to(mu.device)
    over = n_half > 0
    log_half = torch.log1p(torch.full_like(mu, -0.5))
    excess = (s_half - 0.5 * n_half).clamp(min=0.0)  # sum of (p - 1/2) over the values above one half
    # values above one half: below the tangent at 1/2, above the chord from 1/2 to vmax (-inf when vmax = 1)
    top_high = n_half * log_half - 2.0 * excess
    slope_top = (torch.log1p(-vmax) - log_half) / torch.where(over, vmax - 0.5, 1.0)
    top_low = torch.where(over, n_half * log_half + excess * slope_top, 0.0)
    if band is None:
        rest, h, band_log = (mu - s_half).clamp(min=0.0), vmax.clamp(max=0.5), torch.zeros_like(mu)
    else:
        rest = (mu - s_half - band.s.to(mu.device)).clamp(min=0.0)
        h = torch.minimum(vmax, band.low.to(mu.device)).clamp(0.0, 0.5)
        band_log = band.log_absent.to(mu.device)
    slope_rest = torch.where(h > 0, torch.log1p(-h) / torch.where(h > 0, h, 1.0), -1.0)
    low = rest * slope_rest + band_log + top_low
    high = -rest + band_log + torch.where(over, top_high, 0.0)
    return torch.where(torch.isnan(low), float("-inf"), low), torch.minimum(high, torch.zeros_like(high))


@torch.no_grad()
def auto_active_from_solution(
    flat: torch.Tensor,
    thr: torch.Tensor,
    stats: RowStats,
    metric: str,
    smooth: float,
    S: torch.Tensor,
    n: torch.Tensor,
    known: torch.Tensor | None = None,
    band: Any = None,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    absence: str = "independent",
) -> torch.Tensor:
    """:func:`auto_active_from_thresholds`, bit for bit, usually without its pass over the volume.

    ``S``/``n`` are the sum and exact size of each row's mask ``flat > thr`` as the solver found them
    (:class:`rankseg_monai.solvers.rma.RMASolution`): ``n`` is exact, ``S`` a float64 sum of the same values in
    another order; ``band`` is the solver's :class:`~rankseg_monai.solvers.rma.BandSummary` (narrower brackets) or
    ``None``.  The pass computes ``best = f(S, n)`` and ``E[empty]`` from ``log P(absent)``; here ``best`` is
    bracketed from ``S`` (relative slack :data:`_CERTIFY_REL`, far above any float64 summation error) and
    ``E[empty]`` from :func:`log_absent_bounds` (it grows with ``log P(absent)``).  A row whose brackets do not
    overlap has the decision the pass would give.  If any row is left open (its brackets overlap, or ``known``
    is ``False``), the pass runs as before for every row, so the result never depends on the shortcut.
    """
    if absence not in ABSENCE_MODELS:
        raise ValueError(f"absence must be one of {ABSENCE_MODELS}, got {absence!r}")
    dev = S.device
    n_total = flat.shape[-1]
    rel = _CERTIFY_REL + 4.0 * n_total * 2.0**-53
    mu = stats.mu.to(dev)
    vmax = stats.vmax.to(dev)
    nd = n.to(dev).double()
    S = S.to(dev)
    best_lo = rma_score(metric, S * (1.0 - rel), nd, mu, smooth) * (1.0 - rel) - 1e-300
    best_hi = rma_score(metric, S * (1.0 + rel), nd, mu, smooth) * (1.0 + rel) + 1e-300
    if absence == "correlated":
        base = _empty_baseline(stats, torch.zeros_like(mu), smooth, absence)
        base_lo, base_hi = base, base
    else:
        lp_lo, lp_hi = log_absent_bounds(stats, band)
        lp_lo, lp_hi = lp_lo.to(dev) * (1.0 + rel), (lp_hi.to(dev) * (1.0 - rel)).clamp(max=0.0)
        base_lo = _empty_baseline(stats, lp_lo, smooth, absence)
        base_hi = _empty_baseline(stats, lp_hi, smooth, absence)
    base_lo = base_lo * (1.0 - rel) - 1e-300
    base_hi = base_hi * (1.0 + rel) + 1e-300
    empty = (nd == 0) | (vmax <= 0)
    keep = (best_lo > base_hi) & ~empty
    drop = (best_hi <= base_lo) | empty
    decided = (keep | drop) if known is None else (keep | drop) & known.to(dev)
    if not bool(decided.all()):
        return auto_active_from_thresholds(flat, thr, stats, metric, smooth, device=device, chunk_size=chunk_size,
                                           clamp=clamp, absence=absence)
    return keep.to(flat.device)
