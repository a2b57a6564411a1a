"""Metrics for segmentation decisions, apart from the Ignite handlers (as MONAI splits ``monai.metrics`` and
``monai.handlers``): :class:`HausdorffDistance95Metric`, the 95th-percentile Hausdorff distance in millimetres from
each item's ``MetaTensor`` spacing, with a record of the empty cases that make it undefined.

The Ignite handler that wraps it is :class:`rankseg_monai.handlers.HausdorffDistance95`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, decollate_batch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance

__all__ = ["HausdorffDistance95Metric", "EMPTY_PRED", "EMPTY_TRUTH"]

#: bit flags of the per-(case, class) empty codes stored by :class:`HausdorffDistance95Metric`
EMPTY_PRED = 1
EMPTY_TRUTH = 2

_EMPTY_WARNING = r".* is all 0, this may result in nan/inf distance\."


def _items(data: Any, what: str) -> list:
    """A batch-first tensor/array or a sequence of channel-first items -> a list of channel-first items."""
    if isinstance(data, list | tuple):
        return list(data)
    if isinstance(data, torch.Tensor | np.ndarray):
        return list(decollate_batch(data, detach=True))
    raise TypeError(
        f"{what} must be a batch-first tensor or a list of channel-first tensors, got {type(data).__name__}"
    )


def _check_binary(t: torch.Tensor, name: str) -> None:
    """Distances are defined between masks: any value other than 0 and 1 (probabilities, labels > 1) is an error
    (MONAI returns NaN for them, which would then be counted neither as empty nor in the mean)."""
    if t.dtype == torch.bool:
        return
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        example = t[bad].flatten()[0].item()
        fix = ("RankSEG(to_onehot=C) / AsDiscrete(argmax=True, to_onehot=C)" if name == "y_pred"
               else "AsDiscrete(to_onehot=C)")
        raise ValueError(
            f"HausdorffDistance95: {name} holds values other than 0 and 1 (e.g. {example!r}): it needs binarised "
            f"one-hot masks (C, *spatial); binarise it first, e.g. with {fix}, or threshold probabilities "
            "(AsDiscrete(threshold=0.5))"
        )


class HausdorffDistance95Metric(CumulativeIterationMetric):
    """
    The 95th-percentile Hausdorff distance per case and class, in the physical units of each item's spacing
    (millimetres for NIfTI/DICOM), read from ``MetaTensor.pixdim`` of the prediction (or of the label when the
    prediction is a plain tensor).

    ``monai.metrics.HausdorffDistanceMetric`` takes one ``spacing`` per call and MONAI's handlers call it without
    any, so its values are in voxels; this metric calls MONAI's ``compute_hausdorff_distance`` once per case with
    that case's spacing.  Cases where the prediction or the truth of a class is empty give NaN (as in MONAI);
    they are recorded with an empty code per (case, class): ``EMPTY_PRED`` (1), ``EMPTY_TRUTH`` (2), or both (3).

    Inputs are one-hot/binary ``(C, *spatial)`` items (a list) or a batch-first tensor, as for MONAI's metrics; any
    value other than 0 and 1 (probabilities, labels) raises a ``ValueError`` naming the fix.
    Both buffers (distances and empty codes) are gathered over distributed ranks by :meth:`get_buffer`
    (MONAI's ``Cumulative`` machinery; a collective call that every rank must make).

    Args:
        include_background: include the first channel; default ``False``.
        distance_metric: ``"euclidean"`` (default; the only one where spacing matters), ``"chessboard"``,
            ``"taxicab"``.
        percentile: default 95.
        directed: directed distance (prediction to truth); default ``False``.
        require_spacing: default ``True``: an item pair where neither prediction nor label is a ``MetaTensor``
            raises.  ``False``: such pairs use unit spacing (voxels), with one warning.
    """

    def __init__(
        self,
        include_background: bool = False,
        distance_metric: str = "euclidean",
        percentile: float = 95.0,
        directed: bool = False,
        require_spacing: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
        self.include_background = include_background
        self.distance_metric = distance_metric
        self.percentile = float(percentile)
        self.directed = directed
        self.require_spacing = require_spacing
        self._warned_voxels = False

    def _spacing(self, pred: Any, label: Any) -> list[float] | None:
        spatial = pred.ndim - 1
        spacings = []
        for item in (pred, label):
            if isinstance(item, MetaTensor):
                sp = [float(v) for v in item.pixdim]
                if len(sp) < spatial:
                    raise ValueError(
                        f"the affine of a {spatial}D item gives only {len(sp)} spacings: fix the MetaTensor's affine"
                    )
                spacings.append(sp[:spatial])
        if len(spacings) == 2 and not np.allclose(spacings[0], spacings[1], rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"prediction spacing {spacings[0]} differs from label spacing {spacings[1]}: compare them in the same "
                "space (e.g. Invertd the prediction to the label's space, or resample the label like the image)"
            )
        if spacings:
            return spacings[0]
        if self.require_spacing:
            raise TypeError(
                "HausdorffDistance95 reads the voxel spacing from MetaTensor.pixdim, but neither the prediction nor "
                "the label is a MetaTensor: keep MetaTensors through the pipeline (LoadImaged, "
                "monai.data.MetaTensor(x, affine=...)), pass spacing= explicitly, or set require_spacing=False to "
                "measure in voxels"
            )
        if not self._warned_voxels:
            warnings.warn("HausdorffDistance95: no MetaTensor spacing, distances are in voxels", stacklevel=3)
            self._warned_voxels = True
        return None

    def __call__(self, y_pred: Any, y: Any = None, spacing: Any = None, **kwargs: Any) -> torch.Tensor:
        """Compute, store and return the ``(N, C)`` distances of this batch.

        Args:
            y_pred: binarised prediction, list of ``(C, *spatial)`` items or a batch-first tensor.
            y: binarised one-hot truth, same layout.
            spacing: optional explicit spacing overriding the MetaTensor's: one sequence for all cases, or one per
                case (a list of sequences).
        """
        if y is None:
            raise ValueError("HausdorffDistance95 needs the ground truth y")
        preds, labels = _items(y_pred, "y_pred"), _items(y, "y")
        if len(preds) != len(labels):
            raise ValueError(f"got {len(preds)} predictions but {len(labels)} labels")
        if spacing is not None and len(preds) > 0 and isinstance(spacing, list | tuple) \
                and all(isinstance(s, list | tuple | np.ndarray | torch.Tensor) for s in spacing):
            if len(spacing) != len(preds):
                raise ValueError(f"spacing has {len(spacing)} entries for {len(preds)} cases")
            per_case = [list(np.asarray(s, dtype=float)) for s in spacing]
        else:
            per_case = [spacing] * len(preds)
        dists, codes = [], []
        for p, t, sp in zip(preds, labels, per_case):
            sp = self._spacing(p, t) if sp is None else sp
            d, c = self._compute_tensor(torch.as_tensor(p)[None], torch.as_tensor(t)[None], spacing=sp)
            dists.append(d)
            codes.append(c)
        if not dists:
            return torch.empty(0)
        dist, code = torch.cat(dists), torch.cat(codes)
        self.extend(dist, code)
        return dist

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> list[torch.Tensor]:
        """Batch-first ``(B, C, *spatial)`` plain tensors -> ``[distances (B, C'), empty codes (B, C')]``."""
        y_pred = y_pred.as_tensor() if isinstance(y_pred, MetaTensor) else y_pred
        y = y.as_tensor() if isinstance(y, MetaTensor) else y
        if y_pred.shape != y.shape:
            raise ValueError(
                f"prediction shape {tuple(y_pred.shape[1:])} differs from label shape {tuple(y.shape[1:])}: one-hot "
                "both, e.g. RankSEG(to_onehot=C) / RankSEGHandler(to_onehot=C) for the prediction and "
                "AsDiscreted(keys='label', to_onehot=C) for the label"
            )
        if y_pred.ndim < 3:
            raise ValueError(f"expected (B, C, *spatial) with at least one spatial dim, got {tuple(y_pred.shape)}")
        _check_binary(y_pred, "y_pred")
        _check_binary(y, "y")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EMPTY_WARNING)
            # MONAI 1.5+ warns about its own internal call (get_mask_edges(always_return_as_numpy=...)) on every case:
            # nothing a user of this metric can change
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            dist = compute_hausdorff_distance(
                y_pred, y, include_background=self.include_background, distance_metric=self.distance_metric,
                percentile=self.percentile, directed=self.directed, spacing=kwargs.get("spacing"),
            )
        start = 0 if self.include_background else 1
        flat_p = y_pred[:, start:].reshape(*y_pred.shape[:1], y_pred.shape[1] - start, -1) != 0
        flat_t = y[:, start:].reshape(*y.shape[:1], y.shape[1] - start, -1) != 0
        code = (~flat_p.any(-1)).to(torch.int64) * EMPTY_PRED + (~flat_t.any(-1)).to(torch.int64) * EMPTY_TRUTH
        return [dist.cpu(), code.cpu()]

    def get_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Gathered ``(distances (N, C), empty codes (N, C))``, or ``None`` before any update."""
        buf = self.get_buffer()
        if buf is None:
            return None
        return buf[0], buf[1]

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """Mean over the non-NaN (case, class) values; NaN when there is none."""
        buf = self.get_buffers()
        if buf is None:
            raise ValueError("HausdorffDistance95: nothing to aggregate, no case was added")
        dist = buf[0]
        valid = dist[~torch.isnan(dist)]
        return valid.mean() if valid.numel() else torch.tensor(float("nan"))
