"""``python -m ccstae_jax.baselines.py4dstem DATA --out STRAIN.h5``: the baseline in this interpreter."""
import sys

from ccstae_jax.baselines.py4dstem.runner import _EXIT_UNAVAILABLE, BaselineUnavailable, main

try:
    sys.exit(main())
except BaselineUnavailable as e:
    print(f"BaselineUnavailable: {e}", file=sys.stderr)
    sys.exit(_EXIT_UNAVAILABLE)
