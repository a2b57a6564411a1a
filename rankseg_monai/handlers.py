"""Ignite/MONAI engine handlers: :class:`RankSEGHandler` (decide with RankSEG inside an engine) and
:class:`HausdorffDistance95` (HD95 in millimetres, from each item's ``MetaTensor`` spacing; the metric
itself is :class:`rankseg_monai.metrics.HausdorffDistance95Metric`).

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
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.engines.utils import IterationEvents
from monai.handlers import IgniteMetricHandler, PostProcessing

from .metrics import EMPTY_PRED, EMPTY_TRUTH, ExpectedScoreMetric, HausdorffDistance95Metric
from .transforms import RankSEGd

__all__ = ["RankSEGHandler", "HausdorffDistance95", "ExpectedScore"]

logger = logging.getLogger(__name__)


class RankSEGHandler(PostProcessing):
    """
    A ``monai.handlers.PostProcessing`` handler that applies :class:`rankseg_monai.RankSEGd` to every decollated
    item of ``engine.state.output`` at ``IterationEvents.MODEL_COMPLETED``, i.e. after the engine's
    ``postprocessing`` and before metric handlers (which update at ``ITERATION_COMPLETED``).  See the module
    docstring for the full event order.

    The engine must decollate its output (``decollate=True``, the default of MONAI's engines), so that
    ``engine.state.output`` is a list of dicts holding channel-first items.  Unlike a bare ``PostProcessing``, the
    handler refuses a batched output and an engine without MONAI's iteration events with a message that names
    the fix, and validates every RankSEG option when it is built.

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
        if not isinstance(event, str) or event.upper() not in ("MODEL_COMPLETED", "ITERATION_COMPLETED"):
            raise ValueError(f"event must be 'MODEL_COMPLETED' or 'ITERATION_COMPLETED', got {event!r}")
        super().__init__(RankSEGd(keys=keys, allow_missing_keys=allow_missing_keys, **rankseg_kwargs),
                         event=event.upper())

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
        super().attach(engine)

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
        if not isinstance(engine.state.batch, list) or len(engine.state.batch) != len(output):
            # a plain Ignite engine may keep a batched (or no) input: decide on the outputs alone
            engine.state.output = [self.transform(item) for item in output]
            return
        super().__call__(engine)


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
            :class:`HausdorffDistance95Metric` (in :mod:`rankseg_monai.metrics`).
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


class ExpectedScore(IgniteMetricHandler):
    """
    Ignite metric handler for the label-free expected Dice/IoU estimates that ``RankSEGd(...,
    expected_score=True)`` (or ``RankSEGHandler(expected_score=True)``) attaches to each case, the MONAI way:
    ``engine.state.metrics[name]`` holds the mean estimate (logged by ``StatsHandler``), and with ``save_details``
    ``engine.state.metric_details[name]`` holds the per-case ``(N, C)`` values, which ``monai.handlers.MetricsSaver``
    writes to ``<name>_raw.csv`` (one row per case: the review list without labels).  Gathered over distributed
    ranks like every MONAI metric.

    Args:
        include_background, reduction: see :class:`rankseg_monai.metrics.ExpectedScoreMetric`.
        output_transform: extracts the estimates from ``engine.state.output``, e.g.
            ``monai.handlers.from_engine(["pred_expected_dice"])`` (or ``"pred_expected_dice_argmax"`` for the
            decision RankSEG replaced).
        save_details: keep the per-case values in ``engine.state.metric_details``.

    Example:

        .. code-block:: python

            evaluator = SupervisedEvaluator(
                ..., val_handlers=[RankSEGHandler(keys="pred", to_onehot=3, expected_score=True)],
                additional_metrics={
                    "expected_dice": ExpectedScore(output_transform=from_engine(["pred_expected_dice"]))},
            )
    """

    def __init__(self, include_background: bool = False, reduction: str = "mean",
                 output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(metric_fn=ExpectedScoreMetric(include_background, reduction),
                         output_transform=output_transform, save_details=save_details)
        self._skip_unrolling = True  # take the per-case list whole (ignite >= 0.5 would unroll it)

    def update(self, output: Any) -> None:
        """``output``: the per-case estimates (a list of ``(C,)`` tensors or a ``(B, C)`` tensor)."""
        self.metric_fn(output)
