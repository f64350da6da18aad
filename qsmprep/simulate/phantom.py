"""Numerical phantoms for QSM: a realistic head built on the MNI152 2009 templates, and a geometric one.

Susceptibility ``chi_ppm`` is SI volume susceptibility in ppm **relative to water/CSF** (CSF = 0).
Air is +9.4 ppm on that scale (air +0.36, water -9.05 ppm absolute; Schenck, Med Phys 1996;23:815),
so the phantoms carry ``chi_ambient_ppm`` (the medium that surrounds the field of view), which the
forward simulation subtracts before zero-padding (see :func:`qsmprep.simulate.signal.simulate_gre`).

Nominal tissue values (ppm relative to CSF, adult brain, 3 T) are typical literature values, rounded
and recalled rather than copied from one table (verify before quoting them): Deistung A et al.,
NeuroImage 2013;65:299 (7 T, CSF-referenced), Lim IAL et al., NeuroImage 2013;82:449 (3 T QSM atlas),
Schaefer A et al., Hum Brain Mapp 2012;33:2831 (SN about 0.10, STN about 0.06 ppm at 7 T), Li W et
al., NeuroImage 2014;94:275 (age dependence of DGM values) and the QSM Challenge 2.0 phantom
(Marques JP et al., MRM 2021;86:526):

============  ======  ===========  =====
structure     chi     R2* (1/s)    M0
============  ======  ===========  =====
CSF            0.00        2        0.95
grey matter   +0.02       15        0.80
white matter  -0.03       20        0.70
caudate       +0.06       25        0.78
putamen       +0.05       28        0.78
pallidus      +0.17       42        0.72
thalamus      +0.03       22        0.75
red nucleus   +0.12       38        0.72
SN (+STN)     +0.14       42        0.70
dentate       +0.10       35        0.72
venous blood  +0.30..0.45 45        0.55
============  ======  ===========  =====

Venous blood: Hct 0.4, Y 0.6-0.7 gives 0.3-0.45 ppm above water (Weisskoff & Kiihne, MRM
1992;24:375; Spees WM et al., MRM 2001;45:533). Cortical bone about -2 ppm relative to water
(Hopkins JA & Wehrli FW, MRM 1997;37:494); fat about +0.6 ppm (Schenck 1996). Lesions: calcification
down to -1.4 ppm and haemorrhage up to +1.4 ppm (graded set, for linearity tests). R2* values follow
Peran P et al., Brain 2007;130:2734 and Gelman N et al., Radiology 1999;210:759 (3 T), rounded.
M0 is an effective (T1-weighted steady-state) proton density in arbitrary units. GM/WM voxels mix the
nominal values by the template probabilities, so their voxel values are partial-volume mixtures;
nuclei, veins and lesions reach their nominal values in their cores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

#: Susceptibility of air relative to water (ppm).
AIR_PPM = 9.4

# label id -> (name, nominal chi ppm, M0, R2* 1/s). Ids 1-16 follow QSM Challenge 2.0 (Marques 2021).
_TISSUES: dict[int, tuple[str, float, float, float]] = {
    0: ("background_air", AIR_PPM, 0.0, 0.0),
    1: ("caudate", 0.06, 0.78, 25.0),
    2: ("globus_pallidus", 0.17, 0.72, 42.0),
    3: ("putamen", 0.05, 0.78, 28.0),
    4: ("red_nucleus", 0.12, 0.72, 38.0),
    5: ("dentate_nucleus", 0.10, 0.72, 35.0),
    6: ("substantia_nigra", 0.14, 0.70, 42.0),
    7: ("thalamus", 0.03, 0.75, 22.0),
    8: ("white_matter", -0.03, 0.70, 20.0),
    9: ("grey_matter", 0.02, 0.80, 15.0),
    10: ("csf", 0.0, 0.95, 2.0),
    11: ("venous_blood", 0.38, 0.55, 45.0),
    12: ("fat", 0.6, 0.90, 30.0),
    13: ("bone", -2.0, 0.0, 0.0),
    14: ("air_cavity", AIR_PPM, 0.0, 0.0),
    15: ("muscle_skin", 0.0, 0.50, 30.0),
}

#: Nominal properties of the head-phantom labels: ``{label: (name, chi_ppm, m0, r2star_hz)}``.
HEAD_TISSUES = dict(_TISSUES)

#: Graded lesion set (label, name, chi ppm, centre MNI mm); radius 4 mm, in centrum-semiovale WM.
_LESIONS = (
    (16, "calcification_1", -1.4, (-24.0, -24.0, 30.0)),
    (17, "calcification_2", -0.8, (-24.0, 2.0, 30.0)),
    (18, "calcification_3", -0.4, (-24.0, 28.0, 30.0)),
    (19, "haemorrhage_1", 0.4, (24.0, -24.0, 30.0)),
    (20, "haemorrhage_2", 0.8, (24.0, 2.0, 30.0)),
    (21, "haemorrhage_3", 1.4, (24.0, 28.0, 30.0)),
)
_LESION_RADIUS_MM = 4.0

# Deep grey-matter nuclei: (label, centre MNI mm, semi-axes mm, rotation about z (deg), about x (deg))
# for the right hemisphere (+x); mirrored for the left. Approximate positions in MNI152 2009 space
# read off the template (caudate head/body, putamen, pallidus, thalamus, RN, SN, dentate).
_NUCLEI = (
    (7, (11.0, -19.0, 7.0), (7.5, 14.0, 8.5), -12.0, 0.0),  # thalamus
    (1, (13.0, 13.0, 9.0), (5.5, 10.0, 8.5), 0.0, 0.0),  # caudate head
    (1, (16.0, -8.0, 20.0), (4.0, 13.0, 4.5), -10.0, -20.0),  # caudate body
    (3, (26.0, 3.0, 1.0), (5.5, 15.0, 9.5), -8.0, 0.0),  # putamen
    (2, (18.0, -4.0, -1.0), (4.2, 8.5, 5.0), -15.0, 0.0),  # globus pallidus
    (6, (11.0, -17.0, -12.0), (3.0, 8.5, 3.0), -40.0, 0.0),  # substantia nigra (+STN)
    (4, (5.0, -20.0, -8.0), (3.5, 4.0, 4.0), 0.0, 0.0),  # red nucleus
    (5, (14.0, -56.0, -34.0), (5.5, 8.5, 5.5), -30.0, 0.0),  # dentate nucleus
)

# Air cavities (centre MNI mm, semi-axes mm, air fraction): frontal, ethmoid, sphenoid, maxillary
# sinuses, nasal cavity, mastoid air cells (air fraction 0.6, rest bone).
_CAVITIES = (
    ((0.0, 83.0, 6.0), (14.0, 5.0, 10.0), 1.0),  # frontal sinus
    ((0.0, 44.0, -34.0), (11.0, 15.0, 7.0), 1.0),  # ethmoid cells
    ((0.0, 14.0, -38.0), (12.0, 10.0, 8.0), 1.0),  # sphenoid sinus
    ((29.0, 50.0, -60.0), (11.0, 15.0, 13.0), 1.0),  # maxillary sinus (right)
    ((-29.0, 50.0, -60.0), (11.0, 15.0, 13.0), 1.0),  # maxillary sinus (left)
    ((0.0, 52.0, -58.0), (8.0, 26.0, 16.0), 1.0),  # nasal cavity
    ((50.0, -34.0, -50.0), (9.0, 10.0, 11.0), 0.6),  # mastoid (right)
    ((-50.0, -34.0, -50.0), (9.0, 10.0, 11.0), 0.6),  # mastoid (left)
)

# Layers outside the intracranial envelope (mm): CSF/dura, bone, fat, muscle/skin.
_LAYERS_MM = (1.5, 8.0, 10.0, 14.0)


@dataclass
class Phantom:
    """A susceptibility phantom on a voxel grid.

    Attributes: ``chi_ppm`` (float32, ppm relative to water/CSF, whole FOV incl. air and bone),
    ``labels`` (int16), ``label_names`` ({label: name}), ``brain_mask`` (bool, brain tissue + CSF
    inside the skull), ``m0`` (float32, arbitrary units), ``r2star_hz`` (float32, 1/s),
    ``voxel_size_mm``, ``affine`` (4x4 float64, voxel -> world mm), ``label_chi_ppm`` (nominal chi per
    label), ``chi_ambient_ppm`` (chi of the medium around the FOV, subtracted before zero padding) and
    ``extend_faces``: faces ``(axis, side)`` through which the body continues beyond the FOV (the
    neck for the head phantom; side 0 = low index).
    """

    chi_ppm: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    brain_mask: np.ndarray
    m0: np.ndarray
    r2star_hz: np.ndarray
    voxel_size_mm: tuple[float, float, float]
    affine: np.ndarray
    label_chi_ppm: dict[int, float] = field(default_factory=dict)
    chi_ambient_ppm: float = 0.0
    extend_faces: tuple[tuple[int, int], ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.chi_ppm.shape)  # type: ignore[return-value]

    def label_mask(self, name_or_label) -> np.ndarray:
        """Boolean mask of one label (given by id or name)."""
        if isinstance(name_or_label, str):
            ids = [k for k, v in self.label_names.items() if v == name_or_label]
            if not ids:
                raise ValueError(f"unknown label name {name_or_label!r}; known: {sorted(self.label_names.values())}")
            name_or_label = ids[0]
        return self.labels == int(name_or_label)


# ---------------------------------------------------------------------------------------------------
# compositing helpers


class _Canvas:
    """Painter's-algorithm compositing of partial-volume objects (chi, m0, R2*, labels) on a 1 mm grid."""

    def __init__(self, shape, origin_mm, fill_label: int):
        name, chi, m0, r2 = _TISSUES[fill_label]
        self.shape = tuple(int(s) for s in shape)
        self.origin = np.asarray(origin_mm, dtype=np.float64)
        self.chi = np.full(self.shape, chi, np.float32)
        self.m0 = np.full(self.shape, m0, np.float32)
        self.r2 = np.full(self.shape, r2, np.float32)
        self.labels = np.full(self.shape, fill_label, np.int16)

    def paint(self, frac, sl, label, chi, m0, r2):
        """Composite ``frac`` (0..1, array for the slice ``sl``) of a material over the canvas."""
        frac = np.asarray(frac, dtype=np.float32)
        for arr, val in ((self.chi, chi), (self.m0, m0), (self.r2, r2)):
            sub = arr[sl]
            sub += frac * (np.float32(val) - sub)
        if label is not None:
            lab = self.labels[sl]
            lab[frac >= 0.5] = label

    def paint_label(self, frac, sl, label):
        """Composite a tissue of the label table with its nominal chi, M0 and R2*."""
        _, chi, m0, r2 = _TISSUES[label]
        self.paint(frac, sl, label, chi, m0, r2)

    def bbox(self, lo_mm, hi_mm):
        """Slices of the voxels whose centres lie in the world box [lo, hi] (mm); None if empty."""
        lo = np.floor(np.asarray(lo_mm) - self.origin).astype(int)
        hi = np.ceil(np.asarray(hi_mm) - self.origin).astype(int) + 1
        lo = np.clip(lo, 0, self.shape)
        hi = np.clip(hi, 0, self.shape)
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def coords(self, sl):
        """Broadcastable world coordinates (mm) of the voxels in ``sl``."""
        out = []
        for a, (s, o) in enumerate(zip(sl, self.origin)):
            view = [-1 if i == a else 1 for i in range(3)]
            out.append((np.arange(s.start, s.stop, dtype=np.float32) + np.float32(o)).reshape(view))
        return tuple(out)


def _rot_zx(rz_deg: float, rx_deg: float) -> np.ndarray:
    """Rotation matrix R = Rz(rz) Rx(rx) (columns = the ellipsoid's axes in world coordinates)."""
    a, b = np.radians(rz_deg), np.radians(rx_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _ellipsoid(canvas: _Canvas, centre, radii, rot=None, edge_mm: float = 1.0):
    """Soft (partial-volume) ellipsoid: returns (fraction, slices) or (None, None) when off-grid."""
    c = np.asarray(centre, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    rot = np.eye(3) if rot is None else np.asarray(rot, dtype=np.float64)
    ext = np.sqrt((rot**2) @ (r**2)) + edge_mm  # half-extent of the rotated ellipsoid along world axes
    sl = canvas.bbox(c - ext, c + ext)
    if sl is None:
        return None, None
    x, y, z = canvas.coords(sl)
    dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
    u = [(rot[0, i] * dx + rot[1, i] * dy + rot[2, i] * dz) / np.float32(r[i]) for i in range(3)]
    rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    # distance to the surface along the ray from the centre (exact for spheres)
    signed = dist * (1.0 - 1.0 / np.maximum(rho, 1e-6))
    frac = np.clip(0.5 - signed / np.float32(edge_mm), 0.0, 1.0).astype(np.float32)
    return frac, sl


def _tube(canvas: _Canvas, points, radius_mm: float):
    """Soft tube (union of capsules) along a polyline of world points (mm); (fraction, slices)."""
    p = np.asarray(points, dtype=np.float64)
    lo = p.min(axis=0) - radius_mm - 1.5
    hi = p.max(axis=0) + radius_mm + 1.5
    sl = canvas.bbox(lo, hi)
    if sl is None:
        return None, None
    x, y, z = canvas.coords(sl)
    shape = tuple(s.stop - s.start for s in sl)
    dmin = np.full(shape, np.inf, np.float32)
    for a, b in zip(p[:-1], p[1:]):
        ab = b - a
        L2 = float(ab @ ab) or 1e-12
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / np.float32(L2)
        t = np.clip(t, 0.0, 1.0)
        d2 = (x - (a[0] + t * ab[0])) ** 2 + (y - (a[1] + t * ab[1])) ** 2 + (z - (a[2] + t * ab[2])) ** 2
        np.minimum(dmin, np.sqrt(d2, dtype=np.float32), out=dmin)
    frac = np.clip(np.float32(radius_mm + 0.5) - dmin, 0.0, 1.0).astype(np.float32)
    return frac, sl


# ---------------------------------------------------------------------------------------------------
# templates


@functools.lru_cache(maxsize=1)
def _mni_templates():
    """MNI152 2009 (nilearn-bundled) T1, GM and WM at 1 mm (float32, read-only) and their affine."""
    from nilearn import datasets

    out = []
    for fn in (datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template):
        img = fn(resolution=1)
        arr = np.asarray(img.dataobj, dtype=np.float32)
        if arr.max() > 1.5:  # older nilearn versions ship 0..255 / 0..100 scaling
            arr = arr / arr.max()
        arr.setflags(write=False)
        out.append(arr)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError("unexpected MNI template affine (expected 1 mm RAS)")
    return out[0], out[1], out[2], affine


# ---------------------------------------------------------------------------------------------------
# head phantom


def make_head_phantom(
    downsample: int = 1,
    crop_margin_mm: float = 8.0,
    lesions: bool = False,
    seed: int = 0,
    fov_mm: Sequence[int] = (197, 233, 189),
    n_random_veins: int = 14,
) -> Phantom:
    """Realistic head phantom from the MNI152 2009 templates shipped with nilearn (1 mm, skull-stripped).

    GM/WM probabilities give partial-volume brain tissue (ventricles and sulci: CSF, using low T1);
    deep grey-matter nuclei are smooth ellipsoids at MNI coordinates; veins are tubes (sinuses,
    internal cerebral veins and ``n_random_veins`` seeded medullary/cortical veins); around the
    intracranial envelope follow CSF/dura (1.5 mm), a synthetic skull (6.5 mm), fat and scalp, plus a
    face/neck block with paranasal sinuses, nasal cavity, pharynx, ear canals and mastoid air cells, in
    air. ``lesions=True`` adds six graded lesions (-1.4..+1.4 ppm, labels 16-21).

    The grid is ``fov_mm`` at 1 mm (default 197x233x189, axial, RAS), centred on the head in x/y with
    ``crop_margin_mm`` of air above the vertex; the neck leaves through the bottom face
    (``extend_faces`` lists every face the head touches; a smaller ``fov_mm`` crops the head and the
    forward model then continues it through those faces too). ``downsample`` (integer)
    block-averages chi/M0/R2* (labels by majority; brain mask: blocks wholly inside) to
    ``downsample`` mm voxels. Deterministic for a ``seed``.
    """
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    downsample = int(downsample)
    if crop_margin_mm < 0:
        raise ValueError(f"crop_margin_mm must be >= 0, got {crop_margin_mm}")
    fov = tuple(int(round(f)) for f in fov_mm)
    if len(fov) != 3 or min(fov) < 120:
        raise ValueError(f"fov_mm must be three sizes >= 120 mm, got {tuple(fov_mm)}")
    rng = np.random.default_rng(seed)

    t1_t, gm_t, wm_t, aff_t = _mni_templates()
    tshape = t1_t.shape
    t_origin = aff_t[:3, 3]

    # --- grid: head centred in x/y (template box is already nearly centred), vertex + margin on top
    brain_top_mm = 82.0  # MNI152 2009 brain vertex
    head_top = brain_top_mm + _LAYERS_MM[-1]
    x0 = -np.floor((fov[0] - 1) / 2.0)
    y0 = -18.0 - np.floor((fov[1] - 1) / 2.0)
    z0 = np.floor(head_top + crop_margin_mm) - (fov[2] - 1)
    origin = np.array([x0, y0, z0])
    canvas = _Canvas(fov, origin, fill_label=0)

    # --- template tissue fractions on the canvas: integer index shift (both grids are 1 mm, axis
    # aligned); outside the template in x/y: empty; below it the medulla continues as the cord
    # (bottom slice replicated)
    shift = np.round(origin - t_origin).astype(int)
    ii = [np.arange(n) + s for n, s in zip(fov, shift)]
    inside = [(i >= 0) & (i < tn) for i, tn in zip(ii, tshape)]
    inside[2] = ii[2] < tshape[2]
    sel = np.ix_(*[np.clip(i, 0, tn - 1) for i, tn in zip(ii, tshape)])
    vmask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    t1 = np.where(vmask, t1_t[sel], 0.0).astype(np.float32)
    # ventricles/sulci: low T1 means CSF (scale tissue down between T1 0.30 and 0.50)
    tissue_scale = np.clip((t1 - np.float32(0.30)) / np.float32(0.20), 0.0, 1.0)
    gm = np.where(vmask, gm_t[sel], 0.0).astype(np.float32) * tissue_scale
    wm = np.where(vmask, wm_t[sel], 0.0).astype(np.float32) * tissue_scale
    del t1, tissue_scale
    tissue = gm + wm

    # --- intracranial envelope: brain closed over sulci, holes filled; CSF/dura layer around it
    brain_core = tissue > 0.25
    env = ndi.gaussian_filter(brain_core.astype(np.float32), 2.0) > 0.2
    env |= brain_core
    env = ndi.binary_fill_holes(env)
    dist = _outside_distance_mm(env)
    intracranial = dist <= _LAYERS_MM[0]

    # --- head: layered shells + face/neck block (soft tissue), then bone/fat/scalp by distance
    neck_face = _face_neck_mask(canvas)
    head = (dist <= _LAYERS_MM[3]) | neck_face
    full = (slice(None),) * 3
    canvas.paint_label(head.astype(np.float32), full, 15)
    canvas.paint_label(np.clip(_LAYERS_MM[2] + 0.5 - dist, 0, 1), full, 12)
    # brow ridge: thicker frontal bone where the frontal sinus sits
    frac, sl = _ellipsoid(canvas, (0.0, 82.0, 2.0), (30.0, 10.0, 20.0))
    bone_frac = np.clip(_LAYERS_MM[1] + 0.5 - dist, 0, 1)
    bone_frac[sl] = np.maximum(bone_frac[sl], frac * head[sl])
    canvas.paint_label(bone_frac, full, 13)
    del bone_frac

    # --- intracranial: CSF then GM/WM fractions (chi/M0/R2* mixed linearly by fraction)
    ic = intracranial.astype(np.float32)
    canvas.paint_label(ic, full, 10)
    g = np.where(intracranial, gm, 0.0)
    w = np.where(intracranial, wm, 0.0)
    _paint_mixture(canvas, intracranial, g, w)
    del ic

    # --- deep grey-matter nuclei (replace tissue, keep CSF partial volume)
    for lab, c, r, rz, rx in _NUCLEI:
        for sign in (1.0, -1.0):
            cc = (sign * c[0], c[1], c[2])
            rot = _rot_zx(sign * rz, rx)
            frac, sl = _ellipsoid(canvas, cc, r, rot)
            if sl is None:
                continue
            canvas.paint_label(frac * np.minimum(tissue[sl] * 1.15, 1.0) * intracranial[sl], sl, lab)

    # --- veins
    _paint_veins(canvas, env, intracranial, wm, rng, n_random_veins)
    del gm, wm

    # --- lesions
    label_names = {k: v[0] for k, v in _TISSUES.items()}
    label_chi = {k: v[1] for k, v in _TISSUES.items()}
    if lesions:
        for lab, name, chi, c in _LESIONS:
            frac, sl = _ellipsoid(canvas, c, (_LESION_RADIUS_MM,) * 3)
            m0 = 0.3 if chi < 0 else 0.55
            canvas.paint(frac, sl, lab, chi, m0, 20.0 + 60.0 * abs(chi))
            label_names[lab] = name
            label_chi[lab] = chi

    # --- air cavities (never within 2.5 mm of the intracranial space; keep a 2 mm skin)
    allowed = (dist > _LAYERS_MM[0] + 2.5) & _erode_mm(head, 2.0)
    for c, r, air in _CAVITIES:
        frac, sl = _ellipsoid(canvas, c, r)
        if sl is None:
            continue
        f = frac * allowed[sl]
        chi = air * AIR_PPM + (1 - air) * _TISSUES[13][1]
        canvas.paint(f, sl, 14, chi, 0.0, 0.0)
    # pharynx (airway down to the neck) and external ear canals (open to the outside)
    for pts, rad in (
        (((0.0, 40.0, -58.0), (0.0, 10.0, -52.0), (0.0, 2.0, -70.0), (0.0, -4.0, -120.0)), 7.0),
        (((90.0, -20.0, -44.0), (52.0, -22.0, -44.0)), 3.5),
        (((-90.0, -20.0, -44.0), (-52.0, -22.0, -44.0)), 3.5),
    ):
        frac, sl = _tube(canvas, pts, rad)
        if sl is None:
            continue
        f = frac * (dist[sl] > _LAYERS_MM[0] + 2.5)
        canvas.paint(f, sl, 14, AIR_PPM, 0.0, 0.0)
    # air outside the head keeps label 0; anything painted outside the head reverts to air
    outside = ~head
    canvas.chi[outside] = AIR_PPM
    canvas.m0[outside] = 0.0
    canvas.r2[outside] = 0.0
    canvas.labels[outside] = 0

    affine = np.eye(4)
    affine[:3, 3] = origin
    ph = Phantom(
        chi_ppm=canvas.chi,
        labels=canvas.labels,
        label_names=label_names,
        brain_mask=intracranial,
        m0=canvas.m0,
        r2star_hz=canvas.r2,
        voxel_size_mm=(1.0, 1.0, 1.0),
        affine=affine,
        label_chi_ppm=label_chi,
        chi_ambient_ppm=AIR_PPM,
        extend_faces=_touching_faces(canvas.labels),
    )
    if downsample > 1:
        ph = downsample_phantom(ph, downsample)
    return ph


def _touching_faces(labels: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Faces ``(axis, side)`` of the grid where the object (label != 0) touches the boundary."""
    faces = []
    for axis in range(3):
        for side, idx in ((0, 0), (1, -1)):
            if np.any(np.take(labels, idx, axis=axis) != 0):
                faces.append((axis, side))
    return tuple(faces)


def _paint_mixture(canvas: _Canvas, region, gm, wm):
    """Set chi/M0/R2* inside ``region`` to the GM/WM/CSF mixture and label by the largest fraction."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    tg, tw, tc = _TISSUES[9], _TISSUES[8], _TISSUES[10]
    for arr, k in ((canvas.chi, 1), (canvas.m0, 2), (canvas.r2, 3)):
        mix = gm * np.float32(tg[k]) + wm * np.float32(tw[k]) + csf * np.float32(tc[k])
        np.copyto(arr, mix.astype(np.float32), where=region)
    lab = np.where(gm >= wm, 9, 8).astype(np.int16)
    lab[csf > np.maximum(gm, wm)] = 10
    np.copyto(canvas.labels, lab, where=region)


def _outside_distance_mm(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm, 1 mm grid) from each voxel outside ``mask`` to it; 0 inside (float32).

    Computed on the bounding box grown by 20 mm; voxels further away get a large value.
    """
    nz = [np.nonzero(mask.any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    sl = tuple(slice(max(int(a[0]) - 20, 0), min(int(a[-1]) + 21, n)) for a, n in zip(nz, mask.shape))
    out = np.full(mask.shape, 1e3, np.float32)
    out[sl] = ndi.distance_transform_edt(~mask[sl]).astype(np.float32)
    return out


def _erode_mm(mask: np.ndarray, mm: float) -> np.ndarray:
    """Erode a 1 mm-grid mask by about ``mm`` (6-connected erosion, ``round(mm)`` iterations)."""
    return ndi.binary_erosion(mask, iterations=max(int(round(mm)), 1))


def _face_neck_mask(canvas: _Canvas) -> np.ndarray:
    """Soft-tissue block below the skull: face (to the nose bridge) and neck down to the FOV bottom."""
    x, y, z = canvas.coords((slice(0, canvas.shape[0]), slice(0, canvas.shape[1]), slice(0, canvas.shape[2])))
    face = ((x / 60.0) ** 2 + ((y - 12.0) / 82.0) ** 2 + ((z + 48.0) / 50.0) ** 2) <= 1.0
    # neck: elliptic cylinder below the skull base, blending into the face block
    neck = (((x / 52.0) ** 2 + ((y + 22.0) / 52.0) ** 2) <= 1.0) & (z <= -35.0)
    return face | neck


def _paint_veins(canvas: _Canvas, env, intracranial, wm, rng, n_random: int):
    """Dural sinuses, deep veins and random medullary/cortical veins as soft tubes (+0.30..0.45 ppm)."""
    ox, oy, oz = canvas.origin
    # superior sagittal sinus: 3 mm below the top of the envelope along the midline
    i_mid = int(round(-ox))
    col = env[i_mid]  # (y, z)
    has = col.any(axis=1)
    top_k = col.shape[1] - 1 - np.argmax(col[:, ::-1], axis=1)
    ys = np.nonzero(has)[0]
    sss = []
    for j in ys[::6]:
        y = j + oy
        if -95.0 <= y <= 62.0:
            sss.append((0.0, y, top_k[j] + oz - 3.0))
    # posterior: curve down to the confluence
    confluence = (0.0, -98.0, -14.0)
    if sss:
        sss = sorted(sss, key=lambda p: -p[1])
        sss.append(confluence)
    vessels = [
        (sss, 3.0),
        ([(0.0, -44.0, 5.0), (0.0, -58.0, 0.0), (0.0, -72.0, -6.0), (0.0, -86.0, -11.0), confluence], 2.0),  # straight
    ]
    galen = (0.0, -44.0, 5.0)
    for s in (1.0, -1.0):
        vessels += [
            # transverse and sigmoid sinuses
            ([confluence, (s * 25.0, -98.0, -16.0), (s * 46.0, -86.0, -20.0), (s * 56.0, -62.0, -26.0)], 3.0),
            ([(s * 56.0, -62.0, -26.0), (s * 52.0, -44.0, -40.0), (s * 44.0, -30.0, -60.0)], 3.0),
            # internal cerebral vein, basal vein of Rosenthal, thalamostriate vein
            ([(s * 3.0, 2.0, 16.0), (s * 4.0, -20.0, 16.0), (s * 2.0, -40.0, 10.0), galen], 1.2),
            ([(s * 22.0, 2.0, -12.0), (s * 20.0, -16.0, -10.0), (s * 12.0, -34.0, -2.0), galen], 1.0),
            ([(s * 16.0, 8.0, 20.0), (s * 10.0, -2.0, 18.0), (s * 3.0, 2.0, 16.0)], 0.8),
        ]
    # random medullary / cortical veins: straight segments starting in WM above the ventricles
    cand = np.flatnonzero((wm > 0.9) & intracranial)
    if n_random > 0 and cand.size:
        starts = np.unravel_index(rng.choice(cand, size=n_random, replace=False), wm.shape)
        for i in range(n_random):
            p0 = np.array([starts[0][i] + ox, starts[1][i] + oy, starts[2][i] + oz])
            v = rng.standard_normal(3)
            v /= np.linalg.norm(v)
            length = rng.uniform(15.0, 30.0)
            vessels.append(([tuple(p0), tuple(p0 + length * v)], float(rng.uniform(0.5, 0.9))))
    for pts, rad in vessels:
        if len(pts) < 2:
            continue
        frac, sl = _tube(canvas, pts, rad)
        if sl is None:
            continue
        chi = float(rng.uniform(0.30, 0.45))
        _, _, m0, r2 = _TISSUES[11]
        canvas.paint(frac * env[sl] if rad < 2.0 else frac, sl, 11, chi, m0, r2)


# ---------------------------------------------------------------------------------------------------
# downsampling


def downsample_phantom(ph: Phantom, factor: int) -> Phantom:
    """Block-average a phantom by an integer ``factor`` (chi, M0, R2* by mean; labels by majority;
    brain mask: blocks wholly inside the fine mask)."""
    f = int(factor)
    if f < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    if f == 1:
        return ph

    def blocks(a, fill):
        shape = tuple(-(-n // f) * f for n in a.shape)
        if shape != a.shape:
            pad = [(0, s - n) for s, n in zip(shape, a.shape)]
            a = np.pad(a, pad, mode="constant", constant_values=fill)
        nx, ny, nz = (s // f for s in shape)
        return a.reshape(nx, f, ny, f, nz, f).transpose(0, 2, 4, 1, 3, 5).reshape(nx, ny, nz, f**3)

    amb = ph.chi_ambient_ppm
    chi = blocks(ph.chi_ppm, amb).mean(axis=-1, dtype=np.float32)
    m0b = blocks(ph.m0, 0.0)
    m0 = m0b.mean(axis=-1, dtype=np.float32)
    # R2*: M0-weighted mean so that the echo-1 decay of the block is close to the mean decay
    r2 = (blocks(ph.r2star_hz, 0.0) * m0b).sum(axis=-1, dtype=np.float32) / np.maximum(m0b.sum(axis=-1), 1e-6)
    r2 = r2.astype(np.float32)
    del m0b
    lb = blocks(ph.labels, 0)
    best = np.zeros(lb.shape[:3], np.int16)
    best_n = np.zeros(lb.shape[:3], np.int16)
    for lab in np.unique(lb):
        n = (lb == lab).sum(axis=-1, dtype=np.int16)
        upd = n > best_n
        best[upd] = lab
        best_n[upd] = n[upd]
    # a coarse voxel is in the brain mask only when all its sub-voxels are: keeps bone/air partial
    # volumes out of the mask, so that chi * brain_mask holds brain sources only
    mask = blocks(ph.brain_mask, False).all(axis=-1)
    vs = tuple(float(v) * f for v in ph.voxel_size_mm)
    affine = ph.affine.copy()
    affine[:3, :3] = ph.affine[:3, :3] * f
    affine[:3, 3] = ph.affine[:3, :3] @ np.full(3, (f - 1) / 2.0) + ph.affine[:3, 3]
    return Phantom(
        chi_ppm=chi,
        labels=best,
        label_names=dict(ph.label_names),
        brain_mask=mask,
        m0=m0,
        r2star_hz=r2,
        voxel_size_mm=vs,
        affine=affine,
        label_chi_ppm=dict(ph.label_chi_ppm),
        chi_ambient_ppm=ph.chi_ambient_ppm,
        extend_faces=ph.extend_faces,
    )


# ---------------------------------------------------------------------------------------------------
# geometric phantom

_SHAPES_LABELS = {
    0: ("background_air", AIR_PPM, 0.0, 0.0),
    8: ("brain", -0.02, 0.75, 18.0),
    10: ("csf_sphere", 0.0, 0.95, 2.0),
    14: ("air_sphere", AIR_PPM, 0.0, 0.0),
    15: ("soft_tissue", 0.0, 0.55, 30.0),
    21: ("sphere_pos_0.10", 0.10, 0.75, 30.0),
    22: ("sphere_pos_0.20", 0.20, 0.72, 40.0),
    23: ("sphere_neg_0.10", -0.10, 0.70, 30.0),
    24: ("cylinder_parallel_0.40", 0.40, 0.55, 45.0),
    25: ("cylinder_perpendicular_0.40", 0.40, 0.55, 45.0),
}


def make_shapes_phantom(
    shape: Sequence[int] = (64, 64, 64), voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0), seed: int = 0
) -> Phantom:
    """Geometric phantom: soft-tissue ellipsoid "head" in air, an ellipsoidal "brain" (-0.02 ppm) with
    spheres (+0.10, +0.20, -0.10 ppm, CSF 0) and two +0.40 ppm cylinders (along axis 2 and axis 0),
    and an air sphere in the head outside the brain (a sinus) for a background field.

    Geometry scales with the field of view (mm); ``seed`` jitters the inclusion positions by up to
    5 % of the FOV. ``brain_mask`` is the brain ellipsoid. Deterministic for a seed.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes >= 16, got {shape}")
    vs = np.asarray(voxel_size_mm, dtype=np.float64).reshape(-1)
    if vs.size == 1:
        vs = np.repeat(vs, 3)
    if vs.size != 3 or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be three positive sizes, got {voxel_size_mm}")
    rng = np.random.default_rng(seed)
    fov = np.asarray(shape) * vs
    # world coordinates centred on the FOV
    axes = [((np.arange(n) - (n - 1) / 2.0) * v).astype(np.float32) for n, v in zip(shape, vs)]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    chi = np.full(shape, AIR_PPM, np.float32)
    m0 = np.zeros(shape, np.float32)
    r2 = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int16)
    edge = float(vs.min())

    def paint_frac(frac, lab):
        name, c, m, r = _SHAPES_LABELS[lab]
        for arr, val in ((chi, c), (m0, m), (r2, r)):
            arr += frac * (np.float32(val) - arr)
        labels[frac >= 0.5] = lab

    def ellipsoid(c, r):
        rho = np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)
        dist = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        signed = dist * (1.0 - 1.0 / np.maximum(rho, 1e-6))
        return np.clip(0.5 - signed / edge, 0.0, 1.0).astype(np.float32)

    def cylinder(c, axis, radius, half_len):
        coords = [x - c[0], y - c[1], z - c[2]]
        along = coords.pop(axis)
        rad = np.sqrt(coords[0] ** 2 + coords[1] ** 2)
        f_r = np.clip(radius + 0.5 * edge - rad, 0.0, edge) / edge
        f_l = np.clip(half_len + 0.5 * edge - np.abs(along), 0.0, edge) / edge
        return (f_r * f_l).astype(np.float32)

    jit = lambda: rng.uniform(-0.02, 0.02, 3) * fov  # noqa: E731
    paint_frac(ellipsoid((0, 0, 0), 0.47 * fov), 15)
    brain = ellipsoid((0, 0, 0), (0.30 * fov[0], 0.28 * fov[1], 0.30 * fov[2]))
    paint_frac(brain, 8)
    s = 0.07 * fov.min()
    paint_frac(ellipsoid(np.array([-0.11, -0.10, 0.09]) * fov + jit(), (s, s, s)), 21)
    paint_frac(ellipsoid(np.array([0.11, -0.10, 0.09]) * fov + jit(), (s, s, s)), 22)
    paint_frac(ellipsoid(np.array([0.0, 0.13, -0.10]) * fov + jit(), (s, s, s)), 23)
    paint_frac(ellipsoid(np.array([-0.11, 0.10, 0.0]) * fov + jit(), (0.8 * s,) * 3), 10)
    rc = max(0.04 * fov.min(), 1.5 * vs.max())
    paint_frac(cylinder(np.array([0.11, 0.11, 0.0]) * fov, 2, rc, 0.14 * fov[2]), 24)
    paint_frac(cylinder(np.array([0.0, 0.0, -0.02]) * fov, 0, rc, 0.14 * fov[0]), 25)
    # air sphere in the "head" outside the brain (like a sinus): below-front of the brain
    ra = 0.05 * fov.min()
    paint_frac(ellipsoid(np.array([0.0, 0.28, -0.28]) * fov, (ra, ra, ra)), 14)
    affine = np.diag(np.append(vs, 1.0))
    affine[:3, 3] = [float(ax[0]) for ax in axes]
    names = {k: v[0] for k, v in _SHAPES_LABELS.items()}
    chis = {k: v[1] for k, v in _SHAPES_LABELS.items()}
    return Phantom(
        chi_ppm=chi,
        labels=labels,
        label_names=names,
        brain_mask=brain >= 0.5,
        m0=m0,
        r2star_hz=r2,
        voxel_size_mm=tuple(float(v) for v in vs),
        affine=affine,
        label_chi_ppm=chis,
        chi_ambient_ppm=AIR_PPM,
        extend_faces=(),
    )
