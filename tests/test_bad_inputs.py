"""Input discovery and validation of the qsmprep BIDS App (qsmprep.utils.bids / validation, cli.run).

A corpus of malformed datasets (small synthetic NIfTI files) is run through ``main([...])``: each must
exit with its documented status and one clear stderr line naming the file, write nothing into
OUTPUT_DIR, and leave the input tree byte-identical. Good datasets check the discovery of sessions,
runs, acquisitions and numeric echo order, and the hand-off to a (stub) workflow.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import write_json

from qsmprep.cli.run import main
from qsmprep.utils.bids import QsmRun, collect_runs, load_bids_filters
from qsmprep.utils.errors import InputError
from qsmprep.utils.validation import check_runs
from qsmprep.workflows.base import QsmprepWorkflow, new_run_uuid  # the real ones, imported before any stub

N = 16
TES = (0.004, 0.008, 0.012)
HAS_VALIDATOR = shutil.which("bids-validator-deno") is not None


# --------------------------------------------------------------------------------------------------
# dataset builders
# --------------------------------------------------------------------------------------------------


def _save(path: Path, data: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _describe(root: Path, subjects=("01",)) -> None:
    write_json(
        root / "dataset_description.json",
        {"Name": "qsmprep test", "BIDSVersion": "1.10.0", "DatasetType": "raw", "Authors": ["A", "B"], "License": "CC0"},
    )
    (root / "README").write_text("Synthetic multi-echo GRE data for the qsmprep input tests.\n" * 5)
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))


def write_series(
    anat: Path,
    prefix: str,
    tes=TES,
    suffix: str = "MEGRE",
    parts=("mag", "phase"),
    shape=(N, N, N),
    seed: int = 0,
    meta_extra=None,
    echo_names=None,
) -> None:
    """One gradient-echo series: per echo and part a NIfTI and a sidecar (EchoTime, B0, Units)."""
    rng = np.random.default_rng(seed)
    for i, te in enumerate(tes):
        echo = "" if echo_names == () else f"_echo-{echo_names[i] if echo_names else i + 1}"
        for part in parts:
            if part == "phase":
                data = rng.uniform(-np.pi, np.pi, shape).astype(np.float32)
            elif part == "mag":
                data = rng.uniform(10, 100, shape).astype(np.float32)
            else:
                data = rng.normal(0, 50, shape).astype(np.float32)
            stem = anat / f"{prefix}{echo}_part-{part}_{suffix}"
            _save(stem.with_name(stem.name + ".nii.gz"), data)
            meta = {"EchoTime": te, "MagneticFieldStrength": 3.0}
            if part == "phase":
                meta["Units"] = "rad"
            meta.update(meta_extra or {})
            write_json(stem.with_name(stem.name + ".json"), meta)


def make_good(root: Path) -> Path:
    """sub-01, one 3-echo MEGRE series of 16^3 voxels, valid BIDS."""
    _describe(root)
    write_series(root / "sub-01" / "anat", "sub-01")
    return root


def tree_digest(root: Path) -> str:
    """Hash of every path (files and folders) under ``root`` and of every file's bytes."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


ANAT = Path("sub-01") / "anat"


def _f(root: Path, echo: int, part: str, ext: str = ".nii.gz") -> Path:
    return root / ANAT / f"sub-01_echo-{echo}_part-{part}_MEGRE{ext}"


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


# --------------------------------------------------------------------------------------------------
# the corpus: (id, mutate(root), extra args, expected exit, [substrings], file named in the message)
# --------------------------------------------------------------------------------------------------


def _missing_echotime(r):
    for part in ("mag", "phase"):
        _edit_json(_f(r, 2, part, ".json"), EchoTime=None)


def _missing_b0(r):
    for e in (1, 2, 3):
        for part in ("mag", "phase"):
            _edit_json(_f(r, e, part, ".json"), MagneticFieldStrength=None)


def _unpaired_no_phase(r):
    _f(r, 2, "phase").unlink()
    _f(r, 2, "phase", ".json").unlink()


def _unpaired_no_mag(r):
    _f(r, 3, "mag").unlink()
    _f(r, 3, "mag", ".json").unlink()


def _shape_mismatch(r):
    _save(_f(r, 2, "phase"), np.zeros((N, N, N - 4), np.float32) + 0.5)


def _affine_mismatch(r):
    aff = np.eye(4)
    aff[:3, 3] = (2.0, 0.0, 0.0)
    _save(_f(r, 3, "mag"), np.ones((N, N, N), np.float32), aff)


def _phase_4d(r):
    rng = np.random.default_rng(1)
    _save(_f(r, 1, "phase"), rng.uniform(-np.pi, np.pi, (N, N, N, 3)).astype(np.float32))


def _phase_unknown_units(r):
    rng = np.random.default_rng(2)
    for e in (1, 2, 3):
        _save(_f(r, e, "phase"), rng.uniform(-314.0, 314.0, (N, N, N)).astype(np.float32))
        _edit_json(_f(r, e, "phase", ".json"), Units=None)


def _phase_bad_units_string(r):
    for e in (1, 2, 3):
        _edit_json(_f(r, e, "phase", ".json"), Units="deg")


def _phase_rad_out_of_range(r):
    rng = np.random.default_rng(3)
    _save(_f(r, 2, "phase"), rng.uniform(-20.0, 20.0, (N, N, N)).astype(np.float32))


def _nan_phase(r):
    rng = np.random.default_rng(4)
    data = rng.uniform(-np.pi, np.pi, (N, N, N)).astype(np.float32)
    data[3, 4, 5] = np.nan
    _save(_f(r, 3, "phase"), data)


def _no_anat_data(r):
    shutil.rmtree(r / ANAT)
    _save(r / ANAT / "sub-01_T1w.nii.gz", np.ones((N, N, N), np.float32))


def _magnitude_only(r):
    for e in (1, 2, 3):
        _f(r, e, "phase").unlink()
        _f(r, e, "phase", ".json").unlink()


def _duplicate_echo_time(r):
    for part in ("mag", "phase"):
        _edit_json(_f(r, 3, part, ".json"), EchoTime=TES[1])


def _decreasing_echo_time(r):
    for part in ("mag", "phase"):
        _edit_json(_f(r, 2, part, ".json"), EchoTime=0.002)


def _echo_time_ms(r):
    for e in (1, 2, 3):
        for part in ("mag", "phase"):
            _edit_json(_f(r, e, part, ".json"), EchoTime=TES[e - 1] * 1000)


def _invalid_json(r):
    _f(r, 1, "mag", ".json").write_text('{"EchoTime": 0.004,')


def _duplicate_file(r):
    shutil.copy(_f(r, 1, "mag"), _f(r, 1, "mag", ".nii"))
    img = nib.load(str(_f(r, 1, "mag")))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(_f(r, 1, "mag", ".nii")))


def _ambiguous_rec(r):
    write_series(r / ANAT, "sub-01_rec-b", seed=5)


def _no_description(r):
    (r / "dataset_description.json").unlink()


def _no_subjects(r):
    shutil.rmtree(r / "sub-01")


def _invalid_for_validator(r):
    # QSM data are fine; a stray empty file is a BIDS error only the validator reports
    (r / ANAT / "notes.txt").write_text("")


def _bad_filter_file(r):
    pass  # the filter file is written outside the dataset by the test


CASES = [
    # id, mutate, extra args, exit code, substrings, file named (relative to BIDS root) or None
    ("missing-echotime", _missing_echotime, [], 65, ['"EchoTime" is missing', "echo 2"], "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.json"),
    ("missing-b0", _missing_b0, [], 65, ['"MagneticFieldStrength" is missing', "tesla"], "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.json"),
    ("unpaired-no-phase", _unpaired_no_phase, [], 65, ["echo 2 has a magnitude image but no phase image", "sub-01_echo-2_part-phase_MEGRE.nii.gz"], "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz"),
    ("unpaired-no-mag", _unpaired_no_mag, [], 65, ["echo 3 has a phase image but no magnitude image"], "sub-01/anat/sub-01_echo-3_part-phase_MEGRE.nii.gz"),
    ("shape-mismatch", _shape_mismatch, [], 65, ["has shape (16, 16, 12)", "same matrix"], "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz"),
    ("affine-mismatch", _affine_mismatch, [], 65, ["affine differs", "2 mm"], "sub-01/anat/sub-01_echo-3_part-mag_MEGRE.nii.gz"),
    ("phase-4d", _phase_4d, [], 65, ["4D", "one echo per file"], "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"),
    ("phase-unknown-units", _phase_unknown_units, [], 65, ["not in a recognised unit", "sidecar Units: missing", '"Units": "arbitrary"'], "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"),
    ("phase-units-deg", _phase_bad_units_string, [], 65, ["not in a recognised unit", "sidecar Units: deg", '"rad" or "arbitrary"'], "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"),
    ("phase-rad-out-of-range", _phase_rad_out_of_range, [], 65, ["not in a recognised unit", "sidecar Units: rad"], "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz"),
    ("nan-phase", _nan_phase, [], 65, ["NaN values in 1 voxel", "without NaNs"], "sub-01/anat/sub-01_echo-3_part-phase_MEGRE.nii.gz"),
    ("no-anat-data", _no_anat_data, [], 66, ["no QSM-able data found"], ""),
    ("magnitude-only", _magnitude_only, [], 66, ["no QSM-able data found", "only magnitude images", "QSM needs phase"], ""),
    ("unknown-participant", lambda r: None, ["--participant-label", "sub-99"], 66, ["participant label 99 not found", "01"], ""),
    ("unknown-session", lambda r: None, ["--session-label", "2"], 66, ["session label 2 not found"], ""),
    ("duplicate-echo-time", _duplicate_echo_time, [], 65, ["EchoTime 0.008 s equals", "strictly increasing"], "sub-01/anat/sub-01_echo-3_part-phase_MEGRE.json"),
    ("decreasing-echo-time", _decreasing_echo_time, [], 65, ["EchoTime 0.002 s is smaller than", "strictly increasing"], "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.json"),
    ("echo-time-ms", _echo_time_ms, [], 65, ["looks like milliseconds", "seconds"], "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.json"),
    ("invalid-json", _invalid_json, [], 65, ["is not valid JSON"], "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.json"),
    ("duplicate-file", _duplicate_file, [], 65, ["same echo and part"], None),
    ("ambiguous-rec", _ambiguous_rec, [], 65, ["differ only in reconstruction", "--bids-filter-file"], None),
    ("no-dataset-description", _no_description, [], 66, ["not the root of a BIDS dataset"], "dataset_description.json"),
    ("no-subjects", _no_subjects, [], 66, ["no participants found"], ""),
    ("output-is-bids-dir", lambda r: None, ["OUT=BIDS"], 64, ["OUTPUT_DIR is the BIDS input directory"], ""),
    ("work-dir-in-bids-dir", lambda r: None, ["-w", "BIDS/work"], 64, ["work directory is inside the BIDS input directory"], "work"),
    ("group-level-no-outputs", lambda r: None, ["LEVEL=group"], 66, ["no processed series"], None),
    pytest.param(
        "invalid-bids",
        _invalid_for_validator,
        [],
        65,
        ["BIDS validation failed", "EMPTY_FILE", "--skip-bids-validation"],
        "sub-01/anat/notes.txt",
        marks=[pytest.mark.integration,
               pytest.mark.skipif(not HAS_VALIDATOR, reason="bids-validator-deno not installed")],
        id="invalid-bids",
    ),
]



# --------------------------------------------------------------------------------------------------
# issue 17: the other classes of malformed input (each: one line naming the file, exit 65/66)
# --------------------------------------------------------------------------------------------------


def _patch_header(path: Path, **fields) -> None:
    """Rewrite NIfTI header fields in place (values nibabel would fix or refuse on save)."""
    import gzip
    import io

    raw = path.read_bytes()
    gz = path.name.endswith(".gz")
    data = gzip.decompress(raw) if gz else raw
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(data), check=False)
    for key, value in fields.items():
        if isinstance(value, dict):
            for i, v in value.items():
                hdr[key][i] = v
        else:
            hdr[key] = value
    data = hdr.binaryblock + data[len(hdr.binaryblock):]
    path.write_bytes(gzip.compress(data) if gz else data)


def _truncated_gz(r):
    path = _f(r, 1, "mag")
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])


def _truncated_nii(r):
    rng = np.random.default_rng(6)
    _f(r, 2, "phase").unlink()
    plain = _f(r, 2, "phase", ".nii")
    _save(plain, rng.uniform(-np.pi, np.pi, (N, N, N)).astype(np.float32))
    raw = plain.read_bytes()
    plain.write_bytes(raw[: len(raw) - 1000])


def _resave_all(r, shape):
    rng = np.random.default_rng(7)
    for e in (1, 2, 3):
        _save(_f(r, e, "mag"), rng.uniform(10, 100, shape).astype(np.float32))
        _save(_f(r, e, "phase"), rng.uniform(-np.pi, np.pi, shape).astype(np.float32))


def _too_small(r):
    _resave_all(r, (2, 2, 2))


def _single_slice(r):
    _resave_all(r, (N, N, 1))


def _inf_magnitude(r):
    data = np.full((N, N, N), 50.0, np.float32)
    data[1, 2, 3] = np.inf
    _save(_f(r, 2, "mag"), data)


def _zero_magnitude(r):
    _save(_f(r, 3, "mag"), np.zeros((N, N, N), np.float32))


def _constant_magnitude(r):
    _save(_f(r, 1, "mag"), np.full((N, N, N), 7.0, np.float32))


def _negative_magnitude(r):
    rng = np.random.default_rng(8)
    _save(_f(r, 2, "mag"), rng.uniform(-50, 50, (N, N, N)).astype(np.float32))


def _negative_voxel_size(r):
    _patch_header(_f(r, 1, "phase"), pixdim={1: -1.0})


def _zero_voxel_size(r):
    _patch_header(_f(r, 2, "mag"), pixdim={3: 0.0})


def _nan_affine(r):
    _patch_header(_f(r, 3, "phase"), srow_x={0: np.nan}, sform_code=1, qform_code=0)


def _mixed_phase_dtype(r):
    rng = np.random.default_rng(9)
    _save(_f(r, 2, "phase"), rng.uniform(-np.pi, np.pi, (N, N, N)).astype(np.float64))


def _echo_count_mismatch(r):
    rng = np.random.default_rng(10)
    _save(_f(r, 4, "mag"), rng.uniform(10, 100, (N, N, N)).astype(np.float32))
    write_json(_f(r, 4, "mag", ".json"), {"EchoTime": 0.016, "MagneticFieldStrength": 3.0})


def _symlink_loop(r):
    path = _f(r, 1, "mag")
    path.unlink()
    path.symlink_to(path.name)


def _broken_symlink(r):
    path = _f(r, 2, "phase")
    path.unlink()
    path.symlink_to("/nonexistent/qsmprep/phase.nii.gz")


CASES += [
    ("truncated-gzip", _truncated_gz, [], 65, ["magnitude image data are truncated or corrupt", "EOFError", "export the file again"], "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"),
    ("truncated-plain", _truncated_nii, [], 65, ["phase image data are truncated or corrupt", "Expected 16384 bytes"], "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii"),
    ("too-small-2x2x2", _too_small, [], 65, ["shape (2, 2, 2) is too small", "at least 8 voxels along each axis"], "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"),
    ("single-slice", _single_slice, [], 65, ["single slice (shape (16, 16, 1))", "2D single-slice acquisitions cannot be processed"], "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"),
    ("inf-magnitude", _inf_magnitude, [], 65, ["magnitude image contains infinite values in 1 voxel"], "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz"),
    ("zero-magnitude", _zero_magnitude, [], 65, ["magnitude image is constant (all zero)", "carries no signal"], "sub-01/anat/sub-01_echo-3_part-mag_MEGRE.nii.gz"),
    ("constant-magnitude", _constant_magnitude, [], 65, ["magnitude image is constant (every voxel 7)"], "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"),
    ("negative-magnitude", _negative_magnitude, [], 65, ["magnitude image has negative values", "not swapped"], "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz"),
    ("negative-voxel-size", _negative_voxel_size, [], 65, ["voxel sizes (pixdim) are -1 x 1 x 1 mm", "positive and finite"], "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"),
    ("zero-voxel-size", _zero_voxel_size, [], 65, ["voxel sizes (pixdim) are 1 x 1 x 0 mm"], "sub-01/anat/sub-01_echo-2_part-mag_MEGRE.nii.gz"),
    ("nan-affine", _nan_affine, [], 65, ["affine is invalid (singular or not finite)", "qform/sform"], "sub-01/anat/sub-01_echo-3_part-phase_MEGRE.nii.gz"),
    ("mixed-phase-dtype", _mixed_phase_dtype, [], 65, ["phase image is stored as float64 but sub-01_echo-1_part-phase_MEGRE.nii.gz as float32", "one data type and scaling"], "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz"),
    ("echo-count-mismatch", _echo_count_mismatch, [], 65, ["echo 4 has a magnitude image but no phase image"], "sub-01/anat/sub-01_echo-4_part-mag_MEGRE.nii.gz"),
    ("symlink-loop", _symlink_loop, [], 66, ["is a symbolic link loop"], "sub-01/anat/sub-01_echo-1_part-mag_MEGRE.nii.gz"),
    ("broken-symlink", _broken_symlink, [], 66, ["is a broken symbolic link (to /nonexistent/qsmprep/phase.nii.gz)"], "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz"),
]


CASES = [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CASES]


@pytest.mark.parametrize("case_id,mutate,extra,code,needles,named", CASES)
def test_bad_input(tmp_path, capsys, case_id, mutate, extra, code, needles, named):
    bids = make_good(tmp_path / "bids")
    mutate(bids)
    before = tree_digest(bids)
    out = tmp_path / "out"
    work = tmp_path / "work"
    level = "participant"
    args = []
    for a in extra:
        if a == "OUT=BIDS":
            out = bids
        elif a.startswith("LEVEL="):
            level = a.split("=", 1)[1]
        else:
            args.append(a.replace("BIDS/", str(bids) + "/"))
    if "-w" not in args:
        args += ["-w", str(work)]
    rc = main([str(bids), str(out), level, *args])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == code, err
    assert err.startswith("qsmprep: error: "), err
    assert "\n" not in err, f"more than one stderr line:\n{err}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    if named is not None:
        assert f"qsmprep: error: {bids / named if named else bids}:" in err, err
    # nothing written: no output or work folder, input byte-identical
    if out != bids:
        assert not out.exists() or not any(out.iterdir())
    assert not work.exists()
    assert tree_digest(bids) == before


def test_bad_filter_files(tmp_path, capsys):
    bids = make_good(tmp_path / "bids")
    out = tmp_path / "out"
    cases = [
        ("missing.json", None, 66, "BIDS filter file not found"),
        ("syntax.json", '{"megre": ', 65, "is not valid JSON"),
        ("query.json", '{"bold": {"task": "rest"}}', 65, "unknown query 'bold'"),
        ("entity.json", '{"megre": {"colour": "red"}}', 65, "invalid filter for 'megre'"),
        ("nothing.json", '{"megre": {"acquisition": "nope"}}', 66, "no QSM-able data found"),
    ]
    for name, text, code, needle in cases:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        rc = main([str(bids), str(out), "participant", "--bids-filter-file", str(path), "-w", str(tmp_path / "w")])
        err = capsys.readouterr().err.strip()
        assert rc == code, (name, err)
        assert needle in err and "\n" not in err, (name, err)
        assert not out.exists()


def test_constant_and_real_imag_checks(tmp_path):
    """check_runs: constant phase and NaNs in real/imag series raise InputError (exit 65)."""
    bids = tmp_path / "bids"
    _describe(bids)
    write_series(bids / ANAT, "sub-01", parts=("real", "imag"))
    runs = collect_runs(bids)
    assert len(runs) == 1 and runs[0].is_complex and runs[0].phase_files == ()
    check_runs(runs)
    bad = np.full((N, N, N), 1.0, np.float32)
    bad[0, 0, 0] = np.inf
    _save(bids / ANAT / "sub-01_echo-2_part-imag_MEGRE.nii.gz", bad)
    with pytest.raises(InputError, match="infinite values in 1 voxel") as exc:
        check_runs(collect_runs(bids))
    assert exc.value.code == 65
    # constant phase
    good = make_good(tmp_path / "good")
    _save(_f(good, 1, "phase"), np.zeros((N, N, N), np.float32))
    with pytest.raises(InputError, match="phase image is constant"):
        check_runs(collect_runs(good))


# --------------------------------------------------------------------------------------------------
# good inputs
# --------------------------------------------------------------------------------------------------


def test_collect_runs_sessions_runs_acq_and_echo_order(tmp_path):
    root = tmp_path / "bids"
    _describe(root, subjects=("01", "02"))
    # top-level inherited sidecar supplies MagneticFieldStrength for everything
    write_json(root / "MEGRE.json", {"MagneticFieldStrength": 7.0})
    tes11 = tuple(0.002 * (i + 1) for i in range(11))
    names = ["01", "02", "3", "4", "5", "6", "7", "8", "9", "10", "11"]  # zero padding and >9 echoes
    for ses in ("1", "2"):
        anat = root / "sub-01" / f"ses-{ses}" / "anat"
        write_series(anat, f"sub-01_ses-{ses}_acq-qsm_run-1", tes=tes11, shape=(8, 8, 8), echo_names=names)
        write_series(anat, f"sub-01_ses-{ses}_acq-qsm_run-2", shape=(8, 8, 8))
        write_series(anat, f"sub-01_ses-{ses}_acq-fast_run-1", tes=TES[:2], shape=(8, 8, 8))
    anat2 = root / "sub-02" / "ses-1" / "anat"
    # single-echo T2starw (no echo entity) and a magnitude-only T2starw that is ignored
    write_series(anat2, "sub-02_ses-1", tes=(0.02,), suffix="T2starw", shape=(8, 8, 8), echo_names=())
    _save(anat2 / "sub-02_ses-1_acq-mag_T2starw.nii.gz", np.ones((4, 4, 4), np.float32))
    # real/imaginary pairs with B0_dir
    write_series(anat2, "sub-02_ses-1_acq-cplx", parts=("real", "imag"), shape=(8, 8, 8), meta_extra={"B0_dir": [0, 0, 2]})
    for f in anat2.glob("sub-02_ses-1_acq-cplx*.json"):
        _edit_json(f, MagneticFieldStrength=None)
    before = tree_digest(root)

    runs = collect_runs(root)
    assert [r.prefix() for r in runs] == [
        "sub-01_ses-1_acq-fast_run-1",
        "sub-01_ses-1_acq-qsm_run-1",
        "sub-01_ses-1_acq-qsm_run-2",
        "sub-01_ses-2_acq-fast_run-1",
        "sub-01_ses-2_acq-qsm_run-1",
        "sub-01_ses-2_acq-qsm_run-2",
        "sub-02_ses-1",
        "sub-02_ses-1_acq-cplx",
    ]
    long = runs[1]
    assert long.entities() == {"subject": "01", "session": "1", "acquisition": "qsm", "run": "1"}
    assert long.suffix == "MEGRE" and long.n_echoes == 11
    assert long.echo_times_s == pytest.approx(tes11)
    assert [p.name.split("_")[4] for p in long.phase_files] == [f"echo-{n}" for n in names]
    assert all("part-mag" in p.name for p in long.magnitude_files)
    assert long.field_strength_t == 3.0 and long.phase_units == "rad" and long.b0_dir is None
    t2s = runs[6]
    assert t2s.suffix == "T2starw" and t2s.n_echoes == 1 and t2s.echo_times_s == (0.02,)
    assert t2s.entities() == {"subject": "02", "session": "1"}
    cplx = runs[7]
    assert cplx.is_complex and len(cplx.real_files) == 3 and len(cplx.imag_files) == 3
    assert cplx.magnitude_files == () and cplx.phase_files == () and cplx.phase_units is None
    assert cplx.b0_dir == pytest.approx((0.0, 0.0, 1.0)) and cplx.field_strength_t == 7.0
    assert isinstance(cplx, QsmRun)
    with pytest.raises(Exception):
        cplx.subject = "x"  # frozen

    # selections: participant, session, filters (null = entity absent)
    assert {r.subject for r in collect_runs(root, participant_labels=["sub-02"])} == {"02"}
    assert {r.session for r in collect_runs(root, participant_labels=["01"], session_labels=["ses-2"])} == {"2"}
    flt = tmp_path / "filters.json"
    flt.write_text(json.dumps({"megre": {"acquisition": "qsm", "run": 2}, "t2starw": {"acquisition": None}}))
    sel = collect_runs(root, bids_filters=load_bids_filters(flt))
    assert [r.prefix() for r in sel] == ["sub-01_ses-1_acq-qsm_run-2", "sub-01_ses-2_acq-qsm_run-2", "sub-02_ses-1"]
    check_runs(collect_runs(root))
    assert tree_digest(root) == before


def _stub_workflow_module(fail: bool = False):
    """A stand-in for qsmprep.workflows.base: one nipype node writing the run prefixes to OUTPUT_DIR."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    def write_prefixes(out_file, prefixes, fail):
        if fail:
            raise RuntimeError("stub node failure")
        from pathlib import Path as _P

        _P(out_file).parent.mkdir(parents=True, exist_ok=True)
        _P(out_file).write_text("\n".join(prefixes) + "\n")
        return out_file

    calls = []

    def init_qsmprep_wf(config, runs, run_uuid=None):
        calls.append((config, runs))
        wf = QsmprepWorkflow("qsmprep_stub_wf", base_dir=str(config.work_dir), desc="Stub methods text.")
        node = pe.Node(
            Function(input_names=["out_file", "prefixes", "fail"], output_names=["out"], function=write_prefixes),
            name="write",
        )
        node.inputs.out_file = str(config.output_dir / "prefixes.txt")
        node.inputs.prefixes = [r.prefix() for r in runs]
        node.inputs.fail = fail
        wf.add_nodes([node])
        return wf

    mod = types.ModuleType("qsmprep.workflows.base")
    mod.init_qsmprep_wf = init_qsmprep_wf
    mod.new_run_uuid = new_run_uuid
    mod.calls = calls
    return mod


def _masking_arg() -> list[str]:
    from qsmprep.methods import names as method_choices

    return ["--masking", method_choices("masking")[0]]


def test_good_input_hands_off_to_workflow(tmp_path, capsys, monkeypatch):
    bids = make_good(tmp_path / "bids")
    before = tree_digest(bids)
    out, work = tmp_path / "out", tmp_path / "work"
    stub = _stub_workflow_module()
    monkeypatch.setitem(sys.modules, "qsmprep.workflows.base", stub)
    args = [str(bids), str(out), "participant", "-w", str(work), "--nprocs", "1", "--skip-bids-validation"]
    rc = main(args + _masking_arg())
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (out / "prefixes.txt").read_text() == "sub-01\n"
    cfg, runs = stub.calls[-1]
    assert cfg.plugin == "Linear" and cfg.nprocs == 1 and cfg.work_dir == work
    assert len(runs) == 1 and runs[0].echo_times_s == TES
    assert tree_digest(bids) == before

    # boilerplate only: the methods text, nothing run
    out2 = tmp_path / "out2"
    rc = main([str(bids), str(out2), "participant", "-w", str(work), "--boilerplate-only", "--skip-bids-validation"] + _masking_arg())
    assert rc == 0
    assert (out2 / "logs" / "CITATION.md").read_text().strip() == "Stub methods text."
    assert not (out2 / "prefixes.txt").exists()

    # a failing node: exit 1, one line naming the crash-file folder
    monkeypatch.setitem(sys.modules, "qsmprep.workflows.base", _stub_workflow_module(fail=True))
    out3 = tmp_path / "out3"
    rc = main([str(bids), str(out3), "participant", "-w", str(tmp_path / "work3"), "--nprocs", "1", "--skip-bids-validation"] + _masking_arg())
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith(f"qsmprep: error: {out3 / 'logs'}: 1 processing step failed"), err
    assert list((out3 / "logs").glob("crash-*"))
    assert tree_digest(bids) == before


@pytest.mark.integration
@pytest.mark.skipif(not HAS_VALIDATOR, reason="bids-validator-deno not installed")
def test_good_input_passes_the_validator(tmp_path, capsys, monkeypatch):
    """The base dataset of the corpus is valid BIDS, so the validator case fails for its own reason."""
    bids = make_good(tmp_path / "bids")
    before = tree_digest(bids)
    monkeypatch.setitem(sys.modules, "qsmprep.workflows.base", _stub_workflow_module())
    rc = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), "--nprocs", "1", "-v"] + _masking_arg())
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "BIDS validation passed" in err
    assert tree_digest(bids) == before


# --------------------------------------------------------------------------------------------------
# issue 17: unreadable files, --participant-label sub-<label>, phase images without a sidecar
# --------------------------------------------------------------------------------------------------


def _run_bad(tmp_path, capsys, bids, *extra):
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main([str(bids), str(out), "participant", "-w", str(work), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err, out, work


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root reads files without read permission; see test_permission_denied_is_exit_66")
def test_unreadable_file_is_exit_66(tmp_path, capsys):
    bids = make_good(tmp_path / "bids")
    path = _f(bids, 2, "mag")
    path.chmod(0)
    try:
        rc, err, out, work = _run_bad(tmp_path, capsys, bids)
    finally:
        path.chmod(0o644)
    assert rc == 66 and err == err.splitlines()[0], err
    assert err.startswith(f"qsmprep: error: {path}: magnitude image cannot be read (permission denied)"), err
    assert not out.exists() and not work.exists()


def test_permission_denied_is_exit_66(tmp_path, capsys, monkeypatch):
    """As root no chmod makes a file unreadable, so opening the one image raises PermissionError here."""
    import builtins

    bids = make_good(tmp_path / "bids")
    before = tree_digest(bids)
    denied = _f(bids, 2, "mag")
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if str(file) == str(denied):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    rc, err, out, work = _run_bad(tmp_path, capsys, bids)
    monkeypatch.undo()
    assert rc == 66, err
    assert "\n" not in err, err
    assert err == (f"qsmprep: error: {denied}: magnitude image cannot be read (permission denied). Make it readable "
                   "by the user running qsmprep (chmod a+r; in a container, check the mount).")
    assert not out.exists() and not work.exists()
    assert tree_digest(bids) == before


def test_participant_label_with_sub_prefix(tmp_path, capsys, monkeypatch):
    """``--participant-label sub-01`` selects participant 01 (the prefix is stripped by the parser)."""
    bids = make_good(tmp_path / "bids")
    _describe(bids, subjects=("01", "02"))
    write_series(bids / "sub-02" / "anat", "sub-02", seed=3)
    stub = _stub_workflow_module()
    monkeypatch.setitem(sys.modules, "qsmprep.workflows.base", stub)
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "--participant-label", "sub-01", "-w", str(tmp_path / "w"),
               "--nprocs", "1", "--skip-bids-validation"] + _masking_arg())
    assert rc == 0, capsys.readouterr().err
    cfg, runs = stub.calls[-1]
    assert cfg.participant_label == ["01"] or tuple(cfg.participant_label) == ("01",)
    assert [r.subject for r in runs] == ["01"]
    assert (out / "prefixes.txt").read_text() == "sub-01\n"


def test_phase_images_without_sidecars(tmp_path, capsys, monkeypatch):
    """No phase sidecar: EchoTime comes from the magnitude sidecar of each echo and the unit from the
    values, each said in one warning line; an echo-level sidecar inherited by both parts (valid BIDS)
    supplies EchoTime without a warning; no EchoTime anywhere is refused (exit 65)."""
    monkeypatch.setitem(sys.modules, "qsmprep.workflows.base", _stub_workflow_module())
    bids = make_good(tmp_path / "bids")
    for e in (1, 2, 3):
        _f(bids, e, "phase", ".json").unlink()
    args = ["--nprocs", "1", "--skip-bids-validation"] + _masking_arg()
    rc = main([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, lines
    warnings = [ln for ln in lines if ln.startswith(f"qsmprep: warning: {bids}")]  # the input's, not the reports'
    assert not any(f"error: {bids}" in ln for ln in lines), lines
    assert len(warnings) == 2, lines
    te_line, units_line = warnings
    assert te_line.startswith(f"qsmprep: warning: {_f(bids, 1, 'phase')}: no EchoTime in its sidecar or an inherited one (3 files"), te_line
    assert "EchoTime of the other part of each echo (here sub-01_echo-1_part-mag_MEGRE.json)" in te_line
    assert "sub-01_echo-1_MEGRE.json" in te_line
    assert units_line.startswith(f"qsmprep: warning: {_f(bids, 1, 'phase')}: no \"Units\" in the sidecars"), units_line
    assert "were taken as radians" in units_line

    # an echo-level sidecar without the part entity is inherited by both parts: no EchoTime warning
    good = make_good(tmp_path / "inherit")
    for e in (1, 2, 3):
        _f(good, e, "phase", ".json").unlink()
        write_json(good / ANAT / f"sub-01_echo-{e}_MEGRE.json", {"EchoTime": TES[e - 1]})
        _edit_json(_f(good, e, "mag", ".json"), EchoTime=None)
    rc = main([str(good), str(tmp_path / "out2"), "participant", "-w", str(tmp_path / "w2"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, lines
    assert not any("EchoTime" in ln for ln in lines), lines
    assert sum("no \"Units\"" in ln for ln in lines) == 1, lines

    # no EchoTime in any sidecar of echo 2: refused before any work
    for part in ("mag", "phase"):
        _edit_json(_f(good, 2, part, ".json"), EchoTime=None) if _f(good, 2, part, ".json").exists() else None
    (good / ANAT / "sub-01_echo-2_MEGRE.json").unlink()
    before = tree_digest(good)
    out3 = tmp_path / "out3"
    rc = main([str(good), str(out3), "participant", "-w", str(tmp_path / "w3"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 65 and "\n" not in err, err
    assert err.startswith(f"qsmprep: error: {_f(good, 2, 'phase', '.json')}: \"EchoTime\" is missing (needed for echo 2)"), err
    assert not out3.exists() and tree_digest(good) == before
