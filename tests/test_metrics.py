"""Tests of the HD95 metric and its handler (rankseg_monai/metrics.py, rankseg_monai.handlers.HausdorffDistance95):
spacing from each item's MetaTensor affine, empty cases counted, gathering across ranks."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate
from monai.metrics.hausdorff_distance import compute_hausdorff_distance

from rankseg_monai import HausdorffDistance95
from rankseg_monai.metrics import EMPTY_PRED, EMPTY_TRUTH, HausdorffDistance95Metric

ROOT = Path(__file__).resolve().parents[1]


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
