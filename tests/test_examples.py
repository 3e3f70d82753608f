"""examples/tutorial.py runs as is (tiny sizes) and leaves its figures, maps and a finite error table."""
import json
import math
from pathlib import Path

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


def test_tutorial_error_table_is_finite(ran):
    _, result = ran
    table = result["ccstae"]
    assert set(table) == {"strain_xx", "strain_yy", "shear_xy", "rotation_deg"}
    for q, row in table.items():
        assert math.isfinite(row["mae"]) and row["mae"] >= 0, q
        assert row["valid_fraction"] > 0.9, q


def test_tutorial_saves_maps_and_results(ran):
    out, result = ran
    from ccstae_jax.report.files import read_strain_h5

    maps, _ = read_strain_h5(out / "strain.h5")
    assert maps["strain_xx"].shape == (8, 8)
    saved = json.loads((out / "results.json").read_text())
    assert saved["ccstae"] == result["ccstae"]
    assert saved["py4dstem"] is None
