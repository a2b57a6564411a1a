"""Every code block of the README and the docs runs, as written.

* ``python`` blocks run each in a fresh namespace (a reader copies one block, not the page: a block imports and
  defines what it uses), in order, in one fresh folder per document (files an earlier block wrote are there); a
  block that starts with ``>>>`` runs as a doctest.
* ``bash`` blocks run with ``bash -euo pipefail`` in that folder, with the test's virtual environment first on
  ``PATH``.
* ``json`` blocks must parse.
* ``text`` blocks are output or layout, not code; an untagged fence is an error (tag it).

Markers, an HTML comment right above a fence (invisible on GitHub):

* ``<!-- doc-test: files=NAME -->``: before the block, :data:`FILES` ``[NAME]`` writes input files into the folder
  (what a user would have on disk: probability and label volumes).  Python variables are never injected: a block
  defines what it uses.
* ``<!-- doc-test: skip: REASON -->``: not run; the reason is mandatory and the skipped blocks are listed by
  :func:`test_skipped_blocks_have_reasons`.
* ``<!-- doc-test: slow -->``: a longer block (still run in CI).
* ``<!-- doc-test: file=NAME -->``: the block is a file the following blocks use (e.g. a script that ``torchrun``
  runs): it is written to ``NAME`` in the folder instead of being run.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "dev").glob("*.md")),
             "bundle/README.md", "tutorials/README.md", "bundle/rankseg_demo/docs/README.md"]
_FENCE = re.compile(r"((?:^[ \t]*<!--\s*doc-test:[^\n]*-->\s*\n)*)^([ \t]*)```([\w+-]*)[^\n]*\n(.*?)^\2```[ \t]*$",
                    re.S | re.M)
_MARK = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->")
LANGUAGES = {"python", "bash", "json", "text"}


@dataclass
class Block:
    document: str
    line: int
    lang: str
    code: str
    marks: list[str] = field(default_factory=list)

    @property
    def skip_reason(self) -> str | None:
        for m in self.marks:
            if m.startswith("skip"):
                return m[4:].lstrip(": ").strip()
        return None

    @property
    def writes(self) -> str | None:
        for m in self.marks:
            if m.startswith("file="):
                return m[5:].strip()
        return None

    @property
    def files(self) -> list[str]:
        return [name for m in self.marks if m.startswith("files=") for name in m[6:].split(",")]

    def __str__(self) -> str:
        return f"{self.document}:{self.line} [{self.lang}]"


def blocks(document: str) -> list[Block]:
    text = (ROOT / document).read_text(encoding="utf-8")
    out = []
    for m in _FENCE.finditer(text):
        marks = _MARK.findall(m.group(1))
        line = text[: m.start(3)].count("\n") + 1
        code = textwrap.dedent(m.group(4)) if m.group(2) else m.group(4)  # a fence indented in a list item
        out.append(Block(document, line, m.group(3), code, marks))
    return out


# ------------------------------------------------------------------------------------------- input files
def _case_volumes(seed: int, shape=(20, 18, 12), num_classes: int = 3):
    """Softmax probabilities (C, x, y, z) float32 with a blob per class and the matching label map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    logits = [np.zeros(shape)]
    for c in range(1, num_classes):
        centre = rng.uniform(-0.4, 0.4, 3)[:, None, None, None]
        r = np.sqrt(((grid - centre) ** 2).sum(0))
        logits.append(6.0 * (0.25 + 0.1 * c - r) + rng.normal(0, 1.0, shape))
    z = np.stack(logits)
    probs = np.exp(z - z.max(0))
    probs = (probs / probs.sum(0)).astype(np.float32)
    label = np.argmax(z + rng.normal(0, 1.5, z.shape), 0).astype(np.uint8)
    return probs, label


def _write_nifti_folders(folder: Path) -> None:
    """``probs/`` (4D NIfTI, X, Y, Z, C as MONAI's SaveImage writes) and ``labels/`` (3D label maps), 2 cases."""
    import nibabel as nib

    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for sub in ("probs", "labels", "logits"):
        (folder / sub).mkdir(exist_ok=True)
    for i in range(2):
        probs, label = _case_volumes(i)
        nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), affine), folder / "probs" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(np.moveaxis(np.log(probs + 1e-6), 0, -1), affine),
                 folder / "logits" / f"case_{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"case_{i:03d}.nii.gz")


def _copy_bundle(folder: Path) -> None:
    """A copy of the repository's ``bundle/`` folder (blocks that run "from the repository root")."""
    import shutil

    if not (folder / "bundle").exists():
        def outputs(src: str, names: list[str]) -> list[str]:  # what earlier runs wrote into the bundle folder
            return [n for n in names if Path(src).name == "rankseg_demo" and n in ("data", "eval", "models")]

        shutil.copytree(ROOT / "bundle", folder / "bundle", ignore=outputs)


def _write_nnunet_regions(folder: Path) -> None:
    """``nnunet_out/``: a region-based nnU-Net's --save_probabilities output (BraTS-like: whole tumour, tumour core,
    enhancing tumour as sigmoid probabilities, ``<case>.npz`` + ``<case>.pkl``) and its ``dataset.json``."""
    import json

    out = folder / "nnunet_out"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    shape = (14, 16, 18)  # nnU-Net's (z, y, x)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    for i in range(2):
        centre = rng.uniform(-0.3, 0.3, 3)[:, None, None, None]
        r = np.sqrt(((grid - centre) ** 2).sum(0))
        q = np.stack([1 / (1 + np.exp(-12 * (rad - r) + rng.normal(0, 1, shape))) for rad in (0.6, 0.4, 0.2)])
        np.savez_compressed(out / f"case_{i}.npz", probabilities=q.astype(np.float32))
        _write_unit_pkl(out / f"case_{i}.pkl", shape)
    (out / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3},
        "regions_class_order": [1, 2, 3]}, indent=1))


def _write_unit_pkl(path: Path, shape: tuple[int, ...]) -> None:
    """nnU-Net's case properties (``.pkl``) of a unit-spacing, identity-direction image of ``shape`` (z, y, x)."""
    import pickle

    props = {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                            "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)},
             "spacing": [1.0, 1.0, 1.0], "shape_before_cropping": shape}
    with open(path, "wb") as fh:
        pickle.dump(props, fh)


def _write_nnunet_folds(folder: Path) -> None:
    """nnU-Net's cross-validation layout: ``nnUNet_results/Dataset001_Demo/nnUNetTrainer__nnUNetPlans__3d_fullres/
    fold_K/validation/<case>.npz + .pkl`` (``--npz``) for 5 folds of 2 cases of an under-confident model,
    ``gt_segmentations/`` with their labels, and ``imagesTs_probs/`` (2 new cases to predict)."""

    import SimpleITK as sitk

    train = folder / "nnUNet_results" / "Dataset001_Demo" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    gt = folder / "nnUNet_preprocessed" / "Dataset001_Demo" / "gt_segmentations"
    gt.mkdir(parents=True, exist_ok=True)
    shape = (12, 20, 20)  # nnU-Net's (z, y, x)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    rng = np.random.default_rng(7)

    def case(out: Path, name: str, with_label: bool) -> None:
        z = np.zeros((3, *shape))
        for c in (1, 2):
            centre = rng.uniform(3, np.array(shape) - 3)[:, None, None, None]
            z[c] = 1.5 * (rng.uniform(3, 5) - np.sqrt(((grid - centre) ** 2).sum(0))) + rng.normal(0, 0.3, shape)
        p = np.exp(z) / np.exp(z).sum(0)
        label = (rng.random(shape)[None] > np.cumsum(p, 0)).sum(0).clip(0, 2).astype(np.uint8)
        flat = np.exp(0.5 * z) / np.exp(0.5 * z).sum(0)  # the model: logits x 0.5
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / f"{name}.npz", probabilities=flat.astype(np.float16))
        _write_unit_pkl(out / f"{name}.pkl", shape)
        if with_label:
            sitk.WriteImage(sitk.GetImageFromArray(label), str(gt / f"{name}.nii.gz"))

    for k in range(5):
        for i in range(2):
            case(train / f"fold_{k}" / "validation", f"case_{k}{i}", True)
    for i in range(2):
        case(folder / "imagesTs_probs", f"test_{i}", False)


def _copy_benchmarks(folder: Path) -> None:
    """A copy of the repository's ``benchmarks/`` folder (blocks that run "from the repository root")."""
    import shutil

    if not (folder / "benchmarks").exists():
        shutil.copytree(ROOT / "benchmarks", folder / "benchmarks",
                        ignore=shutil.ignore_patterns("__pycache__", "*.json"))


#: named input files a block may ask for (``<!-- doc-test: files=NAME -->``)
FILES = {"nifti-folders": _write_nifti_folders, "repo-bundle": _copy_bundle, "nnunet-regions": _write_nnunet_regions,
         "repo-benchmarks": _copy_benchmarks, "nnunet-folds": _write_nnunet_folds}


# ----------------------------------------------------------------------------------------------- running
def _run_python(block: Block, namespace: dict) -> None:
    if block.code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(block.code, namespace, str(block), block.document, block.line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, out=lambda s: None)
        result = runner.summarize(verbose=False)
        assert result.failed == 0, f"{block}: {result.failed} doctest example(s) failed"
        return
    code = compile(block.code, f"{block.document}:{block.line}", "exec")
    exec(code, namespace)  # noqa: S102 - the documentation's own code


def _run_bash(block: Block, cwd: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    env["RANKSEG_REPO"] = str(ROOT)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{block} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _documents_with_code() -> list[str]:
    return [d for d in DOCUMENTS if (ROOT / d).exists() and any(b.lang != "text" for b in blocks(d))]


@pytest.mark.parametrize("document", _documents_with_code())
def test_code_blocks_run(document, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANKSEG_REPO", str(ROOT))
    import matplotlib

    matplotlib.use("Agg")
    ran = 0
    for block in blocks(document):
        assert block.lang in LANGUAGES, f"{block}: tag the fence with one of {sorted(LANGUAGES)}"
        if block.lang == "text" or block.skip_reason is not None:
            continue
        for name in block.files:
            FILES[name](tmp_path)
        if block.writes is not None:
            (tmp_path / block.writes).write_text(block.code, encoding="utf-8")
        elif block.lang == "python":
            _run_python(block, {"__name__": "__doc_test__"})  # a fresh namespace: each block runs by itself
        elif block.lang == "bash":
            _run_bash(block, tmp_path)
        else:
            json.loads(block.code)
        ran += 1
    assert ran > 0 or all(b.lang == "text" or b.skip_reason is not None for b in blocks(document))


def test_skipped_blocks_have_reasons():
    skipped = [(str(b), b.skip_reason) for d in DOCUMENTS if (ROOT / d).exists() for b in blocks(d)
               if b.skip_reason is not None]
    for where, reason in skipped:
        assert len(reason) >= 15, f"{where}: a skipped block needs a reason (<!-- doc-test: skip: why -->)"
    # the few blocks that cannot run here, and why (printed with -rA / in the CI log on failure)
    assert len(skipped) <= 12, skipped


def test_every_fence_is_tagged():
    untagged = [str(b) for d in DOCUMENTS if (ROOT / d).exists() for b in blocks(d) if b.lang not in LANGUAGES]
    assert not untagged, f"tag these fences (python, bash, json or text): {untagged}"
