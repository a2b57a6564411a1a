"""Many-class softmax phantoms shared by the benchmarks and the GPU check (no MONAI, no rankseg_monai import).

:func:`blob_phantom` imitates the output of a whole-body or multi-organ network: a background class that
covers most of the volume and, per foreground class, one blob (an ellipsoid with a soft boundary) whose radius
is drawn log-uniformly from a few voxels to a sixth of the volume, so blobs of many sizes; a fifth of the
classes have only a faint "ghost" blob (max p below one half: what pruning decides on) and a fifth are absent
(tiny probabilities everywhere).  Far from its blob a class has probability ``1e-6`` to ``1e-4``: most classes are
absent from most voxels, as on a real scan.  Voxel noise on the logits gives ties-free, network-like values.
"""

from __future__ import annotations

import math

import torch

__all__ = ["blob_phantom"]


def blob_phantom(num_classes: int, spatial: tuple[int, ...], seed: int = 0, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """Softmax probabilities ``(batch, num_classes, *spatial)`` (contiguous, ``dtype``, on ``device``), deterministic
    in ``seed`` (a CUDA phantom draws its voxel noise from the device's generator: another phantom of the same
    kind)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    gd = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    ndim = len(spatial)
    out = torch.empty((batch, num_classes, *spatial), dtype=dtype, device=device)
    coords = [torch.arange(s, dtype=torch.float32, device=device) for s in spatial]
    smin = min(spatial)
    for b in range(batch):
        logits = torch.randn((num_classes, *spatial), generator=gd, device=device) * 0.5
        logits[0] += 2.0  # background
        # absent everywhere but in its blob: p between about 1e-6 and 1e-4 (a level per class)
        logits[1:] -= (7.0 + 5.0 * torch.rand((num_classes - 1, *([1] * ndim)), generator=g)).to(device)
        for c in range(1, num_classes):
            kind = float(torch.rand((), generator=g))
            if kind < 0.2:
                continue  # absent class
            peak = 14.0 if kind >= 0.4 else 7.0 + 1.5 * float(torch.rand((), generator=g))  # ghost: max p < 1/2
            r = math.exp(math.log(1.5) + float(torch.rand((), generator=g)) * (math.log(max(2.0, smin / 6)) -
                                                                               math.log(1.5)))
            radii = [r * (0.6 + 0.8 * float(torch.rand((), generator=g))) if s > 1 else 1.0 for s in spatial]
            center = [float(torch.rand((), generator=g)) * (s - 1) for s in spatial]
            box = []
            for k in range(ndim):
                lo = max(0, int(center[k] - 2 * radii[k] - 3))
                hi = min(spatial[k], int(center[k] + 2 * radii[k] + 4))
                box.append(slice(lo, hi))
            d2 = 0.0
            for k in range(ndim):
                shape = [1] * ndim
                shape[k] = -1
                d2 = d2 + ((coords[k][box[k]] - center[k]) / radii[k]).reshape(shape) ** 2
            d = torch.sqrt(d2)  # 1 on the blob's surface
            bump = peak * torch.sigmoid((1.0 - d) * r / 1.2)  # soft boundary about 1.2 voxels wide
            logits[(c, *box)] += bump
        out[b] = torch.softmax(logits, 0).to(dtype)
    return out
