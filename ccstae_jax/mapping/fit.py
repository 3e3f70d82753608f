"""Per-pattern forward-model fit of an affine warp, on the pixels that carry position information.

The model of one observed pattern ``x`` (data frame, pixels ``q``) is its base pushed into the data frame,

    mu(q) = bg(|q - z|) + a spots(phi q),        phi = theta^{-1}  (normalised coordinates, `ccstae_jax.ops.affine`),

with ``spots`` the part of the base that moves with the lattice, ``bg`` its radially symmetric part (the central disk
and the diffuse glow, which stay centred on the zero beam ``z`` of that pattern) and ``phi`` six free numbers.
``a`` scales the spots (`BaseTable.scale_spots`; else 1): thickness, tilt and dose make a pattern's spots brighter or
dimmer than the base's average, and a model that cannot follow would move or stretch its spots to make up for it. With
*rigid spots* (`prepare_bases` given a disk radius) each spot is moved, not stretched: strain moves the diffracted
disks while each keeps the probe's shape, so a pixel near the spot centred at ``c`` in the base is modelled as

    mu(q) = bg(|q - z|) + a spots(c + R_phi (q - phi^{-1} c)),

the spot's own pixel offset from where the warp puts its centre, turned by ``R_phi``, the rotation part of ``phi``
(`ccstae_jax.ops.affine.turn_offsets`): a round disk reads the same either way, but whatever surrounds it in the
base (its edge's tails, a neighbour's, the central disk's) turns with the lattice. The Jacobian leaves out the
dependence of that turn on ``phi``: it is exact for a round disk. A pixel farther than `RIGID_REACH` disk radii (plus
2 px) from every spot found in the base (a spot too faint to be found, or the background between spots) is not
forced onto a distant centre: it moves with the warp. For disks a few pixels wide the two models agree;
for wide disks a stretched base misplaces their edges by the strain times the disk radius. The
fit is iteratively reweighted least squares with Levenberg-Marquardt damping, one independent problem per pattern,
vectorised over the batch. Its weights are the inverse of a variance ``max(a mu + (1 - a) top, floor top)`` (``top``
the brightest compared pixel of the model): shot noise, whose variance grows with the counts, blended with an error
that does not, the base's own misfit (`noise_weight` measures the blend ``a`` on a scan, from the differences between
neighbouring patterns and the fits' residuals). ``a = 1`` is Fisher scoring of the Poisson likelihood, ``a = 0``
unweighted least squares, right for noise-free data. The floor caps the weight of dark pixels, where a base's small
misfits would bias the fit more than their counts inform it. How low it may go depends on how well the base
describes those pixels; `scatter_ratio` measures it on a scan: two floors compared by how much the warps of
neighbouring positions, which share their lattice, differ.

Speed comes from two choices:

* **Pixel lists.** Only the pixels where the base's spots have a gradient carry information about ``phi`` (a spot's
  edge, not a flat disk interior or the empty space between spots). `information_mask` ranks the base-frame pixels
  by their Fisher information and keeps those holding a fixed share of it; each pattern compares only the data
  pixels whose pre-image under its starting warp falls there (a fixed-size list, gathered once).
* **A tabulated interpolant.** The base is interpolated with Keys' cubic kernel (``A = -0.5``, third-order accurate:
  it moves a spot's centroid exactly) tabulated once on a grid `FINE` times finer than the detector, together with
  its two derivatives; each iteration reads value and gradient by bilinear interpolation of that table. No
  interpolation of the noisy data ever enters the fit.

A step is accepted only if it lowers the weighted squared residual under the weights of the last accepted point, so
the fit never ends worse than it started.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ccstae_jax.model.masks import pixel_radii
from ccstae_jax.ops import affine, warp

#: Sub-pixel factor of the tabulated interpolant (value and derivatives of the cubic base on a grid this much finer).
FINE = 4
#: Quantile of each radius bin taken as a base's background with rigid spots: their edges are modelled pixel by
#: pixel, so the background must be free of their tails, which lift the median where wide spots fill a circle.
RIGID_BACKGROUND_QUANTILE = 0.2
#: Quantile of each radius bin subtracted from a base before its spots are searched for: wide disks can fill 90 % of
#: their ring, so only a low quantile leaves their plateau standing.
SPOT_SEARCH_QUANTILE = 0.05
#: With rigid spots, base pixels within this many disk radii (plus 2 px) of a found spot centre move with that spot.
RIGID_REACH = 1.5
#: At most this many times `spot_centres` moves a spot's window onto the centroid it holds.
CENTROID_STEPS = 20
#: Disks at least this many pixels in radius are located by their rim (`spot_centres`), not their centroid.
RIM_MIN_RADIUS = 4.0
#: Rays along which `spot_centres` finds a wide disk's rim, and at most how often it re-centres them.
RIM_RAYS = 64
RIM_STEPS = 10
#: Radial bands of the fitted pixels (equal shares of them, innermost first) in which `fit_patterns` measures how
#: bright a pattern's spots are against its base's: the relative intensity of the diffraction orders, which tells
#: phases apart.
N_BANDS = 4
#: Bins (equal steps of ``mu / top``) in which `fit_patterns` sums its squared residuals for `noise_weight`.
N_LEVELS = 8
#: The blend of shot noise in the fit's weights when nothing has been measured (module docstring).
DEFAULT_NOISE_WEIGHT = 1.0
#: The floor of the weights' variance, relative to the brightest compared pixel (module docstring).
DEFAULT_FLOOR = 0.3
#: The lower floor a map also tries on part of its subset (`ccstae_jax.mapping.predict.MapConfig.floor`): dark pixels
#: weighted closer to their shot noise, better where the base describes them well enough.
LOW_FLOOR = 0.1
#: The Gaussian (pixels) a map also tries on its final bases' spots (`ccstae_jax.mapping.predict.MapConfig.blur`).
#: A base averaged from patterns that are not yet all aligned holds each group's copy of a sharp disk edge a fraction
#: of a pixel from the others', and a pattern fitted against it finds its own copy again: smoothing the edges by
#: about a pixel removes those steps, at the cost of some of the edges' information.
BASE_BLUR = 0.7
#: With `BaseTable.scale_spots`, a fit step that would scale the spots below this factor stops at it: a pattern that
#: mixes the lattices of grains meeting under the probe fits any one of them with a small factor, and a vanishing one
#: would leave its warp free to drift.
MIN_SPOT_SCALE = 0.4
#: How a base may be interpolated: Keys' cubic convolution (``A = -0.5``) or bilinear.
INTERPOLATIONS = ("cubic", "bilinear")
_HP = jax.lax.Precision.HIGHEST


@struct.dataclass
class BaseTable:
    """The dictionary prepared for fitting (see `prepare_bases`): a pytree of arrays, so one compiled fit serves any
    dictionary of the same shapes; ``n_points`` is static (part of the tree's structure).

    Attributes:
      table: ``(K, FINE * (H + 1) + 1, FINE * (W + 1) + 1, 3)`` float32: the cubic interpolant of each base's spots
        and its derivatives along rows and columns (per detector pixel), sampled at base-frame pixel coordinates
        ``row = i / FINE - 1``, ``col = j / FINE - 1`` (zero beyond the base's frame).
      profile: ``(K, n_bins)`` float32 radial background of each base, value at radius ``i + 0.5`` pixels.
      mask: ``(K, H, W)`` bool, the base-frame pixels fitted (`information_mask`).
      n_points: static length of each pattern's pixel list (enough for the largest mask, with room to spare).
      centres: ``(K, S, 2)`` float32 spot centres of each base in normalised ``(x, y)`` coordinates (index 0: the
        zero beam; padding far outside the frame), or None: the whole base follows the affine warp.
      owner: ``(K, H, W)`` int32, the spot (index into ``centres``) nearest each base pixel, -1 where none is within
        reach (the pixel moves with the warp), or None.
      band_edges: ``(K, N_BANDS - 1)`` float32 radii (pixels from the zero beam) between the `N_BANDS` radial bands
        that hold equal shares of each base's fitted pixels, or None (no spot amplitudes measured).
      noise_weight: ``()`` float32 in [0, 1], the share of shot noise in the fit's weights (module docstring).
      floor: ``()`` float32 in (0, 1], the floor of the weights' variance relative to the brightest compared pixel
        (module docstring).
      scale_spots: static; each pattern's fit also scales the base's spots by a free factor ``a`` (module docstring),
        a seventh parameter, kept at `MIN_SPOT_SCALE` or above.
      margin: static; the base frame extends the patterns' frame by this many pixels on every side (``H`` and ``W``
        above are the base frame's: the pattern's plus ``2 margin``), so that a pattern's corners, turned by its warp,
        still fall on the base. Coordinates stay the pattern frame's throughout (normalised ``[-1, 1]`` across the
        pattern; the margin lies beyond).
    """

    table: jax.Array
    profile: jax.Array
    mask: jax.Array
    n_points: int = struct.field(pytree_node=False)
    centres: jax.Array | None = None
    owner: jax.Array | None = None
    band_edges: jax.Array | None = None
    noise_weight: jax.Array | float = DEFAULT_NOISE_WEIGHT
    floor: jax.Array | float = DEFAULT_FLOOR
    scale_spots: bool = struct.field(pytree_node=False, default=False)
    margin: int = struct.field(pytree_node=False, default=0)

    @property
    def pattern_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the patterns this table fits: the base frame less its margin."""
        h, w = self.mask.shape[-2:]
        return h - 2 * self.margin, w - 2 * self.margin


class FitResult(NamedTuple):
    """`fit_patterns` output, per pattern.

    Attributes:
      theta: ``(B, 2, 3)`` fitted pull warps (base frame -> data frame).
      fisher: ``(B, 6, 6)`` ``J^T W J`` at the fit, for the six entries of ``phi = theta^{-1}`` (row-major),
        ``W`` the fit's weights (module docstring); its inverse, times ``chi2 / dof``, estimates their covariance.
        With `BaseTable.scale_spots`, the information left about ``phi`` once the spots' scale is estimated too (the
        Schur complement of that factor in the 7 x 7 matrix).
      chi2: ``(B,)`` weighted squared residual ``sum W (mu - x)^2`` at the fit.
      dof: ``(B,)`` number of pixels compared minus the parameters fitted (6, or 7 with the spots' scale).
      spot_amplitude: ``(B, N_BANDS)`` the factor by which the base's spots, scaled in each radial band of
        ``BaseTable.band_edges``, best fit the pattern's at the fitted warp (weighted least squares, background
        fixed), or None without band edges. 1 where the pattern's spots are as bright as the base's.
      residual_levels: ``(B, N_LEVELS, 3)`` per bin of ``mu / top`` at the fit: the sum of the squared residuals, the
        sum of ``mu`` and the pixel count (`noise_weight`'s input).
      top: ``(B,)`` the brightest compared pixel of the model at the fit.
    """

    theta: jax.Array
    fisher: jax.Array
    chi2: jax.Array
    dof: jax.Array
    spot_amplitude: jax.Array | None = None
    residual_levels: jax.Array | None = None
    top: jax.Array | None = None


# ----------------------------------------------------------------------------------------------- base preparation
def radial_profile(images: jax.Array, center: tuple[float, float], quantile: float = 0.5) -> jax.Array:
    """Median (or another ``quantile``) of each 1-pixel radius bin about ``center`` (row, col): ``(..., H, W)`` ->
    ``(..., n_bins)``.

    Spots fill a small fraction of every circle about the centre, so the bin median is the diffuse background (the
    central disk, its tails and the glow) without them; where wide spots fill much of a circle their tails lift the
    median, and a low quantile is the background. Bin ``i`` holds the pixels with ``i <= r < i + 1``.
    """
    images = jnp.asarray(images, jnp.float32)
    h, w = images.shape[-2:]
    r = pixel_radii((h, w), center)
    ring = np.floor(r).astype(np.int64).ravel()
    nbins = int(ring.max()) + 1
    counts = np.bincount(ring, minlength=nbins)
    order = np.argsort(ring, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(ring.size) - np.repeat(starts, counts)
    table = np.full((nbins, int(counts.max())), ring.size, np.int64)  # ring.size -> the NaN pad
    table[ring[order], slot] = order
    flat = images.reshape(images.shape[:-2] + (h * w,))
    padded = jnp.concatenate([flat, jnp.full(flat.shape[:-1] + (1,), jnp.nan, jnp.float32)], -1)
    return jnp.nanquantile(padded[..., table], quantile, axis=-1)


def profile_at(profile: jax.Array, radius: jax.Array) -> jax.Array:
    """A radial profile (`radial_profile`, bin centres at ``i + 0.5``) evaluated at radii, linear in between."""
    n = profile.shape[-1]
    pos = jnp.clip(jnp.asarray(radius, jnp.float32) - 0.5, 0.0, n - 1.0)
    i = jnp.minimum(jnp.floor(pos).astype(jnp.int32), n - 2)
    t = pos - i
    return profile[..., i] * (1 - t) + profile[..., i + 1] * t


def _radius_image(shape: tuple[int, int], center: tuple[float, float]) -> np.ndarray:
    return pixel_radii(shape, center).astype(np.float32)


def _kernel_matrices(n: int, interpolation: str = "cubic") -> tuple[np.ndarray, np.ndarray]:
    """Interpolation matrices ``(FINE * (n + 1) + 1, n)`` (values and d/dcoordinate) at coordinates ``i / FINE - 1``
    with zero padding beyond the ``n`` samples: Keys' cubic kernel (taps at offsets -1..2 from ``floor``) or the
    linear one (taps 0, 1)."""
    coords = np.arange(FINE * (n + 1) + 1) / FINE - 1.0
    fl = np.floor(coords)
    t = coords - fl
    d = np.stack([t + 1, t, 1 - t, 2 - t], -1)  # distances to the taps at -1, 0, 1, 2
    sign = np.array([1.0, 1.0, -1.0, -1.0])  # d(distance)/dt
    if interpolation == "cubic":
        a = warp.KEYS_A
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        wts = np.where(d <= 1, near, far)
        dnear = (3 * (a + 2) * d - 2 * (a + 3)) * d
        dfar = (3 * a * d - 10 * a) * d + 8 * a
        dwts = np.where(d <= 1, dnear, dfar) * sign
    elif interpolation == "bilinear":
        wts = np.maximum(1.0 - d, 0.0)
        dwts = np.broadcast_to(np.array([0.0, -1.0, 1.0, 0.0]), d.shape)  # the slope on [floor, floor + 1)
    else:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    val = np.zeros((coords.size, n))
    der = np.zeros((coords.size, n))
    for k in range(4):
        idx = fl.astype(int) - 1 + k
        ok = (idx >= 0) & (idx < n)
        rows = np.nonzero(ok)[0]
        val[rows, idx[ok]] += wts[ok, k]
        der[rows, idx[ok]] += dwts[ok, k]
    return val.astype(np.float32), der.astype(np.float32)


def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
    """``(..., H, W)`` smoothed by a Gaussian of ``sigma`` pixels (separable matrix products, zero padding)."""
    h, w = images.shape[-2:]

    def matrix(n):
        d = np.arange(n)[:, None] - np.arange(n)[None, :]
        return jnp.asarray(np.exp(-0.5 * (d / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma), jnp.float32)

    return jnp.einsum("ih,...hw,jw->...ij", matrix(h), images, matrix(w), precision=_HP)


def interpolation_table(spots: jax.Array, interpolation: str = "cubic") -> jax.Array:
    """``(K, H, W)`` -> ``(K, FINE (H + 1) + 1, FINE (W + 1) + 1, 3)``: the interpolant of each image and its row and
    column derivatives (per pixel), tabulated (separable matrix products)."""
    h, w = spots.shape[-2:]
    vr, dr = (jnp.asarray(m) for m in _kernel_matrices(h, interpolation))
    vc, dc = (jnp.asarray(m) for m in _kernel_matrices(w, interpolation))
    s = jnp.asarray(spots, jnp.float32)
    value = jnp.einsum("ih,khw,jw->kij", vr, s, vc, precision=_HP)
    d_row = jnp.einsum("ih,khw,jw->kij", dr, s, vc, precision=_HP)
    d_col = jnp.einsum("ih,khw,jw->kij", vr, s, dc, precision=_HP)
    return jnp.stack([value, d_row, d_col], -1)


def information_mask(
    spots: np.ndarray,
    background: np.ndarray,
    *,
    support: np.ndarray | None = None,
    share: float = 0.98,
    max_points: int | None = None,
    noise_weight: float = DEFAULT_NOISE_WEIGHT,
    floor: float = DEFAULT_FLOOR,
    border: int = 2,
    center: tuple[float, float] | None = None,
    min_radius: float = 0.0,
    grow: int = 1,
    stride: int = 1,
    margin: int = 0,
) -> np.ndarray:
    """Base-frame pixels that carry a given share of the information about the warp, ``(K, H, W)`` bool.

    Each pixel's Fisher information about the warp under the Poisson model is ``|grad spots|^2 (1 + u^2 + v^2) / mu``
    (``u, v`` normalised coordinates: the lever arm of the linear part; ``mu = background + spots``, blended with its
    largest value by ``noise_weight`` and floored at ``floor`` times that value, as in the fit). Pixels are taken in
    decreasing order of information until they hold ``share`` of the total (at most ``max_points``), then dilated by
    one pixel so that a starting warp a fraction of a pixel off still covers the spot edges. Pixels within
    ``border`` of the frame, or outside ``support``, or closer than ``min_radius`` to ``center`` (the central disk,
    whose edge is part of the background and says nothing about the lattice), are never taken. ``stride`` > 1 keeps
    only every ``stride``-th row and column of the result: enough for a model smooth on that scale (a blurred base),
    at ``1 / stride**2`` of the cost. ``margin``: the base frame extends the patterns' by this many pixels on every
    side (`BaseTable.margin`; the lever arm is measured in the patterns' normalised coordinates); ``center`` is in
    the base frame's pixels.

    Args:
      spots: ``(K, H, W)`` the moving part of each base.
      background: ``(K, H, W)`` its fixed radial part.
      support: ``(K, H, W)`` bool pixels where the base is known (None = everywhere).

    Returns:
      ``(K, H, W)`` bool.
    """
    spots = np.asarray(spots, np.float64)
    background = np.asarray(background, np.float64)
    k, h, w = spots.shape
    keep = np.ones((k, h, w), bool) if support is None else np.asarray(support, bool).copy()
    keep[:, :border], keep[:, h - border:], keep[:, :, :border], keep[:, :, w - border:] = False, False, False, False
    if min_radius > 0:
        keep &= _radius_image((h, w), (h // 2, w // 2) if center is None else center)[None] >= min_radius
    gr, gc = np.gradient(spots, axis=(1, 2))
    u = affine.pixel_centre(np.arange(w) - margin, w - 2 * margin)
    v = affine.pixel_centre(np.arange(h) - margin, h - 2 * margin)
    lever = 1.0 + u[None, :] ** 2 + v[:, None] ** 2
    out = np.zeros((k, h, w), bool)
    for i in range(k):
        mu = background[i] + spots[i]
        top = mu[keep[i]].max() if keep[i].any() else 0.0
        variance = np.maximum(noise_weight * mu + (1.0 - noise_weight) * top, max(floor * top, 1e-30))
        info = np.where(keep[i], (gr[i] ** 2 + gc[i] ** 2) * lever / variance, 0.0)
        order = np.argsort(info.ravel())[::-1]
        total = info.sum()
        if total <= 0:
            continue
        n = int(np.searchsorted(np.cumsum(info.ravel()[order]), share * total) + 1)
        if max_points is not None:
            n = min(n, int(max_points))
        sel = np.zeros(h * w, bool)
        sel[order[:n]] = True
        grown = sel.reshape(h, w)
        for _ in range(grow):
            step = grown.copy()
            step[1:] |= grown[:-1]
            step[:-1] |= grown[1:]
            step[:, 1:] |= grown[:, :-1]
            step[:, :-1] |= grown[:, 1:]
            grown = step
        out[i] = grown & keep[i]
    if stride > 1:
        lattice = np.zeros((h, w), bool)
        lattice[::stride, ::stride] = True
        out &= lattice[None]
    return out


def spot_centres(spots: np.ndarray, center: tuple[float, float], disk_radius: float, *, min_radius: float = 0.0,
                 threshold: float = 0.15) -> list[np.ndarray]:
    """The spot centres of each base, ``(K, H, W)`` spots -> K arrays ``(n_k, 2)`` (row, col) in pixels.

    The zero beam's disk is blanked first, out to `zero_beam_blank` (its edge, where a base that is not exactly round
    leaves residuals hundreds of times brighter than a diffracted disk, must neither outshine the first order nor pull
    its centre inward). A centre is a maximum of the rest smoothed by half a disk radius, the largest within a disk
    radius (a square window; peaks closer than a disk radius are one disk, the brightest kept: a brighter order
    nearby must not hide a disk that nearly touches it), brighter than ``threshold`` times the brightest one farther
    from ``center`` than a disk diameter and ``min_radius`` (the fitted region: the central disk's tails must not set
    the scale), refined to the centroid of the positive spots within a disk radius plus one pixel of it, that window
    moved onto the centroid until it settles (`CENTROID_STEPS` at most): a window about the smoothed maximum, which
    a neighbour can pull off centre, would cut the disk on one side. The zero beam (``center``) is not among them."""
    from scipy import ndimage

    spots = np.asarray(spots, np.float64)
    k, h, w = spots.shape
    r_disk = max(float(disk_radius), 0.5)
    radius = _radius_image((h, w), center)
    far = radius > max(2 * r_disk, float(min_radius))
    zero_beam = radius <= zero_beam_blank(r_disk)
    reach = int(np.ceil(r_disk + 1))
    out = []
    for i in range(k):
        blanked = np.where(zero_beam, 0.0, spots[i])
        smooth = ndimage.gaussian_filter(blanked, max(1.0, 0.5 * r_disk))
        top = smooth[far].max() if far.any() else 0.0
        size = int(np.ceil(r_disk)) | 1
        peaks = (smooth == ndimage.maximum_filter(smooth, size=size)) & far & (smooth > threshold * top) & (top > 0)
        rows, cols = np.nonzero(peaks)
        kept = []  # brightest first; a peak within a disk radius of a kept one is the same disk
        for j in np.argsort(-smooth[rows, cols]):
            if all((rows[j] - rows[q]) ** 2 + (cols[j] - cols[q]) ** 2 > r_disk ** 2 for q in kept):
                kept.append(j)
        pos = np.clip(blanked, 0.0, None)
        found = []
        for r, c in zip(rows[kept], cols[kept]):
            y, x, held = float(r), float(c), False
            for _ in range(CENTROID_STEPS):
                r0, r1 = max(int(np.floor(y)) - reach, 0), min(int(np.ceil(y)) + reach + 1, h)
                c0, c1 = max(int(np.floor(x)) - reach, 0), min(int(np.ceil(x)) + reach + 1, w)
                yy, xx = np.mgrid[r0:r1, c0:c1]
                near = np.hypot(yy - y, xx - x) <= r_disk + 1
                wts = pos[r0:r1, c0:c1][near]
                if wts.sum() <= 0:
                    break
                held = True
                y_new, x_new = (yy[near] * wts).sum() / wts.sum(), (xx[near] * wts).sum() / wts.sum()
                settled = np.hypot(y_new - y, x_new - x) < 1e-3
                y, x = y_new, x_new
                if settled:
                    break
            if held:
                rim = _rim_centre(blanked, y, x, r_disk) if r_disk >= RIM_MIN_RADIUS else None
                found.append((y, x) if rim is None else rim)
        out.append(np.asarray(found, np.float64).reshape(-1, 2))
    return out


def _rim_centre(image: np.ndarray, y: float, x: float, disk_radius: float) -> tuple[float, float] | None:
    """The centre of the circle through a wide disk's rim, from a start ``(y, x)`` inside it (pixels), or None where
    the rim does not show. Along `RIM_RAYS` rays from the current centre the rim is where the profile first falls
    below halfway between the disk's plateau (the median within 0.6 radii) and its surroundings (the 0.2 quantile
    1.5 to 3 px beyond the radius); rays whose rim lies more than a pixel from the median are left out (a
    neighbour's tail, or the zero beam's, where it nearly touches), and a circle is fitted to the rest by least
    squares. A centroid is pulled toward whatever else its window holds; the rim of a flat-topped disk is where its
    position is measured."""
    from scipy import ndimage

    r = float(disk_radius)
    angles = 2 * np.pi * np.arange(RIM_RAYS) / RIM_RAYS
    ca, sa = np.cos(angles), np.sin(angles)
    step = 0.1
    t = np.arange(0.25 * r, r + 3.0 + step, step)
    core, ring = t <= 0.6 * r, (t >= r + 1.5) & (t <= r + 3.0)
    for _ in range(RIM_STEPS):
        prof = ndimage.map_coordinates(image, [y + t[None, :] * sa[:, None], x + t[None, :] * ca[:, None]],
                                       order=1, mode="constant")
        inside, outside = np.median(prof[:, core]), np.quantile(prof[:, ring], 0.2)
        if not inside > outside:
            return None
        half = 0.5 * (inside + outside)
        below = (prof < half) & (t >= 0.5 * r)[None, :]
        hit = below.any(1)
        j = np.maximum(np.argmax(below, 1), 1)
        a, b = prof[np.arange(RIM_RAYS), j - 1], prof[np.arange(RIM_RAYS), j]
        edge = t[j - 1] + step * np.clip((a - half) / np.where(a > b, a - b, 1.0), 0.0, 1.0)
        ok = hit & (np.abs(edge - np.median(edge[hit])) <= 1.0) if hit.any() else hit
        if ok.sum() < RIM_RAYS // 2:
            return None
        design = np.stack([np.ones(ok.sum()), sa[ok], ca[ok]], 1)
        _, dy, dx = np.linalg.lstsq(design, edge[ok], rcond=None)[0]
        y, x = y + dy, x + dx
        if np.hypot(dy, dx) < 1e-3:
            break
    return y, x


def zero_beam_blank(disk_radius: float) -> float:
    """Radius (pixels) within which `spot_centres` ignores a base: the zero beam's disk and its edge's tails."""
    return float(disk_radius) + max(2.0, 0.25 * float(disk_radius))


def _spot_owners(centres: list[np.ndarray], shape: tuple[int, int], center: tuple[float, float],
                 min_spots: int = 0, reach: float = np.inf, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(K, S, 2)`` normalised ``(x, y)`` centres (index 0 the zero beam, padding far outside) and the ``(K, H, W)``
    index of the nearest of them for every base pixel, -1 where that is farther than ``reach`` pixels (a spot too
    faint to be found, or the background between spots: such a pixel moves with the warp itself) (S a multiple of
    16, at least ``min_spots``). ``centres``, ``center`` and ``shape`` are the base frame's, which extends the
    patterns' by ``margin`` pixels on every side; the normalised coordinates are the patterns'."""
    h, w = shape
    n = max(len(c) for c in centres) + 1
    s = max(int(np.ceil(n / 16)) * 16, int(min_spots))
    table = np.full((len(centres), s, 2), 1e3, np.float32)  # padding: never the nearest
    owner = np.zeros((len(centres), h, w), np.int32)
    rr, cc = np.mgrid[:h, :w]
    for i, found in enumerate(centres):
        pix = np.concatenate([np.asarray(center, np.float64)[None], found], 0)  # (n_i, 2) row, col
        nearest = np.full((h, w), np.inf)
        for j, (r, c) in enumerate(pix):  # one spot at a time: memory of one image, whatever the spot count
            dist = (rr - r) ** 2 + (cc - c) ** 2
            closer = dist < nearest
            owner[i][closer], nearest[closer] = j, dist[closer]
        owner[i][nearest > reach ** 2] = -1
        table[i, : len(pix), 0] = affine.pixel_centre(pix[:, 1] - margin, w - 2 * margin)
        table[i, : len(pix), 1] = affine.pixel_centre(pix[:, 0] - margin, h - 2 * margin)
    return table, owner


def prepare_bases(
    bases: jax.Array,
    center: tuple[float, float],
    *,
    support: np.ndarray | None = None,
    share: float = 0.98,
    max_points: int | None = None,
    noise_weight: float = DEFAULT_NOISE_WEIGHT,
    floor: float = DEFAULT_FLOOR,
    min_radius: float = 0.0,
    interpolation: str = "cubic",
    grow: int = 1,
    blur: float = 0.0,
    stride: int = 1,
    rigid_radius: float | None = None,
    like: BaseTable | None = None,
    scale_spots: bool = False,
    margin: int = 0,
) -> BaseTable:
    """Splits each base into a radial background and spots, tabulates the spots' interpolant and selects the fitted
    pixels (`information_mask`, beyond ``min_radius`` of the centre, grown by ``grow`` pixels, every ``stride``-th
    row and column). ``bases`` ``(K, H, W)`` (scaled as the model scales patterns); ``center`` the base's zero beam
    (row, col) in pixels. ``blur`` > 0 smooths the spots with a Gaussian of that many pixels first: a coarse model
    whose basin is wider, for a first fit from a rough start. ``rigid_radius`` (the disk radius in pixels) makes the
    spots rigid (module docstring): their centres (`spot_centres`) are found in the unblurred base less the
    `SPOT_SEARCH_QUANTILE` of each radius bin, and the background is the `RIGID_BACKGROUND_QUANTILE` of each radius
    bin instead of its median. ``noise_weight``: the fit's blend of shot noise (module docstring, `noise_weight`);
    ``floor``: the floor of the fit's weights (`BaseTable.floor`), also used to choose the pixels.
    ``like``: an earlier table whose pixel lists and spot lists these are made at least as
    long as (so the fit compiled for it serves this one). ``scale_spots``: the fit also scales each pattern's spots
    by a free factor (`BaseTable.scale_spots`). ``margin``: the bases extend the patterns' frame by this many pixels
    on every side (`BaseTable.margin`); ``center`` is then still the zero beam in the patterns' frame."""
    if not 0.0 <= noise_weight <= 1.0:
        raise ValueError(f"noise_weight = {noise_weight!r}: expected a share in [0, 1]")
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor = {floor!r}: expected a fraction of the brightest pixel in (0, 1]")
    bases = jnp.asarray(bases, jnp.float32)
    margin = int(margin)
    if margin < 0 or min(bases.shape[-2:]) <= 2 * margin:
        raise ValueError(f"margin = {margin}: expected 0 <= margin < half the base frame {bases.shape[-2:]}")
    center = (float(center[0]) + margin, float(center[1]) + margin)  # in the base frame
    profile = radial_profile(bases, center, 0.5 if rigid_radius is None else RIGID_BACKGROUND_QUANTILE)
    radius = jnp.asarray(_radius_image(bases.shape[-2:], center))
    background = jax.vmap(lambda p: profile_at(p, radius))(profile)
    spots = bases - background
    centres = owner = None
    if rigid_radius is not None:
        search = jax.vmap(lambda p: profile_at(p, radius))(radial_profile(bases, center, SPOT_SEARCH_QUANTILE))
        found = spot_centres(np.asarray(bases - search), center, rigid_radius, min_radius=min_radius)
        few = [i for i, c in enumerate(found) if len(c) < 3]
        if few:
            raise ValueError(f"rigid spots: base {few[0]} shows {len(found[few[0]])} diffracted spots beyond "
                             f"{min_radius:.1f} px of the zero beam (at least 3 are needed to anchor its lattice); "
                             "map without --rigid-spots")
        centres, owner = _spot_owners(found, bases.shape[-2:], center, reach=RIGID_REACH * rigid_radius + 2,
                                      min_spots=0 if like is None or like.centres is None else like.centres.shape[1],
                                      margin=margin)
        centres, owner = jnp.asarray(centres), jnp.asarray(owner)
    if blur > 0:
        spots = gaussian_blur(spots, blur)
    mask = information_mask(np.asarray(spots), np.asarray(background), support=support, share=share,
                            max_points=max_points, noise_weight=noise_weight, floor=floor, center=center,
                            min_radius=min_radius, grow=grow, stride=stride, margin=margin)
    n_max = int(mask.reshape(mask.shape[0], -1).sum(1).max())
    n_points = int(np.ceil(1.1 * n_max / 64) + 1) * 64  # room for a pattern whose warp enlarges the mask
    if like is not None:
        n_points = max(n_points, like.n_points)
    return BaseTable(interpolation_table(spots, interpolation), profile, jnp.asarray(mask), n_points, centres, owner,
                     jnp.asarray(band_edges(mask, center)), jnp.asarray(noise_weight, jnp.float32),
                     jnp.asarray(floor, jnp.float32), bool(scale_spots), margin)


def band_edges(mask: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    """``(K, N_BANDS - 1)`` radii (pixels from ``center``, row and col) splitting each base's ``mask`` ``(K, H, W)``
    into `N_BANDS` radial bands of equal pixel counts (all zero for an empty mask)."""
    radius = _radius_image(mask.shape[-2:], center)
    quantiles = np.arange(1, N_BANDS) / N_BANDS
    return np.stack([np.quantile(radius[m], quantiles) if m.any() else np.zeros(N_BANDS - 1)
                     for m in np.asarray(mask, bool)]).astype(np.float32)


# ----------------------------------------------------------------------------------------------- the fit
def _nearest_pixel(table_hw: jax.Array, k: jax.Array, x: jax.Array, y: jax.Array,
                   margin: int = 0) -> tuple[jax.Array, jax.Array]:
    """``table_hw[k]`` (``(K, H, W)``, a base frame that extends the patterns' by ``margin`` pixels on every side) at
    the pixel nearest each point (normalised in the patterns' frame), and whether it is in the base frame."""
    h, w = table_hw.shape[-2:]
    c = jnp.round(((x + 1) * (w - 2 * margin) - 1) / 2).astype(jnp.int32) + margin
    r = jnp.round(((y + 1) * (h - 2 * margin) - 1) / 2).astype(jnp.int32) + margin
    inside = (c >= 0) & (c < w) & (r >= 0) & (r < h)
    return table_hw.reshape(-1)[(k * h + jnp.clip(r, 0, h - 1)) * w + jnp.clip(c, 0, w - 1)], inside


def _spot_of(bases: BaseTable, k: jax.Array, phi: jax.Array, u: jax.Array, v: jax.Array):
    """Centre ``(x, y)`` of the spot each data point ``(u, v)`` belongs to (the base's spot nearest its pre-image
    under ``phi``), or that pre-image itself where no spot owns it (the point then moves with the warp)."""
    px, py = phi[0] * u + phi[1] * v + phi[2], phi[3] * u + phi[4] * v + phi[5]
    j, _ = _nearest_pixel(bases.owner, k, px, py, bases.margin)
    c = bases.centres[k, jnp.maximum(j, 0)]
    return jnp.where(j >= 0, c[..., 0], px), jnp.where(j >= 0, c[..., 1], py)


def _preimage(bases: BaseTable, phi: jax.Array, u: jax.Array, v: jax.Array, cx=None, cy=None, turn=None):
    """Base-frame point ``(x, y)`` that the model reads for data point ``(u, v)`` (normalised): ``phi`` applied to
    it, or with rigid spots the point at the same offset from its spot's centre ``(cx, cy)`` as ``(u, v)`` has from
    where ``phi`` puts that centre in the data frame, turned by the lattice's rotation (module docstring; ``turn``
    ``(2, 2)`` given: that turn instead of ``phi``'s). Also returns that centre's data-frame position ``(U, V)``, the
    turn (`ccstae_jax.ops.affine.turn_matrix`) and the determinant of ``phi``'s linear part, or None without rigid
    spots."""
    if bases.centres is None:
        return phi[0] * u + phi[1] * v + phi[2], phi[3] * u + phi[4] * v + phi[5], None
    det = phi[0] * phi[4] - phi[1] * phi[3]
    dx, dy = cx - phi[2], cy - phi[5]
    big_u = (phi[4] * dx - phi[1] * dy) / det
    big_v = (phi[0] * dy - phi[3] * dx) / det
    if turn is None:
        turn = affine.turn_matrix(phi.reshape(2, 3)[:, :2], bases.pattern_shape)
    du, dv = u - big_u, v - big_v
    return cx + turn[0, 0] * du + turn[0, 1] * dv, cy + turn[1, 0] * du + turn[1, 1] * dv, (big_u, big_v, turn, det)


def _pulled_mask(bases: BaseTable, k: jax.Array, phi: jax.Array) -> jax.Array:
    """Data-frame pixels whose model reads a fitted base pixel (nearest pixel to `_preimage` in ``bases.mask[k]``):
    ``(H, W)`` bool."""
    h, w = bases.pattern_shape
    u = jnp.broadcast_to(affine.pixel_centre(jnp.arange(w, dtype=jnp.float32), w), (h, w))
    v = jnp.broadcast_to(affine.pixel_centre(jnp.arange(h, dtype=jnp.float32), h)[:, None], (h, w))
    spot = (None, None) if bases.centres is None else _spot_of(bases, k, phi, u, v)
    px, py, _ = _preimage(bases, phi, u, v, *spot)
    fitted, inside = _nearest_pixel(bases.mask, k, px, py, bases.margin)
    return inside & fitted


def _compact_host(mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    flat = np.asarray(mask).reshape(-1, mask.shape[-2] * mask.shape[-1])
    index = np.zeros((flat.shape[0], n), np.int32)
    count = np.zeros(flat.shape[0], np.int32)
    for i, row in enumerate(flat):
        found = np.flatnonzero(row)[:n]
        index[i, : found.size] = found
        count[i] = found.size
    return index.reshape(mask.shape[:-2] + (n,)), count.reshape(mask.shape[:-2])


def _compact(mask: jax.Array, n: int, on_host: bool) -> tuple[jax.Array, jax.Array]:
    """Flat indices of the first ``n`` True pixels of ``mask`` ``(H, W)`` (zero-padded) and how many there are.

    ``on_host``: a host callback (NumPy's compaction is ~10x faster on CPUs than XLA's scatter); else
    ``jnp.nonzero``."""
    if on_host:
        shapes = (jax.ShapeDtypeStruct(mask.shape[:-2] + (n,), jnp.int32),
                  jax.ShapeDtypeStruct(mask.shape[:-2], jnp.int32))
        return jax.pure_callback(lambda m: _compact_host(m, n), shapes, mask, vmap_method="broadcast_all")
    index = jnp.nonzero(mask.reshape(-1), size=n, fill_value=0)[0].astype(jnp.int32)
    return index, jnp.minimum(jnp.sum(mask), n).astype(jnp.int32)


def _sample_table(table: jax.Array, k: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Bilinear read of the tabulated interpolant ``table[k]`` (``table`` ``(K, Hf, Wf, 3)``) at base-frame pixel
    coordinates ``(N,)`` -> ``(N, 3)``. The base index enters the flat index (no per-pattern copy of the table)."""
    _, hf, wf, _ = table.shape
    fr = (rows + 1.0) * FINE
    fc = (cols + 1.0) * FINE
    fr = jnp.clip(fr, 0.0, hf - 1.001)
    fc = jnp.clip(fc, 0.0, wf - 1.001)
    r0, c0 = jnp.floor(fr), jnp.floor(fc)
    tr, tc = (fr - r0)[:, None], (fc - c0)[:, None]
    flat = table.reshape(-1, 3)
    i = (k * hf + r0.astype(jnp.int32)) * wf + c0.astype(jnp.int32)
    a, b, c, d = flat[i], flat[i + 1], flat[i + wf], flat[i + wf + 1]
    top = a + tc * (b - a)
    bottom = c + tc * (d - c)
    return top + tr * (bottom - top)


def _model(bases: BaseTable, k: jax.Array, phi: jax.Array, u: jax.Array, v: jax.Array, spot, shape, bg):
    """The model mean ``mu`` ``(N,)`` at data points ``(u, v)`` ``(N,)`` (normalised) of a pattern of shape ``shape``
    read from base ``k`` through ``phi`` ``(6,)``, on the background ``bg`` ``(N,)``, and its Jacobian ``(N, 6)``
    with respect to ``phi``. ``spot``: the spot centres ``(cx, cy)`` of the points (`_spot_of`), or ``(None, None)``
    without rigid spots."""
    h, w = shape
    pu, pv, centre = _preimage(bases, phi, u, v, *spot)
    m = bases.margin
    s = _sample_table(bases.table, k, ((pv + 1) * h - 1) / 2 + m, ((pu + 1) * w - 1) / 2 + m)
    mu = bg + s[:, 0]
    gu, gv = s[:, 2] * (w / 2), s[:, 1] * (h / 2)  # per normalised unit
    if centre is None:  # d(phi q)/d(phi)
        lever_u, lever_v = u, v
    else:  # d(c + T (q - phi^{-1} c))/d(phi) = T A^{-1} e_a [U, V, 1]_b: the gradient turned by T^T, A^{-T}
        lever_u, lever_v, turn, det = centre
        gu, gv = turn[0, 0] * gu + turn[1, 0] * gv, turn[0, 1] * gu + turn[1, 1] * gv
        gu, gv = (phi[4] * gu - phi[3] * gv) / det, (phi[0] * gv - phi[1] * gu) / det
    return mu, jnp.stack([gu * lever_u, gu * lever_v, gu, gv * lever_u, gv * lever_v, gv], -1)


def fit_patterns(
    theta0: jax.Array,
    images: jax.Array,
    zero_beam: jax.Array,
    class_index: jax.Array,
    bases: BaseTable,
    *,
    steps: int = 5,
    damping: float = 1e-3,
    max_change: float = 0.1,
    reselect: int = 0,
    host_compaction: bool | None = None,
) -> FitResult:
    """Fits each pattern's warp by the forward model (module docstring), starting from ``theta0``.

    Args:
      theta0: ``(B, 2, 3)`` starting pull warps (base frame -> data frame, normalised).
      images: ``(B, H, W)`` patterns, scaled as the model scales them.
      zero_beam: ``(B, 2)`` zero-beam position (row, col) of each pattern in pixels: the centre of its background.
      class_index: ``(B,)`` int, the base of each pattern.
      bases: `prepare_bases` output.
      steps: Levenberg-Marquardt iterations (static); each costs one evaluation of the model and its Jacobian.
      damping: initial damping relative to the diagonal of ``J^T W J``.
      max_change: no entry of ``phi`` moves further than this from its start (normalised units: 0.1 is a 10 %
        strain or rotation, or a shift of a twentieth of the pattern), so a fit cannot run away from the encoder's
        warp into a spurious minimum of a base that does not match the patterns.
      reselect: after this many iterations (0 < ``reselect`` < ``steps``) each pattern's pixel list is built again
        about its current warp and the fit goes on from there for the remaining ones (the trust region then centred
        on that warp): a start a fraction of a pixel off chose pixels beside the spot edges the fit converges to.
      host_compaction: build the pixel lists on the host (None = on CPU backends; not inside computations spread
        over several devices, whose collectives would wait on the callback).

    Returns:
      `FitResult`.
    """
    if 0 < reselect < steps:
        kw = dict(damping=damping, max_change=max_change, host_compaction=host_compaction)
        first = fit_patterns(theta0, images, zero_beam, class_index, bases, steps=reselect, **kw)
        return fit_patterns(first.theta, images, zero_beam, class_index, bases, steps=steps - reselect, **kw)
    on_host = jax.default_backend() == "cpu" if host_compaction is None else bool(host_compaction)
    images = jnp.asarray(images, jnp.float32)
    b, h, w = images.shape
    if (h, w) != bases.pattern_shape:
        raise ValueError(f"patterns of {h}x{w} px against bases made for {bases.pattern_shape[0]}x"
                         f"{bases.pattern_shape[1]} px patterns (margin {bases.margin})")
    n = bases.n_points
    scale = bases.scale_spots
    phi0 = affine.invert(jnp.asarray(theta0, jnp.float32)).reshape(b, 6)

    def one(phi_start, x, z, k):
        # Data pixels whose pre-image under the starting warp is a fitted base pixel (nearest base pixel).
        flat_index, count = _compact(_pulled_mask(bases, k, phi_start), n, on_host)
        rows, cols = flat_index // w, flat_index % w
        used = (jnp.arange(n) < count).astype(jnp.float32)
        xq = x[rows, cols]
        u = affine.pixel_centre(cols.astype(jnp.float32), w)
        v = affine.pixel_centre(rows.astype(jnp.float32), h)
        radius = jnp.hypot(rows - z[0], cols - z[1])  # from the pattern's zero beam
        bg = profile_at(bases.profile[k], radius)
        spot = (None, None) if bases.centres is None else _spot_of(bases, k, phi_start, u, v)

        def model(p):
            mu, jac = _model(bases, k, p[:6], u, v, spot, (h, w), bg)
            if not scale:
                return mu, jac
            s = mu - bg  # the spots, scaled by the factor p[6]
            return bg + p[6] * s, jnp.concatenate([p[6] * jac, s[:, None]], -1)

        a = jnp.asarray(bases.noise_weight, jnp.float32)
        floor = jnp.asarray(bases.floor, jnp.float32)

        def brightest(mu):
            return jnp.max(jnp.where(used > 0, mu, -jnp.inf))

        def weights(mu):
            top = brightest(mu)
            return used / jnp.maximum(a * mu + (1.0 - a) * top, jnp.maximum(floor * top, 1e-30))

        def normal_equations(mu, jac, wts):
            r = mu - xq
            jw = jac * wts[:, None]
            return (jnp.einsum("pi,pj->ij", jw, jac, precision=_HP), jnp.einsum("pi,p->i", jw, r, precision=_HP),
                    jnp.sum(wts * r * r))

        p_start = jnp.concatenate([phi_start, jnp.ones(1, phi_start.dtype)]) if scale else phi_start
        mu, jac = model(p_start)
        wts = weights(mu)
        jtj, jtr, cost = normal_equations(mu, jac, wts)
        best = (p_start, wts, jtj, jtr, cost, mu)

        def body(_, carry):
            best, lam = carry
            phi, wts, jtj, jtr, cost, _ = best
            trial = phi - jnp.linalg.solve(jtj + lam * jnp.diag(jnp.diag(jtj) + 1e-30), jtr)
            if scale:
                trial = trial.at[6].set(jnp.maximum(trial[6], MIN_SPOT_SCALE))
            mu_t, jac_t = model(trial)
            r_t = mu_t - xq
            inside = jnp.all(jnp.abs(trial[:6] - phi_start) <= max_change)  # a trust region about the start
            better = (jnp.sum(wts * r_t * r_t) < cost) & inside
            wts_t = weights(mu_t)
            jtj_t, jtr_t, cost_t = normal_equations(mu_t, jac_t, wts_t)
            new = jax.tree.map(lambda a, b: jnp.where(better, a, b), (trial, wts_t, jtj_t, jtr_t, cost_t, mu_t), best)
            return new, jnp.where(better, lam * 0.5, lam * 4.0)

        best, _ = jax.lax.fori_loop(0, steps, body, (best, jnp.asarray(damping, jnp.float32)))
        p, wts, jtj, _, cost, mu = best
        phi, factor = p[:6], (p[6] if scale else 1.0)
        if scale:  # the information about phi left once the spots' scale is also estimated (Schur complement)
            jtj = jtj[:6, :6] - jnp.outer(jtj[:6, 6], jtj[6, :6]) / jnp.maximum(jtj[6, 6], 1e-30)
        if bases.band_edges is None:
            amplitude = jnp.zeros((0,), jnp.float32)
        else:  # weighted least-squares scale of the spots in each radial band (background held fixed)
            s = mu - bg
            band = jnp.searchsorted(bases.band_edges[k], radius)
            onehot = jax.nn.one_hot(band, N_BANDS, dtype=jnp.float32) * (wts * s)[:, None]
            amplitude = factor * (jnp.einsum("pb,p->b", onehot, xq - bg, precision=_HP)
                                  / jnp.maximum(jnp.einsum("pb,p->b", onehot, s, precision=_HP), 1e-30))
        top = jnp.maximum(brightest(mu), 1e-30)
        level = jnp.clip(jnp.floor(mu / top * N_LEVELS), 0, N_LEVELS - 1).astype(jnp.int32)
        onehot = jax.nn.one_hot(level, N_LEVELS, dtype=jnp.float32) * used[:, None]
        levels = jnp.einsum("pl,pc->lc", onehot, jnp.stack([(xq - mu) ** 2, mu, jnp.ones_like(mu)], -1),
                            precision=_HP)
        return phi, jtj, cost, jnp.sum(used) - (7.0 if scale else 6.0), amplitude, levels, top

    phi, fisher, chi2, dof, amplitude, levels, top = jax.vmap(one)(
        phi0, images, jnp.asarray(zero_beam, jnp.float32), jnp.asarray(class_index, jnp.int32))
    return FitResult(affine.invert(phi.reshape(b, 2, 3)), fisher, chi2, dof,
                     None if bases.band_edges is None else amplitude, levels, top)


def neighbour_noise(images: np.ndarray, pairs: np.ndarray, region: np.ndarray, top: float) -> np.ndarray:
    """The noise of the data, measured without a model: two patterns at neighbouring scan positions of one grain
    differ only by their noise, so half the mean squared difference of a pixel pair is the variance at their mean.

    Args:
      images: ``(B, H, W)`` patterns, scaled as the model scales them.
      pairs: ``(P, 2)`` indices into ``images`` of neighbouring positions.
      region: ``(H, W)`` bool, the pixels to compare (those the fit may use).
      top: the brightest a fitted model gets (the median of `FitResult.top`): levels are steps of ``top /
        N_LEVELS``, as in `FitResult.residual_levels`.

    Returns:
      ``(P, N_LEVELS, 3)``: per pair and level, the sum of the half squared differences, the sum of the pair means
      and the pixel count.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    region = np.asarray(region, bool)
    out = np.zeros((len(pairs), N_LEVELS, 3))
    for i, (a, b) in enumerate(pairs):  # one pair at a time: the memory of two patterns
        first = np.asarray(images[a], np.float64)[region]
        second = np.asarray(images[b], np.float64)[region]
        mean = 0.5 * (first + second)
        level = np.clip(np.floor(mean / max(float(top), 1e-30) * N_LEVELS), 0, N_LEVELS - 1).astype(np.int64)
        out[i, :, 0] = np.bincount(level, weights=0.5 * (first - second) ** 2, minlength=N_LEVELS)
        out[i, :, 1] = np.bincount(level, weights=mean, minlength=N_LEVELS)
        out[i, :, 2] = np.bincount(level, minlength=N_LEVELS)
    return out


#: An item (a pattern's residuals, a pair's differences) whose mean square is more than this many times the median
#: item's is not noise (a grain boundary, a pattern the base does not describe) and is left out of the levels.
OUTLIER_FACTOR = 3.0


def _robust_levels(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N, N_LEVELS, 3)`` per-item sums (squares, means, counts) -> per level: the mean square, the mean and the
    pixel count, pooled over the items whose mean square over all levels is at most `OUTLIER_FACTOR` times the
    median item's."""
    sums = np.asarray(sums, np.float64).reshape(-1, N_LEVELS, 3)
    count = sums[..., 2].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        overall = np.where(count > 0, sums[..., 0].sum(1) / count, np.nan)
    seen = np.isfinite(overall)
    keep = seen & (overall <= OUTLIER_FACTOR * np.median(overall[seen])) if seen.any() else seen
    pooled = sums[keep].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        square = np.where(pooled[:, 2] > 0, pooled[:, 0] / pooled[:, 2], np.nan)
        mean = np.where(pooled[:, 2] > 0, pooled[:, 1] / pooled[:, 2], np.nan)
    return square, mean, pooled[:, 2]


def _variance_line(variance: np.ndarray, mean: np.ndarray, count: np.ndarray) -> tuple[float, float]:
    """``variance ~ alpha mean + beta`` with ``alpha, beta >= 0``, by least squares weighted by each level's pixel
    count over its squared variance (the precision of a mean of squares), that variance raised by the levels'
    average: a level of pixels that never saw an electron (variance 0, where shot noise is exactly right) must not
    outweigh all others."""
    ok = np.isfinite(variance) & np.isfinite(mean) & (count > 0)
    if not ok.any():
        return 0.0, 0.0
    typical = float(np.sum(count[ok] * variance[ok]) / np.sum(count[ok]))
    root = np.sqrt(count[ok]) / np.maximum(typical + variance[ok], 1e-300)
    design = np.stack([mean[ok], np.ones(int(ok.sum()))], -1) * root[:, None]
    target = variance[ok] * root
    if ok.sum() >= 2:
        alpha, beta = np.linalg.lstsq(design, target, rcond=None)[0]
        if alpha >= 0 and beta >= 0:
            return float(alpha), float(beta)
    fits = []
    for j in (0, 1):  # on the boundary: the better of the two one-parameter lines
        col = design[:, j]
        value = max(float(col @ target / max(col @ col, 1e-300)), 0.0)
        fits.append((np.sum((target - value * col) ** 2), j, value))
    _, j, value = min(fits)
    return (value, 0.0) if j == 0 else (0.0, value)


def noise_weight(residual_levels: np.ndarray, top: np.ndarray, pair_levels: np.ndarray) -> float:
    """The share of shot noise in the fit's weights (module docstring), measured from a scan.

    The data's noise is measured from neighbouring patterns (`neighbour_noise`) as a line ``alpha mu + beta0`` in
    the mean ``mu`` (shot noise and a constant, e.g. a detector's read noise). The fit's residuals
    (``residual_levels`` ``(B, N_LEVELS, 3)`` and ``top`` ``(B,)`` of fitted patterns, `FitResult`) exceed it by the
    base's misfit, whose mean over the fitted pixels, ``e``, is taken as a constant variance too. The weights
    ``1 / (alpha mu + beta0 + e)`` are, up to a constant factor, ``1 / (a mu + (1 - a) top)`` with ``a = alpha top /
    (alpha top + beta0 + e)`` (``top`` the patterns' median). Noise-free data give ``a = 0`` (unweighted least
    squares); shot noise alone on a perfect base gives 1. Patterns and pairs whose squares are not noise are left out
    (`OUTLIER_FACTOR`). With nothing measured, `DEFAULT_NOISE_WEIGHT`.

    Args:
      pair_levels: ``(P, N_LEVELS, 3)`` `neighbour_noise` of neighbouring pairs of the same patterns.
    """
    top = np.asarray(top, np.float64)
    top = top[np.isfinite(top) & (top > 0)]
    if top.size == 0 or np.asarray(pair_levels).size == 0:
        return DEFAULT_NOISE_WEIGHT
    top = float(np.median(top))
    alpha, beta0 = _variance_line(*_robust_levels(pair_levels))
    fitted, mean, count = _robust_levels(residual_levels)
    ok = np.isfinite(fitted) & np.isfinite(mean) & (count > 0)
    if not ok.any():
        return DEFAULT_NOISE_WEIGHT
    excess = np.maximum(fitted[ok] - (alpha * mean[ok] + beta0), 0.0)
    misfit = float(np.sum(count[ok] * excess) / np.sum(count[ok]))
    shot = alpha * top
    if shot + beta0 + misfit <= 0:
        return DEFAULT_NOISE_WEIGHT
    return float(shot / (shot + beta0 + misfit))


#: A pair of neighbouring positions whose warps differ by more than this many scaled median absolute deviations in
#: any entry (under the first fit) straddles a grain boundary, or one of its fits failed: `scatter_ratio` leaves it out.
PAIR_OUTLIER_MADS = 5.0
#: A fit that a map tries beside its default (`fit.LOW_FLOOR`, `fit.BASE_BLUR`) replaces it only if the neighbouring
#: warps' scatter falls to this fraction or below (`scatter_ratio`).
FLOOR_GAIN = 0.98


def scatter_ratio(theta_a: np.ndarray, theta_b: np.ndarray, pairs: np.ndarray) -> float:
    """How much the warps of neighbouring positions differ under fit ``b`` relative to fit ``a`` of the same patterns.

    Neighbouring positions of one grain share their lattice, so the differences of their fitted warps are the fits'
    own errors: the fit whose neighbours agree better is the more precise one, whatever the noise and the base.
    Errors common to both positions (a bias of the base) cancel, so this ranks precision only.

    Args:
      theta_a, theta_b: ``(N, 2, 3)`` warps of the same ``N`` patterns from two fits.
      pairs: ``(P, 2)`` indices of neighbouring positions.

    Returns:
      The root-mean-square difference of the four linear entries of the warps (strain and rotation; the
      translations are left out, since the zero beam may drift) over the pairs under ``b``, divided by the same
      under ``a``, both over the pairs that are not outliers under ``a`` (`PAIR_OUTLIER_MADS`) and are finite
      under both.
      1.0 with no such pair.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    da, db = (np.asarray(t, np.float64)[pairs[:, 1], :, :2] - np.asarray(t, np.float64)[pairs[:, 0], :, :2]
              for t in (theta_a, theta_b))
    da, db = da.reshape(-1, 4), db.reshape(-1, 4)
    ok = np.all(np.isfinite(da) & np.isfinite(db), -1)
    da, db = da[ok], db[ok]
    if len(da) == 0:
        return 1.0
    spread = PAIR_OUTLIER_MADS * 1.4826 * np.median(np.abs(da), 0)
    inside = np.all(np.abs(da) <= spread, -1)
    a, b = np.sum(da[inside] ** 2), np.sum(db[inside] ** 2)
    return float(np.sqrt(b / a)) if a > 0 else 1.0
