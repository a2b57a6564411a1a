"""How time and peak memory of RankSEG grow with the volume: in-memory, chunked and GPU-streaming paths.

For each volume (C = 3 at 128^3, 192^3, 256^3 [512^3 with ``--big``]; C = 14 at 128^3; C = 105 at 64^3, 96^3) a
softmax volume is written once to a temporary ``.npy`` (float32, or float16 with ``--fp16``).  Kinds
(``--volume-kind``): ``smooth`` (C = 3 by default: class regions from random low-frequency cosines), ``blobs``
(C > 3 by default: ``benchmarks/_phantoms.py``, blobs of many sizes, most classes absent from most voxels, like a
multi-organ network's output), ``noise`` (every voxel uncertain).  Every (volume, path) pair then runs in a fresh
subprocess that loads the volume and measures:

* ``cold``: the first full-size call, ``warm``: the median wall time of ``--repeat`` further calls, ``cpu``: their
  process CPU time (with one thread, the steady measure on a shared machine; s/Mvox and the growth exponent use
  it on CPU paths);
* peak resident memory of the first full-size call *above the loaded input*: the high-water mark is reset after
  loading, imports and a warm-up call on a 16^3 crop (so code pages and lazy initialisation are not counted);
  on CUDA also the peak GPU memory allocated by the call.  The table is printed per volume, then a summary line
  per path (s/Mvox range, growth exponent of time vs voxels, peak extra as a multiple of the input).

Paths: ``argmax`` (``x.argmax(1)``), ``asdiscrete`` (MONAI's ``AsDiscrete(argmax=True)`` on the item ``x[0]``,
float32 labels), ``rankseg`` (``rankseg_monai.functional.rankseg(x)``, automatic chunks), ``rankseg_transform``
(``RankSEG()`` on ``x[0]``, the drop-in replacement with its defaults: ``pruning_prob="auto"``, float32 labels),
``rankseg_chunked`` (``rankseg(x, chunk_size=--chunk-size)``), ``rankseg_stream_cuda`` (``rankseg(x_cpu,
device="cuda")``: the volume stays on the CPU and is streamed through the GPU chunk by chunk), ``rankseg_cuda``
(volume resident on the GPU), ``rankseg008`` (the authors' ``rankseg.functional.rankseg`` 0.0.8).  CUDA paths
run only when CUDA is available.  Opt-in paths (``--methods``): ``rankseg_uint8`` (``label_dtype=torch.uint8``)
and ``rankseg_permuted``
(``rankseg(x.permute(0, 1, 4, 3, 2))``, a non-contiguous view as ``Invertd`` leaves after ``Orientationd``; the
labels are permuted back for the comparison).  A path whose estimated peak would not fit in the available memory
is skipped
(``--force`` runs it anyway).  After each volume the ratios of issue 15 are printed: ``rankseg / argmax``,
``rankseg_transform / asdiscrete`` and ``rankseg008 / rankseg`` (CPU time on 1-thread CPU paths).  Usage::

    python benchmarks/bench_scale.py                          # CPU: all default volumes (~10 min on 2 cores)
    python benchmarks/bench_scale.py --big                    # + C=3 512^3 (0.0.8 skipped unless it fits)
    python benchmarks/bench_scale.py --fp16 --volumes 3:128 3:256
    python benchmarks/bench_scale.py --methods rankseg rankseg_stream_cuda --volumes 3:256 3:512   # on a GPU box
    python benchmarks/bench_scale.py --methods asdiscrete rankseg_transform rankseg rankseg_uint8 --volumes 3:256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import (  # noqa: E402
    baseline_method,
    emit_result,
    mem_available_mb,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
    run_child,
    timed,
)

DEFAULT_VOLUMES = ["3:128", "3:192", "3:256", "14:128", "105:64", "105:96"]
BIG_VOLUMES = ["3:512"]
CPU_METHODS = ["argmax", "asdiscrete", "rankseg", "rankseg_transform", "rankseg_chunked", "rankseg008"]
#: issue 15's targets per class count: (rankseg / argmax, rankseg_transform / asdiscrete)
TARGETS = {3: (1.0, None), 14: (1.2, 1.5), 105: (2.0, 2.5)}
CUDA_METHODS = ["rankseg_stream_cuda", "rankseg_cuda"]
#: rough peak extra memory per MiB of float32-equivalent input, for the "does it fit" guard only
_EST_FACTOR = {"argmax": 1.0, "rankseg": 4.0, "rankseg_chunked": 4.0, "rankseg_stream_cuda": 2.0,
               "rankseg_cuda": 1.0, "rankseg008": 13.0, "rankseg_uint8": 4.0, "asdiscrete": 2.0,
               "rankseg_transform": 4.0, "rankseg_permuted": 5.0}


# ------------------------------------------------------------------------------------------------- volume


def write_volume(path: str, num_classes: int, size: int, dtype: str, kind: str, seed: int = 0) -> None:
    """Write a (1, C, S, S, S) softmax volume to ``path`` slab by slab.

    ``smooth``: logits are a few random low-frequency cosines per class (structure scales with the volume,
    so the fraction of uncertain voxels is about the same at every size) plus a little voxel noise: confident
    regions with soft boundaries, like a network's output.  ``noise``: ``softmax(3 * randn)`` i.i.d. per voxel
    (the input of ``bench_solver.py``; almost every voxel is uncertain, a worst case for the band).
    """
    import numpy as np
    import torch

    shape = (1, num_classes, size, size, size)
    if kind == "blobs":
        from _phantoms import blob_phantom

        np.save(path, blob_phantom(num_classes, (size, size, size), seed=seed).numpy().astype(dtype))
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    g = torch.Generator().manual_seed(seed)
    freq = (torch.rand((num_classes, 3, 3), generator=g, dtype=torch.float64) * 2 - 1) * 2 * math.pi * 2.5
    phase = torch.rand((num_classes, 3), generator=g, dtype=torch.float64) * 2 * math.pi
    coord = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    slab = max(1, (1 << 22) // (num_classes * size * size))
    for z0 in range(0, size, slab):
        z1 = min(size, z0 + slab)
        gz = torch.Generator().manual_seed(seed * 100_003 + z0 + 1)
        noise = torch.randn((num_classes, z1 - z0, size, size), generator=gz)
        if kind == "noise":
            logits = noise * 3.0
        else:
            z, y, x = coord[z0:z1, None, None], coord[None, :, None], coord[None, None, :]
            logits = noise * 0.5
            for c in range(num_classes):
                for k in range(3):
                    f = freq[c, k]
                    logits[c] += (2.0 * torch.cos(f[0] * z + f[1] * y + f[2] * x + phase[c, k])).float()
        out[0, :, z0:z1] = torch.softmax(logits, dim=0).numpy().astype(dtype)
    out.flush()
    del out


# -------------------------------------------------------------------------------------------------- child


def _make_fn(method: str, x, chunk_size: int):
    fn = baseline_method(method, x)
    if fn is not None:
        return fn
    import torch

    from rankseg_monai.functional import rankseg

    if method == "rankseg_permuted":
        view = x.permute(0, 1, 4, 3, 2)
        return lambda: rankseg(view).permute(0, 3, 2, 1)
    kwargs = {"rankseg": {}, "rankseg_cuda": {}, "rankseg_chunked": {"chunk_size": chunk_size},
              "rankseg_stream_cuda": {"device": "cuda"}, "rankseg_uint8": {"label_dtype": torch.uint8}}[method]
    return lambda: rankseg(x, **kwargs)


def _child(path: str, method: str, repeat: int, threads: int, chunk_size: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    cuda = method.endswith("cuda")
    x = torch.from_numpy(np.load(path))
    if method == "rankseg_cuda":
        x = x.cuda()
    fn = _make_fn(method, x, chunk_size)
    # warm-up on a small crop: imports, lazy initialisation, code pages and the CUDA context are not counted
    _make_fn(method, x[..., :16, :16, :16].contiguous(), chunk_size)()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if cuda else 0
    base_rss = rss_mb()
    exact_peak = reset_peak_rss()
    if not exact_peak:  # no reset possible: the high-water mark so far (loading) is the baseline
        base_rss = peak_rss_mb()
    cold, cold_cpu, out = timed(fn, cuda)
    cold_peak = peak_rss_mb()
    cold_gpu = torch.cuda.max_memory_allocated() if cuda else 0
    digest = hashlib.sha1(out.cpu().numpy().tobytes()).hexdigest()[:16]
    out_device, out_mb = str(out.device), out.numel() * out.element_size() / 2**20
    del out
    times, cpu_times = [], []
    for _ in range(repeat):
        t, c, out = timed(fn, cuda)
        times.append(t)
        cpu_times.append(c)
        del out
    res = {
        "cold": cold,
        "warm": statistics.median(times) if times else cold,
        "warm_cpu": statistics.median(cpu_times) if cpu_times else cold_cpu,
        "threads": threads,
        "extra_rss_mb": max(0.0, cold_peak - base_rss),  # the first full-size call
        "extra_rss_all_mb": max(0.0, peak_rss_mb() - base_rss),  # over all calls (allocator caching included)
        "exact_peak": exact_peak,
        "input_mb": x.numel() * x.element_size() / 2**20,
        "output_mb": out_mb,
        "digest": digest,
        "out_device": out_device,
    }
    if cuda:
        res["extra_gpu_mb"] = (cold_gpu - base_gpu) / 2**20
        res["gpu"] = torch.cuda.get_device_name(0)
    emit_result(res)


# ------------------------------------------------------------------------------------------------- parent


def _solver_digest() -> str:
    """Short hash of the solver sources, so that a recorded table can be traced to the code it measured."""
    import rankseg_monai

    root = os.path.dirname(rankseg_monai.__file__)
    h = hashlib.sha1()
    for sub in ("functional.py", "solvers"):
        p = os.path.join(root, sub)
        files = [p] if os.path.isfile(p) else sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".py"))
        for f in files:
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:10]


def _fits(method: str, input_f32_mb: float, force: bool) -> tuple[bool, float]:
    need = 600 + input_f32_mb * (1 + _EST_FACTOR[method])
    avail = mem_available_mb()
    return force or avail is None or need < 0.85 * avail, need


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", nargs="*", default=None, help="C:S pairs (volume (1, C, S, S, S)); default: "
                    + " ".join(DEFAULT_VOLUMES))
    ap.add_argument("--big", action="store_true", help="add " + " ".join(BIG_VOLUMES))
    ap.add_argument("--methods", nargs="*", default=None, help="default: " + " ".join(CPU_METHODS)
                    + " (+ " + " ".join(CUDA_METHODS) + " with CUDA)")
    ap.add_argument("--fp16", action="store_true", help="save the volume as float16 (default float32)")
    ap.add_argument("--volume-kind", choices=["auto", "smooth", "blobs", "noise"], default="auto",
                    help="auto (default): smooth for C <= 3, blobs for more classes")
    ap.add_argument("--chunk-size", type=int, default=32768, help="voxels per row per chunk of rankseg_chunked")
    ap.add_argument("--repeat", type=int, default=1, help="warm calls after the cold one (median reported)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per child (default 1: stable timings on a shared machine)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--force", action="store_true", help="run paths that look too big for the free memory")
    ap.add_argument("--tmpdir", default=None, help="where to write the volumes (default: system temp)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ in the children (e.g. 65536: freed temporaries go back to "
                    "the OS at once, so the peak RSS shows live allocations rather than allocator caching)")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.repeat, args.threads, args.chunk_size)
        return

    import torch

    has_cuda = torch.cuda.is_available()
    methods = args.methods or (CPU_METHODS + (CUDA_METHODS if has_cuda else []))
    if not has_cuda and any(m.endswith("cuda") for m in methods):
        print("no CUDA device: skipping " + ", ".join(m for m in methods if m.endswith("cuda")))
        methods = [m for m in methods if not m.endswith("cuda")]
    volumes = (args.volumes or DEFAULT_VOLUMES) + (BIG_VOLUMES if args.big else [])
    dtype = "float16" if args.fp16 else "float32"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"rankseg_monai solver sources sha1 {_solver_digest()}, "
          f"torch {torch.__version__}, threads {args.threads}, {dtype} {args.volume_kind} volumes, repeat "
          f"{args.repeat}, chunk_size {args.chunk_size}, load average {load[0]:.1f}"
          + (f", gpu {torch.cuda.get_device_name(0)}" if has_cuda else ", no CUDA"))

    env = None
    if args.malloc_mmap_threshold is not None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
        print(f"children run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        for spec in volumes:
            num_classes, size = (int(v) for v in spec.split(":"))
            path = os.path.join(tmp, f"probs_{num_classes}_{size}.npy")
            kind = args.volume_kind if args.volume_kind != "auto" else "smooth" if num_classes <= 3 else "blobs"
            write_volume(path, num_classes, size, dtype, kind)
            voxels = size**3
            input_f32_mb = num_classes * voxels * 4 / 2**20
            for method in methods:
                ok, need = _fits(method, input_f32_mb, args.force)
                if not ok:
                    rows.append((num_classes, size, method, None, f"skipped: needs ~{need / 1024:.1f} GiB"))
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--repeat", str(args.repeat), "--threads",
                       str(args.threads), "--chunk-size", str(args.chunk_size), "--child", path, method]
                res, err = run_child(cmd, timeout=args.timeout, env=env)
                rows.append((num_classes, size, method, res, err))
            os.remove(path)
            _print_table([r for r in rows if r[:2] == (num_classes, size)], header=(spec == volumes[0]),
                         cuda=has_cuda)
            _print_ratios([r for r in rows if r[:2] == (num_classes, size)], kind)
    _print_summary(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": dtype, "volume_kind": args.volume_kind, "threads": args.threads,
                       "rows": [dict(C=r[0], size=r[1], method=r[2], result=r[3], error=r[4]) for r in rows]},
                      f, indent=1)


def _cost(res: dict) -> float:
    """Seconds used for s/Mvox and the growth exponent: CPU time of the warm call on single-threaded CPU paths
    (steady on a shared machine), wall time otherwise (CUDA, several threads)."""
    cpu_path = "extra_gpu_mb" not in res and res.get("threads", 1) == 1
    return res["warm_cpu"] if cpu_path else res["warm"]


def _print_table(rows, header: bool, cuda: bool) -> None:
    if header:
        print(f"\n{'C':>3} {'size':>5} {'Mvox':>6} {'input MB':>8}  {'path':20} {'cold s':>7} {'warm s':>7} "
              f"{'cpu s':>6} {'s/Mvox':>7} {'extra MB':>9} {'x input':>7}" + (f" {'GPU MB':>7}" if cuda else "")
              + "  same as rankseg")
    ref = {r[2]: r[3] for r in rows if r[3]}.get("rankseg")
    for num_classes, size, method, res, err in rows:
        mvox = size**3 / 1e6
        if res is None:
            print(f"{num_classes:>3} {size:>4}^3 {mvox:6.2f} {'':>8}  {method:20} {err.splitlines()[0]}")
            continue
        # the transform decides with its own defaults (pruning "auto", float32 labels): not comparable
        same = "-" if ref is None or method in ("rankseg", "argmax", "asdiscrete", "rankseg_transform") else (
            "yes" if res["digest"] == ref["digest"] else "no")
        gpu = f" {res['extra_gpu_mb']:7.0f}" if "extra_gpu_mb" in res else (f" {'':>7}" if cuda else "")
        print(f"{num_classes:>3} {size:>4}^3 {mvox:6.2f} {res['input_mb']:8.0f}  {method:20} {res['cold']:7.2f} "
              f"{res['warm']:7.2f} {res['warm_cpu']:6.2f} {_cost(res) / mvox:7.3f} {res['extra_rss_mb']:9.0f} "
              f"{res['extra_rss_mb'] / res['input_mb']:7.2f}{gpu}  {same}")


def _print_ratios(rows, kind: str) -> None:
    res = {method: r for _, _, method, r, _ in rows if r}
    if not rows:
        return
    num_classes = rows[0][0]
    f_t, t_t = TARGETS.get(num_classes, (None, None))
    cells = []
    for a, b, target in (("rankseg", "argmax", f_t), ("rankseg_transform", "asdiscrete", t_t),
                         ("rankseg008", "rankseg", None)):
        if a in res and b in res and _cost(res[b]) > 0:
            ratio = _cost(res[a]) / _cost(res[b])
            cell = f"{a} / {b} {ratio:.2f}x"
            if target is not None:
                cell += f" [target <= {target}: {'ok' if ratio <= target else 'MISSED'}]"
            cells.append(cell)
    if cells:
        print(f"    ratios ({kind} volume): " + "; ".join(cells))


def _print_summary(rows) -> None:
    print("\nSummary per path and class count (s/Mvox from CPU time on 1-thread CPU paths, else wall time; growth "
          "exponent b: least-squares fit of time ~ voxels^b, 1 = linear):")
    groups: dict[tuple[str, int], list] = {}
    for num_classes, size, method, res, _ in rows:
        if res is not None:
            groups.setdefault((method, num_classes), []).append((size**3, res))
    for (method, num_classes), items in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        items.sort(key=lambda it: it[0])
        spv = [_cost(r) / (n / 1e6) for n, r in items]
        ratio = [r["extra_rss_mb"] / r["input_mb"] for _, r in items]
        line = (f"  {method:20} C={num_classes:<3} {items[0][0] / 1e6:.1f}..{items[-1][0] / 1e6:.1f} Mvox: "
                f"{min(spv):.3f}..{max(spv):.3f} s/Mvox")
        pts = [(math.log(n), math.log(_cost(r))) for n, r in items if _cost(r) > 0]
        if len(pts) > 1:
            mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
            slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
            line += f", exponent {slope:.2f}"
        line += f"; peak extra {min(ratio):.2f}..{max(ratio):.2f}x input"
        gpu = [r["extra_gpu_mb"] for _, r in items if "extra_gpu_mb" in r]
        if gpu:
            line += f", GPU {min(gpu):.0f}..{max(gpu):.0f} MB"
        print(line)


if __name__ == "__main__":
    main()
