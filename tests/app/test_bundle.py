"""The example MONAI bundle (bundle/rankseg_demo) and the RankSEG overlay configs (bundle/rankseg_overlay*.json).

* the overlays replace exactly the spleen_ct_segmentation-style decision entry (``postprocessing#transforms#2`` /
  ``validate#postprocessing#transforms#2``) of a model-zoo-shaped config and of the example bundle;
* the example bundle's evaluation runs end to end (``ConfigWorkflow`` in-process and ``python -m monai.bundle run``
  in a subprocess) and its per-case Dice / HD95 equal a direct computation with the demo model;
* ``inference.json`` writes RankSEG label maps equal to ``rankseg_monai.functional.rankseg``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.metrics import DiceMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, SaveImaged

from rankseg_monai import RankSEGd
from rankseg_monai.app.demo import infer_probabilities, load_demo_model
from rankseg_monai.app.synthetic import make_phantom
from rankseg_monai.functional import rankseg

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundle" / "rankseg_demo"
CONFIGS = BUNDLE / "configs"
EVALUATE, ARGMAX, INFERENCE = CONFIGS / "evaluate.json", CONFIGS / "argmax.json", CONFIGS / "inference.json"
OVERLAY = ROOT / "bundle" / "rankseg_overlay.json"
OVERLAY_EVALUATE = ROOT / "bundle" / "rankseg_overlay_evaluate.json"
DECISION = "postprocessing#transforms#2"
EVAL_DECISION = "validate#postprocessing#transforms#2"
FIRST_SEED = 1_000_000
NUM_CASES = 2

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file", "ignore::FutureWarning",
                                        "ignore:Detected deprecated name")


def _parser(*files: Path | str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    return parser


# --------------------------------------------------------------------------------------- model-zoo-shaped configs


def _model_zoo_like(tmp_path: Path) -> tuple[Path, Path]:
    """Minimal configs with the key layout of spleen_ct_segmentation (written here, 2 classes):
    inference.json's ``postprocessing`` and train.json + evaluate.json's ``validate#postprocessing``."""
    net = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
           "strides": [2]}
    pre = {"_target_": "Compose", "transforms": [{"_target_": "EnsureTyped", "keys": "image"}]}
    save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": str(tmp_path / "out")}
    inference = {
        "network_def": net, "preprocessing": pre,
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            save]},
    }
    evaluate = {
        "network_def": net,
        "validate": {"preprocessing": pre, "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": ["pred", "label"], "transform": "@validate#preprocessing",
             "orig_keys": "image", "nearest_interp": [False, True], "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": 2},
            {**save, "_disabled_": True}]}},
    }
    paths = tmp_path / "inference.json", tmp_path / "train_evaluate.json"
    for path, cfg in zip(paths, (inference, evaluate)):
        path.write_text(json.dumps(cfg))
    return paths


def test_overlay_replaces_the_argmax_entry_of_a_model_zoo_inference_config(tmp_path):
    inference, _ = _model_zoo_like(tmp_path)
    before = _parser(inference).get_parsed_content("postprocessing")
    assert isinstance(before.transforms[2], AsDiscreted) and before.transforms[2].argmax == (True,)
    post = _parser(inference, OVERLAY).get_parsed_content("postprocessing")
    assert [type(t) for t in post.transforms] == [Activationsd, Invertd, RankSEGd, SaveImaged]
    rs = post.transforms[2]
    assert rs.keys == ("pred",) and rs.rankseg[0].metric == "dice" and rs.rankseg[0].pruning_prob == "auto"
    assert rs.rankseg[0].to_onehot is None  # a label map, like AsDiscreted(argmax=True), for SaveImaged

    # the swapped chain runs: its label map is RankSEG's decision on the softmax
    logits = torch.randn(2, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    out = Compose(post.transforms[:1] + post.transforms[2:3])({"pred": logits})
    expected = rankseg(torch.softmax(logits, 0)[None], metric="dice")
    assert out["pred"].shape == (1, 6, 6, 6) and torch.equal(out["pred"].long(), expected)


def test_evaluate_overlay_replaces_the_argmax_entry_of_a_model_zoo_evaluate_config(tmp_path):
    _, evaluate = _model_zoo_like(tmp_path)
    before = _parser(evaluate).get_parsed_content("validate#postprocessing")
    assert isinstance(before.transforms[2], AsDiscreted) and before.transforms[2].argmax == (True, False)

    parser = _parser(evaluate, OVERLAY_EVALUATE)
    post = parser.get_parsed_content("validate#postprocessing")
    assert [type(t) for t in post.transforms] == [Activationsd, Invertd, Compose]  # SaveImaged is _disabled_
    step = post.transforms[2]
    assert [type(t) for t in step.transforms] == [RankSEGd, AsDiscreted]
    assert step.transforms[0].rankseg[0].to_onehot == 2  # from @network_def#out_channels of the host config
    assert step.transforms[1].keys == ("label",) and tuple(step.transforms[1].to_onehot) == (2,)
    assert parser["validate#postprocessing#transforms#3#_target_"] == "SaveImaged"  # untouched, still disabled
    assert parser["validate#postprocessing#transforms#3#_disabled_"] is True

    probs = torch.softmax(torch.randn(2, 5, 5, 5, generator=torch.Generator().manual_seed(1)), 0)
    label = (torch.rand(1, 5, 5, 5, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    out = step({"pred": probs, "label": label})
    assert torch.equal(out["pred"].argmax(0, keepdim=True), rankseg(probs[None], metric="dice"))
    assert out["pred"].shape == (2, 5, 5, 5) and torch.equal(out["label"][1:2], label)


def test_overlay_options_are_top_level_keys(tmp_path):
    inference, _ = _model_zoo_like(tmp_path)
    parser = _parser(inference, OVERLAY)
    parser.update({"rankseg_metric": "iou", "rankseg_pruning_prob": 0.0})  # = --rankseg_metric iou ...
    rs = parser.get_parsed_content(DECISION)
    assert rs.rankseg[0].metric == "iou" and rs.rankseg[0].pruning_prob == 0.0


# ------------------------------------------------------------------------------------------- the example bundle


def test_example_bundle_configs_parse_with_the_decision_at_the_spleen_paths():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    for name in ("logging.conf", "metadata.json", "inference.json", "evaluate.json", "argmax.json"):
        assert (CONFIGS / name).is_file()
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "scripts" / "prepare_data.py").is_file()

    inf = _parser(INFERENCE)
    assert inf[f"{DECISION}#_target_"] == "rankseg_monai.RankSEGd"
    assert isinstance(inf.get_parsed_content(DECISION), RankSEGd)
    assert inf["postprocessing#transforms#1#_target_"] == "Invertd"

    native = _parser(EVALUATE)
    # what evaluate.json ships is exactly what the overlay puts in
    assert native[EVAL_DECISION] == ConfigParser.load_config_file(str(OVERLAY_EVALUATE))[EVAL_DECISION]
    baseline = _parser(EVALUATE, ARGMAX)
    step = baseline.get_parsed_content(EVAL_DECISION)
    assert isinstance(step, AsDiscreted) and step.argmax == (True, False) and tuple(step.to_onehot) == (3, 3)
    swapped = _parser(EVALUATE, ARGMAX, OVERLAY_EVALUATE).get_parsed_content(EVAL_DECISION)
    assert [type(t) for t in swapped.transforms] == [RankSEGd, AsDiscreted]
    assert swapped.transforms[0].rankseg[0].to_onehot == 3
    # everything but the decision entry is untouched by the overlay
    a, b = _parser(EVALUATE, ARGMAX).config, _parser(EVALUATE, ARGMAX, OVERLAY_EVALUATE).config
    a["validate"]["postprocessing"]["transforms"][2] = b["validate"]["postprocessing"]["transforms"][2] = None
    assert a == b


def _workflow(files, tmp_path: Path, name: str, **override) -> ConfigWorkflow:
    override = {"bundle_root": str(BUNDLE), "dataset_dir": str(tmp_path / "data"),
                "output_dir": str(tmp_path / name), "num_cases": NUM_CASES, **override}
    wf = ConfigWorkflow(config_file=[str(f) for f in files], meta_file=str(CONFIGS / "metadata.json"),
                        logging_file=False, workflow_type=None, **override)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def _direct(seed: int, net, meta) -> dict:
    """The same case without the bundle: demo phantom -> sliding window -> softmax -> argmax / RankSEG."""
    ph = make_phantom(seed)
    probs = infer_probabilities(net, ph.image, meta["roi_size"], overlap=0.25)
    label = torch.nn.functional.one_hot(torch.from_numpy(ph.label[0]), 3).permute(3, 0, 1, 2)[None].float()
    out = {"probs": probs}
    for name, mask in (("argmax", probs.argmax(1)), ("rankseg", rankseg(probs, metric="dice"))):
        onehot = torch.nn.functional.one_hot(mask[0], 3).permute(3, 0, 1, 2)[None].float()
        dice = DiceMetric(include_background=False, reduction="none")(onehot, label)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = compute_hausdorff_distance(onehot, label, percentile=95, spacing=list(ph.spacing))[0]
        out[name] = (dice.numpy(), hd.numpy(), mask[0].numpy())
    return out


def _csv_rows(path: Path) -> list[list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "class0", "class1", "mean"]
    return [[float(v) for v in r[1:3]] for r in rows[1:]]


@pytest.mark.slow
def test_example_bundle_end_to_end(tmp_path):
    """argmax baseline, overlay run and the native evaluate.json (subprocess, `python -m monai.bundle run`) on the
    same NIfTI phantoms; all per-case metrics checked against a direct computation."""
    base = _workflow([EVALUATE, ARGMAX], tmp_path, "eval_argmax")
    over = _workflow([EVALUATE, ARGMAX, OVERLAY_EVALUATE], tmp_path, "eval_overlay")
    images = sorted((tmp_path / "data" / "imagesTs").glob("*.nii.gz"))
    assert [p.name for p in images] == [f"phantom_{FIRST_SEED + i}.nii.gz" for i in range(NUM_CASES)]

    net, meta = load_demo_model()
    direct = [_direct(FIRST_SEED + i, net, meta) for i in range(NUM_CASES)]
    for wf, method in ((base, "argmax"), (over, "rankseg")):
        state = wf.parser.get_parsed_content("validate#evaluator").state
        dice, hd = state.metric_details["val_mean_dice"].numpy(), state.metric_details["val_hd95"].numpy()
        assert dice.shape == hd.shape == (NUM_CASES, 2)
        np.testing.assert_allclose(dice, [d[method][0] for d in direct], atol=1e-6)
        np.testing.assert_allclose(hd, [d[method][1] for d in direct], rtol=1e-5)  # mm, from the NIfTI affines
        assert state.metrics["val_hd95_empty"] == 0
        assert state.metrics["val_mean_dice"] == pytest.approx(float(dice.mean()), abs=1e-6)
        assert _csv_rows(tmp_path / f"eval_{'argmax' if method == 'argmax' else 'overlay'}" / "val_mean_dice_raw.csv")
    # on these two cases RankSEG wins on lesion Dice (documented in docs/demo.md: 0.459 -> 0.575, 0.602 -> 0.666)
    assert all(d["rankseg"][0][1] > d["argmax"][0][1] + 0.05 for d in direct)

    # the documented command line, native evaluate.json (RankSEGd shipped in its postprocessing)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(EVALUATE.relative_to(ROOT)),
           "--bundle_root", str(BUNDLE.relative_to(ROOT)), "--dataset_dir", str(tmp_path / "data"),
           "--output_dir", str(tmp_path / "eval_native"), "--num_cases", "1"]  # 1 case: the imports cost most
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "decision: RankSEG(metric='dice', solver='rma', pruning_prob='auto')" in proc.stdout
    assert "Restored all variables from" in proc.stdout  # logging.conf applied, package checkpoint loaded
    native = _csv_rows(tmp_path / "eval_native" / "val_mean_dice_raw.csv")
    np.testing.assert_allclose(native, [direct[0]["rankseg"][0]], atol=1e-6)
    native_hd = _csv_rows(tmp_path / "eval_native" / "val_hd95_raw.csv")
    np.testing.assert_allclose(native_hd, [direct[0]["rankseg"][1]], rtol=1e-5)

    # inference.json: one RankSEG label map per case, on the image's grid, equal to the direct decision
    _workflow([INFERENCE], tmp_path, "infer", num_cases=1)
    masks = sorted((tmp_path / "infer").glob("*.nii.gz"))
    assert [p.name for p in masks] == [f"phantom_{FIRST_SEED}_seg.nii.gz"]
    img = nib.load(str(masks[0]))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, nib.load(str(images[0])).affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), direct[0]["rankseg"][2])
