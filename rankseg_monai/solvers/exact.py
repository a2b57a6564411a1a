"""Exact RankSEG for Dice (multilabel): the top-``tau`` mask with the largest exact expected Dice.

The truth ``Y`` has independent Bernoulli(``p``) voxels; the Dice score of a mask ``A`` with smoothing ``s`` is
``(2 |Y n A| + s) / (|Y| + |A| + s)`` with ``0/0 := 0`` (only possible for ``s = 0``, ``A`` and ``Y`` empty),
the convention of rankseg 0.0.8 and of the JMLR paper.  With ``Gamma = |Y|`` and ``Gamma_-j = |Y| - Y_j``:

    E[|Y n A| / (|Y| + tau + s)] = sum_{j in A} E[Y_j / (1 + Gamma_-j + tau + s)]
                                 = sum_{j in A} p_j E[1 / (1 + Gamma_-j + tau + s)]

because ``Y_j`` is independent of ``Gamma_-j``.  Hence, for the top-``tau`` mask (``tau >= 1``),

    pi(tau) = 2 sum_k W_tau(k) / (k + tau + 1 + s) + s sum_k P(k) / (k + tau + s),
    W_tau = sum_{j <= tau} p(j) P_-j,

with ``P`` the Poisson-binomial PMF of ``Gamma`` and ``P_-j`` that of ``Gamma_-j``; ``pi(0) = s E[1/(Gamma + s)]``
(``0`` for ``s = 0``).  For ``s >= 1`` the score ``s (pi - 1)`` is maximised instead (same argmax, as rankseg
0.0.8 does), so the differences survive when ``pi`` rounds to 1.

Computation (float64, per active row, ``n`` = number of voxels with ``p > 0``):

* ``P`` by the textbook dynamic programme (convex combinations only: every entry has a small relative error).
* ``P_-j`` by deconvolution, ``P = (1 - p) P_-j + p shift(P_-j)``: forward recursion
  ``P_-j(k) = (P(k) - p P_-j(k-1)) / (1 - p)`` for ``p <= 1/2`` and the same recursion on the reversed law
  (``Gamma' = n - Gamma``, probabilities ``1 - p``) for ``p > 1/2``.  The error multiplier per step is
  ``p / (1 - p) <= 1``, so the absolute error of every ``P_-j(k)`` stays within a few ``n`` ulps.
* ``W_tau`` by a cumulative sum over ``j`` (in chunks of ``j``), then one weighted sum per ``tau``.

Time ``O(n^2)`` and memory ``O(n * chunk)`` per row: rows with more than :data:`EXACT_MAX_VOXELS` voxels of
``p > 0`` are refused (use ``solver='trna'`` or ``'rma'``).  Voxels with ``p = 0`` never enter ``Gamma``: they are
only a candidate as a whole (the mask of every voxel).  As every solver of this package, the mask is a threshold
``p > thr``: ``tau`` is chosen among tie-group boundaries (first maximum), so a tie group is never split; without
ties this is the optimum over all ``2^N`` masks (the JMLR ranking theorem).
"""

from __future__ import annotations

import numpy as np
import torch

from ._sorted import SCALED_SCORE_SMOOTH, cumsum, first_argmax, row_values, threshold_from_tau
from ._stream import RowStats

__all__ = ["EXACT_MAX_VOXELS", "exact_thresholds", "poisson_binomial_pmf", "leave_one_out_pmfs", "exact_scores"]

#: most voxels with p > 0 per active row that ``solver='exact'`` accepts (O(n^2) time)
EXACT_MAX_VOXELS = 8192
#: leave-one-out PMFs computed at once (memory: 8 * n * chunk bytes)
_CHUNK = 512


def poisson_binomial_pmf(p: np.ndarray) -> np.ndarray:
    """PMF of the sum of independent Bernoulli(``p``) (float64, length ``len(p) + 1``), by the exact DP."""
    n = p.size
    pmf = np.zeros(n + 1)
    pmf[0] = 1.0
    for i, pi in enumerate(p.tolist()):
        # P_new(k) = (1 - p) P(k) + p P(k - 1), k = 0..i+1
        head = pmf[: i + 1] * pi
        pmf[: i + 1] *= 1.0 - pi
        pmf[1 : i + 2] += head
    return pmf


def _forward_deconvolve(pmf: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``(len(pmf) - 1, len(p))`` array: column ``j`` is the law of the sum without a Bernoulli(``p[j]``),
    by ``q(k) = (P(k) - p q(k-1)) / (1 - p)`` (stable for ``p <= 1/2``)."""
    n = pmf.size - 1
    a = 1.0 / (1.0 - p)
    b = -p * a
    out = np.empty((n, p.size))
    out[0] = pmf[0] * a
    for k in range(1, n):
        np.multiply(out[k - 1], b, out=out[k])
        out[k] += pmf[k] * a
    return out


def leave_one_out_pmfs(pmf: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Laws of ``Gamma_-j`` for every ``j`` (``(len(pmf) - 1, len(p))``, column ``j`` for ``p[j]``).

    ``p <= 1/2``: forward recursion on ``P``; ``p > 1/2``: forward recursion on the reversed law with ``1 - p``
    (the law of ``n - Gamma``), reversed back.  Tiny negative rounding residues are clipped to 0.
    """
    n = pmf.size - 1
    high = p > 0.5
    if high[: int(high.sum())].all():  # already the p > 1/2 columns first (descending input)
        order = None
    else:
        order = np.argsort(~high, kind="stable")
    ps = p if order is None else p[order]
    h = int(high.sum())
    out = np.empty((n, p.size))
    if h:
        out[:, :h] = _forward_deconvolve(pmf[::-1].copy(), 1.0 - ps[:h])[::-1]
    if h < p.size:
        out[:, h:] = _forward_deconvolve(pmf, ps[h:])
    np.maximum(out, 0.0, out=out)
    if order is not None:
        out = out[:, np.argsort(order, kind="stable")]
    return out


def exact_scores(p: np.ndarray, smooth: float, total: int | None = None) -> np.ndarray:
    """Exact expected Dice (or ``s (E - 1)`` for ``s >= 1``) of the top-``tau`` masks, ``tau = 0..n``.

    ``p`` are the positive probabilities of the row sorted descending; with ``total > n`` (the row also has
    ``total - n`` zero probabilities) one more entry, the score of the full mask ``tau = total``, is appended.
    """
    n = p.size
    scaled = smooth >= SCALED_SCORE_SMOOTH
    pmf = poisson_binomial_pmf(p)
    k = np.arange(n, dtype=np.float64)  # support of Gamma_-j
    k_full = np.arange(n + 1, dtype=np.float64)
    taus = list(range(1, n + 1)) + ([total] if total is not None and total > n else [])
    scores = np.empty(1 + len(taus))
    if scaled:
        scores[0] = -np.sum(pmf * (k_full / (1.0 + k_full / smooth)))
    else:
        scores[0] = smooth * np.sum(pmf / (k_full + smooth)) if smooth > 0 else 0.0
    carry = np.zeros(n)
    ma = np.empty(len(taus))
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        q = leave_one_out_pmfs(pmf, p[start:stop])  # (n, chunk)
        w = cumsum(q * p[start:stop], axis=1) + carry[:, None]
        carry = w[:, -1].copy()
        c = np.arange(start + 1, stop + 1, dtype=np.float64)[None, :] + k[:, None] + 1.0  # k + tau + 1
        weight = 1.0 / (1.0 + c / smooth) if scaled else 1.0 / (c + smooth)
        ma[start:stop] = 2.0 * np.sum(w * weight, axis=0)
    if len(taus) > n:
        c = k + total + 1.0
        ma[n] = 2.0 * np.sum(carry * (1.0 / (1.0 + c / smooth) if scaled else 1.0 / (c + smooth)))
    m = k_full[:, None] + np.asarray(taus, dtype=np.float64)[None, :]  # k + tau
    if scaled:
        nu = -(pmf[:, None] * (m / (1.0 + m / smooth))).sum(0) if n <= 2048 else _nu_chunked(pmf, m, smooth, True)
    elif smooth > 0:
        nu = (pmf[:, None] * (smooth / (m + smooth))).sum(0) if n <= 2048 else _nu_chunked(pmf, m, smooth, False)
    else:
        nu = 0.0
    scores[1:] = ma + nu
    return scores


def _nu_chunked(pmf: np.ndarray, m: np.ndarray, smooth: float, scaled: bool) -> np.ndarray:
    out = np.empty(m.shape[1])
    for start in range(0, m.shape[1], _CHUNK):
        mm = m[:, start : start + _CHUNK]
        term = -(mm / (1.0 + mm / smooth)) if scaled else smooth / (mm + smooth)
        out[start : start + _CHUNK] = (pmf[:, None] * term).sum(0)
    return out


@torch.no_grad()
def exact_thresholds(flat: torch.Tensor, stats: RowStats, smooth: float, active: torch.Tensor) -> torch.Tensor:
    """Per-row thresholds of the exact Dice-optimal top-``tau`` mask: the mask of row (b, c) is
    ``flat[b, c] > thr[b, c]``; inactive rows get ``+inf``.  ``(B, C)`` tensor of ``flat.dtype`` on its device.

    Raises:
        ValueError: an active row has more than :data:`EXACT_MAX_VOXELS` voxels with ``p > 0``.
    """
    batch, num_classes, total = flat.shape
    thr = torch.full((batch, num_classes), float("inf"), dtype=flat.dtype)
    rows = active.detach().to("cpu").nonzero().tolist()
    positives = []
    for b, c in rows:
        values = row_values(flat[b, c])
        pos = values[values > 0]
        if pos.size > EXACT_MAX_VOXELS:
            raise ValueError(
                f"solver='exact' needs O(n^2) time for n voxels with p > 0: row (batch {b}, class {c}) has "
                f"{pos.size}, above the limit of {EXACT_MAX_VOXELS}; use solver='trna' (or 'rma') for inputs this "
                "large, or crop the volume to the region of interest"
            )
        positives.append(pos)
    for (b, c), pos in zip(rows, positives):
        head = np.sort(pos.astype(np.float64))[::-1]
        n = head.size
        scores = exact_scores(head, smooth, total)
        cand = np.ones(scores.size, dtype=bool)
        if n > 1:
            cand[1:n] = head[:-1] > head[1:]
        tau = first_argmax(scores, cand)
        if tau > n:  # the full mask, zeros included
            full = np.concatenate([head, np.zeros(total - n)])
            thr[b, c] = threshold_from_tau(full, total, flat.dtype)
        else:
            thr[b, c] = threshold_from_tau(head, tau, flat.dtype)
    return thr.to(flat.device)
