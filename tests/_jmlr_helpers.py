"""Independent oracles for the JMLR-solver tests: brute force, exact expected Dice of a given mask, and a naive
per-tau re-implementation of rankseg 0.0.8's BA/TRNA scores (its own RefinedNormalPB, float64, one tau at a time).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def blob(shape, seed=0, sharp=12.0, noise=1.0, radius=0.5):
    """Blob-shaped probabilities (float64, (1, 1, *shape)): a noisy logistic ball."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape], indexing="ij")
    r = sum(z**2 for z in grids).sqrt()
    logit = (radius - r) * sharp + torch.randn(tuple(shape), generator=g, dtype=torch.float64) * noise
    return torch.sigmoid(logit)[None, None]


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
    pmf = np.array([1.0])
    for pi in p:
        pmf = np.convolve(pmf, [1.0 - pi, pi])
    return pmf


def mask_expected_dice(p: np.ndarray, mask: np.ndarray, smooth: float) -> float:
    """Exact E[(2|Y n A| + s) / (|Y| + |A| + s)] of one mask (0/0 := 0), by the laws of X = |Y n A| and
    Z = |Y \\ A| (independent): an oracle that shares no code with the solver."""
    mask = np.asarray(mask, dtype=bool)
    tau = int(mask.sum())
    px, pz = pb_pmf(p[mask]), pb_pmf(p[~mask])
    x = np.arange(px.size)[:, None]
    z = np.arange(pz.size)[None, :]
    den = x + z + tau + smooth
    val = np.divide(2.0 * x + smooth, den, out=np.zeros(den.shape), where=den > 0)
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


def splits_tie_group(p: np.ndarray, mask: np.ndarray) -> bool:
    """Whether a mask selects some but not all voxels of one probability value."""
    sel, rest = p[mask], p[~mask]
    return bool(sel.size and rest.size and sel.min() <= rest.max())
