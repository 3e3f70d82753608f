"""Tests of `ccstae_jax.ops.warp` against independent references (no PyTorch needed).

Every behaviour test below is one body executed under four variants (the dm-pix pattern):

* ``plain``: the function called eagerly;
* ``jit``:   under ``jax.jit``;
* ``vmap``:  the batch axis split into ``(2, B/2)`` and the function ``jax.jit(jax.vmap(...))``-ed over the
  leading axis;
* ``grad``:  the value taken from ``jax.vjp`` (its cotangents must be finite), plus a gradient check in float64:
  along a random direction in the space of the arguments a test marks differentiable, reverse mode (vjp),
  forward mode (jvp) and a central finite difference with a tiny step must agree. Test inputs keep sample
  coordinates off the integer pixel positions, where bilinear interpolation has kinks, unless a test says
  otherwise. The float64 bicubic gradient compiles are slow, so most of those cases are marked ``slow``.

References: ``jax.scipy.ndimage.map_coordinates`` (bilinear, per-tap zero padding), plain numpy loops (bicubic
``grid_sample``, bicubic resize, bilinear ``align_corners=True`` upsampling) and float64 numpy coordinates.
"""
from __future__ import annotations

import ast
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.ndimage import map_coordinates

from ccstae_jax.ops import warp

VARIANTS = ("plain", "jit", "vmap", "grad")
A = -0.75  # torch's cubic-convolution parameter, restated here on purpose


# ------------------------------------------------------------------------------------------------- the variants


def _run(variant: str, fn, *args, grad_argnums=None):
    """Evaluates ``fn(*args)`` under ``variant`` and returns the output as numpy.

    All ``args`` are arrays with the batch on axis 0 (an even size, for the vmap split). ``grad_argnums`` (default:
    all) are the arguments the ``grad`` variant checks derivatives for; ``()`` checks only that the float32
    gradients are finite.
    """
    args = [np.asarray(a) for a in args]
    if variant == "plain":
        return np.asarray(fn(*args))
    if variant == "jit":
        return np.asarray(jax.jit(fn)(*args))
    if variant == "vmap":
        b = args[0].shape[0]
        assert b % 2 == 0, "vmap variant needs an even batch"
        out = jax.jit(jax.vmap(fn))(*[a.reshape(2, b // 2, *a.shape[1:]) for a in args])
        return np.asarray(out).reshape(b, *out.shape[2:])
    assert variant == "grad", variant
    argnums = tuple(range(len(args))) if grad_argnums is None else tuple(grad_argnums)
    if argnums:
        return _value_and_check_grads_float64(fn, args, argnums)
    shape = jax.eval_shape(fn, *args)
    cotangent = np.random.default_rng(7).normal(size=shape.shape).astype(shape.dtype)

    @jax.jit
    def value_and_cotangents(args, cotangent):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    out, grads = value_and_cotangents(args, cotangent)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))), "non-finite gradient"
    return np.asarray(out)


def _value_and_check_grads_float64(fn, args, argnums, *, step=1e-7, rtol=1e-6):
    """Value of ``fn`` through ``jax.vjp`` (float64, returned as float32) and a gradient check.

    Along one random direction in the space of the differentiable arguments, the directional derivative from reverse
    mode (vjp), from forward mode (jvp) and from a central difference must agree, and the vjp must be finite. One
    compiled function does it all.
    """
    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        full = [np.asarray(a, np.float64) for a in args]
        primals = [full[i] for i in argnums]
        dirs = [rng.normal(size=p.shape) for p in primals]
        cotangent = rng.normal(size=jax.eval_shape(fn, *full).shape)

        def f(*diff):
            call = list(full)
            for i, x in zip(argnums, diff):
                call[i] = x
            return fn(*call)

        @jax.jit
        def directional(primals, dirs, cotangent):
            out, vjp = jax.vjp(f, *primals)
            grads = vjp(cotangent)
            reverse = sum(jnp.vdot(g, d) for g, d in zip(grads, dirs))
            forward = jnp.vdot(cotangent, jax.jvp(f, tuple(primals), tuple(dirs))[1])
            plus = f(*[p + step * d for p, d in zip(primals, dirs)])
            minus = f(*[p - step * d for p, d in zip(primals, dirs)])
            numeric = jnp.vdot(cotangent, (plus - minus) / (2 * step))
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]))
            return out, finite, reverse, forward, numeric

        out, finite, reverse, forward, numeric = directional(primals, dirs, cotangent)
        out = np.asarray(out, np.float32)
        reverse, forward, numeric = float(reverse), float(forward), float(numeric)
    assert bool(finite), "non-finite gradient"
    tol = rtol * max(abs(numeric), 1.0)
    assert abs(reverse - numeric) <= tol, f"args {argnums}: vjp {reverse} vs finite difference {numeric}"
    assert abs(forward - numeric) <= tol, f"args {argnums}: jvp {forward} vs finite difference {numeric}"
    return out


def with_variants(argnames: str, cases, *, slow_grad=()):
    """``parametrize`` over every variant x case; the ``grad`` variant of the cases in ``slow_grad`` (bicubic
    float64 gradient compiles take several seconds each) is marked ``slow``."""
    names = [n.strip() for n in argnames.split(",")]
    params = []
    for case in cases:
        case = tuple(case) if len(names) > 1 else (case,)
        for variant in VARIANTS:
            marks = (pytest.mark.slow,) if variant == "grad" and case in slow_grad else ()
            test_id = "-".join(str(c).replace(" ", "") for c in (variant, *case))
            params.append(pytest.param(variant, *case, marks=marks, id=test_id))
    return pytest.mark.parametrize(["variant", *names], params)


@pytest.fixture
def run(variant):
    """``run(fn, *args, grad_argnums=None)`` evaluates ``fn`` under this test's variant (see `_run`)."""
    return lambda fn, *args, **kw: _run(variant, fn, *args, **kw)


# ------------------------------------------------------------------------------------------------ references


def _unnormalize(g, n, align_corners):
    g = np.asarray(g, np.float64)
    return (g + 1) / 2 * (n - 1) if align_corners else ((g + 1) * n - 1) / 2


def _keys(s, A=A):
    """Keys' cubic convolution kernel (torch's A = -0.75 by default), as a function of the tap distance."""
    s = abs(s)
    if s <= 1:
        return (A + 2) * s**3 - (A + 3) * s**2 + 1
    if s < 2:
        return A * s**3 - 5 * A * s**2 + 8 * A * s - 4 * A
    return 0.0


def _ref_bilinear_zeros(images, grid, align_corners):
    """map_coordinates(order=1, mode='constant') masks each of the 4 taps separately, like torch's 'zeros'."""
    b, h, w, c = images.shape
    out = np.zeros(grid.shape[:3] + (c,))
    for n in range(b):
        ix = _unnormalize(grid[n, ..., 0], w, align_corners)
        iy = _unnormalize(grid[n, ..., 1], h, align_corners)
        for ch in range(c):
            out[n, ..., ch] = map_coordinates(images[n, ..., ch], [iy, ix], order=1, mode="constant", cval=0.0)
    return out


def _ref_bilinear_border(images, grid, align_corners):
    """'border' = clamp the pixel coordinate into [0, n-1], then interpolate (no tap ever leaves the image)."""
    b, h, w, c = images.shape
    out = np.zeros(grid.shape[:3] + (c,))
    for n in range(b):
        ix = np.clip(_unnormalize(grid[n, ..., 0], w, align_corners), 0, w - 1)
        iy = np.clip(_unnormalize(grid[n, ..., 1], h, align_corners), 0, h - 1)
        for ch in range(c):
            out[n, ..., ch] = map_coordinates(images[n, ..., ch], [iy, ix], order=1, mode="nearest")
    return out


def _ref_bicubic(images, grid, align_corners, padding_mode, a=A):
    """Plain loop: 4x4 taps around floor(x), weight = kernel(distance); zero or edge-replicated outside."""
    images = np.asarray(images, np.float64)
    b, h, w, c = images.shape
    out = np.zeros(grid.shape[:3] + (c,))
    for n in range(b):
        for i in range(grid.shape[1]):
            for j in range(grid.shape[2]):
                x = _unnormalize(grid[n, i, j, 0], w, align_corners)
                y = _unnormalize(grid[n, i, j, 1], h, align_corners)
                x0, y0 = math.floor(x), math.floor(y)
                for yy in range(y0 - 1, y0 + 3):
                    for xx in range(x0 - 1, x0 + 3):
                        wt = _keys(x - xx, a) * _keys(y - yy, a)
                        if padding_mode == "zeros":
                            if 0 <= yy < h and 0 <= xx < w:
                                out[n, i, j] += wt * images[n, yy, xx]
                        else:
                            out[n, i, j] += wt * images[n, min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]
    return out


def _ref_resize_bicubic(images, size):
    """Loop version of torch's bicubic interpolate (align_corners=False): half-pixel source, clamped taps."""
    images = np.asarray(images, np.float64)
    b, h, w, c = images.shape
    ho, wo = size
    out = np.zeros((b, ho, wo, c))
    for i in range(ho):
        y = (i + 0.5) * h / ho - 0.5
        for j in range(wo):
            x = (j + 0.5) * w / wo - 0.5
            x0, y0 = math.floor(x), math.floor(y)
            for yy in range(y0 - 1, y0 + 3):
                for xx in range(x0 - 1, x0 + 3):
                    wt = _keys(x - xx) * _keys(y - yy)
                    out[:, i, j] += wt * images[:, min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)]
    return out


def _ref_upsample_align_corners(images, factor):
    """Loop version of bilinear align_corners=True upsampling: source = o * (n_in - 1) / (n_out - 1)."""
    images = np.asarray(images, np.float64)
    b, h, w, c = images.shape
    ho, wo = int(h * factor), int(w * factor)
    out = np.zeros((b, ho, wo, c))
    for i in range(ho):
        y = i * (h - 1) / (ho - 1)
        y0 = min(math.floor(y), h - 1)
        y1, ty = min(y0 + 1, h - 1), y - y0
        for j in range(wo):
            x = j * (w - 1) / (wo - 1)
            x0 = min(math.floor(x), w - 1)
            x1, tx = min(x0 + 1, w - 1), x - x0
            out[:, i, j] = ((1 - ty) * ((1 - tx) * images[:, y0, x0] + tx * images[:, y0, x1])
                            + ty * ((1 - tx) * images[:, y1, x0] + tx * images[:, y1, x1]))
    return out


def _ref_affine_coords(theta, size, align_corners):
    """float64 grid from theta, written from the definition (pixel centres, x = column, y = row)."""
    h, w = size
    if align_corners:
        xs, ys = np.linspace(-1, 1, w), np.linspace(-1, 1, h)
    else:
        xs, ys = (np.arange(w) * 2 + 1) / w - 1, (np.arange(h) * 2 + 1) / h - 1
    if w == 1:
        xs = np.zeros(1)
    if h == 1:
        ys = np.zeros(1)
    x, y = np.meshgrid(xs, ys)  # (H, W)
    base = np.stack([x, y, np.ones_like(x)], -1)  # (H, W, 3)
    return np.einsum("hwk,bik->bhwi", base, np.asarray(theta, np.float64))


# --------------------------------------------------------------------------------------------------- inputs


def _images(b=4, h=5, w=7, c=2, seed=0):
    return np.random.default_rng(seed).normal(size=(b, h, w, c)).astype(np.float32)


def _grid(b=4, h=4, w=6, lo=-1.3, hi=1.3, seed=1):
    """Random normalised coordinates, partly outside [-1, 1]."""
    return np.random.default_rng(seed).uniform(lo, hi, size=(b, h, w, 2)).astype(np.float32)


def _theta(b=4, seed=2):
    """Random non-identity affine maps (rotation up to ~0.3 rad, scale 0.8-1.2, shear, shift)."""
    rng = np.random.default_rng(seed)
    ang = rng.uniform(-0.3, 0.3, b)
    sx, sy = rng.uniform(0.8, 1.2, (2, b))
    sh = rng.uniform(-0.1, 0.1, b)
    t = rng.uniform(-0.2, 0.2, (b, 2))
    rot = np.stack([np.stack([np.cos(ang), -np.sin(ang)], -1), np.stack([np.sin(ang), np.cos(ang)], -1)], -2)
    lin = np.stack([np.stack([sx, sh], -1), np.stack([sh, sy], -1)], -2) @ rot
    return np.concatenate([lin, t[:, :, None]], -1).astype(np.float32)


IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)


# ------------------------------------------------------------------------------------------ variant tests


@with_variants("align_corners", [False, True])
def test_bilinear_zeros_matches_map_coordinates(run, align_corners):
    images, grid = _images(), _grid()
    out = run(lambda im, g: warp.grid_sample(im, g, align_corners=align_corners), images, grid)
    np.testing.assert_allclose(out, _ref_bilinear_zeros(images, grid, align_corners), atol=2e-6)


@with_variants("align_corners", [False])
def test_bilinear_border_matches_clamped_coordinates(run, align_corners):
    images, grid = _images(), _grid(lo=-1.6, hi=1.6)
    out = run(
        lambda im, g: warp.grid_sample(im, g, padding_mode="border", align_corners=align_corners), images, grid
    )
    np.testing.assert_allclose(out, _ref_bilinear_border(images, grid, align_corners), atol=2e-6)


@with_variants("padding_mode, align_corners", [("zeros", False), ("border", True)], slow_grad=[("border", True)])
def test_bicubic_matches_numpy_loop(run, padding_mode, align_corners):
    images, grid = _images(), _grid(lo=-1.5, hi=1.5)
    out = run(
        lambda im, g: warp.grid_sample(
            im, g, mode="bicubic", padding_mode=padding_mode, align_corners=align_corners
        ),
        images, grid,
    )
    np.testing.assert_allclose(out, _ref_bicubic(images, grid, align_corners, padding_mode), atol=5e-6)


def test_cubic_mode_is_the_keys_kernel_with_a_minus_one_half():
    images, grid = _images(), _grid(lo=-1.5, hi=1.5)
    out = warp.grid_sample(jnp.asarray(images), jnp.asarray(grid), mode="cubic")
    np.testing.assert_allclose(out, _ref_bicubic(images, grid, False, "zeros", a=warp.KEYS_A), atol=5e-6)


def test_cubic_mode_moves_a_spot_centroid_exactly_where_torch_bicubic_misplaces_it():
    """Why model fits use ``'cubic'``: Keys' A = -0.5 reproduces linear functions, so a sub-pixel shift moves a
    spot's centroid by exactly the shift; torch's A = -0.75 misplaces it by a phase-dependent ~0.02-0.05 px, which
    biases a strain fit by several percent."""
    r, c = np.mgrid[:32, :32].astype(np.float64)
    spot = np.exp(-((r - 15.5) ** 2 + (c - 15.5) ** 2) / (2 * 1.5**2))
    theta = jnp.asarray([[[1.0, 0.0, -0.3 * 2 / 32], [0.0, 1.0, -0.4 * 2 / 32]]])  # moves content by (0.4, 0.3) px

    def centroid_error(mode):
        out = np.asarray(warp.affine_warp(jnp.asarray(spot)[None, ..., None], theta, mode=mode))[0, ..., 0]
        return np.hypot((out * r).sum() / out.sum() - 15.9, (out * c).sum() / out.sum() - 15.8)

    assert centroid_error("cubic") < 1e-4
    assert centroid_error("bicubic") > 0.02


@with_variants(
    "mode, align_corners",
    [("bilinear", False), ("bilinear", True), ("bicubic", False), ("bicubic", True)],
    slow_grad=[("bicubic", False), ("bicubic", True)],
)
def test_identity_theta_reproduces_image(run, mode, align_corners):
    images = _images()
    theta = np.broadcast_to(IDENTITY, (4, 2, 3)).copy()
    # Identity samples sit exactly on pixel centres: bilinear has a kink there, so only the image gradient is
    # compared with finite differences; bicubic's kernel is C1, so theta is checked too.
    argnums = (0,) if mode == "bilinear" else (0, 1)
    out = run(
        lambda im, th: warp.affine_warp(im, th, mode=mode, align_corners=align_corners),
        images, theta, grad_argnums=argnums,
    )
    np.testing.assert_allclose(out, images, atol=1e-5)  # f32 rounding of the centres (~1e-7 px)


@with_variants("mode, align_corners", [("bilinear", False), ("bicubic", True)], slow_grad=[("bicubic", True)])
def test_affine_warp_matches_float64_coordinates(run, mode, align_corners):
    """Non-identity theta onto a different, non-square output grid (out_size != input size)."""
    images, theta = _images(h=6, w=9), _theta()
    out_size = (5, 4)
    out = run(
        lambda im, th: warp.affine_warp(im, th, out_size=out_size, mode=mode, align_corners=align_corners),
        images, theta,
    )
    grid = _ref_affine_coords(theta, out_size, align_corners)
    if mode == "bilinear":
        ref = _ref_bilinear_zeros(images, grid, align_corners)
    else:
        ref = _ref_bicubic(images, grid, align_corners, "zeros")
    np.testing.assert_allclose(out, ref, atol=5e-6)


@with_variants("align_corners", [False, True])
def test_affine_grid_is_float32_exact(run, align_corners):
    """Each grid value is within a few float32 roundings of the exact value: elementwise, not a low-precision dot.

    Bound: four roundings of 2**-24 relative each on |t0 x| + |t1 y| + |t2|. A bfloat16 (8-bit) or TF32 (11-bit)
    product is off by ~2**-9 or ~2**-12 of that and fails; the negative control below shows the bound bites.
    """
    theta = _theta(seed=5) * np.float32(3.0)
    size = (6, 9)
    grid = run(lambda th: warp.affine_grid(th, size, align_corners=align_corners), theta)
    xs = np.asarray(warp._base_coords(size[1], align_corners), np.float32).astype(np.float64)
    ys = np.asarray(warp._base_coords(size[0], align_corners), np.float32).astype(np.float64)
    t = theta.astype(np.float64)[:, :, :, None, None]
    terms = np.stack(np.broadcast_arrays(t[:, :, 0] * xs[None, :], t[:, :, 1] * ys[:, None], t[:, :, 2]), 0)
    exact = terms.sum(0).transpose(0, 2, 3, 1)  # (B, H, W, 2)
    bound = 4 * 2.0**-24 * np.abs(terms).sum(0).transpose(0, 2, 3, 1)
    assert np.all(np.abs(grid - exact) <= bound)
    # Negative control: the same computation with bfloat16-rounded inputs (what a bf16 matmul sees) must fail.
    rounded = np.asarray(jnp.asarray(theta, jnp.bfloat16).astype(jnp.float32), np.float64)[:, :, :, None, None]
    bf16_grid = (rounded[:, :, 0] * xs[None, :] + rounded[:, :, 1] * ys[:, None] + rounded[:, :, 2])
    assert not np.all(np.abs(bf16_grid.transpose(0, 2, 3, 1) - exact) <= bound)


@with_variants("size", [(11, 16), (3, 4)])
def test_resize_bicubic_matches_numpy_loop(run, size):
    images = _images(b=2, h=5, w=7)
    out = run(lambda im: warp.resize_bicubic(im, size), images)
    np.testing.assert_allclose(out, _ref_resize_bicubic(images, size), atol=5e-6)


@with_variants("factor", [2, 2.5])
def test_upsample_bilinear_align_corners_matches_numpy_loop(run, factor):
    images = _images(b=2, h=4, w=5)
    out = run(lambda im: warp.upsample_bilinear_align_corners(im, factor), images)
    ref = _ref_upsample_align_corners(images, factor)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=5e-6)
    np.testing.assert_allclose(out[:, [0, -1]][:, :, [0, -1]], images[:, [0, -1]][:, :, [0, -1]], atol=1e-6)


@with_variants(
    "mode, padding_mode",
    [("bilinear", "zeros"), ("bilinear", "border"), ("bicubic", "zeros"), ("bicubic", "border")],
    slow_grad=[("bicubic", "border")],
)
def test_gradients_finite_at_and_beyond_the_border(run, mode, padding_mode):
    """Samples exactly on the image edges, on pixel centres, just outside, far outside and huge."""
    special = np.array([-1.0, 1.0, -1.0 - 1 / 7, 1.0 + 1 / 7, 0.0, 1 / 7, -3.0, 3.0, 1e6, -1e6, 1e30, -1e30])
    gx, gy = np.meshgrid(special, special[::-1])  # every combination, (12, 12)
    grid = np.broadcast_to(np.stack([gx, gy], -1), (2, 12, 12, 2)).astype(np.float32)
    images = _images(b=2)
    out = run(
        lambda im, g: warp.grid_sample(im, g, mode=mode, padding_mode=padding_mode), images, grid,
        grad_argnums=(),  # on kinks on purpose: the grad variant checks finiteness only
    )
    assert np.all(np.isfinite(out))
    far = np.abs(grid).max(-1) >= 3.0
    if padding_mode == "zeros":
        assert np.all(out[far] == 0)
    else:  # border: far samples take edge values, never zero
        assert np.all(out[far] != 0)


# ---------------------------------------------------------------------------------------- single tests


def test_affine_grid_uses_no_matrix_product():
    jaxpr = str(jax.make_jaxpr(lambda th: warp.affine_grid(th, (4, 5)))(_theta()))
    assert "dot_general" not in jaxpr


def test_affine_grid_accepts_batched_size_and_checks_batch():
    theta = _theta()
    np.testing.assert_array_equal(warp.affine_grid(theta, (4, 3, 5)), warp.affine_grid(theta, (3, 5)))
    with pytest.raises(ValueError, match="batch 2 but theta has batch 4"):
        warp.affine_grid(theta, (2, 3, 5))


def test_affine_grid_single_pixel_is_centre():
    grid = warp.affine_grid(np.broadcast_to(IDENTITY, (1, 2, 3)), (1, 1))
    np.testing.assert_array_equal(grid, np.zeros((1, 1, 1, 2)))


def test_grid_axes_are_column_then_row():
    """A grid pointing at (x=+1 edge column, y=-1 edge row) with align_corners=True reads the top-right pixel."""
    images = _images(b=1, h=3, w=4, c=1)
    grid = np.array([[[[1.0, -1.0]]]], np.float32)
    out = warp.grid_sample(images, grid, align_corners=True)
    np.testing.assert_allclose(out[0, 0, 0, 0], images[0, 0, -1, 0], atol=1e-6)


def test_positive_x_translation_shifts_content_left():
    """Pull semantics: out(p) = in(p + t); t = one pixel to the right in x moves the image one column left."""
    images = _images(b=1, h=4, w=6, c=1)
    theta = IDENTITY.copy()[None]
    theta[0, 0, 2] = 2.0 / 6  # one column in normalised units (align_corners=False)
    out = np.asarray(jax.jit(warp.affine_warp)(images, theta))
    np.testing.assert_allclose(out[0, :, :-1], images[0, :, 1:], atol=1e-5)
    np.testing.assert_allclose(out[0, :, -1], 0.0, atol=1e-6)


def test_half_pixel_outside_gets_half_intensity():
    """'zeros' masks taps one by one: half a pixel beyond the edge centre, half the edge value (torch behaviour)."""
    images = np.ones((1, 3, 4, 1), np.float32)
    grid = np.array([[[[-1.0, 0.0]]]], np.float32)  # x = -1 is the outer edge of column 0 (align_corners=False)
    sample = jax.jit(warp.grid_sample, static_argnames="padding_mode")
    np.testing.assert_allclose(sample(images, grid), 0.5, atol=1e-6)
    np.testing.assert_allclose(sample(images, grid, padding_mode="border"), 1.0, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_theta_gradient_nonzero_at_identity(align_corners):
    """At identity the bilinear theta gradient is one-sided but must not vanish (dm-pix's ceil() makes it 0)."""
    images = _images(b=2, h=8, w=8, c=1)
    theta = np.broadcast_to(IDENTITY, (2, 2, 3)).copy()
    weights = np.random.default_rng(3).normal(size=(2, 8, 8, 1)).astype(np.float32)
    loss = lambda th: jnp.sum(warp.affine_warp(images, th, align_corners=align_corners) * weights)  # noqa: E731
    g = jax.jit(jax.grad(loss))(theta)
    assert np.all(np.abs(np.asarray(g)[:, :, 2]) > 1e-3)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_bfloat16_images_keep_dtype_and_match_float32(mode):
    images, theta = _images(), _theta()
    warp_fn = jax.jit(lambda im, th: warp.affine_warp(im, th, mode=mode))
    out16 = warp_fn(jnp.asarray(images, jnp.bfloat16), theta)
    out32 = warp_fn(jnp.asarray(images, jnp.bfloat16).astype(jnp.float32), theta)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=2e-2, rtol=1e-2)


def test_bfloat16_image_gradient_keeps_dtype_and_matches_float32():
    images, theta = jnp.asarray(_images(), jnp.bfloat16), _theta()
    grad = jax.jit(jax.grad(lambda im: jnp.sum(warp.affine_warp(im, theta).astype(jnp.float32))))
    g16, g32 = grad(images), grad(images.astype(jnp.float32))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, atol=1e-2, rtol=1e-2)


def test_bfloat16_resizes_keep_dtype():
    images = jnp.asarray(_images(b=2), jnp.bfloat16)
    assert warp.resize_bicubic(images, (10, 14)).dtype == jnp.bfloat16
    assert warp.upsample_bilinear_align_corners(images, 2).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: warp.grid_sample(np.zeros((5, 7, 2), np.float32), _grid()), ValueError, r"\(B, H, W, C\)"),
        (lambda: warp.grid_sample(np.zeros((4, 5, 7, 2), np.int32), _grid()), TypeError, "floating"),
        (lambda: warp.grid_sample(_images(), _grid()[..., :1]), ValueError, r"\(B, H_out, W_out, 2\)"),
        (lambda: warp.grid_sample(_images(b=2), _grid()), ValueError, "grid batch 4 does not match images batch 2"),
        (lambda: warp.grid_sample(_images(), _grid(), mode="nearest"), ValueError, "mode='nearest'"),
        (lambda: warp.grid_sample(_images(), _grid(), padding_mode="reflection"), ValueError, "padding_mode"),
        (lambda: warp.affine_grid(np.zeros((4, 3, 3), np.float32), (5, 7)), ValueError, r"\(B, 2, 3\)"),
        (lambda: warp.affine_grid(_theta(), (1, 4, 5, 7)), ValueError, r"\(H, W\) or \(B, H, W\)"),
        (lambda: warp.affine_warp(_images(), _theta(), out_size=(5.0, 7)), TypeError, "out_size"),
        (lambda: warp.resize_bicubic(_images(), (0, 7)), ValueError, "positive"),
        (lambda: warp.upsample_bilinear_align_corners(_images(), 0), ValueError, "factor"),
    ],
    ids=["images-rank", "images-int", "grid-last-axis", "batch-mismatch", "mode", "padding", "theta-shape",
         "size-length", "out-size-type", "resize-size", "factor"],
)
def test_bad_input_raises_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_public_functions_take_options_keyword_only():
    for name in warp.__all__:
        fn = getattr(warp, name)
        if not callable(fn):
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.default is not inspect.Parameter.empty:
                assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}({p.name}=...) must be keyword-only"


def test_module_imports_only_jax_and_numpy():
    tree = ast.parse(inspect.getsource(warp))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "collections", "functools", "jax", "numpy"}, roots
