"""Parity of `ccstae_jax.ops.warp` with PyTorch (optional: skipped when torch is not installed).

Run: ``cd /work/main && /work/venv-torch/bin/python -m pytest -q tests/test_warp_torch.py`` (a venv with
``torch==2.13.0`` and this package installed). Torch runs on the CPU in float32 with deterministic algorithms and
TF32 off; JAX runs wherever tests/conftest.py puts it (the CPU unless ``CCSTAE_TEST_PLATFORM`` says otherwise).

Required agreement: 5e-5 (bilinear) and 1e-4 (bicubic) for values and for gradients with respect to the image, the
grid and theta. Gradients with respect to coordinates are sums over pixels with magnitudes of tens to thousands, so
for them the bound is relative to the largest reference entry: ``|jax - torch| <= tol * max(1, max|torch|)``.

`grid_sample` is compared on *torch's own* grid (identity matrices included, where bilinear interpolation sits on
its kinks and the coordinate gradient is one-sided: identical inputs must give identical sides). `affine_grid` is
compared on its own; end-to-end theta gradients only at non-identity theta, because torch's ``linspace`` and ours
differ in the last bit at many positions, which flips the side of the kink at exact identity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccstae_jax.ops import warp

torch = pytest.importorskip("torch")
F = torch.nn.functional

pytestmark = pytest.mark.torch

TOL = {"bilinear": 5e-5, "bicubic": 1e-4}


@pytest.fixture(autouse=True, scope="module")
def _deterministic_float32_torch():
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(False)


def _nchw(x_nhwc):
    return torch.tensor(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)), requires_grad=True)


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _close(actual, expected, tol, *, relative=False, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bound = tol * max(1.0, float(np.abs(expected).max())) if relative else tol
    err = float(np.abs(actual - expected).max())
    assert err <= bound, f"{what}: max |jax - torch| = {err:.3g} > {bound:.3g}"


def _thetas(b=4, seed=0, *, identity_first=True):
    """Identity (optionally) followed by random rotation/scale/shear/shift matrices, (b, 2, 3) float32."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(b):
        if identity_first and k == 0:
            out.append(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
            continue
        a = rng.uniform(-0.4, 0.4)
        lin = np.array([[rng.uniform(0.85, 1.15), rng.uniform(-0.1, 0.1)], [0.0, rng.uniform(0.85, 1.15)]])
        lin[1, 0] = lin[0, 1]
        lin = lin @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        out.append(np.concatenate([lin, rng.uniform(-0.15, 0.15, (2, 1))], 1))
    return np.asarray(out, np.float32)


def _images(b=4, h=12, w=15, c=2, seed=1):
    return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_matches_torch(align_corners):
    theta = _thetas(seed=3)
    ref = F.affine_grid(torch.tensor(theta), (4, 1, 12, 15), align_corners=align_corners).numpy()
    _close(warp.affine_grid(theta, (12, 15), align_corners=align_corners), ref, 1e-6, what="grid")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_grid_sample_on_torch_grid_matches_values_and_gradients(mode, padding_mode, align_corners):
    images = _images()
    theta = _thetas()
    grid_t = F.affine_grid(torch.tensor(theta), (4, 2, 10, 13), align_corners=align_corners)
    # Append rows of random points, half of them outside the image, so padding is exercised everywhere.
    extra = torch.tensor(np.random.default_rng(5).uniform(-1.4, 1.4, (4, 3, 13, 2)).astype(np.float32))
    grid_t = torch.cat([grid_t, extra], 1).detach().requires_grad_(True)
    img_t = _nchw(images)
    out_t = F.grid_sample(img_t, grid_t, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    cot = np.random.default_rng(6).normal(size=out_t.shape).astype(np.float32)
    (out_t * torch.tensor(cot)).sum().backward()

    grid = grid_t.detach().numpy()
    out, vjp = jax.vjp(
        lambda im, g: warp.grid_sample(im, g, mode=mode, padding_mode=padding_mode, align_corners=align_corners),
        images, grid,
    )
    d_img, d_grid = vjp(jnp.asarray(cot.transpose(0, 2, 3, 1)))
    tol = TOL[mode]
    _close(out, _nhwc(out_t), tol, what="values")
    _close(d_img, _nhwc(img_t.grad), tol, what="d/d image")
    _close(d_grid, grid_t.grad.numpy(), tol, relative=True, what="d/d grid")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_affine_warp_end_to_end_gradients_match_torch(mode, align_corners):
    """Values, d/d image and d/d theta through affine_grid + grid_sample, non-identity theta, new output size."""
    images = _images()
    theta = _thetas(seed=8, identity_first=False)
    theta_t = torch.tensor(theta, requires_grad=True)
    img_t = _nchw(images)
    grid_t = F.affine_grid(theta_t, (4, 2, 9, 16), align_corners=align_corners)
    out_t = F.grid_sample(img_t, grid_t, mode=mode, padding_mode="zeros", align_corners=align_corners)
    cot = np.random.default_rng(9).normal(size=out_t.shape).astype(np.float32)
    (out_t * torch.tensor(cot)).sum().backward()

    out, vjp = jax.vjp(
        lambda im, th: warp.affine_warp(im, th, out_size=(9, 16), mode=mode, align_corners=align_corners),
        images, theta,
    )
    d_img, d_theta = vjp(jnp.asarray(cot.transpose(0, 2, 3, 1)))
    tol = TOL[mode]
    _close(out, _nhwc(out_t), tol, what="values")
    _close(d_img, _nhwc(img_t.grad), tol, what="d/d image")
    _close(d_theta, theta_t.grad.numpy(), tol, relative=True, what="d/d theta")


@pytest.mark.parametrize("size", [(40, 60), (29, 11), (12, 15), (200, 200)])
def test_resize_bicubic_matches_torch_interpolate(size):
    images = _images(b=2, h=10 if size != (200, 200) else 50, w=15 if size != (200, 200) else 50)
    img_t = _nchw(images)
    out_t = F.interpolate(img_t, size=size, mode="bicubic", align_corners=False)
    cot = np.random.default_rng(2).normal(size=out_t.shape).astype(np.float32)
    (out_t * torch.tensor(cot)).sum().backward()
    out, vjp = jax.vjp(lambda im: warp.resize_bicubic(im, size), images)
    (d_img,) = vjp(jnp.asarray(cot.transpose(0, 2, 3, 1)))
    _close(out, _nhwc(out_t), TOL["bicubic"], what="values")
    _close(d_img, _nhwc(img_t.grad), TOL["bicubic"], what="d/d image")


@pytest.mark.parametrize("factor", [2, 4, 5, 2.5])
def test_upsample_bilinear_align_corners_matches_torch(factor):
    images = _images(b=2, h=5, w=7, c=3)
    img_t = _nchw(images)
    out_t = torch.nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=True)(img_t)
    cot = np.random.default_rng(4).normal(size=out_t.shape).astype(np.float32)
    (out_t * torch.tensor(cot)).sum().backward()
    out, vjp = jax.vjp(lambda im: warp.upsample_bilinear_align_corners(im, factor), images)
    (d_img,) = vjp(jnp.asarray(cot.transpose(0, 2, 3, 1)))
    assert out.shape == _nhwc(out_t).shape
    _close(out, _nhwc(out_t), TOL["bilinear"], what="values")
    _close(d_img, _nhwc(img_t.grad), TOL["bilinear"], what="d/d image")
