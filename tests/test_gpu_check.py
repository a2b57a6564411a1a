"""``benchmarks/gpu_check.py``, the one-command GPU check: its CPU dry run exercises every code path but the CUDA
calls, its corpus covers what issue 15 asks, and without CUDA (and no dry run) it says so and exits 0."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_on_a_tiny_corpus_passes(tmp_path):
    out = tmp_path / "check.json"
    proc = _run("--cpu-dry-run", "--tiny", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("PASS: dry run on the CPU"), lines[-1]
    for section in ("decisions", "host syncs", "time"):
        assert any(line.startswith(section) for line in lines), section
    result = json.loads(out.read_text())
    corpus = result["corpus"]
    assert corpus["cases"] >= 10 and not corpus["mismatches"] and not corpus["errors"]
    for row in result["speed"]:
        assert {"argmax", "functional", "transform", "stream"} <= set(row["methods"])
        for name in ("argmax", "functional", "transform", "stream"):
            assert row["methods"][name]["median"] > 0
        assert row["same"] == {"streamed": True, "cpu": True}
    conv = result["nnunet_conversion"]
    assert conv["threads"] >= 1 and conv["transpose_backward"] != sorted(conv["transpose_backward"])
    assert {row["model"].split()[0] for row in conv["models"]} == {"label", "region"}
    nnunet = importlib.util.find_spec("nnunetv2") is not None
    assert (conv["nnunetv2"] is not None) == nnunet
    for row in conv["models"]:
        assert row["equal"] is True and row["dtype"] == "uint8" and row["foreground"] > 0
        # the crop box lies strictly inside nnU-Net's uncropped volume
        assert all(b < s for b, s in zip(row["box"], conv["shape_before_cropping"], strict=True))
        assert set(row["times"]) == ({"nnunet"} if nnunet else set()) | {"rankseg", "rankseg_estimates"}
        for timing in row["times"].values():
            assert timing["median"] > 0 and timing["cold"] > 0
        if nnunet:
            assert row["nnunet_equals_argmax"] is True and row["ratio"]["rankseg"] > 0
    assert any(line.startswith("nnU-Net conv") for line in lines)


def test_nnunet_conversion_without_nnunetv2_is_skipped_not_failed(monkeypatch):
    """Without nnunetv2 the one-decision-path check still runs; nnU-Net's own conversion is reported skipped."""
    module = _module()
    for name in [n for n in sys.modules if n == "nnunetv2" or n.startswith("nnunetv2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ImportError
    monkeypatch.setenv("nnUNet_def_n_proc", "1")  # nnU-Net's own setting of its export threads
    conv = module.check_nnunet_conversion("tiny", 0, None)
    assert conv["nnunetv2"] is None and conv["threads"] == 1
    assert [row["equal"] for row in conv["models"]] == [True, True]
    assert all(set(row["times"]) == {"rankseg", "rankseg_estimates"} for row in conv["models"])
    lines, ok = module.nnunet_lines(conv)
    assert ok and sum("nnunetv2 not installed: skipped" in line[3] for line in lines) == 2


def test_the_full_corpus_covers_the_issue():
    """dtypes, 2D/3D, batch 2, many classes, multiclass/multilabel, Dice/IoU, smoothing, every pruning mode, void,
    permuted input and the transform are all in the corpus that runs on the GPU (listed, not run, here)."""
    names = [name for name, _, _ in _module().corpus_cases("full")]
    joined = "\n".join(names)
    for needle in ("float32", "float16", "bfloat16", "c14_2d", "c3_3d", "c3_b2", "c105_3d", "ties", "diffuse",
                   "output_mode=multilabel", "metric=iou", "smooth=1.0", "pruning_prob=0.0", "pruning_prob=auto",
                   "pruning_prob=auto-independent", "pruning_prob=auto-correlated", "unassigned_policy=void",
                   "permuted", "RankSEG()", "RankSEG(to_onehot)"):
        assert needle in joined, needle
    assert len(names) == len(set(names)) and len(names) > 200


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_without_cuda_it_says_so_and_exits_0():
    proc = _run()
    assert proc.returncode == 0
    assert "no CUDA device" in proc.stdout and "--cpu-dry-run" in proc.stdout
