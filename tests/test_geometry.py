"""Specifications of the geometry measured from the data: zero beam and descan, disk radius, spot spacing, symmetry,
and the radii derived from them, on simulated scans of several geometries."""
import functools

import numpy as np
import pytest

from ccstae_jax.data.simulate import SimulationConfig, simulate_scan
from ccstae_jax.model.geometry import (Geometry, GeometryError, _ring_extent, coherent_profile, measure_geometry,
                                      spot_profile, zero_beam)


@functools.lru_cache(maxsize=None)
def _scan(noise=0.25, scan=12, **kw):
    cfg = SimulationConfig(scan_shape=(scan, scan), n_grains=8, noise_level=noise, seed=3, **dict(kw))
    data, labels = simulate_scan(cfg)
    return cfg, data.reshape(-1, *data.shape[2:]), labels


def _first_order(cfg: SimulationConfig) -> float:
    """Distance of the first-order spots from the zero beam, px."""
    return cfg.spot_spacing


def test_zero_beam_follows_a_descan_drift_to_a_tenth_of_a_pixel():
    cfg, x, labels = _scan(descan=(5.0, 0.0, 0.0, 5.0))
    got = np.asarray(zero_beam(x))
    np.testing.assert_allclose(got, labels["zero_beam"].reshape(-1, 2), atol=0.1)


def test_geometry_reports_the_descan_drift_and_its_gradient():
    cfg, x, _ = _scan(descan=(5.0, 0.0, 0.0, 5.0))
    rx, ry = cfg.scan_shape
    positions = np.stack(np.meshgrid(np.arange(rx), np.arange(ry), indexing="ij"), -1).reshape(-1, 2)
    geo = measure_geometry(x, positions=positions, scan_shape=cfg.scan_shape)
    assert geo.drift == pytest.approx(np.hypot(2.5, 2.5), abs=0.3)
    np.testing.assert_allclose(geo.descan, [[5.0, 0.0], [0.0, 5.0]], atol=0.3)


@pytest.mark.parametrize("noise", [0.0, 0.25])
@pytest.mark.parametrize("radius", [1.5, 3.7, 8.0, 16.0])
def test_disk_radius_and_spot_spacing_are_measured_for_spots_to_wide_disks(radius, noise):
    """Noise-free patterns too: there the central disk's edge falls into nothing and every annulus is
    'significant', so neither may move the radius or the first ring."""
    cfg, x, _ = _scan(noise=noise, disk_radius=radius)
    geo = measure_geometry(x)
    assert geo.disk_radius == pytest.approx(radius, abs=max(0.5, 0.05 * radius))
    assert geo.spot_spacing == pytest.approx(_first_order(cfg), abs=max(1.0, 0.1 * radius))
    assert geo.symmetry == 6
    inner, outer = geo.ring
    assert inner <= _first_order(cfg) - radius + 0.5 and outer >= np.sqrt(3.0) * _first_order(cfg)


def test_wide_disks_whose_first_ring_is_too_faint_per_pattern_are_found_by_the_coherent_harmonic():
    """16-px disks at 25 % noise: the per-pattern harmonic powers show the second ring (at sqrt 3 times the spacing)
    and hardly the first; the spacing must still be the first ring's."""
    cfg, x, _ = _scan(disk_radius=16.0)
    geo = measure_geometry(x)
    assert geo.spot_spacing == pytest.approx(_first_order(cfg), abs=1.6)
    center = geo.center
    profiles, z = spot_profile(x, center)
    _, _, spacing_from_powers = _ring_extent(profiles, z, center, geo.disk_radius + 0.5, 98.0, geo.disk_radius)
    assert spacing_from_powers > 1.3 * _first_order(cfg)  # the premise: the powers alone miss the first ring
    amplitude, zc = coherent_profile(x, center, 6, geo.ring, 98.0)
    radii = np.arange(amplitude.size) + 0.5
    first_ring = (radii > _first_order(cfg) - 12) & (radii < _first_order(cfg) + 8)
    empty = (radii > geo.disk_radius + 3) & (radii < _first_order(cfg) - 18)
    assert np.median(zc[first_ring]) > 2.0 * np.median(zc[empty])


@pytest.mark.parametrize("size", [128, 256])
def test_geometry_scales_with_the_detector(size):
    cfg, x, _ = _scan(detector_size=size, crop=(0, size))
    geo = measure_geometry(x)
    assert geo.pattern_shape == (size, size)
    np.testing.assert_allclose(geo.center, (size // 2, size // 2), atol=0.2)
    assert geo.spot_spacing == pytest.approx(_first_order(cfg), abs=2.0)
    inner, outer = geo.ring
    assert inner < _first_order(cfg) - cfg.disk_radius and outer <= size / 2


@pytest.mark.parametrize("lattice, order", [("hexagonal", 6), ("square", 4), ("rectangular", 2)])
def test_lattice_symmetry_is_read_from_the_angular_harmonics(lattice, order):
    _, x, _ = _scan(lattice=lattice)
    assert measure_geometry(x).symmetry == order


@pytest.mark.parametrize("lattice", ["hexagonal", "square", "rectangular"])
def test_the_first_order_spacing_and_the_loss_ring_hold_the_first_order_spots_of_every_lattice(lattice):
    """Strain leaks a square lattice's second-order spots into orders 2, 6 and 10: its first order, seen in orders 4, 8
    and 12 nearer the zero beam, must still be the one measured. A rectangular lattice has two first-order
    distances (``1/a`` and ``1/b``): the spacing lies between them."""
    cfg, x, _ = _scan(lattice=lattice)
    geo = measure_geometry(x)
    longest = _first_order(cfg) * (cfg.lattice_aspect if lattice == "rectangular" else 1.0)
    assert _first_order(cfg) - 1.5 <= geo.spot_spacing <= longest + 1.5
    inner, outer = geo.ring
    assert inner <= _first_order(cfg) - cfg.disk_radius and outer > _first_order(cfg) + cfg.disk_radius


def test_a_given_symmetry_or_ring_overrides_the_measured_one():
    _, x, _ = _scan()
    geo = measure_geometry(x, symmetry=4, ring=(20.0, 60.0))
    assert geo.symmetry == 4 and geo.ring == (20.0, 60.0)


def test_the_derived_radii_enclose_the_disk_edges_and_skip_the_central_disk():
    cfg, x, _ = _scan(disk_radius=8.0)
    geo = measure_geometry(x)
    start, end = geo.spot_radius
    assert end > cfg.disk_radius and start > end
    assert geo.disk_radius < geo.fit_min_radius < _first_order(cfg) - cfg.disk_radius
    inner, outer = geo.ring
    assert inner <= _first_order(cfg) - cfg.disk_radius and outer > _first_order(cfg) + cfg.disk_radius


def test_patterns_without_a_lattice_are_refused_with_what_was_measured():
    rng = np.random.default_rng(0)
    r = np.hypot(*(np.mgrid[:128, :128] - 64))
    glow = 400.0 / (1 + (r / 3) ** 2) + 5.0 / (1 + (r / 40) ** 2)  # central beam and an amorphous halo
    x = rng.poisson(np.broadcast_to(glow, (64, 128, 128))).astype(np.float32)
    with pytest.raises(GeometryError, match="zero beam at"):
        measure_geometry(x)
    with pytest.raises(GeometryError, match="zero beam at"):  # a ring alone does not say what lattice to expect
        measure_geometry(x, ring=(20.0, 50.0))


def test_a_lattice_forced_by_ring_and_symmetry_is_accepted_on_patterns_without_one():
    rng = np.random.default_rng(0)
    r = np.hypot(*(np.mgrid[:128, :128] - 64))
    x = rng.poisson(np.broadcast_to(400.0 / (1 + (r / 3) ** 2), (32, 128, 128))).astype(np.float32)
    g = measure_geometry(x, ring=(20.0, 50.0), symmetry=6)
    assert g.ring == (20.0, 50.0) and g.symmetry == 6
    assert g.spot_spacing > 20.0


def test_geometry_round_trips_through_a_dict_and_rejects_unknown_keys():
    geo = Geometry(pattern_shape=(128, 128), center=(64.0, 63.5), symmetry=4, ring=(10.0, 50.0),
                   descan=((1.0, 0.0), (0.0, 1.0)))
    assert Geometry.from_dict(geo.to_dict()) == geo
    with pytest.raises(ValueError, match="unknown keys"):
        Geometry.from_dict({**geo.to_dict(), "radius": 3})


def test_geometry_refuses_impossible_values():
    with pytest.raises(ValueError, match="square"):
        Geometry(pattern_shape=(64, 32))
    with pytest.raises(ValueError, match="symmetry"):
        Geometry(symmetry=3)
    with pytest.raises(ValueError, match="ring radii"):
        Geometry(ring=(50.0, 40.0))
