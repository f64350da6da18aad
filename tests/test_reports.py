"""Per-participant HTML reports, ``--reports-only`` and ``--segmentation-dir`` of the qsmprep CLI.

One small simulated dataset (head phantom downsampled 4x, 3 echoes, two participants) is processed
once through :func:`qsmprep.cli.run.main` (module fixture); the tests read its reports, rebuild them
with ``--reports-only`` on copies of the output folder, and open one in headless Chromium when
``chromium`` is installed (the screenshot is kept in the test's tmp dir and copied to
``$QSMPREP_SCREENSHOT_DIR`` when set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from qsmprep.cli.parser import parse_config
from qsmprep.cli.run import main
from qsmprep.reports import generate_reports
from qsmprep.reports.html import QC_DOCS_URL, markdown_to_html

TES = (0.004, 0.008, 0.012)
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and os.path.exists(p)), None)

QC_FLAGGED = {
    "mask_volume_ml": 812.5,
    "chi_mean_ppm": 0.0004,
    "local_field_std_ppm": 0.021,
    "Flags": [
        {"metric": "mask_volume_ml", "value": 812.5, "expected": [1000, 1800],
         "reason": "brain mask smaller than expected"},
    ],
}
QC_OK = {"mask_volume_ml": 1350.0, "chi_mean_ppm": 0.0001, "local_field_std_ppm": 0.019, "Flags": []}
ROI_TSV = ("label\tname\tn_voxels\tmean_ppm\tmedian_ppm\tstd_ppm\n"
           "2\tglobus_pallidus\t120\t0.152\t0.149\t0.031\n"
           "8\twhite_matter\t9000\t-0.028\t-0.027\t0.012\n")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


class _Refs(HTMLParser):
    """Collects ``src``/``href`` attributes and the tags that could pull external resources."""

    def __init__(self):
        super().__init__()
        self.src: list[str] = []
        self.href: list[tuple[str, str]] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "src" in a:
            self.src.append(a["src"])
        if "href" in a:
            self.href.append((tag, a["href"]))


def _refs(html_path: Path) -> _Refs:
    p = _Refs()
    p.feed(html_path.read_text(encoding="utf-8"))
    return p


def _check_self_contained(html_path: Path) -> list[Path]:
    """Every src exists (relative), no external resource; returns the referenced files."""
    refs = _refs(html_path)
    files = []
    for src in refs.src:
        assert not re.match(r"^[a-z]+:", src), f"non-relative resource {src!r} in {html_path.name}"
        target = html_path.parent / unquote(src)
        assert target.is_file(), f"{html_path.name}: {src} does not exist"
        files.append(target)
    for tag, a in refs.tags:
        assert tag != "link", f"external stylesheet/link tag in {html_path.name}: {a}"
        if tag == "script":
            assert "src" not in a, f"external script in {html_path.name}: {a}"
    for tag, href in refs.href:  # local links must resolve; only doi links leave the page
        if href.startswith("#") or href.startswith(("https://doi.org/", QC_DOCS_URL)):
            continue
        assert not re.match(r"^[a-z]+:", href), href
        assert (html_path.parent / unquote(href.split("#")[0])).exists(), f"{html_path.name}: broken link {href}"
    return files


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def _copy_outputs(app, dest: Path) -> Path:
    out = dest / "out"
    shutil.copytree(app["out"], out)
    return out


# --------------------------------------------------------------------------------------------------
# fixture
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from qsmprep.simulate import write_bids_dataset

    root = tmp_path_factory.mktemp("reports")
    bids, out, work = root / "bids", root / "out", root / "work"
    write_bids_dataset(bids, subjects=("1", "2"), phantom_kwargs={"downsample": 4},
                       simulate_kwargs={"echo_times_s": TES}, seed=3)
    # the console output at the file-descriptor level (worker processes and Nipype's handlers included)
    import contextlib
    import sys

    console = root / "console.txt"
    saved = [os.dup(1), os.dup(2)]
    with open(console, "w", buffering=1) as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            rc = main([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2", "--r2star",
                       "--skip-bids-validation"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
    return {"root": root, "bids": bids, "out": out, "work": work, "rc": rc,
            "console": console.read_text(errors="replace")}


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_participant_run_writes_self_contained_reports(app):
    assert app["rc"] == 0
    out = app["out"]
    for sub in ("1", "2"):
        report = out / f"sub-{sub}.html"
        assert report.is_file()
        files = _check_self_contained(report)
        names = {f.name for f in files}
        assert names == {f"sub-{sub}_desc-{k}.png" for k in ("brainmask", "fields", "chimap", "relaxation")}
        assert all(f.parent == out / f"sub-{sub}" / "figures" for f in files)
        for f in files:  # real, non-trivial PNG images
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000, f
        text = report.read_text(encoding="utf-8")
        assert "TE = 4, 8, 12 ms" in text and "3 T" in text and "4 x 4 x 4 mm" in text
        assert "MEDI-TV dipole inversion" in text and "NIfTI affine" in text
        assert "<h3>References</h3>" in text and "https://doi.org/10.1002/mrm.30006" in text  # the boilerplate
        assert "No errors" in text and 'id="run-sub-' in text and "Quality control</h3>" in text
        # QC written by the workflow (if any): every flag it lists is highlighted in the report
        qc = out / f"sub-{sub}" / "anat" / f"sub-{sub}_desc-qc_metrics.json"
        if qc.is_file():
            for flag in json.loads(qc.read_text()).get("Flags", []):
                assert f'<tr class="flagged" data-metric="{flag["metric"]}">' in text, flag
        else:
            assert "no QC metrics file" in text


@pytest.mark.integration
def test_report_figures_show_the_maps(app):
    """The Chimap figure is drawn at the fixed window; the mask figure shows the red mask outline."""
    import matplotlib.image as mpimg

    fig = app["out"] / "sub-1" / "figures"
    chi = mpimg.imread(fig / "sub-1_desc-chimap.png")[..., :3]
    grey = (np.ptp(chi, axis=-1) < 0.02) & (chi.mean(-1) > 0.15) & (chi.mean(-1) < 0.85)
    assert grey.mean() > 0.05  # brain tissue in mid-grey, not an empty or saturated picture
    mask = mpimg.imread(fig / "sub-1_desc-brainmask.png")[..., :3]
    red = (mask[..., 0] > 0.8) & (mask[..., 1] < 0.35) & (mask[..., 2] < 0.35)
    assert red.sum() > 500  # the contour of the brain mask
    fields = mpimg.imread(fig / "sub-1_desc-fields.png")[..., :3]
    assert fields.shape[0] > 2.5 * 200  # three rows: phase, total field, local field


@pytest.mark.integration
def test_reports_only_runs_no_processing(app, tmp_path):
    """Its wall time (target <= 10 s on 2 cores) is measured by benchmarks/bench_reports.py."""
    out = _copy_outputs(app, tmp_path)
    anat = out / "sub-1" / "anat"
    (anat / "sub-1_desc-qc_metrics.json").write_text(json.dumps(QC_FLAGGED))
    (anat / "sub-1_desc-roi_stats.tsv").write_text(ROI_TSV)
    (out / "sub-2" / "anat" / "sub-2_desc-qc_metrics.json").write_text(json.dumps(QC_OK))
    for report in out.glob("sub-*.html"):
        report.unlink()
    work_before = _tree_state(app["work"])
    maps_before = {k: v for k, v in _tree_state(out).items() if "/anat/" in k}
    rc = main([str(app["bids"]), str(out), "participant", "-w", str(app["work"]), "--reports-only"])
    assert rc == 0
    assert _tree_state(app["work"]) == work_before  # no node re-ran, nothing new in the work dir
    assert {k: v for k, v in _tree_state(out).items() if "/anat/" in k} == maps_before
    assert not (tmp_path / "work").exists()
    text = (out / "sub-1.html").read_text(encoding="utf-8")
    # the flagged metric is highlighted, with its expected range and reason; the others are not
    row = re.search(r'<tr class="flagged" data-metric="mask_volume_ml">(.*?)</tr>', text, re.S)
    assert row, "flagged QC row not highlighted"
    assert "812.5" in row.group(1) and "1000 to 1800" in row.group(1) and "smaller than expected" in row.group(1)
    assert '<tr data-metric="chi_mean_ppm">' in text
    assert 'class="flagbox"' in text and "1 QC value out of the expected range" in text
    assert "globus_pallidus" in text and "0.152" in text  # ROI table
    assert "All QC values within the expected ranges" in (out / "sub-2.html").read_text(encoding="utf-8")
    _check_self_contained(out / "sub-1.html")


@pytest.mark.integration
def test_report_lists_crash_files_and_missing_series(app, tmp_path):
    out = _copy_outputs(app, tmp_path)
    log = next((out / "sub-2" / "log").iterdir())
    crash = log / "crash-20260101-000000-root-inversion-abcd.txt"
    crash.write_text("Node: qsmprep_wf.sub_2_wf.qsm_wf.inversion\nWorking directory: /w\n\nTraceback:\n"
                     "  File x\nRuntimeError: dipole inversion diverged\n")
    settings = json.loads((log / "qsmprep.json").read_text())
    settings["series"] = ["sub-2", "sub-2_run-2"]  # a second series that produced nothing
    (log / "qsmprep.json").write_text(json.dumps(settings))
    rc = main([str(app["bids"]), str(out), "participant", "--reports-only", "--participant-label", "2"])
    assert rc == 0
    text = (out / "sub-2.html").read_text(encoding="utf-8")
    assert crash.name in text and "RuntimeError: dipole inversion diverged" in text
    assert "qsmprep_wf.sub_2_wf.qsm_wf.inversion" in text and "this execution" in text
    assert "sub-2_run-2" in text and "No outputs" in text and "1 of 2 series processed" in text
    _check_self_contained(out / "sub-2.html")  # including the link to the crash file


@pytest.mark.integration
def test_report_without_raw_data_still_builds(app, tmp_path):
    """A moved raw dataset only drops the magnitude/phase panels (the mask figure shows the mask)."""
    out = _copy_outputs(app, tmp_path)
    desc = json.loads((out / "dataset_description.json").read_text())
    desc["DatasetLinks"]["raw"] = "file:///nonexistent/raw"
    (out / "dataset_description.json").write_text(json.dumps(desc))
    paths = generate_reports(out, ["1"], bids_dir=tmp_path / "missing")
    text = paths[0].read_text(encoding="utf-8")
    assert "echo-1 raw images not found" in text
    assert {f.name for f in _check_self_contained(paths[0])} >= {"sub-1_desc-chimap.png", "sub-1_desc-fields.png"}


@pytest.mark.integration
def test_reports_only_errors(app, tmp_path, capsys):
    rc = main([str(app["bids"]), str(tmp_path / "nothing"), "participant", "--reports-only"])
    err = capsys.readouterr().err.strip()
    assert rc == 66 and err.count("\n") == 0 and "OUTPUT_DIR does not exist" in err, err
    rc = main([str(app["bids"]), str(app["out"]), "participant", "--reports-only", "--participant-label", "9"])
    err = capsys.readouterr().err.strip()
    assert rc == 66 and err.count("\n") == 0 and "no outputs of participant 9" in err, err


@pytest.mark.integration
def test_segmentation_dir_option(app, tmp_path, capsys):
    missing = tmp_path / "no_such_seg"
    rc = main([str(app["bids"]), str(tmp_path / "o"), "participant", "--segmentation-dir", str(missing)])
    err = capsys.readouterr().err.strip()
    assert rc == 66, err
    assert err == (f"qsmprep: error: {missing}: segmentation directory not found. Give --segmentation-dir the root "
                   "of a BIDS derivative dataset with sub-<label>/anat/*_dseg.nii.gz and a *_dseg.tsv label table.")
    empty = tmp_path / "empty_seg"
    empty.mkdir()
    rc = main([str(app["bids"]), str(tmp_path / "o"), "participant", "--segmentation_dir", str(empty)])
    err = capsys.readouterr().err.strip()
    assert rc == 66 and err.count("\n") == 0 and "no segmentation images" in err, err
    assert not (tmp_path / "o").exists()
    # a real segmentation derivative (the simulator's ground truth) is accepted and stored
    seg = app["bids"] / "derivatives" / "qsmprep-simulate"
    cfg = parse_config([str(app["bids"]), str(app["out"]), "participant", "--segmentation-dir", str(seg)])
    assert cfg.segmentation_dir == seg.absolute() and cfg.reports_only is False
    rc = main([str(app["bids"]), str(app["out"]), "participant", "--reports-only", "--segmentation-dir", str(seg),
               "--participant-label", "1"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.integration
def test_group_level_after_participant_run(app, tmp_path):
    out = _copy_outputs(app, tmp_path)
    (out / "sub-1" / "anat" / "sub-1_desc-qc_metrics.json").write_text(json.dumps(QC_FLAGGED))
    (out / "sub-2" / "anat" / "sub-2_desc-qc_metrics.json").write_text(json.dumps(QC_OK))
    (out / "sub-1" / "anat" / "sub-1_desc-roi_stats.tsv").write_text(ROI_TSV)
    assert main([str(app["bids"]), str(out), "group"]) == 0
    lines = (out / "group_qc.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:4] == ["participant_id", "session_id", "acq", "run"] and len(lines) == 3
    assert _check_self_contained(out / "group.html")
    # subject reports built afterwards link to the group report
    generate_reports(out, ["1"], bids_dir=app["bids"])
    assert 'href="group.html"' in (out / "sub-1.html").read_text(encoding="utf-8")


def test_markdown_subset():
    html = markdown_to_html("## Title\n\nText with *em*, **strong** and `code` <b>.\n\n### References\n\n"
                            "1. A. doi:10.1000/xyz.\n2. B.\n")
    assert "<h3>Title</h3>" in html and "<em>em</em>" in html and "<strong>strong</strong>" in html
    assert "<code>code</code>" in html and "&lt;b&gt;" in html
    assert html.count("<li>") == 2 and '<a href="https://doi.org/10.1000/xyz">' in html


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(app, tmp_path):
    out = _copy_outputs(app, tmp_path)
    (out / "sub-1" / "anat" / "sub-1_desc-qc_metrics.json").write_text(json.dumps(QC_FLAGGED))
    (out / "sub-1" / "anat" / "sub-1_desc-roi_stats.tsv").write_text(ROI_TSV)
    report = generate_reports(out, ["1"], bids_dir=app["bids"])[0]
    url = report.resolve().as_uri()

    def chromium(*args, profile):
        cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / profile}", "--enable-logging=stderr", "--v=0", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                              env=dict(os.environ, HOME=str(tmp_path)))

    shot = tmp_path / "sub-1_report.png"
    proc = chromium(f"--screenshot={shot}", "--window-size=1400,3000", profile="p1")
    assert shot.is_file() and shot.stat().st_size > 50_000, proc.stderr[-2000:]
    if os.environ.get("QSMPREP_SCREENSHOT_DIR"):
        dest = Path(os.environ["QSMPREP_SCREENSHOT_DIR"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / shot.name)
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)[..., :3]
    assert img.std() > 0.05  # not a blank page

    def loaded(profile):
        proc = chromium("--virtual-time-budget=10000", "--dump-dom", profile=profile)
        m = re.search(r'data-images-total="(\d+)" data-images-failed="(\d+)"', proc.stdout)
        assert m, f"the report's load check did not run:\n{proc.stdout[:500]}\n{proc.stderr[-2000:]}"
        console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
        loaded.dom = proc.stdout
        return int(m.group(1)), int(m.group(2)), console

    total, failed, console = loaded("p2")
    assert total == 4 and failed == 0 and not console, console
    # every map figure, as rendered, carries its orientation letters and slice positions (alt text) and
    # its windows; the QC metrics link to their documentation
    figures = re.findall(r'<figure data-figure="(\w+)" data-orientation="(\w*)" data-windows="([^"]*)"><img [^>]*alt="([^"]*)"',
                         loaded.dom)
    assert {f[0] for f in figures} == {"mask", "fields", "chimap", "relaxation"}, figures
    for key, orientation, windows, alt in figures:
        assert orientation == "RAS" and "edge letters L/R, A/P, S/I" in alt, alt
        assert re.search(r"sagittal x = -?\d+ mm; coronal y = -?\d+ mm; axial z = -?\d+ mm", alt), alt
    assert "local field: -0.05 to 0.05 ppm" in dict((f[0], f[2]) for f in figures)["fields"]
    assert 'href="https://github.com/qsmprep/qsmprep/blob/main/docs/qc.md#mask_volume_ml"' in loaded.dom
    # the check can fail: a deleted figure is reported, on the page and on the console
    (out / "sub-1" / "figures" / "sub-1_desc-chimap.png").unlink()
    total, failed, console = loaded("p3")
    assert total == 4 and failed == 1
    assert any("figure not loaded" in ln and "sub-1_desc-chimap.png" in ln for ln in console), console


# --------------------------------------------------------------------------------------------------
# methods text and bibliography
# --------------------------------------------------------------------------------------------------


def _boilerplate_variants():
    """Boilerplates of every method of every stage the config chooses, with R2*/T2*, each reference and
    single-echo / complex series."""
    import dataclasses

    from qsmprep.config import QsmprepConfig
    from qsmprep.methods import names
    from qsmprep.utils.boilerplate import build_boilerplate

    class _Run:  # what the boilerplate reads of a QsmRun
        def __init__(self, n_echoes, is_complex=False, subject="01"):
            self.subject, self.echo_times_s = subject, TES[:n_echoes]
            self.field_strength_t, self.is_complex = 3.0, is_complex

    run_sets = [None, [_Run(1)], [_Run(3, is_complex=True), _Run(1, subject="02")]]
    fields = {f.name for f in dataclasses.fields(QsmprepConfig)}
    configs = [QsmprepConfig(), QsmprepConfig(r2star=True, t2star=True), QsmprepConfig(t2star=True)]
    for stage, field_name in (("masking", "masking"), ("unwrapping", "unwrapping"), ("bgremove", "bgremove"),
                              ("inversion", "inversion"), ("reference", "reference"), ("r2star", "r2star_method")):
        assert field_name in fields
        configs += [QsmprepConfig(**{field_name: n, "r2star": True}) for n in names(stage)]
    for cfg in configs:
        for runs in run_sets:
            yield cfg, runs, build_boilerplate(cfg, runs)


def _repeats(text: str) -> list[str]:
    """Immediately repeated words or phrases (1-4 words) of ``text``, ignoring case, punctuation, code
    spans and numbers (a version such as 0.0.1 is not a repeated word)."""
    text = re.sub(r"`[^`]*`", " ", text)
    words = [w.lower() for w in re.findall(r"[^\W\d][\w'-]*", text)]
    found = []
    for n in range(1, 5):
        for i in range(len(words) - 2 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n]:
                found.append(" ".join(words[i:i + 2 * n]))
    return found


def test_repeat_check_finds_repeated_words_and_phrases():
    assert _repeats("was removed with the the method") == ["the the"]
    assert _repeats("The mask was eroded. The mask was eroded again.") == ["the mask was eroded the mask was eroded"]
    assert _repeats("qsmprep 0.0.1 with 12 mm radii_mm, a b a c") == []


def test_methods_text_has_no_repeated_words():
    n = 0
    for cfg, runs, text in _boilerplate_variants():
        n += 1
        assert not _repeats(text), (cfg.chosen_methods(), _repeats(text))
    assert n > 60


def _bib_entries(text: str) -> dict[str, dict[str, str]]:
    entries = {}
    for m in re.finditer(r"@(\w+)\{([^,\s]+),\n(.*?)\n\}", text, re.S):
        entries[m.group(2)] = dict(re.findall(r"^\s*(\w+) = \{(.*)\},?$", m.group(3), re.M))
    return entries


def test_citation_bib_lists_exactly_the_methods_used(tmp_path):
    from qsmprep.config import QsmprepConfig
    from qsmprep.references import REFERENCES
    from qsmprep.utils.boilerplate import cited_references, write_citation

    cfg = QsmprepConfig(masking="phase", bgremove="vsharp", inversion="rts", reference="mean")
    md = write_citation(tmp_path, cfg)
    bib = _bib_entries((tmp_path / "logs" / "CITATION.bib").read_text())
    # Nipype and the consensus (general), MCPC-3D-S, the QSMxT mask on ROMEO quality, V-SHARP, RTS
    expected = {"gorgolewski2011", "consensus2024", "eckstein2018", "stewart2022", "dymerska2021", "wu2012",
                "li2011", "kames2018"}
    assert set(bib) == expected == set(cited_references(cfg))
    for key, fields in bib.items():
        for name in ("author", "title", "journal", "year", "doi"):
            assert fields.get(name, "").strip("{} "), (key, name)
        assert re.fullmatch(r"(19|20)\d\d", fields["year"]) and fields["doi"] == REFERENCES[key].doi
        assert f"doi:{fields['doi']}" in md.read_text()  # and each is cited in the text
    # another method set: PDF, TV and the CSF reference (R2*) replace V-SHARP, RTS
    bib2 = _bib_entries(write_citation(tmp_path / "b", QsmprepConfig(bgremove="pdf", inversion="tv",
                                                                      reference="csf")).with_suffix(".bib").read_text())
    assert {"liu2011", "bilgic2014tv", "liu2018csf"} <= set(bib2)
    assert not {"wu2012", "li2011", "kames2018"} & set(bib2)
    assert bib["kames2018"]["author"] == "Kames, C. and Wiggermann, V. and Rauscher, A."


# --------------------------------------------------------------------------------------------------
# figures: fixed windows, orientation letters and slice positions (small crafted series, no app run)
# --------------------------------------------------------------------------------------------------


def _crafted_run(out: Path, prefix: str, affine, scale: float, seed: int, shape=(24, 28, 20)):
    """A processed series of smooth random maps (``scale`` sets their amplitude) with a central mask."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    from qsmprep.reports.reader import MAPS, ProcessedRun, parse_prefix

    rng = np.random.default_rng(seed)
    anat = out / f"sub-{parse_prefix(prefix)['sub']}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum(g ** 2 for g in grid) < 0.6
    maps = {"brain_mask": mask.astype(np.uint8)}
    for key, amp in (("chimap", 0.1), ("local_fieldmap", 0.03), ("total_fieldmap", 80.0), ("r2starmap", 20.0)):
        vol = gaussian_filter(rng.standard_normal(shape), 2) * amp * scale * 5
        if key == "r2starmap":
            vol = np.abs(vol) + 10 * scale
        maps[key] = np.where(mask, vol, 0).astype(np.float32)
    for key, data in maps.items():
        nib.save(nib.Nifti1Image(data, affine), str(anat / f"{prefix}_{MAPS[key]}.nii.gz"))
    return ProcessedRun(prefix, anat, parse_prefix(prefix))


def test_windows_are_identical_across_runs(tmp_path):
    from qsmprep.reports.figures import CHI_WINDOW_PPM, WINDOWS, run_figures, window

    a = _crafted_run(tmp_path / "a", "sub-1", np.diag([2.0, 2.0, 2.0, 1.0]), scale=1.0, seed=1)
    oblique = np.array([[-1.9, 0.3, 0, 20], [0.3, 1.9, 0.2, -30], [0, -0.2, 2.5, 5], [0, 0, 0, 1]])
    b = _crafted_run(tmp_path / "b", "sub-2", oblique, scale=4.0, seed=2, shape=(30, 22, 18))
    figs_a = {f.key: f for f in run_figures(a, tmp_path / "fa", field_strength_t=3.0)}
    figs_b = {f.key: f for f in run_figures(b, tmp_path / "fb", field_strength_t=3.0)}
    assert set(figs_a) == set(figs_b) == {"mask", "fields", "chimap", "relaxation"}
    assert all(f.path is not None and f.path.is_file() for f in [*figs_a.values(), *figs_b.values()])
    # the local field and Chimap windows are the same for both series though their values differ 4x
    assert figs_a["fields"].windows["local field"] == figs_b["fields"].windows["local field"] == (-0.05, 0.05, "ppm")
    assert figs_a["chimap"].windows == figs_b["chimap"].windows == {"susceptibility": (*CHI_WINDOW_PPM, "ppm")}
    assert figs_a["fields"].windows["total field"] == figs_b["fields"].windows["total field"]
    assert figs_a["relaxation"].windows == figs_b["relaxation"].windows
    lo, hi, _ = figs_a["fields"].windows["total field"]
    assert lo == -hi and 127 < hi < 128.5  # +-1 ppm at 3 T
    # field-strength dependent windows scale with B0; the quantitative ones do not
    assert window("r2star", 7.0)[1] == pytest.approx(7 / 3 * window("r2star", 3.0)[1])
    assert window("t2star", 7.0)[1] == pytest.approx(3 / 7 * window("t2star", 3.0)[1])
    assert window("local_field", 7.0) == window("local_field", 3.0)
    assert set(WINDOWS) >= {"chimap", "local_field", "total_field", "r2star", "t2star", "magnitude", "phase"}
    # the captions state the windows, the orientation and the slice positions
    assert "-0.05 to 0.05 ppm" in figs_a["fields"].caption and "127.7 Hz" in figs_a["fields"].caption
    assert figs_a["chimap"].orientation == figs_b["chimap"].orientation == "RAS"
    assert re.fullmatch(r"sagittal x = -?\d+ mm", figs_a["chimap"].slices[0]), figs_a["chimap"].slices
    assert "slices at sagittal x = " in figs_b["chimap"].caption


def test_windows_table_in_docs_matches_the_code():
    from qsmprep.reports.figures import windows_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "reports.md"
    assert windows_markdown() in docs.read_text(encoding="utf-8")


def test_orientation_letters_follow_the_affine(tmp_path):
    """A bright blob on the subject's left ends up on the panel side labelled L, whether the image is
    stored RAS, LPS or obliquely; the titles give the world positions of the cuts."""
    from qsmprep.reports.figures import Row, load_volume_affine, mosaic_figure, orientation_labels
    from helpers import save_nifti

    shape = (20, 24, 16)
    world = {}
    for name, affine in (("ras", np.diag([2.0, 2.0, 2.0, 1.0])), ("lps", np.diag([-2.0, -2.0, 2.0, 1.0])),
                         ("oblique", np.array([[0, -2.0, 0.3, 0], [-2.0, 0, 0, 0], [0, 0.2, 2.0, 0], [0, 0, 0, 1]]))):
        aff = affine.copy()
        aff[:3, 3] = -aff[:3, :3] @ (np.array(shape) - 1) / 2  # world origin at the centre
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        xyz = (aff[:3, :3] @ ijk.T).T + aff[:3, 3]
        blob = ((xyz[:, 0] < -8) & (np.abs(xyz[:, 1]) < 6) & (np.abs(xyz[:, 2]) < 6)).reshape(shape)  # x < 0: left
        save_nifti(tmp_path / f"{name}.nii.gz", blob.astype(np.float32), aff)
        data, zooms, raff = load_volume_affine(tmp_path / f"{name}.nii.gz")
        crop = tuple(slice(0, n) for n in data.shape)
        centre = [int(round(float(np.mean(i)))) for i in np.nonzero(data > 0.5)]
        cuts = [(1, centre[1]), (2, centre[2]), (0, centre[0])]
        fig = mosaic_figure([Row(data, "blob", vmin=0, vmax=1)], zooms, cuts, crop, affine=raff)
        axes = [ax for ax in fig.axes if ax.images][:3]
        for ax, (axis, _) in zip(axes, cuts):
            letters = {t.get_gid(): t.get_text() for t in ax.texts}
            assert letters == {f"orientation-{k}": v for k, v in orientation_labels(raff, axis).items()}
            assert sorted(letters.values()) == sorted({0: "PAIS", 1: "LRIS", 2: "LRPA"}[axis])
            assert ax.get_title().startswith(("sagittal", "coronal", "axial")[axis])
            if axis in (1, 2):  # coronal and axial: the blob is on the side of the L
                img = np.asarray(ax.images[0].get_array(), float)
                cols = np.nonzero(np.nan_to_num(img).max(axis=0) > 0.5)[0]
                side = "left" if cols.mean() < img.shape[1] / 2 else "right"
                assert letters[f"orientation-{side}"] == "L", (name, axis, side, letters)
        world[name] = [ax.get_title() for ax in axes]
    # the same world cut positions however the voxels are stored (the blob's centre, about x = -13 mm)
    assert world["ras"] == world["lps"], world
    assert world["ras"][2].startswith("sagittal x = -1"), world["ras"]


# --------------------------------------------------------------------------------------------------
# QC table: every metric documented with its expected range; no trivial rows
# --------------------------------------------------------------------------------------------------


def _full_qc(reference: str = "mean") -> dict:
    """Every metric :func:`qc_metrics` can write, on a smooth synthetic multi-echo series."""
    from qsmprep.qsm.qc import flag_metrics, qc_metrics
    from qsmprep.qsm.reference import REFERENCE

    n = 24
    g = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    mask = sum(x ** 2 for x in g) < 0.7
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    chi = np.where(mask, gaussian_filter(rng.standard_normal((n, n, n)), 1.5) * 0.2 + 0.02, 0).astype(np.float32)
    if reference == "mean":
        chi = REFERENCE.get("mean")(chi, mask)
    local = np.where(mask, gaussian_filter(rng.standard_normal((n, n, n)), 2) * 0.05, 0).astype(np.float32)
    hz = (local * 127.7 + 5 * g[0]).astype(np.float32)
    te = np.array(TES)
    unwrapped = np.stack([2 * np.pi * hz * t for t in te], -1).astype(np.float32)
    mag = np.stack([np.exp(-25 * t) * mask for t in te], -1).astype(np.float32)
    extra = {"series": "sub-1", "qsmprep_version": "1.0", "masking_method": "phase", "inversion_method": "rts",
             "reference_method": reference, "model_name": "net", "model_checksum": "abc"}
    m = qc_metrics(chi, mask, (2, 2, 2), (0, 0, 1), local_field_ppm=local, unwrapped_phase_4d=unwrapped,
                   fieldmap_hz=hz, magnitude_4d=mag, echo_times_s=te, field_strength_t=3.0, reference=reference,
                   extra=extra)
    m["Flags"] = flag_metrics(m)
    return m


def test_every_qc_metric_has_docs_and_an_expected_range():
    from qsmprep.qsm.qc import EXPECTED_RANGES, QC_METRICS, format_range, is_recorded_value, metrics_markdown

    docs = (Path(__file__).resolve().parents[1] / "docs" / "qc.md").read_text(encoding="utf-8")
    assert metrics_markdown() in docs  # the generated part is up to date
    sections = dict(re.findall(r"^### (\w+)\n(.*?)(?=^##|\Z)", docs, re.S | re.M))
    recorded = set(re.findall(r"^\| `([\w*]+)` \|", docs, re.M))
    metrics = {k: v for k, v in _full_qc("csf").items() if k != "Flags"}
    assert len(metrics) > 25
    for name, value in metrics.items():
        if is_recorded_value(name):
            assert name in recorded or (name.endswith("_method") and "*_method" in recorded), name
            continue
        assert isinstance(value, float), name
        assert name in QC_METRICS and name in sections, f"{name} has no entry in docs/qc.md"
        info = QC_METRICS[name]
        assert info.low is not None or info.high is not None, name
        assert f"Expected: **{format_range(name)}**" in sections[name] and "When outside:" in sections[name]
        assert info.means and info.reason
    assert set(QC_METRICS) == set(sections)
    # the flags use the same ranges
    assert all(EXPECTED_RANGES[k][:2] == (QC_METRICS[k].low, QC_METRICS[k].high) for k in EXPECTED_RANGES)


def test_mean_chi_is_left_out_when_mean_referencing_makes_it_zero():
    csf, mean = _full_qc("csf"), _full_qc("mean")
    assert abs(csf["chi_mean_ppm"]) > 1e-3  # informative with another reference
    assert "chi_mean_ppm" not in mean and "chi_median_ppm" in mean


def test_report_qc_table_shows_range_meaning_and_docs_link(tmp_path):
    from qsmprep.qsm.qc import QC_METRICS, format_range
    from qsmprep.reports.html import QC_DOCS_URL, build_subject_report

    out = tmp_path / "out"
    run = _crafted_run(out, "sub-1", np.diag([2.0, 2.0, 2.0, 1.0]), scale=1.0, seed=1)
    qc = _full_qc("mean")
    qc["chi_mean_ppm"] = -1e-10  # as written by older versions: must not be shown
    qc["chi_p99_ppm"] = 0.9  # outside its typical range: marked, not flagged
    run.qc_json.write_text(json.dumps(qc))
    text = build_subject_report(out, "1").read_text(encoding="utf-8")
    rows = dict(re.findall(r'<tr(?: class="\w+")? data-metric="(\w+)">(.*?)</tr>', text, re.S))
    shown = {k for k in qc if k in QC_METRICS and k != "chi_mean_ppm"}
    assert set(rows) == shown and "chi_mean_ppm" not in rows
    for name in shown:
        cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[name], re.S)
        assert f'href="{QC_DOCS_URL}#{name}"' in cells[0], cells
        assert cells[2].startswith(format_range(name).replace("<", "&lt;").replace(">", "&gt;")), (name, cells)
        assert cells[3] == QC_METRICS[name].means.replace("'", "&#x27;").replace(">", "&gt;").replace("<", "&lt;")
    assert re.search(r'<tr class="outside" data-metric="chi_p99_ppm">.*outside the typical range', text)
    assert "recorded values" in text and "<th>inversion_method</th>" in text



# --------------------------------------------------------------------------------------------------
# console output
# --------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_default_console_shows_one_line_per_step_and_no_nipype_info(app):
    console = app["console"]
    steps = re.findall(r"^qsmprep: sub-(\d) (\w+) done in (\d+\.\d) s$", console, re.M)
    for sub in ("1", "2"):
        done = {name for s, name, _ in steps if s == sub}
        assert {"load_echoes", "brain_mask", "unwrap", "bgremove", "inversion", "qc", "ds_chimap"} <= done, console
    assert all(float(t) < 600 for _, _, t in steps)
    for nipype_line in ("nipype.workflow INFO", "[Node] Finished", "[Node] Setting-up", "Workflow qsmprep_wf settings",
                        "[MultiProc] Running"):
        assert nipype_line not in console, nipype_line
    import logging

    # Nipype's main-process handler may predate the capture: its level says it printed nothing at INFO
    assert logging.getLogger("nipype.workflow").getEffectiveLevel() >= logging.WARNING


def test_step_reporter_lines_and_plugins(caplog):
    import logging

    from nipype.pipeline.plugins.linear import LinearPlugin

    from qsmprep.utils.plugins import SafeMultiProcPlugin, SafeSLURMPlugin, StepReporter, make_plugin

    class Node:
        def __init__(self, fullname):
            self.fullname, self.name = fullname, fullname.rsplit(".", 1)[-1]

    rep = StepReporter(logging.getLogger("steps_test"))  # not under "qsmprep", which the CLI stops from propagating
    unwrap, inv = Node("qsmprep_wf.sub_01_wf.qsm_run_2_wf.unwrap"), Node("qsmprep_wf.sub_01_wf.qsm_wf.inversion")
    with caplog.at_level(logging.INFO, logger="steps_test"):
        rep(unwrap, "start")
        rep(unwrap, "end")
        rep.cached.add(inv.fullname)
        rep(inv, "end")
        rep(inv, "start")
        rep(inv, "exception")
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"sub-01 run_2 unwrap done in 0\.\d s", lines[0]), lines
    assert lines[1:] == ["sub-01 inversion reused from the work directory", lines[2]]
    assert re.fullmatch(r"sub-01 inversion failed after 0\.\d s", lines[2])
    # the callback reaches every plugin that runs nodes itself
    plugin, _ = make_plugin("MultiProc", {"n_procs": 1}, status_callback=rep)
    assert isinstance(plugin, SafeMultiProcPlugin) and plugin._status_callback is rep
    plugin.pool.shutdown()
    assert make_plugin("SLURM", {}, status_callback=rep)[0]._status_callback is rep
    assert isinstance(make_plugin("SLURM", {})[0], SafeSLURMPlugin)
    name, args = make_plugin("Linear", {}, status_callback=rep)
    assert LinearPlugin(plugin_args=args)._status_callback is rep
    assert "status_callback" not in make_plugin("SLURMGraph", {}, status_callback=rep)[1]


_WORKER_SERVER_SCRIPT = """
import os, sys
from concurrent.futures import ProcessPoolExecutor
import multiprocessing as mp
from qsmprep.utils.plugins import start_worker_server

def probe():
    return sorted(m for m in ("torch", "qsmprep.interfaces.qsm", "nipype") if m in sys.modules), os.environ.get(
        "OMP_WAIT_POLICY")

if __name__ == "__main__":
    os.environ.pop("OMP_WAIT_POLICY", None)
    first, second = start_worker_server("forkserver"), start_worker_server("forkserver")
    print(first, second, start_worker_server("spawn"))
    with ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as pool:
        print(*pool.submit(probe).result())
"""


def test_worker_server_preloads_the_node_modules(tmp_path):
    """MultiProc's forkserver starts early with torch and the interfaces imported: a worker forked from it
    has them without importing; OpenMP threads sleep between parallel regions (no spinning next to a node)."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_WORKER_SERVER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "QSMPREP_FFT_BACKEND"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "True False False"  # started once; a second call and other start methods do nothing
    assert lines[1] == "['nipype', 'qsmprep.interfaces.qsm', 'torch'] PASSIVE"


def _die():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_dead_multiproc_worker_is_a_crashed_node_with_its_crash_file(tmp_path):
    """A worker killed while running a node (the kernel's OOM killer, a segfault in a library): the run ends
    with the plugin's own error and a crash file, not Nipype 1.11's ``TypeError: can only concatenate str (not
    "list") to str`` from ``report_crash`` (no result file), and not a hang."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    from qsmprep.utils.plugins import make_plugin

    wf = pe.Workflow("dies", base_dir=str(tmp_path / "work"))
    wf.add_nodes([pe.Node(Function(function=_die, input_names=[], output_names=[]), name="killed")])
    wf.config["execution"].update({"crashdump_dir": str(tmp_path / "crash"), "crashfile_format": "txt",
                                   "stop_on_first_crash": "false"})
    plugin, _ = make_plugin("MultiProc", {"n_procs": 2})
    with pytest.raises(RuntimeError, match="worker process running this node died"):
        wf.run(plugin=plugin)
    crash = list((tmp_path / "crash").glob("crash-*killed*.txt"))
    assert len(crash) == 1 and "BrokenProcessPool" in crash[0].read_text()
