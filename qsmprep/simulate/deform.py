"""New head anatomies from an existing head phantom: a seeded smooth deformation, head-shape scaling and
atrophy, so that accuracy can be measured on heads that no network saw in training.

:func:`deform_phantom` returns a seeded variant of a 1 mm head phantom:

1. *Atrophy* (optional): brain tissue (grey/white matter) within ``atrophy_mm`` of the CSF inside the brain
   mask becomes CSF, so sulci and ventricles widen as in older adults (brain volume falls and the
   ventricles grow with age: Fotenos AF et al., Neurology 2005;64:1032). The nuclei, vessels and lesions
   are left whole so that they keep their truth values.
2. *Head shape*: an anisotropic scaling about the brain centroid by seeded factors within
   ``1 +- scale_range`` per axis (head length, width and height vary by about this much between adults).
3. *Local shape*: a smooth Gaussian random displacement field per axis (:func:`qsmprep.simulate.phantom.smooth_noise`,
   correlation ``corr_mm``, standard deviation ``amplitude_mm / 2.5``, so peaks near ``amplitude_mm``), as in
   random-field models of anatomical variability (e.g. Christensen GE et al., IEEE TIP 1996;5:1435). Where
   ``det(I + grad u)`` would fall below :data:`MIN_JACOBIAN` the random part is scaled down until it does not,
   so the map stays one-to-one (fold free).

The maps are pulled back (every voxel takes the value at ``x + u(x)``), all by nearest neighbour: chi, M0
and R2* stay those of the voxel's label (linear interpolation put bone and air values, down to -1.4 and up to
+4.5 ppm, into brain-mask voxels next to the skull and sinuses: 0.1 % of the brain, which dominated the
NRMSE), and the brain mask is the warped brain mask; partial volume comes back with ``downsample``; the grid is padded with air
first and cropped to the deformed head afterwards, and faces the body leaves through (``extend_faces``, the
neck) continue their edge voxels, so the neck still touches the bottom face. Deterministic for a seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi

from qsmprep.simulate.phantom import Phantom, smooth_noise, touching_faces

__all__ = ["MIN_JACOBIAN", "deform_phantom", "head_displacement_mm", "jacobian_determinant",
           "make_deformed_zubal_phantom", "widen_csf"]

#: Smallest Jacobian determinant a deformation may have (below it the random part is scaled down).
MIN_JACOBIAN = 0.3

_CSF, _WM, _GM = 10, 8, 9


def jacobian_determinant(u_mm: np.ndarray, voxel_size_mm) -> np.ndarray:
    """``det(I + grad u)`` (float32) of a displacement ``u_mm`` (mm, shape ``(*shape, 3)``, world axes of an
    axis-aligned grid), central differences: the local volume ratio of the map ``x -> x + u(x)``; > 0
    everywhere means no folding."""
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    g = np.empty(u_mm.shape[:3] + (3, 3), np.float32)
    for i in range(3):
        for j in range(3):
            g[..., i, j] = np.gradient(u_mm[..., i], float(vs[j]), axis=j)
        g[..., i, i] += 1.0
    return np.linalg.det(g).astype(np.float32)


def head_displacement_mm(shape, voxel_size_mm, centre_vox, seed: int, amplitude_mm: float = 6.0,
                         corr_mm: float = 25.0, scale_range: float = 0.08,
                         scale: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pull-back displacement (mm, float32, ``(*shape, 3)``) of a seeded head variant: anisotropic scaling by
    ``scale`` (default seeded factors in ``1 +- scale_range``; > 1 makes the head larger) about ``centre_vox``
    plus a smooth Gaussian random field (correlation ``corr_mm``, SD ``amplitude_mm / 2.5`` per axis), the
    random part shrunk by 0.8 until ``det(I + grad u) >= MIN_JACOBIAN``. Returns ``(u, scale factors)``."""
    rng = np.random.default_rng([int(seed), 0xDEF0])
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    s = rng.uniform(1.0 - scale_range, 1.0 + scale_range, 3) if scale is None else np.asarray(scale, np.float64)
    noise = [smooth_noise(shape, vs, corr_mm, rng) for _ in range(3)]
    u = np.empty(tuple(shape) + (3,), np.float32)
    gain = float(amplitude_mm) / 2.5
    for _ in range(20):
        for c in range(3):
            x = ((np.arange(shape[c]) - centre_vox[c]) * vs[c]).astype(np.float32)
            view = [-1 if i == c else 1 for i in range(3)]
            # pull-back of a scaling by s about the centre: sample at centre + (x - centre) / s
            u[..., c] = np.float32(gain) * noise[c] + (np.float32(1.0 / s[c] - 1.0) * x).reshape(view)
        # the Jacobian on a 2x coarser grid when the field is smooth on that grid (8x cheaper), else on the grid
        k = 2 if corr_mm >= 8.0 * float(vs.max()) else 1
        if float(jacobian_determinant(u[::k, ::k, ::k], k * vs).min()) >= MIN_JACOBIAN:
            return u, s
        gain *= 0.8
    raise RuntimeError("no fold-free deformation found (scale_range too large?)")


def widen_csf(ph: Phantom, atrophy_mm: float) -> Phantom:
    """Atrophy: grey/white matter inside the brain mask within ``atrophy_mm`` (mm) of CSF inside the brain
    becomes CSF (chi, M0 and R2* of the CSF label). Nuclei, vessels and lesions are kept."""
    if atrophy_mm <= 0:
        return ph
    lab = np.asarray(ph.labels)
    brain = np.asarray(ph.brain_mask, bool)
    idx = np.nonzero(brain)
    sl = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    csf = (lab[sl] == _CSF) & brain[sl]
    dist = ndi.distance_transform_edt(~csf, sampling=ph.voxel_size_mm)
    grow = (dist <= atrophy_mm) & np.isin(lab[sl], (_WM, _GM)) & brain[sl]
    labels, chi, m0, r2 = (np.array(a, copy=True) for a in (lab, ph.chi_ppm, ph.m0, ph.r2star_hz))
    from qsmprep.simulate.phantom import HEAD_TISSUES

    _, c, m, r = HEAD_TISSUES[_CSF]
    labels[sl][grow] = _CSF
    chi[sl][grow] = c
    m0[sl][grow] = m
    r2[sl][grow] = r
    return dataclasses.replace(ph, labels=labels, chi_ppm=chi, m0=m0, r2star_hz=r2)


def _pad(ph: Phantom, pad_vox: int) -> tuple[Phantom, np.ndarray]:
    """``ph`` padded by ``pad_vox`` voxels of ambient air on every face the body does not leave through
    (the others by 0); returns the padded phantom and the pad widths ``(3, 2)``."""
    widths = np.full((3, 2), int(pad_vox))
    for axis, side in ph.extend_faces:
        widths[axis, side] = 0
    pw = [tuple(int(v) for v in w) for w in widths]

    def pad(a, fill):
        return np.pad(np.asarray(a), pw, mode="constant", constant_values=fill)

    aff = np.asarray(ph.affine, np.float64).copy()
    aff[:3, 3] -= aff[:3, :3] @ widths[:, 0]
    out = dataclasses.replace(
        ph, chi_ppm=pad(ph.chi_ppm, ph.chi_ambient_ppm), labels=pad(ph.labels, 0), brain_mask=pad(ph.brain_mask, False),
        m0=pad(ph.m0, 0.0), r2star_hz=pad(ph.r2star_hz, 0.0), affine=aff)
    return out, widths


def _crop(ph: Phantom, margin_vox: int, keep: tuple[tuple[int, int], ...]) -> Phantom:
    """``ph`` cropped to the head (label != 0) plus ``margin_vox``; faces in ``keep`` stay where they are."""
    nz = [np.nonzero((ph.labels != 0).any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    lo = np.array([max(int(a[0]) - margin_vox, 0) for a in nz])
    hi = np.array([min(int(a[-1]) + 1 + margin_vox, n) for a, n in zip(nz, ph.shape)])
    for axis, side in keep:
        if side == 0:
            lo[axis] = 0
        else:
            hi[axis] = ph.shape[axis]
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    aff = np.asarray(ph.affine, np.float64).copy()
    aff[:3, 3] += aff[:3, :3] @ lo
    return dataclasses.replace(
        ph, chi_ppm=np.ascontiguousarray(ph.chi_ppm[sl]), labels=np.ascontiguousarray(ph.labels[sl]),
        brain_mask=np.ascontiguousarray(ph.brain_mask[sl]), m0=np.ascontiguousarray(ph.m0[sl]),
        r2star_hz=np.ascontiguousarray(ph.r2star_hz[sl]), affine=aff)


def deform_phantom(ph: Phantom, seed: int, amplitude_mm: float = 6.0, corr_mm: float = 25.0,
                   scale_range: float = 0.08, atrophy_mm: float | None = None, margin_mm: float = 8.0) -> Phantom:
    """A seeded variant of the (1 mm, axis-aligned, untextured) head phantom ``ph``: atrophy by ``atrophy_mm``
    (default a seeded 1.0-1.8 mm: 1 mm widens the CSF inside the Zubal brain by about half; 0: none; :func:`widen_csf`), then a pull-back deformation
    (:func:`head_displacement_mm`: anisotropic scaling within ``1 +- scale_range`` and a random field of peak
    about ``amplitude_mm``, correlation ``corr_mm``, ``det(I + grad u) >= MIN_JACOBIAN``). All maps by nearest
    neighbour (see the module docstring); the grid is re-cropped to the deformed head plus ``margin_mm``
    (faces in ``ph.extend_faces`` kept). Deterministic for ``seed``; see the module docstring."""
    from qsmprep.simulate.anatomy import deform_phantom as pull_back

    aff = np.asarray(ph.affine, np.float64)
    if not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))):
        raise ValueError("deform_phantom needs an axis-aligned phantom grid")
    vs = np.asarray(ph.voxel_size_mm, np.float64)
    rng = np.random.default_rng([int(seed), 0xA7])
    if atrophy_mm is None:
        atrophy_mm = float(rng.uniform(1.0, 1.8))
    ph = widen_csf(ph, atrophy_mm)
    margin = int(np.ceil(margin_mm / vs.min()))
    # room for the head to grow: the scaling (about 100 mm from the centre) plus the random field's peak
    pad = int(np.ceil((scale_range * 110.0 + 1.5 * amplitude_mm) / vs.min()))
    padded, _ = _pad(ph, pad)
    centre = np.argwhere(padded.brain_mask).mean(axis=0)
    u, _ = head_displacement_mm(padded.shape, vs, centre, seed, amplitude_mm, corr_mm, scale_range)
    # pull_back's displacement is along world axes; flip the components of axes that run backwards
    sign = np.sign(np.diag(aff[:3, :3])).astype(np.float32)
    u *= sign
    out, _ = pull_back(padded, displacement=u, edge="nearest", maps_order=0)
    del u, padded
    out = _crop(out, margin, ph.extend_faces)
    return dataclasses.replace(out, extend_faces=touching_faces(out.labels))


def make_deformed_zubal_phantom(data_dir=None, seed: int = 0, downsample: int = 1, lesions: bool = False,
                                texture: bool = True, **deform_kwargs) -> Phantom:
    """A third head anatomy: the Zubal head (:func:`qsmprep.simulate.phantom.make_zubal_phantom`, true scale)
    with the red nucleus, substantia nigra and dentate grafted in (``graft_nuclei``, so all seven nuclei are
    measured) and ``lesions`` if asked, then :func:`deform_phantom` (``seed``, ``deform_kwargs``) at 1 mm,
    then block-averaged by ``downsample`` and textured (``texture``, :func:`texture_phantom`) on the final grid.
    Needs the Zubal data (``data_dir`` or ``$QSMPREP_ZUBAL_DIR``). No network of qsmprep was trained on it."""
    from qsmprep.simulate.phantom import (
        downsample_phantom,
        make_zubal_phantom,
        texture_phantom,
    )

    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    base = make_zubal_phantom(data_dir, downsample=1, lesions=lesions, seed=seed, texture=False, graft_nuclei=True)
    ph = deform_phantom(base, seed, **deform_kwargs)
    del base
    if downsample > 1:
        ph = downsample_phantom(ph, int(downsample))
    return texture_phantom(ph, seed=seed) if texture else ph
