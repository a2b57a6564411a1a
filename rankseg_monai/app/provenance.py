"""Where a mask came from: a small JSON record beside every mask ``predict`` writes (``<mask>.rankseg.json``).

A record holds the settings the mask was made with (``RankSEGOptions.to_dict()`` plus the command line's own
reading options), the package version, the name, size and SHA-256 of every input file read for the case (the
probability file and its ``.pkl``/``.raw`` companion), and the SHA-256 of the mask file itself, which was read
back and compared with the decision before it was put in place (:func:`rankseg_monai.app.io.stage_mask`).

The two files land together (:func:`write_mask`): the mask is written to a temporary and verified, the record is
written to a temporary, then the record is renamed into place and then the mask.  Whatever moment a process is
killed at, a mask in place either has a record whose ``mask_sha256`` matches its bytes, or it is not trusted: a
resumed run redoes it (:func:`case_status`).

Example:
    >>> import tempfile, pathlib
    >>> import numpy as np
    >>> from rankseg_monai.app import io as rio, provenance
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> geometry = rio.Geometry.from_nifti(np.eye(4), (2, 2, 2))
    >>> src = folder / "in.txt"
    >>> _ = src.write_text("probabilities")
    >>> record = provenance.write_mask(np.ones((2, 2, 2), np.uint8), geometry, folder / "out" / "c.nii.gz",
    ...                                case="c", inputs=provenance.hash_inputs([src]), settings={"metric": "dice"})
    >>> provenance.case_status(folder / "out" / "c.nii.gz", {"metric": "dice"}, provenance.hash_inputs([src])).state
    'done'
    >>> provenance.case_status(folder / "out" / "c.nii.gz", {"metric": "iou"}).state
    'other-settings'
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._files import VolumeError, commit, discard, sha256_file, stage
from . import io as rio

__all__ = ["RECORD_SUFFIX", "RECORD_KIND", "RECORD_VERSION", "CaseStatus", "record_path", "is_record",
           "read_record", "hash_inputs", "settings_difference", "case_status", "write_mask", "commit_mask"]

RECORD_SUFFIX = ".rankseg.json"
RECORD_KIND = "rankseg-monai mask record"
RECORD_VERSION = 1

#: states of :func:`case_status`
ABSENT, DONE, DAMAGED, INPUT_CHANGED, OTHER_SETTINGS, FOREIGN = (
    "absent", "done", "damaged", "input-changed", "other-settings", "foreign")


def record_path(mask: str | os.PathLike) -> Path:
    """The record of a mask: ``<mask file name>.rankseg.json`` beside it."""
    mask = Path(mask)
    return mask.with_name(mask.name + RECORD_SUFFIX)


def is_record(name: str) -> bool:
    return name.endswith(RECORD_SUFFIX) and not name.startswith(".")


def hash_inputs(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """``[{"file", "path", "bytes", "sha256"}]`` of the files read for a case (in order)."""
    out = []
    for p in paths:
        p = Path(p)
        out.append({"file": p.name, "path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def _same_inputs(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> bool:
    key = lambda entries: [(e.get("file"), e.get("sha256")) for e in entries]  # noqa: E731
    return key(a) == key(b)


class RecordError(VolumeError):
    """A record that cannot be read or is not a rankseg-monai mask record."""


def read_record(mask: str | os.PathLike) -> dict[str, Any] | None:
    """The record of ``mask`` (``None`` when there is none); :class:`RecordError` when it is unreadable."""
    path = record_path(mask)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: unreadable ({exc})") from exc
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("record") != RECORD_KIND:
        raise RecordError(f"{path}: not a {RECORD_KIND}")
    return record


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def settings_difference(record: Mapping[str, Any], settings: Mapping[str, Any], version: str = __version__) -> str:
    """What differs between a record and the current settings/version, e.g. ``"metric: 'dice' -> 'iou'"``
    (``""``: nothing)."""
    old = record.get("settings") if isinstance(record.get("settings"), Mapping) else {}
    diffs = []

    def walk(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str) -> None:
        for k in sorted({*a, *b}):
            x, y = a.get(k), b.get(k)
            if isinstance(x, Mapping) and isinstance(y, Mapping):
                walk(x, y, f"{prefix}{k}.")
            elif _show(x) != _show(y):
                diffs.append(f"{prefix}{k}: {x!r} -> {y!r}")

    walk(old, settings, "")
    if record.get("version") != version:
        diffs.append(f"rankseg-monai version: {record.get('version')!r} -> {version!r}")
    return ", ".join(diffs)


@dataclass(frozen=True)
class CaseStatus:
    """What a folder holds for one mask path.

    ``state``: ``"absent"`` (no mask), ``"foreign"`` (a mask without a readable record: not written by
    ``rankseg-monai predict``, or by a version before records), ``"other-settings"`` (a record of other settings or
    another version; ``detail`` says which), ``"damaged"`` (the mask's bytes no longer match its record: changed,
    truncated, or the process died between the two renames), ``"input-changed"`` (same settings, other input
    files), ``"done"`` (everything matches: skip it), or ``"same-settings"`` when the mask and inputs were not
    checked (``inputs=None``).
    """

    state: str
    detail: str = ""
    record: dict[str, Any] | None = None


def case_status(mask: str | os.PathLike, settings: Mapping[str, Any],
                inputs: Sequence[Mapping[str, Any]] | None = None, version: str = __version__) -> CaseStatus:
    """Classify ``mask`` against the current ``settings``/``version`` and (when given) the hashed ``inputs``.

    Without ``inputs`` only the record is read (cheap: used to survey a folder); with them the mask file is hashed
    and the inputs compared, so ``"done"`` means the mask is exactly the one recorded for these inputs.
    """
    mask = Path(mask)
    if not mask.exists():
        return CaseStatus(ABSENT)
    try:
        record = read_record(mask)
    except RecordError as exc:
        return CaseStatus(FOREIGN, str(exc))
    if record is None:
        return CaseStatus(FOREIGN, f"no {record_path(mask).name}")
    diff = settings_difference(record, settings, version)
    if diff:
        return CaseStatus(OTHER_SETTINGS, diff, record)
    if inputs is None:
        return CaseStatus("same-settings", "", record)
    if record.get("mask") != mask.name or sha256_file(mask) != record.get("mask_sha256"):
        return CaseStatus(DAMAGED, "the mask's bytes do not match its record", record)
    if not _same_inputs(record.get("inputs") or [], inputs):
        return CaseStatus(INPUT_CHANGED, "the input files changed since the mask was made", record)
    return CaseStatus(DONE, "", record)


def _environment() -> dict[str, str]:
    import torch

    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "host": platform.node()}


def write_mask(mask: np.ndarray, geometry: rio.Geometry, target: str | os.PathLike, *, case: str,
               inputs: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
               protected: Iterable[str | os.PathLike] = (), extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``mask`` (verified, :func:`rankseg_monai.app.io.stage_mask`) and its record, atomically together.

    Order: mask to a temporary, read back; record to a temporary, read back; record into place; mask into place.
    ``extra`` adds fields to the record (per-case results).  Returns the record.
    """
    target = Path(target)
    tmp_mask = rio.stage_mask(mask, geometry, target, overwrite=True, protected=protected)
    return commit_mask(tmp_mask, target, np.shape(mask), case=case, inputs=inputs, settings=settings, extra=extra)


def commit_mask(tmp_mask: str | os.PathLike, target: str | os.PathLike, mask_shape: Sequence[int], *, case: str,
                inputs: Sequence[Mapping[str, Any]], settings: Mapping[str, Any],
                extra: Mapping[str, Any] | None = None,
                verified: str = "read back before it was put in place: same values, dtype, shape and grid"
                ) -> dict[str, Any]:
    """Put a mask already written to ``tmp_mask`` and verified (:func:`rankseg_monai._files.stage`) in place at
    ``target`` with its record (the second half of :func:`write_mask`, also for masks written by another writer,
    e.g. nnU-Net's).  The temporary is removed on failure.  Returns the record."""
    target = Path(target)
    rec_path = record_path(target)
    tmp_rec = None
    try:
        record = {
            "record": RECORD_KIND,
            "record_version": RECORD_VERSION,
            "case": case,
            "mask": target.name,
            "mask_sha256": sha256_file(tmp_mask),
            "mask_bytes": os.path.getsize(tmp_mask),
            "mask_shape": [int(s) for s in mask_shape],
            "verified": verified,
            "inputs": [dict(e) for e in inputs],
            "settings": dict(settings),
            "version": __version__,
            "environment": _environment(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **dict(extra or {}),
        }
        text = json.dumps(record, indent=1) + "\n"

        def check(tmp: str) -> None:
            if json.loads(Path(tmp).read_text(encoding="utf-8")) != json.loads(text):
                raise VolumeError(f"{rec_path}: the written record does not read back as written (is the disk "
                                  "full?); nothing was written for this case")

        tmp_rec = stage(rec_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), verify=check)
        commit(tmp_rec, rec_path)  # the record first: a mask in place always has a record beside it
        commit(tmp_mask, target)
    finally:
        discard(tmp_mask, tmp_rec)
    return record
