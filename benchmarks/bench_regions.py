"""Region-aware RankSEG: time and passes against argmax and plain multiclass RankSEG, and the summed objective.

Volumes: LiTS-like softmax (3 classes, regions liver {1, 2} and tumour {2}) and BraTS-like sigmoid region
probabilities (3 channels WT, TC, ET), smooth blobs of several sizes.  Each method runs in this process, median of
``--repeat`` warm runs; "passes" counts the reads of a volume-sized row (one row of ``N`` voxels = 1/R of a pass
over the region probabilities) made by the solver's chunk loops (a few more
elementwise passes build masks outside them).

    python benchmarks/bench_regions.py                 # ~1 min on 2 cores
    python benchmarks/bench_regions.py --shape 256 256 128 --repeat 3
    python benchmarks/bench_regions.py --brute-force 200   # how often tiny cases reach the global optimum (~2 min)
    python benchmarks/bench_regions.py --memory --threads 1 --shape 256 256 128 --kinds tissue lits-ct
                                                        # peak memory above the input, one fresh process per volume
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys

import numpy as np
import torch
from _bench_util import emit_result, median_time, peak_rss_mb, reset_peak_rss, rss_mb, run_child

from rankseg_monai.functional import rankseg
from rankseg_monai.solvers import _stream, regions, rma
from rankseg_monai.solvers.regions import RegionTree, nodes_from_labels, region_objective, solve_regions

LITS, BRATS = {"liver": [1, 2], "tumour": [2]}, {"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}
#: volume kind -> (regions, region probabilities?)
KINDS = {"lits": (LITS, False), "brats": (BRATS, True), "lits-ct": (LITS, False), "brats-mri": (BRATS, True),
         "tissue": ({"brain": [1, 2, 3], "tissue": [2, 3], "white_matter": [3]}, False)}


def _ellipsoid_distance(shape, centre, radii) -> torch.Tensor:
    """Normalised distance to an ellipsoid's centre (1 on its surface)."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return torch.sqrt(sum(((g - c * s) / (r * s)) ** 2 for g, c, r, s in zip(grids, centre, radii, shape)))


def volume(kind: str, shape, seed: int = 0) -> torch.Tensor:
    """``(1, 3, *shape)`` probabilities.  ``lits`` (softmax classes) and ``brats`` (sigmoid regions): smooth noise,
    every structure spread over half the volume and uncertain almost everywhere (the hard case).  ``lits-ct`` and
    ``brats-mri``: an organ (about 8% of the box) holding three tumours, or a whole tumour (about 4%) holding a
    core and an enhancing part, with soft boundaries and noise, confident background elsewhere (as a scan)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((1, 3, *shape), generator=g)
    z = torch.nn.functional.avg_pool3d(z, 9, 1, 4) * 30
    if kind == "lits":
        z[:, 0] += 1.0
        return torch.softmax(z, 1)
    if kind == "brats":
        z[:, 1] -= 1.0
        z[:, 2] -= 2.0
        return torch.sigmoid(z)
    noise = z / 30 * 3 + 0.3 * torch.randn(z.shape, generator=g)  # smooth (std about 0.3) and voxel noise
    if kind == "tissue":
        return tissue_volume(shape, noise)
    if kind == "lits-ct":
        organ = 8.0 * (1.0 - _ellipsoid_distance(shape, (0.45, 0.5, 0.5), (0.28, 0.22, 0.3)))
        tumour = torch.full(shape, -1e4)
        for centre, radius in (((0.4, 0.45, 0.45), 0.06), ((0.5, 0.6, 0.55), 0.04), ((0.55, 0.4, 0.6), 0.025)):
            tumour = torch.maximum(tumour, 6.0 * (1.0 - _ellipsoid_distance(shape, centre, (radius,) * 3)))
        logits = torch.stack([torch.zeros(shape), organ, organ + tumour - 1.0])[None] + noise
        return torch.softmax(logits, 1)
    whole = 8.0 * (1.0 - _ellipsoid_distance(shape, (0.5, 0.45, 0.5), (0.22, 0.2, 0.2)))
    core = 7.0 * (1.0 - _ellipsoid_distance(shape, (0.5, 0.45, 0.5), (0.13, 0.12, 0.12)))
    enhancing = 6.0 * (1.0 - _ellipsoid_distance(shape, (0.52, 0.47, 0.5), (0.08, 0.08, 0.08)))
    logits = torch.stack([whole, torch.minimum(whole, core), torch.minimum(core, enhancing)])[None] + noise
    return torch.sigmoid(logits)


def tissue_volume(shape, noise: torch.Tensor) -> torch.Tensor:
    """``(1, 4, *shape)`` softmax over background, CSF, grey and white matter: a brain over about 45% of the box,
    its three nested regions (brain ``{1, 2, 3}``, tissue ``{2, 3}``, white matter ``{3}``) with soft boundaries
    (a few voxels wide, wavy) and noise, the model of a brain-tissue network's output: dense regions."""
    dist = _ellipsoid_distance(shape, (0.5, 0.5, 0.5), (0.47, 0.47, 0.47))
    wave = noise[0, 0] / 12  # smooth, std about 0.03 of the radius: wavy tissue boundaries
    steep = 60.0 / max(shape)  # logits per voxel across a boundary (about 2 voxels per logit unit at 128)
    brain = steep * max(shape) * 0.47 * (1.0 - dist)
    tissue = steep * max(shape) * 0.47 * (0.85 + wave - dist)
    white = steep * max(shape) * 0.47 * (0.6 + 2 * wave - dist)
    logits = torch.stack([torch.zeros(shape), brain, brain + tissue, brain + tissue + white])[None]
    logits[:, 1:] += noise[:, :3]
    return torch.softmax(logits, 1)


class PassCounter:
    """Counts the voxel values read by the solvers' chunk loops: ``_stream.iter_chunks`` (statistics, bands,
    masks) and the region passes' ``regions._chunks`` (sums, joint moves; counted as one value per voxel and row)."""

    def __init__(self) -> None:
        self.values = 0
        self._saved = (_stream.iter_chunks, rma.iter_chunks, regions._chunks)

    def __enter__(self) -> PassCounter:
        orig_iter, _, orig_chunks = self._saved

        def iter_chunks(flat, *args, **kwargs):
            for start, stop, chunk in orig_iter(flat, *args, **kwargs):
                self.values += chunk.numel()
                yield start, stop, chunk

        def chunks(n, *args):
            for a, b in orig_chunks(n, *args):
                self.values += b - a
                yield a, b

        _stream.iter_chunks = rma.iter_chunks = iter_chunks
        regions._chunks = chunks
        return self

    def __exit__(self, *exc) -> None:
        _stream.iter_chunks, rma.iter_chunks, regions._chunks = self._saved


def _rma(metric, S, n, mu, s):
    if metric == "dice":
        return 2.0 * S / (mu + n + 1.0 + s) + (s / (mu + n + s) if s > 0 else 0.0)
    d = mu - S + n + s
    return np.where(d > 0, (S + s) / np.where(d > 0, d, 1.0), 0.0)


def brute_force(trials: int) -> None:
    """Tiny cases (3-6 voxels): the solver's summed objective against the best over every node map."""
    specs = {"LiTS chain": ({"liver": [1, 2], "tumour": [2]}, 3),
             "BraTS chain": ({"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}, 4),
             "tree": ({"liver": [1, 2, 3], "tumour": [2], "vessel": [3]}, 4)}
    settings = [("dice", 0.0), ("iou", 0.0), ("dice", 1.0)]
    rng = np.random.default_rng(0)
    print(f"{'regions':>12} {'input':>15} {'global optimum':>15} {'worst shortfall':>16}")
    for name, (spec, num_classes) in specs.items():
        tree = RegionTree.parse(spec)
        num_regions = len(tree)
        member = np.array([[False] * num_regions] + [[j in tree.subtree(r) for r in range(num_regions)]
                                                     for j in range(num_regions)])
        for region_probs in (False, True):
            hits, worst = 0, 0.0
            for trial in range(trials):
                metric, s = settings[trial % 3]
                n = int(rng.integers(3, 7))
                if region_probs:
                    p = (rng.uniform(0, 1, (num_regions, n)) ** rng.uniform(0.5, 3)).astype(np.float32)
                else:
                    z = rng.normal(0, 2, (num_classes, n))
                    p = (np.exp(z) / np.exp(z).sum(0)).astype(np.float32)
                nodes, details = solve_regions(torch.from_numpy(p)[None], tree, metric, s, None,
                                               region_probs=region_probs, return_details=True)
                x = torch.from_numpy(p)[None]
                q = (x if region_probs else regions.region_probabilities(x, tree))[0].double().numpy()
                maps = np.array(list(itertools.product(range(num_regions + 1), repeat=n)))
                inside = member[maps]  # (K, N, R)
                values = _rma(metric, np.einsum("knr,rn->kr", inside, q), inside.sum(1), q.sum(1)[None], s).sum(1)
                got = float(_rma(metric, (member[nodes[0].numpy()].T * q).sum(1), member[nodes[0].numpy()].sum(0),
                                 q.sum(1), s).sum())
                hits += got >= values.max() - 1e-12
                worst = max(worst, float(values.max()) - got)
            print(f"{name:>12} {'sigmoid regions' if region_probs else 'softmax classes':>15} "
                  f"{f'{hits}/{trials}':>15} {worst:>16.4f}")


def memory_child(kind: str, shape, threads: int, method: str) -> None:
    """One region decision (or ``x.argmax(1)``, ``method="argmax"``) in this (fresh) process: the resident peak
    above the resident size with the input."""
    torch.set_num_threads(threads)
    spec, region_probs = KINDS[kind]
    x = volume(kind, shape)
    gc.collect()
    base = rss_mb()
    if not reset_peak_rss():
        emit_result({"error": "the kernel does not allow resetting the resident high-water mark"})
        return
    labels = {"label_dtype": torch.uint8} if method == "regions-uint8" else {}  # the int64 map is 0.5-0.67x input
    call = ((lambda: x.argmax(1)) if method == "argmax" else
            (lambda: rankseg(x, regions=spec, region_probs=region_probs, pruning_prob="auto", **labels)))
    wall_cpu = median_time(call, 1, warm=False)
    emit_result({"input_mb": x.numel() * x.element_size() / 2**20, "peak_above_mb": peak_rss_mb() - base,
                 "cpu_s": wall_cpu[1]})


def memory(args) -> None:
    """Two fresh processes per volume: glibc's default allocator (what a user's process holds: freed blocks below
    its mmap threshold stay resident for reuse, so the peak varies from run to run) and, as the steady measure of
    what the solver's tensors hold, every allocation above 64 KiB mapped and unmapped (``MALLOC_MMAP_THRESHOLD_``;
    slower, so its CPU time is not the solver's)."""
    print(f"peak resident memory above the input, one fresh process per volume, shape {tuple(args.shape)}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':>9} {'method':>15} {'input MB':>9} {'peak above (default malloc)':>28} "
          f"{'peak above (tensors)':>21} {'CPU s':>6}")
    methods = {"region RankSEG": "regions", "region, uint8": "regions-uint8", "argmax": "argmax"}
    for kind, method in itertools.product(args.kinds, methods):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", kind, "--threads", str(args.threads),
               "--shape", *map(str, args.shape), "--memory-method", methods[method]]
        results = []
        for extra in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
            res, err = run_child(cmd, env={**os.environ, **extra})
            if res is None or "error" in res:
                print(f"{kind:>9} {method:>15}: failed: {err or res['error']}")
                break
            results.append(res)
        else:
            size = results[0]["input_mb"]
            cells = [f"{r['peak_above_mb']:.0f} MB ({r['peak_above_mb'] / size:.2f}x)" for r in results]
            print(f"{kind:>9} {method:>15} {size:>9.0f} {cells[0]:>28} {cells[1]:>21} {results[0]['cpu_s']:>6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 128, 64))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS), metavar="KIND",
                    help="volumes (default: all): " + " ".join(KINDS))
    ap.add_argument("--brute-force", type=int, default=0, metavar="TRIALS",
                    help="instead: tiny cases against the best of every label map")
    ap.add_argument("--memory", action="store_true",
                    help="instead: peak memory of one region decision above the input, a fresh process per volume")
    ap.add_argument("--memory-child", metavar="KIND", help=argparse.SUPPRESS)
    ap.add_argument("--memory-method", default="regions", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, tuple(args.shape), args.threads, args.memory_method)
        return
    if args.memory:
        memory(args)
        return
    torch.set_num_threads(args.threads)
    if args.brute_force:
        brute_force(args.brute_force)
        return
    shape = tuple(args.shape)
    n_vox = torch.Size(shape).numel()
    print(f"shape {shape} ({n_vox / 1e6:.2f} Mvox), torch {torch.__version__}, {args.threads} threads, "
          f"median of {args.repeat} warm runs; wall and process CPU seconds (CPU time is steadier on a shared "
          f"machine; the ratio uses it)")
    print(f"{'case':>9} {'method':>24} {'wall s':>7} {'CPU s':>7} {'x argmax':>9} {'row reads / N':>14} "
          f"{'sweeps':>7} {'ascent on':>10} {'summed objective':>17}")
    for kind in args.kinds:
        spec, region_probs = KINDS[kind]
        x = volume(kind, shape)
        tree = RegionTree.parse(spec)
        num_classes = x.shape[1]
        flat = x.reshape(1, num_classes, -1)
        q = flat if region_probs else regions.region_probabilities(flat, tree)
        mu = q.double().sum(-1)
        t_arg = median_time(lambda x=x: x.argmax(1), args.repeat)
        rows = [("argmax" if not region_probs else "threshold 0.5 painted", t_arg, None, None, None,
                 nodes_from_labels(flat.argmax(1), tree, num_classes) if not region_probs
                 else regions.paint_nodes(q > 0.5, tree))]
        if not region_probs:
            t_mc = median_time(lambda x=x: rankseg(x, pruning_prob="auto"), args.repeat)
            labels = rankseg(x, pruning_prob="auto").reshape(1, -1)
            rows.append(("multiclass RankSEG", t_mc, None, None, None, nodes_from_labels(labels, tree, num_classes)))
        kw = dict(regions=spec, region_probs=region_probs, pruning_prob="auto")
        t_reg = median_time(lambda x=x, kw=kw: rankseg(x, **kw), args.repeat)
        with PassCounter() as counter:
            nodes, details = solve_regions(flat, tree, "dice", 0.0, None, region_probs=region_probs,
                                           return_details=True)
        rows.append(("region RankSEG", t_reg, counter.values / n_vox, details["sweeps"], details["compacted"][0],
                     nodes))
        for name, (wall, cpu), reads, sweeps, part, nd in rows:
            obj = float(region_objective(q, nd, tree, mu, "dice", 0.0).sum())
            print(f"{kind:>9} {name:>24} {wall:>7.3f} {cpu:>7.3f} {cpu / t_arg[1]:>9.2f} "
                  f"{'-' if reads is None else f'{reads:.1f}':>14} {'-' if sweeps is None else sweeps:>7} "
                  f"{'-' if part is None else f'{part:.1%}':>10} {obj:>17.6f}")


if __name__ == "__main__":
    main()
