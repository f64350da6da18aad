"""Numerical phantoms for QSM: heads built on the MNI152 2009 templates and on the Zubal segmented head, and a
geometric one.

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

Tissues outside the brain that only some anatomies label: eye (vitreous: water, chi 0, M0 0.95, long T2*,
R2* 4/s) and bone marrow (cancellous bone of the vertebrae: about 20 % bone at -2 ppm and marrow about half
fat at +0.6 ppm give about -0.3 ppm; trabecular susceptibility gradients raise R2* to about 90/s at 3 T,
Wehrli FW et al., Radiology 1991;179:615; M0 0.55).

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
    # tissue outside the brain that only some anatomies have (ids after the lesions 16-21 and the shapes 21-25)
    26: ("eye", 0.0, 0.95, 4.0),
    27: ("bone_marrow", -0.3, 0.55, 90.0),
}

#: The MNI head uses the ids up to here (and its lesions); larger ids are tissues of other anatomies.
_MNI_MAX_LABEL = 15

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
    texture: bool = False,
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
    ``downsample`` mm voxels. ``texture=True`` adds smooth variation inside each tissue class on the
    final grid (:func:`texture_phantom`: label means exact there; off by default: the accuracy bounds of the tests and of the shipped
    networks were set on the untextured head). Deterministic for a ``seed``.
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
    label_names = {k: v[0] for k, v in _TISSUES.items() if k <= _MNI_MAX_LABEL}
    label_chi = {k: v[1] for k, v in _TISSUES.items() if k <= _MNI_MAX_LABEL}
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
    return _finish(canvas, intracranial, label_names, label_chi, (1.0, 1.0, 1.0), affine, downsample, texture, seed)


def _finish(canvas: "_Canvas", brain: np.ndarray, label_names: dict, label_chi: dict, voxel_size_mm, affine,
            downsample: int, texture: bool, seed: int) -> "Phantom":
    """The :class:`Phantom` of a painted canvas (air outside, the faces the head touches continued by the
    forward model), block-averaged by ``downsample`` and textured when asked."""
    ph = Phantom(
        chi_ppm=canvas.chi,
        labels=canvas.labels,
        label_names=dict(sorted(label_names.items())),
        brain_mask=brain,
        m0=canvas.m0,
        r2star_hz=canvas.r2,
        voxel_size_mm=tuple(float(v) for v in voxel_size_mm),
        affine=affine,
        label_chi_ppm=dict(sorted(label_chi.items())),
        chi_ambient_ppm=AIR_PPM,
        extend_faces=touching_faces(canvas.labels),
    )
    if downsample > 1:
        ph = downsample_phantom(ph, downsample)
    if texture:
        ph = texture_phantom(ph, seed=seed)
    return ph


def touching_faces(labels: np.ndarray) -> tuple[tuple[int, int], ...]:
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
    vessels += _random_vein_paths((wm > 0.9) & intracranial, canvas.origin, rng, n_random)
    for pts, rad in vessels:
        if len(pts) < 2:
            continue
        frac, sl = _tube(canvas, pts, rad)
        if sl is None:
            continue
        chi = float(rng.uniform(0.30, 0.45))
        _, _, m0, r2 = _TISSUES[11]
        canvas.paint(frac * env[sl] if rad < 2.0 else frac, sl, 11, chi, m0, r2)


def _random_vein_paths(start_mask, origin, rng, n: int, scale: float = 1.0):
    """``n`` seeded straight vein segments ([p0, p1], radius) starting in ``start_mask`` (world mm on the
    canvas grid ``index + origin``): length 15-30 mm, radius 0.5-0.9 mm, both times ``scale`` (grid units
    per mm)."""
    cand = np.flatnonzero(start_mask)
    out = []
    if n <= 0 or not cand.size:
        return out
    ox, oy, oz = origin
    starts = np.unravel_index(rng.choice(cand, size=min(n, cand.size), replace=False), start_mask.shape)
    for i in range(len(starts[0])):
        p0 = np.array([starts[0][i] + ox, starts[1][i] + oy, starts[2][i] + oz])
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        length = rng.uniform(15.0, 30.0) * scale
        out.append(([tuple(p0), tuple(p0 + length * v)], float(rng.uniform(0.5, 0.9)) * scale))
    return out


# ---------------------------------------------------------------------------------------------------
# texture

#: Standard deviation (ppm) of the smooth chi texture per tissue label (0: none). About 10-20 % of the
#: nominal contrast in the nuclei, +-0.01 ppm in GM/WM (cf. the 0.02 ppm voxel-wise spread of Biondetti
#: et al. 2021 and the within-structure iron gradients of Li W et al., NeuroImage 2014;94:275);
#: CSF stays uniform (the usual reference region). Lesions and air carry none.
TEXTURE_CHI_SD_PPM: dict[int, float] = {
    1: 0.012, 2: 0.025, 3: 0.012, 4: 0.02, 5: 0.02, 6: 0.02, 7: 0.01, 8: 0.01, 9: 0.01, 10: 0.0,
    11: 0.03, 12: 0.02, 13: 0.1, 14: 0.0, 15: 0.01, 26: 0.0, 27: 0.05,
}
#: Relative standard deviation of the R2* and M0 textures in every tissue label (not air, not lesions).
TEXTURE_R2STAR_CV = 0.05
TEXTURE_M0_CV = 0.02


def smooth_noise(shape, voxel_size_mm, corr_mm: float, rng) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field (float32) with a Gaussian autocorrelation of standard
    deviation ``corr_mm``: white noise filtered (sigma ``corr_mm / sqrt 2``) on a grid up to sigma coarse,
    then linearly interpolated (fast for whole heads)."""
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,))
    sigma_mm = float(corr_mm) / np.sqrt(2.0)
    f = [max(1, int(sigma_mm // v)) for v in vs]
    cshape = tuple(-(-int(n) // fi) + 1 for n, fi in zip(shape, f))
    c = rng.standard_normal(cshape, dtype=np.float32)
    c = ndi.gaussian_filter(c, [sigma_mm / (v * fi) for v, fi in zip(vs, f)], mode="wrap")
    out = ndi.zoom(c, [int(n) / cn for n, cn in zip(shape, cshape)], order=1, output=np.float32, grid_mode=False)
    out -= np.float32(out.mean())
    out /= np.float32(max(float(out.std()), 1e-12))
    return out


def _label_means(values: np.ndarray, index: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of ``values`` within each label (``index``: flat labels as intp; ``counts``: their bincount)."""
    tot = np.bincount(index, weights=values.ravel(), minlength=counts.size)
    return (tot / np.maximum(counts, 1)).astype(np.float32)


def texture_phantom(
    ph: Phantom,
    seed: int = 0,
    corr_mm: float = 4.0,
    chi_sd_ppm: dict[int, float] | None = None,
    r2star_cv: float = TEXTURE_R2STAR_CV,
    m0_cv: float = TEXTURE_M0_CV,
) -> Phantom:
    """A copy of ``ph`` with smooth random variation of chi, R2* and M0 inside each tissue label.

    Each map gets ``amplitude[label] * (n - mean_label(n))`` of a seeded Gaussian random field ``n``
    (:func:`smooth_noise`, correlation ``corr_mm``), so every label keeps its mean chi/R2*/M0 exactly
    and ``label_chi_ppm`` stays the per-label truth. chi amplitudes: ``chi_sd_ppm`` (default
    :data:`TEXTURE_CHI_SD_PPM`; labels not listed, e.g. lesions, get none); R2* and M0: ``r2star_cv`` and
    ``m0_cv`` times the label's mean. The R2* field is correlated with the chi field (r = 0.7, iron
    raises both); the M0 field is independent. Labels named ``background_air``/``air_cavity`` are left
    alone. Deterministic for a ``seed``.
    """
    if corr_mm <= 0:
        raise ValueError(f"corr_mm must be positive, got {corr_mm}")
    rng = np.random.default_rng([int(seed), 0x7E57])
    labels = np.asarray(ph.labels)
    if labels.min() < 0:
        raise ValueError("labels must be >= 0")
    n_lut = int(labels.max()) + 1
    table = TEXTURE_CHI_SD_PPM if chi_sd_ppm is None else chi_sd_ppm
    air = {k for k, v in ph.label_names.items() if v in ("background_air", "air_cavity")}
    chi_amp = np.zeros(n_lut, np.float32)
    tissue = np.zeros(n_lut, bool)
    for lab in range(n_lut):
        if lab in ph.label_names and lab not in air:
            chi_amp[lab] = table.get(lab, 0.0)
            tissue[lab] = lab in table
    index = labels.ravel().astype(np.intp)
    counts = np.bincount(index, minlength=n_lut)
    r2_amp = np.where(tissue, r2star_cv * _label_means(ph.r2star_hz, index, counts), 0.0).astype(np.float32)
    m0_amp = np.where(tissue, m0_cv * _label_means(ph.m0, index, counts), 0.0).astype(np.float32)

    def textured(base, amp, noise):
        # base + amp * (noise - label mean of noise): every label keeps its mean
        shift = amp * _label_means(noise, index, counts)
        return base + (amp[labels] * noise - shift[labels])

    n1 = smooth_noise(labels.shape, ph.voxel_size_mm, corr_mm, rng)
    n2 = smooth_noise(labels.shape, ph.voxel_size_mm, corr_mm, rng)
    chi = textured(ph.chi_ppm, chi_amp, n1)
    n1 *= np.float32(0.7)
    n1 += np.float32(np.sqrt(1 - 0.49)) * n2
    r2 = textured(ph.r2star_hz, r2_amp, n1)
    del n1
    m0 = textured(ph.m0, m0_amp, n2)
    del n2
    return Phantom(
        chi_ppm=chi.astype(np.float32, copy=False),
        labels=ph.labels,
        label_names=dict(ph.label_names),
        brain_mask=ph.brain_mask,
        m0=np.maximum(m0, np.float32(0.0)).astype(np.float32, copy=False),
        r2star_hz=np.maximum(r2, np.float32(0.0)).astype(np.float32, copy=False),
        voxel_size_mm=ph.voxel_size_mm,
        affine=ph.affine,
        label_chi_ppm=dict(ph.label_chi_ppm),
        chi_ambient_ppm=ph.chi_ambient_ppm,
        extend_faces=ph.extend_faces,
    )


# ---------------------------------------------------------------------------------------------------
# Zubal head

#: Environment variable naming the folder of the Zubal files (the data are not shipped with qsmprep).
ZUBAL_DIR_ENV = "QSMPREP_ZUBAL_DIR"
ZUBAL_LABELS_FILE = "zubal_labels_1mm.nii.gz"
ZUBAL_BRAINMASK_FILE = "zubal_brainmask_1mm.nii.gz"

# Zubal label index (Zubal IG et al., Med Phys 1994;21:299, as listed in the scripts of Biondetti E et al.,
# bioRxiv 2021.06.14.448385) -> tissue id of _TISSUES. 104 ("sinuses/mouth cavity") is air outside the
# brain mask and venous blood (dural sinuses) inside it; brain tissue outside the mask is soft tissue.
_ZUBAL_TISSUE = {
    1: 15,  # skin
    2: 10,  # CSF
    3: 8,  # spinal cord
    4: 13,  # skull
    5: 27,  # spine (vertebrae: cancellous bone with marrow)
    9: 15,  # skeletal muscle
    15: 14,  # pharynx (airway)
    22: 12,  # fat
    23: 11,  # blood pool (sinuses, jugular veins, carotids: taken as venous)
    26: 8,  # fornix
    30: 15,  # cartilage
    70: 27,  # dens of the axis
    71: 13,  # jaw bone
    72: 15,  # parotid gland
    74: 15,  # lacrimal glands
    75: 10,  # spinal canal
    76: 13,  # hard palate
    77: 9,  # cerebellum
    78: 15,  # tongue
    81: 13,  # horn of the mandible
    82: 15,  # nasal septum
    83: 8,  # white matter
    84: 11,  # superior sagittal sinus
    85: 8,  # medulla oblongata
    89: 9,  # frontal lobes
    91: 8,  # pons
    92: 10,  # third ventricle
    95: 9,  # occipital lobes
    96: 9,  # hippocampus
    97: 9,  # pituitary gland
    98: 12,  # fat around the skull
    99: 9,  # uncus
    100: 15,  # turbinates
    101: 1,  # caudate nucleus
    102: 13,  # zygoma
    103: 9,  # insular cortex
    104: 14,  # sinuses / mouth cavity
    105: 3,  # putamen
    106: 15,  # optic nerve
    107: 8,  # internal capsule
    108: 8,  # septum pellucidum
    109: 7,  # thalamus
    110: 26,  # eyeball
    111: 8,  # corpus callosum
    112: 9,  # frontal lobes (special region)
    113: 10,  # cerebral falx
    114: 9,  # temporal lobes
    115: 10,  # fourth ventricle
    116: 26,  # frontal portion of the eyes
    117: 9,  # parietal lobes
    118: 9,  # amygdala
    119: 26,  # eye
    120: 2,  # globus pallidus
    121: 26,  # lens
    122: 10,  # cerebral aqueduct
    123: 10,  # lateral ventricles
    124: 9,  # prefrontal lobes
    125: 13,  # teeth
}
# tissue ids that only exist inside the brain mask (elsewhere they become soft tissue)
_BRAIN_ONLY = (1, 2, 3, 4, 5, 6, 7, 8, 9)


def zubal_data_dir(data_dir=None):
    """Folder of the Zubal files: ``data_dir``, else ``$QSMPREP_ZUBAL_DIR``. Raises FileNotFoundError (saying
    what is missing) when neither holds ``zubal_labels_1mm.nii.gz`` and ``zubal_brainmask_1mm.nii.gz``."""
    import os
    from pathlib import Path

    d = data_dir if data_dir is not None else os.environ.get(ZUBAL_DIR_ENV)
    if not d:
        raise FileNotFoundError(
            f"Zubal head data: pass data_dir or set ${ZUBAL_DIR_ENV} to the folder holding {ZUBAL_LABELS_FILE} "
            f"and {ZUBAL_BRAINMASK_FILE} (not shipped with qsmprep)"
        )
    folder = Path(d).expanduser()
    missing = [f for f in (ZUBAL_LABELS_FILE, ZUBAL_BRAINMASK_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Zubal head data: {', '.join(missing)} not found in {folder}")
    return folder


#: spacing (mm) of the Zubal files' voxels in the real head: the original phantom's 1.1 x 1.1 x 1.4 mm voxels
#: (as commonly cited for the Zubal head) upsampled by 1.5 into the files, which call them 1 mm. At that
#: scale the brain mask holds 1.56 l (3.24 l at the files' nominal 1 mm, twice an adult brain).
ZUBAL_FILE_SPACING_MM = (1.1 / 1.5, 1.1 / 1.5, 1.4 / 1.5)


@functools.lru_cache(maxsize=2)
def _zubal_arrays(folder: str, true_scale: bool = True):
    """Zubal labels (uint8) and brain mask (bool), read-only, and the file affine; ``true_scale``
    resamples them (nearest neighbour) from :data:`ZUBAL_FILE_SPACING_MM` to a 1 mm grid."""
    import nibabel as nib

    limg = nib.load(f"{folder}/{ZUBAL_LABELS_FILE}")
    mimg = nib.load(f"{folder}/{ZUBAL_BRAINMASK_FILE}")
    labels = np.asarray(limg.dataobj)
    mask = np.asarray(mimg.dataobj) > 0
    aff = np.asarray(limg.affine, dtype=np.float64)
    if labels.ndim != 3 or labels.shape != mask.shape:
        raise ValueError(f"Zubal labels {labels.shape} and brain mask {mask.shape} must be 3D of one shape")
    if not np.allclose(aff[:3, :3], np.eye(3)) or labels.min() < 0 or labels.max() > 255:
        raise ValueError("unexpected Zubal label file (expected 1 mm, no rotation, labels 0-255)")
    labels = labels.astype(np.uint8)
    if true_scale:
        zoom = np.asarray(ZUBAL_FILE_SPACING_MM)
        labels = ndi.zoom(labels, zoom, order=0, mode="nearest", grid_mode=True)
        mask = ndi.zoom(mask.astype(np.uint8), zoom, order=0, mode="nearest", grid_mode=True) > 0
        aff = aff.copy()
        aff[:3, 3] = aff[:3, 3] * zoom
    unknown = sorted(set(np.unique(labels).tolist()) - set(_ZUBAL_TISSUE) - {0})
    if unknown:
        raise ValueError(f"unknown Zubal labels {unknown}")
    for a in (labels, mask):
        a.setflags(write=False)
    return labels, mask, aff


def _zubal_lesion_centres(wm_core: np.ndarray, top_of: np.ndarray, n_side: int = 3):
    """Centres (voxel indices) of ``n_side`` lesions per hemisphere (axis-0 halves) in deep WM above the
    level ``top_of`` (a mask whose mean height is the floor): nearest points of ``wm_core`` to three
    anterior-posterior quantiles at the median height; low axis-0 half first."""
    pts = np.argwhere(wm_core & (np.arange(wm_core.shape[2]) > np.argwhere(top_of)[:, 2].mean())[None, None, :])
    if len(pts) < 2 * n_side:
        raise RuntimeError("no room for the lesions in the white matter")
    mid = np.median(pts[:, 0])
    out = []
    for half in (pts[pts[:, 0] < mid], pts[pts[:, 0] >= mid]):
        x, z = np.median(half[:, 0]), np.median(half[:, 2])
        for q in np.linspace(0.25, 0.75, n_side):
            target = np.array([x, np.quantile(half[:, 1], q), z])
            out.append(half[np.argmin(((half - target) ** 2).sum(axis=1))].astype(np.float64))
    return out


#: Nuclei the Zubal head has (landmarks of the MNI -> Zubal map) and the ones it lacks (grafted).
_LANDMARK_NUCLEI = (1, 2, 3, 7)
_GRAFT_NUCLEI = (4, 5, 6)


def _mni_nucleus_centroids() -> dict[tuple[int, int], np.ndarray]:
    """Centroid (MNI mm) of each nucleus of :data:`_NUCLEI` per hemisphere ``(label, +1 right / -1 left)``:
    the volume-weighted mean of its ellipsoid centres (the caudate is two ellipsoids)."""
    acc: dict[tuple[int, int], list] = {}
    for lab, c, r, _, _ in _NUCLEI:
        for sign in (1, -1):
            a = acc.setdefault((lab, sign), [np.zeros(3), 0.0])
            vol = float(np.prod(r))
            a[0] += vol * np.array([sign * c[0], c[1], c[2]])
            a[1] += vol
    return {k: v[0] / v[1] for k, v in acc.items()}


def similarity_fit(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ s R src + t`` (scale, rotation, translation) of paired points
    (n x 3), after Umeyama S, IEEE TPAMI 1991;13:376. Returns ``(s, R, t)``."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - ms, dst - md
    u, sv, vt = np.linalg.svd(b.T @ a / len(src))
    e = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rot = u @ e @ vt
    scale = float(np.trace(np.diag(sv) @ e) / (a**2).sum(axis=1).mean())
    return scale, rot, md - scale * rot @ ms


def _graft_nuclei(canvas: _Canvas, brain: np.ndarray, host: np.ndarray) -> None:
    """Paint the red nucleus, substantia nigra and dentate nucleus of :data:`_NUCLEI` onto a head that lacks
    them, placed by a similarity map MNI mm -> canvas grid fitted (:func:`similarity_fit`) to the centroids of
    caudate, pallidus, putamen and thalamus per hemisphere (8 landmarks both heads have; the high index half
    of axis 0 is the right, +x, hemisphere). A full affine is not used: these landmarks span only about 12 mm
    vertically, so its vertical scale is ill-determined (0.41 on the Zubal head) and the dentate, 40 mm
    below them, would land far off; the similarity takes its one scale from the 50 mm left-right and 30 mm
    front-back spread. Each graft replaces tissue only where ``host`` (brain parenchyma, no nucleus, CSF or
    vessel) and ``brain`` hold, as the MNI nuclei keep CSF partial volume."""
    mni = _mni_nucleus_centroids()
    mid = float(np.argwhere(brain)[:, 0].mean())
    src, dst = [], []
    for lab in _LANDMARK_NUCLEI:
        pts = np.argwhere(canvas.labels == lab)
        for sign in (1, -1):
            half = pts[(pts[:, 0] >= mid) if sign > 0 else (pts[:, 0] < mid)]
            if len(half) < 20:
                raise RuntimeError(f"no landmark {_TISSUES[lab][0]} in the {'right' if sign > 0 else 'left'} hemisphere")
            src.append(mni[(lab, sign)])
            dst.append(half.mean(axis=0) + canvas.origin)
    s, rot, t = similarity_fit(np.array(src), np.array(dst))
    for lab, c, r, rz, rx in _NUCLEI:
        if lab not in _GRAFT_NUCLEI:
            continue
        for sign in (1.0, -1.0):
            centre = s * rot @ np.array([sign * c[0], c[1], c[2]]) + t
            frac, sl = _ellipsoid(canvas, centre, tuple(s * np.asarray(r)), rot @ _rot_zx(sign * rz, rx))
            if sl is None:
                continue
            canvas.paint_label(frac * (host[sl] & brain[sl]), sl, lab)


def make_zubal_phantom(
    data_dir=None,
    downsample: int = 1,
    lesions: bool = False,
    seed: int = 0,
    texture: bool = True,
    crop_margin_mm: float = 8.0,
    fov_mm: Sequence[int] | None = None,
    n_random_veins: int = 14,
    voxel_size_mm: float | Sequence[float] = 1.0,
    true_scale: bool = True,
    graft_nuclei: bool = False,
) -> Phantom:
    """Head phantom from the Zubal segmented head (Zubal et al., Med Phys 1994;21:299) in the conventions
    of :func:`make_head_phantom` (chi ppm relative to CSF, ``chi_ambient_ppm`` air, label ids and
    names of the MNI head, M0/R2* of its tissue table).

    Data (not shipped): ``zubal_labels_1mm.nii.gz`` and ``zubal_brainmask_1mm.nii.gz`` (384x384x192, the
    1.5 mm phantom upsampled by Biondetti et al., bioRxiv 2021.06.14.448385) from ``data_dir`` or
    ``$QSMPREP_ZUBAL_DIR``. Orientation from the anatomy: array axis 1 runs posterior -> anterior (eyes,
    nose), axis 2 inferior -> superior (spine, jaw at the bottom), so B0 lies along axis 2; left/right
    cannot be told from the (symmetric) anatomy and axis 0 is taken as left -> right (RAS affine).
    Labels: caudate, putamen, globus pallidus, thalamus, GM, WM, CSF, venous blood (sagittal sinus,
    dural sinuses, blood pool), fat, bone, bone marrow (spine), muscle/skin, eyes, air cavities
    (pharynx, sinuses, mouth/nasal cavity); the Zubal head has no red nucleus, substantia nigra or
    dentate nucleus. ``brain_mask`` is the Zubal brain mask: the intracranial space (brain, CSF, dural
    sinuses) and the spinal canal, as the MNI head's. ``n_random_veins`` seeded medullary veins are added
    in the WM; ``lesions=True`` puts the six graded lesions of the MNI head in deep WM.

    Grid: the head's bounding box plus ``crop_margin_mm`` (the jaw/neck touches the bottom face and
    continues beyond it in the forward model: ``extend_faces``); ``fov_mm`` instead gives a fixed field
    of view, centred on the head in x/y with the margin above the vertex (the bottom slice replicated
    below the neck). ``true_scale`` (default) first resamples the files to the real head size
    (:data:`ZUBAL_FILE_SPACING_MM` to 1 mm; brain 1.56 l); without it the files' nominal 1 mm voxels
    make a head 1.35 times too large (brain 180 mm left-right, 3.24 l). ``voxel_size_mm`` then sets the
    grid's voxel size. ``texture`` (default on) adds smooth variation within tissue
    classes on the final grid (:func:`texture_phantom`); ``downsample`` block-averages as
    :func:`downsample_phantom`. ``graft_nuclei=True`` adds the red nucleus, substantia nigra and dentate
    nucleus of the MNI head, mapped by a similarity fitted to the nuclei both heads have
    (:func:`_graft_nuclei`), so that all seven nuclei are measured (default off: the Zubal head as drawn).
    Deterministic for a ``seed``.
    """
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    if crop_margin_mm < 0:
        raise ValueError(f"crop_margin_mm must be >= 0, got {crop_margin_mm}")
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be positive, got {voxel_size_mm}")
    zl, zm, zaff = _zubal_arrays(str(zubal_data_dir(data_dir)), bool(true_scale))
    rng = np.random.default_rng(seed)

    # --- grid: head bounding box + margin; the bottom of the head (jaw, neck) on the bottom face
    head_idx = [np.nonzero((zl > 0).any(axis=tuple(j for j in range(3) if j != i)))[0] for i in range(3)]
    lo = np.array([a[0] for a in head_idx])
    hi = np.array([a[-1] for a in head_idx])
    margin = np.ceil(crop_margin_mm / vs).astype(int)
    if fov_mm is None:
        start = lo - margin
        stop = hi + 1 + margin
        start[2] = lo[2]
    else:
        n = np.array([int(round(f)) for f in fov_mm])
        if n.size != 3 or np.any(n * vs < 120):
            raise ValueError(f"fov_mm must be three sizes >= 120 mm, got {tuple(fov_mm)}")
        n = np.round(n / vs).astype(int)
        start = np.round((lo + hi) / 2.0 - (n - 1) / 2.0).astype(int)
        stop = start + n
        stop[2] = hi[2] + 1 + margin[2]
        start[2] = stop[2] - n[2]
    ii = [np.arange(a, b) for a, b in zip(start, stop)]
    inside = [(i >= 0) & (i < n) for i, n in zip(ii, zl.shape)]
    ii[2] = np.maximum(ii[2], lo[2])  # below the cut: the bottom slice continues
    inside[2] = ii[2] < zl.shape[2]
    sel = np.ix_(*[np.clip(i, 0, n - 1) for i, n in zip(ii, zl.shape)])
    valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    zlab = np.where(valid, zl[sel], np.uint8(0))
    brain = valid & zm[sel]
    del valid

    # --- Zubal labels -> tissue ids
    lut = np.zeros(256, np.int16)
    for k, v in _ZUBAL_TISSUE.items():
        lut[k] = v
    labels = lut[zlab]
    labels[(zlab == 104) & brain] = 11  # dural sinuses
    labels[np.isin(labels, _BRAIN_ONLY) & ~brain] = 15
    del zlab
    n_lut = max(_TISSUES) + 1
    chi_lut, m0_lut, r2_lut = (np.zeros(n_lut, np.float32) for _ in range(3))
    for k, (_, c, m, r) in _TISSUES.items():
        chi_lut[k], m0_lut[k], r2_lut[k] = c, m, r
    canvas = _Canvas((1, 1, 1), (0.0, 0.0, 0.0), fill_label=0)
    canvas.shape = labels.shape
    canvas.chi, canvas.m0, canvas.r2, canvas.labels = chi_lut[labels], m0_lut[labels], r2_lut[labels], labels
    present = sorted(int(k) for k in np.unique(labels))
    if graft_nuclei:
        _graft_nuclei(canvas, brain, np.isin(labels, (8, 9)))
        present = sorted(set(present) | set(_GRAFT_NUCLEI))

    # --- random medullary veins (grid units: voxels)
    scale = 1.0 / float(vs.mean())
    wm = (labels == 8) & brain
    for pts, rad in _random_vein_paths(_erode_mm(wm, 2.0), canvas.origin, rng, n_random_veins, scale):
        frac, sl = _tube(canvas, pts, rad)
        if sl is None:
            continue
        _, _, m0, r2 = _TISSUES[11]
        canvas.paint(frac * brain[sl], sl, 11, float(rng.uniform(0.30, 0.45)), m0, r2)
    if 11 not in present:
        present.append(11)

    label_names = {k: _TISSUES[k][0] for k in present}
    label_chi = {k: _TISSUES[k][1] for k in present}
    if lesions:
        # deep WM from a distance map on a 2x coarser grid (a full-grid EDT takes seconds)
        core = ndi.distance_transform_edt(wm[::2, ::2, ::2], sampling=2 * vs) > _LESION_RADIUS_MM + 2.5
        centres = [2.0 * c for c in _zubal_lesion_centres(core, (canvas.labels == 7)[::2, ::2, ::2])]
        for (lab, name, chi, _), c in zip(_LESIONS, centres):
            frac, sl = _ellipsoid(canvas, c, tuple(_LESION_RADIUS_MM / vs), edge_mm=scale)
            m0 = 0.3 if chi < 0 else 0.55
            canvas.paint(frac, sl, lab, chi, m0, 20.0 + 60.0 * abs(chi))
            label_names[lab] = name
            label_chi[lab] = chi
    del wm

    affine = np.diag(np.append(vs, 1.0))
    affine[:3, 3] = vs * (start + zaff[:3, 3])
    return _finish(canvas, brain, label_names, label_chi, vs, affine, downsample, texture, seed)


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
