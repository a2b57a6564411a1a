"""A tiny nnU-Net v2 model folder made by nnU-Net's own code, for tests and benchmarks (needs ``nnunetv2``).

:func:`build_model` writes a synthetic dataset in nnU-Net's raw format (``imagesTr/<case>_0000.nii.gz``,
``labelsTr``, ``dataset.json``), runs nnU-Net's fingerprint extraction, planning and preprocessing for
``3d_fullres``, initialises nnU-Net's trainer (its network, as planned) and saves the checkpoint with the
trainer's own ``save_checkpoint`` as ``fold_0/checkpoint_final.pth``: the folder ``nnUNetv2_predict -d ... -c
3d_fullres -f 0`` reads.  No training step runs (a few iterations would cost minutes on two cores): the network's
weights are nnU-Net's initialisation, with the segmentation head scaled so the probabilities are spread (argmax and
RankSEG then differ).  :func:`write_images` writes test images (one with a zero border, which nnU-Net crops away).

:func:`region_model` derives a region-trained twin.  Run as a script to build one: ``python tests/nnunet_fixture.py
OUTDIR [--regions]``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ORIGIN = (-12.5, 30.0, 4.0)
#: anisotropic spacing (z thicker) as in CT, so the plans resample
SPACING = (1.0, 1.0, 1.5)


def _image(rng: np.random.Generator, shape: tuple[int, int, int], border: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An image (numpy z, y, x as SimpleITK holds it) with two blobs, and its labels (1: outer blob, 2: inner)."""
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    centre = np.array(shape, dtype=np.float32) / 2 + rng.uniform(-3, 3, 3)
    r = np.sqrt(((z - centre[0]) * 1.5) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    outer = r < rng.uniform(7, 10)
    inner = r < rng.uniform(3, 5)
    labels = outer.astype(np.uint8) + inner.astype(np.uint8)
    image = 100.0 + 60.0 * outer + 80.0 * inner + rng.normal(0, 20, shape)
    if border:
        keep = np.zeros(shape, bool)
        keep[border:-border, border:-border, border:-border] = True
        image = np.where(keep, image, 0.0)
        labels = np.where(keep, labels, 0).astype(np.uint8)
    return image.astype(np.float32), labels


def _write(array_zyx: np.ndarray, path: Path, spacing: tuple[float, float, float] = SPACING) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(ORIGIN)
    sitk.WriteImage(img, str(path), True)


def write_images(folder: Path, cases: dict[str, tuple[int, int]], seed: int = 7,
                 shape: tuple[int, int, int] = (20, 36, 30), spacing: tuple[float, float, float] = (1.2, 0.9, 1.7)
                 ) -> list[str]:
    """Test images ``<case>_0000.nii.gz`` in ``folder``; ``cases`` maps a name to ``(seed offset, zero border)``.
    Their spacing differs from the training data's, so nnU-Net resamples the probabilities back at export."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (offset, border) in cases.items():
        image, _ = _image(np.random.default_rng(seed + offset), shape, border)
        _write(image, folder / f"{name}_0000.nii.gz", spacing)
    return sorted(cases)


@contextmanager
def nnunet_paths(root: Path):
    """nnU-Net's three folders under ``root``, set in ``os.environ`` for the block (nnunetv2 >= 2.6 reads them when
    used)."""
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    old = {n: os.environ.get(n) for n in names}
    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
        os.environ[n] = str(root / n)
    try:
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def build_model(root: Path, *, dataset_id: int = 901, num_cases: int = 4,
                shape: tuple[int, int, int] = (24, 32, 32), seed: int = 0, head_scale: float = 40.0) -> Path:
    """Build the model folder under ``root`` (nnU-Net's raw/preprocessed/results folders) and return it
    (``.../nnUNetTrainer__nnUNetPlans__3d_fullres``)."""
    import torch

    name = f"Dataset{dataset_id:03d}_Blobs"
    with nnunet_paths(root):
        raw = root / "nnUNet_raw" / name
        (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
        (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for i in range(num_cases):
            image, labels = _image(rng, shape)
            _write(image, raw / "imagesTr" / f"case{i:02d}_0000.nii.gz")
            _write(labels, raw / "labelsTr" / f"case{i:02d}.nii.gz")
        dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "outer": 1, "inner": 2},
                   "numTraining": num_cases, "file_ending": ".nii.gz"}
        (raw / "dataset.json").write_text(json.dumps(dataset, indent=1))

        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )
        from nnunetv2.run.run_training import get_trainer_from_args

        extract_fingerprints([dataset_id], num_processes=1, show_progress_bar=False, verbose=False)
        plans_name = plan_experiments([dataset_id])
        preprocess([dataset_id], plans_name, configurations=("3d_fullres",), num_processes=(1,), verbose=False)
        trainer = get_trainer_from_args(str(dataset_id), "3d_fullres", 0, device=torch.device("cpu"))
        trainer.initialize()
        torch.manual_seed(seed)
        with torch.no_grad():  # spread the probabilities: nnU-Net's initialisation gives nearly uniform softmax
            head = trainer.network.decoder.seg_layers[-1]
            head.weight.mul_(head_scale)
            head.bias.copy_(torch.linspace(1.0, -1.0, head.bias.numel()))
        out = Path(trainer.output_folder)
        out.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(out / "checkpoint_final.pth"))
        pre = root / "nnUNet_preprocessed" / name  # what the trainer copies at the start of training
        (out.parent / "dataset.json").write_bytes((pre / "dataset.json").read_bytes())
        (out.parent / "plans.json").write_bytes((pre / f"{plans_name}.json").read_bytes())
        return out.parent


def region_model(model: Path, out: Path, seed: int = 1, head_scale: float = 40.0) -> Path:
    """A region-trained twin of ``model`` at ``out``: its plans, a dataset.json whose labels are nested regions
    (``whole = {1, 2}``, ``core = {2}``, ``regions_class_order = [1, 2]``) and a network with one output per region
    built by nnU-Net's trainer class, saved as nnU-Net saves checkpoints (planning depends on the images, not on
    the labels, so nothing else changes)."""
    import shutil

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    shutil.copytree(model, out)
    dataset = json.loads((out / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    dataset["regions_class_order"] = [1, 2]
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    plans = PlansManager(str(out / "plans.json"))
    ckpt_path = out / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = plans.get_configuration(checkpoint["init_args"]["configuration"])
    heads = plans.get_label_manager(dataset).num_segmentation_heads
    torch.manual_seed(seed)
    network = nnUNetTrainer.build_network_architecture(plans, config, determine_num_input_channels(plans, config,
                                                       dataset), heads, enable_deep_supervision=False)
    with torch.no_grad():
        head = network.decoder.seg_layers[-1]
        head.weight.mul_(head_scale)
        head.bias.copy_(torch.linspace(0.5, -0.5, heads))
    checkpoint["network_weights"] = network.state_dict()
    torch.save(checkpoint, ckpt_path)
    return out


if __name__ == "__main__":
    folder = build_model(Path(sys.argv[1]))
    print(folder)
    if "--regions" in sys.argv:
        print(region_model(folder, Path(sys.argv[1]) / "regions_model"))
