"""Pattern geometry measured from the data: zero beam, descan, disk radius, spot spacing, lattice symmetry.

Every radius the pipeline uses (the loss ring, the spot masks, the rotation prior's ring, the pixels the map fits) is
derived here from a handful of measured numbers, so the same code serves spots of 1.5 px and disks of 20 px,
128-px and 256-px detectors, any camera length and hexagonal, square or rectangular lattices. `measure_geometry`
reads them from a few hundred patterns spread over the scan, once, when a run is created; the result is a
`Geometry`, saved with the run.

Measurements (pixels, pattern frame: rows = Qx, columns = Qy):

* **zero beam** of each pattern (`zero_beam`): the centroid of the part of the (3x3-smoothed) pattern above half its
  maximum, i.e. of the central disk, which holds most of the intensity. Its median over the sample is ``center``;
  its spread is the descan ``drift``, and a plane fitted to it over the scan positions gives the descan gradient.
* **disk radius** from the central disk of the mean pattern (`central_disk_radius`): where its radial profile falls
  steeply. Every diffracted disk has the probe's radius.
* **spot spacing** from `spot_profile`, the radial profile of the patterns' even angular harmonics above their odd
  ones (patterns shifted by whole pixels onto a common zero beam first): its bumps are the rings of spots, free of any
  radially symmetric background and of the noise. The first bump starts at the inner edge of the first-order disks
  (`_ring_extent`); ``spot_spacing`` is the bump's peak, or that edge plus a disk radius where the peak is not
  there (wide disks, whose angular structure peaks toward their edges; `_first_order_distance`). Orders 2, 6 and 10
  are looked at first; orders 4, 8 and 12 where they show a disk radius nearer the zero beam (a square lattice).
  Wide disks at a low dose can hide their first ring from these per-pattern powers while the second shows; the
  lattice's own harmonic added coherently over the patterns (`coherent_profile`) then finds it (`_nearer_ring`).
  On simulated hexagonal, square and rectangular scans with disks of 1.5 to 16 px, noise-free to 70 % noise, and on
  abTEM multislice scans with 3.7- and 16-px disks, the spacing comes within 2 px of the truth; disks that overlap
  (diameter above the spacing) are not measured right.
* **symmetry** from the angular harmonics of each pattern in the annulus of the first-order spots: a hexagonal
  lattice has only multiples of 6, a square one of 4, a rectangular one of 2 (Friedel symmetry removes the odd
  ones, which therefore measure the noise).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax.model.masks import pixel_radii

#: Symmetry orders recognised, from the most to the least symmetric.
SYMMETRIES = (6, 4, 2)
#: Angular orders no 2-, 3-, 4- or 6-fold lattice has (coprime to 12): their power in a ring is noise. (Odd orders
#: are not: a crystal without inversion symmetry, e.g. 1H-WS2 under dynamical scattering, breaks Friedel's law and
#: has a 3rd harmonic.)
NOISE_ORDERS = (1, 5, 7, 11)
#: Disks whose radius exceeds this share of the first-order spot spacing (their edges under 30 % of the spacing
#: apart) are wide: a base stretched with the lattice is a poor model of them, and `ccstae map` moves them rigidly.
WIDE_DISK_RATIO = 0.35


class GeometryError(ValueError):
    """The patterns show no diffraction lattice that the pipeline can measure (message: what was measured)."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The measured geometry of a scan's patterns and the radii derived from it (pixels, pattern frame).

    Attributes:
      pattern_shape: ``(H, W)`` of a (cropped, binned) pattern.
      center: ``(row, col)`` median zero-beam position.
      disk_radius: radius of the diffraction disks (convergence semi-angle in pixels).
      spot_spacing: distance of the first-order spots from the zero beam.
      symmetry: rotational order of the lattice (6 hexagonal, 4 square, 2 otherwise).
      ring: ``(inner, outer)`` radii of the ring of spots the network looks at and is trained on: from just inside
        the first-order disks to just outside the outermost ring of spots, at most the second-order ring of a
        hexagonal lattice (``sqrt(3)`` times the first-order distance; the map's fit uses every spot, out to the
        corners), within the pattern.
      drift: largest distance of a sampled pattern's zero beam from ``center`` (descan).
      descan: ``(2, 2)`` zero-beam shift in pixels per scan extent, rows ``(d row, d col)`` of the zero beam and
        columns along the scan's rows and columns (a plane fitted to the sampled zero beams); None if not measured.
      harmonics: relative strength of the angular harmonics of orders 2, 4 and 6 in the first-order ring
        (`detect_symmetry`).
      harmonic_phase, harmonic_gain: the lattice's ``symmetry``-th angular harmonic across the ring, per 1-pixel
        annulus ``i`` (``i <= r < i + 1``): its phase relative to the whole ring's (radians; successive rings of
        spots differ, e.g. by pi between the first two rings of a hexagonal lattice) and its amplitude over the
        noise power there (`matched_harmonic`). They weight the rotation prior and the lattice test so that the
        rings add up instead of cancelling. None = uniform.
    """

    pattern_shape: tuple[int, int] = (200, 200)
    center: tuple[float, float] = (100.0, 100.0)
    disk_radius: float = 3.7
    spot_spacing: float = 38.1
    symmetry: int = 6
    ring: tuple[float, float] = (32.0, 73.0)
    drift: float = 0.0
    descan: tuple[tuple[float, float], tuple[float, float]] | None = None
    harmonics: tuple[float, float, float] | None = None
    harmonic_phase: tuple[float, ...] | None = None
    harmonic_gain: tuple[float, ...] | None = None

    def __post_init__(self):
        h, w = self.pattern_shape
        if h != w:
            raise ValueError(f"patterns must be square (crop them), got {self.pattern_shape}")
        if self.symmetry not in SYMMETRIES:
            raise ValueError(f"lattice symmetry must be one of {SYMMETRIES}, got {self.symmetry}")
        inner, outer = self.ring
        if not 0 <= inner < outer:
            raise ValueError(f"ring radii must satisfy 0 <= inner < outer, got ({inner:g}, {outer:g})")
        if inner >= min(h, w) / 2:
            raise ValueError(f"ring inner radius {inner:g} px is larger than the pattern ({h}x{w}) half-width "
                             f"{min(h, w) / 2:g}")
        if not self.disk_radius > 0 or not self.spot_spacing > 0:
            raise ValueError(f"disk radius and spot spacing must be > 0, got {self.disk_radius}, {self.spot_spacing}")

    # ----- derived radii (one place) -----
    @property
    def spot_radius(self) -> tuple[float, float]:
        """``(start, end)`` radius of the disks around each spot of the base that the training mask shrinks to: the
        disk radius plus a margin, so the disk *edges*, which carry the position, stay inside."""
        end = self.disk_radius + 2.5
        return (end + 3.0, end)

    @property
    def fit_min_radius(self) -> float:
        """Pixels closer than this to the zero beam are never fitted by the map: the central disk and its edge belong
        to the background, which does not move with the lattice. Halfway to the first-order spots, or just outside
        the central disk when disks overlap."""
        return max(0.5 * self.spot_spacing, self.disk_radius + 1.0)

    @property
    def wide_disks(self) -> bool:
        """Whether the disk radius exceeds `WIDE_DISK_RATIO` of the first-order spot spacing."""
        return self.disk_radius > WIDE_DISK_RATIO * self.spot_spacing

    def disk_size(self) -> str:
        """The disk radius against the spot spacing, for messages: ``"radius 15.9 px, 42 % of the spot spacing of
        38.1 px"``."""
        return (f"radius {self.disk_radius:.1f} px, {100 * self.disk_radius / self.spot_spacing:.0f} % of the spot "
                f"spacing of {self.spot_spacing:.1f} px")

    def describe(self) -> str:
        """One line for people: what was measured and the radii derived from it."""
        drift = f", drifting <= {self.drift:.1f} px over the scan" if self.drift >= 0.5 else ""
        inner, outer = self.ring
        names = {6: "6-fold (hexagonal)", 4: "4-fold (square)", 2: "2-fold"}
        return (f"zero beam at ({self.center[0]:.1f}, {self.center[1]:.1f}) px{drift}; disk radius "
                f"{self.disk_radius:.1f} px; first-order spots at {self.spot_spacing:.1f} px; "
                f"{names[self.symmetry]} lattice; loss ring {inner:.0f}-{outer:.0f} px; spot mask radius "
                f"{self.spot_radius[1]:.1f} px")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"Geometry: unknown keys {sorted(unknown)}")

        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, (list, tuple)) else v

        return cls(**{k: tup(v) for k, v in d.items()})


# --------------------------------------------------------------------------------------------- zero beam
def zero_beam(images: jax.Array) -> jax.Array:
    """Zero-beam position of each pattern, ``(B, H, W)`` -> ``(B, 2)`` (row, col) pixels, float32.

    The centroid of ``max(s - s_max / 2, 0)``, ``s`` the pattern smoothed by a 3x3 box (so one hot pixel cannot set
    the threshold): the central disk, which in a thin specimen is by far the brightest feature. Jittable.
    """
    x = jnp.asarray(images, jnp.float32)
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3), (1, 1, 1), "SAME") / 9.0
    top = jnp.max(s, axis=(-2, -1), keepdims=True)
    wgt = jnp.maximum(s - 0.5 * top, 0.0)
    total = jnp.maximum(jnp.sum(wgt, axis=(-2, -1)), 1e-30)
    h, w = x.shape[-2:]
    rows = jnp.arange(h, dtype=jnp.float32)
    cols = jnp.arange(w, dtype=jnp.float32)
    r = jnp.einsum("bhw,h->b", wgt, rows, precision=jax.lax.Precision.HIGHEST) / total
    c = jnp.einsum("bhw,w->b", wgt, cols, precision=jax.lax.Precision.HIGHEST) / total
    return jnp.stack([r, c], -1)


def recentre(images: np.ndarray, beams: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    """Shifts each pattern by whole pixels so its zero beam lands within half a pixel of ``center`` (no
    interpolation; pixels shifted in are 0). ``(N, H, W)``, ``(N, 2)`` -> ``(N, H, W)``."""
    out = np.zeros_like(images)
    h, w = images.shape[-2:]
    shifts = np.rint(np.asarray(center)[None] - beams).astype(int)
    for i, (dr, dc) in enumerate(shifts):
        src_r, dst_r = slice(max(0, -dr), min(h, h - dr)), slice(max(0, dr), min(h, h + dr))
        src_c, dst_c = slice(max(0, -dc), min(w, w - dc)), slice(max(0, dc), min(w, w + dc))
        out[i, dst_r, dst_c] = images[i, src_r, src_c]
    return out


# --------------------------------------------------------------------------------------------- radial profile
def radial_mean(pattern: np.ndarray, center: tuple[float, float], *, step: float = 0.5) -> np.ndarray:
    """Mean of ``pattern`` ``(H, W)`` in annuli of width ``step`` about ``center``: value ``i`` covers
    ``i * step <= r < (i + 1) * step``; empty annuli are NaN."""
    r = pixel_radii(pattern.shape, center)
    bins = np.floor(r / step).astype(int).ravel()
    total = np.bincount(bins, pattern.ravel().astype(np.float64))
    count = np.bincount(bins)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _ring_extent(profiles: np.ndarray, z: np.ndarray, center: tuple[float, float], core: float, r_max: float,
                 disk_radius: float) -> tuple[float, float, float]:
    """``(first, last, spacing)``: the radii where the lattice first and last shows (`spot_profile`), and the
    first-order spot distance.

    The lattice shows at radius ``r`` when, for one even angular order, the annuli from ``r`` over half a disk
    diameter are together more than 4 standard errors above the noise (the significance of each annulus summed over
    the window and divided by its square root: wide, faint disks are found from their many annuli) and their mean
    profile is above 2 % of its largest value (in noise-free data every annulus is "significant"). Orders 2, 6 and
    10 are looked at from 2 pixels outside the central disk, past the aliasing of its edge, orders 4, 8 and 12 from 3
    pixels, past the grid aliasing of the zero beam; the latter are used when the former show nothing, show only a
    disk radius (and 2 px) farther out, or show as near but weaker (a square lattice). Of the orders that show within
    a disk radius of the first, the lowest with a quarter of the strongest one's strength is read (a higher order of
    a ring of disks peaks toward the disks' edges): the first radius is the inner edge of its first ring
    (`_inner_edge`: a window becomes significant before the ring starts), the inner edge of the first-order disks;
    the first-order distance follows from it and the profile (`_first_order_distance`).
    ``profiles``, ``z``: `spot_profile` in 1-pixel annuli."""
    n = int(r_max)
    radii = np.arange(n) + 0.5
    width = max(1, int(round(disk_radius)))
    found = []
    for rows, start in (((0, 2, 4), core + 2.0), ((1, 3, 5), core + 3.0)):
        inside = radii >= start
        shows = np.zeros(n, bool)
        starts, strengths = {}, {}
        for i in rows:
            zi = np.where(inside, np.clip(z[i, :n], -1e3, 1e3), 0.0)
            vi = np.where(inside & np.isfinite(profiles[i, :n]), profiles[i, :n], 0.0)
            zw = _forward_sum(zi, width) / np.sqrt(width)
            vw = _forward_sum(vi, width) / width
            here = inside & (zw > 4.0) & (vw > 0.02 * max(vw.max(), 0.0))
            if here.any():
                starts[i] = int(np.argmax(here))
                strengths[i] = float(vw[here][: 2 * width + 4].max())
            shows |= here
        if shows.any():
            idx = np.nonzero(shows)[0]
            # of the orders that show within a disk radius of the first to show, the lowest with a quarter of the
            # strongest one's strength (a higher order of a ring of disks peaks toward the disks' edges)
            near = [i for i in starts if starts[i] <= idx[0] + width]
            top = max(strengths[i] for i in near)
            best = min(i for i in near if strengths[i] >= 0.25 * top)
            value = np.where(np.isfinite(profiles[best, :n]), profiles[best, :n], 0.0)
            window = slice(idx[0], min(n, idx[0] + 2 * width + 4))
            edge = idx[0] + _inner_edge(value[window], z[best, :n][window])
            first = float(radii[edge] - 0.5)
            found.append((first, float(min(r_max, radii[idx[-1]] + width)),
                          _first_order_distance(value, edge, disk_radius), top))
    if found:
        # Orders 4, 8, 12 showing a disk radius (and 2 px) nearer the zero beam than orders 2, 6, 10, or as near and
        # stronger: a square lattice, whose second-order spots leak a little into orders 2, 6, 10 under strain (and
        # whose first-order disks' edges, under strain, too).
        if len(found) == 2:
            gap = max(2.0, disk_radius)
            if found[1][0] < found[0][0] - gap or (found[1][0] <= found[0][0] + gap and found[1][3] > found[0][3]):
                return found[1][:3]
        return found[0][:3]
    raise GeometryError(
        f"no diffraction spots found outside the central disk (zero beam at ({center[0]:.1f}, {center[1]:.1f}) px, "
        f"central disk and glow out to ~{core:.1f} px): no radius within {r_max:.0f} px shows a significant "
        "lattice-like angular structure; check --crop/--key/--transpose, or force a lattice with --ring INNER OUTER "
        "and --symmetry N")


def _forward_sum(x: np.ndarray, width: int) -> np.ndarray:
    """``out[i] = x[i] + ... + x[i + width - 1]`` (the annuli from ``i`` outward; short at the end), same length."""
    return np.convolve(x, np.ones(width), mode="full")[width - 1: width - 1 + x.size]


def _first_order_distance(value: np.ndarray, edge: int, disk_radius: float) -> float:
    """Distance of the first-order spots from the zero beam, from a radial profile ``value`` (1-pixel annuli) of the
    first ring of spots whose inner edge is annulus ``edge``: the profile's peak within a disk diameter beyond the
    edge, where it lies within a quarter of a disk radius (at least 2 px) of the edge plus a disk radius; else the
    edge plus a disk radius (the angular structure of wide disks peaks toward their edges, not at their centres, and
    their flat profiles peak where the noise has it)."""
    width = max(1, int(round(disk_radius)))
    window = slice(edge, min(value.size, edge + 2 * width + 2))
    k = edge + int(np.argmax(value[window]))
    peak = k + 0.5 + _parabolic_offset(value, k)
    first = float(edge)
    return peak if abs(peak - first - disk_radius) <= max(2.0, 0.25 * disk_radius) else first + disk_radius


def _parabolic_offset(value: np.ndarray, k: int) -> float:
    """Sub-annulus offset (within +-0.5) of the maximum of ``value`` near its local maximum ``k``: the vertex of the
    parabola through ``k - 1``, ``k``, ``k + 1``."""
    if k <= 0 or k >= value.size - 1:
        return 0.0
    a, b, c = value[k - 1], value[k], value[k + 1]
    curvature = a - 2.0 * b + c
    if not curvature < 0:
        return 0.0
    return float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5))


def _inner_edge(value: np.ndarray, z: np.ndarray) -> int:
    """Index of the first annulus of a window over the first ring of spots whose (3-annulus smoothed) profile
    ``value`` reaches 5 % of its largest value in the window with a smoothed significance ``z`` of at least 3:
    where the ring starts. A window's sum becomes significant up to a window's width before the ring itself starts
    (in noise-free data as soon as it reaches the ring), so the window's start alone is early."""
    kernel = np.ones(3) / 3.0
    smooth = np.convolve(value, kernel, mode="same")
    zs = np.convolve(z, kernel, mode="same") * np.sqrt(3.0)
    top = smooth.max()
    if not top > 0:
        return 0
    ok = np.nonzero((smooth >= 0.05 * top) & (zs >= 3.0))[0]
    return int(ok[0]) if ok.size else 0


def _nearer_ring(amplitude: np.ndarray, z: np.ndarray, start: float, first: float, spacing: float,
                 disk_radius: float, order: int) -> tuple[float, float] | None:
    """A ring of the lattice nearer the zero beam than the first one `_ring_extent` found, in the coherent profile of
    the lattice's order (`coherent_profile`), or None.

    Wide disks at a low dose can hide their first-order ring from the per-pattern powers (the harmonic of a ring of
    disks that fill much of it is weak) while the second-order one shows. A ring counts when, from some radius
    between ``start`` and ``first``, the annuli over a disk radius are together more than 5 standard errors above the
    noise (``z ** 2 - 1`` summed and divided by the root of their number) and their mean amplitude reaches 5 % of the
    largest; for a square lattice, when its inner edge lies at least two annuli beyond where it first shows (4-fold
    structure that starts right at the central disk is the disk's aliasing on the square pixel grid); and when the
    distance it gives (`_first_order_distance`) is below ``spacing`` by at least a quarter of a disk radius (and 2 px)
    and above ``spacing / 3.2`` (the farthest ring of the few innermost of a hexagonal lattice, at 2.65 times the
    first-order distance, with a margin). Hexagonal and square lattices only: a rectangular one has rings at any
    ratio. Returns ``(first, spacing)`` of that ring."""
    if order not in (4, 6):
        return None
    n = amplitude.size
    radii = np.arange(n) + 0.5
    width = max(1, int(round(disk_radius)))
    inside = (radii >= start) & (radii < first)
    excess = np.where(radii >= start, np.clip(z, 0.0, 1e3) ** 2 - 1.0, 0.0)
    stat = _forward_sum(excess, width) / np.sqrt(width)
    mean = _forward_sum(np.where(radii >= start, amplitude, 0.0), width) / width
    here = np.nonzero(inside & (stat > 5.0) & (mean >= 0.05 * mean[radii >= start].max(initial=0.0)))[0]
    if not here.size:
        return None
    window = slice(here[0], min(n, here[0] + 2 * width + 4))
    edge = here[0] + _inner_edge(amplitude[window], excess[window])
    distance = _first_order_distance(amplitude, edge, disk_radius)
    if (order == 4 and edge < here[0] + 2) or not spacing - max(2.0, 0.25 * disk_radius) >= distance >= spacing / 3.2:
        return None
    return float(edge), distance


# --------------------------------------------------------------------------------------------- harmonics
def angular_harmonics(images: np.ndarray, center: tuple[float, float], inner: float, outer: float,
                      orders: tuple[int, ...]) -> np.ndarray:
    """``|sum_q I(q) exp(-i n phi(q))| / sum_q I(q)`` over the annulus ``inner < r <= outer`` about ``center``, for
    each pattern and each order ``n``: ``(N, H, W)`` -> ``(N, len(orders))``."""
    h, w = images.shape[-2:]
    rr, cc = np.mgrid[:h, :w].astype(np.float64)
    dr, dc = rr - center[0], cc - center[1]
    r = np.hypot(dr, dc)
    ring = (r > inner) & (r <= outer)
    phi = np.arctan2(dr, dc)[ring]
    vals = images[:, ring].astype(np.float64)
    total = np.maximum(np.abs(vals.sum(1)), 1e-30)
    out = []
    for n in orders:
        z = vals @ np.exp(-1j * n * phi)
        out.append(np.abs(z) / total)
    return np.stack(out, -1)


def detect_symmetry(profiles: np.ndarray, z: np.ndarray, radii: np.ndarray, lo: float, hi: float
                    ) -> tuple[int | None, tuple[float, float, float]]:
    """Lattice symmetry from `spot_profile`'s per-order profiles (orders 2, 4, ..., 12) over the first-order ring,
    the annuli from ``lo`` to ``hi`` (farther out, strains displace the spots enough to add order 2 to any lattice).

    The strength ``s_n`` of order ``n`` is its profile summed over the annuli where it is more than 3 standard errors
    above the noise, relative to the strongest of orders 2, 4 and 6. A rectangular lattice has every
    even order, a square one only multiples of 4, a hexagonal one only multiples of 6 (small strains or a detector
    ellipticity leak a little into the others): order 2 holding a tenth of the strongest means 2-fold; else order 4
    without a comparable order 6 means 4-fold; else order 6 means 6-fold.

    Returns ``(order, (s2, s4, s6))``; ``order`` is None when none of the three shows anywhere (no lattice).
    """
    inside = (radii >= lo) & (radii <= hi)
    strength = []
    for i in range(3):  # orders 2, 4, 6
        shows = inside & (z[i] > 3.0) & np.isfinite(profiles[i])
        strength.append(float(np.sum(np.where(shows, profiles[i], 0.0))))
    top = max(strength)
    if top <= 0:
        return None, (0.0, 0.0, 0.0)
    s2, s4, s6 = (v / top for v in strength)
    if s2 >= 0.1:
        order = 2
    elif s4 >= 0.1 and s6 < 0.1:
        order = 4
    elif s6 >= 0.1:
        order = 6
    else:
        order = 4
    return order, (s2, s4, s6)


def spot_profile(images: np.ndarray, center: tuple[float, float], *, step: float = 1.0,
                 orders: tuple[int, ...] = (2, 4, 6, 8, 10, 12)) -> tuple[np.ndarray, np.ndarray]:
    """Radial profiles of a lattice's angular structure, one per even order, and their significance.

    In each annulus of width ``step`` about ``center``: the power of angular harmonic ``n`` minus the mean power of
    the harmonics no lattice has (`NOISE_ORDERS`), averaged over the patterns and divided by the squared pixel count
    of the annulus. A centrosymmetric lattice puts power only into even orders; noise puts the same power into every
    order, and a radially symmetric background (central disk, glow, amorphous halo) into none, so the profiles show the
    spots alone whatever the background's slope and the counting statistics. (A steep radial background sampled on
    the square pixel grid has 4-fold structure: orders 4, 8, 12 near the zero beam are not the lattice's.)

    Returns:
      ``(profiles, z)``, each ``(len(orders), n_bins)``: the profiles (NaN for empty annuli) and their ratios to their
      standard errors over the patterns.
    """
    images = np.asarray(images, np.float32)
    n, h, w = images.shape
    rr, cc = np.mgrid[:h, :w].astype(np.float64)
    dr, dc = rr - center[0], cc - center[1]
    radius = np.hypot(dr, dc).ravel()
    bins = np.floor(radius / step).astype(np.int64)
    phi = np.arctan2(dr, dc).ravel()
    order = np.argsort(bins, kind="stable")
    counts = np.bincount(bins)
    nonempty = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
    # Each pattern minus its radial mean interpolated at the exact pixel radii (removes most of the grid aliasing of
    # a steep background).
    x = images.reshape(n, -1)[:, order]
    centres = (np.nonzero(nonempty)[0] + 0.5) * step
    means = np.add.reduceat(x, starts, axis=1, dtype=np.float64) / counts[nonempty]
    r_sorted = radius[order]
    x = x - np.stack([np.interp(r_sorted, centres, m) for m in means]).astype(np.float32)
    phi = phi[order]

    def power(k):
        z = np.add.reduceat(x * np.exp(-1j * k * phi).astype(np.complex64), starts, axis=1)
        return np.abs(z) ** 2  # (N, n_nonempty)

    noise = np.mean([power(k) for k in NOISE_ORDERS], 0)
    profiles = np.full((len(orders), counts.size), np.nan)
    z = np.zeros((len(orders), counts.size))
    for i, k in enumerate(orders):
        diff = power(k) - noise
        mean = diff.mean(0)
        profiles[i, nonempty] = mean / counts[nonempty] ** 2
        z[i, nonempty] = mean / (diff.std(0) / np.sqrt(n) + 1e-300)
    return profiles, z


def _coherent_harmonic(images: np.ndarray, center: tuple[float, float], order: int, ring: tuple[float, float],
                       r_max: float, iterations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``order``-th angular harmonic of each 1-pixel annulus out to ``r_max``, averaged over the patterns relative
    to each pattern's own orientation, the orientation read from the annuli inside ``ring`` (`matched_harmonic`).

    Returns ``(annuli, m, noise, weights)``: the indices of the non-empty annuli, their mean harmonic relative to the
    patterns' orientations (complex), their noise power (mean of the `NOISE_ORDERS`' powers per pattern) and the
    matched weights of the annuli inside the ring (0 elsewhere)."""
    images = np.asarray(images, np.float32)
    n, h, w = images.shape
    rr, cc = np.mgrid[:h, :w].astype(np.float64)
    dr, dc = rr - center[0], cc - center[1]
    radius = np.hypot(dr, dc).ravel()
    inside = radius < np.floor(r_max) + 1.0
    bins = np.floor(radius[inside]).astype(np.int64)
    phi = np.arctan2(dr, dc).ravel()[inside]
    x = images.reshape(n, -1)[:, inside]
    order_px = np.argsort(bins, kind="stable")
    bins, phi, x = bins[order_px], phi[order_px], x[:, order_px]
    present, starts = np.unique(bins, return_index=True)

    def harmonic(k):
        return np.add.reduceat(x * np.exp(-1j * k * phi).astype(np.complex64), starts, axis=1)  # (N, n_present)

    hp = harmonic(order)
    noise = np.mean([np.mean(np.abs(harmonic(k)) ** 2, axis=0) for k in NOISE_ORDERS], axis=0)
    r = present.astype(np.float64)
    in_ring = (r + 1.0 > ring[0]) & (r <= ring[1])
    weights = in_ring.astype(np.complex128)
    m = np.zeros(len(present), np.complex128)
    for _ in range(iterations):
        total = hp[:, in_ring] @ weights[in_ring]
        u = total / np.maximum(np.abs(total), 1e-300)
        m = np.mean(hp * np.conj(u)[:, None], axis=0)
        # noise-free data have no noise power: a floor of 1 % of the strongest signal power keeps the gain finite
        floor = 0.01 * np.max(np.abs(m[in_ring]), initial=0.0) ** 2
        weights = np.where(in_ring, np.conj(m) / (noise + floor + 1e-300), 0.0)
    return present, m, noise, weights


def matched_harmonic(images: np.ndarray, center: tuple[float, float], order: int, ring: tuple[float, float], *,
                     iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per 1-pixel annulus, the phase and the gain that add the ``order``-th angular harmonic of every ring of spots
    coherently (a matched filter across the radius).

    Each pattern's harmonic ``H_p(r) = sum I exp(-i n phi)`` over annulus ``r``; starting from uniform weights, the
    phase of each pattern's weighted total ``u_p`` is taken as its orientation, ``m(r) = mean_p H_p(r) conj(u_p)``
    is the annulus's typical harmonic relative to it, and the new weights are ``exp(-i angle m(r))`` with gain
    ``|m(r)| / N(r)`` (``N`` the noise power of the annulus, from `NOISE_ORDERS`, at least 1 % of the strongest
    ``|m|^2``). The relative phases do not depend
    on the patterns' orientations, so patterns of every grain contribute alike.

    Returns:
      ``(phase, gain)``, each ``(n_annuli,)`` over annuli ``0 .. outer``; gain 0 outside the ring, normalised to a
      largest value of 1.
    """
    inner, outer = ring
    n_bins = int(np.floor(outer)) + 1
    present, _, _, weights = _coherent_harmonic(images, center, order, ring, outer, iterations)
    phase = np.zeros(n_bins)
    gain = np.zeros(n_bins)
    phase[present] = np.where(weights != 0, -np.angle(weights), 0.0)
    gain[present] = np.abs(weights) / np.abs(weights).max()
    return phase, gain


def coherent_profile(images: np.ndarray, center: tuple[float, float], order: int, ring: tuple[float, float],
                     r_max: float, *, iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Radial profile of the lattice's ``order``-th angular harmonic, added coherently over the patterns.

    Each pattern's orientation is read from the rings of spots inside ``ring`` (`matched_harmonic`); relative to it,
    the harmonic of every 1-pixel annulus out to ``r_max`` is averaged over the patterns. A ring of spots too faint to
    show in any one pattern adds up over many (its amplitude grows as the number of patterns, the noise as its square
    root), where the per-pattern powers of `spot_profile` only add up their excess over the noise.

    Returns:
      ``(amplitude, z)``, each ``(floor(r_max) + 1,)``: ``|m(r)|`` over the annulus's pixel count, and ``|m(r)|`` over
      the standard error of a mean of pure noise (``sqrt(N(r) / n_patterns)``), about 1 where the annulus holds no
      lattice. Empty annuli are 0.
    """
    n = len(images)
    n_bins = int(np.floor(r_max)) + 1
    present, m, noise, _ = _coherent_harmonic(images, center, order, ring, r_max, iterations)
    h, w = np.asarray(images).shape[-2:]
    counts = np.bincount(np.floor(pixel_radii((h, w), center)).astype(np.int64).ravel(), minlength=n_bins)[present]
    amplitude = np.zeros(n_bins)
    z = np.zeros(n_bins)
    amplitude[present] = np.abs(m) / np.maximum(counts, 1)
    with np.errstate(divide="ignore", over="ignore"):  # noise-free patterns: no noise power, z is infinite
        z[present] = np.abs(m) / np.sqrt(noise / n)
    return amplitude, z


def central_disk_radius(mean_pattern: np.ndarray, center: tuple[float, float], *, step: float = 0.25) -> float:
    """Radius of the central disk of a (zero-beam-centred) mean pattern: where its radial profile starts to fall
    steeply, i.e. the first radius whose logarithmic slope ``d ln I / dr`` is below half the steepest one found
    within half the pattern (the profile floored at 1 % of its largest value). A diffuse glow around the zero beam
    falls at most ~0.5 per pixel (a Lorentzian), a disk edge much faster, so the glow does not hide the disk."""
    p = radial_mean(mean_pattern, center, step=step)
    r = (np.arange(p.size) + 0.5) * step
    ok = np.isfinite(p) & (p > 0)
    r, p = r[ok], p[ok]
    if r.size < 4:
        return 1.0
    # Floored at 1 % of the centre: the log of a noise-free disk's tail would fall ever faster into nothing.
    slope = np.gradient(np.log(np.maximum(p, 0.01 * p.max())), r)
    sel = (r >= 0.75) & (r <= r.max() / 2)
    if not sel.any():
        return 1.0
    steepest = slope[sel].min()
    return float(r[np.nonzero(sel & (slope <= 0.5 * steepest))[0][0]])


# --------------------------------------------------------------------------------------------- measurement
def _fit_descan(beams: np.ndarray, positions: np.ndarray, scan_shape: tuple[int, int]) -> tuple:
    """Least-squares plane of the zero beam over the scan: ``(2, 2)`` pixels per scan extent (rows: d row,
    d col of the beam; columns: along scan rows, scan columns)."""
    rx, ry = scan_shape
    a = np.column_stack([positions[:, 0] / max(rx - 1, 1), positions[:, 1] / max(ry - 1, 1),
                         np.ones(len(positions))])
    coef, *_ = np.linalg.lstsq(a, beams, rcond=None)
    j = coef[:2].T  # (2 beam coords, 2 scan axes)
    return tuple(tuple(float(v) for v in row) for row in j)


def measure_geometry(
    sample: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    scan_shape: tuple[int, int] | None = None,
    symmetry: int | None = None,
    ring: tuple[float, float] | None = None,
) -> Geometry:
    """Measures the geometry of a scan from a sample of its patterns (module docstring).

    Args:
      sample: ``(N, H, W)`` patterns spread over the scan (a few hundred).
      positions: ``(N, 2)`` their scan (row, col), to fit the descan plane (optional).
      scan_shape: ``(Rx, Ry)``, with ``positions``.
      symmetry: the lattice's rotational order, to override the measured one.
      ring: ``(inner, outer)`` loss ring radii, to override the derived ones.

    Raises:
      GeometryError: no lattice is visible (no ring of spots outside the central disk), with the numbers measured.
    """
    sample = np.asarray(sample, np.float32)
    if sample.ndim != 3:
        raise ValueError(f"measure_geometry: expected patterns (N, H, W), got shape {sample.shape}")
    n, h, w = sample.shape
    if h != w:
        raise ValueError(f"patterns must be square (crop them), got {h}x{w}")
    if h < 16:
        raise GeometryError(f"patterns of {h}x{w} pixels are too small to hold a lattice (need at least 16x16)")
    beams = np.asarray(zero_beam(sample))
    center = tuple(float(v) for v in np.median(beams, 0))
    drift = float(np.max(np.hypot(*(beams - np.asarray(center)).T)))
    descan = None
    if positions is not None and scan_shape is not None and n >= 3:
        descan = _fit_descan(beams, np.asarray(positions, np.float64), scan_shape)
    aligned = recentre(sample, beams, center)
    step = 0.5
    r_max = min(h / 2 - 1, h - 1 - center[0], center[0], w - 1 - center[1], center[1])
    mean_profile = radial_mean(aligned.mean(0), center, step=step)[: int(r_max / step)]
    if mean_profile.size < 8 or not np.isfinite(mean_profile).any() or np.nanmax(mean_profile) <= 0:
        raise GeometryError(f"the mean pattern ({h}x{w}) has no usable radial profile: blank patterns or a zero "
                            f"beam at ({center[0]:.1f}, {center[1]:.1f}) px too close to the edge")
    # The central disk and its glow: from the centre until the profile first drops below 5 % of its centre value.
    centre_level = np.nanmax(mean_profile[:4])
    below = np.nonzero(mean_profile < 0.05 * centre_level)[0]
    core = float(below[0]) * step if below.size else 2.0
    disk_radius = central_disk_radius(aligned.mean(0), center)
    core = max(core, disk_radius)
    profiles, z = spot_profile(aligned, center, step=1.0)
    margin = max(2.0, 0.5 * disk_radius)
    measured = True
    try:
        first, last, spacing = _ring_extent(profiles, z, center, core, r_max, disk_radius)
    except GeometryError:
        measured = False
        if ring is None or symmetry is None:
            raise
        # Forced by the user (no visible lattice): the given ring starts just inside the first-order disks.
        first, last = (float(v) for v in ring)
        spacing = first + disk_radius + margin
    if symmetry is None:
        n = profiles.shape[1]
        order, harm = detect_symmetry(profiles, z, np.arange(n) + 0.5, max(first, core + 3.0),
                                      first + 2 * disk_radius + 2.0)
        if order is None:
            raise GeometryError(
                f"no lattice found: rings from {first:.1f} px from the zero beam ({center[0]:.1f}, {center[1]:.1f}) "
                "px, but no angular harmonic of order 2, 4 or 6 stands out of the noise: an amorphous or too noisy "
                "specimen, or a wrong --crop/--transpose (pass --symmetry to force an order)")
    else:
        order, harm = int(symmetry), None

    def derived_ring():
        inner = max(disk_radius + 2.0, first - margin, core)
        outer = min(float(r_max), last + margin, np.sqrt(3.0) * spacing + disk_radius + margin)
        return (float(inner), float(outer) if outer > inner else float(r_max))

    if measured:
        # the patterns' orientations from the rings found, then a look for a fainter ring nearer the zero beam
        amplitude, zc = coherent_profile(aligned, center, order, derived_ring(), r_max)
        nearer = _nearer_ring(amplitude, zc, core + (2.0 if order == 6 else 3.0), first, spacing, disk_radius, order)
        if nearer is not None:
            first, spacing = nearer
    if ring is None:
        ring = derived_ring()
    ring = tuple(round(float(v), 1) for v in ring)
    phase, gain = matched_harmonic(aligned, center, order, ring)
    return Geometry(pattern_shape=(h, w), center=center, disk_radius=round(disk_radius, 2),
                    spot_spacing=round(spacing, 2), symmetry=order, ring=ring, drift=round(drift, 2), descan=descan,
                    harmonics=harm, harmonic_phase=tuple(np.round(phase, 4).tolist()),
                    harmonic_gain=tuple(np.round(gain, 4).tolist()))
