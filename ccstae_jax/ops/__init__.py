"""Numeric leaves: pure functions of arrays that know nothing of strain mapping (JAX and NumPy only, no Flax).

``warp`` (PyTorch-compatible differentiable resampling), ``affine`` (the warp and lattice algebra, frames and
signs), ``conv`` (a convolution with a fast kernel gradient on CPUs), ``sparsity`` (the K-sparse layer).
"""
