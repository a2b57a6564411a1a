"""RankSEG-RMA thresholds: exact (float64 accumulations), sort-free, memory-light.

The volume is read in chunks of voxels (all rows at once, rows = batch x classes), so the extra memory is a
few chunk-sized temporaries plus a compacted "band" of the probabilities that can still change the decision.
The same chunk loop streams a CPU volume through a GPU when ``device`` differs from the data's device.

Algorithm per row (see ``docs/solvers.md``):

1. One pass: min/max (validation, pruning), ``mu = sum p``, and the sum/count of ``p > 1/2``.
2. Dice (s = 0) and IoU are quasi-concave: the optimum is ``{p > t*}``, ``t* <= 1/2``.  A lower bound
   ``l = g(f(A))`` from any set ``A`` excludes every ``p <= l``; one pass extracts the band ``(l, 1/2]``.
   Dinkelbach iterations on the band alone converge to ``t*`` exactly (a fixed point of ``A -> {p > g(f(A))}``
   is optimal, and ``{p > t*}`` is the smallest optimal set: tie groups are never split).
3. Dice with s > 0 is not quasi-concave.  Its first term alone (Dice s = 0 with ``mu + s``) has threshold
   ``t_A``; the optimum selects nothing ``<= t_A`` and everything above ``dice_increment_bound``, a band of
   width about ``s / (2 (mu + s))``.  Only that band is sorted; the objective is evaluated at every tie-group
   boundary and the first maximum wins.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _stream
from ._stream import RowStats, floor_to_dtype, iter_chunks
from .objectives import dice_increment_bound, dinkelbach_threshold, rma_score

__all__ = ["BandSummary", "RMASolution", "rma_solve", "rma_thresholds", "band_select"]


class BandSummary(NamedTuple):
    """What the band pass saw of each row (float64 ``(B, C)``): the band is every ``p`` in ``(low, 1/2]``, ``s`` their
    sum and ``log_absent`` their ``sum log1p(-p)``; every other value is ``<= low`` or ``> 1/2``."""

    low: torch.Tensor
    s: torch.Tensor
    log_absent: torch.Tensor


class RMASolution(NamedTuple):
    """The RMA decision of every row and what the solver knows of its mask (all ``(B, C)``).

    ``thr``: the thresholds (input dtype, on the input's device; the mask is ``p > thr``, ``+inf`` for pruned rows).
    ``n``: the exact size of each mask (int64).  ``S``: its probability sum (float64), summed in the solver's
    order, so it may differ in the last bits from a sum over the mask in voxel order (by the rounding of a float64
    sum; see :func:`rankseg_monai.solvers.pruning.auto_active_from_solution`).  ``known``: bool, where ``S`` and ``n``
    are those of the mask (``False`` only where the solver gave up iterating).  ``band``: a
    :class:`BandSummary` when asked for (``rma_solve(band_summary=True)``) and the band was ``(low, 1/2]``.
    """

    thr: torch.Tensor
    S: torch.Tensor
    n: torch.Tensor
    known: torch.Tensor
    band: BandSummary | None = None

_MAX_DINKELBACH = 200
_REL_MARGIN = 1e-9


def band_select(
    flat: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    cap: int | None = None,
    above: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities in ``(low, high]`` per row, plus float64 sums and counts.

    ``low``/``high`` are float64 (B, C).  Returns ``(values, rows, s_above, n_above, s_band, n_band)``:
    ``values`` in the input dtype and ``rows`` the int32 flat row index ``b * C + c`` of each value (int64
    beyond 2^31 rows); ``s_above``/``n_above`` the float64 sum and count of ``p > high``, ``s_band``/``n_band``
    those of the band.  If the band holds more than ``cap`` values in total, extraction stops (memory stays
    bounded) and ``values``/``rows`` are ``None``; the sums and counts are still complete.

    ``above``: ``(s_above, n_above)`` when the caller already has them from the same chunks (``high = 1/2``
    everywhere: :class:`~rankseg_monai.solvers._stream.RowStats`' ``s_half``/``n_half``, the same sums bit for
    bit); the pass then only extracts the band.  ``chunk_max``: the rows' maxima per chunk of these chunks
    (:attr:`RowStats.chunk_max`), so that the CPU scan need not compute them.
    """
    device = flat.device if device is None else torch.device(device)
    dtype = flat.dtype
    lo = floor_to_dtype(low, dtype).to(device).unsqueeze(-1)
    hi = floor_to_dtype(high, dtype).to(device).unsqueeze(-1)
    shape = flat.shape[:2]
    rows_total = shape[0] * shape[1]
    row_ids = torch.arange(rows_total, device=device, dtype=torch.int32 if rows_total < 2**31 else torch.int64)
    if above is None:
        s_above = torch.zeros(shape, dtype=torch.float64, device=device)
        n_above = torch.zeros(shape, dtype=torch.int64, device=device)
    else:
        s_above, n_above = (t.to(device) for t in above)
    s_band = torch.zeros(shape, dtype=torch.float64, device=device)
    n_band = torch.zeros(shape, dtype=torch.int64, device=device)
    values: list[torch.Tensor] | None = []
    rows: list[torch.Tensor] = []
    total = 0
    # CPU, sums above known: only the rows whose chunk maximum reaches the band are scanned (on a many-class
    # volume most classes are absent from most chunks); the same values in the same order as the full scan
    by_rows = above is not None and _stream.row_selective(device)
    if by_rows:
        lo_r, hi_r = lo.reshape(-1), hi.reshape(-1)
        open_rows = lo_r < hi_r
    for i, (_, _, chunk) in enumerate(iter_chunks(flat, device, chunk_size, clamp)):
        if by_rows and values is not None:
            row_max = None if chunk_max is None else chunk_max[..., i].reshape(-1)
            vals_c, rows_c = _band_by_rows(chunk, lo_r, hi_r, open_rows, row_ids.dtype, row_max)
            if cap is None or total + vals_c.numel() <= cap:
                total += vals_c.numel()
                n_band += torch.bincount(rows_c, minlength=rows_total).reshape(shape)
                values.append(vals_c)
                rows.append(rows_c)
                continue
            # the cap is reached in this chunk: the full scan below switches to sums, as it always did
        if above is None:
            gt = chunk > hi
            # where(gt, chunk, 0) has the values of chunk * gt (4-10x slower), hence the same float64 sums
            s_above += torch.where(gt, chunk, 0.0).sum(-1, dtype=torch.float64)
            n_above += gt.sum(-1)
            band = (chunk > lo) & ~gt
        else:
            band = (chunk > lo) & (chunk <= hi)
        counts = band.sum(-1)  # = count_nonzero, 3x faster
        n_band += counts
        if values is not None:
            total += int(counts.sum())
            if cap is not None and total > cap:  # too many: from here on only sums (the caller raises ``low``)
                if values:
                    s_band += _segment_sum(torch.cat(values).double(), torch.cat(rows), rows_total).reshape(shape)
                values, rows = None, []
        if values is None:
            s_band += torch.where(band, chunk, 0.0).sum(-1, dtype=torch.float64)  # the values of chunk * band
        else:
            values.append(chunk[band])
            rows.append(torch.repeat_interleave(row_ids, counts.reshape(-1)))
    if values is None:
        return None, None, s_above, n_above, s_band, n_band
    vals, rws = torch.cat(values), torch.cat(rows)
    s_band = _segment_sum(vals.double(), rws, rows_total).reshape(shape)
    return vals, rws, s_above, n_above, s_band, n_band


def _band_by_rows(chunk: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, open_rows: torch.Tensor,
                  row_dtype: torch.dtype, row_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The band values of a chunk ``(B, C, n)`` and their flat row ids, row-major (as ``chunk[band]``), scanning only
    the rows whose maximum in the chunk (``row_max``, computed if not given) exceeds their ``lo``
    (``lo``/``hi``/``open_rows`` flat per row)."""
    rows_total = lo.numel()
    sub = chunk.reshape(rows_total, -1)
    row_max = sub.amax(-1) if row_max is None else row_max
    hit = torch.nonzero((row_max > lo) & open_rows).squeeze(1)
    if hit.numel() == 0:
        return chunk.new_empty(0), torch.empty(0, dtype=row_dtype, device=chunk.device)
    if hit.numel() < rows_total:
        sub = sub.index_select(0, hit)
    band = (sub > lo[hit].unsqueeze(1)) & (sub <= hi[hit].unsqueeze(1))
    r_idx, v_idx = torch.nonzero(band, as_tuple=True)
    return sub[r_idx, v_idx], hit[r_idx].to(row_dtype)


def _segment_sum(values: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def _dinkelbach(
    metric: str,
    values: torch.Tensor,
    rows: torch.Tensor,
    s_fixed: torch.Tensor,
    n_fixed: torch.Tensor,
    mu: torch.Tensor,
    smooth: float,
    t0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Iterate ``t <- g(f({p > t}))`` on the band (flat rows); return the converged threshold per row, the sum and
    size of ``{p > t}`` (fixed part included) and whether the iteration converged.

    The set ``{p > t}`` at the fixed point is the smallest maximiser of the quasi-concave objective.
    """
    t = t0.clone()
    size = t.numel()
    n_prev = torch.full_like(n_fixed, -1)
    S, n = s_fixed, n_fixed
    for _ in range(_MAX_DINKELBACH):
        keep = values > floor_to_dtype(t, values.dtype)[rows]
        values, rows = values[keep], rows[keep]
        S = s_fixed + _segment_sum(values.double(), rows, size)
        n = n_fixed + torch.bincount(rows, minlength=size)
        t_new = dinkelbach_threshold(metric, rma_score(metric, S, n.double(), mu, smooth))
        changed = n != n_prev
        if not bool(changed.any()):
            return t, S, n, True
        # rounding can make g(f) dip below t on a converged row; the set must only shrink
        t = torch.where(changed, torch.maximum(t, t_new), t)
        n_prev = n
    return t, S, n, False


def _sorted_band_argmax(
    values: torch.Tensor,
    rows: torch.Tensor,
    s_fixed: torch.Tensor,
    n_fixed: torch.Tensor,
    mu: torch.Tensor,
    smooth: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact first argmax of Dice over ``fixed + top-k of band`` at tie-group boundaries (flat rows).

    Returns ``(take_band, cut, S, n)``: whether the best set includes band values, the smallest band value
    included (select ``p >= cut``), and the sum and size of the best set (fixed part included).
    """
    size = s_fixed.numel()
    best_empty = rma_score("dice", s_fixed, n_fixed.double(), mu, smooth)
    take = torch.zeros(size, dtype=torch.bool, device=values.device)
    cut = torch.zeros(size, dtype=torch.float64, device=values.device)
    if values.numel() == 0:
        return take, cut, s_fixed, n_fixed
    values = values.double()
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    v, r = values[order], rows[order].long()
    counts = torch.bincount(r, minlength=size)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(v.numel(), device=v.device)
    csum = torch.cumsum(v, 0)
    base = torch.where(starts > 0, csum[(starts - 1).clamp(min=0)], 0.0)
    S = s_fixed[r] + csum - base[r]
    n = n_fixed[r] + (pos - starts[r] + 1)
    f = rma_score("dice", S, n.double(), mu[r], smooth)
    last = torch.ones_like(pos, dtype=torch.bool)
    last[:-1] = (r[1:] != r[:-1]) | (v[1:] != v[:-1])
    f = torch.where(last, f, float("-inf"))
    row_best = torch.full((size,), float("-inf"), dtype=torch.float64, device=v.device)
    row_best = row_best.scatter_reduce(0, r, f, reduce="amax")
    first = torch.where(f == row_best[r], pos, v.numel())
    idx = torch.full((size,), v.numel(), dtype=torch.int64, device=v.device).scatter_reduce(
        0, r, first, reduce="amin"
    )
    take = row_best > best_empty
    at = idx.clamp(max=v.numel() - 1)
    cut = torch.where(take, v[at], 0.0)
    return take, cut, torch.where(take, S[at], s_fixed), torch.where(take, n[at], n_fixed)


def _margin_down(t: torch.Tensor) -> torch.Tensor:
    return t - _REL_MARGIN * t.abs() - 1e-300


def _margin_up(t: torch.Tensor) -> torch.Tensor:
    return t + _REL_MARGIN * t.abs() + 1e-300


def _quasi_concave_threshold(
    flat: torch.Tensor,
    stats: RowStats,
    metric: str,
    mu: torch.Tensor,
    smooth: float,
    active: torch.Tensor,
    device: torch.device,
    chunk_size: int | None,
    clamp: bool,
    band_summary: bool = False,
    s_off: torch.Tensor | None = None,
    n_off: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, BandSummary | None]:
    """Exact ``t*`` (float64, (B, C)) of Dice s=0 (with ``mu`` given) or IoU; the optimum is ``{p > t*}``.

    Also returns the sum and size of ``{p > t*}`` ((B, C), float64 and int64), where they are known (bool), and
    with ``band_summary`` the :class:`BandSummary` of the band (``None`` if the band did not end at 1/2).
    ``s_off``/``n_off`` (float64 / int64 ``(B, C)``) are the sum and size of a set of voxels that every selection
    contains besides its ``p > t*`` voxels (a forced set whose values are 0 in ``flat``; ``None``: none); the
    returned sum and size include it.  ``bounds=(low, high)`` (float64 ``(B, C)``) are known bounds
    ``low <= t* <= high`` that narrow the band.
    """
    half = torch.full_like(mu, 0.5)
    if s_off is None:
        s_off, n_off = torch.zeros_like(mu), torch.zeros_like(mu, dtype=torch.int64)
    f_half = rma_score(metric, stats.s_half + s_off, (stats.n_half + n_off).double(), mu, smooth)
    f_top = rma_score(metric, stats.vmax + s_off, (n_off + 1).double(), mu, smooth)
    f_empty = rma_score(metric, s_off, n_off.double(), mu, smooth)
    t0 = dinkelbach_threshold(metric, torch.maximum(torch.maximum(f_half, f_top), f_empty))
    low = torch.where(active, _margin_down(t0), half)
    cap: int | None = max(1 << 20, flat.numel() // 8)
    high = half
    # while high = 1/2, the sums above it are the statistics pass's (same chunks, same ops): not computed again
    above = (stats.s_half, stats.n_half)
    chunk_max = stats.maxima_for(flat, device, chunk_size)
    if bounds is not None:
        low = torch.where(active, torch.maximum(low, _margin_down(bounds[0])), half)
        high = torch.where(active, torch.minimum(half, torch.maximum(_margin_up(bounds[1]), low)), half)
        above = None  # high is below 1/2: the statistics' sums are not those above it
    n_prev = None
    for attempt in range(_MAX_DINKELBACH):
        if attempt == _MAX_DINKELBACH - 1:
            cap = None  # give up bounding the memory rather than loop
        values, rows, s_fix, n_fix, s_band, n_band = band_select(flat, low, high, device, chunk_size, clamp, cap,
                                                                 above=above, chunk_max=chunk_max)
        s_fix, n_fix = s_fix + s_off, n_fix + n_off
        if values is not None:
            break
        # diffuse rows: the band is too large to hold; one Dinkelbach step on the full data raises ``low``
        n_set = n_fix + n_band
        t_next = dinkelbach_threshold(metric, rma_score(metric, s_fix + s_band, n_set.double(), mu, smooth))
        if n_prev is not None and bool((n_set == n_prev).all()):
            # the set {p > low} is a fixed point: t* = t_next up to rounding; only a sliver is left to check
            high = torch.where(active, torch.minimum(half, _margin_up(t_next)), half)
            above = None
            cap = None
        n_prev = n_set
        low = torch.where(active, torch.maximum(low, _margin_down(t_next)), half)
    summary = None
    if band_summary and above is not None:
        log_absent = _segment_sum(torch.log1p(-values.double()), rows, mu.numel()).reshape(mu.shape)
        summary = BandSummary(floor_to_dtype(low, flat.dtype).to(mu.device).double(), s_band.to(mu.device),
                              log_absent.to(mu.device))
    t, S, n, converged = _dinkelbach(metric, values, rows, s_fix.reshape(-1), n_fix.reshape(-1), mu.reshape(-1),
                                     smooth, low.reshape(-1))
    t = t.reshape(mu.shape)
    # S and n are those of {p > t} when the iteration converged and t stayed inside the band's top (always so
    # in practice: t* <= 1/2 = high)
    known = (t <= high) & converged
    return t, S.reshape(mu.shape), n.reshape(mu.shape), known, summary


@torch.no_grad()
def rma_solve(
    flat: torch.Tensor,
    stats: RowStats,
    metric: str,
    smooth: float,
    active: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    band_summary: bool = False,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RMASolution:
    """:func:`rma_thresholds`, with the sum and size of each row's mask as the solver found them
    (:class:`RMASolution`; no extra pass).  ``band_summary``: also sum ``log1p(-p)`` over the band (a cost
    proportional to the band, for :func:`rankseg_monai.solvers.pruning.log_absent_bounds`).  ``offsets`` and
    ``bounds``: see :func:`rma_thresholds` (the sums and sizes returned then include the forced set)."""
    device = flat.device if device is None else torch.device(device)
    mu = stats.mu
    s_off, n_off = (None, None) if offsets is None else offsets
    if metric == "iou" or smooth == 0:
        t, S, n, known, band = _quasi_concave_threshold(flat, stats, metric, mu, smooth, active, device, chunk_size,
                                                        clamp, band_summary, s_off, n_off, bounds)
        thr = floor_to_dtype(t, flat.dtype)
    else:
        # stage A: the first Dice term alone is Dice s=0 with mu + s
        t_a, _, _, _, band = _quasi_concave_threshold(flat, stats, "dice", mu + smooth, 0.0, active, device,
                                                      chunk_size, clamp, band_summary, s_off, n_off)
        low = torch.where(active, _margin_down(t_a), 2.0)
        high = torch.where(active, _margin_up(dice_increment_bound(t_a, mu, smooth)), 2.0)
        values, rows, s_fix, n_fix, _, _ = band_select(flat, low, high, device, chunk_size, clamp)
        if s_off is not None:
            s_fix, n_fix = s_fix + s_off, n_fix + n_off
        take, cut, S, n = _sorted_band_argmax(values, rows, s_fix.reshape(-1), n_fix.reshape(-1), mu.reshape(-1),
                                              smooth)
        take, cut, S, n = (v.reshape(mu.shape) for v in (take, cut, S, n))
        known = torch.ones_like(take)
        # select p >= cut (a value of the data) or, without band values, p > high
        cut_d = cut.to(flat.dtype)
        below_cut = torch.nextafter(cut_d, torch.full_like(cut_d, float("-inf")))
        thr = torch.where(take, below_cut, floor_to_dtype(high, flat.dtype))
    thr = torch.where(active, thr, torch.full_like(thr, float("inf")))
    S = torch.where(active, S, 0.0)
    n = torch.where(active, n, 0)
    return RMASolution(thr.to(flat.device), S, n, known | ~active, band)


@torch.no_grad()
def rma_thresholds(
    flat: torch.Tensor,
    stats: RowStats,
    metric: str,
    smooth: float,
    active: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row thresholds (dtype of ``flat``, on ``flat``'s device): the RMA mask of row (b, c) is
    ``flat[b, c] > thr[b, c]``.  Inactive (pruned) rows get ``+inf`` (empty mask).

    ``offsets=(S, n)`` (float64 and int64 ``(B, C)``): every selection also holds a forced set of voxels with
    probability sum ``S`` and size ``n`` that ``flat`` does not show (their values there are 0, so they are never
    selected twice); ``mu`` in ``stats`` is still the whole row's sum.  The region solver uses this to optimise one
    region between a fixed parent and fixed children (``solvers/regions.py``).  ``bounds=(low, high)`` (float64
    ``(B, C)``; Dice with ``s = 0`` and IoU only) are known bounds of the optimal threshold, for a narrower band.
    """
    return rma_solve(flat, stats, metric, smooth, active, device, chunk_size, clamp, offsets=offsets,
                     bounds=bounds).thr
