"""Data: the built-in polycrystal simulator, the Auto4DSTEM noise model and streaming file readers."""
from ccstae_jax.data.noise import (
    NOISE_LEVELS,
    add_background_noise,
    lorentzian_background,
    noise_moments,
    parse_noise_level,
)
from ccstae_jax.data.readers import (
    Batch,
    DataError,
    Scan,
    load_labels,
    open_scan,
    reference_region_from_file,
)
from ccstae_jax.data.simulate import (
    CONVENTIONS,
    SimulationConfig,
    grain_labels,
    make_grains,
    pattern_function,
    render_patterns,
    simulate_scan,
    simulate_to_hdf5,
    spot_table,
)

__all__ = [
    "NOISE_LEVELS",
    "add_background_noise",
    "lorentzian_background",
    "noise_moments",
    "parse_noise_level",
    "Batch",
    "DataError",
    "Scan",
    "load_labels",
    "open_scan",
    "reference_region_from_file",
    "CONVENTIONS",
    "SimulationConfig",
    "grain_labels",
    "make_grains",
    "pattern_function",
    "render_patterns",
    "simulate_scan",
    "simulate_to_hdf5",
    "spot_table",
]
