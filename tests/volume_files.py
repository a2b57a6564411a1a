"""Writers and readers of the real NIfTI, MHA/NRRD and nnU-Net files of the app tests, with their geometry (the
volumes themselves come from ``generators.make_case``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def nifti_affine(spacing=(0.8, 1.3, 2.5), angles=(0.2, -0.3, 0.5), origin=(10.5, -20.25, 3.3)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rotation(*angles) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


ITK_SPACING = (0.7, 0.9, 3.0)
ITK_ORIGIN = (-12.5, 40.25, 7.125)
ITK_DIRECTION = tuple(rotation(-0.4, 0.1, 0.25).ravel())


def write_nifti_probs(path: Path, probs: np.ndarray, affine: np.ndarray, channels_last: bool = True) -> Path:
    data = np.moveaxis(probs, 0, -1) if channels_last else probs
    img = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    nib.save(img, str(path))
    return path


def write_nifti_labels(path: Path, label: np.ndarray, affine: np.ndarray, dtype=np.uint8) -> Path:
    img = nib.Nifti1Image(label.astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def _sitk_image(arr_xyz: np.ndarray, vector: bool, spacing, origin, direction) -> sitk.Image:
    if vector:  # (C, x, y, z) -> numpy (z, y, x, C)
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr_xyz, (3, 2, 1, 0))), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr_xyz, (2, 1, 0))))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def write_sitk_probs(path: Path, probs: np.ndarray, spacing=ITK_SPACING, origin=ITK_ORIGIN,
                     direction=ITK_DIRECTION) -> Path:
    sitk.WriteImage(_sitk_image(probs.astype(np.float32), True, spacing, origin, direction), str(path))
    return path


def write_sitk_labels(path: Path, label: np.ndarray, spacing=ITK_SPACING, origin=ITK_ORIGIN,
                      direction=ITK_DIRECTION) -> Path:
    sitk.WriteImage(_sitk_image(label.astype(np.uint8), False, spacing, origin, direction), str(path), True)
    return path


def write_nnunet_case(folder: Path, case: str, probs: np.ndarray, spacing=ITK_SPACING, origin=ITK_ORIGIN,
                      direction=ITK_DIRECTION, nibabel_affine: np.ndarray | None = None) -> Path:
    """nnU-Net v2 --save_probabilities layout: <case>.npz (C, z, y, x), <case>.pkl, and its argmax <case>.nii.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{case}.npz", probabilities=np.transpose(probs, (0, 3, 2, 1)).astype(np.float32))
    shape_zyx = tuple(int(s) for s in probs.shape[1:][::-1])
    props = {
        "spacing": [float(s) for s in spacing[::-1]],
        "shape_before_cropping": shape_zyx,
        "bbox_used_for_cropping": [[0, s] for s in shape_zyx],
        "shape_after_cropping_and_before_resampling": shape_zyx,
    }
    if nibabel_affine is None:
        props["sitk_stuff"] = {"spacing": tuple(spacing), "origin": tuple(origin), "direction": tuple(direction)}
        seg = _sitk_image(np.argmax(probs, 0).astype(np.uint8), False, spacing, origin, direction)
        sitk.WriteImage(seg, str(folder / f"{case}.nii.gz"))
    else:
        props["nibabel_stuff"] = {"original_affine": np.asarray(nibabel_affine, dtype=np.float64)}
        nib.save(nib.Nifti1Image(np.argmax(probs, 0).astype(np.uint8), nibabel_affine), str(folder / f"{case}.nii.gz"))
    with open(folder / f"{case}.pkl", "wb") as fh:
        pickle.dump(props, fh)
    (folder / "dataset.json").write_text('{"labels": {"background": 0}}')
    return folder / f"{case}.npz"


def sitk_xyz(path: Path) -> np.ndarray:
    """A 3D image file as a numpy array in (x, y, z) order."""
    return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []
