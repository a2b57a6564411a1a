"""nnU-Net v2 prediction three ways, side by side: time, peak memory, disk (needs ``nnunetv2``).

* ``nnunet``: ``nnUNetv2_predict`` (nnU-Net's predictor, argmax);
* ``nnunet+predict``: ``nnUNetv2_predict --save_probabilities`` then ``rankseg-monai predict`` on that folder;
* ``nnunet-predict``: ``rankseg-monai nnunet-predict`` (RankSEG in nnU-Net's export workers, no probability files).

The model is the tiny one of the tests (tests/nnunet_fixture.py: nnU-Net's planning, preprocessing and network,
initialised, not trained: its probabilities are spread, so RankSEG works on every voxel's row).  Two image sets: the
fixture's (two 20x36x30 cases, one cropped by nnU-Net) and a larger stand-in (``--size``, default two 64x160x160
cases = 1.6 Mvox each, a zero border so nnU-Net crops; CPU inference of a CT-sized volume takes too long on a shared
two-core machine).  Each pipeline runs in a fresh process (nnU-Net's predictor in-process, as its console script
does, without the start-up of ``nnUNetv2_predict``), ``-npp 1 -nps 1`` unless ``--workers NPP NPS`` (nnU-Net's
defaults are ``3 3``), ``--disable_tta`` for the stand-in.
Peak memory: the largest total proportional set size (PSS) of the run's process tree (the run and its
preprocessing/export workers, summed, sampled from /proc every 50 ms; PSS divides the pages forked workers share);
CPU: user + system seconds of the whole tree (less sensitive than wall time to other work on a shared machine);
disk: bytes the run left in its output folders.

Run:  python benchmarks/bench_nnunet.py [--size 64 160 160] [--repeats 1]
      python benchmarks/bench_nnunet.py --workers 3 3 --cases 6 --size 48 128 128   # nnU-Net's default workers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("nnunet", "nnunet+predict", "nnunet-predict")


def _run_nnunet(model: str, images: str, out: str, save_probabilities: bool, tta: bool, npp: int, nps: int) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False, use_mirroring=tta)
    predictor.initialize_from_trained_model_folder(model, use_folds=(0,))
    predictor.predict_from_files(images, out, save_probabilities=save_probabilities, num_processes_preprocessing=npp,
                                 num_processes_segmentation_export=nps)


def child(pipeline: str, model: str, images: str, out: str, tta: bool, npp: int = 1, nps: int = 1) -> None:
    """One pipeline, timed in this process; prints ``RESULT {json}``."""
    import contextlib
    import io

    from rankseg_monai.app import cli

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if pipeline in ("nnunet", "nnunet+predict"):
            _run_nnunet(model, images, out + "/nnunet", pipeline != "nnunet", tta, npp, nps)
        if pipeline == "nnunet+predict":
            assert cli.main(["predict", out + "/nnunet", "-o", out + "/rankseg", "--quiet", "--dataset-json",
                             model + "/dataset.json"]) == 0
        if pipeline == "nnunet-predict":
            extra = [] if tta else ["--disable_tta"]
            assert cli.main(["nnunet-predict", "-i", images, "-o", out + "/rankseg", "-m", model, "-f", "0", "-npp",
                             str(npp), "-nps", str(nps), "--quiet", *extra]) == 0
    seconds = time.perf_counter() - started
    disk = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print("RESULT " + json.dumps({"seconds": seconds, "disk_bytes": disk}))


def _pss_mb(pid: str) -> float:
    """Proportional set size of a process (shared pages divided among the processes sharing them, so the sum over a
    tree of forked workers is not counted once per worker)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return float(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree_pss_mb(root: int) -> float:
    """Summed proportional set size (PSS) of ``root`` and its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child_pid, parent in parents.items():
            if parent == pid and child_pid not in tree:
                tree.add(child_pid)
                frontier.append(child_pid)
    return sum(_pss_mb(str(pid)) for pid in tree)


def measure(pipeline: str, model: Path, images: Path, work: Path, tta: bool, npp: int = 1, nps: int = 1) -> dict:
    out = work / pipeline.replace("+", "_")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen([sys.executable, __file__, "--child", pipeline, str(model), str(images), str(out),
                                 str(int(tta)), str(npp), str(nps)], stdout=stdout, stderr=stderr, text=True,
                                env=env, cwd=ROOT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _tree_pss_mb(proc.pid))
            time.sleep(0.05)
        stdout.seek(0)
        stderr.seek(0)
        text, errors = stdout.read(), stderr.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{pipeline} failed:\n{text[-2000:]}\n{errors[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["peak_pss_mb"] = peak
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=[64, 160, 160], metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs=2, default=[1, 1], metavar=("NPP", "NPS"),
                    help="nnU-Net's -npp and -nps for every pipeline (nnU-Net's defaults: 3 3)")
    ap.add_argument("--cases", type=int, default=2, help="cases of the stand-in set (more than -nps keeps every "
                    "export worker busy)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import nnunet_fixture as fx

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_nnunet_"))
    try:
        model = fx.build_model(work / "fixture")
        sets = {"fixture (2 x 20x36x30)": (fx.write_images(work / "small", {"plain": (0, 0), "cropped": (1, 5)}),
                                           work / "small", True),
                f"stand-in ({args.cases} x {'x'.join(map(str, args.size))})":
                    (fx.write_images(work / "large", {f"big{k + 1}": (k, 8) for k in range(args.cases)},
                                                    shape=tuple(args.size)),
                     work / "large", False)}
        npp, nps = args.workers
        print(f"nnunetv2 pipelines, -npp {npp} -nps {nps}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, "
              f"{args.repeats} repeat(s), best wall and CPU time; peak PSS of the process tree (summed)")
        for name, (_, images, tta) in sets.items():
            print(f"\n{name}{'' if tta else ', --disable_tta'}")
            print(f"{'pipeline':<16} {'wall s':>7} {'x nnunet':>9} {'CPU s':>7} {'x nnunet':>9} "
                  f"{'peak PSS MiB':>13} {'disk KiB':>10}")
            results = {}
            for pipeline in PIPELINES:
                runs = [measure(pipeline, model, images, work / "runs", tta, npp, nps) for _ in range(args.repeats)]
                results[pipeline] = {"seconds": min(r["seconds"] for r in runs),
                                     "cpu_seconds": min(r["cpu_seconds"] for r in runs),
                                     "peak_pss_mb": max(r["peak_pss_mb"] for r in runs),
                                     "disk_bytes": runs[-1]["disk_bytes"]}
            base, base_cpu = results["nnunet"]["seconds"], results["nnunet"]["cpu_seconds"]
            for pipeline, r in results.items():
                print(f"{pipeline:<16} {r['seconds']:7.1f} {r['seconds'] / base:9.2f} {r['cpu_seconds']:7.1f} "
                      f"{r['cpu_seconds'] / base_cpu:9.2f} {r['peak_pss_mb']:13.0f} {r['disk_bytes'] / 1024:10.1f}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6], sys.argv[6] == "1", int(sys.argv[7]), int(sys.argv[8]))
    else:
        main()
