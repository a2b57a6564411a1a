"""Every synthetic probability, logit and volume generator of the tests (one home).

Each generator is seeded (a ``torch.Generator`` seed, or a ``numpy.random.Generator`` passed in when a test draws
several things from one stream), so a test that asserts on drawn values always sees the same values.  Nothing here
imports ``rankseg_monai``: the inputs of a test never depend on the code under test.

* torch streams: :func:`softmax_probs` (softmax of scaled Gaussian logits, the workhorse), :func:`noisy_ball`
  (a logistic ball with voxel noise), :func:`rma_inputs` (the named inputs of the RMA parity tests);
* numpy streams: :func:`smooth_softmax` (spatially smooth random logits), :func:`ellipsoid_field` (signed distance
  to random ellipsoids), :func:`softmax_logits` / :func:`draw_labels` (calibrated logits and drawn truths),
  :func:`fog_cases` (flattened sigmoid models), :func:`faint_blob_maps` (faint blobs and specks),
  :func:`make_case` (the file-format volumes of the app tests);
* MONAI images: :func:`monai_volumes` (``create_test_image_3d``), :func:`meta_cases`, :func:`intensity_cases`
  (``dist_eval_script.py``) and :func:`train_tiny_unet`.
"""

from __future__ import annotations

import numpy as np
import torch

# ------------------------------------------------------------------------------------------ torch streams


def gaussian_logits(shape, seed: int = 0, scale=1.0, dtype: torch.dtype = torch.float32, device=None,
                    channel_dim: int = 1) -> torch.Tensor:
    """``scale * randn(shape)`` from ``torch.Generator().manual_seed(seed)``, drawn on the CPU in ``dtype`` (so every
    device gets the same values) and put on ``device``; a sequence ``scale`` has one value per channel of
    ``channel_dim``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=dtype)
    if isinstance(scale, int | float):
        z = z * scale
    else:
        view = [1] * z.dim()
        view[channel_dim] = -1
        z = z * torch.tensor(scale, dtype=dtype).view(view)
    return z if device is None else z.to(device)


def softmax_probs(shape, seed: int = 0, scale: float = 2.0, dim: int = 1, dtype: torch.dtype | None = None,
                  logits_dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``softmax(scale * randn(shape), dim)``: the softmax of :func:`gaussian_logits`.

    ``logits_dtype`` is the dtype the Gaussian logits are drawn in (it changes the stream), ``dtype`` the dtype the
    probabilities are cast to afterwards, ``device`` where they are put.
    """
    p = torch.softmax(gaussian_logits(shape, seed, scale, logits_dtype), dim=dim)
    if dtype is not None:
        p = p.to(dtype)
    return p if device is None else p.to(device)


def noisy_ball(shape, seed: int = 0, sharp: float = 12.0, noise: float = 1.0, radius: float = 0.5) -> torch.Tensor:
    """Blob-shaped probabilities (float64, ``(1, 1, *shape)``): a logistic ball of ``radius`` on ``[-1, 1]^d`` with
    Gaussian logit noise."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s, dtype=torch.float64) for s in shape], indexing="ij")
    r = sum(z**2 for z in grids).sqrt()
    logit = (radius - r) * sharp + torch.randn(tuple(shape), generator=g, dtype=torch.float64) * noise
    return torch.sigmoid(logit)[None, None]


# ------------------------------------------------------------------------------------------ numpy streams


def random_rows(rng: np.random.Generator, count: int, low: int = 1, high: int = 11):
    """``count`` rows of probabilities with ``low <= n < high`` voxels, cycling through five kinds: uniform,
    U-shaped, quantised (exact 0 and 1, ties), faint, and beta rows of random shape and peak."""
    for i in range(count):
        n = int(rng.integers(low, high))
        kind = i % 5
        if kind == 0:
            p = rng.uniform(size=n)
        elif kind == 1:
            p = rng.beta(0.4, 0.4, size=n)
        elif kind == 2:
            p = rng.choice([0.0, 0.1, 0.36, 0.5, 0.9, 1.0], size=n)
        elif kind == 3:
            p = rng.uniform(0, 0.2, size=n)
        else:
            p = rng.beta(rng.uniform(0.1, 2), rng.uniform(0.5, 30), size=n) * rng.uniform(0.01, 1)
        yield p


def random_selection_state(rng: np.random.Generator, C: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """A multiclass state: probabilities ``(C, N)`` (a quarter of the voxels quantised to quarters, the last class
    all zero, so that 0, 1 and ties occur) and random per-class masks ``(C, N)`` (overlaps and gaps)."""
    probs = rng.dirichlet(np.full(C, 0.5), size=N).T
    probs[:, : N // 4] = np.round(probs[:, : N // 4] * 4) / 4
    probs[C - 1] = 0.0
    masks = rng.random((C, N)) < rng.uniform(0.1, 0.7, size=(C, 1))
    return probs, masks


def random_thresholds_state(seed: int, batch: int = 2, classes: int = 4, n: int = 60, dtype=torch.float64,
                            ties: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input of a multiclass assignment: probabilities ``(B, C, N)`` (Dirichlet; with ``ties`` quantised to
    eighths and the last class a copy of the first), thresholds ``(B, C)`` in ``dtype`` (a fifth of them ``+inf``:
    classes that select nothing) and an active mask ``(B, C)``."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(classes, 0.6), size=(batch, n)).transpose(0, 2, 1)
    if ties:
        p = np.round(p * 8) / 8
        p[:, -1] = p[:, 0]
    flat = torch.from_numpy(p).to(dtype)
    thr = torch.from_numpy(rng.uniform(0.05, 0.6, size=(batch, classes))).to(dtype)
    thr[rng.random((batch, classes)) < 0.2] = float("inf")
    active = torch.from_numpy(rng.random((batch, classes)) < 0.7)
    return flat, thr, active


def smooth_softmax(shape, rng: np.random.Generator, classes: int, sharp: float = 12.0) -> torch.Tensor:
    """Realistic blob-shaped softmax volume ``(1, classes, *shape)``: Gaussian logits averaged twice over 5-voxel
    windows (2D or 3D), times ``sharp``."""
    logits = rng.normal(size=(classes, *shape)).astype(np.float32)
    x = torch.from_numpy(logits)[None]
    k = 5
    pad = [k // 2] * (2 * len(shape))
    pool = torch.nn.functional.avg_pool3d if len(shape) == 3 else torch.nn.functional.avg_pool2d
    for _ in range(2):
        x = pool(torch.nn.functional.pad(x, pad, mode="replicate"), k, stride=1)
    return torch.softmax(x * sharp, dim=1)


def rma_inputs():
    """``(name, probs)`` pairs of the RMA parity tests: uniform, beta, softmax, smooth blobs (3D, 2D with 14
    classes), near one-hot, fp16, bf16, all zeros, saturated, one and two channels."""
    rng = np.random.default_rng(7)
    g = torch.Generator().manual_seed(7)
    yield "uniform", torch.rand((2, 3, 20, 20), generator=g)
    yield "beta", torch.from_numpy(rng.beta(0.3, 0.3, size=(1, 2, 30, 30)).astype(np.float32))
    yield "softmax3d", torch.softmax(torch.randn((1, 3, 12, 12, 10), generator=g) * 3, 1)
    yield "blobs3d", smooth_softmax((24, 24, 16), rng, 3)
    yield "blobs2d_c14", smooth_softmax((40, 40), rng, 14)
    yield "near_onehot", torch.softmax(torch.randn((2, 3, 16, 16), generator=g) * 30, 1)
    yield "fp16", torch.softmax(torch.randn((1, 3, 16, 16, 8), generator=g) * 3, 1).half()
    yield "bf16", torch.softmax(torch.randn((1, 3, 16, 16, 8), generator=g) * 3, 1).bfloat16()
    yield "zeros", torch.zeros((1, 2, 8, 8))
    yield "saturated", torch.cat([torch.ones((1, 1, 8, 8)), torch.zeros((1, 1, 8, 8))], 1)
    yield "c1", torch.rand((3, 1, 15, 15), generator=g)
    yield "c2", torch.softmax(torch.randn((2, 2, 15, 15), generator=g), 1)


#: the grid of the calibration tests
CALIBRATION_SHAPE = (24, 24, 16)


def ellipsoid_field(rng: np.random.Generator, shape=CALIBRATION_SHAPE, n=(1, 3), radius=(2.5, 6.0)) -> torch.Tensor:
    """Signed-distance-like field (voxels, float64, > 0 inside) of the union of ``n`` random ellipsoids."""
    grids = np.meshgrid(*[np.arange(s) + 0.5 for s in shape], indexing="ij")
    d = np.full(shape, -np.inf)
    for _ in range(int(rng.integers(n[0], n[1] + 1))):
        R = rng.uniform(*radius) * rng.uniform(0.7, 1.3, 3)
        c = [rng.uniform(min(R[i] + 1, s / 2), max(s - R[i] - 1, s / 2)) for i, s in enumerate(shape)]
        d = np.maximum(d, (1 - np.sqrt(sum(((g - ci) / Ri) ** 2 for g, ci, Ri in zip(grids, c, R)))) * R.min())
    return torch.from_numpy(d)


def softmax_logits(seed: int, shape=CALIBRATION_SHAPE, width=(0.6, 2.0)) -> torch.Tensor:
    """Calibrated 3-class logits ``(3, *shape)``: background 0, two foreground classes with soft edges (``width``
    voxels), saturating at +-L."""
    rng = np.random.default_rng(seed)
    z = torch.zeros(3, *shape, dtype=torch.float64)
    for c in (1, 2):
        z[c] = (ellipsoid_field(rng, shape) / rng.uniform(*width)).clamp(-rng.uniform(4, 8), rng.uniform(4, 8))
    return z


def draw_labels(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``(1, *spatial)`` label map drawn voxel-wise from the class probabilities ``(C, *spatial)``."""
    flat = p.reshape(p.shape[0], -1).double()
    u = torch.from_numpy(rng.random(flat.shape[1]))
    return (u[None] > torch.cumsum(flat, 0)).sum(0).clamp(max=p.shape[0] - 1).reshape(1, *p.shape[1:])


def calibrated_softmax_cases(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` calibrated 3-class cases: (true logits, labels drawn from their softmax)."""
    out = []
    for seed in range(n):
        z = softmax_logits(seed)
        out.append((z, draw_labels(torch.softmax(z, 0), np.random.default_rng(100 + seed))))
    return out


def fog_cases(n: int, f: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` sigmoid models with a sharp calibrated object, flattened by ``1/f`` into a probability fog:
    ``(probs (1, 32, 32, 24) float32, truth drawn from the calibrated probabilities)``."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        z = (ellipsoid_field(rng, (32, 32, 24), n=(1, 2), radius=(6, 9)) / 0.5).clamp(-9, 9)[None]
        y = torch.from_numpy(rng.random(z.shape)) < torch.sigmoid(z)
        out.append((torch.sigmoid(z / f).float(), y))
    return out


def faint_blob_maps(rng: np.random.Generator, n_maps: int, size: int = 12) -> list[torch.Tensor]:
    """Calibrated multilabel maps ``(1, 1, size^3)`` float32: soft blobs with peak probability 0.25-0.75 (odd
    maps) and faint Gaussian specks with peak 0.05-0.5 (even maps)."""
    maps = []
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float64) + 0.5] * 3, indexing="ij")
    for i in range(n_maps):
        ctr = rng.uniform(3, size - 3, 3)
        r2 = sum((g - c) ** 2 for g, c in zip(grids, ctr))
        if i % 2:
            p = rng.uniform(0.25, 0.75) * torch.sigmoid((rng.uniform(1.5, 3.5) - r2.sqrt()) / 0.7)
        else:
            p = rng.uniform(0.05, 0.5) * torch.exp(-r2 / (2 * rng.uniform(0.6, 1.0) ** 2))
        maps.append(p.float().reshape(1, 1, -1))
    return maps


#: the grid of the file-format volumes (app tests)
CASE_SHAPE = (20, 18, 16)


def make_case(seed: int = 0, shape=CASE_SHAPE, num_classes: int = 3, sharp: float = 4.0, noise: float = 1.5):
    """``(probs (C, x, y, z) float32 summing to 1, label (x, y, z) int64, logits)`` with blob-shaped classes.

    The logits carry spatially smooth noise; the label is drawn voxel-wise from ``probs`` (calibrated).
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    logits = np.zeros((num_classes, *shape))
    for c in range(1, num_classes):
        center = rng.uniform(-0.4, 0.4, size=3)[:, None, None, None]
        radius = rng.uniform(0.3, 0.5)
        smooth_noise = gaussian_filter(rng.normal(0.0, 1.0, size=shape), 1.5)
        logits[c] = sharp * (radius - np.sqrt(((grid - center) ** 2).sum(0))) / radius
        logits[c] += noise * smooth_noise / smooth_noise.std()
    e = np.exp(logits - logits.max(0, keepdims=True))
    probs = (e / e.sum(0, keepdims=True)).astype(np.float32)
    u = rng.uniform(size=shape)
    label = (np.cumsum(probs, axis=0) < u).sum(0).clip(0, num_classes - 1).astype(np.int64)
    return probs, label, logits.astype(np.float32)


# ------------------------------------------------------------------------------------------ MONAI images


def monai_volumes(n: int = 3, shape=(24, 24, 24), first_seed: int = 0, noise_max: float = 0.2
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` ``(image, seg)`` pairs of ``monai.data.create_test_image_3d`` (two spheres, classes 0-2), case ``i``
    drawn with ``RandomState(first_seed + i)``."""
    from monai.data import create_test_image_3d

    return [create_test_image_3d(*shape, num_objs=2, rad_max=7, rad_min=4, num_seg_classes=2, noise_max=noise_max,
                                 random_state=np.random.RandomState(first_seed + i)) for i in range(n)]


def meta_cases(volumes, affines) -> list[dict]:
    """``{"image", "label"}`` MetaTensor items ``(1, *spatial)`` (float32) of ``(image, seg)`` pairs, one affine
    each."""
    from monai.data import MetaTensor

    return [{"image": MetaTensor(torch.tensor(im)[None].float(), affine=a.clone()),
             "label": MetaTensor(torch.tensor(seg)[None].float(), affine=a.clone())}
            for (im, seg), a in zip(volumes, affines, strict=True)]


def intensity_cases(num_cases: int, size: int) -> list[dict]:
    """``num_cases`` seeded cases of ``size``^3 (spheres of classes 1 and 2 from ``create_test_image_3d``, image
    ``label / 2`` plus Gaussian noise), each with a ``case_id`` and its own anisotropic spacing (the cases of
    ``dist_eval_script.py``)."""
    from monai.data import MetaTensor, create_test_image_3d

    cases = []
    for i in range(num_cases):
        rs = np.random.RandomState(100 + i)
        _, seg = create_test_image_3d(size, size, size, num_objs=4, rad_max=size // 4, rad_min=3, num_seg_classes=2,
                                      random_state=rs)
        im = (seg / 2.0 + rs.normal(0.0, 0.2, seg.shape)).astype(np.float32)
        spacing = (1.0 + 0.25 * i, 0.8, 1.5 + 0.5 * (i % 2))
        affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
        cases.append({"image": MetaTensor(torch.tensor(im)[None], affine=affine),
                      "label": MetaTensor(torch.tensor(seg)[None].float(), affine=affine.clone()),
                      "case_id": i})
    return cases


def train_tiny_unet(images: torch.Tensor, labels: torch.Tensor, num_classes: int = 3, steps: int = 30):
    """A 3D UNet (channels 4, 8) initialised under ``torch.manual_seed(0)`` and trained for ``steps`` Adam steps
    (DiceCE) on ``images``/``labels`` ``(B, 1, *spatial)`` (well under a second); returned in eval mode."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=(4, 8), strides=(2,),
               num_res_units=0)
    loss_fn, opt = DiceCELoss(to_onehot_y=True, softmax=True), torch.optim.Adam(net.parameters(), 3e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(net(images), labels).backward()
        opt.step()
    return net.eval()


def nested_region_probs(seed: int, shape=(18, 16, 10)) -> np.ndarray:
    """Nested-ish sigmoid probabilities ``(3, *shape)`` of 3 regions (WT, TC, ET), as a region-trained nnU-Net
    outputs (float32)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.avg_pool3d(torch.randn(1, 3, *shape, generator=g), 5, 1, 2)[0] * 14
    z[1] -= 1.0
    z[2] -= 2.0
    return torch.sigmoid(z).numpy().astype(np.float32)
