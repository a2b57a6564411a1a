"""The functional entry to every RankSEG solver: :func:`rankseg` (keyword options, rankseg 0.0.8's signature) and
:func:`decide` (a prevalidated :class:`~rankseg_monai.options.RankSEGOptions`).

Layout is ``(batch, classes, *spatial)``; any number of spatial dims.  numpy in gives numpy out; a torch
tensor gives a tensor on the same device.  See ``docs/solvers.md`` for the formulas and for where (and why)
the decisions differ from the authors' package ``rankseg`` 0.0.8.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ._arrays import as_tensor
from .guard import apply_guard
from .options import PARITY_PRUNING_PROB, RankSEGOptions
from .solvers import multiclass as _multiclass
from .solvers import pruning as _pruning
from .solvers import rma as _rma
from .solvers._stream import flat_view, floor_to_dtype, row_statistics, threshold_masks
from .solvers.validation import check_probability_tensor

__all__ = ["rankseg", "decide", "guarded_rankseg"]


def rankseg(
    probs: torch.Tensor | np.ndarray,
    metric: str = "dice",
    smooth: float = 0.0,
    output_mode: str = "multiclass",
    solver: str = "rma",
    pruning_prob: float | str = PARITY_PRUNING_PROB,
    unassigned_policy: str = "max_score",
    void_index: int = 255,
    *,
    eps: float = 1e-4,
    clamp: bool = False,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    guard: Any = None,
    label_dtype: Any = torch.int64,
) -> torch.Tensor | np.ndarray:
    r"""Turn class probabilities into the segmentation that maximises expected Dice or IoU.

    Args:
        probs: probabilities of shape ``(B, C, *spatial)``; float16, bfloat16, float32 or float64; CPU or
            CUDA tensor, or a numpy array.  Values must lie in ``[0, 1]`` (``clamp=True`` clips small
            overshoots).  Classes need not sum to one (multilabel sigmoid outputs are fine).
        metric: ``"dice"``, ``"iou"`` or ``"acc"`` (case-insensitive).
        smooth: the smoothing constant of the metric (``>= 0``).
        output_mode: ``"multiclass"`` (non-overlapping label map, int64 ``(B, *spatial)``) or
            ``"multilabel"`` (one bool mask per class, ``(B, C, *spatial)``).
        solver: ``"rma"`` (RankSEG-RMA, default), ``"ba"``, ``"trna"``, ``"ba+trna"``, ``"exact"`` (Dice,
            multilabel), ``"argmax"``/``"tr"`` (``metric="acc"``).
        pruning_prob: a class is kept only if its maximum probability is strictly greater than this;
            otherwise its mask is empty (rankseg 0.0.8's rule and default, kept here for parity: see
            :mod:`rankseg_monai.options`).  ``0`` disables
            pruning.  ``"auto"`` (recommended; the default of the MONAI transforms and the CLI) keeps a class
            when its best mask's objective beats the expected Dice of the empty mask (``"auto-independent"``,
            ``"auto-correlated"``: the two bounds it averages); see ``docs/calibration.md``.
        unassigned_policy: multiclass only; ``"max_score"`` gives voxels selected by no class to the active
            class with the largest RMA increment, ``"void"`` labels them ``void_index``.
        void_index: label for unassigned voxels with ``unassigned_policy="void"``; must lie outside
            ``[0, C)``.
        eps: tail probability of the truncated refined normal law (BA/TRNA only).
        clamp: clip values to ``[0, 1]`` first (for spline-interpolated probabilities after ``Invertd``);
            NaN/inf still raise.
        device: where to compute.  ``None`` computes where ``probs`` lives; a CUDA device with CPU ``probs``
            streams chunks to the GPU (the output comes back on ``probs``' device).
        chunk_size: voxels per class and chunk for the streaming passes (``None``: automatic).  Results do
            not depend on it.
        guard: ``None`` (default, plain RankSEG), ``True``, a :class:`rankseg_monai.guard.Guard` or a dict of
            its settings: a label-free fallback to argmax (multiclass) or ``p > 0.5`` (multilabel) for classes
            whose probabilities look too diffuse for RankSEG (see ``docs/calibration.md``).
        label_dtype: dtype of the multiclass label map (a torch or numpy dtype or its name; default int64, as
            rankseg 0.0.8).  The label map is the largest allocation of the call (int64: 8 bytes per voxel,
            0.67x a float32 3-class input; see ``docs/scale.md``): ``torch.uint8`` (up to 255 labels) or
            ``torch.float32`` (what ``AsDiscrete`` returns) write it directly in that type.  It
            must hold every label exactly (``C - 1`` and ``void_index``), otherwise a ``ValueError`` names the
            fix.  Multilabel masks are always bool.

    Returns:
        label map ``(B, *spatial)`` of ``label_dtype`` (multiclass) or bool masks ``(B, C, *spatial)``
        (multilabel); a numpy array when ``probs`` was one.  A permuted (non-contiguous) input is read without a
        copy and gives an output in the same memory order (see :func:`flat_view`).

    Example:
        >>> import torch
        >>> from rankseg_monai.functional import rankseg
        >>> p = torch.tensor([[[0.9, 0.6, 0.45, 0.1]]])  # (B=1, C=1, N=4)
        >>> rankseg(p, output_mode="multilabel", pruning_prob=0.0)
        tensor([[[ True,  True,  True, False]]])
        >>> probs = torch.tensor([[[0.7, 0.2], [0.3, 0.8]]])  # (B=1, C=2, N=2): a label map
        >>> rankseg(probs, label_dtype=torch.uint8)
        tensor([[0, 1]], dtype=torch.uint8)
    """
    options = RankSEGOptions(metric=metric, smooth=smooth, output_mode=output_mode, solver=solver,
                             pruning_prob=pruning_prob, unassigned_policy=unassigned_policy, void_index=void_index,
                             eps=eps, clamp=clamp, device=device, chunk_size=chunk_size, guard=guard,
                             label_dtype=label_dtype)
    return decide(probs, options)


@torch.no_grad()
def decide(probs: torch.Tensor | np.ndarray, options: RankSEGOptions | None = None, *, return_info: bool = False
           ) -> Any:
    """:func:`rankseg` with its options already validated in a :class:`~rankseg_monai.options.RankSEGOptions`.

    The transforms, the handler, the CLI and the evaluation build the options once and call this for every case.
    ``options.softmax``/``sigmoid``/``temperature`` are not applied here (the input holds probabilities): the
    transforms and the CLI activate logits first with :func:`rankseg_monai.activation.activate`.

    Args:
        probs: probabilities ``(B, C, *spatial)``, as for :func:`rankseg`.
        options: the decision's options (default: ``RankSEGOptions()``, i.e. ``pruning_prob="auto"``).
        return_info: also return a dict of ``(B, C)`` tensors: ``mu`` (float64 ``sum p``) and, with a guard,
            ``fallback`` (bool, the classes switched to argmax), ``rankseg_volume``, ``argmax_volume`` and
            ``uncertain_fraction``.

    Returns:
        what :func:`rankseg` returns (and the info dict with ``return_info=True``).

    Example:
        >>> import torch
        >>> from rankseg_monai.functional import decide
        >>> from rankseg_monai.options import RankSEGOptions
        >>> opts = RankSEGOptions(output_mode="multilabel")
        >>> decide(torch.tensor([[[0.9, 0.6, 0.45, 0.1]]]), opts)
        tensor([[[ True,  True,  True, False]]])
    """
    opts = RankSEGOptions() if options is None else options
    if not isinstance(opts, RankSEGOptions):
        raise TypeError(f"options must be a rankseg_monai.options.RankSEGOptions, got {type(opts).__name__}")
    x, was_numpy = as_tensor(probs, "probs")
    if was_numpy and opts.label_dtype == torch.bfloat16:
        raise ValueError("label_dtype=torch.bfloat16 with numpy input: numpy has no bfloat16; use torch.float32 or "
                         "torch.uint8, or pass a torch tensor")
    check_probability_tensor(x)
    opts.check_classes(x.shape[1])
    out, info = _decide(x, opts)
    out = out.numpy() if was_numpy else out
    return (out, info) if return_info else out


def guarded_rankseg(probs: torch.Tensor | np.ndarray, guard: Any = True, *, return_info: bool = False,
                    **rankseg_kwargs: Any) -> Any:
    """:func:`rankseg` with a label-free fallback to argmax for classes lost in a probability fog (see
    :class:`rankseg_monai.guard.Guard`), optionally returning what the guard saw.

    Args:
        probs: probabilities ``(B, C, *spatial)`` as for :func:`rankseg`.
        guard: ``True`` (default :class:`~rankseg_monai.guard.Guard` settings), a ``Guard``, a dict of its
            settings, or ``None``/``False`` (plain RankSEG).
        return_info: also return the info dict of :func:`decide` (``fallback``: the classes switched to argmax).
        **rankseg_kwargs: the other options of :func:`rankseg` (``metric``, ``output_mode``, ``pruning_prob``,
            ...).  With ``metric="acc"`` the guard does nothing.

    Example:
        >>> import torch
        >>> from rankseg_monai.functional import guarded_rankseg
        >>> p = torch.full((1, 1, 1000), 0.3); p[..., :100] = 0.9
        >>> out, info = guarded_rankseg(p, output_mode="multilabel", return_info=True)
        >>> int(out.sum()), info["fallback"].tolist()
        (100, [[True]])
    """
    rankseg_kwargs.setdefault("pruning_prob", PARITY_PRUNING_PROB)
    options = RankSEGOptions(guard=guard, **rankseg_kwargs)
    return decide(probs, options, return_info=return_info)


def _decide(x: torch.Tensor, opts: RankSEGOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The decision of validated ``x`` ``(B, C, *spatial)`` under validated ``opts``; ``(output, info)``."""
    batch, num_classes, *spatial = x.shape
    multiclass_out = opts.output_mode == "multiclass" and num_classes > 1
    if batch == 0:
        shape = (0, *spatial) if multiclass_out else (0, num_classes, *spatial)
        return torch.zeros(shape, dtype=opts.label_dtype if multiclass_out else torch.bool, device=x.device), {}
    device = x.device if opts.device is None else opts.device
    metric, smooth, chunk, clamp = opts.metric, opts.smooth, opts.chunk_size, opts.clamp
    flat, unflatten = flat_view(x)
    stats = row_statistics(flat, device=device, chunk_size=chunk, clamp=clamp,
                           half=opts.solver == "rma" and metric != "acc")
    info: dict[str, torch.Tensor] = {"mu": stats.mu}
    if metric == "acc":
        return unflatten(_accuracy(flat, opts, device)), info
    if opts.auto_pruning:  # rows the automatic rule can never keep are not solved (same result, less work)
        absence = _pruning.AUTO_MODES[opts.pruning_prob]
        active = (stats.vmax > 0.0) & _pruning.auto_candidates(stats, metric, smooth, absence)
    else:
        active = stats.vmax > opts.pruning_prob
    solution = None
    if opts.solver == "rma":
        band_summary = opts.auto_pruning and _pruning.AUTO_MODES[opts.pruning_prob] != "correlated"
        solution = _rma.rma_solve(flat, stats, metric, smooth, active, device=device, chunk_size=chunk, clamp=clamp,
                                  band_summary=band_summary)
        thr = solution.thr
    elif opts.solver == "exact":
        from .solvers import exact as _exact

        thr = _exact.exact_thresholds(flat, stats, smooth, active)
    else:
        from .solvers import ba as _ba

        thr = _ba.ba_thresholds(flat, stats, opts.solver, smooth, opts.eps, active)
    if opts.auto_pruning:  # keep a class only if its mask beats the empty one in expectation (solvers/pruning.py)
        absence = _pruning.AUTO_MODES[opts.pruning_prob]
        if solution is not None:  # the solver's mask sums decide most rows without a pass (same result)
            active = _pruning.auto_active_from_solution(flat, thr, stats, metric, smooth, solution.S, solution.n,
                                                        solution.known, solution.band, device=device,
                                                        chunk_size=chunk, clamp=clamp, absence=absence)
        else:
            active = _pruning.auto_active_from_thresholds(flat, thr, stats, metric, smooth, device=device,
                                                          chunk_size=chunk, clamp=clamp, absence=absence)
        thr = torch.where(active.to(thr.device), thr, torch.full_like(thr, float("inf")))
    if opts.output_mode == "multilabel":
        out = threshold_masks(flat, thr, device=device, chunk_size=chunk, clamp=clamp)
    else:
        out = _multiclass.assign(flat, thr, stats, metric, smooth, active, opts.unassigned_policy, opts.void_index,
                                 device=device, chunk_size=chunk, clamp=clamp, out_dtype=opts.label_dtype)
    if opts.guard is not None:
        out, guard_info = apply_guard(flat, out, opts.guard, opts.output_mode, device=device, chunk_size=chunk,
                                      clamp=clamp)
        info.update(guard_info)
    return unflatten(out), info


def _accuracy(flat: torch.Tensor, opts: RankSEGOptions, device: torch.device) -> torch.Tensor:
    chunk, clamp = opts.chunk_size, opts.clamp
    if opts.solver == "tr":
        half = torch.full(flat.shape[:2], 0.5, dtype=torch.float64)
        return threshold_masks(flat, floor_to_dtype(half, flat.dtype).to(flat.device), device=device,
                               chunk_size=chunk, clamp=clamp)
    if opts.output_mode == "multiclass":
        return _multiclass.argmax_labels(flat, device=device, chunk_size=chunk, out_dtype=opts.label_dtype)
    labels = _multiclass.argmax_labels(flat, device=device, chunk_size=chunk)
    warnings.warn(
        "solver='argmax' with output_mode='multilabel' returns non-overlapping one-hot masks; use solver='tr' to "
        "threshold each class independently",
        stacklevel=6,  # the caller of rankseg()
    )
    onehot = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    onehot.scatter_(1, labels.unsqueeze(1), True)
    return onehot
