"""ccstae-jax: cycle-consistent spatial-transforming autoencoder strain mapping for 4D-STEM."""

__version__ = "0.1.0"
