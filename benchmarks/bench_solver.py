"""Time and peak memory of RankSEG-RMA: ours vs argmax vs the authors' rankseg 0.0.8, in one run.

Each (shape, method) runs in a fresh subprocess that loads the same saved softmax volume, so the peak
resident memory (ru_maxrss, CPU) or torch.cuda.max_memory_allocated (GPU) belongs to that method alone.
Prints median wall time over ``--repeat`` warm runs, cold (first-call) time, peak extra memory over the
loaded input, and the ratios.  Usage::

    python benchmarks/bench_solver.py                 # CPU, the three default shapes
    python benchmarks/bench_solver.py --device cuda   # GPU (also checks CUDA result == CPU result)
    python benchmarks/bench_solver.py --shapes 1,3,64,64,32 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_SHAPES = ["1,3,128,128,64", "1,3,256,256,128", "1,14,128,128,128"]
METHODS = ["argmax", "ours", "ours_multilabel", "rankseg008", "rankseg008_screening"]


def _child(path: str, method: str, device: str, repeat: int, threads: int) -> None:
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(path))
    if device != "cpu":
        x = x.to(device)

    if method == "argmax":
        def fn():
            return x.argmax(1)
    elif method.startswith("ours"):
        from rankseg_monai.functional import rankseg

        mode = "multilabel" if method == "ours_multilabel" else "multiclass"

        def fn():
            return rankseg(x, output_mode=mode)
    else:
        from rankseg.functional import rankseg as ref

        kw = {"safe_screening": True} if method.endswith("screening") else {}

        def fn():
            return ref(x, **kw)

    # a tiny warm-up call first, so that imports, thread pools and lazy initialisation are not counted as the
    # method's memory; then the baseline
    full, x = x, torch.softmax(torch.rand((1, x.shape[1], 8, 8, 8), device=x.device), 1)
    fn()
    x = full
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base_gpu = torch.cuda.memory_allocated() if device != "cpu" else 0

    def timed():
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    cold, out = timed()
    ours_out = out if method == "ours" and device != "cpu" else None
    del out
    times = [timed()[0] for _ in range(repeat)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_gpu = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20 if device != "cpu" else 0.0
    res = {
        "cold": cold,
        "median": statistics.median(times),
        "extra_rss_mb": peak_rss - base_rss,
        "extra_gpu_mb": peak_gpu,
        "input_mb": x.numel() * x.element_size() / 2**20,
    }
    if method == "ours" and device != "cpu":
        from rankseg_monai.functional import rankseg

        res["cuda_equals_cpu"] = bool(torch.equal(ours_out.cpu(), rankseg(x.cpu())))
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.device, args.repeat, args.threads)
        return

    import numpy as np
    import torch

    print(f"torch {torch.__version__}, device {args.device}, threads {args.threads}, repeat {args.repeat}")
    if args.device != "cpu":
        print("gpu:", torch.cuda.get_device_name(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.shapes:
            shape = tuple(int(s) for s in spec.split(","))
            g = torch.Generator().manual_seed(0)
            x = torch.softmax(torch.randn(shape, generator=g) * 3.0, dim=1).numpy()
            path = os.path.join(tmp, "probs.npy")
            np.save(path, x)
            del x
            res = {}
            for method in args.methods:
                cmd = [sys.executable, __file__, "--device", args.device, "--repeat", str(args.repeat),
                       "--threads", str(args.threads), "--child", path, method]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"{spec} {method}: failed\n{proc.stderr[-2000:]}")
                    continue
                res[method] = json.loads(line[0][7:])
            rows.append((spec, res))
            _print_shape(spec, res, args.device)
    print("\nSummary (median seconds; ratio = time / argmax; speed-up = rankseg 0.0.8 time / ours):")
    for spec, res in rows:
        if "ours" in res and "argmax" in res:
            line = f"  {spec:>18}: ours/argmax {res['ours']['median'] / res['argmax']['median']:.2f}x"
            for ref in ("rankseg008", "rankseg008_screening"):
                if ref in res:
                    line += f", {ref} / ours {res[ref]['median'] / res['ours']['median']:.1f}x"
            line += f", ours peak extra {res['ours']['extra_rss_mb']:.0f} MB"
            line += f" ({res['ours']['extra_rss_mb'] / res['ours']['input_mb']:.2f}x input)"
            print(line)


def _print_shape(spec, res, device):
    print(f"\nshape ({spec})")
    mem = "extra_gpu_mb" if device != "cpu" else "extra_rss_mb"
    print(f"  {'method':24} {'median s':>9} {'cold s':>8} {'peak extra MB':>14} {'x input':>8}")
    for method, r in res.items():
        extra = r[mem]
        print(f"  {method:24} {r['median']:9.3f} {r['cold']:8.3f} {extra:14.0f} {extra / r['input_mb']:8.2f}"
              + (f"  cuda==cpu: {r['cuda_equals_cpu']}" if "cuda_equals_cpu" in r else ""))


if __name__ == "__main__":
    main()
