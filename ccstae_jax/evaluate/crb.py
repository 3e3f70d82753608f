"""Cramér-Rao lower bounds on per-pattern strain estimates under the Auto4DSTEM noise model.

One noisy pattern is Poisson counts with rate ``lam(p) = counts * ((1 - w) I(p) + w B)`` per pixel
(`ccstae_jax.data.noise`), ``I(p)`` the noise-free pattern of a grain with parameters
``p = (strain_xx, strain_yy, shear_xy, rotation[, shift_x, shift_y])``. The Fisher information is

    F_ij = sum_pixels (d lam / d p_i) (d lam / d p_j) / lam

and any unbiased estimator from that single pattern has ``std(p_i) >= sqrt((F^-1)_ii)``, with the
nuisance parameters (rotation, and optionally the pattern shift) estimated jointly. The output
multiplier ``scale`` of the noise model is a known bijection of the counts and drops out.

At ``w = 0`` Auto4DSTEM adds no noise at all (the data are ``scale * I``), so the bound is 0 there
unless ``poisson_at_zero=True`` asks for the shot-noise-only bound.

Derivatives are exact (``jax.jacfwd`` through the simulator's differentiable renderer); the Fisher
matrix is accumulated and inverted in float64 on the host.

Example:
    >>> from ccstae_jax.data.simulate import SimulationConfig
    >>> res = strain_crb(SimulationConfig(detector_size=64, disk_radius=2.0), w=0.25, n_grains=2)
    >>> res.names, res.mean_sigma.shape
    (('strain_xx', 'strain_yy', 'shear_xy', 'rotation'), (4,))
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ccstae_jax.data.noise import DEFAULT_COUNTS, DEFAULT_LORENTZ_WIDTH, lorentzian_background, parse_noise_level
from ccstae_jax.data.simulate import SimulationConfig, pattern_function

__all__ = [
    "PARAM_NAMES",
    "CRBResult",
    "fisher_information",
    "crb_sigma",
    "strain_crb",
    "gaussian_mae",
]

PARAM_NAMES = ("strain_xx", "strain_yy", "shear_xy", "rotation", "shift_x", "shift_y")


def gaussian_mae(sigma: ArrayLike) -> np.ndarray:
    """Expected absolute error ``sqrt(2 / pi) * sigma`` of an unbiased Gaussian estimator.

    Put it beside MAE tables: an estimator at the Cramér-Rao bound has this MAE.
    """
    return np.sqrt(2.0 / np.pi) * np.asarray(sigma, np.float64)


def _rates(pattern: jax.Array, background: jax.Array, w: float, counts: float) -> jax.Array:
    return counts * ((1.0 - w) * pattern + w * background)


@functools.lru_cache(maxsize=32)
def _value_and_jacobian(pattern_fn):
    return jax.jit(lambda p: (pattern_fn(p), jax.jacfwd(pattern_fn)(p)))


@functools.lru_cache(maxsize=32)
def _simulator_pattern_fn(config: SimulationConfig, translation: bool):
    return pattern_function(config, translation=translation)


def fisher_information(
    pattern_fn: Callable[[jax.Array], jax.Array],
    params: ArrayLike,
    *,
    w: float,
    counts: float = DEFAULT_COUNTS,
    lorentz_width: float = DEFAULT_LORENTZ_WIDTH,
) -> np.ndarray:
    """Poisson Fisher information of one noisy pattern about ``params``.

    Args:
      pattern_fn: differentiable ``params (P,) -> (H, W)`` noise-free pattern (fraction of the probe
        per pixel), e.g. `ccstae_jax.data.simulate.pattern_function`.
      params: ``(P,)`` parameters at which to evaluate.
      w: background weight in [0, 1] (see `ccstae_jax.data.noise`).
      counts: electrons per probe.
      lorentz_width: Lorentzian HWHM of the background, cycles per pixel.

    Returns:
      ``(P, P)`` float64 Fisher matrix (units: 1 / (parameter units)^2). Pixels with zero rate
      (possible only at ``w = 0``) carry no information and are skipped.
    """
    w = parse_noise_level(w)
    params = jnp.asarray(params, jnp.float32)
    pattern, jac = _value_and_jacobian(pattern_fn)(params)  # (H, W), (H, W, P)
    background = jnp.asarray(lorentzian_background(pattern.shape, width=lorentz_width))
    lam = np.asarray(_rates(pattern, background, w, counts), np.float64).ravel()
    dlam = counts * (1.0 - w) * np.asarray(jac, np.float64).reshape(lam.size, -1)
    ok = lam > 0
    return (dlam[ok] / lam[ok, None]).T @ dlam[ok]


def crb_sigma(
    pattern_fn: Callable[[jax.Array], jax.Array],
    params: ArrayLike,
    *,
    w: float,
    counts: float = DEFAULT_COUNTS,
    lorentz_width: float = DEFAULT_LORENTZ_WIDTH,
    poisson_at_zero: bool = False,
) -> np.ndarray:
    """Cramér-Rao bound ``sqrt(diag(F^-1))`` on each parameter's standard deviation.

    Args:
      pattern_fn, params, w, counts, lorentz_width: as for `fisher_information`.
      poisson_at_zero: at ``w = 0`` return the shot-noise bound instead of 0 (the Auto4DSTEM
        ``w = 0`` data are noise-free).

    Returns:
      ``(P,)`` float64 lower bounds on the standard deviation, in the parameters' units
      (strains dimensionless, rotation in radians, shifts in detector pixels).
    """
    w = parse_noise_level(w)
    n = int(np.asarray(params).shape[-1])
    if w == 0.0 and not poisson_at_zero:
        return np.zeros(n)
    fisher = fisher_information(pattern_fn, params, w=w, counts=counts, lorentz_width=lorentz_width)
    return np.sqrt(np.diag(np.linalg.inv(fisher)))


@dataclasses.dataclass(frozen=True)
class CRBResult:
    """Cramér-Rao bounds over a set of random grains.

    Attributes:
      names: parameter names, e.g. ``("strain_xx", "strain_yy", "shear_xy", "rotation")``.
      sigma: ``(n_grains, P)`` per-grain lower bounds on the standard deviation.
      params: ``(n_grains, P)`` the grain parameters used (shifts are 0).
      w: background weight; counts: electrons per probe.
    """

    names: tuple[str, ...]
    sigma: np.ndarray
    params: np.ndarray
    w: float
    counts: float

    @property
    def mean_sigma(self) -> np.ndarray:
        """``(P,)`` bound averaged over the grains."""
        return self.sigma.mean(axis=0)

    @property
    def expected_mae(self) -> np.ndarray:
        """``(P,)`` MAE of an unbiased Gaussian estimator at the bound, averaged over the grains."""
        return gaussian_mae(self.mean_sigma)

    def as_dict(self) -> dict[str, float]:
        """``{name: mean sigma}`` plus ``{name + "_mae": expected MAE}``; rotation also in degrees."""
        out = {}
        for name, s, m in zip(self.names, self.mean_sigma, self.expected_mae):
            out[name] = float(s)
            out[f"{name}_mae"] = float(m)
            if name == "rotation":
                out["rotation_deg"] = math.degrees(s)
                out["rotation_deg_mae"] = math.degrees(m)
        return out


def strain_crb(
    config: SimulationConfig,
    *,
    w: float,
    counts: float | None = None,
    n_grains: int = 16,
    seed: int = 0,
    include_translation: bool = False,
    params: ArrayLike | None = None,
    poisson_at_zero: bool = False,
) -> CRBResult:
    """Cramér-Rao bound on per-pattern (strain_xx, strain_yy, shear_xy, rotation), over random grains.

    Grains are drawn like the simulator's (strains ``U[-max_strain, max_strain]``, rotation
    ``U[0, 2 pi)``) unless ``params`` are given. Each grain's pattern is the simulator's noise-free
    cropped pattern for ``config`` (its lattice, reference phase, disk radius and projector ellipticity;
    a descan is a pattern shift, estimated with ``include_translation``); the noise is the Auto4DSTEM
    model at weight ``w``.

    Args:
      config: simulator geometry (``SimulationConfig()`` is the 256 -> 200 px benchmark geometry);
        its ``max_strain`` sets the range of the random grains.
      w: background weight in [0, 1] (or '25%').
      counts: electrons per probe (default ``config.counts``).
      n_grains: random grains to average over.
      seed: seed for the random grains.
      include_translation: also estimate a pattern shift ``(shift_x, shift_y)`` (nuisance).
      params: ``(n, 4)`` explicit grain parameters instead of random ones.
      poisson_at_zero: see `crb_sigma`.

    Returns:
      A `CRBResult`; ``result.mean_sigma`` and ``result.expected_mae`` are ``(P,)`` arrays.
    """
    counts = config.counts if counts is None else float(counts)
    w = parse_noise_level(w)
    if params is None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC4B]))
        params = np.concatenate(
            [rng.uniform(-config.max_strain, config.max_strain, (n_grains, 3)),
             rng.uniform(0, 2 * np.pi, (n_grains, 1))], axis=1)
    params = np.asarray(params, np.float64).reshape(-1, 4)
    if include_translation:
        params = np.concatenate([params, np.zeros((len(params), 2))], axis=1)
    fn = _simulator_pattern_fn(config, bool(include_translation))  # cached: one compilation per geometry
    sigma = np.stack([
        crb_sigma(fn, p, w=w, counts=counts, lorentz_width=config.lorentz_width, poisson_at_zero=poisson_at_zero)
        for p in params
    ])
    names = PARAM_NAMES[: params.shape[1]]
    return CRBResult(names=names, sigma=sigma, params=params, w=w, counts=counts)
