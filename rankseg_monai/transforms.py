"""MONAI transforms for RankSEG decisions: :class:`RankSEG` (array) and :class:`RankSEGd` (dictionary).

They sit where ``monai.transforms.AsDiscrete(argmax=True)`` sits in a post-processing chain, and take the same
kind of input: one **channel-first item without batch dim**, ``(C, *spatial)``, holding per-class probabilities
(or logits with ``softmax=True`` / ``sigmoid=True``).  A batch from a ``DataLoader`` or an inferer must be
decollated first (``monai.data.decollate_batch``), as for every MONAI post transform; inside an Ignite engine use
:class:`rankseg_monai.handlers.RankSEGHandler` or put :class:`RankSEGd` in the engine's ``postprocessing``.

The decision itself is :func:`rankseg_monai.functional.rankseg`; these classes only adapt layout, activation and
types to MONAI's conventions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, ensure_tuple_rep, issequenceiterable

from .functional import (
    check_label_dtype,
    check_label_range,
    label_range,
    numpy_as_tensor,
    rankseg,
    smallest_label_dtype,
)

__all__ = ["RankSEG", "RankSEGd", "RankSEGD", "RankSEGDict"]

_UNSET: Any = None  # marker name for "use the value given at construction" in ``__call__``


def _check_temperature(temperature: Any) -> float | tuple[float, ...] | None:
    """``None``, a positive finite scalar, or a non-empty sequence of them (one per channel, or length 1)."""
    if temperature is None:
        return None
    if isinstance(temperature, torch.Tensor | np.ndarray):
        temperature = temperature.tolist()
    if isinstance(temperature, bool):
        raise TypeError("temperature must be a positive number or a sequence of positive numbers, got a bool")
    values = [temperature] if isinstance(temperature, Real) else temperature
    if not issequenceiterable(values) or len(values) == 0:
        raise TypeError(
            f"temperature must be a positive number or a non-empty sequence of them (one per channel), got "
            f"{temperature!r}"
        )
    out = []
    for t in values:
        if isinstance(t, bool) or not isinstance(t, Real):
            raise TypeError(f"temperature values must be real numbers, got {t!r}")
        if not (math.isfinite(float(t)) and float(t) > 0.0):
            raise ValueError(f"temperature values must be finite and > 0, got {t!r}")
        out.append(float(t))
    return out[0] if isinstance(temperature, Real) else tuple(out)


def _check_activation(softmax: bool, sigmoid: bool, temperature: Any) -> None:
    if softmax and sigmoid:
        raise ValueError(
            "softmax=True and sigmoid=True are mutually exclusive: use softmax for mutually exclusive classes "
            "(output_mode='multiclass') or sigmoid for independent channels (output_mode='multilabel')"
        )
    if temperature is not None and not (softmax or sigmoid):
        raise ValueError(
            "temperature scales logits before the activation: set softmax=True (or sigmoid=True) together with "
            "temperature, or drop temperature if the input already holds probabilities"
        )


def _check_to_onehot(to_onehot: Any, output_mode: str) -> None:
    if to_onehot is None:
        return
    if isinstance(to_onehot, bool) or not isinstance(to_onehot, int) or to_onehot < 1:
        raise ValueError(f"to_onehot must be the number of classes (a positive int) or None, got {to_onehot!r}")
    if isinstance(output_mode, str) and output_mode.strip().lower() == "multilabel":
        raise ValueError(
            "to_onehot only applies to output_mode='multiclass': multilabel output already has one mask per "
            "channel; drop to_onehot"
        )


def _direct_label_dtype(dtype: Any, labels: tuple[int, int]) -> torch.dtype:
    """The output ``dtype`` when the solver can write the label map in it directly (it holds every label exactly),
    else int64 (then ``convert_to_dst_type`` casts, as ``AsDiscrete`` does).  Writing float32 labels directly
    saves the int64 map, the largest allocation of the call (8 bytes per voxel)."""
    if dtype is None:
        return torch.int64
    try:
        target = check_label_dtype(dtype)
        check_label_range(target, *labels)
    except (TypeError, ValueError):
        return torch.int64
    return target


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
        softmax: apply ``softmax`` over the channels first (the input holds logits).
        sigmoid: apply ``sigmoid`` per channel first (the input holds logits).  Not together with ``softmax``.
        temperature: divide the logits by this before ``softmax``/``sigmoid`` (temperature scaling); a positive
            scalar or one value per channel.  Requires ``softmax=True`` or ``sigmoid=True``.
        clamp: clip probabilities to ``[0, 1]`` before deciding.  Meant for the small overshoots that spline
            interpolation leaves (e.g. ``Invertd`` of probabilities resampled with ``mode=3``, MONAI issue #7836);
            values further than ``1e-2`` outside ``[0, 1]``, NaN and inf still raise.
        to_onehot: multiclass only; the number of classes ``N >= C`` of a one-hot output.  ``None``: label map.
        dtype: output dtype, default ``torch.float`` (as ``AsDiscrete``); ``torch.int64``/``torch.bool`` work too.
        device: where to compute (e.g. ``"cuda"`` for a CPU input); the output stays on the input's device.
            ``None``: where the input lives.
        spatial_dims: when given, inputs must have exactly ``spatial_dims + 1`` dims (channel + spatial); a
            batched tensor then raises an error instead of being read as extra channels.
        guard: ``None`` (default) or ``True``/a :class:`rankseg_monai.calibration.Guard`: fall back to argmax
            for classes whose probabilities look too diffuse for RankSEG (label-free; see
            ``docs/calibration.md``).

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
        pruning_prob: float | str = "auto",
        unassigned_policy: str = "max_score",
        void_index: int = 255,
        softmax: bool = False,
        sigmoid: bool = False,
        temperature: float | Sequence[float] | None = None,
        clamp: bool = False,
        to_onehot: int | None = None,
        dtype: torch.dtype | None = torch.float,
        device: str | torch.device | None = None,
        spatial_dims: int | None = None,
        guard: Any = None,
    ) -> None:
        self.metric = metric
        self.guard = guard
        self.solver = solver
        self.output_mode = output_mode
        self.smooth = smooth
        self.pruning_prob = pruning_prob
        self.unassigned_policy = unassigned_policy
        self.void_index = void_index
        self.softmax = bool(softmax)
        self.sigmoid = bool(sigmoid)
        self.temperature = _check_temperature(temperature)
        self.clamp = bool(clamp)
        _check_to_onehot(to_onehot, output_mode)
        self.to_onehot = to_onehot
        self.dtype = dtype
        self.device = device
        if spatial_dims is not None and (isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int)
                                         or spatial_dims < 1):
            raise ValueError(f"spatial_dims must be a positive int (2 or 3 for images) or None, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        _check_activation(self.softmax, self.sigmoid, self.temperature)
        self._check_options(metric, solver, output_mode, smooth, pruning_prob, unassigned_policy, void_index)

    @staticmethod
    def _check_options(metric, solver, output_mode, smooth, pruning_prob, unassigned_policy, void_index) -> None:
        """Fail at construction (e.g. when a bundle config is parsed) on option combinations no input accepts.

        A dry run of the solver on a tiny two-class input; combinations that depend on the number of classes
        (e.g. ``void_index`` inside ``[0, C)``) are checked again on every call.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rankseg(torch.full((1, 2, 1), 0.5), metric=metric, smooth=smooth, output_mode=output_mode, solver=solver,
                    pruning_prob=pruning_prob, unassigned_policy=unassigned_policy, void_index=void_index)

    def __call__(
        self,
        img: NdarrayOrTensor,
        metric: str | None = None,
        solver: str | None = None,
        output_mode: str | None = None,
        smooth: float | None = None,
        pruning_prob: float | None = None,
        unassigned_policy: str | None = None,
        void_index: int | None = None,
        softmax: bool | None = None,
        sigmoid: bool | None = None,
        temperature: float | Sequence[float] | None = None,
        clamp: bool | None = None,
        to_onehot: int | None = None,
    ) -> NdarrayOrTensor:
        """
        Args:
            img: probabilities (or logits with ``softmax``/``sigmoid``) of one item, ``(C, *spatial)``: a torch
                tensor, ``MetaTensor`` or numpy array.
            metric, solver, output_mode, smooth, pruning_prob, unassigned_policy, void_index, softmax, sigmoid,
                temperature, clamp, to_onehot: override the values given at construction for this call;
                ``None`` keeps them (so ``temperature``/``to_onehot`` set at construction cannot be switched off
                here).

        Raises:
            ValueError: bad shape (batched input with ``spatial_dims`` set, missing spatial dims), bad option
                values, probabilities outside ``[0, 1]``.
            TypeError: non-floating input (e.g. a label map).
        """
        metric = self.metric if metric is None else metric
        solver = self.solver if solver is None else solver
        output_mode = self.output_mode if output_mode is None else output_mode
        smooth = self.smooth if smooth is None else smooth
        pruning_prob = self.pruning_prob if pruning_prob is None else pruning_prob
        unassigned_policy = self.unassigned_policy if unassigned_policy is None else unassigned_policy
        void_index = self.void_index if void_index is None else void_index
        softmax = self.softmax if softmax is None else bool(softmax)
        sigmoid = self.sigmoid if sigmoid is None else bool(sigmoid)
        temperature = self.temperature if temperature is None else _check_temperature(temperature)
        clamp = self.clamp if clamp is None else bool(clamp)
        to_onehot = self.to_onehot if to_onehot is None else to_onehot
        _check_activation(softmax, sigmoid, temperature)
        _check_to_onehot(to_onehot, output_mode)

        if not isinstance(img, torch.Tensor | np.ndarray):
            raise TypeError(f"RankSEG expects a torch.Tensor, MetaTensor or numpy.ndarray, got {type(img).__name__}")
        x = img.as_tensor() if isinstance(img, MetaTensor) else img
        x = numpy_as_tensor(x) if isinstance(x, np.ndarray) else x
        self._check_shape(tuple(x.shape))
        num_channels = x.shape[0]

        if softmax or sigmoid:
            x = self._activate(x, softmax, temperature)

        label_dtype = torch.int64
        if str(output_mode).strip().lower() == "multiclass":
            labels = label_range(num_channels, unassigned_policy, void_index)
            # one-hot: the narrowest integer labels; else the output dtype itself when it holds every label
            label_dtype = smallest_label_dtype(*labels) if to_onehot is not None else _direct_label_dtype(
                self.dtype, labels)
        out = rankseg(x.unsqueeze(0), metric=metric, smooth=smooth, output_mode=output_mode, solver=solver,
                      pruning_prob=pruning_prob, unassigned_policy=unassigned_policy, void_index=void_index,
                      clamp=clamp, device=self.device, guard=self.guard, label_dtype=label_dtype)
        # multiclass: (1, *spatial) int64 -> the batch dim of one becomes the channel dim of the label map;
        # multilabel: (1, C, *spatial) bool -> (C, *spatial)
        out = out if out.ndim == x.ndim else out[0]
        if to_onehot is not None:
            out = self._onehot(out, to_onehot, num_channels, unassigned_policy, void_index)
        # a permuted input (e.g. after Invertd) is solved without a copy and gives a view in its memory order;
        # the transform returns a contiguous result, as AsDiscrete does (an output-sized copy at most)
        result, *_ = convert_to_dst_type(out.contiguous(), img, dtype=self.dtype)
        return result

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
    def _activate(x: torch.Tensor, softmax: bool, temperature: float | tuple[float, ...] | None) -> torch.Tensor:
        if not x.is_floating_point():
            return x  # leave the dtype error to the solver, whose message names the fix
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if temperature is not None:
            if isinstance(temperature, tuple):
                if len(temperature) not in (1, x.shape[0]):
                    raise ValueError(
                        f"temperature has {len(temperature)} values but the input has {x.shape[0]} channels: give one "
                        "value per channel or a single scalar"
                    )
                t = torch.tensor(temperature, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
            else:
                t = temperature
            x = x / t
        return torch.softmax(x, dim=0) if softmax else torch.sigmoid(x)

    @staticmethod
    def _onehot(labels: torch.Tensor, n: int, num_channels: int, policy: str, void_index: int) -> torch.Tensor:
        if n < num_channels:
            raise ValueError(
                f"to_onehot={n} is smaller than the number of input channels ({num_channels}): set "
                f"to_onehot={num_channels}"
            )
        if isinstance(policy, str) and policy.strip().lower() == "void" and 0 <= void_index < n:
            raise ValueError(
                f"void_index={void_index} falls inside the one-hot range [0, {n}) and would become a class channel: "
                "choose void_index >= to_onehot (void voxels then get an all-zero one-hot vector)"
            )
        classes = torch.arange(n, device=labels.device).reshape(n, *([1] * (labels.ndim - 1)))
        return labels == classes  # (1, *spatial) vs (n, 1, ...) -> (n, *spatial); void voxels match no class


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
        pruning_prob: Sequence[float | str] | float | str = "auto",
        unassigned_policy: Sequence[str] | str = "max_score",
        void_index: Sequence[int] | int = 255,
        softmax: Sequence[bool] | bool = False,
        sigmoid: Sequence[bool] | bool = False,
        temperature: Any = None,
        clamp: Sequence[bool] | bool = False,
        to_onehot: Sequence[int | None] | int | None = None,
        dtype: Sequence[torch.dtype | None] | torch.dtype | None = torch.float,
        device: Sequence[str | torch.device | None] | str | torch.device | None = None,
        spatial_dims: Sequence[int | None] | int | None = None,
        guard: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        """
        Args:
            keys: keys of the items to decide (usually ``"pred"``).
                See also: :py:class:`monai.transforms.compose.MapTransform`
            metric, solver, output_mode, smooth, pruning_prob, unassigned_policy, void_index, softmax, sigmoid,
                clamp, to_onehot, dtype, device, spatial_dims: see :py:class:`RankSEG`; each can also be a
                sequence, one element per key.
            guard: see :py:class:`RankSEG` (one value for all keys).
            temperature: see :py:class:`RankSEG` and the class docstring for per-key values.
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
            d[key] = transform(d[key])
        return d


RankSEGD = RankSEGDict = RankSEGd
