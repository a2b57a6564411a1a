"""Independent oracles of the tests: float64 numpy written from the formulas, brute force for tiny rows, and the
reference implementations (rankseg 0.0.8, MONAI) where a test compares against them.  No import of
``rankseg_monai``: an oracle never shares code with what it checks.

* RMA (NeurIPS 2025): :func:`rma_value`, :func:`mask_rma_value`, :func:`best_threshold_mask`,
  :func:`brute_force_best`, :func:`increment`, :func:`multiclass_from_masks`;
* expected Dice (JMLR 2023): :func:`dice_table`, :func:`brute_force_expected_dice`, :func:`pb_pmf`,
  :func:`mask_expected_dice`, :func:`reference_scores` (rankseg 0.0.8's BA/TRNA scores, one tau at a time),
  :func:`naive_up_tau` (Lemma 3), :func:`splits_tie_group`;
* metrics of decisions: :func:`label_dice`, :func:`dice_ignore_empty_false`, :func:`monai_dice_hd95`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------------ RMA


def rma_value(metric: str, S: float, n: int, mu: float, s: float) -> float:
    """RMA objective of a selection with sum ``S`` and size ``n`` in a row with total ``mu``:
    Dice ``2S/(mu+n+1+s) + s/(mu+n+s)`` (no second term when ``s = 0``), IoU ``(S+s)/(mu-S+n+s)`` (0/0 := 0)."""
    if metric == "dice":
        v = 2.0 * S / (mu + n + 1.0 + s)
        if s > 0:
            v += s / (mu + n + s)
        return v
    d = mu - S + n + s
    return 0.0 if d == 0 else (S + s) / d


def mask_rma_value(metric: str, p, mask, s: float) -> float:
    """RMA objective of one mask of the row ``p`` (float64)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    m = np.asarray(mask).ravel().astype(bool)
    return rma_value(metric, float(p[m].sum()), int(m.sum()), float(p.sum()), s)


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


def brute_force_best(p: np.ndarray, metric: str, s: float, nonempty: bool = False) -> float:
    """Max of the RMA objective over all 2^N masks (over the non-empty ones with ``nonempty=True``)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    mu = float(p.sum())
    best = -np.inf
    for bits in itertools.product((0, 1), repeat=p.size):
        m = np.array(bits, dtype=bool)
        if nonempty and not m.any():
            continue
        best = max(best, rma_value(metric, float(p[m].sum()), int(m.sum()), mu, s))
    return best


def increment(metric: str, p, M: float, T: float, mu: float, s: float):
    """Change of the RMA objective of a class whose unique set has sum ``M`` and size ``T`` when a voxel of
    probability ``p`` (each entry of the array) joins it."""
    p = np.asarray(p, dtype=np.float64)
    base = rma_value(metric, M, int(T), mu, s)
    return np.array([rma_value(metric, M + q, int(T) + 1, mu, s) for q in p.ravel()]).reshape(p.shape) - base


def multiclass_from_masks(probs: np.ndarray, masks: np.ndarray, active: np.ndarray, metric: str, s: float,
                          policy: str = "max_score", void_index: int = 255) -> np.ndarray:
    """probs/masks (C, N), active (C,): non-overlapping labels by exact increments (slow, for small N).

    A voxel selected by one class gets it; selected by several: the one with the largest increment among them;
    selected by none: ``void_index`` (``policy="void"``) or the largest increment among the active classes
    (all classes when none is active).  Lowest index on ties."""
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


# ------------------------------------------------------------------------------------------- expected Dice


def dice_table(n: int, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    """All 2^n binary vectors (rows) and the Dice of every (mask, truth) pair, 0/0 := 0."""
    vecs = np.array(list(itertools.product([0, 1], repeat=n)), dtype=np.int64)
    inter = vecs @ vecs.T
    den = vecs.sum(1)[:, None] + vecs.sum(1)[None, :] + smooth
    num = 2.0 * inter + smooth
    return vecs, np.divide(num, den, out=np.zeros(den.shape), where=den > 0)


def brute_force_expected_dice(p: np.ndarray, smooth: float) -> tuple[np.ndarray, np.ndarray]:
    """Expected Dice of every one of the 2^n masks (enumerating all 2^n truths): ``(masks, values)``."""
    vecs, table = dice_table(p.size, smooth)
    weights = np.prod(np.where(vecs == 1, p, 1.0 - p), axis=1)
    return vecs.astype(bool), table @ weights


def pb_pmf(p: np.ndarray) -> np.ndarray:
    """Poisson-binomial pmf of ``sum Bernoulli(p_i)`` by repeated convolution."""
    pmf = np.array([1.0])
    for pi in p:
        pmf = np.convolve(pmf, [1.0 - pi, pi])
    return pmf


def mask_expected_dice(p: np.ndarray, mask: np.ndarray, smooth: float, empty: float = 0.0) -> float:
    """Exact E[(2|Y n A| + s) / (|Y| + |A| + s)] of one mask, ``Y_i ~ Bernoulli(p_i)`` independent, by the laws of
    X = |Y n A| and Z = |Y \\ A| (independent): an oracle that shares no code with the solver.  ``empty`` is the
    value of 0/0 (an empty mask against an empty truth): 0 as rankseg's objective, 1 as MONAI's
    ``ignore_empty=False``."""
    mask = np.asarray(mask, dtype=bool)
    tau = int(mask.sum())
    px, pz = pb_pmf(p[mask]), pb_pmf(p[~mask])
    x = np.arange(px.size)[:, None]
    z = np.arange(pz.size)[None, :]
    den = x + z + tau + smooth
    val = np.divide(2.0 * x + smooth, den, out=np.full(den.shape, float(empty)), where=den > 0)
    return float(px @ val @ pz)


def reference_scores(p_desc: np.ndarray, solver: str, smooth: float, eps: float, taus) -> np.ndarray:
    """rankseg 0.0.8's BA/TRNA score of each top-tau mask, written the way 0.0.8 writes it, one tau at a time,
    in float64 with its RefinedNormalPB (``p_desc`` sorted descending)."""
    from rankseg.distribution import RefinedNormalPB

    p = torch.as_tensor(np.ascontiguousarray(p_desc), dtype=torch.float64)
    n = p.numel()
    var_eps = torch.finfo(torch.float64).eps
    mean = p.sum()
    var = torch.sum(p * (1 - p))
    m3 = torch.sum(p * (1 - p) * (1 - 2 * p))
    safe = torch.clamp(var, min=var_eps)
    scale = torch.sqrt(safe)
    skew = m3 / safe ** (3 / 2)
    rv = RefinedNormalPB(dim=n, loc=mean.view(1), scale=scale.view(1), skew=skew.view(1))
    lq, uq = rv.interval(eps)
    lq, uq = int(lq[0]), int(uq[0])
    support = torch.arange(lq, uq + 1, dtype=torch.float64)
    full = rv.pmf(torch.arange(lq, uq + 1).view(1, -1))[0]
    full = full / full.sum()
    cums = torch.cumsum(p, 0)
    scaled = smooth >= 1.0
    out = []
    for tau in taus:
        if tau == 0:
            if scaled:
                out.append(float(-torch.sum(support / (1.0 + support / smooth) * full)))
            else:
                out.append(float(smooth * torch.sum(full / (support + smooth))) if smooth > 0 else 0.0)
            continue
        if solver == "ba":
            w = cums[tau - 1] * full
        else:
            w = torch.zeros_like(full)
            for j in range(tau):
                pj = p[j]
                v = var - pj * (1 - pj)
                vs = torch.clamp(v, min=var_eps)
                rvj = RefinedNormalPB(dim=n - 1, loc=mean - pj, scale=torch.sqrt(vs),
                                      skew=(m3 - pj * (1 - pj) * (1 - 2 * pj)) / vs ** (3 / 2))
                pmf = rvj.pmf(torch.arange(lq, uq + 1))
                w = w + pj * pmf / pmf.sum()
        if scaled:
            ma = torch.sum(2.0 / (1.0 + (support + tau + 1) / smooth) * w)
            nu = -torch.sum((support + tau) / (1.0 + (support + tau) / smooth) * full)
        else:
            ma = torch.sum(2.0 / (support + tau + smooth + 1) * w)
            nu = smooth * torch.sum(full / (support + tau + smooth))
        out.append(float(ma + nu))
    return np.array(out)


def naive_up_tau(p: np.ndarray, smooth: float) -> int:
    """Lemma 3's upper bound of the optimal tau, by a full sort: the first tau with S_tau >= (tau + s + n) p_(tau+1)
    (divided form for huge ``s``)."""
    desc = np.sort(p.astype(np.float64))[::-1]
    n = desc.size
    if n == 1:
        return 1
    S = np.cumsum(desc)
    tau = np.arange(1, n, dtype=np.float64)
    denom = tau + smooth + n
    stop = S[:-1] / denom >= desc[1:] if smooth > 1e6 else S[:-1] >= denom * desc[1:]
    return int(np.argmax(stop)) + 1 if stop.any() else n


def splits_tie_group(p: np.ndarray, mask: np.ndarray) -> bool:
    """Whether a mask selects some but not all voxels of one probability value."""
    sel, rest = p[mask], p[~mask]
    return bool(sel.size and rest.size and sel.min() <= rest.max())


# ------------------------------------------------------------------------------------- metrics of decisions


def label_dice(pred: torch.Tensor, truth: torch.Tensor, c: int) -> float:
    """Dice of class ``c`` between two label maps (1 when both are empty)."""
    a, b = pred == c, truth == c
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / s


def dice_ignore_empty_false(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-row Dice of bool (..., N) masks, 1 when both are empty (MONAI ignore_empty=False)."""
    inter = (pred & truth).sum(-1).double()
    tot = pred.sum(-1).double() + truth.sum(-1).double()
    return torch.where(tot > 0, 2 * inter / tot.clamp(min=1), 1.0)


def monai_dice_hd95(pred: np.ndarray, label: np.ndarray, classes, spacing) -> tuple[list[float], list[float]]:
    """Dice (``ignore_empty=False``) and HD95 (mm) of label maps per class, straight from MONAI."""
    import warnings

    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p = torch.stack([torch.from_numpy(pred == c) for c in classes])[None].float()
    y = torch.stack([torch.from_numpy(label == c) for c in classes])[None].float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, y)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            p, y, spacing=list(spacing))[0]
    return dice.tolist(), hd.tolist()
