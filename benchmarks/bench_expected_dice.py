"""How good is the label-free estimate of a decision's Dice (``rankseg_monai.functional.expected_score``)?

Part 1, calibrated synthetic cases (the setting of the theory: the truth is drawn voxel by voxel from the
probabilities): for volumes of several sizes and classes of several expected sizes, the estimate of RankSEG's and
of thresholding's mask against the Monte-Carlo mean Dice of the same mask over many drawn truths, and against
the exact expectation (Poisson-binomial, for the smaller classes).

Part 2, the shipped demo model on held-out phantoms (a real network, not calibrated by construction): per case
the estimate against the actual Dice, for the organ and the lesion, as the model comes and under the demo's
distortions of its logits (x0.5, x0.33: an under-confident model); correlation and mean absolute error.

    python benchmarks/bench_expected_dice.py            # both parts, ~1-2 min on 2 cores
    python benchmarks/bench_expected_dice.py --draws 400 --cases 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from rankseg_monai.functional import expected_score, rankseg


def blob_probs(shape, expected_voxels: float, seed: int) -> torch.Tensor:
    """A smooth blob of foreground probability with about ``expected_voxels`` expected voxels (sum p)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = (torch.rand(len(shape), generator=g) - 0.5) * 0.4
    r = ((grid - centre.view(-1, *([1] * len(shape)))) ** 2).sum(0).sqrt()
    noise = torch.nn.functional.avg_pool3d(torch.randn((1, 1, *shape), generator=g), 3, 1, 1)[0, 0]
    lo, hi = 0.0, 2.0
    for _ in range(60):  # radius by bisection so that sum p matches the target
        rad = (lo + hi) / 2
        p = torch.sigmoid(30.0 * (rad - r) + 1.5 * noise)
        lo, hi = (rad, hi) if float(p.sum()) < expected_voxels else (lo, rad)
    return torch.where(p < 1e-3, torch.zeros_like(p), p)[None, None]  # a finite support (for the exact part)


def mc_dice(p: torch.Tensor, mask: torch.Tensor, draws: int, seed: int) -> tuple[float, float]:
    """Monte-Carlo mean Dice (empty vs empty = 1, MONAI ignore_empty=False) of ``mask`` over truths drawn from p."""
    g = torch.Generator().manual_seed(seed)
    flat_p, flat_m = p.reshape(-1).double(), mask.reshape(-1)
    values = []
    for _ in range(0, draws, 50):
        y = torch.rand((min(50, draws - len(values)), flat_p.numel()), generator=g, dtype=torch.float64) < flat_p
        inter = (y & flat_m).sum(1).double()
        total = y.sum(1).double() + flat_m.sum().double()
        values.extend(torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).tolist())
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def exact_dice(p: np.ndarray, mask: np.ndarray) -> float:
    """Exact E[Dice] of ``mask`` (empty vs empty = 1) under independent Bernoulli(p) voxels, by the Poisson-binomial
    laws of the exact solver (``E[2 Y_j / (Gamma_-j + 1 + k)]`` summed over the mask; O(n^2), small classes)."""
    from rankseg_monai.solvers.exact import leave_one_out_pmfs, poisson_binomial_pmf

    p, m = p.astype(np.float64).ravel(), mask.ravel().astype(bool)
    k = int(m.sum())
    inside, outside = p[m & (p > 0)], p[~m & (p > 0)]
    pmf = poisson_binomial_pmf(np.concatenate([inside, outside]))
    if k == 0:
        return float(pmf[0])
    loo = leave_one_out_pmfs(pmf, inside)  # (n, |inside|): the law of Gamma without voxel j
    kernel = 2.0 / (np.arange(loo.shape[0]) + 1 + k)
    return float((inside * (kernel @ loo)).sum())


def part1(draws: int) -> list[dict]:
    rows = []
    for shape in ((24, 24, 24), (48, 48, 32)):
        for ev in (10.0, 100.0, 1000.0, 5000.0):
            if ev > 0.3 * np.prod(shape):
                continue
            for seed in range(3):
                p = blob_probs(shape, ev, seed)
                for name, mask in (("rankseg", rankseg(p, output_mode="multilabel", pruning_prob=0.0)),
                                   ("threshold", p > 0.5)):
                    est = float(expected_score(p, mask)[0, 0])
                    mc, se = mc_dice(p, mask, draws, seed + 100)
                    ex = exact_dice(p.numpy(), mask.numpy()) if int((p > 0).sum()) <= 6000 else math.nan
                    rows.append({"shape": "x".join(map(str, shape)), "expected_voxels": ev, "seed": seed,
                                 "mask": name, "mask_voxels": int(mask.sum()), "estimate": est, "mc": mc,
                                 "mc_se": se, "exact": ex,
                                 "error_vs_mc": est - mc, "error_vs_exact": est - ex})
    return rows


def part2(cases: int) -> list[dict]:
    from rankseg_monai.app.demo import DEMO_SEED, infer_probabilities, load_demo_model
    from rankseg_monai.app.synthetic import make_phantom

    net, meta = load_demo_model()
    rows = []
    for i in range(cases):
        ph = make_phantom(DEMO_SEED + i)
        probs = infer_probabilities(net, ph.image, meta["roi_size"])
        logits = torch.log(probs.clamp(min=1e-12))
        y = torch.from_numpy(ph.label[0])
        for k in (1.0, 0.5, 0.33):
            p = torch.softmax(logits * k, dim=1)
            for name, labels in (("rankseg", rankseg(p, pruning_prob="auto")), ("argmax", p.argmax(1))):
                est = expected_score(p, labels)[0]
                for c, cname in ((1, "organ"), (2, "lesion")):
                    a, t = labels[0] == c, y == c
                    s = int(a.sum()) + int(t.sum())
                    actual = 1.0 if s == 0 else 2 * int((a & t).sum()) / s
                    rows.append({"case": i, "scale": k, "decision": name, "class": cname,
                                 "estimate": float(est[c]), "actual": actual})
    return rows


def _summary2(rows: list[dict]) -> list[str]:
    out = [f"{'logits x':>8} {'decision':>9} {'class':>7} {'mean est.':>10} {'mean actual':>12} {'MAE':>7} {'corr':>6}"]
    keys = sorted({(r["scale"], r["decision"], r["class"]) for r in rows}, key=lambda k: (-k[0], k[1], k[2]))
    for key in keys:
        sel = [r for r in rows if (r["scale"], r["decision"], r["class"]) == key]
        e, a = np.array([r["estimate"] for r in sel]), np.array([r["actual"] for r in sel])
        corr = float(np.corrcoef(e, a)[0, 1]) if e.std() > 0 and a.std() > 0 else math.nan
        out.append(f"{key[0]:>8} {key[1]:>9} {key[2]:>7} {e.mean():>10.4f} {a.mean():>12.4f} "
                   f"{np.abs(e - a).mean():>7.4f} {corr:>6.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=200, help="Monte-Carlo truths per case (default 200)")
    ap.add_argument("--cases", type=int, default=8, help="demo phantoms (default 8)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t = time.perf_counter()
    rows1 = part1(args.draws)
    print(f"Part 1: calibrated synthetic cases (truth drawn from p), {args.draws} draws, torch {torch.__version__}")
    print("(an empty mask's estimate is P(class absent) under pruning's 'mixed' model, not the independent model that "
          "draws these truths: those rows are marked *)")
    print(f"{'shape':>9} {'E[vox]':>7} {'mask':>9} {'max |est-MC|':>13} {'MC s.e.':>8} {'max |est-exact|':>16}")
    for shape in sorted({r["shape"] for r in rows1}):
        for ev in sorted({r["expected_voxels"] for r in rows1 if r["shape"] == shape}):
            for mask in ("rankseg", "threshold"):
                sel = [r for r in rows1 if (r["shape"], r["expected_voxels"], r["mask"]) == (shape, ev, mask)]
                err = max(abs(r["error_vs_mc"]) for r in sel)
                se = max(r["mc_se"] for r in sel)
                exact = [abs(r["error_vs_exact"]) for r in sel if math.isfinite(r["error_vs_exact"])]
                ex = f"{max(exact):.4f}" if exact else "-"
                star = "*" if any(r["mask_voxels"] == 0 for r in sel) else " "
                print(f"{shape:>9} {ev:>7.0f} {mask:>9} {err:>13.4f} {se:>8.4f} {ex:>16}{star}")
    rows2 = [] if args.skip_demo else part2(args.cases)
    if rows2:
        print(f"\nPart 2: the demo model, {args.cases} held-out phantoms, estimate vs actual Dice per case")
        print("\n".join(_summary2(rows2)))
    print(f"\n{time.perf_counter() - t:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"calibrated": rows1, "demo": rows2}, fh, indent=1)


if __name__ == "__main__":
    main()
