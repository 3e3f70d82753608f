"""Affine algebra for the warp and for strain: pure functions of arrays.

Two frames appear in this project; every function says which one it works in.

* **Warp frame** (what `ccstae_jax.ops.warp` consumes, identical to PyTorch ``affine_grid``): normalised coordinates
  ``(u, v)`` in ``[-1, 1]`` with ``u`` along the pattern *columns* and ``v`` along the *rows*. A warp matrix ``theta``
  ``(..., 2, 3)`` maps output coordinates to input sample coordinates (pull semantics):
  ``out(p) = in(theta @ [p, 1])``.
* **Physics frame**: data arrays are ``(Rx, Ry, Qx, Qy)``; ``x`` = detector ``Qx`` = array axis 2 (rows of a pattern),
  ``y`` = ``Qy`` = axis 3 (columns), in pixels relative to the pattern centre. A real-space lattice deformation is
  ``A = (I + eps) R(rotation)`` with ``eps = [[strain_xx, shear_xy], [shear_xy, strain_yy]]`` (tensor shear) and
  ``R(t) = [[cos t, -sin t], [sin t, cos t]]`` (counter-clockwise from +Qx toward +Qy). Diffraction spots of that
  lattice sit at ``A^{-T} g``. Positive ``strain_xx`` = lattice stretched along x = spots move inward along Qx.
  This is py4DSTEM's frame.

How the two meet: if a data pattern equals a base pattern whose spots were moved by the linear map ``S`` (physics
frame, pixels), the warp that pulls the data back onto the base is ``theta = S`` (after the row/column swap and
normalisation). Relative to the base, the real-space lattice of the data is deformed by ``M = S^{-T}``
(`lattice_from_warp`), and `strain_from_affine` decomposes ``M M_ref^{-1} = (I + eps) R`` (left polar).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.typing import ArrayLike

Array = jnp.ndarray


def rotation_matrix(angle: ArrayLike) -> Array:
    """``R(angle) = [[cos, -sin], [sin, cos]]``, shape ``(..., 2, 2)``; angle in radians."""
    angle = jnp.asarray(angle)
    c, s = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)


def warp_matrix(
    scale_x: ArrayLike = 1.0,
    scale_y: ArrayLike = 1.0,
    shear: ArrayLike = 0.0,
    rotation: ArrayLike = 0.0,
    translation: ArrayLike = (0.0, 0.0),
) -> Array:
    """Builds warp matrices the way Auto4DSTEM does: ``theta = Theta1 @ Theta2 @ Theta3``.

    ``Theta1 = [[scale_x, shear], [shear, scale_y]]`` (symmetric scale/shear), ``Theta2 = R(rotation)``,
    ``Theta3`` = translation. Here ``x``/``y`` are the *warp* axes (column/row, normalised units), as in the
    reference; they are not the physics axes.

    Args:
      scale_x, scale_y, shear, rotation: arrays broadcastable to a batch shape ``(...)``; rotation in radians.
      translation: ``(..., 2)`` translation ``(t_u, t_v)`` in normalised units.

    Returns:
      ``(..., 2, 3)`` warp matrices.
    """
    scale_x, scale_y, shear, rotation = (jnp.asarray(a, jnp.float32) for a in (scale_x, scale_y, shear, rotation))
    translation = jnp.asarray(translation, jnp.float32)
    batch = jnp.broadcast_shapes(scale_x.shape, scale_y.shape, shear.shape, rotation.shape, translation.shape[:-1])
    s = jnp.stack(
        [jnp.stack([scale_x, shear], -1), jnp.stack([shear, scale_y], -1)], -2
    )
    linear = _mat2(jnp.broadcast_to(s, batch + (2, 2)), jnp.broadcast_to(rotation_matrix(rotation), batch + (2, 2)))
    # Theta3 = [I | t]; Theta1 Theta2 Theta3 = [L | L t].
    t = jnp.broadcast_to(translation, batch + (2,))
    offset = linear[..., :, 0] * t[..., 0:1] + linear[..., :, 1] * t[..., 1:2]
    return jnp.concatenate([linear, offset[..., None]], -1)


def to_homogeneous(theta: ArrayLike) -> Array:
    """``(..., 2, 3)`` → ``(..., 3, 3)`` with last row ``[0, 0, 1]``."""
    theta = jnp.asarray(theta)
    last = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0], theta.dtype), theta.shape[:-2] + (1, 3))
    return jnp.concatenate([theta, last], -2)


def compose(a: ArrayLike, b: ArrayLike) -> Array:
    """Composition of two warps, ``(a ∘ b)(p) = a(b(p))``, i.e. the homogeneous product ``A @ B``. ``(..., 2, 3)``.

    In pull semantics, warping by ``compose(a, b)`` samples the input at ``a(b(p))``: identical to warping by ``a``
    first and then by ``b`` (up to interpolation), with one resampling instead of two.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    linear = _mat2(a[..., :, :2], b[..., :, :2])
    offset = _vec2(a[..., :, :2], b[..., :, 2]) + a[..., :, 2]
    return jnp.concatenate([linear, offset[..., None]], -1)


def invert(theta: ArrayLike) -> Array:
    """Closed-form inverse of ``(..., 2, 3)`` warps: ``compose(invert(t), t) = identity``."""
    theta = jnp.asarray(theta)
    a, b, c = theta[..., 0, 0], theta[..., 0, 1], theta[..., 0, 2]
    d, e, f = theta[..., 1, 0], theta[..., 1, 1], theta[..., 1, 2]
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    ic = -(ia * c + ib * f)
    if_ = -(id_ * c + ie * f)
    return jnp.stack([jnp.stack([ia, ib, ic], -1), jnp.stack([id_, ie, if_], -1)], -2)


def identity_warp(batch_shape: tuple[int, ...] = (), dtype=jnp.float32) -> Array:
    """Identity warp matrices ``(*batch_shape, 2, 3)``."""
    eye = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype)
    return jnp.broadcast_to(eye, tuple(batch_shape) + (2, 3))


def pixel_centre(index, n: int):
    """Normalised coordinate in ``[-1, 1]`` of pixel ``index`` (any real or array; its centre for an integer) along an
    axis of ``n`` pixels: ``(2 index + 1) / n - 1``, the frame of every warp here (``align_corners=False``)."""
    return (2 * index + 1) / n - 1


def _frame(shape: tuple[int, int], align_corners: bool, dtype) -> tuple[Array, Array]:
    """Pixel = D * normalised + c, with D, c per axis in warp order (column, row)."""
    h, w = shape
    if align_corners:
        d = jnp.array([(w - 1) / 2, (h - 1) / 2], dtype)
    else:
        d = jnp.array([w / 2, h / 2], dtype)
    c = jnp.array([(w - 1) / 2, (h - 1) / 2], dtype)
    return d, c


def normalized_to_pixel(theta: ArrayLike, shape: tuple[int, int], *, align_corners: bool = False) -> Array:
    """Converts a warp from normalised coordinates to pixel coordinates ``(column, row)`` of a ``shape = (H, W)`` image.

    Pixel coordinates are array indices (pixel centres at integers). The result maps output pixel coordinates to
    input pixel coordinates, ``(..., 2, 3)``.
    """
    theta = jnp.asarray(theta)
    d, c = _frame(shape, align_corners, theta.dtype)
    linear = theta[..., :, :2] * d[:, None] / d[None, :]
    offset = d * theta[..., :, 2] + c - _vec2(linear, jnp.broadcast_to(c, theta.shape[:-2] + (2,)))
    return jnp.concatenate([linear, offset[..., None]], -1)


def pixel_to_normalized(theta_px: ArrayLike, shape: tuple[int, int], *, align_corners: bool = False) -> Array:
    """Inverse of `normalized_to_pixel`."""
    theta_px = jnp.asarray(theta_px)
    d, c = _frame(shape, align_corners, theta_px.dtype)
    linear = theta_px[..., :, :2] * d[None, :] / d[:, None]
    moved_centre = _vec2(theta_px[..., :, :2], jnp.broadcast_to(c, theta_px.shape[:-2] + (2,)))
    offset = (theta_px[..., :, 2] + moved_centre - c) / d
    return jnp.concatenate([linear, offset[..., None]], -1)


def spot_map_from_warp(theta: ArrayLike, shape: tuple[int, int]) -> Array:
    """The linear spot transform ``S`` (physics frame, ``(..., 2, 2)``) that a warp undoes.

    If ``data(q) = base(S^{-1} q)`` (spots of the base moved by ``S``), the warp pulling the data onto the base is
    this ``theta``. ``S`` acts on ``(qx, qy) = (row, column)`` pixel offsets from the pattern centre.
    """
    theta = jnp.asarray(theta)
    h, w = shape
    # Linear part in pixel units, warp order (column, row); the scale is the same with either align_corners for the
    # linear part up to (n-1)/n, and we use the align_corners=False frame of the model.
    scale = jnp.array([w / 2, h / 2], theta.dtype)
    lin_px = theta[..., :, :2] * scale[:, None] / scale[None, :]
    return _swap_axes(lin_px)


def lattice_from_warp(theta: ArrayLike, shape: tuple[int, int]) -> Array:
    """Real-space lattice deformation ``M = S^{-T}`` (physics frame, ``(..., 2, 2)``) of the data relative to the
    base."""
    s = spot_map_from_warp(theta, shape)
    return jnp.swapaxes(inv2(s), -1, -2)


def warp_from_lattice(m: ArrayLike, shape: tuple[int, int], translation: ArrayLike | None = None) -> Array:
    """Inverse of `lattice_from_warp`: the warp ``(..., 2, 3)`` (normalised, align_corners=False) for lattice ``m``."""
    m = jnp.asarray(m)
    s = jnp.swapaxes(inv2(m), -1, -2)
    lin_px = _swap_axes(s)
    h, w = shape
    scale = jnp.array([w / 2, h / 2], m.dtype)
    lin = lin_px * scale[None, :] / scale[:, None]
    t = jnp.zeros(m.shape[:-2] + (2,), m.dtype) if translation is None else jnp.asarray(translation, m.dtype)
    return jnp.concatenate([lin, t[..., None]], -1)


def lattice_from_strain(
    strain_xx: ArrayLike, strain_yy: ArrayLike, shear_xy: ArrayLike, rotation: ArrayLike
) -> Array:
    """Real-space lattice deformation ``A = (I + eps) R(rotation)`` in the physics frame, ``(..., 2, 2)``."""
    exx, eyy, exy = (jnp.asarray(a, jnp.float32) for a in (strain_xx, strain_yy, shear_xy))
    p = jnp.stack([jnp.stack([1 + exx, exy], -1), jnp.stack([exy, 1 + eyy], -1)], -2)
    return _mat2(p, rotation_matrix(jnp.asarray(rotation, p.dtype)))


def polar_left(t: ArrayLike) -> tuple[Array, Array]:
    """Left polar decomposition of 2x2 matrices, ``T = P @ U``: ``P`` symmetric positive, ``U`` a rotation.

    Closed form for ``det T > 0``: ``U = R(phi)`` with ``phi = atan2(T10 - T01, T00 + T11)``, ``P = T U^T``.

    Returns:
      ``(P, phi)``: ``P`` ``(..., 2, 2)`` and the rotation angle ``phi`` ``(...)`` in radians.
    """
    t = jnp.asarray(t)
    phi = jnp.arctan2(t[..., 1, 0] - t[..., 0, 1], t[..., 0, 0] + t[..., 1, 1])
    p = _mat2(t, jnp.swapaxes(rotation_matrix(phi).astype(t.dtype), -1, -2))
    p = 0.5 * (p + jnp.swapaxes(p, -1, -2))  # symmetric up to round-off; make it exact
    return p, phi


def strain_from_affine(m: ArrayLike, m_ref: ArrayLike | None = None) -> dict[str, Array]:
    """Strain, shear and rotation from real-space lattice deformations, relative to a reference.

    ``T = M @ M_ref^{-1} = P @ U`` (left polar); ``eps = P - I``. Physics frame (see module docstring):
    ``strain_xx = P[0,0] - 1`` along x = Qx (rows), ``strain_yy = P[1,1] - 1`` along y = Qy (columns),
    ``shear_xy = P[0,1]`` (tensor shear), ``rotation`` = angle of ``U`` in radians, counter-clockwise from +Qx toward
    +Qy, in ``(-pi, pi]``. All dimensionless except rotation.

    Args:
      m: ``(..., 2, 2)`` lattice deformations (e.g. from `lattice_from_warp`).
      m_ref: ``(2, 2)`` (or broadcastable) reference deformation; identity when None.

    Returns:
      dict with ``strain_xx``, ``strain_yy``, ``shear_xy``, ``rotation``, each ``(...)``.
    """
    m = jnp.asarray(m)
    t = m if m_ref is None else _mat2(m, jnp.broadcast_to(inv2(jnp.asarray(m_ref, m.dtype)), m.shape))
    p, phi = polar_left(t)
    return {
        "strain_xx": p[..., 0, 0] - 1.0,
        "strain_yy": p[..., 1, 1] - 1.0,
        "shear_xy": p[..., 0, 1],
        "rotation": phi,
    }


def inv2(m: ArrayLike) -> Array:
    """Closed-form inverse of ``(..., 2, 2)`` matrices (elementwise: exact float32 on any backend)."""
    m = jnp.asarray(m)
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    return jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-c, a], -1)], -2) / det[..., None, None]


def turn_matrix(linear: ArrayLike, shape: tuple[int, int]) -> Array:
    """The rotation part of the linear map ``linear`` ``(..., 2, 2)`` (warp frame, normalised) as a map of normalised
    offsets, ``(..., 2, 2)``: the nearest rotation to the map measured on the pixel grid of a ``shape = (H, W)``
    pattern (angle ``atan2(a_10 - a_01, a_00 + a_11)`` of its pixel-unit matrix), expressed back in normalised units
    (which differ along rows and columns when ``H != W``)."""
    m = jnp.asarray(linear)
    h, w = shape
    a01 = m[..., 0, 1] * (w / h)  # the map in pixel units: diag(W, H) A diag(W, H)^{-1}
    a10 = m[..., 1, 0] * (h / w)
    angle = jnp.arctan2(a10 - a01, m[..., 0, 0] + m[..., 1, 1])
    c, s = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([jnp.stack([c, -s * (h / w)], -1), jnp.stack([s * (w / h), c], -1)], -2)


def turn_offsets(linear: ArrayLike, du: ArrayLike, dv: ArrayLike, shape: tuple[int, int]) -> tuple[Array, Array]:
    """Offsets ``(du, dv)`` (warp frame, normalised) turned by the rotation part of ``linear`` (`turn_matrix`).
    Broadcasts over the leading axes."""
    t = turn_matrix(linear, shape)
    du, dv = jnp.asarray(du), jnp.asarray(dv)
    return t[..., 0, 0] * du + t[..., 0, 1] * dv, t[..., 1, 0] * du + t[..., 1, 1] * dv


def wrap_angle(angle, period: float):
    """Wraps angles into ``[-period/2, period/2)`` (any unit; NaN stays NaN). Keeps the input's kind: a NumPy array
    stays NumPy (float64 stays float64), a JAX array stays JAX."""
    return (angle + period / 2) % period - period / 2


def _swap_axes(m: Array) -> Array:
    """``P m P`` with ``P = [[0, 1], [1, 0]]``: re-expresses a 2x2 map from (column, row) to (row, column) order."""
    return jnp.stack([jnp.stack([m[..., 1, 1], m[..., 1, 0]], -1), jnp.stack([m[..., 0, 1], m[..., 0, 0]], -1)], -2)


def _mat2(a: Array, b: Array) -> Array:
    """Elementwise 2x2 @ 2x2 (avoids TF32/bf16 matmul precision loss on accelerators)."""
    return jnp.stack(
        [
            jnp.stack([a[..., 0, 0] * b[..., 0, 0] + a[..., 0, 1] * b[..., 1, 0],
                       a[..., 0, 0] * b[..., 0, 1] + a[..., 0, 1] * b[..., 1, 1]], -1),
            jnp.stack([a[..., 1, 0] * b[..., 0, 0] + a[..., 1, 1] * b[..., 1, 0],
                       a[..., 1, 0] * b[..., 0, 1] + a[..., 1, 1] * b[..., 1, 1]], -1),
        ],
        -2,
    )


def _vec2(a: Array, v: Array) -> Array:
    """Elementwise 2x2 @ 2-vector."""
    return jnp.stack([a[..., 0, 0] * v[..., 0] + a[..., 0, 1] * v[..., 1],
                      a[..., 1, 0] * v[..., 0] + a[..., 1, 1] * v[..., 1]], -1)
