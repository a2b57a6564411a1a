"""The ``rankseg-monai demo`` job: phantoms, the shipped checkpoint, and an end-to-end reduced run."""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import pytest
import torch

from rankseg_monai.app import demo
from rankseg_monai.app.synthetic import DEFAULT_SPACING, make_phantom, make_phantoms

# ---------------------------------------------------------------- phantoms


def test_phantom_is_deterministic_under_a_seed():
    a, b = make_phantom(7), make_phantom(7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    c = make_phantom(8)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.label, c.label)
    # make_phantoms(n, seed) is case i = make_phantom(seed + i)
    np.testing.assert_array_equal(make_phantoms(2, seed=6)[1].image, a.image)


def test_phantom_shapes_types_and_anatomy():
    for seed in range(4):
        ph = make_phantom(seed)
        assert ph.image.shape == (1, 64, 64, 32) and ph.image.dtype == np.float32
        assert ph.label.shape == (1, 64, 64, 32) and ph.label.dtype == np.int64
        assert ph.spacing == DEFAULT_SPACING
        np.testing.assert_array_equal(ph.affine, np.diag([*DEFAULT_SPACING, 1.0]))
        assert 0.0 <= ph.image.min() and ph.image.max() <= 1.0
        counts = np.bincount(ph.label.ravel(), minlength=3)
        assert counts.size == 3
        # a large organ (several % of the volume) and small lesions (well under 1 %)
        assert counts[1] > 0.05 * ph.label.size
        assert 0 < counts[2] < 0.02 * ph.label.size
        # lesions are darker than the organ on average, but only slightly (low contrast, below the noise)
        organ_mean, lesion_mean = ph.image[ph.label == 1].mean(), ph.image[ph.label == 2].mean()
        noise = ph.image[ph.label == 1].std()
        assert 0 < organ_mean - lesion_mean < 2 * noise


def test_phantom_lesion_free_cases_and_custom_grid():
    ph = make_phantom(3, shape=(32, 40, 16), spacing=(1.0, 1.0, 3.0), num_lesions=(0, 0))
    assert ph.image.shape == (1, 32, 40, 16)
    assert not np.any(ph.label == 2) and np.any(ph.label == 1)
    with pytest.raises(ValueError):
        make_phantom(0, shape=(64, 64))


# ---------------------------------------------------------------- shipped checkpoint


def test_shipped_checkpoint_matches_its_recorded_architecture():
    from monai.networks.nets import UNet

    path = demo.default_checkpoint()
    assert path.is_file()
    assert path.stat().st_size < 5 * 1024 * 1024
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"arch", "state_dict", "roi_size", "training"}
    arch = ckpt["arch"]
    assert arch["spatial_dims"] == 3 and arch["in_channels"] == 1 and arch["out_channels"] == 3
    assert ckpt["training"]["loss"] == "cross_entropy"
    fresh = UNet(**arch).state_dict()
    assert set(fresh) == set(ckpt["state_dict"])
    assert all(fresh[k].shape == ckpt["state_dict"][k].shape for k in fresh)

    net, meta = demo.load_demo_model()
    assert "state_dict" not in meta and meta["arch"] == arch
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k], rtol=0, atol=0)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *ckpt["roi_size"]))
    assert out.shape == (1, 3, *ckpt["roi_size"])


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    code = demo.main(["--cases", "2", "--fast", "--quiet", "--output-dir", str(out)])
    return code, out, time.perf_counter() - t0


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the reduced demo end to end (module fixture demo_run)
def test_demo_runs_end_to_end_and_writes_outputs(demo_run):
    code, out, seconds = demo_run
    assert code == 0
    assert seconds < 120, f"reduced demo took {seconds:.0f} s"
    png = out / demo.PNG_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    rows = _read_csv(out / demo.CSV_NAME)
    assert len(rows) == 2 * 2  # cases x foreground classes
    assert [(r["case"], r["seed"], r["class"], r["class_name"]) for r in rows] == [
        ("0", str(demo.DEMO_SEED), "1", "organ"), ("0", str(demo.DEMO_SEED), "2", "lesion"),
        ("1", str(demo.DEMO_SEED + 1), "1", "organ"), ("1", str(demo.DEMO_SEED + 1), "2", "lesion")]
    for r in rows:
        for m in demo.METHODS:
            dice, iou = float(r[f"dice_{m}"]), float(r[f"iou_{m}"])
            assert 0.0 <= dice <= 1.0 and iou == pytest.approx(dice / (2 - dice))
            if int(r[f"voxels_{m}"]) > 0:
                assert float(r[f"hd95_{m}"]) >= 0.0
        assert float(r["dice_diff"]) == pytest.approx(float(r["dice_rankseg_dice"]) - float(r["dice_argmax"]))
        assert 0.0 < float(r["max_prob"]) <= 1.0


@pytest.mark.slow  # the reduced demo end to end (module fixture demo_run)
def test_demo_csv_agrees_with_monai_metrics_recomputed_for_one_case(demo_run):
    """Recompute case 1 independently: phantom -> model -> softmax -> decisions -> MONAI metrics."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
    from monai.networks.utils import one_hot

    from rankseg_monai.functional import rankseg

    _, out, _ = demo_run
    rows = {int(r["class"]): r for r in _read_csv(out / demo.CSV_NAME) if r["case"] == "1"}
    ph = make_phantom(demo.DEMO_SEED + 1)
    net, meta = demo.load_demo_model()
    probs = demo.infer_probabilities(net, ph.image, meta["roi_size"], overlap=0.0)  # --fast: no overlap
    assert probs.shape == (1, 3, 64, 64, 32)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 64, 32))
    preds = {"argmax": probs.argmax(1), "rankseg_dice": rankseg(probs, metric="dice"),
             "rankseg_iou": rankseg(probs, metric="iou")}
    y = one_hot(torch.from_numpy(ph.label)[None], 3)
    for method, pred in preds.items():
        p = one_hot(pred[:, None], 3)
        dice = DiceMetric(include_background=False, reduction="none")(p, y)[0]
        iou = MeanIoU(include_background=False, reduction="none")(p, y)[0]
        hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            p, y, spacing=list(ph.spacing))[0]
        for c in (1, 2):
            r = rows[c]
            assert int(r[f"voxels_{method}"]) == int((pred == c).sum())
            assert int(r["true_voxels"]) == int((ph.label == c).sum())
            assert float(r["max_prob"]) == pytest.approx(float(probs[0, c].max()), abs=1e-6)
            for name, val in (("dice", dice[c - 1]), ("iou", iou[c - 1]), ("hd95", hd[c - 1])):
                got = float(r[f"{name}_{method}"])
                if math.isnan(float(val)):
                    assert math.isnan(got)
                else:
                    assert got == pytest.approx(float(val), abs=1e-5), (method, c, name)


def _result(case, dice, hd, voxels):
    """A case result in rankseg_monai.evaluation's format, one class (2), methods as in the demo."""
    return {"case": str(case), "classes": [2], "methods": list(demo.METHODS), "true_voxels": [20], "seed": case,
            "max_prob": [0.9],
            "metrics": {m: {"dice": [d], "hd95": [h], "pred_voxels": [v]}
                        for m, d, h, v in zip(demo.METHODS, dice, hd, voxels)}}


def test_demo_table_counts_empty_masks_and_leaves_their_hd95_out():
    results = [
        _result(0, dice=(0.5, 0.5, 0.5), hd=(4.0, 4.0, 4.0), voxels=(10, 10, 10)),  # tie
        _result(1, dice=(0.0, 0.3, 0.3), hd=(math.nan, 9.0, 9.0), voxels=(0, 5, 5)),  # argmax empty
        _result(2, dice=(0.6, 0.4, 0.8), hd=(3.0, 5.0, 2.0), voxels=(7, 9, 8)),
    ]
    stats = {s["metric"]: s for s in demo.table_rows(results)}
    d = stats["dice"]
    assert d["mean_argmax"] == pytest.approx(1.1 / 3) and d["mean_rankseg"] == pytest.approx(1.2 / 3)
    assert (d["wins"], d["losses"], d["ties"]) == (1, 1, 1)
    assert (d["empty_argmax"], d["empty_rankseg"]) == (1, 0)
    assert d["lo"] == pytest.approx(-0.2) and d["hi"] == pytest.approx(0.3)
    h = stats["hd95"]
    assert h["n"] == 2 and h["mean_argmax"] == pytest.approx(3.5) and h["mean_rankseg"] == pytest.approx(6.0)
    assert h["diff"] == pytest.approx(1.0) and (h["wins"], h["losses"], h["ties"]) == (0, 1, 1)
    j = stats["iou"]  # argmax vs RankSEG-iou, IoU = D / (2 - D)
    assert j["mean_rankseg"] == pytest.approx((1 / 3 + 0.3 / 1.7 + 0.8 / 1.2) / 3)
    assert (j["wins"], j["losses"], j["ties"]) == (2, 0, 1)
    table = demo.format_table(results)
    assert "lesion" in table and "HD95 mm" in table and "IoU*" in table
    assert " 1/0" in table  # empty masks argmax/RankSEG


def test_demo_rejects_zero_cases(tmp_path):
    assert demo.main(["--cases", "0", "--output-dir", str(tmp_path)]) == 2


def test_demo_draws_report_the_spread(tmp_path, capsys):
    """``--draws``: the table's counts and extremes are those of the per-case CSV it writes."""
    out = tmp_path / "spread"
    assert demo.main(["--cases", "2", "--draws", "2", "--fast", "--quiet", "--output-dir", str(out)]) == 0
    table = (out / demo.SPREAD_MD_NAME).read_text()
    assert table.strip() in capsys.readouterr().out
    with open(out / demo.SPREAD_CSV_NAME, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["class_name"] == "lesion"]
    assert sorted(int(r["seed"]) for r in rows) == demo.draw_seeds(demo.DEMO_SEED, 2, 0) + demo.draw_seeds(
        demo.DEMO_SEED, 2, 1)
    diffs = [float(r["dice_diff"]) for r in rows]
    wins, losses = sum(d > 1e-9 for d in diffs), sum(d < -1e-9 for d in diffs)
    line = next(x for x in table.splitlines() if x.startswith("| lesion | Dice |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7] == f"{wins}/{losses}/{len(diffs) - wins - losses}"
    worst = min(range(len(rows)), key=lambda i: diffs[i])
    assert cells[5] == f"{diffs[worst]:+.4f} (seed {rows[worst]['seed']})"
    assert "worse in" in cells[8] and "of 2" in cells[8]


def test_readme_headline_is_the_spread_table():
    """README's headline is a spread table between its markers, as scripts/demo_headline.py writes it."""
    import importlib.util
    from pathlib import Path

    root = Path(demo.__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("demo_headline", root / "scripts" / "demo_headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (root / "README.md").read_text()
    block = text.split(module.START)[1].split(module.END)[0]
    assert block.strip().startswith("| class | metric | argmax | RankSEG |") and "worse in" in block
    assert module.replace_block(text, block) == text
