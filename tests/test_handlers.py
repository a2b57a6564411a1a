"""Tests of the engine handler RankSEGHandler (rankseg_monai/handlers.py) in MONAI and Ignite engines; the HD95
metric and its handler are tested in test_metrics.py."""

from __future__ import annotations

import copy

import pytest
import torch
from generators import meta_cases, monai_volumes, train_tiny_unet
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, list_data_collate
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, PostProcessing, from_engine
from monai.inferers import SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.transforms import Activationsd, AsDiscreted, Compose, Lambdad

from rankseg_monai import HausdorffDistance95, RankSEG, RankSEGd, RankSEGHandler
from rankseg_monai.metrics import EMPTY_TRUTH

NUM_CLASSES = 3
SPACINGS = [(1.5, 1.0, 2.0), (0.8, 0.8, 3.0), (1.0, 2.5, 1.0)]  # one per case, anisotropic on purpose


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cases():
    """Three 24^3 MetaTensor cases with different anisotropic affines; case 2 has no voxel of class 2."""
    affines = [torch.diag(torch.tensor([*sp, 1.0], dtype=torch.float64)) for sp in SPACINGS]
    out = meta_cases(monai_volumes(3), affines)
    assert not (out[2]["label"] == 2).any()
    return out


@pytest.fixture(scope="module")
def net(cases):
    """A tiny UNet trained for 30 Adam steps on two of the cases (well under a second)."""
    x = torch.stack([c["image"].as_tensor() for c in cases[:2]])
    y = torch.stack([c["label"].as_tensor() for c in cases[:2]])
    return train_tiny_unet(x, y, NUM_CLASSES)


INFERER = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=4)


def _loader(cases):
    return DataLoader(Dataset([dict(c) for c in cases]), batch_size=2, shuffle=False, num_workers=0,
                      collate_fn=list_data_collate)


def _evaluator(cases, net, postprocessing=None, val_handlers=None, decollate=True, record=None, device="cpu"):
    """A SupervisedEvaluator with MeanDice and HausdorffDistance95 on ``device`` (a copy of ``net`` is moved there);
    ``record`` (a list) collects a CPU copy of every item's probabilities as the postprocessing leaves them, i.e.
    what RankSEGHandler receives."""
    post = postprocessing if postprocessing is not None else Compose([
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys="label", to_onehot=NUM_CLASSES),
    ])
    if record is not None:
        post = Compose([post, Lambdad(keys="pred", func=_recorder(record))])
    return SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=_loader(cases),
        network=net if device == "cpu" else copy.deepcopy(net).to(device),
        inferer=INFERER,
        postprocessing=post,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        additional_metrics={"hd95": HausdorffDistance95(output_transform=from_engine(["pred", "label"]))},
        val_handlers=val_handlers,
        decollate=decollate,
    )


def _recorder(store):
    def fn(x):
        store.append(x.as_tensor().detach().cpu().clone())
        return x
    return fn


def _by_hand(cases, probs, spacing=True):
    """RankSEG + DiceMetric + per-case HD95 with the case's spacing, computed without any engine from the
    probabilities the engine produced (so batch-size dependent float noise of the network cannot interfere)."""
    decide = RankSEG(to_onehot=NUM_CLASSES)
    dice_rows, hd_rows = [], []
    for c, p in zip(cases, probs, strict=True):
        pred = decide(p)[None]
        truth = torch.nn.functional.one_hot(c["label"].as_tensor()[0].long(), NUM_CLASSES).permute(3, 0, 1, 2)[None]
        dice_rows.append(DiceMetric(include_background=False, reduction="none")(pred, truth.float()))
        sp = [float(s) for s in c["image"].pixdim] if spacing else None
        hd_rows.append(compute_hausdorff_distance(pred, truth.float(), percentile=95, spacing=sp))
    return torch.cat(dice_rows), torch.cat(hd_rows)


# ------------------------------------------------------------------------------------------- RankSEGHandler in engines


def test_evaluator_with_handler_matches_by_hand(cases, net, device):
    probs = []
    evaluator = _evaluator(cases, net, val_handlers=[RankSEGHandler(keys="pred", to_onehot=NUM_CLASSES)], record=probs,
                           device=device)
    evaluator.run()
    assert len(probs) == 3 and all(p.shape == (NUM_CLASSES, 24, 24, 24) for p in probs)
    dice, hd = _by_hand(cases, probs)
    details = {k: v.cpu() for k, v in evaluator.state.metric_details.items()}
    assert details["dice"].shape == (3, 2) and details["hd95"].shape == (3, 2)
    assert torch.allclose(details["dice"], dice, equal_nan=True, atol=1e-6)
    assert torch.allclose(details["hd95"], hd, equal_nan=True, atol=1e-5)
    # NaN exactly where the truth of class 2 is empty (case 2); every other HD95 is finite, in mm
    assert torch.isnan(hd).tolist() == [[False, False], [False, False], [False, True]]
    assert evaluator.state.metrics["hd95"] == pytest.approx(float(hd[~torch.isnan(hd)].mean()), rel=1e-6)
    assert evaluator.state.metrics["hd95_empty"] == 1
    assert details["hd95_empty"].tolist() == [[0, 0], [0, 0], [0, EMPTY_TRUTH]]
    # MeanDice: MONAI's two-step mean (classes per case, then cases), NaN entries skipped
    assert evaluator.state.metrics["dice"] == pytest.approx(float(dice.nanmean(1).mean()), rel=1e-5)
    assert evaluator.state.metrics["dice"] > 0.6
    # the spacing matters: the same masks measured in voxels give other numbers
    _, hd_vox = _by_hand(cases, probs, spacing=False)
    assert not torch.allclose(hd[:2], hd_vox[:2])


def test_attached_by_hand_and_rankseg_in_postprocessing_agree(cases, net):
    reference = _evaluator(cases, net, val_handlers=[RankSEGHandler(keys="pred", to_onehot=NUM_CLASSES)])
    reference.run()

    by_hand = _evaluator(cases, net)
    RankSEGHandler(keys="pred", to_onehot=NUM_CLASSES).attach(by_hand)
    by_hand.run()

    in_post = _evaluator(cases, net, postprocessing=Compose([
        Activationsd(keys="pred", softmax=True),
        RankSEGd(keys="pred", to_onehot=NUM_CLASSES),
        AsDiscreted(keys="label", to_onehot=NUM_CLASSES),
    ]))
    in_post.run()

    # activation in the handler instead of the postprocessing
    softmax_in_handler = _evaluator(cases, net, postprocessing=AsDiscreted(keys="label", to_onehot=NUM_CLASSES),
                                    val_handlers=[RankSEGHandler(keys="pred", softmax=True, to_onehot=NUM_CLASSES)])
    softmax_in_handler.run()

    for other in (by_hand, in_post, softmax_in_handler):
        for name in ("dice", "hd95"):
            assert torch.allclose(other.state.metric_details[name], reference.state.metric_details[name],
                                  equal_nan=True, atol=1e-6)


def test_event_order(cases, net):
    """decollate -> postprocessing -> RankSEGHandler (MODEL_COMPLETED) -> metrics (ITERATION_COMPLETED)."""
    seen = []

    def record(tag):
        def fn(x):
            seen.append((tag, tuple(x.shape), bool(((x == 0) | (x == 1)).all())))
            return x
        return fn

    post = Compose([
        Activationsd(keys="pred", softmax=True),
        Lambdad(keys="pred", func=record("postprocessing")),
        AsDiscreted(keys="label", to_onehot=NUM_CLASSES),
    ])
    evaluator = _evaluator(cases, net, postprocessing=post,
                           val_handlers=[RankSEGHandler(keys="pred", to_onehot=NUM_CLASSES)])
    PostProcessing(Lambdad(keys="pred", func=record("after handler")), event="MODEL_COMPLETED").attach(evaluator)

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _metrics_time(engine):
        for item in engine.state.output:
            record("iteration completed")(item["pred"])

    evaluator.run()
    # items are seen one by one (decollated), first as probabilities, then as one-hot masks
    assert [s[0] for s in seen[:6]] == ["postprocessing"] * 2 + ["after handler"] * 2 + ["iteration completed"] * 2
    assert all(not binary for tag, _, binary in seen if tag == "postprocessing")
    assert all(binary for tag, _, binary in seen if tag != "postprocessing")
    assert all(shape == (NUM_CLASSES, 24, 24, 24) for _, shape, _ in seen)


def test_transforms_after_the_decision_in_postprocessing(cases, net):
    # more transforms after the decision: RankSEGd (label map) inside postprocessing, then AsDiscreted one-hot
    probs = []
    evaluator = _evaluator(cases, net, postprocessing=Compose([
        Activationsd(keys="pred", softmax=True),
        Lambdad(keys="pred", func=_recorder(probs)),
        RankSEGd(keys="pred"),
        AsDiscreted(keys=["pred", "label"], to_onehot=NUM_CLASSES),
    ]))
    evaluator.run()
    dice, hd = _by_hand(cases, probs)
    assert torch.allclose(evaluator.state.metric_details["dice"], dice, equal_nan=True, atol=1e-6)
    assert torch.allclose(evaluator.state.metric_details["hd95"], hd, equal_nan=True, atol=1e-5)


def test_discrete_pred_before_handler_is_an_error(cases, net):
    # AsDiscreted(argmax=True) in postprocessing runs BEFORE the handler: a 1-channel map reaches RankSEG
    evaluator = _evaluator(cases, net, postprocessing=Compose([
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys="pred", argmax=True),
        AsDiscreted(keys="label", to_onehot=NUM_CLASSES),
    ]), val_handlers=[RankSEGHandler(keys="pred", to_onehot=NUM_CLASSES)])
    # the handler is a monai.handlers.PostProcessing: MONAI's apply_transform wraps the error, whose cause names it
    with pytest.raises(RuntimeError, match="applying transform") as info:
        evaluator.run()
    cause = info.value
    while cause.__cause__ is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__
    assert isinstance(cause, ValueError) and "single-channel" in str(cause)


def test_handler_needs_decollated_output(cases, net):
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=_loader(cases), network=net,
                                    inferer=INFERER, decollate=False,
                                    val_handlers=[RankSEGHandler(keys="pred", softmax=True)])
    with pytest.raises(ValueError, match="decollate=True"):
        evaluator.run()


def test_handler_on_plain_ignite_engine(device):
    g = torch.Generator().manual_seed(3)
    batches = [[{"pred": (torch.randn(3, 8, 8, generator=g) * 3).to(device),
                 "label": torch.randint(0, 3, (1, 8, 8), generator=g).to(device)}
                for _ in range(2)] for _ in range(2)]
    engine = Engine(lambda e, batch: [dict(item) for item in batch])
    with pytest.raises(ValueError, match="ITERATION_COMPLETED"):
        RankSEGHandler(softmax=True).attach(engine)
    RankSEGHandler(softmax=True, to_onehot=3, event="ITERATION_COMPLETED").attach(engine)  # before the metric
    label_onehot = AsDiscreted(keys="label", to_onehot=3)
    MeanDice(include_background=True,
             output_transform=lambda out: ([o["pred"] for o in out], [label_onehot(o)["label"] for o in out])
             ).attach(engine, "dice")
    engine.run(batches)
    preds = [RankSEG(softmax=True, to_onehot=3)(item["pred"].cpu()) for b in batches for item in b]
    labels = [label_onehot(item)["label"].cpu() for b in batches for item in b]
    expected = DiceMetric(include_background=True, reduction="mean")(preds, labels).nanmean()
    assert engine.state.metrics["dice"] == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="event"):
        RankSEGHandler(event="EPOCH_COMPLETED")


def test_bundle_config(cases, net):
    config = {
        "rankseg": {"_target_": "rankseg_monai.RankSEGHandler", "keys": "pred", "to_onehot": NUM_CLASSES},
        "hd95": {"_target_": "rankseg_monai.HausdorffDistance95",
                 "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"},
        "bad": {"_target_": "rankseg_monai.RankSEGHandler", "metric": "hausdorff"},
    }
    parser = ConfigParser(config)
    handler, hd95 = parser.get_parsed_content("rankseg"), parser.get_parsed_content("hd95")
    assert isinstance(handler, RankSEGHandler) and isinstance(hd95, HausdorffDistance95)
    probs = []
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_loader(cases), network=net, inferer=INFERER,
        postprocessing=Compose([Activationsd(keys="pred", softmax=True), Lambdad(keys="pred", func=_recorder(probs)),
                                AsDiscreted(keys="label", to_onehot=NUM_CLASSES)]),
        key_val_metric={"hd95": hd95}, val_handlers=[handler],
    )
    evaluator.run()
    _, hd = _by_hand(cases, probs)
    assert torch.allclose(evaluator.state.metric_details["hd95"], hd, equal_nan=True, atol=1e-5)
    with pytest.raises(RuntimeError) as err:
        parser.get_parsed_content("bad")
    assert "metric" in repr(err.value.__cause__ or err.value)
