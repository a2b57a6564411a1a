"""A fixed-seed snapshot of decisions, to show that a speed change decides exactly as before.

About 1,000 cases: region decisions (every volume kind of ``bench_regions.py`` at two sizes and three seeds, Dice,
IoU and Dice with ``smooth=1``, ``pruning_prob`` ``"auto"`` and 0.5, label maps and region masks; tissue-like
batches; 600 random small region cases of three region sets, class and region probabilities), and multiclass and
multilabel decisions on blob phantoms and noise (C = 3, 14).  Each output is stored as a hash of its bytes, shape
and dtype.

    python benchmarks/decision_snapshot.py save before.pt          # on the old code
    python benchmarks/decision_snapshot.py compare before.pt       # on the new code: lists every case that differs
    python benchmarks/decision_snapshot.py compare before.pt --threads 2
    python benchmarks/decision_snapshot.py save before.pt --random-volumes   # and 1,500 random region volumes

About 25 s on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _phantoms import blob_phantom  # noqa: E402
from bench_regions import KINDS, volume  # noqa: E402

from rankseg_monai.functional import rankseg  # noqa: E402

SETTINGS = [{"metric": "dice"}, {"metric": "iou"}, {"metric": "dice", "smooth": 1.0}]


def _digest(t: torch.Tensor) -> str:
    return (hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16] + str(tuple(t.shape))
            + str(t.dtype))


def snapshot() -> dict[str, str]:
    out = {}
    for kind, (spec, rp) in KINDS.items():
        for shape in ((48, 48, 32), (40, 36, 24)):
            for seed in range(3):
                x = volume(kind, shape, seed=seed)
                for k, st in enumerate(SETTINGS):
                    for pp in ("auto", 0.5):
                        for om in ("multiclass", "multilabel"):
                            out[f"reg/{kind}/{shape}/{seed}/{k}/{pp}/{om}"] = _digest(
                                rankseg(x, regions=spec, region_probs=rp, pruning_prob=pp, output_mode=om, **st))
    x = torch.cat([volume("tissue", (96, 96, 64), seed=s) for s in (0, 1)])
    for k, st in enumerate(SETTINGS):
        out[f"reg/tissue-big/{k}"] = _digest(rankseg(x, regions=KINDS["tissue"][0], pruning_prob="auto", **st))
    for kind in ("lits", "brats", "lits-ct", "brats-mri"):
        spec, rp = KINDS[kind]
        out[f"reg/{kind}-big"] = _digest(rankseg(volume(kind, (96, 96, 64), seed=5), regions=spec, region_probs=rp,
                                                 pruning_prob="auto"))
    g = torch.Generator().manual_seed(123)
    specs = [({"liver": [1, 2], "tumour": [2]}, 3), ({"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}, 4),
             ({"liver": [1, 2, 3], "tumour": [2], "vessel": [3]}, 4)]
    for i in range(600):
        spec, c = specs[i % 3]
        rp = (i // 3) % 2 == 1
        n = int(torch.randint(5, 400, (1,), generator=g))
        st = SETTINGS[(i // 6) % 3]
        if rp:
            p = torch.rand((1, len(spec), n), generator=g) ** (0.5 + 2.5 * torch.rand((), generator=g))
        else:
            p = torch.softmax(torch.randn((1, c, n), generator=g) * 2, 1)
        out[f"rand/{i}"] = _digest(rankseg(p, regions=spec, region_probs=rp, pruning_prob="auto" if i % 2 else 0.5,
                                           output_mode="multilabel", **st))
    for c in (3, 14):
        blobs = blob_phantom(c, (48, 48, 40), seed=c, batch=1)
        noise = torch.softmax(torch.randn((1, c, 32, 32, 32), generator=torch.Generator().manual_seed(c)) * 3, 1)
        for name, v in (("blob", blobs), ("noise", noise)):
            for k, st in enumerate(SETTINGS):
                for pp in ("auto", 0.5):
                    for om in ("multiclass", "multilabel"):
                        out[f"mc/{name}/{c}/{k}/{pp}/{om}"] = _digest(rankseg(v, pruning_prob=pp, output_mode=om,
                                                                              **st))
    return out


def random_region_volumes(count: int = 1500) -> dict[str, str]:
    """``count`` random region cases on small smooth volumes (batch 2, 4-23 x 4-23 x 2-11 voxels, smoothing 1-11
    voxels wide, 2-16 logit scale, voxel noise): the three region sets of :func:`snapshot`, class and region
    probabilities, Dice, IoU and Dice with ``smooth=1``, ``pruning_prob`` ``"auto"`` and 0.5, label maps and region
    masks (about 30 s on one core)."""
    g = torch.Generator().manual_seed(2026)
    specs = [({"liver": [1, 2], "tumour": [2]}, 3), ({"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}, 4),
             ({"liver": [1, 2, 3], "tumour": [2], "vessel": [3]}, 4)]
    out = {}
    for i in range(count):
        spec, c = specs[i % 3]
        rp = (i // 3) % 2 == 1
        st = SETTINGS[(i // 6) % 3]
        shape = tuple(int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((4, 24), (4, 24), (2, 12)))
        k = min(int(torch.randint(1, 6, (1,), generator=g)) * 2 + 1, ((min(shape) - 1) // 2) * 2 + 1)
        scale = float(2 + 14 * torch.rand((), generator=g))
        z = torch.nn.functional.avg_pool3d(torch.randn((2, len(spec) if rp else c, *shape), generator=g), k, 1,
                                           k // 2) * scale
        z = z + torch.randn(z.shape, generator=g) * float(torch.rand((), generator=g))
        p = (torch.sigmoid(z - 0.7 * torch.arange(z.shape[1]).view(1, -1, 1, 1, 1).float()) if rp
             else torch.softmax(z, 1))
        out[f"vol/{i}"] = _digest(rankseg(p, regions=spec, region_probs=rp, pruning_prob="auto" if i % 2 else 0.5,
                                          output_mode="multilabel" if i % 4 == 0 else "multiclass", **st))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["save", "compare"])
    ap.add_argument("file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--random-volumes", action="store_true",
                    help="also 1,500 random region cases on small smooth volumes (about 30 s more)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    now = snapshot()
    if args.random_volumes:
        now.update(random_region_volumes())
    if args.action == "save":
        torch.save(now, args.file)
        print(f"{len(now)} cases saved to {args.file}")
        return 0
    before = torch.load(args.file)
    differ = sorted(k for k in before if now.get(k) != before[k])
    missing = sorted(set(now) ^ set(before))
    print(f"{len(before)} cases: {len(differ)} differ" + (f", {len(missing)} not in both" if missing else ""))
    for k in differ[:20]:
        print("  differs:", k)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
