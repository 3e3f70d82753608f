"""Tiny hexagonal spot patterns with known lattice deformation, for model tests (no simulator needed)."""
import numpy as np


def hex_patterns(n_patterns, *, size=64, g=18.0, spot_sigma=1.5, max_strain=0.02, seed=0, rotations=None,
                 shell_amps=(1.0, 0.5)):
    """Patterns ``(N, size, size)`` float32 and labels (strain_xx, strain_yy, shear_xy, rotation) ``(N, 4)``.

    Spots of the lattice ``A = (I + eps) R(rot)`` at ``A^{-T} g`` (physics frame: x = rows, y = columns), a bright
    central spot at ``(size // 2, size // 2)``; two shells of reflections, as bright as ``shell_amps``.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size].astype(np.float64) - size // 2
    base = [g * np.array([np.cos(a), np.sin(a)]) for a in np.arange(6) * np.pi / 3]
    base += [np.sqrt(3) * g * np.array([np.cos(a), np.sin(a)]) for a in np.arange(6) * np.pi / 3 + np.pi / 6]
    base = np.array(base)
    amps = np.repeat(np.asarray(shell_amps, np.float64), 6)
    labels = np.zeros((n_patterns, 4))
    out = np.zeros((n_patterns, size, size), np.float32)
    for i in range(n_patterns):
        exx, eyy, exy = rng.uniform(-max_strain, max_strain, 3)
        rot = rng.uniform(0, 2 * np.pi) if rotations is None else rotations[i]
        a = np.array([[1 + exx, exy], [exy, 1 + eyy]]) @ np.array(
            [[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
        spots = base @ np.linalg.inv(a)  # rows (A^{-T} g)^T
        img = 20.0 * np.exp(-(rows**2 + cols**2) / (2 * spot_sigma**2))
        for (sx, sy), amp in zip(spots, amps):
            img += amp * np.exp(-((rows - sx) ** 2 + (cols - sy) ** 2) / (2 * spot_sigma**2))
        out[i] = img
        labels[i] = exx, eyy, exy, rot
    return out, labels


def hex_geometry(size=64, g=18.0, spot_sigma=1.5, symmetry=6):
    """The `ccstae_jax.model.geometry.Geometry` of `hex_patterns` (known, not measured)."""
    from ccstae_jax.model.geometry import Geometry

    r = 2.0 * spot_sigma
    return Geometry(pattern_shape=(size, size), center=(float(size // 2), float(size // 2)), disk_radius=r,
                    spot_spacing=g, symmetry=symmetry,
                    ring=(max(r + 2, g - r - 2), min(size / 2 - 1, np.sqrt(3) * g + r + 2)))
