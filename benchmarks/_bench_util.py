"""Small helpers shared by the benchmarks: per-process peak memory, timing, and the child-process protocol.

Each measurement runs in a fresh child process that prints one ``RESULT {json}`` line on stdout; the parent
parses it with :func:`run_child`.  Peak memory is the process's resident high-water mark (``VmHWM``), reset
just before the measured section where the kernel allows it (``/proc/self/clear_refs``, Linux >= 4.0), so
that transient peaks of imports or of loading the input do not hide or inflate the method's own peak.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from collections.abc import Callable
from typing import Any

__all__ = ["rss_mb", "reset_peak_rss", "peak_rss_mb", "mem_available_mb", "timed", "median_time", "emit_result",
           "run_child", "baseline_method"]


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size in MiB (falls back to the high-water mark where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Resident high-water mark in MiB since the last :func:`reset_peak_rss` (or process start)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if os.uname().sysname == "Darwin" else 1)
    return kb / 1024


def mem_available_mb() -> float | None:
    """``MemAvailable`` of /proc/meminfo in MiB (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def timed(fn: Callable[[], Any], cuda: bool = False) -> tuple[float, float, Any]:
    """``(wall seconds, process CPU seconds, fn())``, synchronising CUDA around the call when ``cuda``.

    On a shared machine the CPU time of a single-threaded call is a steadier measure of its cost than the wall
    time (it does not count the time the process waits for a core); on CUDA it is meaningless.
    """
    if cuda:
        import torch

        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if cuda:
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, out


def median_time(fn: Callable[[], Any], repeat: int, warm: bool = True) -> tuple[float, float]:
    """Median ``(wall seconds, process CPU seconds)`` of ``repeat`` calls of ``fn`` (after one warm-up call)."""
    import statistics

    if warm:
        fn()
    runs = [timed(fn)[:2] for _ in range(max(1, repeat))]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def baseline_method(name: str, x: Any) -> Callable[[], Any] | None:
    """The calls every benchmark compares with, on a batch ``x`` ``(B, C, *spatial)``: ``"argmax"``
    (``x.argmax(1)``), ``"asdiscrete"`` (MONAI's ``AsDiscrete(argmax=True)`` on the item ``x[0]``), ``"transform"``
    or ``"rankseg_transform"`` (the drop-in ``RankSEG()`` with its defaults, on ``x[0]``), ``"rankseg008"`` and
    ``"rankseg008_screening"`` (the authors' rankseg 0.0.8, default and ``safe_screening=True``).  ``None`` for
    any other name (the benchmark's own paths)."""
    if name == "argmax":
        return lambda: x.argmax(1)
    if name == "asdiscrete":
        from monai.transforms import AsDiscrete

        post = AsDiscrete(argmax=True)
        return lambda: post(x[0])
    if name in ("transform", "rankseg_transform"):
        from rankseg_monai import RankSEG

        post = RankSEG()
        return lambda: post(x[0])
    if name in ("rankseg008", "rankseg008_screening"):
        from rankseg.functional import rankseg as ref

        kw = {"safe_screening": True} if name.endswith("screening") else {}
        return lambda: ref(x, **kw)
    return None


def emit_result(result: dict) -> None:
    """Print the child's result line (the parent reads the last ``RESULT`` line)."""
    print("RESULT " + json.dumps(result), flush=True)


def run_child(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[dict | None, str]:
    """Run a child benchmark process; ``(result dict or None, error text)``."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return None, f"exit code {proc.returncode}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT "):]), ""
