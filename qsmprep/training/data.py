"""Seeded synthetic training data for the neural QSM stages (numpy float32; torch conversion in train).

Recipes, all on patches of ``patch`` voxels per edge:

* :func:`deepqsm_shapes_sample` -- DeepQSM (Bollmann S et al., NeuroImage 2019;195:373): random
  overlapping cubes, spheres, ellipsoids and cylinders with random susceptibility, plus the QSMnet+
  range augmentation (Jung W et al., NeuroImage 2020;211:116619: positive chi scaled by
  ``lambda in [1, 4]``, random sign inversion). Field = dipole convolution on a 2x zero-padded grid,
  cropped (no circular wrap), axial B0.
* :func:`hybrid_brain_sample` -- NeXtQSM-style "hybrid brains" (Cognolato F et al., Med Image Anal
  2023;84:102700): labels of the simulator's head phantom (training seeds 0..9 only; 100..199 are the
  held-out evaluation seeds) with per-label random chi drawn around literature values, a random
  affine (rotation +-15 deg, scale +-10 %) and a smooth elastic deformation, random lesions
  (-1.4..1.4 ppm, QSMnet+), random crop overlapping the brain. Local field of ``chi * mask`` on a
  padded grid; background field = the phantom's precomputed full-head background field (air, bone,
  tissue outside the brain; air +9.4 ppm; 2nd-order shim removed in the brain), resampled with the
  rigid part of the same transform (rotation, isotropic scale: a harmonic field stays harmonic; the
  anisotropic scaling and elastic deformation of the labels would make it non-harmonic, i.e. not a
  background field any method could remove), and so is the brain mask (only voxels whose whole trilinear
  stencil lies in the phantom's brain, where the interpolated background is harmonic; deformed labels inside
  it, those outside the brain set to CSF, so no background source lies in the mask), randomly scaled, plus random external
  ellipsoid sources outside the brain and a random low-order harmonic (shim residual) term.
  Optional random B0 direction (tilt up to ``max_tilt_deg``) and voxel size.
* :func:`background_prior_sample` -- for the prior-guided background net: a hybrid brain on a larger
  context box (V-SHARP) or a whole-brain box on a coarse grid (PDF), the prior on the whole box, the
  central patch as [prior local field, total field, prior mask] with the true local field as target.

All returned arrays are float32 (masks float32 0/1); fields and chi in ppm, ``b0_dir`` unit vector in
the voxel frame, ``voxel_size_mm`` float32 3-vector.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep.qsm.geometry import forward_field_ppm, rotation_matrix

#: Head-phantom seeds used for training; 100..199 are reserved for held-out evaluation.
TRAIN_PHANTOM_SEEDS = tuple(range(10))
#: Seeds reserved for evaluation; the generators refuse them.
HELD_OUT_SEEDS = range(100, 200)

#: Sample kinds understood by :func:`make_batch` / :func:`validation_set`.
KINDS = ("deepqsm", "nextqsm-bg", "nextqsm-varnet")

#: Per-label (mean, spread) of chi (ppm, relative to CSF) for hybrid brains; spread = 1 sd of the
#: Gaussian around the literature value (Deistung 2013, Lim 2013, Li 2014; see simulate.phantom).
HYBRID_CHI_PPM = {
    "caudate": (0.06, 0.04),
    "globus_pallidus": (0.17, 0.08),
    "putamen": (0.05, 0.04),
    "red_nucleus": (0.12, 0.06),
    "dentate_nucleus": (0.10, 0.06),
    "substantia_nigra": (0.14, 0.07),
    "thalamus": (0.03, 0.03),
    "white_matter": (-0.03, 0.02),
    "grey_matter": (0.02, 0.02),
    "csf": (0.0, 0.01),
    "venous_blood": (0.38, 0.12),
}
#: Probability that a label takes a value from the wide component of the mixture (uniform +-0.3 ppm).
WIDE_PROB = 0.15


def _check_patch(patch: int) -> int:
    p = int(patch)
    if p != patch or p < 8:
        raise ValueError(f"patch must be an integer >= 8, got {patch}")
    return p


def _padded_field(chi: np.ndarray, voxel_size_mm, b0_dir) -> np.ndarray:
    """Dipole field (ppm) of ``chi`` on a >= 2x zero-padded grid, cropped back (no circular wrap)."""
    pad = [max(n // 2, 4) for n in chi.shape]
    return forward_field_ppm(chi, voxel_size_mm, b0_dir, pad)


def random_b0_dir(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    """Unit vector tilted from z by an angle with cos uniform in [cos(max_tilt), 1], random azimuth."""
    if max_tilt_deg <= 0:
        return np.array([0.0, 0.0, 1.0], np.float32)
    c = rng.uniform(np.cos(np.radians(max_tilt_deg)), 1.0)
    s = np.sqrt(max(1.0 - c * c, 0.0))
    phi = rng.uniform(0.0, 2 * np.pi)
    b = np.array([s * np.cos(phi), s * np.sin(phi), c])
    return (b / np.linalg.norm(b)).astype(np.float32)


def qsmnet_plus_augment(
    chi: np.ndarray, rng: np.random.Generator, prob: float = 0.5, lam: tuple[float, float] = (1.0, 4.0)
) -> np.ndarray:
    """QSMnet+ range augmentation (Jung 2020): with probability ``prob`` scale positive chi by
    ``lambda ~ U(lam)``; then invert the sign with probability 0.5. Returns a new float32 array."""
    out = chi.astype(np.float32, copy=True)
    if rng.random() < prob:
        pos = out > 0
        out[pos] *= np.float32(rng.uniform(*lam))
    if rng.random() < 0.5:
        np.negative(out, out=out)
    return out


def _add_noise(field: np.ndarray, mask: np.ndarray, rng, snr_range, noiseless_prob: float = 0.2) -> tuple[np.ndarray, float]:
    """Gaussian noise of sigma = rms(field in mask) / snr, snr log-uniform in ``snr_range``; a fraction
    ``noiseless_prob`` (default 20 %) noiseless."""
    if snr_range is None or rng.random() < noiseless_prob:
        return field, 0.0
    lo, hi = snr_range
    snr = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    m = mask > 0
    rms = float(np.sqrt(np.mean(field[m] ** 2))) if m.any() else float(np.sqrt(np.mean(field**2)))
    sigma = rms / snr
    noisy = field + rng.standard_normal(field.shape, dtype=np.float32) * np.float32(sigma)
    return noisy.astype(np.float32, copy=False), sigma


# ---------------------------------------------------------------------------------------------------
# DeepQSM shapes


def _random_blob_mask(rng, shape) -> np.ndarray:
    """Smooth random blob (thresholded low-pass noise, largest component) covering ~40-90 % of the patch."""
    n = rng.standard_normal(tuple(max(s // 8, 2) for s in shape)).astype(np.float32)
    n = ndi.zoom(n, [s / m for s, m in zip(shape, n.shape)], order=3, mode="reflect")[: shape[0], : shape[1], : shape[2]]
    c = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    r2 = c[0][:, None, None] ** 2 + c[1][None, :, None] ** 2 + c[2][None, None, :] ** 2
    score = n * 0.35 - r2
    thr = np.quantile(score, 1.0 - rng.uniform(0.4, 0.9))
    m = score > thr
    lab, k = ndi.label(m)
    if k > 1:
        sizes = np.bincount(lab.ravel())[1:]
        m = lab == (1 + int(np.argmax(sizes)))
    return m.astype(np.float32)


def deepqsm_shapes_sample(
    rng: np.random.Generator,
    patch: int = 48,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    n_shapes: tuple[int, int] = (20, 60),
    chi_range_ppm: tuple[float, float] = (0.2, 0.4),
    large_prob: float = 0.1,
    augment_prob: float = 0.5,
    blob_mask_prob: float = 0.3,
    snr_range: tuple[float, float] | None = (10.0, 100.0),
) -> dict[str, np.ndarray]:
    """One DeepQSM training patch (Bollmann 2019): random shapes + QSMnet+ augmentation.

    Each sample draws a range ``r ~ U(chi_range_ppm)``; every shape (cube, sphere, ellipsoid or
    cylinder along a random axis, overlapping, added) gets chi ~ U(-r, r), a fraction ``large_prob``
    of them U(-1, 1) ppm. Then :func:`qsmnet_plus_augment`. ``field_ppm`` is the noisy local field
    (axial B0, 2x zero padding, cropped), ``field_clean_ppm`` the noiseless one, ``mask`` all ones or
    (``blob_mask_prob``) a random blob; chi and fields are zero outside the mask.
    Returns ``{"field_ppm", "field_clean_ppm", "chi_ppm", "mask", "b0_dir", "voxel_size_mm"}``.
    """
    p = _check_patch(patch)
    vs = np.asarray(voxel_size_mm, dtype=np.float32).reshape(-1)
    shape = (p, p, p)
    chi = np.zeros(shape, np.float32)
    ax = np.arange(p, dtype=np.float32)
    x, y, z = ax[:, None, None], ax[None, :, None], ax[None, None, :]
    r = rng.uniform(*chi_range_ppm)
    for _ in range(int(rng.integers(n_shapes[0], n_shapes[1] + 1))):
        val = rng.uniform(-1.0, 1.0) if rng.random() < large_prob else rng.uniform(-r, r)
        c = rng.uniform(0, p, 3).astype(np.float32)
        kind = int(rng.integers(4))
        size = rng.uniform(0.03, 0.18, 3) * p + 1.0
        if kind == 0:  # cube (axis aligned box with random edges)
            sl = tuple(slice(int(max(ci - si, 0)), int(min(ci + si, p)) + 1) for ci, si in zip(c, size))
            chi[sl] += np.float32(val)
            continue
        if kind == 1:  # sphere
            size[:] = size[0]
        if kind in (0, 1, 2):
            lo = np.maximum(np.floor(c - size), 0).astype(int)
            hi = np.minimum(np.ceil(c + size) + 1, p).astype(int)
        if kind == 3:  # cylinder along a random axis
            axis = int(rng.integers(3))
            size[axis] = rng.uniform(0.2, 0.5) * p
            lo = np.maximum(np.floor(c - size), 0).astype(int)
            hi = np.minimum(np.ceil(c + size) + 1, p).astype(int)
        if np.any(hi <= lo):
            continue
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        d = [(g - ci) / si for g, ci, si in zip((x[sl[0]], y[:, sl[1]], z[:, :, sl[2]]), c, size)]
        if kind == 3:
            others = [d[i] for i in range(3) if i != axis]
            inside = (others[0] ** 2 + others[1] ** 2 <= 1.0) & (np.abs(d[axis]) <= 1.0)
        else:
            inside = d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= 1.0
        chi[sl] += np.where(inside, np.float32(val), np.float32(0.0))
    chi = qsmnet_plus_augment(chi, rng, prob=augment_prob)
    mask = _random_blob_mask(rng, shape) if rng.random() < blob_mask_prob else np.ones(shape, np.float32)
    chi *= mask
    b0 = np.array([0.0, 0.0, 1.0], np.float32)
    clean = _padded_field(chi, vs, b0) * mask
    noisy, _ = _add_noise(clean, mask, rng, snr_range)
    return {
        "field_ppm": (noisy * mask).astype(np.float32),
        "field_clean_ppm": clean.astype(np.float32),
        "chi_ppm": chi,
        "mask": mask,
        "b0_dir": b0,
        "voxel_size_mm": vs.astype(np.float32),
    }


# ---------------------------------------------------------------------------------------------------
# hybrid brains


class HeadSource:
    """A cached head phantom prepared for hybrid-brain sampling (labels, mask, background field).

    ``background_field_ppm`` (axial B0, full grid): field of every source outside the brain mask
    (``chi - chi_ambient`` outside, ``-chi_ambient`` inside, i.e. total minus local field as in
    :func:`qsmprep.simulate.simulate_gre`), zero padded 64 mm, with a 2nd-order harmonic shim fitted
    in the brain removed.
    """

    def __init__(self, downsample: int, seed: int):
        if int(seed) in HELD_OUT_SEEDS:
            raise ValueError(f"phantom seed {seed} is reserved for held-out evaluation (100..199); use 0..9")
        from qsmprep.simulate import make_head_phantom

        ph = make_head_phantom(downsample=int(downsample), seed=int(seed))
        self.voxel_size_mm = np.asarray(ph.voxel_size_mm, dtype=np.float64)
        self.labels = np.ascontiguousarray(ph.labels.astype(np.int16))
        self.brain_mask = np.ascontiguousarray(ph.brain_mask.astype(np.uint8))
        self.brain_mask_f32 = self.brain_mask.astype(np.float32)  # for the trilinear stencil test of local samples
        self.label_names = dict(ph.label_names)
        self.n_labels = int(self.labels.max()) + 1
        # for the background field, computed on first use (dipole inversion never needs it)
        self._chi, self._chi_ambient = ph.chi_ppm, float(ph.chi_ambient_ppm)
        self.brain_index = np.argwhere(ph.brain_mask).astype(np.int32)
        # nominal chi table per label (brain labels get the Gaussian mixture, others nominal)
        self.nominal = np.zeros(self.n_labels, np.float32)
        for lab, v in ph.label_chi_ppm.items():
            if lab < self.n_labels:
                self.nominal[lab] = v

    @functools.cached_property
    def background_field_ppm(self) -> np.ndarray:
        """The head's background field (see the class docstring), computed on first access."""
        brain = self.brain_mask.astype(bool)
        src = self._chi - np.float32(self._chi_ambient)
        src[brain] = np.float32(-self._chi_ambient)
        pad = [int(np.ceil(64.0 / v)) for v in self.voxel_size_mm]
        bg = forward_field_ppm(src, self.voxel_size_mm, (0.0, 0.0, 1.0), pad)
        del src
        bg -= _harmonic_fit(bg, brain, self.voxel_size_mm)
        self._chi = None
        return np.ascontiguousarray(bg.astype(np.float32))


def _harmonic_basis(coords):
    x, y, z = coords
    one = np.ones_like(x)
    return [one, x, y, z, x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]


def _harmonic_fit(field: np.ndarray, mask: np.ndarray, vs) -> np.ndarray:
    """Least-squares 2nd-order solid-harmonic fit of ``field`` in ``mask`` (every 2nd voxel), full grid."""
    idx = np.argwhere(mask)[::8].astype(np.float64)
    centre = idx.mean(axis=0)
    scale = 100.0
    pts = [(idx[:, i] - centre[i]) * vs[i] / scale for i in range(3)]
    a = np.stack(_harmonic_basis(pts), axis=1)
    coef, *_ = np.linalg.lstsq(a, field[tuple(idx.astype(int).T)].astype(np.float64), rcond=None)
    grids = [((np.arange(n) - centre[i]) * vs[i] / scale).astype(np.float32).reshape([-1 if j == i else 1 for j in range(3)])
             for i, n in enumerate(field.shape)]
    fit = np.zeros(field.shape, np.float32)
    for c, b in zip(coef, _harmonic_basis(grids)):
        fit += np.float32(c) * b
    return fit


def tissue_texture(
    rng: np.random.Generator, shape, voxel_size_mm, scales_mm: Sequence[float] = (1.5, 3.0, 6.0, 12.0)
) -> np.ndarray:
    """Multi-scale smooth random field (float32, zero mean, unit variance over the volume).

    White noise filtered (one FFT pair, periodic) by ``H = sum_k sqrt(w_k) G_k / ||G_k||``, with ``G_k`` a
    Gaussian of ``scales_mm[k]`` mm (standard deviation; anisotropic voxels respected) and weights
    ``w ~ Dirichlet(1, ..., 1)``: each correlation length contributes about a fraction ``w_k`` of the variance,
    so fine and coarse variation mix in a random proportion per sample. Hybrid brains multiply it by a
    per-label amplitude (texture inside tissue classes, as :func:`qsmprep.simulate.phantom.texture_phantom`
    adds to the evaluation heads).
    """
    scales = [float(v) for v in scales_mm]
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales_mm must be positive lengths, got {scales_mm}")
    shape = tuple(int(n) for n in shape)
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    w = rng.dirichlet(np.ones(len(scales)))
    noise = rng.standard_normal(shape, dtype=np.float32)
    # squared spatial frequency (cycles/mm)^2 in the rfft layout
    k = [np.fft.fftfreq(n, d=v) for n, v in zip(shape[:2], vs[:2])] + [np.fft.rfftfreq(shape[2], d=vs[2])]
    k2 = (k[0][:, None, None] ** 2 + k[1][None, :, None] ** 2 + k[2][None, None, :] ** 2)
    h = np.zeros(k2.shape, np.float64)
    for wk, sc in zip(w, scales):
        g = np.exp(-2.0 * (np.pi * sc) ** 2 * k2)  # Fourier transform of a Gaussian of sd ``sc`` mm
        h += np.sqrt(wk) * g / max(float(np.sqrt(np.mean(g * g))), 1e-12)
    out = np.fft.irfftn(np.fft.rfftn(noise) * h, s=shape, axes=(0, 1, 2)).astype(np.float32)
    out -= np.float32(out.mean())
    out /= np.float32(max(float(out.std()), 1e-12))
    return out


@functools.lru_cache(maxsize=10)
def head_source(downsample: int = 1, seed: int = 0) -> HeadSource:
    """Per-process cache of :class:`HeadSource` (a few seconds to build at 1 mm)."""
    return HeadSource(downsample, seed)


def _sample_coords(rng, src: HeadSource, patch: int, vs_out, max_rot_deg, scale_pct, elastic_mm, rigid: bool = False,
                   centre_jitter_mm: float | None = None):
    """Phantom index coordinates (3, p, p, p) for a randomly transformed, deformed patch.

    The patch is centred on a random brain voxel, or with ``centre_jitter_mm`` on the brain's centroid
    plus a uniform jitter of up to that many mm per axis (whole-brain boxes).

    ``rigid``: also return the coordinates of the same rotation and centre with the isotropic (geometric
    mean) scale and no elastic deformation: a harmonic field resampled through them stays harmonic, which
    an anisotropic scaling or an elastic deformation would break (same random draws either way)."""
    p = patch
    vs_in = src.voxel_size_mm
    # centre: a random brain voxel, jittered so the patch may overhang the brain edge
    if centre_jitter_mm is None:
        c = src.brain_index[int(rng.integers(len(src.brain_index)))].astype(np.float64)
    else:
        c = src.brain_index.mean(axis=0) + rng.uniform(-1.0, 1.0, 3) * float(centre_jitter_mm) / vs_in
    rot = np.eye(3)
    if max_rot_deg > 0:
        ax = rng.standard_normal(3)
        rot = rotation_matrix(ax / np.linalg.norm(ax), rng.uniform(-max_rot_deg, max_rot_deg))
    s = 1.0 + rng.uniform(-scale_pct, scale_pct, 3) / 100.0
    # patch voxel offsets (mm) -> phantom mm -> phantom index
    m = (rot * s[None, :]) * np.asarray(vs_out, dtype=np.float64)[None, :]
    m = m / vs_in[:, None]
    g = (np.arange(p, dtype=np.float32) - (p - 1) / 2.0)

    def grid(mat):
        out = np.empty((3, p, p, p), np.float32)
        for i in range(3):
            out[i] = (mat[i, 0] * g[:, None, None] + mat[i, 1] * g[None, :, None] + mat[i, 2] * g[None, None, :] + c[i])
        return out

    coords = grid(m)
    if elastic_mm > 0:
        n_ctrl = 5
        for i in range(3):
            d = rng.standard_normal((n_ctrl,) * 3).astype(np.float32) * np.float32(elastic_mm / vs_in[i])
            coords[i] += ndi.zoom(d, p / n_ctrl, order=3, mode="nearest")[:p, :p, :p]
    if not rigid:
        return coords
    iso = float(np.prod(s)) ** (1.0 / 3.0)
    return coords, grid(rot * iso * np.asarray(vs_out, dtype=np.float64)[None, :] / vs_in[:, None])


def hybrid_brain_sample(
    rng: np.random.Generator,
    patch: int = 48,
    source: HeadSource | None = None,
    phantom_downsample: int = 1,
    phantom_seeds: Sequence[int] = (0,),
    target: str = "chi",
    voxel_sizes_mm: Sequence[Sequence[float]] = ((1.0, 1.0, 1.0),),
    max_tilt_deg: float = 0.0,
    max_rot_deg: float = 15.0,
    scale_pct: float = 10.0,
    elastic_mm: float = 2.0,
    n_lesions: tuple[int, int] = (0, 3),
    augment_prob: float = 0.3,
    n_external: tuple[int, int] = (0, 3),
    bg_scale: tuple[float, float] = (0.5, 1.5),
    snr_range: tuple[float, float] | None = (10.0, 100.0),
    min_mask_fraction: float = 0.15,
    local_voxel_mm: float = 1.0,
    centre_jitter_mm: float | None = None,
    chi_spread: float = 1.0,
    wide_prob: float = WIDE_PROB,
    wide_range_ppm: tuple[float, float] = (-0.3, 0.3),
    texture_rel: tuple[float, float] | None = None,
    texture_scales_mm: Sequence[float] = (1.5, 3.0, 6.0, 12.0),
    texture_floor_ppm: float = 0.05,
    noiseless_prob: float = 0.2,
) -> dict[str, np.ndarray]:
    """One NeXtQSM-style hybrid-brain patch (see the module docstring for the recipe).

    ``source``: a :class:`HeadSource` (default: :func:`head_source` of a seed drawn from
    ``phantom_seeds``, which must avoid 100..199). ``target="chi"`` (dipole inversion: also random
    B0 tilt up to ``max_tilt_deg`` and voxel size from ``voxel_sizes_mm``) or ``"local"`` (background
    removal: axial B0, and a total field is made). Returns float32 ``chi_ppm``, ``mask``,
    ``local_field_ppm`` (noisy for ``"chi"``, clean for ``"local"``; zero outside the mask),
    ``local_field_clean_ppm``, ``b0_dir``, ``voxel_size_mm``, ``labels`` (int16 phantom label of each voxel,
    deformed; :attr:`HeadSource.label_names`) and for ``"local"`` also
    ``total_field_ppm`` (noisy, masked) and ``background_field_ppm`` (masked). ``local_voxel_mm``: the
    isotropic voxel size of ``"local"`` patches (e.g. 2 mm whole-brain boxes from a ``phantom_downsample=2``
    phantom); ``centre_jitter_mm``: see :func:`_sample_coords`.

    Per-label chi of brain labels: with probability ``wide_prob`` uniform in ``wide_range_ppm``, otherwise
    ``N(literature value, chi_spread * spread)`` (:data:`HYBRID_CHI_PPM`). ``texture_rel = (lo, hi)`` adds
    texture inside tissue classes: :func:`tissue_texture` (correlation lengths ``texture_scales_mm``) times a
    per-label amplitude ``U(lo, hi) * (|chi_label - chi_white_matter| + texture_floor_ppm)`` (a fraction of
    the label's contrast; the floor gives white and grey matter some too). ``noiseless_prob``: the fraction of
    ``"chi"`` samples without noise. The defaults draw exactly what earlier releases drew (no texture).
    """
    p = _check_patch(patch)
    if target not in ("chi", "local"):
        raise ValueError(f"target must be 'chi' or 'local', got {target!r}")
    if source is None:
        seed = int(phantom_seeds[int(rng.integers(len(phantom_seeds)))])
        source = head_source(int(phantom_downsample), seed)
    vs = np.asarray(voxel_sizes_mm[int(rng.integers(len(voxel_sizes_mm)))], dtype=np.float64) if target == "chi" \
        else np.full(3, float(local_voxel_mm))
    b0 = random_b0_dir(rng, max_tilt_deg) if target == "chi" else np.array([0.0, 0.0, 1.0], np.float32)
    for _ in range(20):
        coords = _sample_coords(rng, source, p, vs, max_rot_deg, scale_pct, elastic_mm, rigid=target == "local",
                                centre_jitter_mm=centre_jitter_mm)
        if target == "local":  # mask and background from the rigid transform: the background stays harmonic in it
            coords, coords_bg = coords
            # voxels whose whole trilinear stencil lies in the phantom's brain: the background field, interpolated
            # below, is harmonic there; nearest-neighbour mask voxels at the rim would pick up the field next to
            # the skull's sources (non-harmonic, a leak no background removal can remove)
            mask = (ndi.map_coordinates(source.brain_mask_f32, coords_bg, order=1, mode="constant",
                                        cval=0.0) > np.float32(0.999)).astype(np.float32)
        else:
            mask = ndi.map_coordinates(source.brain_mask, coords, order=0, mode="constant", cval=0).astype(np.float32)
        if mask.mean() >= min_mask_fraction:
            break
    labels = ndi.map_coordinates(source.labels, coords, order=0, mode="constant", cval=0)
    # per-label chi: Gaussian around the literature value, sometimes a wide uniform component
    table = source.nominal.copy()
    brain_labs = [lab for lab, name in source.label_names.items() if name in HYBRID_CHI_PPM and lab < len(table)]
    for lab in brain_labs:
        mu, sd = HYBRID_CHI_PPM[source.label_names[lab]]
        table[lab] = (rng.uniform(*wide_range_ppm) if rng.random() < wide_prob
                      else mu + float(chi_spread) * sd * rng.standard_normal())
    if target == "local":  # deformed labels in the rigid mask: labels outside the brain (bone, air) become CSF
        brain_labels = np.zeros(len(table), bool)
        brain_labels[brain_labs] = True
        table = np.where(brain_labels, table, np.float32(HYBRID_CHI_PPM["csf"][0])).astype(np.float32)
    chi = table[labels].astype(np.float32)
    if texture_rel is not None:  # texture inside tissue classes, a fraction of each label's contrast
        wm = [lab for lab in brain_labs if source.label_names[lab] == "white_matter"]
        ref = float(table[wm[0]]) if wm else float(np.median(table[brain_labs]))
        amp = np.zeros(len(table), np.float32)
        for lab in brain_labs:
            amp[lab] = rng.uniform(*texture_rel) * (abs(float(table[lab]) - ref) + float(texture_floor_ppm))
        chi += amp[labels] * tissue_texture(rng, chi.shape, vs, texture_scales_mm)
    # partial volume + smooth texture (+-0.01 ppm scale)
    chi = ndi.gaussian_filter(chi, 0.6, mode="nearest")
    tex = ndi.zoom(rng.standard_normal((4, 4, 4)).astype(np.float32), p / 4, order=3)[:p, :p, :p]
    chi += np.float32(rng.uniform(0.0, 0.015)) * tex
    # lesions (QSMnet+): spheres with chi in [-1.4, 1.4] ppm
    ax = np.arange(p, dtype=np.float32)
    for _ in range(int(rng.integers(n_lesions[0], n_lesions[1] + 1))):
        c = rng.uniform(0.15 * p, 0.85 * p, 3)
        r = rng.uniform(1.5, 0.08 * p + 2.0) / vs
        d2 = sum(((ax.reshape([-1 if j == i else 1 for j in range(3)]) - c[i]) / r[i]) ** 2 for i in range(3))
        chi = np.where(d2 <= 1.0, np.float32(rng.uniform(-1.4, 1.4)), chi)
    chi_local = qsmnet_plus_augment(chi * mask, rng, prob=augment_prob) if target == "chi" else chi * mask
    chi_local = chi_local.astype(np.float32)
    local = _padded_field(chi_local, vs, b0) * mask
    out = {
        "chi_ppm": chi_local,
        "mask": mask,
        "b0_dir": np.asarray(b0, np.float32),
        "voxel_size_mm": vs.astype(np.float32),
        "local_field_clean_ppm": local.astype(np.float32),
        "labels": labels.astype(np.int16, copy=False),
    }
    del labels
    if target == "chi":
        noisy, _ = _add_noise(local, mask, rng, snr_range, noiseless_prob)
        out["local_field_ppm"] = (noisy * mask).astype(np.float32)
        return out
    # background: resampled head background field, scaled, + external sources + harmonic residual
    bg = ndi.map_coordinates(source.background_field_ppm, coords_bg, order=1, mode="nearest")
    bg *= np.float32(rng.uniform(*bg_scale))
    ext = np.zeros((p, p, p), np.float32)
    outside = mask < 0.5
    if outside.any():
        for _ in range(int(rng.integers(n_external[0], n_external[1] + 1))):
            c = rng.uniform(0, p, 3)
            r = rng.uniform(2.0, 0.15 * p + 2.0, 3)
            d2 = sum(((ax.reshape([-1 if j == i else 1 for j in range(3)]) - c[i]) / r[i]) ** 2 for i in range(3))
            ext += np.where((d2 <= 1.0) & outside, np.float32(rng.choice([-1, 1]) * rng.uniform(0.5, 9.4)), np.float32(0))
    if np.any(ext):
        bg += _padded_field(ext, vs, b0)
    g = [((ax - (p - 1) / 2.0) / p).reshape([-1 if j == i else 1 for j in range(3)]) for i in range(3)]
    coef = rng.standard_normal(9).astype(np.float32) * np.float32(0.05)
    for cc, bf in zip(coef[1:], _harmonic_basis(g)[1:]):
        bg += cc * bf
    bg -= np.float32(np.mean(bg[mask > 0]))  # centre frequency adjustment in the mask
    total = local + bg
    noisy, _ = _add_noise(total, mask, rng, None if snr_range is None else (snr_range[0] * 10, snr_range[1] * 10))
    out["total_field_ppm"] = (noisy * mask).astype(np.float32)
    out["background_field_ppm"] = (bg * mask).astype(np.float32)
    out["local_field_ppm"] = out["local_field_clean_ppm"]
    return out


# ---------------------------------------------------------------------------------------------------
# background removal with a classical prior

#: Classical background removals a prior-guided background network can be trained on.
BG_PRIORS = ("vsharp", "pdf")


def bg_prior(total_field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm, prior: str = "vsharp"):
    """The classical local-field estimate a prior-guided background net corrects: (local ppm, its mask).

    ``"vsharp"``: :func:`qsmprep.qsm.bgremove.vsharp` with its defaults (12 mm down to 2 voxels);
    ``"pdf"``: :func:`qsmprep.qsm.bgremove.pdf` with its defaults (whole mask). The same registry call as at
    inference (:func:`qsmprep.nn.inference.bg_prior_stack`). Returns float32 (local field, mask 0/1).
    """
    if prior not in BG_PRIORS:
        raise ValueError(f"prior must be one of {', '.join(BG_PRIORS)}, got {prior!r}")
    from qsmprep.qsm.registry import BGREMOVE

    local, m = BGREMOVE.get(prior)(total_field_ppm, np.asarray(mask) > 0.5, voxel_size_mm)
    return np.where(m, local, np.float32(0.0)).astype(np.float32), m.astype(np.float32)


def background_prior_sample(
    rng: np.random.Generator, patch: int = 48, prior: str = "vsharp", context_mm: float = 12.0,
    min_prior_fraction: float = 0.05, local_voxel_mm: float = 1.0, **options,
) -> dict[str, np.ndarray]:
    """One training patch for the prior-guided background network.

    A hybrid brain (``target="local"``, :func:`hybrid_brain_sample` with ``options``, voxels of
    ``local_voxel_mm``) is drawn on a context box ``context_mm`` larger than the patch on every side, the prior
    (:func:`bg_prior`) is computed on that whole box and the central ``patch`` is kept: the prior then
    erodes only at the brain's own boundary, as it does on a whole head (V-SHARP's largest sphere is
    12 mm), not at the patch faces. Redrawn until the prior's mask covers ``min_prior_fraction`` of
    the patch. Returns ``input`` (3, p, p, p) = [prior local field, total field demeaned in the mask,
    prior mask], ``target`` (true local field demeaned in the mask), ``mask`` and the usual keys.
    PDF is global: its samples are whole-brain boxes (``context_mm = 0``, a coarse grid such as
    ``local_voxel_mm = 2`` and ``centre_jitter_mm``), whose net corrects PDF at that resolution.
    """
    p = _check_patch(patch)
    if prior not in BG_PRIORS:
        raise ValueError(f"prior must be one of {', '.join(BG_PRIORS)}, got {prior!r}")
    margin = int(np.ceil(float(context_mm) / float(local_voxel_mm)))
    crop = (slice(margin, margin + p),) * 3
    local_p = None
    for _ in range(20):
        s = hybrid_brain_sample(rng, p + 2 * margin, target="local", local_voxel_mm=local_voxel_mm, **options)
        try:
            local_p, mask_p = bg_prior(s["total_field_ppm"], s["mask"], s["voxel_size_mm"], prior)
        except ValueError:  # the box's brain is too thin for the smallest sphere
            local_p = None
            continue
        if mask_p[crop].mean() >= min_prior_fraction:
            break
    if local_p is None:
        raise RuntimeError(f"no {prior} prior in 20 draws of a {p + 2 * margin}^3 box: the phantom's brain is too thin")
    mask = np.ascontiguousarray(s["mask"][crop])
    sel = mask > 0

    def demeaned(v):
        v = np.ascontiguousarray(v[crop])
        return ((v - np.float32(v[sel].mean(dtype=np.float64) if sel.any() else 0.0)) * mask).astype(np.float32)

    target = demeaned(s["local_field_ppm"])
    return {"input": np.stack([local_p[crop], demeaned(s["total_field_ppm"]), mask_p[crop]]),
            "target": target, "mask": mask, "field_ppm": target, "b0_dir": s["b0_dir"],
            "voxel_size_mm": s["voxel_size_mm"]}


# ---------------------------------------------------------------------------------------------------
# batches


def sample(kind: str, rng: np.random.Generator, patch: int, **options) -> dict[str, np.ndarray]:
    """One sample of ``kind`` (see :data:`KINDS`) with keys ``input`` (network input field, ppm),
    ``target`` (ppm), ``mask``, ``b0_dir``, ``voxel_size_mm`` and ``field_ppm`` (the local field for
    the dipole kinds, used by the uQSM loss). ``options`` go to the generator; for ``"deepqsm"``,
    ``brain_prob`` (default 0) is the fraction of samples drawn as hybrid brains (axial, 1 mm) instead
    of shapes, with the :func:`hybrid_brain_sample` options in ``brain``. For ``"nextqsm-bg"``,
    ``prior="vsharp"`` or ``"pdf"`` makes prior-guided samples (:func:`background_prior_sample`, 3-channel input)."""
    if kind == "deepqsm":
        options = dict(options)
        brain_prob, brain = float(options.pop("brain_prob", 0.0)), dict(options.pop("brain", {}))
        if brain_prob > 0 and rng.random() < brain_prob:
            # hybrid brain on DeepQSM's own grid: axial B0, 1 mm (the inference resamples to it)
            brain.update(voxel_sizes_mm=((1.0, 1.0, 1.0),), max_tilt_deg=0.0)
            h = hybrid_brain_sample(rng, patch, target="chi", **brain)
            return {"input": h["local_field_ppm"], "target": h["chi_ppm"], "mask": h["mask"],
                    "field_ppm": h["local_field_ppm"], "b0_dir": h["b0_dir"], "voxel_size_mm": h["voxel_size_mm"]}
        s = deepqsm_shapes_sample(rng, patch, **options)
        return {"input": s["field_ppm"], "target": s["chi_ppm"], "mask": s["mask"], "field_ppm": s["field_ppm"],
                "b0_dir": s["b0_dir"], "voxel_size_mm": s["voxel_size_mm"]}
    if kind == "nextqsm-bg":
        options = dict(options)
        if options.get("prior", "none") != "none":
            return background_prior_sample(rng, patch, **options)
        options.pop("prior", None)
        options.pop("context_mm", None)
        s = hybrid_brain_sample(rng, patch, target="local", **options)
        return {"input": s["total_field_ppm"], "target": s["local_field_ppm"], "mask": s["mask"],
                "field_ppm": s["local_field_ppm"], "b0_dir": s["b0_dir"], "voxel_size_mm": s["voxel_size_mm"]}
    if kind == "nextqsm-varnet":
        s = hybrid_brain_sample(rng, patch, target="chi", **options)
        return {"input": s["local_field_ppm"], "target": s["chi_ppm"], "mask": s["mask"], "field_ppm": s["local_field_ppm"],
                "b0_dir": s["b0_dir"], "voxel_size_mm": s["voxel_size_mm"]}
    raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")


def make_batch(kind: str, rng: np.random.Generator, batch_size: int, patch: int, **options) -> dict[str, np.ndarray]:
    """``batch_size`` samples stacked: volumes (B, 1, p, p, p) float32, ``b0_dir``/``voxel_size_mm`` (B, 3).

    The FFTs run in SciPy (:func:`qsmprep.qsm.fft.fft_backend_scope`): its results do not depend on the
    number of threads (torch's MKL FFT's do, by float32 rounding), so a batch is the same whether a data
    worker (one thread) or the training process made it, and the same as the shipped weights were trained on."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from qsmprep.qsm.fft import fft_backend_scope

    with fft_backend_scope("scipy"):
        samples = [sample(kind, rng, patch, **options) for _ in range(int(batch_size))]
    out = {}
    for k in samples[0]:
        arr = np.stack([s[k] for s in samples])
        out[k] = arr[:, None] if arr.ndim == 4 else arr
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def validation_set(kind: str, n: int, seed: int = 12345, patch: int = 48, **options) -> list[dict[str, np.ndarray]]:
    """Deterministic held-out validation samples: ``n`` batches of one, from ``default_rng(seed)``
    (a stream independent of the training stream when ``seed`` differs from the training seed)."""
    rng = np.random.default_rng(int(seed))
    return [make_batch(kind, rng, 1, patch, **options) for _ in range(int(n))]


# ---------------------------------------------------------------------------------------------------
# per-step seeding and parallel batches

#: How the data of a training run are seeded (``TrainConfig.data_rng``): ``"stream"`` -- one generator
#: ``default_rng(seed)`` drawn serially, step after step (earlier releases; the shipped weights);
#: ``"per-step"`` -- the batch of step ``i`` from its own generator :func:`step_rng` ``(seed, i)``, so it can be
#: made in any process and in any order: the data do not depend on the number of workers.
DATA_RNGS = ("stream", "per-step")


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of (0-based) training step ``step`` of a ``"per-step"`` run: the ``step``-th child of
    ``SeedSequence(seed)`` (``spawn_key=(step,)``), statistically independent of every other step and of a
    validation set drawn from ``default_rng(val_seed)``."""
    if int(step) < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(step),)))


def batch_for_step(kind: str, seed: int, step: int, batch_size: int, patch: int, options: dict) -> dict[str, np.ndarray]:
    """The batch of step ``step`` of a ``"per-step"`` run: :func:`make_batch` with :func:`step_rng`."""
    return make_batch(kind, step_rng(seed, step), batch_size, patch, **options)


def _worker_init() -> None:
    """Data workers compute one sample each: keep their FFTs and BLAS to one thread (the pool is the parallelism)."""
    from qsmprep.qsm import fft as _fft

    _fft.FFT_WORKERS = 1
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - optional
        pass


class ParallelBatches:
    """Batches of a ``"per-step"`` run made ahead by ``workers`` processes (:func:`batch_for_step`).

    ``get(step)`` returns the batch of ``step``; steps must be asked for in order from ``start_step``.
    Up to ``depth`` (default ``2 * workers``) batches are in flight; none is made for ``stop_step`` or
    later. Worker processes are spawned (never forked: the trainer holds torch, maybe CUDA, threads), each
    with its own phantom cache, and one FFT/BLAS thread. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, kind: str, seed: int, batch_size: int, patch: int, options: dict, workers: int,
                 start_step: int = 0, stop_step: int | None = None, depth: int | None = None):
        import collections
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._args = (kind, int(seed), int(batch_size), int(patch), dict(options))
        self._next = int(start_step)
        self._stop = None if stop_step is None else int(stop_step)
        self._depth = int(depth) if depth else 2 * int(workers)
        self._pending = collections.deque()
        self._pool = ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_init)
        self._fill()

    def _fill(self) -> None:
        kind, seed, bs, patch, opts = self._args
        while len(self._pending) < self._depth and (self._stop is None or self._next < self._stop):
            self._pending.append((self._next, self._pool.submit(batch_for_step, kind, seed, self._next, bs, patch, opts)))
            self._next += 1

    def get(self, step: int) -> dict[str, np.ndarray]:
        if not self._pending or self._pending[0][0] != int(step):
            raise ValueError(f"batch of step {step} was not scheduled (next: "
                             f"{self._pending[0][0] if self._pending else self._next})")
        _, fut = self._pending.popleft()
        out = fut.result()
        self._fill()
        return out

    def close(self) -> None:
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ParallelBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
