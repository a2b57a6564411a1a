"""Run every tutorial (tutorials/*.py) as a subprocess, as a user would, and check what it prints.

Each tutorial ends with the same table::

    class   metric      argmax  RankSEG  RankSEG-argmax
    organ   Dice        0.9762   0.9771         +0.0009
    ...

Tutorials 02, 03 and 04 decide on the same three phantoms with the same model and sliding window through three
different integrations (an Ignite ``SupervisedEvaluator`` with ``RankSEGHandler``, the example bundle with the
overlay config, nnU-Net-style files through the CLI), so their tables must agree.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
ROW = re.compile(r"^(organ|lesion)\s+(Dice|HD95mm)\s+(\S+)\s+(\S+)\s+([+-]\S+)", re.MULTILINE)

pytestmark = pytest.mark.slow


def run_tutorial(name: str, cwd: Path) -> str:
    """Run ``tutorials/<name>`` from an unrelated folder (tutorials must not depend on the working directory)."""
    proc = subprocess.run([sys.executable, str(TUTORIALS / name)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table(output: str) -> dict[tuple[str, str], tuple[float, float]]:
    """``{(class, metric): (argmax, rankseg)}`` from the final table, with its consistency checked."""
    rows = {}
    for cls, metric, a, r, diff in ROW.findall(output):
        a, r, diff = float(a), float(r), float(diff)
        tol = 1.5e-4 if metric == "Dice" else 1.5e-2  # printed with 4 / 2 decimals
        assert math.isclose(diff, r - a, abs_tol=tol), (cls, metric, a, r, diff)
        if metric == "Dice":
            assert 0.0 <= a <= 1.0 and 0.0 <= r <= 1.0
        else:
            assert a > 0.0 and r > 0.0 and math.isfinite(a) and math.isfinite(r)
        rows[(cls, metric)] = (a, r)
    assert set(rows) == {(c, m) for c in ("organ", "lesion") for m in ("Dice", "HD95mm")}, output[-2000:]
    return rows


def test_tutorial_files_are_listed_in_the_readme():
    scripts = sorted(p.name for p in TUTORIALS.glob("[0-9][0-9]_*.py"))
    assert scripts == ["01_sliding_window_invertd.py", "02_evaluator_handlers.py", "03_bundle_overlay.py",
                       "04_nnunet_cli.py"]
    readme = (TUTORIALS / "README.md").read_text()
    assert all(s in readme for s in scripts)


def test_tutorial_01_sliding_window_invertd(tmp_path):
    out = run_tutorial("01_sliding_window_invertd.py", tmp_path)
    rows = table(out)
    # Invertd really resampled: model grid differs from the original grid, and the output is back on the latter
    shapes = re.findall(r"original grid (\(.*?\)) -> model grid (\(.*?\)) -> Invertd (\(.*?\))", out)
    assert len(shapes) == 3 and all(o == i != m for o, m, i in shapes), shapes
    # the third column: RankSEG decided on the model grid and its mask inverted (nearest) scores lower Dice than
    # deciding after Invertd, for both classes on these cases
    for cls in ("organ", "lesion"):
        line = re.search(rf"^{cls}\s+Dice\s.*$", out, re.MULTILINE).group(0)
        decided_first = float(line.split()[-1])
        assert decided_first < rows[(cls, "Dice")][1], line


def test_tutorials_02_03_04_agree(tmp_path):
    outs = {n: run_tutorial(n, tmp_path) for n in ("02_evaluator_handlers.py", "03_bundle_overlay.py",
                                                    "04_nnunet_cli.py")}
    tables = {n: table(o) for n, o in outs.items()}
    first = tables["02_evaluator_handlers.py"]
    for name, rows in tables.items():
        assert rows == first, f"{name} disagrees with 02_evaluator_handlers.py: {rows} vs {first}"
    # on these three phantoms RankSEG improves lesion and organ Dice (docs/demo.md: lesion 3/3 wins)
    assert first[("lesion", "Dice")][1] > first[("lesion", "Dice")][0] + 0.03
    assert first[("organ", "Dice")][1] >= first[("organ", "Dice")][0]

    o2, o3, o4 = outs.values()
    assert "hd95_empty=0" in o2
    assert re.search(r"lesion Dice per case: argmax (\d\.\d{3} ){2}\d\.\d{3}; RankSEG (\d\.\d{3} ?){3}", o2)
    assert "-> instantiates RankSEGd" in o3
    assert "-> instantiates Compose(RankSEGd, AsDiscreted), to_onehot=3" in o3
    assert o3.count("MetricsSaver wrote: metrics.csv") == 2
    assert "mask on disk == rankseg_monai.functional.rankseg(probabilities): True" in o4
    assert re.search(r"masks: phantom_1000000.nii.gz, phantom_1000001.nii.gz, phantom_1000002.nii.gz", o4)
    # tutorial 04 keeps its files for the user to look at
    kept = tmp_path / "rankseg_tutorial_04"
    assert (kept / "report" / "differences.png").is_file() and len(list((kept / "rankseg_masks").glob("*.nii.gz"))) == 3
