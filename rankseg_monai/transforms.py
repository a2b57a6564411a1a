"""MONAI transforms for RankSEG decisions: :class:`RankSEG` (array) and :class:`RankSEGd` (dictionary).

They sit where ``monai.transforms.AsDiscrete(argmax=True)`` sits in a post-processing chain, and take the same
kind of input: one **channel-first item without batch dim**, ``(C, *spatial)``, holding per-class probabilities
(or logits with ``softmax=True`` / ``sigmoid=True``).  A batch from a ``DataLoader`` or an inferer must be
decollated first (``monai.data.decollate_batch``), as for every MONAI post transform; inside an Ignite engine use
:class:`rankseg_monai.handlers.RankSEGHandler` or put :class:`RankSEGd` in the engine's ``postprocessing``.

The decision itself is :func:`rankseg_monai.functional.decide` with the options validated once at construction
(:class:`rankseg_monai.options.RankSEGOptions`); these classes only adapt layout, activation and types to
MONAI's conventions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, ensure_tuple_rep, issequenceiterable

from ._arrays import as_tensor, numpy_dtype
from .activation import activate, check_logits
from .calibrator import apply_calibration, fingerprint_of, resolve_calibration
from .functional import baseline_decision, decide, expected_score
from .options import (
    DEFAULT_PRUNING_PROB,
    DEFAULT_VOID_INDEX,
    RankSEGOptions,
    check_bool,
    check_label_capacity,
    check_label_dtype,
    label_range,
    smallest_label_dtype,
)

__all__ = ["RankSEG", "RankSEGd", "RankSEGD", "RankSEGDict"]

#: estimates key (and ``MetaTensor`` meta key) of the reasons a case lies outside a calibration's fingerprint
OUTSIDE_KEY = "outside_calibration"
_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(RankSEGOptions))


def _check_to_onehot(to_onehot: Any, output_mode: str) -> int | None:
    if to_onehot is None:
        return None
    if isinstance(to_onehot, bool) or not isinstance(to_onehot, int) or to_onehot < 1:
        raise ValueError(f"to_onehot must be the number of classes (a positive int) or None, got {to_onehot!r}")
    if output_mode == "multilabel":
        raise ValueError(
            "to_onehot only applies to output_mode='multiclass': multilabel output already has one mask per "
            "channel; drop to_onehot"
        )
    return int(to_onehot)


def _check_output_dtype(dtype: Any) -> torch.dtype | None:
    """The output ``dtype`` as a torch dtype (``None``: the input's dtype)."""
    if dtype is None or dtype == torch.bool or dtype is bool:
        return None if dtype is None else torch.bool
    try:
        return check_label_dtype(dtype)
    except ValueError:
        raise ValueError(f"dtype={dtype!r} is not an output dtype: use torch.float (default, as AsDiscrete), "
                         "torch.uint8, torch.int64 or torch.bool") from None


def _check_spatial_dims(spatial_dims: Any) -> int | None:
    if spatial_dims is not None and (isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int)
                                     or spatial_dims < 1):
        raise ValueError(f"spatial_dims must be a positive int (2 or 3 for images) or None, got {spatial_dims!r}")
    return spatial_dims


def _solver_label_dtype(options: RankSEGOptions, dtype: torch.dtype | None, to_onehot: int | None) -> torch.dtype:
    """The dtype the solver writes a multiclass label map in: the output dtype itself when it can be (then no
    int64 map and no copy: the largest allocation of the call is saved), uint8-or-wider labels for one-hot
    output (``to_onehot >= C`` bounds every label), int64 otherwise (a bool output is cast from it)."""
    if to_onehot is not None:
        return smallest_label_dtype(*label_range(to_onehot, options.unassigned_policy, options.void_index))
    if dtype is None or dtype == torch.bool:
        return torch.int64
    return dtype


class RankSEG(Transform):
    """
    Turn per-class probabilities into the segmentation that maximises the expected Dice (or IoU) score, with
    RankSEG (Dai & Li, JMLR 2023; NeurIPS 2025).  A drop-in replacement for ``AsDiscrete(argmax=True)`` (or
    ``AsDiscrete(threshold=0.5)`` for multilabel outputs) in a post-processing chain.

    The input is one channel-first item **without batch dim**, ``(C, *spatial)``: decollate batches first
    (``monai.data.decollate_batch``), as for every MONAI post transform.  A batched tensor cannot always be told
    apart from an item: without ``spatial_dims`` a ``(B, C, H, W, D)`` array is read as ``B`` channels of a 4D
    image.  Set ``spatial_dims`` to make that mistake an error.

    Output (``dtype`` defaults to ``torch.float``, as for ``AsDiscrete``):

        - ``output_mode="multiclass"``: a label map ``(1, *spatial)`` with values in ``[0, C)`` (or ``void_index``
          with ``unassigned_policy="void"``); with ``to_onehot=N``: one-hot ``(N, *spatial)`` (void voxels get an
          all-zero vector).
        - ``output_mode="multilabel"``: one mask per channel, ``(C, *spatial)`` (masks may overlap).

    A ``MetaTensor`` input gives a ``MetaTensor`` with the same meta data and affine; no entry is pushed to
    ``applied_operations`` (those of the input are kept), so ``Invertd`` still works on the output.  A numpy
    input gives a numpy array, a torch tensor a tensor on the input's device.

    Args:
        metric: ``"dice"`` (default) or ``"iou"`` (also ``"acc"`` with ``solver="argmax"``/``"tr"``).
        solver: ``"rma"`` (default), or for multilabel Dice ``"ba"``, ``"trna"``, ``"ba+trna"``, ``"exact"``.
        output_mode: ``"multiclass"`` (non-overlapping label map) or ``"multilabel"`` (one mask per channel).
        smooth: the smoothing constant of the metric, ``>= 0``.
        pruning_prob: ``"auto"`` (default): keep a class when its best mask's expected Dice beats the empty
            mask's (see ``docs/calibration.md``, which measures it against ``0.5``/``0``); a number ``p``: keep
            a class only if its largest probability is strictly greater than ``p`` (rankseg 0.0.8 uses ``0.5``);
            ``0`` disables pruning.
        unassigned_policy: multiclass only; ``"max_score"`` gives voxels chosen by no class to the best class,
            ``"void"`` labels them ``void_index``.
        void_index: label of unassigned voxels with ``unassigned_policy="void"``; must lie outside ``[0, C)``.
        softmax: apply ``softmax`` over the channels first (the input holds logits).  An input whose values all lie in
            ``[0, 1]`` (probabilities already) raises a ``ValueError``, as the command line's ``--softmax`` does.
        sigmoid: apply ``sigmoid`` per channel first (the input holds logits; the same check).  Not together with
            ``softmax``.
        force_activation: apply ``softmax``/``sigmoid`` even to an input that looks like probabilities (logits that
            happen to lie in ``[0, 1]``); default ``False``.
        temperature: divide the logits by this before ``softmax``/``sigmoid`` (temperature scaling); a positive
            scalar or one value per channel.  Requires ``softmax=True`` or ``sigmoid=True``.
        clamp: clip probabilities to ``[0, 1]`` before deciding.  Meant for the small overshoots that spline
            interpolation leaves (e.g. ``Invertd`` of probabilities resampled with ``mode=3``, MONAI issue #7836);
            values further than ``1e-2`` outside ``[0, 1]``, NaN and inf still raise.
        to_onehot: multiclass only; the number of classes ``N >= C`` of a one-hot output.  ``None``: label map.
        dtype: output dtype, default ``torch.float`` (as ``AsDiscrete``); ``None`` keeps the input's dtype.  A
            label map must fit in it exactly (``torch.uint8`` holds up to 255 labels, ``torch.bool`` two,
            ``float16`` labels up to 2048): otherwise the call raises, naming a dtype that fits.  One-hot and
            multilabel masks fit in any dtype.
        device: where to compute (e.g. ``"cuda"`` for a CPU input); the output stays on the input's device.
            ``None``: where the input lives.
        spatial_dims: when given, inputs must have exactly ``spatial_dims + 1`` dims (channel + spatial); a
            batched tensor then raises an error instead of being read as extra channels.
        guard: ``None`` (default) or ``True``/a :class:`rankseg_monai.guard.Guard`: fall back to argmax
            for classes whose probabilities look too diffuse for RankSEG (label-free; see
            ``docs/calibration.md``).
        regions: decide on nested regions, the structures LiTS/KiTS/BraTS score, instead of on the channels
            (nnU-Net's ``dataset.json`` form: ``{"liver": [1, 2], "tumour": [2]}`` or ``[[1, 2], [2]]``): the
            label map maximises the summed expected Dice of the regions, and its region masks are nested.  With
            ``output_mode="multilabel"`` the output is one mask per region ``(R, *spatial)``, in the order given
            (e.g. MONAI's BraTS channels TC, WT, ET).  See ``docs/regions.md``.
        regions_class_order: the label nnU-Net paints for each region (for a label map from region
            probabilities when a region has several labels of its own).
        region_probs: the channels are region probabilities (one sigmoid channel per region, in the order of
            ``regions``: nnU-Net region models, MONAI's BraTS pipeline after ``Activations(sigmoid=True)``), not
            class probabilities (a region's probability is then the sum of its classes').
        expected_score: also estimate, without labels, the Dice (IoU for ``metric="iou"``) each channel's or
            region's mask will score, for RankSEG and for argmax (or ``p > 0.5`` / nnU-Net's painting): float64
            ``(C,)`` tensors in a ``MetaTensor`` output's ``meta["rankseg_expected_dice"]`` and
            ``meta["argmax_expected_dice"]``, and in ``RankSEGd`` under the keys ``<key>_expected_dice`` and
            ``<key>_expected_dice_argmax``.  Two more passes over the probabilities.  See
            ``docs/expected_dice.md``.
        calibration: a fitted calibration (``rankseg-monai calibrate``'s ``calibration.json``, its path, or a
            :class:`rankseg_monai.calibrator.Calibration`): the probabilities (after ``softmax``/``sigmoid``) are
            calibrated before RankSEG decides, the expected scores are those of the calibrated probabilities, and
            the classes whose held-out report recommends argmax keep argmax.  Its classes/regions and kind must
            match the input (a mismatch raises before any work).  With ``expected_score=True`` the estimates also
            hold ``"outside_calibration"``: why the item lies outside the calibration cases' fingerprint (a list of
            reasons, empty when inside; ``meta["outside_calibration"]``, ``RankSEGd``: ``<key>_outside_calibration``).
            See ``docs/calibration.md``.

    Every option is validated at construction (:class:`rankseg_monai.options.RankSEGOptions`), so a bad value in
    a bundle config fails when the config is parsed; only what depends on the number of channels (e.g.
    ``void_index`` inside ``[0, C)``, a ``dtype`` too narrow for ``C`` labels) is checked on each call.

    Activations run on the input's device in float32 at least (float16/bfloat16 logits are promoted).

    Example:

        >>> import torch
        >>> from rankseg_monai import RankSEG
        >>> probs = torch.tensor([[[0.9, 0.3, 0.6]], [[0.1, 0.7, 0.4]]])  # (C=2, H=1, W=3)
        >>> RankSEG()(probs)
        tensor([[[0., 1., 0.]]])
        >>> RankSEG(to_onehot=2)(probs).shape
        torch.Size([2, 1, 3])
        >>> fg = torch.tensor([[[0.9, 0.6, 0.45, 0.1]]])  # (C=1, H=1, W=4) foreground probabilities
        >>> RankSEG(output_mode="multilabel", pruning_prob=0.0, dtype=torch.bool)(fg)
        tensor([[[ True,  True,  True, False]]])
        >>> RankSEG(softmax=True, temperature=2.0)(torch.tensor([[[4.0, -1.0]], [[0.0, 3.0]]]))
        tensor([[[0., 1.]]])
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        metric: str = "dice",
        solver: str = "rma",
        output_mode: str = "multiclass",
        smooth: float = 0.0,
        pruning_prob: float | str = DEFAULT_PRUNING_PROB,
        unassigned_policy: str = "max_score",
        void_index: int = DEFAULT_VOID_INDEX,
        softmax: bool = False,
        sigmoid: bool = False,
        temperature: float | Sequence[float] | None = None,
        clamp: bool = False,
        to_onehot: int | None = None,
        dtype: torch.dtype | None = torch.float,
        device: str | torch.device | None = None,
        spatial_dims: int | None = None,
        guard: Any = None,
        regions: Any = None,
        regions_class_order: Sequence[int] | None = None,
        region_probs: bool = False,
        expected_score: bool = False,
        force_activation: bool = False,
        calibration: Any = None,
    ) -> None:
        self.force_activation = check_bool("force_activation", force_activation)
        self.options = RankSEGOptions(
            metric=metric, solver=solver, output_mode=output_mode, smooth=smooth, pruning_prob=pruning_prob,
            unassigned_policy=unassigned_policy, void_index=void_index, softmax=softmax, sigmoid=sigmoid,
            temperature=temperature, clamp=clamp, device=device, guard=guard, regions=regions,
            regions_class_order=regions_class_order, region_probs=region_probs, calibration=calibration,
        )
        self.to_onehot = _check_to_onehot(to_onehot, self.options.output_mode)
        self.dtype = _check_output_dtype(dtype)
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.expected_score = check_bool("expected_score", expected_score)
        self._solver_options = self.options.replace(
            label_dtype=_solver_label_dtype(self.options, self.dtype, self.to_onehot))

    def __getattr__(self, name: str) -> Any:
        # the validated options read as attributes (``transform.metric``, ``transform.pruning_prob``, ...)
        options = self.__dict__.get("options")
        if options is not None and name in _OPTION_NAMES:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __call__(
        self,
        img: NdarrayOrTensor,
        metric: str | None = None,
        solver: str | None = None,
        output_mode: str | None = None,
        smooth: float | None = None,
        pruning_prob: float | str | None = None,
        unassigned_policy: str | None = None,
        void_index: int | None = None,
        softmax: bool | None = None,
        sigmoid: bool | None = None,
        temperature: float | Sequence[float] | None = None,
        clamp: bool | None = None,
        to_onehot: int | None = None,
    ) -> NdarrayOrTensor:
        """
        The decision of one item; with ``expected_score=True`` a ``MetaTensor`` output also carries the estimates in
        its meta data (see :meth:`decide_with_estimates`).

        Args:
            img: probabilities (or logits with ``softmax``/``sigmoid``) of one item, ``(C, *spatial)``: a torch
                tensor, ``MetaTensor`` or numpy array.
            metric, solver, output_mode, smooth, pruning_prob, unassigned_policy, void_index, softmax, sigmoid,
                temperature, clamp, to_onehot: override the values given at construction for this call;
                ``None`` keeps them (so ``temperature``/``to_onehot`` set at construction cannot be switched off
                here).

        Raises:
            ValueError: bad shape (batched input with ``spatial_dims`` set, missing spatial dims), bad option
                values, probabilities outside ``[0, 1]``, an output ``dtype`` that cannot hold every label.
            TypeError: non-floating input (e.g. a label map).
        """
        return self.decide_with_estimates(img, metric=metric, solver=solver, output_mode=output_mode, smooth=smooth,
                                          pruning_prob=pruning_prob, unassigned_policy=unassigned_policy,
                                          void_index=void_index, softmax=softmax, sigmoid=sigmoid,
                                          temperature=temperature, clamp=clamp, to_onehot=to_onehot)[0]

    def decide_with_estimates(self, img: NdarrayOrTensor, **overrides: Any) -> tuple[NdarrayOrTensor, dict | None]:
        """``(decision, estimates)``: the decision as :meth:`__call__` returns it and, with ``expected_score=True``,
        the model's own estimate of the Dice (IoU for ``metric="iou"``) each channel's (or region's) mask will score,
        for RankSEG and for the decision it replaces (:func:`rankseg_monai.functional.baseline_decision`: argmax,
        ``p > 0.5``, or nnU-Net's painting), as float64 ``(C,)`` tensors ``{"rankseg": ..., "argmax": ...}``
        (:func:`rankseg_monai.functional.expected_score`); ``None`` without ``expected_score``.  A ``MetaTensor``
        output also holds them in ``meta["rankseg_expected_<metric>"]`` and ``meta["argmax_expected_<metric>"]``.
        """
        metric, solver, output_mode = overrides.get("metric"), overrides.get("solver"), overrides.get("output_mode")
        smooth, pruning_prob = overrides.get("smooth"), overrides.get("pruning_prob")
        unassigned_policy, void_index = overrides.get("unassigned_policy"), overrides.get("void_index")
        softmax, sigmoid, temperature = overrides.get("softmax"), overrides.get("sigmoid"), overrides.get("temperature")
        clamp, to_onehot = overrides.get("clamp"), overrides.get("to_onehot")
        overrides = {k: v for k, v in (("metric", metric), ("solver", solver), ("output_mode", output_mode),
                                       ("smooth", smooth), ("pruning_prob", pruning_prob),
                                       ("unassigned_policy", unassigned_policy), ("void_index", void_index),
                                       ("softmax", softmax), ("sigmoid", sigmoid), ("temperature", temperature),
                                       ("clamp", clamp)) if v is not None}
        onehot = self.to_onehot if to_onehot is None else to_onehot
        if overrides or onehot != self.to_onehot:
            opts = self.options.replace(**overrides)
            onehot = _check_to_onehot(onehot, opts.output_mode)
            opts = opts.replace(label_dtype=_solver_label_dtype(opts, self.dtype, onehot))
        else:
            opts = self._solver_options

        x, _ = as_tensor(img, "img")
        self._check_shape(tuple(x.shape))
        num_channels = x.shape[0]
        out_dtype = self.dtype if self.dtype is not None else x.dtype
        if isinstance(img, np.ndarray):
            numpy_dtype(out_dtype)  # bfloat16: no numpy dtype, an error naming the fix (before any work)
        if onehot is not None:
            self._check_onehot(onehot, num_channels, opts)
        elif opts.output_mode == "multiclass" and num_channels > 1:
            check_label_capacity(out_dtype, *opts.label_bounds(num_channels), name="dtype")
        if opts.activation is not None:
            activated = activate(x, opts.activation, opts.temperature, dim=0)  # checks the temperature first
            if not self.force_activation:
                check_logits(x, opts.activation)  # as the command line: no second activation over probabilities
            x = activated
        if opts.calibration is not None:
            opts.check_classes(num_channels)  # a mismatched calibration names the fix before any work
            x = apply_calibration(x, opts.calibration, dim=0)
        out = decide(x.unsqueeze(0), opts)
        estimates = self._estimates(x, out, opts) if self.expected_score else None
        if estimates is not None and opts.calibration is not None and opts.calibration.fingerprint:
            # why this case lies outside the calibration cases' fingerprint (empty: inside)
            estimates[OUTSIDE_KEY] = opts.calibration.outside(fingerprint_of(x, estimates["rankseg"], opts))
        # multiclass: (1, *spatial) labels -> the batch dim of one becomes the channel dim of the label map;
        # multilabel: (1, C, *spatial) bool -> (C, *spatial)
        out = out if out.ndim == x.ndim else out[0]
        if onehot is not None:  # (1, *spatial) vs (n, 1, ...) -> (n, *spatial); void voxels match no class
            out = out == torch.arange(onehot, device=out.device).reshape(onehot, *([1] * (out.ndim - 1)))
        # a permuted input (e.g. after Invertd) is solved without a copy and gives a view in its memory order;
        # the transform returns a contiguous result, as AsDiscrete does (an output-sized copy at most)
        result, *_ = convert_to_dst_type(out.contiguous(), img, dtype=self.dtype)
        if estimates is not None and isinstance(result, MetaTensor):
            for name, value in estimates.items():
                result.meta[name if name == OUTSIDE_KEY else f"{name}_expected_{opts.metric}"] = value
        return result, estimates

    @staticmethod
    def _estimates(x: torch.Tensor, out: torch.Tensor, opts: RankSEGOptions) -> dict[str, torch.Tensor]:
        kw = dict(metric=opts.metric, smooth=opts.smooth, regions=opts.regions, region_probs=opts.region_probs,
                  clamp=opts.clamp)
        batch = x.unsqueeze(0)
        return {"rankseg": expected_score(batch, out, **kw)[0].cpu(),
                "argmax": expected_score(batch, baseline_decision(batch, opts), **kw)[0].cpu()}

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if self.spatial_dims is not None and len(shape) != self.spatial_dims + 1:
            hint = (
                "it looks batched: decollate it first (monai.data.decollate_batch), use "
                "rankseg_monai.RankSEGHandler in an engine, or call rankseg_monai.functional.rankseg on the batch"
                if len(shape) == self.spatial_dims + 2
                else "pass one channel-first item"
            )
            raise ValueError(
                f"RankSEG expects one channel-first item (C, *spatial) with spatial_dims={self.spatial_dims}, i.e. "
                f"{self.spatial_dims + 1} dims, got shape {shape}: {hint}"
            )
        if len(shape) < 2:
            raise ValueError(
                f"RankSEG expects a channel-first item (C, *spatial) with at least one spatial dim, got shape {shape}: "
                "add a channel dim with img[None] for a single foreground-probability map"
            )

    @staticmethod
    def _check_onehot(n: int, num_channels: int, opts: RankSEGOptions) -> None:
        if n < num_channels:
            raise ValueError(
                f"to_onehot={n} is smaller than the number of input channels ({num_channels}): set "
                f"to_onehot={num_channels}"
            )
        if opts.unassigned_policy == "void" and 0 <= opts.void_index < n:
            raise ValueError(
                f"void_index={opts.void_index} falls inside the one-hot range [0, {n}) and would become a class "
                "channel: choose void_index >= to_onehot (void voxels then get an all-zero one-hot vector)"
            )


class RankSEGd(MapTransform):
    """
    Dictionary-based wrapper of :py:class:`rankseg_monai.RankSEG`.

    Every option can be one value for all keys or a sequence with one value per key (as in
    ``monai.transforms.AsDiscreted``).  ``temperature`` is special because a single transform already accepts
    a sequence (one value per channel): a flat sequence of numbers is per-channel and shared by all keys; a
    per-key value is a sequence of ``len(keys)`` entries where at least one entry is ``None`` or a sequence,
    e.g. ``temperature=[[1.5], None]`` or ``temperature=[[1.0, 2.0], [1.5]]``.

    Example:

        >>> import torch
        >>> from rankseg_monai import RankSEGd
        >>> data = {"pred": torch.tensor([[[0.9, 0.3, 0.6]], [[0.1, 0.7, 0.4]]]), "label": torch.zeros(1, 1, 3)}
        >>> RankSEGd(keys="pred", to_onehot=2)(data)["pred"].shape
        torch.Size([2, 1, 3])
        >>> out = RankSEGd(keys=["a", "b"], output_mode=["multiclass", "multilabel"], allow_missing_keys=True)(
        ...     {"a": torch.rand(3, 4, 4)})
        >>> out["a"].shape
        torch.Size([1, 4, 4])
    """

    backend = RankSEG.backend

    def __init__(
        self,
        keys: KeysCollection,
        metric: Sequence[str] | str = "dice",
        solver: Sequence[str] | str = "rma",
        output_mode: Sequence[str] | str = "multiclass",
        smooth: Sequence[float] | float = 0.0,
        pruning_prob: Sequence[float | str] | float | str = DEFAULT_PRUNING_PROB,
        unassigned_policy: Sequence[str] | str = "max_score",
        void_index: Sequence[int] | int = DEFAULT_VOID_INDEX,
        softmax: Sequence[bool] | bool = False,
        sigmoid: Sequence[bool] | bool = False,
        temperature: Any = None,
        clamp: Sequence[bool] | bool = False,
        to_onehot: Sequence[int | None] | int | None = None,
        dtype: Sequence[torch.dtype | None] | torch.dtype | None = torch.float,
        device: Sequence[str | torch.device | None] | str | torch.device | None = None,
        spatial_dims: Sequence[int | None] | int | None = None,
        guard: Any = None,
        regions: Any = None,
        regions_class_order: Sequence[int] | None = None,
        region_probs: bool = False,
        expected_score: bool = False,
        calibration: Any = None,
        allow_missing_keys: bool = False,
        force_activation: bool = False,
    ) -> None:
        """
        Args:
            keys: keys of the items to decide (usually ``"pred"``).
                See also: :py:class:`monai.transforms.compose.MapTransform`
            metric, solver, output_mode, smooth, pruning_prob, unassigned_policy, void_index, softmax, sigmoid,
                clamp, to_onehot, dtype, device, spatial_dims: see :py:class:`RankSEG`; each can also be a
                sequence, one element per key.
            guard, regions, regions_class_order, region_probs: see :py:class:`RankSEG` (one value for all keys).
            force_activation: see :py:class:`RankSEG` (one value, or one per key).
            expected_score: see :py:class:`RankSEG`; the estimates go to the keys ``<key>_expected_<metric>``
                (RankSEG's decision) and ``<key>_expected_<metric>_argmax`` (the decision it replaces), float64
                ``(C,)`` tensors (one per region with ``regions``), next to the decision.
            temperature: see :py:class:`RankSEG` and the class docstring for per-key values.
            calibration: see :py:class:`RankSEG` (one value for all keys, loaded once).
            allow_missing_keys: don't raise an exception if a key is missing.
        """
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        per_key = {
            "metric": ensure_tuple_rep(metric, n),
            "solver": ensure_tuple_rep(solver, n),
            "output_mode": ensure_tuple_rep(output_mode, n),
            "smooth": ensure_tuple_rep(smooth, n),
            "pruning_prob": ensure_tuple_rep(pruning_prob, n),
            "unassigned_policy": ensure_tuple_rep(unassigned_policy, n),
            "void_index": ensure_tuple_rep(void_index, n),
            "softmax": ensure_tuple_rep(softmax, n),
            "sigmoid": ensure_tuple_rep(sigmoid, n),
            "temperature": self._temperature_per_key(temperature, n),
            "clamp": ensure_tuple_rep(clamp, n),
            "to_onehot": ensure_tuple_rep(to_onehot, n),
            "dtype": ensure_tuple_rep(dtype, n),
            "device": ensure_tuple_rep(device, n),
            "spatial_dims": ensure_tuple_rep(spatial_dims, n),
            "guard": (guard,) * n,
            "regions": (regions,) * n,
            "regions_class_order": (regions_class_order,) * n,
            "region_probs": (region_probs,) * n,
            "expected_score": (expected_score,) * n,
            "force_activation": ensure_tuple_rep(force_activation, n),
            "calibration": (resolve_calibration(calibration),) * n,
        }
        self.rankseg = tuple(RankSEG(**{name: values[i] for name, values in per_key.items()}) for i in range(n))

    @staticmethod
    def _temperature_per_key(temperature: Any, n: int) -> tuple:
        if temperature is None or isinstance(temperature, Real):
            return (temperature,) * n
        if isinstance(temperature, torch.Tensor | np.ndarray):
            temperature = temperature.tolist()
        if issequenceiterable(temperature) and any(t is None or issequenceiterable(t) for t in temperature):
            if len(temperature) != n:
                raise ValueError(
                    f"temperature {temperature!r} looks per-key (it holds None or sequences) but has "
                    f"{len(temperature)} entries for {n} keys: give one entry per key"
                )
            return tuple(temperature)
        return (temperature,) * n  # a flat sequence of numbers: per channel, shared by every key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, transform in self.key_iterator(d, self.rankseg):
            d[key], estimates = transform.decide_with_estimates(d[key])
            if estimates is not None:
                d[f"{key}_expected_{transform.metric}"] = estimates["rankseg"]
                d[f"{key}_expected_{transform.metric}_argmax"] = estimates["argmax"]
                if OUTSIDE_KEY in estimates:
                    d[f"{key}_{OUTSIDE_KEY}"] = estimates[OUTSIDE_KEY]
        return d


RankSEGD = RankSEGDict = RankSEGd
