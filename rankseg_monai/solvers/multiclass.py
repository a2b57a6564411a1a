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

from . import _stream
from ._stream import RowStats, chunk_step, iter_chunks
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


def _selection_count_labels(chunk: torch.Tensor, thr: torch.Tensor, ids: torch.Tensor,
                            row_max: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` and ``labels`` of :func:`_selection`, comparing only the rows whose chunk maximum ``row_max`` ``(B, C)``
    exceeds their threshold (the others select nothing here: on a many-class volume, most classes in most chunks)."""
    batch, num_classes, n = chunk.shape
    if row_max is not None:
        hit = torch.nonzero((row_max > thr.squeeze(-1)).reshape(-1)).squeeze(1)
        if hit.numel() * 2 <= batch * num_classes:
            count_dtype = torch.int16 if num_classes < 2**15 else torch.int32
            b_of, c_of = hit // num_classes, hit % num_classes
            sel = chunk.reshape(batch * num_classes, n).index_select(0, hit) > thr.reshape(-1, 1)[hit]
            if batch == 1:
                k = sel.sum(0, dtype=count_dtype).unsqueeze(0)
                labels = (sel * ids.reshape(-1, 1)[c_of]).amax(0).unsqueeze(0) if hit.numel() else \
                    torch.zeros((1, n), dtype=ids.dtype, device=chunk.device)
            else:
                k = torch.zeros((batch, n), dtype=count_dtype, device=chunk.device).index_add_(0, b_of,
                                                                                               sel.to(count_dtype))
                labels = torch.zeros((batch, n), dtype=ids.dtype, device=chunk.device).scatter_reduce_(
                    0, b_of.unsqueeze(1).expand(-1, n), sel * ids.reshape(-1, 1)[c_of], "amax")
            return k, labels.long()
    _, k, labels = _selection(chunk, thr, ids)
    return k, labels


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
    and filled chunk by chunk.  One pass over the volume: it writes the label of every voxel selected by exactly
    one class, sums those voxels per class (``M``, ``T``, the state of the increments) and keeps the positions of
    the other voxels; once the sums are complete, the kept voxels are read back and labelled by their increments.
    When the kept positions would outgrow :func:`_pending_cap`, the chunks from there on are labelled in a second
    pass instead (as before), so the memory stays bounded; the labels are the same either way.
    """
    device = flat.device if device is None else torch.device(device)
    batch, num_classes, n_vox = flat.shape
    thr_d = thr.to(device).unsqueeze(-1)  # (B, C, 1): thr_d[:, c] is (B, 1)
    M = torch.zeros((batch, num_classes), dtype=torch.float64, device=device)
    T = torch.zeros((batch, num_classes), dtype=torch.int64, device=device)
    ids = _class_ids(num_classes, device)
    out = torch.empty((batch, n_vox), dtype=out_dtype, device=flat.device)
    cap = _pending_cap(batch, n_vox)
    pos_dtype = torch.int32 if batch * n_vox < 2**31 else torch.int64
    pending: list[torch.Tensor] = []  # flat positions b * N + v (on flat's device) of voxels with k != 1
    n_pending = 0
    second_pass_from = None  # first chunk start labelled by a second pass (None: every chunk done in one pass)
    chunk_max = stats.maxima_for(flat, device, chunk_size) if _stream.row_selective(device) else None
    for i, (start, stop, chunk) in enumerate(iter_chunks(flat, device, chunk_size, clamp)):
        k, labels = _selection_count_labels(chunk, thr_d, ids, None if chunk_max is None else chunk_max[..., i])
        single = k == 1
        p = chunk.gather(1, labels.unsqueeze(1)).squeeze(1)  # the selecting class's probability
        M.scatter_add_(1, labels, (p * single).double())
        T.scatter_add_(1, labels, single.long())
        out[:, start:stop] = labels  # final where k == 1 (a blocking copy back when streaming)
        if second_pass_from is not None:
            continue
        b_idx, v_idx = torch.nonzero(~single, as_tuple=True)
        if n_pending + b_idx.numel() > cap:
            second_pass_from = start
            continue
        n_pending += b_idx.numel()
        pending.append((b_idx * n_vox + (v_idx + start)).to(device=flat.device, dtype=pos_dtype))
    T = T.double()
    mu = stats.mu.to(device)
    active_d = active.to(device)
    fallback = active_d | ~active_d.any(dim=1, keepdim=True)
    resolve = _Resolver(metric, smooth, policy, void_index, thr_d.squeeze(-1), M, T, mu, fallback)
    cols = resolve.cols
    # voxels are scored in blocks of about 2^16 scores (512 KiB of float64 per temporary: cache-sized, and a few
    # MB in all, less than a chunk's worth)
    step = min(batch * chunk_step(flat, device, chunk_size),
               max(256, (1 << 16) // (num_classes if cols is None else cols.numel())))
    if pending:
        positions = torch.cat(pending)  # int32 (or int64): voxel order within a sample
        del pending
        if batch > 1:  # chunks list every sample in turn: by sample, then voxel, so row-wise gathers stream
            positions = positions.sort().values
        cols_f = None if cols is None else cols.to(flat.device)
        for lo in range(0, positions.numel(), step):
            pos = positions[lo:lo + step].long()
            b_idx, v_idx = pos // n_vox, pos % n_vox
            p = _gather_voxels(flat, b_idx, v_idx, cols_f)  # on flat's device: the chunk's chunk[b_idx, :, v_idx]
            if clamp:
                p = p.clamp(0.0, 1.0)
            best = resolve(p.to(device), b_idx.to(device), None)
            out.view(-1)[pos] = best.to(device=flat.device, dtype=out_dtype)
        del positions
    if second_pass_from is not None:
        for start, stop, chunk in iter_chunks(flat, device, chunk_size, clamp, begin=second_pass_from):
            sel, k, labels = _selection(chunk, thr_d, ids)
            b_all, v_all = torch.nonzero(k != 1, as_tuple=True)
            for lo in range(0, b_all.numel(), step):
                b_idx, v_idx = b_all[lo:lo + step], v_all[lo:lo + step]
                labels[b_idx, v_idx] = resolve(_rows_at(chunk, b_idx, v_idx, cols), b_idx,
                                               _rows_at(sel, b_idx, v_idx, cols))
            out[:, start:stop] = labels
    return out


def _gather_voxels(flat: torch.Tensor, b_idx: torch.Tensor, v_idx: torch.Tensor, cols: torch.Tensor | None
                   ) -> torch.Tensor:
    """``flat[b_idx, :, v_idx]`` ``(P, C)`` (or its columns ``cols``) for positions sorted by ``b_idx``: gathered row by
    row (each class row read in voxel order, one stream), not voxel by voxel (C streams a voxel apart)."""
    parts = []
    samples = torch.unique_consecutive(b_idx) if flat.shape[0] > 1 else b_idx[:1]
    for b in samples.tolist():
        v = v_idx if flat.shape[0] == 1 else v_idx[b_idx == b]
        part = flat[b].index_select(1, v)  # (C, P_b)
        parts.append((part if cols is None else part.index_select(0, cols)).T)
    # (P, C) row-major: the resolver reduces over classes (argmax over a strided dim is slow)
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _rows_at(x: torch.Tensor, b_idx: torch.Tensor, v_idx: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """``x[b_idx, :, v_idx]`` ``(P, C)``, or only the columns ``cols`` ``(P, K)``."""
    if cols is None:
        return x[b_idx, :, v_idx]
    return x[b_idx.unsqueeze(1), cols.unsqueeze(0), v_idx.unsqueeze(1)]


def _pending_cap(batch: int, n_vox: int) -> int:
    """Most voxel positions :func:`assign` keeps for after its pass: 1/32 of the voxels (int32 positions: 1/8 byte
    per voxel at most, 1/64 of an int64 label map), at least 2^16.  Network outputs leave about 1% of the voxels to
    the increments; diffuse volumes (more) take the second pass for the rest."""
    return max(1 << 16, batch * n_vox // 32)


class _Resolver:
    """Labels of voxels selected by zero or several classes, from their probabilities ``(P, C)``: the eligible class
    with the largest exact RMA increment (float64), lowest index on ties; ``void_index`` for unselected voxels under
    ``policy="void"``.

    On the CPU only the columns ``cols`` that can be eligible somewhere are scored (the classes with a finite
    threshold or in the fallback set, and class 0): ``p`` and ``picked`` then hold those columns only, in class
    order, so the first maximum is the same class (an ineligible column scores ``-inf`` in the full row; class 0
    keeps the answer of an all ``-inf`` row).  ``cols`` is ``None`` when every class can be eligible.
    """

    #: score only the columns that can be eligible (CPU); False: every column (the reference, for the tests)
    restrict = True

    def __init__(self, metric, smooth, policy, void_index, thr, M, T, mu, fallback):
        self.metric, self.smooth, self.policy, self.void_index = metric, smooth, policy, void_index
        self.cols = None
        if self.restrict and _stream.row_selective(thr.device):
            can = (fallback | (thr < float("inf"))).any(0)
            can[0] = True
            if not bool(can.all()):
                self.cols = torch.nonzero(can).squeeze(1)
                thr, M, T, mu, fallback = (t[:, self.cols] for t in (thr, M, T, mu, fallback))
        self.thr, self.M, self.T, self.mu, self.fallback = thr, M, T, mu, fallback

    def __call__(self, p: torch.Tensor, b_idx: torch.Tensor, picked: torch.Tensor | None) -> torch.Tensor:
        if picked is None:  # the same comparison as the chunk's (input dtype, same thresholds)
            picked = p > self.thr[b_idx]
        score = increment_score(self.metric, p.double(), self.M[b_idx], self.T[b_idx], self.mu[b_idx], self.smooth)
        kk = picked.sum(1, keepdim=True)
        eligible = torch.where(kk > 0, picked, self.fallback[b_idx])
        best = torch.where(eligible, score, float("-inf")).argmax(1)
        if self.cols is not None:
            best = self.cols[best]
        if self.policy == "void":
            best = torch.where(kk.squeeze(1) == 0, torch.full_like(best, self.void_index), best)
        return best


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
        out[:, start:stop] = idx  # a blocking copy back when streaming
    return out
