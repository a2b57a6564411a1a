"""Non-overlapping labels from per-class RankSEG masks (pure torch), and a chunked argmax.

A voxel selected by exactly one class gets that class.  Elsewhere the label is the eligible class with the
largest exact RMA increment (``objectives.increment_score``), lowest index on ties:

* selected by several classes: only those classes are eligible;
* selected by none: ``'max_score'`` makes the active (unpruned) classes eligible, or every class when the
  sample has no active class; ``'void'`` labels the voxel ``void_index``.

Increments are computed in float64 and only at the voxels that need them (overlaps and unassigned).
"""

from __future__ import annotations

import torch

from ._stream import RowStats, iter_chunks
from .objectives import increment_score

__all__ = ["assign", "argmax_labels"]


def _class_ids(num_classes: int, device: torch.device) -> torch.Tensor:
    """``0..C-1`` as ``(1, C, 1)`` in the narrowest dtype (masked max-reductions are fast on small ints)."""
    dtype = torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 2**15 else torch.int32
    return torch.arange(num_classes, dtype=dtype, device=device).reshape(1, num_classes, 1)


def _selection(
    chunk: torch.Tensor, thr: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks ``(B, C, n)``, selection count ``k`` ``(B, n)`` and the class of single selections ``(B, n)``.

    All classes at once (a handful of ops per chunk, whatever ``C``); ``labels`` (int64) is the last selecting
    class (0 where none selects), which is the selecting class where ``k == 1``.
    """
    sel = chunk > thr
    num_classes = chunk.shape[1]
    k = sel.sum(1, dtype=torch.int16 if num_classes < 2**15 else torch.int32)
    labels = (sel * ids).amax(1).long()
    return sel, k, labels


@torch.no_grad()
def assign(
    flat: torch.Tensor,
    thr: torch.Tensor,
    stats: RowStats,
    metric: str,
    smooth: float,
    active: torch.Tensor,
    policy: str = "max_score",
    void_index: int = 255,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    out_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """Labels (B, N) from ``flat`` (B, C, N) and per-class thresholds ``thr`` (B, C): mask = flat > thr.

    The output is allocated once in ``out_dtype`` (int64 by default; the caller checks it holds every label)
    and filled chunk by chunk.
    """
    device = flat.device if device is None else torch.device(device)
    batch, num_classes, _ = flat.shape
    thr_d = thr.to(device).unsqueeze(-1)  # (B, C, 1): thr_d[:, c] is (B, 1)
    # pass 1: sum and size of the voxels each class selects alone
    M = torch.zeros((batch, num_classes), dtype=torch.float64, device=device)
    T = torch.zeros((batch, num_classes), dtype=torch.int64, device=device)
    ids = _class_ids(num_classes, device)
    for _, _, chunk in iter_chunks(flat, device, chunk_size, clamp):
        _, k, labels = _selection(chunk, thr_d, ids)
        single = k == 1
        p = chunk.gather(1, labels.unsqueeze(1)).squeeze(1)  # the selecting class's probability
        M.scatter_add_(1, labels, (p * single).double())
        T.scatter_add_(1, labels, single.long())
    T = T.double()
    mu = stats.mu.to(device)
    active_d = active.to(device)
    fallback = active_d | ~active_d.any(dim=1, keepdim=True)
    out = torch.empty((batch, flat.shape[-1]), dtype=out_dtype, device=flat.device)
    # pass 2: labels
    for start, stop, chunk in iter_chunks(flat, device, chunk_size, clamp):
        sel, k, labels = _selection(chunk, thr_d, ids)  # labels: the selecting class where k == 1
        b_idx, v_idx = torch.nonzero(k != 1, as_tuple=True)
        if b_idx.numel():
            p = chunk[b_idx, :, v_idx].double()  # (P, C)
            score = increment_score(metric, p, M[b_idx], T[b_idx], mu[b_idx], smooth)
            kk = k[b_idx, v_idx].unsqueeze(1)
            picked = sel[b_idx, :, v_idx]
            eligible = torch.where(kk > 0, picked, fallback[b_idx])
            best = torch.where(eligible, score, float("-inf")).argmax(1)
            if policy == "void":
                best = torch.where(kk.squeeze(1) == 0, torch.full_like(best, void_index), best)
            labels[b_idx, v_idx] = best
        out[:, start:stop] = labels.to(flat.device, non_blocking=True)
    return out


@torch.no_grad()
def argmax_labels(
    flat: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    out_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """``flat.argmax(1)`` (first maximum wins), computed chunk by chunk with a running maximum over classes."""
    device = flat.device if device is None else torch.device(device)
    out = torch.empty((flat.shape[0], flat.shape[-1]), dtype=out_dtype, device=flat.device)
    for start, stop, chunk in iter_chunks(flat, device, chunk_size):
        best = chunk[:, 0].clone()
        idx = torch.zeros(best.shape, dtype=torch.int64, device=device)
        for c in range(1, chunk.shape[1]):
            better = chunk[:, c] > best
            best = torch.where(better, chunk[:, c], best)
            idx.masked_fill_(better, c)
        out[:, start:stop] = idx.to(flat.device, non_blocking=True)
    return out
