#!/usr/bin/env python
"""Reproduce the numbers of ``docs/calibration.md`` (issue #8): calibration, temperature scaling, the guard, and
class pruning (``pruning_prob`` 0.5 / 0 / "auto").

    python benchmarks/bench_calibration.py            # everything, about 5 minutes on one CPU thread
    python benchmarks/bench_calibration.py --only pruning

Everything is seeded; the truth of every synthetic case is drawn voxel-wise from known probabilities, so
"calibrated" has an exact meaning there.  The demo sections use the shipped demo UNet on held-out phantoms
(``rankseg_monai.app.demo``): test seeds 1 000 000+, calibration seeds 2 000 000+ (never the same cases), and
lesion-optional phantoms (``num_lesions=(0, 2)``) from seed 3 000 000.  Dice: an empty prediction of an absent
class scores 1 (MONAI ``DiceMetric(ignore_empty=False)``); "IE=True" columns skip those cases instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rankseg_monai.calibration import Guard, fit_temperature, guarded_rankseg  # noqa: E402
from rankseg_monai.functional import rankseg  # noqa: E402

PRUNING = (0.5, 0.0, "auto-independent", "auto-correlated", "auto")


def decide(p, pruning_prob, **kw):
    return rankseg(p, pruning_prob=pruning_prob, **kw)


# ----------------------------------------------------------------------------------------------- synthetic
def _grid(shape):
    return np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij")


def _blob_distance(shape, rng, radius):
    """Signed distance-like field (voxels, > 0 inside) of a random ellipsoid."""
    grids = _grid(shape)
    R = radius * rng.uniform(0.7, 1.3, 3)
    ctr = [rng.uniform(min(R[i] + 1, n / 2), max(n - R[i] - 1, n / 2)) for i, n in enumerate(shape)]
    r = np.sqrt(sum(((g - c) / Ri) ** 2 for g, c, Ri in zip(grids, ctr, R)))
    return (1 - r) * R.min()


def true_logits(seed, shape=(40, 40, 24), num_fg=2):
    """Calibrated softmax logits (1 + num_fg, *shape): background 0; per class 1-3 soft-edged blobs, saturating
    at +-L (L in [4, 9]), edge width 0.6-2.5 voxels, plus a smooth perturbation."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z = np.zeros((1 + num_fg, *shape))
    for c in range(1, num_fg + 1):
        L, w = rng.uniform(4.0, 9.0), rng.uniform(0.6, 2.5)
        d = np.max([_blob_distance(shape, rng, rng.uniform(2.5, 8.0)) for _ in range(int(rng.integers(1, 4)))], 0)
        f = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
        z[c] = np.clip(d / w, -L, L) + 0.5 * f / (f.std() + 1e-12)
    return torch.from_numpy(z)


def draw_labels(p, rng):
    """Label map (1, *spatial) drawn voxel-wise from the class probabilities p (C, *spatial)."""
    C = p.shape[0]
    flat = p.reshape(C, -1).double()
    u = torch.from_numpy(rng.random(flat.shape[1]))
    lab = (u[None] > torch.cumsum(flat, 0)).sum(0).clamp(max=C - 1)
    return lab.reshape(1, *p.shape[1:])


def dice_per_class(pred_labels, truth, classes):
    """Dice of label maps per class; both empty -> 1 (ignore_empty=False)."""
    out = []
    for c in classes:
        a, b = pred_labels == c, truth == c
        s = int(a.sum() + b.sum())
        out.append(1.0 if s == 0 else float(2 * (a & b).sum()) / s)
    return out


# ------------------------------------------------------------------------------------------ demo inference
def demo_logits(seeds, **phantom_kwargs):
    from monai.inferers import SlidingWindowInferer

    from rankseg_monai.app.demo import load_demo_model
    from rankseg_monai.app.synthetic import make_phantom

    net, meta = load_demo_model()
    inferer = SlidingWindowInferer(roi_size=tuple(meta["roi_size"]), sw_batch_size=4, overlap=0.25, mode="gaussian")
    Z, Y = [], []
    with torch.no_grad():
        for s in seeds:
            ph = make_phantom(s, **phantom_kwargs)
            Z.append(inferer(torch.as_tensor(ph.image)[None], net)[0].float())
            Y.append(torch.as_tensor(ph.label))
    return Z, Y


# --------------------------------------------------------------------------------------------- sections
def fisher_se_softmax(z, T):
    """Standard error of 1/T from the Fisher information sum_i Var_{q_i}(z_i) (z: (M, C), q = softmax(z/T))."""
    q = torch.softmax(z / T, 1)
    var = (q * z**2).sum(1) - (q * z).sum(1) ** 2
    return float(1.0 / var.sum().sqrt())


def section_temperature(n_cal=4):
    print("\n## Temperature recovery (synthetic, truth drawn from the calibrated probabilities)\n")
    print("| distortion k (model logits = k x true) | fitted T (global) | T / k | SE of T/k (Fisher) | "
          "per-class T, classes 1, 2 (class 0's logits are constant) |")
    print("|---|---|---|---|---|")
    Zt = [true_logits(s) for s in range(900, 900 + n_cal)]
    Y = [draw_labels(torch.softmax(z, 0), np.random.default_rng(s)) for s, z in zip(range(900, 900 + n_cal), Zt)]
    for k in (0.25, 0.5, 2.0):
        Z = [z * k for z in Zt]
        T = float(fit_temperature(Z, Y, max_voxels=None))
        zz = torch.cat([z.reshape(3, -1).T for z in Z])
        se = fisher_se_softmax(zz, T) * T  # relative SE of T = SE(beta) / beta
        Tpc = fit_temperature(Z, Y, per_class=True, max_voxels=None)
        print(f"| {k} | {T:.4f} | {T / k:.4f} | {se:.4f} | {', '.join(f'{t / k:.3f}k' for t in Tpc.tolist()[1:])} |")


def _dice_table(title, Z, Y, Zcal, Ycal, ks, classes, names):
    print(f"\n## {title}\n")
    methods = ("argmax", "RankSEG", "calibrated", "guarded", "guarded u>0.25")
    head = " | ".join(f"{m} {n}" for m in methods for n in names)
    print(f"| k | fitted T | uncertain (fg) | {head} | guard fallbacks (u>0.5, u>0.25) |")
    print("|---" * (3 + len(methods) * len(names) + 1) + "|")
    for k in ks:
        T = fit_temperature([z * k for z in Zcal], Ycal)
        res = {m: [] for m in ("argmax", "rankseg", "calibrated", "guarded", "guarded25")}
        fb, fb25, unc = 0, 0, []
        for z, y in zip(Z, Y):
            p = torch.softmax(z * k, 0)[None]
            pc = torch.softmax(z * k / T, 0)[None]
            g, info = guarded_rankseg(p, pruning_prob="auto", return_info=True)
            g25, info25 = guarded_rankseg(p, guard=Guard(max_uncertain=0.25), pruning_prob="auto", return_info=True)
            outs = {"argmax": p.argmax(1), "rankseg": rankseg(p, pruning_prob="auto"),
                    "calibrated": rankseg(pc, pruning_prob="auto"), "guarded": g, "guarded25": g25}
            fb += int(info["fallback"][0, classes].sum())
            fb25 += int(info25["fallback"][0, classes].sum())
            unc.append(float(info["uncertain_fraction"][0, classes].max()))
            for m, o in outs.items():
                res[m].append(dice_per_class(o[0], y[0], classes))
        cells = " | ".join(" | ".join(f"{v:.3f}" for v in np.mean(res[m], 0)) for m in res)
        print(f"| {k} | {float(T):.3f} | {np.min(unc):.2f}-{np.max(unc):.2f} | {cells} | "
              f"{fb}, {fb25} of {len(Z) * len(classes)} |")


def section_synthetic_dice(n=16, n_cal=4):
    Zt = [true_logits(s) for s in range(n)]
    Y = [draw_labels(torch.softmax(z, 0), np.random.default_rng(10_000 + s)) for s, z in enumerate(Zt)]
    Zc = [true_logits(s) for s in range(500, 500 + n_cal)]
    Yc = [draw_labels(torch.softmax(z, 0), np.random.default_rng(10_000 + s)) for s, z in zip(range(500, 504), Zc)]
    _dice_table(f"Distorted synthetic cases ({n} cases, 3 classes, 40x40x24; T fitted on {n_cal} other cases)",
                Zt, Y, Zc, Yc, (0.25, 0.33, 0.5, 1.0, 2.0), [1, 2], ["c1", "c2"])


def section_demo_dice(Z, Y, Zc, Yc):
    _dice_table(f"Demo UNet, logits x k ({len(Z)} test phantoms; T fitted on {len(Zc)} calibration phantoms)",
                Z, Y, Zc, Yc, (0.25, 0.33, 0.5, 0.75, 1.0, 2.0), [1, 2], ["organ", "lesion"])


def section_user_case():
    """Issue #8: one object, sigmoid output, a sharp calibrated model flattened into a probability fog."""
    print("\n## Probability fog (issue #8 replica: sigmoid, one object per case, calibrated logits / f)\n")
    print("Mean over 8 test cases; T fitted on 4 other cases.\n")
    print("| f | uncertain fraction | Dice p > 0.5 | RankSEG | guarded | guarded u>0.25 | guard fallbacks (u>0.5, "
          "u>0.25) | fitted T | calibrated RankSEG |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = []
    for s in range(12):
        rng = np.random.default_rng(700 + s)
        d = np.max([_blob_distance((48, 48, 32), rng, rng.uniform(7, 11)) for _ in range(2)], 0)
        z = torch.from_numpy(np.clip(d / 0.5, -9, 9))[None]  # calibrated, sharp
        cases.append((z, torch.from_numpy(rng.random(z.shape)) < torch.sigmoid(z)))
    for f in (3.0, 3.5):
        T = fit_temperature([z / f for z, _ in cases[:4]], [y.long() for _, y in cases[:4]], mode="sigmoid")
        rows, unc, fb, fb25 = [], [], 0, 0
        for z, y in cases[4:]:
            p = torch.sigmoid(z / f)[None].float()
            pc = torch.sigmoid(z / f / T)[None].float()
            g, info = guarded_rankseg(p, output_mode="multilabel", pruning_prob="auto", return_info=True)
            g25, info25 = guarded_rankseg(p, guard=Guard(max_uncertain=0.25), output_mode="multilabel",
                                          pruning_prob="auto", return_info=True)
            unc.append(float(info["uncertain_fraction"][0, 0]))
            fb += int(info["fallback"].sum())
            fb25 += int(info25["fallback"].sum())
            rows.append([dice_per_class(m[0].long(), y.long(), [1])[0] for m in (
                p > 0.5, rankseg(p, output_mode="multilabel", pruning_prob="auto"), g, g25,
                rankseg(pc, output_mode="multilabel", pruning_prob="auto"))])
        m = np.mean(rows, 0)
        print(f"| {f} | {min(unc):.0%}-{max(unc):.0%} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3]:.3f} | "
              f"{fb}, {fb25} of 8 | {float(T):.3f} (1/f = {1 / f:.3f}) | {m[4]:.3f} |")


# ------------------------------------------------------------------------------------------------ pruning
def _speck(shape, rng):
    ctr = [rng.uniform(3, n - 3) for n in shape]
    sig = rng.uniform(0.6, 1.2)
    return -sum((g - c) ** 2 for g, c in zip(_grid(shape), ctr)) / (2 * sig**2)


def pruning_map(rng, kind, multiclass, shape=(24, 24, 24)):
    """Probabilities of one synthetic case: (1, *shape) multilabel or (3, *shape) multiclass (bg + 2 kinds)."""
    if not multiclass:
        if kind == "speck":
            return torch.from_numpy(rng.uniform(0.05, 0.6) * np.exp(_speck(shape, rng))[None]).float()
        d = _blob_distance(shape, rng, rng.uniform(2.0, 6.0))
        lo, hi = {"confident": (0.95, 0.995), "moderate": (0.5, 0.75), "faint": (0.25, 0.5)}[kind]
        p = rng.uniform(lo, hi) / (1 + np.exp(-np.clip(d / rng.uniform(0.5, 2.0), -30, 30))) + 1e-6
        return torch.from_numpy(p[None]).float()
    z = [np.zeros(shape)]
    for kd in kind:
        if kd == "speck":
            z.append(np.maximum(_speck(shape, rng) + rng.uniform(-3.0, 0.5), -14))
        else:
            d = _blob_distance(shape, rng, rng.uniform(2.0, 6.0))
            peak = {"confident": (4.0, 7.0), "faint": (-1.5, 0.0)}[kd]
            z.append(np.clip(d / rng.uniform(0.5, 2.0), -14, rng.uniform(*peak)))
    return torch.softmax(torch.from_numpy(np.stack(z)), 0).float()


def pruning_scores(maps, multiclass, draws, rng):
    """Mean Dice per class over maps x draws, for argmax/threshold and each pruning_prob: {method: (IE=False,
    IE=True)} with (C,) tensors."""
    acc = {m: ([], []) for m in ("argmax", *PRUNING)}
    for p in maps:
        C = p.shape[0]
        flat = p.reshape(C, -1)
        onehot = torch.arange(C)[:, None]
        if multiclass:
            preds = {"argmax": flat.argmax(0)[None] == onehot}
            preds.update({pp: decide(p[None], pp)[0].reshape(-1)[None] == onehot for pp in PRUNING})
        else:
            preds = {"argmax": flat > 0.5}
            preds.update({pp: decide(p[None], pp, output_mode="multilabel")[0].reshape(C, -1) for pp in PRUNING})
        for _ in range(draws):
            if multiclass:
                u = torch.from_numpy(rng.random(flat.shape[1])).float()
                truth = (u[None] > torch.cumsum(flat, 0)).sum(0).clamp(max=C - 1)[None] == onehot
            else:
                truth = torch.from_numpy(rng.random(flat.shape)).float() < flat
            for m, pr in preds.items():
                inter = (pr & truth).sum(-1).double()
                tot = pr.sum(-1).double() + truth.sum(-1).double()
                acc[m][0].append(torch.where(tot > 0, 2 * inter / tot.clamp(min=1), 1.0))
                acc[m][1].append(torch.where(truth.any(-1), 2 * inter / tot.clamp(min=1), torch.nan))
    return {m: (torch.stack(a).mean(0), torch.stack(b).nanmean(0)) for m, (a, b) in acc.items()}


def section_pruning_synthetic(n=40, draws=10):
    print(f"\n## Pruning on calibrated synthetic cases ({n} probability maps x {draws} drawn truths each)\n")
    print("Mean Dice of the class (IE=False: empty/empty = 1; IE=True: cases with an empty truth skipped).\n")
    print("| scenario | class | argmax | 0.5 | 0 | auto-independent | auto-correlated | auto (mixed) | IE=True: argmax "
          "| 0.5 | 0 | auto-independent | auto-correlated | auto (mixed) |")
    print("|---" * 14 + "|")
    for kind in ("confident", "moderate", "faint", "speck"):
        rng = np.random.default_rng(1)
        maps = [pruning_map(rng, kind, False) for _ in range(n)]
        r = pruning_scores(maps, False, draws, rng)
        print(f"| multilabel, {kind} | 0 | "
              + " | ".join(f"{r[m][0][0]:.3f}" for m in r) + " | " + " | ".join(f"{r[m][1][0]:.3f}" for m in r) + " |")
    for kinds in (("confident", "faint"), ("confident", "speck"), ("faint", "speck")):
        rng = np.random.default_rng(2)
        maps = [pruning_map(rng, kinds, True) for _ in range(n)]
        r = pruning_scores(maps, True, draws, rng)
        for c in (1, 2):
            print(f"| multiclass {kinds[0]} + {kinds[1]} | {c} ({kinds[c - 1]}) | "
                  + " | ".join(f"{r[m][0][c]:.3f}" for m in r) + " | "
                  + " | ".join(f"{r[m][1][c]:.3f}" for m in r) + " |")


def section_pruning_scenarios(draws=4000):
    print("\n## The two pruning scenarios of the reference notes (Monte-Carlo, truth drawn from p)\n")
    rng = np.random.default_rng(3)
    p = torch.full((1, 100), 0.45)
    r = pruning_scores([p], False, draws, rng)
    print("100 voxels at p = 0.45 (multilabel): mean Dice "
          + ", ".join(f"{m}: {r[m][0][0]:.3f}" for m in r))
    q = torch.zeros(3, 16, 16, 16)
    q[0], q[1], q[2] = 0.98, 0.01, 0.01
    q[:, :4, :8, :8] = torch.tensor([0.30, 0.25, 0.45])[:, None, None, None]  # 256 voxels
    r = pruning_scores([q], True, draws // 4, rng)
    print("256-voxel region (0.30, 0.25, 0.45) inside 4096 voxels of (0.98, 0.01, 0.01) (multiclass): Dice class "
          "1 / class 2: " + ", ".join(f"{m}: {r[m][0][1]:.3f} / {r[m][0][2]:.3f}" for m in r))


def section_pruning_demo(Z, Y, title):
    print(f"\n## Pruning on the demo UNet: {title}\n")
    print("| pruning | organ Dice | lesion Dice | lesion IE=True | empty lesion masks | lesion-free cases |")
    print("|---|---|---|---|---|---|")
    for pp in ("argmax", *PRUNING):
        d, dn, empty = [], [], 0
        for z, y in zip(Z, Y):
            p = torch.softmax(z, 0)[None]
            lab = p.argmax(1) if pp == "argmax" else decide(p, pp)
            vals = dice_per_class(lab[0], y[0], [1, 2])
            d.append(vals)
            dn.append(vals[1] if bool((y == 2).any()) else np.nan)
            empty += int(not bool((lab == 2).any()))
        d = np.asarray(d)
        print(f"| {pp} | {d[:, 0].mean():.4f} | {d[:, 1].mean():.4f} | {np.nanmean(dn):.4f} | {empty} | "
              f"{sum(int(not bool((y == 2).any())) for y in Y)}/{len(Y)} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("temperature", "synthetic", "demo", "fog", "pruning"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def run(name):
        return args.only in (None, name)

    if run("temperature"):
        section_temperature()
    if run("synthetic"):
        section_synthetic_dice()
    if run("fog"):
        section_user_case()
    if run("demo") or run("pruning"):
        Z, Y = demo_logits(range(1_000_000, 1_000_024))
    if run("demo"):
        Zc, Yc = demo_logits(range(2_000_000, 2_000_032))
        section_demo_dice(Z, Y, Zc, Yc)
    if run("pruning"):
        section_pruning_synthetic()
        section_pruning_scenarios()
        section_pruning_demo(Z, Y, "24 held-out demo phantoms (1-3 lesions each)")
        Z0, Y0 = demo_logits(range(3_000_000, 3_000_024), num_lesions=(0, 2))
        section_pruning_demo(Z0, Y0, "24 phantoms with 0-2 lesions (seeds 3 000 000+)")
    print(f"\n(total {time.time() - t0:.0f} s, {args.threads} thread(s), Guard() = {Guard()})")


if __name__ == "__main__":
    main()
