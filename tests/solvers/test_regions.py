"""Region-aware RankSEG (solvers/regions.py): brute force over all label maps of tiny cases, never worse than the
baselines, nested masks consistent with the label map, tie groups never split, clear errors."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch

from rankseg_monai.functional import rankseg
from rankseg_monai.solvers.regions import (
    RegionTree,
    RegionView,
    labels_from_nodes,
    nodes_from_labels,
    region_masks,
    region_objective,
    region_probabilities,
    solve_regions,
)

LITS = {"liver": [1, 2], "tumour": [2]}
BRATS = {"whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
KITS = {"kidney_and_masses": [1, 2, 3], "masses": [2, 3], "tumor": 2}
TREE = {"liver": [1, 2, 3], "tumour": [2], "vessel": [3]}
SETTINGS = [("dice", 0.0), ("iou", 0.0), ("dice", 1.0)]


def _rma(metric, S, n, mu, s):
    """Independent numpy RMA value (the formula, written again; broadcasts)."""
    if metric == "dice":
        v = 2.0 * S / (mu + n + 1.0 + s)
        return v + (s / (mu + n + s) if s > 0 else 0.0)
    d = mu - S + n + s
    return np.where(d > 0, (S + s) / np.where(d > 0, d, 1.0), 0.0)


def _brute_force(q: np.ndarray, tree: RegionTree, metric: str, s: float) -> float:
    """Best summed objective over every node map (every label map, up to labels with the same regions)."""
    num_regions, n = q.shape
    member = np.array([[j in tree.subtree(r) for r in range(num_regions)] for j in range(num_regions)])  # (R, R)
    member = np.vstack([np.zeros(num_regions, bool), member])  # node 0: no region
    maps = np.array(list(itertools.product(range(num_regions + 1), repeat=n)))  # (K, N)
    inside = member[maps]  # (K, N, R)
    S = np.einsum("knr,rn->kr", inside, q)
    size = inside.sum(1)
    mu = q.sum(1)
    return float(_rma(metric, S, size, mu[None], s).sum(1).max())


def _value(q: np.ndarray, nodes: np.ndarray, tree: RegionTree, metric: str, s: float) -> float:
    masks = region_masks(torch.from_numpy(nodes)[None], tree)[0].numpy()  # (R, N)
    return float(_rma(metric, (masks * q).sum(1), masks.sum(1), q.sum(1), s).sum())


def _tiny_case(rng, tree, region_probs, num_classes):
    n = int(rng.integers(3, 7))
    if region_probs:
        p = rng.uniform(0, 1, (len(tree), n)) ** rng.uniform(0.5, 3)
    else:
        z = rng.normal(0, 2, (num_classes, n))
        p = np.exp(z) / np.exp(z).sum(0)
    return p.astype(np.float32)


@pytest.mark.parametrize("name,spec,num_classes,region_probs,min_hits", [
    ("lits", LITS, 3, False, 58), ("lits", LITS, 3, True, 58),
    ("brats", BRATS, 4, False, 58), ("brats", BRATS, 4, True, 56),
    ("kits", KITS, 4, False, 58), ("tree", TREE, 4, False, 56), ("tree", TREE, 4, True, 52),
])
def test_brute_force_over_all_label_maps(name, spec, num_classes, region_probs, min_hits):
    """60 tiny cases per setting: never above the optimum, never below any baseline, the optimum in most cases
    (the rates measured are in docs/regions.md)."""
    tree = RegionTree.parse(spec)
    rng = np.random.default_rng(zlib.crc32(f"{name}{region_probs}".encode()))
    hits = 0
    for trial in range(60):
        metric, s = SETTINGS[trial % 3]
        p = _tiny_case(rng, tree, region_probs, num_classes)
        x = torch.from_numpy(p)[None]
        nodes, details = solve_regions(x, tree, metric, s, None, region_probs=region_probs, return_details=True)
        q = (x if region_probs else region_probabilities(x, tree))[0].double().numpy()
        best = _brute_force(q, tree, metric, s)
        got = _value(q, nodes[0].numpy(), tree, metric, s)
        assert got <= best + 1e-12
        for cand, value in details["candidates"].items():
            assert got >= float(value[0]) - 1e-12, (cand, got, float(value[0]))
        hits += got >= best - 1e-12
    assert hits >= min_hits, f"{name}: the global optimum in {hits}/60 cases"


def _blob_probs(seed, shape=(24, 20, 10), num_classes=4, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((2, num_classes, *shape), generator=g)
    z = torch.nn.functional.avg_pool3d(z, 5, 1, 2) * sharp * 4
    return torch.softmax(z, 1)


@pytest.mark.parametrize("spec", [LITS, BRATS, KITS, TREE], ids=["lits", "brats", "kits", "tree"])
@pytest.mark.parametrize("metric,smooth", SETTINGS)
def test_volumes_beat_every_baseline_and_masks_are_nested(spec, metric, smooth, device):
    tree = RegionTree.parse(spec)
    num_classes = 1 + tree.max_label
    probs = _blob_probs(3, num_classes=num_classes).to(device)
    flat = probs.reshape(2, num_classes, -1)
    nodes, details = solve_regions(flat, tree, metric, smooth, None, return_details=True)
    final = details["objective"].sum(-1)
    for value in details["candidates"].values():
        assert bool((final >= value - 1e-12).all())
    labels = labels_from_nodes(nodes, tree, flat, torch.int64)
    masks = region_masks(nodes, tree)
    for r, lab in enumerate(tree.labels):  # the label map says exactly the region masks
        assert torch.equal(masks[:, r], torch.isin(labels, torch.tensor(sorted(lab), device=device)))
        if tree.parent[r] >= 0:  # nested
            assert bool((masks[:, r] <= masks[:, tree.parent[r]]).all())
    assert torch.equal(nodes_from_labels(labels, tree, num_classes), nodes)
    # the public entry gives the same label map, on every layout
    out = rankseg(probs, metric=metric, smooth=smooth, regions=spec, pruning_prob=0.0)
    assert torch.equal(out.reshape(2, -1), labels)
    masks_out = rankseg(probs, metric=metric, smooth=smooth, regions=spec, pruning_prob=0.0, output_mode="multilabel")
    assert torch.equal(masks_out.reshape(2, len(tree), -1), masks)
    if device == "cpu":
        perm = probs.permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2)
        assert torch.equal(rankseg(perm, metric=metric, smooth=smooth, regions=spec, pruning_prob=0.0), out)


def test_improves_the_summed_objective_over_argmax_and_multiclass():
    """On smooth softmax volumes the region decision's summed RMA value beats argmax's and plain multiclass
    RankSEG's (which optimises the labels, not the regions)."""
    tree = RegionTree.parse(LITS)
    for seed in range(4):
        probs = _blob_probs(seed, num_classes=3)
        flat = probs.reshape(2, 3, -1)
        q = region_probabilities(flat, tree)
        mu = q.double().sum(-1)
        ours = region_objective(q, solve_regions(flat, tree, "dice", 0.0, None), tree, mu, "dice", 0.0).sum(-1)
        for labels in (flat.argmax(1), rankseg(probs, pruning_prob=0.0).reshape(2, -1)):
            theirs = region_objective(q, nodes_from_labels(labels, tree, 3), tree, mu, "dice", 0.0).sum(-1)
            assert bool((ours >= theirs - 1e-12).all())


def _scan_like(seed: int, region_probs: bool, batch: int = 2) -> torch.Tensor:
    """Sparse volumes as scans give them: a structure over a few percent of the box, nested parts inside, soft
    boundaries and noise, confident background elsewhere ((batch, 3, 24, 24, 16) softmax classes or sigmoid
    regions)."""
    g = torch.Generator().manual_seed(seed)
    shape = (24, 24, 16)
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    out = []
    for _ in range(batch):
        centre = [n * (0.35 + 0.3 * float(torch.rand((), generator=g))) for n in shape]
        dist = torch.sqrt(sum(((x - c) / (0.18 * n)) ** 2 for x, c, n in zip(grids, centre, shape)))
        noise = 0.6 * torch.randn((3, *shape), generator=g)
        outer, inner, core = 7 * (1 - dist), 7 * (1 - 2.2 * dist), 6 * (1 - 4 * dist)
        if region_probs:
            out.append(torch.sigmoid(torch.stack([outer, inner, core]) + noise))
        else:
            out.append(torch.softmax(torch.stack([torch.zeros(shape), outer, inner]) + noise, 0))
    return torch.stack(out)


@pytest.mark.parametrize("region_probs", [False, True], ids=["classes", "regions"])
@pytest.mark.parametrize("metric,smooth", SETTINGS)
def test_the_ascent_on_the_voxels_that_can_move_is_the_ascent_on_the_volume(region_probs, metric, smooth, device,
                                                                          monkeypatch):
    """The certified compaction (``_ascend_items``) gives the whole-volume ascent's node map; with a margin so
    large that steps cannot be certified it falls back to the whole volume, still with the same result; an item's
    decision does not depend on the other items of its batch."""
    from rankseg_monai.solvers import regions

    spec = BRATS if region_probs else LITS
    tree = RegionTree.parse(spec)
    ascend, refused = regions._ascend, []

    def counting(*args, **kwargs):
        try:
            return ascend(*args, **kwargs)
        except regions._Uncertified:
            refused.append(1)
            raise

    monkeypatch.setattr(regions, "_ascend", counting)
    for seed in range(3):
        x = _scan_like(seed, region_probs).to(device)
        flat = x.reshape(2, 3, -1)
        nodes, details = solve_regions(flat, tree, metric, smooth, None, region_probs=region_probs,
                                       return_details=True)
        if metric == "iou" or smooth == 0:
            assert max(details["compacted"]) < 0.5  # the ascent worked on the structure, not the volume
        else:  # Dice with s > 0 is not a threshold of g(f): the whole volume
            assert details["compacted"] == [1.0, 1.0]
        with monkeypatch.context() as m:
            m.setattr(regions, "COMPACT_MIN_OUT", 2.0)  # never compact
            whole, whole_details = solve_regions(flat, tree, metric, smooth, None, region_probs=region_probs,
                                                 return_details=True)
            assert whole_details["compacted"] == [1.0, 1.0]
        assert torch.equal(nodes, whole)
        torch.testing.assert_close(details["objective"], whole_details["objective"], rtol=1e-12, atol=1e-12)
        assert not refused  # the default margin certifies these
        with monkeypatch.context() as m:
            m.setattr(regions, "COMPACT_MARGINS", (4.0,))  # leaves out every background voxel of the start
            assert torch.equal(solve_regions(flat, tree, metric, smooth, None, region_probs=region_probs), whole)
        refused.clear()
        if metric == "iou" or smooth == 0:  # an uncertified margin: the next, wider one, still compacted
            calls: list[int] = []

            def refuse_first_margin(*args, outside_max=None, calls=calls, **kwargs):
                calls.append(1)  # each item: its first margin refused, its second certified
                if outside_max is not None and len(calls) % 2 == 1:
                    refused.append(1)
                    raise regions._Uncertified
                return ascend(*args, outside_max=outside_max, **kwargs)

            with monkeypatch.context() as m:
                m.setattr(regions, "_ascend", refuse_first_margin)
                retried, retried_details = solve_regions(flat, tree, metric, smooth, None,
                                                         region_probs=region_probs, return_details=True)
            assert torch.equal(retried, whole) and len(refused) == 2 and max(retried_details["compacted"]) < 0.5
        refused.clear()
        if metric == "iou" or smooth == 0:
            # a voxel left out that a step would take: the certificate refuses (g(f) <= 1/2 < 0.99 for Dice) ...
            q = flat if region_probs else region_probabilities(flat, tree)
            mu, active = q.double().sum(-1), torch.ones((2, len(tree)), dtype=torch.bool, device=device)
            with pytest.raises(regions._Uncertified):
                regions._ascend(q, whole, tree, mu, active, metric, smooth, None, None,
                                outside_max=torch.full((2, len(tree)), 0.99, dtype=torch.float64, device=device))
            refused.clear()
            # ... and an uncertified item is solved again on the whole volume

            def refuse_compacted(*args, outside_max=None, **kwargs):
                if outside_max is not None:
                    refused.append(1)
                    raise regions._Uncertified
                return ascend(*args, **kwargs)

            with monkeypatch.context() as m:
                m.setattr(regions, "_ascend", refuse_compacted)
                again, again_details = solve_regions(flat, tree, metric, smooth, None, region_probs=region_probs,
                                                     return_details=True)
            assert torch.equal(again, whole) and len(refused) == 2 * len(regions.COMPACT_MARGINS)
            assert again_details["compacted"] == [1.0, 1.0]
            refused.clear()
        for i in range(2):
            alone = solve_regions(flat[i:i + 1], tree, metric, smooth, None, region_probs=region_probs)
            assert torch.equal(alone[0], nodes[i])


def _dense(seed: int, region_probs: bool, batch: int = 2) -> torch.Tensor:
    """Dense, uncertain volumes (bench_regions' hard kind, small): smooth noise, every structure over about half the
    box, ``(batch, 3, 24, 24, 16)`` softmax classes or sigmoid regions."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.avg_pool3d(torch.randn((batch, 3, 24, 24, 16), generator=g), 5, 1, 2) * 12
    if region_probs:
        return torch.sigmoid(z - torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1, 1))
    z[:, 0] += 1.0
    return torch.softmax(z, 1)


@pytest.mark.parametrize("region_probs", [False, True], ids=["classes", "regions"])
@pytest.mark.parametrize("metric", ["dice", "iou"])
def test_voxels_left_out_inside_the_regions_keep_the_whole_volume_decision(region_probs, metric, device,
                                                                           monkeypatch):
    """On dense volumes most voxels lie inside some region: the ones whose ``q_r`` exceeds ``g(F_r)`` (the
    independent optimum) in every region holding them, and lie well below the thresholds of the others, are left
    out of the ascent with their sums as fixed offsets.  The node map and the objective are the whole-volume
    ascent's; the fixed offsets are really used (voxels inside regions were left out)."""
    from rankseg_monai.solvers import regions

    spec = BRATS if region_probs else LITS
    tree = RegionTree.parse(spec)
    ascend, fixed_sizes = regions._ascend, []

    def recording(*args, fixed=None, **kwargs):
        if fixed is not None:
            fixed_sizes.append(float(fixed[1].sum()))
        return ascend(*args, fixed=fixed, **kwargs)

    monkeypatch.setattr(regions, "_ascend", recording)
    for seed in range(3):
        x = _dense(seed, region_probs).to(device)
        flat = x.reshape(2, 3, -1)
        fixed_sizes.clear()
        nodes, details = solve_regions(flat, tree, metric, 0.0, None, region_probs=region_probs,
                                       return_details=True)
        assert fixed_sizes and min(fixed_sizes) > 0  # voxels inside regions were left out, every item
        assert max(details["compacted"]) < 0.8
        with monkeypatch.context() as m:
            m.setattr(regions, "COMPACT_MIN_OUT", 2.0)  # never compact
            whole, whole_details = solve_regions(flat, tree, metric, 0.0, None, region_probs=region_probs,
                                                 return_details=True)
        assert whole_details["compacted"] == [1.0, 1.0]
        assert torch.equal(nodes, whole)
        torch.testing.assert_close(details["objective"], whole_details["objective"], rtol=1e-12, atol=1e-12)
        with monkeypatch.context() as m:  # no voxel inside a region left out: the same decision
            m.setattr(regions, "COMPACT_SAFETY", float("inf"))
            assert torch.equal(solve_regions(flat, tree, metric, 0.0, None, region_probs=region_probs), whole)


@pytest.mark.parametrize("metric,smooth", SETTINGS)
def test_a_step_on_class_input_holds_no_float_row_and_decides_as_on_stored_region_probabilities(metric, smooth):
    """With class input a coordinate step computes its free values chunk by chunk where read
    (``regions._FreeValues``): the same node map and float64 sums, bit for bit, as the step on stored region
    probabilities, with a chunk size that splits the volume."""
    from rankseg_monai.solvers import regions

    g = torch.Generator().manual_seed(11)
    flat = torch.softmax(torch.randn((2, 4, 3000), generator=g) * 3, 1)
    tree = RegionTree.parse({"brain": [1, 2, 3], "tissue": [2, 3], "white": [3]})
    view, stored = RegionView(flat, tree), region_probabilities(flat, tree)
    mu = stored.double().sum(-1)
    active = torch.ones((2, 3), dtype=torch.bool)
    nodes = nodes_from_labels(flat.argmax(1), tree, 4)
    for r in tree.order:
        lazy = regions._coordinate_step(view, nodes, tree, r, mu, active, metric, smooth, None, 700,
                                        return_sums=True)
        kept = regions._coordinate_step(stored, nodes, tree, r, mu, active, metric, smooth, None, 700,
                                        return_sums=True)
        assert torch.equal(lazy[0], kept[0]) and torch.equal(lazy[1], kept[1]) and torch.equal(lazy[2], kept[2])
        nodes = lazy[0]
    values = regions._FreeValues(view, nodes, 1, 1)
    assert torch.equal(values[:, 100:2500], torch.where((nodes == 1) | (nodes == 2), stored[:, 1], 0.0)[:, 100:2500])
    with pytest.raises(TypeError):
        values[0]


def test_tie_groups_are_never_split():
    """Voxels with identical probabilities always get the same label (every step is a per-voxel function of the
    probabilities and the current decision, and starts from such a decision)."""
    g = torch.Generator().manual_seed(5)
    levels = torch.tensor([0.05, 0.2, 0.35, 0.5, 0.65])
    for spec, num_classes in ((LITS, 3), (BRATS, 4), (TREE, 4)):
        raw = levels[torch.randint(0, 5, (1, num_classes, 400), generator=g)]
        probs = raw / raw.sum(1, keepdim=True)
        for metric, smooth in SETTINGS:
            labels = rankseg(probs, metric=metric, smooth=smooth, regions=spec, pruning_prob=0.0)[0]
            keys = {}
            for v in range(probs.shape[-1]):
                key = tuple(probs[0, :, v].tolist())
                assert keys.setdefault(key, int(labels[v])) == int(labels[v])


def test_region_probabilities_and_pruning():
    tree = RegionTree.parse(BRATS)
    p = torch.softmax(torch.randn(1, 4, 50), 1)
    q = region_probabilities(p, tree)
    torch.testing.assert_close(q[0, 0], p[0, 1:].sum(0).clamp(max=1))
    torch.testing.assert_close(q[0, 2], p[0, 3])
    # an absent enhancing tumour (tiny probabilities) is pruned by "auto", kept by 0
    p = torch.full((1, 4, 400), 0.001)
    p[0, 1, :200] = 0.9
    p[0, 1, :100] = 0.05
    p[0, 2, :100] = 0.9
    p[0, 0] = 1 - p[0, 1:].sum(0)
    auto = rankseg(p, regions=BRATS, pruning_prob="auto")
    assert int((auto == 3).sum()) == 0 and int((auto == 2).sum()) > 0
    # pruning a region empties everything below it too
    masks = rankseg(p, regions=BRATS, pruning_prob=0.99, output_mode="multilabel")
    assert int(masks.sum()) == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_region_probabilities_are_elementwise(threads):
    """The region probabilities a chunked pass computes (``RegionView``, slices of the input) are the bits of the
    whole volume's, for regions of one to eight classes; up to four classes they are ``torch.sum``'s over the
    class axis (the formula before: the same decisions)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(7)
        for num_classes, n in ((3, 5), (5, 4099), (9, 70001)):
            labels = list(range(1, num_classes))
            tree = RegionTree.parse([labels, labels[1:], *([labels[-1:]] if len(labels) > 2 else [])])
            p = torch.softmax(3 * torch.randn(2, num_classes, n, generator=g), 1)
            whole = region_probabilities(p, tree)
            view = RegionView(p, tree)
            for a, b in ((0, 1), (1, 9), (3, n), (n // 3, n - 2)):
                if a < b <= n:
                    assert torch.equal(region_probabilities(p[..., a:b], tree), whole[..., a:b])
                    assert torch.equal(view[..., a:b], whole[..., a:b])
                    assert torch.equal(view.row_block(1, a, b), whole[:, 1, a:b])
            assert torch.equal(view[:, 0], whole[:, 0]) and view.shape == whole.shape and view.dtype == whole.dtype
            for r, region in enumerate(tree.labels):
                if len(region) <= 4:
                    idx = torch.tensor(sorted(region))
                    assert torch.equal(whole[:, r], torch.sum(p.index_select(1, idx), 1).clamp(max=1.0))
    finally:
        torch.set_num_threads(saved)


def test_class_input_never_holds_all_region_probabilities(monkeypatch):
    """With class input the solver computes region probabilities where it reads them: on a scan-like volume
    (the ascent works on the voxels that can move) no ``R x N`` tensor of them is made."""
    from rankseg_monai.solvers import regions

    made = []

    def recording(fn):
        def wrapper(*args):
            out = fn(*args)
            made.append(out.numel())
            return out
        return wrapper

    for owner, name in ((regions, "_region_row"), (regions, "region_probabilities"), (RegionView, "row"),
                        (RegionView, "block")):
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    shape = (1, 3, 1600, 1400)  # N > R chunks of the region passes, so all of a row would show
    z = torch.zeros(shape)
    z[:, 0] = 6.0  # confident background, an organ over a fifth of the box holding a tumour
    z[:, 1, 300:900, 300:700] = 12.0
    z[:, 2, 500:560, 500:570] = 18.0
    z += torch.randn(shape, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(z, 1)
    tree = RegionTree.parse(LITS)
    nodes, details = solve_regions(p.reshape(1, 3, -1), tree, "dice", 0.0, None, return_details=True)
    n_vox = p[0, 0].numel()
    assert details["compacted"][0] < 1.0
    assert made and max(made) <= len(tree) * regions._CHUNK < n_vox
    whole = region_probabilities(p.reshape(1, 3, -1), tree)  # the values the ascent's objective was computed on
    torch.testing.assert_close(details["objective"], region_objective(whole, nodes, tree, details["mu"], "dice", 0.0),
                               rtol=1e-12, atol=0)


def test_region_probabilities_input_brats_channels():
    """MONAI's BraTS channels (TC, WT, ET, sigmoid): the masks come back in the channel order, nested."""
    g = torch.Generator().manual_seed(2)
    logits = torch.nn.functional.avg_pool3d(torch.randn(1, 3, 20, 20, 10, generator=g), 5, 1, 2) * 12
    q = torch.sigmoid(logits)
    regions = [[1, 4], [1, 2, 4], [4]]  # TC, WT, ET (BraTS 2021 labels)
    masks = rankseg(q, regions=regions, region_probs=True, output_mode="multilabel")
    assert masks.shape == (1, 3, 20, 20, 10)
    assert bool((masks[:, 2] <= masks[:, 0]).all()) and bool((masks[:, 0] <= masks[:, 1]).all())
    labels = rankseg(q, regions=regions, region_probs=True)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 4}
    for r, lab in enumerate(regions):
        assert torch.equal(masks[:, r], torch.isin(labels, torch.tensor(lab)))


def test_nnunet_painting_order_and_class_order():
    tree = RegionTree.parse(KITS, regions_class_order=[1, 3, 2])
    assert tree.paint == (1, 3, 2) and tree.own == ((1,), (3,), (2,))
    with pytest.raises(ValueError, match="not one of its own labels"):
        RegionTree.parse(KITS, regions_class_order=[1, 2, 3])
    with pytest.raises(ValueError, match="one label per region"):
        RegionTree.parse(KITS, regions_class_order=[1, 3])


@pytest.mark.parametrize("kwargs,match", [
    (dict(regions=[[1, 2], [2, 3]]), "overlap without one containing the other"),
    (dict(regions=[[0, 1]]), "label 0 is the background"),
    (dict(regions=[[1, 2], [2, 1]]), "hold the same labels"),
    (dict(regions=[[1, 2], [1], [2]]), "no label of its own"),
    (dict(regions=[]), "regions is empty"),
    (dict(regions=[["a"]]), "a label or a list of labels"),
    (dict(region_probs=True), "region_probs=True needs regions"),
    (dict(regions_class_order=[1]), "regions_class_order needs regions"),
    (dict(regions=LITS, solver="ba", output_mode="multilabel"), "solver='rma'"),
    (dict(regions=LITS, guard=True), "guard does not apply to regions"),
    (dict(regions=LITS, unassigned_policy="void"), "does not apply to regions"),
])
def test_bad_regions_fail_at_construction(kwargs, match):
    from rankseg_monai import RankSEG
    from rankseg_monai.options import RankSEGOptions

    with pytest.raises((ValueError, TypeError), match=match):
        RankSEGOptions(**kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        RankSEG(**kwargs)


def test_errors_that_need_the_channels():
    p = torch.softmax(torch.randn(1, 4, 30), 1)
    with pytest.raises(ValueError, match="class 3 is in no region"):
        rankseg(p, regions=LITS)
    with pytest.raises(ValueError, match="probabilities have 3 classes"):
        rankseg(p[:, :3] / p[:, :3].sum(1, keepdim=True), regions=BRATS)
    with pytest.raises(ValueError, match="one channel per region"):
        rankseg(p, regions=BRATS, region_probs=True)
    with pytest.raises(ValueError, match="regions_class_order"):
        rankseg(p[:, :2], regions={"wt": [1, 2], "et": [3]}, region_probs=True)
    with pytest.raises(ValueError, match="label_dtype=torch.uint8 cannot hold the label 300"):
        rankseg(p[:, :2], regions={"big": [300], "small": [7]}, region_probs=True, label_dtype=torch.uint8)
