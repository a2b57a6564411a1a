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

Writes (:func:`save_mask`) are atomic: the file is written to a hidden temporary file in the target folder and
moved into place with :func:`os.replace`, so an interrupted run never leaves a truncated mask; a target that is
one of the ``protected`` input paths is refused.
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
from .._files import VolumeError, atomic_write
from ..options import smallest_label_dtype

__all__ = [
    "PROBABILITY_EXTENSIONS",
    "LABEL_EXTENSIONS",
    "OUTPUT_FORMATS",
    "VolumeError",
    "Geometry",
    "ProbabilityVolume",
    "LabelVolume",
    "case_name",
    "find_cases",
    "companion_files",
    "load_probabilities",
    "load_labels",
    "load_nnunet_properties",
    "save_mask",
    "mask_path",
    "mask_dtype",
    "check_same_grid",
    "validate_probabilities",
    "atomic_write",
]

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
PROBABILITY_EXTENSIONS = (*IMAGE_EXTENSIONS, ".npz")
LABEL_EXTENSIONS = IMAGE_EXTENSIONS
OUTPUT_FORMATS = ("nii.gz", "nii", "mha", "nrrd")
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


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
        return f"shape {self.shape}, spacing ({spacing}) mm, RAS origin ({origin})"


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
                    out.append(path.with_name(value))
        return out
    return []


def find_cases(inputs: Iterable[str | os.PathLike], extensions: Sequence[str] = PROBABILITY_EXTENSIONS
               ) -> list[Path]:
    """Files given directly or found (non-recursively) in folders, sorted per folder.

    In a folder, a case with an nnU-Net ``.npz`` is read from it and its other files (nnU-Net's own argmax
    segmentation ``<case>.nii.gz``) are ignored.  Hidden files and our temporary files are skipped.  Two files
    with the same case name are an error (the masks would collide).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                           and _extension(p) in extensions)
            with_npz = {case_name(p) for p in files if _extension(p) == ".npz"}
            found.extend(p for p in files if _extension(p) == ".npz" or case_name(p) not in with_npz)
        elif path.is_file():
            if _extension(path) not in extensions:
                raise VolumeError(f"{path}: unknown file type; use one of {', '.join(extensions)}")
            found.append(path)
        else:
            raise VolumeError(f"{path}: no such file or folder; check the path (and the current directory)")
    seen: dict[str, Path] = {}
    for path in found:
        name = case_name(path)
        if name in seen:
            raise VolumeError(f"two inputs have the case name {name!r}: {seen[name]} and {path}; the masks would "
                              "overwrite each other: pass only one of them")
        seen[name] = path
    return found


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
    return data, img


def _sitk_arrays(path: Path) -> tuple[np.ndarray, Geometry, bool]:
    """Array in ITK index order (x, y, z[, extra]) plus 3D geometry; the bool tells a vector image."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img)
    except Exception as exc:  # SimpleITK raises RuntimeError with a long ITK trace
        raise _corrupt(path, exc) from exc
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


def _pick_channel_axis(path: Path, shape: tuple[int, ...], channels_last: bool | None,
                       num_classes: int | None) -> bool:
    first, last = shape[0], shape[-1]
    if channels_last is not None:
        size = last if channels_last else first
        if num_classes is not None and size != num_classes:
            raise VolumeError(f"{path}: shape {shape} has {size} classes on its {'last' if channels_last else 'first'}"
                              f" axis, but {num_classes} classes were expected; check --channels-last/--classes")
        return channels_last
    if num_classes is not None:
        if last == num_classes:
            return True
        if first == num_classes:
            return False
        raise VolumeError(f"{path}: shape {shape} has no end axis of size {num_classes} (the number of classes); "
                          "check the file or the class count")
    if last < min(shape[:-1]):
        return True
    if first < min(shape[1:]):
        return False
    raise VolumeError(f"{path}: cannot tell which axis of shape {shape} holds the classes; pass --channels-last "
                      "(X, Y, Z, C) or --channels-first (C, X, Y, Z)")


def _to_channel_first(path: Path, arr: np.ndarray, channels_last: bool | None,
                      num_classes: int | None) -> tuple[np.ndarray, bool]:
    """(x, y, z[, c]) or (c, x, y, z) -> (C, x, y, z); the bool says whether the file was channel-last."""
    if arr.ndim == 3:
        if num_classes not in (None, 1):
            raise VolumeError(f"{path}: a 3D volume holds one channel, but {num_classes} classes were expected")
        return arr[None], True
    if arr.ndim == 5 and arr.shape[3] == 1:  # NIfTI vector convention (X, Y, Z, 1, C)
        arr = arr[:, :, :, 0]
    if arr.ndim != 4:
        raise VolumeError(f"{path}: array of shape {arr.shape} is not a 3D volume with a class axis; expected "
                          "(X, Y, Z, C) or (C, X, Y, Z)")
    last = _pick_channel_axis(path, arr.shape, channels_last, num_classes)
    return (np.moveaxis(arr, -1, 0) if last else arr), last


class _SafeUnpickler(pickle.Unpickler):
    """Plain Python containers and numpy arrays/scalars only: a ``.pkl`` from elsewhere cannot run code."""

    _NUMPY_NAMES = {"_reconstruct", "scalar", "_frombuffer", "ndarray", "dtype"}
    _BUILTINS = {"tuple", "list", "dict", "set", "frozenset", "slice", "complex", "bytearray", "range"}

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                        "numpy._core.numeric") and name in self._NUMPY_NAMES)
            or (module == "numpy.dtypes" and name.endswith("DType"))
            or (module == "builtins" and name in self._BUILTINS)
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_nnunet_properties(path: str | os.PathLike) -> dict:
    """The properties dict nnU-Net v2 pickles next to ``<case>.npz`` (allow-list unpickler)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found; nnU-Net writes <case>.pkl next to <case>.npz with "
                          "--save_probabilities: copy it next to the .npz (it holds the geometry)")
    try:
        with open(path, "rb") as fh:
            props = _SafeUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise VolumeError(f"{path}: not an nnU-Net properties file ({exc}); only containers and numpy arrays are "
                          "loaded") from exc
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    if not isinstance(props, dict):
        raise VolumeError(f"{path}: expected a dict of nnU-Net case properties, got {type(props).__name__}")
    return props


def _load_npz(path: Path, num_classes: int | None) -> ProbabilityVolume:
    import nibabel as nib

    props = load_nnunet_properties(path.with_name(case_name(path) + ".pkl"))
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
    if num_classes is not None and arr.shape[0] != num_classes:
        raise VolumeError(f"{path}: {arr.shape[0]} classes, expected {num_classes}")
    arr = np.ascontiguousarray(np.transpose(arr, (0, 3, 2, 1)))  # nnU-Net (C, z, y, x) -> (C, x, y, z)
    if "sitk_stuff" in props:
        s = props["sitk_stuff"]
        geometry = Geometry.from_sitk(s["spacing"], s["origin"], s["direction"], arr.shape[1:])
    elif "nibabel_stuff" in props:
        s = props["nibabel_stuff"]
        original = np.asarray(s["original_affine"], dtype=np.float64)
        if "reoriented_affine" in s:  # NibabelIOWithReorient: the array is in the RAS-reoriented frame
            from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

            back = ornt_transform(axcodes2ornt("RAS"), io_orientation(original))
            spatial = arr.shape[1:]
            arr = np.ascontiguousarray(np.moveaxis(
                nib.orientations.apply_orientation(np.moveaxis(arr, 0, -1), back), -1, 0))
            restored = np.asarray(s["reoriented_affine"], dtype=np.float64) @ inv_ornt_aff(back, spatial)
            if not np.allclose(restored, original, atol=1e-4):
                raise VolumeError(f"{path}: reorienting back to the original affine failed (nnU-Net "
                                  "NibabelIOWithReorient properties are inconsistent)")
        geometry = Geometry.from_nifti(original, arr.shape[1:])
    else:
        raise VolumeError(f"{path.with_suffix('.pkl')}: neither 'sitk_stuff' nor 'nibabel_stuff' in the properties "
                          f"(keys: {sorted(props)}); is this nnU-Net v2 output?")
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
                       num_classes: int | None = None, reader: str = "auto") -> ProbabilityVolume:
    """Read one case's probabilities as ``(C, x, y, z)`` float32 plus its geometry.

    Args:
        path: a NIfTI/MHA/MHD/NRRD file, or an nnU-Net ``<case>.npz`` (with ``<case>.pkl`` beside it).
        channels_last: for 4D files, whether the classes are on the last file axis (``X, Y, Z, C``, NIfTI and
            MONAI convention) or the first (``C, X, Y, Z``); ``None`` decides (see the module docstring).
        num_classes: expected class count (checked; also used to find the class axis).
        reader: ``"auto"`` (nibabel for NIfTI, SimpleITK otherwise), ``"nibabel"`` or ``"sitk"``.
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
        probs, _ = _to_channel_first(path, data, channels_last, num_classes)
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
            probs, _ = _to_channel_first(path, arr, channels_last, num_classes)
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


def validate_probabilities(probs: np.ndarray, *, where: str, output_mode: str = "multiclass",
                           sum_tolerance: float = 1e-2) -> None:
    """Finite, within [0, 1], and (multiclass, C > 1) summing to one across classes within ``sum_tolerance``."""
    if not np.all(np.isfinite(probs)):
        raise VolumeError(f"{where}: probabilities contain NaN or inf; check the model export")
    lo, hi = float(probs.min()), float(probs.max())
    if lo < 0.0 or hi > 1.0:
        raise VolumeError(f"{where}: values outside [0, 1] (min {lo:.4g}, max {hi:.4g}): these look like logits; "
                          "pass --softmax (multiclass) or --sigmoid (multilabel)")
    if output_mode == "multiclass" and probs.shape[0] > 1:
        total = probs.sum(axis=0, dtype=np.float64)
        err = float(np.max(np.abs(total - 1.0)))
        if err > sum_tolerance:
            raise VolumeError(f"{where}: class probabilities do not sum to 1 (largest deviation {err:.3g} > "
                              f"{sum_tolerance:g}); pass --softmax if these are logits, or --output-mode multilabel "
                              "for independent (sigmoid) class probabilities")


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


def _write_nifti(mask: np.ndarray, geometry: Geometry, tmp: str) -> None:
    import nibabel as nib

    dtype = np.uint8 if mask.dtype == np.bool_ else mask_dtype(mask)
    data = np.asarray(mask, dtype=dtype)
    if data.ndim == 4:  # (C, x, y, z) -> NIfTI (x, y, z, C)
        data = np.moveaxis(data, 0, -1)
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
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp)


def _write_sitk(mask: np.ndarray, geometry: Geometry, tmp: str) -> None:
    import SimpleITK as sitk

    dtype = np.uint8 if mask.dtype == np.bool_ else mask_dtype(mask)
    data = np.asarray(mask, dtype=dtype)
    if data.ndim == 4:  # (C, x, y, z) -> vector image, numpy (z, y, x, C)
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0))), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    spacing, origin, direction = geometry.sitk_geometry()
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, tmp, True)


def save_mask(mask: np.ndarray, geometry: Geometry, path: str | os.PathLike, *, overwrite: bool = False,
              protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a label map ``(x, y, z)`` or per-class masks ``(C, x, y, z)`` (as ``X, Y, Z, C``) atomically.

    The format comes from ``path``'s extension (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``).  NIfTI from a
    NIfTI-read input keeps the input header (qform/sform codes included); otherwise SimpleITK writes the
    native (or converted) spacing/origin/direction.  dtype: uint8 when the labels fit, else int16/int32.
    """
    mask = np.asarray(mask)
    if mask.dtype.kind not in "biu":
        raise VolumeError(f"a mask must be integer or bool, got {mask.dtype}")
    if tuple(mask.shape[-3:]) != geometry.shape or mask.ndim not in (3, 4):
        raise VolumeError(f"mask of shape {mask.shape} does not fit the grid {geometry.shape}")
    path = Path(path)
    ext = _extension(path)
    if ext not in (".nii.gz", ".nii", ".mha", ".nrrd"):
        raise VolumeError(f"{path}: masks are written as {', '.join(OUTPUT_FORMATS)}")
    if ext in _NIFTI_EXTENSIONS and geometry.kind == "nibabel":
        writer = _write_nifti
    else:
        writer = _write_sitk
    return atomic_write(path, lambda tmp: writer(mask, geometry, tmp), overwrite=overwrite, protected=protected)
