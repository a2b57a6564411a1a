"""Tests of the MONAI transforms RankSEG / RankSEGd (rankseg_monai/transforms.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import meta_cases, monai_volumes, softmax_probs, train_tiny_unet
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    GaussianSmooth,
    Invertd,
    Orientationd,
    Spacingd,
)
from oracle import best_threshold_mask

from rankseg_monai import RankSEG, RankSEGD, RankSEGd, RankSEGDict
from rankseg_monai.functional import decide, rankseg

AFFINE = torch.tensor(
    [[1.5, 0.0, 0.0, 10.0], [0.0, 1.0, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
)


def _probs(shape, seed=0, dtype=torch.float32, device=None):
    """Probabilities of one channel-first item (softmax over dim 0)."""
    return softmax_probs(shape, seed=seed, dim=0, dtype=dtype, device=device)


def _as(kind, x, device="cpu"):
    """``x`` as a numpy array (on the CPU), a tensor or a MetaTensor (on ``device``)."""
    if kind == "numpy":
        return x.cpu().numpy()
    x = x.to(device)
    if kind == "meta":
        affine = AFFINE if x.ndim == 4 else torch.diag(torch.tensor([1.5, 2.0, 1.0, 1.0], dtype=torch.float64))
        m = MetaTensor(x.clone(), affine=affine, meta={"filename_or_obj": "case0.nii.gz"})
        m.applied_operations.append({"class": "Spacingd", "id": 1})  # stands in for a preprocessing trace
        return m
    return x


def _cpu(out):
    """A transform's output as a plain CPU tensor."""
    out = torch.from_numpy(out) if isinstance(out, np.ndarray) else out
    return (out.as_tensor() if isinstance(out, MetaTensor) else out).cpu()


# ------------------------------------------------------------------------------------------------ array transform


@pytest.mark.parametrize("kind", ["numpy", "torch", "meta"])
@pytest.mark.parametrize("spatial", [(6, 7), (5, 4, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("output_mode", ["multiclass", "multilabel"])
def test_types_shapes_and_values(kind, spatial, dtype, output_mode, device):
    x = _probs((3, *spatial), seed=len(spatial), dtype=dtype)
    out = RankSEG(output_mode=output_mode)(_as(kind, x, device))

    expected = rankseg(x[None], output_mode=output_mode, pruning_prob="auto")[
        0 if output_mode == "multilabel" else slice(None)]
    exp_shape = (1, *spatial) if output_mode == "multiclass" else (3, *spatial)
    if kind == "numpy":
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        out_t = torch.from_numpy(out)
    else:
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert isinstance(out, MetaTensor) == (kind == "meta") and out.device.type == torch.device(device).type
        out_t = _cpu(out)
    assert tuple(out_t.shape) == exp_shape
    assert torch.equal(out_t, expected.reshape(exp_shape).float())
    if output_mode == "multiclass":
        assert set(out_t.unique().tolist()) <= {0.0, 1.0, 2.0}


def test_metatensor_meta_affine_and_no_applied_operations(device):
    x = _as("meta", _probs((3, 5, 4, 6)), device)
    ops_before = [dict(op) for op in x.applied_operations]
    for out in (RankSEG()(x), RankSEG(to_onehot=3)(x), RankSEG(output_mode="multilabel")(x)):
        assert isinstance(out, MetaTensor)
        assert torch.equal(out.affine.cpu(), AFFINE)
        assert out.meta["filename_or_obj"] == "case0.nii.gz"
        assert out.applied_operations == ops_before  # kept, nothing pushed
        assert torch.allclose(out.pixdim.cpu(), torch.tensor([1.5, 1.0, 2.0], dtype=torch.float64))
        assert out.device == x.device
    assert x.applied_operations == ops_before  # input untouched


def test_multilabel_matches_float64_oracle(device):
    x = _probs((2, 9, 11), seed=3).double()
    out = _cpu(RankSEG(output_mode="multilabel", pruning_prob=0.0, dtype=torch.bool)(x.to(device)))
    for c in range(2):
        assert torch.equal(out[c], torch.from_numpy(best_threshold_mask(x[c].numpy(), "dice", 0.0).reshape(x[c].shape)))
        assert 0 < int(out[c].sum()) < out[c].numel()  # a non-trivial decision, not all/none


def test_confident_probabilities_give_argmax(device):
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 3, (8, 8, 8), generator=g)
    probs = torch.nn.functional.one_hot(labels, 3).permute(3, 0, 1, 2).float() * 0.94 + 0.02
    assert torch.equal(_cpu(RankSEG(dtype=torch.int64)(probs.to(device)))[0], labels)


def test_rankseg_differs_from_argmax_on_uncertain_region(device):
    # 40 voxels where the foreground has probability 0.45 (argmax says background) next to a sure core: the
    # expected-Dice optimum includes them (the reason to use RankSEG at all)
    fg = torch.cat([torch.full((20,), 0.95), torch.full((40,), 0.45), torch.full((40,), 0.02)]).reshape(1, 100)
    probs = torch.cat([1 - fg, fg])
    out = _cpu(RankSEG(dtype=torch.int64)(probs.to(device)))[0]
    assert int((probs.argmax(0) == 1).sum()) == 20
    assert int(out.sum()) == 60 and bool(out[:60].all())


def test_to_onehot(device):
    x = _probs((3, 6, 5, 4), seed=1, device=device)
    labels = RankSEG(dtype=torch.int64)(x)
    oh = RankSEG(to_onehot=3)(x)
    assert oh.shape == (3, 6, 5, 4) and oh.dtype == torch.float32 and oh.device == x.device
    assert torch.equal(oh.sum(0), torch.ones(6, 5, 4, device=device))
    assert torch.equal(oh.argmax(0, keepdim=True), labels)
    assert torch.equal(_cpu(labels), RankSEG(dtype=torch.int64)(x.cpu()))
    wider = RankSEG(to_onehot=5)(x)
    assert wider.shape == (5, 6, 5, 4) and torch.equal(wider[:3], oh) and not wider[3:].any()
    with pytest.raises(ValueError, match="to_onehot=3"):
        RankSEG(to_onehot=2)(x)
    with pytest.raises(ValueError, match="multilabel"):
        RankSEG(output_mode="multilabel", to_onehot=3)
    with pytest.raises(ValueError, match="to_onehot"):
        RankSEG(to_onehot=True)


def test_void_policy_and_onehot(device):
    # class 0 selects only its two sure voxels; classes 1 and 2 are pruned (max <= 0.5): four voxels unassigned
    probs = torch.tensor([
        [0.95, 0.95, 0.30, 0.30, 0.30, 0.30],
        [0.05, 0.05, 0.40, 0.40, 0.40, 0.40],
        [0.00, 0.00, 0.30, 0.30, 0.30, 0.30],
    ])[:, None, :].to(device)  # (C=3, H=1, W=6)
    labels = RankSEG(unassigned_policy="void", dtype=torch.int64, pruning_prob=0.5)(probs)
    assert labels.tolist() == [[[0, 0, 255, 255, 255, 255]]]
    assert RankSEG(dtype=torch.int64, pruning_prob=0.5)(probs).tolist() != labels.tolist()  # max_score assigns
    # the default pruning ("auto") keeps class 1: its 0.4 voxels beat the empty mask's expected Dice
    assert RankSEG(dtype=torch.int64)(probs).tolist() == [[[0, 0, 1, 1, 1, 1]]]
    oh = RankSEG(unassigned_policy="void", to_onehot=3, pruning_prob=0.5)(probs)
    assert oh[:, 0].tolist() == [[1, 1, 0, 0, 0, 0], [0] * 6, [0] * 6]  # void voxels: all-zero one-hot vector
    with pytest.raises(ValueError, match="void_index"):
        RankSEG(unassigned_policy="void", void_index=3, to_onehot=5, pruning_prob=0.5)(probs)


def test_softmax_sigmoid_temperature(device):
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 7, 6, generator=g) * 3).to(device)
    assert torch.equal(RankSEG(softmax=True)(logits), RankSEG()(torch.softmax(logits, 0)))
    assert torch.equal(
        RankSEG(sigmoid=True, output_mode="multilabel")(logits),
        RankSEG(output_mode="multilabel")(torch.sigmoid(logits)),
    )
    assert torch.equal(RankSEG(softmax=True, temperature=2.5)(logits), RankSEG()(torch.softmax(logits / 2.5, 0)))
    t = [1.0, 2.0, 0.5]
    scaled = logits / torch.tensor(t, device=device)[:, None, None]
    assert torch.equal(RankSEG(softmax=True, temperature=t)(logits), RankSEG()(torch.softmax(scaled, 0)))
    # the temperature matters: a flat distribution loses the weak class
    assert not torch.equal(RankSEG(softmax=True, temperature=8.0)(logits), RankSEG(softmax=True)(logits))
    # fp16 logits are promoted to float32 for the activation
    half = RankSEG(softmax=True)(logits.half())
    assert half.dtype == torch.float32
    assert torch.equal(half, RankSEG()(torch.softmax(logits.half().float(), 0)))
    assert torch.equal(_cpu(RankSEG(softmax=True, temperature=t)(logits)), RankSEG(softmax=True, temperature=t)(
        logits.cpu()))


def test_activation_errors():
    with pytest.raises(ValueError, match="mutually exclusive"):
        RankSEG(softmax=True, sigmoid=True)
    with pytest.raises(ValueError, match="softmax=True"):
        RankSEG(temperature=2.0)
    with pytest.raises(ValueError, match="> 0"):
        RankSEG(softmax=True, temperature=0.0)
    with pytest.raises(TypeError):
        RankSEG(softmax=True, temperature="hot")
    with pytest.raises(ValueError, match="one value per channel"):
        RankSEG(softmax=True, temperature=[1.0, 2.0])(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="mutually exclusive"):
        RankSEG(softmax=True)(torch.zeros(2, 4, 4), sigmoid=True)


def test_clamp(device):
    x = _probs((2, 8, 8), seed=2, device=device)
    over = x.clone()
    over[1, 0, 0] = 1.0 + 1e-3
    over[0, 0, 0] = -1e-3
    with pytest.raises(ValueError, match="clamp=True"):
        RankSEG()(over)
    assert torch.equal(RankSEG(clamp=True)(over), RankSEG()(over.clamp(0, 1)))
    garbage = x.clone()
    garbage[0, 0, 0] = 1.5
    with pytest.raises(ValueError, match="outside"):
        RankSEG(clamp=True)(garbage)
    nan = x.clone()
    nan[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RankSEG(clamp=True)(nan)


def test_input_errors():
    with pytest.raises(TypeError, match="AsDiscrete"):
        RankSEG()(torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="spatial dim"):
        RankSEG()(torch.rand(4))
    with pytest.raises(ValueError, match="multilabel"):
        RankSEG()(torch.rand(1, 4, 4))  # one channel cannot give a multiclass map
    with pytest.raises(ValueError, match="metric"):
        RankSEG(metric="hausdorff")  # fails at construction (bundle parse time), not at the first call
    with pytest.raises(TypeError, match="numpy"):
        RankSEG()([[0.1, 0.9]])
    with pytest.raises(ValueError, match="spatial_dims"):
        RankSEG(spatial_dims=0)


def test_batched_input_without_and_with_spatial_dims():
    batch = torch.stack([_probs((3, 4, 5, 6), seed=s) for s in (10, 11)])  # (B=2, C=3, 4, 5, 6), a mistake
    # without spatial_dims nothing can tell: it is read as C=2 channels of a 4D image (3, 4, 5, 6)
    out = RankSEG()(batch)
    assert out.shape == (1, 3, 4, 5, 6)
    assert torch.equal(out, rankseg(batch[None]).float())
    per_item = torch.stack([RankSEG()(b) for b in batch])  # what was meant, (2, 1, 4, 5, 6)
    assert per_item.shape == (2, 1, 4, 5, 6)
    # with spatial_dims the mistake is an error naming the fix
    with pytest.raises(ValueError, match="decollate"):
        RankSEG(spatial_dims=3)(batch)
    with pytest.raises(ValueError, match="decollate"):
        RankSEGd(keys="pred", spatial_dims=3)({"pred": batch})
    assert torch.equal(RankSEG(spatial_dims=3)(batch[0]), per_item[0])
    with pytest.raises(ValueError, match="spatial_dims=2"):
        RankSEG(spatial_dims=2)(batch[0])


def test_call_overrides_init(device):
    x = _probs((3, 6, 6), seed=4, device=device)
    t = RankSEG()
    assert torch.equal(t(x, output_mode="multilabel"), RankSEG(output_mode="multilabel")(x))
    assert torch.equal(t(x, metric="iou", to_onehot=3), RankSEG(metric="iou", to_onehot=3)(x))
    assert torch.equal(t(x), RankSEG()(x))  # the override did not stick
    logits = torch.log(x)
    assert torch.equal(t(logits, softmax=True, temperature=2.0), RankSEG(softmax=True, temperature=2.0)(logits))


def test_dtype_argument(device):
    x = _probs((3, 5, 5), seed=6, device=device)
    assert RankSEG(dtype=torch.int64)(x).dtype == torch.int64
    assert RankSEG(dtype=torch.uint8)(x.cpu().numpy()).dtype == np.uint8
    assert RankSEG(output_mode="multilabel", dtype=torch.bool)(x).dtype == torch.bool


def test_label_map_is_written_in_the_output_dtype(monkeypatch):
    """The solver writes the label map directly in ``dtype`` when it holds every label (no int64 map + cast)."""
    import rankseg_monai.transforms as tr

    seen = []

    def spy(probs, options=None, **kwargs):
        seen.append(options.label_dtype)
        return decide(probs, options, **kwargs)

    monkeypatch.setattr(tr, "decide", spy)
    x = _probs((3, 5, 5), seed=6)
    out = RankSEG()(x)
    assert seen[-1] == torch.float32 and out.dtype == torch.float32
    assert torch.equal(out[0].long(), rankseg(x[None], pruning_prob="auto")[0])
    assert RankSEG(dtype=np.uint8)(x.numpy()).dtype == np.uint8 and seen[-1] == torch.uint8
    RankSEG(dtype=None)(x)  # the input's dtype: labels are cast from int64
    assert seen[-1] == torch.int64
    # one-hot goes through the narrowest integer labels that hold to_onehot classes (and void_index)
    onehot = RankSEG(to_onehot=3)(x)
    assert seen[-1] == torch.uint8 and torch.equal(onehot.argmax(0), rankseg(x[None], pruning_prob="auto")[0])
    RankSEG(to_onehot=3, unassigned_policy="void", void_index=300)(x)
    assert seen[-1] == torch.int16


def test_output_dtype_too_narrow_for_the_labels_raises():
    """An output dtype that cannot hold every label is an error naming the fix, never a silent wrap (uint8 with 300
    classes once wrote 299 as 43; int8 cannot hold void_index 255; bool holds two labels; float16 labels above 2048
    round)."""
    x300 = softmax_probs((300, 4, 4), seed=0, scale=4.0, dim=0)
    x3 = _probs((3, 5, 5))
    for kwargs, x in ((dict(dtype=torch.uint8), x300), (dict(dtype=torch.int8, unassigned_policy="void"), x3),
                      (dict(dtype=torch.bool), x3), (dict(guard=True, dtype=torch.uint8), x300),
                      (dict(dtype=torch.float16), softmax_probs((3000, 2, 2), scale=1.0, dim=0)),
                      (dict(dtype=None), softmax_probs((3000, 2, 2), scale=1.0, dim=0, dtype=torch.float16))):
        with pytest.raises(ValueError, match="dtype=.*cannot hold the label .*use torch.int64"):
            RankSEG(**kwargs)(x)
    assert RankSEG(dtype=torch.bool)(_probs((2, 5, 5))).dtype == torch.bool  # two classes fit
    assert RankSEG(dtype=torch.int16)(x300).dtype == torch.int16
    assert RankSEG(dtype=torch.uint8, to_onehot=300)(x300).shape == (300, 4, 4)  # one-hot fits any dtype
    with pytest.raises(ValueError, match="cannot hold the label 65536"):
        RankSEG(dtype=torch.int16, unassigned_policy="void", void_index=65536)(_probs((3, 5, 5)))


@pytest.mark.parametrize("kwargs", [dict(), dict(to_onehot=3), dict(output_mode="multilabel")], ids=str)
def test_permuted_input_gives_a_contiguous_result_like_asdiscrete(kwargs, device):
    x = _probs((3, 8, 7, 6), seed=9, device=device)
    permuted = x.permute(0, 3, 2, 1)  # what Invertd leaves after Orientationd
    meta = _as("meta", permuted, device)
    assert not meta.is_contiguous()
    out = RankSEG(**kwargs)(meta)
    assert out.is_contiguous() and torch.equal(out.as_tensor(), RankSEG(**kwargs)(permuted.contiguous()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
def test_cuda_device():
    x = _probs((3, 16, 16, 8), seed=8)
    cpu = RankSEG()(x)
    streamed = RankSEG(device="cuda")(x)  # compute on the GPU, output back on the input's device
    assert streamed.device.type == "cpu" and torch.equal(streamed, cpu)
    on_gpu = RankSEG(softmax=True)(torch.log(x).cuda())
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), cpu)


# ----------------------------------------------------------------------------------------------- dictionary transform


def test_dict_per_key_args_and_aliases(device):
    assert RankSEGD is RankSEGd and RankSEGDict is RankSEGd
    a, b, c = _probs((3, 6, 5), seed=1, device=device), _probs((2, 6, 5), seed=2, device=device), torch.rand(1, 6, 5)
    t = RankSEGd(keys=["a", "b"], output_mode=["multiclass", "multilabel"], to_onehot=[3, None], metric=["dice", "iou"])
    out = t({"a": a, "b": b, "c": c})
    assert torch.equal(out["a"], RankSEG(to_onehot=3)(a))
    assert torch.equal(out["b"], RankSEG(output_mode="multilabel", metric="iou")(b))
    assert out["c"] is c  # other keys untouched
    assert out["a"].device == a.device and torch.equal(_cpu(out["a"]), RankSEG(to_onehot=3)(a.cpu()))
    with pytest.raises(ValueError):
        RankSEGd(keys=["a", "b"], metric=["dice", "iou", "dice"])


def test_dict_allow_missing_keys():
    a = _probs((3, 6, 5), seed=1)
    out = RankSEGd(keys=["a", "missing"], allow_missing_keys=True)({"a": a})
    assert set(out) == {"a"} and torch.equal(out["a"], RankSEG()(a))
    with pytest.raises(KeyError):
        RankSEGd(keys=["a", "missing"])({"a": a})


def test_dict_temperature_per_channel_and_per_key(device):
    g = torch.Generator().manual_seed(9)
    la, lb = (torch.randn(3, 6, 6, generator=g) * 3).to(device), (torch.randn(3, 6, 6, generator=g) * 3).to(device)
    data = {"a": la, "b": lb}
    shared = RankSEGd(keys=["a", "b"], softmax=True, temperature=[1.0, 3.0, 0.5])(data)  # flat: per channel
    ref = RankSEG(softmax=True, temperature=[1.0, 3.0, 0.5])
    assert torch.equal(shared["a"], ref(la)) and torch.equal(shared["b"], ref(lb))
    per_key = RankSEGd(keys=["a", "b"], softmax=True, temperature=[[4.0], None])(data)  # nested/None: per key
    assert torch.equal(per_key["a"], RankSEG(softmax=True, temperature=4.0)(la))
    assert torch.equal(per_key["b"], RankSEG(softmax=True)(lb))
    with pytest.raises(ValueError, match="one entry per key"):
        RankSEGd(keys=["a", "b"], softmax=True, temperature=[[4.0], None, None])


def test_dict_keeps_meta(device):
    x = _as("meta", _probs((3, 5, 4, 6)), device)
    out = RankSEGd(keys="pred", to_onehot=3)({"pred": x})["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine.cpu(), AFFINE)
    assert len(out.applied_operations) == len(x.applied_operations)


def test_bundle_config_parser():
    config = {
        "post": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "rankseg_monai.RankSEGd", "keys": "pred", "metric": "iou", "to_onehot": 3},
            ],
        },
        "single": {"_target_": "rankseg_monai.RankSEG", "output_mode": "multilabel", "smooth": 1.0},
        "bad": {"_target_": "rankseg_monai.RankSEGd", "keys": "pred", "solver": "nope"},
    }
    parser = ConfigParser(config)
    post = parser.get_parsed_content("post")
    assert isinstance(post.transforms[1], RankSEGd)
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1))
    expected = RankSEG(metric="iou", to_onehot=3)(torch.softmax(logits, 0))
    assert torch.equal(post({"pred": logits})["pred"], expected)
    single = parser.get_parsed_content("single")
    assert isinstance(single, RankSEG) and single.output_mode == "multilabel" and single.smooth == 1.0
    with pytest.raises(RuntimeError) as err:  # ConfigParser wraps the constructor's ValueError
        parser.get_parsed_content("bad")
    assert "solver" in repr(err.value.__cause__ or err.value)


# ------------------------------------------------------------------------------------------------------ integration


@pytest.fixture(scope="module")
def trained():
    """Three 24^3 test volumes and a tiny UNet trained for 30 Adam steps on two of them (well under a second)."""
    cases = monai_volumes(3)
    x = torch.tensor(np.stack([im for im, _ in cases]))[:, None].float()
    y = torch.tensor(np.stack([seg for _, seg in cases]))[:, None].float()
    return train_tiny_unet(x[:2], y[:2]), x, y


def test_post_chain_after_sliding_window(trained):
    net, x, y = trained
    with torch.no_grad():
        logits = sliding_window_inference(x, (16, 16, 16), 4, net)
    post = Compose([
        Activationsd(keys="pred", softmax=True),
        RankSEGd(keys="pred", spatial_dims=3),
        AsDiscreted(keys=["pred", "label"], to_onehot=3),
    ])
    items = [post({"pred": lg, "label": lb}) for lg, lb in zip(logits, y)]
    preds, labels = [d["pred"] for d in items], [d["label"] for d in items]
    dice = DiceMetric(include_background=False, reduction="none")(preds, labels)
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(preds, labels)

    # the chain equals the solver applied by hand to the same outputs
    by_hand = rankseg(torch.softmax(logits, 1))
    for i, p in enumerate(preds):
        assert torch.equal(p.argmax(0), by_hand[i])
    argmax = [AsDiscreted(keys="p", to_onehot=3)({"p": lg.argmax(0, keepdim=True)})["p"] for lg in logits]
    dice_argmax = DiceMetric(include_background=False, reduction="none")(argmax, labels)
    empty_truth = torch.stack([lb[1:].flatten(1).sum(1) == 0 for lb in labels])
    assert torch.equal(torch.isnan(dice), empty_truth)  # NaN exactly where a class is absent from the truth
    assert empty_truth.any() and not empty_truth.all()
    assert float(dice.nanmean()) > 0.6  # the briefly trained net segments something
    assert abs(float(dice.nanmean()) - float(dice_argmax.nanmean())) < 0.1
    assert torch.isfinite(hd95[~empty_truth]).all() and (hd95[~empty_truth] >= 0).all()


def _meta_case(seed=0):
    return meta_cases(monai_volumes(1, (24, 24, 20), first_seed=seed, noise_max=0.0), [AFFINE])[0]


def test_invertd_flip_commutes(trained):
    net = trained[0]
    pre = Orientationd(keys=["image"], axcodes="LPS")  # a pure flip: inversion is exact
    data = pre(_meta_case())
    with torch.no_grad():
        data["pred"] = sliding_window_inference(data["image"][None], (16, 16, 16), 4, net)[0]
    data = Activationsd(keys="pred", softmax=True)(data)
    decide_then_invert = Compose([
        RankSEGd(keys="pred"),
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True),
    ])(dict(data))["pred"]
    invert_then_decide = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
        RankSEGd(keys="pred"),
    ])(dict(data))["pred"]
    assert decide_then_invert.shape == (1, 24, 24, 20)
    assert torch.allclose(decide_then_invert.affine, AFFINE)
    assert torch.equal(decide_then_invert.as_tensor(), invert_then_decide.as_tensor())
    assert len(decide_then_invert.applied_operations) == 0


def test_invertd_after_spacing_and_orientation(trained):
    net = trained[0]
    pre = Compose([Orientationd(keys=["image"], axcodes="LPS"), Spacingd(keys=["image"], pixdim=(1.2, 1.2, 1.2))])
    data = pre(_meta_case(1))
    assert data["image"].shape[1:] != (24, 24, 20)
    with torch.no_grad():
        data["pred"] = sliding_window_inference(data["image"][None], (16, 16, 16), 4, net)[0]
    data = Activationsd(keys="pred", softmax=True)(data)
    labels = Compose([
        RankSEGd(keys="pred"),
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True),
    ])(dict(data))["pred"]
    assert labels.shape == (1, 24, 24, 20) and torch.allclose(labels.affine, AFFINE)
    assert set(labels.unique().tolist()) <= {0.0, 1.0, 2.0}
    # the recommended order (interpolate probabilities, then decide) agrees on nearly every voxel
    recommended = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),  # linear
        RankSEGd(keys="pred", clamp=True),
    ])(dict(data))["pred"]
    agreement = float((labels.as_tensor() == recommended.as_tensor()).float().mean())
    assert agreement > 0.9


def test_invertd_spline_overshoot_needs_clamp():
    # probabilities resampled with a cubic spline (mode=3) leave [0, 1] slightly after Invertd (MONAI #7836)
    pre = Compose([
        Orientationd(keys=["image", "label"], axcodes="LPS"),
        Spacingd(keys=["image", "label"], pixdim=(1.2, 1.2, 1.2), mode=(3, "nearest")),
    ])
    orig = _meta_case(2)
    data = pre(dict(orig))
    onehot = torch.nn.functional.one_hot(data["label"][0].long(), 3).permute(3, 0, 1, 2).float()

    def inverted(sigma):
        p = GaussianSmooth(sigma)(onehot) if sigma else onehot
        p = p / p.sum(0, keepdim=True)
        d = dict(data)
        d["pred"] = MetaTensor(p, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
        return Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False)(d)

    smooth = inverted(0.5)
    lo, hi = float(smooth["pred"].min()), float(smooth["pred"].max())
    assert lo < 0.0 or hi > 1.0  # the overshoot is real
    with pytest.raises(ValueError, match="clamp=True"):
        RankSEGd(keys="pred")(smooth)
    out = RankSEGd(keys="pred", clamp=True)(smooth)["pred"]
    assert out.shape == (1, 24, 24, 20) and torch.allclose(out.affine, AFFINE)
    assert float((out.as_tensor() == orig["label"].as_tensor()).float().mean()) > 0.9
    sharp = inverted(0)  # a step function through a cubic spline: ~0.4 overshoot, garbage even for clamp
    with pytest.raises(ValueError, match="outside"):
        RankSEGd(keys="pred", clamp=True)(sharp)


def test_guard_is_forwarded_and_default_pruning_is_auto(device):
    from rankseg_monai.calibration import guarded_rankseg
    from rankseg_monai.functional import rankseg as functional_rankseg

    fog = softmax_probs((3, 12, 12, 6), seed=1, scale=0.2, dim=0)
    out = _cpu(RankSEG(guard=True, dtype=torch.int64)(fog.to(device)))
    assert torch.equal(out[0], guarded_rankseg(fog[None], guard=True, pruning_prob="auto")[0])
    assert torch.equal(RankSEG(dtype=torch.int64)(fog)[0], functional_rankseg(fog[None], pruning_prob="auto")[0])
    d = RankSEGd(keys="pred", guard=True, dtype=torch.int64)({"pred": fog.to(device)})
    assert torch.equal(_cpu(d["pred"]), out)


@pytest.mark.parametrize("kind", ["numpy", "torch", "meta"])
@pytest.mark.parametrize("spatial", [(9, 8), (6, 5, 7)], ids=["2d", "3d"])
def test_calibration_on_every_input_type(kind, spatial, device):
    """RankSEG(calibration=) decides on the calibrated probabilities whatever the input type and device (numpy in,
    numpy out; MetaTensor keeps its meta), and keeps argmax for the class the calibration recommends it for."""
    from rankseg_monai.calibrator import Calibration, apply_calibration

    x = _probs((3, *spatial), seed=len(spatial) + 3)
    cal = Calibration("per-class-temperature", "class-probabilities", [1.0, 0.4, 2.5], channels=[0, 1, 2],
                      recommendation=["rankseg", "rankseg", "argmax"])
    out = RankSEG(calibration=cal)(_as(kind, x, device))
    assert isinstance(out, np.ndarray) == (kind == "numpy") and isinstance(out, MetaTensor) == (kind == "meta")
    if kind != "numpy":
        assert out.device.type == torch.device(device).type
    got = _cpu(out)[0]
    calibrated = apply_calibration(x, cal)
    rankseg_labels = RankSEG()(calibrated)[0]  # RankSEG on the calibrated probabilities
    argmax = calibrated.argmax(0).float()  # argmax of the calibrated probabilities
    # class 1 (RankSEG's) is RankSEG's decision on the calibrated probabilities
    assert torch.equal(got == 1, rankseg_labels == 1)
    # class 2 (argmax recommended) is argmax's, less the voxels RankSEG gives to class 1 (docs/calibration.md)
    assert torch.equal(got == 2, (argmax == 2) & (rankseg_labels != 1))
    assert bool(((argmax == 2) != (rankseg_labels == 2)).any())  # the switch changed something: not vacuous
