"""Per-participant HTML reports: ``OUTPUT_DIR/sub-<label>.html`` + ``OUTPUT_DIR/sub-<label>/figures/``.

A report is built from what OUTPUT_DIR holds (so ``--reports-only`` can rebuild it without running
any processing): the maps and sidecars of each processed series, the raw echo-1 magnitude and phase
(from the ``Sources`` of the Chimap sidecar, found in BIDS_DIR or via ``DatasetLinks.raw``), the QC
metrics and ROI tables next to the Chimap, ``logs/CITATION.md`` and the crash files under
``sub-<label>/log/``. The page is self-contained: inline CSS, figures as relative links, no external
resource (it loads offline). A small inline script marks figures that fail to load (a banner, and
``data-images-failed`` on ``<html>`` for automated checks).
"""

from __future__ import annotations

import html
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

from qsmprep.__about__ import __version__
from qsmprep.outputs import ROI_COLUMNS
from qsmprep.qsm.qc import QC_METRICS, format_range, is_recorded_value
from qsmprep.reports import reader
from qsmprep.reports.figures import FigureResult, run_figures

__all__ = [
    "build_subject_report", "generate_reports", "markdown_to_html", "CSS", "IMG_SCRIPT", "escape", "format_value",
    "relative_link", "QC_DOCS_URL",
]

LOGGER = logging.getLogger("qsmprep")

#: the QC documentation (docs/qc.md); each metric's section is ``#<metric name>``
QC_DOCS_URL = "https://github.com/qsmprep/qsmprep/blob/main/docs/qc.md"

CSS = """
:root { --fg:#1d1d1f; --muted:#666; --line:#ddd; --flag:#fde2e1; --flagfg:#a40000; --ok:#e7f5e9; --accent:#2a5db0; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       margin: 0; line-height: 1.45; font-size: 15px; background: #fafafa; }
header { background: #20232a; color: #fff; padding: 14px 28px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header .sub { color: #bbb; font-size: 13px; }
nav { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
      padding: 6px 28px; font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 8px 28px 40px; max-width: 1500px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 6px 18px 14px;
          margin: 16px 0; }
h2 { font-size: 19px; margin: 12px 0 8px; }
h3 { font-size: 16px; margin: 16px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 220px; }
tr.flagged td { background: var(--flag); color: var(--flagfg); font-weight: 600; }
tr.outside td { background: #fff6dd; }
.flagbox { background: var(--flag); border: 1px solid #f3b3b0; color: var(--flagfg); padding: 8px 12px;
           border-radius: 4px; margin: 8px 0; }
.okbox { background: var(--ok); border: 1px solid #b9e0bf; padding: 8px 12px; border-radius: 4px; margin: 8px 0; }
.note { color: var(--muted); font-size: 13px; }
figure { margin: 10px 0 16px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; max-width: 1100px; }
pre { background: #f6f6f6; border: 1px solid var(--line); padding: 8px; overflow-x: auto; font-size: 12px;
      white-space: pre-wrap; }
code { background: #f2f2f2; padding: 0 3px; border-radius: 3px; font-size: 90%; }
details summary { cursor: pointer; color: var(--accent); margin: 4px 0; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.badge.bad { background: var(--flag); color: var(--flagfg); }
.badge.good { background: var(--ok); color: #1b6b2a; }
#img-failed { display: none; }
"""

#: marks figures that fail to load (file moved or deleted): a banner and an attribute for tests
IMG_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images), bad = [];
  imgs.forEach(function (im) { if (!im.complete || im.naturalWidth === 0) { bad.push(im.getAttribute("src")); } });
  document.documentElement.setAttribute("data-images-total", String(imgs.length));
  document.documentElement.setAttribute("data-images-failed", String(bad.length));
  if (bad.length) {
    bad.forEach(function (src) { console.error("qsmprep report: figure not loaded: " + src); });
    var box = document.getElementById("img-failed");
    box.textContent = bad.length + " figure(s) could not be loaded (moved or deleted?): " + bad.join(", ");
    box.style.display = "block";
  }
});
"""


def escape(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def relative_link(path: Path, root: Path) -> str:
    return quote(Path(os.path.relpath(path, root)).as_posix())


def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        if len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return f"{format_value(value[0], digits)} to {format_value(value[1], digits)}"
        return ", ".join(format_value(v, digits) for v in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{k} = {format_value(v, digits)}" for k, v in value.items())
    return str(value)


# --------------------------------------------------------------------------------------------------
# Markdown (the subset the boilerplate uses)
# --------------------------------------------------------------------------------------------------


def _inline(text: str) -> str:
    t = escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"<em>\1</em>", t)
    t = re.sub(r"doi:(10\.[^\s<]+[^\s<.,;)])", r'<a href="https://doi.org/\1">doi:\1</a>', t)
    return t


def markdown_to_html(md: str) -> str:
    """HTML of simple Markdown: ``#``-headings (h3 at most), paragraphs, ``1.``/``-`` lists,
    ``*em*``, ``**strong**``, `` `code` `` and ``doi:`` links. Everything else is escaped."""
    out: list[str] = []
    para: list[str] = []
    list_kind: str | None = None

    def flush_para():
        if para:
            out.append("<p>" + _inline(" ".join(s.strip() for s in para)) + "</p>")
            para.clear()

    def close_list():
        nonlocal list_kind
        if list_kind:
            out.append(f"</{list_kind}>")
            list_kind = None

    for line in md.splitlines():
        s = line.strip()
        m_h = re.match(r"^(#{1,6})\s+(.*)$", s)
        m_ol = re.match(r"^\d+[.)]\s+(.*)$", s)
        m_ul = re.match(r"^[-*+]\s+(.*)$", s)
        if not s:
            flush_para()
            close_list()
        elif m_h:
            flush_para()
            close_list()
            level = max(3, min(6, len(m_h.group(1))))  # the page's sections are h2
            out.append(f"<h{level}>{_inline(m_h.group(2))}</h{level}>")
        elif m_ol or m_ul:
            flush_para()
            kind = "ol" if m_ol else "ul"
            if list_kind != kind:
                close_list()
                out.append(f"<{kind}>")
                list_kind = kind
            out.append("<li>" + _inline((m_ol or m_ul).group(1)) + "</li>")
        else:
            if list_kind and line.startswith((" ", "\t")) and out and out[-1].endswith("</li>"):
                out[-1] = out[-1][: -len("</li>")] + " " + _inline(s) + "</li>"
                continue
            close_list()
            para.append(s)
    flush_para()
    close_list()
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


def _kv_table(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows if v not in (None, ""))
    return f'<table class="kv">{body}</table>'


def _run_summary(run: reader.ProcessedRun, meta: Mapping, raw: Mapping[str, Path], raw_root: Path | None) -> str:
    steps = meta.get("ProcessingSteps") or {}
    load = steps.get("Loading") or {}
    tes = meta.get("EchoTime") or load.get("EchoTime") or []
    te_txt = ", ".join(f"{1000 * float(t):.3g}" for t in tes) if tes else None
    vs = load.get("VoxelSize")
    shape = load.get("Shape")
    b0 = meta.get("B0Direction") or load.get("B0Direction")
    sources = [s for s in meta.get("Sources") or [] if isinstance(s, str)]
    ents = ", ".join(f"{k}-{v}" for k, v in run.entities.items())
    inputs = f"{len(sources)} raw image{'s' if len(sources) != 1 else ''}"
    if load.get("InputType"):
        inputs += f" ({escape(load['InputType'])}"
        if load.get("PhaseUnits") or load.get("PhaseEncodingDetected"):
            inputs += f"; phase units {escape(load.get('PhaseUnits') or 'not given')}, read as " \
                      f"{escape(load.get('PhaseEncodingDetected') or 'n/a')}"
        inputs += ")"
    if sources:
        inputs += "<details><summary>list</summary><ul>" + "".join(
            f"<li><code>{escape(s)}</code></li>" for s in sources) + "</ul></details>"
    if not raw:
        where = f"in {escape(raw_root)}" if raw_root else "(raw dataset not found: pass BIDS_DIR)"
        inputs += f'<div class="note">echo-1 raw images not found {where}; the magnitude and phase panels are omitted.</div>'
    obliq = meta.get("ObliquityDeg", load.get("ObliquityDeg"))
    rows = [
        ("Series", f"<code>{escape(run.prefix)}</code> ({escape(ents)})"),
        ("Inputs", inputs),
        ("Echoes", f"{len(tes)}; TE = {te_txt} ms" if tes else None),
        ("Field strength", f"{format_value(meta.get('MagneticFieldStrength') or load.get('MagneticFieldStrength'))} T"
         if (meta.get("MagneticFieldStrength") or load.get("MagneticFieldStrength")) else None),
        ("Voxel size", f"{' x '.join(format_value(v, 3) for v in vs)} mm" if vs else None),
        ("Matrix", " x ".join(str(v) for v in shape) if shape else None),
        ("B0 direction (voxel frame)",
         f"[{', '.join(f'{float(v):.3f}' for v in b0)}] from {escape(meta.get('B0DirectionSource') or load.get('B0DirectionSource') or 'n/a')}"
         + (f"; {float(obliq):.1f}&deg; from the nearest voxel axis" if obliq is not None else "") if b0 else None),
        ("Methods", escape(meta.get("EstimationAlgorithm"))),
        ("Reference", (escape(meta.get("ReferenceRegion")) + (f"; offset subtracted {format_value(meta.get('ReferenceOffsetPPM'))} ppm"
                                                           if meta.get("ReferenceOffsetPPM") is not None else ""))
         if meta.get("ReferenceRegion") else None),
    ]
    out = _kv_table(rows)
    if steps:
        body = []
        for name, step in steps.items():
            if not isinstance(step, Mapping):
                continue
            method = step.get("Method", "")
            params = step.get("Parameters")
            extra = {k: v for k, v in step.items() if k not in ("Method", "Parameters")}
            body.append(
                f"<tr><td>{escape(name)}</td><td>{escape(method)}</td><td>{escape(format_value(params)) if params else ''}</td>"
                f"<td>{escape(format_value(extra)) if extra and name != 'Loading' else ''}</td></tr>"
            )
        out += ("<details><summary>processing steps and parameters</summary><table><tr><th>step</th>"
                "<th>method</th><th>parameters</th><th>recorded values</th></tr>" + "".join(body) + "</table></details>")
    return out


def _expected_text(expected: Any) -> str:
    if expected is None:
        return ""
    if isinstance(expected, (list, tuple)) and len(expected) == 2:
        lo, hi = expected
        if lo is None:
            return f"&le; {escape(format_value(hi))}"
        if hi is None:
            return f"&ge; {escape(format_value(lo))}"
    if isinstance(expected, Mapping):
        lo, hi = expected.get("min"), expected.get("max")
        if lo is not None or hi is not None:
            return _expected_text([lo, hi])
    return escape(format_value(expected))


def _metric_cell(name: str) -> str:
    if name in QC_METRICS:
        return f'<a href="{QC_DOCS_URL}#{escape(name)}">{escape(name)}</a>'
    return escape(name)


def _qc_section(run: reader.ProcessedRun, output_dir: Path) -> tuple[str, int]:
    """The QC table: every metric with its value, expected range (:data:`qsmprep.qsm.qc.QC_METRICS`),
    meaning and a link to its docs/qc.md section; flagged metrics highlighted with the reason; the
    recorded values (methods, echo times, ...) apart."""
    metrics, flags, problem = reader.load_qc(run.qc_json)
    if problem:
        note = ("no QC metrics file" if problem == "missing" else f"QC metrics file {problem}")
        return f'<p class="note">{escape(note)} (<code>{escape(run.qc_json.name)}</code>).</p>', 0
    if metrics.get("reference_method") == "mean":
        metrics = {k: v for k, v in metrics.items() if k != "chi_mean_ppm"}  # 0 by construction
    by_metric: dict[str, list[dict]] = {}
    loose = []
    for f in flags:
        if f.get("metric") in metrics:
            by_metric.setdefault(str(f["metric"]), []).append(f)
        else:
            loose.append(f)
    known = [n for n in QC_METRICS if n in metrics]
    other = [n for n in metrics if n not in QC_METRICS and not is_recorded_value(n)]
    rows = []
    for name in known + other:
        value = metrics[name]
        info = QC_METRICS.get(name)
        means = escape(info.means) if info else "(not documented)"
        units = f" {escape(info.units)}" if info and info.units and info.units != "fraction" else ""
        expected = (escape(format_range(name)) + units) if info else ""
        fl = by_metric.get(name, [])
        if fl:
            # the range the flag records (a "[lo, hi]" string is the documented range, in words)
            exp = "; ".join(expected if isinstance(f.get("expected"), str) and expected else _expected_text(f.get("expected"))
                            for f in fl if f.get("expected") is not None) or expected
            reason = "; ".join(escape(f.get("reason")) for f in fl if f.get("reason"))
            rows.append(f'<tr class="flagged" data-metric="{escape(name)}"><td>&#9888; {_metric_cell(name)}</td>'
                        f'<td class="num">{escape(format_value(value))}</td><td>{exp}</td><td>{means}</td><td>{reason}</td></tr>')
            continue
        outside = (info is not None and isinstance(value, (int, float)) and not isinstance(value, bool)
                   and ((info.low is not None and value < info.low) or (info.high is not None and value > info.high)))
        note = "outside the typical range (not flagged): " + escape(info.reason) if outside else ""
        cls = ' class="outside"' if outside else ""
        rows.append(f'<tr{cls} data-metric="{escape(name)}"><td>{_metric_cell(name)}</td><td class="num">'
                    f"{escape(format_value(value))}</td><td>{expected}</td><td>{means}</td><td>{note}</td></tr>")
    for f in loose:
        rows.append(f'<tr class="flagged" data-metric="{escape(f.get("metric") or "")}"><td>&#9888; '
                    f'{escape(f.get("metric") or "(run)")}</td><td class="num">{escape(format_value(f.get("value")))}</td>'
                    f'<td>{_expected_text(f.get("expected"))}</td><td></td><td>{escape(f.get("reason"))}</td></tr>')
    n = len(flags)
    head = (f'<div class="flagbox">&#9888; {n} QC value{"s" if n != 1 else ""} out of the expected range: '
            + escape("; ".join(f"{f.get('metric') or 'run'}: {f.get('reason') or 'out of range'}" for f in flags))
            + "</div>") if n else '<div class="okbox">All QC values within the expected ranges.</div>'
    table = ("<table><tr><th>metric</th><th>value</th><th>expected</th><th>meaning</th><th>reason</th></tr>"
             + "".join(rows) + "</table>")
    recorded = [(k, v) for k, v in metrics.items() if is_recorded_value(k)]
    if recorded:
        table += ("<details><summary>recorded values (methods, echo times, B0 direction)</summary>"
                  + _kv_table((k, escape(format_value(v))) for k, v in recorded) + "</details>")
    link = (f'<p class="note">from <a href="{relative_link(run.qc_json, output_dir)}">{escape(run.qc_json.name)}</a>; '
            f'what each metric means and what to do when it is outside its range: <a href="{QC_DOCS_URL}">docs/qc.md</a></p>')
    return head + table + link, n


def _roi_section(run: reader.ProcessedRun, output_dir: Path) -> str:
    rows = reader.read_roi_tsv(run.roi_tsv)
    if not rows:
        return ""
    cols = [c for c in ROI_COLUMNS if any(c in r for r in rows)]
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{escape(format_value(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h3>Susceptibility by region</h3><table><tr>{head}</tr>{''.join(body)}</table>"
            f'<p class="note">from <a href="{relative_link(run.roi_tsv, output_dir)}">{escape(run.roi_tsv.name)}</a>'
            " (ppm, in the final brain mask)</p>")


def _figure_html(fig: FigureResult, output_dir: Path) -> str:
    if fig.path is None:
        return (f"<h3>{escape(fig.title)}</h3><div class=\"flagbox\">This figure could not be made: "
                f"{escape(fig.error)}</div>")
    alt = fig.title
    if fig.orientation:  # what the panels show, for screen readers and automated checks
        alt += (f"; neurological view, {fig.orientation} axes; edge letters L/R, A/P, S/I; "
                + "; ".join(fig.slices))
    windows = "; ".join(f"{k}: {lo:.4g} to {hi:.4g} {u}".rstrip() for k, (lo, hi, u) in fig.windows.items())
    return (f"<h3>{escape(fig.title)}</h3><figure data-figure=\"{escape(fig.key)}\" data-orientation=\"{escape(fig.orientation)}\" "
            f"data-windows=\"{escape(windows)}\"><img src=\"{relative_link(fig.path, output_dir)}\" alt=\"{escape(alt)}\" "
            f"loading=\"eager\"><figcaption>{escape(fig.caption)}</figcaption></figure>")


def _crash_summary(path: Path) -> tuple[str, str]:
    """(node, last lines) of a Nipype text crash file."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return "", f"(unreadable: {exc})"
    node = ""
    m = re.search(r"^Node:\s*(.+)$", text, re.M)
    if m:
        node = m.group(1).strip()
    lines = [ln for ln in text.rstrip().splitlines() if ln.strip()]
    return node, "\n".join(lines[-12:])


def _errors_section(output_dir: Path, subject: str, latest_uuid: str | None) -> tuple[str, int]:
    crashes = reader.crash_files(output_dir, subject)
    if not crashes:
        return '<div class="okbox">No errors: no crash files in <code>' \
               f'sub-{escape(subject)}/log/</code>.</div>', 0
    parts = [f'<div class="flagbox">{len(crashes)} crash file{"s" if len(crashes) != 1 else ""} found under '
             f"<code>sub-{escape(subject)}/log/</code>.</div>"]
    for p in crashes:
        node, tail = _crash_summary(p)
        execution = p.parent.name
        when = "this execution" if execution == latest_uuid else f"execution {execution}"
        stamp = datetime.fromtimestamp(p.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        parts.append(
            f'<h3><a href="{relative_link(p, output_dir)}">{escape(p.name)}</a></h3><p class="note">{escape(when)}, {stamp}'
            + (f"; node <code>{escape(node)}</code>" if node else "") + f"</p><pre>{escape(tail)}</pre>"
        )
    return "".join(parts), len(crashes)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _series_status(runs: Sequence[reader.ProcessedRun], settings: Mapping) -> list:
    """(prefix, run or None) for every series: processed ones and those the last execution expected."""
    have = {r.prefix: r for r in runs}
    expected = [s for s in settings.get("series") or [] if isinstance(s, str)]
    out = [(p, have.get(p)) for p in expected]
    out += [(p, r) for p, r in have.items() if p not in expected]
    return sorted(out, key=lambda t: t[0])


def build_subject_report(
    output_dir: str | os.PathLike,
    subject: str,
    *,
    bids_dir: str | os.PathLike | None = None,
    timings: dict | None = None,
) -> Path:
    """Write ``OUTPUT_DIR/sub-<subject>.html`` and its figures; returns the HTML path.

    ``bids_dir`` locates the raw echo-1 images (default: ``DatasetLinks.raw`` of the output dataset).
    ``timings`` (optional dict) receives the seconds spent per series prefix.
    """
    from qsmprep.utils.derivatives import atomic_write_text

    output_dir = Path(output_dir)
    subject = str(subject)
    subject = subject[4:] if subject.startswith("sub-") else subject
    runs = reader.find_processed_runs(output_dir, subjects=[subject])
    latest_uuid, settings = reader.latest_settings(output_dir, subject)
    series = _series_status(runs, settings)
    root = reader.raw_root(output_dir, bids_dir)
    fig_dir = output_dir / f"sub-{subject}" / "figures"
    made: set[Path] = set()

    run_sections = []
    overview = []
    total_flags = 0
    for prefix, run in series:
        anchor = reader.ProcessedRun(prefix, output_dir, reader.parse_prefix(prefix)).anchor
        if run is None:
            overview.append(f'<tr class="flagged"><td><a href="#{anchor}">{escape(prefix)}</a></td>'
                            "<td>no Chimap (not processed or failed)</td><td></td></tr>")
            run_sections.append(f'<section id="{anchor}"><h2>{escape(prefix)}</h2><div class="flagbox">No outputs: '
                                "this series was expected by the last execution but has no Chimap. See "
                                '<a href="#errors">Errors</a>.</div></section>')
            continue
        t0 = time.perf_counter()
        meta = reader.read_json(run.path("chimap", ".json"))
        raw = reader.echo1_sources(meta.get("Sources") or [], root)
        load = (meta.get("ProcessingSteps") or {}).get("Loading") or {}
        figs = run_figures(run, fig_dir, raw=raw, phase_units=load.get("PhaseUnits"),
                           field_strength_t=meta.get("MagneticFieldStrength"))
        made |= {f.path for f in figs if f.path is not None}
        qc_html, n_flags = _qc_section(run, output_dir)
        total_flags += n_flags
        body = [f'<section id="{anchor}"><h2>{escape(prefix)}</h2>']
        if n_flags:
            body.append(f'<div class="flagbox">&#9888; {n_flags} QC flag{"s" if n_flags != 1 else ""}: see '
                        f'<a href="#{anchor}-qc">Quality control</a>.</div>')
        body.append("<h3>Summary</h3>" + _run_summary(run, meta, raw, root))
        body += [_figure_html(f, output_dir) for f in figs]
        body.append(f'<h3 id="{anchor}-qc">Quality control</h3>' + qc_html)
        body.append(_roi_section(run, output_dir))
        body.append("</section>")
        run_sections.append("".join(body))
        status = (f'<span class="badge bad">{n_flags} QC flag{"s" if n_flags != 1 else ""}</span>' if n_flags
                  else '<span class="badge good">ok</span>')
        overview.append(f'<tr><td><a href="#{anchor}">{escape(prefix)}</a></td><td>{status}</td>'
                        f"<td>{escape(meta.get('EstimationAlgorithm', ''))}</td></tr>")
        if timings is not None:
            timings[prefix] = time.perf_counter() - t0

    # stale figures of series that no longer exist
    if fig_dir.is_dir():
        for p in fig_dir.glob("*.png"):
            if p not in made:
                try:
                    p.unlink()
                except OSError:
                    pass

    errors_html, n_crash = _errors_section(output_dir, subject, latest_uuid)
    citation = output_dir / "logs" / "CITATION.md"
    try:
        methods_html = markdown_to_html(citation.read_text(encoding="utf-8"))
        methods_html += f'<p class="note">from <a href="{relative_link(citation, output_dir)}">logs/CITATION.md</a></p>'
    except OSError:
        methods_html = '<p class="note">logs/CITATION.md not found.</p>'

    desc = reader.read_json(output_dir / "dataset_description.json")
    gen = next((g for g in desc.get("GeneratedBy") or [] if isinstance(g, Mapping)), {})
    src = next((s for s in desc.get("SourceDatasets") or [] if isinstance(s, Mapping)), {})
    about_rows = [
        ("Generated by", escape(f"{gen.get('Name', 'qsmprep')} {gen.get('Version', '')}".strip())),
        ("Container", escape(format_value(gen.get("Container"))) if gen.get("Container") else None),
        ("Source dataset", escape(format_value(src)) if src else None),
        ("Last execution", escape(latest_uuid) if latest_uuid else None),
        ("Settings", escape("; ".join(f"{k} = {format_value(settings.get(k))}" for k in
                                  ("masking", "unwrapping", "bgremove", "inversion", "reference", "r2star",
                                   "t2star", "nprocs", "segmentation_dir") if k in settings)) if settings else None),
        ("Report", escape(f"qsmprep {__version__}, {datetime.now():%Y-%m-%d %H:%M:%S}")),
    ]

    n_series = len(series)
    n_ok = sum(1 for _, r in series if r is not None)
    status_line = (f"{n_ok} of {n_series} series processed" if n_series else "no series found")
    if total_flags:
        status_line += f"; {total_flags} QC flag{'s' if total_flags != 1 else ''}"
    if n_crash:
        status_line += f"; {n_crash} crash file{'s' if n_crash != 1 else ''}"
    nav = ['<a href="#summary">Summary</a>'] + [
        f'<a href="#{reader.ProcessedRun(p, output_dir, reader.parse_prefix(p)).anchor}">{escape(p)}</a>'
        for p, _ in series
    ] + ['<a href="#methods">Methods</a>', f'<a href="#errors">Errors ({n_crash})</a>', '<a href="#about">About</a>']
    group = output_dir / "group.html"
    if group.is_file():
        nav.append('<a href="group.html">Group report</a>')

    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qsmprep: sub-{escape(subject)}</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>qsmprep report: sub-{escape(subject)}</h1><div class="sub">{escape(status_line)}</div></header>
<nav>{' '.join(nav)}</nav>
<main>
<div id="img-failed" class="flagbox"></div>
<section id="summary"><h2>Summary</h2>
<p>{escape(status_line)}.</p>
<table><tr><th>series</th><th>status</th><th>methods</th></tr>{''.join(overview)}</table>
</section>
{''.join(run_sections)}
<section id="methods"><h2>Methods</h2>{methods_html}</section>
<section id="errors"><h2>Errors</h2>{errors_html}</section>
<section id="about"><h2>About</h2>{_kv_table(about_rows)}</section>
</main>
<script>{IMG_SCRIPT}</script>
</body>
</html>
"""
    out = output_dir / f"sub-{subject}.html"
    atomic_write_text(out, page)
    return out


def generate_reports(
    output_dir: str | os.PathLike,
    subjects: Iterable[str] | None = None,
    *,
    bids_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Build the report of each participant (default: every ``sub-*`` folder of OUTPUT_DIR).

    A participant whose report fails is logged as a warning and skipped; returns the written paths.
    """
    output_dir = Path(output_dir)
    subs = sorted({str(s)[4:] if str(s).startswith("sub-") else str(s) for s in subjects}) if subjects is not None \
        else reader.subjects_with_outputs(output_dir)
    written = []
    for s in subs:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            path = build_subject_report(output_dir, s, bids_dir=bids_dir, timings=timings)
        except Exception as exc:  # pragma: no cover - a report must never hide the processing result
            LOGGER.warning("the report of sub-%s failed (%s: %s)", s, type(exc).__name__, " ".join(str(exc).split()))
            continue
        written.append(path)
        LOGGER.info("wrote %s in %.1f s (%s)", path, time.perf_counter() - t0,
                    ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) or "no series")
    return written
