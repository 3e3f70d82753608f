"""The Auto4DSTEM background + shot noise model, as pure JAX functions.

The CC-ST-AE paper benchmarks its noise robustness with the noise of Auto4DSTEM 0.2.8
(`STEM4D_DataSet.generate_background_noise`). A fraction ``w`` of the electrons is moved from the
diffraction pattern ``I`` into a central Lorentzian glow ``B``; the result is Poisson-sampled at
``counts`` electrons per probe and multiplied by ``scale / counts``::

    B(q) = 1 / (1 + |q|^2 / width^2)   on fftshift(fftfreq(n, d=1)) grids (both axes),  B <- B / sum(B)
    out  = scale * Poisson(counts * ((1 - w) * I + w * B)) / counts        (w > 0)
    out  = scale * I                                                       (w = 0: no Poisson sampling)

``B`` peaks at pixel ``(H // 2, W // 2)`` (``(100, 100)`` for the 200 x 200 benchmark crop, the
central beam); with ``width = 0.01`` cycles/px its half width at half maximum is ``0.01 * n`` pixels
(2 px on 200 px). The ``w = 0`` branch reproduces Auto4DSTEM's quirk: the "0 %" data are noise-free.

Example:
    >>> import jax, jax.numpy as jnp
    >>> patterns = jnp.full((2, 8, 8), 1 / 64)
    >>> noisy = add_background_noise(patterns, parse_noise_level("25%"), key=jax.random.key(0))
    >>> noisy.shape
    (2, 8, 8)
"""
from __future__ import annotations

import math
import numbers
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "NOISE_LEVELS",
    "parse_noise_level",
    "lorentzian_background",
    "add_background_noise",
    "noise_moments",
]

#: The 13 background-noise levels of the paper (name -> fraction w of the electrons in the glow).
NOISE_LEVELS: dict[str, float] = {
    f"{p}%": p / 100 for p in (0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70)
}

DEFAULT_COUNTS = 1e5
DEFAULT_SCALE = 1e5 / 4
DEFAULT_LORENTZ_WIDTH = 0.01

_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*%\s*$")


def parse_noise_level(level: float | str) -> float:
    """Parses a noise level into the fraction ``w`` in [0, 1].

    Accepted forms: a number is a fraction (``0.25``); a string ending in ``%`` is a percentage
    (``"25%"``); a string holding an integer is a percentage (``"25"``, as typed on a command line);
    a string holding a decimal number is a fraction (``"0.25"``).

    Args:
      level: the noise level.

    Returns:
      ``w`` as a Python float in [0, 1].

    Raises:
      ValueError: unparseable, or outside [0, 1] (0 % .. 100 %).
    """
    if isinstance(level, bool):
        raise ValueError(f"noise level {level!r}: expected a number or a string like '25%'")
    if isinstance(level, numbers.Real):
        w = float(level)
        source = repr(level)
    elif isinstance(level, str):
        source = repr(level)
        text = level.strip()
        match = _PERCENT.match(text)
        try:
            if match:
                w = float(match.group(1)) / 100
            elif re.fullmatch(r"[0-9]+", text):
                w = int(text) / 100
            else:
                w = float(text)
        except ValueError:
            raise ValueError(
                f"noise level {source}: expected a fraction (0.25) or a percentage ('25%' or '25')"
            ) from None
    else:
        raise ValueError(
            f"noise level {level!r} of type {type(level).__name__}: expected a number or a string"
        )
    if not (0.0 <= w <= 1.0) or math.isnan(w):
        raise ValueError(
            f"noise level {source} gives w={w!r}, outside [0, 1]; numbers are fractions "
            "(pass '25%' or '25' for a percentage)"
        )
    return w


def _check_w(w) -> float:
    try:
        value = float(w)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"noise weight w must be a concrete Python number (it selects the w = 0 branch), got {w!r}"
        ) from None
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"noise weight w={w!r} is outside [0, 1]")
    return value


def lorentzian_background(
    shape: tuple[int, int], *, width: float = DEFAULT_LORENTZ_WIDTH, shift: ArrayLike | None = None
) -> np.ndarray:
    """The normalised central Lorentzian glow ``B`` of the noise model.

    Args:
      shape: pattern shape ``(H, W)`` in pixels.
      width: half width at half maximum in cycles per pixel (frequency units of
        ``fftfreq(n, d=1)``); the HWHM in pixels is ``width * n`` along an axis of ``n`` pixels.
      shift: optional ``(..., 2)`` offset ``(rows, cols)`` in pixels (sub-pixel) of the glow's centre from
        ``(H // 2, W // 2)``, e.g. a descanned zero beam; the Lorentzian is evaluated at the shifted centre.
        ``None`` or zeros give the centred glow exactly.

    Returns:
      ``(H, W)`` (``(..., H, W)`` with a batch of shifts) float32 array(s) summing to 1, maximal at pixel
      ``(H // 2, W // 2)`` plus the shift.
    """
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise ValueError(f"background shape {shape!r} must be two positive sizes")
    if not width > 0:
        raise ValueError(f"Lorentzian width {width!r} must be > 0")
    if shift is None:
        qx = np.fft.fftshift(np.fft.fftfreq(h, d=1.0))[:, None]
        qy = np.fft.fftshift(np.fft.fftfreq(w, d=1.0))[None, :]
        b = 1.0 / (1.0 + (qx**2 + qy**2) / width**2)
        return (b / b.sum()).astype(np.float32)
    shift = np.asarray(shift, np.float64)
    if shift.shape[-1:] != (2,):
        raise ValueError(f"glow shift of shape {shift.shape}: expected (..., 2) = (rows, cols) in pixels")
    # fx - 0.0 / h == fx exactly, so a zero shift reproduces the centred glow bit for bit.
    qx = (np.fft.fftshift(np.fft.fftfreq(h, d=1.0)) - shift[..., 0, None] / h)[..., :, None]
    qy = (np.fft.fftshift(np.fft.fftfreq(w, d=1.0)) - shift[..., 1, None] / w)[..., None, :]
    b = 1.0 / (1.0 + (qx**2 + qy**2) / width**2)
    if b.ndim == 2:
        return (b / b.sum()).astype(np.float32)
    return (b / b.sum(axis=(-2, -1), keepdims=True)).astype(np.float32)


def _lorentzian_background_jax(shape: tuple[int, int], width: float, shift: jax.Array) -> jax.Array:
    """`lorentzian_background` with a traced ``(..., 2)`` shift (float32, inside ``jax.jit``)."""
    h, w = shape
    fx = jnp.asarray(np.fft.fftshift(np.fft.fftfreq(h, d=1.0)), jnp.float32)
    fy = jnp.asarray(np.fft.fftshift(np.fft.fftfreq(w, d=1.0)), jnp.float32)
    qx = (fx - shift[..., 0, None] / h)[..., :, None]
    qy = (fy - shift[..., 1, None] / w)[..., None, :]
    b = 1.0 / (1.0 + (qx**2 + qy**2) / jnp.float32(width) ** 2)
    return b / jnp.sum(b, axis=(-2, -1), keepdims=True)


def add_background_noise(
    patterns: ArrayLike,
    w: float,
    *,
    key: jax.Array,
    counts: float = DEFAULT_COUNTS,
    scale: float = DEFAULT_SCALE,
    lorentz_width: float = DEFAULT_LORENTZ_WIDTH,
    glow_shift: ArrayLike | None = None,
) -> jax.Array:
    """Adds the Auto4DSTEM background + Poisson noise to diffraction patterns.

    Args:
      patterns: ``(..., H, W)`` intensities, each pattern summing to about 1 (fraction of the probe
        electrons per pixel). Negative values are clipped to 0 before sampling.
      w: fraction of the electrons moved into the central Lorentzian, a concrete number in [0, 1]
        (see `NOISE_LEVELS`, `parse_noise_level`). ``w = 0`` returns ``scale * patterns`` exactly,
        without Poisson sampling (Auto4DSTEM behaviour).
      key: PRNG key for the Poisson draw.
      counts: electrons per probe ``N`` (Poisson rate scale).
      scale: output multiplier ``c``; the output is ``c * counts_observed / N``
        (default ``1e5 / 4``: "electrons / 4", pattern sum about 25,000).
      lorentz_width: Lorentzian HWHM in cycles per pixel (see `lorentzian_background`).
      glow_shift: optional ``(..., 2)`` offset in pixels of the glow's centre per pattern (broadcast against
        the leading dimensions of ``patterns``), e.g. the descanned zero beam; ``None`` = centred.

    Returns:
      ``(..., H, W)`` float32 noisy patterns. Per pixel, with ``lam = (1 - w) I + w B``:
      mean ``scale * lam`` and variance ``scale**2 * lam / counts``.

    Raises:
      ValueError: ``w`` outside [0, 1]; ``counts`` or ``scale`` not positive; fewer than 2 dims.
    """
    w = _check_w(w)
    if not counts > 0:
        raise ValueError(f"counts={counts!r} must be > 0")
    if not scale > 0:
        raise ValueError(f"scale={scale!r} must be > 0")
    patterns = jnp.asarray(patterns, dtype=jnp.float32)
    if patterns.ndim < 2:
        raise ValueError(f"patterns must have shape (..., H, W), got shape {patterns.shape}")
    if w == 0.0:
        return patterns * jnp.float32(scale)
    if glow_shift is None:
        background = jnp.asarray(lorentzian_background(patterns.shape[-2:], width=lorentz_width))
    else:
        shift = jnp.asarray(glow_shift, jnp.float32)
        background = _lorentzian_background_jax(patterns.shape[-2:], lorentz_width, shift)
    lam = jnp.float32(counts) * (jnp.float32(1.0 - w) * jnp.maximum(patterns, 0.0) + jnp.float32(w) * background)
    sample = jax.random.poisson(key, lam, dtype=jnp.int32)
    return sample.astype(jnp.float32) * jnp.float32(scale / counts)


def add_background_noise_numpy(
    patterns: np.ndarray,
    w: float,
    *,
    rng: np.random.Generator,
    counts: float = DEFAULT_COUNTS,
    scale: float = DEFAULT_SCALE,
    lorentz_width: float = DEFAULT_LORENTZ_WIDTH,
    glow_shift: ArrayLike | None = None,
) -> np.ndarray:
    """`add_background_noise` with NumPy's Poisson sampler (the simulator's CPU path: ~30x faster than
    ``jax.random.poisson`` on a CPU). Same definition and moments; a different random stream.

    Args:
      patterns: ``(..., H, W)`` intensities summing to about 1 each.
      w: background weight in [0, 1] (``0`` returns ``scale * patterns`` exactly).
      rng: a seeded ``numpy.random.Generator``.
      glow_shift: optional ``(..., 2)`` glow-centre offsets in pixels (see `add_background_noise`).

    Returns:
      ``(..., H, W)`` float32.
    """
    w = _check_w(w)
    patterns = np.asarray(patterns, np.float32)
    if w == 0.0:
        return patterns * np.float32(scale)
    background = lorentzian_background(patterns.shape[-2:], width=lorentz_width, shift=glow_shift).astype(np.float64)
    lam = counts * ((1.0 - w) * np.maximum(patterns, 0.0).astype(np.float64) + w * background)
    return (rng.poisson(lam) * (scale / counts)).astype(np.float32)


def noise_moments(
    patterns: ArrayLike,
    w: float,
    *,
    counts: float = DEFAULT_COUNTS,
    scale: float = DEFAULT_SCALE,
    lorentz_width: float = DEFAULT_LORENTZ_WIDTH,
) -> tuple[jax.Array, jax.Array]:
    """Per-pixel mean and variance of `add_background_noise` (exact, no sampling).

    Args:
      patterns: ``(..., H, W)`` intensities (as for `add_background_noise`).
      w: noise weight in [0, 1].
      counts, scale, lorentz_width: as for `add_background_noise`.

    Returns:
      ``(mean, variance)``, each ``(..., H, W)`` float32: ``scale * lam`` and
      ``scale**2 * lam / counts`` with ``lam = (1 - w) I + w B``; the variance is 0 when ``w = 0``.
    """
    w = _check_w(w)
    patterns = jnp.asarray(patterns, dtype=jnp.float32)
    background = jnp.asarray(lorentzian_background(patterns.shape[-2:], width=lorentz_width))
    lam = (1.0 - w) * jnp.maximum(patterns, 0.0) + w * background
    mean = scale * lam if w > 0 else scale * patterns
    var = (scale**2 / counts) * lam if w > 0 else jnp.zeros_like(patterns)
    return mean, var
