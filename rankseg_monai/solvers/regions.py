"""Region-aware RankSEG: one label map whose *regions* (sets of labels, nested like LiTS, KiTS and BraTS score
them) maximise the summed RMA expected Dice (or IoU).  Pure torch, no MONAI import.

A region set in nnU-Net's ``dataset.json`` form, e.g. LiTS ``{"liver": [1, 2], "tumour": [2]}``, BraTS
``{"whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}``, must be *laminar*: every two regions
are nested or disjoint, so the regions form a forest (:class:`RegionTree`).  Each region needs a label of its own
(one that none of its sub-regions holds): the label a voxel gets when that region is the deepest one holding it.

The decision is a *node map*: per voxel the deepest region that holds it (or none).  Region ``r``'s mask is the
set of voxels whose node lies in ``r``'s subtree, so masks are nested by construction, siblings are disjoint and
every mask is exactly what the label map says.  The objective is ``sum_r f_r(S_r, n_r)`` with ``f`` the RMA value
of :func:`~rankseg_monai.solvers.objectives.rma_score` (the one formula), ``q_r`` the region's probability
(the sum of its classes' probabilities, or the network's sigmoid channel), ``S_r`` its sum over the mask,
``n_r`` the mask's size and ``mu_r`` its sum over the volume.

Algorithm (``docs/regions.md`` has the reasoning):

1. **Independent solve.**  Every region's own RankSEG threshold (``rma.rma_thresholds``) and, with
   ``pruning_prob``, which regions to keep (a region is kept when it and every region above it are kept).
2. **Candidates.**  The node maps of (c) argmax of the classes (class input) or nnU-Net's 0.5-threshold painting
   (region input), (a) the independent masks painted in nnU-Net's order, (b) the independent masks with each
   child intersected with its parent, and (d) the top-down restricted solve (each region solved exactly inside
   its parent).  The best candidate by the summed objective is the start.
3. **Coordinate ascent.**  One region at a time, the others fixed: its mask must contain its children's masks
   (a forced set ``F``) and stay inside its parent's mask minus its siblings'.  Only voxels whose node is the
   parent or the region itself can move, and the best such move is an RMA problem on those voxels with ``F``
   as a fixed offset: quasi-concave for Dice (``s = 0``) and IoU, so its exact optimum is a threshold of
   ``q_r`` (``rma.rma_thresholds(..., offsets=...)``; tie groups are never split; Dice with ``s > 0`` uses the
   same banded exact search as a plain row).  Every step is exact for its region, so the summed objective never
   decreases; sweeps run in top-down order until a sweep changes nothing.
4. **Only the voxels that can move** (Dice ``s = 0`` and IoU): a voxel is left out of step 3 and the joint moves
   when, for every region, it is either inside the region's mask with ``q_r`` above ``g(F_r)`` (``F_r`` the
   region's independent optimum, which no mask of it exceeds, so removing the voxel lowers ``f_r`` at any state)
   or outside it with ``q_r`` well below the independent threshold.  The first kind enter as fixed sums; the
   second under a per-step certificate that none of them would move (:func:`_ascend_items`); an uncertified item
   is solved again on the whole volume.

The result is at least as good as each candidate of step 2 (it starts from the best and never decreases) and a
coordinate-wise optimum.  Passes over the volume: one for the region probabilities' statistics, two or three for
the independent solve, one per candidate, then per region and sweep one pass to build its free values and about
two band passes (over the voxels that can move, when step 4 applies); all sums are float64.  With class input the
region probabilities are never stored whole: every pass computes them for the chunk it reads
(:class:`RegionView`, sums added one class at a time, so a voxel's value never depends on its chunk), and the
ascent gathers the ``R x M`` values of the voxels that can move.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._stream import RowStats, row_statistics
from .multiclass import argmax_labels
from .objectives import dinkelbach_threshold, increment_score, rma_score
from .rma import rma_solve, rma_thresholds

__all__ = ["RegionTree", "MAX_LABEL", "check_label", "region_probabilities", "RegionView", "NodeMasks",
           "solve_regions",
           "region_objective",
           "region_sums", "nodes_from_labels", "labels_from_nodes", "region_masks", "paint_nodes", "MAX_SWEEPS"]

#: coordinate-ascent sweeps at most (a sweep that changes nothing ends the ascent earlier; 2-4 are typical)
MAX_SWEEPS = 20
#: the ascent stops when a sweep raises the summed objective by less than this fraction of it
REL_TOL = 1e-9
#: the joint move is also tried on the voxels whose gain is at least this fraction of the largest gain
JOINT_FRACTIONS = (0.0, 0.5, 0.9)
#: voxels per chunk of the region passes (float64 temporaries of R+1 rows stay a few tens of MB)
_CHUNK = 1 << 20


#: the largest label a region, ``regions_class_order`` or a dataset.json may hold (label tables are built up to it)
MAX_LABEL = 2**16 - 1


def check_label(value: Any, where: str) -> int:
    """One label: an integer (Python or numpy; not a bool, a float such as ``1.0`` or a string) in
    ``[0, MAX_LABEL]``.  The one rule for regions, ``regions_class_order`` and nnU-Net's dataset.json.

    >>> check_label(2, "x")
    2
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: labels must be integers (e.g. 1, not 1.0, \"1\" or true), got {value!r}")
    label = int(value)
    if not 0 <= label <= MAX_LABEL:
        raise ValueError(f"{where}: label {label} is outside [0, {MAX_LABEL}]; label maps hold small non-negative "
                         "integers")
    return label


def _as_label_set(value: Any, where: str) -> frozenset[int]:
    if value is None or isinstance(value, str | bytes | Mapping):
        raise ValueError(f"{where}: a region is a label or a list of labels (e.g. [1, 2]), got {value!r}")
    items = value if isinstance(value, Sequence) else [value]
    if any(isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral) for v in items):
        raise ValueError(f"{where}: a region is a label or a list of labels, integers (e.g. [1, 2]; not 1.0, \"1\" "
                         f"or true), got {value!r}")
    labels = [check_label(v, where) for v in items]
    if not labels:
        raise ValueError(f"{where}: a region needs at least one label")
    if min(labels) < 1:
        raise ValueError(f"{where}: label {min(labels)} cannot be in a region: label 0 is the background, regions "
                         "hold foreground labels (1, 2, ...)")
    return frozenset(labels)


@dataclass(frozen=True)
class RegionTree:
    """A laminar set of regions (nested or disjoint), parsed and validated.

    Attributes:
        names: one name per region (``"region_<i>"`` when the regions came as a list).
        labels: the label set of each region, in the order given (for region probabilities: the channel order).
        parent: index of each region's parent (the smallest region strictly containing it), ``-1`` for a root.
        order: region indices, every parent before its children.
        own: per region, its labels that none of its sub-regions holds (sorted): the labels of a voxel whose
            deepest region it is.
        paint: per region, the label nnU-Net paints for it (``regions_class_order``), or ``None`` when not given.

    Example:
        >>> from rankseg_monai.solvers.regions import RegionTree
        >>> tree = RegionTree.parse({"liver": [1, 2], "tumour": [2]})
        >>> tree.parent, tree.own
        ((-1, 0), ((1,), (2,)))
    """

    names: tuple[str, ...]
    labels: tuple[frozenset[int], ...]
    parent: tuple[int, ...]
    order: tuple[int, ...]
    own: tuple[tuple[int, ...], ...]
    paint: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, regions: Any, regions_class_order: Sequence[int] | None = None) -> RegionTree:
        """Regions as nnU-Net's ``dataset.json`` writes them: a mapping ``{name: labels}`` (a label or a list of
        labels) or a list of label lists; ``regions_class_order``: the label painted for each region, in order."""
        if isinstance(regions, RegionTree):
            if regions_class_order is not None:
                return cls.parse(dict(zip(regions.names, (sorted(s) for s in regions.labels))), regions_class_order)
            return regions
        if regions is None or isinstance(regions, str | bytes):
            raise TypeError(f"regions must be a mapping {{name: labels}} or a list of label lists (nnU-Net's "
                            f"dataset.json form, e.g. [[1, 2], [2]]), got {regions!r}")
        if isinstance(regions, Mapping):
            names = [str(k) for k in regions]
            sets = [_as_label_set(v, f"region {k!r}") for k, v in regions.items()]
        elif isinstance(regions, Sequence) and not isinstance(regions, str | bytes):
            names = [f"region_{i}" for i in range(len(regions))]
            sets = [_as_label_set(v, f"regions[{i}]") for i, v in enumerate(regions)]
        else:
            raise TypeError(f"regions must be a mapping {{name: labels}} or a list of label lists (nnU-Net's "
                            f"dataset.json form, e.g. [[1, 2], [2]]), got {type(regions).__name__}")
        if not sets:
            raise ValueError("regions is empty: give at least one region, e.g. [[1, 2], [2]]")
        for i in range(len(sets)):
            for j in range(i):
                a, b = sets[i], sets[j]
                if a == b:
                    raise ValueError(f"regions {names[j]!r} and {names[i]!r} hold the same labels {sorted(a)}: "
                                     "give each region once")
                if a & b and not (a <= b or b <= a):
                    raise ValueError(
                        f"regions {names[j]!r} {sorted(b)} and {names[i]!r} {sorted(a)} overlap without one "
                        "containing the other: region-aware RankSEG decides nested (hierarchical) regions, where "
                        "every two regions are nested or disjoint (LiTS, KiTS, BraTS); decide such regions "
                        "separately (output_mode='multilabel' on their probabilities)")
        parent = []
        for i, a in enumerate(sets):
            supersets = [j for j, b in enumerate(sets) if j != i and a < b]
            parent.append(min(supersets, key=lambda j: len(sets[j])) if supersets else -1)
        depth = []
        for i in range(len(sets)):
            d, p = 0, parent[i]
            while p >= 0:
                d, p = d + 1, parent[p]
            depth.append(d)
        order = tuple(sorted(range(len(sets)), key=lambda i: (depth[i], i)))
        own = []
        for i, a in enumerate(sets):
            below = set().union(*(sets[j] for j in range(len(sets)) if parent[j] == i))
            mine = tuple(sorted(a - below))
            if not mine:
                raise ValueError(
                    f"region {names[i]!r} {sorted(a)} is exactly the union of its sub-regions: it has no label of its "
                    "own, so no voxel can stop there; drop it from the regions (its mask is the union of the others') "
                    "or give it a label of its own")
            own.append(mine)
        paint = None
        if regions_class_order is not None:
            if isinstance(regions_class_order, str | bytes | Mapping) or not isinstance(regions_class_order,
                                                                                      Sequence):
                raise ValueError(f"regions_class_order must be a list of labels, got {regions_class_order!r}")
            order_labels = [check_label(v, "regions_class_order") for v in regions_class_order]
            if len(order_labels) != len(sets):
                raise ValueError(f"regions_class_order has {len(order_labels)} labels for {len(sets)} regions: give "
                                 "one label per region, in the order of the regions")
            for i, lab in enumerate(order_labels):
                if lab not in own[i]:
                    raise ValueError(
                        f"regions_class_order gives region {names[i]!r} the label {lab}, which is not one of its own "
                        f"labels {list(own[i])} (its labels minus its sub-regions'): painting it would put the voxel "
                        "in the wrong regions")
            paint = tuple(order_labels)
        return cls(tuple(names), tuple(sets), tuple(parent), order, tuple(own), paint)

    # --------------------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def max_label(self) -> int:
        return max(max(s) for s in self.labels)

    def children(self, r: int) -> list[int]:
        return [j for j, p in enumerate(self.parent) if p == r]

    def subtree(self, r: int) -> list[int]:
        """``r`` and every region below it."""
        out, todo = [], [r]
        while todo:
            j = todo.pop()
            out.append(j)
            todo.extend(self.children(j))
        return sorted(out)

    def label_of_node(self) -> list[int | None]:
        """The single label of each region's voxels (``paint``, or its only own label), ``None`` where it has
        several own labels (class input: the most probable of them is taken per voxel)."""
        if self.paint is not None:
            return list(self.paint)
        return [own[0] if len(own) == 1 else None for own in self.own]

    def check_classes(self, num_classes: int) -> None:
        """Class probabilities ``(C channels)``: every region label is a class, every foreground class is in a
        region."""
        top = self.max_label
        if top >= num_classes:
            raise ValueError(f"the regions use label {top} but the probabilities have {num_classes} classes "
                             f"(0..{num_classes - 1}); check the regions against the model's classes, or pass "
                             "region_probs=True if the channels are region probabilities")
        covered = set().union(*self.labels)
        missing = [c for c in range(1, num_classes) if c not in covered]
        if missing:
            raise ValueError(f"class {missing[0]} is in no region: every foreground class must belong to a region "
                             f"so that the decision knows where it may go; add it (e.g. a region [{missing[0]}])")

    def check_region_channels(self, num_channels: int, label_map: bool) -> None:
        """Region probabilities: one channel per region; a label map needs one paint label per region."""
        if num_channels != len(self):
            raise ValueError(f"region_probs=True needs one channel per region: {len(self)} regions "
                             f"({', '.join(self.names)}) but {num_channels} channels")
        if label_map and any(v is None for v in self.label_of_node()):
            several = [n for n, own in zip(self.names, self.own) if len(own) > 1]
            raise ValueError(f"regions {several} have several labels of their own: give regions_class_order (the "
                             "label nnU-Net paints for each region) to make a label map from region probabilities")

    def node_of_label(self, num_labels: int) -> torch.Tensor:
        """``int64 (num_labels,)``: per label, 1 + the deepest region holding it (0: no region, i.e. background)."""
        table = torch.zeros(num_labels, dtype=torch.int64)
        for r in self.order:  # parents first, so deeper regions overwrite
            for lab in self.labels[r]:
                if lab < num_labels:
                    table[lab] = r + 1
        return table


# ------------------------------------------------------------------------------------------------ maps
def _node_dtype(num_regions: int) -> torch.dtype:
    return torch.uint8 if num_regions < 255 else torch.int16


def _chunks(n: int, step: int = _CHUNK):
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _region_row(flat: torch.Tensor, labels: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``(B, n)``: the sum of the classes ``labels`` of ``flat`` ``(B, C, n)``, added one class at a time in label
    order and clipped at 1.  Elementwise, so the values of a voxel never depend on the voxels computed with it
    (``torch.sum`` over five classes or more adds in an order that does; up to four classes it gives these bits)."""
    out = flat[:, labels[0]].to(dtype, copy=True)
    for c in labels[1:]:
        out += flat[:, c]
    return out.clamp_(max=1.0)


def region_probabilities(flat: torch.Tensor, tree: RegionTree) -> torch.Tensor:
    """``(B, R, N)`` region probabilities from class probabilities ``(B, C, N)``: the sum of each region's classes
    (float32 at least, added in label order; clipped at 1, which a softmax's rounding can exceed by an ulp).  The
    solver never holds all of them: it reads them chunk by chunk (:class:`RegionView`)."""
    dtype = flat.dtype if flat.dtype == torch.float64 else torch.float32
    out = torch.empty((flat.shape[0], len(tree), flat.shape[2]), dtype=dtype, device=flat.device)
    for r, labels in enumerate(tree.labels):
        for a, b in _chunks(flat.shape[2]):
            out[:, r, a:b] = _region_row(flat[..., a:b], sorted(labels), dtype)
    return out


class RegionView:
    """The region probabilities of class probabilities ``flat`` ``(B, C, N)`` as a ``(B, R, N)`` tensor that is
    never stored: ``view[..., a:b]`` (the slice every chunked pass takes, :func:`~._stream.iter_chunks`) and
    ``view[:, r]`` (one region's row) compute those values (the same as :func:`region_probabilities`, whose sums
    are elementwise).  ``shape``, ``dtype``, ``device`` and ``numel()`` are the stored tensor's.  Extra memory
    with class input: a chunk, or one row, instead of ``R x N`` values.

    >>> import torch
    >>> p = torch.softmax(torch.randn(1, 3, 10), dim=1)
    >>> tree = RegionTree.parse({"liver": [1, 2], "tumour": [2]})
    >>> view = RegionView(p, tree)
    >>> torch.equal(view[..., 2:7], region_probabilities(p, tree)[..., 2:7]), tuple(view.shape)
    (True, (1, 2, 10))
    """

    def __init__(self, flat: torch.Tensor, tree: RegionTree) -> None:
        self.flat, self.tree = flat, tree
        self.labels = [sorted(labels) for labels in tree.labels]
        self.dtype = flat.dtype if flat.dtype == torch.float64 else torch.float32
        self.shape = torch.Size((flat.shape[0], len(tree), flat.shape[2]))
        self.device = flat.device

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return 3

    def block(self, a: int, b: int) -> torch.Tensor:
        """``(B, R, b - a)``: the region probabilities of voxels ``a`` to ``b``."""
        out = torch.empty((self.shape[0], self.shape[1], b - a), dtype=self.dtype, device=self.device)
        for r, labels in enumerate(self.labels):
            out[:, r] = _region_row(self.flat[..., a:b], labels, self.dtype)
        return out

    def row_block(self, r: int, a: int, b: int) -> torch.Tensor:
        """``(B, b - a)``: region ``r``'s probabilities of voxels ``a`` to ``b``."""
        return _region_row(self.flat[..., a:b], self.labels[r], self.dtype)

    def row(self, r: int) -> torch.Tensor:
        """``(B, N)``: region ``r``'s probabilities (chunk by chunk: temporaries stay chunk-sized)."""
        out = torch.empty((self.shape[0], self.shape[2]), dtype=self.dtype, device=self.device)
        for a, b in _chunks(self.shape[2]):
            out[:, a:b] = _region_row(self.flat[..., a:b], self.labels[r], self.dtype)
        return out

    def __call__(self, i: int, a: int, b: int) -> torch.Tensor:
        """``(1, R, b - a)``: item ``i``'s region probabilities of voxels ``a`` to ``b``."""
        return RegionView(self.flat[i:i + 1], self.tree).block(a, b)

    def item(self, i: int) -> RegionView:
        """The view of batch item ``i`` (``(1, R, N)``)."""
        return RegionView(self.flat[i:i + 1], self.tree)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if (isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis and isinstance(key[1], slice)
                and key[1].step in (None, 1)):
            a, b, _ = key[1].indices(self.shape[2])
            return self.block(a, max(a, b))
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], int)):
            return self.row(key[1])
        raise TypeError(f"RegionView supports view[..., a:b] and view[:, r], not {key!r}")


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for an integer ``index`` of any shape, chunk by chunk (the int64 copy of the index that
    indexing needs stays chunk-sized)."""
    flat = index.reshape(-1)
    out = torch.empty((flat.numel(), *table.shape[1:]), dtype=table.dtype, device=index.device)
    for a, b in _chunks(flat.numel()):
        out[a:b] = table[flat[a:b].long()]
    return out.reshape(*index.shape, *table.shape[1:])


def nodes_from_labels(labels: torch.Tensor, tree: RegionTree, num_labels: int) -> torch.Tensor:
    """Node map (0 background, ``1 + r`` region ``r``; uint8) of an integer label map."""
    table = tree.node_of_label(max(num_labels, tree.max_label + 1)).to(labels.device, _node_dtype(len(tree)))
    return _lookup(table, labels)


def labels_from_nodes(nodes: torch.Tensor, tree: RegionTree, class_probs: torch.Tensor | None,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """Label map from a node map ``(B, N)``: each region's label, or the most probable of its own labels
    (``class_probs`` ``(B, C, N)``, first maximum wins) when it has several."""
    single = tree.label_of_node()
    table = torch.tensor([0] + [v if v is not None else 0 for v in single], dtype=torch.int64, device=nodes.device)
    out = _lookup(table.to(out_dtype), nodes)
    for r, lab in enumerate(single):
        if lab is not None:
            continue
        b_idx, v_idx = torch.nonzero(nodes == r + 1, as_tuple=True)
        if b_idx.numel():
            own = torch.tensor(tree.own[r], device=nodes.device)
            pick = class_probs[b_idx.unsqueeze(1), own.unsqueeze(0), v_idx.unsqueeze(1)]  # (P, own)
            out[b_idx, v_idx] = own[pick.argmax(1)].to(out_dtype)
    return out


class NodeMasks:
    """The bool ``(B, R, N)`` region masks of a node map ``(B, N)``, never stored: ``masks[..., a:b]`` computes
    those of voxels ``a`` to ``b`` (what every chunked pass takes, e.g. :func:`~._stream.mask_sums`), the same
    values as :func:`region_masks`.

    >>> import torch
    >>> tree = RegionTree.parse({"liver": [1, 2], "tumour": [2]})
    >>> nodes = torch.tensor([[0, 1, 2, 2]], dtype=torch.uint8)
    >>> torch.equal(NodeMasks(nodes, tree)[..., 1:4], region_masks(nodes, tree)[..., 1:4])
    True
    """

    def __init__(self, nodes: torch.Tensor, tree: RegionTree) -> None:
        self.nodes, self.tree = nodes, tree
        self.shape = torch.Size((nodes.shape[0], len(tree), nodes.shape[1]))

    def dim(self) -> int:
        return 3

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis and isinstance(key[1], slice):
            return region_masks(self.nodes[:, key[1]], self.tree)
        raise TypeError(f"NodeMasks supports masks[..., a:b], not {key!r}")


def region_masks(nodes: torch.Tensor, tree: RegionTree) -> torch.Tensor:
    """bool ``(B, R, N)`` region masks of a node map (region ``r``: the node lies in ``r``'s subtree)."""
    member = torch.zeros((len(tree) + 1, len(tree)), dtype=torch.bool, device=nodes.device)
    for r in range(len(tree)):
        for j in tree.subtree(r):
            member[j + 1, r] = True
    return _lookup(member, nodes).movedim(-1, 1)


def _membership(tree: RegionTree, device: torch.device) -> torch.Tensor:
    """float64 ``(R + 1, R)``: 1 where node ``j`` lies in region ``r``'s subtree."""
    member = torch.zeros((len(tree) + 1, len(tree)), dtype=torch.float64, device=device)
    for r in range(len(tree)):
        for j in tree.subtree(r):
            member[j + 1, r] = 1.0
    return member


def region_sums(q: torch.Tensor, nodes: torch.Tensor, tree: RegionTree) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(B, R)``: the sum ``S_r`` of ``q_r`` over each region's mask under the node map, and the size
    ``n_r`` of the mask (one chunked pass)."""
    batch, num_regions, n_vox = q.shape
    node_s = torch.zeros((batch, num_regions, num_regions + 1), dtype=torch.float64, device=q.device)
    node_n = torch.zeros((batch, num_regions + 1), dtype=torch.float64, device=q.device)
    for a, b in _chunks(n_vox):
        block = q[..., a:b]  # a view of stored region probabilities, computed for a RegionView
        for i in range(batch):
            idx = nodes[i, a:b]  # uint8/int16: bincount reads them as they are (no int64 copy), same sums
            node_n[i] += torch.bincount(idx, minlength=num_regions + 1).double()
            for r in range(num_regions):
                node_s[i, r] += torch.bincount(idx, weights=block[i, r].double(), minlength=num_regions + 1)
    member = _membership(tree, q.device)  # (R + 1, R)
    S = (node_s * member.T.unsqueeze(0)).sum(-1)
    n = node_n @ member
    return S, n


def region_objective(q: torch.Tensor, nodes: torch.Tensor, tree: RegionTree, mu: torch.Tensor, metric: str,
                     smooth: float) -> torch.Tensor:
    """float64 ``(B, R)``: the RMA value of each region's mask under the node map (sum over ``R`` to compare)."""
    S, n = region_sums(q, nodes, tree)
    return rma_score(metric, S, n, mu, smooth)


# ------------------------------------------------------------------------------------------------- solve
def paint_nodes(masks: torch.Tensor, tree: RegionTree, order: Sequence[int] | None = None) -> torch.Tensor:
    """Node map of per-region masks ``(B, R, N)`` painted region by region in ``order`` (later ones overwrite; default:
    the order of the regions, as nnU-Net paints ``regions_class_order``)."""
    order = range(len(tree)) if order is None else order
    nodes = torch.zeros((masks.shape[0], masks.shape[2]), dtype=_node_dtype(len(tree)), device=masks.device)
    for r in order:
        nodes.masked_fill_(masks[:, r], r + 1)
    return nodes


def _restrict(nodes: torch.Tensor, tree: RegionTree, active: torch.Tensor) -> torch.Tensor:
    """Move every voxel of an inactive (pruned) region to its nearest active ancestor (or the background)."""
    out = nodes.clone()
    for r in reversed(tree.order):  # deepest first, so a chain of inactive regions collapses upwards
        gone = ~active[:, r].unsqueeze(1) & (out == r + 1)
        out.masked_fill_(gone, tree.parent[r] + 1)
    return out


def _masked_sum(values: torch.Tensor, mask: torch.Tensor | Any) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(B, 1)`` sum of ``values`` ``(B, N)`` where ``mask`` holds, and the float64 count, chunk by chunk
    (no ``N``-sized temporaries).  ``mask``: bool ``(B, N)``, or a callable ``(a, b) -> bool (B, b - a)``, the
    mask of voxels ``a`` to ``b``."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    total = torch.zeros((values.shape[0], 1), dtype=torch.float64, device=values.device)
    count = torch.zeros((values.shape[0], 1), dtype=torch.float64, device=values.device)
    for a, b in _chunks(values.shape[-1]):
        block = values[:, a:b]
        m = mask(a, b) if callable(mask) else mask[:, a:b]
        total += torch.where(m, block, zero).sum(-1, keepdim=True, dtype=torch.float64)
        count += m.sum(-1, keepdim=True)
    return total, count


def _in_nodes(nodes: torch.Tensor, which: Sequence[int]) -> torch.Tensor:
    """bool: the node map's voxels whose node is in ``which`` (byte comparisons for a few nodes; ``torch.isin`` is
    several times slower on uint8 maps)."""
    if len(which) > 4:
        return torch.isin(nodes, torch.tensor(which, dtype=nodes.dtype, device=nodes.device))
    out = nodes == which[0]
    for j in which[1:]:
        out |= nodes == j
    return out


def _threshold_bounds(values: torch.Tensor, current: Any, s_off: torch.Tensor, n_off: torch.Tensor,
                      mu: torch.Tensor, metric: str, smooth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the coordinate step's optimal threshold from the current mask (Dice ``s = 0`` and IoU).

    With ``lam = f(current)`` (a feasible set, so ``f* >= lam``), Dinkelbach's ``t* = g(f*) >= g(lam)``; and
    ``f* - lam <= max_A (N_A - lam D_A) / D_min`` where the maximum of the linearised objective is a sum over voxels
    of ``max(0, .)`` and ``D_min`` the smallest denominator of a feasible set, so ``t* <= g(lam + that)``.  Near
    the optimum both bounds meet, and the band between them is a sliver.  ``current``: the region's current mask,
    bool ``(B, N)`` or a chunk callable (see :func:`_masked_sum`).
    """
    s_cur, n_cur = _masked_sum(values, current)
    S = s_off + s_cur
    lam = rma_score(metric, S, n_off.double() + n_cur, mu, smooth)
    # the per-voxel term max(0, a q - lam) (a = 2 for Dice, 1 + lam for IoU) is positive exactly above g(lam):
    # its sum is a * (sum of those q) - lam * (their number), without float64 copies of the row
    cut = dinkelbach_threshold(metric, lam)
    s_over, n_over = _masked_sum(values, lambda a, b: values[:, a:b] > cut)
    if metric == "dice":  # N - lam D = 2 S - lam (mu + n + 1): per free voxel 2 q - lam
        gain = 2.0 * s_over - lam * n_over
        base = 2.0 * s_off - lam * (mu + n_off.double() + 1.0)
        d_min = mu + n_off.double() + 1.0
    else:  # N - lam D = S + s - lam (mu - S + n + s): per free voxel q (1 + lam) - lam
        gain = (1.0 + lam) * s_over - lam * n_over
        base = s_off * (1.0 + lam) + smooth - lam * (mu + n_off.double() + smooth)
        d_min = (mu + smooth).clamp(min=1e-300)
    upper = lam + (base + gain).clamp(min=0.0) / d_min
    return dinkelbach_threshold(metric, lam), dinkelbach_threshold(metric, upper)


class _FreeValues:
    """Region ``r``'s probabilities on the voxels a coordinate step may move (node ``par`` or ``r + 1``), 0
    elsewhere, as a ``(B, N)`` tensor that is never stored (``values[:, a:b]``, and ``unsqueeze(1)``: the ``(B, 1, N)``
    row every chunked pass reads as ``row[..., a:b]``).  The same values as ``torch.where(free, q_r, 0)``; with class
    input a step on the whole volume then holds no ``N``-voxel float row (its largest array, 0.33x the input of a
    3-class volume)."""

    def __init__(self, q: RegionView, nodes: torch.Tensor, r: int, par: int, row: bool = False,
                 fixed: torch.Tensor | None = None) -> None:
        self.q, self.nodes, self.r, self.par, self.is_row = q, nodes, r, par, row
        self.dtype, self.device = q.dtype, q.device
        batch, n_vox = nodes.shape
        self.shape = torch.Size((batch, 1, n_vox) if row else (batch, n_vox))
        # the voxels that cannot move (a byte each: a quarter of the float row it replaces)
        self.fixed = (nodes != par) & (nodes != r + 1) if fixed is None else fixed

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def unsqueeze(self, dim: int) -> _FreeValues:
        if self.is_row or dim != 1:
            raise TypeError("_FreeValues.unsqueeze(1) only, on the (B, N) view")
        return _FreeValues(self.q, self.nodes, self.r, self.par, row=True, fixed=self.fixed)

    def block(self, a: int, b: int) -> torch.Tensor:
        """``(B, b - a)``: the values of voxels ``a`` to ``b`` (a fresh tensor)."""
        return self.q.row_block(self.r, a, b).masked_fill_(self.fixed[:, a:b], 0.0)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], slice) and key[1].step in (None, 1):
            if (key[0] is Ellipsis and self.is_row) or (key[0] == slice(None) and not self.is_row):
                a, b, _ = key[1].indices(self.shape[-1])
                out = self.block(a, max(a, b))
                return out.unsqueeze(1) if self.is_row else out
        raise TypeError(f"_FreeValues supports values[:, a:b] and row[..., a:b], not {key!r}")


def _coordinate_step(q: torch.Tensor, nodes: torch.Tensor, tree: RegionTree, r: int, mu: torch.Tensor,
                     active: torch.Tensor, metric: str, smooth: float, device: torch.device | None,
                     chunk_size: int | None, return_sums: bool = False, hint: torch.Tensor | None = None,
                     fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
    """Region ``r``'s exact best mask with every other region fixed; returns the new node map (and, with
    ``return_sums``, the float64 ``(B,)`` sum ``S_r`` and size ``n_r`` of the region's new mask).  ``hint``: float64
    ``(B, 1)``, a threshold whose free voxels above it form the feasible set the threshold bounds start from
    (instead of the region's current mask; e.g. the independent threshold when the current mask is empty).
    ``fixed``: float64 ``(B, R)`` sums and sizes of voxels left out of ``q`` that stay in each region's mask (see
    :func:`_ascend_items`): for region ``r`` they are forced in, like its children's voxels.

    Only voxels whose node is ``r``'s parent or ``r`` itself can move (its children's voxels are forced in, its
    siblings' and everything outside its parent are out), so the best mask is the RMA optimum over those voxels
    with the children's sum and size as an offset: a threshold of ``q_r`` (``rma_thresholds(..., offsets=)``).
    """
    par = tree.parent[r] + 1
    below = [j + 1 for j in tree.subtree(r) if j != r]
    # one chunked pass over q_r: the free values and the children's sum and size (as _masked_sum adds them: the
    # same chunks, the same float64 sums); class input: the free values are computed chunk by chunk where read
    # (no N-voxel float row, nor an N-voxel mask of the free voxels)
    lazy = isinstance(q, RegionView)
    free = None if lazy else (nodes == par) | (nodes == r + 1)
    values = _FreeValues(q, nodes, r, par) if lazy else torch.empty(nodes.shape, dtype=q.dtype, device=q.device)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    s_off = torch.zeros((q.shape[0], 1), dtype=torch.float64, device=q.device)
    n_off = torch.zeros((q.shape[0], 1), dtype=torch.float64, device=q.device)
    chunks = _chunks(nodes.shape[1]) if below or not lazy else ()  # lazy and no children: nothing to read here
    for a, b in chunks:
        qr = q.row_block(r, a, b) if lazy else q[:, r, a:b]
        if not lazy:
            torch.where(free[:, a:b], qr, zero, out=values[:, a:b])
        if below:
            m = _in_nodes(nodes[:, a:b], below)
            s_off += torch.where(m, qr, zero).sum(-1, keepdim=True, dtype=torch.float64)
            n_off += m.sum(-1, keepdim=True)
    if fixed is not None:
        s_off += fixed[0][:, r:r + 1]
        n_off += fixed[1][:, r:r + 1]
    n_off = n_off.long()
    row = values.unsqueeze(1)
    st = row_statistics(row, device=device, chunk_size=chunk_size)
    on = st.vmax.device
    mu_r = mu[:, r:r + 1].to(on)
    stats = RowStats(vmin=st.vmin, vmax=st.vmax, mu=mu_r, s_half=st.s_half, n_half=st.n_half, chunk_max=st.chunk_max,
                     chunk_step=st.chunk_step)
    bounds = None
    if metric == "iou" or smooth == 0:  # computed where the row lives (streaming: the host), used on ``on``
        current = ((lambda a, b: nodes[:, a:b] == r + 1) if hint is None else
                   (lambda a, b: values[:, a:b] > hint))  # values are 0 outside the free voxels, and hint >= 0
        low, high = _threshold_bounds(values, current, s_off, n_off, mu[:, r:r + 1], metric, smooth)
        bounds = (low.to(on), high.to(on))
    thr = rma_thresholds(row, stats, metric, smooth, active[:, r:r + 1].to(on), device=device, chunk_size=chunk_size,
                         offsets=(s_off.to(on), n_off.to(on)), bounds=bounds).to(values.device)
    if lazy:  # chunk by chunk: the same masks, and the sums of _masked_sum (same chunks, same float64 sums)
        out = torch.empty_like(nodes)
        s_take = torch.zeros((q.shape[0], 1), dtype=torch.float64, device=q.device)
        n_take = torch.zeros((q.shape[0], 1), dtype=torch.float64, device=q.device)
        for a, b in _chunks(nodes.shape[1]):
            block = values.block(a, b)
            take = block > thr
            take &= ~values.fixed[:, a:b]
            out[:, a:b] = torch.where(values.fixed[:, a:b], nodes[:, a:b], par).masked_fill_(take, r + 1)
            if return_sums:
                s_take += torch.where(take, block, zero).sum(-1, keepdim=True, dtype=torch.float64)
                n_take += take.sum(-1, keepdim=True)
        if not return_sums:
            return out
    else:
        take = values > thr
        take &= free
        out = nodes.masked_fill(free, par).masked_fill_(take, r + 1)
        if not return_sums:
            return out
        s_take, n_take = _masked_sum(values, take)
    return out, (s_off + s_take)[:, 0], (n_off.double() + n_take)[:, 0]


def _joint_moves(q: torch.Tensor, nodes: torch.Tensor, tree: RegionTree, mu: torch.Tensor, active: torch.Tensor,
                 metric: str, smooth: float, sums: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
    """Moves along several levels at once, which coordinate steps cannot make: every voxel goes to the node whose
    path from the root has the largest summed first-order gain (``objectives.increment_score`` of each region
    at the current sums), and the same move restricted to the voxels that gain at least a fraction
    (:data:`JOINT_FRACTIONS`) of the largest gain.  The caller keeps a candidate only if it is better.  ``sums``:
    :func:`region_sums` of ``nodes`` when the caller has them."""
    S, n = region_sums(q, nodes, tree) if sums is None else sums
    batch, num_regions, n_vox = q.shape
    target = torch.empty_like(nodes)
    delta = torch.empty((batch, n_vox), dtype=torch.float32, device=q.device)
    inactive = ~active.unsqueeze(-1)
    # elementwise per voxel, so any chunking gives the same values: chunks of 1 << 18 float64 values over the
    # R + 1 rows keep the gain's temporaries a few MB (1 << 20 voxels per chunk peaked at 180 MB)
    for a, b in _chunks(n_vox, max(1 << 12, (1 << 18) // (num_regions + 1))):
        gain = increment_score(metric, q[..., a:b].double(), S.unsqueeze(-1), n.unsqueeze(-1), mu.unsqueeze(-1),
                               smooth).masked_fill_(inactive, float("-inf"))
        path = torch.zeros((batch, num_regions + 1, b - a), dtype=torch.float64, device=q.device)
        for r in tree.order:
            path[:, r + 1] = path[:, tree.parent[r] + 1] + gain[:, r]
        best, where = path.max(1)
        target[:, a:b] = where.to(nodes.dtype)
        delta[:, a:b] = best - path.gather(1, nodes[:, a:b].long().unsqueeze(1))[:, 0]
    top = delta.amax(-1, keepdim=True)
    moves = []
    for frac in JOINT_FRACTIONS:
        trial = torch.where((delta > 0) & (delta >= frac * top), target, nodes)
        if not any(torch.equal(trial, seen) for seen in [nodes, *moves]):  # a move already tried, or none at all
            moves.append(trial)
    return moves


class _Uncertified(Exception):
    """A step of the ascent on the compacted voxels might have taken a voxel left out (see :func:`_ascend`)."""


def _ascend(q: torch.Tensor, nodes: torch.Tensor, tree: RegionTree, mu: torch.Tensor, active: torch.Tensor,
            metric: str, smooth: float, device: torch.device | None, chunk_size: int | None,
            outside_max: torch.Tensor | None = None, fixed: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Coordinate sweeps (top-down) and joint moves until a sweep changes nothing or raises the summed objective by
    less than :data:`REL_TOL` of it; the objective never drops.  A region is solved again only when a region
    whose voxels its step reads (its parent, siblings or children) moved since its last step.  Returns the node
    map, the number of sweeps and the final ``(B, R)`` region values.

    ``outside_max`` and ``fixed``, when ``q`` and ``nodes`` hold only some of the voxels (:func:`_ascend_items`):
    ``outside_max``, float64 ``(B, R)``, bounds ``q_r`` of every voxel left out that is not in region ``r``;
    ``fixed``, float64 ``(B, R)`` sums and sizes, are the ``q_r`` sum and count of the voxels left out that are in
    region ``r`` (each such voxel has ``q_r`` above every threshold ``r`` can have, so it never leaves).  Every
    coordinate step and joint move then checks that it would not take a voxel left out into a region (the step's
    optimum ``f*`` has Dinkelbach threshold ``g(f*) > outside_max``; no left-out voxel has a positive first-order
    gain), so the result is the one of the whole volume; otherwise it raises :class:`_Uncertified`.  Dice with
    ``s = 0`` and IoU only."""
    neighbours = [{tree.parent[r], *tree.children(r), *(j for j in range(len(tree)) if j != r and tree.parent[j] ==
                                                         tree.parent[r])} - {-1} for r in range(len(tree))]

    def sums(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        S, n = region_sums(q, m, tree)
        return (S, n) if fixed is None else (S + fixed[0], n + fixed[1])

    dirty = set(range(len(tree)))
    values = rma_score(metric, *sums(nodes), mu, smooth)
    current = values.sum(-1)
    sweeps = 0
    while sweeps < MAX_SWEEPS and dirty:
        sweeps += 1
        start = current
        for r in tree.order:
            if r not in dirty:
                continue
            dirty.discard(r)
            if outside_max is None:
                new = _coordinate_step(q, nodes, tree, r, mu, active, metric, smooth, device, chunk_size,
                                       fixed=fixed)
            else:
                new, S_r, n_r = _coordinate_step(q, nodes, tree, r, mu, active, metric, smooth, device, chunk_size,
                                                 return_sums=True, fixed=fixed)
                cut = dinkelbach_threshold(metric, rma_score(metric, S_r, n_r, mu[:, r], smooth))
                if not bool(((cut > outside_max[:, r]) | ~active[:, r]).all()):
                    raise _Uncertified
            if not torch.equal(new, nodes):
                dirty |= neighbours[r]
                nodes = new
        S, n = sums(nodes)
        values = rma_score(metric, S, n, mu, smooth)
        current = values.sum(-1)
        if outside_max is not None and not bool(((dinkelbach_threshold(metric, values) > outside_max) |
                                                 ~active).all()):
            raise _Uncertified  # a left-out voxel could gain from a joint move
        for trial in _joint_moves(q, nodes, tree, mu, active, metric, smooth, sums=(S, n)):
            trial_values = rma_score(metric, *sums(trial), mu, smooth)
            value = trial_values.sum(-1)
            better = value > current
            if bool(better.any()):
                nodes = torch.where(better.unsqueeze(-1), trial, nodes)
                values = torch.where(better.unsqueeze(-1), trial_values, values)
                current = torch.where(better, value, current)
                dirty = set(range(len(tree)))
        if bool((current - start <= REL_TOL * current.abs()).all()):
            break
    return nodes, sweeps, values


#: the ascent works on the voxels that can move when it leaves out at least this fraction of them
COMPACT_MIN_OUT = 0.25
#: a voxel outside region ``r`` is left out only if ``q_r`` is below this fraction of ``r``'s independent threshold
#: (a margin: the ascent's thresholds stay near the independent ones; the certificate checks it at every step);
#: where a step cannot be certified the next, wider margin is tried, then the whole volume
COMPACT_MARGINS = (0.8, 0.5)
#: a voxel inside region ``r`` is left out only if ``q_r`` exceeds ``g(F_r)`` (``F_r``: the independent optimum,
#: the largest value any mask of ``r`` can have) by this relative margin (float64 rounding of the solver's sums)
COMPACT_SAFETY = 1e-6


#: voxels per chunk of the pass that picks the voxels the ascent leaves out (its temporaries: about 30 bytes per
#: voxel and region)
_LEFT_OUT_CHUNK = 1 << 18


def _left_out(rows: Any, i: int, si: torch.Tensor, member_t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One pass over item ``i``: which voxels the ascent must keep (bool ``(N,)``), and of the others the largest
    ``q_r`` outside each region (``outside_max``, float64 ``(1, R)``) and the ``q_r`` sum and count inside each
    (``fixed``).  A voxel is left out when, for every region ``r``, it is in ``r``'s mask (``member_t``: node ->
    regions) with ``q_r > hi_r``, or outside it with ``q_r < lo_r`` (``lo``, ``hi``: ``(R, 1)``)."""
    n_vox, num_regions = si.shape[1], member_t.shape[0]
    keep = torch.empty(n_vox, dtype=torch.bool, device=si.device)
    outside_max = torch.full((1, num_regions), -1.0, dtype=torch.float64, device=si.device)
    fixed_s = torch.zeros((1, num_regions), dtype=torch.float64, device=si.device)
    fixed_n = torch.zeros((1, num_regions), dtype=torch.float64, device=si.device)

    def settle(values: torch.Tensor, within: torch.Tensor, lo_b: torch.Tensor, hi_b: torch.Tensor) -> torch.Tensor:
        """Which of these voxels (``values``, ``within``: ``(R, k)``) are left out; adds their sums and bounds."""
        left = torch.where(within, values > hi_b, values < lo_b).all(0)
        fixed = within & left
        fixed_s[0] += torch.where(fixed, values, 0.0).sum(-1, dtype=torch.float64)
        fixed_n[0] += fixed.sum(-1)
        outside_max[0] = torch.maximum(outside_max[0], torch.where(~within & left, values, -1.0).amax(-1).double())
        return left

    for a, b in _chunks(n_vox, _LEFT_OUT_CHUNK):  # chunk temporaries: a few R x m arrays, some of them float64
        block = rows(i, a, b)[0]  # (R, m)
        nd = si[0, a:b]
        lo_b, hi_b = lo.to(block.dtype), hi.to(block.dtype)
        if 8 * int(torch.count_nonzero(nd)) >= nd.numel():  # dense: every voxel's regions at once
            keep[a:b] = ~settle(block, member_t[:, nd.long()], lo_b, hi_b)
            continue
        # sparse (a scan): a background voxel is left out when every q_r is below its bound, and the few voxels in
        # some region are settled on their own
        left = (block < lo_b).all(0)
        left &= nd == 0
        outside_max[0] = torch.maximum(outside_max[0], torch.where(left, block, -1.0).amax(-1).double())
        fg = torch.nonzero(nd).squeeze(1)
        if fg.numel():
            left[fg] = settle(block.index_select(1, fg), member_t.index_select(1, nd.index_select(0, fg).long()),
                              lo_b, hi_b)
        keep[a:b] = ~left
    return keep, outside_max, (fixed_s, fixed_n)


def _ascend_items(rows: Any, start: torch.Tensor, tree: RegionTree, mu: torch.Tensor, active: torch.Tensor,
                  thr: torch.Tensor, metric: str, smooth: float, device: torch.device | None,
                  chunk_size: int | None, upper: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, int, torch.Tensor, list[float]]:
    """:func:`_ascend` item by item (an item's result never depends on the others in its batch), on the voxels
    that can move when that is certified.

    ``rows``: a callable ``(i, a, b) -> (1, R, b - a)``, item ``i``'s region probabilities of voxels ``a`` to ``b``
    (computed chunk by chunk from class probabilities: no ``R x N`` copy of the volume is needed here).
    ``upper``: float64 ``(B, R)``, the largest value each region's objective can have (the independent optimum;
    ``inf`` where unknown).

    With Dice ``s = 0`` or IoU, a region's mask at any step is a superlevel set ``{q_r > g(f)}`` of its own
    objective value ``f``, and ``f`` never exceeds the independent optimum ``F_r``.  So a voxel in region ``r``'s
    mask with ``q_r > g(F_r)`` never leaves it (removing it lowers ``f_r`` at any state), and a voxel outside it
    with ``q_r`` well below the independent threshold ``thr`` does not join it while the thresholds stay near the
    independent ones.  A voxel that is one or the other for every region is left out: the ascent runs on the
    others (a gather of ``R x M`` values), with the left-out voxels' sums in the masks as fixed offsets and the
    certificate of :func:`_ascend` (``outside_max``).  An item where a step cannot be certified is tried again
    with the wider margin of :data:`COMPACT_MARGINS`, then on the whole volume.  Either way the decision is the
    ascent's on the whole volume (up to float64 rounding of the sums).
    """
    nodes = start  # the caller's fresh map (written item by item below)
    values, sweeps, compacted = [], 0, []
    compactable = metric == "iou" or smooth == 0
    base = thr.nan_to_num(posinf=0.0).clamp(min=0.0)
    if upper is None:
        inside = torch.full_like(base, float("inf"))
    else:
        inside = dinkelbach_threshold(metric, upper.double()).to(base.device) * (1.0 + COMPACT_SAFETY)
        inside = torch.where(active & inside.isfinite(), inside, torch.full_like(inside, float("inf")))
    member_t = _membership(tree, start.device).bool().T.contiguous()  # (R, R + 1): node j lies in region r
    batch, n_vox = start.shape
    for i in range(batch):
        si, sl = start[i:i + 1], slice(i, i + 1)
        result = None
        for margin in (COMPACT_MARGINS if compactable else ()):
            lo = torch.where(active[i], margin * base[i], torch.full_like(base[i], float("inf"))).unsqueeze(-1)
            keep, outside_max, fixed = _left_out(rows, i, si, member_t, lo, inside[i].unsqueeze(-1))
            out_count = n_vox - int(torch.count_nonzero(keep))  # (keep.sum() would make an int64 copy of keep)
            if out_count == n_vox:
                continue  # nothing left to ascend on: a wider margin leaves out fewer
            if out_count < COMPACT_MIN_OUT * n_vox:
                break  # too few voxels left out (a wider margin leaves out fewer still): the whole volume
            idx = torch.nonzero(keep).squeeze(1)
            if n_vox < 2**31:
                idx = idx.to(torch.int32)  # int32 indices: half of int64's M values
            del keep
            try:
                sub, n_sw, val = _ascend(_gather_voxels(rows, i, idx, n_vox), si.index_select(1, idx), tree, mu[sl],
                                         active[sl], metric, smooth, device, chunk_size, outside_max=outside_max,
                                         fixed=fixed)
            except _Uncertified:
                continue
            full = si.clone()
            full[0, idx] = sub[0]
            result = (full, n_sw, val, idx.numel() / n_vox)
            break
        if result is None:
            whole = rows.item(i) if isinstance(rows, RegionView) else rows(i, 0, n_vox)
            full, n_sw, val = _ascend(whole, si, tree, mu[sl], active[sl], metric, smooth, device,
                                      chunk_size)
            result = (full, n_sw, val, 1.0)
        nodes[i] = result[0][0]
        sweeps = max(sweeps, result[1])
        values.append(result[2])
        compacted.append(result[3])
    return nodes, sweeps, torch.cat(values), compacted


def _gather_voxels(rows: Any, i: int, idx: torch.Tensor, n_vox: int) -> torch.Tensor:
    """Item ``i``'s region probabilities at the sorted voxel indices ``idx``, ``(1, R, M)``, chunk by chunk from
    ``rows`` (see :func:`_ascend_items`), row by row: a 1-D ``index_select`` per row is about 4x faster than
    selecting along the last dimension of a 3-D tensor (the same values)."""
    out = None
    bounds = torch.searchsorted(idx, torch.tensor([a for a, _ in _chunks(n_vox)] + [n_vox], dtype=idx.dtype,
                                                 device=idx.device))
    for k, (a, b) in enumerate(_chunks(n_vox)):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        if lo == hi and out is not None:
            continue
        block = rows(i, a, b)[0]
        if out is None:
            out = torch.empty((1, block.shape[0], idx.numel()), dtype=block.dtype, device=block.device)
        local = idx[lo:hi] - a
        for r in range(block.shape[0]):
            torch.index_select(block[r], 0, local, out=out[0, r, lo:hi])
    return out


def _region_rows(flat: torch.Tensor, tree: RegionTree, region_probs: bool) -> Any:
    """``(i, a, b) -> (1, R, b - a)``: item ``i``'s region probabilities of voxels ``a`` to ``b`` (a view of region
    input; the sums of class input computed for those voxels only, the same values as
    :func:`region_probabilities` of the whole volume: each voxel's sum adds the same classes in the same order)."""
    if region_probs:
        return lambda i, a, b: flat[i:i + 1, :, a:b]
    return RegionView(flat, tree)


def _select(candidates: list[torch.Tensor], values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch item, the candidate node map with the largest value (the first on ties) and its index."""
    pick = torch.stack(values, 1).argmax(1)
    out = torch.empty_like(candidates[0])
    for i, k in enumerate(pick.tolist()):  # item by item: no (B, K, N) stack
        out[i] = candidates[k][i]
    return out, pick


@torch.no_grad()
def solve_regions(
    flat: torch.Tensor,
    tree: RegionTree,
    metric: str,
    smooth: float,
    keep: Any,
    region_probs: bool = False,
    device: torch.device | None = None,
    chunk_size: int | None = None,
    return_details: bool = False,
) -> Any:
    """The node map ``(B, N)`` (uint8: 0 background, ``1 + r`` region ``r``) that maximises the summed RMA
    objective of the regions.

    Args:
        flat: ``(B, C, N)`` class probabilities or, with ``region_probs``, ``(B, R, N)`` region probabilities.
        tree: the regions.
        metric, smooth: the metric (``"dice"``/``"iou"``) and its smoothing.
        keep: ``None`` (every region with a positive probability may be non-empty) or a callable
            ``(q, stats, thresholds, solution) -> bool (B, R)``: the regions pruning keeps, from the independent
            solve (``solution``: its :class:`~rankseg_monai.solvers.rma.RMASolution`, band summary included, for
            ``pruning.auto_active_from_solution``).  A region is kept only when the region above it is kept; a
            pruned region's mask is empty.
        region_probs: the channels are region probabilities (one per region, e.g. sigmoids), not classes.
        device, chunk_size: as for the other solvers (the threshold solves stream through ``device``).
        return_details: also return a dict: ``mu``, ``active``, ``candidates``
            (name -> summed objective ``(B,)`` of each starting candidate), ``start`` (the chosen one per item),
            ``sweeps`` (the most of any item), ``compacted`` (per item, the fraction of voxels the certified ascent
            worked on; 1.0 for the whole volume) and ``objective`` (the final ``(B, R)`` values).
    """
    q = flat if region_probs else RegionView(flat, tree)  # class input: region probabilities computed where read
    stats = row_statistics(q, device=device, chunk_size=chunk_size)
    on = stats.vmax.device
    mu = stats.mu.to(q.device)
    independent = rma_solve(q, stats, metric, smooth, stats.vmax > 0, device=device, chunk_size=chunk_size,
                            band_summary=keep is not None)
    thr = independent.thr
    # the independent optimum of each region: no mask of the region scores more (inf where the solver gave up)
    upper = torch.where(independent.known, rma_score(metric, independent.S, independent.n.double(), stats.mu.to(on),
                                                      smooth), torch.full_like(independent.S, float("inf")))
    active = (stats.vmax > 0) if keep is None else keep(q, stats, thr, independent).to(on)
    active = active.to(q.device).clone()
    for r in tree.order:  # a region is kept only when the region above it is kept
        if tree.parent[r] >= 0:
            active[:, r] &= active[:, tree.parent[r]]
    given = list(range(len(tree)))
    # the bounds of the top-down steps start from the independent masks (their current masks are empty)
    thr_q = thr.to(q.device)
    independent_thr = thr_q.nan_to_num(posinf=2.0).clamp(min=0.0)
    node_dtype = _node_dtype(len(tree))
    independent_paint = torch.empty((q.shape[0], q.shape[2]), dtype=node_dtype, device=q.device)
    independent_nested = torch.empty_like(independent_paint)
    for a, b in _chunks(q.shape[2]):  # chunk by chunk: no R x N masks
        independent = q[..., a:b] > thr_q.unsqueeze(-1)
        independent_paint[:, a:b] = paint_nodes(independent, tree, given)
        for r in tree.order:  # each child intersected with its (already intersected) parent, in place
            if tree.parent[r] >= 0:
                independent[:, r] &= independent[:, tree.parent[r]]
        independent_nested[:, a:b] = paint_nodes(independent, tree, tree.order)
    del independent
    top_down = torch.zeros((q.shape[0], q.shape[2]), dtype=node_dtype, device=q.device)
    for r in tree.order:  # each region solved exactly inside its parent's mask
        top_down = _coordinate_step(q, top_down, tree, r, mu, active, metric, smooth, device, chunk_size,
                                    hint=independent_thr[:, r:r + 1])
    if region_probs:
        baseline = paint_nodes(q > 0.5, tree, given)
    else:  # the running-maximum argmax: same labels, about 10x faster than torch.argmax over a strided class axis
        baseline = nodes_from_labels(argmax_labels(flat, device=device, chunk_size=chunk_size,
                                                   out_dtype=_node_dtype(flat.shape[1])), tree, flat.shape[1])
    candidates = {
        "threshold_paint" if region_probs else "argmax": baseline,
        "independent_paint": independent_paint,
        "independent_nested": independent_nested,
        "top_down": top_down,
    }
    names = list(candidates)
    restrict = not bool(active.all())
    maps = [_restrict(candidates[name], tree, active) if restrict else candidates[name] for name in names]
    values = []
    for k, m in enumerate(maps):  # candidates are often equal (e.g. painted and nested): evaluate each map once
        same = next((j for j in range(k) if torch.equal(m, maps[j])), None)
        values.append(values[same] if same is not None else region_objective(q, m, tree, mu, metric, smooth).sum(-1))
    start, pick = _select(maps, values)
    # the ascent reads the region probabilities chunk by chunk from the input: neither they nor the candidates stay
    del q, candidates, maps, baseline, independent_paint, independent_nested, top_down
    nodes, sweeps, objective, compacted = _ascend_items(_region_rows(flat, tree, region_probs), start, tree, mu,
                                                         active, thr_q, metric, smooth, device, chunk_size,
                                                         upper=upper)
    if not return_details:
        return nodes
    return nodes, {"mu": mu, "active": active, "candidates": dict(zip(names, values)),
                   "start": [names[int(i)] for i in pick], "sweeps": sweeps, "compacted": compacted,
                   "objective": objective}
