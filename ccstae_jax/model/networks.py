"""The CC-ST-AE: an encoder that reads affine parameters and a class from a pattern, and a dictionary of bases.

Two presets share one forward pass:

* ``reference`` reproduces Auto4DSTEM 0.2.8's default network layer for layer (200x200 input, pools [5, 4, 2],
  128 channels, LayerNorm over (H, W), a convolutional decoder from a one-hot code; 4,471,621 parameters), with
  its rotation head (``ReLU``) and optional 800x800 bicubic up-sampled warps. It exists for like-for-like comparisons.
  The decoder is evaluated once per base and gathered, instead of once per sample.
* ``fast`` is our default: the encoder sees the pattern already turned to a canonical orientation by a closed-form
  rotation estimate (below), at reduced resolution, through a small strided CNN; the bases are free parameters
  (a learned dictionary of patterns), so the "decoder" is a lookup.

**Rotation.** A lattice with ``n``-fold symmetry (``n = 6`` for hexagonal) is only determined modulo ``2 pi / n``. The
``n``-th angular Fourier component of the pattern inside the spot ring, ``sum I(q) exp(-i n phi(q))``, has phase
``n * rotation`` (mod 2 pi) and, to first order, no strain dependence. Its angle (``harmonic_rotation``) turns every
pattern to a canonical orientation before the encoder sees it; the encoder then learns a bounded residual rotation.
Rotations anywhere in 0..360 degrees need no hand-tuned angle shift. Set ``rotation_mode="relu"`` for the
reference's unbounded ``ReLU`` head instead.

Frames: see `ccstae_jax.ops.affine`. The network's warp ``theta`` pulls the data onto the base:
``warped_input(p) = data(theta p)``; rotation and scale act about the pattern centre ``center`` (the central beam,
default ``(H // 2, W // 2)``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ccstae_jax.model import masks

from ccstae_jax.ops import affine, warp
from ccstae_jax.ops.conv import conv_general_dilated
from ccstae_jax.model.geometry import Geometry, zero_beam
from ccstae_jax.ops.sparsity import k_sparse


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network; saved with every run (`to_dict`/`from_dict`).

    Attributes:
      preset: ``"fast"`` or ``"reference"``.
      geometry: the patterns' measured geometry (`ccstae_jax.model.geometry.Geometry`): pattern shape, zero beam (the
        centre about which rotation and scale act), lattice symmetry and the spot ring the prior and the encoder use.
      num_bases: size of the learned dictionary (K-sparse picks one per pattern).
      rotation_mode: ``"prior"`` (harmonic prior + bounded residual), ``"relu"`` (reference: ``ReLU(o)``, unbounded,
        radians) or ``"bounded"`` (``rotation_limit * tanh(o)``).
      scale_limit, shear_limit, rotation_limit, translation_limit: bounds of the tanh heads (rotation in radians,
        translation in normalised units).
      translation: learn a translation (absorbs centring offsets; each pattern's zero beam is measured and
        recentred first, see `CCSTAE`).
      intensity_scale: the network multiplies input patterns by this constant (set from the data).
      interpolate: reference only: warps on patterns bicubic-upsampled to ``up_size`` (the tutorial path).
      warp_mode: ``"bilinear"`` or ``"bicubic"`` for the pattern warps.
      symmetrize_bases: fast preset: each base is averaged over the ``symmetry`` rotations about the centre, so the
        dictionary holds lattices with the lattice's own symmetry (an unstrained reference shape). Then a pattern's
        affine is defined up to exactly the lattice rotations, which strain referencing removes
        (`ccstae_jax.mapping.reference`).
      dtype: compute dtype of the convolutions/dense layers (``"float32"`` or ``"bfloat16"``); parameters and
        warps stay float32.
      encoder_downsample, encoder_channels, encoder_dense: ``fast`` encoder shape.
      conv_size, pool_list, reduced_size: ``reference`` encoder/decoder shape.
    """

    preset: str = "fast"
    geometry: Geometry = Geometry()
    num_bases: int = 1
    rotation_mode: str = "prior"
    scale_limit: float = 0.05
    shear_limit: float = 0.1
    rotation_limit: float = 0.1
    translation_limit: float = 0.15
    translation: bool = True
    intensity_scale: float = 1.0
    interpolate: bool = False
    up_size: int = 800
    warp_mode: str = "bilinear"
    dtype: str = "float32"
    symmetrize_bases: bool = True
    encoder_downsample: int = 2
    encoder_channels: tuple[int, ...] = (8, 16, 32, 64, 64)
    encoder_dense: int = 128
    conv_size: int = 128
    pool_list: tuple[int, ...] = (5, 4, 2)
    reduced_size: int = 20

    def __post_init__(self):
        if self.preset not in ("fast", "reference"):
            raise ValueError(f"ModelConfig.preset must be 'fast' or 'reference', got {self.preset!r}")
        if self.rotation_mode not in ("prior", "relu", "bounded"):
            raise ValueError(f"ModelConfig.rotation_mode must be prior/relu/bounded, got {self.rotation_mode!r}")
        if not isinstance(self.geometry, Geometry):
            raise ValueError(f"ModelConfig.geometry must be a Geometry, got {type(self.geometry).__name__}")
        h, w = self.pattern_shape
        if self.num_bases < 1:
            raise ValueError(f"ModelConfig.num_bases must be >= 1, got {self.num_bases}")
        if self.preset == "reference" and h % math.prod(self.pool_list):
            raise ValueError(
                f"reference preset: pattern size {h} must be divisible by prod(pool_list)={math.prod(self.pool_list)}")
        if self.preset == "fast" and h % self.encoder_downsample:
            raise ValueError(f"fast preset: pattern size {h} not divisible by encoder_downsample "
                             f"{self.encoder_downsample}")
        if self.warp_mode not in ("bilinear", "bicubic"):
            raise ValueError(f"ModelConfig.warp_mode must be 'bilinear' or 'bicubic', got {self.warp_mode!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"ModelConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The named preset (``fast`` or ``reference``) with overrides."""
        if name == "reference":
            base = dict(preset="reference", rotation_mode="relu", translation=False, interpolate=False,
                        warp_mode="bilinear", symmetrize_bases=False)
        elif name == "fast":
            base = dict(preset="fast")
        else:
            raise ValueError(f"unknown preset {name!r}; choose 'fast' or 'reference'")
        base.update(overrides)
        return cls(**base)

    @property
    def pattern_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the patterns (from the geometry)."""
        return tuple(self.geometry.pattern_shape)

    @property
    def center_px(self) -> tuple[float, float]:
        """The zero beam ``(row, col)`` in pixels about which rotation and scale act (from the geometry)."""
        return tuple(map(float, self.geometry.center))

    @property
    def symmetry(self) -> int:
        """Rotational order of the lattice (from the geometry)."""
        return int(self.geometry.symmetry)

    @property
    def prior_radii(self) -> tuple[float, float]:
        """``(inner, outer)`` of the spot ring the rotation prior and the encoder look at (the geometry's ring)."""
        return tuple(map(float, self.geometry.ring))

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        moved = sorted(set(d) & {"pattern_shape", "symmetry", "center", "prior_radii"})
        if moved:
            raise ValueError(f"ModelConfig: {moved} are measured from the data now (the geometry); written by an "
                             "older ccstae-jax? retrain, or set them with --symmetry/--ring")
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if isinstance(kw.get("geometry"), dict):
            kw["geometry"] = Geometry.from_dict(kw["geometry"])
        return cls(**kw)


# ----------------------------------------------------------------------------------------------- rotation prior
def prior_ring(cfg: ModelConfig) -> np.ndarray:
    """``(H, W)`` bool: pixels with ``inner < r <= outer`` (``cfg.prior_radii``) about the pattern centre."""
    inner, outer = cfg.prior_radii
    return masks.static_ring_mask(cfg.pattern_shape, inner, outer, center=cfg.center_px)


def harmonic_weights(cfg: ModelConfig) -> np.ndarray:
    """``(2, H, W)`` float32 weights ``ring * cos(n phi)``, ``ring * sin(n phi)``; ``phi`` in the warp frame.

    ``phi = atan2(v, u)`` with ``u`` along columns and ``v`` along rows, about the pattern centre.
    """
    return angular_weights(cfg, cfg.symmetry)


def angular_weights(cfg: ModelConfig, order: int) -> np.ndarray:
    """``(2, H, W)`` float32 ``g(r) cos(n phi + d(r))``, ``g(r) sin(n phi + d(r))`` for angular order ``n = order``
    over the prior ring about the pattern centre; ``phi = atan2(v, u)``, ``u`` along columns, ``v`` along rows.

    ``g`` and ``d`` are the geometry's matched gain and phase per annulus
    (`ccstae_jax.model.geometry.matched_harmonic`): the lattice's order gets both (its rings add up coherently), every
    other order the gain alone (the same pixels weighted alike, e.g. the noise orders of the lattice test); without
    them ``g = 1``, ``d = 0`` on the ring."""
    h, w = cfg.pattern_shape
    cr, cc = cfg.center_px
    v, u = np.mgrid[:h, :w].astype(np.float64)
    v, u = v - cr, u - cc
    phi = np.arctan2(v, u)
    ring = prior_ring(cfg).astype(np.float64)
    geo = cfg.geometry
    if geo.harmonic_gain is not None:
        annulus = np.minimum(np.floor(np.hypot(u, v)).astype(int), len(geo.harmonic_gain) - 1)
        ring = ring * np.asarray(geo.harmonic_gain)[annulus]
        if order == cfg.symmetry:
            phi = phi + np.asarray(geo.harmonic_phase)[annulus] / order
    return np.stack([ring * np.cos(order * phi), ring * np.sin(order * phi)]).astype(np.float32)


def harmonic_rotation(images: jax.Array, weights: jax.Array, symmetry: int) -> jax.Array:
    """Lattice orientation modulo ``2 pi / symmetry`` from the angular harmonic, ``(B, H, W)`` → ``(B,)`` radians.

    Returned in the warp frame (from +column toward +row), in ``(-pi/n, pi/n]``. Not differentiated (a prior).
    """
    images = jax.lax.stop_gradient(images.astype(jnp.float32))
    c = jnp.einsum("bhw,hw->b", images, weights[0], precision=jax.lax.Precision.HIGHEST)
    s = jnp.einsum("bhw,hw->b", images, weights[1], precision=jax.lax.Precision.HIGHEST)
    # sum I exp(-i n phi) = c - i s; for spots at phi_k = a + 2 pi k / n its phase is -n a.
    return jnp.arctan2(s, c) / symmetry


def about_center(theta: jax.Array, cfg: ModelConfig, margin: int = 0) -> jax.Array:
    """Re-centres warps so their linear part acts about the pattern centre: ``T(c) theta T(-c)``, ``(B, 2, 3)``, in
    the normalised coordinates of the pattern frame, or of a frame extending it by ``margin`` pixels on every side."""
    h, w = (n + 2 * margin for n in cfg.pattern_shape)
    cr, cc = (c + margin for c in cfg.center_px)
    cu, cv = affine.pixel_centre(cc, w), affine.pixel_centre(cr, h)
    shift = jnp.array([[1.0, 0.0, cu], [0.0, 1.0, cv]], theta.dtype)
    unshift = jnp.array([[1.0, 0.0, -cu], [0.0, 1.0, -cv]], theta.dtype)
    return affine.compose(shift, affine.compose(theta, unshift))


def shift_warp(offset: jax.Array, cfg: ModelConfig) -> jax.Array:
    """``(B, 2)`` pixel offsets (rows, cols) -> ``(B, 2, 3)`` warps translating the output by them: pulling with it
    moves content found ``offset`` away from the centre onto the centre."""
    h, w = cfg.pattern_shape
    tu = offset[:, 1] * (2.0 / w)
    tv = offset[:, 0] * (2.0 / h)
    one, zero = jnp.ones_like(tu), jnp.zeros_like(tu)
    return jnp.stack([jnp.stack([one, zero, tu], -1), jnp.stack([zero, one, tv], -1)], -2)


def recentred(x: jax.Array, offset: jax.Array) -> jax.Array:
    """Patterns ``(B, H, W)`` rolled by whole pixels so that a feature at ``centre + offset`` (``(B, 2)`` px) lands
    within half a pixel of the centre; no interpolation (pixels wrap around the frame edge)."""
    shift = -jnp.round(offset).astype(jnp.int32)
    return jax.vmap(lambda img, s: jnp.roll(img, (s[0], s[1]), axis=(0, 1)))(x, shift)


def encoder_ring(cfg: ModelConfig) -> np.ndarray:
    """``(H / d, W / d)`` bool: the prior ring on the fast encoder's down-sampled canonical grid (``d`` =
    ``encoder_downsample``; each coarse pixel at the full-resolution position of its centre)."""
    d = cfg.encoder_downsample
    h, w = cfg.pattern_shape
    cr, cc = cfg.center_px
    inner, outer = cfg.prior_radii
    rows = np.arange(h // d) * d + (d - 1) / 2
    cols = np.arange(w // d) * d + (d - 1) / 2
    r = np.hypot(rows[:, None] - cr, cols[None, :] - cc)
    return (r > inner) & (r <= outer)


def symmetrize(bases: jax.Array, cfg: ModelConfig, margin: int = 0, mode: str = "bilinear") -> jax.Array:
    """Average of each base over the ``cfg.symmetry`` rotations about the pattern centre, ``(K, H, W)`` (the pattern
    frame, or one extending it by ``margin`` pixels on every side), each rotation interpolated with ``mode``
    (`ccstae_jax.ops.warp.grid_sample`): ``"bilinear"`` smooths a sharp edge by about 0.4 px on average,
    ``"cubic"`` (Keys) does not."""
    n = cfg.symmetry
    angles = 2 * np.pi * np.arange(n) / n
    theta = about_center(affine.warp_matrix(rotation=jnp.asarray(angles, jnp.float32)), cfg, margin)  # (n, 2, 3)
    k = bases.shape[0]
    stacked = jnp.repeat(bases[:, None], n, axis=1).reshape(k * n, *bases.shape[1:])
    turned = warp.affine_warp(stacked[..., None], jnp.tile(theta, (k, 1, 1)), mode=mode)[..., 0]
    return turned.reshape(k, n, *bases.shape[1:]).mean(1)


# ----------------------------------------------------------------------------------------------- reference blocks
#: ``nn.Conv`` with the matmul kernel gradient on the CPU backend (`ccstae_jax.ops.conv`); same parameters and outputs.
_Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class _LayerNormHW(nn.Module):
    """LayerNorm per channel over (H, W) with (H, W)-shaped scale and bias, eps 1e-5 (the reference's)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(epsilon=1e-5, reduction_axes=(1, 2), feature_axes=(1, 2), dtype=self.dtype)(x)


class _ConvBlock(nn.Module):
    """conv→ReLU→conv→ReLU→conv→LayerNorm→ReLU, plus the input (Auto4DSTEM ``conv_block``)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = x
        for _ in range(2):
            y = nn.relu(_Conv(self.features, (3, 3), padding=1, dtype=self.dtype)(y))
        y = _Conv(self.features, (3, 3), padding=1, dtype=self.dtype)(y)
        y = nn.relu(_LayerNormHW(self.dtype)(y))
        return y + x


class _IdentityBlock(nn.Module):
    """conv→LayerNorm→ReLU, no residual (Auto4DSTEM ``identity_block``)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.relu(_LayerNormHW(self.dtype)(_Conv(self.features, (3, 3), padding=1, dtype=self.dtype)(x)))


class ReferenceEncoder(nn.Module):
    """Auto4DSTEM's encoder trunk: ``(B, H, W, 1)`` → features ``(B, reduced_size)``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = _Conv(cfg.conv_size, (3, 3), padding=1, dtype=dt)(x)
        for pool in cfg.pool_list:
            x = _ConvBlock(cfg.conv_size, dt)(x)
            x = _IdentityBlock(cfg.conv_size, dt)(x)
            x = nn.max_pool(x, (pool, pool), (pool, pool))
        x = _Conv(1, (3, 3), padding=1, dtype=dt)(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(cfg.reduced_size, dtype=dt)(x)


class ReferenceDecoder(nn.Module):
    """Auto4DSTEM's decoder: one-hot ``(K, num_bases)`` → base patterns ``(K, H, W)``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, code):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        start = cfg.pattern_shape[0] // math.prod(cfg.pool_list)
        x = nn.Dense(start * start, dtype=dt)(code).reshape(code.shape[0], start, start, 1)
        x = _Conv(cfg.conv_size, (3, 3), padding=1, dtype=dt)(x)
        x = _ConvBlock(cfg.conv_size, dt)(x)
        x = _IdentityBlock(cfg.conv_size, dt)(x)
        for up in reversed(cfg.pool_list):
            x = warp.upsample_bilinear_align_corners(x, up)
            x = _ConvBlock(cfg.conv_size, dt)(x)
            x = _IdentityBlock(cfg.conv_size, dt)(x)
        x = _Conv(1, (3, 3), padding=1, dtype=dt)(x)
        return nn.leaky_relu(x, 0.001)[..., 0].astype(jnp.float32)


# ----------------------------------------------------------------------------------------------- fast encoder
class FastEncoder(nn.Module):
    """A small strided CNN: ``(B, h, w, 1)`` canonical-orientation pattern → features ``(B, encoder_dense)``."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = nn.relu(_Conv(cfg.encoder_channels[0], (3, 3), padding=1, dtype=dt)(x))
        for ch in cfg.encoder_channels[1:]:
            x = nn.relu(_Conv(ch, (3, 3), strides=2, padding=1, dtype=dt)(x))
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(cfg.encoder_dense, dtype=dt)(x))


# ----------------------------------------------------------------------------------------------- CC-ST-AE
class CCSTAE(nn.Module):
    """Cycle-consistent spatial-transforming autoencoder.

    ``__call__(images)`` with images ``(B, H, W)`` (raw intensities; multiplied by ``cfg.intensity_scale`` inside)
    returns a dict:

    * ``theta`` ``(B, 2, 3)``: warp pulling the data onto the base (normalised frame, `ccstae_jax.ops.affine`);
    * ``warped_input`` ``(B, H, W)``: the input in the base frame, ``x(theta p)``;
    * ``base`` ``(B, H, W)``: the base chosen for each pattern; ``bases`` ``(num_bases, H, W)``: the dictionary;
    * ``reconstruction`` ``(B, H, W)``: the base warped back to the data frame, ``base(theta^{-1} p)``;
    * ``inputs`` ``(B, H, W)``: the scaled input; ``classes`` ``(B, num_bases)`` one-hot (straight-through);
    * ``scale_x``, ``scale_y``, ``shear``, ``rotation``, ``translation`` ``(B[, 2])``: the affine parameters
      (warp frame), with ``rotation`` the total angle (prior + residual) in radians.

    With ``interpolate`` (reference preset) the images compared are the ``up_size`` bicubic up-samplings.
    """

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        if cfg.preset == "reference":
            self.encoder = ReferenceEncoder(cfg)
            self.decoder = ReferenceDecoder(cfg)
        else:
            self.encoder = FastEncoder(cfg)
            h, w = cfg.pattern_shape
            self.bases = self.param("bases", nn.initializers.zeros, (cfg.num_bases, h, w), jnp.float32)
        self.class_dense = nn.Dense(cfg.num_bases)
        self.class_norm = nn.LayerNorm(epsilon=1e-5)
        n_out = 4 + (2 if cfg.translation else 0) + 1  # scale x/y, rotation, shear, [translation], and an unused
        # "mask intensity" output kept so the parameter count matches auto4dstem's
        self.affine_dense = nn.Dense(n_out, kernel_init=nn.initializers.zeros)
        if cfg.rotation_mode == "prior":
            self.prior_weights = jnp.asarray(harmonic_weights(cfg))

    def dictionary(self) -> jax.Array:
        """The learned bases ``(num_bases, H, W)`` (the reference decoder is run once per base)."""
        if self.cfg.preset == "reference":
            bases = self.decoder(jnp.eye(self.cfg.num_bases, dtype=jnp.float32))
        else:
            bases = self.bases
        return symmetrize(bases, self.cfg) if self.cfg.symmetrize_bases else bases

    def encode(self, images: jax.Array) -> dict[str, jax.Array]:
        """The encoder alone: each pattern's warp and base, without warping anything.

        Each pattern's zero beam is measured (`ccstae_jax.model.geometry.zero_beam`); in the fast preset the prior warp
        moves it onto the base's centre (descan) and turns the lattice to its canonical orientation
        (`harmonic_rotation`, computed on the pattern shifted by whole pixels onto the centre); the encoder reads the
        residual affine from the canonical pattern.

        Returns a dict: ``inputs`` ``(B, H, W)`` (the scaled patterns), ``zero_beam`` ``(B, 2)`` (row, col px),
        ``theta`` ``(B, 2, 3)``, ``classes`` ``(B, num_bases)`` one-hot, ``scale_x``, ``scale_y``, ``shear``,
        ``rotation`` (prior + residual, radians), ``translation`` ``(B, 2)``.
        """
        cfg = self.cfg
        x = images.astype(jnp.float32) * cfg.intensity_scale
        b, h, w = x.shape
        beam = zero_beam(x)
        if cfg.preset == "fast":
            offset = beam - jnp.asarray(cfg.center_px, jnp.float32)  # (B, 2) rows, cols
        else:  # the reference network sees the patterns as they are
            offset = jnp.zeros_like(beam)
        if cfg.rotation_mode == "prior":
            rot0 = harmonic_rotation(recentred(x, offset), self.prior_weights, cfg.symmetry)
        else:
            rot0 = jnp.zeros((b,), jnp.float32)
        pre = affine.compose(shift_warp(offset, cfg), about_center(affine.warp_matrix(rotation=rot0), cfg))
        if cfg.preset == "fast":
            # The encoder sees only the spot ring: the central beam is ~1000x brighter than the spots and would
            # drown their (sub-pixel) displacements in its activations.
            d = cfg.encoder_downsample
            enc_in = warp.affine_warp(x[..., None], pre, out_size=(h // d, w // d))
            enc_in = enc_in * jnp.asarray(encoder_ring(cfg), jnp.float32)[None, ..., None]
        else:
            enc_in = x[..., None]
        feats = self.encoder(enc_in.astype(cfg.compute_dtype)).astype(jnp.float32)

        scores = jax.nn.softmax(self.class_norm(self.class_dense(feats)))
        classes = k_sparse(scores, 1)
        o = self.affine_dense(jnp.concatenate([feats, classes], -1)).astype(jnp.float32)

        scale_x = 1.0 + cfg.scale_limit * jnp.tanh(o[:, 0])
        scale_y = 1.0 + cfg.scale_limit * jnp.tanh(o[:, 1])
        if cfg.rotation_mode == "relu":
            rot = nn.relu(o[:, 2])
        else:
            rot = cfg.rotation_limit * jnp.tanh(o[:, 2])
        shear = cfg.shear_limit * jnp.tanh(o[:, 3])
        if cfg.translation:
            trans = cfg.translation_limit * jnp.tanh(o[:, 4:6])
        else:
            trans = jnp.zeros((b, 2), jnp.float32)
        theta_enc = about_center(affine.warp_matrix(scale_x, scale_y, shear, rot, trans), cfg)
        return {
            "inputs": x,
            "zero_beam": beam,
            "theta": affine.compose(pre, theta_enc),
            "classes": classes,
            "scale_x": scale_x,
            "scale_y": scale_y,
            "shear": shear,
            "rotation": rot0 + rot,
            "translation": trans,
        }

    def __call__(self, images: jax.Array, points: np.ndarray | None = None) -> dict[str, jax.Array]:
        cfg = self.cfg
        enc = self.encode(images)
        x, theta, classes = enc["inputs"], enc["theta"], enc["classes"]
        bases = self.dictionary()
        base = jnp.einsum("bk,khw->bhw", classes, bases, precision=jax.lax.Precision.HIGHEST)
        data_img, base_img = x, base
        if cfg.interpolate:
            size = (cfg.up_size, cfg.up_size)
            data_img = warp.resize_bicubic(x[..., None], size)[..., 0]
            base_img = warp.resize_bicubic(base[..., None], size)[..., 0]
        if points is None:
            warped = warp.affine_warp(data_img[..., None], theta, mode=cfg.warp_mode)[..., 0]
            recon = warp.affine_warp(base_img[..., None], affine.invert(theta), mode=cfg.warp_mode)[..., 0]
        else:  # only at the given pixels (training: the spot ring), (B, N)
            warped = sample_at_points(data_img, theta, points, mode=cfg.warp_mode)
            recon = sample_at_points(base_img, affine.invert(theta), points, mode=cfg.warp_mode)
            rows, cols = points[:, 0], points[:, 1]
            base_img, data_img = base_img[:, rows, cols], data_img[:, rows, cols]
        return {
            **enc,
            "warped_input": warped,
            "base": base_img,
            "bases": bases,
            "reconstruction": recon,
            "inputs": data_img,
        }


def sample_at_points(images: jax.Array, theta: jax.Array, points: np.ndarray, *, mode: str = "bilinear") -> jax.Array:
    """Warped images evaluated only at output pixels ``points``: ``images(theta p)`` for each ``p``.

    Args:
      images: ``(B, H, W)``.
      theta: ``(B, 2, 3)`` warps (normalised frame, align_corners=False).
      points: ``(N, 2)`` integer pixel ``(row, col)`` positions of the output grid (static).

    Returns:
      ``(B, N)``, equal to ``affine_warp(images[..., None], theta)[:, rows, cols, 0]`` at a fraction of the cost.
    """
    h, w = images.shape[-2:]
    u = jnp.asarray(affine.pixel_centre(points[:, 1], w), jnp.float32)
    v = jnp.asarray(affine.pixel_centre(points[:, 0], h), jnp.float32)
    t = theta.astype(jnp.float32)[:, :, :, None]
    gx = t[:, 0, 0] * u + t[:, 0, 1] * v + t[:, 0, 2]  # elementwise, as affine_grid
    gy = t[:, 1, 0] * u + t[:, 1, 1] * v + t[:, 1, 2]
    grid = jnp.stack([gx, gy], -1)[:, None]  # (B, 1, N, 2)
    return warp.grid_sample(images[..., None], grid, mode=mode)[:, 0, :, 0]


def count_params(params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
