"""Distributed evaluation: torchrun with 2 CPU ranks (gloo) gives the same metrics as one process.

Runs ``tests/dist_eval_script.py`` twice, concurrently: under ``torchrun --standalone --nproc_per_node=2`` and as
a plain single process.  The script evaluates 5 cases with ``SupervisedEvaluator``,
``DistributedSampler(even_divisible=False)``, ``RankSEGHandler``, ``MeanDice`` and ``HausdorffDistance95``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "dist_eval_script.py"
NUM_CASES = 5
TIMEOUT = 180

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"),
]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [shutil.which("torchrun") or "torchrun"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reports of the 2-rank torchrun run ({rank: report}) and of the single-process run."""
    tmp = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("WORLD_SIZE", None)
    args = ["--cases", str(NUM_CASES), "--size", "24", "--batch-size", "2"]
    procs = {
        "dist": subprocess.Popen(
            [*_torchrun(), "--standalone", "--nproc_per_node=2", str(SCRIPT), "--out", str(tmp / "dist"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT),
        "single": subprocess.Popen(
            [sys.executable, str(SCRIPT), "--out", str(tmp / "single"), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT),
    }
    logs = {}
    try:
        for name, proc in procs.items():
            logs[name] = proc.communicate(timeout=TIMEOUT)[0]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{logs[name][-4000:]}"
    ranks = {r: json.loads((tmp / "dist" / f"rank{r}.json").read_text()) for r in (0, 1)}
    single = json.loads((tmp / "single" / "rank0.json").read_text())
    return ranks, single


def _by_case(report: dict, key: str) -> dict[int, np.ndarray]:
    rows = np.asarray(report[key], dtype=float)
    assert rows.shape[0] == len(report["gathered_case_ids"])
    return dict(zip(report["gathered_case_ids"], rows))


def test_every_case_evaluated_exactly_once(runs):
    ranks, single = runs
    assert [ranks[r]["world_size"] for r in (0, 1)] == [2, 2]
    assert single["world_size"] == 1
    ids0, ids1 = ranks[0]["case_ids"], ranks[1]["case_ids"]
    # even_divisible=False: 3 + 2 cases, none padded or repeated, interleaved by rank (shuffle=False)
    assert ids0 == [0, 2, 4] and ids1 == [1, 3]
    assert sorted(ids0 + ids1) == list(range(NUM_CASES))
    # the gathered ids are the same on every rank, rank 0's cases first
    assert ranks[0]["gathered_case_ids"] == ranks[1]["gathered_case_ids"] == ids0 + ids1
    assert single["case_ids"] == list(range(NUM_CASES))


def test_per_case_metrics_gathered_on_every_rank(runs):
    ranks, single = runs
    for r in (0, 1):
        rep = ranks[r]
        # MONAI gathers all 5 cases (not just the rank's own 3 or 2), 2 foreground classes each
        assert np.asarray(rep["dice_details"]).shape == (NUM_CASES, 2)
        assert np.asarray(rep["hd95_details"]).shape == (NUM_CASES, 2)
        assert np.asarray(rep["hd95_empty_details"]).shape == (NUM_CASES, 2)
        assert rep["pred_shapes"] == [[3, 24, 24, 24]]  # RankSEGHandler's one-hot output reached the metrics
    # both ranks report identical values
    for key in ("dice", "hd95", "hd95_empty", "dice_details", "hd95_details", "hd95_empty_details"):
        np.testing.assert_array_equal(np.asarray(ranks[0][key], dtype=float), np.asarray(ranks[1][key], dtype=float))


def test_distributed_equals_single_process(runs):
    ranks, single = runs
    rep = ranks[0]
    # per case, matched by case id
    for key in ("dice_details", "hd95_details", "hd95_empty_details"):
        d, s = _by_case(rep, key), _by_case(single, key)
        assert sorted(d) == sorted(s) == list(range(NUM_CASES))
        for case in range(NUM_CASES):
            np.testing.assert_allclose(d[case], s[case], rtol=1e-6, atol=0, equal_nan=True, err_msg=f"{key} {case}")
    # aggregates
    assert math.isclose(rep["dice"], single["dice"], rel_tol=1e-6)
    assert math.isclose(rep["hd95"], single["hd95"], rel_tol=1e-6)
    assert rep["hd95_empty"] == single["hd95_empty"]
    # the aggregates are the means of the gathered per-case values (nothing dropped, nothing counted twice):
    # MeanDice averages the classes of each case, then the cases; HD95 averages all valid (case, class) pairs
    dice = np.asarray(rep["dice_details"], dtype=float)
    hd = np.asarray(rep["hd95_details"], dtype=float)
    assert math.isclose(rep["dice"], float(np.nanmean(np.nanmean(dice, axis=1))), rel_tol=1e-5)
    assert math.isclose(rep["hd95"], float(np.nanmean(hd)), rel_tol=1e-5)
    assert rep["hd95_empty"] == int((np.asarray(rep["hd95_empty_details"]) > 0).sum()) == int(np.isnan(hd).sum())
    # a real segmentation problem, not a degenerate one
    assert 0.5 < single["dice"] < 1.0
    assert np.isfinite(hd).sum() >= NUM_CASES and single["hd95"] > 0
