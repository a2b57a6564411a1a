"""Issue 22, items 7-15: region runs, usage errors before any case, the API's region estimates, reports replaced
whole, part records that a merge can check, format claims, refused runs that leave nothing, and a .pkl reader whose
memory is bounded by the file's size."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from generators import make_case, nested_region_probs
from volume_files import files_in, write_nnunet_case, write_sitk_labels, write_sitk_probs

from rankseg_monai import RankSEG
from rankseg_monai.app import cli
from rankseg_monai.app import evaluation as ev
from rankseg_monai.app import io as rio
from rankseg_monai.app.cli import main
from rankseg_monai.functional import expected_score, rankseg
from rankseg_monai.options import RankSEGOptions

LITS = {"liver": [1, 2], "tumour": [2]}



@pytest.fixture
def class_cases(tmp_path):
    folder = tmp_path / "p"
    data = {}
    for i in range(2):
        probs, label, _ = make_case(seed=90 + i)
        write_nnunet_case(folder, f"c{i}", probs)
        data[f"c{i}"] = (probs, label)
    return folder, data


@pytest.fixture
def eval_dirs(tmp_path):
    probs_dir, labels_dir = tmp_path / "probs", tmp_path / "labels"
    probs_dir.mkdir()
    labels_dir.mkdir()
    for i, name in enumerate(("a", "b", "c", "d")):
        probs, label, _ = make_case(seed=300 + i, shape=(12, 11, 10))
        write_sitk_probs(probs_dir / f"{name}.mha", probs)
        write_sitk_labels(labels_dir / f"{name}.mha", label)
    return probs_dir, labels_dir


def _count(monkeypatch, name):
    calls = []
    real = getattr(cli, name)
    monkeypatch.setattr(cli, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ------------------------------------------------------------------------------------------------ item 7


def test_item7_region_order_is_a_setting(tmp_path, capsys):
    folder = tmp_path / "nn"
    for i in range(2):
        write_nnunet_case(folder, f"c{i}", nested_region_probs(i))
    out = tmp_path / "o"
    first = ["predict", str(folder), "-o", str(out), "--quiet", "--region-probs", "--regions",
             '{"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}']
    assert main(first) == 0
    swapped = ["predict", str(folder), "-o", str(out), "--quiet", "--region-probs", "--regions",
               '{"tc": [2, 3], "wt": [1, 2, 3], "et": [3]}']
    capsys.readouterr()
    assert main(swapped) == 2  # the channels now mean other regions: never "up to date"
    err = capsys.readouterr().err
    assert "other settings" in err and "skipped" not in err
    assert main([*swapped, "--overwrite"]) == 0
    q = nested_region_probs(0)
    want = rankseg(q[None], regions={"tc": [2, 3], "wt": [1, 2, 3], "et": [3]}, region_probs=True,
                   pruning_prob="auto")[0]
    np.testing.assert_array_equal(rio.load_labels(out / "c0.nii.gz").labels, want)


# ------------------------------------------------------------------------------------------------ item 8


def test_item8_regions_multilabel_from_class_probabilities(class_cases, tmp_path, capsys):
    folder, data = class_cases
    out = tmp_path / "o"
    rc = main(["predict", str(folder), "-o", str(out), "--quiet", "--regions", json.dumps(LITS), "--output-mode",
               "multilabel"])
    assert rc == 0, capsys.readouterr().err
    probs, _ = data["c0"]
    want = rankseg(probs[None], regions=LITS, output_mode="multilabel", pruning_prob="auto")[0]
    got, _ = rio.read_mask(out / "c0.nii.gz", reader="sitk")  # SimpleITK wrote it: a vector image
    np.testing.assert_array_equal(np.moveaxis(got, -1, 0), want.astype(np.uint8))
    record = json.loads((out / "c0.nii.gz.rankseg.json").read_text())
    assert record["expected_score"]["structures"] == ["liver", "tumour"]
    masks = torch.from_numpy(np.asarray(want))[None]
    argmax = torch.from_numpy(probs).argmax(0)[None]
    for method, decision in (("rankseg", masks), ("argmax", argmax)):
        est = expected_score(torch.from_numpy(probs)[None], decision, regions=LITS)[0]
        np.testing.assert_allclose(record["expected_score"][method], est.numpy(), rtol=1e-12)


# ------------------------------------------------------------------------------------------------ item 9


@pytest.mark.parametrize("extra,match", [
    (["--regions", json.dumps(LITS), "--sigmoid"], "--sigmoid with --regions"),
    (["--regions", '{"wt": [1, 2, 3], "tc": [2, 3]}', "--region-probs"], "--regions-class-order"),
    (["--regions", "null"], "--regions: null"),
    (["--regions", '{"liver": [1, true]}'], "integers"),
    (["--regions", '{"liver": ["1", "2"], "tumour": ["2"]}'], "integers"),
    (["--regions", '{"liver": [1.0, 2], "tumour": [2]}'], "integers"),
    (["--regions", '{"liver": [1, 10000000000]}'], "outside [0, 65535]"),
    (["--regions", "[" * 200000 + "]" * 200000], "nested too deeply"),
    (["--regions-class-order", "1.5", "2", "--regions", json.dumps(LITS)], "invalid int value"),
])
def test_item9_region_usage_errors_before_any_case(class_cases, tmp_path, monkeypatch, capsys, extra, match):
    folder, _ = class_cases
    calls = _count(monkeypatch, "_predict_case")
    rc = main(["predict", str(folder), "-o", str(tmp_path / "o"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err, err
    assert calls == [] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("doc,match", [
    ({"labels": {"background": 0, "liver": [1, 2], "tumour": 2}, "regions_class_order": [1.0, 2]}, "integers"),
    ({"labels": {"background": 0, "liver": [1, 2], "tumour": 2}, "regions_class_order": [True, 2]}, "integers"),
    ({"labels": {"background": 0, "liver": 1.0}}, "integers"),
    ({"labels": {"background": 0, "liver": 10**10}}, "outside [0, 65535]"),
])
def test_item9_dataset_json_follows_the_same_label_rule(class_cases, tmp_path, capsys, doc, match):
    folder, _ = class_cases
    (tmp_path / "ds.json").write_text(json.dumps(doc))
    rc = main(["predict", str(folder), "-o", str(tmp_path / "o"), "--quiet", "--dataset-json",
               str(tmp_path / "ds.json")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err, err


def test_item9_deep_or_bom_dataset_json(class_cases, tmp_path, capsys):
    folder, _ = class_cases
    deep = tmp_path / "deep.json"
    deep.write_text('{"labels": ' + "[" * 200000 + "]" * 200000 + "}")
    assert main(["predict", str(folder), "-o", str(tmp_path / "o"), "--quiet", "--dataset-json", str(deep)]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"labels": {"background": 0, "liver": 1, "tumour": 2}}).encode())
    assert rio.read_dataset_json(bom).class_names == {0: "background", 1: "liver", 2: "tumour"}


@pytest.mark.parametrize("extra,match", [
    (["--regions", json.dumps(LITS), "--classes", "1"], "drop --classes"),
    (["--regions", json.dumps(LITS), "--output-mode", "multilabel"], "drop --output-mode multilabel"),
    (["--classes", "7"], "--classes 7"),
    (["--lesion-wise", "5"], "--lesion-wise 5"),
])
def test_item9_evaluate_usage_errors(eval_dirs, tmp_path, monkeypatch, capsys, extra, match):
    probs_dir, labels_dir = eval_dirs
    calls = _count(monkeypatch, "_evaluate_case")
    rc = main(["evaluate", "--probs", str(probs_dir), "--labels", str(labels_dir), "-o", str(tmp_path / "r"),
               "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1, err
    assert len(calls) <= 1  # at most the first case (it reads the channel count)
    assert not (tmp_path / "r").exists()


def test_item9_fractional_class_order_in_the_api():
    with pytest.raises(ValueError, match="integers"):
        RankSEGOptions(regions=[[1, 2], [2]], regions_class_order=[1.5, 2])
    with pytest.raises(ValueError, match="integers"):
        RankSEGOptions(regions=[[1, True]])


# ------------------------------------------------------------------------------------------------ item 10


def test_item10_expected_score_labels_outside_the_classes_belong_to_none():
    probs = torch.softmax(torch.randn(1, 3, 40, generator=torch.Generator().manual_seed(0)) * 3, 1)
    labels = probs.argmax(1)
    stray = labels.clone()
    stray[0, :5] = 7  # a void label
    cleared = labels.clone()
    cleared[0, :5] = 0
    got = expected_score(probs, stray, regions=LITS)
    torch.testing.assert_close(got, expected_score(probs, cleared, regions=LITS))


def test_item10_single_channel_label_map_is_the_foreground():
    p = torch.tensor([[[0.9, 0.8, 0.6, 0.2, 0.1]]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    torch.testing.assert_close(expected_score(p, mask), expected_score(p, mask[:, None]))


def test_item10_softmax_on_probabilities_is_refused_like_the_cli():
    probs = torch.softmax(torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1)), 0)
    with pytest.raises(ValueError, match="force_activation"):
        RankSEG(softmax=True)(probs)
    with pytest.raises(ValueError, match="force_activation"):
        RankSEG(sigmoid=True, output_mode="multilabel")(probs)
    out = RankSEG(softmax=True, force_activation=True)(probs)
    assert out.shape == (1, 6, 6)
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(2)) * 4
    assert RankSEG(softmax=True)(logits).shape == (1, 6, 6)


# ------------------------------------------------------------------------------------------------ item 11


def test_item11_a_report_is_replaced_whole_or_not_at_all(eval_dirs, tmp_path, monkeypatch, capsys):
    probs_dir, labels_dir = eval_dirs
    report = tmp_path / "r"
    assert main(["evaluate", "--probs", str(probs_dir), "--labels", str(labels_dir), "-o", str(report), "--quiet"]) == 0
    before = {name: (report / name).read_bytes() for name in files_in(report)}
    assert set(before) == {"differences.png", "evaluation.json", "expected.png", "per_case.csv", "summary.csv"}
    real = ev.atomic_write

    def full(path, *args, **kwargs):
        if "summary" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ev, "atomic_write", full)
    assert main(["evaluate", "--probs", str(probs_dir), "--labels", str(labels_dir), "-o", str(report), "--quiet",
                 "--metric", "iou"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (report / name).read_bytes() for name in files_in(report)} == before
    monkeypatch.setattr(ev, "atomic_write", real)
    # a report without plots replaces one with plots: nothing of the old one stays
    masks = tmp_path / "masks"
    shutil.copytree(labels_dir, masks)
    assert main(["evaluate", "--pred", str(masks), "--labels", str(labels_dir), "-o", str(report), "--quiet"]) == 0
    assert files_in(report) == ["evaluation.json", "per_case.csv", "summary.csv"]


# ------------------------------------------------------------------------------------------------ item 12


def _part(probs_dir, labels_dir, out, k, n=2):
    return main(["evaluate", "--probs", str(probs_dir), "--labels", str(labels_dir), "-o", str(out), "--quiet",
                 "--part-id", str(k), "--num-parts", str(n)])


def test_item12_merge_checks_case_lists_inputs_and_record_shapes(eval_dirs, tmp_path, capsys):
    probs_dir, labels_dir = eval_dirs
    # parts over different case lists
    parts = tmp_path / "parts"
    assert _part(probs_dir, labels_dir, parts, 0) == 0
    fewer = tmp_path / "fewer"
    shutil.copytree(probs_dir, fewer)
    (fewer / "d.mha").unlink()
    assert _part(fewer, labels_dir, parts, 1) == 0
    record = json.loads((parts / "evaluation.part-0-of-2.json").read_text())
    assert record["all_cases"] == ["a", "b", "c", "d"] and set(record["inputs"]) == {"a", "c"}
    capsys.readouterr()
    assert main(["merge-reports", str(parts)]) == 2
    assert "case list" in capsys.readouterr().err
    # parts from two probability folders (two models) with the same case names
    other = tmp_path / "other"
    shutil.copytree(probs_dir, other)
    probs, _, _ = make_case(seed=999, shape=(12, 11, 10))
    write_sitk_probs(other / "b.mha", probs)
    two = tmp_path / "two"
    assert _part(probs_dir, labels_dir, two, 0) == 0 and _part(other, labels_dir, two, 1) == 0
    capsys.readouterr()
    assert main(["merge-reports", str(two)]) == 2
    assert "input" in capsys.readouterr().err
    # the same inputs merge
    good = tmp_path / "good"
    assert _part(probs_dir, labels_dir, good, 0) == 0 and _part(probs_dir, labels_dir, good, 1) == 0
    assert main(["merge-reports", str(good)]) == 0
    # malformed records: exit 2 naming the part
    for key, value in (("files", "per_case.part-1-of-2.csv"), ("methods", None), ("cases", 3)):
        bad = tmp_path / f"bad_{key}"
        shutil.copytree(good, bad)
        path = bad / "evaluation.part-1-of-2.json"
        rec = json.loads(path.read_text())
        rec[key] = value
        path.write_text(json.dumps(rec))
        capsys.readouterr()
        assert main(["merge-reports", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "evaluation.part-1-of-2.json" in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------ item 13


def test_item13_the_format_belongs_to_the_claim(class_cases, tmp_path, monkeypatch, capsys):
    folder, _ = class_cases
    out = tmp_path / "o"
    real = cli._prepare
    nested = []

    def prepare(volume, args, options):  # while the mha run holds c0, a nii.gz run starts in the same folder
        if args.format == "mha" and not nested:
            nested.append(main(["predict", str(folder), "-o", str(out), "--quiet", "--format", "nii.gz"]))
        return real(volume, args, options)

    monkeypatch.setattr(cli, "_prepare", prepare)
    assert main(["predict", str(folder), "-o", str(out), "--quiet", "--format", "mha"]) == 0
    assert nested == [0]
    assert "left to another run" not in capsys.readouterr().err
    names = files_in(out)
    for case in ("c0", "c1"):
        assert f"{case}.mha" in names and f"{case}.nii.gz" in names


# ------------------------------------------------------------------------------------------------ item 14


def test_item14_a_run_refused_on_a_full_disk_leaves_nothing(class_cases, tmp_path, monkeypatch, capsys):
    from rankseg_monai.app import runlock

    folder, _ = class_cases

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlock, "atomic_write", full)
    assert main(["predict", str(folder), "-o", str(tmp_path / "o"), "--quiet"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("x")
    assert main(["predict", str(folder), "-o", str(tmp_path / "kept"), "--quiet"]) == 2
    assert files_in(tmp_path / "kept") == ["mine.txt"]


def test_item14_a_record_path_that_is_a_folder_fails_before_any_case(class_cases, tmp_path, monkeypatch, capsys):
    folder, _ = class_cases
    out = tmp_path / "o"
    (out / "c0.nii.gz.rankseg.json").mkdir(parents=True)
    calls = _count(monkeypatch, "_predict_case")
    assert main(["predict", str(folder), "-o", str(out), "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "c0.nii.gz.rankseg.json" in err and "folder" in err and calls == []


# ------------------------------------------------------------------------------------------------ item 15


def _peak_while(fn):
    tracemalloc.start()
    try:
        with pytest.raises(rio.VolumeError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1], str(info.value)
    finally:
        tracemalloc.stop()


def _bound(payload):  # memory bounded by the file's own size: 16 bytes per file byte plus 1 MiB
    return 16 * len(payload) + 2**20


def _object_array(n):  # numpy.ndarray((n,), 'O') called directly: 51 bytes for n = 4e8
    return (b"\x80\x02cnumpy\nndarray\nJ" + struct.pack("<i", n) + b"\x85X\x01\x00\x00\x00O\x86R.")


def _memo(index):  # an empty list put into memo slot `index`
    return b"\x80\x02]r" + struct.pack("<I", index) + b"."


def _list_copies(length, copies):  # L = [0] * length, then [list(L), list(L), ...]
    body = b"\x80\x02]q\x00(" + b"K\x00" * length + b"ec__builtin__\nlist\nq\x01]("
    body += b"h\x01h\x00\x85R" * copies
    return body + b"e."


@pytest.mark.parametrize("payload", [_object_array(4 * 10**7), _memo(2**24), _list_copies(100_000, 100)],
                         ids=["object-array", "memo-index", "list-copies"])
def test_item15_a_tiny_pkl_cannot_take_memory(tmp_path, payload):
    path = tmp_path / "case.pkl"
    path.write_bytes(payload)
    peak, message = _peak_while(lambda: rio.load_nnunet_properties(path))
    assert peak < _bound(payload), f"{peak / 2**20:.1f} MiB for a {len(payload)}-byte file"
    assert "case.pkl" in message


def test_item15_the_malicious_sizes_of_the_issue_fail_fast(tmp_path):
    assert len(_object_array(4 * 10**8)) <= 51
    for payload in (_object_array(4 * 10**8), _memo(2**28), _list_copies(250_000, 400)):
        path = tmp_path / "case.pkl"
        path.write_bytes(payload)
        peak, _ = _peak_while(lambda p=path: rio.load_nnunet_properties(p))
        assert peak < _bound(payload), f"{peak / 2**20:.1f} MiB for a {len(payload)}-byte file"


def test_item15_real_nnunet_properties_still_load(tmp_path):
    write_nnunet_case(tmp_path, "a", make_case(seed=1, shape=(6, 5, 4))[0], nibabel_affine=np.diag([0.8, 0.8, 2, 1]))
    props = rio.load_nnunet_properties(tmp_path / "a.pkl")
    np.testing.assert_array_equal(props["nibabel_stuff"]["original_affine"], np.diag([0.8, 0.8, 2, 1]))
    assert props["spacing"] and props["shape_before_cropping"]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_item15_every_pickle_protocol_of_plain_data_loads(tmp_path, protocol):
    from collections import OrderedDict

    obj = {"a": np.eye(4), "b": [1.5, (2, 3)], "c": OrderedDict(x=1), "s": {1, 2}, "f": np.float32(2.5),
           "o": np.array([None, "x"], dtype=object), "raw": b"\x00\xff", "i": np.arange(1000, dtype=np.int16)}
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = rio.load_nnunet_properties(path)
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            assert out[key].dtype == value.dtype and np.array_equal(out[key], value)
        else:
            assert out[key] == value and type(out[key]) is type(value)
