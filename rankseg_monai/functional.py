"""The one entry to every RankSEG solver: :func:`rankseg`.

Layout is ``(batch, classes, *spatial)``; any number of spatial dims.  numpy in gives numpy out; a torch
tensor gives a tensor on the same device.  See ``docs/solvers.md`` for the formulas and for where (and why)
the decisions differ from the authors' package ``rankseg`` 0.0.8.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .solvers import multiclass as _multiclass
from .solvers import rma as _rma
from .solvers.validation import (
    check_choice,
    check_int,
    check_probability_tensor,
    check_real,
)

__all__ = ["rankseg", "parse_pruning_prob", "check_label_dtype", "check_label_range", "label_range",
           "smallest_label_dtype", "flat_view", "numpy_as_tensor", "METRICS", "SOLVERS", "OUTPUT_MODES"]

METRICS = ("dice", "iou", "acc")
SOLVERS = ("rma", "ba", "trna", "ba+trna", "exact", "tr", "argmax")
OUTPUT_MODES = ("multiclass", "multilabel")
UNASSIGNED_POLICIES = ("max_score", "void")
_METRIC_ALIASES = {"accuracy": "acc", "jaccard": "iou"}
_DISPLAY = {"rma": "RMA", "ba": "BA", "trna": "TRNA", "ba+trna": "BA+TRNA", "exact": "exact", "tr": "TR",
            "argmax": "argmax"}


def parse_pruning_prob(text: str | float) -> float | str:
    """A ``pruning_prob`` from a command line or config string: a number in [0, 1] or an ``"auto"`` mode."""
    from .solvers.pruning import AUTO_MODES

    if isinstance(text, str) and text.strip().lower() in AUTO_MODES:
        return text.strip().lower()
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"pruning_prob {text!r}: use a number in [0, 1] or one of {', '.join(map(repr, AUTO_MODES))}"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"pruning_prob must lie in [0, 1], got {value}")
    return value


def supported_solvers(metric: str, output_mode: str, num_classes: int) -> tuple[str, ...]:
    """Solvers accepted for a metric/output-mode pair (rankseg 0.0.8's table, plus ``exact`` for Dice)."""
    if metric == "dice":
        return ("rma",) if output_mode == "multiclass" else ("rma", "ba", "trna", "ba+trna", "exact")
    if metric == "iou":
        return ("rma",)
    if num_classes == 1:
        return ("tr",)
    return ("argmax",) if output_mode == "multiclass" else ("tr", "argmax")


#: largest integer ``n`` such that every integer in ``[-n, n]`` is exact in the floating dtype
_FLOAT_EXACT_INT = {torch.float16: 2**11, torch.bfloat16: 2**8, torch.float32: 2**24, torch.float64: 2**53}


def check_label_dtype(label_dtype: Any) -> torch.dtype:
    """The torch dtype of a label map from a torch dtype, a numpy dtype or a name (``"uint8"``, ``"float32"``)."""
    if isinstance(label_dtype, torch.dtype):
        dtype = label_dtype
    else:
        try:
            dtype = torch.from_numpy(np.empty(0, dtype=np.dtype(label_dtype))).dtype
        except (TypeError, ValueError):
            raise ValueError(
                f"label_dtype={label_dtype!r} is not a dtype: use e.g. torch.int64 (default), torch.uint8 or "
                "torch.float32"
            ) from None
    if dtype == torch.bool or dtype.is_complex or (dtype.is_floating_point and dtype not in _FLOAT_EXACT_INT):
        raise ValueError(
            f"label_dtype={dtype} cannot hold class labels: use an integer dtype (torch.int64, torch.uint8, ...) "
            "or float16/bfloat16/float32/float64"
        )
    return dtype


def check_label_range(dtype: torch.dtype, low: int, high: int) -> None:
    """Raise a ``ValueError`` naming the fix unless ``dtype`` holds every integer label in ``low..high`` exactly."""
    if dtype.is_floating_point:
        lo_ok, hi_ok = -_FLOAT_EXACT_INT[dtype] <= low, high <= _FLOAT_EXACT_INT[dtype]
    else:
        info = torch.iinfo(dtype)
        lo_ok, hi_ok = info.min <= low, high <= info.max
    if not (lo_ok and hi_ok):
        raise ValueError(
            f"label_dtype={dtype} cannot hold the label {low if not lo_ok else high} exactly: use torch.int64 (or "
            f"another dtype that holds labels {low}..{high})"
        )


def label_range(num_classes: int, unassigned_policy: str = "max_score", void_index: int = 255) -> tuple[int, int]:
    """Smallest and largest label a multiclass map of ``num_classes`` classes can hold (``void_index`` included
    under ``unassigned_policy="void"``)."""
    if str(unassigned_policy).strip().lower() == "void":
        return min(0, void_index), max(num_classes - 1, void_index)
    return 0, num_classes - 1


def smallest_label_dtype(low: int, high: int) -> torch.dtype:
    """The narrowest of uint8, int16, int32, int64 that holds every label in ``low..high``."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return torch.int64


def numpy_as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory whatever its strides (no copy of a Fortran-ordered or transposed volume);
    only negative strides (``np.flip`` views) or a non-native byte order are copied."""
    try:
        return torch.from_numpy(a)
    except ValueError:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")))


def _to_tensor(probs: Any) -> tuple[torch.Tensor, bool]:
    if isinstance(probs, np.ndarray):
        if probs.dtype.kind not in "f":
            if probs.dtype.kind == "c":
                raise TypeError("probs is complex: pass real-valued probabilities")
            raise TypeError(
                f"probs has dtype {probs.dtype}: pass floating-point probabilities; for a label map use "
                "monai.transforms.AsDiscrete(to_onehot=C) instead of RankSEG"
            )
        return numpy_as_tensor(probs), True
    if isinstance(probs, torch.Tensor):
        return probs.as_subclass(torch.Tensor) if type(probs) is not torch.Tensor else probs, False
    raise TypeError(f"probs must be a torch.Tensor or numpy.ndarray, got {type(probs).__name__}")


@torch.no_grad()
def rankseg(
    probs: torch.Tensor | np.ndarray,
    metric: str = "dice",
    smooth: float = 0.0,
    output_mode: str = "multiclass",
    solver: str = "rma",
    pruning_prob: float | str = 0.5,
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
            otherwise its mask is empty (rankseg 0.0.8's rule, the default here for parity).  ``0`` disables
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
        guard: ``None`` (default, plain RankSEG), ``True``, a :class:`rankseg_monai.calibration.Guard` or a
            dict of its settings: a label-free fallback to argmax (multiclass) or ``p > 0.5`` (multilabel)
            for classes whose probabilities look too diffuse for RankSEG (see ``docs/calibration.md``).
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
    label_dtype = check_label_dtype(label_dtype)
    if guard not in (None, False):
        from .calibration import guarded_rankseg

        out = guarded_rankseg(probs, guard=guard, metric=metric, smooth=smooth, output_mode=output_mode,
                              solver=solver, pruning_prob=pruning_prob, unassigned_policy=unassigned_policy,
                              void_index=void_index, eps=eps, clamp=clamp, device=device, chunk_size=chunk_size)
        is_bool = out.dtype == (np.bool_ if isinstance(out, np.ndarray) else torch.bool)
        if is_bool or label_dtype == torch.int64:
            return out
        # the guard works on int64 labels; the same range check as below, then one conversion
        acc = str(metric).strip().lower() in ("acc", "accuracy")
        check_label_range(label_dtype, *label_range(probs.shape[1], "max_score" if acc else unassigned_policy,
                                                    void_index))
        if isinstance(out, np.ndarray):
            return out.astype(torch.empty(0, dtype=label_dtype).numpy().dtype)
        return out.to(label_dtype)
    x, was_numpy = _to_tensor(probs)
    if was_numpy and label_dtype == torch.bfloat16:
        raise ValueError("label_dtype=torch.bfloat16 with numpy input: numpy has no bfloat16; use torch.float32 or "
                         "torch.uint8, or pass a torch tensor")
    check_probability_tensor(x)
    metric = check_choice("metric", metric, METRICS, _METRIC_ALIASES)
    output_mode = check_choice("output_mode", output_mode, OUTPUT_MODES)
    solver = check_choice("solver", solver, SOLVERS)
    unassigned_policy = check_choice("unassigned_policy", unassigned_policy, UNASSIGNED_POLICIES)
    smooth = check_real("smooth", smooth, low=0.0)
    if isinstance(pruning_prob, str):  # "auto" (recommended), "auto-independent", "auto-correlated"
        from .solvers.pruning import AUTO_MODES

        pruning_prob = check_choice("pruning_prob", pruning_prob, tuple(AUTO_MODES))
    else:
        pruning_prob = check_real("pruning_prob", pruning_prob, low=0.0, high=1.0)
    eps = check_real("eps", eps)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie strictly between 0 and 1, got {eps}")
    void_index = check_int("void_index", void_index)
    if chunk_size is not None and check_int("chunk_size", chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")

    num_classes = x.shape[1]
    if output_mode == "multiclass" and num_classes == 1:
        raise ValueError(
            "a single-channel input cannot give a multiclass label map: use output_mode='multilabel' for a "
            "foreground mask, or pass background and foreground channels"
        )
    allowed = supported_solvers(metric, output_mode, num_classes)
    if solver not in allowed:
        raise ValueError(
            f"solver {_DISPLAY[solver]!r} is not supported for metric={metric!r} with output_mode={output_mode!r}"
            f"{', single-channel input' if num_classes == 1 else ''}; supported solvers: "
            f"{', '.join(_DISPLAY[s] for s in allowed)}"
        )
    if output_mode == "multilabel" and unassigned_policy != "max_score":
        raise ValueError("unassigned_policy='void' only applies to output_mode='multiclass'")
    if void_index != 255 and (output_mode != "multiclass" or unassigned_policy != "void"):
        raise ValueError("a non-default void_index requires output_mode='multiclass' and unassigned_policy='void'")
    if output_mode == "multiclass" and unassigned_policy == "void":
        if not -(2**63) <= void_index < 2**63:
            raise ValueError("void_index must fit in int64")
        if 0 <= void_index < num_classes:
            raise ValueError(f"void_index={void_index} is a class index; choose a value outside [0, {num_classes})")
    if output_mode == "multiclass" and num_classes > 1:
        check_label_range(label_dtype, *label_range(num_classes, "max_score" if metric == "acc" else unassigned_policy,
                                                    void_index))

    compute_device = torch.device(device) if device is not None else x.device
    if compute_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} but torch sees no CUDA device: use device='cpu' (or None), or install a CUDA "
            "build of PyTorch (see the README)"
        )
    out = _dispatch(x, metric, smooth, output_mode, solver, pruning_prob, unassigned_policy, void_index, eps,
                    clamp, compute_device, chunk_size, label_dtype)
    return out.numpy() if was_numpy else out


def flat_view(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
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


def _dispatch(x, metric, smooth, output_mode, solver, pruning_prob, policy, void_index, eps, clamp, device,
              chunk_size, label_dtype=torch.int64):
    batch, num_classes, *spatial = x.shape
    if batch == 0:
        shape = (0, *spatial) if output_mode == "multiclass" and num_classes > 1 else (0, num_classes, *spatial)
        return torch.zeros(shape, dtype=label_dtype if len(shape) == len(spatial) + 1 else torch.bool,
                           device=x.device)
    flat, unflatten = flat_view(x)
    stats = _rma.row_statistics(flat, device=device, chunk_size=chunk_size, clamp=clamp,
                                half=solver == "rma" and metric != "acc")
    if metric == "acc":
        return unflatten(_accuracy(flat, stats, output_mode, solver, device, chunk_size, clamp, label_dtype))
    auto_prune = isinstance(pruning_prob, str)
    active = stats.vmax > (0.0 if auto_prune else pruning_prob)
    if auto_prune:  # rows the automatic rule can never keep are not solved (same result, less work)
        from .solvers import pruning as _pruning

        active = active & _pruning.auto_candidates(stats, metric, smooth, _pruning.AUTO_MODES[pruning_prob])
    if solver == "rma":
        thr = _rma.rma_thresholds(flat, stats, metric, smooth, active, device=device, chunk_size=chunk_size,
                                  clamp=clamp)
    elif solver == "exact":
        from .solvers import exact as _exact

        thr = _exact.exact_thresholds(flat, stats, smooth, active)
    else:
        from .solvers import ba as _ba

        thr = _ba.ba_thresholds(flat, stats, solver, smooth, eps, active)
    if auto_prune:  # keep a class only if its mask beats the empty one in expectation (solvers/pruning.py)
        from .solvers import pruning as _pruning

        active = _pruning.auto_active_from_thresholds(flat, thr, stats, metric, smooth, device=device,
                                                      chunk_size=chunk_size, clamp=clamp,
                                                      absence=_pruning.AUTO_MODES[pruning_prob])
        thr = torch.where(active.to(thr.device), thr, torch.full_like(thr, float("inf")))
    if output_mode == "multilabel":
        return unflatten(_rma.threshold_masks(flat, thr, device=device, chunk_size=chunk_size, clamp=clamp))
    labels = _multiclass.assign(flat, thr, stats, metric, smooth, active, policy, void_index, device=device,
                                chunk_size=chunk_size, clamp=clamp, out_dtype=label_dtype)
    return unflatten(labels)


def _accuracy(flat, stats, output_mode, solver, device, chunk_size, clamp, label_dtype=torch.int64):
    if solver == "tr":
        half = torch.full(flat.shape[:2], 0.5, dtype=torch.float64)
        return _rma.threshold_masks(flat, _rma.floor_to_dtype(half, flat.dtype).to(flat.device), device=device,
                                    chunk_size=chunk_size, clamp=clamp)
    if output_mode == "multiclass":
        return _multiclass.argmax_labels(flat, device=device, chunk_size=chunk_size, out_dtype=label_dtype)
    labels = _multiclass.argmax_labels(flat, device=device, chunk_size=chunk_size)
    warnings.warn(
        "solver='argmax' with output_mode='multilabel' returns non-overlapping one-hot masks; use solver='tr' to "
        "threshold each class independently",
        stacklevel=5,
    )
    onehot = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    onehot.scatter_(1, labels.unsqueeze(1), True)
    return onehot
