"""``ccstae`` command line: simulate, train, map, evaluate, baseline, demo.

Every command prints a one-line error and exits non-zero on bad input (``--verbose`` shows the traceback).
Conventions: data (Rx, Ry, Qx, Qy); x = Qx = pattern rows, y = Qy = pattern columns; strain = real-space lattice
strain (dimensionless, positive = stretched); shear_xy = tensor shear; rotation in radians (files) / degrees (tables),
counter-clockwise from +Qx toward +Qy, modulo 60 degrees for hexagonal lattices, relative to a reference region.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_CONVENTIONS = (
    "Conventions: data arrays are (Rx, Ry, Qx, Qy); x = Qx = pattern rows, y = Qy = pattern columns. Strain is the "
    "real-space lattice strain (dimensionless; positive = lattice stretched, spots move inward), shear_xy the tensor "
    "shear, rotation counter-clockwise from +Qx toward +Qy (radians in files, degrees in tables), modulo the lattice "
    "symmetry, all relative to a reference region of the scan."
)


def _region(values):
    return None if values is None else tuple(int(v) for v in values)


def _data_options(args):
    from ccstae_jax.pipeline import DataOptions

    crop = None
    if args.crop is not None:
        q0, q1, q2, q3 = args.crop
        crop = ((q0, q1), (q2, q3))
    return DataOptions(key=args.key, transpose=tuple(args.transpose) if args.transpose else None, crop=crop,
                       binning=args.binning, allow_negative=bool(getattr(args, "allow_negative", False)))


def _add_data_args(p):
    p.add_argument("--key", help="dataset path inside an HDF5/.mat file (default: found automatically)")
    p.add_argument("--transpose", type=int, nargs=4, metavar="AX",
                   help="axis order applied to the stored array to get (Rx, Ry, Qx, Qy); the paper's .mat: 1 0 3 2")
    p.add_argument("--crop", type=int, nargs=4, metavar=("Q0", "Q1", "Q2", "Q3"),
                   help="keep pattern rows Q0:Q1 and columns Q2:Q3 (the paper's .mat: 28 228 28 228)")
    p.add_argument("--binning", type=int, default=1, help="sum-bin each pattern by this integer factor")


_ALLOW_NEGATIVE_HELP = (
    "accept negative values (e.g. dark-subtracted EMPAD frames) and use them as they are; by default a scan with "
    "any negative count is refused, naming how many and the first position. Before training or mapping the whole "
    "scan is read once and refused if it holds NaN/Inf or only blank (all-zero) patterns; some blank patterns are "
    "fine (the map marks them invalid)"
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
    w = parse_noise_level(noise) if noise is not None else 0.0
    if args.descan is not None and len(args.descan) not in (1, 4):
        raise ValueError(f"--descan takes 1 number (J = PX I) or 4 (J row-major), got {len(args.descan)}")
    cfg = SimulationConfig(
        scan_shape=tuple(args.scan), n_grains=args.grains, noise_level=w, seed=args.seed,
        detector_size=args.detector, crop=tuple(args.detector_crop) if args.detector_crop else None,
        reference_region=_region(args.reference_region), disk_radius=args.disk_radius, lattice=args.lattice,
        lattice_aspect=args.lattice_aspect, ellipticity=args.ellipticity, ellipticity_angle=args.ellipticity_angle,
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
    from ccstae_jax.parallel import initialize_distributed
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
    ring = "auto" if args.ring is None else tuple(args.ring)
    result = train(args.data, args.out, preset=args.preset, data=data, ring=ring, model_overrides=model_over,
                   loss_overrides=file_cfg.get("loss"), train_overrides=train_over, progress=not args.quiet)
    last = result.history[-1] if result.history else {}
    print(f"trained {args.out}: step {int(result.state.step)}, last epoch loss "
          f"{last.get('loss', float('nan')):.6g}" + (f" (resumed from step {result.resumed_from_step})"
                                                    if result.resumed_from_step is not None else ""))


def cmd_map(args):
    from ccstae_jax.pipeline import map_strain

    data = _data_options(args) if (args.key or args.transpose or args.crop or args.binning != 1) else None
    maps = map_strain(args.run_dir, args.data, args.out, reference_region=_region(args.reference_region),
                      batch_size=args.batch_size, which=args.checkpoint, data=data, figures=args.figures,
                      refine_steps=args.refine_steps, base_update=not args.no_base_update,
                      interpolation=args.interpolation, allow_negative=True if args.allow_negative else None,
                      progress=not args.quiet)
    valid = maps["valid"]
    print(f"wrote {args.out}: {valid.size} positions, {int(valid.sum())} valid")


def cmd_evaluate(args):
    from ccstae_jax.evaluate import format_table
    from ccstae_jax.pipeline import evaluate

    table = evaluate(args.strain, args.labels, reference_region=_region(args.reference_region))
    print(json.dumps(table, indent=2) if args.json else format_table(table))


def cmd_baseline(args):
    from ccstae_jax.baselines import py4dstem as p4d

    p4d.run_cli(args)


def cmd_demo(args):
    from ccstae_jax.pipeline import demo

    demo(args.out, scan=args.scan, noise=args.noise, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(f"demo finished: results in {args.out}/results.json, figures in {args.out}/figures/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccstae", description=__doc__.split("\n")[0], epilog=_CONVENTIONS)
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write a simulated polycrystal scan (WS2 by default) with labels (HDF5)",
                       epilog=_CONVENTIONS)
    s.add_argument("out", help="output .h5 file")
    s.add_argument("--scan", type=int, nargs=2, default=(32, 32), metavar=("RX", "RY"), help="scan positions")
    s.add_argument("--grains", type=int, default=16, help="number of Voronoi grains (incl. the reference grain)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--noise", type=float, help="background weight w in [0, 1] (Auto4DSTEM noise model)")
    g.add_argument("--noise-level", help="a named level: 0%%, 5%%, ..., 50%%, 60%%, 70%%")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--detector", type=int, default=256,
                   help="full detector size N in px (default 256); the zero beam sits at pixel N//2")
    s.add_argument("--crop", "--detector-crop", dest="detector_crop", type=int, nargs=2, metavar=("START", "STOP"),
                   help="detector pixels START:STOP kept on both axes (default: the centred 200/256 N, 28 228 on "
                        "256 px; 0 N keeps the whole detector)")
    s.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                   help="scan rows R0:R1, columns C0:C1 of the unstrained reference grain")
    s.add_argument("--spot-spacing", type=float, metavar="PX",
                   help="distance of the first-order spots from the zero beam in detector px, i.e. the camera "
                        "length (sets the reciprocal pixel size; default 0.0096 * 256 / N 1/A per px: 38.1 px for "
                        "WS2 on a 256 px detector)")
    s.add_argument("--disk-radius", type=float, default=3.7, metavar="PX",
                   help="convergent-beam disk radius in detector px (default 3.7)")
    s.add_argument("--lattice", default="hexagonal", choices=["hexagonal", "square", "rectangular"],
                   help="hexagonal (1H-MX2, 6-fold), square (4-fold) or rectangular (2-fold); a1 along +Qx "
                        "(default hexagonal)")
    s.add_argument("--lattice-aspect", type=float, default=1.25, metavar="B/A",
                   help="b/a of the rectangular lattice, at least 5 %% away from 1 (default 1.25)")
    s.add_argument("--phases", metavar="LIST",
                   help="comma-separated phases of the grains, the first one the reference: built-in WS2 (3.153 A), "
                        "WSe2 (3.282 A), MoS2 (3.160 A), MoSe2 (3.288 A), or NAME:A for a lattice constant A in "
                        "Angstrom (default: WS2 only); labels are relative to the first phase")
    s.add_argument("--phase-fractions", metavar="LIST",
                   help="comma-separated relative odds of each phase for the non-reference grains (default equal)")
    s.add_argument("--vacuum", type=float, default=0.0, metavar="F",
                   help="fraction of scan positions in vacuum around a flake-shaped specimen, in [0, 0.9] "
                        "(default 0); vacuum patterns hold only the central beam, their strain labels are NaN")
    s.add_argument("--ellipticity", type=float, default=0.0, metavar="E",
                   help="elliptical projector distortion of the whole pattern as a fraction, in [0, 0.5) (0.02 = "
                        "2 %%; default 0); labels stay the specimen's")
    s.add_argument("--ellipticity-angle", type=float, default=0.0, metavar="RAD",
                   help="direction of the major stretch, radians counter-clockwise from +Qx toward +Qy (default 0)")
    s.add_argument("--descan", type=float, nargs="+", metavar="PX",
                   help="zero-beam drift across the scan in detector px: one number PX (J = PX I) or four (J "
                        "row-major); the zero beam moves by J @ (row/(Rx-1) - 1/2, col/(Ry-1) - 1/2) (default 0; "
                        "non-zero renders every position, slower)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    t = sub.add_parser("train", help="train CC-ST-AE on a scan (resumes when --out holds a checkpoint)",
                       epilog=_CONVENTIONS)
    t.add_argument("data", help="4D-STEM file: .h5/.emd/.mat (v7.3)/.npy/EMPAD .raw")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--preset", default="fast", choices=["fast", "reference"])
    t.add_argument("--config", help="TOML file with [model], [loss], [train], [data] tables")
    _add_data_args(t)
    t.add_argument("--allow-negative", action="store_true", help=_ALLOW_NEGATIVE_HELP)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--schedule", choices=["constant", "cosine", "warmup_cosine", "bold_driver"])
    t.add_argument("--ring", type=float, nargs=2, metavar=("INNER", "OUTER"),
                   help="loss ring radii in detector pixels (default: read from the mean pattern)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (bfloat16 for GPU/TPU)")
    t.add_argument("--on-nonfinite", choices=["stop", "skip"], help="on a NaN/Inf loss: stop (default) or skip")
    t.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("map", help="map strain/shear/rotation over a scan with a trained run", epilog=_CONVENTIONS)
    m.add_argument("run_dir")
    m.add_argument("data")
    m.add_argument("--out", required=True, help="output strain-map .h5")
    m.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                   help="reference scan rows R0:R1, columns C0:C1 (default: from the data file, else whole scan)")
    m.add_argument("--figures", help="directory for PNG figures")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--checkpoint", default="latest", choices=["latest", "best"])
    m.add_argument("--refine-steps", type=int, default=10,
                   help="Levenberg-Marquardt iterations fitting each pattern's affine: the learned base (spots "
                        "warped, radial background fixed) against the observed pixels, Poisson-weighted "
                        "(0 = encoder output only)")
    m.add_argument("--no-base-update", action="store_true",
                   help="one refinement pass against the learned base (default: a second pass against the base "
                        "re-estimated from the aligned patterns; reads the scan twice)")
    m.add_argument("--interpolation", default="cubic", choices=["cubic", "bilinear"],
                   help="how the refinement warps the base, and the base update pulls the patterns: Keys cubic "
                        "(default; a few %% lower strain error) or bilinear (about 2.4x faster on CPUs)")
    _add_data_args(m)
    m.add_argument("--allow-negative", action="store_true",
                   help="accept negative values (default: as the run was trained); " + _ALLOW_NEGATIVE_HELP)
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_map)

    e = sub.add_parser("evaluate", help="errors of a strain map against labels", epilog=_CONVENTIONS)
    e.add_argument("strain", help="strain-map .h5 from `ccstae map` or `ccstae baseline`")
    e.add_argument("--labels", required=True,
                   help="simulated .h5 (with /labels) or a directory of the paper's Label_*.npy files")
    e.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"),
                   help="default: the strain map's, else the labels file's (the paper's: 30 60 10 40)")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("baseline", help="py4DSTEM correlation strain mapping (needs the [baseline] extra)",
                       epilog=_CONVENTIONS)
    b.add_argument("data")
    b.add_argument("--out", required=True)
    _add_data_args(b)
    b.add_argument("--probe-radius", type=float, help="disk radius in pixels (default: from the file's attrs)")
    b.add_argument("--g1-length", type=float, help="unstrained first-order spot distance in pixels (default: attrs)")
    b.add_argument("--reference-region", type=int, nargs=4, metavar=("R0", "R1", "C0", "C1"))
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_baseline)

    d = sub.add_parser("demo", help="end to end on a simulated scan: simulate, train, map, evaluate, figures",
                       epilog=_CONVENTIONS)
    d.add_argument("--out", default="demo_out")
    d.add_argument("--scan", type=int, default=24, help="scan size (square)")
    d.add_argument("--noise", type=float, default=0.25, help="background weight w")
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


# What bad input, unreadable files, refused resumes and numerical faults raise; anything else is a bug and keeps
# its traceback.
_USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError, FloatingPointError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        # Orbax logs its own ERROR lines (e.g. for a corrupt checkpoint) through absl; the error is reported below
        # in one line, so they are shown with --verbose only.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
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
