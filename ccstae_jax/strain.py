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
from typing import Iterable

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
                    base_update: bool = False):
    """A jitted inference step ``(params, images (B, H, W)) -> dict`` of per-pattern outputs.

    With ``refine_steps > 0`` each pattern's warp is polished against its learned base by that many
    Levenberg-Marquardt iterations (`ccstae_jax.refine`) before it is returned: ``refine_model="forward"`` (default)
    fits the base, split into a fixed radial background and moving spots, to the observed pixels with Poisson
    weights (`refine.refine_theta_forward`); ``"pull"`` minimises the masked error of the pattern pulled onto the
    base (`refine.refine_theta`, the training objective).

    With ``base_update=True`` (a second pass, after `reestimate_bases`) the step is
    ``(params, images, bases (K, H, W), theta0 (B, 2, 3)) -> dict``: the forward fit starts from ``theta0`` (the first
    pass's warps) against the re-estimated ``bases``, over the wide `update_annulus` instead of the training mask
    (``error`` is then measured against the updated base over that annulus).

    Returns ``theta`` ``(B, 2, 3)``, ``error`` ``(B,)`` (forward masked MSE against the base with the final-epoch
    mask: the reconstruction-error confidence map), ``ring_signal`` ``(B,)`` (in-ring intensity, scaled) and
    ``lattice_signal`` ``(B,)`` (relative strength of the ``n``-fold angular harmonic), ``lattice_significance``
    ``(B,)`` (that harmonic's amplitude over the rms amplitude of the odd orders 1, 3, ..., 11 — which vanish for a
    centrosymmetric diffraction pattern and so measure the noise), ``class_index`` ``(B,)``.
    With a ``mesh`` the batch axis is sharded over its ``data`` axis.
    """
    from ccstae_jax.losses import masked_mse
    from ccstae_jax.models import harmonic_weights, prior_ring

    if refine_model not in ("forward", "pull"):
        raise ValueError(f"refine_model={refine_model!r}: expected 'forward' or 'pull'")
    cfg = task.model_cfg
    hw = jnp.asarray(harmonic_weights(cfg))
    ring = jnp.asarray(prior_ring(cfg))
    odd = jnp.asarray(np.concatenate([harmonic_weights(dataclasses.replace(cfg, symmetry=k)) for k in range(1, 12, 2)]))

    annulus = jnp.asarray(update_annulus(task))

    def predict(params, images, bases=None, theta0=None):
        out, masks_b = task.forward(params, images, jnp.int32(10**6))
        theta = out["theta"]
        if bases is not None:  # second pass: the re-estimated dictionary, the first pass's warps, a wide annulus
            theta = theta0
            out["bases"] = bases
            out["base"] = jnp.einsum("bk,khw->bhw", out["classes"], bases, precision="highest")
            masks_b = jnp.broadcast_to(annulus, out["base"].shape)
        if refine_steps and not cfg.interpolate:
            from ccstae_jax import warp
            from ccstae_jax import refine

            if refine_model == "forward":
                bg = jnp.einsum("bk,khw->bhw", out["classes"], refine.radial_background(out["bases"], cfg.center_px),
                                precision="highest")
                theta = refine.refine_theta_forward(theta, out["inputs"], out["base"] - bg, masks_b, background=bg,
                                                    steps=refine_steps)
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
    return jax.jit(step, in_shardings=(repl, data) + ((repl, data) if base_update else ()), out_shardings=data)


def update_annulus(task) -> np.ndarray:
    """The base-frame pixels ``(H, W)`` (bool) compared in the second, updated-base pass: ``0.75 * ring_inner < r <=
    min(H, W) / 2 - 2``. Wider than the training ring: the re-estimated base is an average of every pattern, so it is
    accurate on spots the network's masks never covered, and more spots constrain the affine better."""
    cfg, lc = task.model_cfg, task.loss_cfg
    h, w = cfg.pattern_shape
    return static_ring_mask((h, w), 0.75 * lc.ring_inner, min(h, w) / 2 - 2, center=cfg.center_px)


def make_base_accumulator(task, *, mesh=None):
    """A jitted ``(images (B, H, W), theta (B, 2, 3), class_index (B,), weights (B,))`` ->
    ``(sums (K, H, W), counts (K,))``: each class's patterns (scaled as the model scales them) pulled onto the base
    frame by their warps and summed, and how many there were (``weights`` 0 for padding). Summed over a scan it gives
    `reestimate_bases`."""
    from ccstae_jax import warp

    cfg = task.model_cfg

    def accumulate(images, theta, class_index, weights):
        x = images.astype(jnp.float32) * cfg.intensity_scale
        pulled = warp.affine_warp(x[..., None], theta)[..., 0]
        onehot = jax.nn.one_hot(class_index, cfg.num_bases, dtype=jnp.float32) * weights[:, None]
        return jnp.einsum("bk,bhw->khw", onehot, pulled, precision="highest"), jnp.sum(onehot, 0)

    if mesh is None:
        return jax.jit(accumulate)
    from jax.sharding import NamedSharding, PartitionSpec as P

    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(accumulate, in_shardings=(data, data, data, data), out_shardings=repl)


def reestimate_bases(task, params, sums: np.ndarray, counts: np.ndarray) -> jax.Array:
    """One expectation-maximisation step of the dictionary: each base becomes the mean of its patterns pulled onto
    the base frame by their refined warps (`make_base_accumulator` sums), symmetrised like the learned bases; a
    class with no pattern keeps its learned base. Returns ``(K, H, W)``.

    The learned base is trained through the network's masks and blurred by the spread of its early warps; the mean of
    the aligned patterns is the maximum-likelihood base for the current alignment (issue 5 notes: on the quick sweep
    it lowers the 70 %-noise MAE a further 10-15 % and restores the noise-free accuracy of the forward fit)."""
    from ccstae_jax.models import symmetrize

    cfg = task.model_cfg
    learned = task.model.apply({"params": params}, method=lambda m: m.dictionary())
    counts = jnp.asarray(counts, jnp.float32)
    mean = jnp.asarray(sums, jnp.float32) / jnp.maximum(counts, 1.0)[:, None, None]
    if cfg.symmetrize_bases:
        mean = symmetrize(mean, cfg)
    return jnp.where((counts > 0)[:, None, None], mean, learned)


def predict_scan(task, params, batches: Iterable, n_positions: int, *, mesh=None, progress=None,
                 refine_steps: int = 0, bases=None, theta0: np.ndarray | None = None,
                 accumulate: bool = False) -> dict[str, np.ndarray]:
    """Runs inference over every batch and scatters results to flat positions ``(N, ...)``.

    Args:
      batches: iterable of ``Batch(images, weights, index)`` (fixed size, padded; padding has ``index == -1``).
      progress: optional tqdm-like object with ``update(n)``.
      bases, theta0: a second pass against re-estimated bases ``(K, H, W)``, starting from the first pass's warps
        ``(N, 2, 3)`` (`make_predict_fn` with ``base_update``).
      accumulate: also return ``"base_sums"`` ``(K, H, W)`` and ``"base_counts"`` ``(K,)`` (`make_base_accumulator`)
        for `reestimate_bases`.
    """
    second = bases is not None
    predict = make_predict_fn(task, mesh=mesh, refine_steps=refine_steps, base_update=second)
    acc_fn = make_base_accumulator(task, mesh=mesh) if accumulate else None
    sums = counts = None
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
            out = predict(params, batch.images, bases, start)
        else:
            out = predict(params, batch.images)  # dispatched asynchronously; collect the previous one meanwhile
        if acc_fn is not None:
            s, c = acc_fn(batch.images, out["theta"], out["class_index"], batch.weights)
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        if pending is not None:
            collect(pending)
        pending = (out, index)
    if pending is not None:
        collect(pending)
    if acc_fn is not None and sums is not None:
        results["base_sums"], results["base_counts"] = np.asarray(sums), np.asarray(counts)
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
