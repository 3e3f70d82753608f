"""Running the py4DSTEM baseline in its own Python process.

:func:`main` is ``python -m ccstae_jax.baselines.py4dstem DATA --out STRAIN.h5`` (the baseline in that interpreter,
on any file ``open_scan`` reads, geometry from the file attributes); :func:`run_baseline_subprocess` starts it in a
fresh process with ``BASELINE_ENV`` (one BLAS thread: see `ccstae_jax.baselines.py4dstem.blas`), which is how the CLI
(:func:`run_cli`, ``ccstae baseline``), the benchmarks and the tutorial call it. A child that cannot import py4DSTEM
exits with ``_EXIT_UNAVAILABLE``, raised here as ``BaselineUnavailable``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from ccstae_jax.baselines.py4dstem.config import (
    BASELINE_ENV,
    INSTALL_HINT,
    LATTICE_ALIASES,
    LATTICE_ANGLE_DEG,
    BaselineUnavailable,
    Py4DSTEMConfig,
    _attr,
    _lattice_from_attrs,
    _tuple_fields,
    canonical_lattice,
    config_from_attrs,
    g1_length_from_attrs,
    lattice_aspect_from_attrs,
    lattice_symmetry,
)
from ccstae_jax.baselines.py4dstem.method import _import_py4dstem, py4dstem_strain_map, write_strain_h5
from ccstae_jax.errors import CcstaeError

#: Exit status of ``python -m ccstae_jax.baselines.py4dstem`` when py4DSTEM cannot be imported.
_EXIT_UNAVAILABLE = 3


def _file_attrs(path: str) -> dict[str, Any]:
    import h5py

    if not h5py.is_hdf5(path):
        return {}
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m ccstae_jax.baselines.py4dstem DATA --out STRAIN.h5 [...]``; run it with :data:`BASELINE_ENV`."""
    ap = argparse.ArgumentParser(
        prog="python -m ccstae_jax.baselines.py4dstem",
        description="py4DSTEM correlation strain-mapping baseline: DATA (any file open_scan reads) -> strain-map "
        "HDF5 (/strain_xx, /strain_yy, /shear_xy, /rotation [rad], /valid, ...). Absolute real-space lattice "
        "strain, x = Qx = pattern rows; rotation modulo the lattice symmetry. Pixel values refer to the patterns "
        "as read (after crop and binning).",
    )
    ap.add_argument("data")
    ap.add_argument("--out", required=True, help="output strain-map HDF5 (written atomically)")
    ap.add_argument("--key", default=None, help="dataset path inside DATA (default: found automatically)")
    ap.add_argument("--transpose", type=int, nargs=4, default=None, metavar="AX")
    ap.add_argument("--crop", type=int, nargs=4, default=None, metavar=("Q0", "Q1", "Q2", "Q3"))
    ap.add_argument("--binning", type=int, default=1)
    ap.add_argument("--probe-radius", type=float, default=None, help="disk radius, px (default: file attrs)")
    ap.add_argument("--g1-length", type=float, default=None, help="unstrained |g1|, px (default: file attrs)")
    ap.add_argument("--lattice", choices=tuple(LATTICE_ANGLE_DEG) + tuple(LATTICE_ALIASES), default=None,
                    help="default: file attrs, else hex")
    ap.add_argument("--reference-region", type=int, nargs=4, default=None, metavar=("R0", "R1", "C0", "C1"),
                    help="stored in the output for evaluation (default: the data file's)")
    ap.add_argument("--config-json", default=None, help="JSON object of Py4DSTEMConfig fields (overrides)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    _import_py4dstem()  # fail fast, before reading any data
    from ccstae_jax.data.readers import open_scan

    attrs = _file_attrs(a.data)
    binning = int(a.binning)
    overrides = json.loads(a.config_json) if a.config_json else {}
    names = {f.name for f in dataclasses.fields(Py4DSTEMConfig)}
    if set(overrides) - names:
        raise ValueError(f"--config-json: unknown Py4DSTEMConfig keys {sorted(set(overrides) - names)}")
    overrides = _tuple_fields(overrides)
    if a.probe_radius is not None:
        overrides["probe_radius_px"] = a.probe_radius
    geometry = {k: attrs[k] for k in ("phases", "ellipticity", "vacuum") if k in attrs}
    if "disk_radius_px" in attrs or "disk_radius" in attrs:  # file attrs are unbinned detector pixels
        geometry["disk_radius_px"] = float(_attr(attrs, "disk_radius_px", "disk_radius")) / binning
    if "disk_edge_px" in attrs or "disk_edge" in attrs:
        geometry["disk_edge_px"] = float(_attr(attrs, "disk_edge_px", "disk_edge")) / binning
    config = config_from_attrs(geometry, **overrides)
    lattice = canonical_lattice(a.lattice or _lattice_from_attrs(attrs) or "hex")
    g1 = a.g1_length
    g1_source = "argument"
    if g1 is None:
        try:
            g1 = g1_length_from_attrs(attrs, lattice=lattice) / binning
            g1_source = "file attributes"
        except ValueError:
            g1, g1_source = None, None
    g1_angle = _attr(attrs, "g1_angle_deg")
    crop = None if a.crop is None else ((a.crop[0], a.crop[1]), (a.crop[2], a.crop[3]))
    with open_scan(a.data, key=a.key, transpose=a.transpose, crop=crop, binning=binning) as scan:
        maps = py4dstem_strain_map(
            scan,
            config=config,
            g1_length_px=g1,
            lattice=lattice,
            g1_angle_deg=None if g1_angle is None else float(g1_angle),
            lattice_aspect=lattice_aspect_from_attrs(attrs),
            progress=not a.no_progress,
        )
    if g1_source == "file attributes":
        params = json.loads(maps["parameters"])
        params["g1_length_source"] = "file attributes (lattice_constant, q_pixel)"
        maps["parameters"] = json.dumps(params)
    extra: dict[str, Any] = {"source": os.path.abspath(a.data), "method": "py4dstem",
                             "symmetry": lattice_symmetry(lattice)}
    region = a.reference_region if a.reference_region is not None else attrs.get("reference_region")
    if region is not None:
        extra["reference_region"] = np.asarray(region, np.int64)
    for k in ("noise_level", "seed"):
        if k in attrs:
            extra[k] = attrs[k]
    write_strain_h5(a.out, maps, attrs=extra)
    params = json.loads(maps["parameters"])
    print(
        f"py4DSTEM baseline: {a.out} ({params['valid_fraction']:.1%} of positions valid, "
        f"{params['ms_per_pattern']['detect']:.1f} ms/pattern detection)"
    )
    return 0


def run_baseline_subprocess(
    data_path,
    out_path,
    *,
    config: Py4DSTEMConfig | None = None,
    probe_radius_px: float | None = None,
    g1_length_px: float | None = None,
    lattice: str | None = None,
    key: str | None = None,
    transpose=None,
    crop=None,
    binning: int = 1,
    reference_region=None,
    python: str | None = None,
    progress: bool = False,
    timeout: float | None = None,
) -> str:
    """Run the baseline on a data file in a fresh Python process with :data:`BASELINE_ENV`, and wait.

    This is how a JAX process (the CLI, the noise-sweep benchmark) should call the baseline: numpy's BLAS thread
    count can only be fixed before numpy is imported, and py4DSTEM's GPL code stays out of the caller's process.

    Args:
        data_path: Input data file (read with ``ccstae_jax.data.readers.open_scan``).
        out_path: Output strain-map HDF5 (see :func:`write_strain_h5`).
        config: Parameters; ``None`` = defaults with the disk geometry from the file attributes.
        probe_radius_px: Disk radius (px of the patterns as read); overrides ``config`` and the file attributes.
        g1_length_px: Unstrained |g1| (px as read); ``None`` = from the file attributes (divided by ``binning``).
        lattice: ``"hex"``/``"square"``/``"rect"``; ``None`` = from the file attributes, else hex.
        key, transpose, crop, binning: as ``open_scan`` (``crop`` = ``((q0, q1), (q2, q3))``).
        reference_region: (r0, r1, c0, c1) stored in the output for evaluation (default: the data file's).
        python: Interpreter with py4DSTEM installed; default ``$CCSTAE_BASELINE_PYTHON``, else this one.
        progress: Let the child show its progress bar (on this process's stderr).
        timeout: Seconds before the child is killed (``subprocess.TimeoutExpired``).

    Returns:
        ``out_path`` as a string.

    Raises:
        BaselineUnavailable: py4DSTEM is not importable by ``python``.
        RuntimeError: the child failed (its last stderr lines are in the message).
    """
    python = python or os.environ.get("CCSTAE_BASELINE_PYTHON") or sys.executable
    cmd = [python, "-m", "ccstae_jax.baselines.py4dstem", os.fspath(data_path), "--out", os.fspath(out_path)]
    if key is not None:
        cmd += ["--key", str(key)]
    if transpose is not None:
        cmd += ["--transpose", *[str(int(t)) for t in transpose]]
    if crop is not None:
        (q0, q1), (q2, q3) = crop
        cmd += ["--crop", *[str(int(q)) for q in (q0, q1, q2, q3)]]
    if int(binning) != 1:
        cmd += ["--binning", str(int(binning))]
    if probe_radius_px is not None:
        cmd += ["--probe-radius", repr(float(probe_radius_px))]
    if g1_length_px is not None:
        cmd += ["--g1-length", repr(float(g1_length_px))]
    if lattice is not None:
        cmd += ["--lattice", lattice]
    if reference_region is not None:
        cmd += ["--reference-region", *[str(int(r)) for r in reference_region]]
    if config is not None:
        d = config.to_dict()
        if probe_radius_px is not None:
            d.pop("probe_radius_px")
        cmd += ["--config-json", json.dumps(d)]
    if not progress:
        cmd.append("--no-progress")
    env = {**os.environ, **BASELINE_ENV}
    if progress:
        env.pop("TQDM_DISABLE", None)
    pipe = None if progress else subprocess.PIPE
    proc = subprocess.run(cmd, env=env, stdout=pipe, stderr=pipe, text=True, timeout=timeout)
    if proc.returncode != 0:
        if proc.returncode == _EXIT_UNAVAILABLE:
            raise BaselineUnavailable(
                f"{python} cannot import py4DSTEM. Install the optional extra: {INSTALL_HINT}, or point "
                "CCSTAE_BASELINE_PYTHON at an interpreter that has it"
            )
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise CcstaeError(f"py4DSTEM baseline failed (exit {proc.returncode}) on {data_path}:\n{tail}")
    return os.fspath(out_path)


def run_cli(args) -> None:
    """Entry for ``ccstae baseline DATA --out STRAIN.h5``: runs :func:`run_baseline_subprocess` from parsed args.

    Uses ``args.data``, ``args.out`` and, when present, ``key``, ``transpose``, ``crop`` (4 ints), ``binning``,
    ``probe_radius``, ``g1_length``, ``reference_region``, ``quiet``.
    """
    crop = getattr(args, "crop", None)
    run_baseline_subprocess(
        args.data,
        args.out,
        key=getattr(args, "key", None),
        transpose=getattr(args, "transpose", None),
        crop=None if crop is None else ((crop[0], crop[1]), (crop[2], crop[3])),
        binning=getattr(args, "binning", 1) or 1,
        probe_radius_px=getattr(args, "probe_radius", None),
        g1_length_px=getattr(args, "g1_length", None),
        reference_region=getattr(args, "reference_region", None),
        progress=not getattr(args, "quiet", False),
    )
    print(f"py4DSTEM baseline strain maps written to {args.out}")
