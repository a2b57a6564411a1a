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
from .guard import apply_guard, fallback_to_argmax
from .options import METRIC_ALIASES, METRICS, PARITY_PRUNING_PROB, RankSEGOptions
from .solvers import multiclass as _multiclass
from .solvers import objectives as _objectives
from .solvers import pruning as _pruning
from .solvers import regions as _regions
from .solvers import rma as _rma
from .solvers._stream import flat_view, floor_to_dtype, mask_sums, row_statistics, threshold_masks
from .solvers._threads import solver_threads
from .solvers.validation import check_choice, check_probability_tensor

__all__ = ["rankseg", "decide", "guarded_rankseg", "expected_score", "baseline_decision"]


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
    regions: Any = None,
    regions_class_order: Any = None,
    region_probs: bool = False,
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
        regions: decide on nested regions (nnU-Net's ``dataset.json`` form, e.g. LiTS
            ``{"liver": [1, 2], "tumour": [2]}`` or ``[[1, 2], [2]]``) so that the summed expected Dice of the
            regions, the structures the challenges score, is maximal; the label map's region masks are nested.
            ``output_mode="multilabel"`` then returns the region masks ``(B, R, *spatial)``.  See
            ``docs/regions.md``.
        regions_class_order: the label painted for each region (nnU-Net's ``regions_class_order``).
        region_probs: the channels are region probabilities (one sigmoid per region, in the order of
            ``regions``) rather than class probabilities.

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
                             label_dtype=label_dtype, regions=regions, regions_class_order=regions_class_order,
                             region_probs=region_probs)
    return decide(probs, options)


@torch.no_grad()
def decide(probs: torch.Tensor | np.ndarray, options: RankSEGOptions | None = None, *, return_info: bool = False
           ) -> Any:
    """:func:`rankseg` with its options already validated in a :class:`~rankseg_monai.options.RankSEGOptions`.

    The transforms, the handler, the CLI and the evaluation build the options once and call this for every case.
    ``options.softmax``/``sigmoid``/``temperature``/``calibration`` are not applied here (the input holds the
    probabilities to decide on): the transforms and the CLI activate logits first with
    :func:`rankseg_monai.activation.activate` and calibrate with :func:`rankseg_monai.calibrator.apply_calibration`.
    The classes ``options.calibration`` recommends argmax for are switched to argmax here.

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
    with solver_threads(x, opts.device):  # fewer threads where other work holds cores (same decisions)
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
    if opts.regions is not None:
        out, info = _decide_regions(flat, opts, device)
        return unflatten(out), info
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
    forced = opts.calibration.argmax_channels if opts.calibration is not None else ()
    if forced:  # the calibration's held-out report: keep argmax for these classes
        keep = torch.zeros(batch, num_classes, dtype=torch.bool)
        keep[:, list(forced)] = True
        fallback_to_argmax(flat, out, keep, opts.output_mode if num_classes > 1 else "multilabel", device=device,
                           chunk_size=chunk, clamp=clamp, keep_claims=True)
        info["calibration_argmax"] = keep
    return unflatten(out), info


@torch.no_grad()
def expected_score(
    probs: torch.Tensor | np.ndarray,
    pred: torch.Tensor | np.ndarray,
    metric: str = "dice",
    smooth: float = 0.0,
    *,
    regions: Any = None,
    regions_class_order: Any = None,
    region_probs: bool = False,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
) -> torch.Tensor | np.ndarray:
    r"""The model's own estimate of the Dice (or IoU) that a decision will score, per case and class: no labels.

    For each (case, class) with probabilities ``p`` and the decision's mask ``A``, the RMA estimate of the expected
    score, the same formula RankSEG maximises (``solvers/objectives.py``): ``2 S / (mu + |A| + 1 + s) +
    s / (mu + |A| + s)`` for Dice and ``(S + s) / (mu - S + |A| + s)`` for IoU, with ``S`` the sum of ``p`` over
    ``A`` and ``mu`` over the volume.  Scoring follows MONAI's ``ignore_empty=False``: a non-empty mask scores 0
    when the truth is empty, and an **empty** mask scores 1 when the truth is empty too, so its estimate is
    ``P(class absent)`` (the ``"mixed"`` model of ``pruning_prob="auto"``: the mean of ``prod(1 - p)`` and
    ``1 - max p``; with ``s > 0`` plus ``s / (mu + s)`` on the rest).  It works for any decision: RankSEG's, argmax's,
    a user's mask.  It is only as good as the calibration of ``p`` (``docs/expected_dice.md``).

    Args:
        probs: probabilities ``(B, C, *spatial)`` (class probabilities, or region probabilities with
            ``region_probs``).
        pred: the decision: a label map ``(B, *spatial)`` (or ``(B, 1, *spatial)``; labels outside the classes,
            e.g. a void label, belong to none; with one channel a 0/1 map whose 1 marks the channel's foreground, as
            the single-channel decisions are written) or masks ``(B, K, *spatial)`` with ``K = C`` (one per class),
            or ``K`` the number of regions.
        metric: ``"dice"`` or ``"iou"``.
        smooth: the metric's smoothing constant.
        regions, regions_class_order, region_probs: score the decision on regions (as :func:`rankseg`'s
            options); the estimate is then per region.
        device, chunk_size, clamp: as for :func:`rankseg` (one pass over the volume, a second one over the rows
            whose mask is empty).

    Returns:
        float64 ``(B, C)`` (or ``(B, R)`` with regions), on ``probs``' device; numpy for numpy ``probs``.

    Example:
        >>> import torch
        >>> from rankseg_monai.functional import expected_score, rankseg
        >>> p = torch.tensor([[[0.9, 0.8, 0.6, 0.45, 0.1]]])               # (B=1, C=1, N=5)
        >>> mask = rankseg(p, output_mode="multilabel", pruning_prob=0.0)  # 0.45 is in
        >>> expected_score(p, mask), expected_score(p, p > 0.5)          # RankSEG's mask vs thresholding
        (tensor([[0.7006]], dtype=torch.float64), tensor([[0.6715]], dtype=torch.float64))
    """
    if check_choice("metric", metric, METRICS, METRIC_ALIASES) == "acc":
        raise ValueError("expected_score estimates Dice or IoU: use metric='dice' or 'iou'")
    opts = RankSEGOptions(metric=metric, smooth=smooth, output_mode="multilabel", pruning_prob=0.0, device=device,
                          chunk_size=chunk_size, clamp=clamp, regions=regions, regions_class_order=regions_class_order,
                          region_probs=region_probs)
    x, was_numpy = as_tensor(probs, "probs")
    check_probability_tensor(x)
    y, _ = as_tensor(pred, "pred", floating=False)
    batch, num_classes, *spatial = x.shape
    tree = opts.regions
    if tree is not None:
        if opts.region_probs:
            tree.check_region_channels(num_classes, label_map=False)
        else:
            tree.check_classes(num_classes)
    rows = num_classes if tree is None or opts.region_probs else len(tree)
    if tuple(y.shape) == (batch, 1, *spatial) and (rows > 1 or tree is not None):
        y = y[:, 0]
    if tuple(y.shape) == (batch, *spatial):
        kind = "labels"
    elif tuple(y.shape) == (batch, rows, *spatial):
        kind = "masks"
    else:
        raise ValueError(f"pred has shape {tuple(y.shape)}: give a label map (B, *spatial) = {(batch, *spatial)} or "
                         f"one mask per {'region' if tree is not None else 'class'} (B, {rows}, *spatial)")
    if y.is_floating_point() and kind == "labels" and not bool((y == y.round()).all()):
        raise ValueError("pred is a floating-point label map with non-integer values: pass labels or 0/1 masks")
    dev = x.device if opts.device is None else opts.device
    # fewer threads where other work holds cores (the same sums: solvers/_threads.py)
    with solver_threads(x, opts.device):
        flat, _ = flat_view(x)
        stats = row_statistics(flat, device=dev, chunk_size=opts.chunk_size, clamp=opts.clamp, half=False)  # checks
        if tree is not None:
            source = flat.clamp(0.0, 1.0) if opts.clamp else flat
            # class input: the region probabilities are computed chunk by chunk where read (no R x N copy), and a
            # label map's region masks too (the same values as storing them)
            q = source if opts.region_probs else _regions.RegionView(source, tree)
            if kind == "labels":
                labels = y.reshape(batch, -1).to(q.device)
                top = max(num_classes, tree.max_label + 1)
                inside = (labels >= 0) & (labels < top)  # other labels (a void label) belong to no region
                nodes = _regions.nodes_from_labels(torch.where(inside, labels, 0), tree, top)
                del labels, inside  # outside labels went to node 0, which is in no region
                masks = _regions.NodeMasks(nodes, tree)
            else:
                masks = y.reshape(batch, rows, -1).to(q.device) != 0
            stats = row_statistics(q, device=dev, chunk_size=opts.chunk_size, half=False)
            S, n = mask_sums(q, masks, device=dev, chunk_size=opts.chunk_size)
            rows_flat = q
        else:
            if kind == "labels" and num_classes == 1:  # one channel: a 0/1 label map marks its foreground (as decide())
                y, kind = (y == 1).unsqueeze(1), "masks"
            decision = y.reshape(batch, -1) if kind == "labels" else y.reshape(batch, num_classes, -1)
            S, n = mask_sums(flat, decision, device=dev, chunk_size=opts.chunk_size, clamp=opts.clamp)
            rows_flat = flat
        value = _objectives.rma_score(opts.metric, S, n.double(), stats.mu, opts.smooth)
        empty = n == 0
        if bool(empty.any()):  # an empty mask: P(truth empty too), as auto pruning models it
            b_idx, r_idx = torch.nonzero(empty, as_tuple=True)
            if isinstance(rows_flat, _regions.RegionView):  # those rows only, computed from the classes
                sub = torch.stack([rows_flat.item(b).row(r)[0] for b, r in zip(b_idx.tolist(), r_idx.tolist())])[None]
            else:
                sub = rows_flat[b_idx.to(rows_flat.device), r_idx.to(rows_flat.device)].unsqueeze(0)  # (1, K, N)
            inf = torch.full(sub.shape[:2], float("inf"), dtype=sub.dtype, device=sub.device)
            _, _, logp0 = _pruning.selection_summary(sub, inf, device=dev, chunk_size=opts.chunk_size, clamp=opts.clamp)
            log_abs = _pruning.log_absence(logp0[0], stats.vmax[b_idx, r_idx], "mixed")
            value[b_idx, r_idx] = _pruning.empty_value(log_abs, stats.mu[b_idx, r_idx], opts.smooth)
    value = value.to(x.device)
    return value.cpu().numpy() if was_numpy else value


def baseline_decision(probs: torch.Tensor, options: RankSEGOptions) -> torch.Tensor:
    """The decision RankSEG replaces, on a batch ``(B, C, *spatial)``: argmax of the classes (a label map), ``p > 0.5``
    per channel (multilabel), or, with region probabilities, nnU-Net's painting of ``q > 0.5`` (region masks)."""
    x, _ = as_tensor(probs, "probs")
    if options.regions is not None and options.region_probs:
        batch, num_regions, *spatial = x.shape
        nodes = _regions.paint_nodes(x.reshape(batch, num_regions, -1) > 0.5, options.regions)
        return _regions.region_masks(nodes, options.regions).reshape(batch, num_regions, *spatial)
    if options.output_mode == "multilabel" and options.regions is None:
        return x > 0.5
    return x.argmax(1)


def _region_keep(opts: RankSEGOptions, device: torch.device) -> Any:
    """The pruning rule of the regions' independent solve (``solvers.regions.solve_regions``'s ``keep``)."""
    if opts.auto_pruning:
        absence = _pruning.AUTO_MODES[opts.pruning_prob]
        # the independent solve's mask sums decide most regions without a pass (the same result: pruning.py)
        return lambda q, stats, thr, sol: _pruning.auto_active_from_solution(
            q, thr, stats, opts.metric, opts.smooth, sol.S, sol.n, sol.known, sol.band, device=device,
            chunk_size=opts.chunk_size, absence=absence)
    return lambda q, stats, thr, sol: stats.vmax > opts.pruning_prob


def _decide_regions(flat: torch.Tensor, opts: RankSEGOptions, device: torch.device
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Region-aware decision (``solvers/regions.py``): label map ``(B, N)`` or region masks ``(B, R, N)``."""
    tree = opts.regions
    stats = row_statistics(flat, device=device, chunk_size=opts.chunk_size, clamp=opts.clamp, half=False)  # checks
    if opts.clamp:
        flat = flat.clamp(0.0, 1.0)
    nodes, details = _regions.solve_regions(flat, tree, opts.metric, opts.smooth, _region_keep(opts, device),
                                            region_probs=opts.region_probs, device=device,
                                            chunk_size=opts.chunk_size, return_details=True)
    info = {"mu": stats.mu, "region_mu": details["mu"], "region_objective": details["objective"],
            "region_active": details["active"]}
    if opts.output_mode == "multilabel":
        return _regions.region_masks(nodes, tree), info
    probs = None if opts.region_probs else flat
    return _regions.labels_from_nodes(nodes, tree, probs, opts.label_dtype), info


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
