"""Brain extraction of GRE magnitude images: a BET-style deformable surface (Smith SM, *Fast robust
automated brain extraction*, Hum Brain Mapp 2002;17:143-155).

:func:`bet_mask` fits a tessellated sphere to the brain surface of a magnitude image and fills it:

1. Robust range ``t2``/``t98`` (2nd/98th percentiles), brain/background threshold
   ``t = t2 + 0.1 (t98 - t2)``; centre of gravity of the voxels above ``t`` (intensities clipped at
   ``t98``); ``r`` = radius of a sphere of the volume above ``t``; ``tm`` = median intensity in that sphere.
2. An icosahedron subdivided ``subdivisions`` times (4: 2562 vertices) of radius ``r / 2`` at the centre
   of gravity, in world millimetres (``index * voxel_size_mm``; the affine's rotation does not change the
   geometry, so oblique acquisitions need only the voxel sizes).
3. ``iterations`` updates ``u = u1 + u2 + u3`` of every vertex (vectorised over the vertices):

   - ``u1 = 0.5 s_t``: tangential part of ``s`` = mean of the neighbours - vertex (even vertex spacing);
   - ``u2 = f2 s_n``: normal part, ``f2 = (1 + tanh(F (1/R - E))) / 2`` with the local radius of
     curvature ``R = l^2 / (2 |s_n|)`` (``l``: mean edge length), ``E = (1/r_min + 1/r_max) / 2``,
     ``F = 6 / (1/r_min - 1/r_max)``, ``r_min = 3.33 mm``, ``r_max = 10 mm``;
   - ``u3 = 0.05 f3 l n``: intensity term along the outward normal ``n`` with ``f3 = 2 (I_min - t_l) /
     (I_max - t2)``, ``t_l = t2 + bt (I_max - t2)``, ``I_min = max(t2, min(tm, I(0..d1)))``,
     ``I_max = min(tm, max(t, I(0..d2)))``, the intensities ``I`` sampled every ``step_mm`` inwards
     along ``-n`` (trilinear interpolation) to ``d1 = 20 mm`` / ``d2 = 10 mm``;
     ``bt`` is the fractional intensity threshold (``fractional_threshold``, BET's ``-f``).

   The update stops early when no vertex moved ``tolerance_mm`` (0.2 mm) in the last 50 iterations.

   GRE magnitude suits BET: the skull is dark (no signal), CSF is bright at short echo times, so the
   surface settles on the inner skull surface (the intracranial space) and the minimum over ``d1``
   inwards from the bright scalp finds the dark skull, which draws the surface back in.
4. :func:`mesh_to_mask`: voxels whose centre is inside the closed surface (parity of the crossings of
   rays along the third voxel axis, all triangles at once), holes filled, the largest component kept.

Fractional threshold: BET's default 0.5 (T1-weighted images; :func:`bet_surface`) lets the surface pass
from the brain into soft tissue where the skull base is thin or missing in GRE magnitude (muscle and fat
are bright there); :func:`bet_mask` uses 0.75 (:data:`GRE_FRACTIONAL_THRESHOLD`), in the middle of the
plateau 0.7-0.8 where both simulated heads (MNI, Zubal; 3 T and 7 T) reached Dice >= 0.95 against the
true brain mask, at 0.5 the Zubal head gave 0.88 (neck, jaw and temporal muscles kept) and at 0.9 the MNI
head 0.945 (brain cut); see benchmarks/results/brain_extraction.md.

Not implemented from BET: the self-intersection test and the re-runs with more smoothness, the vertical
gradient of ``bt`` (``-g``), the skull surface.
"""

from __future__ import annotations

from typing import Sequence

import numba
import numpy as np
from scipy import ndimage as ndi
from scipy import sparse

from qsmprep.qsm.arrays import as_float_volume, as_voxel_size

_CHECK_EVERY = 50
__all__ = ["icosphere", "bet_surface", "mesh_to_mask", "bet_mask", "combine_magnitude"]


# --------------------------------------------------------------------------------------------------
# mesh
# --------------------------------------------------------------------------------------------------


def icosphere(subdivisions: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere: an icosahedron whose triangles are split in four ``subdivisions`` times
    (``10 * 4**k + 2`` vertices, ``20 * 4**k`` faces, counter-clockwise seen from outside).
    Returns ``(vertices (N, 3) float64, faces (M, 3) int64)``."""
    k = int(subdivisions)
    if k < 0 or k > 7:
        raise ValueError(f"subdivisions must be in 0..7, got {subdivisions}")
    p = (1.0 + np.sqrt(5.0)) / 2.0
    v = np.array([[-1, p, 0], [1, p, 0], [-1, -p, 0], [1, -p, 0], [0, -1, p], [0, 1, p],
                  [0, -1, -p], [0, 1, -p], [p, 0, -1], [p, 0, 1], [-p, 0, -1], [-p, 0, 1]], dtype=np.float64)
    f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9], [5, 11, 4],
                  [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8],
                  [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]], dtype=np.int64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for _ in range(k):
        n = len(v)
        edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        edges.sort(axis=1)
        uniq, inv = np.unique(edges, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        mid = v[uniq[:, 0]] + v[uniq[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        v = np.concatenate([v, mid])
        m = len(f)
        a, b, c = f[:, 0], f[:, 1], f[:, 2]
        ab, bc, ca = n + inv[:m], n + inv[m:2 * m], n + inv[2 * m:]
        f = np.concatenate([np.stack([a, ab, ca], 1), np.stack([b, bc, ab], 1),
                            np.stack([c, ca, bc], 1), np.stack([ab, bc, ca], 1)])
    # vertices in Morton (Z-curve) order of their position: neighbouring vertices sample neighbouring
    # voxels, which keeps the image gathers of a BET iteration cache-friendly
    q = np.clip(((v + 1.0) * 511.5).astype(np.int64), 0, 1023)
    code = np.zeros(len(v), np.int64)
    for bit in range(10):
        for ax in range(3):
            code |= ((q[:, ax] >> bit) & 1) << (3 * bit + 2 - ax)
    order = np.argsort(code, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return v[order], rank[f]


def _mesh_operators(faces: np.ndarray, n: int) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray]:
    """Row-normalised vertex adjacency (mean of the neighbours), vertex-face incidence, edge list."""
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e.sort(axis=1)
    e = np.unique(e, axis=0)
    rows = np.concatenate([e[:, 0], e[:, 1]])
    cols = np.concatenate([e[:, 1], e[:, 0]])
    adj = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    deg = np.asarray(adj.sum(axis=1)).reshape(-1)
    mean_nb = sparse.diags(1.0 / deg) @ adj
    inc = sparse.csr_matrix((np.ones(faces.size), (faces.reshape(-1), np.repeat(np.arange(len(faces)), 3))),
                            shape=(n, len(faces)))
    return mean_nb.tocsr(), inc, e


def _vertex_normals(v: np.ndarray, faces: np.ndarray, inc: sparse.csr_matrix) -> np.ndarray:
    """Unit outward normals: area-weighted mean of the normals of the faces around each vertex."""
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    vn = inc @ fn
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------
# BET surface
# --------------------------------------------------------------------------------------------------


@numba.njit(cache=True, fastmath=False)
def _profile_extrema(flat, dims, v_vox, n_vox, step_vox, n1, n2, out_min, out_max):
    """Minimum of the image over ``n1`` samples and maximum over the first ``n2``, taken inwards from
    each vertex along ``-n`` every ``step_vox`` (the normal scaled to voxels), by trilinear interpolation
    of the zero-padded image ``flat`` (C order, padded shape ``dims``; coordinates shifted by the pad and
    clamped so the lower corner stays inside, zero beyond one voxel outside the grid). One pass per
    vertex, no temporaries: the inner loop of :func:`bet_surface`. Float32 arithmetic, as the image."""
    ny, nz = dims[1], dims[2]
    hx, hy, hz = dims[0] - 2 - 1e-6, dims[1] - 2 - 1e-6, dims[2] - 2 - 1e-6
    for j in range(v_vox.shape[0]):
        lo = np.float32(np.inf)
        hi = np.float32(-np.inf)
        for k in range(n1):
            d = k * step_vox
            cx = min(max(v_vox[j, 0] - d * n_vox[j, 0] + 1.0, 0.0), hx)
            cy = min(max(v_vox[j, 1] - d * n_vox[j, 1] + 1.0, 0.0), hy)
            cz = min(max(v_vox[j, 2] - d * n_vox[j, 2] + 1.0, 0.0), hz)
            ix, iy, iz = int(cx), int(cy), int(cz)
            fx, fy, fz = np.float32(cx - ix), np.float32(cy - iy), np.float32(cz - iz)
            b = (ix * ny + iy) * nz + iz
            g000, g001 = flat[b], flat[b + 1]
            g010, g011 = flat[b + nz], flat[b + nz + 1]
            b1 = b + ny * nz
            g100, g101 = flat[b1], flat[b1 + 1]
            g110, g111 = flat[b1 + nz], flat[b1 + nz + 1]
            a00 = g000 + fz * (g001 - g000)
            a01 = g010 + fz * (g011 - g010)
            a10 = g100 + fz * (g101 - g100)
            a11 = g110 + fz * (g111 - g110)
            c0 = a00 + fy * (a01 - a00)
            c1 = a10 + fy * (a11 - a10)
            val = c0 + fx * (c1 - c0)
            if val < lo:
                lo = val
            if k < n2 and val > hi:
                hi = val
        out_min[j] = lo
        out_max[j] = hi


def combine_magnitude(magnitude, combine: str = "rss") -> np.ndarray:
    """3D magnitude for brain extraction from 3D/4D (x, y, z, echo) input: ``"rss"`` (root sum of squares
    over echoes), ``"first"`` (first echo) or ``"mean"``."""
    mag = as_float_volume(magnitude, "magnitude", ndim=(3, 4))
    if np.any(mag < 0):
        raise ValueError("magnitude must be non-negative")
    if mag.ndim == 3:
        return mag
    how = str(combine).lower()
    if how not in ("rss", "first", "mean"):
        raise ValueError(f"unknown echo combination {combine!r}; choose 'rss', 'first' or 'mean'")
    if how == "first":
        return np.ascontiguousarray(mag[..., 0])
    acc = np.zeros(mag.shape[:3], np.float32)
    for e in range(mag.shape[3]):  # echo by echo: no 4D temporary
        acc += np.square(mag[..., e]) if how == "rss" else mag[..., e]
    return np.sqrt(acc, out=acc) if how == "rss" else acc / np.float32(mag.shape[3])


def bet_surface(
    image,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    fractional_threshold: float = 0.5,
    iterations: int = 1000,
    subdivisions: int = 4,
    d1_mm: float = 20.0,
    d2_mm: float = 10.0,
    step_mm: float = 1.0,
    radius_min_mm: float = 3.33,
    radius_max_mm: float = 10.0,
    initial_radius_fraction: float = 0.5,
    centre_mm: Sequence[float] | None = None,
    tolerance_mm: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """BET deformable surface (Smith 2002) on a 3D ``image``; see the module docstring.

    Coordinates are world millimetres relative to voxel (0, 0, 0): ``index * voxel_size_mm``.
    ``centre_mm`` overrides the centre of gravity. Returns ``(vertices_mm (N, 3) float64, faces)``.
    """
    img = as_float_volume(image, "image", ndim=3)
    vs = as_voxel_size(voxel_size_mm)
    bt = float(fractional_threshold)
    if not 0.0 < bt < 1.0:
        raise ValueError(f"fractional_threshold must be in (0, 1), got {fractional_threshold}")
    iterations = int(iterations)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not (0 < radius_min_mm < radius_max_mm):
        raise ValueError(f"need 0 < radius_min_mm < radius_max_mm, got {radius_min_mm}, {radius_max_mm}")
    if not (0 < d2_mm and 0 < d1_mm and 0 < step_mm):
        raise ValueError("d1_mm, d2_mm and step_mm must be positive")

    # --- robust intensity range, threshold, centre of gravity, radius, median
    sample = img[:: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 64)].reshape(-1)
    t2, t98 = (float(x) for x in np.percentile(sample if sample.size > 10_000 else img, [2, 98]))
    if t98 <= t2:
        raise ValueError("the image has no contrast (2nd and 98th percentiles are equal)")
    t = t2 + 0.1 * (t98 - t2)
    above = img > np.float32(t)
    if not above.any():
        raise ValueError("no voxel above the brain/background threshold")
    idx = np.nonzero(above)
    w = np.minimum(img[idx], np.float32(t98)).astype(np.float64)
    if centre_mm is None:
        cog = np.array([np.sum(i * w) / w.sum() for i in idx]) * vs
    else:
        cog = np.asarray(centre_mm, dtype=np.float64).reshape(3)
    radius = (3.0 * idx[0].size * float(np.prod(vs)) / (4.0 * np.pi)) ** (1.0 / 3.0)
    del idx, w, above
    grids = np.ogrid[tuple(slice(0, s) for s in img.shape)]
    d2sum = sum(((g * s - c) ** 2) for g, s, c in zip(grids, vs, cog))
    inside = d2sum < radius**2
    tm = float(np.median(img[inside])) if inside.any() else t98
    del d2sum, inside

    # --- mesh
    unit, faces = icosphere(subdivisions)
    v = cog + unit * (radius * float(initial_radius_fraction))
    mean_nb, inc, edges = _mesh_operators(faces, len(v))

    e_c = 0.5 * (1.0 / radius_min_mm + 1.0 / radius_max_mm)
    f_c = 6.0 / (1.0 / radius_min_mm - 1.0 / radius_max_mm)
    n1 = int(np.floor(d1_mm / step_mm)) + 1
    n2 = int(np.floor(d2_mm / step_mm)) + 1
    scale = 1.0 / vs
    padded = np.pad(np.asarray(img, np.float32), 1)
    flat, dims = padded.reshape(-1), np.array(padded.shape, dtype=np.int64)
    prof_min = np.empty(len(v), np.float32)
    prof_max = np.empty(len(v), np.float32)

    check = v.copy()
    for it in range(iterations):
        if it and it % _CHECK_EVERY == 0:  # converged: no vertex moved tolerance_mm in the last 50
            moved = float(np.sqrt(np.max(np.sum((v - check) ** 2, axis=1))))
            if moved < tolerance_mm:
                break
            check = v.copy()
        normals = _vertex_normals(v, faces, inc)
        s = mean_nb @ v - v
        sn_len = np.einsum("ij,ij->i", s, normals)
        sn = sn_len[:, None] * normals
        st = s - sn
        el = np.linalg.norm(v[edges[:, 0]] - v[edges[:, 1]], axis=1).mean()
        inv_r = 2.0 * np.abs(sn_len) / (el * el)
        f2 = 0.5 * (1.0 + np.tanh(f_c * (inv_r - e_c)))
        # intensities every step_mm inwards along -n: minimum to d1, maximum to d2
        _profile_extrema(flat, dims, v * scale, normals * scale, float(step_mm), n1, n2, prof_min, prof_max)
        i_min = np.maximum(t2, np.minimum(tm, prof_min))
        i_max = np.minimum(tm, np.maximum(t, prof_max))
        tl = t2 + bt * (i_max - t2)
        f3 = 2.0 * (i_min - tl) / np.maximum(i_max - t2, 1e-12)
        v = v + 0.5 * st + f2[:, None] * sn + (0.05 * el) * f3[:, None] * normals
    return v, faces


# --------------------------------------------------------------------------------------------------
# surface -> mask
# --------------------------------------------------------------------------------------------------


def mesh_to_mask(vertices_mm, faces, shape: Sequence[int], voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Voxels of a grid of ``shape`` whose centre (``index * voxel_size_mm``) lies inside the closed
    triangle mesh: parity of the mesh crossings of rays along the third axis, every triangle at once
    (rays are offset by a tiny irrational amount so that they never meet an edge or a vertex exactly)."""
    vs = as_voxel_size(voxel_size_mm)
    shape = tuple(int(s) for s in shape)
    p = np.asarray(vertices_mm, dtype=np.float64) / vs
    f = np.asarray(faces, dtype=np.int64)
    a, b, c = p[f[:, 0]], p[f[:, 1]], p[f[:, 2]]
    eps = np.array([1e-6 * np.sqrt(2.0), 1e-6 * np.sqrt(3.0)])
    tri_xy = np.stack([a[:, :2], b[:, :2], c[:, :2]], axis=1) - eps  # ray through (i, j) -> origin shift
    lo = np.ceil(tri_xy.min(axis=1)).astype(np.int64)
    hi = np.floor(tri_xy.max(axis=1)).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array(shape[:2]) - 1)
    nx = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0)
    ny = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    count = nx * ny
    keep = count > 0
    tri = np.nonzero(keep)[0]
    count = count[keep]
    toggle = np.zeros(shape[0] * shape[1] * (shape[2] + 1), dtype=np.int32)
    if tri.size:
        t_idx = np.repeat(tri, count)
        start = np.repeat(np.cumsum(count) - count, count)
        k = np.arange(t_idx.size) - start
        nxr = nx[t_idx]
        i = lo[t_idx, 0] + k % nxr
        j = lo[t_idx, 1] + k // nxr
        # barycentric coordinates of the ray point (i, j) in the projected triangle
        q = np.stack([i, j], axis=1).astype(np.float64)
        A, B, C = tri_xy[t_idx, 0], tri_xy[t_idx, 1], tri_xy[t_idx, 2]
        det = (B[:, 0] - A[:, 0]) * (C[:, 1] - A[:, 1]) - (C[:, 0] - A[:, 0]) * (B[:, 1] - A[:, 1])
        ok = det != 0
        det = np.where(ok, det, 1.0)
        w1 = ((q[:, 0] - A[:, 0]) * (C[:, 1] - A[:, 1]) - (C[:, 0] - A[:, 0]) * (q[:, 1] - A[:, 1])) / det
        w2 = ((B[:, 0] - A[:, 0]) * (q[:, 1] - A[:, 1]) - (q[:, 0] - A[:, 0]) * (B[:, 1] - A[:, 1])) / det
        w0 = 1.0 - w1 - w2
        hit = ok & (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        z = w0 * a[t_idx, 2] + w1 * b[t_idx, 2] + w2 * c[t_idx, 2]
        i, j, z = i[hit], j[hit], z[hit]
        kz = np.clip(np.ceil(z), 0, shape[2]).astype(np.int64)  # first voxel centre above the crossing
        flat = (i * shape[1] + j) * (shape[2] + 1) + kz
        toggle += np.bincount(flat, minlength=toggle.size).astype(np.int32)
    toggle = toggle.reshape(shape[0], shape[1], shape[2] + 1)[..., : shape[2]]
    # parity of the crossings below each voxel centre (uint8 wraps at 256, an even number)
    return (np.cumsum(toggle.astype(np.uint8), axis=2, dtype=np.uint8) & 1).astype(bool)


#: Fractional intensity threshold of :func:`bet_mask` for GRE magnitude (BET's default for T1 is 0.5).
GRE_FRACTIONAL_THRESHOLD = 0.75


def bet_mask(
    magnitude,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
    fractional_threshold: float = GRE_FRACTIONAL_THRESHOLD,
    combine: str = "rss",
    iterations: int = 1000,
    subdivisions: int = 4,
    d1_mm: float = 20.0,
    d2_mm: float = 10.0,
    tolerance_mm: float = 0.2,
    erode_mm: float = 0.0,
) -> np.ndarray:
    """Brain mask of a (multi-echo) GRE magnitude by BET (Smith 2002): echoes combined by ``combine``
    (:func:`combine_magnitude`), :func:`bet_surface`, :func:`mesh_to_mask`, holes filled, the largest
    component kept, then eroded by ``erode_mm`` (a ball in millimetres; 0: none)."""
    img = combine_magnitude(magnitude, combine)
    vs = as_voxel_size(voxel_size_mm)
    v, f = bet_surface(img, vs, fractional_threshold=fractional_threshold, iterations=iterations,
                       subdivisions=subdivisions, d1_mm=d1_mm, d2_mm=d2_mm, tolerance_mm=tolerance_mm)
    m = mesh_to_mask(v, f, img.shape, vs)
    if not m.any():
        raise ValueError("brain extraction gave an empty mask")
    m = ndi.binary_fill_holes(m)
    lab, n = ndi.label(m)
    if n > 1:
        sizes = np.bincount(lab.reshape(-1))
        sizes[0] = 0
        m = lab == int(np.argmax(sizes))
    if erode_mm and erode_mm > 0:
        dist = ndi.distance_transform_edt(np.pad(m, 1), sampling=vs)[1:-1, 1:-1, 1:-1]
        m = dist > float(erode_mm)
    return m
