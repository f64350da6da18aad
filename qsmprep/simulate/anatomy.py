"""Simulated anatomy for registration tests: a phantom deformed by a known smooth nonlinear deformation,
and a T1-weighted image made from the same labels.

A subject is ``deform_phantom(make_head_phantom(), seed)``: every map of the phantom is resampled at
``x + u(x)`` (``u`` a smooth random displacement in mm, a sum of a few low-frequency sinusoids plus a
small global scaling, deterministic for a seed), so the subject's anatomy is a known nonlinear
deformation of the MNI152-2009-based phantom. :func:`t1w_from_phantom` gives a T1w-like image of the
same labels (white matter bright, grey matter mid, CSF dark, fat bright, bone and air dark), so the GRE
(simulated from the same deformed phantom with :func:`qsmprep.simulate.simulate_gre`) and the T1w share
one anatomy, and the true labels of both are known.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi

from qsmprep.simulate.phantom import Phantom

__all__ = ["T1W_INTENSITY", "AnatomySubject", "smooth_displacement", "deform_phantom", "t1w_from_phantom",
           "simulate_anatomy_subject", "write_t1w"]

#: T1w-like intensity per head-phantom label (0..1): WM > DGM > GM > CSF; fat bright; bone/air dark.
T1W_INTENSITY: dict[int, float] = {
    0: 0.0, 1: 0.66, 2: 0.80, 3: 0.68, 4: 0.74, 5: 0.72, 6: 0.70, 7: 0.78, 8: 1.0, 9: 0.55,
    10: 0.12, 11: 0.30, 12: 0.95, 13: 0.05, 14: 0.0, 15: 0.42,
}
_LESION_T1W = 0.45


def smooth_displacement(shape, voxel_size_mm, seed: int = 0, amplitude_mm: float = 4.0, n_waves: int = 4,
                        wavelength_mm: tuple[float, float] = (90.0, 180.0),
                        scale: float | None = None) -> np.ndarray:
    """A smooth random displacement field (mm, float32, shape ``(*shape, 3)``, world axes of an axis-aligned
    grid): per component ``n_waves`` sinusoids of random direction, wavelength in ``wavelength_mm`` and
    phase, normalised to a peak of ``amplitude_mm``, plus a global scaling about the grid centre
    (``scale``; default a seeded value in 0.96..1.04). Deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    vs = np.asarray(voxel_size_mm, dtype=np.float64)
    coords = [(np.arange(n) - (n - 1) / 2.0) * v for n, v in zip(shape, vs)]
    grids = np.meshgrid(*coords, indexing="ij")
    u = np.zeros(tuple(shape) + (3,), np.float32)
    for c in range(3):
        comp = np.zeros(shape, np.float64)
        for _ in range(n_waves):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            lam = rng.uniform(*wavelength_mm)
            phase = rng.uniform(0, 2 * np.pi)
            comp += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * (d[0] * grids[0] + d[1] * grids[1]
                                                                 + d[2] * grids[2]) / lam + phase)
        comp *= amplitude_mm / max(np.abs(comp).max(), 1e-9)
        u[..., c] = comp
    s = float(rng.uniform(0.96, 1.04)) if scale is None else float(scale)
    for c in range(3):
        u[..., c] += (s - 1.0) * grids[c]
    return u


def deform_phantom(ph: Phantom, seed: int = 0, amplitude_mm: float = 4.0,
                   displacement: np.ndarray | None = None, edge: str = "constant",
                   maps_order: int = 1) -> tuple[Phantom, np.ndarray]:
    """The phantom resampled at ``x + u(x)`` (pull-back; ``u`` from :func:`smooth_displacement` unless
    ``displacement`` is given, mm, shape ``(*ph.shape, 3)``): labels and brain mask by nearest
    neighbour, chi/M0/R2* linearly (``maps_order=1``) or by nearest neighbour too (``maps_order=0``: every
    voxel keeps the tissue of its label; linear interpolation mixes bone and air into brain voxels next to the
    skull or sinuses). Returns ``(deformed phantom, u)``; the grid and affine are kept
    (axis-aligned phantoms only). Points pulled from outside the grid are air (``edge="constant"``) or
    the nearest edge voxel (``edge="nearest"``: a body that leaves through a face continues there)."""
    if edge not in ("constant", "nearest"):
        raise ValueError(f"edge must be 'constant' or 'nearest', got {edge!r}")
    if maps_order not in (0, 1):
        raise ValueError(f"maps_order must be 0 (nearest) or 1 (linear), got {maps_order!r}")
    aff = np.asarray(ph.affine, dtype=np.float64)
    if not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))):
        raise ValueError("deform_phantom needs an axis-aligned phantom grid")
    vs = np.abs(np.diag(aff[:3, :3]))
    u = smooth_displacement(ph.shape, vs, seed, amplitude_mm) if displacement is None else np.asarray(displacement)
    if u.shape != tuple(ph.shape) + (3,):
        raise ValueError(f"displacement must have shape {tuple(ph.shape) + (3,)}, got {u.shape}")
    idx = np.indices(ph.shape, dtype=np.float32)
    sign = np.sign(np.diag(aff[:3, :3]))
    coords = np.stack([idx[c] + u[..., c] * np.float32(sign[c] / vs[c]) for c in range(3)])
    del idx

    def pull(a, order, fill):
        return ndi.map_coordinates(a, coords, order=order, mode=edge, cval=fill, prefilter=False)

    out = dataclasses.replace(
        ph,
        chi_ppm=pull(np.asarray(ph.chi_ppm, np.float32), maps_order, ph.chi_ambient_ppm).astype(np.float32),
        labels=pull(np.asarray(ph.labels), 0, 0).astype(np.int16),
        brain_mask=pull(np.asarray(ph.brain_mask, np.uint8), 0, 0).astype(bool),
        m0=pull(np.asarray(ph.m0, np.float32), maps_order, 0.0).astype(np.float32),
        r2star_hz=pull(np.asarray(ph.r2star_hz, np.float32), maps_order, 0.0).astype(np.float32),
        label_names=dict(ph.label_names),
        label_chi_ppm=dict(ph.label_chi_ppm),
    )
    return out, u


def t1w_from_phantom(ph: Phantom, seed: int = 0, noise: float = 0.02, blur_mm: float = 0.7,
                     bias: float = 0.1) -> np.ndarray:
    """A T1w-like image (float32, 0..~1 scaled to 0..1000) of a phantom's labels (:data:`T1W_INTENSITY`;
    lesions 0.45): Gaussian blur of ``blur_mm`` (partial volume), a smooth multiplicative bias field of
    +-``bias`` and Gaussian noise of ``noise`` (fraction of WM). Deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    lab = np.asarray(ph.labels)
    lut = np.full(int(lab.max()) + 1, _LESION_T1W, np.float32)
    for k, v in T1W_INTENSITY.items():
        if k < lut.size:
            lut[k] = v
    img = lut[np.clip(lab, 0, None)]
    vs = np.asarray(ph.voxel_size_mm, dtype=np.float64)
    if blur_mm > 0:
        img = ndi.gaussian_filter(img, blur_mm / vs)
    if bias:
        shape = img.shape
        coords = [np.linspace(-1, 1, n) for n in shape]
        g = np.meshgrid(*coords, indexing="ij", sparse=True)
        a = rng.normal(size=3)
        img = img * (1.0 + bias * np.tanh(a[0] * g[0] + a[1] * g[1] + a[2] * g[2])).astype(np.float32)
    if noise:
        img = img + rng.normal(scale=noise, size=img.shape).astype(np.float32) * (lab > 0)
    return (np.clip(img, 0, None) * 1000.0).astype(np.float32)


@dataclasses.dataclass
class AnatomySubject:
    """One simulated subject of :func:`simulate_anatomy_subject`: the deformed 1 mm phantom, its T1w (and
    labels) on the T1w grid, the GRE simulation (whose ``labels`` are on the GRE grid) and the displacement."""

    phantom: Phantom
    t1w: np.ndarray
    t1w_labels: np.ndarray
    t1w_affine: np.ndarray
    gre: object
    displacement_mm: np.ndarray


def simulate_anatomy_subject(ph: Phantom, seed: int, amplitude_mm: float = 4.0, t1w_downsample: int = 1,
                             gre_downsample: int = 2, tilt_deg: float = 8.0,
                             tilt_axis=(1.0, 0.4, 0.0), **simulate_kwargs) -> AnatomySubject:
    """A subject whose anatomy is ``ph`` (the 1 mm head phantom) deformed by a seeded smooth deformation: the
    T1w (``t1w_downsample`` mm, axial) and the GRE (``gre_downsample`` mm, tilted by ``tilt_deg`` about
    ``tilt_axis``, so GRE -> T1w is a real rigid transform) of the same anatomy."""
    from qsmprep.simulate.phantom import downsample_phantom
    from qsmprep.simulate.signal import simulate_gre

    sub, u = deform_phantom(ph, seed=seed, amplitude_mm=amplitude_mm)
    tp = downsample_phantom(sub, t1w_downsample) if t1w_downsample > 1 else sub
    t1w = t1w_from_phantom(tp, seed=seed)
    gp = downsample_phantom(sub, gre_downsample) if gre_downsample > 1 else sub
    gre = simulate_gre(gp, tilt_deg=tilt_deg, tilt_axis=tilt_axis, seed=seed, **simulate_kwargs)
    return AnatomySubject(sub, t1w, np.asarray(tp.labels), np.asarray(tp.affine), gre, u)


def write_t1w(bids_dir, subject: str, t1w: np.ndarray, affine: np.ndarray, labels: np.ndarray | None = None,
              session: str | None = None, label_names: dict | None = None) -> list:
    """Write ``sub-<s>/[ses-<t>/]anat/sub-<s>[_ses-<t>]_T1w.nii.gz`` (+ JSON) into a raw BIDS dataset and, with
    ``labels``, the true labels on the T1w grid as ``derivatives/qsmprep-simulate/.../<prefix>_space-T1w_dseg``
    (+ ``.tsv``). Returns the written paths."""
    import json
    from pathlib import Path

    import nibabel as nib

    root = Path(bids_dir)
    rel = Path(f"sub-{subject}") / (f"ses-{session}" if session else "") / "anat"
    prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    written = []
    img = nib.Nifti1Image(np.asarray(t1w, np.float32), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    out = root / rel / f"{prefix}_T1w.nii.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, out)
    (root / rel / f"{prefix}_T1w.json").write_text(json.dumps(
        {"MagneticFieldStrength": 3.0, "Manufacturer": "qsmprep-simulate", "MRAcquisitionType": "3D",
         "Description": "simulated T1w-like image of the phantom labels (qsmprep.simulate.anatomy)"}, indent=2))
    written += [out, root / rel / f"{prefix}_T1w.json"]
    if labels is not None:
        d = root / "derivatives" / "qsmprep-simulate" / rel
        d.mkdir(parents=True, exist_ok=True)
        lab = nib.Nifti1Image(np.asarray(labels, np.int16), affine)
        nib.save(lab, d / f"{prefix}_space-T1w_dseg.nii.gz")
        rows = ["index\tname"] + [f"{k}\t{v}" for k, v in sorted((label_names or {}).items())]
        (d / f"{prefix}_space-T1w_dseg.tsv").write_text("\n".join(rows) + "\n")
        written += [d / f"{prefix}_space-T1w_dseg.nii.gz", d / f"{prefix}_space-T1w_dseg.tsv"]
    return written
