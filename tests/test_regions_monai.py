"""Regions in MONAI pipelines: a BraTS-style Compose after Activationsd(sigmoid=True), bundle-config instantiation,
and the evaluator-handler path scored per region."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.inferers import SimpleInferer
from monai.transforms import Activationsd, AsDiscreted, Compose, ConvertToMultiChannelBasedOnBratsClassesd

from rankseg_monai import RankSEG, RankSEGd, RankSEGHandler
from rankseg_monai.functional import rankseg

BRATS = [[1, 4], [1, 2, 4], [4]]  # MONAI's channels TC, WT, ET (BraTS 2021 labels)


def _brats_logits(seed: int, shape=(20, 20, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.avg_pool3d(torch.randn(1, 3, *shape, generator=g), 5, 1, 2)[0] * 12
    return z


def test_brats_compose_after_sigmoid_gives_nested_channels(device):
    logits = _brats_logits(0).to(device)
    post = Compose([Activationsd(keys="pred", sigmoid=True),
                    RankSEGd(keys="pred", regions=BRATS, region_probs=True, output_mode="multilabel")])
    out = post({"pred": MetaTensor(logits)})["pred"]
    assert isinstance(out, MetaTensor) and out.shape == (3, 20, 20, 12) and out.device.type == device
    tc, wt, et = out[0] > 0, out[1] > 0, out[2] > 0
    assert bool((et <= tc).all()) and bool((tc <= wt).all())
    expected = rankseg(torch.sigmoid(logits)[None], regions=BRATS, region_probs=True, output_mode="multilabel",
                       pruning_prob="auto")[0]
    assert torch.equal(out.as_tensor().bool(), expected)
    # AsDiscrete(threshold=0.5) on the same probabilities is not nested in general; ours always is
    labels = RankSEG(regions=BRATS, region_probs=True)(torch.sigmoid(logits))
    assert set(labels.unique().tolist()) <= {0.0, 1.0, 2.0, 4.0}
    # the label map converts back into the same channels with MONAI's own BraTS conversion
    back = ConvertToMultiChannelBasedOnBratsClassesd(keys="y")({"y": labels.long()})["y"]
    assert torch.equal(back.to(out.device).bool(), out.as_tensor().bool())


def test_bundle_config_instantiates_regions():
    config = {
        "post": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "rankseg_monai.RankSEGd", "keys": "pred",
             "regions": {"liver": [1, 2], "tumour": 2}, "expected_score": True},
        ]},
        "brats": {"_target_": "rankseg_monai.RankSEGd", "keys": "pred", "regions": BRATS, "region_probs": True,
                  "regions_class_order": [1, 2, 4], "output_mode": "multilabel"},
    }
    parser = ConfigParser(config)
    post = parser.get_parsed_content("post")
    rs = post.transforms[1].rankseg[0]
    assert rs.regions.names == ("liver", "tumour") and rs.regions.own == ((1,), (2,))
    out = post({"pred": torch.randn(3, 12, 12, 6) * 3})
    assert out["pred_expected_dice"].shape == (2,)
    brats = parser.get_parsed_content("brats").rankseg[0]
    assert brats.regions.paint == (1, 2, 4) and brats.region_probs
    with pytest.raises(RuntimeError, match="Failed to instantiate") as info:  # when the config is parsed
        ConfigParser({"t": {"_target_": "rankseg_monai.RankSEGd", "keys": "pred", "regions": [[1, 2], [2, 3]]}}
                     ).get_parsed_content("t")
    assert "overlap without one containing the other" in str(info.value.__cause__)


@pytest.mark.slow
def test_evaluator_handler_scores_the_regions():
    """An evaluator whose network outputs 3 class logits (background, liver, tumour) and is scored LiTS-style:
    the handler decides on the regions and MeanDice compares the region masks with the label's regions."""
    torch.manual_seed(0)
    cases = []
    for i in range(3):
        rng = np.random.default_rng(i)
        label = np.zeros((24, 24, 12), np.int64)
        label[4:20, 4:20, 2:10] = 1
        c = rng.integers(8, 16, 3)
        label[c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, 4:8] = 2
        logits = 4.0 * np.eye(3)[label].transpose(3, 0, 1, 2) + rng.normal(0, 1.0, (3, 24, 24, 12))
        cases.append({"image": MetaTensor(torch.tensor(logits, dtype=torch.float32)),
                      "label": MetaTensor(torch.tensor(label)[None].float())})

    def to_regions(d):  # the label's regions, as LiTS scores them
        y = d["label"][0]
        d["label"] = torch.stack([(y == 1) | (y == 2), y == 2]).float()
        return d

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(Dataset(cases), batch_size=1),
        network=torch.nn.Identity(), inferer=SimpleInferer(),
        postprocessing=Compose([Activationsd(keys="pred", softmax=True), to_regions]),
        key_val_metric={"dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[RankSEGHandler(keys="pred", regions={"liver": [1, 2], "tumour": [2]},
                                     output_mode="multilabel", dtype=torch.float32)],
    )
    evaluator.run()
    assert evaluator.state.metrics["dice"] > 0.8
    assert evaluator.state.metric_details["dice"].shape == (3, 2)


def test_regions_options_reach_the_transform_at_construction():
    with pytest.raises(ValueError, match="one channel per region"):
        RankSEG(regions=BRATS, region_probs=True)(torch.rand(2, 6, 6))
    with pytest.raises(ValueError, match="no label of its own"):
        RankSEGd(keys="pred", regions=[[1, 2], [1], [2]])
    AsDiscreted(keys="pred", threshold=0.5)  # what RankSEGd replaces in MONAI's BraTS tutorial
