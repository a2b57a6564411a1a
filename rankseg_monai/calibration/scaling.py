"""Temperature and vector scaling for RankSEG: fit on labelled held-out cases, apply, save and load.

* :func:`fit_temperature`: the ``T`` that minimises the negative log-likelihood of ``softmax(z / T)`` (or
  ``sigmoid``), one value or one per class; :func:`apply_temperature` applies it, and the ``RankSEG`` /
  ``RankSEGd`` transforms take it as ``temperature=``;
* :func:`fit_vector_scaling` / :func:`apply_vector_scaling`: a per-class scale and bias (for a biased model,
  which a temperature cannot fix);
* :func:`save_temperature` / :func:`load_temperature`: a small JSON file (written atomically).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_write
from ..activation import activate, check_activation, check_temperature
from ._data import as_list, pairs

__all__ = [
    "fit_temperature",
    "apply_temperature",
    "fit_vector_scaling",
    "apply_vector_scaling",
    "save_temperature",
    "load_temperature",
]

_FORMAT = "rankseg-monai/temperature"
_FORMAT_VERSION = 1


def _gather(logits: Any, labels: Any, mode: str, max_voxels: int | None, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(M, C)`` float64 and targets (class indices ``(M,)`` or 0/1 float64 ``(M, C)``) of a systematic
    sample of at most about ``max_voxels`` voxels over all cases (every voxel if they fit)."""
    logits, labels = as_list(logits, "logits"), as_list(labels, "labels")
    total = sum(int(np.prod(np.shape(x)[1:])) for x in logits)
    step = 1 if not max_voxels or total <= max_voxels else math.ceil(total / max_voxels)
    gen = torch.Generator().manual_seed(int(seed))
    zs, ys = [], []
    for _, z, t in pairs(logits, labels, mode, "logits"):
        if not bool(torch.isfinite(z).all()):
            raise ValueError("logits must be finite (pass raw network outputs or log-probabilities)")
        n = z.shape[1]
        offset = int(torch.randint(0, step, (1,), generator=gen)) if step > 1 else 0
        idx = torch.arange(offset, n, step, device=z.device)
        zs.append(z[:, idx].double().T.cpu())
        tt = t[:, idx].T.cpu()
        ys.append(tt.double() if mode == "sigmoid" else tt.double().argmax(1))
    z, y = torch.cat(zs), torch.cat(ys)
    if z.shape[0] == 0:
        raise ValueError("no voxels to fit on: the cases are empty (a spatial dim of size 0); pass labelled cases "
                         "with voxels")
    return z, y


def _nll(z: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "softmax":
        return torch.nn.functional.cross_entropy(z, y)
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y)


def _lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int) -> int:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return int(opt.state[opt._params[0]].get("n_iter", 0))


def _log_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """log of the temperature bounds ``(low, high)``, checked: ``0 < low < 1 < high < inf``."""
    lo_t, hi_t = (float(b) for b in bounds)
    if not (0 < lo_t < 1 < hi_t < math.inf):
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high < inf, got {bounds}")
    return math.log(lo_t), math.log(hi_t)


def fit_temperature(
    logits: Any,
    labels: Any,
    mode: str = "softmax",
    per_class: bool = False,
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
    max_voxels: int | None = 2_000_000,
    seed: int = 0,
    max_iter: int = 200,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Temperature scaling: the ``T`` that minimises the negative log-likelihood of ``softmax(z / T)`` (or
    ``sigmoid(z / T)``) on labelled held-out cases.

    ``T > 1`` flattens an over-confident model, ``T < 1`` sharpens an under-confident one (the case where plain
    RankSEG over-segments).  Argmax decisions never change with a single ``T``; RankSEG's do.

    Args:
        logits: list of channel-first logits ``(C, *spatial)`` (the network output before softmax/sigmoid;
            log-probabilities work too for a single softmax temperature); a single array is one case.
        labels: matching label maps ``(1, *spatial)`` or 0/1 masks ``(C, *spatial)`` (required for sigmoid with
            ``C > 1``).
        mode: ``"softmax"`` or ``"sigmoid"``, as the model is used.
        per_class: one temperature per channel (``softmax(z_c / T_c)``: vector scaling without bias; with
            log-probability inputs this depends on the per-voxel constant, so pass raw logits) instead of one.
        bounds: ``T`` is kept inside these (the optimisation runs on ``log T`` squashed into the bounds); a
            result at a bound is warned about.
        max_voxels: fit on a systematic sample of about this many voxels over all cases (random offset per
            case, ``seed``); ``None`` uses every voxel.  2e6 voxels estimate ``T`` to well under 1%.
        max_iter: L-BFGS iterations (strong Wolfe line search).
        return_info: also return ``{"nll_before", "nll_after", "voxels", "iterations"}``.

    Returns:
        float64 tensor of temperatures, shape ``(1,)`` or ``(C,)``: pass it as ``temperature=`` to
        ``rankseg_monai.RankSEG`` / ``RankSEGd`` (with ``softmax=True`` / ``sigmoid=True``), or to
        :func:`apply_temperature`; keep it with :func:`save_temperature`.
    """
    mode = check_activation(mode)
    lo, hi = _log_bounds(bounds)
    z, y = _gather(logits, labels, mode, max_voxels, seed)
    num_classes = z.shape[1]
    k = num_classes if per_class else 1
    u0 = math.log(-lo / hi)  # logit of (0 - lo) / (hi - lo): T = 1 at the start
    u = torch.full((k,), u0, dtype=torch.float64, requires_grad=True)

    def temperature() -> torch.Tensor:
        return torch.exp(lo + (hi - lo) * torch.sigmoid(u))

    def loss() -> torch.Tensor:
        return _nll(z / temperature(), y, mode)

    with torch.no_grad():
        before = float(_nll(z, y, mode))
    with torch.enable_grad():
        iters = _lbfgs([u], loss, max_iter)
    with torch.no_grad():
        T = temperature().detach().clone()
        after = float(_nll(z / T, y, mode))
    if bool(((T <= math.exp(lo) * 1.001) | (T >= math.exp(hi) * 0.999)).any()):
        warnings.warn(f"fitted temperature {T.tolist()} is at the bounds {bounds}: the logits are far from "
                      "calibrated (or the labels do not match them); check calibration_report", stacklevel=2)
    if return_info:
        return T, {"nll_before": before, "nll_after": after, "voxels": int(z.shape[0]), "iterations": iters}
    return T


def apply_temperature(logits: torch.Tensor | np.ndarray, temperature: Any, mode: str = "softmax", dim: int = 0
                      ) -> torch.Tensor:
    """Probabilities ``softmax(z / T, dim)`` or ``sigmoid(z / T)``; ``dim`` is the channel dim (0 for
    channel-first items, 1 for batches); ``temperature`` a scalar or one value per channel (e.g. the tensor
    :func:`fit_temperature` returns)."""
    return activate(logits, mode, temperature=temperature, dim=dim)


def fit_vector_scaling(
    logits: Any,
    labels: Any,
    mode: str = "softmax",
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
    max_voxels: int | None = 2_000_000,
    seed: int = 0,
    max_iter: int = 200,
) -> dict[str, torch.Tensor]:
    """Per-class scale and bias, ``z_c / T_c + b_c``, by minimum NLL (vector scaling for softmax, Platt scaling
    per channel for sigmoid).  Corrects a biased model (e.g. a Dice-loss model that over-states a class
    everywhere), which a temperature cannot.  Returns ``{"temperature": (C,), "bias": (C,)}`` (float64); apply
    with :func:`apply_vector_scaling`.  For softmax the bias of channel 0 is fixed at 0 (only differences
    matter).  The transforms' ``temperature=`` option cannot carry the bias: apply it before RankSEG."""
    mode = check_activation(mode)
    lo, hi = _log_bounds(bounds)
    z, y = _gather(logits, labels, mode, max_voxels, seed)
    num_classes = z.shape[1]
    u = torch.full((num_classes,), math.log(-lo / hi), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    fixed = torch.ones(num_classes, dtype=torch.float64)
    if mode == "softmax":
        fixed[0] = 0.0

    def params() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.exp(lo + (hi - lo) * torch.sigmoid(u)), b * fixed

    def loss() -> torch.Tensor:
        T, bias = params()
        return _nll(z / T + bias, y, mode)

    with torch.enable_grad():
        _lbfgs([u, b], loss, max_iter)
    with torch.no_grad():
        T, bias = params()
    return {"temperature": T.detach().clone(), "bias": bias.detach().clone()}


def apply_vector_scaling(logits: torch.Tensor | np.ndarray, params: Mapping[str, Any], mode: str = "softmax",
                         dim: int = 0) -> torch.Tensor:
    """Probabilities from logits with a :func:`fit_vector_scaling` result (``dim``: the channel dim)."""
    return activate(logits, mode, temperature=params["temperature"], bias=params["bias"], dim=dim)


def _temperature_list(values: Any) -> list[float]:
    t = check_temperature(values)
    if t is None:
        raise ValueError("temperature must be a positive number or a non-empty sequence of them, got None")
    return [t] if isinstance(t, float) else list(t)


def save_temperature(path: str | os.PathLike, temperature: Any, meta: Mapping[str, Any] | None = None) -> Path:
    """Write temperatures (a scalar, sequence or tensor) and a JSON-serialisable ``meta`` dict (e.g. the model,
    the data, ``mode``, the NLL) to a small JSON file, atomically (temporary file + ``os.replace``)."""
    values = _temperature_list(temperature)
    meta = dict(meta or {})
    doc = {"format": _FORMAT, "version": _FORMAT_VERSION, "temperature": values, "meta": meta}
    try:
        text = json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be JSON-serialisable with finite numbers: {err}") from None
    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def load_temperature(path: str | os.PathLike, *, return_meta: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Read a file written by :func:`save_temperature`: a float64 tensor ``(1,)`` or ``(C,)`` (and the meta dict
    with ``return_meta=True``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a temperature file (invalid JSON: {err}); write one with "
                         "rankseg_monai.calibration.save_temperature") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a temperature file written by rankseg_monai.calibration.save_temperature")
    if doc.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path} has temperature-file version {doc.get('version')!r}; this version reads "
                         f"{_FORMAT_VERSION}")
    try:
        t = torch.tensor(_temperature_list(doc.get("temperature")), dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its temperature entry is invalid ({err}); write the file again with "
                         "save_temperature") from None
    meta = doc.get("meta") or {}
    return (t, meta) if return_meta else t
