"""A label-free safeguard against a *probability fog*: :class:`Guard` and the pass that applies it.

RankSEG picks the mask with the best expected Dice under the model's own probabilities.  An under-confident
model (briefly trained, or flattened by its loss) gives a large part of the image small but non-negligible
probabilities of a class, ``sum(p)`` swells, RankSEG's threshold sinks below the fog and the mask floods the
image.  The guard finds such classes without labels and gives them argmax's decision back.

It runs inside :func:`rankseg_monai.functional.rankseg` (``guard=True``) after the solver, as one more chunked
pass over the probabilities on the compute ``device`` (a second pass only when some class falls back).  It
imports nothing above the solvers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .solvers._stream import iter_chunks

__all__ = ["UNCERTAIN_BAND", "Guard", "resolve_guard", "apply_guard", "fallback_to_argmax"]

#: probabilities strictly inside this band count as "uncertain"
UNCERTAIN_BAND: tuple[float, float] = (0.05, 0.95)


@dataclass(frozen=True)
class Guard:
    """Settings of the label-free safeguard (``rankseg(..., guard=Guard(...))``; ``guard=True`` uses these defaults).

    Per (batch, class), with ``V_r`` / ``V_a`` the voxels of RankSEG's / argmax's mask (``p > 0.5`` in multilabel
    mode) and ``u`` the fraction of the image whose ``p`` lies strictly inside ``band``, the class falls back to
    argmax when all of

    * ``u > max_uncertain``: the class is uncertain over much of the image (a well-trained network is confident
      on most of a volume: 0.4-4% on the demo model, 93% on a briefly trained one);
    * ``V_r > max_growth * V_a``: RankSEG's mask is larger than argmax's (by more than the factor
      ``max_growth``; the default 1 only asks that RankSEG grew the class, which is how a fog hurts).  A class
      argmax never picks but RankSEG paints into a fog is switched too, i.e. emptied.

    In multilabel mode a switched class gets the mask ``p > 0.5``.  In multiclass mode a switched class ``c``
    takes argmax's labels on every voxel that RankSEG or argmax gives to ``c`` (other voxels keep RankSEG's
    labels), so its mask equals argmax's.

    No label-free rule can tell a flattened model from a calibrated model of a genuinely ambiguous image: the
    guard only catches gross fog and leaves moderate miscalibration alone (measurements and limits in
    ``docs/calibration.md``).  With labelled cases, :func:`rankseg_monai.calibration.calibration_report` and
    :func:`rankseg_monai.calibration.fit_temperature` are the real remedy.

    Example:
        >>> import torch
        >>> from rankseg_monai.functional import rankseg
        >>> p = torch.full((1, 1, 1000), 0.3); p[..., :100] = 0.9   # an object in a flat 0.3 "fog"
        >>> int(rankseg(p, output_mode="multilabel").sum())   # plain RankSEG: everything
        1000
        >>> int(rankseg(p, output_mode="multilabel", guard=True).sum())   # guarded: the object
        100
    """

    max_uncertain: float = 0.5
    max_growth: float = 1.0
    band: tuple[float, float] = UNCERTAIN_BAND

    def __post_init__(self) -> None:
        for name in ("max_uncertain", "max_growth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Guard.{name} must be a finite number >= 0, got {v!r}")
        try:
            band = tuple(float(b) for b in self.band)
        except (TypeError, ValueError):
            band = ()
        if len(band) != 2 or not 0.0 <= band[0] < band[1] <= 1.0:
            raise ValueError(f"Guard.band must be (low, high) with 0 <= low < high <= 1, got {self.band!r}")
        object.__setattr__(self, "band", band)


def resolve_guard(guard: Any) -> Guard | None:
    """``None``/``False`` -> ``None`` (off); ``True``/``"on"``/``"default"`` -> ``Guard()``; a :class:`Guard`; or a dict
    of its settings (e.g. from a bundle config).  Anything else raises, naming the accepted values."""
    if isinstance(guard, np.bool_):
        guard = bool(guard)
    if guard is None or guard is False:
        return None
    if guard is True:
        return Guard()
    if isinstance(guard, str):
        key = guard.strip().lower()
        if key in ("default", "on", "true"):
            return Guard()
        if key in ("off", "false", "none"):
            return None
    if isinstance(guard, Guard):
        return guard
    if isinstance(guard, Mapping):
        known = {f.name for f in fields(Guard)}
        unknown = set(guard) - known
        if unknown:
            raise ValueError(f"unknown guard settings {sorted(unknown)}; known: {sorted(known)}")
        return Guard(**dict(guard))
    raise TypeError(f"guard must be None/False (off), True (defaults), a rankseg_monai.guard.Guard or a dict of its "
                    f"settings ({', '.join(f.name for f in fields(Guard))}); got {guard!r}")


def _argmax(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.argmax(1)  # first maximum wins, as argmax_labels


@torch.no_grad()
def apply_guard(
    flat: torch.Tensor,
    out: torch.Tensor,
    guard: Guard,
    output_mode: str,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply ``guard`` to RankSEG's decision ``out`` of ``flat`` ``(B, C, N)`` in place; return it and the info.

    ``out`` is the flat decision on ``flat``'s device: labels ``(B, N)`` (multiclass, any label dtype) or bool
    masks ``(B, C, N)`` (multilabel).  The info dict holds ``(B, C)`` tensors on the compute device:
    ``fallback`` (bool, the switched classes), ``rankseg_volume`` / ``argmax_volume`` (int64 voxels) and
    ``uncertain_fraction`` (float64).  One pass for the statistics; a second one, only when some class falls
    back, rewrites the voxels of the switched classes.
    """
    device = flat.device if device is None else torch.device(device)
    multiclass = output_mode == "multiclass"
    batch, num_classes, n_vox = flat.shape
    unc = torch.zeros(batch, num_classes, dtype=torch.int64, device=device)
    v_r = torch.zeros_like(unc)
    v_a = torch.zeros_like(unc)
    lo, hi = guard.band
    for start, stop, p in iter_chunks(flat, device, chunk_size, clamp):
        if multiclass:  # voxel counts per label by scatter-adds: no (B, C, n) one-hot masks
            v_a.scatter_add_(1, _argmax(p), torch.ones_like(v_a[:, :1]).expand(-1, p.shape[-1]))
            d = out[:, start:stop].to(device)
            valid = (d >= 0) & (d < num_classes)  # void labels count for no class
            v_r.scatter_add_(1, torch.where(valid, d, 0).long(), valid.long())
        else:
            v_a += (p > 0.5).sum(-1)
            v_r += out[..., start:stop].to(device).sum(-1)
        unc += ((p > lo) & (p < hi)).sum(-1)
    fraction = unc.double() / n_vox
    fallback = (fraction > guard.max_uncertain) & (v_r > guard.max_growth * v_a)
    if bool(fallback.any()):
        fallback_to_argmax(flat, out, fallback, output_mode, device=device, chunk_size=chunk_size, clamp=clamp)
    return out, {"fallback": fallback, "rankseg_volume": v_r, "argmax_volume": v_a, "uncertain_fraction": fraction}


@torch.no_grad()
def fallback_to_argmax(
    flat: torch.Tensor,
    out: torch.Tensor,
    fallback: torch.Tensor,
    output_mode: str,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    clamp: bool = False,
    keep_claims: bool = False,
) -> torch.Tensor:
    """Switch the classes where the bool ``fallback`` ``(B, C)`` is true back to argmax in RankSEG's decision
    ``out`` of ``flat`` ``(B, C, N)``, in place (one pass): the guard's rewrite, also used for the classes a
    calibration's held-out report recommends argmax for.

    Multilabel: a switched class gets ``p > 0.5``.  Multiclass: a switched class ``c`` takes argmax's labels on
    every voxel that RankSEG or argmax gives to ``c`` (other voxels keep RankSEG's labels), so its mask equals
    argmax's; void labels never switch.  With ``keep_claims`` (a calibration's recommendation) a voxel that RankSEG
    gives to a foreground class (label ``> 0``) that is not switched keeps that label: switching the organ to argmax
    then does not take back the voxels RankSEG gave to the lesion inside it.
    """
    device = flat.device if device is None else torch.device(device)
    fallback = fallback.to(device)
    num_classes = flat.shape[1]
    for start, stop, p in iter_chunks(flat, device, chunk_size, clamp):
        if output_mode == "multiclass":
            d = out[:, start:stop].to(device)
            a = _argmax(p)
            valid = (d >= 0) & (d < num_classes)
            rs_switched = torch.gather(fallback, 1, d.long().clamp(0, num_classes - 1)) & valid
            am_switched = torch.gather(fallback, 1, a)
            touched = rs_switched | am_switched
            if keep_claims:
                touched &= ~(valid & (d > 0) & ~rs_switched)
            patched = torch.where(touched, a.to(d.dtype), d)
            out[:, start:stop] = patched.to(out.device)
        else:
            d = out[..., start:stop].to(device)
            out[..., start:stop] = torch.where(fallback.unsqueeze(-1), p > 0.5, d).to(out.device)
    return out
