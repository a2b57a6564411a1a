"""The solver's thread choice on a busy CPU (``solvers/_threads.py``) and the wait policy of the entry points.

The thread count must never change a decision: each case is solved with every torch thread and with one thread
(what a busy machine gets) and the outputs compared bit for bit.
"""

import os
import subprocess
import sys

import pytest
import torch

from rankseg_monai.functional import rankseg
from rankseg_monai.solvers import _threads
from rankseg_monai.solvers._threads import MIN_PARALLEL_VALUES, free_cores, solver_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_free_cores_is_a_count():
    free = free_cores()
    assert free is None or 1 <= free <= (os.cpu_count() or 1)


def test_busy_machine_gets_fewer_threads_and_the_count_is_restored(two_threads, monkeypatch):
    monkeypatch.setattr(_threads, "free_cores", lambda: 1)
    big = torch.zeros(MIN_PARALLEL_VALUES)
    with solver_threads(big) as n:
        assert n == 1 and torch.get_num_threads() == 1
        with solver_threads(big) as inner:  # nested: the outer choice stands, restored by the outer block only
            assert inner == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), solver_threads(big):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2  # restored after an error too


@pytest.mark.parametrize("free", [None, 8])
def test_quiet_machine_keeps_the_threads_small_work_gets_one(two_threads, monkeypatch, free):
    monkeypatch.setattr(_threads, "free_cores", lambda: free)
    with solver_threads(torch.zeros(MIN_PARALLEL_VALUES)) as n:
        assert n == 2
    with solver_threads(torch.zeros(100)) as n:  # small work: one thread, whatever the machine
        assert n == 1
    assert torch.get_num_threads() == 2


def _cases():
    g = torch.Generator().manual_seed(5)
    blobs = torch.nn.functional.avg_pool3d(torch.randn((1, 4, 72, 72, 72), generator=g), 7, 1, 3) * 20
    x = torch.softmax(blobs, 1)  # 1.5 M values: above MIN_PARALLEL_VALUES
    yield x, {}
    yield x, {"pruning_prob": "auto", "metric": "iou"}
    yield x, {"output_mode": "multilabel", "smooth": 1.0}
    yield x, {"regions": {"brain": [1, 2, 3], "tissue": [2, 3], "white": [3]}, "pruning_prob": "auto"}
    yield torch.sigmoid(blobs[:, :3]), {"regions": [[1, 2, 3], [2, 3], [3]], "region_probs": True,
                                        "output_mode": "multilabel"}


def test_one_thread_and_two_threads_decide_the_same(two_threads, monkeypatch):
    for x, kw in _cases():
        assert x.numel() >= MIN_PARALLEL_VALUES
        monkeypatch.setattr(_threads, "free_cores", lambda: None)
        both = rankseg(x, **kw)
        monkeypatch.setattr(_threads, "free_cores", lambda: 1)
        one = rankseg(x, **kw)
        assert torch.get_num_threads() == 2
        assert torch.equal(both, one), kw


def test_the_expected_score_runs_on_the_free_cores_with_the_same_value(two_threads, monkeypatch):
    """``expected_score`` (the record's expected Dice, a few passes of short ops) takes the solver's thread choice:
    one thread on a busy machine (it ran 3-10x slower with two threads beside two busy processes), the same
    values, and the count restored."""
    from rankseg_monai.functional import expected_score

    seen = []
    real = _threads.solver_threads

    def spying(x, device=None):
        seen.append(x.numel())
        return real(x, device)

    monkeypatch.setattr("rankseg_monai.functional.solver_threads", spying)
    for x, kw in _cases():
        kw = {k: v for k, v in kw.items() if k in ("regions", "region_probs", "metric")}
        decision = rankseg(x, **kw)
        monkeypatch.setattr(_threads, "free_cores", lambda: None)
        seen.clear()
        both = expected_score(x, decision, **kw)
        assert seen == [x.numel()]  # the whole estimate ran inside the thread choice
        monkeypatch.setattr(_threads, "free_cores", lambda: 1)
        one = expected_score(x, decision, **kw)
        assert torch.get_num_threads() == 2
        assert torch.equal(both, one), kw


def _probe(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.split()


def test_command_line_sleeps_idle_threads_before_torch_loads():
    # the console script imports rankseg_monai.app.cli: the package and app import no torch before the policy
    code = ("import os, sys, rankseg_monai; t = 'torch' in sys.modules; import rankseg_monai.app.cli; "
            "print(t, os.environ['OMP_WAIT_POLICY'])")
    assert _probe(code) == ["False", "PASSIVE"]
    assert _probe(code, OMP_WAIT_POLICY="ACTIVE") == ["False", "ACTIVE"]  # the user's choice wins
