"""Metrics for segmentation decisions, apart from the Ignite handlers (as MONAI splits ``monai.metrics`` and
``monai.handlers``):

* :class:`HausdorffDistance95Metric`: the 95th-percentile Hausdorff distance in millimetres from each item's
  ``MetaTensor`` spacing, with a record of the empty cases that make it undefined
  (handler: :class:`rankseg_monai.handlers.HausdorffDistance95`);
* :class:`ExpectedScoreMetric`: collects the label-free expected Dice/IoU estimates that ``RankSEGd(...,
  expected_score=True)`` attaches to each case (handler: :class:`rankseg_monai.handlers.ExpectedScore`);
* :func:`surface_dice`: normalised surface Dice (NSD) of one binary mask at a tolerance in mm, through MONAI's
  ``compute_surface_dice`` (the published definition by default; Metrics Reloaded recommends it beside Dice);
* :func:`lesion_wise`: lesion-wise detection and Dice from connected components (plain, or the BraTS 2023
  evaluation's dilation and volume threshold).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, decollate_batch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["HausdorffDistance95Metric", "ExpectedScoreMetric", "surface_dice", "lesion_wise", "EMPTY_PRED",
           "EMPTY_TRUTH", "NSD_STYLES", "LESION_STYLES"]

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


class ExpectedScoreMetric(CumulativeIterationMetric):
    """
    Collects per-case estimates of the Dice (or IoU) a decision will score, as ``RankSEGd(...,
    expected_score=True)`` puts them under ``<key>_expected_dice`` (one float64 ``(C,)`` tensor per case, or a
    batch ``(B, C)``), and reduces them like MONAI's metrics.  No labels are involved: the values come from the
    model's probabilities (:func:`rankseg_monai.functional.expected_score`).

    Args:
        include_background: keep the first channel (class 0); default ``False``.  With ``regions`` every channel is
            a region: set ``True``.
        reduction: MONAI's ``MetricReduction`` for :meth:`aggregate` (default ``"mean"``: over cases and classes).

    Example:
        >>> import torch
        >>> from rankseg_monai.metrics import ExpectedScoreMetric
        >>> metric = ExpectedScoreMetric(reduction="mean_batch")
        >>> _ = metric([torch.tensor([0.99, 0.9, 0.6]), torch.tensor([0.98, 0.8, 0.4])])
        >>> metric.aggregate()
        tensor([0.8500, 0.5000])
    """

    def __init__(self, include_background: bool = False, reduction: MetricReduction | str = MetricReduction.MEAN
                 ) -> None:
        super().__init__()
        self.include_background = include_background
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore
        """``(B, C)`` estimates -> ``(B, C')`` (without the background unless ``include_background``)."""
        est = torch.as_tensor(y_pred, dtype=torch.float64)
        if est.ndim != 2:
            raise ValueError(f"expected estimates of shape (C,) per case or (B, C), got {tuple(est.shape)}: pass the "
                             "<key>_expected_dice entries that RankSEGd(expected_score=True) writes")
        return (est if self.include_background else est[:, 1:]).cpu()

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:  # type: ignore[override]
        """The reduced estimates (NaN-free inputs; MONAI's ``do_metric_reduction``)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("ExpectedScoreMetric: nothing to aggregate, no case was added")
        f, _ = do_metric_reduction(data, reduction or self.reduction)
        return f


def _binary(mask: Any, name: str) -> np.ndarray:
    arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be a binary mask (bool or 0/1); threshold or one-hot it first (e.g. "
                             "labels == c)")
        arr = arr.astype(bool)
    return arr


#: NSD definitions of :func:`surface_dice`: the published one (Nikolov et al. 2021, DeepMind's surface-distance,
#: MONAI ``use_subvoxels=True``) and MONAI's default (edge voxels)
NSD_STYLES = ("subvoxel", "edge")
#: lesion-wise definitions of :func:`lesion_wise`
LESION_STYLES = ("plain", "brats2023")


def surface_dice(pred: Any, truth: Any, spacing: Sequence[float], tolerance_mm: float, style: str = "subvoxel",
                 empty_score: float = 1.0) -> float:
    """Normalised surface Dice of two binary masks ``(*spatial)`` at ``tolerance_mm``: the fraction of both
    boundaries within the tolerance of the other (euclidean distances in mm from ``spacing``), through MONAI's
    ``compute_surface_dice``.

    Args:
        style: ``"subvoxel"`` (default): the published definition (Nikolov et al. 2021; DeepMind's
            ``surface-distance``, which Metrics Reloaded and challenges use): surfaces weighted by their area, MONAI's
            ``use_subvoxels=True``.  ``"edge"``: MONAI's default, counting boundary (edge) voxels; it differs from the
            published value when the tolerance is below the slice spacing (by up to 0.29 on LiTS-like masks).
        empty_score: the value when both masks are empty (default 1, Metrics Reloaded; ``nan`` as nnU-Net and
            MONAI).  One empty mask scores 0.

    Example:
        >>> import numpy as np
        >>> from rankseg_monai.metrics import surface_dice
        >>> a = np.zeros((20, 20), bool); a[5:15, 5:15] = True
        >>> b = np.zeros((20, 20), bool); b[6:15, 5:15] = True      # one row short
        >>> round(surface_dice(a, b, (1.0, 1.0), 1.0), 4), round(surface_dice(a, b, (1.0, 1.0), 0.5, "edge"), 4)
        (1.0, 0.7429)
    """
    from monai.metrics import compute_surface_dice

    if style not in NSD_STYLES:
        raise ValueError(f"NSD style {style!r}: use 'subvoxel' (the published definition) or 'edge' (MONAI's default)")
    p, t = _binary(pred, "pred"), _binary(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} differ: compare masks on the same grid")
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match the {p.ndim}D masks")
    has_p, has_t = bool(p.any()), bool(t.any())
    if not (has_p and has_t):
        return float(empty_score) if not (has_p or has_t) else 0.0

    def onehot(m: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(m)[None, None]
        return torch.cat([~x, x], 1).float()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(onehot(p), onehot(t), class_thresholds=[float(tolerance_mm)],
                                     include_background=False, spacing=[float(v) for v in spacing],
                                     use_subvoxels=style == "subvoxel")
    return float(value[0, 0])


def lesion_wise(pred: Any, truth: Any, min_size: float | None = None, connectivity: int | None = None, *,
                style: str = "plain", spacing: Sequence[float] | None = None, dilation: int | None = None,
                empty_score: float = 1.0) -> dict[str, Any]:
    """Lesion-wise counts and Dice of a binary prediction against a binary truth.

    Lesions are the connected components of the truth (full connectivity by default: 26 neighbours in 3D), and
    predicted components likewise.

    * ``style="plain"``: a true lesion is *detected* when a predicted component overlaps it, and its Dice is taken
      against the union of the predicted components that overlap it; a predicted component that overlaps no true
      lesion is a *false positive* and counts as a Dice of 0.  Components smaller than ``min_size`` voxels (default
      0) are ignored on both sides.
    * ``style="brats2023"``: the BraTS 2023 lesion-wise evaluation (``rachitsaluja/BraTS-2023-Metrics``): the truth
      is dilated ``dilation`` times (default 3) with the 18-neighbour structure and true lesions inside one dilated
      component are merged into one; a predicted component is matched to a true lesion when it overlaps the
      lesion's own dilation; true lesions of at most ``min_size`` mm^3 (default 50, voxels times the voxel volume
      from ``spacing``) are left out of the score and the counts, and a predicted component matched to no lesion
      (small ones included) is a false positive.

    The lesion-wise Dice is the sum of the true lesions' Dice over the number of true lesions plus false positives;
    ``empty_score`` (default 1, as the BraTS 2023 script) when there is neither (``nan``: undefined).

    Returns:
        ``{"true": n true lesions scored, "detected": ..., "missed": ..., "false_positive": ..., "lesion_dice":
        ..., "dice": the per-true-lesion Dice values}``.

    Example:
        >>> import numpy as np
        >>> from rankseg_monai.metrics import lesion_wise
        >>> t = np.zeros((12, 12), bool); t[1:4, 1:4] = True; t[8:11, 8:11] = True   # two lesions
        >>> p = np.zeros((12, 12), bool); p[1:4, 1:3] = True; p[6, 0] = True         # one found, one speck
        >>> r = lesion_wise(p, t)
        >>> r["true"], r["detected"], r["missed"], r["false_positive"], round(r["lesion_dice"], 3)
        (2, 1, 1, 1, 0.267)
    """
    from scipy import ndimage

    if style not in LESION_STYLES:
        raise ValueError(f"lesion-wise style {style!r}: use 'plain' or 'brats2023'")
    p, t = _binary(pred, "pred"), _binary(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and truth {t.shape} differ: compare masks on the same grid")
    structure = ndimage.generate_binary_structure(p.ndim, p.ndim if connectivity is None else connectivity)
    if style == "brats2023":
        return _lesion_wise_brats(p, t, structure, 50.0 if min_size is None else float(min_size),
                                  3 if dilation is None else int(dilation), spacing, empty_score)
    if dilation:
        raise ValueError("dilation applies to style='brats2023' only")
    min_size = 0 if min_size is None else min_size

    def components(m: np.ndarray) -> tuple[np.ndarray, list[int]]:
        lab, n = ndimage.label(m, structure=structure)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        keep = [i for i in range(1, n + 1) if sizes[i] >= max(min_size, 1)]
        return lab, keep

    t_lab, t_keep = components(t)
    p_lab, p_keep = components(p)
    p_kept = np.isin(p_lab, p_keep)
    dice, matched_pred = [], set()
    for i in t_keep:
        lesion = t_lab == i
        hits = [j for j in np.unique(p_lab[lesion & p_kept]) if j > 0]
        matched_pred.update(hits)
        found = np.isin(p_lab, hits) if hits else np.zeros_like(lesion)
        dice.append(2.0 * float((lesion & found).sum()) / float(lesion.sum() + found.sum()))
    false_pos = [j for j in p_keep if j not in matched_pred and not (t[p_lab == j]).any()]
    return _lesion_result(dice, len(false_pos), empty_score)


def _lesion_result(dice: list[float], false_positive: int, empty_score: float, detected: int | None = None
                   ) -> dict[str, Any]:
    detected = sum(d > 0 for d in dice) if detected is None else detected
    total = len(dice) + false_positive
    return {"true": len(dice), "detected": int(detected), "missed": int(len(dice) - detected),
            "false_positive": int(false_positive),
            "lesion_dice": float(sum(dice) / total) if total else float(empty_score), "dice": dice}


def _lesion_wise_brats(p: np.ndarray, t: np.ndarray, structure: np.ndarray, min_volume: float, dilation: int,
                       spacing: Sequence[float] | None, empty_score: float) -> dict[str, Any]:
    """BraTS 2023's lesion-wise matching (see :func:`lesion_wise`)."""
    from scipy import ndimage

    if spacing is None:
        raise ValueError("style='brats2023' needs spacing (its lesion volume threshold is in mm^3)")
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match the {p.ndim}D masks")
    if dilation < 0 or not math.isfinite(min_volume) or min_volume < 0:
        raise ValueError(f"dilation ({dilation}) and min_size ({min_volume} mm^3) must be >= 0")
    voxel = float(np.prod([float(s) for s in spacing]))
    grow = ndimage.generate_binary_structure(p.ndim, 2)  # the BraTS script's dilation structure (18 in 3D)

    def dilate(m: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(m, structure=grow, iterations=dilation) if dilation else m

    t_lab, _ = ndimage.label(t, structure=structure)
    merged, n = ndimage.label(dilate(t), structure=structure)  # true lesions within one dilated blob are one
    merged = np.where(t_lab > 0, merged, 0)
    p_lab, _ = ndimage.label(p, structure=structure)
    dice, matched, detected = [], set(), 0
    for i in range(1, n + 1):
        lesion = merged == i
        if not lesion.any():
            continue
        hits = [j for j in np.unique(p_lab[dilate(lesion)]) if j > 0]
        matched.update(hits)
        if lesion.sum() * voxel <= min_volume:
            continue  # too small to be scored; its matches are no false positives
        detected += bool(hits)
        found = np.isin(p_lab, hits) if hits else np.zeros_like(lesion)
        dice.append(2.0 * float((lesion & found).sum()) / float(lesion.sum() + found.sum()))
    false_pos = [j for j in np.unique(p_lab) if j > 0 and j not in matched]
    return _lesion_result(dice, len(false_pos), empty_score, detected)
