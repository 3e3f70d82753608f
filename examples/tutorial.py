"""Tutorial: strain mapping of a simulated, noisy polycrystal with CC-ST-AE (and py4DSTEM beside it).

This follows the CC-ST-AE paper's simulated-data tutorial (its Figure 2): a polycrystalline WS2 monolayer scanned
with a convergent beam, 25 % background noise, strain / shear / rotation mapped by the network and compared with the
ground truth and with py4DSTEM's correlation strain mapping.

Run it as is (a few minutes on a laptop CPU)::

    python examples/tutorial.py                       # writes tutorial_out/
    python examples/tutorial.py --scan 32 --epochs 12 --out my_dir
    CCSTAE_BASELINE_PYTHON=/path/to/venv-with-py4dstem/bin/python python examples/tutorial.py   # with py4DSTEM

What you get in the output folder: ``simulated.h5`` (the 4D data and its labels), ``run/`` (the trained model),
``strain.h5`` (the strain maps), ``strain_py4dstem.h5`` (when py4DSTEM is available), ``figures/*.png`` and
``results.json`` (the error tables).

Conventions used throughout (the same everywhere in ccstae-jax; they match py4DSTEM's):

* 4D data are ``(Rx, Ry, Qx, Qy)``: scan row, scan column, detector row, detector column.
* x is the detector's Qx axis (rows of a diffraction pattern), y is Qy (columns).
* Strain is the *real-space* lattice strain: the lattice is deformed by ``A = (I + eps) R(theta)`` with
  ``eps = [[strain_xx, shear_xy], [shear_xy, strain_yy]]`` (tensor shear, i.e. half the engineering shear) and
  ``theta`` the rotation, counter-clockwise from +Qx toward +Qy. Positive ``strain_xx`` means the lattice is
  stretched along x, so the diffraction spots move *inward* along Qx.
* Strain and rotation are measured relative to a reference region of the scan (here the unstrained grain the
  simulator puts there); rotations are reported modulo the lattice symmetry (60 degrees for WS2).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def main(out_dir: str | os.PathLike = "tutorial_out", *, scan: int = 24, epochs: int = 8, detector: int = 256,
         noise: float | str = "25%", grains: int | None = None, seed: int = 0, refine_steps: int = 10,
         baseline: str = "auto", progress: bool = True) -> dict:
    """Simulate at ``noise``, train CC-ST-AE, map strain, compare with the labels (and py4DSTEM), save figures.

    Args:
      out_dir: output folder (created).
      scan: the scan is ``scan x scan`` probe positions.
      epochs: training epochs (passes over the scan).
      detector: detector size N in pixels; patterns are its centred crop (200 x 200 for N = 256).
      noise: background-noise level, a fraction (0.25) or a percentage string ("25%").
      grains: number of grains; ``None`` = about one per 50 scan positions (at least 4).
      seed: random seed of the simulation and of the training.
      refine_steps: per-pattern Levenberg-Marquardt refinement steps when mapping (0 = the network's output as is).
      baseline: ``"auto"`` (run py4DSTEM when ``$CCSTAE_BASELINE_PYTHON`` or this Python has it), ``"off"``.
      progress: show progress bars.

    Returns:
      ``{"ccstae": error table, "py4dstem": error table or None, "figures": [paths], "out_dir": str}``; error
      tables map ``strain_xx``, ``strain_yy``, ``shear_xy`` (dimensionless) and ``rotation_deg`` (degrees) to
      ``{"mae", "median_abs", "mae_interior", "std_interior", "valid_fraction"}``.
    """
    from ccstae_jax import pipeline
    from ccstae_jax.baselines import py4dstem
    from ccstae_jax.data.readers import load_labels, open_scan
    from ccstae_jax.data.simulate import SimulationConfig, simulate_to_hdf5
    from ccstae_jax.evaluate.metrics import format_table, referenced_labels
    from ccstae_jax.report.files import read_strain_h5
    from ccstae_jax.train.loop import load_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print

    # ---------------------------------------------------------------------------------------------------------
    # Step 1 - simulate a 4D-STEM scan with known strain.
    #
    # The built-in simulator draws a Voronoi polycrystal of monolayer WS2 seen down [0001]. Every grain gets a random
    # strain (up to +-2 % in strain_xx, strain_yy and shear_xy) and a random in-plane rotation (0-360 deg); one grain,
    # placed over the reference region, is left unstrained and unrotated. Each probe position gets the kinematic
    # convergent-beam pattern of its grain (patterns are blended over ~1 scan pixel at grain boundaries).
    #
    # Noise follows the paper (Auto4DSTEM's model): a fraction w of the electrons is moved from the pattern into a
    # bright diffuse glow around the central beam, then every pixel is Poisson-sampled. "25 %" means w = 0.25.
    # The file keeps the ground truth (/labels/*), which a real experiment of course does not have.
    # ---------------------------------------------------------------------------------------------------------
    n_grains = grains if grains is not None else max(4, scan * scan // 50)
    sim = SimulationConfig(scan_shape=(scan, scan), n_grains=n_grains, noise_level=noise, seed=seed,
                           detector_size=detector, disk_radius=max(2.0, 3.7 * detector / 256))
    data_path = out / "simulated.h5"
    say(f"Step 1: simulating a {scan}x{scan} scan of {sim.pattern_shape[0]}x{sim.pattern_shape[1]} patterns, "
        f"{n_grains} grains, {sim.noise_level:.0%} background noise -> {data_path}")
    simulate_to_hdf5(data_path, sim, progress=progress)

    # ---------------------------------------------------------------------------------------------------------
    # Step 2 - train CC-ST-AE on the scan (no labels are used).
    #
    # The network learns a "base": an idealised, unstrained diffraction pattern of the material, and for every
    # pattern the affine transformation (strain, shear, rotation, a small shift) that maps that pattern onto the
    # base. Training minimises the reconstruction error inside a ring-shaped mask that keeps the diffraction spots
    # and drops the saturated central beam and the detector edge; the mask then shrinks around the spots so the
    # background noise between them stops steering the fit. The "fast" preset sees each pattern first turned to a
    # canonical orientation, so grains at any rotation are handled. More epochs = better maps (the paper trains
    # far longer than this tutorial's default).
    # ---------------------------------------------------------------------------------------------------------
    run_dir = out / "run"
    say(f"Step 2: training CC-ST-AE (fast preset, {epochs} epochs) -> {run_dir}")
    pipeline.train(data_path, run_dir, preset="fast", train_overrides=dict(epochs=epochs, seed=seed),
                   progress=progress)

    # ---------------------------------------------------------------------------------------------------------
    # Step 3 - map strain over the whole scan.
    #
    # Every pattern goes through the trained encoder; its affine is then polished by a few Levenberg-Marquardt
    # steps fitting the learned base to the pattern's pixels (refine_steps; still no labels). The scan is read
    # twice: the second pass fits again against a sharper base, the mean of all patterns aligned by the first
    # pass (map_strain(..., base_update=False) skips it). The affine is split by polar decomposition
    # into a symmetric strain tensor and a rotation, and everything is referenced to the reference region stored
    # in the data file (rows r0:r1, columns c0:c1 of the scan): strain is relative to that region's lattice,
    # rotation relative to its orientation. With your own data, pass reference_region=(r0, r1, c0, c1) covering
    # an area you trust to be unstrained.
    # ---------------------------------------------------------------------------------------------------------
    strain_path = out / "strain.h5"
    say(f"Step 3: mapping strain ({refine_steps} refinement steps per pattern) -> {strain_path}")
    maps = pipeline.map_strain(run_dir, data_path, strain_path, refine_steps=refine_steps, progress=progress)

    # ---------------------------------------------------------------------------------------------------------
    # Step 4 - compare with the ground truth.
    #
    # The labels are referenced to the same region in the same way, then the mean absolute error (MAE) is taken over
    # every scan position (and over grain interiors, away from the blended boundaries). Strain errors are shown in
    # percent (0.1 % = a strain of 1e-3), rotation errors in degrees.
    # ---------------------------------------------------------------------------------------------------------
    say("Step 4: errors of CC-ST-AE against the labels (strain in %, rotation in degrees)")
    table = pipeline.evaluate(strain_path, data_path)
    say(format_table(table))

    # ---------------------------------------------------------------------------------------------------------
    # Step 5 (optional) - the classical baseline: py4DSTEM correlation strain mapping on the same data.
    #
    # py4DSTEM finds the Bragg disks of every pattern by cross-correlation with a disk template, fits the lattice
    # vectors, and compares them with the known unstrained lattice. It is an optional extra (GPL) that lives in
    # its own Python environment: point $CCSTAE_BASELINE_PYTHON at it. Without it this step is skipped.
    # Its maps are absolute (against the known lattice); with the unstrained reference grain they are directly
    # comparable with the referenced labels.
    # ---------------------------------------------------------------------------------------------------------
    base_table, base_maps = None, None
    if baseline != "off":
        base_path = out / "strain_py4dstem.h5"
        say(f"Step 5: py4DSTEM baseline -> {base_path}")
        try:
            py4dstem.run_baseline_subprocess(data_path, base_path, progress=progress)
        except py4dstem.BaselineUnavailable as e:
            say(f"  skipped: {e}")
        except RuntimeError as e:  # py4DSTEM is installed but failed on this file: say why, keep the tutorial going
            say(f"  py4DSTEM failed, skipped: {e}")
        else:
            base_table = pipeline.evaluate(base_path, data_path)
            say("  errors of py4DSTEM against the labels (strain in %, rotation in degrees)")
            say(format_table(base_table))
            base_maps, _ = read_strain_h5(base_path)
            period = 2 * np.pi / 6  # show its rotation in the same [-30, 30) deg window as the other maps
            base_maps["rotation"] = (base_maps["rotation"] + period / 2) % period - period / 2

    # ---------------------------------------------------------------------------------------------------------
    # Step 6 - figures.
    #
    # strain_maps.png: maps of strain_xx, strain_yy, shear_xy and rotation (rows: labels, CC-ST-AE, py4DSTEM),
    # one shared diverging colour scale centred on zero per quantity; strain_histograms.png: their distributions
    # (sharper peaks = more precise); pattern_mask.png: a diffraction pattern with the training mask;
    # bases.png: the learned base; training_curves.png: the loss during training; error_map.png: where the model
    # reconstructs the data worst (a confidence map you also get on real data).
    # ---------------------------------------------------------------------------------------------------------
    task, _, _ = pipeline.load_run(run_dir)
    labels = referenced_labels(load_labels(data_path, shape=(scan, scan)), reference_region=sim.reference_bounds)
    with open_scan(data_path) as s:
        state = load_checkpoint(run_dir, task, s.read(0, 2))
        figures = pipeline.save_run_figures(out / "figures", run_dir, data_path, task, state, s, maps, labels=labels,
                                            baseline=base_maps, reference_region=sim.reference_bounds)
    say("Step 6: figures -> " + ", ".join(figures))

    result = {"ccstae": table, "py4dstem": base_table, "figures": figures, "out_dir": str(out),
              "simulation": json.loads(sim.to_json()), "epochs": epochs, "refine_steps": refine_steps}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    say(f"Done: error tables in {out / 'results.json'}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="CC-ST-AE tutorial on simulated 25 %-noise WS2 data (see the docstring).")
    ap.add_argument("--out", default="tutorial_out", help="output folder")
    ap.add_argument("--scan", type=int, default=24, help="scan size (positions per side)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs")
    ap.add_argument("--detector", type=int, default=256, help="detector size N (patterns: centred 200/256 crop)")
    ap.add_argument("--noise", default="25%", help="background noise, e.g. 25%% or 0.25")
    ap.add_argument("--grains", type=int, default=None, help="number of grains (default ~ scan^2 / 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refine-steps", type=int, default=10, help="LM refinement steps per pattern (0 = none)")
    ap.add_argument("--baseline", choices=("auto", "off"), default="auto", help="py4DSTEM baseline")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args()
    main(a.out, scan=a.scan, epochs=a.epochs, detector=a.detector, noise=a.noise, grains=a.grains, seed=a.seed,
         refine_steps=a.refine_steps, baseline=a.baseline, progress=not a.quiet)
