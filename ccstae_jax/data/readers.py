"""Streaming 4D-STEM readers with bounded memory: HDF5/EMD/.hspy, MATLAB v7.3, .npy, EMPAD .raw, ARINA/EIGER
frame stacks, and (with the ``io`` extra) Merlin .mib, DigitalMicrograph .dm3/.dm4, ASTAR .blo and TVIPS.

`open_scan` returns a `Scan`, a read-only view of a 4-D dataset as ``(Rx, Ry, Qx, Qy)`` (scan row,
scan column, detector row, detector column) after an optional axis ``transpose``, pattern ``crop``
and sum-``binning``. Patterns are addressed by flat row-major scan position ``p = rx * Ry + ry``.
Nothing reads the whole array: `Scan.read` reads the scan rows covering a position range,
`Scan.batches` streams fixed-size (padded) batches, optionally shuffled with a bounded buffer and
split between processes, and `Scan.mean_pattern` averages a bounded subset.

Formats (files are only ever opened read-only):

* HDF5 / EMD (``.h5``, ``.hdf5``, ``.emd``, ...): ``key`` if given; else our simulator's ``/data``;
  else py4DSTEM / EMD 1.0 ``4DSTEM/datacube/data``; else the old py4DSTEM
  ``4DSTEM_experiment/data/datacubes/*/data``; else Prismatic
  ``4DSTEM_simulation/data/datacubes/CBED_array_depth*/datacube``; else the only 4-D dataset.
* MATLAB v7.3 ``.mat`` (HDF5, MATLAB writes axes reversed): found as above (e.g. ``output4D``). For a
  dataset carrying MATLAB's ``MATLAB_class`` attribute the default ``transpose`` is worked out from
  the stored shape (`matlab_transpose`): patterns are square, so the pair of equal axes is the
  detector. An array saved as ``A(Rx, Ry, Qx, Qy)`` is stored ``(Qy, Qx, Ry, Rx)`` and read with
  ``(3, 2, 1, 0)``; one saved detector-first, ``A(Qx, Qy, Rx, Ry)`` (the paper's ``output4D``), is
  stored ``(Ry, Rx, Qy, Qx)`` and read with ``(1, 0, 3, 2)``. When both or neither pair is
  square the reader refuses to guess (`DataError` listing the ``transpose`` of each reading).
* NumPy ``.npy``: memory-mapped (``mmap_mode="r"``), any layout via ``transpose``.
* EMPAD ``.raw`` (+ ``.xml``): frames of 130 x 128 little-endian float32 whose last 2 rows are a
  footer (dropped -> 128 x 128); the scan shape comes from the ``.xml`` (``scan_resolution_y``
  rows, ``scan_resolution_x`` columns) or from ``scan_shape=``.
* ARINA / EIGER master files, Merlin, DigitalMicrograph, ASTAR and TVIPS files, NCEM EMD's axis
  order and compressed HDF5 chunks: see `ccstae_jax.data.formats` (which reader handles what).

Bad input raises `DataError` (a `ValueError`) with one line naming the file, the key and what was
expected.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import h5py
import numpy as np

from ccstae_jax import conventions

__all__ = [
    "DataError",
    "Batch",
    "Scan",
    "open_scan",
    "load_labels",
    "reference_region_from_file",
    "LABEL_NAMES",
    "matlab_transpose",
]

_log = logging.getLogger(__name__)

LABEL_NAMES = conventions.QUANTITIES
_PAPER_LABEL_FILES = {name: f"Label_{name}.npy" for name in LABEL_NAMES}
_PAPER_GRAIN_FILE = "simulated_4dstem_grain_index.npy"
_H5_CACHE_BYTES = 64 * 2**20
_BUFFER_BYTES = 256 * 2**20
_EMPAD_FRAME = (130, 128)
_EMPAD_PATTERN = (128, 128)
_KNOWN_HDF5_PATHS = (
    "data",
    "4DSTEM/datacube/data",
    "4DSTEM_experiment/data/datacubes/*/data",
    "4DSTEM_simulation/data/datacubes/CBED_array_depth*/datacube",
)


class DataError(ValueError):
    """Unreadable or unsuitable input data (message: file, key, what was expected)."""


class Batch(NamedTuple):
    """A fixed-size batch of patterns.

    Attributes:
      images: ``(B, H, W)`` float32 patterns (zeros for padding).
      weights: ``(B,)`` float32, 1 for real patterns, 0 for padding.
      index: ``(B,)`` int64 flat row-major scan positions, -1 for padding.
    """

    images: np.ndarray
    weights: np.ndarray
    index: np.ndarray


# ---------------------------------------------------------------------------------------------
# Opening files
# ---------------------------------------------------------------------------------------------
def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a 4D-STEM data file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")


def _sniff_format(path: Path, format: str | None = None) -> str:
    from ccstae_jax.data.formats import format_from_name

    named = format_from_name(path, format)
    if named is not None:
        return named
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if h5py.is_hdf5(str(path)):
        return "hdf5"
    raise DataError(
        f"{path}: unknown file format (suffix {suffix!r}); expected HDF5/EMD/.hspy/.mat v7.3, .npy, EMPAD .raw, "
        ".mib, .dm3/.dm4, .blo or .tvips (or pass format=)"
    )


def _list_datasets(f: h5py.File) -> list[tuple[str, tuple[int, ...]]]:
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found.append((name, tuple(obj.shape)))

    f.visititems(visit)
    return found


def _describe_4d(f: h5py.File) -> str:
    four = [f"{n} {s}" for n, s in _list_datasets(f) if len(s) == 4]
    return ("4-D datasets present: " + ", ".join(four)) if four else "the file has no 4-D dataset"


def _glob_hdf5(f: h5py.File, pattern: str) -> list[str]:
    import fnmatch

    parts = pattern.split("/")
    current = [""]
    for part in parts:
        nxt = []
        for base in current:
            group = f[base] if base else f
            if not isinstance(group, h5py.Group):
                continue
            for name in sorted(group.keys()):
                if fnmatch.fnmatchcase(name, part):
                    nxt.append(f"{base}/{name}" if base else name)
        current = nxt
    return [c for c in current if isinstance(f.get(c), h5py.Dataset)]


def _find_hdf5_dataset(f: h5py.File, path: Path, key: str | None) -> str:
    if key is not None:
        obj = f.get(key)
        if obj is None:
            raise DataError(f"{path}: no dataset at key {key!r}; {_describe_4d(f)}")
        if not isinstance(obj, h5py.Dataset):
            raise DataError(f"{path}: key {key!r} is a group, not a dataset; {_describe_4d(f)}")
        return obj.name
    for pattern in _KNOWN_HDF5_PATHS:
        hits = [h for h in _glob_hdf5(f, pattern) if f[h].ndim == 4]
        if len(hits) == 1:
            return f[hits[0]].name
        if len(hits) > 1:
            raise DataError(
                f"{path}: several 4-D datasets match {pattern!r} ({', '.join(hits)}); pass key= to choose one"
            )
    four = [n for n, s in _list_datasets(f) if len(s) == 4]
    if len(four) == 1:
        return "/" + four[0]
    if not four:
        listing = ", ".join(f"{n} {s}" for n, s in _list_datasets(f)[:12]) or "none"
        raise DataError(f"{path}: no 4-D dataset found (datasets: {listing}); expected (Rx, Ry, Qx, Qy) data")
    raise DataError(f"{path}: several 4-D datasets ({', '.join(four)}); pass key= to choose one")


def _parse_empad_xml(xml_path: Path) -> tuple[Path | None, tuple[int, int] | None, tuple[int, int] | None]:
    """Returns (raw file named in the xml, acquire scan shape, search scan shape), shapes (rows, cols)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{xml_path}: cannot parse EMPAD .xml ({err})") from None
    raw = root.find("raw_file")
    raw_path = xml_path.parent / Path(raw.attrib["filename"]).name if raw is not None and "filename" in raw.attrib \
        else None
    shapes = {}
    for elem in root.findall("scan_parameters"):
        x, y = elem.find("scan_resolution_x"), elem.find("scan_resolution_y")
        if x is not None and y is not None:
            shapes[elem.attrib.get("mode", "acquire")] = (int(y.text), int(x.text))
    return raw_path, shapes.get("acquire"), shapes.get("search")


_MATLAB_READINGS = (  # (transpose, how MATLAB held the array, which stored axes are the detector)
    ((3, 2, 1, 0), "A(Rx, Ry, Qx, Qy)", (0, 1)),
    ((1, 0, 3, 2), "A(Qx, Qy, Rx, Ry)", (2, 3)),  # detector first: the paper's output4D
)


def _reading(shape, transpose) -> str:
    rx, ry, qx, qy = (shape[a] for a in transpose)
    return f"scan {rx}x{ry}, patterns {qx}x{qy}"


def matlab_transpose(stored_shape: Sequence[int], *, where: str = "MATLAB dataset") -> tuple[tuple[int, ...], str]:
    """The axis order of a MATLAB v7.3 4-D array, worked out from the shape h5py shows (MATLAB's reversed).

    MATLAB ``A(d1, d2, d3, d4)`` is stored as ``(d4, d3, d2, d1)``. The detector axes are taken to be the one pair
    of equal stored extents (square patterns): stored axes 0, 1 -> ``A(Rx, Ry, Qx, Qy)``, ``transpose=(3, 2, 1,
    0)``; stored axes 2, 3 -> ``A(Qx, Qy, Rx, Ry)``, ``transpose=(1, 0, 3, 2)``.

    Args:
      stored_shape: the 4 extents as stored (h5py's order).
      where: the file and key, for messages.

    Returns:
      ``(transpose, note)``: the axis order giving ``(Rx, Ry, Qx, Qy)`` and one line saying what was assumed.

    Raises:
      DataError: both pairs or neither pair of axes are equal (e.g. ``(256, 256, 256, 256)``, or non-square
        patterns): the message shows the stored shape and the ``transpose`` of each reading.
    """
    shape = tuple(int(s) for s in stored_shape)
    square = [shape[a] == shape[b] for _, _, (a, b) in _MATLAB_READINGS]
    if sum(square) == 1:
        transpose, saved, (a, b) = _MATLAB_READINGS[square.index(True)]
        note = (f"{where}: MATLAB array stored as {shape} (axes reversed) read as {saved}: square "
                f"{shape[a]}x{shape[b]} patterns on stored axes {a}, {b} -> transpose {' '.join(map(str, transpose))}"
                f" ({_reading(shape, transpose)}; --transpose overrides)")
        return transpose, note
    why = "both pairs of axes are equal" if all(square) else "neither pair of axes is equal (non-square patterns?)"
    options = "; ".join(f"--transpose {' '.join(map(str, t))} if MATLAB held it as {saved} ({_reading(shape, t)})"
                        for t, saved, _ in _MATLAB_READINGS) + " (the paper's output4D: 1 0 3 2)"
    raise DataError(f"{where}: MATLAB array stored as {shape} (MATLAB's axis order reversed): cannot tell the "
                    f"detector axes from the scan axes, {why}; give the axis order: {options}")


class _Source:
    """The stored 4-D array (h5py dataset, numpy memmap, `FrameStack` or `LazyArray`) and how to close it.

    ``default_transpose`` is used when the caller gives none; ``matlab`` marks a MATLAB v7.3 dataset, whose default
    is worked out from its shape (`matlab_transpose`). ``calibration``: ``q_pixel`` (1/Angstrom per stored detector
    pixel) and ``scan_step`` (Angstrom) when known.
    """

    def __init__(self, array, handle=None, key="", default_transpose=(0, 1, 2, 3), matlab=False, calibration=None,
                 format=""):
        self.array = array
        self.handle = handle
        self.key = key
        self.default_transpose = default_transpose
        self.matlab = matlab
        self.calibration = dict(calibration or {})
        self.format = format
        chunks = getattr(array, "chunks", None)
        self.chunks = tuple(chunks) if chunks else None

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _hdf5_calibration(f: h5py.File, dset: h5py.Dataset) -> dict:
    """Calibration of an HDF5 dataset: its .hspy axis groups (``q_pixel``, ``scan_step``), and the root attribute
    ``q_pixel`` (our simulator, 1/Angstrom), which takes precedence."""
    from ccstae_jax.data.formats import calibration_from_axes, hspy_axes

    axes = hspy_axes(dset) if dset.ndim == 4 else None
    out = calibration_from_axes(axes) if axes else {}
    q = f.attrs.get("q_pixel")
    if q is not None and np.ndim(q) == 0 and np.isfinite(q) and q > 0:
        out["q_pixel"] = float(q)
    return out


def _is_ncem_emd(dset: h5py.Dataset) -> bool:
    """NCEM (Berkeley) EMD < 1.0: ``dim1``.. vectors beside the data, no ``dim0``, group tagged ``emd_group_type``."""
    parent = dset.parent
    return ("emd_group_type" in parent.attrs and "dim1" in parent and "dim0" not in parent
            and dset.name.rsplit("/", 1)[-1] != "datacube")


def _open_hdf5(path: Path, key: str | None, scan_shape, fmt: str) -> _Source:
    from ccstae_jax.data import formats

    if not h5py.is_hdf5(str(path)):
        hint = " (MATLAB v5/v7 .mat files are not HDF5: re-save with -v7.3)" if path.suffix.lower() == ".mat" \
            else ""
        raise DataError(f"{path}: not an HDF5 file{hint}")
    try:
        f = h5py.File(path, "r", rdcc_nbytes=_H5_CACHE_BYTES, rdcc_nslots=10007)
    except OSError as err:
        raise DataError(f"{path}: cannot open as HDF5, the file may be truncated or corrupt ({err})") from None
    try:
        stack = formats.frame_stack_datasets(f, path) if key is None else None
        if fmt == "arina" and stack is None:
            raise DataError(f"{path}: no ARINA/EIGER frame datasets (3-D /entry/data/data_NNNNNN) found")
        if stack is not None and (fmt == "arina" or not any(len(s) == 4 for _, s in _list_datasets(f))):
            formats.check_hdf5_filters(stack, path, "/entry/data")
            n_frames = sum(int(d.shape[0]) for d in stack)
            shape = formats.frame_stack_scan_shape(n_frames, scan_shape, path)
            return _Source(formats.FrameStack(stack, shape), f, "/entry/data", format="arina")
        name = _find_hdf5_dataset(f, path, key)
        dset = f[name]
        formats.check_hdf5_filters([dset], path, name)
        transpose = (3, 2, 1, 0) if dset.ndim == 4 and _is_ncem_emd(dset) else (0, 1, 2, 3)
        return _Source(dset, f, name, transpose, matlab="MATLAB_class" in dset.attrs,
                       calibration=_hdf5_calibration(f, dset), format="hdf5")
    except BaseException:
        f.close()
        raise


def _open_source(path: Path, key: str | None, scan_shape, format: str | None = None) -> _Source:
    fmt = _sniff_format(path, format)
    if fmt in ("hdf5", "arina"):
        return _open_hdf5(path, key, scan_shape, fmt)
    if fmt in ("mib", "dm", "blo", "tvips"):
        from ccstae_jax.data.formats import open_rsciio

        array, calibration = open_rsciio(path, fmt, scan_shape)
        return _Source(array, None, "", calibration=calibration, format=fmt)
    if fmt == "npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise DataError(f"{path}: not a readable .npy file, it may be truncated ({err})") from None
        except OSError as err:
            raise DataError(f"{path}: cannot read .npy ({err})") from None
        if not isinstance(arr, np.ndarray):
            raise DataError(f"{path}: expected a single .npy array")
        return _Source(arr, None, key or "", format="npy")
    # EMPAD
    raw_path, xml_path = path, None
    if path.suffix.lower() == ".xml":
        xml_path = path
    elif path.with_suffix(".xml").exists():
        xml_path = path.with_suffix(".xml")
    acquire = search = None
    if xml_path is not None:
        named_raw, acquire, search = _parse_empad_xml(xml_path)
        if path.suffix.lower() == ".xml":
            if named_raw is None:
                raise DataError(f"{xml_path}: EMPAD .xml names no raw_file; open the .raw with scan_shape=")
            raw_path = named_raw
            _check_file(raw_path)
    frame_bytes = _EMPAD_FRAME[0] * _EMPAD_FRAME[1] * 4
    size = raw_path.stat().st_size
    if size % frame_bytes:
        raise DataError(
            f"{raw_path}: EMPAD .raw size {size} bytes is not a whole number of 130x128 float32 frames "
            f"({frame_bytes} bytes each); the file may be truncated"
        )
    n_frames = size // frame_bytes
    if scan_shape is None:
        for cand in (acquire, search):
            if cand is not None and cand[0] * cand[1] == n_frames:
                scan_shape = cand
                break
        else:
            if acquire is not None:
                raise DataError(
                    f"{raw_path}: {n_frames} frames do not match the scan {acquire} of {xml_path}; pass scan_shape="
                )
            raise DataError(
                f"{raw_path}: EMPAD .raw with {n_frames} frames and no .xml; pass scan_shape=(rows, cols)"
            )
    scan_shape = tuple(int(s) for s in scan_shape)
    if len(scan_shape) != 2 or scan_shape[0] * scan_shape[1] != n_frames:
        raise DataError(f"{raw_path}: scan_shape={scan_shape} does not match the {n_frames} frames in the file")
    mm = np.memmap(raw_path, dtype="<f4", mode="r", shape=(*scan_shape, *_EMPAD_FRAME))
    return _Source(mm[:, :, : _EMPAD_PATTERN[0], :], None, "", format="empad")


# ---------------------------------------------------------------------------------------------
# Scan
# ---------------------------------------------------------------------------------------------
class Scan:
    """A read-only, streamed view of a 4D-STEM scan as ``(Rx, Ry, H, W)`` float32 patterns.

    Create with `open_scan`. Attributes: ``path``, ``key`` (dataset path inside the file, "" for
    .npy/.raw and files read by RosettaSciIO), ``format`` (see `ccstae_jax.data.formats`), ``scan_shape``
    ``(Rx, Ry)``, ``pattern_shape`` ``(H, W)`` (after crop and binning), ``n_positions`` ``Rx * Ry``,
    ``stored_shape``, ``stored_dtype``, ``transpose``, ``crop``, ``binning``, ``calibration``, ``layout_note`` (one
    line on an axis order worked out from the shape, "" when none was).
    Flat positions are row-major: ``p = rx * Ry + ry``.
    """

    layout_note: str = ""

    def __init__(self, path: Path, source: _Source, *, transpose, crop, binning, check_finite):
        self.path = path
        self._source = source
        self.key = source.key
        self.format = source.format
        arr = source.array
        self.stored_shape = tuple(int(s) for s in arr.shape)
        self.stored_dtype = np.dtype(arr.dtype)
        self.transpose = transpose
        logical = tuple(self.stored_shape[a] for a in transpose)
        self.scan_shape = (logical[0], logical[1])
        self.crop = crop
        self.binning = binning
        self.check_finite = bool(check_finite) and self.stored_dtype.kind == "f"
        (q0, q1), (q2, q3) = crop
        self.pattern_shape = ((q1 - q0) // binning, (q3 - q2) // binning)
        self.n_positions = self.scan_shape[0] * self.scan_shape[1]
        self._bytes_per_position = 4 * (q1 - q0) * (q3 - q2)
        self._block_rows = self._chunk_rows()

    # -- basics --
    def __repr__(self) -> str:
        return (f"Scan({str(self.path)!r}, key={self.key!r}, scan_shape={self.scan_shape}, "
                f"pattern_shape={self.pattern_shape}, stored={self.stored_shape} {self.stored_dtype})")

    def __len__(self) -> int:
        return self.n_positions

    def close(self) -> None:
        """Closes the underlying file (idempotent)."""
        self._source.close()

    def __enter__(self) -> "Scan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _chunk_rows(self) -> int:
        """Scan rows per natural read block: the HDF5 chunk extent along the scan-row axis, else 1."""
        chunks = self._source.chunks
        if chunks is None:
            return 1
        return max(1, min(self.scan_shape[0], chunks[self.transpose[0]]))

    # -- reading --
    def _read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Logical rows ``r0:r1`` as ``(r1 - r0, Ry, H, W)`` float32 (transposed, cropped, binned)."""
        (q0, q1), (q2, q3) = self.crop
        logical_slices = (slice(r0, r1), slice(None), slice(q0, q1), slice(q2, q3))
        stored_index = [slice(None)] * 4
        for logical_axis, stored_axis in enumerate(self.transpose):
            stored_index[stored_axis] = logical_slices[logical_axis]
        try:
            block = self._source.array[tuple(stored_index)]
        except (OSError, ValueError) as err:
            raise DataError(
                f"{self.path}: key {self.key!r}: cannot read scan rows {r0}:{r1}; the file may be truncated ({err})"
            ) from None
        block = np.transpose(np.asarray(block), self.transpose).astype(np.float32, copy=False)
        b = self.binning
        if b > 1:
            n, m, h, w = block.shape
            block = block.reshape(n, m, h // b, b, w // b, b).sum(axis=(3, 5), dtype=np.float32)
        return block

    def read(self, start: int, stop: int) -> np.ndarray:
        """Reads patterns at flat positions ``start:stop``.

        Args:
          start, stop: flat row-major positions, ``0 <= start <= stop <= n_positions``.

        Returns:
          ``(stop - start, H, W)`` float32 (a fresh array).

        Raises:
          DataError: non-finite values (when ``check_finite``) or an unreadable file.
          IndexError: range outside the scan.
        """
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n_positions:
            raise IndexError(f"positions {start}:{stop} outside the scan of {self.n_positions} positions")
        h, w = self.pattern_shape
        if start == stop:
            return np.zeros((0, h, w), np.float32)
        ry = self.scan_shape[1]
        r0, r1 = start // ry, -(-stop // ry)
        rows = self._read_rows(r0, r1).reshape(-1, h, w)
        out = rows[start - r0 * ry: stop - r0 * ry]
        if self.check_finite:
            self._assert_finite(out, start)
        return np.ascontiguousarray(out)

    def _assert_finite(self, block: np.ndarray, start: int) -> None:
        bad = ~np.isfinite(block)
        if bad.any():
            count = int(bad.sum())
            first = np.argwhere(bad)[0]
            pos = start + int(first[0])
            rx, ry = divmod(pos, self.scan_shape[1])
            raise DataError(
                f"{self.path}: key {self.key!r}: {count} non-finite value(s) (NaN/Inf) among positions "
                f"{start}:{start + len(block)}; first at scan position ({rx}, {ry}) pixel "
                f"({int(first[1])}, {int(first[2])}) (after transpose/crop/binning); pass check_finite=False to skip"
            )

    # -- streaming --
    def _process_positions(self, order_runs: list[tuple[int, int]], process_index: int, process_count: int):
        """Cuts the global order (a list of contiguous runs) into this process's share."""
        n = self.n_positions
        lo = process_index * n // process_count
        hi = (process_index + 1) * n // process_count
        out, offset = [], 0
        for a, b in order_runs:
            length = b - a
            s, e = max(lo, offset), min(hi, offset + length)
            if s < e:
                out.append((a + s - offset, a + e - offset))
            offset += length
        return out

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        pad: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        buffer_size: int | None = None,
    ) -> Iterator[Batch]:
        """Streams the scan in fixed-size batches.

        Without ``shuffle`` positions come in order ``0, 1, ...``. With ``shuffle`` the order is a
        seeded permutation (a function of ``seed`` and ``epoch`` only): blocks of whole scan rows
        (HDF5-chunk aligned) are visited in random order and positions are permuted within a bounded
        buffer of ``buffer_size`` positions, so memory stays bounded whatever the scan size.

        Multi-process: the global order is cut into ``process_count`` contiguous shares, differing
        by at most one position; process ``process_index`` reads only its share. Every process yields
        the same number of batches, ``ceil(ceil(n_positions / process_count) / batch_size)``, when
        ``pad`` is True (padding has weight 0 and index -1; shares are disjoint and cover the scan).

        Args:
          batch_size: patterns per batch.
          shuffle: permute positions (seeded).
          seed, epoch: the permutation is determined by ``(seed, epoch)``.
          pad: pad the last batch to ``batch_size`` (weights 0); if False it is shorter.
          process_index, process_count: this process's share of the positions.
          buffer_size: positions held in memory for shuffling (default: about 256 MiB of patterns,
            at least ``batch_size`` and 4 blocks).

        Yields:
          `Batch` of ``images (B, H, W)`` float32, ``weights (B,)`` float32, ``index (B,)`` int64.
        """
        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not (process_count >= 1 and 0 <= process_index < process_count):
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
        ry = self.scan_shape[1]
        block = self._block_rows * ry
        n = self.n_positions
        runs = [(a, min(n, a + block)) for a in range(0, n, block)]
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0xBA7C4]))
        if shuffle:
            runs = [runs[i] for i in rng.permutation(len(runs))]
        runs = self._process_positions(runs, process_index, process_count)
        per_process = -(-n // process_count)
        n_batches = -(-per_process // batch_size)
        if buffer_size is None:
            buffer_size = max(batch_size, 4 * block, _BUFFER_BYTES // max(1, self._bytes_per_position))
        buffer_size = max(int(buffer_size), batch_size)
        h, w = self.pattern_shape

        # Group the share's runs into buffers of at most buffer_size positions (ints only).
        groups, group, held = [], [], 0
        for a, b in runs:
            while a < b:
                e = min(b, a + buffer_size - held)
                group.append((a, e))
                held += e - a
                a = e
                if held == buffer_size:
                    groups.append(group)
                    group, held = [], 0
        if group:
            groups.append(group)

        emitted = 0
        carry_img = np.zeros((0, h, w), np.float32)
        carry_idx = np.zeros((0,), np.int64)
        for group in groups:
            c = len(carry_idx)
            m = c + sum(e - a for a, e in group)
            img = np.empty((m, h, w), np.float32)  # the only buffer-sized allocation
            idx = np.empty((m,), np.int64)
            img[:c], idx[:c] = carry_img, carry_idx
            pos = c
            for a, e in group:
                img[pos: pos + e - a] = self.read(a, e)
                idx[pos: pos + e - a] = np.arange(a, e)
                pos += e - a
            order = np.arange(m)
            if shuffle:
                order[c:] = c + rng.permutation(m - c)
            full = m // batch_size * batch_size
            for s in range(0, full, batch_size):
                sel = order[s: s + batch_size]
                yield Batch(img[sel], np.ones(batch_size, np.float32), idx[sel])
                emitted += 1
            carry_img, carry_idx = img[order[full:]], idx[order[full:]]
            del img, idx
        if len(carry_idx) or (pad and emitted < n_batches):
            m = len(carry_idx)
            size = batch_size if pad else m
            if size:
                images = np.zeros((size, h, w), np.float32)
                images[:m] = carry_img
                weights = np.zeros(size, np.float32)
                weights[:m] = 1.0
                index = np.full(size, -1, np.int64)
                index[:m] = carry_idx
                yield Batch(images, weights, index)
                emitted += 1
        while pad and emitted < n_batches:  # keep every process at the same number of steps
            yield Batch(np.zeros((batch_size, h, w), np.float32), np.zeros(batch_size, np.float32),
                        np.full(batch_size, -1, np.int64))
            emitted += 1

    def num_batches(self, batch_size: int, *, process_count: int = 1) -> int:
        """Batches per process yielded by ``batches(batch_size, pad=True, process_count=...)``."""
        return -(-(-(-self.n_positions // process_count)) // int(batch_size))

    def mean_pattern(self, *, max_positions: int = 4096) -> np.ndarray:
        """Mean pattern over at most ``max_positions`` positions, streamed row by row.

        Uses every position when the scan is small enough; otherwise evenly spaced whole scan rows
        (and evenly spaced columns within them if one row alone exceeds the budget).

        Returns:
          ``(H, W)`` float32.
        """
        rx, ry = self.scan_shape
        max_positions = max(1, int(max_positions))
        n_rows = min(rx, max(1, max_positions // ry))
        rows = np.unique(np.round(np.linspace(0, rx - 1, n_rows)).astype(int))
        cols = np.unique(np.round(np.linspace(0, ry - 1, min(ry, max_positions))).astype(int))
        total = np.zeros(self.pattern_shape, np.float64)
        count = 0
        for r in rows:
            block = self.read(r * ry, (r + 1) * ry)[cols]
            total += block.sum(axis=0, dtype=np.float64)
            count += len(block)
        return (total / count).astype(np.float32)

    @property
    def calibration(self) -> dict[str, float]:
        """What the file says about its geometry: ``q_pixel``, 1/Angstrom per pattern pixel after binning (our
        simulator's ``q_pixel`` attribute, .hspy or RosettaSciIO axes in reciprocal-length units, equal on both
        detector axes), and ``scan_step``, Angstrom between scan positions (equal on both scan axes); a key is
        absent when unknown."""
        out = {}
        cal = self._source.calibration
        if "q_pixel" in cal:
            out["q_pixel"] = float(cal["q_pixel"]) * self.binning
        if "scan_step" in cal:
            out["scan_step"] = float(cal["scan_step"])
        return out

    def reference_region(self) -> tuple[int, int, int, int] | None:
        """The ``reference_region`` stored in the file (our simulator's files), else None."""
        return reference_region_from_file(self.path)

    @property
    def metadata(self) -> dict:
        """Root attributes of an HDF5 file (e.g. our simulator's ``noise_level``, ``noise_applied``,
        ``q_pixel``, ``reference_region``), as Python/numpy values; ``{}`` for other formats."""
        handle = self._source.handle
        if handle is None:
            return {}
        out = {}
        for k, v in handle.attrs.items():
            out[k] = v.decode() if isinstance(v, bytes) else v
        return out


def _normalise_crop(crop, shape, path, key):
    qx, qy = shape
    if crop is None:
        return ((0, qx), (0, qy))
    try:
        (q0, q1), (q2, q3) = ((int(a), int(b)) for a, b in crop)
    except (TypeError, ValueError):
        raise DataError(f"{path}: key {key!r}: crop={crop!r} must be ((q0, q1), (q2, q3))") from None
    if not (0 <= q0 < q1 <= qx and 0 <= q2 < q3 <= qy):
        raise DataError(
            f"{path}: key {key!r}: crop={crop!r} outside the pattern of shape ({qx}, {qy}) after transpose; "
            f"expected 0 <= q0 < q1 <= {qx} and 0 <= q2 < q3 <= {qy}"
        )
    return ((q0, q1), (q2, q3))


def open_scan(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    transpose: Sequence[int] | None = None,
    crop=None,
    binning: int = 1,
    check_finite: bool = True,
    scan_shape: tuple[int, int] | None = None,
    format: str | None = None,
) -> Scan:
    """Opens a 4D-STEM file for streamed, read-only access.

    Args:
      path: an HDF5/EMD/.hspy/.mat v7.3, .npy, EMPAD .raw/.xml or ARINA/EIGER master file; with the ``io`` extra
        also Merlin .mib, DigitalMicrograph .dm3/.dm4, ASTAR .blo and TVIPS files.
      key: dataset path inside an HDF5 file (default: found automatically, see module docstring).
      transpose: 4 axis indices: the stored array's axes, in the order that makes it
        ``(Rx, Ry, Qx, Qy)`` (like ``np.transpose``; e.g. ``(2, 3, 0, 1)`` for pattern-first
        ``(Qx, Qy, Rx, Ry)`` storage). Default: identity, or for MATLAB v7.3 datasets the order
        `matlab_transpose` works out from the stored shape (``Scan.layout_note`` says which).
      crop: ``((q0, q1), (q2, q3))`` pattern rows q0:q1 and columns q2:q3 kept (after transpose).
      binning: integer sum-binning of the cropped pattern; the cropped size must be divisible by it.
      check_finite: raise `DataError` on NaN/Inf, checked batch by batch as data are read.
      scan_shape: ``(rows, cols)`` for files that store frames without a scan shape: an EMPAD .raw without
        .xml, an ARINA/EIGER stack that is not square, a .mib without .hdr, TVIPS (default: square); checked
        against the file where it has a scan shape (.mib, .dm, .blo), ignored for HDF5 4-D datasets and .npy.
      format: one of `ccstae_jax.data.formats.FORMATS` (``"hdf5"``, ``"arina"``, ``"npy"``, ``"empad"``,
        ``"mib"``, ``"dm"``, ``"blo"``, ``"tvips"``) or None / ``"auto"``: from the file's suffix, then its
        content (an ARINA/EIGER frame stack is recognised inside an HDF5 file).

    Returns:
      A `Scan` (use as a context manager or call ``close()``).

    Raises:
      DataError: missing/empty/unreadable file, missing dataset, wrong rank or dtype, empty scan,
        bad transpose, crop or binning; a format that needs the ``io`` extra when it is not installed.
    """
    path = Path(path)
    _check_file(path)
    source = _open_source(path, key, scan_shape, format)
    try:
        arr = source.array
        where = f"{path}: key {source.key!r}" if source.key else f"{path}"
        shape = tuple(arr.shape)
        if len(shape) != 4:
            raise DataError(
                f"{where}: data have {len(shape)} dimensions (shape {shape}), expected 4 (Rx, Ry, Qx, Qy)"
            )
        dtype = np.dtype(arr.dtype)
        if dtype.kind not in "iuf":
            what = {"b": "bool", "c": "complex"}.get(dtype.kind, "non-numeric")
            raise DataError(f"{where}: dtype {dtype} is {what}; expected real integer or float intensities")
        layout_note = ""
        if transpose is None and source.matlab:
            transpose, layout_note = matlab_transpose(shape, where=where)
            _log.info(layout_note)
        elif transpose is None:
            transpose = source.default_transpose
        try:
            transpose = tuple(int(a) for a in transpose)
        except (TypeError, ValueError):
            raise DataError(f"{where}: transpose={transpose!r} must be a permutation of (0, 1, 2, 3)") from None
        if sorted(transpose) != [0, 1, 2, 3]:
            raise DataError(f"{where}: transpose={transpose!r} must be a permutation of (0, 1, 2, 3)")
        logical = tuple(shape[a] for a in transpose)
        if logical[0] * logical[1] == 0:
            raise DataError(f"{where}: empty scan (0 positions; shape {logical} after transpose)")
        if logical[2] * logical[3] == 0:
            raise DataError(f"{where}: empty patterns (shape {logical} after transpose)")
        crop = _normalise_crop(crop, logical[2:], path, source.key)
        if isinstance(binning, bool) or int(binning) != binning or int(binning) < 1:
            raise DataError(f"{where}: binning={binning!r} must be a positive integer")
        binning = int(binning)
        (q0, q1), (q2, q3) = crop
        if (q1 - q0) % binning or (q3 - q2) % binning:
            raise DataError(
                f"{where}: binning={binning} does not divide the cropped pattern ({q1 - q0}, {q3 - q2}); "
                "choose a crop whose sizes are multiples of the binning"
            )
        scan = Scan(path, source, transpose=transpose, crop=crop, binning=binning, check_finite=check_finite)
        scan.layout_note = layout_note
        return scan
    except BaseException:
        source.close()
        raise


# ---------------------------------------------------------------------------------------------
# Labels and reference region
# ---------------------------------------------------------------------------------------------
def _check_label_shapes(labels: dict, shape, where: str) -> dict:
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        for name, arr in labels.items():  # per-position vectors (e.g. zero_beam, (Rx, Ry, 2)) lead with the scan
            if arr.shape[: len(shape)] != shape:
                raise DataError(f"{where}: label {name!r} has shape {arr.shape}, expected the scan shape {shape}")
    return labels


def _load_npy_labels(directory: Path) -> dict[str, np.ndarray] | None:
    files = {name: directory / fname for name, fname in _PAPER_LABEL_FILES.items()}
    present = {name: p for name, p in files.items() if p.is_file()}
    if not present:
        return None
    missing = sorted(set(files) - set(present))
    if missing:
        raise DataError(
            f"{directory}: label files incomplete, missing {', '.join(_PAPER_LABEL_FILES[m] for m in missing)}"
        )
    out = {}
    for name, p in present.items():
        try:
            out[name] = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{p}: cannot read label file ({err})") from None
        if out[name].ndim != 2:
            raise DataError(f"{p}: label {name!r} has shape {out[name].shape}, expected 2-D (Rx, Ry)")
    grain = directory / _PAPER_GRAIN_FILE
    if grain.is_file():
        out["grain_index"] = np.load(grain, allow_pickle=False)
    return out


def load_labels(path: str | os.PathLike, *, shape: tuple[int, int] | None = None) -> dict[str, np.ndarray] | None:
    """Loads ground-truth labels.

    Sources: the ``/labels`` group of an HDF5 file (our simulator: ``strain_xx, strain_yy,
    shear_xy, rotation`` [radians], ``grain_index``, ``interior``, ``vacuum``, ``phase`` and the
    ``(Rx, Ry, 2)`` ``zero_beam``); or a directory holding the
    paper's ``Label_strain_xx.npy, Label_strain_yy.npy, Label_shear_xy.npy, Label_rotation.npy``
    (and, if present, ``simulated_4dstem_grain_index.npy`` as ``grain_index``); or one of those
    ``Label_*.npy`` files (its folder is used).

    Args:
      path: HDF5 file, label folder or one label file.
      shape: expected ``(Rx, Ry)``; mismatches raise `DataError`.

    Returns:
      Dict of ``(Rx, Ry)`` (or ``(Rx, Ry, ...)``) arrays as stored (strains dimensionless, rotation in
      radians), or None when the source holds no labels.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file or folder not found")
    if path.is_dir():
        labels = _load_npy_labels(path)
        return None if labels is None else _check_label_shapes(labels, shape, str(path))
    if path.suffix.lower() == ".npy":
        if path.name in _PAPER_LABEL_FILES.values():
            labels = _load_npy_labels(path.parent)
            return None if labels is None else _check_label_shapes(labels, shape, str(path.parent))
        return None
    _check_file(path)
    if not h5py.is_hdf5(str(path)):
        return None
    try:
        with h5py.File(path, "r") as f:
            group = f.get("labels")
            if not isinstance(group, h5py.Group):
                return None
            labels = {name: group[name][...] for name in group if isinstance(group[name], h5py.Dataset)}
    except OSError as err:
        raise DataError(f"{path}: cannot read labels, the file may be truncated ({err})") from None
    missing = [n for n in LABEL_NAMES if n not in labels]
    if missing:
        raise DataError(f"{path}: key '/labels' lacks {', '.join(missing)}; expected {', '.join(LABEL_NAMES)}")
    return _check_label_shapes(labels, shape, f"{path}: key '/labels'")


def reference_region_from_file(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """The ``reference_region`` root attribute ``(r0, r1, c0, c1)`` of an HDF5 file, or None.

    Raises:
      DataError: the file is missing, or the attribute is not 4 integers.
    """
    path = Path(path)
    _check_file(path)
    if not h5py.is_hdf5(str(path)):
        return None
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("reference_region")
    except OSError as err:
        raise DataError(f"{path}: cannot open as HDF5 ({err})") from None
    if value is None:
        return None
    value = np.asarray(value).ravel()
    if value.size != 4 or not np.all(np.equal(np.mod(value, 1), 0)):
        raise DataError(f"{path}: attribute 'reference_region' = {value!r}, expected 4 integers (r0, r1, c0, c1)")
    return tuple(int(v) for v in value)
