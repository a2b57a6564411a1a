"""Torch threads for a solve on a CPU shared with other work.  Pure torch, no MONAI import.

The solvers run many short ops (a few dozen per chunk of voxels).  With several torch threads each op is an OpenMP
parallel region that ends at a barrier: when another process holds a core, the thread parked there makes every
region wait for a scheduler slice, and with libgomp's default wait policy the waiting threads spin meanwhile.  On
a busy 2-core machine that made a solve 3-18x slower (docs/solvers.md), while a single op such as ``argmax`` pays
it once.  One thread is immune to it and, for these memory-bound ops, loses little.

:func:`solver_threads` runs a solve of at least :data:`MIN_PARALLEL_VALUES` values with as many threads as there
are free cores: ``torch.get_num_threads()`` when the machine is quiet, fewer (down to 1) when other threads are
runnable, judged by the kernel's count of runnable threads (``/proc/loadavg``) minus this process's own.  A smaller
solve (a 64 x 64 x 32 volume with 3 classes: a few milliseconds) runs on one thread: its ops are too short to gain
from a second thread, and each would wait for it on a busy machine.  The thread count never changes a decision (every
float64 sum of the solvers is the same bits with 1 and 2 threads; tests/solvers/test_threads.py).  Where ``/proc``
is missing the count is left alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["free_cores", "solver_threads", "MIN_PARALLEL_VALUES"]

#: below this many input values a solve runs on one thread; above, on the free cores
MIN_PARALLEL_VALUES = 1 << 20

_lock = threading.Lock()
_depth = 0
_saved = 0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _own_runnable() -> int:
    """Threads of this process in state R (running or runnable)."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        count += stat[stat.rindex(")") + 2] == "R"
    return count


def free_cores() -> int | None:
    """Cores this process may use that no other process's runnable thread holds right now (at least 1), or
    ``None`` where the kernel does not say (no ``/proc``)."""
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        others = max(0, runnable - max(1, _own_runnable()))
    except (OSError, ValueError, IndexError):
        return None
    return max(1, _usable_cores() - others)


@contextmanager
def solver_threads(x: torch.Tensor, device: torch.device | str | None = None) -> Iterator[int]:
    """Run the block with at most :func:`free_cores` torch threads (CPU work of at least
    :data:`MIN_PARALLEL_VALUES` values; one thread for less), restoring the count after; yields the count used.

    ``torch.set_num_threads`` is process-wide: nested or concurrent solves (several Python threads) share one
    setting, taken by the first and restored by the last.

    Example:
        >>> import torch
        >>> from rankseg_monai.solvers._threads import solver_threads
        >>> before = torch.get_num_threads()
        >>> with solver_threads(torch.zeros(10)) as n:  # a small solve: one thread
        ...     n
        1
        >>> torch.get_num_threads() == before
        True
    """
    global _depth, _saved
    on_cpu = (x.device.type == "cpu") and (device is None or torch.device(device).type == "cpu")
    with _lock:
        current = torch.get_num_threads()
        want = current
        if _depth == 0 and on_cpu and current > 1:
            if x.numel() < MIN_PARALLEL_VALUES:  # short ops: little to gain from threads, much to lose when busy
                want = 1
            else:
                free = free_cores()
                if free is not None:
                    want = min(current, free)
        if _depth == 0:
            _saved = current
            if want != current:
                torch.set_num_threads(want)
        _depth += 1
    try:
        yield torch.get_num_threads()
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and torch.get_num_threads() != _saved:
                torch.set_num_threads(_saved)
