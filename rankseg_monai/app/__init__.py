"""The edge of rankseg-monai: files (:mod:`~rankseg_monai.app.io`), the command line
(:mod:`~rankseg_monai.app.cli`), per-case evaluation and reports (:mod:`~rankseg_monai.app.evaluation`), the demo
(:mod:`~rankseg_monai.app.demo`) and its synthetic data (:mod:`~rankseg_monai.app.synthetic`).

These modules import the core (options, functional, transforms, metrics); nothing in the core imports them.
"""

import os as _os

#: OpenMP's wait policy for the command line, the demo and the evaluation, set before torch loads (a value the user
#: set wins).  Their work is many short multi-threaded torch ops (inference windows, solver chunks); with libgomp's
#: default policy an idle thread spins at every barrier, and on a machine whose cores also run other work the
#: spinning threads take the cores from the threads they wait for: the demo took 64.6 s beside two busy processes
#: and 33.7 s with ``PASSIVE`` (docs/solvers.md).  Only when torch is not yet loaded: ``import rankseg_monai``
#: does not load it, the console script and ``python -m rankseg_monai`` come here first.
OMP_WAIT_POLICY = "PASSIVE"
_os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
