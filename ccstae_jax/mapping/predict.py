"""Maps a scan with a trained run: encode every pattern, fit its warp, re-estimate the bases, fit again.

The map of a scan is made in two reads of the file:

1. **Bases.** A subset of whole scan rows (at most `MapConfig.subset` patterns, spread over the scan) is encoded
   and each pattern's warp fitted against the learned base (`ccstae_jax.mapping.fit`); the patterns, pulled onto
   the base frame by their fitted warps, are averaged per base (`ccstae_jax.mapping.bases`). The average of the
   aligned patterns is the maximum-likelihood base for that alignment, sharper than the network's. Its frame
   extends the patterns' by a margin (`MapConfig.margin`), so that every pattern, turned by its warp, lies on it
   whole, corners included. A few rows of the subset then choose how the map fits: the floor of its weights and
   whether the bases' spots are smoothed (`MapConfig.floor`, `MapConfig.blur`), each kept where neighbouring
   positions' warps agree better.
2. **Map.** Every pattern is encoded and its warp fitted against the re-estimated base, starting from the encoder's
   warp, over the pixels that carry position information; the fit's Fisher information and misfit come with it.

`map_scan` returns flat per-position arrays; `ccstae_jax.mapping.reference` turns them into strain maps.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax.ops import affine
from ccstae_jax.model.geometry import NOISE_ORDERS
from ccstae_jax.model.masks import pixel_radii
from ccstae_jax.mapping import bases as bases_lib
from ccstae_jax.mapping import fit as fit_lib
from ccstae_jax.model.networks import angular_weights, prior_ring, recentred
from ccstae_jax.train.parallel import data_sharding, make_mesh, replicated_sharding

_HP = jax.lax.Precision.HIGHEST
#: Patterns whose lattice harmonic is less than this many times the noise (`lattice_signals`) do not enter the base
#: estimate: vacuum, or a probe beside the specimen, has no lattice to align, and its central beam pulled by a
#: meaningless warp would smear into the bases (the threshold `ccstae_jax.mapping.reference.validity` uses).
BASE_MIN_SIGNIFICANCE = 3.0
#: Iterations of the coarse fit from the encoder's warps for spots that stretch with the base (`coarse_steps_for`).
COARSE_STEPS = 3


@dataclasses.dataclass(frozen=True)
class MapConfig:
    """How a scan is mapped (the defaults of `ccstae map` and of `ccstae_jax.pipeline.map_strain`).

    Attributes:
      steps: Levenberg-Marquardt iterations of each pattern's fit (0 = the encoder's warps as they are).
      reselect: after this many of them each pattern's fitted pixels are chosen again about its current warp, so
        the pixels fitted are those where its spots' edges are, not where its start put them (0 = never).
      rigid_spots: each spot moves rigidly with its centre instead of the whole base being stretched
        (`ccstae_jax.mapping.fit`): the right model for disks many pixels wide. None: when the run's disks are wide
        (`ccstae_jax.model.geometry.Geometry.wide_disks`); see `rigid_spots_for`.
      base_update: re-estimate the bases from the aligned patterns of a subset of the scan before the final fit.
      subset: at most this many patterns (whole scan rows, spread over the scan) re-estimate the bases.
      base_rounds: rounds of fitting the subset and re-estimating the bases from it.
      coarse_steps: iterations of a first, coarse fit from the encoder's warps (blurred bases, wider pixels), or
        None: `COARSE_STEPS`, none with rigid spots (`coarse_steps_for`).
      share: share of the warp's Fisher information the fitted pixels hold (`fit.information_mask`).
      grow: pixels by which that set is widened, so a spot that moves during the fit stays inside it.
      max_points: at most this many fitted pixels per base (None = as many as ``share`` needs).
      interpolation: how the fit interpolates a base: ``"cubic"`` (Keys, A = -0.5) or ``"bilinear"``.
      floor: the floor of the fit's weights (`fit.BaseTable.floor`), or None: once the bases are re-estimated,
        ``floor_subset`` patterns of the subset are fitted at `fit.DEFAULT_FLOOR` and at `fit.LOW_FLOOR`, and the
        map keeps the lower floor only if the warps of neighbouring positions then scatter less by at least
        `fit.FLOOR_GAIN` (`fit.scatter_ratio`): how far dark pixels can be trusted depends on how well the base
        describes them, which only the data tell. Without a base update the floor is `fit.DEFAULT_FLOOR`.
      blur: the Gaussian (pixels) smoothing the final bases' spots before the map's fit (`fit.prepare_bases`), or
        None: after the floor is chosen, the same patterns are also fitted against the spots smoothed by
        `fit.BASE_BLUR`, kept only if neighbouring warps then scatter less by at least `fit.FLOOR_GAIN`: a base
        averaged from patterns not yet all aligned can hold sharp disk edges in several copies a fraction of a pixel
        apart, which pull each pattern back to its group's alignment. Without a base update: 0.
      floor_subset: this many patterns compare the floors and the smoothing: as many whole rows of the subset as fit
        in it, at least one.
      batch_size: patterns per device batch.
      scale_spots: each pattern's fit also scales its base's spots by a free factor (`fit.BaseTable.scale_spots`):
        specimen thickness, tilt and dose change how bright the diffracted spots are from position to position, and
        a pattern whose spots are brighter or dimmer than the base's would otherwise pull its warp to make up for it.
        Off by default: on simulated scans, whose spots vary little, it helps some maps and hurts others (the
        README's Limits). Not with rigid spots (`scale_spots_for`).
      margin: pixels by which the re-estimated bases extend the patterns' frame on every side, or None: as many as
        a pattern's corners need when its warp turns them (`corner_margin`). A pattern turned against its base puts
        its corners, which hold the diffraction orders farthest out and so the longest lever arm on strain, where a
        base of the pattern's own frame has nothing; 0 leaves them out of the fit.
    """

    steps: int = 5
    reselect: int = 2
    rigid_spots: bool | None = None
    base_update: bool = True
    subset: int = 1024
    base_rounds: int = 2
    share: float = 0.98
    grow: int = 1
    coarse_steps: int | None = None
    max_points: int | None = None
    interpolation: str = "cubic"
    floor: float | None = None
    blur: float | None = None
    floor_subset: int = 256
    batch_size: int = 256
    scale_spots: bool = False
    margin: int | None = None

    def __post_init__(self):
        for name in ("steps", "reselect", "subset", "base_rounds", "coarse_steps", "grow", "floor_subset",
                     "batch_size"):
            value = getattr(self, name)
            if name == "coarse_steps" and value is None:
                continue
            low = 0 if name in ("steps", "reselect", "coarse_steps", "grow") else 1
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{name} = {value!r}: expected an integer >= {low}")
        if not 0 < self.share <= 1:
            raise ValueError(f"share = {self.share!r}: expected 0 < share <= 1")
        if self.floor is not None and not 0 < self.floor <= 1:
            raise ValueError(f"floor = {self.floor!r}: expected None or a fraction in (0, 1]")
        if self.blur is not None and not (np.isfinite(self.blur) and self.blur >= 0):
            raise ValueError(f"blur = {self.blur!r}: expected None or a width >= 0 in pixels")
        if self.margin is not None and (isinstance(self.margin, bool) or int(self.margin) != self.margin
                                        or self.margin < 0):
            raise ValueError(f"margin = {self.margin!r}: expected None or an integer >= 0 (pixels)")
        if not isinstance(self.scale_spots, (bool, np.bool_)):
            raise ValueError(f"scale_spots = {self.scale_spots!r}: expected True or False")
        if self.interpolation not in fit_lib.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {fit_lib.INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def set_floor(self) -> float:
        """The floor of the fit's weights unless the map chooses it: `floor`, or `fit.DEFAULT_FLOOR`."""
        return fit_lib.DEFAULT_FLOOR if self.floor is None else float(self.floor)

    @property
    def set_blur(self) -> float:
        """The smoothing of the fit's spots unless the map chooses it: `blur`, or 0."""
        return 0.0 if self.blur is None else float(self.blur)


def corner_margin(shape: tuple[int, int], center: tuple[float, float], *, strain: float = 0.03) -> int:
    """Pixels by which a base frame must extend a ``shape = (H, W)`` pattern's on every side to hold all of it turned
    any way about ``center`` (row, col) and stretched by ``strain``, plus 2: the circle about the centre through the
    pattern's farthest corner."""
    h, w = shape
    cr, cc = (float(c) + 0.5 for c in center)  # pixel centres: the frame spans [0, H] x [0, W]
    reach = max(np.hypot(r, c) for r in (cr, h - cr) for c in (cc, w - cc)) * (1.0 + strain) + 2.0
    return max(0, int(np.ceil(reach - min(cr, h - cr, cc, w - cc))))


def margin_for(config: MapConfig, cfg) -> int:
    """The margin of a map's bases (`MapConfig.margin`) for a run's model config ``cfg``: as set, or
    `corner_margin` of its patterns. Without a base update (``base_update`` False, or no fit) 0: the learned bases
    have nothing beyond the pattern frame."""
    if not (config.base_update and config.steps > 0):
        return 0
    return corner_margin(cfg.pattern_shape, cfg.center_px) if config.margin is None else int(config.margin)


def scale_spots_for(config: MapConfig, geometry) -> bool:
    """Whether a map with ``config`` fits each pattern's spots' scale for a run of this ``geometry``: as set, except
    without a fit (``steps`` 0) and with rigid spots (`rigid_spots_for`): each wide disk is anchored on its own
    centre, and on simulated scans they mapped no better with the scale."""
    return bool(config.scale_spots) and config.steps > 0 and not rigid_spots_for(config, geometry)


def coarse_steps_for(config: MapConfig, geometry) -> int:
    """Iterations of the coarse fit a map with ``config`` runs for a run of this ``geometry``: as set, or (None)
    `COARSE_STEPS` for spots that stretch with the base and none with rigid spots (`rigid_spots_for`): blurred by half
    a disk radius, wide flat-topped disks lose the edges that place them, and the coarse fit pulls their warps away
    from the fine fit's optimum (the README's Limits, *Wide disks*)."""
    if config.coarse_steps is not None:
        return int(config.coarse_steps)
    return 0 if rigid_spots_for(config, geometry) else COARSE_STEPS


def rigid_spots_for(config: MapConfig, geometry) -> bool:
    """Whether a map with ``config`` fits rigid spots for a run of this ``geometry``: as set, or (None) when its disks
    are wide. Without a fit (``steps`` 0) there are none."""
    rigid = geometry.wide_disks if config.rigid_spots is None else bool(config.rigid_spots)
    return rigid and config.steps > 0


# ----------------------------------------------------------------------------------------------- per-batch steps
def lattice_signals(task, x: jax.Array, zero_beam: jax.Array) -> dict[str, jax.Array]:
    """Whether each pattern shows a lattice, ``(B, H, W)`` scaled patterns -> dict of ``(B,)``:

    ``ring_signal`` (intensity in the prior ring), ``lattice_signal`` (amplitude of the lattice's ``n``-fold angular
    harmonic there, relative to ``ring_signal``), ``lattice_significance`` (that amplitude over the rms amplitude of
    the orders no lattice has, `ccstae_jax.model.geometry.NOISE_ORDERS`, which measure the noise) and
    ``double_significance`` (the same for order ``2n``: two grains turned by half a period under the probe cancel
    each other's ``n``-th harmonic, not their ``2n``-th). Computed on the patterns shifted by whole pixels onto the
    centre (descan)."""
    cfg = task.model_cfg
    xs = recentred(x, zero_beam - jnp.asarray(cfg.center_px, jnp.float32))
    ring = jnp.asarray(prior_ring(cfg), jnp.float32)
    n = cfg.symmetry
    lattice = jnp.asarray(np.concatenate([angular_weights(cfg, n), angular_weights(cfg, 2 * n)]))
    noise_w = jnp.asarray(np.concatenate([angular_weights(cfg, k) for k in NOISE_ORDERS]))
    ring_sum = jnp.einsum("bhw,hw->b", xs, ring, precision=_HP)
    c = jnp.einsum("bhw,khw->bk", xs, lattice, precision=_HP)
    harm, double = jnp.hypot(c[:, 0], c[:, 1]), jnp.hypot(c[:, 2], c[:, 3])
    noise_c = jnp.einsum("bhw,khw->bk", xs, noise_w, precision=_HP)
    noise = jnp.maximum(jnp.sqrt(jnp.mean(noise_c**2, axis=-1) * 2.0), 1e-30)
    return {
        "ring_signal": ring_sum,
        "lattice_signal": harm / jnp.maximum(jnp.abs(ring_sum), 1e-30),
        "lattice_significance": harm / noise,
        "double_significance": double / noise,
    }


def _encode(task, params, images):
    enc = task.model.apply({"params": params}, images, method=lambda m, x: m.encode(x))
    return enc, jnp.argmax(enc["classes"], -1).astype(jnp.int32)


def _jit(fn, mesh, n_replicated: int = 1, n_batched: int = 1):
    """``jax.jit`` of ``fn(*replicated, *batched)``: on one device, or with the batched arguments split over
    ``mesh``'s data axis (the others, parameters and tables, copied to every device)."""
    if mesh is None:
        return jax.jit(fn)
    data, repl = data_sharding(mesh), replicated_sharding(mesh)
    return jax.jit(fn, in_shardings=(repl,) * n_replicated + (data,) * n_batched, out_shardings=data)


@functools.lru_cache(maxsize=16)
def make_encode_fn(task, *, mesh=None) -> Callable:
    """Jitted ``(params, images (B, H, W)) -> dict``: ``theta``, ``class_index``, ``zero_beam`` and the
    `lattice_signals` of each pattern (the encoder alone). With a ``mesh`` the batch is split over its devices.
    One function per task and mesh: a second map with the same run compiles nothing."""

    def encode(params, images):
        enc, k = _encode(task, params, images)
        return {"theta": enc["theta"], "class_index": k, "zero_beam": enc["zero_beam"],
                **lattice_signals(task, enc["inputs"], enc["zero_beam"])}

    return _jit(encode, mesh)


@functools.lru_cache(maxsize=16)
def make_fit_fn(task, steps: int, *, coarse_steps: int = 0, reselect: int = 0, mesh=None) -> Callable:
    """Jitted ``(params, table, coarse, images (B, H, W), theta0 (B, 2, 3)) -> dict``: `make_encode_fn`'s outputs
    with ``theta`` fitted against ``table`` (a `fit.BaseTable`) by ``steps`` iterations (`fit.fit_patterns`, pixel
    lists rebuilt after ``reselect`` of them), plus ``theta_encoder``, ``fisher`` ``(B, 6, 6)``, ``chi2`` and
    ``dof`` ``(B,)``, ``spot_amplitude`` ``(B, fit.N_BANDS)``, ``residual_levels`` ``(B, fit.N_LEVELS, 3)`` and
    ``top`` ``(B,)`` (`fit.FitResult`).

    Each pattern starts from ``theta0`` where that is finite; a NaN row starts from the encoder's warp, first fitted
    ``coarse_steps`` times against ``coarse`` (a blurred table over sparser pixels, `fit.prepare_bases`: a wider
    basin for a rough start; None = no coarse fit). The tables are arguments, so the function compiles once for
    every dictionary with the same shapes and pixel-list lengths (the rounds of the base estimate and the final
    pass), and once per task, mesh and step counts in a process. With a ``mesh`` the batch is split over its
    devices."""
    host = False if mesh is not None else None

    def run(params, table, coarse, images, theta0):
        enc, k = _encode(task, params, images)
        start = enc["theta"]
        if coarse is not None and coarse_steps:
            start = fit_lib.fit_patterns(start, enc["inputs"], enc["zero_beam"], k, coarse, steps=coarse_steps,
                                         host_compaction=host).theta
        start = jnp.where(jnp.isfinite(theta0).all(axis=(-2, -1), keepdims=True), theta0, start)
        res = fit_lib.fit_patterns(start, enc["inputs"], enc["zero_beam"], k, table, steps=steps,
                                   reselect=reselect, host_compaction=host)
        return {"theta": res.theta, "theta_encoder": enc["theta"], "class_index": k, "zero_beam": enc["zero_beam"],
                "fisher": res.fisher, "chi2": res.chi2, "dof": res.dof, "spot_amplitude": res.spot_amplitude,
                "residual_levels": res.residual_levels, "top": res.top,
                **lattice_signals(task, enc["inputs"], enc["zero_beam"])}

    return _jit(run, mesh, n_replicated=3, n_batched=2)


# ----------------------------------------------------------------------------------------------- batching
def _row_batches(scan, rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed-size ``(images (B, H, W), index (B,))`` batches of the given scan rows, padded with zeros (index -1)."""
    ry = scan.scan_shape[1]
    h, w = scan.pattern_shape
    images = np.zeros((batch_size, h, w), np.float32)
    index = np.full(batch_size, -1, np.int64)
    fill = 0
    for r in rows:
        block = scan.read(int(r) * ry, (int(r) + 1) * ry)
        pos = np.arange(int(r) * ry, (int(r) + 1) * ry)
        start = 0
        while start < len(block):
            take = min(batch_size - fill, len(block) - start)
            images[fill: fill + take] = block[start: start + take]
            index[fill: fill + take] = pos[start: start + take]
            fill += take
            start += take
            if fill == batch_size:
                yield images.copy(), index.copy()
                images[:] = 0
                index[:] = -1
                fill = 0
    if fill:
        yield images.copy(), index.copy()


def subset_rows(scan_shape: tuple[int, int], max_patterns: int) -> np.ndarray:
    """Scan rows spread evenly over the scan holding at most ``max_patterns`` patterns (at least one row)."""
    rx, ry = scan_shape
    n = max(1, min(rx, max_patterns // max(ry, 1)))
    return np.unique(np.linspace(0, rx - 1, n).round().astype(int))


class _Collector:
    """Scatters per-batch outputs to flat per-position arrays, one batch behind the device (so the host copies
    the previous batch while the next one computes)."""

    def __init__(self, n_positions: int, progress=None, skip: tuple[str, ...] = ()):
        self.n, self.progress, self.skip = n_positions, progress, skip
        self.results: dict[str, np.ndarray] = {}
        self.pending = None

    def add(self, out, index):
        if self.pending is not None:
            self._collect(*self.pending)
        self.pending = (out, index)

    def finish(self) -> dict[str, np.ndarray]:
        if self.pending is not None:
            self._collect(*self.pending)
            self.pending = None
        return self.results

    def _collect(self, out, index):
        out = jax.device_get({k: v for k, v in out.items() if k not in self.skip})
        keep = index >= 0
        for k, v in out.items():
            if k not in self.results:
                fill = np.nan if v.dtype.kind == "f" else -1
                self.results[k] = np.full((self.n,) + v.shape[1:], fill, v.dtype)
            self.results[k][index[keep]] = v[keep]
        if self.progress is not None:
            self.progress.update(int(keep.sum()))


# ----------------------------------------------------------------------------------------------- the scan
def _tables(task, bases, support, config: MapConfig,
            like: tuple[fit_lib.BaseTable, fit_lib.BaseTable | None] | None = None,
            noise_weight: float = fit_lib.DEFAULT_NOISE_WEIGHT, blur: float | None = None, coarse: bool = True,
            ) -> tuple[fit_lib.BaseTable, fit_lib.BaseTable | None]:
    """The fine table of ``bases`` and, with `MapConfig.coarse_steps` and ``coarse``, the coarse one (spots
    blurred by half a disk radius, pixels grown by a disk radius and sampled on a lattice as coarse as the blur); with
    rigid spots (`rigid_spots_for`) the spots move rigidly (`fit.prepare_bases`). With ``like`` (tables made
    before), the pixel and spot lists are at least as long as theirs, so the fit compiled for them serves these
    too. ``noise_weight``: the fits' blend of shot noise (`fit.noise_weight`). Their floor is `MapConfig.set_floor`
    (`estimate_bases` lowers it on the tables it returns when it chooses the floor); the fine table's spots are
    smoothed by ``blur`` pixels (None: `MapConfig.set_blur`). ``bases`` may extend the pattern frame by a margin
    (`margin_for`), the same on every side."""
    cfg = task.model_cfg
    geometry = cfg.geometry
    margin = (bases.shape[-1] - cfg.pattern_shape[1]) // 2
    kw = dict(support=support, share=config.share, max_points=config.max_points, min_radius=geometry.fit_min_radius,
              interpolation=config.interpolation, noise_weight=noise_weight, margin=margin,
              floor=config.set_floor, scale_spots=scale_spots_for(config, geometry),
              rigid_radius=geometry.disk_radius if rigid_spots_for(config, geometry) else None)
    blur = config.set_blur if blur is None else blur
    fine = fit_lib.prepare_bases(bases, cfg.center_px, grow=config.grow, blur=blur,
                                 like=None if like is None else like[0], **kw)
    if not (coarse and coarse_steps_for(config, geometry)):
        return fine, None
    blur = max(1.0, 0.5 * geometry.disk_radius)
    return fine, fit_lib.prepare_bases(bases, cfg.center_px, grow=int(np.ceil(geometry.disk_radius)) + 1,
                                       blur=blur, stride=max(2, int(blur)), like=None if like is None else like[1],
                                       **kw)


def _no_start(n: int) -> np.ndarray:
    return np.full((n, 2, 3), np.nan, np.float32)


def _fit_fn(task, config: MapConfig, mesh) -> Callable:
    return make_fit_fn(task, config.steps, coarse_steps=coarse_steps_for(config, task.model_cfg.geometry),
                       reselect=config.reselect, mesh=mesh)


def _noise_of_pairs(task, images: np.ndarray, index: np.ndarray, used: np.ndarray, top: float, ry: int) -> np.ndarray:
    """`fit.neighbour_noise` of the neighbouring positions along the scan rows of one batch (``index`` the scan
    position of each pattern, -1 padding; ``used``: patterns with a lattice), over the pixels the fit may compare
    (beyond `Geometry.fit_min_radius` of the zero beam): ``(P, fit.N_LEVELS, 3)``."""
    cfg = task.model_cfg
    first = np.flatnonzero(used[:-1] & used[1:] & (index[1:] == index[:-1] + 1) & (index[1:] // ry == index[:-1] // ry))
    if first.size == 0 or top <= 0:
        return np.zeros((0, fit_lib.N_LEVELS, 3))
    region = pixel_radii(images.shape[-2:], cfg.center_px) >= cfg.geometry.fit_min_radius
    return fit_lib.neighbour_noise(images * cfg.intensity_scale, np.stack([first, first + 1], -1), region, top)


class BaseEstimate(NamedTuple):
    """`estimate_bases` output.

    Attributes:
      bases: the re-estimated bases (`ccstae_jax.mapping.bases.UpdatedBases`).
      start: ``(N, 2, 3)`` the last round's warps by scan position (NaN outside the subset).
      tables: the tables of the re-estimated bases for the final fit (`_tables`), with its noise weight and floor.
      noise_weight: the blend of shot noise the last round's residuals measure (`fit.noise_weight`).
      floor: the floor of the final fit's weights (`MapConfig.floor`).
      floor_ratio: how much the neighbouring warps scatter at `fit.LOW_FLOOR` relative to `fit.DEFAULT_FLOOR`
        (`fit.scatter_ratio`, on `MapConfig.floor_subset` patterns); NaN when the floor was set, not chosen.
      blur: the smoothing of the final fit's spots in pixels (`MapConfig.blur`).
      blur_ratio: how much the neighbouring warps scatter with the spots smoothed by `fit.BASE_BLUR` relative to
        without, at the chosen floor; NaN when the smoothing was set, not chosen.
    """

    bases: bases_lib.UpdatedBases
    start: np.ndarray
    tables: tuple
    noise_weight: float
    floor: float
    floor_ratio: float
    blur: float = 0.0
    blur_ratio: float = float("nan")


def _neighbour_pairs(used: np.ndarray, class_index: np.ndarray, ry: int) -> np.ndarray:
    """``(P, 2)`` indices of neighbouring positions along the scan rows of a subset laid out row by row (``ry``
    positions a row), both with a lattice (``used``) and of the same base."""
    first = np.flatnonzero((np.arange(len(used) - 1) % ry != ry - 1) & used[:-1] & used[1:]
                           & (class_index[1:] == class_index[:-1]))
    return np.stack([first, first + 1], -1)


def estimate_bases(task, params, scan, config: MapConfig, *, mesh=None, progress=None) -> BaseEstimate:
    """Step 1 of the module docstring: the bases re-estimated from a subset of whole scan rows. The first round
    aligns the subset against the learned bases; each further round (`MapConfig.base_rounds`) fits it again, from
    the previous round's warps, against the bases the previous round estimated, with the fit's weights measured
    from the previous round's residuals (`fit.noise_weight`). With `MapConfig.floor` None, whole rows of the subset
    (`MapConfig.floor_subset` patterns) are then fitted against the final bases at `fit.DEFAULT_FLOOR` and at
    `fit.LOW_FLOOR`, which the final fit keeps only if their neighbours agree better by `fit.FLOOR_GAIN`; with
    `MapConfig.blur` None, then at the chosen floor against the spots smoothed by `fit.BASE_BLUR`, kept on the same
    terms. The fit compiles twice: for the learned bases, whose blur spreads their information over many pixels,
    and for all the re-estimated ones, whose pixel lists are sized once, by the first of them."""
    rows = subset_rows(scan.scan_shape, config.subset)
    ry = scan.scan_shape[1]
    start = _no_start(len(rows) * ry)  # each subset pattern's warp from the last round
    local = {int(r): i * ry for i, r in enumerate(rows)}
    margin = margin_for(config, task.model_cfg)
    first = bases_lib.learned(task, params, margin)
    current, support, tables = first.bases, np.asarray(first.support), None
    weight = fit_lib.DEFAULT_NOISE_WEIGHT
    accumulate = bases_lib.make_accumulator(task, interpolation=config.interpolation, mesh=mesh, margin=margin)
    fit = _fit_fn(task, config, mesh)
    lattice_at = np.zeros(len(start), bool)
    class_at = np.full(len(start), -1, np.int64)

    def slots(index):  # each batch pattern's place in the subset (0 for padding)
        return np.array([local[int(i) // ry] + int(i) % ry if i >= 0 else 0 for i in index])

    for round_ in range(config.base_rounds):
        tables = _tables(task, current, support, config, like=tables if round_ > 1 else None, noise_weight=weight)
        spots = None if tables[0].centres is None else (tables[0].centres, tables[0].owner)
        sums, levels, tops, pairs = None, [], [], []
        for images, index in _row_batches(scan, rows, _batch(config, mesh)):
            slot = slots(index)
            out = fit(params, *tables, images, start[slot])
            lattice = np.asarray(out["lattice_significance"]) >= BASE_MIN_SIGNIFICANCE
            used = (index >= 0) & lattice
            lattice_at[slot[index >= 0]] = lattice[index >= 0]
            class_at[slot[index >= 0]] = np.asarray(out["class_index"])[index >= 0]
            part = accumulate(images, out["theta"], out["class_index"], jnp.asarray(used, jnp.float32), spots)
            sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
            levels.append(np.asarray(out["residual_levels"])[used])
            tops.append(np.asarray(out["top"])[used])
            pairs.append(_noise_of_pairs(task, images, index, used, float(np.median(tops[-1])) if used.any() else 0.0,
                                         ry))
            start[slot[index >= 0]] = np.asarray(out["theta"])[index >= 0]
            if progress is not None and round_ == config.base_rounds - 1:
                progress.update(int((index >= 0).sum()))
        upd = bases_lib.reestimate(task, params, *sums, margin=margin)
        current, support = upd.bases, np.asarray(upd.support)
        weight = fit_lib.noise_weight(np.concatenate(levels), np.concatenate(tops), np.concatenate(pairs))
    tables = _tables(task, current, support, config, like=tables if config.base_rounds > 1 else None,
                     noise_weight=weight)
    floor, ratio = config.set_floor, float("nan")
    blur, blur_ratio = config.set_blur, float("nan")
    if config.floor is None or config.blur is None:
        # candidate fits against the final bases, on whole rows spread over the subset, judged by how well the warps
        # of neighbouring positions agree (`fit.scatter_ratio`)
        compared = rows[np.unique(np.linspace(0, len(rows) - 1, max(1, min(len(rows), config.floor_subset // ry)))
                                  .round().astype(int))]
        pairs = _neighbour_pairs(lattice_at, class_at, ry)

        def warps_of(t):
            out = _no_start(len(start))
            for images, index in _row_batches(scan, compared, _batch(config, mesh)):
                slot = slots(index)
                out[slot[index >= 0]] = np.asarray(fit(params, *t, images, start[slot])["theta"])[index >= 0]
            return out

        current_warps = warps_of(tables)
        if config.floor is None:
            lowered = tuple(None if t is None else t.replace(floor=jnp.float32(fit_lib.LOW_FLOOR)) for t in tables)
            low_warps = warps_of(lowered)
            ratio = fit_lib.scatter_ratio(current_warps, low_warps, pairs)
            if ratio <= fit_lib.FLOOR_GAIN:
                floor, tables, current_warps = fit_lib.LOW_FLOOR, lowered, low_warps
        if config.blur is None:
            fine = _tables(task, current, support, config, like=tables, noise_weight=weight,
                           blur=fit_lib.BASE_BLUR, coarse=False)[0].replace(floor=jnp.float32(floor))
            smoothed = (fine, tables[1])
            blur_ratio = fit_lib.scatter_ratio(current_warps, warps_of(smoothed), pairs)
            if blur_ratio <= fit_lib.FLOOR_GAIN:
                blur, tables = fit_lib.BASE_BLUR, smoothed
    by_position = _no_start(scan.n_positions)
    for r in rows:
        by_position[int(r) * ry:(int(r) + 1) * ry] = start[local[int(r)]: local[int(r)] + ry]
    return BaseEstimate(upd, by_position, tables, weight, floor, ratio, blur, blur_ratio)


def default_mesh():
    """The devices a map runs on: a data-parallel mesh over several accelerators, else None (one device; on CPUs the
    fit builds its pixel lists on the host, fastest there)."""
    if jax.default_backend() == "cpu" or jax.device_count() == 1:
        return None
    return make_mesh()


def _batch(config: MapConfig, mesh) -> int:
    n = 1 if mesh is None else mesh.devices.size
    return -(-config.batch_size // n) * n


def map_scan(task, params, scan, config: MapConfig = MapConfig(), *, mesh="auto", progress=None,
             bases_progress=None) -> dict[str, np.ndarray]:
    """Per-position results over the whole scan (module docstring), flat arrays ``(N, ...)`` in scan order:
    ``theta``, ``theta_encoder`` ``(N, 2, 3)``, ``class_index``, ``zero_beam`` ``(N, 2)``, ``fisher`` ``(N, 6, 6)``,
    ``chi2``, ``dof``, ``spot_amplitude`` ``(N, fit.N_BANDS)``, ``ring_signal``, ``lattice_signal``,
    ``lattice_significance``, and the scalars ``noise_weight`` (the fit's blend of shot noise, `fit.noise_weight`),
    ``fit_floor`` (the floor of its weights), ``floor_ratio``, ``fit_blur`` (the smoothing of its bases' spots, pixels)
    and ``blur_ratio`` (`BaseEstimate`);
    with ``steps == 0`` the encoder's warps and no fit statistics. With several bases the warps are composed with
    `register_bases` (``base_registration`` ``(K, 2, 3)``), so every position is measured in base 0's frame.

    Args:
      scan: an open `ccstae_jax.data.readers.Scan`.
      mesh: the devices (`default_mesh` for ``"auto"``; None = the first device).
      progress, bases_progress: optional tqdm-like objects (``update(n)``) for the map and the base estimate.
    """
    cfg = task.model_cfg
    mesh = default_mesh() if mesh == "auto" else mesh
    params = jax.device_put(params, jax.devices()[0] if mesh is None else replicated_sharding(mesh))
    registration = None
    if config.steps == 0:
        fn = make_encode_fn(task, mesh=mesh)
    else:
        tables, start, weight = None, _no_start(scan.n_positions), fit_lib.DEFAULT_NOISE_WEIGHT
        floor, ratio = config.set_floor, float("nan")
        blur, blur_ratio = config.set_blur, float("nan")
        if config.base_update:
            est = estimate_bases(task, params, scan, config, mesh=mesh, progress=bases_progress)
            tables, start, weight, floor, ratio = est.tables, est.start, est.noise_weight, est.floor, est.floor_ratio
            blur, blur_ratio = est.blur, est.blur_ratio
            base_images = est.bases.bases
        else:
            base_images = bases_lib.learned(task, params).bases
            tables = _tables(task, base_images, None, config, noise_weight=weight)
        fn = functools.partial(_fit_fn(task, config, mesh), params, *tables)
        if cfg.num_bases > 1:
            registration = register_bases(base_images, tables[0], cfg.center_px)
    collector = _Collector(scan.n_positions, progress, skip=("residual_levels", "top"))
    for images, index in _row_batches(scan, np.arange(scan.scan_shape[0]), _batch(config, mesh)):
        # dispatched asynchronously; the previous batch is collected meanwhile
        if config.steps == 0:
            collector.add(fn(params, images), index)
        else:  # the subset's patterns start from their base-estimate warps
            collector.add(fn(images, np.where(index[:, None, None] >= 0, start[np.maximum(index, 0)], np.nan)), index)
    out = collector.finish()
    if config.steps:
        out["noise_weight"] = np.float64(weight)
        out["fit_floor"], out["floor_ratio"] = np.float64(floor), np.float64(ratio)
        out["fit_blur"], out["blur_ratio"] = np.float64(blur), np.float64(blur_ratio)
    if registration is not None:
        # every warp relative to base 0's frame: a second phase's lattice mismatch becomes strain
        k = np.clip(out["class_index"], 0, cfg.num_bases - 1)
        out["theta"] = np.asarray(affine.compose(jnp.asarray(out["theta"]), jnp.asarray(registration[k])))
        if "fisher" in out:
            # phi = theta^-1 becomes R^-1 phi: its entries map linearly by kron(B, I_3), B the linear part of R^-1
            b = np.asarray(affine.invert(jnp.asarray(registration)))[:, :, :2].astype(np.float64)
            a_inv = np.einsum("kil,jm->kijlm", np.linalg.inv(b), np.eye(3)).reshape(-1, 6, 6)[k]
            out["fisher"] = np.swapaxes(a_inv, -1, -2) @ out["fisher"] @ a_inv
        out["base_registration"] = registration
    return out


def register_bases(bases: jax.Array, table: fit_lib.BaseTable, center: tuple[float, float], *,
                   steps: int = 20) -> np.ndarray:
    """``(K, 2, 3)`` warps pulling base 0 onto each base (identity for base 0): each base is fitted, like a
    pattern, against base 0 (`fit.fit_patterns`). Composed with a pattern's warp against its own base, they put
    every lattice in base 0's frame, so a phase with another lattice constant reads as strain relative to it.
    ``bases`` are in ``table``'s base frame; each is fitted over the patterns' frame (its margin cut off)."""
    k = bases.shape[0]
    m = table.margin
    h, w = table.pattern_shape
    res = fit_lib.fit_patterns(affine.identity_warp((k,)), jnp.asarray(bases, jnp.float32)[:, m:m + h, m:m + w],
                               jnp.broadcast_to(jnp.asarray(center, jnp.float32), (k, 2)),
                               jnp.zeros(k, jnp.int32), table, steps=steps)
    theta = np.array(res.theta)  # a writable copy
    theta[0] = np.asarray(affine.identity_warp(()))
    return theta
