"""examples/tutorial.py runs as is (tiny sizes) and leaves its figures, maps and a finite error table."""
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from _scripts import load_script

tutorial = load_script("ccstae_tutorial", "examples/tutorial.py")


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("tutorial")
    result = tutorial.main(out, scan=8, epochs=1, detector=64, grains=3, refine_steps=2, baseline="off",
                           progress=False)
    return out, result


def test_tutorial_writes_the_figures(ran):
    out, result = ran
    names = {Path(p).name for p in result["figures"]}
    assert {"strain_maps.png", "strain_histograms.png", "pattern_mask.png", "bases.png",
            "training_curves.png"} <= names
    for p in result["figures"]:
        assert Path(p).parent == out / "figures" and Path(p).stat().st_size > 5_000


def test_tutorial_map_beats_a_map_of_zeros_or_is_flagged(ran):
    """A map no better than claiming no strain anywhere must say so in its file (these tiny 50-px patterns after
    one epoch carry little signal); its 1-sigma errors must describe its actual errors either way."""
    out, result = ran
    from ccstae_jax.data.readers import load_labels
    from ccstae_jax.evaluate.metrics import referenced_labels

    table = result["ccstae"]
    assert set(table) == {"strain_xx", "strain_yy", "shear_xy", "rotation_deg"}
    with h5py.File(out / "simulated.h5", "r") as f:
        region = tuple(int(v) for v in f.attrs["reference_region"])
    with h5py.File(out / "strain.h5", "r") as f:
        flags = json.loads(f.attrs["quality_warnings"])
        assert f.attrs["quality"] == ("flagged" if flags else "ok")
    labels = referenced_labels(load_labels(out / "simulated.h5", shape=(8, 8)), reference_region=region)
    for q in ("strain_xx", "strain_yy", "shear_xy"):
        zero_map_mae = float(np.nanmean(np.abs(labels[q])))
        assert math.isfinite(table[q]["mae"]) and table[q]["valid_fraction"] > 0.9, q
        assert table[q]["mae"] < zero_map_mae or flags, (q, table[q], zero_map_mae)
        assert table[q]["z_within_2"] > 0.8, (q, table[q])


def test_tutorial_saves_maps_and_results(ran):
    out, result = ran
    from ccstae_jax.report.files import read_strain_h5

    maps, _ = read_strain_h5(out / "strain.h5")
    assert maps["strain_xx"].shape == (8, 8)
    saved = json.loads((out / "results.json").read_text())
    assert saved["ccstae"] == result["ccstae"]
    assert saved["py4dstem"] is None
