"""One case's decision for the command line, the evaluation and the demo: RankSEG or the argmax baseline on a
channel-first numpy array, with the file conventions of the CLI (a single channel is a foreground probability
and gives a 0/1 label map)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._arrays import numpy_dtype
from ..activation import activate
from ..functional import decide as _decide_batch
from ..functional import expected_score
from ..options import RankSEGOptions, check_label_capacity, check_label_dtype
from ..solvers.multiclass import argmax_labels
from ..solvers.regions import labels_from_nodes, nodes_from_labels, paint_nodes, region_masks

__all__ = ["METHODS", "decide", "activate_case", "estimate", "structure_names"]

METHODS = ("argmax", "rankseg")


def activate_case(values: np.ndarray, options: RankSEGOptions) -> np.ndarray:
    """``values`` ``(C, *spatial)`` as probabilities: the options' softmax/sigmoid (with temperature) when the file
    holds logits, else unchanged."""
    if options.activation is None:
        return values
    return activate(values, options.activation, options.temperature, dim=0).numpy()


def decide(probs: np.ndarray, method: str = "rankseg", options: RankSEGOptions | None = None, *,
           label_dtype: Any = None, **option_kwargs: Any) -> np.ndarray:
    """The decision of one case.

    Args:
        probs: probabilities ``(C, *spatial)`` (numpy).
        method: ``"rankseg"`` or ``"argmax"`` (``p > 0.5`` for a single channel or multilabel output; with region
            probabilities nnU-Net's painting of ``q > 0.5`` in the order of the regions; with regions on class
            probabilities the argmax label map, as region masks for multilabel output).
        options: the RankSEG options (or give them as keywords, e.g. ``metric="iou"``; default
            ``RankSEGOptions()``).  ``options.output_mode="multilabel"`` gives one mask per channel.
        label_dtype: dtype of the label map (default: ``options.label_dtype``); it must hold every label, else a
            ``ValueError`` names the fix.

    Returns:
        a label map ``(*spatial)`` (multiclass, or a 0/1 map when ``C == 1``) or bool masks ``(C, *spatial)``
        (multilabel, ``C > 1``).

    Example:
        >>> import numpy as np
        >>> from rankseg_monai.app.decide import decide
        >>> probs = np.array([[0.7, 0.2, 0.6], [0.3, 0.8, 0.4]], dtype=np.float32)  # (C=2, N=3)
        >>> decide(probs, "argmax"), decide(probs, "rankseg", metric="dice")
        (array([0, 1, 0]), array([0, 1, 0]))
    """
    if options is None:
        options = RankSEGOptions(**option_kwargs)
    elif option_kwargs:
        options = options.replace(**option_kwargs)
    probs = np.asarray(probs)
    if probs.ndim < 2:
        raise ValueError(f"probs has shape {probs.shape}: expected (C, *spatial)")
    num_classes = probs.shape[0]
    tree = options.regions
    foreground = num_classes == 1 and tree is None
    multilabel = foreground or options.output_mode == "multilabel"
    dtype = check_label_dtype(options.label_dtype if label_dtype is None else label_dtype)
    np_dtype = numpy_dtype(dtype)
    check_label_capacity(dtype, *(options.label_bounds(num_classes) if not multilabel else (0, 1)))
    if method == "argmax" and tree is not None and options.region_probs:  # nnU-Net: paint q > 0.5 in order
        q = torch.from_numpy(np.ascontiguousarray(probs)).reshape(1, num_classes, -1)
        nodes = paint_nodes(q > 0.5, tree)
        if multilabel:
            return region_masks(nodes, tree).reshape(num_classes, *probs.shape[1:]).numpy()
        return labels_from_nodes(nodes, tree, None, dtype).reshape(probs.shape[1:]).numpy()
    if method == "argmax" and tree is not None and multilabel:  # argmax of the classes, as region masks
        labels = _argmax(probs, torch.uint8 if num_classes <= 256 else torch.int64)
        nodes = nodes_from_labels(labels.reshape(1, -1), tree, max(num_classes, tree.max_label + 1))
        return region_masks(nodes, tree).reshape(len(tree), *probs.shape[1:]).numpy()
    if method == "argmax":
        if multilabel:
            masks = probs > 0.5
            return masks[0].astype(np_dtype) if foreground else masks
        return _argmax(probs, dtype).numpy()
    if method != "rankseg":
        raise ValueError(f"unknown method {method!r}: use 'argmax' or 'rankseg'")
    opts = options.replace(output_mode="multilabel") if multilabel and options.output_mode != "multilabel" \
        else options
    if not multilabel and dtype != opts.label_dtype:
        opts = opts.replace(label_dtype=dtype)
    out = np.asarray(_decide_batch(probs[None], opts))[0]
    return out[0].astype(np_dtype) if foreground else out



def _argmax(probs: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``np.argmax(probs, axis=0)`` (first maximum wins) in ``dtype``, without numpy's copy of the volume with the
    class axis moved last nor its int64 map (the running maximum of ``solvers.multiclass.argmax_labels``)."""
    flat = torch.from_numpy(np.ascontiguousarray(probs)).reshape(1, probs.shape[0], -1)
    return argmax_labels(flat, out_dtype=dtype).reshape(probs.shape[1:])


def structure_names(num_channels: int, options: RankSEGOptions) -> list[Any]:
    """What :func:`estimate` scores, in order: the region names, or the class labels ``0..C-1`` (``[1]`` for a
    single foreground channel)."""
    if options.regions is not None:
        return list(options.regions.names)
    return [1] if num_channels == 1 else list(range(num_channels))


def estimate(probs: np.ndarray, decision: np.ndarray, options: RankSEGOptions) -> np.ndarray:
    """float64 ``(K,)``: the label-free expected Dice (IoU for ``metric="iou"``) of a decision of one case,
    per structure of :func:`structure_names` (:func:`rankseg_monai.functional.expected_score`).

    ``decision`` is what :func:`decide` returns: a label map, a 0/1 foreground map, or multilabel masks.
    """
    metric = options.metric if options.metric in ("dice", "iou") else "dice"
    probs = np.asarray(probs)
    decision = np.asarray(decision)
    if options.regions is None and probs.shape[0] == 1:  # a foreground map: its 0/1 decision is channel 0's mask
        return expected_score(probs[None], decision[None, None] != 0, metric, options.smooth)[0]
    return expected_score(probs[None], decision[None], metric, options.smooth, regions=options.regions,
                          region_probs=options.region_probs)[0]
