"""Checks of qsmprep's input before anything is written: paths, the BIDS validator, QSM data.

Every problem raises :class:`~qsmprep.utils.errors.InputError` (one line ``<file>: <problem>. <fix>``;
its ``code`` is the exit status). :func:`check_run_headers` reads the headers (shape, voxel size,
affine, storage type); :func:`check_run_data` then reads every image of a series once, in full (a
truncated gzip stream is only found at its end): it refuses truncated or unreadable data, NaN/Inf
values, constant (e.g. all-zero) or negative magnitude, and phase in no recognised unit (with
:func:`qsmprep.qsm.phase.detect_phase_units`, the function the workflow uses to scale it). The files
of a series are read in a few threads (decompression releases the GIL). Nothing here writes to disk.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from qsmprep.qsm.phase import detect_phase_units
from qsmprep.utils.bids import sidecar_path
from qsmprep.utils.errors import EX_DATAERR, EX_NOINPUT, EX_USAGE, InputError
from qsmprep.utils.gzip_nifti import image_from_bytes, load_gz_image

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
#: Fewest voxels along each of the three axes of a series. The default pipeline erodes the mask by up to 3
#: voxels and smooths with a Gaussian of sigma 5 voxels, ROMEO compares 3x3x3 neighbourhoods, the
#: SHARP/V-SHARP kernels span radii of several voxels (eroding the mask by the largest), and every
#: dipole inversion works in 3D k-space: below 8 voxels per axis nothing of the brain survives the
#: erosions and a 2D (single-slice) acquisition has no dipole field along the slice axis.
MIN_VOXELS_PER_AXIS = 8
#: Threads reading the images of one series in :func:`check_run_data`.
READ_THREADS = max(1, min(4, os.cpu_count() or 1))
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


def _raw_header(path: Path, kind: str):
    """The NIfTI header as stored (nibabel's loader silently "fixes" zero or negative voxel sizes), or
    None when it cannot be parsed (then :func:`nibabel.load` reports the problem); an unreadable file:
    exit 66 (a missing or unreadable input)."""
    import gzip
    import io

    import nibabel as nib

    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
            block = fh.read(540)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            problem, fix = "is a symbolic link loop", "Replace the link with the image file (or a link to it)"
        elif exc.errno == errno.ENOENT:
            problem, fix = (f"is a broken symbolic link (to {os.readlink(path)})" if os.path.islink(path)
                            else "disappeared while it was being checked"), "Restore the image file"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            problem, fix = (f"{kind} image cannot be read (permission denied)",
                            "Make it readable by the user running qsmprep (chmod a+r; in a container, check the mount)")
        elif exc.errno == errno.EISDIR:
            problem, fix = "is a directory, not an image file", "Replace it with the NIfTI image"
        else:
            problem, fix = f"{kind} image cannot be opened ({exc.strerror or exc})", "Check the file and its storage"
        raise InputError(path, problem, fix, EX_NOINPUT) from None
    try:
        klass = nib.Nifti2Header if len(block) >= 4 and int.from_bytes(block[:4], "little") in (540, 469893120) else nib.Nifti1Header
        return klass.from_fileobj(io.BytesIO(block), check=False)
    except Exception:
        return None


def _storage(img) -> tuple[str, float, float]:
    """On-disk data type and scaling (slope, intercept) of an image."""
    dtype = np.dtype(img.get_data_dtype()).name
    slope = getattr(img.dataobj, "slope", 1.0)
    inter = getattr(img.dataobj, "inter", 0.0)
    return dtype, float(slope), float(inter)


def _describe_storage(st: tuple[str, float, float]) -> str:
    dtype, slope, inter = st
    return dtype + ("" if (slope, inter) == (1.0, 0.0) else f" x {slope:g} + {inter:g}")


def _check_grid(path: Path, kind: str, img, raw_header=None) -> tuple[int, ...]:
    """Shape (3D, at least :data:`MIN_VOXELS_PER_AXIS` per axis), voxel sizes and affine of one image."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) > 3:
        raise InputError(
            path,
            f"{kind} image is {len(shape)}D with shape {shape}; qsmprep expects one echo per file (3D)",
            "Split it into one file per echo (echo-<index> entity, EchoTime in each sidecar)",
        )
    if len(shape) < 3 or shape[2] == 1:
        raise InputError(
            path,
            f"{kind} image is a single slice (shape {shape}); QSM needs a 3D volume "
            f"(at least {MIN_VOXELS_PER_AXIS} voxels along each axis)",
            "Acquire or export the series as a 3D volume; 2D single-slice acquisitions cannot be processed",
        )
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise InputError(
            path,
            f"{kind} image of shape {shape} is too small to process "
            f"(at least {MIN_VOXELS_PER_AXIS} voxels along each axis are needed)",
            "Check the export (a localiser or a cropped test volume?); select the full 3D series",
        )
    hdr = raw_header if raw_header is not None else img.header
    pixdim = np.asarray(hdr["pixdim"][1:4], dtype=np.float64) if "pixdim" in hdr else None
    if pixdim is not None and (not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0)):
        raise InputError(
            path,
            f"the header's voxel sizes (pixdim) are {' x '.join(f'{v:g}' for v in pixdim)} mm; "
            "they must be positive and finite",
            "Fix the NIfTI header (pixdim[1..3] = voxel size in mm; the orientation belongs in qform/sform)",
        )
    aff = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise InputError(path, "the voxel-to-world affine is invalid (singular or not finite)", "Fix the NIfTI qform/sform")
    return shape


def check_run_headers(run: "QsmRun") -> None:
    """Per file: readable, one 3D volume of at least :data:`MIN_VOXELS_PER_AXIS` voxels per axis, positive
    voxel sizes, a finite affine. Per series: one grid (shape and affine) for all images, one storage type
    and scaling per part, increasing EchoTime."""
    import nibabel as nib

    ref_path, ref_shape, ref_aff = None, None, None
    storage: dict[str, tuple[Path, tuple]] = {}
    for kind, path in _run_files(run):
        raw_header = _raw_header(path, kind)
        try:
            img = nib.load(str(path))
        except OSError as exc:
            raise InputError(path, f"cannot be read ({exc.strerror or exc})", "Check the file and its storage", EX_NOINPUT) from None
        except Exception as exc:  # nibabel raises several types for corrupt files
            raise InputError(path, f"cannot be read as NIfTI ({exc})", "Replace the file with a valid NIfTI image") from None
        shape = _check_grid(path, kind, img, raw_header)
        aff = np.asarray(img.affine, dtype=np.float64)
        st = _storage(img)
        if kind not in storage:
            storage[kind] = (path, st)
        else:
            first, st0 = storage[kind]
            # magnitude: nibabel applies each file's scaling, so only integer/float mixing is refused;
            # phase (real, imaginary): one sidecar Units and one unit detection for the whole series
            mixed = (np.dtype(st[0]).kind == "f") != (np.dtype(st0[0]).kind == "f") if kind == "magnitude" else st != st0
            if mixed:
                raise InputError(
                    path,
                    f"{kind} image is stored as {_describe_storage(st)} but {first.name} as {_describe_storage(st0)} "
                    "(echoes of one series from different exports?)",
                    "Export every echo of the series with one data type and scaling",
                )
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


def _read_data(path: Path) -> np.ndarray:
    """The voxel data of a NIfTI file, read once and in full (a gzip stream with ISA-L,
    :func:`qsmprep.utils.gzip_nifti.load_gz_image`, which verifies its CRC and length: a truncated file
    raises ``EOFError``)."""
    img = load_gz_image(path) if path.name.endswith(".gz") else image_from_bytes(Path(path).read_bytes())
    return np.asanyarray(img.dataobj)


def _load_checked(path: Path, kind: str) -> np.ndarray:
    """Read one image in full (truncated data: exit 65) and check its values: no NaN/Inf; magnitude
    neither constant (e.g. all zero) nor negative."""
    try:
        data = _read_data(path)
    except Exception as exc:  # EOFError (gzip), OSError (short read), zlib.error, ValueError, ...
        detail = " ".join(str(exc).split()).split(" - could the file")[0]
        raise InputError(
            path,
            f"{kind} image data are truncated or corrupt ({type(exc).__name__}: {detail})",
            "The header is readable but the voxel data are not; copy or export the file again",
        ) from None
    if data.ndim == 4:
        data = data[..., 0]
    if np.issubdtype(data.dtype, np.complexfloating):
        raise InputError(path, f"{kind} image holds complex values", "Store magnitude and phase (or real and imaginary) as real-valued images")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_nan = int(np.count_nonzero(np.isnan(data)))
        n_inf = int(np.count_nonzero(np.isinf(data)))
        what = " and ".join(
            f"{what} values in {n} voxel{'s' if n != 1 else ''}"
            for what, n in (("NaN", n_nan), ("infinite", n_inf))
            if n
        )
        raise InputError(
            path,
            f"{kind} image contains {what}",
            "Export the data without NaNs or infinities (e.g. replace them with 0 outside the head)",
        )
    if kind == "magnitude":
        lo, hi = float(data.min()), float(data.max())
        if hi <= lo:
            raise InputError(
                path,
                f"magnitude image is constant ({'all zero' if lo == 0 else f'every voxel {lo:g}'})",
                "Check the export: this file carries no signal, and QSM needs the magnitude for the brain mask and the weighting",
            )
        if lo < 0:
            raise InputError(
                path,
                f"magnitude image has negative values (minimum {lo:g})",
                "Magnitude must be >= 0; check that part-mag and part-phase (or real/imag) are not swapped",
            )
    return data


def _check_phase_file(path: Path, units) -> tuple[str, float, float]:
    """:func:`_load_checked` plus the unit detection of the workflow; returns (unit, min, max)."""
    data = _load_checked(path, "phase")
    lo, hi = float(np.min(data)), float(np.max(data))
    try:
        return detect_phase_units(data, units), lo, hi
    except ValueError as exc:
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


def check_run_data(run: "QsmRun") -> None:
    """Read every image of ``run`` once, in full: no truncated data, no NaN/Inf, magnitude neither
    constant nor negative, phase in a recognised unit. Without a sidecar ``Units`` (BIDS does not
    require it) the unit detected from the values is logged as one warning line."""
    jobs = []
    for kind, path in _run_files(run):
        if kind == "phase":
            jobs.append((path, lambda p=path: _check_phase_file(p, run.phase_units)))
        else:
            jobs.append((path, lambda p=path, k=kind: _load_checked(p, k) is None))
    if READ_THREADS > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="qsmprep-check") as pool:
            futures = [pool.submit(job) for _, job in jobs]
            try:
                results = [f.result() for f in futures]  # the first failing file in series order
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        results = [job() for _, job in jobs]
    phase = [r for (p, _), r in zip(jobs, results) if isinstance(r, tuple)]
    if phase and run.phase_units is None:
        kinds = sorted({u for u, _, _ in phase})
        lo, hi = min(r[1] for r in phase), max(r[2] for r in phase)
        LOGGER.warning(
            '%s: no "Units" in the sidecars of the phase images (nor in an inherited %s.json); the values '
            "[%.4g, %.4g] were taken as %s. Add \"Units\": \"rad\" or \"arbitrary\" to make this explicit",
            run.phase_files[0], run.suffix, lo, hi, " and ".join(
                {"rad": "radians", "integer": "a scanner integer range", "arbitrary": "arbitrary units"}[k] for k in kinds),
        )


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
