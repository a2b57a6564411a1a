"""Streaming machinery shared by every solver (pure torch, no MONAI import).

* :func:`flat_view`: a ``(B, C, N)`` view of ``(B, C, *spatial)`` without copying (permuted layouts included);
* :func:`iter_chunks`: the one chunk loop over the voxels of all rows, which also streams a CPU volume
  through a GPU when ``device`` differs from the data's device;
* :class:`RowStats` / :func:`row_statistics`: the one pass that validates the values and gives per-row
  min/max, the float64 sum and (for RMA) the sum/count above one half;
* :func:`floor_to_dtype`: thresholds that compare exactly in the input dtype (fp16/bf16 are never upcast);
* :func:`threshold_masks`: the bool masks ``p > thr`` of every row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .validation import CLAMP_TOLERANCE, check_probability_values

__all__ = [
    "CLAMP_TOLERANCE",
    "RowStats",
    "flat_view",
    "iter_chunks",
    "chunk_step",
    "row_selective",
    "floor_to_dtype",
    "row_statistics",
    "threshold_masks",
    "mask_sums",
]


@dataclass
class RowStats:
    """Per-row statistics from one pass over the volume (rows = (batch, class), tensors of shape (B, C)).

    ``vmin``/``vmax`` are float64 (after clamping when requested), ``mu`` the float64 sum of the row,
    ``s_half``/``n_half`` the float64 sum and int64 count of probabilities ``> 1/2`` (``None`` when the pass
    was asked not to compute them: only RMA uses them).  ``chunk_max``: the maximum of each row in each chunk of
    the pass, ``(B, C, chunks)`` in the input dtype (after clamping), with ``chunk_step`` voxels per chunk; later
    passes over the same chunks skip the rows that cannot reach their thresholds there.
    """

    vmin: torch.Tensor
    vmax: torch.Tensor
    mu: torch.Tensor
    s_half: torch.Tensor | None
    n_half: torch.Tensor | None
    chunk_max: torch.Tensor | None = None
    chunk_step: int | None = None

    def maxima_for(self, flat: torch.Tensor, device: torch.device, chunk_size: int | None) -> torch.Tensor | None:
        """``chunk_max`` if it belongs to the chunks ``iter_chunks(flat, device, chunk_size)`` yields, else ``None``."""
        if self.chunk_max is None or self.chunk_step != chunk_step(flat, device, chunk_size):
            return None
        if tuple(self.chunk_max.shape[:2]) != tuple(flat.shape[:2]):
            return None
        return self.chunk_max


def _auto_chunk(rows: int, n: int, device: torch.device) -> int:
    # values per chunk (all rows): big enough to amortise per-op overhead, at most 1/8 of the volume so that
    # chunk temporaries stay a fraction of the input on small volumes too
    target = (1 << 26) if device.type == "cuda" else (1 << 21)
    target = min(target, max(1 << 16, rows * n // 8))
    return max(1024, min(n, target // max(rows, 1)))


def row_selective(device: torch.device) -> bool:
    """Whether the passes on ``device`` may skip, chunk by chunk, the rows that cannot matter there (the CPU).

    Picking those rows needs their number on the host: cheap on the CPU, a host sync per chunk on a GPU, where the
    full-volume ops are fast anyway.  Either way the results are the same bits (tests switch this off on the CPU
    to run the GPU's code paths).
    """
    return device.type == "cpu"


def chunk_step(flat: torch.Tensor, device: torch.device | None = None, chunk_size: int | None = None) -> int:
    """Voxels per row in each chunk of :func:`iter_chunks` (``chunk_size``, or the automatic size)."""
    device = flat.device if device is None else torch.device(device)
    return chunk_size or _auto_chunk(flat.shape[0] * flat.shape[1], flat.shape[-1], device)


def iter_chunks(
    flat: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    begin: int = 0,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, chunk)`` with chunk ``flat[..., start:stop]`` on ``device`` (clipped if ``clamp``).

    ``begin``: the first chunk's start, a start this loop yields (to resume a pass; chunks never depend on it).
    """
    device = flat.device if device is None else torch.device(device)
    n = flat.shape[-1]
    step = chunk_step(flat, device, chunk_size)
    if begin % step:
        raise ValueError(f"begin={begin} is not a chunk start (multiples of {step})")
    streaming = device != flat.device
    for start in range(begin, n, step):
        stop = min(n, start + step)
        chunk = flat[..., start:stop]
        if streaming:
            chunk = chunk.contiguous()
            if flat.device.type == "cpu" and device.type == "cuda":
                chunk = chunk.pin_memory()
            chunk = chunk.to(device, non_blocking=True)
        if clamp:
            chunk = chunk.clamp(0.0, 1.0)
        yield start, stop, chunk


def _rows_above_half(chunk_max: torch.Tensor, rows_total: int) -> torch.Tensor | None:
    """Flat ids of the rows whose chunk maximum exceeds 1/2 (at least two when there are two rows or more, so the
    reduction over them is split across threads as the full one is: by rows), or ``None`` when that is most rows
    (the full chunk is cheaper than a copy of its rows)."""
    rows = torch.nonzero(chunk_max.reshape(-1) > 0.5).squeeze(1)
    if rows.numel() * 4 > rows_total * 3:
        return None
    if rows.numel() == 1 and rows_total > 1:
        rows = torch.cat([rows, (rows + 1) % rows_total]).sort().values
    return rows


def _above_half(chunk: torch.Tensor) -> torch.Tensor:
    """``where(chunk > 1/2, chunk, 0)`` in one op (``torch.nn.functional.threshold``)."""
    return torch.nn.functional.threshold(chunk, 0.5, 0.0)


def floor_to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest ``dtype`` value ``<= t`` (float64 in): then ``x > t  <=>  x > floor_to_dtype(t)`` for ``dtype`` x."""
    if dtype == torch.float64:
        return t.clone()
    td = t.to(dtype)
    over = td.double() > t  # rounded up: step down once (no host sync, so unconditional)
    return torch.where(over, torch.nextafter(td, torch.full_like(td, float("-inf"))), td)


def row_statistics(
    flat: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    half: bool = True,
) -> RowStats:
    """One pass: value checks, per-row min/max, float64 sum, and (``half=True``) the sum/count above one half."""
    device = flat.device if device is None else torch.device(device)
    shape = flat.shape[:2]
    f64 = dict(dtype=torch.float64, device=device)
    vmin = torch.full(shape, float("inf"), **f64)
    vmax = torch.full(shape, float("-inf"), **f64)
    raw_min = torch.full(shape, float("inf"), **f64)
    raw_max = torch.full(shape, float("-inf"), **f64)
    mu = torch.zeros(shape, **f64)
    s_half = torch.zeros(shape, **f64) if half else None
    n_half = torch.zeros(shape, dtype=torch.int64, device=device) if half else None
    rows_total = shape[0] * shape[1]
    selective = row_selective(device)
    maxima = []
    for _, _, chunk in iter_chunks(flat, device, chunk_size, clamp=False):
        lo, hi = chunk.amin(-1), chunk.amax(-1)  # torch.aminmax(dim=) is 10-25x slower on the CPU (torch 2.13)
        raw_min = torch.minimum(raw_min, lo.double())
        raw_max = torch.maximum(raw_max, hi.double())
        maxima.append(hi.clamp(0.0, 1.0) if clamp else hi)
        if clamp:
            chunk = chunk.clamp(0.0, 1.0)
        mu += chunk.sum(-1, dtype=torch.float64)
        if not half:
            continue
        # threshold(x, 1/2, 0) = where(x > 1/2, x, 0): one fused op, 5-20x faster than (x * (x > 1/2)) with the
        # same values, so the same float64 sums; the count as an int32 sum of the mask (count_nonzero is 3x slower)
        rows = _rows_above_half(hi, rows_total) if selective else None
        if rows is None:
            s_half += _above_half(chunk).sum(-1, dtype=torch.float64)
            n_half += (chunk > 0.5).sum(-1, dtype=torch.int32)
        elif rows.numel():
            # a row whose chunk maximum is <= 1/2 adds +0.0 and 0: only the others are summed (on a many-class
            # volume most classes have no value above 1/2 in most chunks); a row's float64 sum is the same bits
            # whichever other rows are reduced with it (checked: tests/solvers/test_speed_paths.py)
            sub = chunk.reshape(rows_total, -1).index_select(0, rows)
            s_half.view(-1).index_add_(0, rows, _above_half(sub).sum(-1, dtype=torch.float64))
            n_half.view(-1).index_add_(0, rows, (sub > 0.5).sum(-1))
    gmin, gmax = torch.stack([raw_min.min(), raw_max.max()]).tolist()  # one host sync
    check_probability_values(gmin, gmax, tolerance=CLAMP_TOLERANCE if clamp else 0.0)
    vmin = raw_min.clamp(0.0, 1.0) if clamp else raw_min
    vmax = raw_max.clamp(0.0, 1.0) if clamp else raw_max
    return RowStats(vmin=vmin, vmax=vmax, mu=mu, s_half=s_half, n_half=n_half, chunk_max=torch.stack(maxima, -1),
                    chunk_step=chunk_step(flat, device, chunk_size))




def threshold_masks(
    flat: torch.Tensor,
    thr: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
) -> torch.Tensor:
    """Bool masks ``flat > thr[..., None]`` (same device as ``flat``)."""
    device = flat.device if device is None else torch.device(device)
    thr_d = thr.to(device).unsqueeze(-1)
    if device == flat.device and not clamp:
        return flat > thr_d
    out = torch.empty(flat.shape, dtype=torch.bool, device=flat.device)
    for start, stop, chunk in iter_chunks(flat, device, chunk_size, clamp):
        out[..., start:stop] = chunk > thr_d  # a blocking copy back (a non-blocking one may still be in flight)
    return out


def flat_view(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(B, C, N)`` view of ``(B, C, *spatial)`` without copying, and the function that shapes results back.

    A contiguous input is reshaped.  A permuted one (e.g. after ``Invertd`` undid an ``Orientationd``, which
    leaves the spatial dims in memory order ``(1, 2, 0)``) is viewed with its spatial dims in memory order, so
    no copy of the volume is made; results (``(B, N)`` labels or ``(B, C, N)`` masks) are shaped back into the
    input's dim order (a view with the input's memory order).  Only layouts that no dim order makes a view of
    (sliced or overlapping strides) are copied, as ``reshape`` does.
    """
    batch, num_classes, *spatial = x.shape
    ndim = x.dim()
    if x.is_contiguous() or ndim <= 3:
        flat = x.reshape(batch, num_classes, -1)
        return flat, lambda out: out.reshape(*out.shape[:-1], *spatial)
    perm = sorted(range(2, ndim), key=lambda d: (spatial[d - 2] != 1, -x.stride(d)))  # size-1 dims first
    try:
        flat = x.permute(0, 1, *perm).view(batch, num_classes, -1)
    except RuntimeError:  # no dim order gives a view: copy (as reshape would)
        flat = x.reshape(batch, num_classes, -1)
        return flat, lambda out: out.reshape(*out.shape[:-1], *spatial)
    shape_perm = [spatial[d - 2] for d in perm]
    inverse = [perm.index(d) for d in range(2, ndim)]

    def unflatten(out: torch.Tensor) -> torch.Tensor:
        lead = out.dim() - 1  # 1 for labels (B, N), 2 for masks (B, C, N)
        out = out.reshape(*out.shape[:-1], *shape_perm)
        return out.permute(*range(lead), *(lead + i for i in inverse))

    return flat, unflatten


@torch.no_grad()
def mask_sums(
    flat: torch.Tensor,
    decision: torch.Tensor,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(B, C)`` sums of the probabilities over each row's mask, and int64 ``(B, C)`` mask sizes.

    ``decision`` is a label map ``(B, N)`` (any integer or float dtype holding labels; labels outside ``[0, C)``
    such as a void label belong to no row) or masks ``(B, C, N)`` (bool or 0/1).  One chunked pass.
    """
    device = flat.device if device is None else torch.device(device)
    batch, num_rows, n_vox = flat.shape
    S = torch.zeros((batch, num_rows), dtype=torch.float64, device=device)
    n = torch.zeros((batch, num_rows), dtype=torch.int64, device=device)
    labels = decision.dim() == 2
    for start, stop, chunk in iter_chunks(flat, device, chunk_size, clamp):
        if labels:
            idx = decision[:, start:stop].to(device).long()
            valid = (idx >= 0) & (idx < num_rows)
            idx = torch.where(valid, idx, torch.zeros_like(idx))
            p = chunk.gather(1, idx.unsqueeze(1))[:, 0]
            S.scatter_add_(1, idx, (p * valid).double())
            n.scatter_add_(1, idx, valid.long())
        else:
            m = decision[..., start:stop].to(device) != 0
            S += (chunk * m).sum(-1, dtype=torch.float64)
            n += m.sum(-1)
    return S, n
