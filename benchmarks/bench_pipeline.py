"""RankSEG where users run it, end to end: RankSEG's share of the wall time against the argmax run.

Three paths, each run with argmax and with RankSEG, interleaved (argmax, RankSEG, argmax, ...; medians):

* ``evaluator``: MONAI's ``SupervisedEvaluator`` on the demo phantoms with the shipped demo UNet and a
  ``SlidingWindowInferer``; ``postprocessing = Compose([Activationsd(softmax), <decision>])`` with the decision
  ``AsDiscreted(keys="pred", argmax=True)`` or ``RankSEGd(keys="pred")`` (its defaults).  The decision step is
  timed inside the engine, so its share of the run is measured, not inferred.
* ``export``: what nnU-Net's export workers do while the GPU predicts the next case: ``--workers`` processes, each
  turning saved probability volumes into label maps at the same time (``RankSEG()`` or ``argmax``), default torch
  threads.  On a 2-core machine that is exactly the busy CPU of docs/solvers.md.
* ``nnunet``: ``rankseg-monai nnunet-predict`` against ``nnUNetv2_predict`` on a tiny nnU-Net model made by
  nnU-Net's own code (benchmarks/bench_nnunet.py, run as it is; needs nnunetv2).

    python benchmarks/bench_pipeline.py                      # every path, a few minutes on 2 cores
    python benchmarks/bench_pipeline.py --paths evaluator --cases 4 --repeat 3
    python benchmarks/bench_pipeline.py --paths export --workers 3 --shape 1 3 256 256 128
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _Timed:
    """A post-transform that adds its wall time to ``self.seconds``."""

    def __init__(self, transform) -> None:
        self.transform, self.seconds = transform, 0.0

    def __call__(self, data):
        t0 = time.perf_counter()
        out = self.transform(data)
        self.seconds += time.perf_counter() - t0
        return out


def evaluator_path(cases: int, repeat: int) -> list[dict]:
    import torch
    from monai.data import DataLoader, Dataset, MetaTensor
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from rankseg_monai import RankSEGd
    from rankseg_monai.app.demo import load_demo_model
    from rankseg_monai.app.synthetic import make_phantom

    warnings.filterwarnings("ignore", category=FutureWarning)
    net, meta = load_demo_model()
    inferer = SlidingWindowInferer(roi_size=tuple(meta["roi_size"]), sw_batch_size=4, overlap=0.25, mode="gaussian")
    data = []
    for i in range(cases):
        ph = make_phantom(1_000_000 + i)
        affine = torch.as_tensor(ph.affine, dtype=torch.float64)
        data.append({"image": MetaTensor(torch.from_numpy(ph.image), affine=affine)})
    shape = tuple(data[0]["image"].shape)
    loader = DataLoader(Dataset(data), batch_size=1, num_workers=0)
    runs = []
    for rep in range(repeat + 1):  # the first round warms up
        for name, decision in (("argmax", AsDiscreted(keys="pred", argmax=True)), ("RankSEG", RankSEGd(keys="pred"))):
            step = _Timed(decision)
            evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net,
                                            inferer=inferer, postprocessing=Compose([
                                                Activationsd(keys="pred", softmax=True), step]), amp=False)
            t0, c0 = time.perf_counter(), time.process_time()
            evaluator.run()
            if rep:
                runs.append({"path": "evaluator", "method": name, "wall": time.perf_counter() - t0,
                             "cpu": time.process_time() - c0, "decision": step.seconds})
    print(f"evaluator: {cases} phantoms of {shape} voxels, demo UNet, sliding window (roi {tuple(meta['roi_size'])}, "
          f"overlap 0.25), {torch.get_num_threads()} torch threads")
    return runs


def _export_worker(args) -> tuple[float, float]:
    path, method, n_cases = args
    import torch

    from rankseg_monai import RankSEG

    x = torch.from_numpy(np.load(path))
    post = RankSEG()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_cases):
        (post(x[0]) if method == "RankSEG" else x.argmax(1))
    return time.perf_counter() - t0, time.process_time() - c0


def export_path(shape: tuple[int, ...], workers: int, cases_per_worker: int, repeat: int) -> list[dict]:
    from _phantoms import blob_phantom

    runs = []
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probs.npy")
        np.save(path, blob_phantom(shape[1], tuple(shape[2:]), seed=0, batch=shape[0]).numpy())
        with ctx.Pool(workers) as pool:
            pool.map(_export_worker, [(path, "RankSEG", 1)] * workers)  # warm up every worker
            for _ in range(repeat):
                for method in ("argmax", "RankSEG"):
                    t0 = time.perf_counter()
                    res = pool.map(_export_worker, [(path, method, cases_per_worker)] * workers)
                    runs.append({"path": "export", "method": method, "wall": time.perf_counter() - t0,
                                 "cpu": sum(r[1] for r in res), "decision": statistics.median(r[0] for r in res)})
    print(f"export: {workers} worker processes at once, {cases_per_worker} cases of {shape} each per round, "
          "default torch threads")
    return runs


def nnunet_path(size: tuple[int, int, int]) -> list[dict]:
    """``rankseg-monai nnunet-predict`` against ``nnUNetv2_predict`` (and ``--save_probabilities`` + ``predict``):
    benchmarks/bench_nnunet.py, run as it is (its own table: CPU time, peak memory, disk of each pipeline); RankSEG's
    share is the difference between the nnunet-predict and nnUNetv2_predict rows.  Needs nnunetv2."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("nnunetv2") is None:
        print('nnunet: nnunetv2 is not installed (pip install "rankseg-monai[nnunet]"); skipped')
        return []
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_nnunet.py")
    print(f"nnunet: {script} --size {' '.join(map(str, size))}")
    subprocess.run([sys.executable, script, "--size", *map(str, size)], check=True)
    return []


def summarise(runs: list[dict]) -> None:
    print(f"\n{'path':>10} {'decision':>9} {'wall s':>8} {'CPU s':>8} {'decision s':>11} {'share of wall':>14} "
          f"{'wall / argmax run':>18}")
    for path in dict.fromkeys(r["path"] for r in runs):
        med = {}
        for method in ("argmax", "RankSEG"):
            rs = [r for r in runs if r["path"] == path and r["method"] == method]
            med[method] = {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "decision")}
        for method, m in med.items():
            share = m["decision"] / m["wall"] if path == "evaluator" else float("nan")
            print(f"{path:>10} {method:>9} {m['wall']:>8.2f} {m['cpu']:>8.2f} {m['decision']:>11.2f} "
                  f"{share:>14.1%} {m['wall'] / med['argmax']['wall']:>18.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", nargs="*", default=["evaluator", "export", "nnunet"],
                    choices=["evaluator", "export", "nnunet"])
    ap.add_argument("--cases", type=int, default=3, help="evaluator: phantoms per run")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument("--workers", type=int, default=3, help="export: processes at once (nnU-Net's default export "
                    "worker count is 3)")
    ap.add_argument("--cases-per-worker", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=5, default=(1, 3, 256, 256, 128), help="export: probability volume")
    ap.add_argument("--nnunet-size", type=int, nargs=3, default=(48, 128, 128), metavar=("Z", "Y", "X"),
                    help="nnunet: the stand-in images of bench_nnunet.py")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'default')}")
    runs = []
    if "evaluator" in args.paths:
        runs += evaluator_path(args.cases, args.repeat)
    if "export" in args.paths:
        runs += export_path(tuple(args.shape), args.workers, args.cases_per_worker, args.repeat)
    if "nnunet" in args.paths:
        runs += nnunet_path(tuple(args.nnunet_size))
    summarise(runs)
    load = os.getloadavg()
    print(f"load average at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
