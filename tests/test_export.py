"""Specifications of ccstae_jax.report.export: strain maps as HyperSpy .hspy and EMD 1.0 files that other tools
open in one call with calibrated axes."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from ccstae_jax.report.export import check_export, export_strain
from ccstae_jax.report.frames import frame_attrs, image_frame_maps
from ccstae_jax.report.files import write_strain_h5
from test_formats import without_rsciio

NAMES = ["rotation", "shear_xy", "strain_xx", "strain_yy", "valid", "image_frame_shear_xy", "image_frame_strain_xx",
         "image_frame_strain_yy"]


@pytest.fixture
def strain_file(tmp_path):
    """A small strain-map file as `ccstae map --scan-rotation 30` writes it, from data with a 5 Å scan step."""
    rng = np.random.default_rng(0)
    maps = {k: rng.normal(0, 0.01, (4, 6)).astype(np.float32) for k in ("strain_xx", "strain_yy", "shear_xy")}
    maps["rotation"] = rng.normal(0, 0.02, (4, 6)).astype(np.float32)
    maps["strain_xx"][0, 0] = np.nan
    maps["valid"] = np.isfinite(maps["strain_xx"])
    attrs = {"method": "test", **frame_attrs(30.0, {"scan_step": 5.0, "q_pixel": 0.02})}
    path = tmp_path / "strain.h5"
    write_strain_h5(path, {**maps, **image_frame_maps(maps, 30.0)}, attrs=attrs)
    return path, maps


def test_emd_file_has_the_emdfile_layout(strain_file):
    path, maps = strain_file
    out = export_strain(path, "emd")
    assert out == str(path.with_suffix(".emd"))
    with h5py.File(out, "r") as f:
        assert (f.attrs["emd_group_type"], f.attrs["version_major"], f.attrs["version_minor"]) == ("file", 1, 0)
        root = f["strain_maps"]
        assert root.attrs["emd_group_type"] == "root" and root.attrs["scan_rotation_deg"] == 30.0
        assert sorted(root) == sorted(NAMES)
        arr = root["strain_xx"]
        assert arr.attrs["emd_group_type"] == "array" and arr.attrs["python_class"] == "Array"
        np.testing.assert_array_equal(arr["data"][()], maps["strain_xx"])
        assert arr["data"].attrs["units"] == "dimensionless" and root["rotation/data"].attrs["units"] == "rad"
        np.testing.assert_allclose(arr["dim0"][()], [0.0, 0.5])
        assert (arr["dim0"].attrs["name"], arr["dim0"].attrs["units"]) == ("Rx", "nm")
        assert arr["dim1"].attrs["name"] == "Ry"


def test_hspy_opens_in_rosettasciio_with_calibrated_axes(strain_file):
    hspy = pytest.importorskip("rsciio.hspy")
    path, maps = strain_file
    signals = {d["metadata"]["General"]["title"]: d for d in hspy.file_reader(export_strain(path, "hspy"))}
    assert sorted(signals) == sorted(NAMES)
    sxx = signals["strain_xx"]
    np.testing.assert_array_equal(sxx["data"], maps["strain_xx"])
    assert [(a["name"], a["scale"], a["units"]) for a in sxx["axes"]] == [("Rx", 0.5, "nm"), ("Ry", 0.5, "nm")]
    assert "rad" in signals["rotation"]["metadata"]["Signal"]["quantity"]


def test_emd_opens_in_rosettasciio_with_calibrated_axes(strain_file):
    emd = pytest.importorskip("rsciio.emd")
    path, maps = strain_file
    signals = {d["metadata"]["General"]["title"]: d for d in emd.file_reader(export_strain(path, "emd"))}
    assert sorted(signals) == sorted(NAMES)
    np.testing.assert_array_equal(np.asarray(signals["strain_yy"]["data"]), maps["strain_yy"])
    assert [(a["name"], a["scale"], a["units"]) for a in signals["strain_yy"]["axes"]] == \
        [("Rx", 0.5, "nm"), ("Ry", 0.5, "nm")]


def test_hspy_without_the_extra_is_refused_before_mapping(tmp_path, monkeypatch):
    without_rsciio(monkeypatch)
    with pytest.raises(ValueError, match=r'--export hspy needs the optional io extra .*pip install "ccstae-jax\[io\]"'):
        check_export("hspy", tmp_path / "strain.h5")


def test_export_name_clashing_with_the_strain_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"already ends in .emd"):
        check_export("emd", tmp_path / "strain.emd")
