"""``ccstae`` command line: simulate, train, map, evaluate, baseline, demo.

Every command prints a one-line error and exits non-zero on bad input (``--verbose`` shows the traceback).
Conventions: data (Rx, Ry, Qx, Qy); x = Qx = pattern rows, y = Qy = pattern columns; strain = real-space lattice
strain (dimensionless, positive = stretched); shear_xy = tensor shear; rotation in radians (files) / degrees (tables),
counter-clockwise from +Qx toward +Qy, modulo 60 degrees for hexagonal lattices, relative to a reference region.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import logging
import sys
import tomllib

from ccstae_jax import compilation_cache, conventions
from ccstae_jax.errors import CcstaeError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_CONVENTIONS = (
    f"Conventions: {conventions.FRAME}. {conventions.STRAIN}. Strain is dimensionless in files and in % in tables "
    "and figures; rotation is in radians in files and degrees in tables and figures, modulo the lattice symmetry; "
    "all relative to a reference region of the scan."
)


def _region(values):
    return None if values is None else tuple(int(v) for v in values)


# ----- defaults shown in --help: read from the code that applies them, never retyped --------------------------------
def _fmt(value) -> str:
    """A default as a user would type it: sequences space-separated, floats in short form."""
    if isinstance(value, (tuple, list)):
        return " ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _arg_default(function, name: str):
    """The default of keyword ``name`` of a library function (what the CLI passes when the option is not given)."""
    return inspect.signature(function).parameters[name].default


class _LibraryDefault:
    """A module constant, or the default of a dataclass field, read when --help is printed (those modules import
    JAX: ``ccstae --help`` stays fast)."""

    def __init__(self, module: str, name: str, field: str | None = None):
        self.module, self.name, self.field = module, name, field

    def __str__(self) -> str:
        value = getattr(importlib.import_module(self.module), self.name)
        if self.field is not None:
            value = next(f.default for f in dataclasses.fields(value) if f.name == self.field)
        return _fmt(value)


def _lazy_default(action, module: str, name: str, field: str | None = None):
    """Lets ``action``'s help say ``%(library_default)s``: `_LibraryDefault`, looked up only when help is shown."""
    action.library_default = _LibraryDefault(module, name, field)
    return action


def _per_preset(name: str) -> str:
    """The training default of each preset, e.g. ``fast: 20, reference: 20`` (`ccstae_jax.pipeline.PRESET_TRAINING`)."""
    from ccstae_jax.pipeline import PRESET_TRAINING

    from ccstae_jax.pipeline import TRAINING_PATTERNS

    def shown(value):
        if value is None:  # epochs from the scan size (pipeline.default_epochs)
            return f"enough to show about {TRAINING_PATTERNS} patterns, 3 to 20"
        return _fmt(value)

    return ", ".join(f"{preset}: {shown(values[name])}" for preset, values in PRESET_TRAINING.items() if name in values)


_REGION_HELP = "scan rows R0:R1 and columns C0:C1 (0-based, R1 and C1 excluded, like Python slices)"


def _data_options(args):
    from ccstae_jax.pipeline import DataOptions

    crop = None
    if args.crop is not None:
        q0, q1, q2, q3 = args.crop
        crop = ((q0, q1), (q2, q3))
    return DataOptions(key=args.key, transpose=tuple(args.transpose) if args.transpose else None, crop=crop,
                       binning=args.binning or 1, allow_negative=bool(getattr(args, "allow_negative", False)),
                       **_format_options(args))


def _format_options(args) -> dict:
    fmt = getattr(args, "format", None)
    shape = getattr(args, "scan_shape", None)
    return {"format": None if fmt in (None, "auto") else fmt, "scan_shape": tuple(shape) if shape else None}


def _add_data_args(p, *, of_run: bool = False):
    """--key, --transpose, --crop, --binning; ``of_run``: for `map`, where they default to the run's."""
    runs = "default: the run's, as it was trained"
    p.add_argument("--key", help="dataset path inside an HDF5/.mat file ("
                   + (runs if of_run else "default: found automatically") + ")")
    p.add_argument("--transpose", type=int, nargs=4, metavar="AX",
                   help="axis order applied to the stored array to get (Rx, Ry, Qx, Qy), like numpy.transpose ("
                   + (runs if of_run else "default: as stored; for a MATLAB v7.3 .mat worked out from the shape "
                      "(square patterns), e.g. 3 2 1 0 for A(Rx, Ry, Qx, Qy), and printed") + "; the paper's .mat: "
                   "1 0 3 2)")
    p.add_argument("--crop", type=int, nargs=4, metavar=("Q0", "Q1", "Q2", "Q3"),
                   help="keep pattern rows Q0:Q1 and columns Q2:Q3, 0-based, Q1 and Q3 excluded ("
                   + (runs if of_run else "default: the whole pattern") + "; the paper's .mat: 28 228 28 228)")
    p.add_argument("--binning", type=int, default=None if of_run else 1,
                   help="sum-bin each pattern by this integer factor (default: "
                   + ("the run's" if of_run else "%(default)s, none") + ")")


def _add_format_args(p, *, of_run: bool = False):
    """--format, --scan-shape; ``of_run``: for `map`, where they default to the run's."""
    from ccstae_jax.data.formats import FORMATS

    p.add_argument("--format", choices=["auto", *FORMATS], default=None,
                   help="file format: hdf5 (.h5/.emd/.hspy/.mat), arina (DECTRIS ARINA/EIGER master .h5), npy, empad "
                        '(.raw/.xml); with the io extra (pip install "ccstae-jax[io]"): mib (Merlin), dm '
                        "(.dm3/.dm4), blo (ASTAR), tvips (default: " + ("the run's, else " if of_run else "")
                        + "auto, from the file's suffix, then its content)")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("ROWS", "COLS"),
                   help="scan rows and columns of files that store frames without them: ARINA/EIGER stacks, .mib "
                        "without .hdr, TVIPS, EMPAD .raw without .xml (default: " + ("the run's, else " if of_run
                                                                                    else "")
                        + "from the file, else a square scan)")


_NEGATIVE_HELP = "use negative values (e.g. dark-subtracted EMPAD frames) as they are instead of refusing the scan"
_CHECK_HELP = (
    "Before any work the whole scan is read once and refused if it holds NaN/Inf or only blank (all-zero) "
    "patterns; some blank patterns are fine (the map marks them invalid)"
)


def _load_config_file(path):
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None
    unknown = set(cfg) - {"model", "loss", "train", "data"}
    if unknown:
        raise ValueError(f"config file {path}: unknown sections {sorted(unknown)} (allowed: model, loss, train, data)")
    return cfg


_SIM_NOISE = 0.0  # `ccstae simulate` without --noise/--noise-level


def _comma_floats(text, option):
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers") from None


def cmd_simulate(args):
    import dataclasses

    from ccstae_jax.data.noise import parse_noise_level
    from ccstae_jax.data.simulate import SimulationConfig, simulate_to_hdf5

    noise = args.noise if args.noise is not None else args.noise_level
    w = parse_noise_level(noise) if noise is not None else _SIM_NOISE
    if args.descan is not None and len(args.descan) not in (1, 4):
        raise ValueError(f"--descan takes 1 number (J = PX I) or 4 (J row-major), got {len(args.descan)}")
    cfg = SimulationConfig(
        scan_shape=tuple(args.scan), n_grains=args.grains, noise_level=w, seed=args.seed,
        detector_size=args.detector, crop=tuple(args.detector_crop) if args.detector_crop else None,
        reference_region=_region(args.reference_region), disk_radius=args.disk_radius, lattice=args.lattice,
        lattice_aspect=args.lattice_aspect, lattice_angle=args.lattice_angle, ellipticity=args.ellipticity,
        ellipticity_angle=args.ellipticity_angle,
        descan=tuple(args.descan) if args.descan is not None else (0.0, 0.0, 0.0, 0.0),
        phases=args.phases, vacuum=args.vacuum,
        phase_fractions=_comma_floats(args.phase_fractions, "--phase-fractions") if args.phase_fractions else None)
    if args.spot_spacing is not None:
        if not args.spot_spacing > 0:
            raise ValueError(f"--spot-spacing {args.spot_spacing!r} must be > 0 (detector px)")
        cfg = dataclasses.replace(cfg, q_pixel=cfg.first_order_length / args.spot_spacing)
    path = simulate_to_hdf5(args.out, cfg, progress=not args.quiet)
    print(f"wrote {path}: scan {cfg.scan_shape}, patterns {cfg.pattern_shape}, {cfg.lattice} lattice, first-order "
          f"spots at {cfg.spot_spacing:.1f} px, noise w={w}, seed {cfg.seed}")


def cmd_train(args):
    from ccstae_jax.train.parallel import initialize_distributed
    from ccstae_jax.pipeline import DataOptions, train

    initialize_distributed()  # only when CCSTAE_DISTRIBUTED=1 (multi-host); a no-op otherwise
    file_cfg = _load_config_file(args.config)
    data = _data_options(args)
    if "data" in file_cfg:
        data = DataOptions.from_dict({**data.to_dict(), **file_cfg["data"]})
    train_over = dict(file_cfg.get("train", {}))
    for name, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("seed", args.seed),
                        ("learning_rate", args.lr), ("schedule", args.schedule),
                        ("on_nonfinite", args.on_nonfinite), ("checkpoint_every_steps", args.checkpoint_every)):
        if value is not None:
            train_over[name] = value
    model_over = dict(file_cfg.get("model", {}))
    if args.dtype is not None:  # the model casts only its conv/dense layers; inputs, warps and params stay float32
        model_over["dtype"] = args.dtype
    if args.num_bases is not None:
        model_over["num_bases"] = args.num_bases
    ring = "auto" if args.ring is None else tuple(args.ring)
    result = train(args.data, args.out, preset=args.preset, data=data, ring=ring, symmetry=args.symmetry,
                   model_overrides=model_over,
                   loss_overrides=file_cfg.get("loss"), train_overrides=train_over, progress=not args.quiet)
    last = result.history[-1] if result.history else {}
    print(f"trained {args.out}: step {int(result.state.step)}, last epoch loss "
          f"{last.get('loss', float('nan')):.6g}" + (f" (resumed from step {result.resumed_from_step})"
                                                    if result.resumed_from_step is not None else ""))


def cmd_map(args):
    from ccstae_jax.pipeline import map_strain

    data = _data_options(args) if (args.key or args.transpose or args.crop or args.binning) else None
    if data is None and any(_format_options(args).values()):  # the run's data options, read as this file
        import dataclasses

        from ccstae_jax.pipeline import load_run

        data = dataclasses.replace(load_run(args.run_dir)[1], **_format_options(args))
    if args.export:
        from ccstae_jax.report.export import check_export

        check_export(args.export, args.out)
    maps = map_strain(args.run_dir, args.data, args.out, reference_region=_region(args.reference_region),
                      batch_size=args.batch_size, which=args.checkpoint, data=data, figures=args.figures,
                      refine_steps=args.refine_steps, base_update=not args.no_base_update,
                      interpolation=args.interpolation, rigid_spots=args.rigid_spots, scale_spots=args.scale_spots,
                      allow_negative=True if args.allow_negative else None,
                      scan_rotation=args.scan_rotation,
                      correct_distortion=False if args.no_distortion_correction else None, progress=not args.quiet)
    valid = maps["valid"]
    print(f"wrote {args.out}: {valid.size} positions, {int(valid.sum())} valid ({100 * valid.mean():.1f} %)")
    if args.export:
        from ccstae_jax.report.export import export_strain

        print(f"wrote {export_strain(args.out, args.export)}")


def cmd_evaluate(args):
    from ccstae_jax.evaluate.metrics import format_table
    from ccstae_jax.pipeline import evaluate

    table = evaluate(args.strain, args.labels, reference_region=_region(args.reference_region))
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"errors of {args.strain} against the labels of {args.labels}; MAE over all valid positions, strain in %, "
          "rotation in degrees:")
    print(format_table(table))


def cmd_baseline(args):
    from ccstae_jax.baselines import py4dstem as p4d

    p4d.run_cli(args)


def cmd_demo(args):
    from ccstae_jax.pipeline import demo

    demo(args.out, scan=args.scan, noise=args.noise, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(f"demo finished: results in {args.out}/results.json, figures in {args.out}/figures/")


def build_parser() -> argparse.ArgumentParser:
    from ccstae_jax import pipeline
    from ccstae_jax.model.geometry import WIDE_DISK_RATIO

    p = argparse.ArgumentParser(prog="ccstae", description=__doc__.split("\n")[0], epilog=_CONVENTIONS)
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write a simulated polycrystal scan (WS2 by default) with labels (HDF5)",
                       epilog=_CONVENTIONS)
    s.add_argument("out", help="output .h5 file")
    s.add_argument("--scan", type=int, nargs=2, default=(32, 32), metavar=("RX", "RY"),
                   help="scan positions, rows and columns (default: %(default)s)")
    s.add_argument("--grains", type=int, default=16,
                   help="number of Voronoi grains, the reference grain included (default: %(default)s)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--noise", type=float,
                   help=f"background weight w in [0, 1] (Auto4DSTEM noise model; default: {_fmt(_SIM_NOISE)}, "
                        "no noise)")
    g.add_argument("--noise-level",
                   help=f"a named level: 0%%, 5%%, ..., 50%%, 60%%, 70%% (default: {_fmt(_SIM_NOISE)}%%)")
    s.add_argument("--seed", type=int, default=0,
                   help="random seed of grains, strains and noise (default: %(default)s)")
    s.add_argument("--detector", type=int, default=256,
                   help="full detector size N in px; the zero beam sits at pixel N//2 (default: %(default)s)")
    s.add_argument("--crop", "--detector-crop", dest="detector_crop", type=int, nargs=2, metavar=("START", "STOP"),
                   help="detector pixels START:STOP kept on both axes; 0 N keeps the whole detector (default: the "
                        "centred 200/256 N crop, 28 228 on 256 px)")
    _lazy_default(s.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                                 help=f"{_REGION_HELP} covered by the unstrained reference grain (default: the "
                                      "paper's %(library_default)s of its 256 x 256 scan, scaled to --scan)"),
                  "ccstae_jax.evaluate.metrics", "PAPER_REFERENCE_REGION")
    s.add_argument("--spot-spacing", type=float, metavar="PX",
                   help="distance of the first-order spots from the zero beam in detector px, i.e. the camera "
                        "length; sets the reciprocal pixel size (default: 0.0096 * 256 / N 1/A per px, 38.1 px "
                        "for WS2 on a 256 px detector)")
    s.add_argument("--disk-radius", type=float, default=3.7, metavar="PX",
                   help="convergent-beam disk radius in detector px (default: %(default)s)")
    s.add_argument("--lattice", default="hexagonal", choices=["hexagonal", "square", "rectangular"],
                   help="hexagonal (1H-MX2, 6-fold), square (4-fold) or rectangular (2-fold); a1 along +Qx "
                        "unless --lattice-angle turns it (default: %(default)s)")
    s.add_argument("--lattice-aspect", type=float, default=1.25, metavar="B/A",
                   help="b/a of the rectangular lattice, at least 5 %% away from 1 (default: %(default)s)")
    s.add_argument("--lattice-angle", type=float, default=0.0, metavar="RAD",
                   help="orientation of the reference lattice: a1 turned this many radians counter-clockwise from "
                        "+Qx toward +Qy; every grain turns with it, the labels stay relative to it (default: "
                        "%(default)s)")
    s.add_argument("--phases", metavar="LIST",
                   help="comma-separated phases of the grains, the first one the reference: built-in WS2 (3.153 A), "
                        "WSe2 (3.282 A), MoS2 (3.160 A), MoSe2 (3.288 A), or NAME:A for a lattice constant A in "
                        "Angstrom; labels are relative to the first phase (default: WS2 only)")
    s.add_argument("--phase-fractions", metavar="LIST",
                   help="comma-separated relative odds of each phase for the non-reference grains (default: equal)")
    s.add_argument("--vacuum", type=float, default=0.0, metavar="F",
                   help="fraction of scan positions in vacuum around a flake-shaped specimen, in [0, 0.9]; vacuum "
                        "patterns hold only the central beam, their strain labels are NaN (default: %(default)s)")
    s.add_argument("--ellipticity", type=float, default=0.0, metavar="E",
                   help="elliptical projector distortion of the whole pattern as a fraction, in [0, 0.5) (0.02 = "
                        "2 %%); labels stay the specimen's (default: %(default)s)")
    s.add_argument("--ellipticity-angle", type=float, default=0.0, metavar="RAD",
                   help="direction of the major stretch, radians counter-clockwise from +Qx toward +Qy (default: "
                        "%(default)s)")
    s.add_argument("--descan", type=float, nargs="+", metavar="PX",
                   help="zero-beam drift across the scan in detector px: one number PX (J = PX I) or four (J "
                        "row-major); the zero beam moves by J @ (row/(Rx-1) - 1/2, col/(Ry-1) - 1/2); non-zero "
                        "renders every position, slower (default: no drift)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    t = sub.add_parser("train", help="train CC-ST-AE on a scan (resumes when --out holds a checkpoint)",
                       epilog=_CONVENTIONS)
    t.add_argument("data", help="4D-STEM file: .h5/.emd/.hspy/.mat (v7.3)/.npy/EMPAD .raw/ARINA master .h5; with the "
                                "io extra .mib/.dm3/.dm4/.blo/.tvips")
    t.add_argument("--out", required=True, help="run directory (resumed when it holds a checkpoint)")
    t.add_argument("--preset", default=_arg_default(pipeline.train, "preset"), choices=["fast", "reference"],
                   help="model and training preset (default: %(default)s)")
    t.add_argument("--config", help="TOML file with [model], [loss], [train], [data] tables; options given on the "
                                    "command line win (default: none)")
    _add_data_args(t)
    _add_format_args(t)
    t.add_argument("--allow-negative", action="store_true",
                   help=f"{_NEGATIVE_HELP} (default: a scan with any negative value is refused, naming how many "
                        f"and the first position). {_CHECK_HELP}")
    t.add_argument("--epochs", type=int, help=f"passes over the scan (default per preset: {_per_preset('epochs')})")
    t.add_argument("--batch-size", type=int,
                   help=f"patterns per step over all devices (default per preset: {_per_preset('batch_size')})")
    _lazy_default(t.add_argument("--seed", type=int, help="seed of the initial weights and the data order (default: "
                                                          "%(library_default)s)"),
                  "ccstae_jax.train.config", "TrainConfig", "seed")
    t.add_argument("--lr", type=float, help=f"peak learning rate (default per preset: {_per_preset('learning_rate')})")
    t.add_argument("--schedule", choices=["constant", "cosine", "warmup_cosine", "bold_driver"],
                   help=f"learning-rate schedule (default per preset: {_per_preset('schedule')})")
    t.add_argument("--ring", type=float, nargs=2, metavar=("INNER", "OUTER"),
                   help="radii in detector pixels of the ring of spots the network is trained on (default: derived "
                        "from the geometry measured on the scan: disk radius, first-order spot distance)")
    _lazy_default(t.add_argument("--num-bases", type=int, metavar="K",
                                 help="size of the learned dictionary of average patterns: 2 or more for scans of "
                                      "several phases (each position is assigned one; the map measures every "
                                      "phase against base 0's lattice, so a lattice mismatch reads as strain) "
                                      "(default: %(library_default)s)"), "ccstae_jax.model.networks", "ModelConfig",
                  "num_bases")
    t.add_argument("--symmetry", type=int, choices=[6, 4, 2],
                   help="rotational order of the lattice: 6 hexagonal, 4 square, 2 otherwise (default: measured from "
                        "the angular harmonics of the patterns)")
    _lazy_default(t.add_argument("--dtype", choices=["float32", "bfloat16"],
                                 help="compute dtype of the network layers, bfloat16 for GPU/TPU; parameters and "
                                      "warps stay float32 (default: %(library_default)s)"),
                  "ccstae_jax.model.networks", "ModelConfig", "dtype")
    _lazy_default(t.add_argument("--on-nonfinite", choices=["stop", "skip"],
                                 help="on a NaN/Inf loss: stop, keeping the last good checkpoint, or skip the batch "
                                      "(default: %(library_default)s)"), "ccstae_jax.train.config", "TrainConfig",
                  "on_nonfinite")
    _lazy_default(t.add_argument("--checkpoint-every", type=int,
                                 help="also checkpoint every N steps (default: %(library_default)s, only at the end of "
                                      "each epoch)"),
                  "ccstae_jax.train.config", "TrainConfig", "checkpoint_every_steps")
    t.add_argument("--quiet", action="store_true",
                   help="no progress output (default: a bar per epoch on a terminal, else one line per epoch)")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("map", help="map strain/shear/rotation over a scan with a trained run", epilog=_CONVENTIONS)
    m.add_argument("run_dir", help="run directory written by `ccstae train`")
    m.add_argument("data", help="4D-STEM file to map (read with the run's --key/--transpose/--crop/--binning)")
    m.add_argument("--out", required=True, help="output strain-map .h5")
    m.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                   help=f"reference {_REGION_HELP}; strain and rotation are relative to its average lattice (error-"
                        "weighted, outliers left out) (default: the data file's reference_region attribute, else "
                        "the whole scan)")
    m.add_argument("--figures", help="directory for PNG figures (default: none written)")
    m.add_argument("--batch-size", type=int, default=_arg_default(pipeline.map_strain, "batch_size"),
                   help="patterns per inference batch; changes memory, not results (default: %(default)s)")
    m.add_argument("--checkpoint", default=_arg_default(pipeline.map_strain, "which"), choices=["latest", "best"],
                   help="which checkpoint of the run: the latest or the lowest epoch loss (default: %(default)s)")
    m.add_argument("--refine-steps", type=int, default=_arg_default(pipeline.map_strain, "refine_steps"),
                   help="Levenberg-Marquardt iterations fitting each pattern's affine: its base (spots warped, "
                        "radial background centred on the pattern's zero beam) against the observed pixels that "
                        "carry position information, Poisson-weighted (0 = encoder output only; default: "
                        "%(default)s)")
    m.add_argument("--no-base-update", action="store_true",
                   help="fit against the learned bases (default: against bases re-estimated from the aligned "
                        "patterns of a subset of the scan's rows)")
    m.add_argument("--interpolation", default=_arg_default(pipeline.map_strain, "interpolation"),
                   choices=["cubic", "bilinear"],
                   help="how the fit interpolates a base: Keys cubic (moves a spot's centroid exactly) or bilinear "
                        "(the same speed; default: %(default)s)")
    m.add_argument("--rigid-spots", action=argparse.BooleanOptionalAction, default=None,
                   help="move each diffracted disk rigidly with its centre in the fit instead of stretching the whole "
                        "base with the strain (default: rigid when the disk radius exceeds "
                        f"{100 * WIDE_DISK_RATIO:.0f} %% of the first-order spot spacing)")
    m.add_argument("--scale-spots", action="store_true",
                   help="let each pattern's fit also scale the base's spots by a free factor, for specimens whose "
                        "thickness or tilt changes how bright the spots are from position to position (not with "
                        "rigid spots)")
    m.add_argument("--no-distortion-correction", action="store_true",
                   help="keep the anisotropy of the reference region's lattice instead of removing it as an "
                        "elliptical detector distortion (default: removed when the lattice is 4- or 6-fold: the "
                        "reference region is taken to be unstrained)")
    _add_data_args(m, of_run=True)
    _add_format_args(m, of_run=True)
    m.add_argument("--scan-rotation", type=float, metavar="DEG",
                   help="angle in degrees, counter-clockwise (from scan rows toward scan columns), from the scan's "
                        "row axis Rx to the image direction of the detector's +Qx axis; also writes the maps turned "
                        "into the image frame (x = Rx, y = Ry) under /image_frame/; rotation is the same in both "
                        "(default: none, detector frame only)")
    m.add_argument("--export", choices=["hspy", "emd"],
                   help="also write the maps beside --out as HyperSpy .hspy (needs the io extra) or EMD 1.0 .emd "
                        "(py4DSTEM/emdfile layout), with named signals, axes and units (default: none)")
    m.add_argument("--allow-negative", action="store_true",
                   help=f"{_NEGATIVE_HELP} (default: as the run was trained). {_CHECK_HELP}")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=cmd_map)

    e = sub.add_parser("evaluate", help="errors of a strain map against labels", epilog=_CONVENTIONS)
    e.add_argument("strain", help="strain-map .h5 from `ccstae map` or `ccstae baseline`")
    e.add_argument("--labels", required=True,
                   help="simulated .h5 (with /labels) or a directory of the paper's Label_*.npy files")
    _lazy_default(e.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                                 help=f"{_REGION_HELP} the labels are referenced to (default: the strain map's, else "
                                      "the labels file's; the paper's: %(library_default)s)"),
                  "ccstae_jax.evaluate.metrics", "PAPER_REFERENCE_REGION")
    e.add_argument("--json", action="store_true",
                   help="print JSON, strain errors dimensionless and rotation in degrees (default: a table, strain "
                        "in %%)")
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("baseline", help="py4DSTEM correlation strain mapping (needs the [baseline] extra)",
                       epilog=_CONVENTIONS)
    b.add_argument("data", help="4D-STEM file: .h5/.emd/.mat (v7.3)/.npy/EMPAD .raw")
    b.add_argument("--out", required=True, help="output strain-map .h5 (absolute strain, against the known lattice)")
    _add_data_args(b)
    b.add_argument("--probe-radius", type=float,
                   help="disk radius in pixels (default: the data file's disk_radius attribute)")
    b.add_argument("--g1-length", type=float,
                   help="unstrained first-order spot distance in pixels (default: from the data file's attributes)")
    b.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                   help=f"{_REGION_HELP}, stored in the output for `ccstae evaluate` (default: the data file's)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_baseline)

    d = sub.add_parser("demo", help="end to end on a simulated scan: simulate, train, map, evaluate, figures",
                       epilog=_CONVENTIONS)
    d.add_argument("--out", default=_arg_default(pipeline.demo, "out_dir"),
                   help="output folder (default: %(default)s)")
    d.add_argument("--scan", type=int, default=_arg_default(pipeline.demo, "scan"),
                   help="scan positions per side, square (default: %(default)s)")
    d.add_argument("--noise", type=float, default=_arg_default(pipeline.demo, "noise"),
                   help="background weight w in [0, 1] of the noise model (default: %(default)s)")
    d.add_argument("--epochs", type=int, default=_arg_default(pipeline.demo, "epochs"),
                   help="training epochs (default: %(default)s)")
    d.add_argument("--seed", type=int, default=_arg_default(pipeline.demo, "seed"),
                   help="seed of the simulation and the training (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_demo)
    for parser in (p, *sub.choices.values()):  # defaults as typed on the command line: "32 32", not "(32, 32)"
        for action in parser._actions:
            if action.help and "%(default)s" in action.help:
                action.help = action.help.replace("%(default)s", _fmt(action.default).replace("%", "%%"))
    return p


# What bad input, unreadable files, refused resumes and numerical faults raise; anything else is a bug and keeps
# its traceback.
_USER_ERRORS = (ValueError, OSError, FloatingPointError, CcstaeError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        # Orbax logs its own ERROR lines (e.g. for a corrupt checkpoint) through absl; the error is reported below
        # in one line, so they are shown with --verbose only.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    compilation_cache.enable()  # a command compiling what an earlier one did reads it from disk
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("ccstae: interrupted; rerun the same command to resume (training resumes from its last checkpoint)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except _USER_ERRORS as e:
        if args.verbose:
            raise
        msg = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        print(f"ccstae {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
