"""Which phase each position shows, from what its diffraction pattern says about the material.

Two phases differ in what a microscopist reads off a pattern: the lattice spacing, and how bright the diffraction
orders are relative to each other (the structure factors: a heavier atom on one site changes them). The fit measures
both at every position: its strain relative to the reference region, and, in `ccstae_jax.mapping.fit.N_BANDS`
radial bands, the factor by which its base's spots best fit its own (``spot_amplitude``). Their logarithmic ratios
to the innermost band do not depend on the beam current or the thickness scaling all orders alike.

`split_phases` divides the valid positions in two (hard expectation-maximisation of two Gaussian groups with a
shared covariance, started from splits along the principal axis and along each feature, the best-separated result
kept) and keeps the split only when the groups are farther apart than noise splits a single one: their
Mahalanobis distance under the pooled within-group covariance exceeds `PHASE_SEPARATION` (a single Gaussian cut in
two comes out near 2.7), the smaller holds at least `MIN_PHASE_SHARE` of the positions, and their lattices differ
by at least `MIN_MISMATCH`. Grains of one phase strained differently form groups too, and on noise-free data their
order intensities, measured at different orientations, cluster by grain: only a lattice mismatch larger than the
strain differences between grains (rarely above 1 %) says that two groups are two materials. Phases with the same
lattice spacing are therefore not told apart. Phase 0 is the reference region's.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Least Mahalanobis distance between the two groups' means (pooled within-group covariance) for a scan to be
#: called two-phase. A k-means cut of one Gaussian (or of one uniform spread of strains) gives about 2.7 (3.5).
PHASE_SEPARATION = 5.0
#: Least difference between the two groups' median lattice dilations for them to be two phases (2 %: above the
#: strain differences between the grains of one material, below the mismatch of common heterostructures, such as
#: 4 % for WS2/WSe2).
MIN_MISMATCH = 0.02
#: Least share of the valid positions (and at least `MIN_PHASE_POSITIONS`) the smaller phase must hold.
MIN_PHASE_SHARE = 0.03
MIN_PHASE_POSITIONS = 8
_ITERATIONS = 50


class PhaseSplit(NamedTuple):
    """`split_phases` output.

    Attributes:
      phase: ``(N,)`` int8, 0 or 1 per position (0: the reference region's phase), -1 where not valid.
      n_phases: 1 or 2.
      separation: Mahalanobis distance between the two groups' mean features (NaN with too few positions).
      mismatch: the second group's median lattice dilation minus the reference group's (NaN without dilations or
        with too few positions).
    """

    phase: np.ndarray
    n_phases: int
    separation: float
    mismatch: float = float("nan")


def phase_features(spot_amplitude: np.ndarray, dilation: np.ndarray) -> np.ndarray:
    """``(N, N_BANDS)`` spot amplitudes and ``(N,)`` lattice dilation (mean of strain_xx and strain_yy) ->
    ``(N, N_BANDS)`` features: ``log(a_b / a_0)`` for the outer bands, then the dilation. NaN where an amplitude
    is not positive (no spots to measure)."""
    a = np.asarray(spot_amplitude, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), np.nan)
    return np.concatenate([logs[:, 1:] - logs[:, :1], np.asarray(dilation, np.float64)[:, None]], axis=1)


def _standardised(x: np.ndarray) -> np.ndarray:
    """Columns centred on their median, scaled by their median absolute deviation, clipped at 8 (outliers)."""
    centre = np.median(x, axis=0)
    spread = 1.4826 * np.median(np.abs(x - centre), axis=0)
    spread = np.where(spread > 0, spread, np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0))
    return np.clip((x - centre) / spread, -8.0, 8.0)


def _pooled(x: np.ndarray, label: np.ndarray):
    """The two groups' means and their pooled within-group covariance (slightly regularised)."""
    m0, m1 = x[~label].mean(0), x[label].mean(0)
    resid = np.where(label[:, None], x - m1, x - m0)
    return m0, m1, resid.T @ resid / max(len(x) - 2, 1) + 1e-9 * np.eye(x.shape[1])


def _refine(x: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, float]:
    """Hard EM of two Gaussians with a shared covariance on ``(n, F)`` points from a starting split: the labels and
    the Mahalanobis distance between the groups' means (NaN if a group empties)."""
    for _ in range(_ITERATIONS):
        if label.all() or not label.any():
            return label, np.nan
        m0, m1, cov = _pooled(x, label)
        prec = np.linalg.inv(cov)
        d0 = np.einsum("nf,fg,ng->n", x - m0, prec, x - m0)
        d1 = np.einsum("nf,fg,ng->n", x - m1, prec, x - m1)
        new = d1 < d0
        if np.array_equal(new, label):
            break
        label = new
    if label.all() or not label.any():
        return label, np.nan
    m0, m1, cov = _pooled(x, label)
    diff = m1 - m0
    return label, float(np.sqrt(diff @ np.linalg.solve(cov, diff)))


def _two_groups(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The best-separated of the splits started at the median of each feature and of the principal axis
    (`_refine`): labels ``(n,)`` bool and their separation."""
    centred = x - x.mean(0)
    axes = np.concatenate([np.linalg.svd(centred, full_matrices=False)[2][:1], np.eye(x.shape[1])])
    best = (np.zeros(len(x), bool), np.nan)
    for axis in axes:
        score = centred @ axis
        label, sep = _refine(x, score > np.median(score))
        if np.isfinite(sep) and not sep <= best[1]:
            best = (label, sep)
    return best


def split_phases(features: np.ndarray, valid: np.ndarray, reference: np.ndarray | None = None, *,
                 dilation: np.ndarray | None = None) -> PhaseSplit:
    """One or two phases over the positions (module docstring).

    Args:
      features: ``(N, F)`` `phase_features` (any per-position features, NaN where unmeasured).
      valid: ``(N,)`` bool positions to consider (others get phase -1).
      reference: ``(N,)`` bool the reference region: its phase is 0 (None = the larger group's).
      dilation: ``(N,)`` lattice dilation; the groups must differ by `MIN_MISMATCH` in it (None: no such condition).

    Returns:
      `PhaseSplit`.
    """
    x = np.asarray(features, np.float64)
    use = np.asarray(valid, bool) & np.isfinite(x).all(axis=1)
    phase = np.where(use, 0, -1).astype(np.int8)
    n = int(use.sum())
    if n < 2 * MIN_PHASE_POSITIONS:
        return PhaseSplit(phase, 1, float("nan"))
    label, separation = _two_groups(_standardised(x[use]))
    ref = np.zeros(len(x), bool) if reference is None else np.asarray(reference, bool)
    in_ref = label[ref[use]]
    first = (in_ref.mean() > 0.5) if in_ref.size else (label.mean() > 0.5)  # the group that is phase 0
    second = label != first
    mismatch = float("nan")
    if dilation is not None and second.any() and (~second).any():
        dil = np.asarray(dilation, np.float64)[use]
        mismatch = float(np.median(dil[second]) - np.median(dil[~second]))
    small = min(int(label.sum()), int((~label).sum()))
    if not (separation >= PHASE_SEPARATION and small >= max(MIN_PHASE_POSITIONS, MIN_PHASE_SHARE * n)
            and (dilation is None or abs(mismatch) >= MIN_MISMATCH)):
        return PhaseSplit(phase, 1, separation, mismatch)
    phase[use] = second.astype(np.int8)
    return PhaseSplit(phase, 2, separation, mismatch)
