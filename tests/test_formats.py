"""Specifications of the detector formats behind `open_scan` (ccstae_jax.data.formats): each format is written by a
maintained writer where one exists (RosettaSciIO: .blo, .hspy, NCEM EMD, TVIPS; hdf5plugin's Bitshuffle-LZ4 for
ARINA) or from its documented layout (Merlin .mib + .hdr, EMPAD .raw + .xml, ARINA's master/data files), read back
through `open_scan` and compared with the array written, exactly (after the format's dtype).

Gatan .dm3/.dm4 has no writer in RosettaSciIO (or elsewhere installable) and no small test file ships inside an
installed package, so it is opened only for the missing-extra error here. Tests that need the ``io`` extra skip
without it.
"""
from __future__ import annotations

import sys

import h5py
import numpy as np
import pytest

from _detector_files import write_arina, write_empad, write_mib
from ccstae_jax.data import formats
from ccstae_jax.data.readers import DataError, open_scan
from ccstae_jax.data.simulate import SimulationConfig, simulate_scan

EXTRA = 'pip install "ccstae-jax[io]"'


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    """A 6x6 scan of 64x64 simulated patterns as integer counts, uint16 (the values detectors store)."""
    cfg = SimulationConfig(scan_shape=(6, 6), detector_size=64, crop=(0, 64), n_grains=2, noise_level=0.25, seed=3)
    data, _ = simulate_scan(cfg)
    scaled = data * 4  # the simulator's counts are quarter-integers
    assert np.array_equal(scaled, np.round(scaled))
    return scaled.astype(np.uint16)


def without_rsciio(monkeypatch):
    """Makes every ``import rsciio...`` fail, as if the io extra were not installed (also after earlier imports)."""
    for name in [m for m in sys.modules if m == "rsciio" or m.startswith("rsciio.")] + ["rsciio"]:
        monkeypatch.setitem(sys.modules, name, None)


def _read_all(path, **kw) -> np.ndarray:
    with open_scan(path, **kw) as scan:
        return scan.read(0, scan.n_positions).reshape(*scan.scan_shape, *scan.pattern_shape)


def _signal(data, *, nav=("nm", 0.5), sig=("1/nm", 0.25), title=""):
    """A RosettaSciIO signal dictionary (what HyperSpy hands its writers) for a (Rx, Ry, H, W) array."""
    axes = [{"size": n, "index_in_array": i, "name": name, "scale": (nav if i < 2 else sig)[1], "offset": 0.0,
             "units": (nav if i < 2 else sig)[0], "navigate": i < 2}
            for i, (n, name) in enumerate(zip(data.shape, ("y", "x", "ky", "kx")))]
    return {"data": data, "axes": axes, "metadata": {"General": {"title": title}, "Signal": {}},
            "original_metadata": {}, "attributes": {"_lazy": False}, "tmp_parameters": {}, "learning_results": {},
            "models": {}, "package_info": {}}


# ----- formats read by h5py and numpy (no extra) ---------------------------------------------------------------
def test_arina_frame_stack_over_linked_files_reads_the_scan(tmp_path, counts):
    master = tmp_path / "scan_master.h5"
    rows = counts.reshape(36, 64, 64)
    with h5py.File(tmp_path / "scan_data_000001.h5", "w") as f:
        f.create_dataset("entry/data/data", data=rows[:20], chunks=(1, 64, 64))
    with h5py.File(tmp_path / "scan_data_000002.h5", "w") as f:
        f.create_dataset("entry/data/data", data=rows[20:], chunks=(1, 64, 64))
    with h5py.File(master, "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink("scan_data_000001.h5", "/entry/data/data")
        f["entry/data/data_000002"] = h5py.ExternalLink("scan_data_000002.h5", "/entry/data/data")
    with open_scan(master) as scan:
        assert scan.format == "arina" and scan.scan_shape == (6, 6)
        np.testing.assert_array_equal(scan.read(15, 23), rows[15:23])  # across the two data files
    np.testing.assert_array_equal(_read_all(master, scan_shape=(4, 9), crop=((2, 50), (0, 64))),
                                  rows.reshape(4, 9, 64, 64)[:, :, 2:50])


def test_arina_scan_that_is_not_square_needs_scan_shape(tmp_path, counts):
    master = write_arina_plain(tmp_path, counts.reshape(36, 64, 64)[:30])
    with pytest.raises(DataError, match=r"30 frames do not fill a square scan; pass scan_shape"):
        open_scan(master)
    with pytest.raises(DataError, match=r"scan_shape=\(4, 8\) does not match the 30 frames"):
        open_scan(master, scan_shape=(4, 8))
    assert _read_all(master, scan_shape=(5, 6)).shape == (5, 6, 64, 64)


def test_arina_missing_data_file_is_named(tmp_path, counts):
    master = write_arina_plain(tmp_path, counts.reshape(36, 64, 64))
    (tmp_path / "scan_data_000001.h5").unlink()
    with pytest.raises(DataError, match=r"data_000001 links to scan_data_000001.h5:/entry/data/data, which cannot"):
        open_scan(master)


def write_arina_plain(tmp_path, frames):
    with h5py.File(tmp_path / "scan_data_000001.h5", "w") as f:
        f.create_dataset("entry/data/data", data=frames, chunks=(1, *frames.shape[1:]))
    master = tmp_path / "scan_master.h5"
    with h5py.File(master, "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink("scan_data_000001.h5", "/entry/data/data")
    return master


def test_empad_raw_round_trip(tmp_path):
    cfg = SimulationConfig(scan_shape=(6, 6), detector_size=128, crop=(0, 128), n_grains=2, seed=1)
    data, _ = simulate_scan(cfg)
    raw = write_empad(tmp_path / "scan.raw", data)
    with open_scan(raw) as scan:
        assert scan.format == "empad"
    np.testing.assert_array_equal(_read_all(raw), data)
    np.testing.assert_array_equal(_read_all(raw.with_suffix(".xml")), data)


def test_ncem_emd_axes_are_read_in_rosettasciio_order(tmp_path, counts):
    """NCEM (Berkeley) EMD stores the axes reversed, dim1 = the last axis as HyperSpy shows it."""
    path = tmp_path / "scan.emd"
    with h5py.File(path, "w") as f:
        f.attrs["version_major"], f.attrs["version_minor"] = 0, 2
        group = f.create_group("data/scan")
        group.attrs["emd_group_type"] = 1
        group.create_dataset("data", data=np.transpose(counts))
        for i, n in enumerate(counts.shape[::-1], start=1):
            group.create_dataset(f"dim{i}", data=np.arange(n, dtype=float))
    with open_scan(path) as scan:
        assert scan.transpose == (3, 2, 1, 0) and scan.scan_shape == (6, 6)
    np.testing.assert_array_equal(_read_all(path), counts)


def test_compressed_hdf5_without_hdf5plugin_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "eiger.h5"
    with h5py.File(path, "w") as f:
        dset = f.create_dataset("data", shape=(2, 2, 4, 4), dtype="u2", chunks=(1, 2, 4, 4), compression=32008,
                                compression_opts=(0, 2), allow_unknown_filter=True)
        dset.id.write_direct_chunk((0, 0, 0, 0), b"\0" * 64)
    monkeypatch.setattr(formats, "_filter_available", lambda code: code != 32008)
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # as if the extra were not installed
    with pytest.raises(DataError) as err:
        open_scan(path)
    msg = str(err.value)
    assert "key '/data'" in msg and "HDF5 filter 32008 (Bitshuffle)" in msg and msg.endswith(EXTRA)


@pytest.mark.parametrize("name", ["scan.mib", "scan.dm4", "scan.dm3", "scan.blo", "scan_000.tvips"])
def test_format_needing_the_extra_names_it(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 1024)
    without_rsciio(monkeypatch)
    with pytest.raises(DataError) as err:
        open_scan(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: reading ") and msg.endswith(EXTRA) and "\n" not in msg


def test_unknown_format_name_is_refused(tmp_path, counts):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["data"] = counts
    with pytest.raises(DataError, match=r"unknown format 'merlin'; expected one of auto, hdf5, arina"):
        open_scan(path, format="merlin")


def test_explicit_format_overrides_the_suffix(tmp_path, counts):
    path = tmp_path / "scan.bin"
    with h5py.File(path, "w") as f:
        f["data"] = counts
    np.testing.assert_array_equal(_read_all(path, format="hdf5"), counts)
    with pytest.raises(DataError, match="no ARINA/EIGER frame datasets"):
        open_scan(path, format="arina")


def test_simulator_q_pixel_is_scaled_by_binning(tmp_path, counts):
    path = tmp_path / "sim.h5"
    with h5py.File(path, "w") as f:
        f["data"] = counts
        f.attrs["q_pixel"] = 0.02
    with open_scan(path) as scan:
        assert scan.calibration == {"q_pixel": 0.02}
    with open_scan(path, binning=2) as scan:
        assert scan.calibration == {"q_pixel": 0.04}


def test_calibration_from_axes_converts_units():
    axes = [{"scale": 0.5, "units": "nm"}, {"scale": 5.0, "units": "Å"},
            {"scale": 0.25, "units": "1/nm"}, {"scale": 0.025, "units": "1 / Å"}]
    cal = formats.calibration_from_axes(axes)
    assert cal == pytest.approx({"scan_step": 5.0, "q_pixel": 0.025})
    axes[3]["scale"] = 0.03  # detector axes disagree: no single q_pixel
    axes[0]["units"] = "cm-ish"
    assert formats.calibration_from_axes(axes) == {}


# ----- formats read through the io extra ------------------------------------------------------------------------
def test_mib_round_trip_matches_rosettasciio(tmp_path, counts):
    rsciio_qd = pytest.importorskip("rsciio.quantumdetector")
    path = write_mib(tmp_path / "scan.mib", counts)
    with open_scan(path) as scan:
        assert scan.format == "mib" and scan.scan_shape == (6, 6) and scan.stored_dtype == np.dtype(">u2")
        assert scan.calibration == {}
    np.testing.assert_array_equal(_read_all(path), counts)
    eager = rsciio_qd.file_reader(str(path), lazy=False)[0]["data"]  # RosettaSciIO's own orientation
    np.testing.assert_array_equal(eager, counts)


def test_mib_without_hdr_takes_scan_shape(tmp_path, counts):
    pytest.importorskip("rsciio.quantumdetector")
    path = write_mib(tmp_path / "scan.mib", counts[:4], hdr=False)  # 4 x 6 positions
    np.testing.assert_array_equal(_read_all(path, scan_shape=(4, 6)), counts[:4])
    with pytest.raises(DataError, match=r"scan_shape=\(5, 5\) does not match"):
        open_scan(path, scan_shape=(5, 5))


def test_mib_streams_whole_scan_rows_in_small_chunks(tmp_path, counts, monkeypatch):
    pytest.importorskip("rsciio.quantumdetector")
    path = write_mib(tmp_path / "scan.mib", counts)
    row_bytes = 6 * 64 * 64 * 2
    monkeypatch.setattr(formats, "CHUNK_BYTES", 2 * row_bytes)
    with open_scan(path) as scan:
        assert scan._source.chunks == (2, 6, 64, 64)  # 2 scan rows of whole patterns per chunk
        batches = list(scan.batches(5, shuffle=False))
    images = np.concatenate([b.images[b.weights > 0] for b in batches])
    np.testing.assert_array_equal(images, counts.reshape(36, 64, 64))


def test_arina_bitshuffle_lz4_round_trip_matches_rosettasciio(tmp_path, counts):
    pytest.importorskip("hdf5plugin")
    master = write_arina(tmp_path / "scan_master.h5", counts, frames_per_file=16)  # 3 data files
    with h5py.File(tmp_path / "scan_data_000001.h5", "r") as f:
        plist = f["entry/data/data"].id.get_create_plist()
        assert 32008 in [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]  # Bitshuffle (+ LZ4)
    np.testing.assert_array_equal(_read_all(master), counts)
    arina = pytest.importorskip("rsciio.arina")
    np.testing.assert_array_equal(arina.file_reader(str(master))[0]["data"], counts)


def test_blo_written_by_rosettasciio_round_trip(tmp_path, counts):
    blockfile = pytest.importorskip("rsciio.blockfile")
    as_bytes = np.round(counts * (255.0 / counts.max())).astype(np.uint8)  # .blo stores uint8
    path = tmp_path / "scan.blo"
    blockfile.file_writer(str(path), _signal(as_bytes, sig=("cm", 0.01)))
    with open_scan(path) as scan:
        assert scan.format == "blo" and scan.stored_dtype == np.uint8
        assert scan.calibration == {"scan_step": pytest.approx(5.0)}  # 0.5 nm; .blo keeps no reciprocal units
    np.testing.assert_array_equal(_read_all(path), as_bytes)


def test_hspy_written_by_rosettasciio_round_trip_with_calibration(tmp_path, counts):
    hspy = pytest.importorskip("rsciio.hspy")
    path = tmp_path / "scan.hspy"
    hspy.file_writer(str(path), _signal(counts, nav=("nm", 0.5), sig=("1/nm", 0.25)))
    with open_scan(path) as scan:
        assert scan.format == "hdf5" and scan.key.endswith("/data")
        assert scan.calibration == pytest.approx({"scan_step": 5.0, "q_pixel": 0.025})
    np.testing.assert_array_equal(_read_all(path), counts)


def test_ncem_emd_written_by_rosettasciio_round_trip(tmp_path, counts):
    emd = pytest.importorskip("rsciio.emd")
    path = tmp_path / "scan.emd"
    emd.file_writer(str(path), _signal(counts))
    np.testing.assert_array_equal(_read_all(path), counts)
    np.testing.assert_array_equal(np.asarray(emd.file_reader(str(path))[0]["data"]), counts)


def test_tvips_written_by_rosettasciio_round_trip(tmp_path, counts):
    tvips = pytest.importorskip("rsciio.tvips")
    path = tmp_path / "scan_000.tvips"
    tvips.file_writer(str(path), _signal(counts, sig=("1/nm", 0.25)))
    with open_scan(path, scan_shape=(6, 6)) as scan:
        assert scan.format == "tvips"
    np.testing.assert_array_equal(_read_all(path, scan_shape=(6, 6)), counts)


# ----- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # trains and maps twice in-process: ~1-2.5 min on 2 CPU cores
def test_maps_from_mib_and_h5_of_the_same_scan_are_bit_identical(tmp_path, counts):
    """Train one short epoch on the .mib, map the .mib and the .h5 of the same counts: the same maps, bit for bit."""
    pytest.importorskip("rsciio.quantumdetector")
    from ccstae_jax import cli

    mib = write_mib(tmp_path / "scan.mib", counts)
    h5 = tmp_path / "scan.h5"
    with h5py.File(h5, "w") as f:
        f["data"] = counts
    run = tmp_path / "run"
    assert cli.main(["train", str(mib), "--out", str(run), "--epochs", "1", "--batch-size", "12", "--ring", "8",
                     "22", "--quiet"]) == 0
    outs = {}
    for name, path in (("mib", mib), ("h5", h5)):
        outs[name] = tmp_path / f"strain_{name}.h5"
        assert cli.main(["map", str(run), str(path), "--out", str(outs[name]), "--refine-steps", "2",
                         "--reference-region", "0", "3", "0", "3", "--scan-rotation", "30", "--quiet"]) == 0
    with h5py.File(outs["mib"], "r") as a, h5py.File(outs["h5"], "r") as b:
        keys = []
        a.visititems(lambda n, o: keys.append(n) if isinstance(o, h5py.Dataset) else None)
        assert {"strain_xx", "rotation", "image_frame/strain_xx", "affine/theta"} <= set(keys)
        for k in keys:
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)
        assert int(a["valid"][()].sum()) > 0


def test_cli_train_on_mib_without_the_extra_is_one_line_naming_it(tmp_path, counts, monkeypatch, capsys):
    from ccstae_jax import cli

    mib = write_mib(tmp_path / "scan.mib", counts)
    without_rsciio(monkeypatch)
    assert cli.main(["train", str(mib), "--out", str(tmp_path / "run"), "--quiet"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("ccstae train: error: ") and err.endswith(EXTRA) and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_data_options_keep_format_and_scan_shape_with_the_run():
    from ccstae_jax.pipeline import DataOptions

    opts = DataOptions(format="arina", scan_shape=(4, 9))
    assert DataOptions.from_dict(opts.to_dict()) == opts
    older = {"key": None, "transpose": None, "crop": None, "binning": 1, "allow_negative": False}
    assert DataOptions.from_dict(older) == DataOptions()  # runs saved before these options read as auto
