"""Time RankSEG-BA / TRNA / BA+TRNA / exact of rankseg_monai against rankseg 0.0.8 (CPU).

    python benchmarks/bench_jmlr.py [--repeats 15] [--ref-repeats 5] [--threads N] [--large]

Inputs are float32 blob-shaped probability volumes (a noisy logistic ball, seed fixed).  For every case it prints
the median wall time of ``rankseg_monai.functional.rankseg`` (the whole entry: value checks, statistics, solver,
mask) and of the solver alone (``ba_thresholds`` / ``exact_thresholds``), the median of rankseg 0.0.8's
``rankseg.functional.rankseg``, the ratio, and whether the decisions are equal: to 0.0.8 on the same float32
tensor and to 0.0.8 on its float64 copy (our arithmetic is float64; 0.0.8 computes in the input's precision).
Where a decision differs, the selected volumes and the score gap by 0.0.8's objective are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from rankseg_monai.functional import rankseg
from rankseg_monai.solvers import ba as ba_mod
from rankseg_monai.solvers import exact as exact_mod
from rankseg_monai.solvers.rma import row_statistics


def blob(shape, seed=0, sharp=12.0, noise=1.0, radius=0.5):
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape], indexing="ij")
    r = sum(z**2 for z in grids).sqrt()
    logit = (radius - r) * sharp + torch.randn(tuple(shape), generator=g, dtype=torch.float64) * noise
    return torch.sigmoid(logit)[None, None].float()


def fmt_time(seconds):
    """Seconds as a short string: milliseconds below one second."""
    return f"{seconds * 1e3:.2f}ms" if seconds < 1 else f"{seconds:.2f}s"


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def row_scores(x, solver, smooth=0.0, eps=1e-4):
    """Our float64 scores of 0.0.8's objective for every tau up to the search bound (single-row input)."""
    p = ba_mod.row_values(x.flatten())
    mu, n = float(p.astype(np.float64).sum()), p.size
    var, m3 = ba_mod.row_moments(p)
    var_eps = ba_mod._working_eps(x.dtype)
    head, up, at_b = ba_mod.sorted_head(p, mu, smooth)
    U, _ = ba_mod._boundaries(head, up, at_b)
    scale, lq, uq, pmf = ba_mod.refined_normal_law(n, mu, var, m3, var_eps, eps)
    if solver == "ba+trna":
        solver = "ba" if 1.0 / max(scale, 1e-8) < 0.2 else "trna"
    if solver == "ba":
        return ba_mod._ba_scores(head, U, pmf, lq, smooth, smooth >= 1)
    return ba_mod._trna_scores(head, U, pmf, lq, uq, mu, var, m3, var_eps, smooth, smooth >= 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of ours (median)")
    parser.add_argument("--ref-repeats", type=int, default=5, help="timed runs of rankseg 0.0.8 (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--large", action="store_true",
                        help="add BA on 128^3 and 192^3 (0.0.8 takes ~3 s and ~30 s there: timed once)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from rankseg.functional import rankseg as ref

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, CPU")
    header = (f"{'case':<34}{'ours (entry)':>13}{'ours (solver)':>14}{'0.0.8':>10}{'ratio':>8}{'ratio solver':>13}"
              f"  equal f32 / f64-copy")
    print(header)
    print("-" * len(header))
    cases = [
        ("TRNA (1,1,32,32,32)", "trna", blob((32, 32, 32), seed=1)),
        ("BA (1,1,64,64,64)", "ba", blob((64, 64, 64), seed=1)),
        ("BA+TRNA (1,1,64,64,64)", "ba+trna", blob((64, 64, 64), seed=1)),
        ("BA+TRNA (1,1,32,32,32) sharp", "ba+trna", blob((32, 32, 32), seed=2, sharp=200.0, noise=0.1, radius=0.25)),
    ]
    if args.large:
        cases += [(f"BA (1,1,{s},{s},{s})", "ba", blob((s, s, s), seed=1, radius=0.3)) for s in (128, 192)]
    for name, solver, x in cases:
        ref_repeats = 1 if x.numel() > 64**3 else args.ref_repeats
        kw = dict(metric="dice", output_mode="multilabel", solver=solver)
        rankseg(x, **kw)  # warm-up
        t_ours, mine = median_time(lambda x=x, kw=kw: rankseg(x, **kw), args.repeats)
        stats = row_statistics(x.flatten(2))
        active = stats.vmax > 0.5
        t_solver, _ = median_time(
            lambda x=x, s=stats, a=active, v=solver: ba_mod.ba_thresholds(x.flatten(2), s, v, 0.0, 1e-4, a),
            args.repeats,
        )
        t_ref, theirs = median_time(lambda x=x, kw=kw: ref(x, **kw), ref_repeats)
        theirs64 = ref(x.double(), **kw)
        eq32, eq64 = torch.equal(mine, theirs), torch.equal(mine, theirs64)
        p = x.flatten().double().numpy()
        sigma = float(np.sqrt(np.sum(p * (1 - p))))
        label = f"{name} s={sigma:.0f}"
        print(f"{label:<34}{fmt_time(t_ours):>13}{fmt_time(t_solver):>14}{fmt_time(t_ref):>10}{t_ref / t_ours:>7.1f}x"
              f"{t_ref / t_solver:>12.1f}x  {eq32} / {eq64}")
        if not (eq32 and eq64):
            scores = row_scores(x, solver)
            k_ours, k_ref, k_ref64 = int(mine.sum()), int(theirs.sum()), int(theirs64.sum())
            gap = scores[k_ours] - scores[k_ref] if k_ref < scores.size else float("nan")
            print(f"{'':<34}volumes ours {k_ours}, 0.0.8 f32 {k_ref}, 0.0.8 f64 {k_ref64}; "
                  f"score(ours) - score(0.0.8 f32) = {gap:.3e} (float64 objective)")

    # exact on a 2D patch: no exact solver in 0.0.8; compare with its TRNA (time and exact expected Dice)
    x = blob((48, 48), seed=3, sharp=6.0, noise=1.5)
    kw = dict(metric="dice", output_mode="multilabel")
    rankseg(x, solver="exact", **kw)
    t_ours, mine = median_time(lambda: rankseg(x, solver="exact", **kw), args.repeats)
    stats = row_statistics(x.flatten(2))
    t_solver, _ = median_time(
        lambda: exact_mod.exact_thresholds(x.flatten(2), stats, 0.0, stats.vmax > 0.5), args.repeats)
    t_ref, theirs = median_time(lambda: ref(x, solver="trna", **kw), args.ref_repeats)
    trna = rankseg(x, solver="trna", **kw)
    p = x.flatten().double().numpy()
    desc = np.sort(p[p > 0])[::-1]
    scores = exact_mod.exact_scores(desc, 0.0, p.size)
    e = {k: scores[int(m.sum())] for k, m in (("exact", mine), ("trna", trna), ("ref", theirs))}
    label = "exact 2D 48x48 (vs 0.0.8 TRNA)"
    print(f"{label:<34}{fmt_time(t_ours):>13}{fmt_time(t_solver):>14}{fmt_time(t_ref):>10}{t_ref / t_ours:>7.1f}x"
          f"{t_ref / t_solver:>12.1f}x  volumes exact {int(mine.sum())}, TRNA ours {int(trna.sum())}, "
          f"0.0.8 {int(theirs.sum())}")
    print(f"{'':<34}E[Dice]: exact {e['exact']:.10f}, TRNA ours {e['trna']:.10f}, 0.0.8 TRNA {e['ref']:.10f}")


if __name__ == "__main__":
    main()
