"""Strain maps for other tools: HyperSpy ``.hspy`` (RosettaSciIO) and EMD 1.0 ``.emd`` (py4DSTEM / emdfile layout).

`export_strain` converts a strain-map file written by ``ccstae map`` into one file holding a named 2-D signal per
map, each with calibrated axes:

* signals ``strain_xx``, ``strain_yy``, ``shear_xy`` (dimensionless, NaN where invalid), ``rotation`` (radians),
  ``valid`` (bool), all in the detector frame, and, when the map has an image frame (``--scan-rotation``),
  ``image_frame_strain_xx``, ``image_frame_strain_yy``, ``image_frame_shear_xy`` (the rotation is the same in both
  frames);
* axes ``Rx`` (scan rows, array axis 0) and ``Ry`` (scan columns, axis 1): scale = the scan step in nm when the
  input data file gave one (``scan_step`` attribute), else 1 with no units (HyperSpy) / ``pixels`` (EMD);
* the strain file's root attributes (conventions, frames, scan rotation, ``q_pixel``, reference region, ...) go
  along: ``original_metadata`` in HyperSpy, attributes of the root group in EMD.

``.hspy`` is written with RosettaSciIO's HyperSpy writer (one signal per temporary file, then the groups are
copied into one file, which HyperSpy and RosettaSciIO read as a list of signals; needs the ``io`` extra). ``.emd``
is written with h5py in emdfile's EMD 1.0 layout: file attributes ``emd_group_type = "file"``, ``version_major =
1``, ``version_minor = 0``, ``UUID``; a root group (``emd_group_type = "root"``, ``python_class = "Root"``) named
``strain_maps``; per signal a group (``emd_group_type = "array"``, ``python_class = "Array"``) holding ``data``
(attribute ``units``) and the linear dim vectors ``dim0``, ``dim1`` = ``[0, step]`` (attributes ``name``,
``units``). py4DSTEM/emdfile (``emdfile.read``) and RosettaSciIO's EMD reader open it.

Open the results::

    from rsciio.hspy import file_reader
    maps = {d["metadata"]["General"]["title"]: d for d in file_reader("strain.hspy")}
    maps["strain_xx"]["data"], maps["strain_xx"]["axes"]   # (Rx, Ry) array; scale and units of Rx, Ry
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np

from ccstae_jax.atomic import replace_atomically

__all__ = ["EXPORT_FORMATS", "export_path", "check_export", "export_strain", "export_signals"]

EXPORT_FORMATS = ("hspy", "emd")
_QUANTITY = {"strain_xx": ("strain_xx", "dimensionless"), "strain_yy": ("strain_yy", "dimensionless"),
             "shear_xy": ("shear_xy (tensor shear)", "dimensionless"), "rotation": ("rotation", "rad"),
             "valid": ("valid position", "")}


def export_path(strain_path, fmt: str) -> Path:
    """Where `export_strain` writes: ``strain_path`` with the suffix ``.hspy`` or ``.emd``."""
    return Path(strain_path).with_suffix(f".{fmt}")


def check_export(fmt: str, strain_path) -> None:
    """Refuses, before any work, an unknown format, an export path equal to the strain file, or ``hspy`` without
    RosettaSciIO (one line naming the extra)."""
    from ccstae_jax.data.formats import IO_EXTRA

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--export {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    if export_path(strain_path, fmt) == Path(strain_path):
        raise ValueError(f"--out {strain_path} already ends in .{fmt}; give the strain map an .h5 name, the "
                         f"--export {fmt} file is written beside it")
    if fmt == "hspy":
        try:
            import rsciio.hspy  # noqa: F401
        except ImportError:
            raise ValueError(f"--export hspy needs the optional io extra (RosettaSciIO): {IO_EXTRA}") from None


def export_signals(maps: dict, image_frame: dict, attrs: dict) -> list[dict]:
    """The signals written by `export_strain`: dicts of ``name``, ``data`` (Rx, Ry), ``quantity``, ``units``."""
    out = []
    for key in ("strain_xx", "strain_yy", "shear_xy", "rotation", "valid"):
        if key in maps:
            quantity, units = _QUANTITY[key]
            frame = ", detector frame" if key in ("strain_xx", "strain_yy", "shear_xy") else ""
            out.append({"name": key, "data": np.asarray(maps[key]), "quantity": quantity + frame, "units": units})
    for key in ("strain_xx", "strain_yy", "shear_xy"):
        if key in image_frame:
            quantity, units = _QUANTITY[key]
            out.append({"name": f"image_frame_{key}", "data": np.asarray(image_frame[key]),
                        "quantity": f"{quantity}, image frame", "units": units})
    return out


def _scan_axes(attrs: dict) -> tuple[float, str]:
    step = attrs.get("scan_step")
    if step is not None and np.isfinite(step) and step > 0:
        return float(step) / 10.0, "nm"
    return 1.0, ""


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read(strain_path) -> tuple[dict, dict, dict]:
    import h5py

    from ccstae_jax.report.files import read_strain_h5

    maps, attrs = read_strain_h5(strain_path)
    image = {}
    with h5py.File(strain_path, "r") as f:
        group = f.get("image_frame")
        if isinstance(group, h5py.Group):
            image = {k: group[k][()] for k in group if isinstance(group[k], h5py.Dataset)}
    return maps, image, {k: _plain(v) for k, v in attrs.items()}


def _write_hspy(path: Path, signals: list[dict], attrs: dict) -> None:
    import h5py
    from rsciio.hspy import file_writer

    scale, units = _scan_axes(attrs)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        parts = []
        for sig in signals:
            rx, ry = sig["data"].shape
            axes = [{"size": n, "index_in_array": i, "name": name, "scale": scale, "offset": 0.0, "units": units,
                     "navigate": False} for i, (n, name) in enumerate(((rx, "Rx"), (ry, "Ry")))]
            quantity = f"{sig['quantity']} ({sig['units']})" if sig["units"] else sig["quantity"]
            signal = {"data": sig["data"], "axes": axes,
                      "metadata": {"General": {"title": sig["name"]},
                                   "Signal": {"signal_type": "", "quantity": quantity}},
                      "original_metadata": {"ccstae": attrs}, "attributes": {"_lazy": False},
                      "tmp_parameters": {}, "learning_results": {}, "models": {},
                      "package_info": {"name": "ccstae-jax"}}
            part = Path(tmp) / f"{sig['name']}.hspy"
            file_writer(str(part), signal, show_progressbar=False)
            parts.append((sig["name"], part))
        tmp_out = Path(tmp) / "all.hspy"
        with h5py.File(tmp_out, "w") as out:
            for name, part in parts:
                with h5py.File(part, "r") as src:
                    for k, v in src.attrs.items():
                        out.attrs[k] = v
                    src.copy(src[f"Experiments/{name}"], out.require_group("Experiments"), name)
        os.replace(tmp_out, path)


def _write_emd(path: Path, signals: list[dict], attrs: dict) -> None:
    import h5py

    scale, units = _scan_axes(attrs)
    with replace_atomically(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["emd_group_type"] = "file"
            f.attrs["version_major"] = 1
            f.attrs["version_minor"] = 0
            f.attrs["UUID"] = str(uuid.uuid4())
            f.attrs["authoring_program"] = "ccstae-jax"
            f.attrs["authoring_user"] = ""
            root = f.create_group("strain_maps")
            root.attrs["emd_group_type"] = "root"
            root.attrs["python_class"] = "Root"
            for k, v in attrs.items():
                root.attrs[k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
            for sig in signals:
                grp = root.create_group(sig["name"])
                grp.attrs["emd_group_type"] = "array"
                grp.attrs["python_class"] = "Array"
                data = grp.create_dataset("data", data=sig["data"])
                data.attrs["units"] = sig["units"] or "unitless"
                data.attrs["quantity"] = sig["quantity"]
                for n, name in enumerate(("Rx", "Ry")):
                    dim = grp.create_dataset(f"dim{n}", data=np.array([0.0, scale]))
                    dim.attrs["name"] = name
                    dim.attrs["units"] = units or "pixels"


def export_strain(strain_path, fmt: str, out_path=None) -> str:
    """Writes the maps of a ``ccstae map`` strain file as ``.hspy`` or EMD 1.0 ``.emd`` (module docstring).

    Args:
      strain_path: the strain-map ``.h5``.
      fmt: ``"hspy"`` (needs the ``io`` extra) or ``"emd"``.
      out_path: default `export_path` (beside the strain file).

    Returns:
      The path written (atomically: a temporary name, then renamed).
    """
    check_export(fmt, strain_path)
    path = Path(out_path) if out_path is not None else export_path(strain_path, fmt)
    maps, image, attrs = _read(strain_path)
    signals = export_signals(maps, image, attrs)
    (_write_hspy if fmt == "hspy" else _write_emd)(path, signals, attrs)
    return str(path)
