"""Specifications of ccstae_jax.data.noise: the Auto4DSTEM background + Poisson noise model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccstae_jax.data import noise


def _patterns(shape=(16, 16)):
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 1.0, shape) ** 4
    return (p / p.sum()).astype(np.float32)


def test_noise_has_stated_mean_and_variance_per_pixel():
    # Many independent draws of one 8 x 8 pattern; few counts so that shot noise is large.
    pattern = _patterns((8, 8))
    n, counts, scale, w = 10000, 500.0, 125.0, 0.3
    batch = jnp.broadcast_to(pattern, (n, *pattern.shape))
    draws = np.asarray(noise.add_background_noise(batch, w, key=jax.random.key(1), counts=counts, scale=scale),
                       np.float64)
    mean, var = (np.asarray(m, np.float64) for m in noise.noise_moments(pattern, w, counts=counts, scale=scale))
    lam = counts * mean / scale  # Poisson rate per pixel
    # Sample mean: standard error sqrt(var / n). Sample variance of a Poisson count: its variance is
    # (mu4 - sigma^4) / n with mu4 = lam (1 + 3 lam) -> sd = scale^2/counts^2 * sqrt((lam + 2 lam^2) / n).
    z_mean = (draws.mean(0) - mean) / np.sqrt(var / n)
    sd_var = (scale / counts) ** 2 * np.sqrt((lam + 2 * lam**2) / n)
    z_var = (draws.var(0, ddof=1) - var) / sd_var
    assert np.abs(z_mean).max() < 5.0  # 64 pixels: some |z| > 5 has probability ~4e-5
    assert np.abs(z_var).max() < 5.5
    assert abs(z_mean.mean()) < 0.5 and abs(z_var.mean()) < 0.5  # no systematic bias
    # Outputs are whole electron counts times scale / counts.
    np.testing.assert_allclose(draws / (scale / counts), np.round(draws / (scale / counts)), atol=1e-3)


def test_zero_weight_is_exactly_scaled_pattern_without_sampling():
    pattern = _patterns()[None]
    out = noise.add_background_noise(pattern, 0.0, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out), pattern * np.float32(1e5 / 4))


def test_weight_outside_unit_interval_is_rejected_with_its_value():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=f"w={bad!r}"):
            noise.add_background_noise(_patterns()[None], bad, key=jax.random.key(0))


def test_same_key_reproduces_and_other_key_differs():
    p = _patterns()[None]
    a = noise.add_background_noise(p, 0.25, key=jax.random.key(7))
    b = noise.add_background_noise(p, 0.25, key=jax.random.key(7))
    c = noise.add_background_noise(p, 0.25, key=jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_background_is_normalised_lorentzian_centred_at_half_size():
    b = noise.lorentzian_background((200, 200))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b.sum(), 1.0, rtol=1e-5)
    assert np.unravel_index(np.argmax(b), b.shape) == (100, 100)
    # HWHM = 0.01 cycles/px * 200 px = 2 px along each axis.
    np.testing.assert_allclose(b[102, 100] / b[100, 100], 0.5, rtol=1e-5)


def test_noise_levels_are_the_paper_thirteen():
    assert len(noise.NOISE_LEVELS) == 13
    assert noise.NOISE_LEVELS["0%"] == 0.0 and noise.NOISE_LEVELS["70%"] == pytest.approx(0.7)
    assert "55%" not in noise.NOISE_LEVELS and "60%" in noise.NOISE_LEVELS


@pytest.mark.parametrize("level", [0.25, "25%", "25", " 25 % ", "0.25"])
def test_parse_noise_level_accepts_fraction_and_percent_forms(level):
    assert noise.parse_noise_level(level) == pytest.approx(0.25)


@pytest.mark.parametrize("level", ["abc", 25, "150%", -0.1, None])
def test_parse_noise_level_rejects_invalid(level):
    with pytest.raises(ValueError, match="noise level"):
        noise.parse_noise_level(level)


def test_numpy_sampler_has_the_same_moments_as_the_jax_one():
    """The simulator's CPU path (NumPy Poisson) follows the same definition: mean and variance per pixel."""
    from ccstae_jax.data.noise import add_background_noise_numpy, noise_moments

    rng = np.random.default_rng(0)
    pattern = rng.uniform(size=(16, 16)).astype(np.float32)
    pattern /= pattern.sum()
    draws = np.stack([add_background_noise_numpy(pattern, 0.3, rng=rng) for _ in range(4000)])
    mean, var = (np.asarray(m) for m in noise_moments(pattern, 0.3))
    np.testing.assert_allclose(draws.mean(0), mean, rtol=0.05, atol=1e-3 * mean.max())
    np.testing.assert_allclose(draws.var(0), var, rtol=0.15, atol=1e-3 * var.max())
    np.testing.assert_array_equal(add_background_noise_numpy(pattern, 0.0, rng=rng), pattern * np.float32(1e5 / 4))


def test_zero_glow_shift_gives_the_centred_background_exactly():
    h, w = 50, 64
    # The centred glow as defined before glow shifts existed (written out here as the reference).
    qx = np.fft.fftshift(np.fft.fftfreq(h, d=1.0))[:, None]
    qy = np.fft.fftshift(np.fft.fftfreq(w, d=1.0))[None, :]
    b = 1.0 / (1.0 + (qx**2 + qy**2) / 0.01**2)
    centred = (b / b.sum()).astype(np.float32)
    np.testing.assert_array_equal(noise.lorentzian_background((h, w)), centred)
    np.testing.assert_array_equal(noise.lorentzian_background((h, w), shift=(0.0, 0.0)), centred)
    batch = noise.lorentzian_background((h, w), shift=np.zeros((3, 2)))
    assert batch.shape == (3, h, w)
    np.testing.assert_array_equal(batch, np.broadcast_to(centred, (3, h, w)))


def test_shifted_glow_is_the_lorentzian_at_the_shifted_centre():
    h = w = 40
    b = noise.lorentzian_background((h, w), width=0.05, shift=(1.5, -3.0))
    np.testing.assert_allclose(b.sum(), 1.0, rtol=1e-6)
    row = h // 2 + 1  # the glow is symmetric about row 20 + 1.5 and peaks on column 20 - 3
    np.testing.assert_allclose(b[row, :], b[row + 1, :], rtol=1e-6)
    assert np.argmax(b[row]) == w // 2 - 3
    # The traced (jitted) version used on accelerators agrees with the NumPy one.
    shifts = np.array([[1.5, -3.0], [0.25, 0.75]], np.float32)
    got = jax.jit(lambda s: noise._lorentzian_background_jax((h, w), 0.05, s))(shifts)
    np.testing.assert_allclose(np.asarray(got), noise.lorentzian_background((h, w), width=0.05, shift=shifts),
                               rtol=2e-5, atol=1e-9)


def test_glow_shift_moves_the_noise_background_per_pattern():
    flat = np.zeros((2, 32, 32), np.float32)  # w = 1: the data are the glow alone
    shift = np.array([[0.0, 0.0], [4.0, -6.0]])
    for out in (noise.add_background_noise(flat, 1.0, key=jax.random.key(0), counts=1e9, glow_shift=shift),
                noise.add_background_noise_numpy(flat, 1.0, rng=np.random.default_rng(0), counts=1e9,
                                                 glow_shift=shift)):
        peaks = [np.unravel_index(np.argmax(p), p.shape) for p in np.asarray(out)]
        assert peaks == [(16, 16), (20, 10)]
