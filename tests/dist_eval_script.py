"""Distributed (or single-process) MONAI evaluation with RankSEG decisions; the helper of test_distributed.py.

Runs a ``SupervisedEvaluator`` over ``--cases`` tiny synthetic 3D cases (``create_test_image_3d``, each with its
own anisotropic spacing) with ``RankSEGHandler``, ``MeanDice`` and ``HausdorffDistance95``.  Launched by
``torchrun`` (``WORLD_SIZE`` set) it initialises a gloo process group and shards the cases with
``monai.data.DistributedSampler(even_divisible=False)``: no case is padded or repeated, and the metric handlers
gather every rank's per-case values at the end of the epoch.  Each rank writes ``rank{R}.json`` to ``--out``
with the case ids it evaluated, the gathered case ids, the aggregated metrics and the gathered per-case values::

    torchrun --standalone --nproc_per_node=2 tests/dist_eval_script.py --out /tmp/dist   # 2 ranks, CPU/gloo
    python tests/dist_eval_script.py --out /tmp/single                                    # the same, 1 process

The "network" is parameter-free and deterministic (class logits from the locally averaged intensity, which
``create_test_image_3d`` makes class-dependent), so every run and every rank computes the same probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from generators import intensity_cases  # tests/ is this script's folder: on sys.path
from ignite.engine import Events
from monai.data import DataLoader, Dataset, DistributedSampler
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose

from rankseg_monai.handlers import HausdorffDistance95, RankSEGHandler

NUM_CLASSES = 3


class IntensityNet(torch.nn.Module):
    """Class logits from the 3x3x3-averaged intensity: class ``k`` sits near intensity ``k / 2`` (see
    :func:`generators.intensity_cases`), so object boundaries and noisy voxels are uncertain."""

    def __init__(self, width: float = 0.12) -> None:
        super().__init__()
        self.register_buffer("centers", torch.tensor([0.0, 0.5, 1.0]).view(1, -1, 1, 1, 1))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
        return -((s - self.centers) ** 2) / (2 * self.width**2)


def evaluate(num_cases: int = 5, size: int = 24, batch_size: int = 2) -> dict:
    """Run the evaluation on this process's shard (all cases when not distributed); return this rank's report."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dataset = Dataset(intensity_cases(num_cases, size))
    sampler = DistributedSampler(dataset, even_divisible=False, shuffle=False) if distributed else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=0)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=IntensityNet(),
        postprocessing=Compose([Activationsd(keys="pred", softmax=True),
                                AsDiscreted(keys="label", to_onehot=NUM_CLASSES)]),
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]),
                                         save_details=True)},
        additional_metrics={"hd95": HausdorffDistance95(output_transform=from_engine(["pred", "label"]))},
        val_handlers=[RankSEGHandler(keys="pred", to_onehot=NUM_CLASSES)],
    )
    local_ids: list[int] = []
    pred_shapes: set[tuple[int, ...]] = set()

    @evaluator.on(Events.ITERATION_COMPLETED)
    def _record(engine):  # runs after the metric updates of the same event: only reads the state
        local_ids.extend(int(item["case_id"]) for item in engine.state.batch)
        for item in engine.state.output:
            pred = item["pred"]
            if not bool(((pred == 0) | (pred == 1)).all()) or not bool((pred.sum(0) == 1).all()):
                raise AssertionError("pred is not a one-hot decision after RankSEGHandler")
            pred_shapes.add(tuple(pred.shape))

    evaluator.run()
    if distributed:
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, local_ids)
        gathered_ids = [i for ids in per_rank for i in ids]
    else:
        gathered_ids = list(local_ids)
    state = evaluator.state
    return {
        "rank": rank,
        "world_size": world,
        "case_ids": local_ids,
        "gathered_case_ids": gathered_ids,
        "pred_shapes": sorted(pred_shapes),
        "dice": float(state.metrics["dice"]),
        "hd95": float(state.metrics["hd95"]),
        "hd95_empty": int(state.metrics["hd95_empty"]),
        "dice_details": state.metric_details["dice"].tolist(),
        "hd95_details": state.metric_details["hd95"].tolist(),
        "hd95_empty_details": state.metric_details["hd95_empty"].tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for rank{R}.json")
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    try:
        report = evaluate(args.cases, args.size, args.batch_size)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{report['rank']}.json").write_text(json.dumps(report))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
