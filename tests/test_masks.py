"""Specifications of ring masks, spot masks and the spot-mask schedule."""
import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax.model import masks


def _hex_pattern(n=128, g=30.0, rot=0.2, r=3.0):
    rows, cols = np.mgrid[:n, :n] - n // 2
    img = 50 * np.exp(-(rows**2 + cols**2) / (2 * 4.0**2))
    for k in range(6):
        a = rot + k * np.pi / 3
        img += np.exp(-((rows - g * np.cos(a)) ** 2 + (cols - g * np.sin(a)) ** 2) / (2 * r**2))
    return img.astype(np.float32)


def test_ring_mask_counts_pixels_of_annulus():
    m = np.asarray(masks.ring_mask((200, 200), 50, 85))
    # The reference's cv2 ring(50, 85) on 200x200 has 14,856 pixels; ours uses r in (50, 85] on pixel centres.
    assert abs(int(m.sum()) - np.pi * (85**2 - 50**2)) < 0.01 * np.pi * (85**2 - 50**2)
    assert not m[100, 100] and m[100, 100 + 60] and not m[100, 100 + 90]


def test_ring_radii_may_be_traced_without_recompiling():
    f = jax.jit(lambda a, b: masks.ring_mask((32, 32), a, b).sum())
    assert int(f(3.0, 10.0)) > int(f(5.0, 10.0))
    assert f._cache_size() == 1


def test_spot_mask_keeps_every_spot_not_one_disk():
    base = jnp.asarray(_hex_pattern(g=30.0))
    ring = masks.ring_mask(base.shape, 20, 40)
    m = np.asarray(masks.spot_mask(base, ring, 5.0, threshold=0.25, max_radius=8))
    n = base.shape[0] // 2
    for k in range(6):
        a = 0.2 + k * np.pi / 3
        assert m[int(round(n + 30 * np.cos(a))), int(round(n + 30 * np.sin(a)))] == 1.0
    # between spots (30 degrees off) nothing is kept, and nothing outside the ring
    a = 0.2 + np.pi / 6
    assert m[int(round(n + 30 * np.cos(a))), int(round(n + 30 * np.sin(a)))] == 0.0
    assert m[n, n] == 0.0
    # six disks of radius ~5: area well below the ring's
    assert 6 * np.pi * 4**2 < m.sum() < 6 * np.pi * 6.5**2


def test_spot_radius_schedule_shrinks_linearly():
    s = masks.MaskSchedule(shrink_start=2, shrink_epochs=4, spot_radius_start=8, spot_radius_end=4)
    np.testing.assert_allclose([float(s.spot_radius(e)) for e in (0, 2, 4, 6, 9)], [8, 8, 6, 4, 4])


def test_spot_radius_schedule_accepts_fractional_epochs():
    s = masks.MaskSchedule(shrink_start=0.0, shrink_epochs=1.0, spot_radius_start=8, spot_radius_end=4)
    np.testing.assert_allclose([float(s.spot_radius(e)) for e in (0.0, 0.5, 1.0)], [8, 6, 4])


def test_static_ring_mask_is_the_ring_mask_on_the_host():
    from ccstae_jax.model.masks import ring_mask, static_ring_mask

    for center in (None, (30.5, 27.0)):
        host = static_ring_mask((64, 60), 7.5, 25.0, center=center)
        assert isinstance(host, np.ndarray) and host.dtype == bool
        np.testing.assert_array_equal(host, np.asarray(ring_mask((64, 60), 7.5, 25.0, center=center)))
