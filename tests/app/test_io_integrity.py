"""Issue 13 (run integrity), the file layer: every mask written is verified before it is put in place, inputs that
cannot be read say so (naming the file) instead of crashing the run, and the class axis of a 4D NIfTI is guessed
only when exactly one reading fits.  Each test is a reproducer from the issue."""

from __future__ import annotations

import os
import pickle
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from generators import make_case
from volume_files import files_in, nifti_affine, sitk_xyz, write_nnunet_case, write_sitk_probs

from rankseg_monai._files import TMP_MARK, atomic_write, clean_temporaries, is_temporary, sha256_file
from rankseg_monai.app import io as rio

FORMATS = ("nii.gz", "nii", "mha", "nrrd")


@pytest.fixture(scope="module")
def case():
    return make_case(seed=3)


def _grids():
    return {"nibabel": rio.Geometry.from_nifti(nifti_affine(), (20, 18, 16)),
            "sitk": rio.Geometry.from_sitk((0.7, 0.9, 3.0), (1.0, 2.0, 3.0), tuple(np.eye(3).ravel()), (20, 18, 16))}


# ------------------------------------------------------------------------------------------------- item 1


def _truncating(real, size=4096):
    """A writer that writes the real file and then silently loses its end (SimpleITK's NRRD writer on a full disk
    writes a truncated file and raises nothing)."""

    def write(img, path, *args, **kwargs):
        real(img, path, *args, **kwargs)
        with open(path, "r+b") as fh:
            fh.truncate(min(size, max(1, os.path.getsize(path) // 3)))

    return write


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["nibabel", "sitk"])
def test_a_silently_truncated_mask_is_not_put_in_place(tmp_path, monkeypatch, case, fmt, kind):
    probs, _, _ = case
    mask = probs.argmax(0)
    geometry = _grids()[kind]
    monkeypatch.setattr(sitk, "WriteImage", _truncating(sitk.WriteImage))
    monkeypatch.setattr(nib, "save", _truncating(nib.save))
    target = tmp_path / "out" / f"case.{fmt}"
    with pytest.raises(rio.VolumeError, match="cannot be read back|does not read back"):
        rio.save_mask(mask, geometry, target)
    assert files_in(tmp_path / "out") == []  # no mask, no temporary
    monkeypatch.undo()  # space freed: the same call writes a mask that reads back as written
    rio.save_mask(mask, geometry, target)
    back, _ = rio.read_mask(target)
    np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mask_that_reads_back_wrong_is_not_put_in_place(tmp_path, monkeypatch, case, fmt):
    """A writer bug (one voxel flipped, or the grid lost) is caught by comparing the decoded file with the array."""
    probs, _, _ = case
    mask = probs.argmax(0)
    nifti = fmt.startswith("nii")
    geometry = _grids()["nibabel" if nifti else "sitk"]
    writer = rio._write_nifti if nifti else rio._write_sitk

    def flipped(data, geo, tmp):
        data = data.copy()
        data[0, 0, 0] = 7
        writer(data, geo, tmp)

    monkeypatch.setattr(rio, writer.__name__, flipped)
    with pytest.raises(rio.VolumeError, match="does not read back as written"):
        rio.save_mask(mask, geometry, tmp_path / f"c.{fmt}")
    assert files_in(tmp_path) == []
    if nifti:
        moved = rio.Geometry.from_nifti(np.diag([2.0, 1.0, 1.0, 1.0]), (20, 18, 16))
    else:
        moved = rio.Geometry.from_sitk((0.7, 0.9, 3.0), (50.0, 2.0, 3.0), tuple(np.eye(3).ravel()), (20, 18, 16))
    monkeypatch.setattr(rio, writer.__name__, lambda data, geo, tmp: writer(data, moved, tmp))
    with pytest.raises(rio.VolumeError, match="another grid"):
        rio.save_mask(mask, geometry, tmp_path / f"c.{fmt}")
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_multilabel_masks_are_verified_too(tmp_path, case, fmt):
    probs, _, _ = case
    masks = probs > 0.3
    geometry = _grids()["nibabel" if fmt.startswith("nii") else "sitk"]
    out = rio.save_mask(masks, geometry, tmp_path / f"ml.{fmt}")
    back, grid = rio.read_mask(out)
    np.testing.assert_array_equal(back, np.moveaxis(masks, 0, -1))
    assert grid.same_grid(geometry)


def test_atomic_write_verify_and_stale_temporaries(tmp_path):
    def refuse(tmp):
        raise rio.VolumeError("reads back wrong")

    with pytest.raises(rio.VolumeError, match="reads back wrong"):
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"), verify=refuse)
    assert files_in(tmp_path) == []
    # a hidden 0-byte temporary of a killed run (item 3) is recognised and removed; nothing else is
    stale = tmp_path / f".case{TMP_MARK}0123abcd.nii.gz"
    stale.write_bytes(b"")
    keep = [tmp_path / "case.nii.gz", tmp_path / ".case.rankseg-tmp-notours.nii.gz", tmp_path / ".hidden"]
    for p in keep:
        p.write_bytes(b"x")
    assert is_temporary(stale.name) and not any(is_temporary(p.name) for p in keep)
    os.utime(stale, (1, 1))
    assert clean_temporaries(tmp_path, older_than=2.0) == [stale]
    assert sorted(files_in(tmp_path)) == sorted(p.name for p in keep)
    assert sha256_file(keep[0]) == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


# ------------------------------------------------------------------------------------------------- item 6


def _nifti(path, data):
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), nifti_affine()), str(path))
    return path


def test_channels_last_with_a_size_one_spatial_axis(tmp_path):
    """(1, 30, 30, 2) is channels-last (the class sums are one over the last axis): not a (30, 30, 2) volume."""
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(1, 30, 30))
    probs = np.stack([1 - p, p])  # (C=2, 1, 30, 30)
    vol = rio.load_probabilities(_nifti(tmp_path / "a.nii.gz", np.moveaxis(probs, 0, -1)))
    assert vol.probabilities.shape == (2, 1, 30, 30)
    np.testing.assert_allclose(vol.probabilities, probs, atol=1e-7)


def test_three_classes_last_on_a_grid_with_two_slices(tmp_path):
    """(2, 30, 30, 3) is three classes on a (2, 30, 30) grid, not two classes on (30, 30, 3)."""
    probs = np.random.default_rng(1).dirichlet([1, 1, 1], size=(2, 30, 30)).astype(np.float32)  # (2, 30, 30, 3)
    vol = rio.load_probabilities(_nifti(tmp_path / "b.nii.gz", probs))
    assert vol.probabilities.shape == (3, 2, 30, 30)
    rio.validate_probabilities(vol.probabilities, where="b")  # sums to one over the classes


@pytest.mark.parametrize("last", [True, False])
def test_the_class_axis_is_found_on_a_sampled_large_volume(tmp_path, last):
    """Volumes above 65 000 voxels are checked on a strided sample: the class axis itself is never strided."""
    probs = np.random.default_rng(2).dirichlet([1, 1, 1], size=(48, 44, 40)).astype(np.float32)  # (x, y, z, C)
    vol = rio.load_probabilities(_nifti(tmp_path / "big.nii.gz", probs if last else np.moveaxis(probs, -1, 0)))
    np.testing.assert_array_equal(vol.probabilities, np.moveaxis(probs, -1, 0))


def test_no_guess_when_nothing_tells(tmp_path, case):
    _, _, logits = case
    path = _nifti(tmp_path / "lg.nii.gz", np.moveaxis(logits, 0, -1))
    with pytest.raises(rio.VolumeError, match="cannot tell which axis.*outside \\[0, 1\\].*--channels-last"):
        rio.load_probabilities(path)
    assert rio.load_probabilities(path, channels_last=True).probabilities.shape == logits.shape
    # the label grid tells: exactly one reading has the label map's shape
    assert rio.load_probabilities(path, spatial_shape=logits.shape[1:]).probabilities.shape == logits.shape
    with pytest.raises(rio.VolumeError, match="does not match the label grid"):
        rio.load_probabilities(path, spatial_shape=(5, 5, 5))


def test_a_wrong_flag_is_named(tmp_path, case):
    probs, _, _ = case
    path = _nifti(tmp_path / "p.nii.gz", probs)  # channels-first on disk
    with pytest.raises(rio.VolumeError, match="sum to one over the first axis.*pass --channels-first"):
        rio.load_probabilities(path, channels_last=True)
    np.testing.assert_array_equal(rio.load_probabilities(path).probabilities, probs)


def test_sum_tolerance_must_be_finite(case):
    probs, _, _ = case
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite number >= 0"):
            rio.validate_probabilities(probs * 0.5, where="x", sum_tolerance=bad)


# --------------------------------------------------------------------------------------------- items 4, 18


def test_rounding_overshoot_is_not_called_logits(case):
    probs, _, logits = case
    over = probs.copy()
    over[0, 0, 0, 0] = np.float32(1) + np.float32(1e-7)  # float32 rounding: 1.0000001
    with pytest.raises(rio.VolumeError) as info:
        rio.validate_probabilities(over, where="x")
    msg = str(info.value)
    assert "max 1.0000001" in msg and "--clamp" in msg and "--softmax" not in msg and "logits" in msg
    clipped = rio.clip_overshoot(over, where="x")
    assert clipped.max() == 1.0 and clipped.dtype == np.float32
    rio.validate_probabilities(clipped, where="x")
    with pytest.raises(rio.VolumeError, match="look like logits.*--softmax"):
        rio.clip_overshoot(logits, where="x")
    with pytest.raises(rio.VolumeError, match=r"\(min -\d.*--softmax"):
        rio.validate_probabilities(logits, where="x")


def test_show_value_shows_the_overshoot():
    assert rio.show_value(np.float32(1) + np.float32(1e-7), np.float32) == "1.0000001"
    assert rio.show_value(1 + 2**-52) == "1.0000000000000002"
    assert rio.show_value(-1e-9) == "-1e-09"


def test_activation_on_probabilities_is_refused(case):
    probs, _, logits = case
    with pytest.raises(rio.VolumeError, match=r"--softmax was given.*sum to 1.*--force-activation"):
        rio.check_logits(probs, where="x", activation="softmax")
    with pytest.raises(rio.VolumeError, match=r"--sigmoid was given.*lies in \[0, 1\]"):
        rio.check_logits(probs[1:2], where="x", activation="sigmoid")
    rio.check_logits(logits, where="x", activation="softmax")


def test_a_volume_without_voxels_names_the_file(tmp_path):
    header = ("ObjectType = Image\nNDims = 3\nDimSize = 4 0 3\nElementType = MET_FLOAT\n"
              "ElementDataFile = LOCAL\n")
    (tmp_path / "empty.mha").write_bytes(header.encode())
    with pytest.raises(rio.VolumeError, match="empty.mha: .*(no voxels|could not read)"):
        rio.load_probabilities(tmp_path / "empty.mha")
    nib.save(nib.Nifti1Image(np.zeros((4, 0, 3, 2), np.float32), np.eye(4)), str(tmp_path / "empty.nii.gz"))
    with pytest.raises(rio.VolumeError, match=r"empty.nii.gz: array of shape .* holds no voxels"):
        rio.load_probabilities(tmp_path / "empty.nii.gz")
    with pytest.raises(rio.VolumeError, match="no voxels"):
        rio.validate_probabilities(np.zeros((2, 0, 3, 3), np.float32), where="x")


# ------------------------------------------------------------------------------------------------ item 10


def test_non_utf8_names_never_reach_simpleitk(tmp_path, case):
    probs, _, _ = case
    folder = os.fsencode(str(tmp_path))
    bad = os.fsdecode(folder + b"/caf\xe9.mha")
    os.rename(write_sitk_probs(tmp_path / "x.mha", probs), bad)
    with pytest.raises(rio.VolumeError, match="not valid UTF-8.*rename"):
        rio.load_probabilities(bad)
    # writing: SimpleITK only sees the (UTF-8) temporary name; the mask lands under the case's own name
    geometry = _grids()["sitk"]
    out = rio.save_mask(probs.argmax(0), geometry, os.fsdecode(folder + b"/out/caf\xe9.mha"))
    assert os.listdir(folder + b"/out") == [b"caf\xe9.mha"]
    with open(out, "rb") as fh:
        assert fh.read(10) == b"ObjectType"


# ------------------------------------------------------------------------------------------------ item 11


@pytest.mark.parametrize("where", ["sub", "absolute"])
def test_mhd_with_data_file_in_a_sub_folder_or_elsewhere(tmp_path, case, where):
    probs, _, _ = case
    write_sitk_probs(tmp_path / "case.mhd", probs)
    raw_dir = tmp_path / ("raw" if where == "sub" else "elsewhere")
    raw_dir.mkdir()
    (tmp_path / "case.raw").rename(raw_dir / "case.raw")
    value = "raw/case.raw" if where == "sub" else str(raw_dir / "case.raw")
    header = (tmp_path / "case.mhd").read_text()
    (tmp_path / "case.mhd").write_text(re.sub(r"ElementDataFile = .*", f"ElementDataFile = {value}", header))
    found = rio.find_cases([tmp_path])
    assert [p.name for p in found] == ["case.mhd"]
    assert rio.companion_files(found[0]) == [raw_dir / "case.raw"]
    np.testing.assert_array_equal(rio.load_probabilities(found[0]).probabilities, probs)


# ------------------------------------------------------------------------------------------------ item 12


def _rewrite_pkl(path, change):
    with open(path, "rb") as fh:
        props = pickle.load(fh)
    change(props)
    with open(path, "wb") as fh:
        pickle.dump(props, fh)


@pytest.mark.parametrize("change, message", [
    (lambda p: p["nibabel_stuff"]["original_affine"].__setitem__((0, 0), np.nan), "original_affine.*not a finite"),
    (lambda p: p["nibabel_stuff"].pop("original_affine"), "nibabel_stuff has no 'original_affine'"),
    (lambda p: p.__setitem__("nibabel_stuff", None), "nibabel_stuff is a NoneType"),
    (lambda p: p.pop("nibabel_stuff"), "neither 'sitk_stuff' nor 'nibabel_stuff'"),
])
def test_broken_nibabel_properties_name_the_file(tmp_path, case, change, message):
    probs, _, _ = case
    npz = write_nnunet_case(tmp_path, "a", probs, nibabel_affine=nifti_affine())
    _rewrite_pkl(tmp_path / "a.pkl", change)
    with pytest.raises(rio.VolumeError, match=f"a.pkl: .*{message}"):
        rio.load_probabilities(npz)


@pytest.mark.parametrize("change, message", [
    (lambda p: p["sitk_stuff"].pop("spacing"), "sitk_stuff has no 'spacing'"),
    (lambda p: p["sitk_stuff"].__setitem__("spacing", (1.0, float("nan"), 1.0)), r"sitk_stuff\['spacing'\]"),
    (lambda p: p["sitk_stuff"].__setitem__("direction", (1.0, 0.0)), r"sitk_stuff\['direction'\].*9 finite"),
    (lambda p: p["sitk_stuff"].__setitem__("origin", None), r"sitk_stuff\['origin'\] is None"),
])
def test_broken_sitk_properties_name_the_file(tmp_path, case, change, message):
    probs, _, _ = case
    npz = write_nnunet_case(tmp_path, "a", probs)
    _rewrite_pkl(tmp_path / "a.pkl", change)
    with pytest.raises(rio.VolumeError, match=f"a.pkl: .*{message}"):
        rio.load_probabilities(npz)


# ------------------------------------------------------------------------------------------------ item 13


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("payload, refused", [
    (_Reduce(set, (range(10**6),)), r"builtins\.x?range"),  # the issue's set(range(10**8)) at a test-friendly size
    (_Reduce(bytearray, (10**7,)), "builtins.bytearray"),
    (_Reduce(np.ndarray.__reduce__(np.zeros(1))[0], (np.ndarray, (10**7,), b"b")), "shape"),
])
def test_the_unpickler_builds_nothing_the_file_does_not_hold(tmp_path, payload, refused, protocol):
    path = tmp_path / "a.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"sitk_stuff": payload}, fh, protocol=protocol)
    assert path.stat().st_size < 200
    with pytest.raises(rio.VolumeError, match=f"not an nnU-Net properties file.*{refused}"):
        rio.load_nnunet_properties(path)


def test_oversized_properties_are_refused(tmp_path):
    path = tmp_path / "a.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"blob": b"x" * (rio.MAX_PROPERTIES_BYTES + 1)}, fh)
    with pytest.raises(rio.VolumeError, match="far more than nnU-Net case properties hold"):
        rio.load_nnunet_properties(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_properties_still_load(tmp_path, case, protocol):
    direction = tuple(np.eye(3).ravel())
    props = {"sitk_stuff": {"spacing": (0.7, 0.9, 3.0), "origin": (1.0, 2.0, 3.0), "direction": direction},
             "spacing": [3.0, 0.9, 0.7], "shape_before_cropping": (16, 18, 20), "bbox_used_for_cropping": [[0, 16]] * 3,
             "nibabel_stuff": {"original_affine": nifti_affine()}, "class_locations": {1: np.arange(30).reshape(10, 3)},
             "flags": {1, 2}, "scalar": np.float64(1.5), "ints": np.int64(3)}
    path = tmp_path / "a.pkl"
    with open(path, "wb") as fh:
        pickle.dump(props, fh, protocol=protocol)
    back = rio.load_nnunet_properties(path)
    np.testing.assert_array_equal(back["nibabel_stuff"]["original_affine"], nifti_affine())
    np.testing.assert_array_equal(back["class_locations"][1], props["class_locations"][1])
    assert back["flags"] == {1, 2} and back["scalar"] == 1.5 and back["sitk_stuff"] == props["sitk_stuff"]


def test_sitk_xyz_helper_still_reads_masks(tmp_path, case):
    """read_mask agrees with a plain SimpleITK read (the helper the other tests use)."""
    probs, _, _ = case
    out = rio.save_mask(probs.argmax(0), _grids()["sitk"], tmp_path / "m.nrrd")
    np.testing.assert_array_equal(rio.read_mask(out)[0], sitk_xyz(out))
