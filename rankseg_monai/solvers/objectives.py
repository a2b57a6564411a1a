"""RankSEG-RMA formulas: the one place each is written (pure torch, float64 in, float64 out).

Notation per (batch, class) row: ``S`` the sum of the selected probabilities, ``n`` the number of selected
voxels (tau), ``mu`` the sum of all probabilities of the row, ``s`` the smoothing constant.

* Dice  f = 2 S / (mu + n + 1 + s) + s / (mu + n + s)          (the empty mask scores s / (mu + s), 0 if s = 0)
* IoU   f = (S + s) / (mu - S + n + s)                          (0 / 0 := 0)

Dice with ``s = 0`` and IoU are quasi-concave in the selection: the optimum is ``{p > t*}`` with
``t* = f*/2`` (Dice) or ``t* = f*/(1+f*)`` (IoU) (Dinkelbach).
"""

from __future__ import annotations

import torch

__all__ = ["rma_score", "rma_score_bound", "dinkelbach_threshold", "dice_increment_bound", "increment_score"]


def rma_score(metric: str, S: torch.Tensor, n: torch.Tensor, mu: torch.Tensor, smooth: float) -> torch.Tensor:
    """RMA objective of a selection with sum ``S`` and size ``n`` (float64 tensors, broadcastable)."""
    if metric == "dice":
        denom = mu + n + 1.0 + smooth
        score = 2.0 * S / denom
        if smooth > 0:
            score = score + smooth / (denom - 1.0)
        return score
    denom = mu - S + n + smooth
    num = S + smooth
    return torch.where(denom > 0, num / torch.where(denom > 0, denom, 1.0), torch.zeros_like(num))


def rma_score_bound(metric: str, mu: torch.Tensor, vmax: torch.Tensor, smooth: float) -> torch.Tensor:
    """An upper bound of :func:`rma_score` over every non-empty selection of a row (float64, from ``mu``, ``vmax``).

    A selection of ``n >= 1`` voxels has ``S <= min(n vmax, mu)``, and both objectives increase with ``S``.
    Dice: ``2 min(n vmax, mu) / (mu + n + 1 + s)`` peaks at ``n = mu / vmax``, and ``s / (mu + n + s)`` at
    ``n = 1``.  IoU: ``(min(n vmax, mu) + s) / (mu - min(n vmax, mu) + n + s)`` is monotone on
    ``[1, mu / vmax]`` and decreasing after it, so it peaks at one of the two ends.
    """
    vmax = vmax.clamp(0.0, 1.0)
    safe_v = torch.where(vmax > 0, vmax, 1.0)
    knee = torch.where(vmax > 0, torch.maximum(mu / safe_v, torch.ones_like(mu)), torch.ones_like(mu))
    if metric == "dice":
        bound = 2.0 * mu / (mu + knee + 1.0 + smooth)
        if smooth > 0:
            bound = bound + smooth / (mu + 1.0 + smooth)
    else:
        ends = []
        for n in (torch.ones_like(mu), knee):
            S = torch.minimum(n * vmax, mu)
            denom = mu - S + n + smooth
            ends.append(torch.where(denom > 0, (S + smooth) / torch.where(denom > 0, denom, 1.0), 0.0))
        bound = torch.maximum(*ends)
    return torch.where(vmax > 0, bound, torch.zeros_like(bound) + (smooth / (mu + 1.0 + smooth) if smooth > 0
                                                                   else 0.0))


def dinkelbach_threshold(metric: str, f: torch.Tensor) -> torch.Tensor:
    """Threshold ``t`` of the Dinkelbach step: ``{p > t}`` maximises ``N - f D`` (Dice s=0 and IoU)."""
    return f / 2.0 if metric == "dice" else f / (1.0 + f)


def dice_increment_bound(t_a: torch.Tensor, mu: torch.Tensor, smooth: float) -> torch.Tensor:
    """For Dice with ``s > 0``: every probability above this bound has a positive increment at any state.

    ``Delta > 0  <=>  p > S/E + s (E+1) / (2 E (E-1))`` with ``E = mu + n + 1 + s``; ``S/E <= t_a`` (the
    optimal threshold of the ``s = 0`` objective with ``mu + s``) and the second term is largest at ``n = 0``.
    """
    k = mu + smooth
    return t_a + smooth * (k + 2.0) / (2.0 * k * (k + 1.0))


def increment_score(
    metric: str,
    p: torch.Tensor,
    M: torch.Tensor,
    T: torch.Tensor,
    mu: torch.Tensor,
    smooth: float,
) -> torch.Tensor:
    """Exact RMA change from adding a voxel of probability ``p`` to a class's uniquely selected set.

    ``M``/``T`` are the probability sum/size of the voxels selected by that class only, ``mu`` the class's
    total probability (all float64, broadcastable against ``p``).
    """
    if metric == "dice":
        D = T + mu + 1.0 + smooth
        if smooth == 0:
            return 2.0 * (p - M / D) / (D + 1.0)
        base = D - 1.0
        safe = torch.where(base > 0, base, 1.0)
        inc = 2.0 * (p * D - M) / (D * (D + 1.0)) - smooth / (safe * D)
        return torch.where(base > 0, inc, torch.full_like(inc, -1.0))
    B = T + mu - M + smooth
    safe_b = torch.where(B > 0, B, 1.0)
    b = torch.where(B > 0, (M + smooth) / safe_b, 0.0)
    return (p - b * (1.0 - p)) / (B + 1.0 - p)
