"""RankSEG-BA, RankSEG-TRNA and BA+TRNA (Dai & Li, JMLR 2023) for Dice, multilabel, vectorised over tau.

Per active (batch, class) row with probabilities sorted descending ``p(1) >= ... >= p(N)``,
``S_tau = p(1) + ... + p(tau)``, ``Gamma = sum of Bernoulli(p)`` and smoothing ``s``, the expected Dice of the
top-``tau`` mask is ``pi(tau) = 2 sum_{j <= tau} p(j) E[1 / (Gamma_-j + tau + 1 + s)] + s E[1 / (Gamma + tau + s)]``
(``Gamma_-j`` leaves voxel ``j`` out).  The formulas follow rankseg 0.0.8 (``rankdice_ba``) exactly:

* ``Gamma`` is replaced by the refined normal approximation (mean ``mu``, variance ``sum p(1-p)`` clamped at the
  machine epsilon of the reference's working dtype, skewness ``sum p(1-p)(1-2p) / sigma^3``):
  ``F(k) = clip(Phi(x) + skew (1 - x^2) phi(x) / 6, 0, 1)``, ``x = (k + 1/2 - mu) / sigma``,
  ``pmf(k) = clip(F(k) - F(k-1), 0, 1)``, kept on ``[lq, uq]`` (SciPy's ``interval(1 - eps)`` of the standardised
  law, ``lq = max(0, floor(sigma z_lo + mu) - 1)``, ``uq = min(N, ceil(sigma z_hi + mu))``) and renormalised.
* The search stops at ``up_tau`` (JMLR Lemma 3): the first ``tau < N`` with ``S_tau >= (tau + s + N) p(tau+1)``.
* BA: ``pi(tau) = 2 S_tau E[1/(Gamma + tau + 1 + s)] + s E[1/(Gamma + tau + s)]``, ``pi(0) = s E[1/(Gamma + s)]``.
* TRNA: the leave-one-out law of ``Gamma_-j`` has the moments of ``Gamma`` minus voxel ``j``'s terms and is
  evaluated on ``Gamma``'s ``[lq, uq]``; ``w_tau = sum_{j <= tau} p(j) pmf_-j`` is a cumulative sum over ``j``.
* BA+TRNA: BA for a row when ``sigma > 5`` (Cohen's d ``1/sigma < 0.2``), TRNA otherwise.
* For ``s >= 1`` the scores are ``s (pi - 1)`` (same argmax, no loss of the differences when ``pi`` rounds to 1).

Differences from 0.0.8 (all documented in ``docs/solvers_jmlr.md``):

* Everything after the sort runs in float64, whatever the input dtype (0.0.8 works in float32 for float16,
  bfloat16 and float32 inputs).  The decisions equal 0.0.8's on the float64 copy of the input; the variance clamp
  still uses the epsilon of 0.0.8's working dtype, as 0.0.8 does.
* The mask is a threshold, ``p > thr``: a tie group of equal probabilities is never split.  ``tau`` is chosen
  only at tie-group boundaries: the first maximum of the same score over the boundaries ``tau <= up_tau`` plus,
  when ``up_tau`` falls inside a tie group, the end of that group.  Where 0.0.8's ``tau`` is a boundary (always,
  for untied probabilities) the decision is 0.0.8's.
* The loop over ``tau`` is gone: BA bounds intervals of ``tau`` by a concave quadratic (``S`` is concave, both
  kernels convex and decreasing) and scores the surviving intervals exactly by correlation; TRNA's
  leave-one-out PMFs are built as a ``(tau, support)`` matrix in chunks.  Only the probabilities above a bound
  below which Lemma 3 provably has stopped are sorted (numpy's sort, on the CPU).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft
import scipy.optimize
import scipy.special
import torch

from ._sorted import SCALED_SCORE_SMOOTH, cumsum, first_argmax, row_values, threshold_from_tau
from ._stream import RowStats

__all__ = [
    "ba_thresholds",
    "refined_normal_interval",
    "refined_normal_law",
    "sorted_head",
    "sorted_head_sums",
]

#: above this smooth the Lemma-3 stop is tested by division, as in rankseg 0.0.8
_DIVISION_SMOOTH = 1e6
#: correlations with more than this many (tau, support) products use an FFT (BA prunes above a quarter of it)
_FFT_MIN_WORK = 1 << 22
#: (tau, support) entries per TRNA chunk
_TRNA_CHUNK = 1 << 18
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = math.log(math.sqrt(2.0 * math.pi))
_NORM_PDF_C = float(np.sqrt(2 * np.pi))
_XTOL = 1e-14  # scipy.stats.rv_continuous default


# ----------------------------------------------------------------------------------------------- interval
def _refined_cdf_minus(x: float, skew: float, q: float) -> float:
    """``RefinedNormal().cdf(x, skew) - q`` with SciPy's arithmetic, on scalars.

    SciPy evaluates ``ndtr(x) + skew * (1 - x**2) * pdf / 6`` with ``pdf = exp(-x**2 / 2) / sqrt(2 pi)`` on
    arrays.  The same IEEE operations on floats give the same bits (``x**2`` of an array is ``x * x``; ``np.exp``
    and ``ndtr`` on a scalar run the same ufunc loops), at a third of the per-call cost.
    """
    x2 = x * x
    pdf = float(np.exp(-x2 / 2.0)) / _NORM_PDF_C
    prob = float(scipy.special.ndtr(x)) + skew * (1 - x2) * pdf / 6
    return min(max(prob, 0.0), 1.0) - q  # np.clip's values, without its overhead


def _refined_ppf(q: float, skew: float) -> float:
    """SciPy's generic ``rv_continuous._ppf_single`` (bracket by factors of 10, then brentq, xtol 1e-14)."""
    sk = float(skew)
    factor = 10.0
    left, right = -factor, factor
    while _refined_cdf_minus(left, sk, q) > 0.0:
        left, right = left * factor, left
    right = max(factor, left)
    while _refined_cdf_minus(right, sk, q) < 0.0:
        left, right = right, right * factor
    return float(scipy.optimize.brentq(_refined_cdf_minus, left, right, args=(sk, q), xtol=_XTOL))


def refined_normal_interval(skew: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Standardised quantiles ``(z_lo, z_hi)`` of the refined normal law with mass ``1 - eps`` between them.

    Reproduces ``RefinedNormal().interval(1 - eps, skew=skew)`` of rankseg 0.0.8 (SciPy's generic root finder on
    the clipped CDF ``Phi(x) + skew (1 - x^2) phi(x) / 6``) value for value, without SciPy's per-call overhead.
    """
    alpha = np.asarray(1 - np.float64(eps))
    q1 = float((1.0 - alpha) / 2)
    q2 = float((1.0 + alpha) / 2)
    skew = np.asarray(skew, dtype=np.float64).reshape(-1)
    lo = np.array([_refined_ppf(q1, s) for s in skew], dtype=np.float64)
    hi = np.array([_refined_ppf(q2, s) for s in skew], dtype=np.float64)
    return lo, hi


# --------------------------------------------------------------------------------------------- sorting
def _stop(S: np.ndarray, tau: np.ndarray, p_next: np.ndarray, smooth: float, n: int) -> np.ndarray:
    """Lemma 3's stop condition ``S_tau >= (tau + s + N) p(tau+1)`` (by division for huge s, as 0.0.8)."""
    denom = tau + smooth + n
    if smooth > _DIVISION_SMOOTH:
        return S / denom >= p_next
    return S >= denom * p_next


def _lemma3_bound(n: int, smooth: float, mu: float) -> float | None:
    """``t1 = g(0) = mu / (s + N)``: the shift of the one-pass sum that gives :func:`sorted_head`'s bound."""
    denom = smooth + n
    return mu / denom if mu > 0 and math.isfinite(denom) else None


def sorted_head(
    values: np.ndarray, mu: float, smooth: float, excess: float | None = None
) -> tuple[np.ndarray, int, bool]:
    """Descending float64 values of one row, as far as the Lemma-3 search needs them.

    Returns ``(head, up, at_boundary)``: ``head`` holds ``p(1) .. p(m)`` for some ``m >= up``, ``up`` is 0.0.8's
    ``up_tau`` and ``at_boundary`` whether ``p(up) > p(up+1)`` (or ``up = N``).

    Only values above ``t2 = g(g(0))``, ``g(t) = sum (p - t)_+ / (s + N)``, are sorted: ``g`` is decreasing, so
    ``t2 <= t0 = g(t0)``, which means ``S_m >= (m + s + N) t2`` for the ``m`` values above ``t2``, and the stop
    condition holds at ``tau = m`` at the latest.  A full sort is the fallback if rounding defeats that bound.
    ``excess`` is ``sum (p - g(0))_+`` when the caller has it already (:func:`row_moments` computes it in the
    same pass as the moments).  The values are sorted in their own dtype (numpy's vectorised sort) and widened
    to float64 afterwards, which gives the same numbers as widening first.
    """
    head, _, up, at_boundary = sorted_head_sums(values, mu, smooth, excess)
    return head, up, at_boundary


def sorted_head_sums(
    values: np.ndarray, mu: float, smooth: float, excess: float | None = None
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """:func:`sorted_head` plus the cumulative sums ``S`` of the head (``S[t - 1] = S_t``), computed once."""
    n = values.size
    denom = smooth + n
    t2 = -1.0
    t1 = _lemma3_bound(n, smooth, mu)
    if t1 is not None:
        if excess is None:
            excess = row_moments(values, t1)[2]
        t2 = excess / denom
        t2 = t2 * (1.0 - 1e-9) if t2 > 0 else -1.0
    for threshold in (t2, -1.0):
        sel = values[values > threshold] if threshold >= 0 else values.reshape(-1)
        head = np.sort(sel)[::-1].astype(np.float64)
        m = head.size
        S = cumsum(head)
        if n == 1:
            return head, S, 1, True
        if m > 1:
            taus = np.arange(1, m, dtype=np.float64)
            hit = np.flatnonzero(_stop(S[:-1], taus, head[1:], smooth, n))
            if hit.size:
                return head, S, int(hit[0]) + 1, bool(head[hit[0]] > head[hit[0] + 1])
        if m == n:
            return head, S, n, True
        p_next = float(values[values <= threshold].max())
        if bool(_stop(S[-1:], np.array([float(m)]), np.array([p_next]), smooth, n)[0]):
            return head, S, m, True
    raise AssertionError("unreachable: the full sort always stops")  # pragma: no cover


def _boundaries(head: np.ndarray, up: int, at_boundary: bool) -> tuple[int, np.ndarray]:
    """Candidate sizes: ``U`` (``up`` extended to the end of its tie group) and a bool mask over ``0..U``."""
    U = up
    if not at_boundary:
        U = int(np.searchsorted(-head, -head[up - 1], side="right"))
    cand = np.ones(U + 1, dtype=bool)
    if U > 1:
        cand[1:U] = head[: U - 1] > head[1:U]
    return U, cand


# --------------------------------------------------------------------------------------- refined normal
def _refined_cdf(k: np.ndarray, loc, scale, skew) -> np.ndarray:
    """``RefinedNormalPB.cdf`` of rankseg 0.0.8 in float64: same operation order and the same torch ``erf``/``exp``.

    torch's vectorised ``erf`` is also 5x faster than SciPy's, which dominated TRNA's time.
    """
    x = torch.from_numpy(np.asarray((k + 0.5 - loc) / scale, dtype=np.float64))
    phi = torch.exp(-(x**2) / 2.0 - _LOG_SQRT_2PI)
    skew = torch.as_tensor(skew, dtype=torch.float64)
    prob = 0.5 * (1 + torch.erf(x / _SQRT2)) + skew * (1 - x**2) * phi / 6
    return torch.clip(prob, 0.0, 1.0).numpy()


def _pmf_on_support(lq: int, uq: int, loc, scale, skew) -> np.ndarray:
    """Unnormalised refined-normal PMF on ``lq..uq``; ``loc``/``scale``/``skew`` floats or ``(R, 1)`` arrays."""
    k = np.arange(lq - 1, uq + 1, dtype=np.float64)
    cdf = _refined_cdf(k, loc, scale, skew)
    return np.clip(cdf[..., 1:] - cdf[..., :-1], 0.0, 1.0)


def refined_normal_law(n: int, mu: float, var: float, m3: float, var_eps: float, eps: float):
    """Gamma's truncated refined normal law for one row: ``(scale, lq, uq, pmf)``, ``pmf`` on ``lq..uq``.

    ``var``/``m3`` from :func:`row_moments`; the variance is clamped at ``var_eps`` (0.0.8's working epsilon) and
    the support is SciPy's ``interval(1 - eps)`` of the standardised law, as in rankseg 0.0.8.
    """
    safe = max(var, var_eps)
    scale = math.sqrt(safe)
    skew = m3 / safe ** (3 / 2)
    zlo, zhi = refined_normal_interval(np.array([skew]), eps)
    lq = int(min(max(math.floor(scale * zlo[0] + mu) - 1, 0), n))
    uq = int(min(max(math.ceil(scale * zhi[0] + mu), 0), n))
    return scale, lq, uq, _normalise(_pmf_on_support(lq, uq, mu, scale, skew))


def _normalise(pmf: np.ndarray) -> np.ndarray:
    """Rows divided by their sums; a row summing to 0 becomes 0 (0.0.8 would give NaN scores)."""
    total = pmf.sum(-1, keepdims=True)
    return np.divide(pmf, total, out=np.zeros_like(pmf), where=total > 0)


# ------------------------------------------------------------------------------------------ correlations
def _correlate(pmf: np.ndarray, g: np.ndarray, count: int) -> np.ndarray:
    """``out[t] = sum_i pmf[i] g[i + t]`` for ``t < count`` (``g`` has ``len(pmf) + count - 1`` entries)."""
    L = pmf.size
    if L * count <= _FFT_MIN_WORK:
        return np.correlate(g, pmf, mode="valid")[:count]
    size = scipy.fft.next_fast_len(L + g.size - 1, real=True)
    spec = scipy.fft.rfft(pmf[::-1], size) * scipy.fft.rfft(g, size)
    return scipy.fft.irfft(spec, size)[L - 1 : L - 1 + count]


def _nu_scores(pmf: np.ndarray, lq: int, U: int, smooth: float, scaled: bool) -> np.ndarray:
    """The smoothing term for ``tau = 1..U``: ``s E[1/(Gamma + tau + s)]`` (or its scaled form)."""
    if smooth == 0 and not scaled:
        return np.zeros(U)
    m = np.arange(lq, lq + pmf.size + U - 1, dtype=np.float64) + 1.0  # k + tau for k = lq + i, tau = t + 1
    g = -m / (1.0 + m / smooth) if scaled else smooth / (m + smooth)
    return _correlate(pmf, g, U)


def _score_zero(pmf: np.ndarray, lq: int, smooth: float, scaled: bool) -> float:
    support = np.arange(lq, lq + pmf.size, dtype=np.float64)
    if scaled:
        return float(-np.sum((support / (1.0 + support / smooth)) * pmf))
    if smooth > 0:
        return float(smooth * np.sum((1.0 / (support + smooth)) * pmf))
    return 0.0  # the Dice convention 0/0 := 0


def _ba_kernels(smooth: float, scaled: bool):
    """BA's two kernels of ``m = k + tau``: ``a`` (times ``2 S_tau``) and ``nu`` (both decreasing in ``m``)."""
    if scaled:
        return (lambda m: 1.0 / (1.0 + (m + 1.0) / smooth)), (lambda m: -m / (1.0 + m / smooth))
    if smooth > 0:
        return (lambda m: 1.0 / (m + 1.0 + smooth)), (lambda m: smooth / (m + smooth))
    return (lambda m: 1.0 / (m + 1.0 + smooth)), None


def _ba_range(pmf: np.ndarray, lq: int, S: np.ndarray, start: int, stop: int, smooth: float, scaled: bool):
    """Exact BA scores for ``tau = start..stop-1`` (``start >= 1``; ``S[t - 1] = S_t``)."""
    ka, knu = _ba_kernels(smooth, scaled)
    count = stop - start
    m = np.arange(lq + start, lq + start + pmf.size + count - 1, dtype=np.float64)  # k + tau
    out = 2.0 * _correlate(pmf, ka(m), count) * S[start - 1 : stop - 1]
    if knu is not None:
        out = out + _correlate(pmf, knu(m), count)
    return out


def _ba_scores(head, U, pmf, lq, smooth, scaled) -> np.ndarray:
    """BA scores for ``tau = 0..U`` (all of them; see :func:`_ba_best` for the search)."""
    scores = np.empty(U + 1)
    scores[0] = _score_zero(pmf, lq, smooth, scaled)
    scores[1:] = _ba_range(pmf, lq, cumsum(head[:U]), 1, U + 1, smooth, scaled)
    return scores


def _ba_best(head, U, cand, pmf, lq, smooth, scaled, S=None) -> int:
    """First maximiser of the BA score over the candidates, by branch and bound on intervals of ``tau``.

    On an interval ``[t1, t2]`` (``tau = t1 + x``) the score ``2 S_tau a(tau) + nu(tau)`` is bounded by a
    quadratic in ``x``: ``S`` is concave (its increments ``p(tau+1)`` do not increase), so
    ``S_tau <= S_t1 + x p(t1+1)``; ``a`` and ``nu`` are expectations of convex decreasing kernels, so they lie
    below their chords through ``t1`` and ``t2``.  The bound is the maximum of that quadratic on ``[0, t2-t1]``
    (and at most ``2 S_t2 a(t1) + nu(t1)``).  It is second order in the interval width, so near the optimum it
    prunes all but a few intervals.  Intervals whose bound is below the best candidate score found so far (less
    a relative margin of 1e-9, far above rounding) are dropped; survivors are split by 8 until they are 8 wide,
    then scored exactly.  The result is the first argmax over all candidates, as with :func:`_ba_scores`.
    ``S`` (``S[t - 1] = S_t``, at least ``U`` entries) is the cumulative sum of ``head`` when the caller has it.
    """
    if U * pmf.size <= _FFT_MIN_WORK // 4:
        return first_argmax(_ba_scores(head, U, pmf, lq, smooth, scaled), cand)
    S = cumsum(head[:U]) if S is None else S
    ka, knu = _ba_kernels(smooth, scaled)
    k = np.arange(lq, lq + pmf.size, dtype=np.float64)

    def at(taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = k[None, :] + taus[:, None].astype(np.float64)
        a = (ka(m) * pmf).sum(1)  # no BLAS: its threads contend on shared cores
        nu = (knu(m) * pmf).sum(1) if knu is not None else np.zeros(taus.size)
        return a, nu

    score0 = _score_zero(pmf, lq, smooth, scaled)
    best = score0
    width = 8
    while width * 16 < U:
        width *= 8
    lo = np.arange(1, U + 1, width)  # intervals [lo, hi], inclusive; neighbours share an end point
    hi = np.minimum(lo + width, U)
    while True:
        pts, inv = np.unique(np.concatenate([lo, hi]), return_inverse=True)
        a, nu = at(pts)
        exact = 2.0 * a * S[pts - 1] + nu
        ok = cand[pts]
        if ok.any():
            best = max(best, float(exact[ok].max()))
        i1, i2 = inv[: lo.size], inv[lo.size :]
        w = (hi - lo).astype(np.float64)
        safe_w = np.maximum(w, 1.0)
        s0, slope = S[lo - 1], head[np.minimum(lo, head.size - 1)]  # S_t1 and p(t1 + 1)
        a1, da = a[i1], (a[i2] - a[i1]) / safe_w
        n1, dn = nu[i1], (nu[i2] - nu[i1]) / safe_w
        c2 = 2.0 * slope * da
        c1 = 2.0 * (s0 * da + slope * a1) + dn
        c0 = 2.0 * s0 * a1 + n1
        xs = np.where(c2 < 0, np.clip(-c1 / np.where(c2 < 0, 2.0 * c2, -1.0), 0.0, w), 0.0)
        quad = np.maximum(np.maximum(c0, c2 * w * w + c1 * w + c0), c2 * xs * xs + c1 * xs + c0)
        bound = np.minimum(quad, 2.0 * a1 * S[hi - 1] + n1)
        keep = bound >= best - 1e-9 * abs(best) - 1e-300
        lo, hi = lo[keep], hi[keep]
        if width <= 8 or lo.size == 0:
            break
        width //= 8
        j = np.tile(np.arange(8), lo.size)
        parent_hi = np.repeat(hi, 8)
        new_lo = np.repeat(lo, 8) + width * j
        valid = (new_lo < parent_hi) | (j == 0)
        lo, hi = new_lo[valid], np.minimum(new_lo + width, parent_hi)[valid]
    taus, scores = [np.zeros(1, dtype=np.int64)], [np.array([score0])]
    if lo.size:  # score the survivors exactly, merged into contiguous runs
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
        run_hi = np.maximum.accumulate(hi)
        breaks = np.flatnonzero(lo[1:] > run_hi[:-1] + 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [lo.size]])
        for r1, r2 in zip(starts.tolist(), stops.tolist()):
            t1, t2 = int(lo[r1]), int(run_hi[r2 - 1]) + 1
            taus.append(np.arange(t1, t2))
            scores.append(_ba_range(pmf, lq, S, t1, t2, smooth, scaled))
    taus = np.concatenate(taus)  # ascending: the first maximum over these is the first over all candidates
    return int(taus[first_argmax(np.concatenate(scores), cand[taus])])


def _trna_scores(head, U, pmf, lq, uq, mu, var, m3, var_eps, smooth, scaled) -> np.ndarray:
    """TRNA scores for ``tau = 0..U`` with the leave-one-out PMFs as a ``(tau, support)`` matrix in chunks."""
    L = uq - lq + 1
    k = np.arange(lq, uq + 1, dtype=np.float64)
    chunk = max(1, _TRNA_CHUNK // (L + 1))
    ma = np.empty(U)
    carry = np.zeros(L)
    for start in range(0, U, chunk):
        stop = min(U, start + chunk)
        p = head[start:stop, None]
        q = p * (1 - p)
        safe = np.maximum(var - q, var_eps)
        loc, scale = mu - p, np.sqrt(safe)
        skew = (m3 - q * (1 - 2 * p)) / safe ** (3 / 2)
        excluded = _normalise(_pmf_on_support(lq, uq, loc, scale, skew))
        w = cumsum(p * excluded, axis=0) + carry
        carry = w[-1].copy()
        tau = np.arange(start + 1, stop + 1, dtype=np.float64)[:, None]
        weight = 2.0 / (1.0 + (k + tau + 1) / smooth) if scaled else 2.0 / (k + tau + smooth + 1)
        ma[start:stop] = (weight * w).sum(-1)
    scores = np.empty(U + 1)
    scores[0] = _score_zero(pmf, lq, smooth, scaled)
    scores[1:] = ma + _nu_scores(pmf, lq, U, smooth, scaled)
    return scores


def _working_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of rankseg 0.0.8's working dtype (float16/bfloat16 are promoted to float32)."""
    return float(torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps)


#: values per block of :func:`row_moments` (float64 temporaries that stay in the L2 cache)
_BLOCK = 1 << 15


def row_moments(values: np.ndarray, shift: float | None = None) -> tuple[float, ...]:
    """float64 ``sum p(1-p)`` and ``sum p(1-p)(1-2p)`` of one row, in one pass over cache-sized blocks.

    With ``shift`` also ``sum (p - shift)_+`` (the sum behind :func:`sorted_head`'s bound).  No BLAS (its threads
    contend on shared cores) and no volume-sized float64 temporaries: two reused block buffers.  The third
    moment is taken as ``sum q - 2 sum q p`` with ``q = p (1 - p)``, and the shifted sum as
    ``sum max(p, shift) - count * shift``; both agree with the direct forms to rounding (the shifted sum only
    sets a search bound that has a safety margin and a fallback).
    """
    flat = values.reshape(-1)
    n = flat.size
    size = max(1, min(n, _BLOCK))
    r, q = np.empty(size), np.empty(size)
    var = qp = above = 0.0
    add = np.add.reduce  # ndarray.sum's Python wrapper costs more than the sum of a block
    for start in range(0, n, size):
        block = flat[start : start + size]
        k = block.size
        rr, qq = r[:k], q[:k]
        np.copyto(rr, block)
        np.subtract(1.0, rr, out=qq)
        qq *= rr  # p (1 - p)
        var += float(add(qq))
        qq *= rr  # p^2 (1 - p)
        qp += float(add(qq))
        if shift is not None:
            np.maximum(rr, shift, out=rr)
            above += float(add(rr))
    m3 = var - 2.0 * qp
    if shift is None:
        return var, m3
    return var, m3, max(above - n * shift, 0.0)


@torch.no_grad()
def ba_thresholds(
    flat: torch.Tensor,
    stats: RowStats,
    solver: str,
    smooth: float,
    eps: float,
    active: torch.Tensor,
) -> torch.Tensor:
    """Per-row thresholds of RankSEG-BA / TRNA / BA+TRNA (Dice): the mask of row (b, c) is ``flat[b, c] > thr``.

    ``solver`` is ``"ba"``, ``"trna"`` or ``"ba+trna"``; inactive rows get ``+inf`` (empty mask).  Returns a
    ``(B, C)`` tensor of ``flat.dtype`` on ``flat.device``.
    """
    if solver not in ("ba", "trna", "ba+trna"):
        raise ValueError(f"unknown JMLR solver {solver!r}: use 'ba', 'trna' or 'ba+trna'")
    batch, num_classes, n = flat.shape
    thr = torch.full((batch, num_classes), float("inf"), dtype=flat.dtype)
    var_eps = _working_eps(flat.dtype)
    scaled = smooth >= SCALED_SCORE_SMOOTH
    mu_all = stats.mu.detach().to("cpu", torch.float64)
    for b, c in active.detach().to("cpu").nonzero().tolist():
        values = row_values(flat[b, c])
        mu = float(mu_all[b, c])
        t1 = _lemma3_bound(n, smooth, mu)
        var, m3, *rest = row_moments(values, t1)
        head, S, up, at_boundary = sorted_head_sums(values, mu, smooth, rest[0] if rest else None)
        U, cand = _boundaries(head, up, at_boundary)
        scale, lq, uq, pmf = refined_normal_law(n, mu, var, m3, var_eps, eps)
        use_ba = solver == "ba" or (solver == "ba+trna" and 1.0 / max(scale, 1e-8) < 0.2)
        if use_ba:
            tau = _ba_best(head, U, cand, pmf, lq, smooth, scaled, S)
        else:
            tau = first_argmax(_trna_scores(head, U, pmf, lq, uq, mu, var, m3, var_eps, smooth, scaled), cand)
        thr[b, c] = threshold_from_tau(head, tau, flat.dtype)
    return thr.to(flat.device)
