"""Classical baselines that CC-ST-AE is compared against (optional extras).

``ccstae_jax.baselines.py4dstem``: py4DSTEM correlation strain mapping; its names are re-exported here. Importing
this package needs only numpy; py4DSTEM itself (``pip install "ccstae-jax[baseline]"``) is imported when a baseline
runs.
"""
from ccstae_jax.baselines.py4dstem import *  # noqa: F401,F403
from ccstae_jax.baselines.py4dstem import __all__  # noqa: F401
