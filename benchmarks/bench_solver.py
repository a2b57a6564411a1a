"""Time and peak memory of RankSEG-RMA against argmax, MONAI's ``AsDiscrete`` and the authors' rankseg 0.0.8.

Each (shape, method) runs in a fresh subprocess that loads the same saved volume, so the peak resident memory
(CPU) or ``torch.cuda.max_memory_allocated`` (GPU) belongs to that method alone.  Prints the median wall time of
``--repeat`` warm runs, the cold (first) call, the peak extra memory above the loaded input, and the ratios that
issue 15 sets targets for:

* ``functional / argmax``: ``rankseg_monai.functional.rankseg(x)`` (its defaults: ``pruning_prob=0.5``, int64
  labels) against ``x.argmax(1)``;
* ``transform / AsDiscrete``: ``RankSEG()(x[0])`` (the drop-in transform with its defaults: ``pruning_prob="auto"``,
  float32 labels) against ``AsDiscrete(argmax=True)(x[0])``;
* ``0.0.8 / functional``: how much faster than the authors' package (default and ``safe_screening=True``).

Volumes (``--volume-kind``): ``blobs`` (default; ``benchmarks/_phantoms.py``: a softmax phantom with blobs of many
sizes and most classes absent from most voxels, like a multi-organ network's output) or ``noise``
(``softmax(3 randn)``, every voxel uncertain: the worst case for the band; the volume of earlier sessions).
Usage::

    python benchmarks/bench_solver.py                   # CPU: C = 3, 14, 105 (about 4 min on 2 cores)
    python benchmarks/bench_solver.py --threads 1       # steadier on a shared machine
    python benchmarks/bench_solver.py --device cuda     # GPU (also checks CUDA result == CPU result)
    python benchmarks/bench_solver.py --shapes 1,3,64,64,32 --methods argmax functional --repeat 5
    python benchmarks/bench_solver.py --busy 0 2 8 --shapes 1,14,128,128,128   # beside 0, 2, 8 busy processes

``--busy N [N ...]`` runs the comparison once per count with N busy-loop processes beside it (started before,
killed after), and prints each method's wall and CPU time relative to its own time with no busy process.  The
``*_all_threads`` methods are the solver without its thread choice (``solvers/_threads.py``: every torch thread
even when other processes hold the cores), the code before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import baseline_method, peak_rss_mb, reset_peak_rss, rss_mb, run_child  # noqa: E402

DEFAULT_SHAPES = ["1,3,256,256,128", "1,14,128,128,128", "1,105,96,96,96"]
METHODS = ["argmax", "asdiscrete", "functional", "transform", "functional_multilabel", "rankseg008",
           "rankseg008_screening", "functional_all_threads", "transform_all_threads"]
#: the default methods of ``--busy``: the baselines, and the solver with and without its thread choice
BUSY_METHODS = ["argmax", "asdiscrete", "functional", "transform", "functional_all_threads", "transform_all_threads"]
#: issue 15's targets per class count: (functional / argmax, transform / AsDiscrete)
TARGETS = {3: (1.0, None), 14: (1.2, 1.5), 105: (2.0, 2.5)}


def make_volume(shape: tuple[int, ...], kind: str, seed: int = 0):
    import torch

    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return torch.softmax(torch.randn(shape, generator=g) * 3.0, dim=1)
    from _phantoms import blob_phantom

    return blob_phantom(shape[1], tuple(shape[2:]), seed=seed, batch=shape[0])


def _make_fn(method: str, x):
    if method.endswith("_all_threads"):  # the solver as before its thread choice: every torch thread, always
        from rankseg_monai.solvers import _threads

        _threads.free_cores, _threads.MIN_PARALLEL_VALUES = (lambda: None), 0
        method = method[: -len("_all_threads")]
    fn = baseline_method(method, x)
    if fn is not None:
        return fn
    from rankseg_monai.functional import rankseg

    mode = "multilabel" if method == "functional_multilabel" else "multiclass"
    return lambda: rankseg(x, output_mode=mode)


def _child(path: str, method: str, device: str, repeat: int, threads: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    cuda = device != "cpu"
    x = torch.from_numpy(np.load(path))
    if cuda:
        x = x.to(device)
    # a tiny warm-up call first, so that imports, thread pools and lazy initialisation are not counted
    small = torch.softmax(torch.rand((1, x.shape[1], 8, 8, 8), device=x.device), 1).to(x.dtype)
    _make_fn(method, small)()
    fn = _make_fn(method, x)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if cuda else 0
    base_rss = rss_mb()
    if not reset_peak_rss():
        base_rss = peak_rss_mb()

    def timed():
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, out

    cold, _, out = timed()
    peak_cold = peak_rss_mb()
    check = out if method == "functional" and cuda else None
    del out
    runs = [timed()[:2] for _ in range(repeat)]
    times = [r[0] for r in runs]
    res = {
        "cold": cold,
        "median": statistics.median(times),
        "cpu": statistics.median(r[1] for r in runs),
        "times": times,
        "extra_rss_mb": max(0.0, peak_cold - base_rss),
        "extra_gpu_mb": (torch.cuda.max_memory_allocated() - base_gpu) / 2**20 if cuda else 0.0,
        "input_mb": x.numel() * x.element_size() / 2**20,
    }
    if check is not None:
        from rankseg_monai.functional import rankseg

        res["cuda_equals_cpu"] = bool(torch.equal(check.cpu(), rankseg(x.cpu())))
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS, metavar="METHOD",
                    help="default: " + " ".join(METHODS))
    ap.add_argument("--volume-kind", choices=["blobs", "noise"], default="blobs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default=None,
                    help="set OMP_WAIT_POLICY in the children (default: inherit). PASSIVE keeps several threads fast "
                    "on a machine shared with other jobs (docs/solvers.md)")
    ap.add_argument("--busy", type=int, nargs="*", default=None, metavar="N",
                    help="run the comparison beside N busy-loop processes, once per N (e.g. 0 2 8); default methods "
                    + " ".join(BUSY_METHODS))
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.device, args.repeat, args.threads)
        return

    if args.busy is not None:
        if args.methods == METHODS:
            args.methods = BUSY_METHODS
        _busy_main(args)
        return
    _run_all(args)


def _busy_loops(n: int) -> list:
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _busy_main(args) -> None:
    """The comparison beside 0, 2, ... busy processes; each method's times relative to its quiet ones."""
    runs = {}
    for n in args.busy:
        procs = _busy_loops(n)
        try:
            time.sleep(0.5 if n else 0.0)
            print(f"\n===== {n} busy processes =====")
            runs[n] = _run_all(args, quiet_summary=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    ref = 0 if 0 in runs else args.busy[0]
    print(f"\nSlow-down beside N busy processes (each method's time / its time with {ref} busy: wall, CPU; the "
          "load average while each ran):")
    for spec, _, res0 in runs[ref]["rows"]:
        print(f"  shape ({spec})")
        heads = [f"{n} busy (load {runs[n]['load']:.1f})" for n in runs]
        print(f"    {'method':24} " + " ".join(f"{h:>26}" for h in heads))
        for method in res0:
            cells = []
            for n in runs:
                res = {sp: r for sp, _, r in runs[n]["rows"]}[spec]
                if method not in res:
                    cells.append(f"{'-':>26}")
                    continue
                r = res[method]
                cell = (f"{r['median']:.3f} s {r['median'] / res0[method]['median']:.2f}x, "
                        f"{r['cpu'] / res0[method]['cpu']:.2f}x")
                cells.append(f"{cell:>26}")
            print(f"    {method:24} " + " ".join(cells))


def _run_all(args, quiet_summary: bool = False) -> dict:
    import numpy as np
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    policy = args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, repeat {args.repeat}, "
          f"{args.volume_kind} volumes, OMP_WAIT_POLICY {policy}, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")
    if args.device != "cpu":
        print("gpu:", torch.cuda.get_device_name(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.shapes:
            shape = tuple(int(s) for s in spec.split(","))
            path = os.path.join(tmp, "probs.npy")
            np.save(path, make_volume(shape, args.volume_kind).numpy())
            res = {}
            for method in args.methods:
                cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--repeat",
                       str(args.repeat), "--threads", str(args.threads), "--child", path, method]
                env = None if args.omp_wait_policy is None else {**os.environ,
                                                                 "OMP_WAIT_POLICY": args.omp_wait_policy}
                r, err = run_child(cmd, env=env)
                if r is None:
                    print(f"{spec} {method}: failed\n{err}")
                    continue
                res[method] = r
            rows.append((spec, shape, res))
            _print_shape(spec, res, args.device)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not quiet_summary:
        _print_summary(rows)
        if args.device == "cpu":
            _print_summary(rows, "cpu")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "volume_kind": args.volume_kind, "device": args.device,
                       "rows": [{"shape": spec, "results": res} for spec, _, res in rows]}, f, indent=1)
    return {"rows": rows, "load": (load[0] + end_load) / 2}


def _print_shape(spec, res, device):
    print(f"\nshape ({spec})")
    mem = "extra_gpu_mb" if device != "cpu" else "extra_rss_mb"
    print(f"  {'method':24} {'median s':>9} {'cpu s':>7} {'cold s':>8} {'peak extra MB':>14} {'x input':>8}")
    for method, r in res.items():
        extra = r[mem]
        print(f"  {method:24} {r['median']:9.3f} {r['cpu']:7.3f} {r['cold']:8.3f} {extra:14.0f} "
              f"{extra / r['input_mb']:8.2f}"
              + (f"  cuda==cpu: {r['cuda_equals_cpu']}" if "cuda_equals_cpu" in r else ""))


def _ratio(res, a, b, key="median"):
    return res[a][key] / res[b][key] if a in res and b in res else None


def _print_summary(rows, key="median") -> None:
    what = "median wall times" if key == "median" else \
        "median process CPU times (all threads; steadier than wall time on a busy machine)"
    print(f"\nRatios of {what} (issue 15 targets in brackets):")
    print(f"  {'shape':>18} {'functional/argmax':>18} {'transform/AsDiscrete':>21} {'0.0.8/functional':>17} "
          f"{'0.0.8 screening/functional':>27}")
    for spec, shape, res in rows:
        f_t, t_t = TARGETS.get(shape[1], (None, None))
        cells = []
        for (a, b), target in ((("functional", "argmax"), f_t), (("transform", "asdiscrete"), t_t),
                               (("rankseg008", "functional"), None), (("rankseg008_screening", "functional"), None)):
            r = _ratio(res, a, b, key)
            cell = "-" if r is None else f"{r:.2f}x"
            if r is not None and target is not None:
                cell += f" [<={target}] " + ("ok" if r <= target else "MISSED")
            cells.append(cell)
        print(f"  {spec:>18} {cells[0]:>18} {cells[1]:>21} {cells[2]:>17} {cells[3]:>27}")


if __name__ == "__main__":
    main()
