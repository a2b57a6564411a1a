"""What the run-integrity guarantees of ``rankseg-monai predict`` cost on one large case (issue 13).

For a ``256^3`` case with 3 classes (float32 probabilities: 201 MB in memory) it times, per mask format:

* ``write``: the writer alone (nibabel / SimpleITK into a temporary, as before verification existed);
* ``verify``: reading the written mask back and comparing it with the decision (values, dtype, shape, grid);
* ``sha256 mask``: hashing the mask file for its record;

and, once: ``sha256 inputs`` (hashing the probability file for the record and on every resume), the whole
``predict`` of the case (load, decide, write, verify, record) and a resumed ``predict`` that skips it (hash the
input and the mask, compare with the record).  Medians of ``--repeat`` runs, wall seconds.

Run:  python benchmarks/bench_integrity.py [--size 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _bench_util import median_time


def _wall(fn, repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls (no warm-up: the first write is part of what is measured)."""
    return median_time(fn, repeat, warm=False)[0]


def _case(size: int) -> np.ndarray:
    """(C=3, size, size, size) float32 probabilities with two smooth blobs (softmax of distance logits)."""
    ax = np.linspace(-1, 1, size, dtype=np.float32)
    x, y, z = np.meshgrid(ax, ax, ax, indexing="ij", sparse=True)
    logits = np.zeros((3, size, size, size), np.float32)
    logits[1] = 6 * (0.6 - np.sqrt((x - 0.1) ** 2 + y**2 + z**2))
    logits[2] = 8 * (0.25 - np.sqrt((x + 0.3) ** 2 + (y - 0.2) ** 2 + z**2))
    logits -= logits.max(0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(0, keepdims=True)
    return logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    import nibabel as nib

    from rankseg_monai._files import sha256_file, stage
    from rankseg_monai.app import io as rio

    results: dict[str, object] = {"size": args.size, "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench_integrity_") as tmp:
        tmp = Path(tmp)
        probs = _case(args.size)
        src = tmp / "in" / "case.nii.gz"
        src.parent.mkdir()
        affine = np.diag([0.8, 0.8, 1.5, 1.0])
        nib.save(nib.Nifti1Image(np.moveaxis(probs, 0, -1), affine), str(src))
        results["input_mb"] = round(src.stat().st_size / 2**20, 1)
        mask = probs.argmax(0).astype(np.uint8)
        del probs
        nifti_geo = rio.Geometry.from_nifti(affine, mask.shape)
        sitk_geo = rio.Geometry.from_sitk((0.8, 0.8, 1.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), mask.shape)
        per_format = {}
        for fmt in ("nii.gz", "nii", "mha", "nrrd"):
            geo = nifti_geo if fmt.startswith("nii") else sitk_geo
            writer, reader = (rio._write_nifti, "nibabel") if fmt.startswith("nii") else (rio._write_sitk, "sitk")
            target = tmp / "out" / f"case.{fmt}"
            data = rio._file_layout(mask)

            def write_only(target=target, writer=writer, geo=geo, data=data):
                os.unlink(stage(target, lambda t: writer(data, geo, t)))

            tmp_file = stage(target, lambda t, writer=writer, geo=geo, data=data: writer(data, geo, t))
            per_format[fmt] = {
                "mask_mb": round(tmp_file.stat().st_size / 2**20, 2),
                "write_s": round(_wall(write_only, args.repeat), 3),
                "verify_s": round(_wall(lambda f=tmp_file, d=data, g=geo, r=reader, t=target:
                                          rio._verify(t, str(f), d, g, r), args.repeat), 3),
                "sha256_mask_s": round(_wall(lambda f=tmp_file: sha256_file(f), args.repeat), 4),
            }
            os.unlink(tmp_file)
        results["formats"] = per_format
        results["sha256_inputs_s"] = round(_wall(lambda: sha256_file(src), args.repeat), 3)
        cli = [sys.executable, "-m", "rankseg_monai.app.cli", "predict", str(src), "-o", str(tmp / "pred"), "--quiet"]
        t = time.perf_counter()
        subprocess.run(cli, check=True)
        results["predict_case_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        proc = subprocess.run(cli, check=True, capture_output=True, text=True)
        results["resume_skip_s"] = round(time.perf_counter() - t, 2)
        assert "0 written, 1 skipped" in proc.stderr, proc.stderr
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import rankseg_monai.app.cli"], check=True)
        results["python_start_and_import_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
