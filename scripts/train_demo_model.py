#!/usr/bin/env python
"""Train the small 3D UNet shipped for ``rankseg-monai demo`` and write ``rankseg_monai/data/demo_unet.pt``.

The model is trained with plain cross-entropy (no Dice loss, no class weights): cross-entropy is a proper
scoring rule, so the softmax probabilities are roughly calibrated, which is what RankSEG assumes.  Training
data are synthetic phantoms (``rankseg_monai.app.synthetic``) with seeds ``0 .. --train-cases - 1``; the demo
evaluates on seeds from 1 000 000 up, never seen in training.

Reproduce the shipped checkpoint (CPU, one thread, about three minutes)::

    python scripts/train_demo_model.py

The run is seeded and single-threaded, so on the same platform and torch version it reproduces the weights; a
different torch/BLAS build can change the last bits (and then the demo's numbers slightly).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import monai
import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from rankseg_monai.app.synthetic import DEFAULT_SHAPE, DEFAULT_SPACING, make_phantom  # noqa: E402

DEFAULT_OUT = REPO / "rankseg_monai" / "data" / "demo_unet.pt"

ARCH = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": (16, 32, 64, 128),
    "strides": (2, 2, 2),
    "num_res_units": 1,
}
ROI_SIZE = (48, 48, 32)
VAL_SEED0 = 500_000


def random_crop_flip(image: np.ndarray, label: np.ndarray, roi: tuple[int, ...], rng: np.random.Generator):
    """A random ``roi`` crop of a (1, X, Y, Z) pair, randomly flipped along X and Y."""
    starts = [int(rng.integers(0, s - r + 1)) for s, r in zip(image.shape[1:], roi)]
    sl = (slice(None), *(slice(a, a + r) for a, r in zip(starts, roi)))
    image, label = image[sl], label[sl]
    for axis in (1, 2):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis), np.flip(label, axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


@torch.no_grad()
def validate(net: torch.nn.Module, cases: list, n_bins: int = 10) -> dict[str, float]:
    """Dice (argmax) per class and a reliability summary of the softmax (ECE per class), with the demo's
    sliding-window inference."""
    net.eval()
    dice = {1: [], 2: []}
    conf_bins = {c: np.zeros((n_bins, 3)) for c in (1, 2)}  # per bin: count, sum prob, sum hit
    for ph in cases:
        logits = sliding_window_inference(torch.from_numpy(ph.image)[None], ROI_SIZE, 4, net, overlap=0.25,
                                          mode="gaussian")
        probs = torch.softmax(logits, dim=1)[0].numpy()
        pred = probs.argmax(0)
        lab = ph.label[0]
        for c in (1, 2):
            inter = np.sum((pred == c) & (lab == c))
            denom = np.sum(pred == c) + np.sum(lab == c)
            dice[c].append(2 * inter / denom if denom else 1.0)
            p = probs[c].ravel()
            hit = (lab == c).ravel()
            idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
            conf_bins[c][:, 0] += np.bincount(idx, minlength=n_bins)
            conf_bins[c][:, 1] += np.bincount(idx, weights=p, minlength=n_bins)
            conf_bins[c][:, 2] += np.bincount(idx, weights=hit, minlength=n_bins)
    net.train()
    out = {}
    for c in (1, 2):
        b = conf_bins[c]
        ece = np.sum(np.abs(b[:, 1] - b[:, 2])) / b[:, 0].sum()
        out[f"dice{c}"] = float(np.mean(dice[c]))
        out[f"ece{c}"] = float(ece)
        # calibration among voxels the model is unsure about (0.1 < p < 0.9): mean predicted vs observed rate
        mid = b[1:n_bins - 1]
        out[f"mid_pred{c}"] = float(mid[:, 1].sum() / max(mid[:, 0].sum(), 1))
        out[f"mid_obs{c}"] = float(mid[:, 2].sum() / max(mid[:, 0].sum(), 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--train-cases", type=int, default=320, help="phantoms in the training pool (seeds 0..n-1)")
    ap.add_argument("--val-cases", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    pool = [make_phantom(s) for s in range(args.train_cases)]
    val = [make_phantom(VAL_SEED0 + s) for s in range(args.val_cases)]
    lesion_frac = np.mean([np.mean(p.label == 2) for p in pool])
    print(f"generated {len(pool)} training + {len(val)} validation phantoms in {time.perf_counter() - t0:.1f} s "
          f"(lesion voxels: {100 * lesion_frac:.2f}% of the volume)")

    net = UNet(**ARCH)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / args.iterations)))
    t_train = time.perf_counter()
    running = 0.0
    for it in range(1, args.iterations + 1):
        batch = [random_crop_flip(pool[i].image, pool[i].label, ROI_SIZE, rng)
                 for i in rng.integers(0, len(pool), args.batch_size)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1][0] for b in batch]))
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if it % args.log_every == 0 or it == args.iterations:
            n = args.log_every if it % args.log_every == 0 else it % args.log_every
            print(f"iter {it:5d}  ce {running / n:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - t_train:.0f} s", flush=True)
            last_loss, running = running / n, 0.0
    train_seconds = time.perf_counter() - t_train
    metrics = validate(net, val)
    print("validation (argmax, whole volume): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

    ckpt = {
        "arch": dict(ARCH),
        "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "roi_size": ROI_SIZE,
        "spacing": DEFAULT_SPACING,
        "shape": DEFAULT_SHAPE,
        "class_names": ("background", "organ", "lesion"),
        "training": {
            "loss": "cross_entropy",
            "iterations": args.iterations,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "AdamW(weight_decay=1e-4), cosine schedule",
            "train_seeds": (0, args.train_cases),
            "seed": args.seed,
            "final_ce": float(last_loss),
            "seconds": round(train_seconds, 1),
            "validation": metrics,
            "torch": str(torch.__version__),
            "monai": str(monai.__version__),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {train_seconds:.0f} s of training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
