"""Logits to probabilities: softmax / sigmoid with an optional temperature and bias (the one place this is done).

Used by the MONAI transforms (``softmax=True``, ``temperature=``), the calibration tools
(:func:`rankseg_monai.calibration.apply_temperature`, :func:`~rankseg_monai.calibration.apply_vector_scaling`)
and the CLI (``--softmax`` / ``--sigmoid``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

from ._arrays import as_tensor

__all__ = ["ACTIVATIONS", "check_temperature", "check_activation", "activate", "looks_like_probabilities",
           "check_logits"]

ACTIVATIONS = ("softmax", "sigmoid")


def check_temperature(temperature: Any) -> float | tuple[float, ...] | None:
    """``None``, a positive finite scalar, or a non-empty sequence of them (one per channel, or length 1).

    >>> check_temperature(2), check_temperature([1.5, 2.0])
    (2.0, (1.5, 2.0))
    """
    if temperature is None:
        return None
    if isinstance(temperature, torch.Tensor | np.ndarray):
        temperature = temperature.tolist()
    if isinstance(temperature, bool | str):
        raise TypeError(f"temperature must be a positive number or a sequence of positive numbers, got "
                        f"{temperature!r}")
    scalar = isinstance(temperature, Real)
    values = [temperature] if scalar else temperature
    if not isinstance(values, Sequence):
        raise TypeError(f"temperature must be a positive number or a non-empty sequence of them (one per channel), "
                        f"got {temperature!r}")
    if len(values) == 0:
        raise ValueError("temperature is an empty sequence: give one positive value per channel, or a scalar")
    out = []
    for t in values:
        if isinstance(t, bool) or not isinstance(t, Real):
            raise TypeError(f"temperature values must be real numbers, got {t!r}")
        if not (math.isfinite(float(t)) and float(t) > 0.0):
            raise ValueError(f"temperature values must be finite and > 0, got {t!r}")
        out.append(float(t))
    return out[0] if scalar else tuple(out)


def check_activation(mode: Any) -> str:
    """``"softmax"`` (mutually exclusive classes) or ``"sigmoid"`` (independent channels)."""
    if not isinstance(mode, str) or mode.strip().lower() not in ACTIVATIONS:
        raise ValueError(f"mode must be 'softmax' (mutually exclusive classes) or 'sigmoid' (multilabel), got {mode!r}")
    return mode.strip().lower()


def _per_channel(values: Any, z: torch.Tensor, dim: int, what: str) -> torch.Tensor | float:
    if isinstance(values, float):
        return values
    v = torch.as_tensor(values, dtype=z.dtype, device=z.device).reshape(-1)
    if v.numel() not in (1, z.shape[dim]):
        raise ValueError(f"{what} has {v.numel()} values but the input has {z.shape[dim]} channels: give one value "
                         "per channel or a single scalar")
    shape = [1] * z.ndim
    shape[dim] = -1 if v.numel() > 1 else 1
    return v.reshape(shape)


def activate(logits: Any, mode: str, temperature: Any = None, bias: Any = None, dim: int = 0) -> torch.Tensor:
    """Probabilities ``softmax(z / T + b, dim)`` or ``sigmoid(z / T + b)`` from logits ``z``.

    Args:
        logits: a torch tensor, ``MetaTensor`` or numpy array; float16/bfloat16 are computed in float32.
        mode: ``"softmax"`` or ``"sigmoid"``.
        temperature: ``None``, a positive scalar, or one value per channel.
        bias: ``None`` or one value per channel (vector / Platt scaling).
        dim: the channel dim (0 for channel-first items, 1 for batches).

    Returns:
        a plain tensor on the input's device (float32 at least).

    Example:
        >>> import torch
        >>> from rankseg_monai.activation import activate
        >>> activate(torch.tensor([[0.0], [2.0]]), "softmax", temperature=2.0)
        tensor([[0.2689],
                [0.7311]])
    """
    mode = check_activation(mode)
    z, _ = as_tensor(logits, "logits")
    if not z.is_floating_point():
        raise TypeError(f"logits have dtype {z.dtype}: pass the network's floating-point output")
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    dim = dim % z.ndim
    t = check_temperature(temperature)
    if t is not None:
        z = z / _per_channel(t, z, dim, "temperature")
    if bias is not None:
        z = z + _per_channel(bias if not isinstance(bias, Real) else float(bias), z, dim, "bias")
    return torch.softmax(z, dim=dim) if mode == "softmax" else torch.sigmoid(z)


def looks_like_probabilities(values: Any) -> bool:
    """Whether every value is finite and within ``[0, 1]``, give or take a ``0.01`` rounding overshoot: what logits
    almost never are, and what a softmax/sigmoid must not be applied to again (it silently changes the decisions).
    The one rule of :func:`check_logits` and the command line's ``--softmax``/``--sigmoid`` check.

    >>> looks_like_probabilities(torch.tensor([0.2, 0.8])), looks_like_probabilities(np.array([-3.0, 2.5]))
    (True, False)
    """
    from .solvers._stream import CLAMP_TOLERANCE

    # one pass: the extremes carry any NaN (min/max propagate it) or inf, so their finiteness is the array's
    if isinstance(values, torch.Tensor):
        if values.numel() == 0:
            return False
        lo, hi = (float(v) for v in torch.aminmax(values))
    else:
        arr = np.asarray(values)
        if arr.size == 0:
            return False
        lo, hi = float(arr.min()), float(arr.max())
    return math.isfinite(lo) and math.isfinite(hi) and lo >= -CLAMP_TOLERANCE and hi <= 1.0 + CLAMP_TOLERANCE


def check_logits(values: Any, mode: str) -> None:
    """Raise a ``ValueError`` when ``mode`` (``"softmax"``/``"sigmoid"``) is about to be applied to values that
    already look like probabilities (:func:`looks_like_probabilities`); pass ``force_activation=True`` to apply it
    anyway (logits that happen to lie in ``[0, 1]``)."""
    if looks_like_probabilities(values):
        raise ValueError(f"{mode}=True was given, but every value lies in [0, 1]: these look like probabilities "
                         f"already, and a {mode} over probabilities changes the masks; drop {mode}=True, or pass "
                         "force_activation=True if these really are logits")
