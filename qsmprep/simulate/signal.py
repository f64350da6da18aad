"""Multi-echo GRE forward simulation of a :class:`~qsmprep.simulate.phantom.Phantom`.

Signal model per echo::

    S(TE) = M0 exp(-R2* TE) exp(i (phi0 + 2 pi gamma_bar B0 f TE)) + noise,   f = dB/B0 (ppm x 1e-6)

Fields (ppm) come from the dipole forward model ``F^-1[D F chi]`` (Salomir 2003; Marques & Bowtell
2005) computed by :func:`qsmprep.qsm.geometry.forward_field_ppm`: in the voxel frame for a straight
acquisition; for an oblique one the local sources (brain) use the voxel frame with the oblique B0 and
all other sources a grid rotated so that B0 lies along an axis (see :func:`_field_b0_aligned`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from qsmprep.qsm import constants
from qsmprep.qsm.arrays import as_b0_dir, as_echo_times, as_float_volume, as_mask, same_shape
from qsmprep.qsm.geometry import b0_direction_from_affine, forward_field_ppm, obliquity_deg, rotation_matrix
from qsmprep.simulate.phantom import Phantom

DEFAULT_ECHO_TIMES_S = (0.004, 0.008, 0.012, 0.016, 0.020, 0.024)

#: Above this obliquity (degrees) the background field is computed on a B0-aligned grid.
OBLIQUE_TOL_DEG = 0.1


@dataclass
class GreSimulation:
    """Result of :func:`simulate_gre` (arrays float32 unless stated; 4D arrays are (x, y, z, echo)).

    ``magnitude`` (a.u.), ``phase_rad`` (wrapped to [-pi, pi)), ``echo_times_s``, ``b0_tesla``,
    ``b0_dir`` (unit vector, voxel frame), ``affine`` (acquisition affine, oblique when tilted),
    ``voxel_size_mm``, ``chi_ppm`` (ground truth, relative to water/CSF), ``brain_mask`` (bool),
    ``labels`` (int16) / ``label_names``, ``total_field_ppm``, ``local_field_ppm`` (zero outside the
    brain mask), ``background_field_ppm`` (= total - local), ``phase_offset_rad`` (phi0),
    ``field_hz`` (total field in Hz), ``m0``, ``r2star_hz``, ``noise_sigma`` (per real/imag channel,
    0 when noiseless), ``shim_coefficients`` (removed harmonic shim in the brain, ppm).
    """

    magnitude: np.ndarray
    phase_rad: np.ndarray
    echo_times_s: np.ndarray
    b0_tesla: float
    b0_dir: np.ndarray
    affine: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    chi_ppm: np.ndarray
    brain_mask: np.ndarray
    labels: np.ndarray
    total_field_ppm: np.ndarray
    local_field_ppm: np.ndarray
    background_field_ppm: np.ndarray
    phase_offset_rad: np.ndarray
    field_hz: np.ndarray
    label_names: dict[int, str] = field(default_factory=dict)
    label_chi_ppm: dict[int, float] = field(default_factory=dict)
    m0: np.ndarray | None = None
    r2star_hz: np.ndarray | None = None
    noise_sigma: float = 0.0
    shim_coefficients: np.ndarray | None = None

    @property
    def n_echoes(self) -> int:
        return int(self.magnitude.shape[-1])

    @property
    def complex_signal(self) -> np.ndarray:
        """The complex signal (x, y, z, echo), complex64."""
        return (self.magnitude * np.exp(1j * self.phase_rad)).astype(np.complex64)


def oblique_affine(affine: np.ndarray, rotation: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``affine`` rotated in world space by ``rotation`` (3x3) about the centre of the field of view."""
    a = np.asarray(affine, dtype=np.float64)
    centre = a @ np.append((np.asarray(shape[:3], dtype=np.float64) - 1) / 2.0, 1.0)
    t = np.eye(4)
    t[:3, :3] = rotation
    t[:3, 3] = centre[:3] - rotation @ centre[:3]
    return t @ a


def _rotation_to_z(u: np.ndarray) -> np.ndarray:
    """Smallest rotation taking the unit vector ``u`` onto (0, 0, 1)."""
    ez = np.array([0.0, 0.0, 1.0])
    c = float(np.clip(u @ ez, -1.0, 1.0))
    axis = np.cross(u, ez)
    s = float(np.linalg.norm(axis))
    if s < 1e-12:
        return np.eye(3) if c > 0 else rotation_matrix([1.0, 0.0, 0.0], 180.0)
    return rotation_matrix(axis / s, np.degrees(np.arctan2(s, c)))


def _extend(chi: np.ndarray, faces, n_vox: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Replicate the edge slices of ``chi`` outwards through ``faces`` ((axis, side) pairs)."""
    pad = [[0, 0], [0, 0], [0, 0]]
    for axis, side in faces:
        pad[int(axis)][int(side) != 0] = int(n_vox[int(axis)])
    if not any(p for pp in pad for p in pp):
        return chi, tuple(slice(None) for _ in range(3))
    out = np.pad(chi, pad, mode="edge")
    crop = tuple(slice(p[0], p[0] + n) for p, n in zip(pad, chi.shape))
    return out, crop


def _harmonic_basis(order: int, coords: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Real solid harmonics up to second order (unnormalised) on the given coordinates."""
    basis = [np.ones_like(coords[0])]
    if order >= 1:
        basis += list(coords)
    if order >= 2:
        x, y, z = coords
        basis += [x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y]
    return basis


def _fit_shim(field_ppm: np.ndarray, mask: np.ndarray, voxel_size_mm, order: int):
    """Least-squares fit of solid harmonics (order 0-2) to the field in the mask; returns the fit (full grid)
    and the coefficients. Mimics the scanner's frequency adjustment and shimming on the brain."""
    shape = field_ppm.shape
    centre = np.array([np.mean(np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != i)))[0]) for i in range(3)])
    scale = 100.0  # mm, keeps the normal equations well conditioned
    axes = [((np.arange(n) - c) * v / scale).astype(np.float32) for n, c, v in zip(shape, centre, voxel_size_mm)]
    idx = np.nonzero(mask)
    pts = [axes[i][idx[i]].astype(np.float64) for i in range(3)]
    b = _harmonic_basis(order, pts)
    a = np.stack(b, axis=1)
    coef, *_ = np.linalg.lstsq(a, field_ppm[idx].astype(np.float64), rcond=None)
    grids = [axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]]
    fit = np.zeros(shape, np.float32)
    for c, bf in zip(coef, _harmonic_basis(order, grids)):
        fit += np.float32(c) * bf
    return fit, coef


def _smooth_phase_offset(shape, mask, rng, amplitude_rad: float) -> np.ndarray:
    """Smooth random phase offset: uniform constant in [-pi, pi) plus a random 3rd-order polynomial
    over the FOV scaled to ``amplitude_rad`` standard deviation in ``mask`` (a coil-combination-like
    residue)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    terms = []
    for i in range(4):
        for j in range(4 - i):
            for k in range(4 - i - j):
                if i + j + k > 0:
                    terms.append((i, j, k))
    coef = rng.standard_normal(len(terms)) / np.array([1.0 + (i + j + k) for i, j, k in terms])
    poly = np.zeros(shape, np.float32)
    for c, (i, j, k) in zip(coef, terms):
        poly += np.float32(c) * (x**i) * (y**j) * (z**k)
    vals = poly[mask]
    poly -= np.float32(vals.mean())
    poly *= np.float32(amplitude_rad / max(float(vals.std()), 1e-6))
    poly += np.float32(rng.uniform(-np.pi, np.pi))
    return poly


def simulate_gre(
    phantom: Phantom,
    echo_times_s: Sequence[float] = DEFAULT_ECHO_TIMES_S,
    b0_tesla: float = 3.0,
    tilt_deg: float = 0.0,
    tilt_axis: Sequence[float] = (1.0, 0.0, 0.0),
    b0_dir: Sequence[float] | None = None,
    snr: float | None = 50.0,
    phase_offset: bool = True,
    seed: int = 0,
    pad_voxels: int | Sequence[int] | None = None,
    extend_mm: float = 150.0,
    shim_order: int = 2,
    phase_offset_rad: float = 1.0,
) -> GreSimulation:
    """Simulate multi-echo GRE magnitude and wrapped phase of ``phantom`` (float32, (x, y, z, echo)).

    Geometry: with ``tilt_deg != 0`` the head is scanned obliquely: the acquisition affine is the
    phantom affine rotated by ``tilt_deg`` about the world axis ``tilt_axis`` (about the FOV centre),
    and ``b0_dir = b0_direction_from_affine(affine)`` (voxel frame). Alternatively give ``b0_dir``
    (voxel frame) and the affine is rotated to match it. The two options are exclusive.

    Fields: ``total_field_ppm`` = dipole field of ``chi - chi_ambient`` (so the surrounding air
    continues beyond the FOV) with zero padding of ``pad_voxels`` per side (default: 64 mm), the
    body continued by edge replication for ``extend_mm`` through ``phantom.extend_faces`` (the neck;
    avoids an artificial tissue/air surface where the FOV cuts the head). Then a harmonic shim of
    ``shim_order`` (0: centre frequency only; 1: linear; 2: second order, default) fitted in the
    brain mask is removed, like the scanner's frequency adjustment and shimming on the brain.
    ``local_field_ppm`` = field of the sources inside the brain mask, chi relative to water/CSF
    (``chi_ppm * brain_mask``; padded 48 mm, periodic error < 1 %), set to zero outside the mask.
    ``background_field_ppm = total_field_ppm - local_field_ppm`` (inside the mask: the harmonic field
    of all sources outside it, plus the shim; outside the mask it equals the total field).
    Oblique B0 (obliquity > ``OBLIQUE_TOL_DEG``): the voxel-frame kernel would ring at the Nyquist
    frequency around the strong air/bone edges, deep into the brain (non-harmonic there, unlike a
    scanner's field), so the field of all sources but ``chi * brain_mask`` (inside the mask they are
    ``-chi_ambient``) is computed on a B0-aligned rotated grid and sampled back; the field of
    ``chi * brain_mask`` keeps the voxel-frame oblique kernel (``local_field_ppm`` in the mask).

    Signal: ``m0 exp(-r2star TE) exp(i (phi0 + 2 pi gamma_bar B0 f 1e-6 TE))`` plus complex Gaussian
    noise of sigma = mean echo-1 magnitude in the brain / ``snr`` per channel (``snr=None``: none);
    ``phi0`` is a smooth random offset (std ``phase_offset_rad`` in the brain, plus a random constant) when
    ``phase_offset`` is true. Deterministic for a ``seed``.
    """
    if not isinstance(phantom, Phantom):
        raise TypeError(f"phantom must be a Phantom, got {type(phantom).__name__}")
    te = as_echo_times(echo_times_s, min_echoes=1)
    if not np.isfinite(b0_tesla) or b0_tesla <= 0:
        raise ValueError(f"b0_tesla must be positive, got {b0_tesla}")
    if snr is not None and not (float(snr) > 0):
        raise ValueError(f"snr must be positive (None or inf: no noise), got {snr}")
    if not np.isfinite(tilt_deg):
        raise ValueError(f"tilt_deg must be finite, got {tilt_deg}")
    if shim_order not in (0, 1, 2):
        raise ValueError(f"shim_order must be 0, 1 or 2, got {shim_order}")
    if extend_mm < 0:
        raise ValueError(f"extend_mm must be >= 0, got {extend_mm}")
    chi = as_float_volume(phantom.chi_ppm, "phantom.chi_ppm")
    mask = as_mask(phantom.brain_mask, "phantom.brain_mask", chi.shape)
    for name in ("m0", "r2star_hz", "labels"):
        same_shape(getattr(phantom, name), chi, f"phantom.{name}", "phantom.chi_ppm")
    vs = tuple(float(v) for v in phantom.voxel_size_mm)
    rng = np.random.default_rng(seed)

    # --- geometry
    base = np.asarray(phantom.affine, dtype=np.float64)
    if b0_dir is not None:
        if tilt_deg != 0.0:
            raise ValueError("give either tilt_deg or b0_dir, not both")
        b = as_b0_dir(b0_dir)
        q = base[:3, :3] / np.linalg.norm(base[:3, :3], axis=0)[None, :]
        affine = oblique_affine(base, _rotation_to_z(q @ b), chi.shape)
    elif tilt_deg != 0.0:
        axis = np.asarray(tilt_axis, dtype=np.float64).reshape(-1)
        if axis.size != 3 or not np.all(np.isfinite(axis)) or np.linalg.norm(axis) == 0:
            raise ValueError(f"tilt_axis must be a non-zero 3-vector, got {tilt_axis}")
        affine = oblique_affine(base, rotation_matrix(axis, tilt_deg), chi.shape)
    else:
        affine = base.copy()
    b = b0_direction_from_affine(affine)
    if b0_dir is not None and not np.allclose(b, as_b0_dir(b0_dir), atol=1e-6):
        raise RuntimeError("internal error: affine does not reproduce b0_dir")

    # --- fields
    if pad_voxels is None:
        pad_voxels = [int(np.ceil(64.0 / v)) for v in vs]
    n_ext = [int(np.ceil(extend_mm / v)) for v in vs]
    src, crop = _extend(chi - np.float32(phantom.chi_ambient_ppm), phantom.extend_faces if extend_mm > 0 else (), n_ext)
    if obliquity_deg(b) <= OBLIQUE_TOL_DEG:
        total = forward_field_ppm(src, vs, b, pad_voxels)[crop]
        del src
        total = np.ascontiguousarray(total)
        local = _local_field(chi, mask, vs, b)
    else:
        # oblique: the voxel-frame kernel rings at the Nyquist frequency around strong sharp sources
        # (see _field_b0_aligned); only the weak local sources chi * mask keep it (the inversion's model)
        local = _local_field(chi, mask, vs, b)
        # background sources: everything but chi * mask (inside the mask chi - chi_amb - chi = -chi_amb,
        # continuous with the tissue around it), their field computed on a B0-aligned grid
        view = src[crop]
        view[mask] = np.float32(-phantom.chi_ambient_ppm)
        del view
        pad_mm = float(np.max(np.broadcast_to(np.asarray(pad_voxels, dtype=np.float64), (3,)) * np.asarray(vs)))
        total = _field_b0_aligned(src, vs, b, pad_mm, crop)
        del src
        # plus the field of the local sources: exactly local_field_ppm in the mask, its continuation outside
        near = forward_field_ppm(np.where(mask, chi, np.float32(0.0)), vs, b, [int(np.ceil(48.0 / v)) for v in vs])
        total += np.where(mask, local, near)
        del near
    shim, coef = _fit_shim(total, mask, vs, shim_order)
    total -= shim
    del shim
    background = total - local
    field_hz = constants.ppm_to_hz(total, b0_tesla).astype(np.float32)

    # --- signal
    if phase_offset:
        phi0 = _smooth_phase_offset(chi.shape, mask, rng, phase_offset_rad)
    else:
        phi0 = np.zeros(chi.shape, np.float32)
    m0 = np.asarray(phantom.m0, dtype=np.float32)
    r2 = np.asarray(phantom.r2star_hz, dtype=np.float32)
    rate = (2.0 * np.pi * field_hz).astype(np.float32)  # rad/s
    sigma = 0.0
    if snr is not None and np.isfinite(snr):
        sigma = float(np.mean(m0[mask] * np.exp(-r2[mask] * np.float32(te[0])))) / float(snr)
    shape4 = chi.shape + (te.size,)
    magnitude = np.empty(shape4, np.float32)
    phase = np.empty(shape4, np.float32)
    for e, t in enumerate(te):
        t32 = np.float32(t)
        amp = m0 * np.exp(-r2 * t32)
        ang = phi0 + rate * t32
        re = amp * np.cos(ang)
        im = amp * np.sin(ang)
        del amp, ang
        if sigma > 0:
            re += rng.standard_normal(chi.shape, dtype=np.float32) * np.float32(sigma)
            im += rng.standard_normal(chi.shape, dtype=np.float32) * np.float32(sigma)
        magnitude[..., e] = np.hypot(re, im)
        p = np.arctan2(im, re)
        p[p >= np.float32(np.pi)] -= np.float32(2 * np.pi)
        phase[..., e] = p
        del re, im, p

    return GreSimulation(
        magnitude=magnitude,
        phase_rad=phase,
        echo_times_s=te,
        b0_tesla=float(b0_tesla),
        b0_dir=b,
        affine=affine,
        voxel_size_mm=vs,
        chi_ppm=chi,
        brain_mask=mask,
        labels=np.asarray(phantom.labels, dtype=np.int16),
        total_field_ppm=total,
        local_field_ppm=local,
        background_field_ppm=background,
        phase_offset_rad=phi0,
        field_hz=field_hz,
        label_names=dict(phantom.label_names),
        label_chi_ppm=dict(phantom.label_chi_ppm),
        m0=m0,
        r2star_hz=r2,
        noise_sigma=sigma,
        shim_coefficients=np.asarray(coef),
    )


def _local_field(chi: np.ndarray, mask: np.ndarray, vs, b0_dir, pad_mm: float = 48.0) -> np.ndarray:
    """Field (ppm) of ``chi * mask`` evaluated in the mask (zero outside), on the mask bounding box."""
    idx = [np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    sl = tuple(slice(int(a[0]), int(a[-1]) + 1) for a in idx)
    sub_mask = mask[sl]
    sub = np.where(sub_mask, chi[sl], np.float32(0.0))
    pad = [int(np.ceil(pad_mm / v)) for v in vs]
    f = forward_field_ppm(sub, vs, b0_dir, pad)
    out = np.zeros(chi.shape, np.float32)
    out[sl] = np.where(sub_mask, f, np.float32(0.0))
    return out


def _field_b0_aligned(
    src: np.ndarray,
    vs,
    b0_dir,
    pad_mm: float,
    out_slices: tuple[slice, ...] | None = None,
    spacing_mm: float | None = None,
    order_back: int = 3,
) -> np.ndarray:
    """Dipole field (ppm) of ``src`` computed on a grid rotated so that B0 lies along its third axis.

    For oblique ``b0_dir`` the voxel-frame k-space kernel ``1/3 - (k.b)^2/k^2`` is discontinuous across
    the faces of the Brillouin zone (cross terms), so strong sharp sources (air/tissue, bone) ring at
    the Nyquist frequency far into the brain, a field that is not harmonic there and not physical. On a
    grid with B0 along an axis the kernel is continuous and the field of sources outside the brain is
    harmonic inside it, as in a scanner. ``src`` (ppm) is resampled (linear) onto an isotropic grid of
    spacing ``min(vs)`` with ``u = Q v`` (``v``: physical voxel-frame mm about the array centre, ``Q b0 =
    e_z``), large enough to hold the whole rotated array; the field there (b = e_z, zero padding of
    ``pad_mm``) is sampled back (cubic spline, ``order_back``) on ``src[out_slices]`` (default: all of
    ``src``). ``spacing_mm`` overrides the rotated grid's spacing. Returns float32 of the shape of
    ``src[out_slices]``. Full head (197x233x189 + 150 mm neck, 1 mm, 20 deg): ~5 s on 2 cores.
    """
    vs = np.asarray(vs, dtype=np.float64)
    b = np.asarray(b0_dir, dtype=np.float64)
    q = _rotation_to_z(b / np.linalg.norm(b))
    h = float(vs.min()) if spacing_mm is None else float(spacing_mm)
    n_in = np.asarray(src.shape, dtype=np.float64)
    c_in = (n_in - 1.0) / 2.0
    corners = np.array(list(itertools.product(*[(0.0, n - 1.0) for n in n_in])))
    u = ((corners - c_in) * vs) @ q.T
    n_al = np.ceil((u.max(axis=0) - u.min(axis=0)) / h).astype(int) + 3
    c_al = (n_al - 1.0) / 2.0
    # aligned index j -> source index i = diag(1/vs) Q^T h (j - c_al) + c_in
    m_in = (q.T * h) / vs[:, None]
    aligned = ndi.affine_transform(
        src, m_in, c_in - m_in @ c_al, output_shape=tuple(int(n) for n in n_al), output=np.float32,
        order=1, mode="constant", cval=0.0, prefilter=False,
    )
    f_al = forward_field_ppm(aligned, (h, h, h), (0.0, 0.0, 1.0), int(np.ceil(pad_mm / h)))
    del aligned
    # back: source index i -> aligned index j = Q diag(vs) (i - c_in) / h + c_al
    if out_slices is None:
        out_slices = tuple(slice(0, int(n)) for n in src.shape)
    start = np.array([s.start or 0 for s in out_slices], dtype=np.float64)
    out_shape = tuple(len(range(*s.indices(int(n)))) for s, n in zip(out_slices, src.shape))
    m_out = q * vs[None, :] / h
    off = c_al + m_out @ (start - c_in)
    # crop the aligned field to the footprint of the output grid (cheaper spline prefilter)
    oc = np.array(list(itertools.product(*[(0.0, n - 1.0) for n in out_shape])))
    j = oc @ m_out.T + off
    lo = np.maximum(np.floor(j.min(axis=0)).astype(int) - 4, 0)
    hi = np.minimum(np.ceil(j.max(axis=0)).astype(int) + 5, n_al)
    sub = f_al[tuple(slice(int(a), int(z)) for a, z in zip(lo, hi))]
    out = ndi.affine_transform(
        sub, m_out, off - lo, output_shape=out_shape, output=np.float32, order=order_back, mode="nearest",
    )
    return out
