"""rankseg-monai: Dice/IoU-optimal segmentation decisions (RankSEG) for MONAI pipelines."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> submodule; imported on first use so that ``import rankseg_monai`` stays light (no torch or MONAI import:
# the command line sets OpenMP's wait policy before torch loads, see ``rankseg_monai.app``) while
# ``rankseg_monai.rankseg`` and ``rankseg_monai.RankSEGd`` still resolve (MONAI bundle configs name the latter).
_LAZY = {
    "rankseg": "functional",
    "RankSEG": "transforms",
    "RankSEGd": "transforms",
    "RankSEGD": "transforms",
    "RankSEGDict": "transforms",
    "RankSEGHandler": "handlers",
    "HausdorffDistance95": "handlers",
    "HausdorffDistance95Metric": "metrics",
    "ExpectedScore": "handlers",
    "ExpectedScoreMetric": "metrics",
    "RankSEGOptions": "options",
}

__all__ = ["rankseg", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'rankseg_monai' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
