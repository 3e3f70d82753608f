"""Which reader opens which 4D-STEM file, and the detector formats read through the optional ``io`` extra.

`ccstae_jax.data.open_scan` picks a format from ``format=`` (``ccstae train/map --format``) or the file name:

=============  =============================================  ==================================================
format         files                                          read by
=============  =============================================  ==================================================
``hdf5``       ``.h5 .hdf5 .emd .hspy .mat .nxs ...``:         our h5py reader (`ccstae_jax.data.readers`): our
               our simulator, py4DSTEM / EMD 1.0, NCEM EMD     simulator's ``/data``, the py4DSTEM and Prismatic
               (Berkeley), HyperSpy ``.hspy``, MATLAB v7.3,    layouts, else the only 4-D dataset. NCEM EMD data
               Prismatic; chunks compressed with LZ4,          (``dim1``.. vectors, no ``dim0``) are stored with
               Bitshuffle, Blosc, Zstd... once the extra is   the axes reversed and read as RosettaSciIO reads
               installed                                       them (default transpose ``(3, 2, 1, 0)``).
``arina``      DECTRIS ARINA / EIGER ``*_master.h5``: frame    `FrameStack` (h5py): the 3-D frame datasets under
               stacks ``/entry/data/data_NNNNNN`` (often       ``/entry/data`` (external links followed) in name
               external links), Bitshuffle-LZ4 chunks          order, ``scan_shape`` rows x columns (default:
                                                               square); found automatically in ``.h5`` files
``npy``        ``.npy``                                        numpy memory map
``empad``      EMPAD ``.raw`` (+ ``.xml``)                     our reader (130 x 128 float32 frames, footer
                                                               rows dropped)
``mib``        Quantum Detectors Merlin ``.mib`` (+ ``.hdr``)  RosettaSciIO ``quantumdetector`` (lazy)
``dm``         Gatan ``.dm3`` / ``.dm4``                       RosettaSciIO ``digitalmicrograph`` (lazy)
``blo``        NanoMegas ASTAR ``.blo``                        RosettaSciIO ``blockfile`` (lazy)
``tvips``      TVIPS ``*_000.tvips`` (+ ``_001`` ...)          RosettaSciIO ``tvips`` (lazy)
=============  =============================================  ==================================================

HDF5-based formats are read by h5py, which streams any dataset in bounded memory; `hdf5plugin` (in the extra)
only registers the compression filters that detectors write. RosettaSciIO's ARINA reader loads the whole scan into
memory, so ARINA files are read here by `FrameStack`. The binary formats go through RosettaSciIO's lazy readers
(dask arrays over memory maps): `LazyArray` computes only the scan rows asked for, with the synchronous scheduler,
in chunks of whole scan rows of about ``CHUNK_BYTES``. Velox EMD files are not read (RosettaSciIO's Velox reader reads
images and spectra, not 4D-STEM data).

Orientation: patterns come out as RosettaSciIO returns them (``(scan row, scan column, detector row, detector
column)``, e.g. Merlin frames flipped up-down as HyperSpy and pyxem show them), so maps line up with what users see
there. Without the extra, opening a file that needs it raises a one-line `DataError` ending in
``pip install "ccstae-jax[io]"``.

Detector calibration (`calibration_from_axes`): ``q_pixel`` (1/Angstrom per detector pixel) when both detector axes
carry the same reciprocal-length scale; ``scan_step`` (Angstrom per scan position) when both scan axes carry the
same length scale.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "FORMATS",
    "IO_EXTRA",
    "CHUNK_BYTES",
    "FrameStack",
    "LazyArray",
    "calibration_from_axes",
    "check_hdf5_filters",
    "format_from_name",
    "frame_stack_datasets",
    "open_rsciio",
]

IO_EXTRA = 'pip install "ccstae-jax[io]"'
CHUNK_BYTES = 4 * 2**20  # dask chunk size asked of RosettaSciIO's lazy readers (whole scan rows when larger)

# name -> (what it is, file suffixes)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hdf5": ("HDF5 / EMD / .hspy / MATLAB v7.3", (".h5", ".hdf5", ".hdf", ".he5", ".emd", ".hspy", ".mat", ".nxs",
                                                   ".cxi")),
    "arina": ("DECTRIS ARINA / EIGER master .h5", ()),
    "npy": ("NumPy .npy", (".npy",)),
    "empad": ("EMPAD .raw/.xml", (".raw", ".xml")),
    "mib": ("Quantum Detectors Merlin .mib", (".mib",)),
    "dm": ("Gatan DigitalMicrograph .dm3/.dm4", (".dm3", ".dm4")),
    "blo": ("NanoMegas ASTAR .blo", (".blo",)),
    "tvips": ("TVIPS .tvips", (".tvips",)),
}
RSCIIO_FORMATS = ("mib", "dm", "blo", "tvips")
_RSCIIO_MODULES = {"mib": "quantumdetector", "dm": "digitalmicrograph", "blo": "blockfile", "tvips": "tvips"}

# Reciprocal lengths -> 1/Angstrom, lengths -> Angstrom (unit strings as RosettaSciIO and HyperSpy write them).
_INVERSE_LENGTH = {"1/nm": 0.1, "nm^-1": 0.1, "nm-1": 0.1, "1/a": 1.0, "1/å": 1.0, "a^-1": 1.0, "å^-1": 1.0,
                   "a-1": 1.0, "å-1": 1.0, "1/angstrom": 1.0, "1/pm": 100.0, "1/m": 1e-10}
_LENGTH = {"nm": 10.0, "a": 1.0, "å": 1.0, "angstrom": 1.0, "pm": 0.01, "um": 1e4, "µm": 1e4, "μm": 1e4,
           "m": 1e10}


def _error(message: str):
    from ccstae_jax.data.readers import DataError

    return DataError(message)


def format_from_name(path: Path, format: str | None) -> str | None:
    """The format named by ``format`` (checked), else by the file's suffix; None when the suffix says nothing."""
    if format is not None:
        name = str(format).lower()
        if name == "auto":
            return None if not path.suffix else format_from_name(path, None)
        if name not in FORMATS:
            raise _error(f"{path}: unknown format {format!r}; expected one of auto, {', '.join(FORMATS)}")
        return name
    suffix = path.suffix.lower()
    for name, (_, suffixes) in FORMATS.items():
        if suffix in suffixes:
            return name
    return None


def _import_rsciio(path: Path, fmt: str):
    module = _RSCIIO_MODULES[fmt]
    try:
        return importlib.import_module(f"rsciio.{module}")
    except ImportError as err:
        missing = getattr(err, "name", None) or "rsciio"
        raise _error(f"{path}: reading {FORMATS[fmt][0]} files needs the optional io extra (RosettaSciIO; missing "
                     f"module {missing!r}): {IO_EXTRA}") from None


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------
def _unit_factor(units, table) -> float | None:
    if not isinstance(units, str):
        return None
    key = units.replace(" ", "").replace("⁻¹", "^-1").lower()
    if key.startswith("[") and key.endswith("]"):  # NCEM EMD writes e.g. "[1_/_n_m]"
        key = key[1:-1].replace("_", "")
    return table.get(key)


def calibration_from_axes(axes: Sequence[dict]) -> dict[str, float]:
    """Detector and scan calibration from RosettaSciIO / HyperSpy axis descriptions.

    Args:
      axes: 4 dicts in array order ``(scan row, scan column, detector row, detector column)`` with ``scale`` and
        ``units``.

    Returns:
      ``{"q_pixel": 1/Angstrom per detector pixel}`` when both detector axes have the same reciprocal-length
      scale, and ``{"scan_step": Angstrom per position}`` when both scan axes have the same length scale; either
      key is absent otherwise.
    """
    out: dict[str, float] = {}
    for key, pair, table in (("scan_step", axes[:2], _LENGTH), ("q_pixel", axes[2:4], _INVERSE_LENGTH)):
        values = []
        for axis in pair:
            factor = _unit_factor(axis.get("units"), table)
            try:
                scale = float(axis.get("scale"))
            except (TypeError, ValueError):
                scale = math.nan
            values.append(scale * factor if factor is not None else math.nan)
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values) and \
                math.isclose(values[0], values[1], rel_tol=1e-6):
            out[key] = values[0]
    return out


def hspy_axes(dataset) -> list[dict] | None:
    """The ``axis-0`` .. ``axis-3`` attributes beside a HyperSpy ``.hspy`` ``data`` dataset, in array order."""
    parent = dataset.parent
    axes = []
    for i in range(dataset.ndim):
        group = parent.get(f"axis-{i}")
        if group is None:
            return None
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in group.attrs.items()}
        axes.append(attrs)
    return axes


# ---------------------------------------------------------------------------------------------
# HDF5 compression filters
# ---------------------------------------------------------------------------------------------
# Registered HDF5 filter ids of the compressors detectors use (hdf5plugin provides them).
_FILTER_NAMES = {32008: "Bitshuffle", 32004: "LZ4", 32001: "Blosc", 32026: "Blosc2", 32015: "Zstd", 307: "bzip2",
                 32013: "ZFP", 32017: "SZ", 32018: "FCIDECOMP", 32024: "SZ3", 32016: "Sperr"}


def _filter_available(code: int) -> bool:
    import h5py

    return bool(h5py.h5z.filter_avail(code))


def _missing_filters(dataset) -> list[tuple[int, str]]:
    plist = dataset.id.get_create_plist()
    missing = []
    for i in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(i)
        if not _filter_available(code):
            text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            missing.append((int(code), _FILTER_NAMES.get(int(code)) or text.split(";")[0] or "unknown filter"))
    return missing


def check_hdf5_filters(datasets, path: Path, key: str) -> None:
    """Makes sure every compression filter of ``datasets`` can be decoded, registering hdf5plugin's if needed.

    Raises:
      DataError: a filter is unavailable (naming the extra when hdf5plugin is not installed).
    """
    missing = [m for d in datasets for m in _missing_filters(d)]
    if not missing:
        return
    try:
        import hdf5plugin  # noqa: F401  (registers Bitshuffle, LZ4, Blosc, Zstd, ... with HDF5)
    except ImportError:
        code, name = missing[0]
        raise _error(f"{path}: key {key!r}: chunks are compressed with HDF5 filter {code} ({name}), "
                     f"which needs the optional io extra (hdf5plugin): {IO_EXTRA}") from None
    still = [m for d in datasets for m in _missing_filters(d)]
    if still:
        code, name = still[0]
        raise _error(f"{path}: key {key!r}: HDF5 filter {code} ({name}) is not available, even with "
                     "hdf5plugin installed; expected a filter hdf5plugin provides")


# ---------------------------------------------------------------------------------------------
# ARINA / EIGER frame stacks
# ---------------------------------------------------------------------------------------------
def frame_stack_datasets(f, path: Path) -> list | None:
    """The 3-D frame datasets under ``/entry/data`` of an ARINA/EIGER master file, in name order; None if absent.

    Raises:
      DataError: a linked data file is missing, or the frame datasets disagree in pattern shape or dtype.
    """
    import h5py

    group = f.get("entry/data")
    if not isinstance(group, h5py.Group):
        return None
    names = sorted(n for n in group.keys() if n.startswith("data_"))
    datasets = []
    for name in names:
        link = group.get(name, getlink=True)
        try:
            obj = group[name]
        except KeyError:
            target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else name
            raise _error(f"{path}: /entry/data/{name} links to {target}, which cannot be opened; keep the "
                         "detector's data files beside the master file") from None
        if isinstance(obj, h5py.Dataset) and obj.ndim == 3:
            datasets.append(obj)
    if not datasets:
        return None
    shapes = {tuple(d.shape[1:]) for d in datasets}
    dtypes = {d.dtype for d in datasets}
    if len(shapes) > 1 or len(dtypes) > 1:
        raise _error(f"{path}: the frame datasets under /entry/data differ in pattern shape {sorted(shapes)} or "
                     f"dtype {sorted(map(str, dtypes))}; expected one detector")
    return datasets


class FrameStack:
    """A read-only ``(Rx, Ry, H, W)`` view of 3-D ``(frames, H, W)`` datasets stacked in order (ARINA / EIGER).

    Frames are scan positions in row-major order: frame ``rx * Ry + ry``. Indexing takes 4 slices of step 1 (as
    `ccstae_jax.data.readers.Scan` reads) and reads only the frames they cover. ``chunks`` gives the scan rows per
    natural read block along axis 0 (at least 1).
    """

    def __init__(self, datasets: Sequence, scan_shape: tuple[int, int]):
        self._datasets = list(datasets)
        counts = [int(d.shape[0]) for d in self._datasets]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        h, w = (int(s) for s in self._datasets[0].shape[1:])
        rows, cols = scan_shape
        self.shape = (int(rows), int(cols), h, w)
        self.dtype = np.dtype(self._datasets[0].dtype)
        self.ndim = 4
        chunk = self._datasets[0].chunks
        frames_per_chunk = int(chunk[0]) if chunk else 1
        self.chunks = (max(1, frames_per_chunk // max(1, int(cols))), int(cols), h, w)

    @property
    def n_frames(self) -> int:
        return int(self._starts[-1])

    def _frames(self, f0: int, f1: int, qx: slice, qy: slice) -> np.ndarray:
        """Frames ``f0:f1`` (over dataset boundaries), pattern window ``[qx, qy]``."""
        parts = []
        k = int(np.searchsorted(self._starts, f0, side="right")) - 1
        while f0 < f1:
            stop = min(f1, int(self._starts[k + 1]))
            local = slice(f0 - int(self._starts[k]), stop - int(self._starts[k]))
            parts.append(self._datasets[k][local, qx, qy])
            f0, k = stop, k + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, index) -> np.ndarray:
        if not (isinstance(index, tuple) and len(index) == 4 and all(isinstance(s, slice) for s in index)):
            raise TypeError("FrameStack takes 4 slices")
        bounds = []
        for s, n in zip(index, self.shape):
            start, stop, step = s.indices(n)
            if step != 1:
                raise TypeError("FrameStack takes slices of step 1")
            bounds.append((start, max(start, stop)))
        (r0, r1), (c0, c1) = bounds[:2]
        qx, qy = slice(*bounds[2]), slice(*bounds[3])
        cols = self.shape[1]
        h, w = bounds[2][1] - bounds[2][0], bounds[3][1] - bounds[3][0]
        if c0 == 0 and c1 == cols:  # whole rows: one contiguous frame range
            block = self._frames(r0 * cols, r1 * cols, qx, qy)
            return block.reshape(r1 - r0, cols, h, w)
        out = np.empty((r1 - r0, c1 - c0, h, w), self.dtype)
        for i, r in enumerate(range(r0, r1)):
            out[i] = self._frames(r * cols + c0, r * cols + c1, qx, qy)
        return out


def frame_stack_scan_shape(n_frames: int, scan_shape, path: Path) -> tuple[int, int]:
    """``scan_shape`` checked against the frame count, or the square scan the frames fill."""
    if scan_shape is None:
        side = math.isqrt(n_frames)
        if side * side != n_frames:
            raise _error(f"{path}: {n_frames} frames do not fill a square scan; pass scan_shape=(rows, cols) "
                         "(--scan-shape ROWS COLS)")
        return (side, side)
    shape = tuple(int(s) for s in scan_shape)
    if len(shape) != 2 or shape[0] * shape[1] != n_frames:
        raise _error(f"{path}: scan_shape={tuple(scan_shape)} does not match the {n_frames} frames in the file; "
                     "expected rows * cols = frames")
    return shape


# ---------------------------------------------------------------------------------------------
# RosettaSciIO's lazy readers
# ---------------------------------------------------------------------------------------------
class LazyArray:
    """A dask array read block by block: ``array[index]`` computes only the chunks ``index`` touches, with the
    synchronous scheduler, and returns numpy. ``chunks`` gives the first chunk's extent along each axis."""

    def __init__(self, array):
        self._array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c[0]) if len(c) else 1 for c in array.chunks)

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self._array[index].compute(scheduler="synchronous"))


def _read_dictionaries(module, path: Path, fmt: str, scan_shape):
    kwargs = {"lazy": True}
    if fmt in ("mib", "blo", "dm"):
        kwargs["chunks"] = {0: "auto"}  # whole patterns and scan rows in each chunk, as many rows as fit
    if fmt == "mib" and scan_shape is not None:
        kwargs["navigation_shape"] = (int(scan_shape[1]), int(scan_shape[0]))  # RosettaSciIO: (x = cols, y = rows)
    if fmt == "tvips":
        kwargs["scan_shape"] = tuple(int(s) for s in scan_shape) if scan_shape is not None else "auto"
    import dask

    with dask.config.set({"array.chunk-size": CHUNK_BYTES}):
        return module.file_reader(str(path), **kwargs)


def open_rsciio(path: Path, fmt: str, scan_shape=None) -> tuple[LazyArray, dict[str, float]]:
    """Opens a ``.mib``, ``.dm3/.dm4``, ``.blo`` or ``.tvips`` file with RosettaSciIO's lazy reader.

    Args:
      path: the file (for TVIPS the first, ``*_000.tvips``).
      fmt: ``"mib"``, ``"dm"``, ``"blo"`` or ``"tvips"``.
      scan_shape: ``(rows, cols)``; needed for a ``.mib`` without ``.hdr`` and TVIPS scans that are not square,
        optional otherwise (a 3-D stack of frames is then reshaped to it).

    Returns:
      ``(array, calibration)``: a `LazyArray` of shape ``(Rx, Ry, H, W)`` and `calibration_from_axes`.

    Raises:
      DataError: RosettaSciIO is not installed (naming the extra), it cannot read the file, or the file holds no
        single 4-D dataset.
    """
    module = _import_rsciio(path, fmt)
    label = FORMATS[fmt][0]
    try:
        dictionaries = _read_dictionaries(module, path, fmt, scan_shape)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, TypeError, NotImplementedError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        hint = "; pass scan_shape=(rows, cols) (--scan-shape ROWS COLS) if the scan shape is in question" \
            if scan_shape is None and fmt in ("mib", "tvips") else ""
        raise _error(f"{path}: RosettaSciIO cannot read it as {label} ({msg}){hint}") from None
    candidates = [d for d in dictionaries if getattr(d.get("data"), "ndim", 0) in (3, 4)]
    if len(candidates) != 1:
        shapes = [tuple(getattr(d.get("data"), "shape", ())) for d in dictionaries]
        raise _error(f"{path}: expected one 4-D (scan, scan, detector, detector) dataset in the {label} file, found "
                     f"shapes {shapes}")
    data, axes = candidates[0]["data"], list(candidates[0].get("axes", []))
    if not hasattr(data, "compute"):  # a reader that returned numpy despite lazy=True
        import dask.array as da

        data = da.from_array(data, chunks=("auto",) + (-1,) * (data.ndim - 1))
    if data.ndim == 3:
        if scan_shape is None:
            raise _error(f"{path}: {label} file holds a stack of {data.shape[0]} frames without a scan shape; pass "
                         "scan_shape=(rows, cols) (--scan-shape ROWS COLS)")
        rows, cols = (int(s) for s in scan_shape)
        if rows * cols != data.shape[0]:
            raise _error(f"{path}: scan_shape={tuple(scan_shape)} does not match the {data.shape[0]} frames in the "
                         "file; expected rows * cols = frames")
        data = data.reshape(rows, cols, *data.shape[1:])
        axes = [{}, {}] + axes[-2:]
    elif scan_shape is not None and tuple(int(s) for s in scan_shape) != tuple(data.shape[:2]):
        raise _error(f"{path}: scan_shape={tuple(scan_shape)} does not match the file's scan {tuple(data.shape[:2])}")
    axes = sorted(axes, key=lambda a: a.get("index_in_array", 0)) if all("index_in_array" in a for a in axes) \
        else axes
    calibration = calibration_from_axes(axes) if len(axes) == 4 else {}
    return LazyArray(data), calibration
