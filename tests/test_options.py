"""RankSEGOptions (rankseg_monai/options.py): every option is validated once, at construction, with a message that
names the fix; the same bad values fail when RankSEG, RankSEGd, RankSEGHandler and rankseg() are built or called,
before any work; the checks that need the class count; replace(), to_dict(); and the defaults of every entry."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch
from generators import softmax_probs

import rankseg_monai.functional as functional_mod
import rankseg_monai.transforms as transforms_mod
from rankseg_monai import RankSEG, RankSEGd, RankSEGHandler
from rankseg_monai.functional import rankseg
from rankseg_monai.guard import Guard
from rankseg_monai.options import DEFAULT_PRUNING_PROB, PARITY_PRUNING_PROB, RankSEGOptions

_AUTO = r"'auto', 'auto-independent', 'auto-correlated'"

#: (options, exception, what the message must say: the fix)
BAD = [
    (dict(metric="hd95"), ValueError, r"unknown metric 'hd95': use one of 'dice', 'iou', 'acc'"),
    (dict(metric=3), TypeError, r"metric must be a string, one of 'dice'"),
    (dict(smooth=float("nan")), ValueError, r"smooth must be finite"),
    (dict(smooth=-1.0), ValueError, r"smooth must be >= 0"),
    (dict(smooth="1"), TypeError, r"smooth must be a real number"),
    (dict(output_mode="overlap"), ValueError, r"unknown output_mode 'overlap': use one of 'multiclass', 'multilabel'"),
    (dict(solver="magic"), ValueError, r"unknown solver 'magic': use one of 'rma'"),
    (dict(solver="ba"), ValueError, r"not supported for metric='dice' with output_mode='multiclass'; supported "
                                    r"solvers: RMA"),
    (dict(solver="exact"), ValueError, r"supported solvers: RMA"),
    (dict(metric="iou", solver="trna", output_mode="multilabel"), ValueError, r"supported solvers: RMA$"),
    (dict(metric="acc"), ValueError, r"metric='acc' with output_mode='multiclass'; supported solvers: argmax"),
    (dict(metric="dice", solver="argmax"), ValueError, r"supported solvers: RMA"),
    (dict(pruning_prob=1.5), ValueError, r"pruning_prob must lie in \[0, 1\] \(or be one of " + _AUTO),
    (dict(pruning_prob=-0.1), ValueError, r"pruning_prob must lie in \[0, 1\]"),
    (dict(pruning_prob="yes"), ValueError, r"pruning_prob 'yes': use a number in \[0, 1\] or one of " + _AUTO),
    (dict(pruning_prob=True), TypeError, r"pruning_prob must be a real number, got bool"),
    (dict(pruning_prob=None), TypeError, r"pruning_prob must be a real number"),
    (dict(pruning_prob=float("nan")), ValueError, r"pruning_prob must be finite"),
    (dict(unassigned_policy="drop"), ValueError, r"unknown unassigned_policy 'drop': use one of 'max_score', 'void'"),
    (dict(unassigned_policy="void", output_mode="multilabel"), ValueError,
     r"unassigned_policy='void' only applies to output_mode='multiclass'"),
    (dict(void_index=7), ValueError, r"void_index requires output_mode='multiclass' and unassigned_policy='void'"),
    (dict(unassigned_policy="void", void_index=1.5), TypeError, r"void_index must be an int"),
    (dict(unassigned_policy="void", void_index=True), TypeError, r"void_index must be an int, got bool"),
    (dict(unassigned_policy="void", void_index=2**64), ValueError, r"void_index must fit in int64"),
    (dict(eps=0.0), ValueError, r"eps must lie strictly between 0 and 1"),
    (dict(eps=1.0), ValueError, r"eps must lie strictly between 0 and 1"),
    (dict(eps=float("nan")), ValueError, r"eps must be finite"),
    (dict(clamp=1), TypeError, r"clamp must be True or False, got 1"),
    (dict(clamp="yes"), TypeError, r"clamp must be True or False"),
    (dict(device="cdua"), ValueError, r"device='cdua' is not a torch device: use 'cpu', 'cuda' or 'cuda:N'"),
    (dict(device="meta"), ValueError, r"device='meta' holds no values to decide on: use 'cpu' or 'cuda'"),
    (dict(device=3), TypeError, r"device must be None, a string such as 'cpu' or 'cuda:0', or a torch.device"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int or None"),
    (dict(chunk_size=-5), ValueError, r"chunk_size must be a positive int or None"),
    (dict(chunk_size=1.5), TypeError, r"chunk_size must be an int"),
    (dict(guard="bogus"), TypeError, r"guard must be None/False \(off\), True \(defaults\), a "
                                     r"rankseg_monai.guard.Guard or a dict of its settings"),
    (dict(guard={"max_fog": 1}), ValueError, r"unknown guard settings \['max_fog'\]; known: \['band', 'max_growth', "
                                             r"'max_uncertain'\]"),
    (dict(guard={"band": (0.6, 0.4)}), ValueError, r"Guard.band must be \(low, high\) with 0 <= low < high <= 1"),
    (dict(label_dtype="nope"), ValueError, r"label_dtype='nope' is not a dtype: use e.g. torch.int64"),
    (dict(label_dtype=torch.bool), ValueError, r"label_dtype=torch.bool cannot hold class labels: use an integer "
                                               r"dtype"),
    (dict(label_dtype=torch.complex64), ValueError, r"cannot hold class labels: use an integer dtype"),
    (dict(softmax=True, sigmoid=True), ValueError, r"softmax=True and sigmoid=True are mutually exclusive: use "
                                                   r"softmax for mutually exclusive classes"),
    (dict(temperature=2.0), ValueError, r"set softmax=True \(or sigmoid=True\) together with temperature, or drop "
                                        r"temperature"),
    (dict(softmax=True, temperature=0.0), ValueError, r"temperature values must be finite and > 0"),
    (dict(softmax=True, temperature=[1.0, -2.0]), ValueError, r"temperature values must be finite and > 0"),
    (dict(softmax=True, temperature="hot"), TypeError, r"temperature must be a positive number"),
    (dict(softmax=True, temperature=[]), ValueError, r"temperature is an empty sequence: give one positive value"),
    (dict(softmax=1), TypeError, r"softmax must be True or False"),
    (dict(sigmoid="no"), TypeError, r"sigmoid must be True or False"),
    (dict(regions=[[1, 2], [2, 3]]), ValueError, r"overlap without one containing the other"),
    (dict(regions="liver"), TypeError, r"regions must be a mapping \{name: labels\} or a list of label lists"),
    (dict(regions=[[1, 2], [2]], regions_class_order=[2, 1]), ValueError, r"which is not one of its own labels"),
    (dict(regions_class_order=[1, 2]), ValueError, r"regions_class_order needs regions"),
    (dict(region_probs=True), ValueError, r"region_probs=True needs regions"),
    (dict(regions=[[1], [2]], region_probs="yes"), TypeError, r"region_probs must be True or False"),
    (dict(calibration=3), TypeError, r"calibration must be None, a rankseg_monai.calibrator.Calibration, a path"),
    (dict(calibration={"format": "x"}), ValueError, r"is not a calibration file .* rankseg-monai calibrate"),
    (dict(calibration={"format": "rankseg-monai/calibration", "version": 1, "method": "temperature",
                       "input_kind": "region-probabilities", "temperature": [0.5], "channels": ["a", "b"]}),
     ValueError, r"fitted on region-probabilities \(sigmoid\) but these inputs are class-probabilities: calibrate "
                 r"with the same"),
]
if not torch.cuda.is_available():
    BAD.append((dict(device="cuda"), ValueError, r"torch sees no CUDA device: use device='cpu'"))
    BAD.append((dict(device="cuda:1"), ValueError, r"torch sees no CUDA device: use device='cpu'"))

#: the options the MONAI transforms and the handler take (they have no eps / chunk_size / label_dtype)
TRANSFORM_OPTIONS = {"metric", "solver", "output_mode", "smooth", "pruning_prob", "unassigned_policy", "void_index",
                     "softmax", "sigmoid", "temperature", "clamp", "device", "guard", "regions", "regions_class_order",
                     "region_probs", "calibration"}
#: the options of rankseg() (the activation belongs to the transforms and the CLI)
FUNCTIONAL_OPTIONS = set(inspect.signature(rankseg).parameters) - {"probs"}


def _ids(bad):
    return [",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _, _ in bad]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=_ids(BAD))
def test_bad_option_fails_at_construction_naming_the_fix(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RankSEGOptions(**kwargs)


_BAD_T = [b for b in BAD if set(b[0]) <= TRANSFORM_OPTIONS]


@pytest.mark.parametrize("kwargs,exc,match", _BAD_T, ids=_ids(_BAD_T))
def test_the_same_bad_values_fail_when_transforms_and_handler_are_built(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RankSEG(**kwargs)
    with pytest.raises(exc, match=match):
        RankSEGd(keys=["pred", "other"], **kwargs)
    with pytest.raises(exc, match=match):
        RankSEGHandler(keys="pred", **kwargs)


_BAD_F = [b for b in BAD if set(b[0]) <= FUNCTIONAL_OPTIONS]


@pytest.mark.parametrize("kwargs,exc,match", _BAD_F, ids=_ids(_BAD_F))
def test_the_same_bad_values_fail_in_rankseg_before_the_input_is_read(kwargs, exc, match):
    """The option error comes first even when the input itself is no array at all."""
    with pytest.raises(exc, match=match):
        rankseg(softmax_probs((1, 3, 4, 4)), **kwargs)
    with pytest.raises(exc, match=match):
        rankseg("not an array", **kwargs)


def test_every_option_is_covered_by_a_bad_value():
    fields = {f.name for f in dataclasses.fields(RankSEGOptions)}
    covered = set().union(*(kw for kw, _, _ in BAD))
    assert fields <= covered, fields - covered
    assert {"eps", "chunk_size", "label_dtype"} <= covered - TRANSFORM_OPTIONS


def test_construction_runs_no_solver(monkeypatch):
    """Building the options, the transforms and the handler decides nothing (the solver entry is never called);
    calling them does."""

    def boom(*args, **kwargs):
        raise AssertionError("a decision ran at construction")

    for target in (functional_mod, transforms_mod):
        monkeypatch.setattr(target, "decide", boom)
    monkeypatch.setattr(functional_mod, "_decide", boom)
    kwargs = dict(metric="iou", smooth=1.0, pruning_prob="auto-independent", unassigned_policy="void",
                  void_index=300, softmax=True, temperature=[1.0, 2.0, 0.5], clamp=True, guard={"max_uncertain": 0.7})
    RankSEGOptions(**kwargs, eps=1e-3, chunk_size=4096, label_dtype=torch.int16)
    t = RankSEG(**kwargs, to_onehot=None, dtype=torch.int16, spatial_dims=2)
    RankSEGd(keys=["a", "b"], **kwargs)
    RankSEGHandler(keys="pred", **kwargs)
    with pytest.raises(AssertionError, match="a decision ran"):
        t(torch.full((3, 4, 4), -1.0))  # the patch is in effect where the transforms decide (logits: not in [0, 1])


# ------------------------------------------------------------------------------------------------ normalised


def test_values_are_normalised():
    o = RankSEGOptions(metric=" Jaccard ", solver="RMA", output_mode="MultiClass", smooth=1, pruning_prob=" AUTO ",
                       unassigned_policy="VOID", void_index=np.int64(300), eps=np.float32(0.5), clamp=np.bool_(True),
                       device="cpu", guard="on", label_dtype="uint16", softmax=True, temperature=np.array([2, 3]))
    assert (o.metric, o.solver, o.output_mode, o.smooth, o.pruning_prob) == ("iou", "rma", "multiclass", 1.0, "auto")
    assert o.unassigned_policy == "void" and o.void_index == 300 and type(o.void_index) is int
    assert o.eps == 0.5 and o.clamp is True and o.device == torch.device("cpu")
    assert o.guard == Guard() and o.label_dtype == torch.uint16 and o.temperature == (2.0, 3.0)
    assert o.activation == "softmax" and o.auto_pruning
    assert RankSEGOptions(metric="accuracy", solver="argmax").metric == "acc"
    assert RankSEGOptions(pruning_prob="0.25").pruning_prob == 0.25 and not RankSEGOptions(pruning_prob=0).auto_pruning
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.metric = "dice"


# ------------------------------------------------------------------------------------------------ check_classes


def test_check_classes():
    RankSEGOptions().check_classes(2)
    with pytest.raises(ValueError, match=r"void_index=1 is a class index; choose a value outside \[0, 3\)"):
        RankSEGOptions(unassigned_policy="void", void_index=1).check_classes(3)
    RankSEGOptions(unassigned_policy="void", void_index=3).check_classes(3)
    RankSEGOptions(unassigned_policy="void", void_index=-1).check_classes(3)
    with pytest.raises(ValueError, match=r"single-channel input cannot give a multiclass label map: use "
                                         r"output_mode='multilabel'"):
        RankSEGOptions().check_classes(1)
    RankSEGOptions(output_mode="multilabel").check_classes(1)
    with pytest.raises(ValueError, match=r"single-channel input; supported solvers: TR"):
        RankSEGOptions(metric="acc", solver="argmax", output_mode="multilabel").check_classes(1)
    # the label dtype must hold every label (C - 1, and void_index under 'void')
    RankSEGOptions(label_dtype=torch.uint8).check_classes(256)
    with pytest.raises(ValueError, match=r"label_dtype=torch.uint8 cannot hold the label 256 exactly: use torch.int64"):
        RankSEGOptions(label_dtype=torch.uint8).check_classes(257)
    with pytest.raises(ValueError, match=r"cannot hold the label 255 exactly"):
        RankSEGOptions(label_dtype=torch.int8, unassigned_policy="void").check_classes(3)
    with pytest.raises(ValueError, match=r"cannot hold the label -1 exactly"):
        RankSEGOptions(label_dtype=torch.uint8, unassigned_policy="void", void_index=-1).check_classes(3)
    with pytest.raises(ValueError, match=r"label_dtype=torch.bfloat16 cannot hold the label 257 exactly"):
        RankSEGOptions(label_dtype=torch.bfloat16).check_classes(258)
    RankSEGOptions(label_dtype=torch.bfloat16).check_classes(257)  # bfloat16 holds the integers up to 256
    RankSEGOptions(label_dtype=torch.float16).check_classes(2049)  # float16 up to 2048
    with pytest.raises(ValueError, match=r"cannot hold the label 2049 exactly"):
        RankSEGOptions(label_dtype=torch.float16).check_classes(2050)
    # accuracy's argmax never writes void_index: only C - 1 must fit
    RankSEGOptions(metric="acc", solver="argmax", label_dtype=torch.uint8).check_classes(3)


# ------------------------------------------------------------------------------------------------ replace/to_dict


def test_replace_validates_again():
    o = RankSEGOptions(metric="iou", smooth=1.0)
    assert o.replace() is o
    r = o.replace(metric=" DICE ", output_mode="multilabel", solver="exact")
    assert (r.metric, r.output_mode, r.solver, r.smooth) == ("dice", "multilabel", "exact", 1.0)
    assert o.metric == "iou"  # the original is unchanged
    for kwargs, exc, match in BAD:
        with pytest.raises(exc, match=match):
            RankSEGOptions().replace(**kwargs)
    with pytest.raises(ValueError, match="supported solvers: RMA"):
        r.replace(output_mode="multiclass")  # exact is multilabel-only: the combination is checked again


def test_to_dict_is_json_serialisable():
    o = RankSEGOptions(metric="iou", smooth=0.5, pruning_prob="auto-correlated", unassigned_policy="void",
                       void_index=-1, device="cpu", guard=Guard(max_uncertain=0.25, band=(0.1, 0.9)),
                       label_dtype=torch.int16, sigmoid=True, temperature=[1.5, 2.0], chunk_size=1000)
    d = o.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {"metric": "iou", "smooth": 0.5, "output_mode": "multiclass", "solver": "rma",
                 "pruning_prob": "auto-correlated", "unassigned_policy": "void", "void_index": -1, "eps": 1e-4,
                 "clamp": False, "device": "cpu", "chunk_size": 1000,
                 "guard": {"max_uncertain": 0.25, "max_growth": 1.0, "band": [0.1, 0.9]},
                 "label_dtype": "torch.int16", "softmax": False, "sigmoid": True, "temperature": [1.5, 2.0],
                 "regions": None, "regions_class_order": None, "region_probs": False,
                 "calibration": None}
    assert RankSEGOptions(**d) == o  # a settings file reads back into the same options
    lits = RankSEGOptions(regions={"liver": [1, 2], "tumour": 2}).to_dict()
    assert lits["regions"] == {"liver": [1, 2], "tumour": [2]} and RankSEGOptions(**lits).regions.names == (
        "liver", "tumour")
    plain = RankSEGOptions().to_dict()
    assert json.loads(json.dumps(plain)) == plain and plain["guard"] is None and plain["device"] is None


# ------------------------------------------------------------------------------------------------ defaults


def _default(fn, name="pruning_prob"):
    return inspect.signature(fn).parameters[name].default


def test_default_pruning_is_auto_everywhere_but_the_functional_entry(monkeypatch):
    from rankseg_monai.app import evaluation
    from rankseg_monai.app.cli import build_parser
    from rankseg_monai.calibration import report

    assert DEFAULT_PRUNING_PROB == "auto" and PARITY_PRUNING_PROB == 0.5
    assert _default(rankseg) == 0.5  # rankseg 0.0.8's default, for parity
    assert _default(RankSEGOptions) == "auto"
    assert RankSEGOptions().pruning_prob == "auto"
    assert _default(RankSEG.__init__) == "auto" and RankSEG().pruning_prob == "auto"
    assert _default(RankSEGd.__init__) == "auto"
    assert all(t.pruning_prob == "auto" for t in RankSEGd(keys=["a", "b"]).rankseg)
    assert RankSEGHandler().transform.rankseg[0].pruning_prob == "auto"
    parser = build_parser()
    assert parser.parse_args(["predict", "in", "-o", "out"]).pruning_prob == "auto"
    assert parser.parse_args(["evaluate", "--probs", "p", "--labels", "l", "-o", "o"]).pruning_prob == "auto"

    # the evaluation and the calibration report decide with the default options: look at what reaches decide
    seen = []

    def spy(module):
        real = module.decide

        def wrapped(*args, **kwargs):
            options = kwargs.get("options", args[2] if module is evaluation and len(args) > 2 else
                                 args[1] if module is report and len(args) > 1 else None)
            seen.append((module.__name__, options.pruning_prob))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "decide", wrapped)

    spy(evaluation)
    spy(report)
    probs = softmax_probs((3, 6, 5, 4), seed=1, dim=0).numpy()
    label = probs.argmax(0)
    evaluation.compare_case(probs, label, (1.0, 1.0, 1.0))
    report.calibration_report([torch.from_numpy(probs)], [torch.from_numpy(label)[None]])
    assert {m for m, _ in seen} == {evaluation.__name__, report.__name__}
    assert {p for _, p in seen} == {"auto"}
