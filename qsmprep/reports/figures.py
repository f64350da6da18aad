"""Figures of the qsmprep reports (matplotlib, Agg canvas; no pyplot state, no display needed).

Every volume is reoriented to the closest RAS axes for display (no resampling: an axis permutation
and flips), cropped to the brain mask's bounding box plus a margin, and only a few slices are drawn,
each subsampled to at most :data:`MAX_PANEL_PX` pixels a side, so a 1 mm whole-head series takes
about a second per figure. Panels are in neurological convention (the subject's right on the right).

- :func:`mosaic`: rows of quantities x columns of slices with one colour bar per row;
- :func:`run_figures`: the standard figures of one processed run (magnitude with the brain-mask
  contour; wrapped echo-1 phase, total field (Hz) and local field (ppm); the Chimap at a fixed window;
  R2*/T2* when present);
- :func:`strip_box_plot` and :func:`metric_strips`: the group-level plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "CHI_WINDOW_PPM",
    "MAX_PANEL_PX",
    "FigureResult",
    "Row",
    "load_volume",
    "choose_cuts",
    "crop_box",
    "mosaic",
    "run_figures",
    "swi_figure",
    "strip_box_plot",
    "metric_strips",
    "registration_figures",
]

#: fixed display window of the Chimap (ppm), the same in every report so maps can be compared
CHI_WINDOW_PPM = (-0.15, 0.25)
#: largest number of pixels along a side of one drawn slice (larger slices are subsampled)
MAX_PANEL_PX = 256
#: margin added around the brain mask's bounding box, as a fraction of its extent
CROP_MARGIN = 0.12
ROW_HEIGHT_IN = 2.3
DPI = 100


@dataclass
class FigureResult:
    """One figure of a report: ``key``, file ``path`` (None when it failed), ``caption``, ``error``."""

    key: str
    title: str
    path: Path | None
    caption: str = ""
    error: str | None = None


@dataclass
class Row:
    """One row of a :func:`mosaic`: a RAS volume and how to draw it."""

    data: np.ndarray
    label: str
    cmap: str = "gray"
    vmin: float | None = None
    vmax: float | None = None
    units: str = ""
    #: voxels outside this mask are drawn as background (black); None draws everything
    inside: np.ndarray | None = None
    #: (mask, colour) outlines drawn on top
    contours: Sequence[tuple[np.ndarray, str]] = ()


# --------------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------------


def load_volume(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(data, zooms_mm)`` of a NIfTI image permuted/flipped to the closest RAS axes.

    4D images give their first volume. No interpolation: the voxel values are untouched.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{Path(path).name}: expected a 3D image, got shape {data.shape}")
    data = np.asarray(data, dtype=dtype)
    zooms_in = np.asarray(img.header.get_zooms()[:3], dtype=float)
    ornt = io_orientation(img.affine)
    data = np.ascontiguousarray(apply_orientation(data, ornt))
    zooms = np.empty(3)
    for i in range(3):
        zooms[int(ornt[i, 0])] = zooms_in[i]
    return data, zooms


def _bbox(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    if mask is None or not np.any(mask):
        return tuple(slice(0, n) for n in shape)
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(np.any(mask, axis=other))
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        pad = int(math.ceil(CROP_MARGIN * (hi - lo))) + 2
        out.append(slice(max(0, lo - pad), min(shape[ax], hi + pad)))
    return tuple(out)


def crop_box(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The bounding box of ``mask`` with a margin (slices per axis; the whole volume without a mask)."""
    return _bbox(mask, shape)


def choose_cuts(mask: np.ndarray | None, shape: tuple[int, ...], n_axial: int = 1) -> list[tuple[int, int]]:
    """Slices to draw as ``(axis, index)``: sagittal and coronal through the mask's centre of mass,
    then one axial slice through it (``n_axial=1``) or ``n_axial`` slices from 35 to 70 % of the mask's
    height, bottom to top."""
    if mask is not None and np.any(mask):
        idx = np.nonzero(mask)
        centre = [int(round(float(np.mean(i)))) for i in idx]
        zlo, zhi = int(idx[2].min()), int(idx[2].max())
    else:
        centre = [n // 2 for n in shape]
        zlo, zhi = 0, shape[2] - 1
    cuts = [(0, centre[0]), (1, centre[1])]
    if n_axial <= 1:
        cuts.append((2, centre[2]))
    else:
        # spread over 35..70 % of the mask's height (deep grey matter to the upper cortex)
        pos = np.linspace(0.35, 0.7, n_axial)
        for f in pos:
            cuts.append((2, int(round(zlo + f * (zhi - zlo)))))
    return [(a, int(np.clip(i, 0, shape[a] - 1))) for a, i in cuts]


def _plane(vol: np.ndarray, axis: int, index: int, crop: tuple[slice, ...]) -> np.ndarray:
    """2D slice (rows = second displayed axis, bottom-up) of a cropped RAS volume."""
    sl = list(crop)
    sl[axis] = index
    return np.asarray(vol[tuple(sl)]).T


def _stride(shape2d: tuple[int, int]) -> int:
    return max(1, int(math.ceil(max(shape2d) / MAX_PANEL_PX)))


_AXES = {0: ("sagittal", (1, 2)), 1: ("coronal", (0, 2)), 2: ("axial", (0, 1))}


def _extent_mm(axis: int, crop: tuple[slice, ...], zooms: np.ndarray) -> tuple[float, float]:
    """(width, height) in mm of a displayed slice."""
    u, v = _AXES[axis][1]
    return (crop[u].stop - crop[u].start) * zooms[u], (crop[v].stop - crop[v].start) * zooms[v]


def _robust_sym(values: np.ndarray, q: float = 99.0, floor: float = 1e-6) -> float:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0
    v = float(np.percentile(np.abs(values), q))
    return _nice(max(v, floor))


def _nice(v: float) -> float:
    """Round a positive window limit up to 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k."""
    if not v > 0 or not math.isfinite(v):
        return 1.0
    e = math.floor(math.log10(v))
    m = v / 10**e
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m <= step + 1e-9:
            return step * 10**e
    return 10 ** (e + 1)


# --------------------------------------------------------------------------------------------------
# mosaic
# --------------------------------------------------------------------------------------------------


def mosaic(
    rows: Sequence[Row],
    zooms: np.ndarray,
    cuts: Sequence[tuple[int, int]],
    crop: tuple[slice, ...],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Draw ``rows`` x ``cuts`` slices (one colour bar per row) and save to ``path`` (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib import colormaps

    zooms = np.asarray(zooms, dtype=float)
    ratios = []
    for axis, _ in cuts:
        w, h = _extent_mm(axis, crop, zooms)
        ratios.append(max(w, 1e-3) / max(h, 1e-3))
    cbar_ratio = 0.07
    label_in = 0.45
    width = ROW_HEIGHT_IN * (sum(ratios) + cbar_ratio) + label_in + 0.9
    height = ROW_HEIGHT_IN * len(rows) + (0.45 if title else 0.25)
    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    top = 1 - (0.4 if title else 0.2) / height
    gs = fig.add_gridspec(
        len(rows), len(cuts) + 1, width_ratios=ratios + [cbar_ratio], left=label_in / width,
        right=1 - 0.75 / width, bottom=0.05 / height, top=top, wspace=0.03, hspace=0.06,
    )
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / height, va="top")
    for r, row in enumerate(rows):
        cmap = colormaps[row.cmap].with_extremes(bad="black")
        im = None
        for c, (axis, index) in enumerate(cuts):
            ax = fig.add_subplot(gs[r, c])
            ax.set_facecolor("black")
            plane = _plane(row.data, axis, index, crop).astype(np.float32, copy=True)
            if row.inside is not None:
                plane[~_plane(row.inside, axis, index, crop).astype(bool)] = np.nan
            s = _stride(plane.shape)
            plane = plane[::s, ::s]
            w, h = _extent_mm(axis, crop, zooms)
            im = ax.imshow(plane, cmap=cmap, vmin=row.vmin, vmax=row.vmax, origin="lower",
                           interpolation="nearest", extent=(0, w, 0, h), aspect="equal")
            for cmask, colour in row.contours:
                cm = _plane(cmask, axis, index, crop)[::s, ::s].astype(np.float32)
                if cm.min() < 0.5 < cm.max():
                    ys = (np.arange(cm.shape[0]) + 0.5) * h / cm.shape[0]
                    xs = (np.arange(cm.shape[1]) + 0.5) * w / cm.shape[1]
                    ax.contour(xs, ys, cm, levels=[0.5], colors=[colour], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                name = _AXES[axis][0]
                ax.set_title(f"{name} {index}", fontsize=8, pad=2)
            if axis in (1, 2):
                ax.text(0.98, 0.02, "R", color="white", fontsize=7, ha="right", va="bottom",
                        transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(row.label, fontsize=9)
        cax = fig.add_subplot(gs[r, -1])
        cb = fig.colorbar(im, cax=cax)
        cb.ax.tick_params(labelsize=7)
        if row.units:
            cb.set_label(row.units, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(str(tmp), dpi=DPI, facecolor="white")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# the figures of one run
# --------------------------------------------------------------------------------------------------


def _scaled_phase(data: np.ndarray, units: str | None) -> np.ndarray:
    from qsmprep.qsm.phase import scale_phase_to_rad

    try:
        return scale_phase_to_rad(data, units)
    except ValueError:
        lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
        if hi - lo <= 0:
            return np.zeros_like(data, dtype=np.float32)
        return ((data - lo) * (2 * np.pi / (hi - lo)) - np.pi).astype(np.float32)


def _same(a: np.ndarray | None, shape: tuple[int, ...]) -> bool:
    return a is not None and a.shape == tuple(shape)


def run_figures(
    run: Any,
    fig_dir: str | Path,
    *,
    raw: Mapping[str, Path] | None = None,
    phase_units: str | None = None,
    field_strength_t: float | None = None,
) -> list[FigureResult]:
    """The figures of one processed run (:class:`qsmprep.reports.reader.ProcessedRun`) in ``fig_dir``.

    ``raw`` maps ``mag``/``phase``/``real``/``imag`` to the raw echo-1 files (optional);
    ``phase_units`` is the phase sidecar ``Units``. A figure that cannot be drawn is returned with
    ``path=None`` and the ``error`` text; the others are still made.
    """
    fig_dir = Path(fig_dir)
    raw = dict(raw or {})
    results: list[FigureResult] = []
    p = run.prefix

    def attempt(key, title, caption, func):
        try:
            path = func()
        except Exception as exc:  # a report must not fail because one figure did
            results.append(FigureResult(key, title, None, caption, f"{type(exc).__name__}: {exc}"))
            return
        if path is not None:
            results.append(FigureResult(key, title, path, caption))

    chi = zooms = mask = None
    if run.has("chimap"):
        chi, zooms = load_volume(run.path("chimap"))
    mask_vol = None
    if run.has("brain_mask"):
        mask_vol, mzooms = load_volume(run.path("brain_mask"), dtype=np.float32)
        mask = mask_vol > 0.5
        zooms = mzooms if zooms is None else zooms
    if chi is not None and mask is None:
        mask = chi != 0
    ref_shape = chi.shape if chi is not None else (mask.shape if mask is not None else None)

    mag = phase = None
    if "mag" in raw:
        mag, rz = load_volume(raw["mag"])
    if "phase" in raw:
        ph, rz = load_volume(raw["phase"])
        phase = _scaled_phase(ph, phase_units)
    elif "real" in raw and "imag" in raw:
        re_, rz = load_volume(raw["real"])
        im_, _ = load_volume(raw["imag"])
        if mag is None:
            mag = np.hypot(re_, im_).astype(np.float32)
        phase = np.arctan2(im_, re_).astype(np.float32)
    if ref_shape is None and mag is not None:
        ref_shape, zooms = mag.shape, rz
    if ref_shape is None:
        return results
    crop = _bbox(mask, ref_shape)
    cuts3 = choose_cuts(mask, ref_shape, n_axial=1)
    cuts5 = choose_cuts(mask, ref_shape, n_axial=3)

    csf_cache: list = []

    def csf_contour() -> list:
        """The CSF reference region's outline (cyan) when the run has one on the same grid."""
        if not csf_cache:
            csf = None
            if run.has("reference_mask"):
                vol, _ = load_volume(run.path("reference_mask"))
                csf = vol > 0.5 if vol.shape == ref_shape else None
            csf_cache.append(csf)
        return [(csf_cache[0], "#30e0ff")] if csf_cache[0] is not None else []

    # 1. magnitude (echo 1) with the brain mask
    def fig_mask():
        if not _same(mag, ref_shape):
            if mask is None:
                return None
            base, label, units = mask.astype(np.float32), "brain mask", ""
            vmax = 1.0
        else:
            base, label, units = mag, "echo-1 magnitude", "a.u."
            inside = mag[tuple(crop)]
            vmax = float(np.percentile(inside[np.isfinite(inside)], 99.5)) if inside.size else 1.0
        contours = ([(mask, "#ff3030")] if mask is not None else []) + csf_contour()
        row = Row(base, label, "gray", 0.0, vmax or 1.0, units, contours=contours)
        return mosaic([row], zooms, cuts5, crop, fig_dir / f"{p}_desc-brainmask.png")

    attempt("mask", "Brain mask",
            "Echo-1 magnitude with the final brain mask (red outline; the region of the local field and "
            "the Chimap)" + ("; the CSF reference region in cyan." if run.has("reference_mask") else "."), fig_mask)

    # 2. wrapped phase -> total field -> local field
    def fig_fields():
        rows = []
        if _same(phase, ref_shape):
            rows.append(Row(phase, "echo-1 phase (wrapped)", "twilight", -np.pi, np.pi, "rad",
                            contours=[(mask, "#ffffff")] if mask is not None else ()))
        total_in = None
        if run.has("total_fieldmap"):
            total, _ = load_volume(run.path("total_fieldmap"))
            total_in = total != 0
            if mask is not None:
                total_in |= mask
            lim = _robust_sym(total[total_in]) if np.any(total_in) else 1.0
            rows.append(Row(total, "total field", "RdBu_r", -lim, lim, "Hz", inside=total_in))
        if run.has("local_fieldmap"):
            local, _ = load_volume(run.path("local_fieldmap"))
            inside = mask if mask is not None else local != 0
            lim = _robust_sym(local[inside]) if np.any(inside) else 0.05
            rows.append(Row(local, "local field", "RdBu_r", -lim, lim, "ppm", inside=inside))
        if not rows:
            return None
        return mosaic(rows, zooms, cuts3, crop, fig_dir / f"{p}_desc-fields.png")

    hz_per_ppm = f" (1 ppm = {42.57747892 * field_strength_t:.1f} Hz at {field_strength_t:g} T)" \
        if field_strength_t else ""
    attempt("fields", "Phase and field maps",
            "Wrapped echo-1 phase (rad), the B0 field map fitted from the unwrapped echoes (Hz, background "
            f"fields included), and the local field after background field removal (ppm){hz_per_ppm}. "
            "Colour windows are symmetric at the 99th percentile of |field|.", fig_fields)

    # 3. Chimap
    def fig_chi():
        if chi is None:
            return None
        contours = csf_contour()
        row = Row(chi, "susceptibility", "gray", CHI_WINDOW_PPM[0], CHI_WINDOW_PPM[1], "ppm",
                  inside=mask, contours=contours)
        return mosaic([row], zooms, cuts5, crop, fig_dir / f"{p}_desc-chimap.png")

    attempt("chimap", "Susceptibility map (Chimap)",
            f"Magnetic susceptibility at a fixed window of {CHI_WINDOW_PPM[0]:g} to {CHI_WINDOW_PPM[1]:g} ppm "
            "(the same in every report); black outside the brain mask.", fig_chi)

    # 4. R2* / T2*
    def fig_relax():
        rows = []
        for key, label, units in (("r2starmap", "R2*", "1/s"), ("t2starmap", "T2*", "s")):
            if not run.has(key):
                continue
            vol, _ = load_volume(run.path(key))
            inside = vol != 0
            vals = vol[inside & np.isfinite(vol)]
            vmax = _nice(float(np.percentile(vals, 99))) if vals.size else 1.0
            rows.append(Row(vol, label, "inferno", 0.0, vmax, units, inside=inside))
        if not rows:
            return None
        return mosaic(rows, zooms, cuts3, crop, fig_dir / f"{p}_desc-relaxation.png")

    if run.has("r2starmap") or run.has("t2starmap"):
        attempt("relaxation", "R2* / T2*", "Relaxation maps from the multi-echo magnitude decay "
                "(window 0 to the 99th percentile).", fig_relax)

    # 5. SWI / minIP
    if run.has("swi") or run.has("minip"):
        attempt("swi", "SWI / minIP", SWI_CAPTION, lambda: swi_figure(run, zooms, cuts3, crop, fig_dir))

    # 6. registration panels: the GRE brain outline over the T1w, the subject's brain outline over the template
    for key, title, caption, fn in registration_figures(run, fig_dir):
        attempt(key, title, caption, fn)
    return results


def _outline_panel(image_path: Path, outline_path: Path, path: Path, label: str) -> Path:
    img, z = load_volume(image_path)
    outline, _ = load_volume(outline_path)
    inside = outline > 0.5
    if img.shape[:3] != outline.shape[:3]:
        raise ValueError(f"{outline_path.name} is not on the grid of {image_path.name}")
    img = img.reshape(img.shape[:3])
    lo, hi = np.percentile(img[np.isfinite(img)], (1, 99.5))
    rows = [Row(img, label, "gray", float(lo), float(hi), "", contours=((inside, "red"),))]
    return mosaic(rows, z, choose_cuts(inside, img.shape, n_axial=2), crop_box(inside, img.shape), path)


def registration_figures(run: Any, fig_dir: str | Path) -> list[tuple[str, str, str, Any]]:
    """``(key, title, caption, draw)`` of the registration panels a run has outputs for: the GRE brain mask
    resampled onto the T1w (outline) over the T1w named in the GRE -> T1w transform's sidecar, and the brain mask
    in each template space (outline) over the template's T1w in TEMPLATEFLOW_HOME."""
    import json
    import re

    fig_dir = Path(fig_dir)
    p = run.prefix
    out = []
    xfm_meta = run.anat_dir / f"{p}_from-GRE_to-T1w_mode-image_xfm.json"
    mask_t1w = run.anat_dir / f"{p}_space-T1w_desc-brain_mask.nii.gz"
    if xfm_meta.is_file() and mask_t1w.is_file():
        try:
            t1w = Path((json.loads(xfm_meta.read_text()).get("Sources") or [""])[0])
        except (OSError, ValueError):
            t1w = Path("")
        if t1w.is_file():
            out.append(("reg_t1w", "Registration: GRE to T1w",
                        "The T1w with the outline of the GRE brain mask carried through the rigid GRE -> T1w "
                        "transform (red): the outline should follow the brain's edge.",
                        lambda: _outline_panel(t1w, mask_t1w, fig_dir / f"{p}_desc-regT1w.png", "T1w")))
    for m in sorted(run.anat_dir.glob(f"{p}_space-*_desc-brain_mask.nii.gz")):
        g = re.search(r"_space-([A-Za-z0-9]+)(?:_res-(\d+))?_desc-brain_mask", m.name)
        if not g or g.group(1) == "T1w":
            continue
        from qsmprep.anat.templates import template_path

        tpl = template_path(g.group(1), "T1w", res=int(g.group(2)) if g.group(2) else None)
        if tpl.is_file() and tpl.stat().st_size > 0:
            space = g.group(1) + (f" res-{g.group(2)}" if g.group(2) else "")
            out.append((f"reg_{g.group(1)}", f"Registration: T1w to {space}",
                        f"The {space} template with the outline of the subject's brain mask carried through GRE -> "
                        "T1w -> template (red): the outline should follow the template's brain edge.",
                        lambda tpl=tpl, m=m, g=g: _outline_panel(tpl, m, fig_dir / f"{p}_desc-reg{g.group(1)}.png",
                                                                  g.group(1))))
    return out


SWI_CAPTION = ("Susceptibility-weighted image (CLEAR-SWI; veins dark) and its minimum-intensity projection over "
               "a slab along the slice axis (window 0 to the 99.5th percentile inside the brain box).")


def swi_figure(run: Any, zooms: np.ndarray, cuts: Sequence[tuple[int, int]], crop: tuple[slice, ...],
               fig_dir: str | Path) -> Path | None:
    """Rows of the run's SWI and minIP (grey, 0 to the 99.5th percentile in ``crop``); None without either."""
    rows = []
    for key, label in (("swi", "SWI"), ("minip", "minIP")):
        if not run.has(key):
            continue
        vol, _ = load_volume(run.path(key))
        vals = vol[tuple(crop)]
        vals = vals[np.isfinite(vals)]
        vmax = float(np.percentile(vals, 99.5)) if vals.size else 1.0
        rows.append(Row(vol, label, "gray", 0.0, vmax or 1.0, "a.u."))
    if not rows:
        return None
    return mosaic(rows, zooms, cuts, crop, Path(fig_dir) / f"{run.prefix}_desc-swi.png")


# --------------------------------------------------------------------------------------------------
# group plots
# --------------------------------------------------------------------------------------------------


def _new_fig(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(str(tmp), dpi=DPI, facecolor="white", bbox_inches="tight")
    tmp.replace(path)
    return path


def _jitter(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.18, 0.18, n)


def strip_box_plot(
    groups: Sequence[tuple[str, Sequence[float], Sequence[bool], Sequence[str]]],
    path: str | Path,
    *,
    ylabel: str,
    title: str,
) -> Path:
    """Box plot + jittered points per group: ``(name, values, flagged, point_labels)``; flagged red."""
    n = max(1, len(groups))
    fig = _new_fig(min(max(6.0, 1.8 + 0.6 * n), 18), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    data = [np.asarray([v for v in vals if v is not None and math.isfinite(v)], float) for _, vals, _, _ in groups]
    positions = np.arange(1, n + 1)
    nonempty = [i for i, d in enumerate(data) if d.size]
    if nonempty:
        ax.boxplot([data[i] for i in nonempty], positions=positions[nonempty], widths=0.55, showfliers=False,
                   medianprops={"color": "#444"}, boxprops={"color": "#888"}, whiskerprops={"color": "#888"},
                   capprops={"color": "#888"})
    for i, (name, vals, flagged, labels) in enumerate(groups):
        vals = np.asarray([np.nan if v is None else v for v in vals], float)
        flagged = np.asarray(flagged, bool) if len(flagged) == len(vals) else np.zeros(len(vals), bool)
        x = positions[i] + _jitter(len(vals), i)
        ok = np.isfinite(vals)
        ax.scatter(x[ok & ~flagged], vals[ok & ~flagged], s=16, color="#1f77b4", alpha=0.8, zorder=3)
        ax.scatter(x[ok & flagged], vals[ok & flagged], s=28, color="#d62728", marker="D", zorder=4)
        for xi, yi, fl, lab in zip(x, vals, flagged, labels):
            if fl and math.isfinite(yi):
                ax.annotate(lab, (xi, yi), fontsize=6, color="#d62728", xytext=(3, 2), textcoords="offset points")
    ax.set_xticks(positions)
    ax.set_xticklabels([g[0] for g in groups], rotation=40, ha="right", fontsize=8)
    ax.set_xlim(0.4, n + 0.6)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.axhline(0, color="#bbb", lw=0.6, zorder=0)
    ax.grid(axis="y", color="#eee")
    return _save(fig, path)


def metric_strips(
    metrics: Sequence[str],
    values: Mapping[str, Sequence[float | None]],
    flagged: Mapping[str, Sequence[bool]],
    labels: Sequence[str],
    path: str | Path,
    *,
    ncols: int = 4,
) -> Path:
    """One small strip plot per QC metric (runs as points; runs flagged for that metric in red)."""
    n = max(1, len(metrics))
    ncols = max(1, min(ncols, n))
    nrows = int(math.ceil(n / ncols))
    fig = _new_fig(3.1 * ncols, 2.3 * nrows)
    for k, name in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        vals = np.asarray([np.nan if v is None else v for v in values[name]], float)
        fl = np.asarray(flagged.get(name, [False] * len(vals)), bool)
        x = _jitter(len(vals), k)
        ok = np.isfinite(vals)
        ax.scatter(x[ok & ~fl], vals[ok & ~fl], s=14, color="#1f77b4", alpha=0.8)
        ax.scatter(x[ok & fl], vals[ok & fl], s=26, color="#d62728", marker="D")
        for xi, yi, f, lab in zip(x, vals, fl, labels):
            if f and math.isfinite(yi):
                ax.annotate(lab, (xi, yi), fontsize=6, color="#d62728", xytext=(3, 2), textcoords="offset points")
        if ok.any():
            ax.boxplot(vals[ok], positions=[0], widths=0.6, showfliers=False, medianprops={"color": "#444"},
                       boxprops={"color": "#aaa"}, whiskerprops={"color": "#aaa"}, capprops={"color": "#aaa"})
        ax.set_xlim(-0.6, 0.6)
        ax.set_xticks([])
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", color="#eee")
    fig.subplots_adjust(hspace=0.45, wspace=0.45)
    return _save(fig, path)
