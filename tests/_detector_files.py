"""Writers for detector files from their documented layouts (tests and `benchmarks/memory.py` only).

* Merlin ``.mib``: each frame is a 384-byte ASCII header (comma-separated: ``MQ1``, sequence number, header size
  ``00384``, chips, width, height, pixel depth ``U16``, sensor layout, ..., extended timestamp, exposure in ns,
  bit depth, then NUL padding) followed by big-endian pixels; the ``.hdr`` acquisition header beside it (tab
  separated ``key:<TAB>value`` lines between ``HDR,`` and ``End``) gives the frames per trigger (scan columns).
  RosettaSciIO shows each frame flipped up-down, so `write_mib` stores the rows bottom-up: the scan it is given is
  what readers return.
* ARINA / EIGER: a ``*_master.h5`` whose ``/entry/data/data_NNNNNN`` are external links to ``*_data_NNNNNN.h5``
  files holding ``/entry/data/data`` ``(frames, H, W)`` chunked one frame per chunk and compressed with
  Bitshuffle + LZ4 (hdf5plugin).
* EMPAD ``.raw``: 130 x 128 little-endian float32 frames (the last two rows a footer) and an ``.xml`` giving the
  scan size.

Every writer streams scan rows from ``rows(r0, r1) -> (r1 - r0, Ry, H, W)`` so large scans never sit in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import h5py
import numpy as np

RowReader = Callable[[int, int], np.ndarray]


def _rows_of(data: np.ndarray) -> tuple[RowReader, tuple[int, int, int, int]]:
    return (lambda r0, r1: data[r0:r1]), tuple(data.shape)


def mib_header(index: int, height: int, width: int, *, depth: str = "U16") -> bytes:
    """The 384-byte header of frame ``index`` (1-based sequence number) of a single-chip Merlin .mib."""
    bits = {"U08": 8, "U16": 16, "U32": 32}[depth]
    fields = [
        "MQ1", f"{index:06d}", "00384", "01", f"{width:04d}", f"{height:04d}", depth, "   1x1", "01",
        "2024-01-01 00:00:00.000000", "0.001000", "0", "0", "0",
        "1.000000E+1", "5.110000E+2", "0.000000E+0", "0.000000E+0", "0.000000E+0", "0.000000E+0", "0.000000E+0",
        "0.000000E+0", "3RX", "175", "511", "000", "000", "000", "000", "000", "000", "125", "255", "125", "125",
        "100", "100", "068", "030", "128", "004", "255", "129", "128", "185", "181", "000", "000", "MQ1A",
        "2024-01-01T00:00:00.000000000Z", "1000000ns", str(bits),
    ]
    text = (",".join(fields) + ",").encode("ascii")
    assert len(text) <= 384, len(text)
    return text + b"\x00" * (384 - len(text))


def write_mib(path, data: np.ndarray | None = None, *, rows: RowReader | None = None, shape=None,
              hdr: bool = True) -> Path:
    """Writes a uint16 Merlin ``.mib`` (+ ``.hdr``) holding ``data`` ``(Rx, Ry, H, W)`` (values must fit uint16)."""
    path = Path(path)
    if data is not None:
        rows, shape = _rows_of(data)
    rx, ry, h, w = shape
    frame = np.dtype([("header", "S384"), ("data", ">u2", (h, w))])
    with open(path, "wb") as f:
        for r in range(rx):
            block = np.asarray(rows(r, r + 1))[0]
            if block.min() < 0 or block.max() > np.iinfo(np.uint16).max or not np.array_equal(block,
                                                                                            np.round(block)):
                raise ValueError("write_mib: values must be integers in [0, 65535]")
            rec = np.empty(ry, frame)
            rec["header"] = [mib_header(r * ry + c + 1, h, w) for c in range(ry)]
            rec["data"] = block[:, ::-1, :].astype(">u2")  # stored bottom-up; readers flip it back
            rec.tofile(f)
    if hdr:
        lines = [
            "HDR,\t",
            "Time and Date Stamp (day, mnth, yr, hr, min, s):\t01/01/2024 00:00:00",
            "Chip ID:\tW000_A0,-,-,-",
            "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX",
            "Assembly Size (NX1, 2X2):\t   1x1",
            "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM",
            "Counter Depth (number):\t12",
            "Gain:\tSLGM",
            "Active Counters:\tAlternating",
            "Acquisition Type (Normal, Th_scan, Config):\tNormal",
            f"Frames in Acquisition (Number):\t{rx * ry}",
            f"Frames per Trigger (Number):\t{ry}",
            "Trigger Start (Positive, Negative, Internal):\tRising Edge",
            "Trigger Stop (Positive, Negative, Internal):\tRising Edge",
            "Sensor Bias (V):\t120 V",
            "Sensor Polarity (Positive, Negative):\tPositive",
            "Software Version:\t1.0.0",
            "End\t",
        ]
        path.with_suffix(".hdr").write_text("\n".join(lines) + "\n")
    return path


def write_arina(master, data: np.ndarray | None = None, *, rows: RowReader | None = None, shape=None,
                frames_per_file: int = 100_000, dtype=np.uint16) -> Path:
    """Writes an ARINA-style ``*_master.h5`` + ``*_data_NNNNNN.h5`` (Bitshuffle-LZ4, one frame per chunk)."""
    import hdf5plugin

    master = Path(master)
    if not master.name.endswith("_master.h5"):
        raise ValueError("write_arina: the master file name must end in _master.h5")
    prefix = master.name[: -len("_master.h5")]
    if data is not None:
        rows, shape = _rows_of(data)
    rx, ry, h, w = shape
    n = rx * ry
    files = []
    for k, f0 in enumerate(range(0, n, frames_per_file)):
        f1 = min(n, f0 + frames_per_file)
        name = f"{prefix}_data_{k + 1:06d}.h5"
        with h5py.File(master.parent / name, "w") as f:
            dset = f.create_dataset("entry/data/data", shape=(f1 - f0, h, w), dtype=dtype, chunks=(1, h, w),
                                    **hdf5plugin.Bitshuffle(cname="lz4"))
            r0 = f0 // ry
            r1 = -(-f1 // ry)
            for r in range(r0, r1):  # stream scan rows
                block = np.asarray(rows(r, r + 1)).reshape(ry, h, w)
                a, b = max(f0, r * ry), min(f1, (r + 1) * ry)
                dset[a - f0: b - f0] = block[a - r * ry: b - r * ry].astype(dtype)
        files.append(name)
    with h5py.File(master, "w") as f:
        group = f.create_group("entry/data")
        for k, name in enumerate(files):
            group[f"data_{k + 1:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
        f.create_dataset("entry/instrument/detector/description", data="DECTRIS ARINA (test layout)")
    return master


def write_empad(raw, data: np.ndarray) -> Path:
    """Writes EMPAD ``.raw`` (+ ``.xml``) frames of 130 x 128 float32 from ``data`` ``(Rx, Ry, 128, 128)``."""
    raw = Path(raw)
    rx, ry, h, w = data.shape
    if (h, w) != (128, 128):
        raise ValueError("write_empad: EMPAD patterns are 128 x 128")
    frames = np.zeros((rx, ry, 130, 128), "<f4")
    frames[:, :, :128] = data
    frames[:, :, 128:] = 7.0  # footer rows, dropped by readers
    frames.tofile(raw)
    raw.with_suffix(".xml").write_text(
        f'<root><raw_file filename="{raw.name}"/><scan_parameters mode="acquire">'
        f"<scan_resolution_x>{ry}</scan_resolution_x><scan_resolution_y>{rx}</scan_resolution_y>"
        "</scan_parameters></root>")
    return raw
