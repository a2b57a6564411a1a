"""rankseg-monai: Dice/IoU-optimal segmentation decisions (RankSEG) for MONAI pipelines."""

from __future__ import annotations

import importlib
from typing import Any

from .functional import rankseg

__version__ = "0.1.0"

# name -> submodule; imported on first use so that ``import rankseg_monai`` stays light (no MONAI import
# for solver-only users) while ``rankseg_monai.RankSEGd`` still resolves for MONAI bundle configs.
_LAZY = {
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
