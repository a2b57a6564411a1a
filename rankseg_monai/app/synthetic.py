"""Seeded CT-like 3D phantoms: a large organ (class 1) with small, low-contrast lesions (class 2) inside it.

The phantoms imitate the LiTS/KiTS situation that RankSEG targets: the organ is large and easy, the lesions are
a few voxels across (fewer still through-plane), a little darker than the organ and buried in noise, so a
network trained on them is genuinely unsure where a lesion starts and ends.

Intensities are generated in Hounsfield-like units (soft tissue ~ 20 HU, organ ~ 60 HU, lesions 12-30 HU darker,
Gaussian noise ~ 15 HU, a partial-volume blur), then mapped through a soft-tissue window ``[-100, 200]`` HU to
``[0, 1]``: what ``ScaleIntensityRange(a_min=-100, a_max=200, b_min=0, b_max=1, clip=True)`` does to a real CT.
Geometry is drawn in millimetres on an anisotropic grid (default 0.8 x 0.8 x 2.5 mm), so HD95 in mm means
something.

Example:
    >>> from rankseg_monai.app.synthetic import make_phantom
    >>> ph = make_phantom(seed=0)
    >>> ph.image.shape, ph.image.dtype, ph.label.shape, ph.spacing
    ((1, 64, 64, 32), dtype('float32'), (1, 64, 64, 32), (0.8, 0.8, 2.5))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = ["Phantom", "make_phantom", "make_phantoms", "DEFAULT_SHAPE", "DEFAULT_SPACING", "WINDOW_HU"]

DEFAULT_SHAPE: tuple[int, int, int] = (64, 64, 32)
DEFAULT_SPACING: tuple[float, float, float] = (0.8, 0.8, 2.5)
WINDOW_HU: tuple[float, float] = (-100.0, 200.0)

# Hounsfield-like tissue values
_SOFT_TISSUE_HU = 20.0
_FAT_HU = -90.0
_ORGAN_HU = 60.0


class Phantom(NamedTuple):
    """One phantom case.

    Attributes:
        image: float32 ``(1, X, Y, Z)``, windowed intensities in ``[0, 1]``.
        label: int64 ``(1, X, Y, Z)``: 0 background, 1 organ, 2 lesion.
        spacing: voxel size in mm along X, Y, Z.
        seed: the seed that generated the case.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    seed: int

    @property
    def affine(self) -> np.ndarray:
        """A diagonal 4x4 affine with the voxel spacing (for ``MetaTensor`` / NIfTI writing)."""
        return np.diag([*self.spacing, 1.0])


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (white noise through a Gaussian filter)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_vox, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def make_phantom(
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    num_lesions: tuple[int, int] = (1, 3),
    lesion_radius_mm: tuple[float, float] = (2.5, 6.5),
    lesion_contrast_hu: tuple[float, float] = (-30.0, -12.0),
    noise_hu: float = 15.0,
    num_vessels: tuple[int, int] = (1, 3),
) -> Phantom:
    """Generate one phantom; the same arguments always give the same arrays.

    Args:
        seed: seed of the ``numpy.random.default_rng`` generator that draws everything.
        shape: grid size ``(X, Y, Z)``.
        spacing: voxel size in mm ``(X, Y, Z)``.
        num_lesions: inclusive range of the number of lesions (``(0, k)`` allows lesion-free cases).
        lesion_radius_mm: range of the mean lesion radius in mm (each axis varies by +-25%).
        lesion_contrast_hu: range of the lesion-minus-organ intensity in HU (negative: hypodense).
        noise_hu: standard deviation of the additive Gaussian noise in HU.
        num_vessels: inclusive range of thin tubular vessels inside the organ (labelled organ, slightly
            darker: they look a bit like lesions, as in a real liver).

    Returns:
        a :class:`Phantom` with image ``(1, X, Y, Z)`` float32 in ``[0, 1]`` and label ``(1, X, Y, Z)`` int64.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"shape and spacing must have 3 entries, got {shape} and {spacing}")
    if min(shape) < 8:
        raise ValueError(f"every dimension of shape must be >= 8, got {shape}")
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing)
    extent = np.asarray(shape) * sp  # field of view in mm
    # voxel-centre coordinates in mm, broadcastable (X,1,1), (1,Y,1), (1,1,Z)
    coords = [((np.arange(n) + 0.5) * s).reshape([-1 if i == d else 1 for i in range(3)])
              for d, (n, s) in enumerate(zip(shape, spacing))]

    # --- body outline (an ellipse filling most of the field of view; outside: fat) ---
    body_c = extent / 2 + rng.uniform(-0.05, 0.05, 3) * extent
    body_r = extent * rng.uniform(0.48, 0.56, 3)
    body_r[2] = extent[2] * 10  # infinite along z (axial slices of a trunk)
    body = sum(((c - bc) / br) ** 2 for c, bc, br in zip(coords, body_c, body_r)) <= 1.0

    # --- organ: an ellipsoid with a smoothly perturbed surface ---
    organ_c = extent / 2 + rng.uniform(-0.08, 0.08, 3) * extent
    organ_r = extent * rng.uniform([0.30, 0.28, 0.32], [0.38, 0.36, 0.40])
    rnorm = np.sqrt(sum(((c - oc) / orr) ** 2 for c, oc, orr in zip(coords, organ_c, organ_r)))
    bumps = _smooth_field(rng, shape, 8.0 / sp)
    organ = ((rnorm + 0.12 * bumps) <= 1.0) & body

    label = organ.astype(np.int64)
    hu = np.where(body, _SOFT_TISSUE_HU, _FAT_HU) + 12.0 * _smooth_field(rng, shape, 4.0 / sp)
    hu = np.where(organ, _ORGAN_HU + 4.0 * _smooth_field(rng, shape, 3.0 / sp), hu)

    # --- vessels: thin tubes through the organ, a little darker, labelled organ ---
    for _ in range(int(rng.integers(num_vessels[0], num_vessels[1] + 1))):
        p0 = organ_c + rng.uniform(-0.5, 0.5, 3) * organ_r
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        radius = rng.uniform(0.8, 1.6)
        rel = [c - p for c, p in zip(coords, p0)]
        along = sum(r * d for r, d in zip(rel, direction))
        dist2 = sum((r - along * d) ** 2 for r, d in zip(rel, direction))
        vessel = (dist2 <= radius**2) & organ
        hu = np.where(vessel, _ORGAN_HU - rng.uniform(15.0, 25.0), hu)

    # --- lesions: small ellipsoids well inside the organ, hypodense ---
    depth = ndimage.distance_transform_edt(organ, sampling=spacing)
    for _ in range(int(rng.integers(num_lesions[0], num_lesions[1] + 1))):
        r_mean = rng.uniform(*lesion_radius_mm)
        radii = r_mean * rng.uniform(0.75, 1.25, 3)
        candidates = np.argwhere(depth > radii.max() + 1.0)
        if len(candidates) == 0:
            candidates = np.argwhere(depth >= depth.max())
        centre = (candidates[rng.integers(len(candidates))] + 0.5) * sp
        q = sum(((c - cc) / r) ** 2 for c, cc, r in zip(coords, centre, radii))
        label[(q <= 1.0) & organ] = 2
        # soft-edged intensity dip (slightly wider than the label: the boundary is ambiguous)
        dip = np.exp(-np.log(2.0) * q**2)  # 1 at the centre, 1/2 on the labelled surface
        hu = hu + rng.uniform(*lesion_contrast_hu) * dip * organ

    # --- acquisition: partial-volume blur (in mm), noise, soft-tissue window ---
    hu = ndimage.gaussian_filter(hu, sigma=0.7 / sp, mode="nearest")
    hu = hu + rng.normal(0.0, noise_hu, shape)
    lo, hi = WINDOW_HU
    image = np.clip((hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return Phantom(image=image[None], label=label[None], spacing=spacing, seed=int(seed))


def make_phantoms(n: int, seed: int = 0, **kwargs) -> list[Phantom]:
    """``n`` phantoms, case ``i`` drawn with seed ``seed + i`` (so case sets from distinct seed ranges never
    overlap: the demo model was trained on seeds below 100 000, the demo evaluates from 1 000 000 up)."""
    return [make_phantom(seed + i, **kwargs) for i in range(n)]
