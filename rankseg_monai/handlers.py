"""Ignite/MONAI engine handlers: :class:`RankSEGHandler` (decide with RankSEG inside an engine) and
:class:`HausdorffDistance95` (HD95 in millimetres, from each item's ``MetaTensor`` spacing).

Event order in a MONAI workflow (``SupervisedEvaluator``/``SupervisedTrainer``, monai 1.6.1)::

    iteration: forward pass -> engine.state.output = {"image", "label", "pred"} (batched)
    IterationEvents.MODEL_COMPLETED, handlers in registration order:
        1. decollate                (registered in the engine's constructor when decollate=True)
        2. engine `postprocessing`  (registered in the constructor)
        3. RankSEGHandler           (registered when attached: from `val_handlers`/`train_handlers`, which the
                                     constructor attaches last, or by hand with handler.attach(engine) later)
    Events.ITERATION_COMPLETED:
        4. metric handlers (MeanDice, HausdorffDistance95, ...) update from engine.state.output

So RankSEGHandler always sees the output of the engine's ``postprocessing`` and always runs before the metrics.
Keep ``postprocessing`` free of decisions on ``"pred"`` (no ``AsDiscreted(argmax=True)``): either put the
activation there (``Activationsd(keys="pred", softmax=True)``) and let the handler decide (``to_onehot=C`` for
``MeanDice``), or set ``softmax=True`` on the handler; to run more transforms after the decision (e.g.
``KeepLargestConnectedComponentd``), put :class:`rankseg_monai.RankSEGd` inside ``postprocessing`` instead of
using the handler, or attach ``monai.handlers.PostProcessing`` after the handler.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, decollate_batch
from monai.engines.utils import IterationEvents
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance

from .transforms import RankSEGd

__all__ = ["RankSEGHandler", "HausdorffDistance95", "HausdorffDistance95Metric", "EMPTY_PRED", "EMPTY_TRUTH"]

logger = logging.getLogger(__name__)

#: bit flags of the per-(case, class) empty codes stored by :class:`HausdorffDistance95Metric`
EMPTY_PRED = 1
EMPTY_TRUTH = 2

_EMPTY_WARNING = r".* is all 0, this may result in nan/inf distance\."


class RankSEGHandler:
    """
    Apply :class:`rankseg_monai.RankSEGd` to every decollated item of ``engine.state.output`` at
    ``IterationEvents.MODEL_COMPLETED``, i.e. after the engine's ``postprocessing`` and before metric handlers
    (which update at ``ITERATION_COMPLETED``).  See the module docstring for the full event order.

    The engine must decollate its output (``decollate=True``, the default of MONAI's engines), so that
    ``engine.state.output`` is a list of dicts holding channel-first items.

    Args:
        keys: output keys to decide, default ``"pred"``.
        event: ``"MODEL_COMPLETED"`` (default; needs a MONAI workflow, which registers ``IterationEvents``) or
            ``"ITERATION_COMPLETED"`` (for a plain ``ignite.engine.Engine``: attach the handler *before* the
            metrics, because handlers of one event run in registration order).
        allow_missing_keys: don't raise if a key is missing from an item.
        rankseg_kwargs: options of :class:`rankseg_monai.RankSEGd` (``metric``, ``solver``, ``output_mode``,
            ``smooth``, ``pruning_prob``, ``softmax``, ``sigmoid``, ``temperature``, ``clamp``, ``to_onehot``, ...).

    Example:

        .. code-block:: python

            evaluator = SupervisedEvaluator(
                device=device, val_data_loader=loader, network=net, inferer=SlidingWindowInferer((96, 96, 96)),
                postprocessing=Compose([Activationsd(keys="pred", softmax=True),
                                        AsDiscreted(keys="label", to_onehot=3)]),
                key_val_metric={"dice": MeanDice(include_background=False,
                                                 output_transform=from_engine(["pred", "label"]))},
                val_handlers=[RankSEGHandler(keys="pred", to_onehot=3)],
            )
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        event: str = "MODEL_COMPLETED",
        allow_missing_keys: bool = False,
        **rankseg_kwargs: Any,
    ) -> None:
        event = str(event).upper()
        if event not in ("MODEL_COMPLETED", "ITERATION_COMPLETED"):
            raise ValueError(f"event must be 'MODEL_COMPLETED' or 'ITERATION_COMPLETED', got {event!r}")
        self.event = event
        self.transform = RankSEGd(keys=keys, allow_missing_keys=allow_missing_keys, **rankseg_kwargs)

    def attach(self, engine: Any) -> None:
        """Register the handler on ``engine`` (a MONAI workflow or, with ``event="ITERATION_COMPLETED"``, any
        Ignite engine)."""
        if self.event == "MODEL_COMPLETED":
            allowed = getattr(engine, "_allowed_events", [IterationEvents.MODEL_COMPLETED])
            if IterationEvents.MODEL_COMPLETED not in allowed:
                raise ValueError(
                    "this engine does not fire IterationEvents.MODEL_COMPLETED (it is not a MONAI workflow): use "
                    "RankSEGHandler(event='ITERATION_COMPLETED') and attach it before the metric handlers"
                )
            engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)
        else:
            from ignite.engine import Events

            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        if isinstance(output, dict):
            raise ValueError(
                "RankSEGHandler needs decollated engine outputs (a list of per-item dicts), got a batched dict: "
                "construct the engine with decollate=True (the default), or attach monai.handlers.DecollateBatch "
                "before this handler"
            )
        if not isinstance(output, list | tuple):
            raise TypeError(f"engine.state.output must be a list of dicts, got {type(output).__name__}")
        engine.state.output = [self.transform(item) for item in output]


def _items(data: Any, what: str) -> list:
    """A batch-first tensor/array or a sequence of channel-first items -> a list of channel-first items."""
    if isinstance(data, list | tuple):
        return list(data)
    if isinstance(data, torch.Tensor | np.ndarray):
        return list(decollate_batch(data, detach=True))
    raise TypeError(
        f"{what} must be a batch-first tensor or a list of channel-first tensors, got {type(data).__name__}"
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

    Inputs are one-hot/binary ``(C, *spatial)`` items (a list) or a batch-first tensor, as for MONAI's metrics.
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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EMPTY_WARNING)
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


class HausdorffDistance95(IgniteMetricHandler):
    """
    Ignite metric handler: 95th-percentile Hausdorff distance in millimetres, using each item's
    ``MetaTensor.pixdim`` (the spacing of the current affine, not ``meta["pixdim"]``, which is the raw header).

    After each epoch (``EPOCH_COMPLETED``):

        - ``engine.state.metrics[name]``: mean over all non-NaN (case, class) values (NaN when none).  With one
          foreground class this equals ``monai.handlers.HausdorffDistance(percentile=95, reduction="mean")``
          called with the right spacing; with several classes every valid (case, class) pair weighs the same.
        - ``engine.state.metrics[name + "_empty"]``: the number of (case, class) pairs whose prediction or truth
          is empty (their HD95 is NaN and left out of the mean); a warning is logged when it is > 0.
        - ``engine.state.metric_details[name]``: per-case values ``(N, C)`` (``C`` excludes the background unless
          ``include_background``), and ``metric_details[name + "_empty"]``: the empty codes ``(N, C)``
          (1 = empty prediction, 2 = empty truth, 3 = both), when ``save_details``.

    In distributed runs every rank computes its own cases; ``compute`` gathers the buffers of all ranks (every
    rank must take part, as for every MONAI metric handler).

    Args:
        include_background, distance_metric, percentile, directed, require_spacing: see
            :class:`HausdorffDistance95Metric`.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``; in a decollating MONAI engine use
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: store per-case values in ``engine.state.metric_details``.

    Example:

        .. code-block:: python

            evaluator = SupervisedEvaluator(
                ..., additional_metrics={"hd95": HausdorffDistance95(output_transform=from_engine(["pred", "label"]))},
            )
            evaluator.run()
            evaluator.state.metrics["hd95"], evaluator.state.metrics["hd95_empty"]
    """

    def __init__(
        self,
        include_background: bool = False,
        distance_metric: str = "euclidean",
        percentile: float = 95.0,
        directed: bool = False,
        require_spacing: bool = True,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = HausdorffDistance95Metric(
            include_background=include_background, distance_metric=distance_metric, percentile=percentile,
            directed=directed, require_spacing=require_spacing,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
        # ignite >= 0.5 "unrolls" a (list, list) output into one update per item, each re-batched with
        # unsqueeze(0), which garbles a MetaTensor's affine (and so its spacing): take the lists whole instead.
        # (ignite 0.4 never unrolls; the attribute is harmless there.)
        self._skip_unrolling = True

    def update(self, output: Sequence[Any]) -> None:
        if len(output) != 2:
            raise ValueError(f"output must have length 2 (y_pred, y), got {len(output)}")
        y_pred, y = output
        self.metric_fn(y_pred, y)

    def compute(self) -> float:
        metric_fn: HausdorffDistance95Metric = self.metric_fn  # type: ignore[assignment]
        buf = metric_fn.get_buffers()  # collective: gathers every rank's cases
        if buf is None:
            from ignite.exceptions import NotComputableError

            raise NotComputableError("HausdorffDistance95 must have at least one example before it can be computed")
        dist, code = buf
        valid = dist[~torch.isnan(dist)]
        mean = float(valid.mean()) if valid.numel() else math.nan
        n_empty = int((code > 0).sum())
        self._is_reduced = True
        if self._engine is None or self._name is None:
            raise RuntimeError("please call attach() to connect the handler to an engine first")
        self._engine.state.metrics[self._name + "_empty"] = n_empty
        if self.save_details:
            self._engine.state.metric_details[self._name] = dist
            self._engine.state.metric_details[self._name + "_empty"] = code
        if n_empty:
            logger.warning(
                "%s: %d of %d (case, class) pairs have an empty prediction (%d) or empty truth (%d); their HD95 is "
                "NaN and left out of the mean", self._name, n_empty, code.numel(),
                int(((code & EMPTY_PRED) > 0).sum()), int(((code & EMPTY_TRUTH) > 0).sum()),
            )
        return mean
