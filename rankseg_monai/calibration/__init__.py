"""Is RankSEG safe on this model?  Calibration diagnostics and the remedies.

* :mod:`~rankseg_monai.calibration.report` (labelled cases): :func:`calibration_report` and
  :func:`plot_reliability`;
* :mod:`~rankseg_monai.calibration.scaling` (labelled cases): :func:`fit_temperature`, :func:`apply_temperature`,
  :func:`fit_vector_scaling`, :func:`apply_vector_scaling`, :func:`save_temperature`, :func:`load_temperature`;
* the label-free safeguard lives in the core, :class:`rankseg_monai.guard.Guard` (``rankseg(..., guard=True)``);
  :class:`Guard` and :func:`guarded_rankseg` are re-exported here.

``docs/calibration.md`` has the measurements.
"""

from __future__ import annotations

from ..functional import guarded_rankseg
from ..guard import UNCERTAIN_BAND, Guard
from .report import (
    VERDICT_THRESHOLDS,
    CalibrationReport,
    ClassCalibration,
    calibration_report,
    plot_reliability,
    reliability_bins,
)
from .scaling import (
    apply_temperature,
    apply_vector_scaling,
    fit_temperature,
    fit_vector_scaling,
    load_temperature,
    save_temperature,
)

__all__ = [
    "UNCERTAIN_BAND",
    "VERDICT_THRESHOLDS",
    "ClassCalibration",
    "CalibrationReport",
    "reliability_bins",
    "calibration_report",
    "plot_reliability",
    "fit_temperature",
    "apply_temperature",
    "fit_vector_scaling",
    "apply_vector_scaling",
    "save_temperature",
    "load_temperature",
    "Guard",
    "guarded_rankseg",
]
