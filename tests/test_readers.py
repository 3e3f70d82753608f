"""Specifications of ccstae_jax.data.readers: formats, streaming batches, and clear errors for bad input."""
import os
import tracemalloc

import h5py
import numpy as np
import pytest

from ccstae_jax.data import readers
from ccstae_jax.data.readers import DataError, open_scan


def _cube(shape=(4, 5, 6, 8), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(dtype)


def _h5(path, datasets, attrs=None, **file_kw):
    with h5py.File(path, "w", **file_kw) as f:
        for name, arr in datasets.items():
            f.create_dataset(name, data=arr)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return path


@pytest.fixture
def cube():
    return _cube()


@pytest.fixture
def ours(tmp_path, cube):
    """A file in the simulator's layout with row chunks, labels and a reference region."""
    path = tmp_path / "sim.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=cube, chunks=(1, 5, 6, 8))
        for name in readers.LABEL_NAMES:
            f.create_dataset(f"labels/{name}", data=np.full((4, 5), 0.5, np.float32))
        f.create_dataset("labels/grain_index", data=np.zeros((4, 5), np.int32))
        f.attrs["reference_region"] = np.array([0, 2, 1, 3])
    return path


# ----- formats --------------------------------------------------------------------------------
def test_reads_flat_row_major_positions(ours, cube):
    with open_scan(ours) as scan:
        assert scan.scan_shape == (4, 5) and scan.pattern_shape == (6, 8) and scan.n_positions == 20
        assert scan.key == "/data"
        np.testing.assert_array_equal(scan.read(3, 12), cube.reshape(20, 6, 8)[3:12])
        assert scan.read(7, 8).dtype == np.float32


@pytest.mark.parametrize(
    "layout",
    [
        "4DSTEM/datacube/data",
        "4DSTEM_experiment/data/datacubes/datacube_0/data",
        "4DSTEM_simulation/data/datacubes/CBED_array_depth0000/datacube",
        "some/other/place",
    ],
)
def test_finds_known_hdf5_layouts(tmp_path, cube, layout):
    path = _h5(tmp_path / "x.emd", {layout: cube, "4DSTEM/calibration/qpix": np.ones(3)})
    with open_scan(path) as scan:
        assert scan.key == "/" + layout
        np.testing.assert_array_equal(scan.read(0, 20), cube.reshape(20, 6, 8))


def test_key_selects_among_several_4d_datasets(tmp_path, cube):
    path = _h5(tmp_path / "two.h5", {"a": cube, "b": cube + 1})
    with open_scan(path, key="b") as scan:
        np.testing.assert_array_equal(scan.read(0, 1)[0], cube[0, 0] + 1)


def _matlab(path, stored, key="output4D"):
    """A MATLAB v7.3-like file: HDF5 with a 512-byte user block holding MATLAB's header, the dataset marked with a
    ``MATLAB_class`` attribute. ``stored`` is what h5py shows (MATLAB's axis order reversed)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(key, data=stored)
        f[key].attrs["MATLAB_class"] = np.bytes_(b"single")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64")
    return path


def test_matlab_array_saved_scan_first_is_read_with_the_reversed_order(tmp_path):
    logical = _cube((4, 5, 6, 6))  # MATLAB A(Rx, Ry, Qx, Qy), square patterns
    path = _matlab(tmp_path / "scan.mat", np.transpose(logical, (3, 2, 1, 0)))  # h5py shows (Qy, Qx, Ry, Rx)
    with open_scan(path) as scan:
        assert scan.transpose == (3, 2, 1, 0) and scan.scan_shape == (4, 5) and scan.pattern_shape == (6, 6)
        np.testing.assert_array_equal(scan.read(0, 20), logical.reshape(20, 6, 6))
        assert "stored as (6, 6, 5, 4)" in scan.layout_note and "transpose 3 2 1 0" in scan.layout_note
        from ccstae_jax.pipeline import describe_scan

        said = describe_scan(scan).splitlines()  # what `ccstae train` and `ccstae map` print
        assert said == [f"data {path}, key /output4D: 4 x 5 scan positions, 6 x 6 px patterns (stored (6, 6, 5, 4) "
                        "float32; transpose 3 2 1 0)", scan.layout_note]


def test_matlab_array_saved_detector_first_like_the_paper_is_read_with_1_0_3_2(tmp_path):
    logical = _cube((4, 5, 8, 8))  # (Rx, Ry, Qx, Qy) as the paper's output4D(kx, ky, xp, yp) is used
    stored = np.transpose(logical, (1, 0, 3, 2))  # what h5py shows for MATLAB's output4D
    path = _matlab(tmp_path / "polycrystal_output4D.mat", stored)
    with open_scan(path, crop=((1, 5), (2, 8))) as scan:
        assert scan.transpose == (1, 0, 3, 2) and scan.scan_shape == (4, 5)
        np.testing.assert_array_equal(scan.read(0, 20), logical[:, :, 1:5, 2:8].reshape(20, 4, 6))
        assert "transpose 1 0 3 2" in scan.layout_note


@pytest.mark.parametrize("stored", [(6, 6, 6, 6), (4, 4, 6, 6), (5, 4, 8, 6)])
def test_matlab_array_of_ambiguous_shape_is_refused_showing_the_shape_and_both_orders(tmp_path, stored):
    path = _matlab(tmp_path / "amb.mat", _cube(stored))
    with pytest.raises(DataError) as err:
        open_scan(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"stored as {stored}" in msg and "key '/output4D'" in msg
    assert "--transpose 3 2 1 0" in msg and "--transpose 1 0 3 2" in msg


def test_explicit_transpose_wins_over_the_matlab_default(tmp_path):
    logical = _cube((6, 6, 6, 6))
    path = _matlab(tmp_path / "amb.mat", np.transpose(logical, (3, 2, 1, 0)))
    with open_scan(path, transpose=(3, 2, 1, 0)) as scan:
        assert scan.layout_note == ""
        np.testing.assert_array_equal(scan.read(0, 36), logical.reshape(36, 6, 6))
    square = _matlab(tmp_path / "sq.mat", _cube((5, 4, 8, 8)))  # the shape alone says 1 0 3 2
    with open_scan(square, transpose=(0, 1, 2, 3)) as scan:
        assert scan.transpose == (0, 1, 2, 3) and scan.scan_shape == (5, 4)


def test_plain_hdf5_without_matlab_marks_keeps_the_stored_order(tmp_path):
    path = _h5(tmp_path / "plain.h5", {"data": _cube((6, 6, 5, 4))})
    with open_scan(path) as scan:
        assert scan.transpose == (0, 1, 2, 3) and scan.layout_note == ""


def test_npy_pattern_first_with_transpose_and_crop(tmp_path, cube):
    path = tmp_path / "raw.npy"
    np.save(path, np.transpose(cube, (2, 3, 0, 1)))  # stored (Qx, Qy, Rx, Ry)
    with open_scan(path, transpose=(2, 3, 0, 1), crop=((1, 5), (2, 6))) as scan:
        assert scan.scan_shape == (4, 5) and scan.pattern_shape == (4, 4)
        np.testing.assert_array_equal(scan.read(6, 13), cube[:, :, 1:5, 2:6].reshape(20, 4, 4)[6:13])


def test_binning_sums_pixel_blocks(ours, cube):
    with open_scan(ours, binning=2) as scan:
        assert scan.pattern_shape == (3, 4)
        want = cube.reshape(4, 5, 3, 2, 4, 2).sum(axis=(3, 5)).reshape(20, 3, 4)
        np.testing.assert_allclose(scan.read(0, 20), want, rtol=1e-6)


def _empad(tmp_path, frames, rows, cols, xml=True, name="scan"):
    raw = tmp_path / f"{name}.raw"
    frames.astype("<f4").tofile(raw)
    if xml:
        (tmp_path / f"{name}.xml").write_text(
            f'<root><raw_file filename="{name}.raw"/><scan_parameters mode="acquire">'
            f"<scan_resolution_x>{cols}</scan_resolution_x><scan_resolution_y>{rows}</scan_resolution_y>"
            "</scan_parameters></root>"
        )
    return raw


def test_empad_raw_drops_footer_rows_and_reads_xml_scan_shape(tmp_path):
    frames = _cube((3, 2, 130, 128), seed=4)
    raw = _empad(tmp_path, frames, 3, 2)
    for path in (raw, tmp_path / "scan.xml"):
        with open_scan(path) as scan:
            assert scan.scan_shape == (3, 2) and scan.pattern_shape == (128, 128)
            np.testing.assert_array_equal(scan.read(0, 6), frames[:, :, :128].reshape(6, 128, 128))


def test_empad_raw_without_xml_needs_scan_shape(tmp_path):
    raw = _empad(tmp_path, _cube((2, 2, 130, 128)), 2, 2, xml=False)
    with pytest.raises(DataError, match="pass scan_shape"):
        open_scan(raw)
    with open_scan(raw, scan_shape=(1, 4)) as scan:
        assert scan.scan_shape == (1, 4)


def test_never_writes_inputs(tmp_path, ours):
    before = ours.read_bytes()
    os.chmod(ours, 0o444)
    try:
        with open_scan(ours) as scan:
            scan.read(0, scan.n_positions)
            list(scan.batches(7, shuffle=True))
    finally:
        os.chmod(ours, 0o644)
    assert ours.read_bytes() == before


# ----- streaming ------------------------------------------------------------------------------
def test_batches_cover_scan_in_order_and_pad_last(ours, cube):
    with open_scan(ours) as scan:
        batches = list(scan.batches(6))
    assert len(batches) == 4
    assert all(b.images.shape == (6, 6, 8) for b in batches)
    last = batches[-1]
    np.testing.assert_array_equal(last.weights, [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(last.index, [18, 19, -1, -1, -1, -1])
    assert not last.images[2:].any()
    idx = np.concatenate([b.index for b in batches])
    np.testing.assert_array_equal(idx[:20], np.arange(20))
    images = np.concatenate([b.images for b in batches])[:20]
    np.testing.assert_array_equal(images, cube.reshape(20, 6, 8))


def test_unpadded_last_batch_is_short(ours):
    with open_scan(ours) as scan:
        sizes = [len(b.index) for b in scan.batches(6, pad=False)]
    assert sizes == [6, 6, 6, 2]


def test_shuffle_is_seeded_permutation_changing_with_epoch(ours, cube):
    flat = cube.reshape(20, 6, 8)
    with open_scan(ours) as scan:
        def order(seed, epoch):
            out = []
            for b in scan.batches(4, shuffle=True, seed=seed, epoch=epoch, buffer_size=8):
                np.testing.assert_array_equal(b.images, flat[b.index])  # images match their index
                out.extend(b.index[b.weights > 0])
            return out

        first = order(1, 0)
        assert sorted(first) == list(range(20))
        assert first != list(range(20))
        assert order(1, 0) == first
        assert order(1, 1) != first
        assert order(2, 0) != first


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shares_are_disjoint_cover_scan_and_equal_length(ours, shuffle):
    with open_scan(ours) as scan:
        per_proc = [list(scan.batches(3, shuffle=shuffle, seed=5, process_index=p, process_count=3))
                    for p in range(3)]
        assert {len(b) for b in per_proc} == {scan.num_batches(3, process_count=3)}
    seen = [set(int(i) for b in batches for i in b.index if i >= 0) for batches in per_proc]
    assert sum(len(s) for s in seen) == 20 and set().union(*seen) == set(range(20))


def test_batches_stream_with_bounded_memory(tmp_path):
    # 16 MiB file, batches of 32 patterns with a 256-position (1 MiB) shuffle buffer: peak far below the file.
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", shape=(64, 64, 32, 32), dtype=np.float32, chunks=(1, 64, 32, 32))
        for r in range(64):
            d[r] = r
    with open_scan(path) as scan:
        tracemalloc.start()
        n = 0
        for b in scan.batches(32, shuffle=True, buffer_size=256):
            n += int(b.weights.sum())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert n == 4096
    assert peak < 2.5 * 2**20, peak


def test_reads_are_row_blocks_never_the_whole_array(ours, monkeypatch):
    calls = []
    original = readers.Scan._read_rows

    def spy(self, r0, r1):
        calls.append(r1 - r0)
        return original(self, r0, r1)

    monkeypatch.setattr(readers.Scan, "_read_rows", spy)
    with open_scan(ours) as scan:
        list(scan.batches(3, buffer_size=5))
    assert calls and max(calls) == 1


def test_mean_pattern_all_positions_and_bounded_subset(ours, cube):
    with open_scan(ours) as scan:
        np.testing.assert_allclose(scan.mean_pattern(), cube.mean(axis=(0, 1)), rtol=1e-5)
        np.testing.assert_allclose(scan.mean_pattern(max_positions=10), cube[[0, 3]].mean(axis=(0, 1)), rtol=1e-5)


# ----- labels and reference region ------------------------------------------------------------
def test_load_labels_from_our_file(ours):
    labels = readers.load_labels(ours, shape=(4, 5))
    assert set(labels) >= set(readers.LABEL_NAMES) | {"grain_index"}
    assert labels["strain_xx"].shape == (4, 5)


def test_load_labels_from_paper_npy_folder(tmp_path):
    for i, name in enumerate(readers.LABEL_NAMES):
        np.save(tmp_path / f"Label_{name}.npy", np.full((3, 3), float(i)))
    labels = readers.load_labels(tmp_path)
    assert labels["shear_xy"][0, 0] == 2.0
    assert readers.load_labels(tmp_path / "Label_rotation.npy")["rotation"][0, 0] == 3.0
    with pytest.raises(DataError, match=r"label 'strain_xx' has shape \(3, 3\), expected the scan shape \(4, 4\)"):
        readers.load_labels(tmp_path, shape=(4, 4))


def test_load_labels_incomplete_folder_names_missing_files(tmp_path):
    np.save(tmp_path / "Label_strain_xx.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match="label files incomplete, missing .*Label_strain_yy.npy"):
        readers.load_labels(tmp_path)


def test_load_labels_returns_none_without_labels(tmp_path, cube):
    assert readers.load_labels(_h5(tmp_path / "x.h5", {"data": cube})) is None
    assert readers.load_labels(tmp_path) is None


def test_metadata_exposes_root_attributes(ours, tmp_path, cube):
    with open_scan(ours) as scan:
        assert tuple(scan.metadata["reference_region"]) == (0, 2, 1, 3)
    np.save(tmp_path / "x.npy", cube)
    with open_scan(tmp_path / "x.npy") as scan:
        assert scan.metadata == {}


def test_reference_region_from_file(ours, tmp_path, cube):
    assert readers.reference_region_from_file(ours) == (0, 2, 1, 3)
    np.save(tmp_path / "x.npy", cube)
    assert readers.reference_region_from_file(tmp_path / "x.npy") is None


# ----- errors ---------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.h5: file not found"):
        open_scan(tmp_path / "nope.h5")


def test_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        open_scan(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.h5").write_bytes(b"")
    with pytest.raises(DataError, match=r"e.h5: file is empty \(0 bytes\)"):
        open_scan(tmp_path / "e.h5")


def test_not_hdf5(tmp_path):
    (tmp_path / "g.h5").write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(DataError, match="g.h5: not an HDF5 file"):
        open_scan(tmp_path / "g.h5")


def test_matlab_v5_hint(tmp_path):
    (tmp_path / "old.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(DataError, match="re-save with -v7.3"):
        open_scan(tmp_path / "old.mat")


def test_truncated_hdf5(tmp_path, cube):
    path = _h5(tmp_path / "t.h5", {"data": cube})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="t.h5: .*truncated"):
        with open_scan(path) as scan:
            scan.read(0, scan.n_positions)


def test_truncated_npy(tmp_path, cube):
    np.save(tmp_path / "t.npy", cube)
    blob = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(blob[:-100])
    with pytest.raises(DataError, match="t.npy: not a readable .npy file"):
        open_scan(tmp_path / "t.npy")


def test_missing_key_lists_4d_datasets(tmp_path, cube):
    path = _h5(tmp_path / "k.h5", {"grp/cube": cube, "other": np.ones(3)})
    with pytest.raises(DataError, match=r"no dataset at key 'nope'; 4-D datasets present: grp/cube \(4, 5, 6, 8\)"):
        open_scan(path, key="nope")


def test_no_4d_dataset(tmp_path):
    path = _h5(tmp_path / "n.h5", {"img": np.ones((3, 3))})
    with pytest.raises(DataError, match=r"no 4-D dataset found \(datasets: img \(3, 3\)\)"):
        open_scan(path)


def test_several_4d_datasets_need_key(tmp_path, cube):
    path = _h5(tmp_path / "s.h5", {"a": cube, "b": cube})
    with pytest.raises(DataError, match="several 4-D datasets.*pass key="):
        open_scan(path)


@pytest.mark.parametrize("shape", [(6, 8), (3, 6, 8), (2, 2, 1, 6, 8)])
def test_wrong_rank(tmp_path, shape):
    path = _h5(tmp_path / "r.h5", {"data": np.ones(shape, np.float32)})
    with pytest.raises(DataError, match=rf"key '/data': data have {len(shape)} dimensions .* expected 4"):
        open_scan(path, key="data")


@pytest.mark.parametrize("dtype,word", [(bool, "bool"), (np.complex64, "complex"), ("S4", "non-numeric")])
def test_bad_dtype(tmp_path, dtype, word):
    np.save(tmp_path / "d.npy", np.zeros((2, 2, 3, 3), dtype=dtype))
    with pytest.raises(DataError, match=f"d.npy: dtype .* is {word}; expected real"):
        open_scan(tmp_path / "d.npy")


def test_non_finite_values_reported_while_streaming(tmp_path, cube):
    cube = cube.copy()
    cube[2, 3, 1, 4] = np.nan
    cube[3, 0, 0, 0] = np.inf
    path = _h5(tmp_path / "nan.h5", {"data": cube})
    with open_scan(path) as scan:
        np.testing.assert_array_equal(scan.read(0, 10), cube.reshape(20, 6, 8)[:10])  # clean part reads
        # Checked per read block (one scan row here): the count is for the block where it stops.
        msg = (r"nan.h5: key '/data': 1 non-finite value\(s\) .* positions 10:15; "
               r"first at scan position \(2, 3\) pixel \(1, 4\)")
        with pytest.raises(DataError, match=msg):
            list(scan.batches(20))
    with open_scan(path, check_finite=False) as scan:
        assert np.isnan(scan.read(13, 14)[0, 1, 4])


def test_empty_scan(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((0, 4, 3, 3), np.float32))
    with pytest.raises(DataError, match="empty scan"):
        open_scan(tmp_path / "z.npy")


def test_crop_outside_pattern(ours):
    with pytest.raises(DataError, match=r"crop=.* outside the pattern of shape \(6, 8\)"):
        open_scan(ours, crop=((0, 7), (0, 8)))


def test_binning_must_divide_cropped_pattern(ours):
    with pytest.raises(DataError, match=r"binning=4 does not divide the cropped pattern \(6, 8\)"):
        open_scan(ours, binning=4)


@pytest.mark.parametrize("transpose", [(0, 1, 2), (0, 1, 2, 2), (0, 1, 2, 4)])
def test_transpose_must_permute_four_axes(ours, transpose):
    with pytest.raises(DataError, match="must be a permutation of"):
        open_scan(ours, transpose=transpose)


def test_empad_size_mismatch(tmp_path):
    raw = tmp_path / "bad.raw"
    raw.write_bytes(bytes(130 * 128 * 4 + 8))
    with pytest.raises(DataError, match="not a whole number of 130x128 float32 frames"):
        open_scan(raw, scan_shape=(1, 1))
