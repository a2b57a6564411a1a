"""Labelled cases for the calibration tools: lists of channel-first arrays and their one-vs-rest truth."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .._arrays import as_tensor

__all__ = ["as_list", "targets", "pairs"]


def as_list(x: Any, name: str) -> list:
    """A single array as a one-case list; a non-empty sequence as a list."""
    if isinstance(x, torch.Tensor | np.ndarray):
        return [x]
    if isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0:
        return list(x)
    raise TypeError(f"{name} must be a non-empty list of channel-first arrays (C, *spatial), got {type(x).__name__}")


def targets(label: Any, num_classes: int, spatial: tuple[int, ...], mode: str, case: int) -> torch.Tensor:
    """bool ``(C, N)`` one-vs-rest truth from a label map ``(1, *spatial)`` or masks ``(C, *spatial)``."""
    y, _ = as_tensor(label, "label", floating=False)
    where = f"labels[{case}]"
    if tuple(y.shape[1:]) != spatial:
        raise ValueError(f"{where} has shape {tuple(y.shape)}; expected (1, *spatial) or (C, *spatial) with spatial "
                         f"shape {spatial}")
    if y.shape[0] == num_classes and (num_classes > 1 or mode == "sigmoid"):
        if not bool(torch.all((y == 0) | (y == 1))):
            raise ValueError(f"{where} must hold 0/1 masks (one channel per class)")
        t = y.reshape(num_classes, -1) != 0
        if mode == "softmax" and not bool(torch.all(t.sum(0) == 1)):
            raise ValueError(f"{where}: a one-hot label needs exactly one class per voxel in mode='softmax'")
        return t
    if y.shape[0] != 1:
        raise ValueError(f"{where} has {y.shape[0]} channels; expected 1 (label map) or {num_classes} (one-hot)")
    if mode == "sigmoid":
        raise ValueError(f"{where} is a label map but mode='sigmoid' with {num_classes} channels needs one 0/1 mask "
                         "per channel (C, *spatial)")
    flat = y.reshape(-1)
    if flat.is_floating_point():
        if not bool(torch.all(flat == flat.round())):
            raise ValueError(f"{where} is a label map with non-integer values")
        flat = flat.long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        raise ValueError(f"{where} holds labels outside [0, {num_classes}): {int(flat.min())}..{int(flat.max())}")
    return flat.unsqueeze(0) == torch.arange(num_classes, device=flat.device).unsqueeze(1)


def pairs(xs: Any, labels: Any, mode: str, what: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(case index, values (C, N), bool truth (C, N))`` per case, every case checked against the first."""
    xs, labels = as_list(xs, what), as_list(labels, "labels")
    if len(xs) != len(labels):
        raise ValueError(f"got {len(xs)} {what} but {len(labels)} labels")
    num_classes = None
    for i, (x, y) in enumerate(zip(xs, labels)):
        x, _ = as_tensor(x, what, floating=False)
        if x.ndim < 2 or not x.is_floating_point():
            raise ValueError(f"{what}[{i}] must be a floating-point channel-first array (C, *spatial), got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        if num_classes is None:
            num_classes = x.shape[0]
            if mode == "softmax" and num_classes < 2:
                raise ValueError("mode='softmax' needs at least 2 channels; use mode='sigmoid' for a single "
                                 "foreground channel")
        elif x.shape[0] != num_classes:
            raise ValueError(f"{what}[{i}] has {x.shape[0]} channels, {what}[0] has {num_classes}")
        yield i, x.reshape(num_classes, -1), targets(y, num_classes, tuple(x.shape[1:]), mode, i)
