"""Read probability volumes and write masks for RankSEG, with the input's exact geometry.

Supported inputs (one case per file, the case name is the file name without its extension):

* NIfTI ``.nii`` / ``.nii.gz`` read with nibabel (default) or SimpleITK (``reader="sitk"``).
* ``.mha``, ``.mhd`` (+ ``.raw``), ``.nrrd``, ``.nhdr`` read with SimpleITK.
* nnU-Net v2 ``--save_probabilities`` output: ``<case>.npz`` holding ``probabilities`` of shape
  ``(C, *spatial)`` in nnU-Net's array order (SimpleITK's ``z, y, x``, also for its nibabel reader, which
  transposes), and ``<case>.pkl`` holding the case properties: ``sitk_stuff`` (``spacing``, ``origin``,
  ``direction``, ITK order) for ``SimpleITKIO``, or ``nibabel_stuff`` (``original_affine`` and, for
  ``NibabelIOWithReorient``, ``reoriented_affine``) for the nibabel readers.  The pickle is read with an
  allow-list unpickler (plain containers and numpy arrays only), never with a bare ``pickle.load``.

Array order.  Every array returned here is in *index order* ``(x, y, z)`` (nibabel's order, MONAI's
``LoadImage`` order), whatever the reader: SimpleITK's ``(z, y, x)`` numpy arrays and nnU-Net's arrays are
transposed.  Probabilities are ``(C, x, y, z)`` float32.  A 4D NIfTI/ITK file holds the classes on its 4th
(last) axis (``X, Y, Z, C``, as written by MONAI's ``SaveImage``) or, with ``channels_last=False``, on its first
axis; ``channels_last=None`` decides from ``num_classes``, else takes the end axis that is smaller than the other
three (neither: an error asking for the flag).  A 5D NIfTI
``(X, Y, Z, 1, C)`` (NIfTI vector convention) and ITK vector images (one component per class) are read too.
A 3D file is a single foreground-probability channel (``C = 1``).

Geometry.  :class:`Geometry` keeps the native description of the grid (the nibabel header, or SimpleITK's
spacing/origin/direction) so that a mask written in the input's own family of formats gets the *exact* same
geometry; it also exposes a RAS ``affine`` (NIfTI convention, for index order) and ``spacing`` (mm per array
axis, for HD95) that compare across readers.  Writing to the other family converts (RAS <-> LPS).

Writes (:func:`save_mask`, :func:`stage_mask`) are atomic and verified: the file is written to a hidden temporary
file in the target folder, flushed to disk, read back and compared with the array (values, shape and grid; a
writer that silently truncates on a full disk is caught here), and only then moved into place with
:func:`os.replace`, so a mask on disk is complete and reads back as written; a target that is one of the
``protected`` input paths is refused.

File names.  SimpleITK aborts the whole process (``SIGABRT``) on a file name that is not valid UTF-8: such inputs
are refused with a :class:`VolumeError` before SimpleITK sees them, and masks are written under a UTF-8 temporary
name and renamed.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._arrays import numpy_dtype
from .._files import VolumeError, atomic_write, check_target, commit, discard, stage
from ..activation import looks_like_probabilities
from ..options import smallest_label_dtype
from ..solvers._stream import CLAMP_TOLERANCE

__all__ = [
    "PROBABILITY_EXTENSIONS",
    "LABEL_EXTENSIONS",
    "OUTPUT_FORMATS",
    "VolumeError",
    "SettingsError",
    "Geometry",
    "ProbabilityVolume",
    "LabelVolume",
    "case_name",
    "case_names",
    "find_cases",
    "SAVEIMAGE_POSTFIX",
    "companion_files",
    "load_probabilities",
    "load_labels",
    "load_nnunet_properties",
    "save_mask",
    "stage_mask",
    "read_mask",
    "mask_path",
    "mask_dtype",
    "check_same_grid",
    "validate_probabilities",
    "DatasetJson",
    "read_dataset_json",
    "clip_overshoot",
    "check_logits",
    "show_value",
    "sitk_path",
    "atomic_write",
]

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
PROBABILITY_EXTENSIONS = (*IMAGE_EXTENSIONS, ".npz")
LABEL_EXTENSIONS = IMAGE_EXTENSIONS
OUTPUT_FORMATS = ("nii.gz", "nii", "mha", "nrrd")
class SettingsError(VolumeError):
    """A file disagrees with the command's settings rather than being broken (logits without ``--softmax``,
    ``--softmax`` on probabilities, the class axis not named): every case would fail the same way, so the command
    line stops at the first case with a usage error instead of failing each case."""


#: ``monai.transforms.SaveImage(output_postfix=...)``'s default: ``case_000_trans.nii.gz``
SAVEIMAGE_POSTFIX = "trans"
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")
#: largest nnU-Net properties file read (nnU-Net writes a few kB; the cap bounds what a hostile file can build)
MAX_PROPERTIES_BYTES = 16 * 2**20
#: at most this many voxels are sampled to tell which axis of a 4D file the classes sum to one over
_AXIS_SAMPLE = 1 << 16


# ----------------------------------------------------------------------------------------------- geometry


def _ras_lps(affine: np.ndarray) -> np.ndarray:
    """Flip the x and y world axes (RAS <-> LPS), as ``monai.data.utils.orientation_ras_lps`` does for 3D.

    Kept local so that reading files does not import MONAI (seconds of start-up for ``predict``).
    """
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of an ``(x, y, z)`` array sit in the world.

    ``kind`` is ``"nibabel"`` (``affine`` and, when read from a file, ``header`` are exact) or ``"sitk"``
    (``itk_spacing``, ``itk_origin``, ``itk_direction`` are exact, ITK/LPS convention, ITK axis order).
    """

    kind: str
    shape: tuple[int, ...]
    affine: np.ndarray = field(repr=False)
    itk_spacing: tuple[float, ...] | None = None
    itk_origin: tuple[float, ...] | None = None
    itk_direction: tuple[float, ...] | None = None
    header: Any = field(default=None, repr=False, compare=False)
    nifti_class: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_nifti(cls, affine: np.ndarray, shape: Sequence[int], header: Any = None,
                   nifti_class: Any = None) -> Geometry:
        return cls("nibabel", tuple(int(s) for s in shape), np.array(affine, dtype=np.float64), header=header,
                   nifti_class=nifti_class)

    @classmethod
    def from_sitk(cls, spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float],
                  shape: Sequence[int]) -> Geometry:
        spacing = tuple(float(s) for s in spacing)
        origin = tuple(float(o) for o in origin)
        direction = tuple(float(d) for d in direction)
        n = len(spacing)
        if n != 3 or len(origin) != 3 or len(direction) != 9:
            raise VolumeError(f"expected 3D geometry, got spacing {spacing}, origin {origin}: only 3D volumes are "
                              "supported")
        lps = np.eye(4)
        lps[:3, :3] = np.array(direction).reshape(3, 3) * np.array(spacing)
        lps[:3, 3] = origin
        return cls("sitk", tuple(int(s) for s in shape), _ras_lps(lps), spacing, origin, direction)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis (from the affine, like ``MetaTensor.pixdim``)."""
        if self.itk_spacing is not None:
            return tuple(abs(s) for s in self.itk_spacing)
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def sitk_geometry(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(spacing, origin, direction) for SimpleITK: native values, or converted from the RAS affine."""
        if self.itk_spacing is not None:
            return self.itk_spacing, self.itk_origin, self.itk_direction
        lps = _ras_lps(self.affine)
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        if np.any(spacing == 0):
            raise VolumeError("the affine has a zero-length axis: cannot convert it to SimpleITK geometry")
        direction = lps[:3, :3] / spacing
        return tuple(map(float, spacing)), tuple(map(float, lps[:3, 3])), tuple(map(float, direction.ravel()))

    def same_grid(self, other: Geometry, atol: float = 1e-3) -> bool:
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, rtol=1e-5, atol=atol))

    def describe(self) -> str:
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing)
        origin = ", ".join(f"{o:.4g}" for o in self.affine[:3, 3])
        axes = self.affine[:3, :3] / np.where(np.array(self.spacing) > 0, np.array(self.spacing), 1.0)
        direction = ", ".join(f"{d:.4g}" for d in (axes.ravel() + 0.0))  # + 0.0: no "-0"
        return f"shape {self.shape}, spacing ({spacing}) mm, RAS origin ({origin}), RAS direction ({direction})"


@dataclass
class ProbabilityVolume:
    """Class probabilities ``(C, x, y, z)`` float32 of one case, with its geometry."""

    case: str
    probabilities: np.ndarray
    geometry: Geometry
    path: Path

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.shape[0])

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.geometry.spacing


@dataclass
class LabelVolume:
    """An integer label map ``(x, y, z)`` (the file's integer dtype) of one case, with its geometry."""

    case: str
    labels: np.ndarray
    geometry: Geometry
    path: Path

    @property
    def spacing(self) -> tuple[float, ...]:
        return self.geometry.spacing


# ------------------------------------------------------------------------------------------ finding files


def _extension(path: str | os.PathLike) -> str | None:
    name = os.path.basename(os.fspath(path)).lower()
    for ext in PROBABILITY_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def case_name(path: str | os.PathLike) -> str:
    """The case name: the file name without ``.nii.gz``/``.nii``/``.mha``/``.mhd``/``.nrrd``/``.nhdr``/``.npz``."""
    ext = _extension(path)
    name = os.path.basename(os.fspath(path))
    if ext is None:
        raise VolumeError(f"{path}: unknown file type; use one of {', '.join(PROBABILITY_EXTENSIONS)}")
    return name[: -len(ext)]


def companion_files(path: str | os.PathLike) -> list[Path]:
    """Files read together with ``path``: the ``.pkl`` of an nnU-Net ``.npz``; the data file of a ``.mhd``."""
    path = Path(path)
    ext = _extension(path)
    if ext == ".npz":
        return [path.with_name(case_name(path) + ".pkl")]
    if ext in (".mhd", ".nhdr") and path.is_file():
        try:
            text = path.read_text(errors="replace")[:20000]
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            key, _, value = line.partition(":" if ext == ".nhdr" else "=")
            key = key.strip().lower()
            if key in ("elementdatafile", "data file", "datafile"):
                value = value.strip()
                if value and value.upper() not in ("LOCAL", "LIST"):
                    out.append(path.parent / value)  # a relative sub-path or an absolute path
        return out
    return []


def _in_case_folder(path: Path) -> bool:
    """``path`` is ``<case>/<case>[_postfix...]<ext>``: MONAI ``SaveImage``'s layout (``separate_folder=True``, the
    default: one folder per case, the file named after the case plus ``_<output_postfix>``)."""
    ext = _extension(path)
    stem, folder = path.name[: -len(ext)] if ext else path.name, path.parent.name
    return bool(folder) and (stem == folder or stem.startswith(folder + "_"))


def _scan(folder: Path, extensions: Sequence[str]) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and _extension(p) in extensions)
    with_npz = {case_name(p) for p in files if _extension(p) == ".npz"}
    return [p for p in files if _extension(p) == ".npz" or case_name(p) not in with_npz]


def find_cases(inputs: Iterable[str | os.PathLike], extensions: Sequence[str] = PROBABILITY_EXTENSIONS,
               postfix: str | None = SAVEIMAGE_POSTFIX) -> list[Path]:
    """Files given directly or found in folders, sorted per folder.

    In a folder, a case with an nnU-Net ``.npz`` is read from it and its other files (nnU-Net's own argmax
    segmentation ``<case>.nii.gz``) are ignored.  A folder without such files directly in it is read as MONAI
    ``SaveImage``'s layout: its sub-folders ``<case>/`` each hold ``<case>_<postfix>.nii.gz`` (one file per case;
    :func:`case_names` names them ``<case>``).  Hidden files and our temporary files are skipped.  Two files with
    the same case name (:func:`case_names` with ``postfix``) are an error (the masks would collide).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = _scan(path, extensions)
            if not files:  # MONAI SaveImage: one sub-folder per case
                for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    inside = [p for p in _scan(sub, extensions) if _in_case_folder(p)]
                    if len(inside) > 1:
                        raise VolumeError(f"{sub} holds {len(inside)} files of case {sub.name} "
                                          f"({', '.join(p.name for p in inside[:3])}); MONAI SaveImage's layout has "
                                          "one per case folder: pass the files to use directly")
                    files.extend(inside)
            found.extend(files)
        elif path.is_file():
            if _extension(path) not in extensions:
                raise VolumeError(f"{path}: unknown file type; use one of {', '.join(extensions)}")
            found.append(path)
        else:
            raise VolumeError(f"{path}: no such file or folder; check the path (and the current directory)")
    seen: dict[str, Path] = {}
    for path, name in case_names(found, postfix).items():
        if name in seen:
            raise VolumeError(f"two inputs have the case name {name!r}: {seen[name]} and {path}; the masks would "
                              "overwrite each other: pass only one of them")
        seen[name] = path
    return found


def case_names(paths: Sequence[str | os.PathLike], postfix: str | None = SAVEIMAGE_POSTFIX) -> dict[Path, str]:
    """The case name of every file, as MONAI ``SaveImage`` named the case: ``{path: case}``.

    When every file lies in a folder of its own named like the file (``case_000/case_000_prob.nii.gz``, MONAI's
    default ``separate_folder=True``), the case is the folder's name; otherwise it is the file name without its
    extension and without a trailing ``_<postfix>`` (``SaveImage(output_postfix=...)``, default ``"trans"``;
    ``None`` or ``""`` keeps the name).

    >>> list(case_names(["out/case_000/case_000_prob.nii.gz", "out/case_001/case_001_prob.nii.gz"]).values())
    ['case_000', 'case_001']
    >>> list(case_names(["flat/case_000_trans.nii.gz", "flat/case_001.nii.gz"]).values())
    ['case_000', 'case_001']
    >>> list(case_names(["flat/case_000_prob.nii.gz"], postfix="prob").values())
    ['case_000']
    """
    paths = [Path(p) for p in paths]
    folders = [p.parent for p in paths]
    if paths and len(set(folders)) == len(paths) and all(_in_case_folder(p) for p in paths):
        return {p: p.parent.name for p in paths}
    tail = f"_{postfix}" if postfix else None
    out = {}
    for p in paths:
        name = case_name(p)
        out[p] = name[: -len(tail)] if tail and name.endswith(tail) and len(name) > len(tail) else name
    return out


# ------------------------------------------------------------------------------------------------ readers


def _readable(path: Path) -> None:
    if not path.exists():
        raise VolumeError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise VolumeError(f"{path}: not a file")


def _corrupt(path: Path, exc: BaseException) -> VolumeError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return VolumeError(f"{path}: could not read the file ({type(exc).__name__}: {reason[:300]}); it is corrupt, "
                       "truncated or not in the format its extension says: export it again")


def _nifti_arrays(path: Path, as_float: bool) -> tuple[np.ndarray, Any]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        if as_float:
            data = np.asanyarray(img.dataobj)
            slope = img.dataobj.slope if hasattr(img.dataobj, "slope") else 1.0
            inter = img.dataobj.inter if hasattr(img.dataobj, "inter") else 0.0
            disk = img.get_data_dtype()
            if disk.kind in "iub" and slope == 1.0 and inter == 0.0:
                raise VolumeError(f"{path}: holds integer data ({disk}): this looks like a label map, not "
                                  "probabilities; pass the probability (softmax/sigmoid) volumes")
            data = np.asarray(data, dtype=np.float32)
        else:
            data = np.asarray(img.dataobj)
            if data.dtype.kind == "f":
                data = np.asarray(img.get_fdata(dtype=np.float64))
    except VolumeError:
        raise
    except Exception as exc:  # nibabel raises many types for broken files (EOFError, zlib.error, ...)
        raise _corrupt(path, exc) from exc
    _check_voxels(path, data.shape)
    return data, img


def sitk_path(path: str | os.PathLike) -> str:
    """``path`` as the string SimpleITK takes; a :class:`VolumeError` when it is not valid UTF-8 (SimpleITK would
    abort the process)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise VolumeError(f"{text!r}: the file name is not valid UTF-8 and SimpleITK cannot open it (it would abort "
                          "the whole run); rename the file (e.g. convmv -f latin1 -t utf8), or convert it to "
                          "NIfTI") from None
    return text


def _check_voxels(path: Path, shape: Sequence[int]) -> None:
    if any(int(s) == 0 for s in shape):
        raise VolumeError(f"{path}: array of shape {tuple(int(s) for s in shape)} holds no voxels (an axis of size "
                          "0); export the volume again")


def _sitk_arrays(path: Path) -> tuple[np.ndarray, Geometry, bool]:
    """Array in ITK index order (x, y, z[, extra]) plus 3D geometry; the bool tells a vector image."""
    import SimpleITK as sitk

    name = sitk_path(path)
    try:
        img = sitk.ReadImage(name)
        arr = sitk.GetArrayFromImage(img)
    except Exception as exc:  # SimpleITK raises RuntimeError with a long ITK trace
        raise _corrupt(path, exc) from exc
    _check_voxels(path, arr.shape)
    dim = img.GetDimension()
    vector = img.GetNumberOfComponentsPerPixel() > 1
    if dim == 3:
        spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    elif dim == 4 and not vector:
        spacing, origin = img.GetSpacing()[:3], img.GetOrigin()[:3]
        direction = tuple(np.array(img.GetDirection()).reshape(4, 4)[:3, :3].ravel())
    else:
        raise VolumeError(f"{path}: a {dim}D image{' of vectors' if vector else ''} is not supported; expected a "
                          "3D volume, a 4D volume with one class per 4th-axis index, or a 3D vector image")
    # numpy order is reversed ITK order: (z, y, x), (c, z, y, x) for 4D, (z, y, x, comp) for vectors
    if vector:
        arr = np.moveaxis(arr, -1, 0)
    arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # -> (x, y, z) or (x, y, z, c)
    geometry = Geometry.from_sitk(spacing, origin, direction, arr.shape[:3])
    return arr, geometry, vector


def _sums_to_one(arr: np.ndarray, axis: int, tolerance: float) -> bool:
    """Whether the values of a 4D array are probabilities summing to one over ``axis`` (on a strided sample of at
    most about 65 000 voxels: enough to tell the class axis, whose sums are one everywhere, from a spatial one)."""
    axis %= 4
    if arr.shape[axis] < 2:
        return False  # one value per voxel: summing over it says nothing
    spatial = [i for i in range(4) if i != axis]
    voxels = int(np.prod([arr.shape[i] for i in spatial]))
    step = max(1, int(np.ceil((voxels / _AXIS_SAMPLE) ** (1.0 / 3.0))))
    index = [slice(None)] * 4
    for i in spatial:
        index[i] = slice(None, None, step)
    sample = np.asarray(arr[tuple(index)], dtype=np.float64)
    if not np.all(np.isfinite(sample)) or sample.min() < -tolerance:
        return False
    return bool(np.max(np.abs(sample.sum(axis=axis) - 1.0)) <= tolerance)


def _pick_channel_axis(path: Path, arr: np.ndarray, channels_last: bool | None, num_classes: int | None,
                       spatial_shape: Sequence[int] | None, sum_tolerance: float) -> bool:
    """Whether the classes of a 4D array are on its last axis: from the flag when given, else only when exactly
    one reading is consistent with the class count / spatial shape given and with the values (probabilities sum
    to one over the class axis)."""
    shape = tuple(int(s) for s in arr.shape)
    readings = {True: (shape[-1], shape[:3]), False: (shape[0], shape[1:])}  # channels_last -> (C, spatial)
    names = {True: "last", False: "first"}
    flag = {True: "--channels-last (X, Y, Z, C)", False: "--channels-first (C, X, Y, Z)"}
    want = tuple(int(s) for s in spatial_shape) if spatial_shape is not None else None

    def fits(last: bool) -> bool:
        c, spatial = readings[last]
        return (num_classes is None or c == num_classes) and (want is None or spatial == want)

    if channels_last is not None:
        c, spatial = readings[channels_last]
        if num_classes is not None and c != num_classes:
            raise VolumeError(f"{path}: shape {shape} has {c} classes on its {names[channels_last]} axis, but "
                              f"{num_classes} classes were expected; check --channels-last/--channels-first")
        if want is not None and spatial != want:
            raise VolumeError(f"{path}: shape {shape} read with the classes on its {names[channels_last]} axis gives "
                              f"the grid {spatial}, but the label map is {want}; check --channels-last/"
                              "--channels-first")
        other = not channels_last
        if (not _sums_to_one(arr, -1 if channels_last else 0, sum_tolerance)
                and _sums_to_one(arr, -1 if other else 0, sum_tolerance) and fits(other)):
            raise SettingsError(f"{path}: the values sum to one over the {names[other]} axis of shape {shape}, not "
                                f"over the {names[channels_last]}: the classes are there; pass {flag[other]}")
        return channels_last
    candidates = [last for last in (True, False) if fits(last)]
    if not candidates:
        evidence = " and ".join(x for x in (f"{num_classes} classes" if num_classes is not None else "",
                                            f"the label grid {want}" if want is not None else "") if x)
        raise VolumeError(f"{path}: shape {shape} does not match {evidence} with the classes on either end axis; "
                          "pair the right files, or check the export")
    if len(candidates) == 1:
        return candidates[0]
    summing = [last for last in candidates if _sums_to_one(arr, -1 if last else 0, sum_tolerance)]
    if len(summing) == 1:
        return summing[0]
    if summing:
        why = "the values sum to one over both end axes"
    elif float(np.nanmin(arr)) < -sum_tolerance or float(np.nanmax(arr)) > 1.0 + sum_tolerance:
        why = "the values lie outside [0, 1], logits whose sums cannot tell (apply them with --softmax or --sigmoid)"
    else:
        why = "the values do not sum to one over either end axis (independent probabilities?)"
    raise SettingsError(f"{path}: cannot tell which axis of shape {shape} holds the classes ({why}); pass "
                        f"{flag[True]} or {flag[False]}")


def _to_channel_first(path: Path, arr: np.ndarray, channels_last: bool | None, num_classes: int | None,
                      spatial_shape: Sequence[int] | None = None, sum_tolerance: float = 1e-2
                      ) -> tuple[np.ndarray, bool]:
    """(x, y, z[, c]) or (c, x, y, z) -> (C, x, y, z); the bool says whether the file was channel-last."""
    if arr.ndim == 3:
        if num_classes not in (None, 1):
            raise VolumeError(f"{path}: a 3D volume holds one channel, but {num_classes} classes were expected")
        return arr[None], True
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector convention (X, Y, Z, 1, C)
        arr = arr[:, :, :, 0]
        if num_classes is not None and arr.shape[-1] != num_classes:
            raise VolumeError(f"{path}: {arr.shape[-1]} classes, expected {num_classes}")
        return np.moveaxis(arr, -1, 0), True
    if arr.ndim != 4:
        raise VolumeError(f"{path}: array of shape {arr.shape} is not a 3D volume with a class axis; expected "
                          "(X, Y, Z, C) or (C, X, Y, Z)")
    last = _pick_channel_axis(path, arr, channels_last, num_classes, spatial_shape, sum_tolerance)
    return (np.moveaxis(arr, -1, 0) if last else arr), last


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol 0-2 pickles use it for ``bytes`` (latin-1 only: no codec can expand)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing to load _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _ArrayClass:
    """What the unpickler gives for ``numpy.ndarray``: usable only as the class argument of ``_reconstruct``; calling
    it (``ndarray((4e8,), 'O')``, 51 bytes for 3.2 GB) is refused."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("refusing to call numpy.ndarray: arrays are built from the file's own bytes only")


_ARRAY_CLASS = _ArrayClass()


class _SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Plain Python containers and numpy arrays/scalars only, built from the file's own bytes: a ``.pkl`` from
    elsewhere can neither run code nor make the reader allocate much more memory than the file's size.

    * Python's own unpickler (its memo is a dict: a memo index of 2**28 costs one entry, not a 2**28-slot table);
      the file is read into memory first (at most :data:`MAX_PROPERTIES_BYTES`), so no length in it can make a
      read allocate more than the file;
    * containers built by calls (``list(L)``, ``dict(d)``, ``tuple``, ``set``, ...) copy at most as many elements,
      all calls together, as the file has bytes;
    * ``numpy.ndarray`` is only the class argument of ``_reconstruct``, which builds an empty array, and the
      array's state (shape and data) must be held by the file: ``len(data)`` bytes for plain dtypes, one object per
      element for object arrays.
    """

    _NUMPY_NAMES = {"scalar", "_frombuffer", "dtype"}
    _COPYING = {"tuple", "list", "dict", "set", "frozenset"}
    _BUILTINS = {"slice", "complex"}
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, data: bytes) -> None:
        import io as _io

        super().__init__(_io.BytesIO(data))
        self._budget = max(len(data), 4096)  # elements that copying calls may still build

    def _spend(self, count: int, what: str) -> None:
        self._budget -= count
        if self._budget < 0:
            raise pickle.UnpicklingError(f"refusing to build more by {what}() than the file holds")

    def _copying(self, fn: Any, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self._spend(sum(len(a) if hasattr(a, "__len__") else 1 for a in (*args, *kwargs.values())) + 1, name)
            return fn(*args, **kwargs)

        return call

    @staticmethod
    def _reconstruct(reconstruct: Any) -> Any:
        def build(cls: Any, shape: Any, dtype: Any) -> Any:
            if cls is not _ARRAY_CLASS or tuple(shape) != (0,):
                raise pickle.UnpicklingError(f"refusing to build an array of shape {shape!r} that the file does not "
                                             "hold")
            return reconstruct(np.ndarray, shape, dtype)

        return build

    def load_build(self) -> None:
        """``BUILD``: an array's state must be held by the file before numpy allocates it."""
        state = self.stack[-1]
        inst = self.stack[-2]
        if isinstance(inst, np.ndarray):
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise pickle.UnpicklingError("refusing an array state that numpy does not write")
            shape, dtype, data = state[-4], state[-3], state[-1]
            try:
                count = int(np.prod([int(v) for v in shape], dtype=object))
                dtype = np.dtype(dtype)
            except (TypeError, ValueError) as exc:
                raise pickle.UnpicklingError(f"refusing an array state ({exc})") from None
            if dtype.hasobject:
                held = isinstance(data, list) and len(data) == count
            else:
                held = isinstance(data, bytes | bytearray) and len(data) == count * dtype.itemsize
            if not held:
                raise pickle.UnpicklingError(f"refusing an array of shape {tuple(shape)} whose data the file does not "
                                             "hold")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 0-2 spelling
        if module == "_codecs" and name == "encode":  # protocol 0-2 spelling of bytes
            return _latin1
        numpy_module = module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                                  "numpy._core.numeric")
        if numpy_module and name == "ndarray":
            return _ARRAY_CLASS
        if numpy_module and name == "_reconstruct":
            return self._reconstruct(super().find_class(module, name))
        if module in ("builtins", "collections") and (name in self._COPYING or (module, name) == ("collections",
                                                                                                 "OrderedDict")):
            if module == "collections" and name != "OrderedDict":
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
            return self._copying(super().find_class(module, name), name)
        allowed = (
            (numpy_module and name in self._NUMPY_NAMES)
            or (module == "numpy.dtypes" and name.endswith("DType"))
            or (module == "builtins" and name in self._BUILTINS)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_nnunet_properties(path: str | os.PathLike) -> dict:
    """The properties dict nnU-Net v2 pickles next to ``<case>.npz`` (allow-list unpickler whose memory is bounded
    by the file's size, see :class:`_SafeUnpickler`)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found; nnU-Net writes <case>.pkl next to <case>.npz with "
                          "--save_probabilities: copy it next to the .npz (it holds the geometry)")
    size = path.stat().st_size
    if size > MAX_PROPERTIES_BYTES:
        raise VolumeError(f"{path}: {size} bytes is far more than nnU-Net case properties hold (a few kB; at most "
                          f"{MAX_PROPERTIES_BYTES} bytes are read); is this the right file?")
    try:
        with open(path, "rb") as fh:
            data = fh.read(size + 1)  # what stat said, plus one byte to see a file that grew since
        if len(data) > MAX_PROPERTIES_BYTES:
            raise VolumeError(f"{path}: more than {MAX_PROPERTIES_BYTES} bytes; is this the right file?")
        props = _SafeUnpickler(data).load()
    except VolumeError:
        raise
    except pickle.UnpicklingError as exc:
        raise VolumeError(f"{path}: not an nnU-Net properties file ({exc}); only containers and numpy arrays are "
                          "loaded") from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    if not isinstance(props, dict):
        raise VolumeError(f"{path}: expected a dict of nnU-Net case properties, got {type(props).__name__}")
    return props


def _show(value: Any) -> str:
    """A bounded ``repr`` of a value read from a ``.pkl`` (nested references can make a full ``repr`` huge)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, 80, 80, 40
    return r.repr(value)


def _keys(mapping: Any) -> str:
    return _show(sorted(map(_show, mapping)))


def _numbers(value: Any, limit: int) -> bool:
    """Whether ``value`` is a numpy array or nested lists/tuples of at most ``limit`` leaves and depth 3 (what a
    vector or an affine is), checked without expanding shared references."""
    if isinstance(value, np.ndarray):
        return value.size <= limit
    todo, leaves = [(value, 0)], 0
    while todo:
        item, depth = todo.pop()
        if isinstance(item, list | tuple):
            if depth >= 3 or len(item) > limit:
                return False
            todo.extend((v, depth + 1) for v in item)
        else:
            leaves += 1
            if leaves > limit:
                return False
    return True


def _finite_vector(pkl: Path, where: str, value: Any, size: int, positive: bool = False) -> tuple[float, ...]:
    arr = None
    if _numbers(value, size):
        try:
            arr = np.asarray(value, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            arr = None
    if arr is None or arr.size != size or not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise VolumeError(f"{pkl}: {where} is {_show(value)}; expected {size} {kind} (nnU-Net writes them for every "
                          "case): export the case again")
    return tuple(float(v) for v in arr)


def _affine(pkl: Path, where: str, value: Any) -> np.ndarray:
    arr = np.zeros(0)
    if _numbers(value, 16):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.zeros(0)
    if arr.shape != (4, 4) or not np.all(np.isfinite(arr)) or abs(np.linalg.det(arr[:3, :3])) < 1e-12:
        raise VolumeError(f"{pkl}: {where} is not a finite, invertible 4x4 affine ({np.array2string(arr)[:200]}); "
                          "export the case again")
    return arr


def _nnunet_geometry(props: dict, pkl: Path, arr: np.ndarray) -> tuple[np.ndarray, Geometry]:
    """The geometry of an nnU-Net case from its properties (every field checked, errors name the ``.pkl``); the
    array is reoriented back for ``NibabelIOWithReorient``."""
    import nibabel as nib

    if isinstance(props.get("sitk_stuff"), dict):
        s = props["sitk_stuff"]
        for key in ("spacing", "origin", "direction"):
            if key not in s:
                raise VolumeError(f"{pkl}: sitk_stuff has no {key!r} (keys: {_keys(s)}); is this nnU-Net v2 "
                                  "output?")
        spacing = _finite_vector(pkl, "sitk_stuff['spacing']", s["spacing"], 3, positive=True)
        origin = _finite_vector(pkl, "sitk_stuff['origin']", s["origin"], 3)
        direction = _finite_vector(pkl, "sitk_stuff['direction']", s["direction"], 9)
        return arr, Geometry.from_sitk(spacing, origin, direction, arr.shape[1:])
    if isinstance(props.get("nibabel_stuff"), dict):
        s = props["nibabel_stuff"]
        if "original_affine" not in s:
            raise VolumeError(f"{pkl}: nibabel_stuff has no 'original_affine' (keys: {_keys(s)}); is this nnU-Net "
                              "v2 output?")
        original = _affine(pkl, "nibabel_stuff['original_affine']", s["original_affine"])
        if "reoriented_affine" in s:  # NibabelIOWithReorient: the array is in the RAS-reoriented frame
            from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

            reoriented = _affine(pkl, "nibabel_stuff['reoriented_affine']", s["reoriented_affine"])
            back = ornt_transform(axcodes2ornt("RAS"), io_orientation(original))
            spatial = arr.shape[1:]
            arr = np.ascontiguousarray(np.moveaxis(
                nib.orientations.apply_orientation(np.moveaxis(arr, 0, -1), back), -1, 0))
            restored = reoriented @ inv_ornt_aff(back, spatial)
            if not np.allclose(restored, original, atol=1e-4):
                raise VolumeError(f"{pkl}: reorienting back to the original affine failed (nnU-Net "
                                  "NibabelIOWithReorient properties are inconsistent)")
        return arr, Geometry.from_nifti(original, arr.shape[1:])
    for key in ("sitk_stuff", "nibabel_stuff"):
        if key in props:
            raise VolumeError(f"{pkl}: {key} is a {type(props[key]).__name__}, expected a dict; export the case "
                              "again")
    raise VolumeError(f"{pkl}: neither 'sitk_stuff' nor 'nibabel_stuff' in the properties (keys: "
                      f"{_keys(props)}); is this nnU-Net v2 output?")


def _load_npz(path: Path, num_classes: int | None) -> ProbabilityVolume:
    pkl = path.with_name(case_name(path) + ".pkl")
    props = load_nnunet_properties(pkl)
    try:
        # our own handle: np.load leaks the one it opens when the file is not a valid zip
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "probabilities" not in keys:
                raise VolumeError(f"{path}: no 'probabilities' array (keys: {keys}); export with nnU-Net v2 "
                                  "--save_probabilities (nnU-Net v1 files are not supported)")
            arr = np.asarray(npz["probabilities"], dtype=np.float32)
    except VolumeError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise _corrupt(path, exc) from exc
    if arr.ndim != 4:
        raise VolumeError(f"{path}: probabilities of shape {arr.shape}; expected (C, z, y, x) (3D nnU-Net output)")
    _check_voxels(path, arr.shape)
    if num_classes is not None and arr.shape[0] != num_classes:
        raise VolumeError(f"{path}: {arr.shape[0]} classes, expected {num_classes}")
    arr = np.ascontiguousarray(np.transpose(arr, (0, 3, 2, 1)))  # nnU-Net (C, z, y, x) -> (C, x, y, z)
    arr, geometry = _nnunet_geometry(props, pkl, arr)
    return ProbabilityVolume(case_name(path), arr, geometry, path)


def _default_reader(path: Path, reader: str) -> str:
    if reader not in ("auto", "nibabel", "sitk"):
        raise ValueError(f"unknown reader {reader!r}: use 'auto', 'nibabel' or 'sitk'")
    ext = _extension(path)
    if reader == "nibabel" and ext not in _NIFTI_EXTENSIONS:
        raise VolumeError(f"{path}: nibabel reads NIfTI only; use reader='sitk'/'auto'")
    if reader == "auto":
        return "nibabel" if ext in _NIFTI_EXTENSIONS else "sitk"
    return reader


def load_probabilities(path: str | os.PathLike, *, channels_last: bool | None = None,
                       num_classes: int | None = None, reader: str = "auto",
                       spatial_shape: Sequence[int] | None = None, sum_tolerance: float = 1e-2) -> ProbabilityVolume:
    """Read one case's probabilities as ``(C, x, y, z)`` float32 plus its geometry.

    Args:
        path: a NIfTI/MHA/MHD/NRRD file, or an nnU-Net ``<case>.npz`` (with ``<case>.pkl`` beside it).
        channels_last: for 4D files, whether the classes are on the last file axis (``X, Y, Z, C``, NIfTI and
            MONAI convention) or the first (``C, X, Y, Z``).  ``None``: guessed only when exactly one reading is
            consistent with ``num_classes`` and ``spatial_shape`` (when given) and with the values (probabilities
            that sum to one over exactly one end axis); otherwise a :class:`VolumeError` asks for the flag.
        num_classes: expected class count (checked; also used to find the class axis).
        reader: ``"auto"`` (nibabel for NIfTI, SimpleITK otherwise), ``"nibabel"`` or ``"sitk"``.
        spatial_shape: the expected grid ``(x, y, z)`` (e.g. the label map's), used to find the class axis.
        sum_tolerance: largest deviation of a class sum from one that still counts as summing to one.
    """
    path = Path(path)
    _readable(path)
    ext = _extension(path)
    if ext is None:
        raise VolumeError(f"{path}: unknown file type; use one of {', '.join(PROBABILITY_EXTENSIONS)}")
    if ext == ".npz":
        return _load_npz(path, num_classes)
    if _default_reader(path, reader) == "nibabel":
        data, img = _nifti_arrays(path, as_float=True)
        probs, _ = _to_channel_first(path, data, channels_last, num_classes, spatial_shape, sum_tolerance)
        geometry = Geometry.from_nifti(img.affine, probs.shape[1:], header=img.header.copy(),
                                       nifti_class=type(img))
    else:
        arr, geometry, _ = _sitk_arrays(path)
        if arr.dtype.kind in "iub":
            raise VolumeError(f"{path}: holds integer data ({arr.dtype}): this looks like a label map, not "
                              "probabilities; pass the probability (softmax/sigmoid) volumes")
        if arr.ndim == 4:  # vector components or the 4th ITK axis hold the classes
            if channels_last is False:
                raise VolumeError(f"{path}: SimpleITK images keep the classes on their 4th axis (or as vector "
                                  "components); drop --channels-first")
            probs = np.moveaxis(arr, -1, 0)
            if num_classes is not None and probs.shape[0] != num_classes:
                raise VolumeError(f"{path}: {probs.shape[0]} classes, expected {num_classes}")
        else:
            probs, _ = _to_channel_first(path, arr, channels_last, num_classes, spatial_shape, sum_tolerance)
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    return ProbabilityVolume(case_name(path), probs, geometry, path)


def load_labels(path: str | os.PathLike, *, reader: str = "auto") -> LabelVolume:
    """Read an integer label map ``(x, y, z)`` plus its geometry.

    Integer files keep their dtype (no int64 copy of a large uint8 volume); integral floats become int64;
    non-integral values are an error.
    """
    path = Path(path)
    _readable(path)
    ext = _extension(path)
    if ext not in LABEL_EXTENSIONS:
        raise VolumeError(f"{path}: unknown label file type; use one of {', '.join(LABEL_EXTENSIONS)}")
    if _default_reader(path, reader) == "nibabel":
        data, img = _nifti_arrays(path, as_float=False)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        geometry = Geometry.from_nifti(img.affine, data.shape[:3], header=img.header.copy(), nifti_class=type(img))
    else:
        data, geometry, vector = _sitk_arrays(path)
        if vector:
            raise VolumeError(f"{path}: a vector image is not a label map")
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: label map of shape {data.shape}; expected a 3D volume of integer labels")
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise VolumeError(f"{path}: label map holds non-integer values; pass integer labels, not probabilities")
        data = data.astype(np.int64)
    elif data.dtype.kind not in "iu":
        raise VolumeError(f"{path}: label map of dtype {data.dtype}; expected integers")
    return LabelVolume(case_name(path), np.ascontiguousarray(data), geometry, path)


# ------------------------------------------------------------------------------------------------- checks


def check_same_grid(probs: Geometry, labels: Geometry, case: str, atol: float = 1e-3) -> None:
    """Raise :class:`VolumeError` if the label grid differs from the probability grid (shape or affine)."""
    if probs.shape != labels.shape:
        raise VolumeError(f"case {case!r}: probabilities have spatial shape {probs.shape} but labels {labels.shape}; "
                          "pair the right files, or resample the labels to the probability grid (e.g. "
                          "monai.transforms.ResampleToMatch with mode='nearest')")
    if not probs.same_grid(labels, atol=atol):
        raise VolumeError(f"case {case!r}: probabilities and labels are on different grids (probabilities: "
                          f"{probs.describe()}; labels: {labels.describe()}); pair the right files, or resample the "
                          "labels onto the probability grid (monai.transforms.ResampleToMatch, mode='nearest')")


def show_value(value: float, dtype: Any = np.float64) -> str:
    """The shortest text that reads back as the same ``dtype`` value, so an overshoot shows:
    ``show_value(np.float32(1) + np.float32(1e-7), np.float32)`` is ``'1.0000001'`` (not ``'1'``).

    >>> show_value(1.0000001192092896, "float32"), show_value(1.0), show_value(-3.5e-9)
    ('1.0000001', '1', '-3.5e-09')
    """
    v = np.asarray(value, dtype=np.dtype(dtype))[()]
    if v == 0 or 1e-4 <= abs(float(v)) < 1e7 or not np.isfinite(v):
        return np.format_float_positional(v, unique=True, trim="-")
    return np.format_float_scientific(v, unique=True, trim="-", exp_digits=2)


def _value_range(probs: np.ndarray) -> tuple[float, float, str, str]:
    lo, hi = probs.min(), probs.max()
    dtype = probs.dtype if probs.dtype.kind == "f" else np.float64
    return float(lo), float(hi), show_value(lo, dtype), show_value(hi, dtype)


def _check_tolerance(sum_tolerance: float) -> float:
    tol = float(sum_tolerance)
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"sum_tolerance (--sum-tolerance) must be a finite number >= 0, got {sum_tolerance}")
    return tol


def validate_probabilities(probs: np.ndarray, *, where: str, output_mode: str = "multiclass",
                           sum_tolerance: float = 1e-2) -> None:
    """Finite, within [0, 1], and (multiclass, C > 1) summing to one across classes within ``sum_tolerance``.

    Values just outside ``[0, 1]`` (by at most ``0.01``: float32 rounding, spline interpolation) are told apart
    from logits: the message suggests ``--clamp`` for them and ``--softmax``/``--sigmoid`` only for values far
    outside; both print enough digits to show the overshoot.
    """
    tol = _check_tolerance(sum_tolerance)
    probs = np.asarray(probs)
    if probs.size == 0:
        raise VolumeError(f"{where}: no voxels (shape {probs.shape}); export the volume again")
    if not np.all(np.isfinite(probs)):
        raise VolumeError(f"{where}: probabilities contain NaN or inf; check the model export")
    lo, hi, lo_text, hi_text = _value_range(probs)
    if lo < 0.0 or hi > 1.0:
        if lo >= -CLAMP_TOLERANCE and hi <= 1.0 + CLAMP_TOLERANCE:
            raise VolumeError(f"{where}: values slightly outside [0, 1] (min {lo_text}, max {hi_text}): a rounding "
                              "or interpolation overshoot of probabilities, not logits; pass --clamp to clip them "
                              f"to [0, 1] (overshoots up to {CLAMP_TOLERANCE:g} are clipped)")
        raise SettingsError(f"{where}: values outside [0, 1] (min {lo_text}, max {hi_text}): these look like logits; "
                            "pass --softmax (multiclass) or --sigmoid (multilabel)")
    if output_mode == "multiclass" and probs.shape[0] > 1:
        total = probs.sum(axis=0, dtype=np.float64)
        err = float(np.max(np.abs(total - 1.0)))
        if err > tol:
            raise VolumeError(f"{where}: class probabilities do not sum to 1 (largest deviation {err:.3g} > "
                              f"{tol:g}); pass --softmax if these are logits, or --output-mode multilabel "
                              "for independent (sigmoid) class probabilities")


def clip_overshoot(probs: np.ndarray, *, where: str) -> np.ndarray:
    """``probs`` clipped to ``[0, 1]`` (``--clamp``); values further than ``0.01`` outside are not an overshoot but
    logits or a broken export: a :class:`VolumeError`."""
    probs = np.asarray(probs)
    if probs.size and np.all(np.isfinite(probs)):
        lo, hi, lo_text, hi_text = _value_range(probs)
        if lo < -CLAMP_TOLERANCE or hi > 1.0 + CLAMP_TOLERANCE:
            raise SettingsError(f"{where}: values reach min {lo_text}, max {hi_text}, more than {CLAMP_TOLERANCE:g} "
                                "outside [0, 1]: --clamp only clips small overshoots; these look like logits: pass "
                                "--softmax or --sigmoid instead")
        if lo < 0.0 or hi > 1.0:
            return np.clip(probs, 0.0, 1.0)
    return probs


def check_logits(values: np.ndarray, *, where: str, activation: str, sum_tolerance: float = 1e-2) -> None:
    """Refuse to apply ``activation`` (``"softmax"``/``"sigmoid"``) to values that already look like
    probabilities (all within ``[0, 1]``, give or take a ``0.01`` overshoot): applying it again silently changes the
    decisions."""
    values = np.asarray(values)
    if not looks_like_probabilities(values):
        return
    lo, hi, lo_text, hi_text = _value_range(values)
    near = "" if lo >= 0.0 and hi <= 1.0 else f" (give or take a {CLAMP_TOLERANCE:g} rounding overshoot)"
    what = f"every value lies in [0, 1]{near} (min {lo_text}, max {hi_text})"
    if values.shape[0] > 1:
        err = float(np.max(np.abs(values.sum(axis=0, dtype=np.float64) - 1.0)))
        if err <= _check_tolerance(sum_tolerance):
            what += " and the classes sum to 1"
    raise SettingsError(f"{where}: --{activation} was given, but {what}: these look like probabilities already, and "
                        f"a {activation} over probabilities changes the masks; drop --{activation}, or pass "
                        "--force-activation if these really are logits")


# ------------------------------------------------------------------------------------------------ writers


def mask_dtype(mask: np.ndarray) -> np.dtype:
    """The narrowest of uint8, int16, int32 that holds the values of ``mask``."""
    if mask.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(mask.min()), int(mask.max())
    dtype = smallest_label_dtype(lo, hi)
    if dtype.itemsize > 4:
        raise VolumeError(f"label values [{lo}, {hi}] do not fit in int32")
    return numpy_dtype(dtype)


def mask_path(outdir: str | os.PathLike, case: str, fmt: str) -> Path:
    fmt = fmt.lstrip(".").lower()
    if fmt not in OUTPUT_FORMATS:
        raise VolumeError(f"unknown output format {fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    return Path(outdir) / f"{case}.{fmt}"


def _file_layout(mask: np.ndarray) -> np.ndarray:
    """The mask as the file holds it: the narrowest integer dtype, ``(C, x, y, z)`` masks as ``(x, y, z, C)``."""
    dtype = np.uint8 if mask.dtype == np.bool_ else mask_dtype(mask)
    data = np.asarray(mask, dtype=dtype)
    return np.moveaxis(data, 0, -1) if data.ndim == 4 else data


def _write_nifti(data: np.ndarray, geometry: Geometry, tmp: str) -> None:
    import nibabel as nib

    cls = geometry.nifti_class or nib.Nifti1Image
    if geometry.header is not None:
        header = geometry.header.copy()
        img = cls(data, geometry.affine, header=header)
        img.header.set_qform(*geometry.header.get_qform(coded=True))
        img.header.set_sform(*geometry.header.get_sform(coded=True))
        img.header.set_intent("none")
        img.header["pixdim"][data.ndim + 1:] = 1.0
        img.header["cal_min"] = img.header["cal_max"] = 0
    else:
        img = cls(data, geometry.affine)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp)


def _write_sitk(data: np.ndarray, geometry: Geometry, tmp: str) -> None:
    import SimpleITK as sitk

    if data.ndim == 4:  # (x, y, z, C) -> vector image, numpy (z, y, x, C)
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0, 3))), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    spacing, origin, direction = geometry.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, sitk_path(tmp), True)


def read_mask(path: str | os.PathLike, reader: str = "auto") -> tuple[np.ndarray, Geometry]:
    """A mask file as written by :func:`save_mask`: the label map ``(x, y, z)`` or the per-class masks in file
    layout ``(x, y, z, C)``, in the file's dtype, plus its geometry."""
    path = Path(path)
    if _default_reader(path, reader) == "nibabel":
        import nibabel as nib

        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        return data, Geometry.from_nifti(img.affine, data.shape[:3])
    import SimpleITK as sitk

    img = sitk.ReadImage(sitk_path(path))
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, C) for a vector image
    order = (2, 1, 0, 3) if img.GetNumberOfComponentsPerPixel() > 1 else (2, 1, 0)
    data = np.transpose(arr, order)
    return data, Geometry.from_sitk(img.GetSpacing(), img.GetOrigin(), img.GetDirection(), data.shape[:3])


def _verify(target: Path, tmp: str, data: np.ndarray, geometry: Geometry, reader: str) -> None:
    """Read the written file back: same values, shape, dtype and grid, else a :class:`VolumeError` (and the caller
    leaves nothing)."""
    fix = ("; nothing was written for this case (is the disk full or failing? free space and run the same command "
           "again)")
    try:
        back, grid = read_mask(tmp, reader)
    except Exception as exc:  # nibabel/SimpleITK raise many types for a truncated file
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise VolumeError(f"{target}: the written file cannot be read back ({type(exc).__name__}: {reason})"
                          f"{fix}") from exc
    if back.shape != data.shape or back.dtype != data.dtype or not np.array_equal(back, data):
        what = ", other values" if back.shape == data.shape and back.dtype == data.dtype else ""
        raise VolumeError(f"{target}: the written file does not read back as written (shape {back.shape} "
                          f"{back.dtype}, expected {data.shape} {data.dtype}{what}){fix}")
    if not grid.same_grid(geometry):
        raise VolumeError(f"{target}: the written file reads back on another grid ({grid.describe()}, expected "
                          f"{geometry.describe()}){fix}")


def stage_mask(mask: np.ndarray, geometry: Geometry, path: str | os.PathLike, *, overwrite: bool = False,
               protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a mask to a hidden temporary beside ``path``, flush it and read it back (:func:`save_mask` without the
    final rename).  Returns the temporary: move it into place with :func:`rankseg_monai._files.commit` (or remove
    it with :func:`rankseg_monai._files.discard`)."""
    mask = np.asarray(mask)
    if mask.dtype.kind not in "biu":
        raise VolumeError(f"a mask must be integer or bool, got {mask.dtype}")
    if tuple(mask.shape[-3:]) != geometry.shape or mask.ndim not in (3, 4):
        raise VolumeError(f"mask of shape {mask.shape} does not fit the grid {geometry.shape}")
    path = Path(path)
    ext = _extension(path)
    if ext not in (".nii.gz", ".nii", ".mha", ".nrrd"):
        raise VolumeError(f"{path}: masks are written as {', '.join(OUTPUT_FORMATS)}")
    check_target(path, overwrite=overwrite, protected=protected)
    nifti = ext in _NIFTI_EXTENSIONS and geometry.kind == "nibabel"
    writer, reader = (_write_nifti, "nibabel") if nifti else (_write_sitk, "sitk")
    data = _file_layout(mask)
    return stage(path, lambda tmp: writer(data, geometry, tmp),
                 verify=lambda tmp: _verify(path, tmp, data, geometry, reader))


def save_mask(mask: np.ndarray, geometry: Geometry, path: str | os.PathLike, *, overwrite: bool = False,
              protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a label map ``(x, y, z)`` or per-class masks ``(C, x, y, z)`` (as ``X, Y, Z, C``) atomically, verified.

    The format comes from ``path``'s extension (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``).  NIfTI from a
    NIfTI-read input keeps the input header (qform/sform codes included); otherwise SimpleITK writes the
    native (or converted) spacing/origin/direction.  dtype: uint8 when the labels fit, else int16/int32.  The file
    is read back before it is moved into place (same values, dtype, shape and grid): a writer that fails silently
    (e.g. a truncated file on a full disk) raises a :class:`VolumeError` and leaves nothing.
    """
    tmp = stage_mask(mask, geometry, path, overwrite=overwrite, protected=protected)
    try:
        return commit(tmp, path)
    finally:
        discard(tmp)


# ------------------------------------------------------------------------------------------- dataset.json


@dataclass(frozen=True)
class DatasetJson:
    """What an nnU-Net v2 ``dataset.json`` says about the labels.

    Attributes:
        class_names: label value -> name (the ``labels`` entries holding one label, background included; not the
            ``ignore`` label).
        regions: ``{name: [labels]}`` when the dataset is region-based (some entry of ``labels`` is a list, as nnU-Net
            decides it), else ``None``.
        regions_class_order: nnU-Net's ``regions_class_order`` (the label painted for each region), or ``None``.
        ignore_label: nnU-Net's ``"ignore"`` label (voxels not annotated; it must be the largest label), or
            ``None``.  nnU-Net leaves it out of the classes and its voxels out of every metric.
    """

    class_names: dict[int, str]
    regions: dict[str, list[int]] | None
    regions_class_order: list[int] | None
    ignore_label: int | None = None

    @property
    def region_based(self) -> bool:
        """Whether nnU-Net trained region-wise: its ``--save_probabilities`` output holds one sigmoid per region."""
        return self.regions is not None


def read_dataset_json(path: str | os.PathLike) -> DatasetJson:
    """Read the ``labels`` (with region lists and the ``ignore`` label) and ``regions_class_order`` of an nnU-Net
    ``dataset.json`` (UTF-8, with or without a byte-order mark).  Labels follow one rule with ``--regions``
    (:func:`rankseg_monai.solvers.regions.check_label`: integers in ``[0, 65535]``).

    Example:
        >>> import json, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "dataset.json"
        >>> _ = path.write_text(json.dumps({"labels": {"background": 0, "whole_tumor": [1, 2, 3],
        ...     "tumor_core": [2, 3], "enhancing_tumor": 3}, "regions_class_order": [1, 2, 3]}))
        >>> d = read_dataset_json(path)
        >>> d.regions, d.regions_class_order
        ({'whole_tumor': [1, 2, 3], 'tumor_core': [2, 3], 'enhancing_tumor': [3]}, [1, 2, 3])
    """
    import json

    from ..solvers.regions import check_label

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: Windows editors write a byte-order mark
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read the dataset.json ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VolumeError(f"{path}: not a JSON file ({exc}); pass nnU-Net's dataset.json") from None
    except RecursionError:
        raise VolumeError(f"{path}: nested too deeply to be a dataset.json; pass nnU-Net's dataset.json") from None
    labels = doc.get("labels") if isinstance(doc, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise VolumeError(f"{path}: no 'labels' mapping; nnU-Net v2's dataset.json has e.g. "
                          '"labels": {"background": 0, "liver": 1, "tumour": 2}')

    def as_labels(name: str, value: Any) -> list[int]:
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise VolumeError(f"{path}: label {name!r} must be an integer or a list of integers, got {value!r}")
        try:
            return [check_label(v, f"label {name!r}") for v in items]
        except ValueError as exc:
            raise VolumeError(f"{path}: {exc}") from None

    parsed = {str(k): as_labels(str(k), v) for k, v in labels.items()}
    ignore = parsed.pop("ignore", None)
    if ignore is not None:
        if len(ignore) != 1:
            raise VolumeError(f"{path}: the ignore label must be one integer, got {labels['ignore']!r}")
        others = [v for vals in parsed.values() for v in vals]
        if others and ignore[0] <= max(others):
            raise VolumeError(f"{path}: the ignore label {ignore[0]} must be the largest label (nnU-Net requires it; "
                              f"the largest other label is {max(others)})")
    region_based = any(isinstance(v, list | tuple) and len(v) > 1 for k, v in labels.items() if k != "ignore")
    class_names = {v[0]: k for k, v in parsed.items() if len(v) == 1}
    regions = {k: v for k, v in parsed.items() if v != [0]} if region_based else None
    order = doc.get("regions_class_order")
    if order is not None:
        if not isinstance(order, list):
            raise VolumeError(f"{path}: regions_class_order must be a list of integers, got {order!r}")
        try:
            order = [check_label(v, "regions_class_order") for v in order]
        except ValueError as exc:
            raise VolumeError(f"{path}: {exc}") from None
    if region_based and order is None:
        raise VolumeError(f"{path}: a region-based dataset.json needs regions_class_order (nnU-Net requires it too)")
    return DatasetJson(class_names, regions, order, ignore[0] if ignore else None)
