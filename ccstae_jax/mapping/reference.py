"""From fitted warps to strain maps: validity, referencing to a region, detector distortion, per-position errors.

Conventions (also written into every output file, `ccstae_jax.report.files.CONVENTIONS`): maps are ``(Rx, Ry)``;
x = detector Qx = axis 2 of the data (rows of a pattern), y = Qy = axis 3 (columns). ``strain_xx``, ``strain_yy``:
real-space lattice strain along x and y (positive = lattice stretched = spots move inward); ``shear_xy``: tensor
shear; ``rotation``: radians, counter-clockwise from +Qx toward +Qy. All are relative to a reference:
``T = M M_ref^{-1} = (I + eps) R(rotation)`` (left polar decomposition), where ``M`` is each pattern's real-space
lattice deformation relative to the base and ``M_ref`` the reference (`reference_deformation`: the error-weighted
mean of a scan region's positions, outliers left out, else their median; the whole scan when no region is given).
Rotations are taken modulo the lattice symmetry (``2 pi / symmetry``) around the reference orientation, with
circular statistics.

**Detector distortion.** An elliptical distortion ``D`` of the projector lenses stretches every pattern alike; with
grains at different orientations it would read as strain (``D R D^-1`` is not a rotation). When the bases have the
lattice's full symmetry (hexagonal or square, symmetrised), an undistorted lattice in the reference region would fit
with an isotropic ``M_ref``; its anisotropic part is taken to be the detector's, and every ``T`` is conjugated by it:
``T' = S^-1 T S`` with ``S = P_ref / sqrt(det P_ref)``. This assumes the reference region is unstrained in absolute
terms (what a reference region is for); `referenced_strain` reports the distortion it removed.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax.conventions import QUANTITIES
from ccstae_jax.mapping import phases
from ccstae_jax.ops import affine

#: Reasons a position has no strain value (stored in /invalid_reason; 0 = valid).
INVALID_REASONS = {0: "valid", 1: "blank pattern (no intensity in the ring)", 2: "no lattice signal in the ring",
                   3: "non-finite prediction", 4: "no specimen (vacuum: the central beam alone)",
                   5: "two lattices under the probe (e.g. a grain boundary)",
                   6: "outlier (1-sigma strain above 0.5 % and 10 times the scan's median)"}
#: A position whose 1-sigma strain (the mean of strain_xx's and strain_yy's) exceeds both this (dimensionless) and
#: `OUTLIER_SIGMA` times the median over the valid positions is invalid (6): its fit pins nothing down, or its value
#: lies beyond every neighbour's by that much (`mixing_uncertainty`; e.g. a fit at a grain boundary that matched
#: the spots of one grain to those of the other), and would read as strain.
IMPRECISE_POSITION = 5e-3
OUTLIER_SIGMA = 10.0


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


class Distortion(NamedTuple):
    """The detector distortion removed by `referenced_strain`: ``S`` ``(2, 2)`` (det 1, physics frame),
    ``ellipticity`` (``2 (s_max - s_min) / (s_max + s_min)`` of its eigenvalues, dimensionless) and ``angle`` of the
    major axis (radians from +Qx toward +Qy)."""

    matrix: np.ndarray
    ellipticity: float
    angle: float


def _rot(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _distortion(p_ref: np.ndarray) -> Distortion:
    s = p_ref / np.sqrt(np.linalg.det(p_ref))
    evals, evecs = np.linalg.eigh(s)
    ell = float(2 * (evals[1] - evals[0]) / (evals[1] + evals[0]))
    angle = float(np.arctan2(evecs[1, 1], evecs[0, 1]))
    angle = (angle + np.pi / 2) % np.pi - np.pi / 2
    return Distortion(s, ell, angle)


#: A reference position whose deformation lies farther than this from the region's median, in its own standard
#: errors (squared Mahalanobis distance of the four entries), is left out of the reference mean: the 0.999 quantile
#: of chi-square with 4 degrees of freedom.
REFERENCE_OUTLIER_CHI2 = 18.47


class Reference(NamedTuple):
    """The reference deformation ``M_ref`` ``(2, 2)`` of `reference_deformation`; ``covariance`` ``(4, 4)`` of its
    row-major entries; ``used`` ``(N,)`` bool, the positions it averages; ``method``: ``"weighted mean"`` or
    ``"median"``."""

    matrix: np.ndarray
    covariance: np.ndarray
    used: np.ndarray
    method: str


def _orientation(lattice: np.ndarray, sel: np.ndarray, symmetry: int):
    """Left polar stretch ``P`` ``(N, 2, 2)`` of each lattice deformation, the reference orientation ``phi_ref``
    (circular mean of ``n phi`` over ``sel``, over ``n``), and each position's symmetry turn ``R`` ``(N, 2, 2)``, the
    multiple of ``2 pi / n`` that brings ``phi`` within ``pi / n`` of ``phi_ref``."""
    p, phi = (np.asarray(a, np.float64) for a in affine.polar_left(jnp.asarray(lattice)))
    period = 2 * np.pi / symmetry
    phi_ref = float(np.angle(np.mean(np.exp(1j * symmetry * phi[sel]))) / symmetry)
    turn = affine.wrap_angle(phi - phi_ref, period) - (phi - phi_ref)
    return p, phi_ref, _rot(turn)


def _turned_covariance(cov: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """Covariance of the row-major entries of ``M = L R`` from that of ``L`` (``(N, 4, 4)``, turns ``(N, 2, 2)``):
    ``vec M = (I kron R^T) vec L``."""
    kron = np.einsum("ab,ncd->nacbd", np.eye(2), np.swapaxes(turns, -1, -2)).reshape(-1, 4, 4)
    return kron @ cov @ np.swapaxes(kron, -1, -2)


def reference_deformation(lattice: np.ndarray, sel: np.ndarray, *, symmetry: int = 6,
                          lattice_cov: np.ndarray | None = None) -> Reference:
    """The reference deformation ``M_ref`` of the positions ``sel`` ``(N,)`` and its covariance.

    Each reference position's deformation ``M = L R``, turned by its symmetry turn onto the reference orientation
    (`_orientation`), is compared with the elementwise median of the region, ``median(P) R(phi_ref)``. Positions
    within `REFERENCE_OUTLIER_CHI2` of it (squared Mahalanobis distance under their covariance) are averaged with
    inverse-covariance weights, ``M_ref = (sum W)^-1 sum W M``, and the selection is made once more about that
    mean. Its covariance is ``(sum W)^-1``, times the reduced chi-square of the kept positions about it where above 1
    (real strain in the region). The weighted mean of ``k`` equal positions has ``2 / pi`` the variance of their
    median (Gaussian errors).

    Without ``lattice_cov`` every position weighs the same (its covariance: the region's robust scatter of each
    entry, 1.4826 x the median absolute deviation). When fewer than half of the positions pass (a region of several
    grains, or the whole scan), the median stays the reference, with ``pi / 2`` times the mean covariance over ``k``.

    Args:
      lattice: ``(N, 2, 2)`` lattice deformations (physics frame).
      sel: ``(N,)`` bool, the reference positions.
      symmetry: lattice rotational order.
      lattice_cov: optional ``(N, 4, 4)`` covariance of each deformation's row-major entries.
    """
    return _reference(np.asarray(lattice, np.float64), np.asarray(sel, bool), symmetry, lattice_cov)[0]


def _reference(lattice: np.ndarray, sel: np.ndarray, symmetry: int, lattice_cov: np.ndarray | None
               ) -> tuple[Reference, np.ndarray]:
    """`reference_deformation`, and each position's symmetry turn ``(N, 2, 2)`` (`_orientation`)."""
    p, phi_ref, turns = _orientation(lattice, sel, symmetry)
    m = (lattice @ turns)[sel].reshape(-1, 4)
    k = len(m)
    median = (np.median(p[sel], axis=0) @ _rot(phi_ref)).reshape(4)
    if lattice_cov is None:
        spread = 1.4826 * np.median(np.abs(m - np.median(m, 0)), 0)
        scale = max(float(spread.max()), 1e-12)
        cov = np.broadcast_to(np.diag(np.maximum(spread, 1e-6 * scale) ** 2), (k, 4, 4))
    else:
        cov = _turned_covariance(np.asarray(lattice_cov, np.float64)[sel], turns[sel])
    weight = np.linalg.pinv(cov)
    fallback = Reference(median.reshape(2, 2), np.pi / 2 * cov.mean(0) / k, sel, "median")
    if k < 3:
        return fallback, turns
    centre = median
    for _ in range(2):
        r = m - centre
        keep = np.einsum("ni,nij,nj->n", r, weight, r) <= REFERENCE_OUTLIER_CHI2
        if 2 * keep.sum() < k:
            return fallback, turns
        info = weight[keep].sum(0)
        if np.linalg.cond(info) > 1e12:  # error bars of zero or without information: no weights to go by
            return fallback, turns
        centre = np.linalg.solve(info, np.einsum("nij,nj->i", weight[keep], m[keep]))
    r = m[keep] - centre
    chi2 = float(np.einsum("ni,nij,nj->", r, weight[keep], r))
    dof = 4 * max(int(keep.sum()) - 1, 1)
    used = np.zeros_like(sel)
    used[np.flatnonzero(sel)[keep]] = True
    return Reference(centre.reshape(2, 2), np.linalg.inv(info) * max(1.0, chi2 / dof), used, "weighted mean"), turns


def referenced_strain(
    lattice: np.ndarray, reference: np.ndarray, *, symmetry: int = 6, valid: np.ndarray | None = None,
    correct_distortion: bool = False, return_distortion: bool = False, lattice_cov: np.ndarray | None = None,
):
    """Strain/rotation of each lattice deformation relative to the reference positions.

    Args:
      lattice: ``(..., 2, 2)`` real-space lattice deformations (physics frame), e.g. `affine.lattice_from_warp`.
      reference: boolean mask over the leading axes of ``lattice`` selecting the reference positions.
      symmetry: lattice rotational order; rotations are compared modulo ``2 pi / symmetry``.
      valid: optional boolean mask of positions allowed into the reference statistics.
      correct_distortion: remove the anisotropic part of the reference's stretch as detector distortion (module
        docstring); only meaningful when the base has the lattice's full symmetry.
      return_distortion: also return the `Distortion` removed (identity when not corrected).
      lattice_cov: optional ``(..., 4, 4)`` covariance of each deformation's row-major entries: the reference is
        then their inverse-covariance weighted mean (`reference_deformation`; positions with a non-finite covariance
        stay out of it).

    Returns:
      dict of ``strain_xx``, ``strain_yy``, ``shear_xy``, ``rotation`` (radians, in ``[-pi/n, pi/n)``), shaped like
      the leading axes of ``lattice``; with ``return_distortion``, ``(dict, Distortion)``.

    Each ``M`` is split as ``P R(phi)``; a lattice with ``n``-fold symmetry is unchanged by ``R(2 pi k / n)``, so
    ``phi`` is first moved within ``pi/n`` of the reference orientation (the circular mean of ``n * phi`` over the
    reference, divided by ``n``). ``M_ref``: `reference_deformation` of the reference positions.
    """
    lattice = np.asarray(lattice, np.float64)
    shape = lattice.shape[:-2]
    flat = lattice.reshape(-1, 2, 2)
    sel = np.asarray(reference, bool).reshape(-1)
    if valid is not None:
        sel = sel & np.asarray(valid, bool).reshape(-1)
    cov = None
    if lattice_cov is not None:
        cov = np.asarray(lattice_cov, np.float64).reshape(-1, 4, 4)
        sel = sel & np.isfinite(cov).all(axis=(1, 2))
    if not sel.any():
        raise ValueError("the reference region holds no valid positions")
    reference, turns = _reference(flat, sel, symmetry, cov)
    m_ref = reference.matrix
    t = flat @ turns @ np.linalg.inv(m_ref)
    distortion = Distortion(np.eye(2), 0.0, 0.0)
    if correct_distortion:
        p_ref = np.asarray(affine.polar_left(jnp.asarray(m_ref))[0], np.float64)
        distortion = _distortion(p_ref)
        s = distortion.matrix
        t = np.linalg.inv(s) @ t @ s
    out = {k: np.asarray(v, np.float64).reshape(shape) for k, v in affine.strain_from_affine(jnp.asarray(t)).items()}
    out["rotation"] = affine.wrap_angle(out["rotation"], 2 * np.pi / symmetry)
    return (out, distortion) if return_distortion else out


def warp_covariance(fisher: np.ndarray, chi2: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """Covariance ``(N, 6, 6)`` of each pattern's fitted ``phi = theta^{-1}`` entries: the inverse Fisher
    information of the Poisson fit scaled by the reduced chi-square ``chi2 / dof`` (the data's unknown gain, and any
    misfit beyond Poisson noise, inflate it)."""
    scale = np.asarray(chi2, np.float64) / np.maximum(np.asarray(dof, np.float64), 1.0)
    cov = np.linalg.pinv(np.asarray(fisher, np.float64))
    return cov * scale[:, None, None]


def lattice_covariance(theta: np.ndarray, cov_phi: np.ndarray, pattern_shape: tuple[int, int]) -> np.ndarray:
    """Covariance ``(N, 4, 4)`` of the real-space lattice deformation entries (row-major ``L``,
    `affine.lattice_from_warp`) from that of ``phi = theta^{-1}`` (first-order propagation)."""

    def lattice_of_phi(phi):
        return affine.lattice_from_warp(affine.invert(phi.reshape(2, 3)), pattern_shape).reshape(4)

    phi = jax.vmap(lambda t: affine.invert(t).reshape(6))(jnp.asarray(theta, jnp.float64 if
                                                                        jax.config.jax_enable_x64 else jnp.float32))
    jac = np.asarray(jax.vmap(jax.jacfwd(lattice_of_phi))(phi), np.float64)  # (N, 4, 6)
    return jac @ np.asarray(cov_phi, np.float64) @ np.swapaxes(jac, -1, -2)


def _quantities(lattice, m_ref, turn, correct_distortion: bool):
    """The four quantities of one position (jnp, differentiable): ``T = S^-1 (L R_turn) M_ref^-1 S``, polar
    decomposition (`referenced_strain` for a single position, with its symmetry turn fixed)."""
    t = lattice @ turn @ jnp.linalg.inv(m_ref)
    if correct_distortion:
        p_ref, _ = affine.polar_left(m_ref)
        s = p_ref / jnp.sqrt(jnp.linalg.det(p_ref))
        t = jnp.linalg.inv(s) @ t @ s
    q = affine.strain_from_affine(t)
    return jnp.stack([q["strain_xx"], q["strain_yy"], q["shear_xy"], q["rotation"]])


def strain_uncertainty(
    lattice: np.ndarray, lattice_cov: np.ndarray, reference: np.ndarray, *, symmetry: int = 6,
    valid: np.ndarray | None = None, correct_distortion: bool = False,
) -> dict[str, np.ndarray]:
    """1-sigma errors of `referenced_strain`'s quantities, by first-order propagation.

    Two parts, added in quadrature: each position's own (its lattice covariance through the Jacobian of the
    referenced quantities), and the reference's, common to all positions (the covariance of ``M_ref``,
    `reference_deformation`, through the Jacobian with respect to ``M_ref``).

    Args:
      lattice: ``(N, 2, 2)`` lattice deformations; ``lattice_cov``: ``(N, 4, 4)`` covariance of their row-major
        entries (`ccstae_jax.mapping.predict.lattice_covariance`).
      reference, valid, symmetry, correct_distortion: as in `referenced_strain`.

    Returns:
      ``{quantity: (N,)}`` for the four `QUANTITIES` (rotation in radians), NaN where the covariance is not finite;
      also ``"reference_" + quantity`` ``(N,)``: the reference's part alone.
    """
    lattice = np.asarray(lattice, np.float64)
    cov = np.asarray(lattice_cov, np.float64)
    sel = np.asarray(reference, bool) & (np.ones(len(lattice), bool) if valid is None else np.asarray(valid, bool))
    sel &= np.isfinite(cov).all(axis=(1, 2))
    if not sel.any():
        raise ValueError("the reference region holds no valid positions with a finite covariance")
    reference, turns = _reference(lattice, sel, symmetry, cov)
    m_ref = reference.matrix

    def per_position(lat, m, turn):
        return _quantities(lat, m, turn, correct_distortion)

    jac_l, jac_ref = jax.vmap(jax.jacfwd(per_position, argnums=(0, 1)), in_axes=(0, None, 0))(
        jnp.asarray(lattice), jnp.asarray(m_ref), jnp.asarray(turns))
    n = len(lattice)
    jac_l = np.asarray(jac_l, np.float64).reshape(n, 4, 4)
    jac_ref = np.asarray(jac_ref, np.float64).reshape(n, 4, 4)
    var_pos = np.einsum("nqi,nij,nqj->nq", jac_l, cov, jac_l)
    var_ref = np.einsum("nqi,ij,nqj->nq", jac_ref, reference.covariance, jac_ref)
    sigma = np.sqrt(np.maximum(var_pos + var_ref, 0.0))
    out = {k: sigma[:, i] for i, k in enumerate(QUANTITIES)}
    out.update({f"reference_{k}": np.sqrt(np.maximum(var_ref[:, i], 0.0)) for i, k in enumerate(QUANTITIES)})
    return out


#: A position is read as a mixture when its value lies this many combined sigmas above one neighbour and below another.
MIXING_THRESHOLD = 2.0


def mixing_uncertainty(values: np.ndarray, sigma: np.ndarray, *, threshold: float = MIXING_THRESHOLD,
                       period: float | None = None) -> np.ndarray:
    """1-sigma ``(Rx, Ry)`` of the mixing of lattices under the probe at grain boundaries, 0 elsewhere.

    A position whose value is significantly above one of its 8 neighbours and significantly below another (by more
    than ``threshold`` times their combined ``sigma``) lies between two regions: its pattern mixes the lattices on
    either side, and its value can be off from the one it belongs to by as much as its distance to the nearer of them,
    which is returned there. A position significantly above (or below) every one of its valid neighbours, at least
    three of them, is supported by none (a probe on a junction of several grains whose fit settled between their
    lattices, or a failed fit): its distance to the nearest neighbour is returned. Noise alone puts a position
    significantly between two neighbours rarely (both differences must exceed ``threshold`` sigmas, in opposite
    directions), beyond all of them more rarely still (an estimated 2e-4 of the positions for Gaussian noise at
    ``threshold`` 2); inside a grain the result is 0.

    Args:
      values: ``(Rx, Ry)`` one quantity, NaN where invalid (invalid positions are nobody's neighbour).
      sigma: ``(Rx, Ry)`` its 1-sigma errors.
      period: for an angle, the period its differences are wrapped to (``2 pi / symmetry``).
    """
    q = np.asarray(values, np.float64)
    s = np.asarray(sigma, np.float64)
    rx, ry = q.shape
    pad_q = np.pad(q, 1, constant_values=np.nan)
    pad_s = np.pad(s, 1, constant_values=np.nan)
    above = np.full(q.shape, np.inf)  # distance to the nearest neighbour significantly above
    below = np.full(q.shape, np.inf)
    nearest = np.full(q.shape, np.inf)  # distance to the nearest valid neighbour
    n_valid, n_up, n_down = (np.zeros(q.shape, np.int32) for _ in range(3))
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr == dc == 0:
                continue
            qn = pad_q[1 + dr: 1 + dr + rx, 1 + dc: 1 + dc + ry]
            sn = pad_s[1 + dr: 1 + dr + rx, 1 + dc: 1 + dc + ry]
            d = qn - q
            if period is not None:
                d = affine.wrap_angle(d, period)
            limit = threshold * np.hypot(s, sn)
            with np.errstate(invalid="ignore"):
                up, down = d > limit, -d > limit
            above = np.where(up, np.minimum(above, d), above)
            below = np.where(down, np.minimum(below, -d), below)
            seen = np.isfinite(d)
            nearest = np.where(seen, np.minimum(nearest, np.abs(d)), nearest)
            n_valid, n_up, n_down = n_valid + seen, n_up + up, n_down + down
    between = np.isfinite(above) & np.isfinite(below)
    isolated = (n_valid >= 3) & ((n_up == n_valid) | (n_down == n_valid))
    return np.where(between, np.minimum(above, below), np.where(isolated, nearest, 0.0))


#: Fewest pairs of neighbouring valid positions from which `scatter_scale` measures a map's scatter.
MIN_SCATTER_PAIRS = 100


def scatter_scale(values: dict[str, np.ndarray], sigma: dict[str, np.ndarray], *,
                  periods: dict[str, float] | None = None) -> float:
    """How much wider a map scatters than its error bars say, measured on the map itself (at least 1).

    Two neighbouring positions (along a scan row or column) of one grain share their lattice, so their difference
    is noise: divided by ``sqrt(sigma_i^2 + sigma_j^2)`` it should scatter with a standard deviation of 1. Returned
    is the robust standard deviation (1.4826 times the median absolute value) of these normalised differences over
    all pairs of valid neighbours, every quantity pooled, or 1 where that is below 1 or there are fewer than
    `MIN_SCATTER_PAIRS` pairs. A position at a grain boundary should carry its mixing error in ``sigma``
    (`mixing_uncertainty`): pairs across boundaries can be a quarter of a small scan's, too many for the median to
    ignore. A strain gradient adds to the differences, which can only widen the bars. Errors shared by neighbours
    (the reference's, a grain's bias) are not seen.

    Args:
      values: ``{quantity: (Rx, Ry)}``, NaN where invalid.
      sigma: ``{quantity: (Rx, Ry)}`` each position's own 1-sigma (without the reference's part, which neighbours
        share; with its mixing at a grain boundary).
      periods: ``{quantity: period}`` for angles, whose differences are wrapped to ``[-period/2, period/2)``.
    """
    periods = periods or {}
    pooled = []
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        s = np.asarray(sigma[name], np.float64)
        for a, b, sa, sb in ((v[1:], v[:-1], s[1:], s[:-1]), (v[:, 1:], v[:, :-1], s[:, 1:], s[:, :-1])):
            d = a - b
            if name in periods:
                d = affine.wrap_angle(d, periods[name])
            d = d / np.sqrt(sa**2 + sb**2)
            pooled.append(d[np.isfinite(d)])
    d = np.concatenate(pooled) if pooled else np.zeros(0)
    if d.size < MIN_SCATTER_PAIRS:
        return 1.0
    return max(1.0, 1.4826 * float(np.median(np.abs(d))))


def _mostly_vacuum(ring_signal: np.ndarray, lattice_signal: np.ndarray, reason: np.ndarray,
                   edge_lattice: float) -> np.ndarray:
    """Positions whose probe falls mostly on vacuum, judged against the scan's own vacuum: ``(Rx, Ry)`` bool.

    The ring intensity of a pattern mixed from specimen (fraction ``f``) and vacuum is ``f R_s + (1 - f) R_v`` and its
    lattice harmonic ``f H_s``; ``f < 1/2`` puts both below their midpoints. ``R_v`` is the median ring of the
    positions without a lattice (reason 2 or 4); it is used only when it is clearly below the specimen's ``R_s``, so a
    scan without vacuum, whose lattice-free positions are grain boundaries, flags nothing here."""
    valid = reason == 0
    weak = (reason == 2) | (reason == 4)
    if valid.sum() < 3 or weak.sum() < max(3, 0.005 * reason.size):
        return np.zeros(reason.shape, bool)
    r_spec = np.median(ring_signal[valid])
    spread = 1.4826 * np.median(np.abs(ring_signal[valid] - r_spec))
    r_vac = np.median(ring_signal[weak])
    if not (r_spec - r_vac > 5 * spread or r_vac < 0.5 * r_spec):
        return np.zeros(reason.shape, bool)
    harmonic = lattice_signal * np.abs(ring_signal)
    below = ring_signal < 0.5 * (r_spec + r_vac)
    return below & (weak | (valid & (harmonic < edge_lattice * np.median(harmonic[valid]))))


def validity(predictions: dict[str, np.ndarray], scan_shape: tuple[int, int], *, min_lattice_signal: float = 0.05,
             min_significance: float = 3.0, vacuum_level: float = 0.8, edge_lattice: float = 0.5) -> np.ndarray:
    """``(Rx, Ry)`` uint8 reason codes (`INVALID_REASONS`, 0 = valid) from `ccstae_jax.mapping.predict` outputs.

    A position is invalid when its pattern has no intensity in the ring (1, blank); when its ``n``-fold harmonic is
    weaker than ``min_lattice_signal`` times the scan's median or not ``min_significance`` times above the noise
    level of the orders no lattice has (about 4e-3 of pure-noise patterns pass at 3): then 5 (two lattices) if its
    ``2n``-fold harmonic is significant, else 4 (vacuum) if its ring holds less than ``vacuum_level`` of the median
    ring intensity of the positions with a lattice, else 2 (no lattice); or when the fitted warp is not finite (3).
    A position at the edge of a specimen, whose probe falls mostly on vacuum, is vacuum too (4): its harmonic is
    below ``edge_lattice`` times the scan's median and its ring below ``vacuum_level`` of the specimen's, or, when
    the scan holds vacuum (positions without a lattice whose ring is clearly darker than the specimen's: by 5 median
    absolute deviations of the specimen's ring, or by half), its harmonic amplitude is below ``edge_lattice`` of the
    specimen's and its ring below the midpoint of the vacuum's and the specimen's. A grain boundary weakens the
    harmonic but keeps the ring's intensity, so it stays valid. In a scan without any position showing a lattice,
    nothing is called vacuum or two lattices: there is no specimen to compare with.
    """
    rx, ry = scan_shape
    theta = predictions["theta"].reshape(rx, ry, 2, 3)
    ring_signal = predictions["ring_signal"].reshape(rx, ry)
    lattice_signal = predictions["lattice_signal"].reshape(rx, ry)
    reason = np.zeros((rx, ry), np.uint8)
    reason[~np.isfinite(theta).all(axis=(-2, -1))] = 3
    lit = ring_signal > 0
    typical = np.nanmedian(np.where(lit, lattice_signal, np.nan)) if lit.any() else 0.0
    weak = lattice_signal < min_lattice_signal * typical
    if "lattice_significance" in predictions:
        weak |= ~(predictions["lattice_significance"].reshape(rx, ry) >= min_significance)
    specimen = lit & ~weak
    level = np.median(ring_signal[specimen]) if specimen.any() else 0.0  # no specimen: nothing to call darker
    reason[weak & (reason == 0)] = 2
    dark = ring_signal < vacuum_level * level
    reason[weak & (reason == 2) & dark] = 4
    reason[(lattice_signal < edge_lattice * typical) & dark & lit & (reason == 0)] = 4
    reason[_mostly_vacuum(ring_signal, lattice_signal, reason, edge_lattice) & lit] = 4
    if "double_significance" in predictions and specimen.any():  # two lattices need a scan with a lattice
        mixed = predictions["double_significance"].reshape(rx, ry) >= min_significance
        reason[weak & (reason == 2) & mixed] = 5
    reason[~lit] = 1
    return reason


#: A map whose median 1-sigma strain (mean of strain_xx and strain_yy) exceeds this is flagged as too imprecise to
#: read grains from (dimensionless; 5e-3 = 0.5 %).
IMPRECISE_STRAIN = 5e-3
#: A map whose strain spread across the scan is below this share of its own 1-sigma noise is flagged as collapsed:
#: its values no longer follow the patterns (a well-behaved map spreads at least by its noise).
COLLAPSE_RATIO = 0.3


def map_warnings(maps: dict, *, geometry=None, rigid_spots: bool = False) -> list[str]:
    """What a user must know before trusting a map from `strain_maps`; empty when nothing is wrong.

    Flags: no valid position; fewer than half of the positions valid; a median 1-sigma strain above
    `IMPRECISE_STRAIN`; a collapse, strain that varies across the scan (robust spread, 1.4826 x the median
    absolute deviation, of strain_xx and strain_yy) less than `COLLAPSE_RATIO` times its own median 1-sigma; and,
    given the run's ``geometry`` (`ccstae_jax.model.geometry.Geometry`), wide disks (`Geometry.wide_disks`): with
    a stretched base (``rigid_spots`` False) such a map can be several 1e-3 off; with rigid spots, noisy maps of such
    disks have read each grain's strain toward zero, at about twice the error of an ideal fit.
    """
    out = []
    if geometry is not None and geometry.wide_disks:
        wide = f"wide disks ({geometry.disk_size()})"
        if rigid_spots:
            out.append(f"{wide}; fitted as rigid spots they map right on clean data, but on noisy simulated scans such "
                       "maps read each grain's strain up to a few 1e-3 toward zero, about twice the error of an "
                       "ideal fit")
        else:
            out.append(f"{wide}, and a base stretched with the lattice misplaces such disks' edges, which can leave "
                       "the strain several 1e-3 off with nothing else showing it; map them without --no-rigid-spots")
    valid = np.asarray(maps["valid"], bool)
    if not valid.any():
        return out + ["no valid position: nothing in this scan could be measured"]
    if valid.mean() < 0.5:
        out.append(f"only {100 * valid.mean():.0f} % of the positions are valid (see /invalid_reason)")
    if "uncertainty_strain_xx" not in maps:
        return out
    sigma = float(np.median(0.5 * (maps["uncertainty_strain_xx"][valid] + maps["uncertainty_strain_yy"][valid])))
    if sigma > IMPRECISE_STRAIN:
        out.append(f"median 1-sigma strain {100 * sigma:.2f} % exceeds {100 * IMPRECISE_STRAIN:.1f} %: the patterns "
                   "carry too little signal to map strain (more dose per pattern, less binning or a longer camera "
                   "length help)")
    spread = float(np.mean([1.4826 * np.median(np.abs(v - np.median(v)))
                            for v in (maps["strain_xx"][valid], maps["strain_yy"][valid])]))
    if spread < COLLAPSE_RATIO * sigma:
        out.append(f"strain collapsed: it varies by {100 * spread:.3f} % across the scan, far less than its own "
                   f"noise ({100 * sigma:.3f} %), so it does not follow the patterns; check the geometry that "
                   "`ccstae train` printed")
    return out


def strain_maps(
    predictions: dict[str, np.ndarray],
    scan_shape: tuple[int, int],
    pattern_shape: tuple[int, int],
    *,
    reference_region: tuple[int, int, int, int] | None = None,
    symmetry: int = 6,
    correct_distortion: bool = False,
    min_lattice_signal: float = 0.05,
    min_significance: float = 3.0,
) -> dict:
    """Maps ``(Rx, Ry)`` of strain, shear, rotation, fit quality and validity from per-position predictions.

    Returns a dict of arrays: the four `QUANTITIES` (NaN where invalid), ``reconstruction_error`` (the fit's reduced
    chi-square divided by its median over the valid positions: 1 = a typical fit, larger = the base explains the pattern
    worse; NaN without a fit), ``valid``, ``invalid_reason`` (`validity`; with a fit also 6 where a position's 1-sigma
    strain is an outlier, `IMPRECISE_POSITION`, decided after the reference), ``theta``, ``lattice``, ``class_index``,
    ``phase`` (each valid position's phase, -1 where invalid: its base when several bases are used, else the group
    `ccstae_jax.mapping.phases.split_phases` finds from the fit's ``spot_amplitude`` and the lattice dilation),
    ``phase_split`` (a `ccstae_jax.mapping.phases.PhaseSplit`: how many phases, how far apart), ``spot_amplitude``
    ``(Rx, Ry, N_BANDS)`` (with a fit, NaN where invalid); with a fit (``fisher``, ``chi2``, ``dof`` in ``predictions``)
    ``uncertainty_<quantity>`` (1-sigma, rotation in radians, NaN where invalid: the fit's own and the reference's,
    `strain_uncertainty`, times ``error_scale``, and at grain boundaries the mixing of lattices under the probe,
    `mixing_uncertainty`, in quadrature); ``error_scale`` (a float, 1 without a fit: `scatter_scale`, how much wider
    neighbouring positions scatter than the fit's errors say); and ``distortion`` (a `Distortion`).
    """
    rx, ry = scan_shape
    theta = predictions["theta"].reshape(rx, ry, 2, 3)
    reason = validity(predictions, scan_shape, min_lattice_signal=min_lattice_signal,
                      min_significance=min_significance)
    valid = reason == 0
    safe_theta = np.where(valid[..., None, None], theta, affine.identity_warp(()))
    lattice = np.asarray(affine.lattice_from_warp(jnp.asarray(safe_theta), pattern_shape), np.float64)
    ref = region_mask(scan_shape, reference_region)
    distortion = Distortion(np.eye(2), 0.0, 0.0)
    cov_l = None
    if "fisher" in predictions and valid.any():
        cov_phi = warp_covariance(predictions["fisher"], predictions["chi2"], predictions["dof"])
        cov_l = lattice_covariance(safe_theta.reshape(-1, 2, 3), cov_phi, pattern_shape)
    if valid.any():
        maps, distortion = referenced_strain(lattice, ref, symmetry=symmetry, valid=valid, lattice_cov=cov_l,
                                             correct_distortion=correct_distortion, return_distortion=True)
    else:  # nothing to measure anywhere (e.g. pure background): an all-invalid map, not an error
        maps = {k: np.full(scan_shape, np.nan) for k in QUANTITIES}
    out = {k: np.where(valid, maps[k], np.nan).astype(np.float32) for k in QUANTITIES}
    if "chi2" in predictions:
        red = (predictions["chi2"] / np.maximum(predictions["dof"], 1.0)).reshape(rx, ry)
        typical = np.median(red[valid]) if valid.any() else np.nan
        out["reconstruction_error"] = (red / typical).astype(np.float32)
    else:
        out["reconstruction_error"] = np.full(scan_shape, np.nan, np.float32)
    out["error_scale"] = 1.0
    if cov_l is not None:
        sigma = strain_uncertainty(lattice.reshape(-1, 2, 2), cov_l, ref.reshape(-1), symmetry=symmetry,
                                   valid=valid.reshape(-1), correct_distortion=correct_distortion)
        period = 2 * np.pi / symmetry
        own = {}  # each position's own error, with its mixing at a grain boundary
        for k in QUANTITIES:
            fit_own = np.sqrt(np.maximum(sigma[k] ** 2 - sigma[f"reference_{k}"] ** 2, 0.0)).reshape(rx, ry)
            mixing = mixing_uncertainty(out[k], np.where(valid, sigma[k].reshape(rx, ry), np.nan),
                                        period=period if k == "rotation" else None)
            own[k] = np.where(valid, np.hypot(fit_own, mixing), np.nan)
        scale = scatter_scale({k: out[k] for k in QUANTITIES}, own, periods={"rotation": period})
        out["error_scale"] = scale
        for k in QUANTITIES:
            total = np.where(valid, scale * sigma[k].reshape(rx, ry), np.nan)
            mixing = mixing_uncertainty(out[k], total, period=period if k == "rotation" else None)
            out[f"uncertainty_{k}"] = np.hypot(total, mixing).astype(np.float32)
        # outliers: invalid from here on (the reference and the error scale, computed above, still include them)
        strain_sigma = 0.5 * (out["uncertainty_strain_xx"] + out["uncertainty_strain_yy"])
        with np.errstate(invalid="ignore"):
            limit = max(IMPRECISE_POSITION, OUTLIER_SIGMA * np.nanmedian(strain_sigma[valid]))
            outlier = valid & (strain_sigma > limit)
        reason = np.where(outlier, 6, reason).astype(np.uint8)
        valid = reason == 0
        for k in out:
            if k in QUANTITIES or k.startswith("uncertainty_"):
                out[k] = np.where(valid, out[k], np.nan).astype(np.float32)
    out["valid"] = valid
    out["invalid_reason"] = reason
    out["theta"] = theta.astype(np.float32)
    out["lattice"] = lattice.astype(np.float32)
    out["class_index"] = predictions["class_index"].reshape(rx, ry).astype(np.int32)
    n_classes = len(np.unique(out["class_index"][valid]))
    if n_classes > 1 or "spot_amplitude" not in predictions:
        split = phases.PhaseSplit(np.where(valid, out["class_index"], -1).astype(np.int8), max(n_classes, 1),
                                  float("nan"))
    else:  # one base: the phases the patterns' lattice spacing and order intensities tell apart
        dilation = 0.5 * (maps["strain_xx"] + maps["strain_yy"])
        feats = phases.phase_features(predictions["spot_amplitude"], dilation.reshape(-1))
        split = phases.split_phases(feats, valid.reshape(-1), ref.reshape(-1), dilation=dilation.reshape(-1))
        split = split._replace(phase=split.phase.reshape(rx, ry))
    out["phase"] = split.phase
    out["phase_split"] = split
    if "spot_amplitude" in predictions:
        amp = np.asarray(predictions["spot_amplitude"], np.float32).reshape(rx, ry, -1)
        out["spot_amplitude"] = np.where(valid[..., None], amp, np.nan)
    out["distortion"] = distortion
    return out


