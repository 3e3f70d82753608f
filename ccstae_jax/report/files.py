"""Strain-map files: the HDF5 layout written by `ccstae map` (and the py4DSTEM baseline), and its reader.

Layout: ``/strain_xx``, ``/strain_yy``, ``/shear_xy``, ``/rotation`` ``(Rx, Ry)`` float32 (NaN where invalid); every
other array of the maps at the root (``/valid`` bool, ``/invalid_reason`` uint8, ``/reconstruction_error``, a
baseline's ``/n_peaks`` ...; floating arrays as float32), except the raw affine data under ``/affine/`` (``theta``
``(Rx, Ry, 2, 3)``, ``lattice`` ``(Rx, Ry, 2, 2)``, ``class_index``) and the 1-sigma errors under ``/uncertainty/``
(``uncertainty_<quantity>`` maps). String entries and everything in ``attrs`` become root attributes.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ccstae_jax import conventions
from ccstae_jax.atomic import replace_atomically
from ccstae_jax.mapping.reference import INVALID_REASONS, QUANTITIES

CONVENTIONS = (
    f"maps (Rx, Ry) of {conventions.FRAME}. {conventions.STRAIN}, radians, modulo 2*pi/symmetry about the "
    "reference; T = M M_ref^-1 = (I + eps) R (left polar decomposition)"
)

AFFINE_KEYS = ("theta", "lattice", "class_index")


UNCERTAINTY_PREFIX = "uncertainty_"


def write_strain_h5(path: str | os.PathLike, maps: dict, *, attrs: dict) -> str:
    """Writes strain maps to HDF5 atomically (`ccstae_jax.atomic`); returns the path.

    Layout in the module docstring. String entries of ``maps`` and everything in ``attrs`` become root attributes
    (numeric sequences as arrays, other non-scalars as JSON text); ``conventions`` (and ``invalid_reasons`` with
    ``invalid_reason``) are added unless given. Used by `ccstae map` and by the py4DSTEM baseline.
    """
    import h5py

    missing = [k for k in QUANTITIES if k not in maps]
    if missing:
        raise ValueError(f"maps lacks {missing}; has {sorted(maps)}")
    with replace_atomically(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in maps.items():
                if isinstance(value, str):
                    f.attrs[key] = value
                    continue
                arr = np.asarray(value)
                if arr.dtype.kind == "f":
                    arr = arr.astype(np.float32)
                if key in AFFINE_KEYS:
                    key = f"affine/{key}"
                elif key.startswith(UNCERTAINTY_PREFIX):
                    key = f"uncertainty/{key[len(UNCERTAINTY_PREFIX):]}"
                f.create_dataset(key, data=arr)
            for k, v in attrs.items():
                f.attrs[k] = _attr_value(v)
            if "conventions" not in f.attrs:
                f.attrs["conventions"] = CONVENTIONS
            if "invalid_reason" in maps and "invalid_reasons" not in f.attrs:
                f.attrs["invalid_reasons"] = json.dumps(INVALID_REASONS)
    return os.fspath(path)


def _attr_value(v):
    """An HDF5-storable attribute: scalars and strings as they are, numeric sequences as arrays, the rest as JSON."""
    if isinstance(v, (str, bytes, bool, int, float, np.integer, np.floating, np.bool_)):
        return v
    if not isinstance(v, dict) and v is not None:
        arr = np.asarray(v)
        if arr.dtype.kind in "iufb":
            return arr
    return json.dumps(v, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def read_strain_h5(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a strain-map file written by `write_strain_h5` (or the py4DSTEM baseline): ``(maps, attrs)``."""
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"strain map file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path} is not a readable HDF5 strain-map file ({e})") from None
    with f:
        missing = [k for k in QUANTITIES if k not in f]
        if missing:
            raise ValueError(f"{path} is not a strain-map file: missing datasets {missing} (found {sorted(f.keys())})")
        maps = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        if "uncertainty" in f:
            maps.update({UNCERTAINTY_PREFIX + k: v[()] for k, v in f["uncertainty"].items()})
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return maps, attrs
