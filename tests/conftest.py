"""Test-session settings and fixtures shared by every test file.

Devices: tests that take the ``device`` fixture (or are parametrised with ``DEVICES``) run on the CPU always and on
CUDA too when ``torch.cuda.is_available()``, as MONAI's tests do.  On a machine without CUDA nothing is skipped:
the CUDA parameter simply does not exist there.  ``benchmarks/gpu_check.py`` is the one-command GPU check.
"""

import os

# Before torch loads (libgomp reads it once): idle OpenMP threads sleep instead of spinning, so the suite and the
# subprocesses it starts (CLI, tutorials) do not slow down by several times on a machine busy with other work
# (the command line does the same: rankseg_monai/app/__init__.py).  A value set by the caller wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# pytest-xdist runs 2 workers on 2 cores: one torch thread each avoids oversubscription (OpenMP barriers in
# many medium-sized ops slow down by 10x or more when threads outnumber cores).  The environment variable carries
# this to the subprocesses the tests start (the command line, tutorials, doc blocks): with two OpenMP threads each
# beside two workers and other load, tests/test_docs.py[docs/cli.md] and the tutorial tests ran 10x longer.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: the devices every device-parametrised test runs on
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """``"cpu"``, then ``"cuda"`` when a CUDA device is visible."""
    return request.param
