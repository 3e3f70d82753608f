"""Differentiable image resampling with PyTorch's conventions: ``affine_grid``, ``grid_sample`` and resizing.

A leaf module (imports only ``jax`` and ``numpy``) that reproduces, value for value, the PyTorch operations the
reference CC-ST-AE implementation uses:

* `affine_grid`  = ``torch.nn.functional.affine_grid``  (2-D, ``(B, 2, 3)`` matrices),
* `grid_sample`  = ``torch.nn.functional.grid_sample``  (``'bilinear'``/``'bicubic'``, ``'zeros'``/``'border'``;
  also ``'cubic'``, the same cubic convolution with Keys' third-order ``A = -0.5``, for fitting models),
* `affine_warp`  = the two composed,
* `resize_bicubic` = ``F.interpolate(mode='bicubic', align_corners=False)``,
* `upsample_bilinear_align_corners` = ``nn.Upsample(scale_factor, mode='bilinear', align_corners=True)``.

Conventions (those of PyTorch, transposed to channels-last):

* Images are ``(B, H, W, C)``: batch, rows, columns, channels. For a 4D-STEM pattern ``(Qx, Qy)`` that is
  ``H = Qx`` (rows) and ``W = Qy`` (columns).
* Normalised coordinates lie in ``[-1, 1]`` across the image. A sampling grid is ``(B, H_out, W_out, 2)`` whose last
  axis is ``(x, y)`` = (**column**, **row**): note the order, opposite to the array axes.
* ``align_corners=False`` (PyTorch's default): ``-1`` and ``+1`` are the outer *edges* of the edge pixels, so pixel
  ``j`` of ``n`` has centre ``(2j + 1)/n - 1``. ``align_corners=True``: ``-1``/``+1`` are the *centres* of the edge
  pixels, pixel ``j`` sits at ``2j/(n - 1) - 1``.
* ``theta`` ``(B, 2, 3)`` maps **output** coordinates to **input** sample coordinates (pull semantics):
  ``out(p) = in(theta @ [p_x, p_y, 1])``. The identity matrix ``[[1, 0, 0], [0, 1, 0]]`` reproduces the image.

Numerics: coordinates and interpolation weights are computed in at least float32 (float64 if the inputs are float64),
values are interpolated in that precision and cast back to the image dtype, so bfloat16 images work. The grid is
built elementwise, never with a matrix product, because default-precision float32 matmuls run in TF32/bfloat16 on
GPUs/TPUs (about 1e-2 pixel errors).

Gradients: everything is differentiable with respect to the image values and the grid / ``theta``. Bilinear
interpolation has a kink at integer pixel coordinates (including the identity warp); there the gradient with respect
to the coordinates is a one-sided difference whose side is decided by float rounding, exactly as in PyTorch.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

__all__ = [
    "BICUBIC_A",
    "KEYS_A",
    "affine_grid",
    "affine_warp",
    "grid_sample",
    "resize_bicubic",
    "upsample_bilinear_align_corners",
]

Array = jax.Array

#: Free parameter of the cubic convolution kernel used by PyTorch (and OpenCV) for bicubic interpolation.
BICUBIC_A = -0.75
#: The same kernel's parameter in ``mode='cubic'``: Keys' choice, the only one whose interpolation error falls as the
#: cube of the pixel size (``-0.75`` is first-order accurate: it misplaces narrow spots by a phase-dependent amount).
KEYS_A = -0.5

_MODES = ("bilinear", "bicubic", "cubic")
_PADDING_MODES = ("zeros", "border")


# ----------------------------------------------------------------------------------------------------- validation


def _as_float_array(x: ArrayLike, name: str, ndim: int, layout: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} axes); got shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...); got {x.dtype}.")
    return x


def _check_choice(value: str, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}.")


def _pair(value: Sequence[int], name: str) -> tuple[int, int]:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a pair of ints (H, W); got {value!r}.") from None
    if len(items) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be a pair of Python ints (H, W); got {value!r}.")
    if min(items) < 1:
        raise ValueError(f"{name} must be positive; got {items}.")
    return int(items[0]), int(items[1])


def _compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype coordinates, weights and sums are computed in: the inputs' dtypes promoted to at least float32."""
    out = jnp.dtype(jnp.float32)
    for d in dtypes:
        d = jax.dtypes.canonicalize_dtype(d)
        if jnp.issubdtype(d, jnp.floating) and d.itemsize > out.itemsize:
            out = d
    return out


# ------------------------------------------------------------------------------------------------ coordinate maps


def _base_coords(n: int, align_corners: bool) -> np.ndarray:
    """Normalised coordinates of the ``n`` pixel centres along one axis, float64 (PyTorch's ``affine_grid`` base)."""
    if n == 1:
        return np.zeros(1)  # torch: a single pixel sits at 0 in both conventions.
    j = np.arange(n, dtype=np.float64)
    if align_corners:
        return 2.0 * j / (n - 1) - 1.0
    return (2.0 * j + 1.0) / n - 1.0


def _unnormalize(coord: Array, n: int, align_corners: bool) -> Array:
    """Normalised ``[-1, 1]`` coordinate -> pixel index (same operation order as PyTorch)."""
    if align_corners:
        return (coord + 1) / 2 * (n - 1)
    return ((coord + 1) * n - 1) / 2


def _clip_coordinates(coord: Array, n: int) -> Array:
    """Clamp pixel coordinates to ``[0, n - 1]`` ('border' padding) with PyTorch's gradient: zero *at* the limits."""
    hi = n - 1
    return jnp.where(coord <= 0, jnp.zeros_like(coord), jnp.where(coord >= hi, jnp.full_like(coord, hi), coord))


def _floor_index(coord_floor: Array, n: int) -> Array:
    """``floor(coordinate)`` as int32, pre-clamped to ``[-4, n + 4]`` so that huge coordinates cannot overflow.

    The clamp never changes a result: beyond it every tap is out of range (masked for 'zeros', clamped to the same
    edge pixel for 'border'), and the interpolation weights use the unclamped fractional part.
    """
    return jnp.clip(coord_floor, -4, n + 4).astype(jnp.int32)


def _cubic_weights(t: Array, a: float = BICUBIC_A) -> tuple[Array, Array, Array, Array]:
    """Cubic-convolution weights for taps at offsets ``-1, 0, 1, 2`` from ``floor(x)``; ``t = x - floor(x)``.

    Kernel (Keys; PyTorch uses ``A = BICUBIC_A = -0.75``): ``k(s) = (A+2)|s|^3 - (A+3)|s|^2 + 1`` for ``|s| <= 1``,
    ``A|s|^3 - 5A|s|^2 + 8A|s| - 4A`` for ``1 < |s| < 2``, 0 beyond. The four weights sum to 1.
    """

    def near(s):  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def far(s):  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _cubic_weights_np(t: np.ndarray) -> np.ndarray:
    """`_cubic_weights` for numpy float64 arrays, stacked on a new last axis of size 4."""
    return np.stack(_cubic_weights(t), axis=-1)


# ---------------------------------------------------------------------------------------------------- affine_grid


def affine_grid(theta: ArrayLike, size: Sequence[int], *, align_corners: bool = False) -> Array:
    """Sampling grid of a batch of 2-D affine maps, like ``torch.nn.functional.affine_grid``.

    For output pixel ``(i, j)`` (row, column) with normalised centre ``(x_j, y_i)`` (see the module docstring for
    both ``align_corners`` conventions)::

        grid[b, i, j] = (theta[b,0,0]*x_j + theta[b,0,1]*y_i + theta[b,0,2],
                         theta[b,1,0]*x_j + theta[b,1,1]*y_i + theta[b,1,2])

    computed elementwise (no matrix product, so no TF32/bfloat16 rounding on accelerators).

    Args:
      theta: ``(B, 2, 3)`` affine matrices, output -> input normalised coordinates, ``(x, y)`` = (column, row).
      size: output size, ``(H, W)`` or ``(B, H, W)`` (Python ints; static under ``jax.jit``). With ``B`` given it must
        equal ``theta.shape[0]``.
      align_corners: PyTorch's ``align_corners``.

    Returns:
      ``(B, H, W, 2)`` grid in normalised coordinates, last axis ``(x = column, y = row)``; dtype = ``theta``'s dtype
      promoted to at least float32.

    Example:
      >>> theta = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
      >>> affine_grid(theta, (2, 3), align_corners=True)[0, :, :, 0]   # x = column coordinate
      Array([[-1.,  0.,  1.],
             [-1.,  0.,  1.]], dtype=float32)
    """
    theta = _as_float_array(theta, "theta", 3, "(B, 2, 3)")
    if theta.shape[1:] != (2, 3):
        raise ValueError(f"theta must have shape (B, 2, 3); got {tuple(theta.shape)}.")
    size = tuple(size)
    if len(size) == 3:
        if size[0] != theta.shape[0]:
            raise ValueError(f"size {size} has batch {size[0]} but theta has batch {theta.shape[0]}.")
        size = size[1:]
    elif len(size) != 2:
        raise ValueError(f"size must be (H, W) or (B, H, W); got {size!r}.")
    h, w = _pair(size, "size")
    return _affine_grid(theta, h, w, bool(align_corners))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _affine_grid(theta: Array, h: int, w: int, align_corners: bool) -> Array:
    dtype = _compute_dtype(theta.dtype)
    t = theta.astype(dtype)[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    xs = jnp.asarray(_base_coords(w, align_corners), dtype)[None, :]  # (1, W): x = column
    ys = jnp.asarray(_base_coords(h, align_corners), dtype)[:, None]  # (H, 1): y = row
    gx = t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2]
    gy = t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]
    return jnp.stack([gx, gy], axis=-1)


# ---------------------------------------------------------------------------------------------------- grid_sample


def _axis_taps(
    coord: Array, n: int, *, mode: str, padding_mode: str
) -> tuple[list[Array], list[Array]]:
    """Per-axis tap indices (int32, clamped into ``[0, n)``) and weights (zero for masked taps).

    Args:
      coord: pixel coordinates along one axis (un-normalised), any shape, compute dtype.
      n: image size along that axis.

    Returns:
      ``(indices, weights)``: lists of 2 (bilinear) or 4 (bicubic, cubic) arrays of ``coord``'s shape.
    """
    if mode == "bilinear":
        if padding_mode == "border":
            coord = _clip_coordinates(coord, n)
        lo = jnp.floor(coord)
        frac = coord - lo
        offsets, weights = (0, 1), [1 - frac, frac]
    else:  # (bi)cubic: torch un-normalises without clamping and clamps each tap instead ('border').
        lo = jnp.floor(coord)
        a = KEYS_A if mode == "cubic" else BICUBIC_A
        offsets, weights = (-1, 0, 1, 2), list(_cubic_weights(coord - lo, a))
    base = _floor_index(lo, n)
    indices = []
    for k, off in enumerate(offsets):
        idx = base + off
        # 'zeros': taps outside the image contribute nothing. Bilinear 'border' keeps the mask too (torch does): the
        # only tap it can remove is the zero-weight one at ``n`` when the clamped coordinate is exactly ``n - 1``.
        # Bicubic 'border' replicates edge pixels tap by tap, like torch's ``get_value_bounded``.
        if padding_mode == "zeros" or mode == "bilinear":
            valid = (idx >= 0) & (idx < n)
            weights[k] = jnp.where(valid, weights[k], jnp.zeros_like(weights[k]))
        indices.append(jnp.clip(idx, 0, n - 1))
    return indices, weights


def grid_sample(
    images: ArrayLike,
    grid: ArrayLike,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> Array:
    """Samples ``images`` at ``grid`` locations, like ``torch.nn.functional.grid_sample`` (channels-last).

    ``out[b, i, j, c] = sum_taps weight * images[b, row, col, c]`` around the point ``grid[b, i, j]``. The pixel
    coordinate of a normalised ``g`` along an axis of size ``n`` is ``(g + 1)/2 * (n - 1)`` (``align_corners=True``)
    or ``((g + 1) * n - 1)/2`` (``False``).

    * ``'bilinear'``: 4 taps with weights ``(1 - t, t)`` per axis.
    * ``'bicubic'``: 16 taps at offsets ``-1..2`` from ``floor``, cubic-convolution weights with ``A = -0.75``.
    * ``'cubic'`` (not in PyTorch): the same taps with Keys' ``A = -0.5`` (`KEYS_A`), third-order accurate; use it
      to model a pattern by a warped image (sub-pixel spot positions), where ``-0.75`` biases the fit.
    * ``padding_mode='zeros'``: every tap outside the image contributes 0 individually (a sample half a pixel
      outside the edge gets half the edge value). ``'border'``: bilinear clamps the *coordinate* into
      ``[0, n - 1]`` (zero coordinate gradient there, as in torch); (bi)cubic clamps each *tap index* to the edge.

    Implementation: the image is flattened to ``(B, H*W, C)`` and each tap is one ``take_along_axis`` over all
    channels, with out-of-range taps masked through their weights ("gather4").

    Args:
      images: ``(B, H, W, C)`` floating images (float32, bfloat16, float64, ...).
      grid: ``(B, H_out, W_out, 2)`` normalised sample coordinates, last axis ``(x = column, y = row)``.
      mode: ``'bilinear'``, ``'bicubic'`` or ``'cubic'``.
      padding_mode: ``'zeros'`` or ``'border'``.
      align_corners: PyTorch's ``align_corners``.

    Returns:
      ``(B, H_out, W_out, C)`` samples with ``images``' dtype (interpolated in at least float32).
    """
    images = _as_float_array(images, "images", 4, "(B, H, W, C)")
    grid = _as_float_array(grid, "grid", 4, "(B, H_out, W_out, 2)")
    _check_choice(mode, "mode", _MODES)
    _check_choice(padding_mode, "padding_mode", _PADDING_MODES)
    if grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape (B, H_out, W_out, 2); got {tuple(grid.shape)}.")
    if grid.shape[0] != images.shape[0]:
        raise ValueError(
            f"grid batch {grid.shape[0]} does not match images batch {images.shape[0]} "
            f"(images {tuple(images.shape)}, grid {tuple(grid.shape)})."
        )
    return _grid_sample(images, grid, mode, padding_mode, bool(align_corners))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _grid_sample(images: Array, grid: Array, mode: str, padding_mode: str, align_corners: bool) -> Array:
    b, h, w, c = images.shape
    _, h_out, w_out, _ = grid.shape
    dtype = _compute_dtype(images.dtype, grid.dtype)
    g = grid.astype(dtype)
    ix = _unnormalize(g[..., 0].reshape(b, h_out * w_out), w, align_corners)  # (B, N) column coordinate
    iy = _unnormalize(g[..., 1].reshape(b, h_out * w_out), h, align_corners)  # (B, N) row coordinate
    flat = images.astype(dtype).reshape(b, h * w, c)  # cast once: image gradients accumulate in `dtype`
    out = _tap_sum(flat, ix, iy, (h, w, mode, padding_mode))
    return out.reshape(b, h_out, w_out, c).astype(images.dtype)


def _taps(ix: Array, iy: Array, static: tuple, *, derivatives: bool = False):
    """Tap indices into the flattened image and per-axis weights (and their coordinate derivatives)."""
    h, w, mode, padding_mode = static
    x_idx, x_wts = _axis_taps(ix, w, mode=mode, padding_mode=padding_mode)
    y_idx, y_wts = _axis_taps(iy, h, mode=mode, padding_mode=padding_mode)
    if not derivatives:
        return x_idx, x_wts, y_idx, y_wts
    # d weight / d coordinate, exactly what autodiff of `_axis_taps` gives (floor and clamps included)
    _, x_dw = jax.jvp(lambda t: _axis_taps(t, w, mode=mode, padding_mode=padding_mode)[1], (ix,), (jnp.ones_like(ix),))
    _, y_dw = jax.jvp(lambda t: _axis_taps(t, h, mode=mode, padding_mode=padding_mode)[1], (iy,), (jnp.ones_like(iy),))
    return x_idx, x_wts, y_idx, y_wts, x_dw, y_dw


def _gather(flat: Array, index: Array) -> Array:
    return jnp.take_along_axis(flat, index[..., None], axis=1, mode="promise_in_bounds")


def _weighted_taps(flat: Array, x_idx, y_idx, w: int, pairs) -> list[Array]:
    """``[sum_taps wy * wx * flat[b, tap] for (wx, wy) in pairs]``: one gather per tap shared by all the sums."""
    sums = [None] * len(pairs)
    for j, yi in enumerate(y_idx):
        for i, xi in enumerate(x_idx):
            vals = _gather(flat, yi * w + xi)
            for k, (wx, wy) in enumerate(pairs):
                term = vals * (wx[i] * wy[j])[..., None]
                sums[k] = term if sums[k] is None else sums[k] + term
    return sums


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _tap_sum(flat: Array, ix: Array, iy: Array, static: tuple) -> Array:
    """``out[b, n] = sum_taps wy * wx * flat[b, tap]``: ``flat`` ``(B, H*W, C)``, pixel coordinates ``(B, N)``.

    One ``take_along_axis`` over all channels per tap, out-of-range taps masked through their weights. The
    derivative is written out (`_tap_sum_jvp`): the same gathers give the value and its two coordinate
    derivatives, so reverse mode needs no per-tap chains of weight derivatives (about 2x faster on XLA:CPU).
    """
    x_idx, x_wts, y_idx, y_wts = _taps(ix, iy, static)
    return _weighted_taps(flat, x_idx, y_idx, static[1], [(x_wts, y_wts)])[0]


def _tap_sum_jvp(static, primals, tangents):
    flat, ix, iy = primals
    d_flat, d_ix, d_iy = tangents
    x_idx, x_wts, y_idx, y_wts, x_dw, y_dw = _taps(ix, iy, static, derivatives=True)
    out, slope_x, slope_y = _weighted_taps(flat, x_idx, y_idx, static[1],
                                           [(x_wts, y_wts), (x_dw, y_wts), (x_wts, y_dw)])
    tangent = jnp.zeros_like(out)
    if not isinstance(d_flat, SymbolicZero):
        tangent = tangent + _tap_sum(d_flat, ix, iy, static)
    if not isinstance(d_ix, SymbolicZero):
        tangent = tangent + slope_x * d_ix[..., None]
    if not isinstance(d_iy, SymbolicZero):
        tangent = tangent + slope_y * d_iy[..., None]
    return out, tangent


_tap_sum.defjvp(_tap_sum_jvp, symbolic_zeros=True)


def affine_warp(
    images: ArrayLike,
    theta: ArrayLike,
    *,
    out_size: Sequence[int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> Array:
    """Warps images by affine maps: ``grid_sample(images, affine_grid(theta, out_size))``.

    ``out(p) = images(theta @ [p, 1])`` in normalised ``(x = column, y = row)`` coordinates (pull semantics, as
    ``F.grid_sample(x, F.affine_grid(theta, size))`` in PyTorch). Under ``jax.jit`` pass ``out_size``, ``mode``,
    ``padding_mode`` and ``align_corners`` as static values (close over them or use ``static_argnames``).

    Cost: the backward pass is dominated by the scatter-add into the image gradient. When only ``theta`` needs a
    gradient (warping data rather than a learned image), pass ``jax.lax.stop_gradient(images)``: about 2x cheaper.

    Args:
      images: ``(B, H, W, C)`` floating images.
      theta: ``(B, 2, 3)`` output -> input affine matrices.
      out_size: ``(H_out, W_out)`` of the output grid (default ``(H, W)``). The normalised coordinates span the
        whole image in both, so a different size resamples the same field of view on a finer/coarser grid.
      mode, padding_mode, align_corners: as in `grid_sample`.

    Returns:
      ``(B, H_out, W_out, C)`` warped images, ``images``' dtype.
    """
    images = _as_float_array(images, "images", 4, "(B, H, W, C)")
    size = images.shape[1:3] if out_size is None else _pair(out_size, "out_size")
    grid = affine_grid(theta, size, align_corners=align_corners)
    if grid.shape[0] != images.shape[0]:
        raise ValueError(f"theta batch {grid.shape[0]} does not match images batch {images.shape[0]}.")
    _check_choice(mode, "mode", _MODES)
    _check_choice(padding_mode, "padding_mode", _PADDING_MODES)
    return _grid_sample(images, grid, mode, padding_mode, bool(align_corners))


# ------------------------------------------------------------------------------------------- separable resizing


def _resample_axis(x: Array, idx: np.ndarray, wts: np.ndarray, axis: int) -> Array:
    """``out[..., o, ...] = sum_k wts[o, k] * x[..., idx[o, k], ...]`` along ``axis`` (1 or 2 of ``(B, H, W, C)``).

    The static taps are folded into a dense ``(n_out, n_in)`` matrix and applied as one matrix product (full float32
    precision on every backend): on CPUs a product is several times faster than per-tap gathers, and its gradient
    is a product too rather than a scatter.
    """
    n_out, n_in = idx.shape[0], x.shape[axis]
    matrix = np.zeros((n_out, n_in), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(n_out), idx.shape[1]), idx.reshape(-1)), wts.reshape(-1))
    spec = "oh,bhwc->bowc" if axis == 1 else "ow,bhwc->bhoc"
    return jnp.einsum(spec, jnp.asarray(matrix, x.dtype), x, precision=jax.lax.Precision.HIGHEST)


def _bicubic_resize_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices ``(n_out, 4)`` and weights ``(n_out, 4)`` of torch's bicubic ``interpolate`` (half-pixel)."""
    scale = n_in / n_out
    real = scale * (np.arange(n_out) + 0.5) - 0.5  # not clamped at 0 for cubic (torch's ``cubic=True``)
    lo = np.minimum(np.floor(real), n_in - 1)  # torch's guard_index_and_lambda
    t = np.clip(real - lo, 0.0, 1.0)
    idx = np.clip(lo[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1).astype(np.int32)  # edge replication
    return idx, _cubic_weights_np(t)


def _linear_align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices ``(n_out, 2)`` and weights ``(n_out, 2)`` of torch's bilinear resize with ``align_corners=True``."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    real = scale * np.arange(n_out)
    lo = np.minimum(np.floor(real), n_in - 1)
    t = np.clip(real - lo, 0.0, 1.0)
    idx = np.stack([lo, np.minimum(lo + 1, n_in - 1)], axis=-1).astype(np.int32)
    return idx, np.stack([1.0 - t, t], axis=-1)


def _resize_separable(images: Array, taps_h: tuple, taps_w: tuple) -> Array:
    dtype = _compute_dtype(images.dtype)
    x = images.astype(dtype)
    x = _resample_axis(x, *taps_h, axis=1)
    x = _resample_axis(x, *taps_w, axis=2)
    return x.astype(images.dtype)


def resize_bicubic(images: ArrayLike, size: Sequence[int]) -> Array:
    """Bicubic resize, like ``F.interpolate(x, size=size, mode='bicubic', align_corners=False)`` (channels-last).

    Output pixel ``o`` samples the input at ``(o + 0.5) * n_in / n_out - 0.5`` (half-pixel centres) with the
    cubic-convolution kernel ``A = -0.75``; taps beyond the edge replicate the edge pixel (torch's ``interpolate``
    clamps indices, unlike `grid_sample` with 'zeros'). No antialiasing when downsampling (torch's default).
    Separable: a 4-tap resampling along rows, then along columns (each a matrix product).

    Args:
      images: ``(B, H, W, C)`` floating images.
      size: ``(H_out, W_out)`` (Python ints).

    Returns:
      ``(B, H_out, W_out, C)``, ``images``' dtype (computed in at least float32).
    """
    images = _as_float_array(images, "images", 4, "(B, H, W, C)")
    return _resize_bicubic(images, _pair(size, "size"))


@functools.partial(jax.jit, static_argnums=1)
def _resize_bicubic(images: Array, size: tuple[int, int]) -> Array:
    _, h, w, _ = images.shape
    return _resize_separable(images, _bicubic_resize_taps(h, size[0]), _bicubic_resize_taps(w, size[1]))


def upsample_bilinear_align_corners(images: ArrayLike, factor: float | Sequence[float]) -> Array:
    """Bilinear upsampling, like ``nn.Upsample(scale_factor=factor, mode='bilinear', align_corners=True)``.

    Output size ``floor(n * factor)`` per axis; output pixel ``o`` samples the input at ``o * (n_in - 1)/(n_out - 1)``
    (edge pixel centres aligned). ``jax.image.resize`` uses half-pixel centres (``align_corners=False``), so it does
    not reproduce this. Separable: a 2-tap resampling along rows, then along columns (each a matrix product).

    Args:
      images: ``(B, H, W, C)`` floating images.
      factor: scale factor, one number or ``(factor_h, factor_w)``.

    Returns:
      ``(B, floor(H*factor_h), floor(W*factor_w), C)``, ``images``' dtype (computed in at least float32).
    """
    images = _as_float_array(images, "images", 4, "(B, H, W, C)")
    factors = tuple(factor) if isinstance(factor, Sequence) else (factor, factor)
    if len(factors) != 2 or not all(isinstance(f, (int, float, np.number)) and f > 0 for f in factors):
        raise ValueError(f"factor must be a positive number or a pair (factor_h, factor_w); got {factor!r}.")
    _, h, w, _ = images.shape
    h_out, w_out = int(np.floor(h * factors[0])), int(np.floor(w * factors[1]))
    if min(h_out, w_out) < 1:
        raise ValueError(f"factor {factor!r} gives an empty output for input size {(h, w)}.")
    return _upsample_bilinear_align_corners(images, (h_out, w_out))


@functools.partial(jax.jit, static_argnums=1)
def _upsample_bilinear_align_corners(images: Array, size: tuple[int, int]) -> Array:
    _, h, w, _ = images.shape
    return _resize_separable(
        images, _linear_align_corners_taps(h, size[0]), _linear_align_corners_taps(w, size[1])
    )
