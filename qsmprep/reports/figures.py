"""Figures of the qsmprep reports (matplotlib, Agg canvas; no pyplot state, no display needed).

Every volume is reoriented to the closest RAS axes for display (no resampling: an axis permutation
and flips), cropped to the brain mask's bounding box plus a margin, and only a few slices are drawn,
each subsampled to at most :data:`MAX_PANEL_PX` pixels a side, so a 1 mm whole-head series takes
about a second per figure. Panels are in neurological convention (the subject's right on the right);
every panel is labelled with the anatomical direction at each edge (from the image affine,
``nibabel.aff2axcodes``) and its title gives the world position of the cut in mm.

Quantitative maps are drawn at fixed windows (:data:`WINDOWS`, the same in every report; the
field-strength dependent ones are scaled with B0); only the magnitude, which has no units, is windowed
per image (0 to its 99.5th percentile). docs/reports.md holds the table of :func:`windows_markdown`.

- :func:`mosaic`: rows of quantities x columns of slices with one colour bar per row;
- :func:`run_figures`: the standard figures of one processed run (magnitude with the brain-mask
  contour; wrapped echo-1 phase, total field (Hz) and local field (ppm); the Chimap at a fixed window;
  R2*/T2* when present);
- :func:`strip_box_plot` and :func:`metric_strips`: the group-level plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "CHI_WINDOW_PPM",
    "WINDOWS",
    "Window",
    "window",
    "windows_markdown",
    "load_volume_affine",
    "orientation_labels",
    "mosaic_figure",
    "MAX_PANEL_PX",
    "FigureResult",
    "Row",
    "load_volume",
    "choose_cuts",
    "crop_box",
    "mosaic",
    "run_figures",
    "swi_rows",
    "strip_box_plot",
    "metric_strips",
    "robust_limits",
    "OUTLIER_FENCE_IQR",
    "registration_figures",
]

#: gyromagnetic ratio / 2 pi of 1H (MHz/T = Hz/ppm/T)
GAMMA_BAR_MHZ_T = 42.57747892
#: field strength assumed for the field-strength dependent windows when a series does not record one
DEFAULT_FIELD_T = 3.0


@dataclass(frozen=True)
class Window:
    """A display window: ``low`` to ``high`` in ``units``, scaled by ``scaling``: ``"fixed"``, ``"B0"``
    (times the field strength in T: R2* grows about linearly with B0), ``"1/B0"`` (divided by it: T2*) or
    ``"Hz"`` (ppm converted to Hz at the field strength); ``"percentile"``: 0 to that percentile of the
    image (``high``), for maps without quantitative units."""

    label: str
    units: str
    low: float
    high: float
    scaling: str
    why: str

    def limits(self, field_strength_t: float | None = None) -> tuple[float, float]:
        b0 = float(field_strength_t) if field_strength_t else DEFAULT_FIELD_T
        factor = {"fixed": 1.0, "B0": b0, "1/B0": 1.0 / b0, "Hz": GAMMA_BAR_MHZ_T * b0}.get(self.scaling)
        if factor is None:
            raise ValueError(f"the {self.label} window depends on the image ({self.scaling})")
        return self.low * factor, self.high * factor


#: the display windows of the report figures, one per map, identical in every report so that series,
#: participants and sites can be compared by eye. Tissue values: Chimap of deep grey matter about
#: +0.05..+0.2 ppm, white matter about -0.05 ppm, veins above +0.3 ppm (consensus 2024); the local
#: field is about a third of chi or less; R2* of brain about 4-9 /s per tesla (deep grey matter up to
#: 15 /s/T); T2* = 1/R2*.
WINDOWS: dict[str, Window] = {
    "chimap": Window("susceptibility (Chimap)", "ppm", -0.15, 0.25, "fixed",
                     "white matter (about -0.05) to iron-rich nuclei (about +0.2); veins saturate"),
    "local_field": Window("local field", "ppm", -0.05, 0.05, "fixed",
                          "tissue fields after background removal; the same in ppm at every field strength"),
    "total_field": Window("total field", "Hz", -1.0, 1.0, "Hz",
                          "+-1 ppm of B0: the shimmed brain; fields near the sinuses and ear canals saturate"),
    "phase": Window("wrapped phase", "rad", -math.pi, math.pi, "fixed", "the full range of a wrapped phase"),
    "r2star": Window("R2*", "1/s", 0.0, 16.0, "B0",
                     "16 /s per tesla: brain tissue below, veins and iron-rich nuclei towards the top"),
    "t2star": Window("T2*", "s", 0.0, 0.3, "1/B0",
                     "0.3 s tesla: brain tissue inside, CSF saturates"),
    "swi": Window("SWI and minIP", "a.u.", 0.0, 99.5, "percentile",
                  "no quantitative units: 0 to the 99.5th percentile in the displayed box; veins dark"),
    "magnitude": Window("echo-1 magnitude", "a.u.", 0.0, 99.5, "percentile",
                        "no quantitative units (receive-coil and scaling dependent): 0 to the 99.5th "
                        "percentile in the displayed box"),
}

#: fixed display window of the Chimap (ppm), the same in every report so maps can be compared
CHI_WINDOW_PPM = (WINDOWS["chimap"].low, WINDOWS["chimap"].high)


def window(key: str, field_strength_t: float | None = None) -> tuple[float, float]:
    """``(low, high)`` of the display window :data:`WINDOWS[key] <WINDOWS>` at ``field_strength_t``
    (:data:`DEFAULT_FIELD_T` when None)."""
    return WINDOWS[key].limits(field_strength_t)


def windows_markdown() -> str:
    """The Markdown table of :data:`WINDOWS` (docs/reports.md holds it; a test keeps them equal)."""
    scaling = {"fixed": "fixed", "B0": "x B0 (T)", "1/B0": "/ B0 (T)", "Hz": "ppm x 42.577 Hz/ppm/T x B0 (T)",
               "percentile": "per image"}
    lines = ["| map | window | units | scaling | at 3 T | at 7 T | why |", "|---|---|---|---|---|---|---|"]
    for key, w in WINDOWS.items():
        if w.scaling == "percentile":
            rng, at3, at7 = f"0 to p{w.high:g}", "n/a", "n/a"
        else:
            rng = f"{w.low:.4g} to {w.high:.4g}" + (" ppm" if w.scaling == "Hz" else "")
            at3, at7 = ("{:.4g} to {:.4g}".format(*w.limits(b)) for b in (3.0, 7.0))
        lines.append(f"| `{key}` ({w.label}) | {rng} | {w.units} | {scaling[w.scaling]} | {at3} | {at7} | {w.why} |")
    return "\n".join(lines) + "\n"
#: largest number of pixels along a side of one drawn slice (larger slices are subsampled)
MAX_PANEL_PX = 256
#: margin added around the brain mask's bounding box, as a fraction of its extent
CROP_MARGIN = 0.12
ROW_HEIGHT_IN = 2.3
DPI = 100


@dataclass
class FigureResult:
    """One figure of a report: ``key``, file ``path`` (None when it failed), ``caption``, ``error``;
    ``windows`` (row label -> (low, high, units)), ``orientation`` (the axis codes of the displayed
    volume, e.g. ``"RAS"``) and ``slices`` (``"axial z = 12 mm"``, ...) describe what was drawn."""

    key: str
    title: str
    path: Path | None
    caption: str = ""
    error: str | None = None
    windows: dict = field(default_factory=dict)
    orientation: str = ""
    slices: list = field(default_factory=list)


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
    data, zooms, _ = load_volume_affine(path, dtype)
    return data, zooms


def load_volume_affine(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, zooms_mm, affine)`` as :func:`load_volume`, with the voxel-to-world affine of the
    reoriented array (so positions and directions of what is drawn follow the image's affine)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    if str(path).endswith(".gz"):  # ISA-L in one piece: 3x nibabel's gzip reader
        from qsmprep.utils.gzip_nifti import load_gz_image

        img = load_gz_image(path)
    else:
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
    affine = np.asarray(img.affine, float) @ inv_ornt_aff(ornt, img.shape[:3])
    return data, zooms, affine


_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def orientation_labels(affine: np.ndarray, axis: int) -> dict[str, str]:
    """Anatomical direction at each edge (``left``, ``right``, ``bottom``, ``top``) of a panel cut
    perpendicular to array ``axis`` of a volume with voxel-to-world ``affine`` (RAS+ world,
    ``nibabel.aff2axcodes``): columns run along the first remaining axis, rows (bottom-up) along the
    second."""
    from nibabel.orientations import aff2axcodes

    codes = aff2axcodes(np.asarray(affine, float))
    u, v = _AXES[axis][1]
    return {"left": _OPPOSITE[codes[u]], "right": codes[u], "bottom": _OPPOSITE[codes[v]], "top": codes[v]}


def cut_position(affine: np.ndarray, axis: int, index: int, crop: tuple[slice, ...]) -> str:
    """World position of a cut: ``"z = 12 mm"`` (the coordinate, along the world axis closest to array
    ``axis``, of the cut's centre in the displayed box)."""
    from nibabel.orientations import aff2axcodes

    ijk = [(sl.start + sl.stop - 1) / 2.0 for sl in crop]
    ijk[axis] = index
    world = np.asarray(affine, float) @ np.array(ijk + [1.0])
    w = "RLAPSI".index(aff2axcodes(np.asarray(affine, float))[axis]) // 2
    value = float(world[w])
    return f"{'xyz'[w]} = {value:.0f} mm".replace("= -0 mm", "= 0 mm")


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
#: where the direction letters go (axes fraction x, y and alignment)
_EDGES = {"left": (0.02, 0.5, "left", "center"), "right": (0.98, 0.5, "right", "center"),
          "bottom": (0.5, 0.02, "center", "bottom"), "top": (0.5, 0.98, "center", "top")}


def _extent_mm(axis: int, crop: tuple[slice, ...], zooms: np.ndarray) -> tuple[float, float]:
    """(width, height) in mm of a displayed slice."""
    u, v = _AXES[axis][1]
    return (crop[u].stop - crop[u].start) * zooms[u], (crop[v].stop - crop[v].start) * zooms[v]


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
    affine: np.ndarray | None = None,
) -> Path:
    """Draw ``rows`` x ``cuts`` slices (one colour bar per row) and save to ``path`` (PNG).

    ``affine`` is the voxel-to-world affine of the (RAS-reoriented) volumes: it gives the direction
    letters at the panel edges and the positions (mm) in the titles (default: ``diag(zooms)``).
    """
    fig = mosaic_figure(rows, zooms, cuts, crop, title=title, affine=affine)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(str(tmp), dpi=DPI, facecolor="white")
    tmp.replace(path)
    return path


def mosaic_figure(
    rows: Sequence[Row],
    zooms: np.ndarray,
    cuts: Sequence[tuple[int, int]],
    crop: tuple[slice, ...],
    *,
    title: str | None = None,
    affine: np.ndarray | None = None,
):
    """The matplotlib ``Figure`` of :func:`mosaic` (not saved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib import colormaps

    zooms = np.asarray(zooms, dtype=float)
    if affine is None:
        affine = np.diag(list(zooms) + [1.0])
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
                ax.set_title(f"{_AXES[axis][0]} {cut_position(affine, axis, index, crop)}", fontsize=8, pad=2)
            for edge, letter in orientation_labels(affine, axis).items():
                x, y, ha, va = _EDGES[edge]
                ax.text(x, y, letter, color="white", fontsize=7, fontweight="bold", ha=ha, va=va,
                        transform=ax.transAxes, gid=f"orientation-{edge}")
            if c == 0:
                ax.set_ylabel(row.label, fontsize=9)
        cax = fig.add_subplot(gs[r, -1])
        cb = fig.colorbar(im, cax=cax)
        cb.ax.tick_params(labelsize=7)
        if row.units:
            cb.set_label(row.units, fontsize=8)
    return fig


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
    ``phase_units`` is the phase sidecar ``Units``; ``field_strength_t`` scales the field-strength
    dependent windows (:data:`WINDOWS`). A figure that cannot be drawn is returned with ``path=None``
    and the ``error`` text; the others are still made. Each result records the windows, orientation
    and slice positions it was drawn with.
    """
    fig_dir = Path(fig_dir)
    raw = dict(raw or {})
    results: list[FigureResult] = []
    p = run.prefix
    drawn: dict[str, dict] = {}

    def attempt(key, title, caption, func):
        try:
            path = func()
        except Exception as exc:  # a report must not fail because one figure did
            results.append(FigureResult(key, title, None, caption, f"{type(exc).__name__}: {exc}"))
            return
        if path is not None:
            info = drawn.get(key, {})
            where = "; ".join(info.get("slices", []))
            orient = info.get("orientation", "")
            if orient:
                caption += (f" Neurological view ({orient} axes from the image affine): direction letters at each "
                            f"panel edge (L/R, A/P, S/I); slices at {where}.")
            results.append(FigureResult(key, title, path, caption, windows=info.get("windows", {}),
                                        orientation=orient, slices=info.get("slices", [])))

    chi = zooms = mask = aff = None
    if run.has("chimap"):
        chi, zooms, aff = load_volume_affine(run.path("chimap"))
    mask_vol = None
    if run.has("brain_mask"):
        mask_vol, mzooms, maff = load_volume_affine(run.path("brain_mask"), dtype=np.float32)
        mask = mask_vol > 0.5
        zooms = mzooms if zooms is None else zooms
        aff = maff if aff is None else aff
    if chi is not None and mask is None:
        mask = chi != 0
    ref_shape = chi.shape if chi is not None else (mask.shape if mask is not None else None)

    mag = phase = raff = None
    if "mag" in raw:
        mag, rz, raff = load_volume_affine(raw["mag"])
    if "phase" in raw:
        ph, rz, raff = load_volume_affine(raw["phase"])
        phase = _scaled_phase(ph, phase_units)
    elif "real" in raw and "imag" in raw:
        re_, rz, raff = load_volume_affine(raw["real"])
        im_, _ = load_volume(raw["imag"])
        if mag is None:
            mag = np.hypot(re_, im_).astype(np.float32)
        phase = np.arctan2(im_, re_).astype(np.float32)
    if ref_shape is None and mag is not None:
        ref_shape, zooms, aff = mag.shape, rz, raff
    if ref_shape is None:
        return results
    b0 = float(field_strength_t) if field_strength_t else None
    crop = _bbox(mask, ref_shape)
    cuts3 = choose_cuts(mask, ref_shape, n_axial=1)
    cuts5 = choose_cuts(mask, ref_shape, n_axial=3)
    from nibabel.orientations import aff2axcodes

    orientation = "".join(aff2axcodes(aff))

    def draw(key, rows, cuts, name):
        """:func:`mosaic` of ``rows``; records what was drawn for the figure ``key``."""
        drawn[key] = {
            "windows": {r.label: (float(r.vmin), float(r.vmax), r.units) for r in rows},
            "orientation": orientation,
            "slices": [f"{_AXES[a][0]} {cut_position(aff, a, i, crop)}" for a, i in cuts],
        }
        return mosaic(rows, zooms, cuts, crop, fig_dir / name, affine=aff)

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
            vmax = float(np.percentile(inside[np.isfinite(inside)], WINDOWS["magnitude"].high)) if inside.size else 1.0
        contours = ([(mask, "#ff3030")] if mask is not None else []) + csf_contour()
        row = Row(base, label, "gray", 0.0, vmax or 1.0, units, contours=contours)
        return draw("mask", [row], cuts5, f"{p}_desc-brainmask.png")

    attempt("mask", "Brain mask",
            "Echo-1 magnitude with the final brain mask (red outline; the region of the local field and "
            "the Chimap)" + ("; the CSF reference region in cyan." if run.has("reference_mask") else "."), fig_mask)

    # 2. wrapped phase -> total field -> local field
    def fig_fields():
        rows = []
        if _same(phase, ref_shape):
            rows.append(Row(phase, "echo-1 phase (wrapped)", "twilight", *window("phase"), "rad",
                            contours=[(mask, "#ffffff")] if mask is not None else ()))
        total_in = None
        if run.has("total_fieldmap"):
            total, _ = load_volume(run.path("total_fieldmap"))
            total_in = total != 0
            if mask is not None:
                total_in |= mask
            rows.append(Row(total, "total field", "RdBu_r", *window("total_field", b0), "Hz", inside=total_in))
        if run.has("local_fieldmap"):
            local, _ = load_volume(run.path("local_fieldmap"))
            inside = mask if mask is not None else local != 0
            rows.append(Row(local, "local field", "RdBu_r", *window("local_field"), "ppm", inside=inside))
        if not rows:
            return None
        return draw("fields", rows, cuts3, f"{p}_desc-fields.png")

    hz_per_ppm = f" (1 ppm = {GAMMA_BAR_MHZ_T * b0:.1f} Hz at {b0:g} T)" if b0 else ""
    tlo, thi = window("total_field", b0)
    llo, lhi = window("local_field")
    attempt("fields", "Phase and field maps",
            "Wrapped echo-1 phase (rad), the B0 field map fitted from the unwrapped echoes (Hz, background "
            f"fields included), and the local field after background field removal (ppm){hz_per_ppm}. "
            f"Fixed windows, the same in every report: total field {tlo:.4g} to {thi:.4g} Hz (+-1 ppm of "
            f"{b0 or DEFAULT_FIELD_T:g} T{'' if b0 else ', assumed: no field strength recorded'}), local field "
            f"{llo:g} to {lhi:g} ppm.", fig_fields)

    # 3. Chimap
    def fig_chi():
        if chi is None:
            return None
        contours = csf_contour()
        row = Row(chi, "susceptibility", "gray", *window("chimap"), "ppm", inside=mask, contours=contours)
        return draw("chimap", [row], cuts5, f"{p}_desc-chimap.png")

    attempt("chimap", "Susceptibility map (Chimap)",
            f"Magnetic susceptibility at a fixed window of {CHI_WINDOW_PPM[0]:g} to {CHI_WINDOW_PPM[1]:g} ppm "
            "(the same in every report); black outside the brain mask.", fig_chi)

    # 4. R2* / T2*
    def fig_relax():
        rows = []
        for key, wkey, label, units in (("r2starmap", "r2star", "R2*", "1/s"), ("t2starmap", "t2star", "T2*", "s")):
            if not run.has(key):
                continue
            vol, _ = load_volume(run.path(key))
            rows.append(Row(vol, label, "inferno", *window(wkey, b0), units, inside=vol != 0))
        if not rows:
            return None
        return draw("relaxation", rows, cuts3, f"{p}_desc-relaxation.png")

    if run.has("r2starmap") or run.has("t2starmap"):
        rlo, rhi = window("r2star", b0)
        t_lo, t_hi = window("t2star", b0)
        attempt("relaxation", "R2* / T2*", "Relaxation maps from the multi-echo magnitude decay at fixed windows "
                f"scaled with the field strength ({b0 or DEFAULT_FIELD_T:g} T): R2* {rlo:g} to {rhi:g} 1/s, "
                f"T2* {t_lo:g} to {1000 * t_hi:.3g} ms.", fig_relax)

    # 5. SWI / minIP
    def fig_swi():
        rows = swi_rows(run, crop)
        return draw("swi", rows, cuts3, f"{p}_desc-swi.png") if rows else None

    if run.has("swi") or run.has("minip"):
        attempt("swi", "SWI / minIP", SWI_CAPTION, fig_swi)

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


def swi_rows(run: Any, crop: tuple[slice, ...]) -> list[Row]:
    """Rows of the run's SWI and minIP, grey, at the ``swi`` window of :data:`WINDOWS` (0 to the 99.5th
    percentile in ``crop``: SWI has no quantitative units); empty without either."""
    rows = []
    pct = WINDOWS["swi"].high
    for key, label in (("swi", "SWI"), ("minip", "minIP")):
        if not run.has(key):
            continue
        vol, _ = load_volume(run.path(key))
        vals = vol[tuple(crop)]
        vals = vals[np.isfinite(vals)]
        vmax = float(np.percentile(vals, pct)) if vals.size else 1.0
        rows.append(Row(vol, label, "gray", 0.0, vmax or 1.0, "a.u."))
    return rows


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


#: group plots show values within the quartiles +- this many interquartile ranges (Tukey's far-out fence);
#: points beyond are drawn as triangles at the edge of the plot
OUTLIER_FENCE_IQR = 3.0


def robust_limits(values: Sequence[float | None]) -> tuple[float, float]:
    """``(low, high)`` of the y axis of a group plot: the finite values' range, cut at the quartiles
    +- :data:`OUTLIER_FENCE_IQR` IQR so that one wild value does not squash the others; 5 % margin."""
    v = np.asarray([np.nan if x is None else x for x in values], float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return -1.0, 1.0
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    lo, hi = float(v.min()), float(v.max())
    if iqr > 0:
        lo, hi = max(lo, q1 - OUTLIER_FENCE_IQR * iqr), min(hi, q3 + OUTLIER_FENCE_IQR * iqr)
    span = hi - lo
    pad = 0.05 * span if span > 0 else (0.1 * abs(hi) or 1.0)
    return lo - pad, hi + pad


def _clipped_scatter(ax, x, vals, lim, **kw) -> int:
    """Scatter ``vals``; those outside ``lim`` as triangles at its edge. Returns how many were clipped."""
    lo, hi = lim
    below, above = vals < lo, vals > hi
    inside = ~(below | above)
    ax.scatter(x[inside], vals[inside], **kw)
    style = {k: v for k, v in kw.items() if k != "marker"}
    ax.scatter(x[above], np.full(int(above.sum()), hi), marker="^", **style)
    ax.scatter(x[below], np.full(int(below.sum()), lo), marker="v", **style)
    return int(below.sum() + above.sum())


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
    lim = robust_limits([v for d in data for v in d])
    clipped = 0
    for i, (name, vals, flagged, labels) in enumerate(groups):
        vals = np.asarray([np.nan if v is None else v for v in vals], float)
        flagged = np.asarray(flagged, bool) if len(flagged) == len(vals) else np.zeros(len(vals), bool)
        x = positions[i] + _jitter(len(vals), i)
        ok = np.isfinite(vals)
        clipped += _clipped_scatter(ax, x[ok & ~flagged], vals[ok & ~flagged], lim, s=16, color="#1f77b4",
                                    alpha=0.8, zorder=3)
        clipped += _clipped_scatter(ax, x[ok & flagged], vals[ok & flagged], lim, s=28, color="#d62728",
                                    marker="D", zorder=4)
        for xi, yi, fl, lab in zip(x, vals, flagged, labels):
            if fl and math.isfinite(yi):
                ax.annotate(lab, (xi, min(max(yi, lim[0]), lim[1])), fontsize=6, color="#d62728", xytext=(3, 2),
                            textcoords="offset points")
    ax.set_ylim(*lim)
    if clipped:
        ax.text(0.99, 0.99, f"{clipped} beyond the plotted range (triangles)", fontsize=7, ha="right", va="top",
                transform=ax.transAxes, color="#555")
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
        lim = robust_limits(vals)
        clipped = _clipped_scatter(ax, x[ok & ~fl], vals[ok & ~fl], lim, s=14, color="#1f77b4", alpha=0.8)
        clipped += _clipped_scatter(ax, x[ok & fl], vals[ok & fl], lim, s=26, color="#d62728", marker="D")
        for xi, yi, f, lab in zip(x, vals, fl, labels):
            if f and math.isfinite(yi):
                ax.annotate(lab, (xi, min(max(yi, lim[0]), lim[1])), fontsize=6, color="#d62728", xytext=(3, 2),
                            textcoords="offset points")
        if ok.any():
            ax.boxplot(vals[ok], positions=[0], widths=0.6, showfliers=False, medianprops={"color": "#444"},
                       boxprops={"color": "#aaa"}, whiskerprops={"color": "#aaa"}, capprops={"color": "#aaa"})
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(*lim)
        ax.set_xticks([])
        ax.set_title(name + (f" ({clipped} clipped)" if clipped else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", color="#eee")
    fig.subplots_adjust(hspace=0.45, wspace=0.45)
    return _save(fig, path)
