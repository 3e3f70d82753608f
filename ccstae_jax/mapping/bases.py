"""Re-estimating the dictionary from the aligned patterns (one expectation-maximisation step).

The learned bases are trained through the network's masks and blurred by the spread of its early warps. Given each
pattern's fitted warp, the mean of the patterns of a class pulled onto the base frame is the maximum-likelihood base
for that alignment; `make_accumulator` sums them batch by batch and `reestimate` divides. The pull follows the fit's
model: the whole pattern by its affine warp, or, with rigid spots, each spot by the shift of its centre. The base
frame may extend the patterns' by a margin on every side (`ccstae_jax.mapping.fit.BaseTable.margin`): a pattern
turned by its warp fills part of it with its corners, which hold the diffraction orders farthest out.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ccstae_jax.ops import affine, warp
from ccstae_jax.model.networks import symmetrize
from ccstae_jax.train.parallel import data_sharding, replicated_sharding

_HP = jax.lax.Precision.HIGHEST
#: A base pixel is kept (``support``) where the patterns that covered it add up to at least this share of its class:
#: beyond the circle inscribed in the patterns' frame only those turned the right way see a pixel, and the orders
#: there carry the most information about strain (their lever arm is longest).
MIN_SUPPORT = 0.05


class UpdatedBases(NamedTuple):
    """`reestimate` output: ``bases`` ``(K, H, W)`` and ``support`` ``(K, H, W)`` bool, the pixels the aligned
    patterns covered often enough to trust their mean (a rotated pattern leaves the base frame's corners unseen)."""

    bases: jax.Array
    support: jax.Array


def base_grid(shape: tuple[int, int], margin: int = 0) -> jax.Array:
    """``(H + 2 margin, W + 2 margin, 2)`` normalised ``(x, y)`` coordinates, in a ``shape = (H, W)`` pattern's frame,
    of the pixels of a base frame that extends it by ``margin`` pixels on every side."""
    h, w = shape
    x = affine.pixel_centre(jnp.arange(w + 2 * margin, dtype=jnp.float32) - margin, w)
    y = affine.pixel_centre(jnp.arange(h + 2 * margin, dtype=jnp.float32) - margin, h)
    return jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), -1)


def rigid_grid(theta: jax.Array, centres: jax.Array, owner: jax.Array, margin: int = 0) -> jax.Array:
    """Sampling grid ``(B, H, W, 2)`` (normalised ``(x, y)``) that pulls patterns onto the base frame with rigid
    spots: base pixel ``b`` reads the data at ``theta(c) + R (b - c)``, ``c`` the centre of its spot and ``R`` the
    rotation part of ``theta`` (`ccstae_jax.ops.affine.turn_offsets`; the inverse of the fit's model).

    Args:
      theta: ``(B, 2, 3)`` pull warps (base frame -> data frame).
      centres: ``(B, S, 2)`` spot centres of each pattern's base (`ccstae_jax.mapping.fit.BaseTable.centres`).
      owner: ``(B, H, W)`` int, the spot of each base pixel; -1: none (the pixel is pulled by the warp itself).
      margin: the base frame extends the patterns' by this many pixels on every side (``H``, ``W`` are the base
        frame's).
    """
    b, h, w = owner.shape
    grid = base_grid((h - 2 * margin, w - 2 * margin), margin)
    c = jnp.take_along_axis(centres, jnp.maximum(owner, 0).reshape(b, h * w, 1), axis=1).reshape(b, h, w, 2)
    c = jnp.where((owner >= 0)[..., None], c, grid[None])
    moved = jnp.einsum("bij,bhwj->bhwi", theta[:, :, :2], c, precision=_HP) + theta[:, None, None, :, 2]
    offset = grid[None] - c
    du, dv = affine.turn_offsets(theta[:, None, None, :, :2], offset[..., 0], offset[..., 1],
                                 (h - 2 * margin, w - 2 * margin))
    return moved + jnp.stack([du, dv], -1)


@functools.lru_cache(maxsize=16)
def make_accumulator(task, *, interpolation: str = "cubic", mesh=None, margin: int = 0) -> Callable:
    """A jitted ``(images (B, H, W), theta (B, 2, 3), class_index (B,), weights (B,), spots)`` ->
    ``(sums (K, H, W), coverage (K, H, W), counts (K,))``: each class's patterns (scaled as the model scales them)
    pulled onto the base frame by their warps and summed, the same sum of an all-ones image (how much of each base
    pixel the patterns saw: a pull from outside the detector adds nothing), and how many patterns there were
    (``weights`` 0 for padding). ``spots``: None (the whole pattern pulled by its affine warp), or the
    ``(centres (K, S, 2), owner (K, H, W))`` of a rigid-spot table (each spot pulled by the shift of its centre,
    `rigid_grid`), the model the warps were fitted with. ``interpolation`` is the pull's kernel (``"cubic"``: Keys,
    or ``"bilinear"``). The base frame extends the patterns' by ``margin`` pixels on every side (the sums are
    ``(K, H + 2 margin, W + 2 margin)``). With a ``mesh`` the batch is split over its devices and the sums are
    replicated. One function per task, kernel, mesh and margin in a process."""
    cfg = task.model_cfg
    mode = "cubic" if interpolation == "cubic" else "bilinear"

    def accumulate(images, theta, class_index, weights, spots):
        x = images.astype(jnp.float32) * cfg.intensity_scale
        stack = jnp.stack([x, jnp.ones_like(x)], -1)
        if spots is None:
            grid = base_grid(x.shape[-2:], margin)
            grid = jnp.einsum("bij,hwj->bhwi", theta[:, :, :2], grid, precision=_HP) + theta[:, None, None, :, 2]
        else:
            centres, owner = spots
            grid = rigid_grid(theta, centres[class_index], owner[class_index], margin)
        pulled = warp.grid_sample(stack, grid, mode=mode)
        onehot = jax.nn.one_hot(class_index, cfg.num_bases, dtype=jnp.float32) * weights[:, None]
        sums = jnp.einsum("bk,bhwc->ckhw", onehot, pulled, precision=_HP)
        return sums[0], sums[1], jnp.sum(onehot, 0)

    if mesh is None:
        return jax.jit(accumulate)
    data, repl = data_sharding(mesh), replicated_sharding(mesh)
    return jax.jit(accumulate, in_shardings=(data, data, data, data, repl), out_shardings=repl)


def padded(images: jax.Array, margin: int) -> jax.Array:
    """``(..., H, W)`` -> ``(..., H + 2 margin, W + 2 margin)``, zeros around."""
    pad = [(0, 0)] * (jnp.ndim(images) - 2) + [(margin, margin)] * 2
    return jnp.pad(jnp.asarray(images), pad)


def learned(task, params, margin: int = 0) -> UpdatedBases:
    """The dictionary the run learned, ``(K, H, W)`` in the scaled units of the model's inputs, with zeros ``margin``
    pixels around; its support is the pattern frame (the network knows nothing of the margin)."""
    bases = task.model.apply({"params": params}, method=lambda m: m.dictionary())
    return UpdatedBases(padded(bases, margin), padded(jnp.ones_like(bases, dtype=bool), margin))


def reestimate(task, params, sums, coverage, counts, *, min_support: float = MIN_SUPPORT,
               margin: int = 0) -> UpdatedBases:
    """The bases from `make_accumulator` sums: each pixel averaged over the patterns that covered it (``sums /
    coverage``, both symmetrised first when the model symmetrises its bases, with cubic rotations that keep the
    aligned disks' edges as sharp as the data hold them); a pixel is ``support`` when that
    coverage is at least ``min_support`` times the class's pattern count. A class with no pattern keeps its learned
    base (its pattern frame supported, not the margin). ``margin``: the sums' frame extends the patterns' by that
    many pixels on every side."""
    cfg = task.model_cfg
    fallback = learned(task, params, margin)
    counts = jnp.asarray(counts, jnp.float32)
    sums, coverage = jnp.asarray(sums, jnp.float32), jnp.asarray(coverage, jnp.float32)
    if cfg.symmetrize_bases:
        sums, coverage = symmetrize(sums, cfg, margin, "cubic"), symmetrize(coverage, cfg, margin, "cubic")
    seen = coverage >= min_support * jnp.maximum(counts, 1.0)[:, None, None]
    mean = jnp.where(seen, sums / jnp.where(seen, coverage, 1.0), 0.0)
    used = (counts > 0)[:, None, None]
    return UpdatedBases(jnp.where(used, mean, fallback.bases), jnp.where(used, seen, fallback.support))
