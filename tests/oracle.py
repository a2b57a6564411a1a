"""Independent float64 oracles for the tests (numpy, written from the formulas, no shared code)."""

from __future__ import annotations

import itertools

import numpy as np


def rma_value(metric: str, S: float, n: int, mu: float, s: float) -> float:
    if metric == "dice":
        v = 2.0 * S / (mu + n + 1.0 + s)
        if s > 0:
            v += s / (mu + n + s)
        return v
    d = mu - S + n + s
    return 0.0 if d == 0 else (S + s) / d


def best_threshold_mask(p: np.ndarray, metric: str, s: float) -> np.ndarray:
    """First argmax of the RMA objective over threshold sets {p >= v} (and the empty set), float64."""
    p = np.asarray(p, dtype=np.float64).ravel()
    mu = float(p.sum(dtype=np.float64))
    srt = np.sort(p)[::-1]
    csum = np.cumsum(srt)
    n = np.arange(1, p.size + 1, dtype=np.float64)
    last = np.r_[srt[1:] != srt[:-1], True]  # end of a tie group
    if metric == "dice":
        f = 2.0 * csum / (mu + n + 1.0 + s) + (s / (mu + n + s) if s > 0 else 0.0)
    else:
        d = mu - csum + n + s
        f = np.where(d > 0, (csum + s) / np.where(d > 0, d, 1.0), 0.0)
    f = np.where(last, f, -np.inf)
    empty = rma_value(metric, 0.0, 0, mu, s)
    i = int(np.argmax(f))
    if not f[i] > empty:
        return np.zeros_like(p, dtype=bool)
    return p >= srt[i]


def brute_force_best(p: np.ndarray, metric: str, s: float) -> float:
    """Max of the RMA objective over all 2^N masks."""
    p = np.asarray(p, dtype=np.float64).ravel()
    mu = float(p.sum())
    best = -np.inf
    for bits in itertools.product((0, 1), repeat=p.size):
        m = np.array(bits, dtype=bool)
        best = max(best, rma_value(metric, float(p[m].sum()), int(m.sum()), mu, s))
    return best


def increment(metric: str, p, M: float, T: float, mu: float, s: float):
    p = np.asarray(p, dtype=np.float64)
    if metric == "dice":
        base = rma_value("dice", M, int(T), mu, s)
        return np.array([rma_value("dice", M + q, int(T) + 1, mu, s) for q in p.ravel()]).reshape(p.shape) - base
    base = rma_value("iou", M, int(T), mu, s)
    return np.array([rma_value("iou", M + q, int(T) + 1, mu, s) for q in p.ravel()]).reshape(p.shape) - base


def multiclass_from_masks(probs: np.ndarray, masks: np.ndarray, active: np.ndarray, metric: str, s: float,
                          policy: str = "max_score", void_index: int = 255) -> np.ndarray:
    """probs/masks (C, N), active (C,): non-overlapping labels by exact increments (slow, for small N)."""
    C, N = probs.shape
    k = masks.sum(0)
    alone = masks & (k == 1)[None]
    M = (probs * alone).sum(1)
    T = alone.sum(1)
    mu = probs.sum(1)
    out = np.zeros(N, dtype=np.int64)
    fallback = active if active.any() else np.ones(C, dtype=bool)
    for i in range(N):
        if k[i] == 1:
            out[i] = int(np.flatnonzero(masks[:, i])[0])
            continue
        if k[i] == 0 and policy == "void":
            out[i] = void_index
            continue
        elig = masks[:, i] if k[i] > 1 else fallback
        scores = [increment(metric, probs[c, i], M[c], T[c], mu[c], s) if elig[c] else -np.inf for c in range(C)]
        out[i] = int(np.argmax(scores))
    return out
