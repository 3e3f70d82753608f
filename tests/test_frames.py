"""Specifications of ccstae_jax.report.frames (strain turned from the detector frame into the image frame) and of what
`ccstae map --scan-rotation` writes."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from ccstae_jax import cli

from ccstae_jax.report import plots
from ccstae_jax.report.frames import frame_attrs, image_frame_maps, rotate_strain
from test_cli import checked_shared_run


def _tensor(xx, yy, xy):
    return np.stack([np.stack([xx, xy], -1), np.stack([xy, yy], -1)], -2)


@pytest.fixture
def strains():
    rng = np.random.default_rng(0)
    return tuple(rng.normal(0, 0.01, (5, 7)) for _ in range(3))


def test_rotating_by_zero_is_the_identity(strains):
    for before, after in zip(strains, rotate_strain(*strains, 0.0)):
        np.testing.assert_array_equal(after, before)


def test_pure_strain_xx_turned_90_degrees_is_strain_yy():
    xx, yy, xy = rotate_strain(np.array(0.01), np.array(0.0), np.array(0.0), 90.0)
    np.testing.assert_allclose([xx, yy, xy], [0.0, 0.01, 0.0], atol=1e-17)


def test_known_cases_by_hand():
    # uniaxial 1 % along x, axes turned 45 deg: half of it on each axis, and a shear of c s exx = 0.5 %
    np.testing.assert_allclose(rotate_strain(np.array(0.01), np.array(0.0), np.array(0.0), 45.0),
                               [0.005, 0.005, 0.005], atol=1e-15)
    # pure shear 1 % turned 30 deg: xx = -2 c s exy = -0.866 %, yy = +0.866 %, xy = (c^2 - s^2) exy = 0.5 %
    np.testing.assert_allclose(rotate_strain(np.array(0.0), np.array(0.0), np.array(0.01), 30.0),
                               [-0.01 * np.sqrt(3) / 2, 0.01 * np.sqrt(3) / 2, 0.005], atol=1e-15)


@pytest.mark.parametrize("angle", [-131.0, 17.5, 200.0])
def test_matches_r_eps_rt_and_keeps_trace_and_determinant(strains, angle):
    turned = rotate_strain(*strains, angle)
    phi = np.deg2rad(angle)
    r = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    expected = r @ _tensor(*strains) @ r.T
    np.testing.assert_allclose(_tensor(*turned), expected, atol=1e-15)
    before, after = _tensor(*strains), _tensor(*turned)
    np.testing.assert_allclose(np.trace(after, axis1=-2, axis2=-1), np.trace(before, axis1=-2, axis2=-1), atol=1e-15)
    np.testing.assert_allclose(np.linalg.det(after), np.linalg.det(before), atol=1e-15)


def test_nan_stays_nan_and_float32_stays_float32():
    xx, yy, xy = rotate_strain(np.array([np.nan, 0.01], np.float32), np.zeros(2, np.float32),
                               np.zeros(2, np.float32), 10.0)
    assert xx.dtype == np.float32 and np.isnan(xx[0]) and np.isnan(yy[0]) and np.isnan(xy[0])
    assert np.isfinite(xx[1])


def test_image_frame_maps_keep_the_rotation(strains):
    maps = dict(zip(("strain_xx", "strain_yy", "shear_xy"), strains), rotation=np.full((5, 7), 0.1))
    out = image_frame_maps(maps, 90.0)
    assert sorted(out) == ["image_frame/rotation", "image_frame/shear_xy", "image_frame/strain_xx",
                           "image_frame/strain_yy"]
    np.testing.assert_array_equal(out["image_frame/rotation"], maps["rotation"])
    np.testing.assert_allclose(out["image_frame/strain_xx"], maps["strain_yy"], atol=1e-15)


def test_frame_attrs_record_rotation_and_known_calibration_only():
    plain = frame_attrs(None, {})
    assert plain["frame"] == "detector" and "scan_rotation_deg" not in plain and "q_pixel" not in plain
    assert list(json.loads(plain["frames"])) == ["detector"]
    turned = frame_attrs(-12.5, {"q_pixel": 0.02})
    assert turned["scan_rotation_deg"] == -12.5 and list(json.loads(turned["frames"])) == ["detector", "image"]
    assert turned["q_pixel"] == 0.02 and turned["q_pixel_units"] == "1/Angstrom per detector pixel"
    assert "scan_step" not in turned


def test_plot_strain_frames_writes_a_png(tmp_path, strains):
    maps = dict(zip(("strain_xx", "strain_yy", "shear_xy"), strains), rotation=np.zeros((5, 7)),
                valid=np.ones((5, 7), bool))
    path = plots.plot_strain_frames(maps, tmp_path / "frames.png", scan_rotation=30.0)
    assert (tmp_path / "frames.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("frames.png")


def test_map_with_scan_rotation_writes_both_frames_calibration_and_emd(tmp_path_factory, tmp_path):
    chain = checked_shared_run(tmp_path_factory)
    out = tmp_path / "turned.h5"
    code = cli.main(["map", str(chain["run"]), str(chain["sim"]), "--out", str(out), "--refine-steps", "0",
                     "--scan-rotation", "90", "--export", "emd", "--quiet"])
    assert code == 0
    with h5py.File(out, "r") as f, h5py.File(chain["sim"], "r") as sim:
        np.testing.assert_allclose(f["image_frame/strain_xx"][()], f["strain_yy"][()], atol=1e-7)
        np.testing.assert_allclose(f["image_frame/strain_yy"][()], f["strain_xx"][()], atol=1e-7)
        np.testing.assert_allclose(f["image_frame/shear_xy"][()], -f["shear_xy"][()], atol=1e-7)
        np.testing.assert_array_equal(f["image_frame/rotation"][()], f["rotation"][()])
        assert f.attrs["scan_rotation_deg"] == 90.0 and f.attrs["frame"] == "detector"
        assert f.attrs["q_pixel"] == pytest.approx(float(sim.attrs["q_pixel"]))
    with h5py.File(out.with_suffix(".emd"), "r") as f:
        assert f.attrs["emd_group_type"] == "file" and f.attrs["version_major"] == 1
        assert "image_frame_strain_xx" in f["strain_maps"]
