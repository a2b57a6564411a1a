"""Expected Dice in an evaluator: RankSEGHandler(expected_score=True), the ExpectedScore metric handler, MONAI's
MetricsSaver (per-case CSV) and ClassificationSaver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor, create_test_image_3d
from monai.engines import SupervisedEvaluator
from monai.handlers import ClassificationSaver, MeanDice, MetricsSaver, from_engine
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import Activationsd, AsDiscreted, Compose

from rankseg_monai import ExpectedScore, RankSEGHandler
from rankseg_monai.functional import expected_score


@pytest.mark.slow
def test_evaluator_saves_and_logs_the_estimates(tmp_path):
    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(4, 8), strides=(2,)).eval()
    data = []
    for i in range(3):
        im, lb = create_test_image_3d(24, 24, 12, num_objs=2, rad_max=5, rad_min=3, num_seg_classes=2,
                                      random_state=np.random.RandomState(i))
        meta = {"filename_or_obj": f"case_{i}.nii.gz"}
        data.append({"image": MetaTensor(torch.tensor(im)[None].float(), meta=dict(meta)),
                     "label": MetaTensor(torch.tensor(lb)[None].float(), meta=dict(meta))})
    seen = []
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(data), batch_size=2), network=net,
        inferer=SlidingWindowInferer((24, 24, 12)),
        postprocessing=Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys="label", to_onehot=3)]),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        additional_metrics={
            "expected_dice": ExpectedScore(output_transform=from_engine(["pred_expected_dice"])),
            "expected_dice_argmax": ExpectedScore(output_transform=from_engine(["pred_expected_dice_argmax"])),
        },
        val_handlers=[
            RankSEGHandler(keys="pred", to_onehot=3, expected_score=True),
            MetricsSaver(save_dir=str(tmp_path), metric_details=["expected_dice"],
                         batch_transform=lambda batch: [b["image"].meta for b in batch]),
            ClassificationSaver(output_dir=str(tmp_path), filename="expected_dice.csv",
                                batch_transform=lambda batch: [b["image"].meta for b in batch],
                                output_transform=from_engine(["pred_expected_dice"])),
        ],
    )
    from ignite.engine import Events

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.extend(e.state.output))
    evaluator.run()
    details = evaluator.state.metric_details["expected_dice"]
    assert details.shape == (3, 2)  # cases x foreground classes
    for i, item in enumerate(seen):  # the handler's values are the estimates attached to each case
        np.testing.assert_allclose(details[i].numpy(), item["pred_expected_dice"][1:].numpy(), rtol=1e-6)
    assert evaluator.state.metrics["expected_dice"] == pytest.approx(float(details.mean()), rel=1e-6)
    assert "expected_dice_argmax" in evaluator.state.metrics
    with open(tmp_path / "expected_dice_raw.csv") as fh:  # MetricsSaver: a header, then a row per case
        rows = [line.strip().split(",") for line in fh if line.strip()]
    assert [r[0] for r in rows[1:4]] == [f"case_{i}.nii.gz" for i in range(3)]
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:3]] for r in rows[1:4]]), details.numpy(), atol=1e-4)
    with open(tmp_path / "expected_dice.csv") as fh:
        lines = [line.strip().split(",") for line in fh if line.strip()]
    assert [line[0] for line in lines] == [f"case_{i}.nii.gz" for i in range(3)]
    assert len(lines[0]) == 1 + 3  # the file name and one estimate per class


def test_expected_score_metric_reductions():
    from rankseg_monai.metrics import ExpectedScoreMetric

    m = ExpectedScoreMetric(include_background=True, reduction="none")
    m([torch.tensor([0.9, 0.5]), torch.tensor([0.7, 0.3])])
    m(torch.tensor([[0.1, 0.2]]))
    assert m.aggregate().shape == (3, 2)
    with pytest.raises(ValueError, match="expected_score=True"):
        ExpectedScoreMetric()(torch.ones(2, 3, 4))
    p = torch.softmax(torch.randn(1, 3, 6, 6), 1)
    est = expected_score(p, p.argmax(1))
    m = ExpectedScoreMetric()
    m(est)
    torch.testing.assert_close(m.aggregate().reshape(()), est[:, 1:].mean().float())
