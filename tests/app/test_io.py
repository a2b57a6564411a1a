"""rankseg_monai.app.io on real files: readers, geometry round trips, atomic writes, clear errors."""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from generators import make_case
from volume_files import (
    ITK_DIRECTION,
    ITK_ORIGIN,
    ITK_SPACING,
    files_in,
    nifti_affine,
    sitk_xyz,
    write_nifti_probs,
    write_nnunet_case,
    write_sitk_labels,
    write_sitk_probs,
)

from rankseg_monai.app import io as rio


@pytest.fixture(scope="module")
def case():
    return make_case(seed=1)


def test_nifti_channels_last_read_and_exact_write(tmp_path, case):
    probs, _, _ = case
    affine = nifti_affine()
    src = write_nifti_probs(tmp_path / "case_a.nii.gz", probs, affine)
    vol = rio.load_probabilities(src)
    assert vol.case == "case_a"
    assert vol.probabilities.dtype == np.float32 and vol.probabilities.shape == probs.shape
    np.testing.assert_array_equal(vol.probabilities, probs)
    on_disk = nib.load(str(src))
    np.testing.assert_array_equal(vol.geometry.affine, on_disk.affine)
    np.testing.assert_allclose(vol.spacing, (0.8, 1.3, 2.5), rtol=1e-6)

    mask = probs.argmax(0)
    out = rio.save_mask(mask, vol.geometry, tmp_path / "out" / "case_a.nii.gz")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8 and back.shape == probs.shape[1:]
    np.testing.assert_array_equal(np.asarray(back.dataobj), mask)
    np.testing.assert_array_equal(back.affine, on_disk.affine)
    for coded in ("get_qform", "get_sform"):
        m_in, code_in = getattr(on_disk.header, coded)(coded=True)
        m_out, code_out = getattr(back.header, coded)(coded=True)
        np.testing.assert_array_equal(m_out, m_in)
        assert code_out == code_in
    assert back.header.get_xyzt_units() == on_disk.header.get_xyzt_units()
    assert files_in(tmp_path / "out") == ["case_a.nii.gz"]  # no temporary file left


def test_channel_axis_detection(tmp_path, case):
    probs, _, _ = case
    affine = nifti_affine()
    first = write_nifti_probs(tmp_path / "first.nii.gz", probs, affine, channels_last=False)
    np.testing.assert_array_equal(rio.load_probabilities(first).probabilities, probs)  # smaller end axis
    np.testing.assert_array_equal(rio.load_probabilities(first, channels_last=False).probabilities, probs)
    np.testing.assert_array_equal(rio.load_probabilities(first, num_classes=3).probabilities, probs)
    with pytest.raises(rio.VolumeError, match="16 classes on its last axis, but 3"):
        rio.load_probabilities(first, channels_last=True, num_classes=3)
    # ambiguous: both end axes large
    big = np.zeros((40, 4, 4, 40), np.float32)
    nib.save(nib.Nifti1Image(big, affine), str(tmp_path / "amb.nii.gz"))
    with pytest.raises(rio.VolumeError, match="--channels-last"):
        rio.load_probabilities(tmp_path / "amb.nii.gz")
    # NIfTI vector convention (X, Y, Z, 1, C)
    five = np.moveaxis(probs, 0, -1)[:, :, :, None, :]
    nib.save(nib.Nifti1Image(five, affine), str(tmp_path / "five.nii.gz"))
    np.testing.assert_array_equal(rio.load_probabilities(tmp_path / "five.nii.gz").probabilities, probs)
    # a 3D file is one foreground channel
    nib.save(nib.Nifti1Image(probs[1], affine), str(tmp_path / "fg.nii"))
    fg = rio.load_probabilities(tmp_path / "fg.nii")
    assert fg.probabilities.shape == (1, *probs.shape[1:]) and fg.case == "fg"


def test_sitk_reader_agrees_with_nibabel(tmp_path, case):
    probs, _, _ = case
    src = write_nifti_probs(tmp_path / "c.nii.gz", probs, nifti_affine())
    a = rio.load_probabilities(src, reader="nibabel")
    b = rio.load_probabilities(src, reader="sitk")  # a 4D ITK image: classes on the 4th axis
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert b.geometry.kind == "sitk" and a.geometry.same_grid(b.geometry)
    np.testing.assert_allclose(a.geometry.affine, b.geometry.affine, atol=1e-5)


@pytest.mark.parametrize("in_ext", ["mha", "nrrd"])
def test_sitk_vector_read_and_exact_geometry(tmp_path, case, in_ext):
    probs, _, _ = case
    src = write_sitk_probs(tmp_path / f"v.{in_ext}", probs)
    vol = rio.load_probabilities(src)
    np.testing.assert_array_equal(vol.probabilities, probs)
    ref = sitk.ReadImage(str(src))
    assert vol.geometry.itk_spacing == ref.GetSpacing() and vol.spacing == ref.GetSpacing()
    mask = probs.argmax(0)
    # MHA stores spacing and direction as given: bit-exact.  NRRD stores spacing x direction products (exact to
    # 1 ulp) and NIfTI stores float32, so those are as exact as the format allows.
    for fmt, atol in (("mha", 0.0), ("nrrd", 1e-14), ("nii.gz", 1e-6)):
        out = rio.save_mask(mask, vol.geometry, tmp_path / "out" / f"v.{fmt}")
        img = sitk.ReadImage(str(out))
        if atol == 0.0:
            assert (img.GetSpacing(), img.GetOrigin(), img.GetDirection()) == (
                ref.GetSpacing(), ref.GetOrigin(), ref.GetDirection())
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), rtol=0, atol=atol)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), rtol=0, atol=atol * 100)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), rtol=0, atol=atol)
        assert img.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk_xyz(out), mask)


def test_cross_format_geometry(tmp_path, case):
    probs, _, _ = case
    src = write_nifti_probs(tmp_path / "c.nii.gz", probs, nifti_affine())
    vol = rio.load_probabilities(src)
    out = rio.save_mask(probs.argmax(0), vol.geometry, tmp_path / "c.mha")
    back = rio.load_labels(out)
    np.testing.assert_array_equal(back.labels, probs.argmax(0))
    np.testing.assert_allclose(back.geometry.affine, vol.geometry.affine, atol=1e-9)
    rio.check_same_grid(vol.geometry, back.geometry, "c")


def test_nnunet_sitk_layout(tmp_path, case):
    probs, _, _ = case
    npz = write_nnunet_case(tmp_path / "nn", "case_001", probs)
    vol = rio.load_probabilities(npz)
    assert vol.case == "case_001"
    np.testing.assert_array_equal(vol.probabilities, probs)
    assert vol.geometry.itk_spacing == ITK_SPACING and vol.geometry.itk_origin == ITK_ORIGIN
    assert vol.geometry.itk_direction == ITK_DIRECTION
    # nnU-Net's own segmentation beside it is on the same grid
    seg = rio.load_labels(tmp_path / "nn" / "case_001.nii.gz")
    rio.check_same_grid(vol.geometry, seg.geometry, "case_001")
    np.testing.assert_array_equal(seg.labels, probs.argmax(0))
    out = rio.save_mask(probs.argmax(0), vol.geometry, tmp_path / "out" / "case_001.mha")
    img = sitk.ReadImage(str(out))
    assert (img.GetSpacing(), img.GetOrigin(), img.GetDirection()) == (ITK_SPACING, ITK_ORIGIN, ITK_DIRECTION)


def test_nnunet_nibabel_layouts(tmp_path, case):
    probs, _, _ = case
    affine = nifti_affine(angles=(0.0, 0.0, 0.0)) @ np.diag([-1, 1, -1, 1])  # not RAS: LAI-like
    npz = write_nnunet_case(tmp_path / "nib", "c", probs, nibabel_affine=affine)
    vol = rio.load_probabilities(npz)
    np.testing.assert_array_equal(vol.probabilities, probs)
    np.testing.assert_array_equal(vol.geometry.affine, affine)
    out = rio.save_mask(probs.argmax(0), vol.geometry, tmp_path / "o.nii.gz")
    # same header affine (float32 on disk) as the segmentation nnU-Net wrote beside the .npz
    np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(tmp_path / "nib" / "c.nii.gz")).affine)

    # NibabelIOWithReorient: the array is stored in the RAS-reoriented frame; we bring it back
    from nibabel.orientations import io_orientation

    data = np.moveaxis(probs, 0, -1)
    reor = nib.Nifti1Image(data, affine).as_reoriented(io_orientation(affine))
    folder = tmp_path / "reor"
    folder.mkdir()
    np.savez_compressed(folder / "r.npz", probabilities=np.transpose(np.asarray(reor.dataobj), (3, 2, 1, 0)))
    with open(folder / "r.pkl", "wb") as fh:
        pickle.dump({"nibabel_stuff": {"original_affine": affine, "reoriented_affine": reor.affine}}, fh)
    vol2 = rio.load_probabilities(folder / "r.npz")
    np.testing.assert_array_equal(vol2.probabilities, probs)
    np.testing.assert_array_equal(vol2.geometry.affine, affine)


def test_find_cases(tmp_path, case):
    probs, _, _ = case
    write_nnunet_case(tmp_path / "nn", "a", probs)
    write_nnunet_case(tmp_path / "nn", "b", probs)
    (tmp_path / "nn" / "plans.json").write_text("{}")
    (tmp_path / "nn" / ".hidden.nii.gz").write_bytes(b"")
    found = rio.find_cases([tmp_path / "nn"])
    assert [p.name for p in found] == ["a.npz", "b.npz"]  # nnU-Net's argmax a.nii.gz / b.nii.gz ignored
    assert rio.companion_files(found[0]) == [tmp_path / "nn" / "a.pkl"]
    write_sitk_probs(tmp_path / "a.mha", probs)
    with pytest.raises(rio.VolumeError, match="two inputs have the case name 'a'"):
        rio.find_cases([tmp_path / "nn", tmp_path / "a.mha"])
    with pytest.raises(rio.VolumeError, match="no such file or folder"):
        rio.find_cases([tmp_path / "missing"])
    with pytest.raises(rio.VolumeError, match="unknown file type"):
        rio.find_cases([tmp_path / "nn" / "plans.json"])


def test_mask_dtype_choice(tmp_path):
    geometry = rio.Geometry.from_sitk(ITK_SPACING, ITK_ORIGIN, ITK_DIRECTION, (4, 3, 2))
    for top, dtype, pixel in ((255, np.uint8, sitk.sitkUInt8), (300, np.int16, sitk.sitkInt16),
                              (70000, np.int32, sitk.sitkInt32)):
        mask = np.zeros((4, 3, 2), np.int64)
        mask[1, 2, 1] = top
        assert rio.mask_dtype(mask) == dtype
        out = rio.save_mask(mask, geometry, tmp_path / f"m{top}.nrrd")
        assert sitk.ReadImage(str(out)).GetPixelID() == pixel
        np.testing.assert_array_equal(sitk_xyz(out), mask)
    assert rio.mask_dtype(np.array([-1, 5])) == np.int16
    # multilabel masks: a 4D (X, Y, Z, C) NIfTI / a vector image
    masks = np.zeros((2, 4, 3, 2), bool)
    masks[1, 0, 0, 0] = True
    out = rio.save_mask(masks, geometry, tmp_path / "ml.mha")
    img = sitk.ReadImage(str(out))
    assert img.GetNumberOfComponentsPerPixel() == 2
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(img), (3, 2, 1, 0)), masks)


def test_atomic_write_and_protection(tmp_path, case):
    probs, _, _ = case
    src = write_sitk_probs(tmp_path / "in.mha", probs)
    before = src.read_bytes()
    vol = rio.load_probabilities(src)
    with pytest.raises(rio.VolumeError, match="it is an input file"):
        rio.save_mask(probs.argmax(0), vol.geometry, src.with_name("in.mha"), overwrite=True, protected=[src])
    assert src.read_bytes() == before
    out = rio.save_mask(probs.argmax(0), vol.geometry, tmp_path / "o" / "in.mha")
    with pytest.raises(rio.VolumeError, match="exists"):
        rio.save_mask(probs.argmax(0), vol.geometry, out)

    def broken(tmp):  # a writer that dies half-way
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rio.atomic_write(tmp_path / "o" / "x.nii.gz", broken)
    assert files_in(tmp_path / "o") == ["in.mha"]


def test_corrupt_and_wrong_files(tmp_path, case):
    probs, _, _ = case
    good = write_nifti_probs(tmp_path / "good.nii.gz", probs, nifti_affine())
    data = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(rio.VolumeError, match=r"trunc\.nii\.gz: could not read the file.*corrupt"):
        rio.load_probabilities(tmp_path / "trunc.nii.gz")
    (tmp_path / "junk.mha").write_bytes(b"this is not an image")
    with pytest.raises(rio.VolumeError, match="junk.mha: could not read"):
        rio.load_probabilities(tmp_path / "junk.mha")
    with pytest.raises(rio.VolumeError, match="file not found"):
        rio.load_probabilities(tmp_path / "nope.nii.gz")

    npz = write_nnunet_case(tmp_path / "nn", "c", probs)
    raw = npz.read_bytes()
    npz.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(rio.VolumeError, match="c.npz: could not read"):
        rio.load_probabilities(npz)
    write_nnunet_case(tmp_path / "nn2", "c", probs)
    (tmp_path / "nn2" / "c.pkl").unlink()
    with pytest.raises(rio.VolumeError, match="copy it next to the .npz"):
        rio.load_probabilities(tmp_path / "nn2" / "c.npz")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    write_nnunet_case(tmp_path / "nn3", "c", probs)
    with open(tmp_path / "nn3" / "c.pkl", "wb") as fh:
        pickle.dump({"sitk_stuff": Evil()}, fh)
    with pytest.raises(rio.VolumeError, match="refusing to load builtins.print"):
        rio.load_probabilities(tmp_path / "nn3" / "c.npz")

    nib.save(nib.Nifti1Image(probs.argmax(0).astype(np.uint8), np.eye(4)), str(tmp_path / "seg.nii.gz"))
    with pytest.raises(rio.VolumeError, match="looks like a label map"):
        rio.load_probabilities(tmp_path / "seg.nii.gz")
    write_sitk_labels(tmp_path / "seg.mha", probs.argmax(0))
    with pytest.raises(rio.VolumeError, match="looks like a label map"):
        rio.load_probabilities(tmp_path / "seg.mha")


def test_labels_and_grid_checks(tmp_path, case):
    probs, label, _ = case
    affine = nifti_affine()
    nib.save(nib.Nifti1Image(label.astype(np.float32), affine), str(tmp_path / "f.nii.gz"))
    lab = rio.load_labels(tmp_path / "f.nii.gz")
    assert lab.labels.dtype == np.int64
    np.testing.assert_array_equal(lab.labels, label)
    nib.save(nib.Nifti1Image(probs[0], affine), str(tmp_path / "p.nii.gz"))
    with pytest.raises(rio.VolumeError, match="non-integer values"):
        rio.load_labels(tmp_path / "p.nii.gz")

    grid = rio.Geometry.from_nifti(affine, label.shape)
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    with pytest.raises(rio.VolumeError, match="different grids.*ResampleToMatch"):
        rio.check_same_grid(grid, rio.Geometry.from_nifti(shifted, label.shape), "c")
    with pytest.raises(rio.VolumeError, match=r"spatial shape \(20, 18, 16\) but labels \(20, 18, 15\)"):
        rio.check_same_grid(grid, rio.Geometry.from_nifti(affine, (20, 18, 15)), "c")


def test_validate_probabilities(case):
    probs, _, logits = case
    rio.validate_probabilities(probs, where="x")
    with pytest.raises(rio.VolumeError, match="--softmax"):
        rio.validate_probabilities(logits, where="x")
    half = probs * 0.5
    with pytest.raises(rio.VolumeError, match="do not sum to 1.*--softmax.*--output-mode multilabel"):
        rio.validate_probabilities(half, where="x")
    rio.validate_probabilities(half, where="x", output_mode="multilabel")
    with pytest.raises(rio.VolumeError, match="NaN"):
        rio.validate_probabilities(np.full((2, 2, 2, 2), np.nan, np.float32), where="x")
