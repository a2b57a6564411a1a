"""Helpers for the solvers that work on sorted rows (BA, TRNA, BA+TRNA, exact); pure torch and numpy.

A row is read as a numpy array of its own values (:func:`row_values`), sorted by the solver, scored at
tie-group boundaries (:func:`first_argmax`), and turned back into a threshold of the input dtype
(:func:`threshold_from_tau`) so that the mask is ``p > thr`` and a tie group is never split.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SCALED_SCORE_SMOOTH", "row_values", "cumsum", "threshold_from_tau", "first_argmax"]

#: scores are rescaled to ``s * (pi - 1)`` for ``s >= 1`` (rankseg 0.0.8's rule)
SCALED_SCORE_SMOOTH = 1.0


def row_values(row: torch.Tensor) -> np.ndarray:
    """One row as a numpy array of its own values (zero-copy on the CPU; float16/bfloat16 widened exactly).

    Values outside ``[0, 1]`` can only reach a solver when the entry was called with ``clamp=True`` (the value
    check raises otherwise), so they are clipped here, as the entry's mask pass clips them.
    """
    if row.dtype in (torch.float16, torch.bfloat16):
        row = row.float()
    values = row.detach().cpu().numpy()
    if values.size and (values.min() < 0 or values.max() > 1):
        values = np.clip(values, 0, 1)
    return values


def cumsum(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """float64 running sums along ``axis``: torch's CPU scan, bit for bit ``np.cumsum`` (sequential), 3-10x faster."""
    return torch.cumsum(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)), axis).numpy()


def threshold_from_tau(head: np.ndarray, tau: int, dtype: torch.dtype) -> torch.Tensor:
    """Threshold (0-d, ``dtype``) whose mask ``p > thr`` is the top-``tau`` set (``+inf`` for ``tau = 0``)."""
    if tau == 0:
        return torch.tensor(float("inf"), dtype=dtype)
    v = torch.tensor(float(head[tau - 1]), dtype=torch.float64).to(dtype)
    return torch.nextafter(v, torch.tensor(float("-inf"), dtype=dtype))


def first_argmax(scores: np.ndarray, cand: np.ndarray) -> int:
    """First index of the maximum of ``scores`` over the candidates (NaN scores never win)."""
    masked = np.where(cand & ~np.isnan(scores), scores, -np.inf)
    return int(np.argmax(masked))
