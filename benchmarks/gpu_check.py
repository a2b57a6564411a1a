"""One command that checks rankseg_monai on a CUDA GPU: same decisions as the CPU, host syncs, speed, memory.

    python benchmarks/gpu_check.py                        # on a CUDA machine (about 2-4 min on an H200)
    python benchmarks/gpu_check.py --quick                # smoke run: small timing volumes, fewer cases
    python benchmarks/gpu_check.py --cpu-dry-run --quick  # no GPU: every code path except the CUDA calls
    python benchmarks/gpu_check.py --cpu-dry-run --tiny   # the same on a tiny corpus (the test suite runs this)

It prints one table and one ``PASS``/``FAIL`` line, and exits 0 on PASS (1 on FAIL).  On a machine without CUDA it
says so and exits 0 (``--cpu-dry-run`` runs the same checks with the CPU standing in for the GPU: the comparisons
are then trivially equal, but every line of the script runs).

What it checks:

* **decisions, CUDA == CPU bit for bit** on a fixed corpus: float32/float16/bfloat16, 2D and 3D, batch 2,
  3/14/105 classes (``benchmarks/_phantoms.py``), sigmoid outputs, ties, a diffuse volume (the capped band
  path), multiclass and multilabel, Dice and IoU, smooth 0 and 1, ``pruning_prob`` 0.5/0/auto modes, the void
  policy, uint8 labels, a permuted (non-contiguous) input, the ``RankSEG`` transform (CUDA input, and
  ``device="cuda"`` on a CPU item), and streaming ``rankseg(x_cpu, device="cuda")``; region-aware decisions and
  the expected-score estimate (:func:`region_cases`).
* **host syncs**: ``torch.cuda.set_sync_debug_mode("warn")`` around one call of each path on a CUDA-resident
  volume; the table gives the number of synchronizing operations (a few per chunk and per Dinkelbach step are
  expected; a count growing with the voxels would be a regression).
* **speed and memory** on ``(1, 3, 512, 512, 512)`` and ``(1, 105, 256, 256, 256)`` float16 (``--shapes``):
  median of ``--repeat`` warm calls (cold call too) of ``argmax``, ``AsDiscrete(argmax=True)``,
  ``functional.rankseg``, ``RankSEG()``, streaming from the CPU, and rankseg 0.0.8 (default and
  ``safe_screening=True``, its Triton path when triton is installed), with the peak GPU memory above the input
  (``torch.cuda.max_memory_allocated``); our decision on these volumes is compared with the streaming one and with
  the CPU.  0.0.8 is optional: a failure there (not installed, out of memory) is reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _bench_util import baseline_method  # noqa: E402
from _phantoms import blob_phantom  # noqa: E402

FULL_SHAPES = ["1,3,512,512,512", "1,105,256,256,256"]
QUICK_SHAPES = ["1,3,128,128,128", "1,105,64,64,64"]
DRY_SHAPES = ["1,3,32,32,32", "1,105,16,16,16"]
TINY_SHAPES = ["1,3,12,12,12", "1,14,8,8,8"]
TIME_METHODS = ["argmax", "asdiscrete", "functional", "transform", "stream", "rankseg008", "rankseg008_screening"]
OPTIONAL = {"rankseg008", "rankseg008_screening"}


# ------------------------------------------------------------------------------------------------ the corpus
def corpus_inputs(level: str) -> dict[str, torch.Tensor]:
    """Fixed CPU inputs (seeded); ``level``: ``"full"``, ``"quick"`` or ``"tiny"``."""
    g = torch.Generator().manual_seed(2024)
    if level == "tiny":
        return {"c3_3d": blob_phantom(3, (12, 10, 8), seed=0), "c14_2d": blob_phantom(14, (20, 16), seed=3),
                "sig1": torch.sigmoid(torch.randn((1, 1, 10, 10, 6), generator=g) * 2 - 1)}
    inputs = {
        "c3_3d": blob_phantom(3, (40, 36, 28), seed=0),
        "c14_3d": blob_phantom(14, (32, 32, 24), seed=1),
        "c105_3d": blob_phantom(105, (24, 24, 20), seed=2),
        "c14_2d": blob_phantom(14, (96, 80), seed=3),
        "c3_b2": blob_phantom(3, (24, 24, 16), seed=4, batch=2),
        "sig4": torch.sigmoid(torch.randn((1, 4, 32, 32, 16), generator=g) * 2 - 1),
        "ties": torch.randint(0, 5, (2, 3, 16, 16, 8), generator=g).float() / 8.0,
    }
    if level == "full":
        inputs["diffuse"] = torch.softmax(torch.randn((1, 2, 1 << 20), generator=g) * 0.3, 1)
    return inputs


def corpus_options(level: str) -> list[dict[str, Any]]:
    """Keyword sets of ``functional.rankseg``."""
    opts: list[dict[str, Any]] = [
        {"pruning_prob": "auto"},
        {"output_mode": "multilabel", "pruning_prob": "auto"},
        {"metric": "iou", "smooth": 1.0},
    ]
    if level != "tiny":
        opts.insert(0, {})
    if level == "full":
        opts += [
            {"metric": "iou"},
            {"smooth": 1.0, "pruning_prob": "auto"},
            {"pruning_prob": 0.0},
            {"pruning_prob": "auto-independent"},
            {"pruning_prob": "auto-correlated", "metric": "iou"},
            {"unassigned_policy": "void", "label_dtype": torch.uint8},
            {"output_mode": "multilabel", "pruning_prob": 0.0, "smooth": 1.0},
        ]
    return opts


def region_cases(level: str) -> list[tuple[str, torch.Tensor, Callable[..., Any]]]:
    """Region-aware decisions (``rankseg_monai/solvers/regions.py``): LiTS-style regions on class probabilities
    and BraTS-style region (sigmoid) probabilities, label maps and region masks, Dice and IoU, the expected-score
    estimate too.  Each ``(name, x_cpu, fn)`` runs on the CPU, on the GPU and streamed; the three must be equal
    bit for bit."""
    from rankseg_monai.functional import expected_score, rankseg

    g = torch.Generator().manual_seed(16)
    shape = (12, 10, 8) if level == "tiny" else (32, 28, 20)
    lits = blob_phantom(3, shape, seed=5)
    z = torch.nn.functional.avg_pool3d(torch.randn((1, 3, *shape), generator=g), 5, 1, 2) * 12
    brats = torch.sigmoid(z)
    lits_regions = {"liver": [1, 2], "tumour": [2]}
    brats_regions = [[1, 2, 3], [2, 3], [3]]
    cases: list[tuple[str, torch.Tensor, Callable[..., Any]]] = []
    opts = [{}, {"output_mode": "multilabel"}] + ([{"metric": "iou"}, {"pruning_prob": 0.0}] if level != "tiny" else [])
    for kw in opts:
        cases.append((f"lits regions|{kw}", lits, lambda t, device=None, kw=kw: rankseg(
            t, device=device, regions=lits_regions, pruning_prob=kw.get("pruning_prob", "auto"),
            **{k: v for k, v in kw.items() if k != "pruning_prob"})))
        cases.append((f"brats region probs|{kw}", brats, lambda t, device=None, kw=kw: rankseg(
            t, device=device, regions=brats_regions, region_probs=True, pruning_prob=kw.get("pruning_prob", "auto"),
            **{k: v for k, v in kw.items() if k != "pruning_prob"})))
    from bench_regions import KINDS as REGION_KINDS
    from bench_regions import volume as region_volume

    # scan-like (the ascent on the voxels that can move, compacted) and tissue-like (dense: three nested regions over
    # about half the box)
    for kind in ("lits-ct", "brats-mri", "tissue"):
        x = region_volume(kind, (24, 20, 16) if level == "tiny" else shape, seed=3)  # smooth noise needs >= 9^3
        spec, probs_kind = REGION_KINDS[kind]
        for metric in ("dice", "iou"):
            cases.append((f"{kind} regions|{metric}", x, lambda t, device=None, spec=spec, rp=probs_kind, m=metric:
                          rankseg(t, device=device, regions=spec, region_probs=rp, metric=m)))
    cases.append(("lits expected_score", lits, lambda t, device=None: expected_score(
        t, t.argmax(1), regions=lits_regions, device=device).cpu()))
    return cases


def corpus_cases(level: str) -> list[tuple[str, torch.Tensor, Callable[..., Any]]]:
    from rankseg_monai import RankSEG
    from rankseg_monai.functional import rankseg

    cases: list[tuple[str, torch.Tensor, Callable[..., Any]]] = []
    inputs = corpus_inputs(level)
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if level == "full" else [torch.float32]
    for name, x in inputs.items():
        multilabel_only = x.shape[1] == 1
        for dt in dtypes if name.startswith("c") else [torch.float32]:
            xd = x.to(dt)
            for kw in corpus_options(level):
                if multilabel_only and kw.get("output_mode") != "multilabel":
                    continue
                label = f"{name}|{str(dt)[6:]}|" + ",".join(f"{k}={v}" for k, v in kw.items())
                cases.append((label, xd, lambda t, device=None, kw=kw: rankseg(t, device=device, **kw)))
    # a permuted view (as Invertd leaves after Orientationd): read without a copy, same labels
    for name in [n for n in ("c14_3d", "c3_b2", "c3_3d") if n in inputs][:2]:
        view = inputs[name].permute(0, 1, 4, 3, 2)
        for kw in ({}, {"pruning_prob": "auto"}, {"output_mode": "multilabel"}):
            cases.append((f"{name}|permuted|{kw}", view,
                          lambda t, device=None, kw=kw: rankseg(t, device=device, **kw).contiguous()))
    # the drop-in transform on one item (float32 labels, pruning "auto"), and with device= on a CPU item
    for name in [n for n in ("c3_3d", "c14_3d", "c105_3d", "c14_2d") if n in inputs]:
        item = inputs[name][0]
        cases.append((f"{name}|RankSEG()", item, lambda t, device=None: RankSEG(device=device)(t)))
        cases.append((f"{name}|RankSEG(to_onehot)", item,
                      lambda t, device=None, c=item.shape[0]: RankSEG(to_onehot=c, device=device)(t)))
    return cases + region_cases(level)


def check_corpus(dev: str, level: str) -> dict[str, Any]:
    """Every case on the CPU (reference), resident on ``dev`` and streamed to ``dev`` from the CPU."""
    cases = corpus_cases(level)
    mismatches, errors = [], []
    t0 = time.perf_counter()
    for name, x, fn in cases:
        try:
            ref = fn(x)
            on_dev = fn(x.to(dev)).cpu()
            streamed = fn(x, device=dev)
            if streamed.device.type != "cpu":
                raise AssertionError(f"streaming returned a tensor on {streamed.device}, expected the input's (cpu)")
            for what, got in (("resident", on_dev), ("streamed", streamed)):
                if got.dtype != ref.dtype or got.shape != ref.shape or not torch.equal(got, ref):
                    mismatches.append(f"{name} ({what})")
        except Exception as e:  # noqa: BLE001 - reported in the table
            errors.append(f"{name}: {type(e).__name__}: {e}")
    return {"cases": len(cases), "regions": len(region_cases(level)), "mismatches": mismatches, "errors": errors,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ host syncs
def count_syncs(fn: Callable[[], Any]) -> int:
    """Number of synchronizing CUDA operations ``fn`` performs (``torch.cuda.set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def check_syncs(dev: str, level: str) -> dict[str, Any]:
    from rankseg_monai import RankSEG
    from rankseg_monai.functional import rankseg

    size = {"full": (96, 96, 96), "quick": (48, 48, 48), "tiny": (8, 8, 8)}[level]
    x = blob_phantom(14, size, seed=5, dtype=torch.float16, device=dev)
    paths = {
        "functional (pruning 0.5)": lambda: rankseg(x),
        "functional auto": lambda: rankseg(x, pruning_prob="auto"),
        "functional multilabel": lambda: rankseg(x, output_mode="multilabel"),
        "RankSEG()": lambda: RankSEG()(x[0]),
        "functional IoU, smooth 1": lambda: rankseg(x, metric="iou", smooth=1.0),
    }
    out = {"shape": list(x.shape), "counts": {}}
    for name, fn in paths.items():
        fn()  # warm (lazy initialisation is not the hot path)
        out["counts"][name] = count_syncs(fn) if dev == "cuda" else None
    return out


# ------------------------------------------------------------------------------------------------ speed
def _method(name: str, x: torch.Tensor, x_cpu: torch.Tensor | None, dev: str) -> Callable[[], Any]:
    fn = baseline_method(name, x)
    if fn is not None:
        return fn
    from rankseg_monai.functional import rankseg

    if name == "functional":
        return lambda: rankseg(x)
    if name == "stream":
        return lambda: rankseg(x_cpu, device=dev, label_dtype=torch.uint8)
    raise ValueError(f"unknown method {name!r}")


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_method(fn: Callable[[], Any], dev: str, repeat: int) -> dict[str, Any]:
    cuda = dev == "cuda"
    _sync(dev)
    base = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    cold = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    del out
    times = []
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        del out
    return {"cold": cold, "median": statistics.median(times) if times else cold, "peak_mb": peak}


def check_speed(dev: str, shapes: list[str], repeat: int, methods: list[str], cpu_compare: bool) -> list[dict]:
    from rankseg_monai.functional import rankseg

    rows = []
    for spec in shapes:
        shape = tuple(int(s) for s in spec.split(","))
        t0 = time.perf_counter()
        x = blob_phantom(shape[1], shape[2:], seed=7, batch=shape[0], dtype=torch.float16, device=dev)
        x_cpu = x.cpu() if ("stream" in methods or cpu_compare) else None
        row: dict[str, Any] = {"shape": spec, "input_mb": x.numel() * x.element_size() / 2**20, "methods": {},
                               "setup_s": time.perf_counter() - t0}
        for name in methods:
            try:
                row["methods"][name] = time_method(_method(name, x, x_cpu, dev), dev, repeat)
            except Exception as e:  # noqa: BLE001 - reported in the table
                row["methods"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
            if dev == "cuda":
                torch.cuda.empty_cache()
        # our decision on the big volume: resident == streamed (== CPU with cpu_compare)
        try:
            ours = rankseg(x)
            same = {"streamed": torch.equal(rankseg(x_cpu, device=dev).to(ours.device), ours)} if x_cpu is not None \
                else {}
            if cpu_compare:
                same["cpu"] = torch.equal(rankseg(x_cpu), ours.cpu())
            row["same"] = same
            del ours
        except Exception as e:  # noqa: BLE001
            row["same_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        del x, x_cpu
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ report
def report(env: dict, corpus: dict, syncs: dict, speed: list[dict]) -> bool:
    lines: list[tuple[str, str, str, str]] = []
    ok = not corpus["mismatches"] and not corpus["errors"]
    lines.append(("decisions", f"corpus, {corpus['cases']} cases x (resident, streamed)",
                  "equal" if ok else f"{len(corpus['mismatches'])} differ, {len(corpus['errors'])} errors",
                  f"{corpus['seconds']:.0f} s; regions hook: {corpus['regions']} cases"))
    for m in corpus["mismatches"][:8]:
        lines.append(("", "  differs", m, ""))
    for e in corpus["errors"][:8]:
        lines.append(("", "  error", e[:100], ""))
    for name, count in syncs["counts"].items():
        lines.append(("host syncs", f"{name} {tuple(syncs['shape'])} fp16", "n/a (CPU)" if count is None else
                      str(count), "per call"))
    for row in speed:
        res = row["methods"]
        base = res.get("argmax", {}).get("median")
        ad = res.get("asdiscrete", {}).get("median")
        for name, r in res.items():
            if "error" in r:
                lines.append(("time", f"{row['shape']} fp16 {name}", "error", r["error"]))
                if name not in OPTIONAL:
                    ok = False
                continue
            ratio = ""
            if base and name != "argmax":
                ratio = f"{r['median'] / base:.2f}x argmax"
            if ad and name == "transform":
                ratio += f", {r['median'] / ad:.2f}x AsDiscrete"
            ours = res.get("functional", {}).get("median")
            if ours and name.startswith("rankseg008"):
                ratio += f", {r['median'] / ours:.1f}x ours"
            mem = "" if r["peak_mb"] is None else \
                f"peak +{r['peak_mb']:.0f} MB ({r['peak_mb'] / row['input_mb']:.2f}x in)"
            lines.append(("time", f"{row['shape']} fp16 {name}", f"{r['median']:.3f} s (cold {r['cold']:.2f})",
                          "; ".join(v for v in (ratio, mem) if v)))
        same = row.get("same", {})
        if "same_error" in row:
            ok = False
            lines.append(("decisions", f"{row['shape']} fp16", "error", row["same_error"][:100]))
        for what, equal in same.items():
            ok = ok and equal
            lines.append(("decisions", f"{row['shape']} fp16 resident vs {what}", "equal" if equal else "DIFFER", ""))
    widths = [max(len(r[i]) for r in lines + [("section", "case", "result", "detail")]) for i in range(3)]
    print(f"\nrankseg_monai GPU check: {env['device_name']}, torch {env['torch']}, {env['mode']}")
    header = ("section", "case", "result", "detail")
    print("  ".join(h.ljust(w) for h, w in zip(header[:3], widths, strict=True)) + "  " + header[3])
    print("-" * (sum(widths) + 6 + 30))
    for r in lines:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small timing volumes, a smaller corpus")
    ap.add_argument("--tiny", action="store_true", help="tiny corpus and volumes, one timed call (for the tests)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="no GPU needed: the CPU stands in for CUDA (checks the script, not the GPU)")
    ap.add_argument("--shapes", nargs="*", default=None, help="timing volumes B,C,X,Y,Z (float16); default: "
                    + " ".join(FULL_SHAPES) + " (--quick: " + " ".join(QUICK_SHAPES) + ")")
    ap.add_argument("--methods", nargs="*", default=TIME_METHODS, choices=TIME_METHODS, metavar="METHOD",
                    help="timed methods (default: all): " + " ".join(TIME_METHODS))
    ap.add_argument("--repeat", type=int, default=3, help="warm calls per timed method (median)")
    ap.add_argument("--no-cpu-compare", action="store_true",
                    help="skip deciding the timing volumes on the CPU too (saves time on a slow host)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.tiny:
        args.repeat = min(args.repeat, 1)
    if args.cpu_dry_run:
        dev, mode = "cpu", "CPU DRY RUN (the CPU stands in for CUDA: comparisons are trivially equal)"
        shapes = args.shapes or (TINY_SHAPES if args.tiny else DRY_SHAPES)
    elif torch.cuda.is_available():
        dev, mode = "cuda", "CUDA"
        shapes = args.shapes or (TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else FULL_SHAPES)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    else:
        print("gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False): nothing to check "
              "here. Run it on a machine with a GPU and a CUDA build of torch, or with --cpu-dry-run to exercise the "
              "script on the CPU.")
        return 0
    env = {"torch": torch.__version__, "mode": mode, "device_name": torch.cuda.get_device_name(0) if dev == "cuda"
           else "CPU", "level": level, "shapes": shapes}
    t0 = time.perf_counter()
    try:
        corpus = check_corpus(dev, level)
        syncs = check_syncs(dev, level)
        speed = check_speed(dev, shapes, args.repeat, args.methods, cpu_compare=not args.no_cpu_compare)
    except Exception:  # noqa: BLE001 - a crash is a FAIL with its traceback
        traceback.print_exc()
        print("FAIL: the check crashed (traceback above)")
        return 1
    ok = report(env, corpus, syncs, speed)
    total = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "corpus": corpus, "syncs": syncs, "speed": speed, "seconds": total}, f, indent=1)
    verdict = "PASS" if ok else "FAIL"
    what = "CUDA decisions equal the CPU's bit for bit" if dev == "cuda" else "dry run on the CPU: every check ran"
    print(f"{verdict}: {what if ok else 'see the rows above'} ({total:.0f} s, {mode})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
