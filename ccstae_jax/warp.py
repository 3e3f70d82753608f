"""The differentiable affine warp under its public name (``from ccstae_jax.warp import affine_warp``): the names of
`ccstae_jax.ops.warp`, which imports only JAX and NumPy."""
from ccstae_jax.ops.warp import *  # noqa: F401,F403
from ccstae_jax.ops.warp import __all__  # noqa: F401
