"""One command that checks rankseg_monai on a CUDA GPU: same decisions as the CPU, host syncs, speed, memory.

    python benchmarks/gpu_check.py                        # on a CUDA machine (about 3-6 min on an H200: estimate)
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
* **nnU-Net conversion** (:func:`check_nnunet_conversion`), the step where ``rankseg-monai nnunet-predict``
  decides: on the CPU of nnU-Net's export worker (with ``-device cuda`` too) with its torch threads
  (``--export-threads``; nnU-Net's ``num_threads_torch``, 8 by default).  A case as the worker holds it:
  probabilities ``(3, Z, Y, X)`` float32 of a crop box inside a ``200 x 512 x 512`` volume (``--quick``
  ``64 x 192 x 192``, ``--tiny`` ``14 x 16 x 18``) with a non-identity ``transpose_backward``, for a label model
  (softmax, 3 classes) and a region model (BraTS regions, sigmoid probabilities), options read from each model's
  dataset.json.  ``decide_probabilities`` must equal ``functional.rankseg`` on the equivalent uncropped volume
  (as ``--save_probabilities`` + ``predict`` would decide it) bit for bit, and nnU-Net's own
  ``LabelManager.convert_probabilities_to_segmentation`` (argmax, region painting) must equal rankseg_monai's
  argmax baseline on the same input (without nnunetv2: reported skipped, not failed).  Timed (median of
  ``--repeat``): nnU-Net's conversion, ``decide_probabilities`` and ``decide_probabilities`` with the expected-Dice
  record (what ``nnunet-predict`` runs by default), as ratios to nnU-Net's, with the peak RSS above the input.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench_util import baseline_method, median_time, peak_rss_mb, reset_peak_rss, rss_mb, timed  # noqa: E402
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


# ------------------------------------------------------------------------------------------------ nnU-Net conversion
#: nnU-Net's uncropped volume (its internal array order, after ``transpose_forward``): a CT-like case in the full run
NNUNET_SHAPES = {"full": (200, 512, 512), "quick": (64, 192, 192), "tiny": (14, 16, 18)}
#: a non-identity ``transpose_backward`` (nnU-Net's plans), so that the array-order handling is exercised
NNUNET_TRANSPOSE_BACKWARD = (1, 2, 0)
#: model -> (dataset.json of the model, bench_regions volume kind of its probabilities)
NNUNET_MODELS = {
    "label model (softmax, 3 classes)": ({"labels": {"background": 0, "liver": 1, "tumour": 2}}, "lits-ct"),
    "region model (sigmoid, BraTS regions)": (
        {"labels": {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]},
         "regions_class_order": [1, 2, 3]}, "brats-mri"),
}


def nnunet_export_threads() -> int:
    """The torch threads of nnU-Net's export worker: ``num_threads_torch`` of ``export_prediction_from_logits``
    defaults to ``nnunetv2.configuration.default_num_processes`` (8, or ``$nnUNet_def_n_proc``)."""
    try:
        from nnunetv2.configuration import default_num_processes
    except ImportError:
        return int(os.environ.get("nnUNet_def_n_proc", 8))
    return int(default_num_processes)


def nnunet_case(kind: str, level: str, seed: int = 0) -> tuple[np.ndarray, tuple[list[list[int]], list[int]]]:
    """One case as nnU-Net's export worker holds it: probabilities ``(C, Z, Y, X)`` float32 of the crop box (nnU-Net's
    internal order) and ``(bbox_used_for_cropping, shape_before_cropping)``, the box a few voxels inside the volume
    on every side.  The probabilities are ``bench_regions.volume`` at a quarter of the resolution (``--tiny``: full),
    trilinearly resampled to the box as nnU-Net's export resamples (cheap at CT size; still probabilities)."""
    from bench_regions import volume as region_volume

    before = NNUNET_SHAPES[level]
    bbox = [[max(1, s // 16), s - max(1, s // 20)] for s in before]
    box = tuple(hi - lo for lo, hi in bbox)
    factor = 1 if level == "tiny" else 4
    coarse = region_volume(kind, tuple(max(9, s // factor) for s in box), seed=seed)
    probs = torch.nn.functional.interpolate(coarse, size=box, mode="trilinear", align_corners=False)[0]
    return np.ascontiguousarray(probs.numpy(), dtype=np.float32), (bbox, list(before))


def nnunet_reference(probs: np.ndarray, crop: tuple[list[list[int]], list[int]], transpose_backward: Sequence[int],
                     spec: dict, options: Any) -> np.ndarray:
    """The same decision by ``functional.rankseg`` on the equivalent full volume, as ``--save_probabilities`` +
    ``rankseg-monai predict`` would take it: the uncropped probabilities (background 1, regions 0 outside the box),
    in the file's order (``transpose_backward``) read as ``x, y, z`` (spatial axes reversed), then the label map
    brought back to nnU-Net's order and cut to the box."""
    from rankseg_monai.functional import rankseg

    bbox, before = crop
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    full = np.zeros((probs.shape[0], *before), dtype=np.float32)
    if not options.region_probs:
        full[0] = 1.0
    full[(slice(None), *box)] = probs
    ndim = len(before)
    in_file = full.transpose(0, *[a + 1 for a in transpose_backward])
    as_read = np.ascontiguousarray(in_file.transpose(0, *range(ndim, 0, -1)))
    regions = {k: v for k, v in spec["labels"].items() if isinstance(v, list)} or None
    labels = rankseg(torch.from_numpy(as_read)[None], metric=options.metric, smooth=options.smooth,
                     pruning_prob=options.pruning_prob, regions=regions,
                     regions_class_order=spec.get("regions_class_order"), region_probs=options.region_probs,
                     label_dtype=torch.uint8)[0].numpy()
    forward = np.argsort(transpose_backward)  # nnU-Net's transpose_forward
    internal = labels.transpose(*range(ndim - 1, -1, -1)).transpose(*forward)
    return np.ascontiguousarray(internal[box])


def _time_cpu(fn: Callable[[], Any], repeat: int) -> dict[str, Any]:
    """Cold call and median of ``repeat`` warm calls (wall seconds), and the resident peak above the resident size
    before the first call (``None`` where the kernel cannot reset the high-water mark)."""
    gc.collect()
    base = rss_mb()
    can_reset = reset_peak_rss()
    cold = timed(fn)[0]
    median = median_time(fn, repeat, warm=False)[0] if repeat else cold
    return {"cold": cold, "median": median, "peak_mb": peak_rss_mb() - base if can_reset else None}


def check_nnunet_conversion(level: str, repeat: int, threads: int | None) -> dict[str, Any]:
    """nnU-Net's conversion step, where ``nnunet-predict`` decides: on the CPU of an export worker (with
    ``-device cuda`` too: nnU-Net hands the logits to CPU export processes), with the worker's torch threads.

    Per model (:data:`NNUNET_MODELS`, options from its dataset.json as ``nnunet-predict`` reads them):
    ``decide_probabilities`` must equal :func:`nnunet_reference` bit for bit (one decision path); nnU-Net's own
    ``LabelManager.convert_probabilities_to_segmentation`` (argmax, or region painting) must equal
    rankseg_monai's argmax baseline on the same input; the three conversions are timed."""
    from rankseg_monai.app import nnunet as app_nnunet
    from rankseg_monai.app.decide import decide
    from rankseg_monai.options import RankSEGOptions

    try:
        version: str | None = app_nnunet.require_nnunet()
        from nnunetv2.utilities.label_handling.label_handling import LabelManager
    except app_nnunet.NnUNetMissing:
        version, LabelManager = None, None
    threads = nnunet_export_threads() if threads is None else threads
    out: dict[str, Any] = {"nnunetv2": version, "threads": threads, "shape_before_cropping": NNUNET_SHAPES[level],
                           "transpose_backward": list(NNUNET_TRANSPOSE_BACKWARD), "models": []}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, (name, (spec, kind)) in enumerate(NNUNET_MODELS.items()):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as model:
                with open(os.path.join(model, "dataset.json"), "w") as f:
                    json.dump(spec, f)
                options = app_nnunet.options_for_model(model, RankSEGOptions())
            probs, crop = nnunet_case(kind, level, seed=seed)
            row: dict[str, Any] = {"model": name, "classes": probs.shape[0], "box": list(probs.shape[1:]),
                                   "input_mb": probs.nbytes / 2**20, "times": {}}

            def ours(estimates: bool = False, probs=probs, crop=crop, options=options) -> np.ndarray:
                return app_nnunet.decide_probabilities(probs, options, transpose_backward=NNUNET_TRANSPOSE_BACKWARD,
                                                       estimates=estimates, crop=crop)[0]

            mask = ours()
            ref = nnunet_reference(probs, crop, NNUNET_TRANSPOSE_BACKWARD, spec, options)
            row["equal"] = mask.dtype == ref.dtype and mask.shape == ref.shape and bool(np.array_equal(mask, ref))
            row["dtype"] = str(mask.dtype)
            row["foreground"] = int(np.count_nonzero(mask))
            del mask, ref
            methods: dict[str, Callable[[], Any]] = {}
            if LabelManager is not None:
                manager = LabelManager(spec["labels"], spec.get("regions_class_order"))
                baseline = decide(probs, "argmax", options)
                row["nnunet_equals_argmax"] = bool(np.array_equal(
                    manager.convert_probabilities_to_segmentation(probs), baseline))
                del baseline
                methods["nnunet"] = lambda manager=manager, probs=probs: \
                    manager.convert_probabilities_to_segmentation(probs)
            methods["rankseg"] = ours
            methods["rankseg_estimates"] = lambda ours=ours: ours(estimates=True)
            for method, fn in methods.items():
                row["times"][method] = _time_cpu(fn, repeat)
            base = row["times"].get("nnunet", {}).get("median")
            if base:
                row["ratio"] = {m: row["times"][m]["median"] / base for m in ("rankseg", "rankseg_estimates")}
            row["seconds"] = time.perf_counter() - t0
            out["models"].append(row)
            del probs
    finally:
        torch.set_num_threads(old_threads)
    return out


# ------------------------------------------------------------------------------------------------ report
def nnunet_lines(conv: dict) -> tuple[list[tuple[str, str, str, str]], bool]:
    """The table rows of :func:`check_nnunet_conversion` and whether its checks passed."""
    lines, ok = [], True
    where = (f"box of {tuple(conv['shape_before_cropping'])}, transpose_backward {tuple(conv['transpose_backward'])}, "
             f"{conv['threads']} torch threads")
    names = {"nnunet": "nnU-Net LabelManager (argmax/painting)", "rankseg": "RankSEG decide_probabilities",
             "rankseg_estimates": "  + expected-Dice record (CLI default)"}
    for row in conv["models"]:
        case = f"{row['model']} {tuple(row['box'])} fp32"
        ok = ok and row["equal"]
        lines.append(("nnU-Net conv", f"{case} vs functional.rankseg on the full volume",
                      "equal" if row["equal"] else "DIFFER",
                      f"{row['dtype']}, {row['foreground']} foreground; {where}"))
        if conv["nnunetv2"] is None:
            lines.append(("nnU-Net conv", "nnU-Net's own conversion", "skipped", "nnunetv2 not installed: skipped"))
        else:
            ok = ok and row["nnunet_equals_argmax"]
            lines.append(("nnU-Net conv", "nnU-Net's conversion vs rankseg_monai argmax",
                          "equal" if row["nnunet_equals_argmax"] else "DIFFER", f"nnunetv2 {conv['nnunetv2']}"))
        for method, r in row["times"].items():
            ratio = row.get("ratio", {}).get(method)
            mem = "" if r["peak_mb"] is None else \
                f"peak RSS +{r['peak_mb']:.0f} MB ({r['peak_mb'] / row['input_mb']:.2f}x in)"
            lines.append(("nnU-Net conv", f"  {names[method]}", f"{r['median']:.3f} s (cold {r['cold']:.2f})",
                          "; ".join(v for v in (f"{ratio:.1f}x nnU-Net" if ratio else "", mem) if v)))
    return lines, ok


def report(env: dict, corpus: dict, syncs: dict, speed: list[dict], conv: dict) -> bool:
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
    conv_lines, conv_ok = nnunet_lines(conv)
    lines += conv_lines
    ok = ok and conv_ok
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
    ap.add_argument("--export-threads", type=int, default=None, metavar="N",
                    help="torch threads of the nnU-Net conversion step (default: nnU-Net's export worker's, "
                    "nnunetv2.configuration.default_num_processes: 8 or $nnUNet_def_n_proc)")
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
        conv = check_nnunet_conversion(level, args.repeat, args.export_threads)
    except Exception:  # noqa: BLE001 - a crash is a FAIL with its traceback
        traceback.print_exc()
        print("FAIL: the check crashed (traceback above)")
        return 1
    ok = report(env, corpus, syncs, speed, conv)
    total = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "corpus": corpus, "syncs": syncs, "speed": speed, "nnunet_conversion": conv,
                       "seconds": total}, f, indent=1)
    verdict = "PASS" if ok else "FAIL"
    what = "CUDA decisions equal the CPU's bit for bit" if dev == "cuda" else "dry run on the CPU: every check ran"
    print(f"{verdict}: {what if ok else 'see the rows above'} ({total:.0f} s, {mode})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
