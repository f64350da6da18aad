"""Checks of qsmprep's input before anything is written: paths, the BIDS validator, QSM data.

Every problem raises :class:`~qsmprep.utils.errors.InputError` (one line ``<file>: <problem>. <fix>``;
its ``code`` is the exit status). Only image headers are read, except
for phase (and real/imaginary) images, which are loaded to check for NaNs and to detect their units
with :func:`qsmprep.qsm.phase.detect_phase_units` (the function the workflow uses to scale them).
Nothing here writes to disk.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from qsmprep.qsm.phase import detect_phase_units
from qsmprep.utils.bids import sidecar_path
from qsmprep.utils.errors import EX_DATAERR, EX_NOINPUT, EX_USAGE, InputError

if TYPE_CHECKING:  # pragma: no cover
    from qsmprep.utils.bids import QsmRun

__all__ = [
    "check_paths",
    "check_bids_root",
    "check_runs",
    "check_run_headers",
    "check_run_data",
    "run_bids_validator",
]

LOGGER = logging.getLogger("qsmprep")

#: Largest difference (mm) tolerated between the voxel-to-world affines of the images of one run.
AFFINE_TOL_MM = 1e-3
#: Validator executable (PyPI ``bids-validator-deno``).
VALIDATOR = "bids-validator-deno"


# --------------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------------


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_paths(bids_dir: Path, output_dir: Path, work_dir: Path | None = None) -> None:
    """Refuse output or work directories that would write into the input dataset (exit 64)."""
    bids_dir, output_dir = Path(bids_dir).resolve(), Path(output_dir).resolve()
    if output_dir == bids_dir:
        raise InputError(
            output_dir,
            "OUTPUT_DIR is the BIDS input directory; the input dataset must not be modified",
            f"Choose another output directory, e.g. {bids_dir / 'derivatives' / 'qsmprep'}",
            EX_USAGE,
        )
    if _is_within(bids_dir, output_dir):
        raise InputError(
            output_dir,
            "OUTPUT_DIR contains the BIDS input directory",
            f"Choose an output directory outside the dataset or {bids_dir / 'derivatives' / 'qsmprep'}",
            EX_USAGE,
        )
    if _is_within(output_dir, bids_dir) and not _is_within(output_dir, bids_dir / "derivatives"):
        raise InputError(
            output_dir,
            "OUTPUT_DIR is inside the BIDS input directory but not under its derivatives/ folder",
            f"Choose an output directory outside the dataset or {bids_dir / 'derivatives' / 'qsmprep'}",
            EX_USAGE,
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(output_dir, "OUTPUT_DIR exists and is not a directory", "Choose a directory path", EX_USAGE)
    if work_dir is not None:
        work_dir = Path(work_dir).resolve()
        if _is_within(work_dir, bids_dir):
            raise InputError(
                work_dir,
                "the work directory is inside the BIDS input directory, which must not be modified",
                "Set -w/--work-dir to a folder outside the dataset (e.g. /tmp/qsmprep_work)",
                EX_USAGE,
            )
        if work_dir.exists() and not work_dir.is_dir():
            raise InputError(work_dir, "the work directory exists and is not a directory", "Choose another -w/--work-dir", EX_USAGE)
        if work_dir == output_dir or _is_within(output_dir, work_dir):
            raise InputError(
                work_dir,
                "OUTPUT_DIR is the work directory or inside it",
                "Use separate folders for -w/--work-dir and OUTPUT_DIR",
                EX_USAGE,
            )


def check_bids_root(bids_dir: Path) -> None:
    """``bids_dir`` exists and holds a readable ``dataset_description.json`` (exit 66/65)."""
    bids_dir = Path(bids_dir)
    if not bids_dir.exists():
        raise InputError(
            bids_dir,
            "BIDS directory not found",
            "Check the path (in a container, mount the dataset and pass the path inside the container)",
            EX_NOINPUT,
        )
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "BIDS_DIR is not a directory", "Pass the root folder of a BIDS dataset", EX_NOINPUT)
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise InputError(
            desc,
            "not found, so BIDS_DIR is not the root of a BIDS dataset",
            "Pass the dataset root (the folder with dataset_description.json and the sub-<label> folders)",
            EX_NOINPUT,
        )
    try:
        obj = json.loads(desc.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(desc, f"is not valid JSON ({exc})", "Fix the JSON syntax of this file") from None
    if not isinstance(obj, dict):
        raise InputError(desc, "must hold a JSON object", 'Write e.g. {"Name": "my dataset", "BIDSVersion": "1.10.0"}')


# --------------------------------------------------------------------------------------------------
# QSM runs
# --------------------------------------------------------------------------------------------------


def _run_files(run: "QsmRun") -> list[tuple[str, Path]]:
    out = []
    for kind, files in (
        ("magnitude", run.magnitude_files),
        ("phase", run.phase_files),
        ("real", run.real_files),
        ("imaginary", run.imag_files),
    ):
        out.extend((kind, Path(f)) for f in files)
    return out


def check_run_headers(run: "QsmRun") -> None:
    """One 3D volume per file, one grid (shape and affine) for all images, increasing EchoTime."""
    import nibabel as nib

    ref_path, ref_shape, ref_aff = None, None, None
    for kind, path in _run_files(run):
        try:
            img = nib.load(str(path))
        except Exception as exc:  # nibabel raises several types for corrupt files
            raise InputError(path, f"cannot be read as NIfTI ({exc})", "Replace the file with a valid NIfTI image") from None
        shape = tuple(int(s) for s in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) > 3:
            raise InputError(
                path,
                f"{kind} image is {len(shape)}D with shape {shape}; qsmprep expects one echo per file (3D)",
                "Split it into one file per echo (echo-<index> entity, EchoTime in each sidecar)",
            )
        if len(shape) < 3:
            raise InputError(path, f"{kind} image is {len(shape)}D with shape {shape}; a 3D volume is expected", "Export a 3D volume")
        aff = np.asarray(img.affine, dtype=np.float64)
        if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise InputError(path, "the voxel-to-world affine is invalid (singular or not finite)", "Fix the NIfTI qform/sform")
        if ref_path is None:
            ref_path, ref_shape, ref_aff = path, shape, aff
            continue
        if shape != ref_shape:
            raise InputError(
                path,
                f"{kind} image has shape {shape} but {ref_path.name} has {ref_shape}",
                "All echoes and parts of a run must be on one grid; reconstruct or resample them to the same matrix",
            )
        # largest displacement (mm) of a corner of the field of view between the two affines
        corners = np.array([[i, j, k, 1.0] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])])
        diff = float(np.max(np.abs(corners @ (aff - ref_aff).T)))
        if diff > AFFINE_TOL_MM:
            raise InputError(
                path,
                f"{kind} image affine differs from that of {ref_path.name} (field-of-view corners move by up to {diff:.3g} mm)",
                "All echoes and parts of a run must share one voxel-to-world affine; fix the header or resample",
            )
    te = run.echo_times_s
    files = run.phase_files or run.real_files or run.magnitude_files
    for i in range(1, len(te)):
        if not te[i] > te[i - 1]:
            how = "equals" if te[i] == te[i - 1] else "is smaller than"
            raise InputError(
                sidecar_path(Path(files[i])),
                f"EchoTime {te[i]:g} s {how} EchoTime {te[i - 1]:g} s of the previous echo ({Path(files[i - 1]).name})",
                "Echo indices must follow strictly increasing EchoTime; fix the echo-<index> entities or the EchoTime values",
            )


def _load_checked(path: Path, kind: str) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    if np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(path, f"{kind} image holds complex values", "Store magnitude and phase (or real and imaginary) as real-valued images")
    if np.issubdtype(data.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(np.count_nonzero(np.isinf(data)))
        if n_nan or n_inf:
            what = " and ".join(
                f"{what} values in {n} voxel{'s' if n != 1 else ''}"
                for what, n in (("NaN", n_nan), ("infinite", n_inf))
                if n
            )
            raise InputError(
                path,
                f"{kind} image contains {what}",
                "Export the data without NaNs (e.g. replace them with 0 outside the head)",
            )
    return data


def check_run_data(run: "QsmRun") -> None:
    """Load phase (or real/imaginary) images: no NaN/Inf, phase in a recognised unit."""
    for path in run.phase_files:
        path = Path(path)
        data = _load_checked(path, "phase")
        units = run.phase_units
        try:
            detect_phase_units(data, units)
        except ValueError as exc:
            lo, hi = float(np.min(data)), float(np.max(data))
            msg = str(exc).split(";")[0]
            sidecar = sidecar_path(path)
            if hi <= lo:
                raise InputError(path, f"phase image is constant ({lo:g})", "Check the export: this file carries no phase information") from None
            if units is None:
                fix = (
                    f'Add "Units": "arbitrary" (scanner units, rescaled to -pi..pi) or "rad" to {sidecar.name}, '
                    "or convert the phase to wrapped radians"
                )
            elif str(units).strip().lower() in ("rad", "radian", "radians"):
                fix = f'Store wrapped phase in radians (-pi..pi), or set "Units": "arbitrary" in {sidecar.name}'
            elif str(units).strip().lower() in ("arbitrary",):
                fix = "Store wrapped phase in radians (-pi..pi) or scanner integers (e.g. -4096..4095)"
            else:
                fix = f'Set "Units" to "rad" or "arbitrary" in {sidecar.name}'
            if "span" not in msg and "Units" not in msg:
                msg += f" (values span [{lo:.4g}, {hi:.4g}])"
            raise InputError(
                path,
                f"phase is not in a recognised unit: {msg} (sidecar Units: {units if units is not None else 'missing'})",
                fix,
            ) from None
    for kind, files in (("real", run.real_files), ("imaginary", run.imag_files)):
        for path in files:
            _load_checked(Path(path), kind)


def check_runs(runs: Iterable["QsmRun"], check_data: bool = True) -> None:
    """All checks of :func:`check_run_headers` (every run first), then of :func:`check_run_data`."""
    runs = list(runs)
    for run in runs:
        check_run_headers(run)
    if check_data:
        for run in runs:
            check_run_data(run)


# --------------------------------------------------------------------------------------------------
# BIDS validator
# --------------------------------------------------------------------------------------------------

_SUB_RE = re.compile(r"^/sub-([A-Za-z0-9]+)(/|$)")


def run_bids_validator(
    bids_dir: Path,
    participant_labels: Sequence[str] = (),
    *,
    executable: str | None = None,
    timeout_s: float = 1800.0,
) -> None:
    """Run ``bids-validator-deno`` on ``bids_dir``; :class:`InputError` (exit 65) on its first error.

    Errors in the folders of subjects not selected by ``participant_labels`` are ignored. A missing
    validator or one that fails to run produces a warning only.
    """
    bids_dir = Path(bids_dir).resolve()
    exe = shutil.which(executable or VALIDATOR)
    if exe is None:
        LOGGER.warning(
            "%s is not installed; skipping BIDS validation (pip install bids-validator-deno)", executable or VALIDATOR
        )
        return
    cmd = [exe, str(bids_dir), "--format", "json", "--ignoreWarnings", "--no-color"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOGGER.warning("%s could not be run (%s); continuing without BIDS validation", VALIDATOR, exc)
        return
    try:
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
        code_messages = report["issues"].get("codeMessages", {})
    except (ValueError, KeyError, TypeError):
        LOGGER.warning(
            "%s exited with status %d without a readable report; continuing without BIDS validation (%s)",
            VALIDATOR,
            proc.returncode,
            " ".join(proc.stderr.split())[:300],
        )
        return
    selected = {str(s) for s in participant_labels}
    errors = []
    for issue in issues:
        if issue.get("severity") != "error":
            continue
        loc = str(issue.get("location") or "/")
        m = _SUB_RE.match(loc)
        if selected and m and m.group(1) not in selected:
            continue
        errors.append(issue)
    if not errors:
        LOGGER.info("BIDS validation passed (%s)", VALIDATOR)
        return
    first = errors[0]
    code = str(first.get("code", "ERROR"))
    if first.get("subCode"):
        code += f" ({first['subCode']})"
    text = code_messages.get(first.get("code"), "") or first.get("issueMessage", "") or ""
    text = " ".join(str(text).split())
    if len(text) > 200:
        text = text[:197].rsplit(" ", 1)[0] + "..."
    loc = str(first.get("location") or "/").lstrip("/")
    path = bids_dir / loc if loc else bids_dir
    n = len(errors)
    raise InputError(
        path,
        f"BIDS validation failed with {n} error{'s' if n != 1 else ''}; first: {code}" + (f": {text}" if text else ""),
        f"Fix the dataset (run {VALIDATOR} {bids_dir} for the full report), or use --skip-bids-validation to bypass",
        EX_DATAERR,
    )
