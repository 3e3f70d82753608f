"""Strain maps from a trained CC-ST-AE: batched inference over a scan, referencing, validity, HDF5 output.

Conventions (also written into every output file): maps are ``(Rx, Ry)``; x = detector Qx = axis 2 of the data (rows
of a pattern), y = Qy = axis 3 (columns). ``strain_xx``, ``strain_yy``: real-space lattice strain along x and y
(positive = lattice stretched = spots move inward); ``shear_xy``: tensor shear; ``rotation``: radians,
counter-clockwise from +Qx toward +Qy. All are relative to a reference: ``T = M M_ref^{-1} = (I + eps) R(rotation)``
(left polar decomposition), where ``M`` is each pattern's real-space lattice deformation relative to the learned base
and ``M_ref`` the reference (median over a scan region, else over the whole scan). Rotations are taken modulo the
lattice symmetry (``2 pi / symmetry``) around the reference orientation, with circular statistics.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax import affine
from ccstae_jax.masks import static_ring_mask

CONVENTIONS = (
    "maps (Rx, Ry); x = detector Qx = data axis 2 (pattern rows), y = Qy = axis 3 (columns); strain_xx/strain_yy = "
    "real-space lattice strain along x/y (positive = stretched lattice, spots move inward); shear_xy = tensor shear; "
    "rotation in radians counter-clockwise from +Qx toward +Qy, modulo 2*pi/symmetry about the reference; "
    "T = M M_ref^-1 = (I + eps) R (left polar decomposition)"
)
QUANTITIES = ("strain_xx", "strain_yy", "shear_xy", "rotation")

# Reasons a position has no strain value (stored in /invalid_reason; 0 = valid).
INVALID_REASONS = {0: "valid", 1: "blank pattern (no intensity in the ring)", 2: "no lattice signal in the ring",
                   3: "non-finite prediction"}


def region_mask(scan_shape: tuple[int, int], region: tuple[int, int, int, int] | None) -> np.ndarray:
    """Boolean ``(Rx, Ry)`` mask of scan rows ``r0:r1`` and columns ``c0:c1``; the whole scan when None."""
    rx, ry = scan_shape
    if region is None:
        return np.ones(scan_shape, bool)
    r0, r1, c0, c1 = (int(v) for v in region)
    if not (0 <= r0 < r1 <= rx and 0 <= c0 < c1 <= ry):
        raise ValueError(
            f"reference region rows {r0}:{r1}, columns {c0}:{c1} lies outside the {rx}x{ry} scan "
            f"(need 0 <= r0 < r1 <= {rx} and 0 <= c0 < c1 <= {ry})")
    m = np.zeros(scan_shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def referenced_strain(
    lattice: np.ndarray, reference: np.ndarray, *, symmetry: int = 6, valid: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Strain/rotation of each lattice deformation relative to the reference positions.

    Args:
      lattice: ``(..., 2, 2)`` real-space lattice deformations (physics frame), e.g. `affine.lattice_from_warp`.
      reference: boolean mask over the leading axes of ``lattice`` selecting the reference positions.
      symmetry: lattice rotational order; rotations are compared modulo ``2 pi / symmetry``.
      valid: optional boolean mask of positions allowed into the reference statistics.

    Returns:
      dict of ``strain_xx``, ``strain_yy``, ``shear_xy``, ``rotation`` (radians, in ``[-pi/n, pi/n)``), shaped like
      the leading axes of ``lattice``.

    Each ``M`` is split as ``P R(phi)``; a lattice with ``n``-fold symmetry is unchanged by ``R(2 pi k / n)``, so
    ``phi`` is first moved within ``pi/n`` of the reference orientation (the circular mean of ``n * phi`` over the
    reference, divided by ``n``). ``M_ref = median(P) R(phi_ref)``, elementwise median over the reference positions.
    """
    lattice = np.asarray(lattice, np.float64)
    sel = np.asarray(reference, bool)
    if valid is not None:
        sel = sel & np.asarray(valid, bool)
    if not sel.any():
        raise ValueError("the reference region holds no valid positions")
    p, phi = (np.asarray(a) for a in affine.polar_left(jnp.asarray(lattice)))
    period = 2 * np.pi / symmetry
    phi_ref = np.angle(np.mean(np.exp(1j * symmetry * phi[sel]))) / symmetry
    phi_aligned = phi_ref + (phi - phi_ref + period / 2) % period - period / 2
    p_ref = np.median(p[sel], axis=0)
    m = p @ _rot(phi_aligned)
    m_ref = p_ref @ _rot(phi_ref)
    t = m @ np.linalg.inv(m_ref)
    out = {k: np.asarray(v, np.float64) for k, v in affine.strain_from_affine(jnp.asarray(t)).items()}
    out["rotation"] = (out["rotation"] + period / 2) % period - period / 2
    return out


def _rot(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def make_predict_fn(task, *, mesh=None, refine_steps: int = 0, refine_model: str = "forward",
                    base_update: bool = False, interpolation: str = "bilinear"):
    """A jitted inference step ``(params, images (B, H, W)) -> dict`` of per-pattern outputs.

    With ``refine_steps > 0`` each pattern's warp is polished against its learned base by that many
    Levenberg-Marquardt iterations (`ccstae_jax.refine`) before it is returned: ``refine_model="forward"`` (default)
    fits the base, split into a fixed radial background and moving spots, to the observed pixels with Poisson
    weights (`refine.refine_theta_forward`); ``"pull"`` minimises the masked error of the pattern pulled onto the
    base (`refine.refine_theta`, the training objective).

    With ``base_update=True`` (a second pass, after `reestimate_bases`) the step is
    ``(params, images, bases (K, H, W), support (K, H, W), theta0 (B, 2, 3)) -> dict``: the forward fit starts from
    ``theta0`` (the first pass's warps) against the re-estimated ``bases``, over the wide `update_annulus` where the
    base is supported, instead of the training mask (``error`` is then measured against the updated base there).
    ``interpolation`` (``"bilinear"`` or ``"cubic"``) is the forward fit's model warp (`refine.refine_theta_forward`).

    Returns ``theta`` ``(B, 2, 3)``, ``error`` ``(B,)`` (forward masked MSE against the base with the final-epoch
    mask: the reconstruction-error confidence map), ``ring_signal`` ``(B,)`` (in-ring intensity, scaled) and
    ``lattice_signal`` ``(B,)`` (relative strength of the ``n``-fold angular harmonic), ``lattice_significance``
    ``(B,)`` (that harmonic's amplitude over the rms amplitude of the odd orders 1, 3, ..., 11 — which vanish for a
    centrosymmetric diffraction pattern and so measure the noise), ``class_index`` ``(B,)``.
    With a ``mesh`` the batch axis is sharded over its ``data`` axis.
    """
    from ccstae_jax.losses import masked_mse
    from ccstae_jax.models import harmonic_weights, prior_ring
    from ccstae_jax.refine import check_interpolation

    if refine_model not in ("forward", "pull"):
        raise ValueError(f"refine_model={refine_model!r}: expected 'forward' or 'pull'")
    check_interpolation(interpolation)
    cfg = task.model_cfg
    hw = jnp.asarray(harmonic_weights(cfg))
    ring = jnp.asarray(prior_ring(cfg))
    odd = jnp.asarray(np.concatenate([harmonic_weights(dataclasses.replace(cfg, symmetry=k)) for k in range(1, 12, 2)]))

    annulus = jnp.asarray(update_annulus(task))

    def predict(params, images, bases=None, support=None, theta0=None):
        out, masks_b = task.forward(params, images, jnp.int32(10**6))
        theta = out["theta"]
        if bases is not None:  # second pass: the re-estimated dictionary, the first pass's warps, a wide annulus
            theta = theta0
            out["bases"] = bases
            out["base"] = jnp.einsum("bk,khw->bhw", out["classes"], bases, precision="highest")
            seen = jnp.einsum("bk,khw->bhw", out["classes"], support.astype(jnp.float32), precision="highest")
            masks_b = annulus * (seen > 0.5)
        if refine_steps and not cfg.interpolate:
            from ccstae_jax import warp
            from ccstae_jax import refine

            if refine_model == "forward":
                bg = jnp.einsum("bk,khw->bhw", out["classes"], refine.radial_background(out["bases"], cfg.center_px),
                                precision="highest")
                theta = refine.refine_theta_forward(theta, out["inputs"], out["base"] - bg, masks_b, background=bg,
                                                    steps=refine_steps, interpolation=interpolation)
            else:
                theta = refine.refine_theta(theta, out["inputs"], out["base"], masks_b, steps=refine_steps)
            out["warped_input"] = warp.affine_warp(out["inputs"][..., None], theta)[..., 0]
        err = masked_mse(out["warped_input"], out["base"], masks_b)
        x = out["inputs"] if not cfg.interpolate else images * cfg.intensity_scale
        ring_sum = jnp.sum(jnp.where(ring, x, 0.0), axis=(-2, -1))
        harm = jnp.hypot(jnp.einsum("bhw,hw->b", x, hw[0], precision="highest"),
                         jnp.einsum("bhw,hw->b", x, hw[1], precision="highest"))
        odd_c = jnp.einsum("bhw,khw->bk", x, odd, precision="highest")  # (B, 12): cos/sin of 6 odd orders
        noise = jnp.sqrt(jnp.mean(odd_c**2, axis=-1) * 2.0)  # rms amplitude |H_k| over the odd orders
        return {
            "theta": theta,
            "error": err,
            "ring_signal": ring_sum,
            "lattice_signal": harm / jnp.maximum(jnp.abs(ring_sum), 1e-30),
            "lattice_significance": harm / jnp.maximum(noise, 1e-30),
            "class_index": jnp.argmax(out["classes"], -1),
        }

    if base_update:
        if not refine_steps or cfg.interpolate or refine_model != "forward":
            raise ValueError("base_update needs refine_steps > 0, refine_model='forward' and a model without the "
                             "up-sampled (interpolate) path")
        step = predict
    else:
        def step(params, images):
            return predict(params, images)
    if mesh is None:
        return jax.jit(step)
    from jax.sharding import NamedSharding, PartitionSpec as P

    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(step, in_shardings=(repl, data) + ((repl, repl, data) if base_update else ()), out_shardings=data)


def update_annulus(task) -> np.ndarray:
    """The base-frame pixels ``(H, W)`` (bool) compared in the second, updated-base pass: every pixel farther than
    ``0.75 * ring_inner`` from the centre and at least 2 px inside the frame, corners included. Wider than the
    training ring: the re-estimated base is an average of every pattern, accurate on spots the network's masks never
    covered, and the outermost spots move most under strain (on the simulator, fitting out to the corners instead of
    the inscribed circle brings a fit against the true base from ~1.5x to ~1.2x the Cramér-Rao bound)."""
    cfg, lc = task.model_cfg, task.loss_cfg
    h, w = cfg.pattern_shape
    keep = static_ring_mask((h, w), 0.75 * lc.ring_inner, np.inf, center=cfg.center_px)
    edge = 2
    keep[:edge], keep[h - edge:], keep[:, :edge], keep[:, w - edge:] = False, False, False, False
    return keep


class UpdatedBases(NamedTuple):
    """`reestimate_bases` output: ``bases`` ``(K, H, W)`` and ``support`` ``(K, H, W)`` bool, the pixels the aligned
    patterns covered often enough to trust their mean (a rotated pattern leaves the base frame's corners unseen)."""

    bases: jax.Array
    support: jax.Array


def make_base_accumulator(task, *, mesh=None, interpolation: str = "bilinear"):
    """A jitted ``(images (B, H, W), theta (B, 2, 3), class_index (B,), weights (B,))`` ->
    ``(sums (K, H, W), coverage (K, H, W), counts (K,))``: each class's patterns (scaled as the model scales them)
    pulled onto the base frame by their warps and summed, the same sum of an all-ones image (how much of each base
    pixel the patterns saw: a pull from outside the detector adds nothing), and how many patterns there were
    (``weights`` 0 for padding). Summed over a scan it gives `reestimate_bases`."""
    from ccstae_jax import warp
    from ccstae_jax.refine import check_interpolation

    check_interpolation(interpolation)
    cfg = task.model_cfg

    def accumulate(images, theta, class_index, weights):
        x = images.astype(jnp.float32) * cfg.intensity_scale
        ones = jnp.ones_like(x)
        pulled = warp.affine_warp(jnp.stack([x, ones], -1), theta, mode=interpolation)
        onehot = jax.nn.one_hot(class_index, cfg.num_bases, dtype=jnp.float32) * weights[:, None]
        sums = jnp.einsum("bk,bhwc->ckhw", onehot, pulled, precision="highest")
        return sums[0], sums[1], jnp.sum(onehot, 0)

    if mesh is None:
        return jax.jit(accumulate)
    from jax.sharding import NamedSharding, PartitionSpec as P

    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(accumulate, in_shardings=(data, data, data, data), out_shardings=repl)


def reestimate_bases(task, params, sums: np.ndarray, coverage: np.ndarray, counts: np.ndarray, *,
                     min_support: float = 0.25) -> UpdatedBases:
    """One expectation-maximisation step of the dictionary: each base becomes the mean of its patterns pulled onto
    the base frame by their refined warps (`make_base_accumulator` sums), symmetrised like the learned bases; a
    class with no pattern keeps its learned base.

    The mean is taken per pixel over the patterns that covered it (``sums / coverage``, both averaged over the
    symmetry rotations first when the model symmetrises its bases); a pixel is ``support`` when that coverage is at
    least ``min_support`` times the class's pattern count. Returns `UpdatedBases`.

    The learned base is trained through the network's masks and blurred by the spread of its early warps; the mean of
    the aligned patterns is the maximum-likelihood base for the current alignment (issue 5 notes: on the quick sweep
    it lowers the 70 %-noise MAE a further 10-15 % and restores the noise-free accuracy of the forward fit)."""
    from ccstae_jax.models import symmetrize

    cfg = task.model_cfg
    learned = task.model.apply({"params": params}, method=lambda m: m.dictionary())
    counts = jnp.asarray(counts, jnp.float32)
    sums, coverage = jnp.asarray(sums, jnp.float32), jnp.asarray(coverage, jnp.float32)
    if cfg.symmetrize_bases:
        sums, coverage = symmetrize(sums, cfg), symmetrize(coverage, cfg)
    seen = coverage >= min_support * jnp.maximum(counts, 1.0)[:, None, None]
    mean = jnp.where(seen, sums / jnp.where(seen, coverage, 1.0), 0.0)
    used = (counts > 0)[:, None, None]
    return UpdatedBases(jnp.where(used, mean, learned), jnp.where(used, seen, True))


def predict_scan(task, params, batches: Iterable, n_positions: int, *, mesh=None, progress=None,
                 refine_steps: int = 0, bases: UpdatedBases | None = None, theta0: np.ndarray | None = None,
                 accumulate: bool = False, interpolation: str = "bilinear") -> dict[str, np.ndarray]:
    """Runs inference over every batch and scatters results to flat positions ``(N, ...)``.

    Args:
      batches: iterable of ``Batch(images, weights, index)`` (fixed size, padded; padding has ``index == -1``).
      progress: optional tqdm-like object with ``update(n)``.
      bases, theta0: a second pass against re-estimated bases (`reestimate_bases`), starting from the first pass's
        warps ``(N, 2, 3)`` (`make_predict_fn` with ``base_update``).
      accumulate: also return ``"base_sums"``, ``"base_coverage"`` ``(K, H, W)`` and ``"base_counts"`` ``(K,)``
        (`make_base_accumulator`) for `reestimate_bases`.
      interpolation: the forward fit's model warp and the accumulator's pull, ``"bilinear"`` or ``"cubic"``.
    """
    second = bases is not None
    predict = make_predict_fn(task, mesh=mesh, refine_steps=refine_steps, base_update=second,
                              interpolation=interpolation)
    acc_fn = make_base_accumulator(task, mesh=mesh, interpolation=interpolation) if accumulate else None
    acc = None
    results: dict[str, np.ndarray] = {}
    pending = None

    def collect(item):
        out, index = item
        out = jax.device_get(out)
        keep = index >= 0
        for k, v in out.items():
            if k not in results:
                results[k] = np.full((n_positions,) + v.shape[1:], np.nan if v.dtype.kind == "f" else -1, v.dtype)
            results[k][index[keep]] = v[keep]
        if progress is not None:
            progress.update(int(keep.sum()))

    shard = None
    if mesh is not None:
        from ccstae_jax.parallel import shard_batch as shard  # noqa: F811
    for batch in batches:
        index = np.asarray(batch.index)
        if shard is not None:
            batch = shard(batch, mesh)
        if second:
            start = np.asarray(theta0, np.float32)[np.where(index >= 0, index, 0)]
            out = predict(params, batch.images, bases.bases, bases.support, start)
        else:
            out = predict(params, batch.images)  # dispatched asynchronously; collect the previous one meanwhile
        if acc_fn is not None:
            part = acc_fn(batch.images, out["theta"], out["class_index"], batch.weights)
            acc = part if acc is None else tuple(a + b for a, b in zip(acc, part))
        if pending is not None:
            collect(pending)
        pending = (out, index)
    if pending is not None:
        collect(pending)
    if acc is not None:
        for name, value in zip(("base_sums", "base_coverage", "base_counts"), acc):
            results[name] = np.asarray(value)
    return results


def strain_maps(
    predictions: dict[str, np.ndarray],
    scan_shape: tuple[int, int],
    pattern_shape: tuple[int, int],
    *,
    reference_region: tuple[int, int, int, int] | None = None,
    symmetry: int = 6,
    min_lattice_signal: float = 0.05,
    min_significance: float = 3.0,
) -> dict[str, np.ndarray]:
    """Maps ``(Rx, Ry)`` of strain, shear, rotation, reconstruction error and validity from `predict_scan` output.

    A position is invalid (NaN in the strain maps, ``valid == False``, code in ``invalid_reason``) when its pattern
    has no intensity in the ring (blank), when its ``n``-fold harmonic is weaker than ``min_lattice_signal`` times
    the scan's median or not ``min_significance`` times above the noise level read from the odd angular harmonics
    (no lattice to measure, e.g. pure background: about 4e-3 of pure-noise patterns pass at 3), or when
    the prediction is not finite.
    """
    rx, ry = scan_shape
    theta = predictions["theta"].reshape(rx, ry, 2, 3)
    reason = np.zeros((rx, ry), np.uint8)
    ring_signal = predictions["ring_signal"].reshape(rx, ry)
    lattice_signal = predictions["lattice_signal"].reshape(rx, ry)
    finite_theta = np.isfinite(theta).all(axis=(-2, -1))
    reason[~finite_theta] = 3
    typical = np.nanmedian(np.where(ring_signal > 0, lattice_signal, np.nan)) if (ring_signal > 0).any() else 0.0
    weak = lattice_signal < min_lattice_signal * typical
    if "lattice_significance" in predictions:
        weak |= ~(predictions["lattice_significance"].reshape(rx, ry) >= min_significance)
    reason[weak & (reason == 0)] = 2
    reason[~(ring_signal > 0)] = 1
    valid = reason == 0
    safe_theta = np.where(valid[..., None, None], theta, affine.identity_warp(()))
    lattice = np.asarray(affine.lattice_from_warp(jnp.asarray(safe_theta), pattern_shape), np.float64)
    ref = region_mask(scan_shape, reference_region)
    if valid.any():
        maps = referenced_strain(lattice, ref, symmetry=symmetry, valid=valid)
    else:  # nothing to measure anywhere (e.g. pure background): an all-invalid map, not an error
        maps = {k: np.full(scan_shape, np.nan) for k in QUANTITIES}
    out = {k: np.where(valid, maps[k], np.nan).astype(np.float32) for k in QUANTITIES}
    out["reconstruction_error"] = predictions["error"].reshape(rx, ry).astype(np.float32)
    out["valid"] = valid
    out["invalid_reason"] = reason
    out["theta"] = theta.astype(np.float32)
    out["lattice"] = lattice.astype(np.float32)
    out["class_index"] = predictions["class_index"].reshape(rx, ry).astype(np.int32)
    return out


AFFINE_KEYS = ("theta", "lattice", "class_index")


def write_strain_h5(path: str | os.PathLike, maps: dict, *, attrs: dict) -> str:
    """Writes strain maps to HDF5 atomically (temporary file ``<path>.tmp-<pid>``, then rename); returns the path.

    Layout: ``/strain_xx``, ``/strain_yy``, ``/shear_xy``, ``/rotation`` (Rx, Ry) float32 (NaN where invalid), and
    every other array of ``maps`` at the root (``/valid`` bool, ``/invalid_reason`` uint8, ``/reconstruction_error``,
    a baseline's ``/n_peaks`` ...; floating arrays as float32), except the raw affine data, which goes under
    ``/affine/`` (``theta`` (Rx, Ry, 2, 3) warp matrices, ``lattice`` (Rx, Ry, 2, 2), ``class_index``). String entries
    of ``maps`` and everything in ``attrs`` become root attributes (numeric sequences as arrays, other non-scalars as
    JSON text); ``conventions`` (and ``invalid_reasons`` with ``invalid_reason``) are added unless given.
    Used by `ccstae map` and by the py4DSTEM baseline.
    """
    import h5py

    path = os.fspath(path)
    missing = [k for k in QUANTITIES if k not in maps]
    if missing:
        raise ValueError(f"maps lacks {missing}; has {sorted(maps)}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OSError(f"cannot write {path}: directory {directory} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in maps.items():
                if isinstance(value, str):
                    f.attrs[key] = value
                    continue
                arr = np.asarray(value)
                if arr.dtype.kind == "f":
                    arr = arr.astype(np.float32)
                f.create_dataset(f"affine/{key}" if key in AFFINE_KEYS else key, data=arr)
            for k, v in attrs.items():
                f.attrs[k] = _attr_value(v)
            if "conventions" not in f.attrs:
                f.attrs["conventions"] = CONVENTIONS
            if "invalid_reason" in maps and "invalid_reasons" not in f.attrs:
                f.attrs["invalid_reasons"] = json.dumps(INVALID_REASONS)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _attr_value(v):
    """An HDF5-storable attribute: scalars and strings as they are, numeric sequences as arrays, the rest as JSON."""
    if isinstance(v, (str, bytes, bool, int, float, np.integer, np.floating, np.bool_)):
        return v
    if not isinstance(v, dict) and v is not None:
        arr = np.asarray(v)
        if arr.dtype.kind in "iufb":
            return arr
    return json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def read_strain_h5(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a strain-map file written by `write_strain_h5` (or the py4DSTEM baseline): ``(maps, attrs)``."""
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"strain map file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 strain-map file ({e})") from None
    with f:
        missing = [k for k in QUANTITIES if k not in f]
        if missing:
            raise ValueError(f"{path} is not a strain-map file: missing datasets {missing} (found {sorted(f.keys())})")
        maps = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return maps, attrs
