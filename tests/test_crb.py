"""Specifications of ccstae_jax.evaluate.crb: the Cramér-Rao bound under the Auto4DSTEM noise model."""
import dataclasses

import jax
import numpy as np
import pytest

from ccstae_jax.evaluate import crb
from ccstae_jax.data.noise import lorentzian_background
from ccstae_jax.data.simulate import SimulationConfig, pattern_function

# Small geometry: 64 px detector -> 50 px crop, 2 px disks.
SMALL = SimulationConfig(detector_size=64, disk_radius=2.0)
PARAMS = np.array([[0.01, -0.015, 0.005, 0.4], [-0.02, 0.003, 0.012, 2.2]])


def test_bound_scales_as_inverse_sqrt_counts():
    lo = crb.strain_crb(SMALL, w=0.25, counts=1e4, params=PARAMS).sigma
    hi = crb.strain_crb(SMALL, w=0.25, counts=1e6, params=PARAMS).sigma
    np.testing.assert_allclose(lo / hi, 10.0, rtol=1e-6)


def test_bound_increases_with_background_weight():
    sig = [crb.strain_crb(SMALL, w=w, params=PARAMS).mean_sigma for w in (0.05, 0.25, 0.5, 0.7)]
    assert np.all(np.diff(np.stack(sig), axis=0) > 0)


def test_fisher_matches_finite_differences_on_tiny_case():
    cfg = SimulationConfig(detector_size=32, crop=(0, 32), q_pixel=0.03, k_max=0.7, disk_radius=2.0)
    fn = jax.jit(pattern_function(cfg))
    p0 = np.array([0.01, -0.004, 0.006, 0.3], np.float32)
    w, counts = 0.3, 1e5
    got = crb.fisher_information(fn, p0, w=w, counts=counts)
    # Independent: central differences of the rendered pattern (float32, step 2e-4).
    h = 2e-4
    derivs = []
    for i in range(4):
        dp = np.zeros(4, np.float32)
        dp[i] = h
        derivs.append((np.asarray(fn(p0 + dp), np.float64) - np.asarray(fn(p0 - dp), np.float64)) / (2 * h))
    d = counts * (1 - w) * np.stack(derivs, -1).reshape(-1, 4)
    lam = counts * ((1 - w) * np.asarray(fn(p0), np.float64) + w * lorentzian_background((32, 32))).ravel()
    want = (d / lam[:, None]).T @ d
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_nuisance_translation_can_only_loosen_the_bound():
    base = crb.strain_crb(SMALL, w=0.25, params=PARAMS)
    shifted = crb.strain_crb(SMALL, w=0.25, params=PARAMS, include_translation=True)
    assert shifted.names[-2:] == ("shift_x", "shift_y")
    assert np.all(shifted.sigma[:, :4] >= base.sigma * (1 - 1e-9))


def test_zero_weight_is_noise_free_unless_poisson_requested():
    assert np.all(crb.strain_crb(SMALL, w=0.0, params=PARAMS).sigma == 0)
    shot = crb.strain_crb(SMALL, w=0.0, params=PARAMS, poisson_at_zero=True).sigma
    assert np.all(np.isfinite(shot)) and np.all(shot > 0)


def test_expected_mae_is_gaussian_mean_absolute_deviation():
    res = crb.strain_crb(SMALL, w="25%", n_grains=3, seed=1)
    np.testing.assert_allclose(res.expected_mae, np.sqrt(2 / np.pi) * res.sigma.mean(0))
    draws = np.random.default_rng(0).normal(0.0, 2.0, 200_000)
    assert crb.gaussian_mae(2.0) == pytest.approx(np.abs(draws).mean(), rel=0.01)
    assert set(res.as_dict()) >= {"strain_xx", "strain_xx_mae", "rotation_deg"}


def test_bound_is_finite_and_positive_for_a_square_lattice_with_16_px_disks():
    # 128 px detector kept whole, first-order spots 40 px from the zero beam, 16 px disks.
    base = SimulationConfig(detector_size=128, crop=(0, 128), lattice="square", disk_radius=16.0, k_max=0.5)
    cfg = dataclasses.replace(base, q_pixel=base.first_order_length / 40.0)
    res = crb.strain_crb(cfg, w=0.25, params=PARAMS, include_translation=True)
    assert res.sigma.shape == (2, 6)
    assert np.all(np.isfinite(res.sigma)) and np.all(res.sigma > 0)
    # The renderer's geometry is picked up: an elliptical projector changes the bound.
    plain = crb.strain_crb(cfg, w=0.25, params=PARAMS).sigma
    stretched = crb.strain_crb(dataclasses.replace(cfg, ellipticity=0.05), w=0.25, params=PARAMS).sigma
    assert np.all(np.isfinite(stretched)) and not np.allclose(stretched, plain, rtol=1e-3)
