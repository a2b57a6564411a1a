"""The streaming machinery of every solver (rankseg_monai/solvers/_stream.py): flat_view, iter_chunks,
row_statistics, floor_to_dtype and threshold_masks, against direct torch/numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from generators import softmax_probs

from rankseg_monai.solvers._stream import (
    CLAMP_TOLERANCE,
    flat_view,
    floor_to_dtype,
    iter_chunks,
    row_statistics,
    threshold_masks,
)

# dim orders of a contiguous (B, X, Y, Z, C) volume shown as (B, C, ...); the last is channels-last
PERMS = [(0, 4, 3, 2, 1), (0, 4, 2, 1, 3), (0, 4, 1, 3, 2), (0, 4, 1, 2, 3)]


# ------------------------------------------------------------------------------------------------- flat_view


@pytest.mark.parametrize("perm", PERMS, ids=str)
def test_permuted_input_is_viewed_not_copied(perm, device):
    base = softmax_probs((2, 3, 6, 5, 4), seed=9, device=device).permute(0, 2, 3, 4, 1).contiguous()  # (B, X, Y, Z, C)
    x = base.permute(*perm)
    flat, unflatten = flat_view(x)
    assert flat.data_ptr() == x.data_ptr() and flat.shape == (x.shape[0], x.shape[1], 120)
    labels = torch.arange(2 * 120, device=device).reshape(2, 120)
    back = unflatten(labels)
    assert back.shape == (x.shape[0], *x.shape[2:])
    # element (b, n) of the flat view is the voxel that unflatten puts at the same place
    for b in range(2):
        for c in range(x.shape[1]):
            assert torch.equal(unflatten(flat[:, c : c + 1])[b, 0], x[b, c])
    assert unflatten(flat).shape == x.shape and torch.equal(unflatten(flat), x)


@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 2, 4, 5), (2, 1, 3, 1, 4), (1, 2, 1, 1, 1)])
def test_flat_view_of_contiguous_and_size_one_dims(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    flat, unflatten = flat_view(x)
    assert flat.data_ptr() == x.data_ptr() and torch.equal(flat, x.reshape(shape[0], shape[1], -1))
    assert torch.equal(unflatten(flat), x)
    assert unflatten(flat[:, 0]).shape == (shape[0], *shape[2:])
    # a size-1 dim moved anywhere by a permutation still gives a view
    if x.dim() == 5:
        y = x.permute(0, 1, 4, 2, 3)
        fy, uy = flat_view(y)
        assert fy.data_ptr() == y.data_ptr() and torch.equal(uy(fy), y)


# ----------------------------------------------------------------------------------------------- iter_chunks


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 1000, None])
def test_iter_chunks_covers_every_voxel_once_in_order(chunk_size, device):
    flat = torch.rand(2, 3, 50, generator=torch.Generator().manual_seed(1))
    for on in ("cpu", device):  # data where it is, or streamed to the compute device
        x = flat.to(on)
        pieces = list(iter_chunks(x, torch.device(device), chunk_size))
        starts = [a for a, _, _ in pieces]
        stops = [b for _, b, _ in pieces]
        assert starts[0] == 0 and stops[-1] == 50 and starts[1:] == stops[:-1]
        if chunk_size is not None:
            assert all(b - a == min(chunk_size, 50 - a) for a, b, _ in pieces)
        for a, b, chunk in pieces:
            assert chunk.device.type == torch.device(device).type and chunk.shape == (2, 3, b - a)
            assert torch.equal(chunk.cpu(), flat[..., a:b])


def test_iter_chunks_clamps_only_when_asked(device):
    flat = torch.tensor([[[-0.004, 0.2, 1.003, 0.9]]], device=device)
    raw = torch.cat([c for _, _, c in iter_chunks(flat, chunk_size=3)], -1)
    clipped = torch.cat([c for _, _, c in iter_chunks(flat, chunk_size=3, clamp=True)], -1)
    assert torch.equal(raw, flat)
    assert torch.equal(clipped, flat.clamp(0, 1))


def test_iter_chunks_automatic_size_is_bounded():
    """The automatic chunk holds every row at once and a fraction of the volume (temporaries stay small)."""
    flat = torch.zeros(1, 4, 1 << 20)
    pieces = list(iter_chunks(flat))
    assert len(pieces) >= 8 and all(c.shape[:2] == (1, 4) for _, _, c in pieces)
    assert list(iter_chunks(torch.zeros(1, 2, 10)))[0][:2] == (0, 10)  # a small volume: one chunk


# -------------------------------------------------------------------------------------------- row_statistics


@pytest.mark.parametrize("chunk_size", [3, None])
def test_row_statistics_equal_float64_sums(chunk_size, device):
    rng = np.random.default_rng(2)
    p = rng.uniform(size=(2, 3, 101)).astype(np.float32)
    p[1, 2] = 0.5  # exactly one half: not counted as > 1/2
    p[0, 1, :7] = 1.0
    stats = row_statistics(torch.from_numpy(p).to(device), chunk_size=chunk_size)
    r = p.astype(np.float64)
    for name, expect in (("vmin", r.min(-1)), ("vmax", r.max(-1)), ("mu", r.sum(-1)),
                         ("s_half", np.where(r > 0.5, r, 0).sum(-1)), ("n_half", (r > 0.5).sum(-1))):
        got = getattr(stats, name)
        assert got.dtype == (torch.int64 if name == "n_half" else torch.float64), name
        np.testing.assert_allclose(got.cpu().numpy(), expect, rtol=1e-13, atol=0, err_msg=name)
    assert int(stats.n_half[1, 2]) == 0
    no_half = row_statistics(torch.from_numpy(p).to(device), half=False)
    assert no_half.s_half is None and no_half.n_half is None and torch.equal(no_half.mu, stats.mu)


def test_row_statistics_clamp_and_value_checks():
    p = torch.tensor([[[0.2, -0.004, 1.004, 0.5]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="clamp=True"):
        row_statistics(p)
    stats = row_statistics(p, clamp=True)
    assert float(stats.vmin) == 0.0 and float(stats.vmax) == 1.0
    assert float(stats.mu) == pytest.approx(0.2 + 0.0 + 1.0 + 0.5, rel=1e-15)
    assert int(stats.n_half) == 1 and float(stats.s_half) == 1.0
    far = torch.tensor([[[0.2, 1.0 + 2 * CLAMP_TOLERANCE]]])
    with pytest.raises(ValueError, match="outside"):
        row_statistics(far, clamp=True)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="NaN or inf"):
            row_statistics(torch.tensor([[[0.2, bad]]]), clamp=True)


# --------------------------------------------------------------------------------------------- floor_to_dtype


def _all_values_in_unit_interval(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype in [0, 1] (from its bit patterns)."""
    bits = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype)
    return v[torch.isfinite(v) & (v >= 0) & (v <= 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_floor_to_dtype_compares_exactly_for_every_value(dtype):
    """x > t  <=>  x > floor_to_dtype(t) for every value x of the dtype in [0, 1] (exhaustive), and the floor is
    the largest dtype value <= t."""
    values = _all_values_in_unit_interval(dtype)
    assert values.numel() > 15_000  # 15361 float16, 16257 bfloat16 values
    x64 = values.double()
    rng = np.random.default_rng(3)
    ts = np.concatenate([rng.uniform(0, 1, 40), x64[rng.integers(0, x64.numel(), 20)].numpy(),  # exact values
                         [0.0, 1.0, 0.5, 1e-30, 1 - 1e-12]])
    t = torch.from_numpy(ts)
    f = floor_to_dtype(t, dtype)
    assert f.dtype == dtype and bool((f.double() <= t).all())
    for ti, fi in zip(t.tolist(), f.tolist()):
        assert torch.equal(x64 > ti, values > torch.tensor(fi, dtype=dtype)), (ti, fi)
        above = x64[x64 > fi]
        assert not bool(((above <= ti)).any())  # nothing between floor and t: it is the largest value <= t


def test_floor_to_dtype_float32_and_float64():
    t = torch.tensor([0.1, 1 / 3, 0.5, 2.0**-30], dtype=torch.float64)
    f32 = floor_to_dtype(t, torch.float32)
    assert f32.dtype == torch.float32 and bool((f32.double() <= t).all())
    assert bool((torch.nextafter(f32, torch.full_like(f32, 2.0)).double() > t).all())
    f64 = floor_to_dtype(t, torch.float64)
    assert torch.equal(f64, t) and f64.data_ptr() != t.data_ptr()  # a copy, not the same tensor


# -------------------------------------------------------------------------------------------- threshold_masks


@pytest.mark.parametrize("chunk_size", [1, 9, None])
def test_threshold_masks_are_p_greater_than_thr(chunk_size, device):
    flat = torch.rand(2, 3, 40, generator=torch.Generator().manual_seed(4))
    thr = torch.tensor([[0.3, float("inf"), -1.0], [0.5, 0.0, 0.9]])
    flat[0, 0, :5] = 0.3  # equal to the threshold: not selected
    expect = flat > thr[..., None]
    for on in ("cpu", device):
        got = threshold_masks(flat.to(on), thr.to(on), device=torch.device(device), chunk_size=chunk_size)
        assert got.dtype == torch.bool and got.device == flat.to(on).device
        assert torch.equal(got.cpu(), expect)
    assert not bool(expect[0, 0, :5].any()) and not bool(expect[0, 1].any()) and bool(expect[0, 2].all())


def test_threshold_masks_with_clamp(device):
    flat = torch.tensor([[[1.004, 0.99, -0.003, 0.2]]], device=device)
    thr = torch.tensor([[0.995]], device=device)
    got = threshold_masks(flat, thr, clamp=True, chunk_size=2)
    assert got.tolist() == [[[True, False, False, False]]]
    assert torch.equal(got, flat.clamp(0, 1) > thr[..., None])
    low = torch.tensor([[-0.001]], device=device)  # clamped -0.003 becomes 0 > -0.001
    assert threshold_masks(flat, low, clamp=True).tolist() == [[[True, True, True, True]]]
    assert threshold_masks(flat, low).tolist() == [[[True, True, False, True]]]
