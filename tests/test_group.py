"""Group level of the qsmprep CLI (``qsmprep BIDS_DIR OUTPUT_DIR group``) on crafted derivatives.

The group level reads only OUTPUT_DIR: per series a ``_Chimap.nii.gz`` (marks it processed), the QC
JSON (``_desc-qc_metrics.json``: metric -> value plus ``Flags``) and the ROI table
(``_desc-roi_stats.tsv``). The tests write such folders directly (tiny images), run the CLI and read
the tables back with pandas exactly as a user would.
"""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from qsmprep.cli.run import main
from qsmprep.reports.group import MIN_RUNS_FOR_OUTLIERS, collect_group

ROIS = [(2, "globus_pallidus", 0.17), (3, "putamen", 0.05), (8, "white_matter", -0.03)]


def _processed(out: Path, prefix: str, qc: dict | None, roi_offset: float | None = 0.0, seed: int = 0) -> Path:
    """Write the per-series files the group level reads; returns the anat folder."""
    ents = dict(p.split("-", 1) for p in prefix.split("_"))
    anat = out / f"sub-{ents['sub']}" / (f"ses-{ents['ses']}" if "ses" in ents else "") / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(anat / f"{prefix}_Chimap.nii.gz"))
    if qc is not None:
        (anat / f"{prefix}_desc-qc_metrics.json").write_text(json.dumps(qc, indent=2))
    if roi_offset is not None:
        rng = np.random.default_rng(seed)
        lines = ["label\tname\tn_voxels\tmean_ppm\tmedian_ppm\tstd_ppm"]
        for label, name, chi in ROIS:
            m = chi + roi_offset + 0.005 * rng.standard_normal()
            lines.append(f"{label}\t{name}\t{100 * label}\t{m:.5f}\t{m - 0.002:.5f}\t0.02")
        (anat / f"{prefix}_desc-roi_stats.tsv").write_text("\n".join(lines) + "\n")
    return anat


def _qc(mask_ml: float, residual: float, flags=()) -> dict:
    return {"mask_volume_ml": mask_ml, "b0_fit_residual_rad": residual, "n_echoes": 4,
            "inversion_method": "rts", "b0_direction": "0, 0, 1", "Flags": list(flags)}


FLAG = {"metric": "mask_volume_ml", "value": 640.0, "expected": [800, 2500],
        "reason": "the brain mask is much smaller than an adult brain"}


def _run_group(tmp_path: Path, out: Path, capsys=None) -> int:
    bids = tmp_path / "bids"  # the group level does not read BIDS_DIR
    return main([str(bids), str(out), "group"])


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


class _Src(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        self.src += [v for k, v in attrs if k == "src"]


@pytest.fixture
def two_subjects(tmp_path):
    out = tmp_path / "out"
    _processed(out, "sub-01_ses-1", _qc(640.0, 0.02, [FLAG]), roi_offset=0.0, seed=1)
    _processed(out, "sub-02_acq-fast_run-1", _qc(1350.0, 0.015), roi_offset=0.01, seed=2)
    return out


def test_group_tables_load_with_pandas_and_carry_reasons(tmp_path, two_subjects):
    out = two_subjects
    assert _run_group(tmp_path, out) == 0
    qc = _read(out / "group_qc.tsv")
    assert list(qc.columns) == ["participant_id", "session_id", "acq", "run", "b0_fit_residual_rad", "mask_volume_ml",
                                "n_echoes", "flagged", "flag_reasons"]  # numeric metrics only, sorted
    assert len(qc) == 2
    assert qc["flagged"].dtype == bool and qc["mask_volume_ml"].dtype == float
    assert qc["n_echoes"].tolist() == [4, 4]
    assert qc["participant_id"].tolist() == ["sub-01", "sub-02"]  # strings without any dtype argument
    first, second = qc.iloc[0], qc.iloc[1]
    assert first["session_id"] == "ses-1" and math.isnan(first["acq"]) and math.isnan(first["run"])
    assert second["acq"] == "fast" and second["run"] == 1 and math.isnan(second["session_id"])
    assert bool(first["flagged"]) and not bool(second["flagged"])
    assert "mask_volume_ml = 640" in first["flag_reasons"] and "expected 800 to 2500" in first["flag_reasons"]
    assert "much smaller than an adult brain" in first["flag_reasons"]
    assert math.isnan(second["flag_reasons"])  # n/a when not flagged

    roi = _read(out / "group_roi.tsv")
    assert list(roi.columns) == ["participant_id", "session_id", "acq", "run", "segmentation", "label", "name",
                                 "n_voxels", "mean_ppm", "median_ppm", "std_ppm"]
    assert set(roi["segmentation"]) == {"segmentation-dir"}
    assert len(roi) == 2 * len(ROIS)
    assert roi["mean_ppm"].dtype == float and roi["label"].dtype == np.int64
    gp = roi[roi["name"] == "globus_pallidus"]["mean_ppm"]
    assert len(gp) == 2 and np.all(np.abs(gp - 0.17) < 0.04)

    html = (out / "group.html").read_text(encoding="utf-8")
    assert "1 of 2 series flagged" in html and "much smaller than an adult brain" in html
    assert "sub-01_ses-1" in html and "sub-01.html" not in html  # no report yet: no broken link
    p = _Src()
    p.feed(html)
    assert sorted(Path(s).name for s in p.src) == ["group_desc-qc.png", "group_desc-roichi.png"]
    for s in p.src:
        assert not s.startswith(("http:", "https:", "//")) and (out / unquote(s)).is_file(), s
    assert "<link" not in html and "<script src" not in html


def test_rerun_after_more_subjects_updates_tables(tmp_path, two_subjects):
    out = two_subjects
    assert _run_group(tmp_path, out) == 0
    assert len(_read(out / "group_qc.tsv")) == 2
    _processed(out, "sub-03", _qc(1200.0, 0.5), roi_offset=None)  # no ROI table for this one
    # a series of sub-01 re-processed with a better mask: its flag goes away
    qc01 = out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-qc_metrics.json"
    qc01.write_text(json.dumps(_qc(1100.0, 0.02)))
    assert _run_group(tmp_path, out) == 0
    qc = _read(out / "group_qc.tsv")
    assert qc["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert not qc["flagged"].any() and qc.loc[0, "mask_volume_ml"] == 1100.0
    assert len(_read(out / "group_roi.tsv")) == 2 * len(ROIS)  # sub-03 has no regions


def test_missing_qc_file_and_group_outliers_are_flagged(tmp_path):
    out = tmp_path / "out"
    n = MIN_RUNS_FOR_OUTLIERS + 1
    for i in range(n):
        residual = 0.02 + 0.001 * i if i != 3 else 0.9  # sub-4 fits the echoes badly
        _processed(out, f"sub-{i + 1}", _qc(1300.0 + 10 * i, residual), roi_offset=0.3 if i == 3 else 0.0, seed=i)
    _processed(out, f"sub-{n + 1}", None)  # no QC file
    assert _run_group(tmp_path, out) == 0
    qc = _read(out / "group_qc.tsv")
    flagged = dict(zip(qc["participant_id"], qc["flagged"]))
    assert flagged == {f"sub-{i + 1}": i in (3, n) for i in range(n + 1)}
    reasons = dict(zip(qc["participant_id"], qc["flag_reasons"]))
    assert "b0_fit_residual_rad = 0.9 is a group outlier" in reasons["sub-4"] and "robust z" in reasons["sub-4"]
    assert "QC metrics file missing" in reasons[f"sub-{n + 1}"]
    assert math.isnan(qc.loc[qc["participant_id"] == f"sub-{n + 1}", "mask_volume_ml"].item())
    tables = collect_group(out)
    assert tables.flagged_metrics["sub-4"] == {"b0_fit_residual_rad"}


def test_no_processed_runs_exits_66(tmp_path, capsys):
    out = tmp_path / "out"
    rc = _run_group(tmp_path, out)
    err = capsys.readouterr().err.strip()
    assert rc == 66 and err.count("\n") == 0 and err.startswith(f"qsmprep: error: {out}: "), err
    assert "no processed series" in err and not out.exists()
    (out / "sub-01" / "anat").mkdir(parents=True)  # folders but no Chimap
    (out / "dataset_description.json").write_text("{}")
    rc = _run_group(tmp_path, out)
    err = capsys.readouterr().err.strip()
    assert rc == 66 and err.count("\n") == 0 and "no processed series found" in err and "participant" in err, err
    assert not (out / "group_qc.tsv").exists() and not (out / "group.html").exists()


def test_participant_label_selects_rows(tmp_path, two_subjects):
    out = two_subjects
    assert main([str(tmp_path / "bids"), str(out), "group", "--participant-label", "02"]) == 0
    assert _read(out / "group_qc.tsv")["participant_id"].tolist() == ["sub-02"]


def test_group_of_one_series_says_n_1_and_never_nan(tmp_path):
    out = tmp_path / "out"
    _processed(out, "sub-01", _qc(1350.0, 0.015), roi_offset=0.0, seed=1)
    assert _run_group(tmp_path, out) == 0
    html = (out / "group.html").read_text(encoding="utf-8")
    for text in (html, (out / "group_qc.tsv").read_text(), (out / "group_roi.tsv").read_text()):
        assert not re.search(r"\bnan\b", text, re.I)
    # the regional table has one series per region: its SD across series reads n = 1
    assert html.count("<td class='num'>n = 1</td>") == len(ROIS)
    assert "1 series of 1 participant" in html and "n = 1, no spread across series" in html


def test_group_plots_clip_to_a_robust_range(tmp_path):
    from qsmprep.reports.figures import robust_limits

    vals = [1350.0, 1360.0, 1340.0, 1355.0, 1345.0, 1352.0, 1348.0, 90000.0]  # one wild value
    lo, hi = robust_limits(vals)
    assert lo < 1340 and 1360 < hi < 1500  # the seven plausible values fill the axis
    assert robust_limits([5.0]) == (4.5, 5.5) and robust_limits([None, float("nan")]) == (-1.0, 1.0)
    out = tmp_path / "out"
    for i, v in enumerate(vals):
        _processed(out, f"sub-{i + 1:02d}", _qc(v, 0.015), roi_offset=0.0, seed=i)
    assert _run_group(tmp_path, out) == 0
    html = (out / "group.html").read_text(encoding="utf-8")
    assert "1 value beyond is drawn as a triangle at the edge" in html
    assert "90000" in (out / "group_qc.tsv").read_text()  # the table keeps the value
