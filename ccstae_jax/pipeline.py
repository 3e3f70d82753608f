"""The user's jobs as functions: train a run on a scan, map strain with it, evaluate a map, the end-to-end demo.

Each takes paths and options and returns plain results; `ccstae_jax.cli` is a thin layer over these.
A run directory holds ``model.json`` (model, loss and data options), ``config.json`` and ``checkpoints/`` (the
training engine's), and ``metrics.jsonl``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ccstae_jax import atomic
from ccstae_jax.data.readers import DataError, load_labels, open_scan, reference_region_from_file
from ccstae_jax.data.simulate import SimulationConfig, simulate_to_hdf5
from ccstae_jax.evaluate.metrics import error_table, format_table, referenced_labels
from ccstae_jax.mapping.fit import BASE_BLUR, DEFAULT_FLOOR, FLOOR_GAIN, INTERPOLATIONS, LOW_FLOOR
from ccstae_jax.mapping.phases import MIN_MISMATCH, PHASE_SEPARATION
from ccstae_jax.mapping.predict import (MapConfig, map_scan, margin_for, rigid_spots_for, scale_spots_for,
                                        subset_rows)
from ccstae_jax.mapping.reference import map_warnings, region_mask, strain_maps
from ccstae_jax.model.geometry import SYMMETRIES, GeometryError, measure_geometry
from ccstae_jax.model.networks import ModelConfig
from ccstae_jax.report import plots
from ccstae_jax.report.files import read_strain_h5, write_strain_h5
from ccstae_jax.report.frames import frame_attrs, image_frame_maps
from ccstae_jax.train.config import TrainConfig
from ccstae_jax.train.loop import fit, load_checkpoint
from ccstae_jax.train.losses import LossConfig, data_frame_mask
from ccstae_jax.train.objective import CCSTAETask, configure
from ccstae_jax.train.parallel import is_main_process

MODEL_FILE = "model.json"

#: Patterns a default training shows the network (`default_epochs`).
TRAINING_PATTERNS = 3_000

# Training defaults per preset (learning rates tuned on simulated WS2 scans); epochs None = `default_epochs`.
PRESET_TRAINING = {
    "fast": dict(learning_rate=1e-3, batch_size=16, epochs=None, schedule="cosine", min_lr_ratio=0.05),
    "reference": dict(learning_rate=3e-5, batch_size=4, epochs=20, schedule="bold_driver"),
}


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How to read a scan (saved with the run so `map` reads the data the same way).

    ``allow_negative``: accept negative values (e.g. dark-subtracted detector frames) and use them as they are;
    by default a scan holding any negative value is refused (see `check_values`). ``format`` (None = from the file
    name) and ``scan_shape`` ``(rows, cols)`` (for files that store frames without one) are passed to
    `ccstae_jax.data.readers.open_scan`.
    """

    key: str | None = None
    transpose: tuple[int, int, int, int] | None = None
    crop: tuple[tuple[int, int], tuple[int, int]] | None = None
    binning: int = 1
    allow_negative: bool = False
    format: str | None = None
    scan_shape: tuple[int, int] | None = None

    def open(self, path, *, check_finite: bool = True):

        return open_scan(path, key=self.key, transpose=self.transpose, crop=self.crop, binning=self.binning,
                         check_finite=check_finite, format=self.format, scan_shape=self.scan_shape)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataOptions":
        t = d.get("transpose")
        c = d.get("crop")
        return cls(key=d.get("key"), transpose=tuple(t) if t else None,
                   crop=tuple(tuple(x) for x in c) if c else None, binning=int(d.get("binning", 1)),
                   allow_negative=bool(d.get("allow_negative", False)), format=d.get("format"),
                   scan_shape=tuple(int(v) for v in d["scan_shape"]) if d.get("scan_shape") else None)


_CHECK_BLOCK_BYTES = 16 * 2**20  # patterns read per block by `check_values`


def check_values(scan, *, allow_negative: bool = False) -> dict[str, int]:
    """Streams the whole scan once (bounded memory) and refuses values no strain map can be made from.

    Raises `ccstae_jax.data.readers.DataError` (one line: file, key, how many, first scan position and pixel,
    what was expected) when the scan holds NaN/Inf values, negative values (unless ``allow_negative``), or only
    blank (all-zero) patterns. Negative values within round-off of zero (``|min| <= 1e-6 * max``, as simulations
    computed with FFTs produce) are accepted. Some blank patterns are accepted: `map_strain` marks them invalid.

    Args:
      scan: an open `ccstae_jax.data.readers.Scan` (best opened with ``check_finite=False``: this counts them all).
      allow_negative: accept negative values.

    Returns:
      ``{"n_positions", "n_blank", "n_negative"}`` (patterns that are all zero; negative values found).
    """

    where = f"{scan.path}: key {scan.key!r}" if scan.key else f"{scan.path}"
    rx, ry = scan.scan_shape
    h, w = scan.pattern_shape
    rows = max(1, _CHECK_BLOCK_BYTES // max(1, 4 * ry * h * w))
    counts = {"nonfinite": 0, "negative": 0}
    touched = {"nonfinite": 0, "negative": 0}
    first: dict[str, tuple] = {}
    n_blank, minimum, maximum = 0, 0.0, 0.0
    check_negative = scan.stored_dtype.kind != "u"
    for r0 in range(0, rx, rows):
        start = r0 * ry
        block = scan.read(start, min(rx, r0 + rows) * ry)
        nonfinite = ~np.isfinite(block)
        found = {"nonfinite": nonfinite if nonfinite.any() else None}
        if found["nonfinite"] is None:
            maximum = max(maximum, float(block.max()))
            if check_negative:
                lo = float(block.min())
                if lo < 0:
                    minimum = min(minimum, lo)
                    found["negative"] = block < 0
        for name, bad in found.items():
            if bad is None:
                continue
            counts[name] += int(bad.sum())
            touched[name] += int(bad.any(axis=(1, 2)).sum())
            if name not in first:
                i, qx, qy = (int(v) for v in np.argwhere(bad)[0])
                first[name] = (divmod(start + i, ry), (qx, qy))
        n_blank += int((block == 0).all(axis=(1, 2)).sum())

    def at(name):
        (r, c), (qx, qy) = first[name]
        return f"first at scan position ({r}, {c}) pixel ({qx}, {qy}) (after transpose/crop/binning)"

    if counts["nonfinite"]:
        raise DataError(f"{where}: {counts['nonfinite']} non-finite value(s) (NaN/Inf) in {touched['nonfinite']} of "
                        f"{scan.n_positions} patterns, {at('nonfinite')}; expected finite intensities")
    if counts["negative"] and not allow_negative and -minimum > 1e-6 * maximum:
        raise DataError(f"{where}: {counts['negative']} negative value(s) (minimum {minimum:g}, maximum {maximum:g}) "
                        f"in {touched['negative']} of {scan.n_positions} patterns, {at('negative')}; expected "
                        "non-negative counts (pass --allow-negative to use them as they are, e.g. dark-subtracted "
                        "frames)")
    if n_blank == scan.n_positions:
        raise DataError(f"{where}: all {scan.n_positions} patterns are blank (every value is 0); expected "
                        "diffraction intensities")
    return {"n_positions": scan.n_positions, "n_blank": n_blank, "n_negative": counts["negative"]}


def _check_data(data: "DataOptions", data_path) -> None:
    """`check_values` on a second, unchecked view of the scan (so that every NaN/Inf is counted)."""
    with data.open(data_path, check_finite=False) as scan:
        check_values(scan, allow_negative=data.allow_negative)


def sample_patterns(scan, n: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` patterns spread over the scan, read as whole scan rows (the files are chunked by row): rows evenly
    spaced, every ``k``-th pattern of each. Returns ``(patterns (N, H, W) float32, positions (N, 2) scan row/col)``."""
    rx, ry = scan.scan_shape
    n = max(1, min(n, scan.n_positions))
    n_rows = min(rx, max(1, int(np.ceil(np.sqrt(n * rx / ry)))))
    rows = np.unique(np.linspace(0, rx - 1, n_rows).round().astype(int))
    step = max(1, int(np.ceil(len(rows) * ry / n)))
    cols = np.arange(0, ry, step)
    images = np.concatenate([scan.read(int(r) * ry, (int(r) + 1) * ry)[cols] for r in rows]).astype(np.float32)
    positions = np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    return images, positions


def load_run(run_dir: str | os.PathLike):
    """``(task, data_options, saved dict)`` of a run directory written by `train`."""

    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a ccstae run directory (train one first)")
    try:
        saved = json.loads(path.read_text())
        task = CCSTAETask(ModelConfig.from_dict(saved["model"]), LossConfig.from_dict(saved["loss"]))
        data = DataOptions.from_dict(saved.get("data", {}))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupt or from another version: {e}") from None
    return task, data, saved


def train(
    data_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    preset: str = "fast",
    data: DataOptions = DataOptions(),
    ring: tuple[float, float] | str = "auto",
    symmetry: int | None = None,
    model_overrides: dict | None = None,
    loss_overrides: dict | None = None,
    train_overrides: dict | None = None,
    progress: bool = True,
):
    """Trains (or resumes) a CC-ST-AE run on a scan; returns the training engine's `FitResult`.

    The model is sized from about a thousand patterns spread over the scan: their geometry (zero beam and descan,
    disk radius, spot spacing, lattice symmetry and the radii derived from them, `ccstae_jax.model.geometry`; ``ring``
    and ``symmetry`` override the measured ones) and intensity scale; a scan with no measurable lattice is refused. The
    number of epochs defaults to what `default_epochs` gives the scan's size. Rerunning the same command with the
    same ``run_dir`` resumes from its latest checkpoint; a different model configuration (preset, ``ring``,
    ``symmetry``, model/loss overrides, data options) is refused. Before anything is written, the whole scan is checked
    once (`check_values`: no NaN/Inf, no negative values unless ``data.allow_negative``, not all blank), an explicit
    ``ring`` must fit the patterns, and ``run_dir`` must be creatable. With ``progress`` it prints what was read
    (`describe_scan`) and reports each epoch (a bar on a terminal, else one line per epoch).
    """

    run_dir = Path(run_dir)
    _check_run_dir_target(run_dir)
    with data.open(data_path) as scan:
        if progress:
            _say(describe_scan(scan))
        if (run_dir / MODEL_FILE).exists():
            task, saved_data, _ = load_run(run_dir)
            if saved_data != data:
                raise ValueError(f"{run_dir} was trained with data options {saved_data.to_dict()}, "
                                 f"not {data.to_dict()}; use another --out directory")
            if task.model_cfg.preset != preset:
                raise ValueError(f"{run_dir} holds a '{task.model_cfg.preset}' run, not '{preset}'; "
                                 "use another --out directory")
            _check_same_settings(run_dir, task, ring=ring, symmetry=symmetry, model_overrides=model_overrides,
                                 loss_overrides=loss_overrides)
            _check_data(data, data_path)
            sample, _ = sample_patterns(scan)
        else:
            if ring != "auto":
                _check_ring(ring, scan.pattern_shape, data_path)
            if symmetry is not None and int(symmetry) not in SYMMETRIES:
                raise ValueError(f"--symmetry {symmetry}: expected one of {SYMMETRIES}")
            _check_data(data, data_path)
            sample, positions = sample_patterns(scan)
            try:
                geometry = measure_geometry(sample, positions=positions, scan_shape=scan.scan_shape,
                                            symmetry=symmetry, ring=None if ring == "auto" else ring)
            except GeometryError as e:
                raise GeometryError(f"{data_path}: {e}") from None
            epochs = (train_overrides or {}).get("epochs", PRESET_TRAINING.get(preset, {}).get("epochs"))
            loss_overrides = {**_short_schedule(epochs or default_epochs(scan.n_positions)),
                              **(loss_overrides or {})}
            model_cfg, loss_cfg = configure(sample, preset=preset, geometry=geometry,
                                            model_overrides=model_overrides, loss_overrides=loss_overrides)
            task = CCSTAETask(model_cfg, loss_cfg)
        if progress:
            _say(f"geometry: {task.geometry.describe()}")
            k = task.model_cfg.num_bases
            _say(f"dictionary: {k} base{'s' if k > 1 else ''}" + (
                " (a lattice mismatch between phases reads as strain; --num-bases K learns one base per phase and "
                "maps which phase is where)" if k == 1 else ", one per phase; the map's /phase says which is where"))
        if tuple(scan.pattern_shape) != tuple(task.model_cfg.pattern_shape):
            raise ValueError(f"{data_path}: patterns are {scan.pattern_shape}, the run's model expects "
                             f"{task.model_cfg.pattern_shape}")
        tdict = dict(PRESET_TRAINING.get(preset, {}))
        tdict.update(train_overrides or {})
        if tdict.get("epochs") is None:
            tdict["epochs"] = default_epochs(scan.n_positions)
        tcfg = TrainConfig(**tdict)
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {**task.config_dict(), "data": data.to_dict(), "data_path": os.path.abspath(data_path)}
        if not (run_dir / MODEL_FILE).exists():
            atomic.write_json(run_dir / MODEL_FILE, record)
        n_proc, proc = jax.process_count(), jax.process_index()
        if tcfg.batch_size % n_proc:
            raise ValueError(f"--batch-size {tcfg.batch_size} must be divisible by the process count {n_proc}")
        per_process = tcfg.batch_size // n_proc
        steps = scan.num_batches(per_process, process_count=n_proc)

        def batches(epoch: int):
            return scan.batches(per_process, shuffle=True, seed=tcfg.seed, epoch=epoch, pad=True,
                                process_index=proc, process_count=n_proc)

        return fit(task, batches, tcfg, run_dir, steps_per_epoch=steps, sample_images=_spread(sample, tcfg.batch_size),
                   task_config=task.config_dict(), progress=progress)


def default_epochs(n_positions: int) -> int:
    """Epochs of a default training: enough passes to show the network about `TRAINING_PATTERNS` patterns, between 3
    and 20 (a scan of at most 150 positions is seen 20 times, one of 1,000 or more 3 times). The map's per-pattern
    fit, not the encoder, sets the accuracy, so long trainings buy little."""
    return int(np.clip(np.ceil(TRAINING_PATTERNS / max(n_positions, 1)), 3, 20))


def _short_schedule(epochs: int) -> dict:
    """Mask-schedule settings that fit a short training: the ring alone for the first epoch (or none of a 3-epoch
    training), the spot disks fully shrunk by the last epoch."""
    lc = LossConfig()
    start = float(min(lc.shrink_start, max(epochs - 2, 0)))
    return {"shrink_start": start, "shrink_epochs": float(min(lc.shrink_epochs, max(epochs - 1 - start, 1)))}


def _spread(images: np.ndarray, n: int) -> np.ndarray:
    """``n`` of the patterns, evenly spread (the sample is in scan order)."""
    idx = np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int))
    return images[idx]


def _check_run_dir_target(run_dir: Path) -> None:
    """Refuses a run directory that cannot be created or written, before any work is done."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise OSError(f"--out {run_dir} is an existing file, expected a run directory (new or to resume)")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise OSError(f"--out {run_dir}: directory is not writable")
        return
    parent = run_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OSError(f"--out {run_dir}: cannot create the run directory, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"--out {run_dir}: cannot create the run directory, {parent} is not writable")


def _check_ring(ring, pattern_shape, data_path) -> None:
    """``--ring INNER OUTER`` must lie inside the (cropped, binned) pattern: ``0 <= inner < outer <= min(H, W) / 2``."""
    inner, outer = (float(v) for v in ring)
    h, w = pattern_shape
    half = min(h, w) / 2
    if not (np.isfinite(inner) and np.isfinite(outer) and 0 <= inner < outer <= half):
        raise ValueError(f"--ring {inner:g} {outer:g}: the loss ring does not fit the {h}x{w} patterns of {data_path} "
                         f"(after crop/binning); expected 0 <= inner < outer <= {half:g} pixels")


def _norm(value):
    return json.loads(json.dumps(value))


def _check_same_settings(run_dir: Path, task, *, ring, symmetry=None, model_overrides, loss_overrides) -> None:
    """Refuses explicit model settings (``--ring``, ``[model]``/``[loss]`` config, ``--dtype``) that differ from the
    existing run's, instead of silently resuming with the saved ones."""
    problems = []
    if symmetry is not None and int(symmetry) != task.geometry.symmetry:
        problems.append(f"--symmetry {symmetry} (the run uses {task.geometry.symmetry})")
    if ring != "auto":
        saved = task.geometry.ring
        if tuple(float(v) for v in ring) != tuple(float(v) for v in saved):
            problems.append(f"--ring {float(ring[0]):g} {float(ring[1]):g} (the run uses {saved[0]:g} {saved[1]:g})")
    for name, saved_cfg, over in (("model", task.model_cfg.to_dict(), model_overrides),
                                  ("loss", task.loss_cfg.to_dict(), loss_overrides)):
        for k, v in (over or {}).items():
            if k not in saved_cfg:
                problems.append(f"[{name}] {k} (not a {name} setting)")
            elif _norm(saved_cfg[k]) != _norm(v):
                problems.append(f"[{name}] {k} = {_norm(v)!r} (the run uses {_norm(saved_cfg[k])!r})")
    if problems:
        raise ValueError(f"{run_dir} holds a run with other model settings: {'; '.join(problems)}; rerun without "
                         "them to resume it, or use another --out directory")


def _check_output_file(out_path: Path, data_path) -> None:
    """Refuses an output path that cannot be written, or that would replace the input data, before any work."""
    parent = out_path.absolute().parent
    if not parent.exists():
        raise OSError(f"cannot write {out_path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise OSError(f"cannot write {out_path}: {parent} is not a directory")
    if out_path.is_dir():
        raise OSError(f"cannot write {out_path}: it is a directory, expected an .h5 file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot write {out_path}: directory {parent} is not writable")
    if out_path.exists() and Path(data_path).exists() and os.path.samefile(out_path, data_path):
        raise OSError(f"--out {out_path} is the input data file {data_path}; choose another output name")


def map_strain(
    run_dir: str | os.PathLike,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    reference_region: tuple[int, int, int, int] | None = None,
    batch_size: int = MapConfig.batch_size,
    which: str = "latest",
    data: DataOptions | None = None,
    figures: str | os.PathLike | None = None,
    refine_steps: int = MapConfig.steps,
    base_update: bool = MapConfig.base_update,
    interpolation: str = MapConfig.interpolation,
    rigid_spots: bool | None = MapConfig.rigid_spots,
    scale_spots: bool = MapConfig.scale_spots,
    allow_negative: bool | None = None,
    scan_rotation: float | None = None,
    correct_distortion: bool | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Maps strain over a scan with a trained run and writes ``out_path`` (HDF5, atomic). Returns the maps.

    Each pattern's warp is fitted (``refine_steps`` Levenberg-Marquardt iterations of the Poisson forward model,
    `ccstae_jax.mapping.fit`; 0 = the encoder's warps as they are) against bases re-estimated from the aligned
    patterns of a subset of the scan (``base_update``; else the learned bases), interpolated with ``interpolation``
    (``"cubic"``, Keys, or ``"bilinear"``), the whole base stretched by the warp or, with ``rigid_spots`` (None: when
    the run's disks are wide), each spot moved rigidly with its centre, and with ``scale_spots`` each pattern's spots
    also scaled by a free factor (not with rigid spots); see `ccstae_jax.mapping.predict`. The map records each
    position's 1-sigma error (``/uncertainty``, with a fit) and validity.

    The reference region is, in order: ``reference_region``; the one stored in the data file; else the whole scan.
    Its lattice is `ccstae_jax.mapping.reference.reference_deformation`: the error-weighted mean of its positions
    within their errors of the median, else the median lattice. ``correct_distortion`` removes an elliptical detector
    distortion measured on the reference region (`ccstae_jax.mapping.reference`; None = when the bases are
    symmetrised over 4 or 6 rotations).
    ``allow_negative`` (None = the run's data option) accepts negative values in the scan.

    Maps are in the detector frame. ``scan_rotation`` (degrees, `ccstae_jax.report.frames`: counter-clockwise from the
    scan's row axis to the image direction of detector +Qx) also writes them turned into the image frame under
    ``/image_frame/``. The file's root attributes record the frames (`ccstae_jax.report.frames.frame_attrs`) and the
    data file's calibration (``q_pixel`` in 1/Angstrom, ``scan_step`` in Angstrom) when it has one.

    Bad input is refused before the checkpoint is loaded: an output path that cannot be written (or is the input),
    a reference region outside the scan, and values `check_values` refuses (NaN/Inf, negative, all blank). The
    output is written under a temporary name and renamed (`ccstae_jax.atomic`), so ``out_path`` never holds a
    partial file; temporary files left by killed earlier runs are removed.
    """
    out_path = Path(out_path)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected a positive integer")
    if isinstance(refine_steps, bool) or int(refine_steps) != refine_steps or refine_steps < 0:
        raise ValueError(f"--refine-steps {refine_steps}: expected an integer >= 0")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    config = MapConfig(steps=int(refine_steps), base_update=base_update, interpolation=interpolation,
                       rigid_spots=None if rigid_spots is None else bool(rigid_spots), batch_size=int(batch_size),
                       scale_spots=bool(scale_spots))
    if scan_rotation is not None and not np.isfinite(float(scan_rotation)):
        raise ValueError(f"--scan-rotation {scan_rotation}: expected a finite angle in degrees")
    _check_output_file(out_path, data_path)
    task, saved_data, _ = load_run(run_dir)
    data = saved_data if data is None else data
    if allow_negative is not None:
        data = dataclasses.replace(data, allow_negative=bool(allow_negative))
    cfg = task.model_cfg
    if correct_distortion is None:
        correct_distortion = cfg.symmetrize_bases and cfg.symmetry >= 4
    with data.open(data_path) as scan:
        if progress:
            _say(describe_scan(scan))
        if tuple(scan.pattern_shape) != tuple(cfg.pattern_shape):
            raise ValueError(f"{data_path}: patterns are {scan.pattern_shape} (after crop/binning) but the run in "
                             f"{run_dir} was trained on {cfg.pattern_shape}")
        region_from = "--reference-region"
        if reference_region is None:
            reference_region = reference_region_from_file(data_path)
            region_from = f"the reference_region attribute of {data_path}"
        if reference_region is not None:
            try:
                region_mask(scan.scan_shape, reference_region)  # validates before the long inference
            except ValueError as e:
                raise ValueError(f"{region_from} {tuple(reference_region)}: {e}") from None
        _check_data(data, data_path)
        sample = scan.read(0, 1)
        state = load_checkpoint(run_dir, task, np.repeat(sample, 2, 0), which=which)
        update = bool(config.base_update and config.steps)
        rigid = rigid_spots_for(config, cfg.geometry)
        if progress and rigid and config.rigid_spots is None:
            _say(f"rigid spots: the disks are wide ({cfg.geometry.disk_size()}); each moves with its centre instead of "
                 "being stretched (--no-rigid-spots: stretched)")
        n_subset = min(scan.n_positions, len(subset_rows(scan.scan_shape, config.subset)) * scan.scan_shape[1])
        bases_bar = _progress(n_subset, "map (bases)", progress) if update else None
        bar = _progress(scan.n_positions, "map", progress)
        try:
            preds = map_scan(task, state.params, scan, config, progress=bar, bases_progress=bases_bar)
        finally:
            for b in (bases_bar, bar):
                if b is not None:
                    b.close()
        try:
            maps = strain_maps(preds, scan.scan_shape, scan.pattern_shape, reference_region=reference_region,
                               symmetry=cfg.symmetry, correct_distortion=correct_distortion)
        except ValueError as e:
            if "no valid positions" not in str(e):
                raise
            where = "the whole scan" if reference_region is None else f"reference region {tuple(reference_region)}"
            raise ValueError(f"{data_path}: cannot reference the strain to {where}: {e} (its patterns are blank, "
                             "carry no lattice signal or gave non-finite predictions); choose another "
                             "--reference-region") from None
        distortion = maps.pop("distortion")
        split = maps.pop("phase_split")
        error_scale = maps.pop("error_scale")
        attrs = {
            "method": f"ccstae-jax {cfg.preset}",
            "run_dir": os.path.abspath(run_dir),
            "data_path": os.path.abspath(data_path),
            "reference_region": list(reference_region) if reference_region is not None else "whole scan",
            "symmetry": cfg.symmetry,
            "checkpoint": which,
            "refine_steps": config.steps,
            "base_update": update,
            "interpolation": config.interpolation if config.steps else "none",
            "rigid_spots": rigid,
            "scale_spots": scale_spots_for(config, cfg.geometry),
            "base_margin": margin_for(config, cfg),
            "strain_reference": "relative",
            "geometry": json.dumps(cfg.geometry.to_dict()),
            "distortion_corrected": bool(correct_distortion),
            "distortion_ellipticity": distortion.ellipticity,
            "distortion_angle": distortion.angle,
            "phases": split.n_phases,
            "phase_separation": split.separation,
            "phase_mismatch": split.mismatch,
            "error_scale": error_scale,
            "noise_weight": float(preds.get("noise_weight", np.nan)),
            "fit_floor": float(preds.get("fit_floor", np.nan)),
            "floor_ratio": float(preds.get("floor_ratio", np.nan)),
            "fit_blur": float(preds.get("fit_blur", np.nan)),
            "blur_ratio": float(preds.get("blur_ratio", np.nan)),
        }
        flags = map_warnings(maps, geometry=cfg.geometry, rigid_spots=rigid)
        attrs["quality"] = "flagged" if flags else "ok"
        attrs["quality_warnings"] = json.dumps(flags)
        if progress:
            if "noise_weight" in preds:
                _say(f"fit weights: shot noise {100 * preds['noise_weight']:.0f} % of the variance (measured between "
                     "neighbouring patterns and in the fits' residuals; 0 % = unweighted, as for noise-free data)")
                _say(_floor_line(float(preds["fit_floor"]), float(preds["floor_ratio"])))
                _say(_blur_line(float(preds["fit_blur"]), float(preds["blur_ratio"])))
            _report_map(maps, distortion, correct_distortion, error_scale)
            if cfg.num_bases == 1:
                _say(_phase_line(split))
        for flag in flags:  # shown even without progress output
            print(f"ccstae map: WARNING: {flag}", file=sys.stderr, flush=True)
        attrs.update(frame_attrs(scan_rotation, scan.calibration))
        written = maps if scan_rotation is None else {**maps, **image_frame_maps(maps, scan_rotation)}
        atomic.remove_stale(out_path)
        write_strain_h5(out_path, written, attrs=attrs)
        if figures is not None:
            save_run_figures(figures, run_dir, data_path, task, state, scan, maps, reference_region=reference_region,
                             flags=flags)
            if scan_rotation is not None:
                plots.plot_strain_frames(maps, Path(figures) / "strain_frames.png", scan_rotation=scan_rotation)
    return maps


def _phase_line(split) -> str:
    """Console line on the phases a one-base map found (`ccstae_jax.mapping.phases`)."""
    if split.n_phases == 2:
        return (f"phases: 2 (their lattice spacing and diffraction-order intensities differ by {split.separation:.1f} "
                f"standard deviations; phase 1's lattice is {100 * split.mismatch:+.1f} % from phase 0's); /phase "
                "says which is where, 0 being the reference region's")
    if not np.isfinite(split.separation):
        return "phases: 1 (too few valid positions to look for a second)"
    if split.separation < PHASE_SEPARATION:
        return (f"phases: 1 (the best split of the positions in two is {split.separation:.1f} standard deviations "
                f"apart, under the {PHASE_SEPARATION:.0f} two phases need)")
    return (f"phases: 1 (the best split of the positions in two differs in lattice spacing by "
            f"{100 * abs(split.mismatch):.1f} %, under the {100 * MIN_MISMATCH:.0f} % that tells two materials from "
            "differently strained grains)")


def _report_map(maps: dict, distortion, corrected: bool, error_scale: float = 1.0) -> None:
    """Console summary of a map: valid share, median 1-sigma errors (and how much they were widened to the scatter
    of neighbouring positions), detector distortion removed."""
    valid = maps["valid"]
    line = f"map: {int(valid.sum())} of {valid.size} positions valid ({100 * valid.mean():.1f} %)"
    if "uncertainty_strain_xx" in maps and valid.any():
        med = {k: float(np.nanmedian(maps[f"uncertainty_{k}"])) for k in ("strain_xx", "strain_yy", "shear_xy",
                                                                             "rotation")}
        line += (f"; median 1-sigma strain_xx/yy/shear {100 * med['strain_xx']:.3f}/{100 * med['strain_yy']:.3f}/"
                 f"{100 * med['shear_xy']:.3f} %, rotation {np.degrees(med['rotation']):.3f} deg")
        if error_scale > 1:
            line += f" (the fit's, widened x{error_scale:.2f} to the scatter between neighbouring positions)"
    if corrected and distortion.ellipticity > 0:
        line += (f"; detector ellipticity {100 * distortion.ellipticity:.2f} % at "
                 f"{np.degrees(distortion.angle):.0f} deg removed (measured on the reference region)")
    _say(line)


def evaluate(strain_path, labels_path, *, reference_region=None, reference_predictions: bool | None = None) -> dict:
    """Error table of a strain-map file against labels (our simulated file, or the paper's label ``.npy`` files).

    Labels are referenced to the region (argument, else the map's, else the data file's). Maps that are already
    relative to it (``ccstae map``) are scored as they are; absolute maps (attribute ``strain_reference =
    "absolute"``: the py4DSTEM baseline, which knows the unstrained lattice) are referenced to the same region first
    (``reference_predictions=None``, the default; True/False forces it), so every method is scored on the same
    relative quantity.
    """

    maps, attrs = read_strain_h5(strain_path)
    labels = load_labels(labels_path, shape=np.shape(maps["strain_xx"]))
    if labels is None:
        raise ValueError(f"{labels_path} holds no labels (expected /labels/* or Label_*.npy files)")
    if reference_region is None:
        reference_region = _region_from_attrs(attrs) or reference_region_from_file(labels_path)
    if reference_predictions is None:
        reference_predictions = _is_absolute(attrs)
    interior = labels.get("interior")
    return error_table(maps, labels, reference_region=reference_region,
                       symmetry=int(attrs.get("symmetry", 6)), interior=interior,
                       reference_predictions=reference_predictions)


def _is_absolute(attrs: dict) -> bool:
    """Whether a strain file holds absolute strain (against a known lattice) rather than strain relative to a region.
    Baseline files written before the ``strain_reference`` attribute existed are recognised by their method."""
    ref = attrs.get("strain_reference")
    if ref is not None:
        return str(ref) == "absolute"
    return str(attrs.get("method", "")) == "py4dstem"


def _region_from_attrs(attrs: dict):
    region = attrs.get("reference_region")
    if isinstance(region, str):
        try:
            region = json.loads(region)
        except json.JSONDecodeError:
            return None
    if isinstance(region, (list, tuple, np.ndarray)) and len(region) == 4:
        return tuple(int(v) for v in region)
    return None


class _Bar:
    """A tqdm bar that draws its final state once: tqdm draws it on the update that reaches the total and again on
    ``close`` (twice in a log file), so the last update only counts and ``close`` draws."""

    def __init__(self, bar):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        bar = self._bar
        if bar.total is not None and bar.n + n >= bar.total:
            bar.n += n
        else:
            bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None

    return _Bar(tqdm(total=total, desc=desc, unit="pattern", dynamic_ncols=True))


def _say(line: str) -> None:
    """Prints a progress line on process 0 (flushed, so batch-job logs show it at once)."""

    if is_main_process():
        print(line, flush=True)


def describe_scan(scan) -> str:
    """What was read, for the log: file, key, scan and pattern size, how the stored array was reordered, cropped
    and binned, and (on a second line) an axis order worked out from the shape (``Scan.layout_note``)."""
    rx, ry = scan.scan_shape
    h, w = scan.pattern_shape
    logical = tuple(scan.stored_shape[a] for a in scan.transpose)
    steps = []
    if tuple(scan.transpose) != (0, 1, 2, 3):
        steps.append("transpose " + " ".join(str(a) for a in scan.transpose))
    (q0, q1), (q2, q3) = scan.crop
    if (q0, q1, q2, q3) != (0, logical[2], 0, logical[3]):
        steps.append(f"crop rows {q0}:{q1}, columns {q2}:{q3}")
    if scan.binning > 1:
        steps.append(f"binning {scan.binning}")
    how = f"stored {scan.stored_shape} {scan.stored_dtype}" + ("; " + ", ".join(steps) if steps else "")
    key = f", key {scan.key}" if scan.key else ""
    line = f"data {scan.path}{key}: {rx} x {ry} scan positions, {h} x {w} px patterns ({how})"
    return line + ("\n" + scan.layout_note if scan.layout_note else "")


def _shown_position(valid: np.ndarray) -> tuple[int, int]:
    """The scan position whose pattern the figures show: the centre of the scan, else the first valid one."""
    rx, ry = valid.shape
    if valid[rx // 2, ry // 2] or not valid.any():
        return rx // 2, ry // 2
    r, c = np.argwhere(valid)[0]
    return int(r), int(c)


def save_run_figures(out_dir, run_dir, data_path, task, state, scan, maps, *, labels=None, baseline=None,
                     reference_region=None, flags: list[str] | None = None) -> list[str]:
    """The figures of a mapped scan (`ccstae_jax.report.plots.save_all_figures`), titled with the data file and the run.

    Args:
      out_dir: folder for the PNGs (created).
      run_dir, data_path: the run and the scan (for titles, ``metrics.jsonl`` and ``config.json``).
      task, state: the run's task and its restored `ccstae_jax.train.step.TrainState`.
      scan: the open `ccstae_jax.data.readers.Scan` that was mapped.
      maps: `map_strain`'s maps (``theta`` and ``class_index`` included).
      labels, baseline: optional maps drawn as extra rows (referenced like ``maps``).
      reference_region: ``(r0, r1, c0, c1)`` the maps are referenced to, outlined on them; None = whole scan.
      flags: the map's `map_warnings`, named in the titles (None: those of ``maps`` and the run's geometry, for a
        map made with `map_strain`'s defaults).

    Returns:
      The paths written. The pattern figure shows the pattern at the centre of the scan (else the first valid
      position) with the training loss mask of the run's last epoch, carried onto the pattern by its fitted affine.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if flags is None:
        geometry = task.model_cfg.geometry
        flags = map_warnings(maps, geometry=geometry, rigid_spots=rigid_spots_for(MapConfig(), geometry))
    r, c = _shown_position(np.asarray(maps["valid"], bool))
    ry = scan.scan_shape[1]
    pattern = scan.read(r * ry + c, r * ry + c + 1)[0]
    params = state.params
    spe = json.loads((Path(run_dir) / "config.json").read_text()).get("steps_per_epoch", 1)
    epoch = max(0, (int(state.step) - 1) // max(1, int(spe)))  # the epoch of the last trained step
    mask, label = None, "loss mask"
    if not task.model_cfg.interpolate:  # (the up-sampled path's masks live on another grid)
        _, base_mask = task.forward(params, jnp.asarray(np.stack([pattern, pattern])), jnp.int32(epoch))
        label = f"training loss mask of epoch {epoch + 1}"
        if "theta" in maps:
            theta = jnp.asarray(np.repeat(np.asarray(maps["theta"])[r, c][None], 2, 0))
            base_mask = data_frame_mask(base_mask, theta)
            label += ", moved by the fitted affine"
        else:
            label += " (in the base's frame)"
        mask = np.asarray(base_mask)[0] > 0.5
    k = int(np.asarray(maps["class_index"])[r, c]) if "class_index" in maps else None
    pattern_title = f"pattern at scan position ({r}, {c}) (row Rx, column Ry)" + (
        f", matched to base {k}" if k is not None and task.model_cfg.num_bases > 1 else "")
    return plots.save_all_figures(
        out_dir, maps=maps, labels=labels, baseline=baseline, pattern=pattern, mask=mask,
        bases=np.asarray(params["bases"]) if "bases" in params else None,
        metrics_path=str(Path(run_dir) / "metrics.jsonl"),
        title=f"data {Path(data_path).name}, run {Path(run_dir).name}" + _flag_line(flags),
        reference_region=reference_region,
        symmetry=task.model_cfg.symmetry, pattern_title=pattern_title, mask_label=label)


def _floor_line(floor: float, ratio: float) -> str:
    """The console line on the floor of the fit's weights (`MapConfig.floor`)."""
    if not np.isfinite(ratio):
        return f"fit weights: each pixel's variance at least {floor:g} of the brightest pixel's"
    return (f"fit weights: each pixel's variance at least {floor:g} of the brightest pixel's (neighbouring positions "
            f"differed {ratio:.2f}x as much at {LOW_FLOOR:g} as at {DEFAULT_FLOOR:g}; {LOW_FLOOR:g} is kept at "
            f"<= {FLOOR_GAIN:g}x)")


def _blur_line(blur: float, ratio: float) -> str:
    """The console line on the smoothing of the bases' spots for the fit (`MapConfig.blur`)."""
    what = "bases' spots smoothed by a Gaussian of {:g} px".format(blur) if blur > 0 else "bases' spots not smoothed"
    if not np.isfinite(ratio):
        return f"fit: {what}"
    return (f"fit: {what} (neighbouring positions differed {ratio:.2f}x as much with the spots smoothed by "
            f"{BASE_BLUR:g} px as without; smoothing is kept at <= {FLOOR_GAIN:g}x)")


def _flag_line(flags: list[str]) -> str:
    """``"\nFLAGGED: ..."`` (the short form of each `map_warnings` flag) for figure titles; empty for a sound map."""
    return ("\nFLAGGED: " + "; ".join(f.split(":")[0] for f in flags)) if flags else ""


def demo(out_dir: str | os.PathLike = "demo_out", *, scan: int = 24, noise: float = 0.25, epochs: int = 15,
         seed: int = 0, progress: bool = True) -> dict:
    """The README's main job: simulate a small noisy scan, train, map, evaluate, write figures and results.

    Writes ``simulated.h5``, ``run/``, ``strain.h5``, ``figures/*.png`` and ``results.json`` under ``out_dir``; returns
    the error table.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "simulated.h5"
    sim = SimulationConfig(scan_shape=(scan, scan), n_grains=max(4, scan * scan // 64), noise_level=noise, seed=seed)
    if not data_path.exists():
        simulate_to_hdf5(data_path, sim, progress=progress)
    train(data_path, out / "run", preset="fast", train_overrides=dict(epochs=epochs, seed=seed), progress=progress)
    maps = map_strain(out / "run", data_path, out / "strain.h5", progress=progress)
    table = evaluate(out / "strain.h5", data_path)
    labels = load_labels(data_path, shape=(scan, scan))
    region = sim.reference_bounds  # the map's reference: the reference_region attribute of the simulated file
    ref_labels = referenced_labels(labels, reference_region=region)

    task, _, _ = load_run(out / "run")
    with open_scan(data_path) as s:
        state = load_checkpoint(out / "run", task, s.read(0, 2))
        paths = save_run_figures(out / "figures", out / "run", data_path, task, state, s, maps, labels=ref_labels,
                                 reference_region=region)
    result = {"simulation": json.loads(sim.to_json()), "errors": table, "figures": [str(p) for p in paths]}
    atomic.write_json(out / "results.json", result)
    r0, r1, c0, c1 = region
    print(f"Error of the CC-ST-AE map against the simulation's labels, both referenced to the region rows {r0}:{r1}, "
          f"columns {c0}:{c1} (0-based, end excluded); MAE over all valid positions, strain in %, rotation in "
          "degrees:")
    print(format_table(table))
    return table
