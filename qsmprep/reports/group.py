"""Group level: tables and a report over every processed series in OUTPUT_DIR.

``qsmprep BIDS_DIR OUTPUT_DIR group`` calls :func:`run_group`, which reads each series'
``<prefix>_desc-qc_metrics.json`` and ``<prefix>_desc-roi_stats.tsv`` (next to its Chimap) and writes

- ``OUTPUT_DIR/group_qc.tsv``: one row per series: ``participant_id session_id acq run``, every numeric QC
  metric (alphabetical), ``flagged`` (True/False) and ``flag_reasons`` (``; ``-separated);
- ``OUTPUT_DIR/group_roi.tsv``: long format, one row per series x region: ``participant_id session_id acq run
  label name n_voxels mean_ppm median_ppm std_ppm``;
- ``OUTPUT_DIR/group.html`` with ``OUTPUT_DIR/group/figures/*.png``: per-region susceptibility across
  series (box + strip plots), every QC metric across series, and the flagged series with reasons.

A series is flagged when its QC file lists ``Flags``, when the file is missing or unreadable, or,
with at least :data:`MIN_RUNS_FOR_OUTLIERS` series, when a metric is a group outlier (robust z-score
``0.6745 |x - median| / MAD`` above :data:`OUTLIER_Z`; Iglewicz & Hoaglin 1993). Missing values are
``n/a`` (BIDS); both tables load with ``pandas.read_csv(path, sep="\\t")`` as they are. The tables are
rebuilt from scratch on every call, so re-running after more participants were processed updates them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from qsmprep.__about__ import __version__
from qsmprep.outputs import ROI_COLUMNS
from qsmprep.reports import reader

__all__ = [
    "ENTITY_COLUMNS",
    "ROI_COLUMNS",
    "MIN_RUNS_FOR_OUTLIERS",
    "OUTLIER_Z",
    "GroupTables",
    "NoProcessedRunsError",
    "collect_group",
    "write_tsv",
    "run_group",
    "voxelwise_group_maps",
    "write_group_maps",
]

ENTITY_COLUMNS = ("subject", "session", "acq", "run")
MIN_RUNS_FOR_OUTLIERS = 5
OUTLIER_Z = 3.5
QC_TSV = "group_qc.tsv"
ROI_TSV = "group_roi.tsv"
GROUP_HTML = "group.html"


class NoProcessedRunsError(LookupError):
    """OUTPUT_DIR holds no processed series (no ``*_Chimap.nii.gz``)."""


@dataclass
class GroupTables:
    """The collected rows (dicts keyed by column) and the metric columns of the QC table."""

    runs: list = field(default_factory=list)
    qc_rows: list[dict] = field(default_factory=list)
    roi_rows: list[dict] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    #: per series prefix: metric -> True where that metric is flagged (for the plots)
    flagged_metrics: dict[str, set] = field(default_factory=dict)

    @property
    def qc_columns(self) -> list[str]:
        return list(ENTITY_COLUMNS) + list(self.metrics) + ["flagged", "flag_reasons"]

    @property
    def roi_columns(self) -> list[str]:
        return list(ENTITY_COLUMNS) + ["segmentation"] + list(ROI_COLUMNS)


def _entities(run: reader.ProcessedRun) -> dict:
    return {"subject": run.subject, "session": run.session, "acq": run.acquisition, "run": run.run}


def _value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value_text(x) for x in v) + "]"
    return str(v)


def _flag_reason(f: dict) -> str:
    metric = f.get("metric")
    text = f"{metric} = {_value_text(f.get('value'))}" if metric else "series"
    if f.get("expected") is not None:
        exp = f["expected"]
        if isinstance(exp, (list, tuple)) and len(exp) == 2:
            lo, hi = exp
            exp = f"{'-inf' if lo is None else _value_text(lo)} to {'inf' if hi is None else _value_text(hi)}"
        text += f" (expected {_value_text(exp)})"
    if f.get("reason"):
        text += f": {f['reason']}"
    return text


def _robust_outliers(values: dict[str, float | None]) -> dict[str, tuple[float, float]]:
    """prefix -> (robust z, median) for the outliers of one metric."""
    finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
    if len(finite) < MIN_RUNS_FOR_OUTLIERS:
        return {}
    x = np.array(list(finite.values()), float)
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    if not mad > 0:
        return {}
    out = {}
    for k, v in finite.items():
        z = 0.6745 * (v - med) / mad
        if abs(z) > OUTLIER_Z:
            out[k] = (z, med)
    return out


def _seg_tables(run: reader.ProcessedRun) -> list[tuple[str, Path]]:
    """``(name, path)`` of the series' ``seg-<name>_desc-roi_stats.tsv`` tables (registered segmentations and
    atlases)."""
    out = []
    for p in sorted(run.anat_dir.glob(f"{run.prefix}_seg-*_desc-roi_stats.tsv")):
        name = p.name[len(run.prefix) + len("_seg-"):].split("_", 1)[0]
        out.append((name, p))
    return out


# --------------------------------------------------------------------------------------------------
# template-space group maps
# --------------------------------------------------------------------------------------------------

_SPACE_RE = r"_(space-(?!T1w)[A-Za-z0-9]+(?:_res-[0-9]+)?)_Chimap\.nii\.gz$"


def voxelwise_group_maps(chis: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Voxel-wise ``mean``, ``sd`` (sample SD, ddof 1) and ``n`` (series with the voxel in their brain mask) of
    susceptibility maps on one grid; mean is 0 where n = 0, SD 0 where n < 2."""
    if not chis or len(chis) != len(masks):
        raise ValueError("need one mask per map and at least one map")
    shape = np.shape(chis[0])
    n = np.zeros(shape, np.int32)
    s1 = np.zeros(shape, np.float64)
    s2 = np.zeros(shape, np.float64)
    for c, m in zip(chis, masks):
        if np.shape(c) != shape or np.shape(m) != shape:
            raise ValueError(f"maps of different grids: {np.shape(c)} vs {shape}")
        m = np.asarray(m) != 0
        c = np.where(m, np.asarray(c, np.float64), 0.0)
        n += m
        s1 += c
        s2 += c * c
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s1 / np.maximum(n, 1), 0.0)
        var = np.where(n > 1, (s2 - n * mean * mean) / np.maximum(n - 1, 1), 0.0)
    return {"mean": mean.astype(np.float32), "sd": np.sqrt(np.clip(var, 0, None)).astype(np.float32),
            "n": n.astype(np.int16)}


def write_group_maps(output_dir: str | os.PathLike, runs: Sequence[reader.ProcessedRun]) -> dict[str, dict[str, Path]]:
    """For each template space with ``space-<template>[_res-<r>]_Chimap`` files (and their brain masks):
    ``OUTPUT_DIR/group/<space>_desc-{mean,sd}_Chimap.nii.gz`` and ``<space>_desc-n_mask.nii.gz`` (series per
    voxel). Returns ``{space: {"mean": path, "sd": path, "n": path}}``."""
    import re

    import nibabel as nib

    from qsmprep.utils.derivatives import atomic_save_nifti, atomic_write_json

    output_dir = Path(output_dir)
    by_space: dict[str, list[tuple[Path, Path]]] = {}
    for run in runs:
        for p in sorted(run.anat_dir.glob(f"{run.prefix}_space-*_Chimap.nii.gz")):
            m = re.search(_SPACE_RE, p.name)
            mask = p.with_name(p.name.replace("_Chimap.nii.gz", "_desc-brain_mask.nii.gz"))
            if m and mask.is_file():
                by_space.setdefault(m.group(1), []).append((p, mask))
    out: dict[str, dict[str, Path]] = {}
    for space, pairs in sorted(by_space.items()):
        imgs = [nib.load(str(c)) for c, _ in pairs]
        ref = imgs[0]
        chis = [np.asarray(i.get_fdata(dtype=np.float32)) for i in imgs]
        masks = [np.asarray(nib.load(str(m)).dataobj) for _, m in pairs]
        try:
            maps = voxelwise_group_maps(chis, masks)
        except ValueError:
            continue
        paths = {}
        for key, stem in (("mean", "desc-mean_Chimap"), ("sd", "desc-sd_Chimap"), ("n", "desc-n_mask")):
            path = output_dir / "group" / f"{space}_{stem}.nii.gz"
            img = nib.Nifti1Image(maps[key], ref.affine)
            img.set_qform(ref.affine, 1)
            img.set_sform(ref.affine, 1)
            atomic_save_nifti(img, path)
            atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {
                "Description": {"mean": "voxel-wise mean susceptibility over series", "sd": "voxel-wise sample SD "
                                "(0 where fewer than 2 series)", "n": "series with the voxel in their brain mask"}[key],
                "Units": "ppm" if key != "n" else "count", "Sources": [str(c.relative_to(output_dir)) for c, _ in pairs],
                "SpatialReference": space})
            paths[key] = path
        out[space] = paths
    return out


def collect_group(
    output_dir: str | os.PathLike,
    subjects: Iterable[str] | None = None,
    sessions: Iterable[str] | None = None,
) -> GroupTables:
    """Rows of both group tables. Raises :class:`NoProcessedRunsError` when no series is found."""
    output_dir = Path(output_dir)
    runs = reader.find_processed_runs(output_dir, subjects, sessions)
    if not runs:
        raise NoProcessedRunsError(str(output_dir))
    tables = GroupTables(runs=runs)
    per_run: dict[str, dict[str, float | None]] = {}
    reasons: dict[str, list[str]] = {}
    metric_names: set[str] = set()
    for run in runs:
        metrics, flags, problem = reader.load_qc(run.qc_json)
        nums = reader.numeric_metrics(metrics)
        per_run[run.prefix] = nums
        metric_names |= set(nums)
        reasons[run.prefix] = []
        tables.flagged_metrics[run.prefix] = set()
        if problem:
            reasons[run.prefix].append(f"QC metrics file {problem} ({run.qc_json.name})")
        for f in flags:
            reasons[run.prefix].append(_flag_reason(f))
            if f.get("metric"):
                tables.flagged_metrics[run.prefix].add(str(f["metric"]))
        for seg, path in [("segmentation-dir", run.roi_tsv)] + _seg_tables(run):
            for row in reader.read_roi_tsv(path):
                tables.roi_rows.append({**_entities(run), "segmentation": seg, **{c: row.get(c) for c in ROI_COLUMNS},
                                        "_prefix": run.prefix})
    tables.metrics = sorted(metric_names)
    for name in tables.metrics:
        for prefix, (z, med) in _robust_outliers({p: m.get(name) for p, m in per_run.items()}).items():
            reasons[prefix].append(
                f"{name} = {_value_text(per_run[prefix][name])} is a group outlier (robust z = {z:+.1f}, "
                f"group median {_value_text(med)})"
            )
            tables.flagged_metrics[prefix].add(name)
    for run in runs:
        row = _entities(run)
        for name in tables.metrics:
            row[name] = per_run[run.prefix].get(name)
        row["flagged"] = bool(reasons[run.prefix])
        row["flag_reasons"] = "; ".join(reasons[run.prefix]) or None
        row["_prefix"] = run.prefix
        row["_anchor"] = run.anchor
        tables.qc_rows.append(row)
    return tables


# --------------------------------------------------------------------------------------------------
# TSV
# --------------------------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return repr(v) if math.isfinite(v) else "n/a"
    text = " ".join(str(v).replace("\t", " ").split())
    return text if text else "n/a"


#: entity columns written as BIDS identifiers (``participant_id`` = ``sub-01``, as in participants.tsv)
#: so that labels such as ``01`` stay strings when a statistics package reads the table
TSV_ID_COLUMNS = {"subject": ("participant_id", "sub-"), "session": ("session_id", "ses-")}


def write_tsv(path: str | os.PathLike, columns: Sequence[str], rows: Sequence[dict]) -> Path:
    """Atomic TSV with a header; None/NaN as ``n/a``, booleans as True/False; ``subject``/``session``
    as ``participant_id``/``session_id`` (``sub-<label>``/``ses-<label>``)."""
    from qsmprep.utils.derivatives import atomic_write_text

    def cell(r: dict, c: str) -> str:
        value = r.get(c)
        if c in TSV_ID_COLUMNS and value not in (None, ""):
            return TSV_ID_COLUMNS[c][1] + str(value)
        return _cell(value)

    lines = ["\t".join(TSV_ID_COLUMNS.get(c, (c,))[0] for c in columns)]
    for r in rows:
        lines.append("\t".join(cell(r, c) for c in columns))
    return atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _sd_text(values: Sequence[float]) -> str:
    """The sample SD across series, or ``n = 1`` when one series cannot have one (never "nan")."""
    if len(values) < 2:
        return f"n = {len(values)}"
    return f"{float(np.std(values, ddof=1)):.4f}"


def _clipped_note(values: Iterable[Any]) -> int:
    from qsmprep.reports.figures import robust_limits

    v = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    lo, hi = robust_limits(v)
    return sum(1 for x in v if x < lo or x > hi)


def _roi_order(item) -> tuple:
    """Regions ordered by segmentation (``--segmentation-dir`` first), then label, then name."""
    (seg, lab, name) = item[0]
    return (seg != "segmentation-dir", str(seg), str(lab).zfill(6), str(name))


def _maps_html(output_dir: Path, figures: dict[str, Path | None]) -> str:
    from qsmprep.reports.html import escape, relative_link

    items = [(k[len("map_"):], p) for k, p in figures.items() if k.startswith("map_") and p is not None]
    if not items:
        return ""
    body = "".join(f'<h3>{escape(space)}</h3><figure><img src="{relative_link(p, output_dir)}" alt="mean map {escape(space)}">'
                   f"<figcaption>Voxel-wise mean and SD of the series' Chimaps resampled into {escape(space)} (inside "
                   f"the union of their brain masks); maps in <code>group/{escape(space)}_desc-*.nii.gz</code>."
                   "</figcaption></figure>" for space, p in items)
    return f'<section id="maps"><h2>Template space</h2>{body}</section>'


def _group_html(output_dir: Path, tables: GroupTables, figures: dict[str, Path | None]) -> str:
    from qsmprep.reports.html import CSS, IMG_SCRIPT, escape, format_value, relative_link

    n_runs = len(tables.qc_rows)
    n_subs = len({r["subject"] for r in tables.qc_rows})
    flagged = [r for r in tables.qc_rows if r["flagged"]]

    def run_link(r):
        if not (output_dir / f"sub-{r['subject']}.html").is_file():
            return escape(r["_prefix"])
        return f'<a href="sub-{escape(r["subject"])}.html#{escape(r["_anchor"])}">{escape(r["_prefix"])}</a>'

    if flagged:
        rows = "".join(f'<tr class="flagged"><td>{run_link(r)}</td><td>{escape(r["flag_reasons"])}</td></tr>'
                       for r in flagged)
        flagged_html = (f'<div class="flagbox">&#9888; {len(flagged)} of {n_runs} series flagged.</div>'
                        f"<table><tr><th>series</th><th>reasons</th></tr>{rows}</table>")
    else:
        flagged_html = '<div class="okbox">No series flagged.</div>'

    def fig(key, title, caption):
        p = figures.get(key)
        if p is None:
            return ""
        return (f'<h3>{escape(title)}</h3><figure><img src="{relative_link(p, output_dir)}" alt="{escape(title)}">'
                f"<figcaption>{escape(caption)}</figcaption></figure>")

    roi_html = fig("roi", "Susceptibility by region",
                   "Mean susceptibility (ppm) of each region across series: boxes show the quartiles, "
                   "points the series; flagged series are red diamonds.")
    if not tables.roi_rows:
        roi_html = ('<p class="note">No region statistics (<code>*_desc-roi_stats.tsv</code>) found: run the '
                    "participant level with <code>--segmentation-dir</code>.</p>")
    else:
        by_roi: dict[tuple, list[float]] = {}
        for r in tables.roi_rows:
            if r.get("mean_ppm") is not None:
                by_roi.setdefault((r.get("segmentation"), r.get("label"), r.get("name")), []).append(
                    float(r["mean_ppm"]))
        body = "".join(
            f"<tr><td>{escape(seg)}</td><td>{escape(lab)}</td><td>{escape(name)}</td><td class='num'>{len(v)}</td>"
            f"<td class='num'>{np.mean(v):.4f}</td><td class='num'>{_sd_text(v)}</td>"
            f"<td class='num'>{np.min(v):.4f}</td><td class='num'>{np.max(v):.4f}</td></tr>"
            for (seg, lab, name), v in sorted(by_roi.items(), key=_roi_order))
        roi_html += ("<table><tr><th>segmentation</th><th>label</th><th>name</th><th>series</th><th>mean of means (ppm)</th>"
                     f"<th>SD across series</th><th>min</th><th>max</th></tr>{body}</table>")

    n_clipped = sum(_clipped_note(r.get(m) for r in tables.qc_rows) for m in tables.metrics)
    qc_fig = fig("qc", "QC metrics across series",
                 "Each panel is one QC metric; points are series, red diamonds the series flagged for that metric "
                 "(by the participant-level checks or as group outliers). The y axes span the quartiles +- 3 IQR "
                 "(robust to single wild values): "
                 + ((f"{n_clipped} values beyond are drawn as triangles" if n_clipped != 1 else
                     "1 value beyond is drawn as a triangle") + " at the edge (the table below has the values)."
                    if n_clipped else "no value is beyond.")
                 + (" One series: n = 1, no spread across series." if n_runs == 1 else ""))
    if not tables.metrics:
        qc_fig = '<p class="note">No QC metrics (<code>*_desc-qc_metrics.json</code>) found.</p>'
    head = "".join(f"<th>{escape(c)}</th>" for c in ["series"] + tables.metrics + ["flagged"])
    body = []
    for r in tables.qc_rows:
        cls = ' class="flagged"' if r["flagged"] else ""
        cells = [f"<td>{run_link(r)}</td>"]
        fm = tables.flagged_metrics.get(r["_prefix"], set())
        for m in tables.metrics:
            mark = " &#9888;" if m in fm else ""
            cells.append(f"<td class='num'>{escape(format_value(r.get(m)))}{mark}</td>")
        cells.append(f"<td>{'yes' if r['flagged'] else 'no'}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    qc_table = f"<div style='overflow-x:auto'><table><tr>{head}</tr>{''.join(body)}</table></div>"
    subs = sorted({r["subject"] for r in tables.qc_rows})
    nav = " ".join(f'<a href="sub-{escape(s)}.html">sub-{escape(s)}</a>' for s in subs
                   if (output_dir / f"sub-{s}.html").is_file())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qsmprep: group report</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>qsmprep group report</h1><div class="sub">{n_runs} series of {n_subs} participant{'s' if n_subs != 1 else ''}; {len(flagged)} flagged</div></header>
<nav><a href="#flagged">Flagged</a> <a href="#roi">Regions</a> <a href="#qc">QC</a> {nav}</nav>
<main>
<div id="img-failed" class="flagbox"></div>
<section id="flagged"><h2>Flagged series</h2>{flagged_html}</section>
<section id="roi"><h2>Regions</h2>{roi_html}
<p class="note">Table: <a href="{ROI_TSV}">{ROI_TSV}</a></p></section>
{_maps_html(output_dir, figures)}
<section id="qc"><h2>Quality control</h2>{qc_fig}{qc_table}
<p class="note">Table: <a href="{QC_TSV}">{QC_TSV}</a>. Group outliers: robust z-score above {OUTLIER_Z:g}
(needs at least {MIN_RUNS_FOR_OUTLIERS} series).</p></section>
<p class="note">qsmprep {escape(__version__)}, {datetime.now():%Y-%m-%d %H:%M:%S}</p>
</main>
<script>{IMG_SCRIPT}</script>
</body>
</html>
"""


def run_group(
    output_dir: str | os.PathLike,
    subjects: Iterable[str] | None = None,
    sessions: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Write ``group_qc.tsv``, ``group_roi.tsv`` and ``group.html`` (+ figures) into OUTPUT_DIR.

    Returns ``{"qc": ..., "roi": ..., "html": ...}``. Raises :class:`NoProcessedRunsError` when
    OUTPUT_DIR holds no processed series (nothing is written then).
    """
    from qsmprep.reports.figures import metric_strips, strip_box_plot
    from qsmprep.utils.derivatives import atomic_write_text

    output_dir = Path(output_dir)
    tables = collect_group(output_dir, subjects, sessions)
    out = {
        "qc": write_tsv(output_dir / QC_TSV, tables.qc_columns, tables.qc_rows),
        "roi": write_tsv(output_dir / ROI_TSV, tables.roi_columns, tables.roi_rows),
    }
    fig_dir = output_dir / "group" / "figures"
    figures: dict[str, Path | None] = {"qc": None, "roi": None}
    labels = [r["_prefix"] for r in tables.qc_rows]
    flagged_runs = {r["_prefix"] for r in tables.qc_rows if r["flagged"]}
    if tables.metrics:
        values = {m: [r.get(m) for r in tables.qc_rows] for m in tables.metrics}
        flags = {m: [m in tables.flagged_metrics.get(p, set()) for p in labels] for m in tables.metrics}
        figures["qc"] = metric_strips(tables.metrics, values, flags, labels, fig_dir / "group_desc-qc.png")
    if tables.roi_rows:
        groups: dict[tuple, list] = {}
        for r in tables.roi_rows:
            prefix = r["_prefix"]
            g = groups.setdefault((r.get("segmentation"), r.get("label"), r.get("name")), [[], [], []])
            g[0].append(r.get("mean_ppm"))
            g[1].append(prefix in flagged_runs)
            g[2].append(prefix)
        ordered = sorted(groups.items(), key=_roi_order)
        several = len({k[0] for k in groups}) > 1
        figures["roi"] = strip_box_plot(
            [((f"{seg}: " if several else "") + str(name if name is not None else lab), v, f, l)
             for (seg, lab, name), (v, f, l) in ordered],
            fig_dir / "group_desc-roichi.png", ylabel="mean susceptibility (ppm)",
            title=f"Regional susceptibility across {len(tables.qc_rows)} series",
        )
    maps = write_group_maps(output_dir, tables.runs)
    for space, paths in maps.items():
        figures[f"map_{space}"] = _mean_map_figure(paths, fig_dir / f"group_{space}_desc-mean.png", space)
    for stale in (fig_dir.glob("*.png") if fig_dir.is_dir() else []):
        if stale not in figures.values():
            stale.unlink(missing_ok=True)
    out["html"] = atomic_write_text(output_dir / GROUP_HTML, _group_html(output_dir, tables, figures))
    for space, paths in maps.items():
        out[f"mean_{space}"] = paths["mean"]
    return out


def _mean_map_figure(paths: dict[str, Path], path: Path, space: str) -> Path:
    """Mean and SD maps (three planes through the centre of the covered region) of a template space."""
    from qsmprep.reports.figures import Row, choose_cuts, crop_box, load_volume, mosaic

    mean, zooms = load_volume(paths["mean"])
    sd, _ = load_volume(paths["sd"])
    n, _ = load_volume(paths["n"])
    inside = n > 0
    cuts = choose_cuts(inside, mean.shape)
    lim = float(np.percentile(np.abs(mean[inside]), 99)) if inside.any() else 0.1
    rows = [Row(mean, "mean", "gray", -lim, lim, "ppm", inside=inside),
            Row(sd, "SD", "magma", 0.0, float(np.percentile(sd[n > 1], 99)) if (n > 1).any() else 0.05, "ppm",
                inside=inside)]
    return mosaic(rows, zooms, cuts, crop_box(inside, mean.shape), path, title=f"Group mean susceptibility, {space}")
