"""A 2-D convolution whose kernel gradient is one matrix product (faster on XLA:CPU), as a drop-in for `lax`.

On the CPU backend XLA computes the kernel gradient of a stride-1 convolution as a convolution over the batch and
spatial axes, which runs at about a fifth of the speed of the forward pass on a 2-core machine (1.09 s against 0.20 s
for a 3x3, 128 -> 128 channel convolution of a ``(4, 200, 200, 128)`` batch). Written as a matrix product of the
column-shifted input with the output cotangent,

``dW[i, j, c, d] = sum_{b, h, w} x_pad[b, h + i, w + j, c] * g[b, h, w, d]``

(one ``(kw * C, N) @ (N, kh * D)`` product over the ``N`` padded positions, the input shifted along columns and
the cotangent along rows), it runs at matmul speed (0.47 s). The value and the input gradient are XLA's own
convolutions, so outputs are unchanged; the kernel gradient agrees to float32 rounding. `conv_general_dilated` takes
this path for stride-1, undilated, ungrouped NHWC/HWIO convolutions when the default backend is the CPU, and calls
`jax.lax.conv_general_dilated` otherwise (GPU/TPU libraries already have fast kernel gradients). Pass it to
``flax.linen.Conv(conv_general_dilated=...)``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "conv2d_nhwc"]

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, padding):
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_nhwc(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Stride-1 2-D convolution (cross-correlation, like `lax`), gradients of the kernel by one matmul per row.

    Args:
      x: ``(B, H, W, C)`` input.
      w: ``(kh, kw, C, D)`` kernel.
      padding: ``((top, bottom), (left, right))`` zero padding in pixels (``((1, 1), (1, 1))`` for 3x3 "same").

    Returns:
      ``(B, H + top + bottom - kh + 1, W + left + right - kw + 1, D)``.
    """
    return _conv(x, w, padding)


def _fwd(x, w, padding):
    return _conv(x, w, padding), (x, w)


def _bwd(padding, res, g):
    x, w = res
    kh, kw, c, d = w.shape
    (t, b), (l, r) = padding
    # input gradient: full correlation of the cotangent with the flipped, transposed kernel
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = _conv(g, w_t, ((kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r)))
    # kernel gradient: column-shifted copies of the padded input against row-shifted copies of the cotangent, one
    # matmul: cols[b, h', w, (j, c)] = x_pad[b, h', w + j, c]; gs[b, h', w, (i, d)] = g[b, h' - i, w, d]
    ho, wo = g.shape[1], g.shape[2]
    xp = jnp.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
    hp = xp.shape[1]
    cols = jnp.concatenate([xp[:, :, j:j + wo, :] for j in range(kw)], axis=-1).reshape(-1, kw * c)
    gs = jnp.concatenate([jnp.pad(g, ((0, 0), (i, hp - ho - i), (0, 0), (0, 0))) for i in range(kh)], axis=-1)
    prod = lax.dot_general(cols, gs.reshape(-1, kh * d), (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)  # (kw * C, kh * D)
    dw = prod.reshape(kw, c, kh, d).transpose(2, 0, 1, 3).astype(w.dtype)
    return dx.astype(x.dtype), dw


conv2d_nhwc.defvjp(_fwd, _bwd)


def _explicit_padding(padding) -> tuple[tuple[int, int], tuple[int, int]] | None:
    if isinstance(padding, str):
        return None
    try:
        pads = tuple((int(a), int(b)) for a, b in padding)
    except (TypeError, ValueError):
        return None
    return pads if len(pads) == 2 and min(min(p) for p in pads) >= 0 else None


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """`jax.lax.conv_general_dilated`, with the matmul kernel gradient (`conv2d_nhwc`) on the CPU backend."""
    pads = _explicit_padding(padding)
    simple = (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and tuple(window_strides) == (1, 1)
        and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
        and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
        and pads is not None
        and _is_nhwc(dimension_numbers)
    )
    if simple:
        return conv2d_nhwc(lhs, rhs, pads)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                    precision=precision, preferred_element_type=preferred_element_type)
