"""Input checks shared by every solver entry (pure torch, no MONAI import).

Every message names the fix, because the people who read them are in the middle of a pipeline.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "CLAMP_TOLERANCE",
    "check_choice",
    "check_probability_tensor",
    "check_probability_values",
    "check_real",
    "check_int",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: values within this distance outside [0, 1] are rounding/interpolation overshoots: clipped when ``clamp=True``,
#: larger ones still raise (re-exported by ``solvers._stream``)
CLAMP_TOLERANCE = 1e-2


def check_choice(name: str, value: object, choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    """Return ``value`` lower-cased and stripped if it is one of ``choices`` (or an alias of one)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {', '.join(map(repr, choices))}; got {type(value).__name__}")
    key = value.strip().lower()
    if aliases and key in aliases:
        key = aliases[key]
    if key not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")
    return key


def check_real(name: str, value: object, low: float | None = None, high: float | None = None) -> float:
    """A finite real number within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_probability_tensor(probs: torch.Tensor) -> None:
    """Structural checks: dtype, (B, C, *spatial) layout, non-empty classes and spatial dims."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a torch.Tensor or numpy.ndarray, got {type(probs).__name__}")
    if probs.device.type == "meta":
        raise ValueError(
            "probs is a meta tensor (a shape without values): RankSEG decides from the values; pass the probabilities "
            "on 'cpu' or 'cuda' (load or compute them there, e.g. model.to_empty(device='cpu') before inference)"
        )
    if probs.is_complex():
        raise TypeError("probs is complex: pass real-valued probabilities (e.g. probs.real or probs.abs())")
    if probs.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"probs has dtype {probs.dtype}: pass floating-point probabilities (float16, bfloat16, float32 or "
            "float64); for a label map use monai.transforms.AsDiscrete(to_onehot=C) instead of RankSEG"
        )
    if probs.ndim < 3:
        raise ValueError(
            f"probs has shape {tuple(probs.shape)}: expected (batch, classes, *spatial) with at least one spatial "
            "dim; add a batch dim with probs[None] (the RankSEG transform does this for channel-first input)"
        )
    if probs.shape[1] == 0:
        raise ValueError("probs has no classes (shape[1] == 0)")
    if any(s == 0 for s in probs.shape[2:]):
        raise ValueError(f"probs has an empty spatial dim: shape {tuple(probs.shape)}")


def check_probability_values(vmin: float, vmax: float, tolerance: float = 0.0) -> None:
    """Value checks from an already-computed global (min, max)."""
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise ValueError(
            "probs contains NaN or inf: check the model output (NaN logits) or the interpolation step before RankSEG"
        )
    if vmin < -tolerance or vmax > 1.0 + tolerance:
        shown = f"(min {vmin!r}, max {vmax!r})"  # every digit: float32 1 + 1e-7 must not read as 1
        if vmin >= -CLAMP_TOLERANCE and vmax <= 1.0 + CLAMP_TOLERANCE:
            raise ValueError(
                f"probs has values just outside [0, 1] {shown}: a rounding or interpolation overshoot of "
                f"probabilities (e.g. spline resampling after Invertd), not logits; set clamp=True to clip overshoots "
                f"up to {CLAMP_TOLERANCE:g} (softmax/sigmoid would change the probabilities)"
            )
        raise ValueError(
            f"probs has values outside [0, 1] {shown}: pass probabilities, or set softmax=True / sigmoid=True if "
            "these are logits"
        )
