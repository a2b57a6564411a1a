"""Tests of the engine handlers RankSEGHandler / HausdorffDistance95 (rankseg_monai/handlers.py)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor, create_test_image_3d, list_data_collate
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, PostProcessing, from_engine
from monai.inferers import SlidingWindowInferer
from monai.metrics import DiceMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.networks.nets import UNet
from monai.transforms import Activationsd, AsDiscreted, Compose, Lambdad

from rankseg_monai import HausdorffDistance95, RankSEG, RankSEGd, RankSEGHandler
from rankseg_monai.metrics import EMPTY_PRED, EMPTY_TRUTH, HausdorffDistance95Metric

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
SPACINGS = [(1.5, 1.0, 2.0), (0.8, 0.8, 3.0), (1.0, 2.5, 1.0)]  # one per case, anisotropic on purpose


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cases():
    """Three 24^3 MetaTensor cases with different anisotropic affines; case 2 has no voxel of class 2."""
    out = []
    for i, sp in enumerate(SPACINGS):
        im, seg = create_test_image_3d(24, 24, 24, num_objs=2, rad_max=7, rad_min=4, num_seg_classes=2, noise_max=0.2,
                                       random_state=np.random.RandomState(i))
        affine = torch.diag(torch.tensor([*sp, 1.0], dtype=torch.float64))
        out.append({"image": MetaTensor(torch.tensor(im)[None].float(), affine=affine),
                    "label": MetaTensor(torch.tensor(seg)[None].float(), affine=affine.clone())})
    assert not (out[2]["label"] == 2).any()
    return out


@pytest.fixture(scope="module")
def net(cases):
    """A tiny UNet trained for 30 Adam steps on two of the cases (well under a second)."""
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, channels=(4, 8), strides=(2,),
                 num_res_units=0)
    from monai.losses import DiceCELoss

    x = torch.stack([c["image"].as_tensor() for c in cases[:2]])
    y = torch.stack([c["label"].as_tensor() for c in cases[:2]])
    loss_fn, opt = DiceCELoss(to_onehot_y=True, softmax=True), torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.eval()


INFERER = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=4)


def _loader(cases):
    return DataLoader(Dataset([dict(c) for c in cases]), batch_size=2, shuffle=False, num_workers=0,
                      collate_fn=list_data_collate)


def _evaluator(cases, net, postprocessing=None, val_handlers=None, decollate=True, record=None):
    """A SupervisedEvaluator with MeanDice and HausdorffDistance95; ``record`` (a list) collects a copy of every
    item's probabilities as the postprocessing leaves them, i.e. what RankSEGHandler receives."""
    post = postprocessing if postprocessing is not None else Compose([
        Activationsd(keys="pred", softmax=True),
        AsDiscreted(keys="label", to_onehot=NUM_CLASSES),
    ])
    if record is not None:
        post = Compose([post, Lambdad(keys="pred", func=_recorder(record))])
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=_loader(cases),
        network=net,
        inferer=INFERER,
        postprocessing=post,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        additional_metrics={"hd95": HausdorffDistance95(output_transform=from_engine(["pred", "label"]))},
        val_handlers=val_handlers,
        decollate=decollate,
    )


def _recorder(store):
    def fn(x):
        store.append(x.as_tensor().clone())
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


def test_evaluator_with_handler_matches_by_hand(cases, net):
    probs = []
    evaluator = _evaluator(cases, net, val_handlers=[RankSEGHandler(keys="pred", to_onehot=NUM_CLASSES)], record=probs)
    evaluator.run()
    assert len(probs) == 3 and all(p.shape == (NUM_CLASSES, 24, 24, 24) for p in probs)
    dice, hd = _by_hand(cases, probs)
    details = evaluator.state.metric_details
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


def test_handler_on_plain_ignite_engine():
    g = torch.Generator().manual_seed(3)
    batches = [[{"pred": torch.randn(3, 8, 8, generator=g) * 3, "label": torch.randint(0, 3, (1, 8, 8), generator=g)}
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
    preds = [RankSEG(softmax=True, to_onehot=3)(item["pred"]) for b in batches for item in b]
    labels = [label_onehot(item)["label"] for b in batches for item in b]
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


# --------------------------------------------------------------------------------------------- HausdorffDistance95


def _box(shape, lo, hi):
    m = torch.zeros(shape)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def _pair(pred_fg, truth_fg, affine, meta_pixdim=None):
    pred = torch.stack([1 - pred_fg, pred_fg])
    truth = torch.stack([1 - truth_fg, truth_fg])
    meta = {"pixdim": meta_pixdim} if meta_pixdim is not None else None
    return MetaTensor(pred, affine=affine, meta=meta), MetaTensor(truth, affine=affine.clone(), meta=meta)


def _run_handler(pairs, **kwargs):
    engine = Engine(lambda e, batch: batch)
    handler = HausdorffDistance95(output_transform=lambda out: ([p for p, _ in out], [t for _, t in out]), **kwargs)
    handler.attach(engine, "hd95")
    engine.run([pairs])
    return engine.state


def test_hd95_uses_metatensor_pixdim_not_meta_pixdim():
    shape = (12, 12, 12)
    truth, pred = _box(shape, (3, 3, 3), (8, 8, 8)), _box(shape, (3, 3, 3), (10, 8, 8))  # 2 voxels longer along x
    voxels = float(compute_hausdorff_distance(torch.stack([1 - pred, pred])[None],
                                              torch.stack([1 - truth, truth])[None], percentile=95)[0, 0])
    assert voxels > 0
    iso = torch.diag(torch.tensor([2.5, 2.5, 2.5, 1.0], dtype=torch.float64))
    # meta["pixdim"] is the raw NIfTI header (qfac first); a bogus one must not be used
    state = _run_handler([_pair(pred, truth, iso, meta_pixdim=[-1.0, 9.0, 9.0, 9.0, 1, 1, 1, 1])])
    assert state.metric_details["hd95"].tolist() == [[pytest.approx(2.5 * voxels, rel=1e-5)]]  # HD scales with s
    assert state.metrics["hd95"] == pytest.approx(2.5 * voxels, rel=1e-5)
    assert state.metrics["hd95_empty"] == 0
    # anisotropic: the box is 2 voxels longer along x, spaced 3 mm -> 6 mm
    aniso = torch.diag(torch.tensor([3.0, 0.5, 0.5, 1.0], dtype=torch.float64))
    state = _run_handler([_pair(pred, truth, aniso)])
    expected = compute_hausdorff_distance(torch.stack([1 - pred, pred])[None], torch.stack([1 - truth, truth])[None],
                                          percentile=95, spacing=[3.0, 0.5, 0.5])
    assert torch.allclose(state.metric_details["hd95"], expected) and float(expected[0, 0]) == pytest.approx(6.0)


def test_hd95_per_case_spacing_in_one_batch_and_batch_tensor_input():
    shape = (10, 10, 10)
    truth, pred = _box(shape, (2, 2, 2), (7, 7, 7)), _box(shape, (2, 2, 2), (8, 7, 7))
    affines = [torch.diag(torch.tensor([s, s, s, 1.0], dtype=torch.float64)) for s in (1.0, 2.0, 4.0)]
    pairs = [_pair(pred, truth, a) for a in affines]
    state = _run_handler(pairs)
    values = state.metric_details["hd95"][:, 0].tolist()
    assert values[0] > 0
    assert values[1] == pytest.approx(2 * values[0], rel=1e-6) and values[2] == pytest.approx(4 * values[0], rel=1e-6)
    # a collated batch-first MetaTensor gives the same per-case values
    metric = HausdorffDistance95Metric()
    batch_pred = list_data_collate([p for p, _ in pairs])
    batch_truth = list_data_collate([t for _, t in pairs])
    assert batch_pred.shape == (3, 2, 10, 10, 10)
    assert torch.allclose(metric(batch_pred, batch_truth), state.metric_details["hd95"])


def test_hd95_empty_cases_counted_and_logged(caplog):
    shape = (10, 10)
    box = _box(shape, (2, 2), (6, 7))
    empty = torch.zeros(shape)
    affine = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64))
    pairs = [_pair(box, box, affine), _pair(empty, box, affine), _pair(box, empty, affine), _pair(empty, empty, affine)]
    with caplog.at_level(logging.WARNING, logger="rankseg_monai.handlers"):
        state = _run_handler(pairs)
    hd = state.metric_details["hd95"][:, 0]
    assert hd[0] == 0.0 and torch.isnan(hd[1:]).all()
    assert state.metric_details["hd95_empty"][:, 0].tolist() == [0, EMPTY_PRED, EMPTY_TRUTH, EMPTY_PRED | EMPTY_TRUTH]
    assert state.metrics["hd95_empty"] == 3
    assert state.metrics["hd95"] == 0.0  # the mean of the non-NaN values only
    assert "3 of 4" in caplog.text and "empty prediction (2)" in caplog.text and "empty truth (2)" in caplog.text
    # all empty: NaN, not 0 (MONAI's reduction would report 0 mm)
    state = _run_handler([_pair(empty, box, affine)])
    assert math.isnan(state.metrics["hd95"]) and state.metrics["hd95_empty"] == 1


def test_hd95_spacing_errors_and_voxel_fallback():
    shape = (10, 10)
    a, b = _box(shape, (2, 2), (6, 7)), _box(shape, (3, 2), (7, 7))
    plain = [(torch.stack([1 - a, a]), torch.stack([1 - b, b]))]
    with pytest.raises(TypeError, match="require_spacing=False"):
        _run_handler(plain)
    with pytest.warns(UserWarning, match="voxels"):
        state = _run_handler(plain, require_spacing=False)
    expected = compute_hausdorff_distance(plain[0][0][None], plain[0][1][None], percentile=95)
    assert torch.allclose(state.metric_details["hd95"], expected)
    # the label's spacing is used when only the label is a MetaTensor
    label_only = [(plain[0][0], MetaTensor(plain[0][1], affine=torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0]))))]
    assert torch.allclose(_run_handler(label_only).metric_details["hd95"], 2 * expected)
    # prediction and label in different spaces
    p, t = _pair(a, b, torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)))
    t = MetaTensor(t.as_tensor(), affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)))
    with pytest.raises(ValueError, match="same space"):
        _run_handler([(p, t)])
    # a label map instead of one-hot
    with pytest.raises(ValueError, match="to_onehot"):
        _run_handler([(p, MetaTensor(b[None], affine=p.affine.clone()))])
    # explicit spacing overrides, one per case
    metric = HausdorffDistance95Metric(require_spacing=False)
    out = metric([plain[0][0], plain[0][0]], [plain[0][1], plain[0][1]], spacing=[[1.0, 1.0], [3.0, 3.0]])
    assert out[1, 0] == pytest.approx(3 * float(out[0, 0]))


_DIST_WORKER = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

    def run(rank, world, init_file, out_dir):
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        from ignite.engine import Engine
        from monai.data import MetaTensor
        from rankseg_monai import HausdorffDistance95
        shape = (12, 12)
        def case(i):
            pred = torch.zeros(2, *shape); truth = torch.zeros(2, *shape)
            truth[1, 2:7, 2:7] = 1
            if i != 3:  # case 3: empty prediction
                pred[1, 2:7 + i % 3, 2:7] = 1
            pred[0], truth[0] = 1 - pred[1], 1 - truth[1]
            affine = torch.diag(torch.tensor([1.0 + i, 1.0, 1.0, 1.0], dtype=torch.float64))
            return MetaTensor(pred, affine=affine), MetaTensor(truth, affine=affine.clone())
        mine = [case(i) for i in range(5) if i % world == rank]  # 3 cases on rank 0, 2 on rank 1: uneven
        engine = Engine(lambda e, batch: batch)
        handler = HausdorffDistance95(output_transform=lambda out: ([p for p, _ in out], [t for _, t in out]))
        handler.attach(engine, "hd")
        engine.run([mine[:2], mine[2:]] if len(mine) > 2 else [mine])
        result = {"hd": engine.state.metrics["hd"], "empty": engine.state.metrics["hd_empty"],
                  "details": engine.state.metric_details["hd"].tolist()}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        dist.barrier()  # no rank leaves while another may still be receiving
        # leave without C++ teardown: gloo's threads at interpreter exit sometimes abort ("terminate called
        # without an active exception") after all the work is done, which would fail the test for nothing
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    if __name__ == "__main__":
        mp.spawn(run, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
    """
)


@pytest.mark.slow
def test_hd95_gathers_across_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "init"), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # every rank sees the gathered result
    assert len(r0["details"]) == 5 and r0["empty"] == 1
    values = [row[0] for row in r0["details"]]
    assert sum(math.isnan(v) for v in values) == 1
    finite = [v for v in values if not math.isnan(v)]
    assert r0["hd"] == pytest.approx(sum(finite) / len(finite), rel=1e-6)
