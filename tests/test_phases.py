"""Specifications of the phase split: positions grouped by lattice spacing and diffraction-order intensities."""
import numpy as np
import pytest

from ccstae_jax.mapping import fit
from ccstae_jax.mapping.phases import (MIN_MISMATCH, MIN_PHASE_SHARE, PHASE_SEPARATION, PhaseSplit, phase_features,
                                       split_phases)


def _features(rng, n, mean, spread):
    return rng.normal(mean, spread, size=(n, len(mean)))


def test_two_phases_far_apart_are_told_apart_with_the_reference_regions_as_phase_0():
    rng = np.random.default_rng(0)
    spread = [0.1, 0.1, 0.1, 0.005]  # order-intensity ratios and dilation, as noisy as a 25 % noise scan
    first = _features(rng, 300, [0.0, 0.0, 0.0, 0.0], spread)
    second = _features(rng, 200, [0.05, -0.05, 0.0, 0.04], spread)  # a 4 % larger lattice
    x = np.concatenate([second, first])  # the reference phase is not the first listed
    reference = np.zeros(500, bool)
    reference[200:216] = True
    got = split_phases(x, np.ones(500, bool), reference, dilation=x[:, 3])
    assert got.n_phases == 2 and got.separation >= PHASE_SEPARATION
    assert got.mismatch == pytest.approx(0.04, abs=2e-3)
    np.testing.assert_array_equal(got.phase, np.r_[np.ones(200), np.zeros(300)])


def test_groups_apart_in_order_intensities_alone_are_grains_not_phases():
    """Noise-free grains of one material cluster by orientation in their order intensities; without a lattice
    mismatch of `MIN_MISMATCH` such groups stay one phase."""
    rng = np.random.default_rng(6)
    spread = [0.01, 0.01, 0.01, 0.005]
    x = np.concatenate([_features(rng, 200, [0.0, 0.0, 0.0, 0.0], spread),
                        _features(rng, 200, [0.1, -0.1, 0.05, 0.01], spread)])  # 1 % apart in lattice spacing
    assert split_phases(x, np.ones(400, bool)).n_phases == 2  # what the features alone would say
    got = split_phases(x, np.ones(400, bool), dilation=x[:, 3])
    assert got.n_phases == 1 and got.separation >= PHASE_SEPARATION and abs(got.mismatch) < MIN_MISMATCH
    np.testing.assert_array_equal(got.phase, 0)


def test_one_phase_with_noise_or_a_spread_of_strains_stays_one_phase():
    rng = np.random.default_rng(1)
    noise = _features(rng, 600, [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.005])
    got = split_phases(noise, np.ones(600, bool))
    assert got.n_phases == 1 and got.separation < PHASE_SEPARATION
    np.testing.assert_array_equal(got.phase, 0)
    strained = noise.copy()
    strained[:, 3] = rng.uniform(-0.02, 0.02, 600)  # grains strained anywhere within +-2 %
    assert split_phases(strained, np.ones(600, bool)).n_phases == 1


def test_a_handful_of_odd_positions_is_not_a_phase():
    rng = np.random.default_rng(2)
    x = _features(rng, 500, [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.005])
    n_odd = int(MIN_PHASE_SHARE * 500) - 1
    x[:n_odd, 3] += 0.05
    assert split_phases(x, np.ones(500, bool)).n_phases == 1


def test_invalid_or_unmeasured_positions_get_no_phase():
    rng = np.random.default_rng(3)
    x = np.concatenate([_features(rng, 100, [0, 0, 0, 0.0], [0.1] * 3 + [0.005]),
                        _features(rng, 100, [0, 0, 0, 0.05], [0.1] * 3 + [0.005])])
    valid = np.ones(200, bool)
    valid[:5] = False
    x[10] = np.nan
    got = split_phases(x, valid, dilation=x[:, 3])
    assert got.n_phases == 2
    assert (got.phase[:5] == -1).all() and got.phase[10] == -1 and (got.phase[11:] >= 0).all()


def test_phase_features_do_not_depend_on_the_overall_brightness():
    rng = np.random.default_rng(4)
    amp = rng.uniform(0.5, 2.0, size=(10, fit.N_BANDS))
    dilation = rng.normal(0, 0.01, 10)
    a = phase_features(amp, dilation)
    np.testing.assert_allclose(phase_features(3.0 * amp, dilation), a, atol=1e-12)
    np.testing.assert_allclose(a[:, -1], dilation)
    amp[0, 2] = 0.0  # no spots measured in a band
    assert np.isnan(phase_features(amp, dilation)[0]).any()


def test_too_few_positions_make_one_phase_without_a_separation():
    got = split_phases(np.zeros((5, 4)), np.ones(5, bool))
    assert got.n_phases == 1 and np.isnan(got.separation)


@pytest.mark.parametrize("seed", range(5))
def test_the_split_is_rarely_called_on_one_gaussian_cloud(seed):
    rng = np.random.default_rng(10 + seed)
    got = split_phases(rng.standard_normal((400, 4)), np.ones(400, bool))
    assert got.n_phases == 1 and got.separation < 0.7 * PHASE_SEPARATION


def test_the_console_says_how_many_phases_and_why():
    from ccstae_jax.pipeline import _phase_line

    none = np.zeros(4, np.int8)
    two = _phase_line(PhaseSplit(none, 2, 6.3, 0.0404))
    assert two.startswith("phases: 2 (") and "6.3 standard deviations" in two and "+4.0 %" in two
    assert "under the 5 two phases need" in _phase_line(PhaseSplit(none, 1, 3.4, 0.011))
    assert "1.1 %, under the 2 %" in _phase_line(PhaseSplit(none, 1, 5.5, -0.011))
    assert "too few valid positions" in _phase_line(PhaseSplit(none, 1, float("nan")))
