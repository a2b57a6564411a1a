"""functional.expected_score: the label-free estimate of a decision's Dice/IoU (issue 14)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from rankseg_monai import RankSEG, RankSEGd
from rankseg_monai.functional import baseline_decision, expected_score, rankseg
from rankseg_monai.options import RankSEGOptions


def _rma_by_hand(p: np.ndarray, mask: np.ndarray, metric: str, s: float) -> float:
    S, n, mu = float(p[mask].sum()), int(mask.sum()), float(p.sum())
    if metric == "dice":
        return 2 * S / (mu + n + 1 + s) + (s / (mu + n + s) if s > 0 else 0.0)
    return (S + s) / (mu - S + n + s)


def _blob(shape, expected_voxels, seed):
    """A smooth foreground blob whose probabilities sum to about ``expected_voxels``."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = (grid ** 2).sum(0).sqrt()
    noise = torch.nn.functional.avg_pool3d(torch.randn((1, 1, *shape), generator=g), 3, 1, 1)[0, 0]
    lo, hi = 0.0, 2.0
    for _ in range(50):
        rad = (lo + hi) / 2
        p = torch.sigmoid(30.0 * (rad - r) + 1.5 * noise)
        lo, hi = (rad, hi) if float(p.sum()) < expected_voxels else (lo, rad)
    return p[None, None]


@pytest.mark.parametrize("metric,smooth", [("dice", 0.0), ("iou", 0.0), ("dice", 1.0), ("iou", 0.5)])
def test_the_formula_per_class_for_labels_and_masks(metric, smooth, device):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 6, 5, 4, generator=g) * 2, 1).to(device)
    labels = rankseg(probs, metric=metric, smooth=smooth, pruning_prob=0.0)
    est = expected_score(probs, labels, metric, smooth)
    assert est.dtype == torch.float64 and est.shape == (2, 3) and est.device.type == device
    onehot = torch.stack([labels == c for c in range(3)], 1)
    torch.testing.assert_close(expected_score(probs, onehot, metric, smooth), est, rtol=0, atol=0)
    torch.testing.assert_close(expected_score(probs, labels[:, None].float(), metric, smooth), est, rtol=0, atol=0)
    p, lab = probs.cpu().double().numpy(), labels.cpu().numpy()
    for b in range(2):
        for c in range(3):
            mask = lab[b] == c
            if mask.any():
                assert float(est[b, c]) == pytest.approx(_rma_by_hand(p[b, c], mask, metric, smooth), rel=1e-12)
    est_np = expected_score(probs.cpu().numpy(), lab, metric, smooth)
    assert isinstance(est_np, np.ndarray) and np.allclose(est_np, est.cpu().numpy(), rtol=0, atol=0)


def test_empty_mask_is_the_probability_of_absence():
    """An empty mask scores 1 when the truth is empty too (MONAI ignore_empty=False): its estimate is P(absent),
    the 'mixed' model of auto pruning (the mean of prod(1 - p) and 1 - max p)."""
    p = torch.zeros(1, 2, 50)
    p[0, 1, :5] = 0.2
    p[0, 0] = 1 - p[0, 1]
    labels = torch.zeros(1, 50, dtype=torch.int64)  # class 1 never chosen
    est = expected_score(p, labels)
    expected = 0.5 * (0.8 ** 5) + 0.5 * (1 - 0.2)
    assert float(est[0, 1]) == pytest.approx(expected, rel=1e-6)
    void = torch.full((1, 50), 255)  # a void label belongs to no class
    assert float(expected_score(p, void)[0, 0]) == pytest.approx(0.5 * 0.0 + 0.5 * 0.0, abs=1e-12)


def test_calibrated_cases_agree_with_monte_carlo():
    """Truth drawn voxel by voxel from p (the theory's setting): |estimate - mean Dice| <= 0.01 for a class of
    1000 expected voxels, for RankSEG's mask and for thresholding's."""
    g = torch.Generator().manual_seed(11)
    p = _blob((24, 24, 24), 1000.0, 1)
    flat = p.reshape(-1).double()
    for mask in (rankseg(p, output_mode="multilabel", pruning_prob=0.0), p > 0.5):
        est = float(expected_score(p, mask)[0, 0])
        m = mask.reshape(-1)
        dice = []
        for _ in range(8):
            y = torch.rand((50, flat.numel()), generator=g, dtype=torch.float64) < flat
            dice.append(2 * (y & m).sum(1).double() / (y.sum(1) + m.sum()).double())
        mc = float(torch.cat(dice).mean())
        assert abs(est - mc) <= 0.01, (est, mc)


def test_regions():
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(1, 3, 10, 10, 6, generator=g) * 2, 1)
    regions = {"liver": [1, 2], "tumour": [2]}
    labels = rankseg(probs, regions=regions, pruning_prob=0.0)
    est = expected_score(probs, labels, regions=regions)
    assert est.shape == (1, 2)
    q = np.stack([probs[0, 1:].sum(0).numpy(), probs[0, 2].numpy()])
    lab = labels[0].numpy()
    for r, mask in enumerate((np.isin(lab, [1, 2]), lab == 2)):
        assert float(est[0, r]) == pytest.approx(_rma_by_hand(np.minimum(q[r], 1).astype(np.float64), mask, "dice", 0),
                                                 rel=1e-6)
    masks = rankseg(probs, regions=regions, pruning_prob=0.0, output_mode="multilabel")
    torch.testing.assert_close(expected_score(probs, masks, regions=regions), est, rtol=0, atol=0)
    # the region decision's summed estimate beats argmax's (what it maximises)
    argmax = expected_score(probs, probs.argmax(1), regions=regions)
    assert float(est.sum()) >= float(argmax.sum()) - 1e-12


def test_regions_of_class_probabilities_are_never_stored_whole(monkeypatch):
    """With class input the region probabilities (``R x N`` float32) and the region masks of a label map (``R x N``
    bool) are computed chunk by chunk where read: the same estimate, bit for bit, as from the stored ones, empty
    masks and a void label included."""
    from rankseg_monai.solvers import regions as reg

    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(2, 4, 12, 10, 8, generator=g) * 3, 1)
    spec = {"brain": [1, 2, 3], "tissue": [2, 3], "white_matter": [3]}
    labels = rankseg(probs, regions=spec)
    labels[0, 0, 0, :4] = 9  # a void label: in no region
    labels[1][labels[1] == 3] = 2  # white matter empty in item 1: its estimate is P(truth empty too)
    q = torch.stack([probs[:, 1:].sum(1), probs[:, 2:].sum(1), probs[:, 3]], 1).clamp(max=1.0)
    stored = expected_score(q, labels, regions=spec, region_probs=True)  # region input: q stored as given
    whole = reg.region_probabilities

    def refuse(*args, **kwargs):
        raise AssertionError("region_probabilities: an R x N copy")

    monkeypatch.setattr(reg, "region_probabilities", refuse)
    monkeypatch.setattr(reg, "region_masks", lambda nodes, tree, _f=reg.region_masks: (
        _f(nodes, tree) if nodes.shape[-1] < labels[0].numel() else refuse()))  # a chunk's masks only
    est = expected_score(probs, labels, regions=spec, chunk_size=128)
    torch.testing.assert_close(est, stored, rtol=1e-6, atol=1e-9)
    assert torch.equal(whole(probs.reshape(2, 4, -1), reg.RegionTree.parse(spec)),
                       reg.RegionView(probs.reshape(2, 4, -1), reg.RegionTree.parse(spec))[..., 0:960])


def test_bad_inputs_name_the_fix():
    p = torch.softmax(torch.randn(1, 3, 4, 4), 1)
    with pytest.raises(ValueError, match="label map"):
        expected_score(p, torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match="non-integer"):
        expected_score(p, torch.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="Dice or IoU"):
        expected_score(p, torch.zeros(1, 4, 4), metric="acc")


def test_transforms_attach_the_estimates_for_rankseg_and_argmax():
    g = torch.Generator().manual_seed(4)
    x = torch.softmax(torch.nn.functional.avg_pool3d(torch.randn(1, 3, 16, 16, 8, generator=g), 5, 1, 2)[0] * 20, 0)
    out = RankSEG(expected_score=True)(MetaTensor(x))
    ours = expected_score(x[None], out.as_tensor().long())[0]
    theirs = expected_score(x[None], x.argmax(0)[None])[0]
    torch.testing.assert_close(out.meta["rankseg_expected_dice"], ours)
    torch.testing.assert_close(out.meta["argmax_expected_dice"], theirs)
    d = RankSEGd(keys="pred", expected_score=True, metric="iou")({"pred": x, "label": torch.zeros(1, 16, 16, 8)})
    assert set(d) == {"pred", "label", "pred_expected_iou", "pred_expected_iou_argmax"}
    assert d["pred_expected_iou"].shape == (3,) and not math.isnan(float(d["pred_expected_iou"].sum()))
    # without the option nothing is added
    assert set(RankSEGd(keys="pred")({"pred": x})) == {"pred"}
    # region probabilities: the baseline is nnU-Net's painting of q > 0.5
    q = torch.sigmoid(torch.randn(1, 3, 8, 8, 4, generator=g) * 3)
    opts = RankSEGOptions(regions=[[1, 2, 3], [2, 3], [3]], region_probs=True)
    painted = baseline_decision(q, opts)
    assert painted.shape == (1, 3, 8, 8, 4)
    assert bool((painted[:, 2] <= painted[:, 1]).all()) and bool((painted[:, 1] <= painted[:, 0]).all())
