"""Writing the qsmprep derivative dataset: atomic writes, JSON, sidecars, ``dataset_description.json``.

Which files exist and what they are called is the output spec (:mod:`qsmprep.outputs`). Every file has
a JSON sidecar with ``Sources`` as BIDS URIs of the raw images (``bids:raw:sub-1/anat/...``;
``DatasetLinks.raw`` in the dataset description resolves them), the algorithm and all parameters of
each step, and the software versions.

Every file is written atomically (temporary file in the same folder, then :func:`os.replace`), so a
reader never sees a half-written output and an interrupted run leaves no corrupt file behind.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from qsmprep.__about__ import __version__
from qsmprep.methods import method_label, method_references
from qsmprep.outputs import bidsignore_text
from qsmprep.references import format_reference

__all__ = [
    "BIDS_VERSION",
    "CODE_URL",
    "DERIVATIVE_NAME",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_nifti",
    "jsonable",
    "software_versions",
    "container_info",
    "bids_uri",
    "run_sources",
    "build_sidecars",
    "write_derivative_description",
    "write_bidsignore",
]

BIDS_VERSION = "1.10.0"
DERIVATIVE_NAME = "qsmprep"
CODE_URL = "https://github.com/qsmprep/qsmprep"


# --------------------------------------------------------------------------------------------------
# atomic writes and JSON
# --------------------------------------------------------------------------------------------------


def _tmp_in(path: Path, suffix: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    return Path(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_in(path, ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (NaN -> null) atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_save_nifti(img, path: str | os.PathLike) -> Path:
    """``nibabel.save`` to a temporary name with the same extension, then ``os.replace``."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = _tmp_in(path, ".tmp" + ext)
    try:
        nib.save(img, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars/arrays, paths, tuples and sets turned into JSON types.

    Non-finite floats become None (JSON has no NaN); unknown objects become their ``repr``.
    """
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


# --------------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------------


def software_versions() -> dict[str, str]:
    """Versions of qsmprep and of the libraries that compute its outputs (torch when installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"qsmprep": __version__}
    for dist in ("numpy", "scipy", "numba", "nibabel", "nipype", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    import platform

    out["python"] = platform.python_version()
    return out


def container_info(environ: Mapping[str, str] | None = None, dockerenv: str = "/.dockerenv") -> dict | None:
    """``GeneratedBy.Container`` of the dataset description, or None outside a container.

    - Apptainer/Singularity (``APPTAINER_CONTAINER`` / ``SINGULARITY_CONTAINER`` set by the runtime):
      ``{"Type": "apptainer", "URI": <image>}``;
    - ``$QSMPREP_CONTAINER`` (set by the qsmprep image) as ``<type>:<tag>``, e.g.
      ``docker:qsmprep/qsmprep:0.1.0`` -> ``{"Type": "docker", "Tag": "qsmprep/qsmprep:0.1.0"}``;
    - otherwise ``/.dockerenv`` present -> ``{"Type": "docker"}``.
    """
    env = os.environ if environ is None else environ
    for var, kind in (("APPTAINER_CONTAINER", "apptainer"), ("SINGULARITY_CONTAINER", "singularity")):
        if env.get(var):
            return {"Type": kind, "URI": env[var]}
    value = (env.get("QSMPREP_CONTAINER") or "").strip()
    if value:
        kind, _, tag = value.partition(":")
        if not tag:
            return {"Type": kind or "docker"}
        key = "URI" if kind in ("apptainer", "singularity") or "://" in tag else "Tag"
        return {"Type": kind, key: tag}
    if dockerenv and os.path.exists(dockerenv):
        return {"Type": "docker"}
    return None


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------


def bids_uri(path: str | os.PathLike, bids_dir: str | os.PathLike | None, dataset: str = "raw") -> str:
    """``bids:<dataset>:<path relative to bids_dir>``; a ``file://`` URI when outside ``bids_dir``."""
    p = Path(path).absolute()
    if bids_dir is not None:
        root = Path(bids_dir).absolute()
        try:
            return f"bids:{dataset}:{p.relative_to(root).as_posix()}"
        except ValueError:
            pass
        try:  # symlinked roots
            return f"bids:{dataset}:{p.resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            pass
    return p.as_uri()


def run_sources(run: Any, bids_dir: str | os.PathLike | None) -> list[str]:
    """BIDS URIs of the raw images of a run (phase and magnitude, or real and imaginary), echo order."""
    files: list[Path] = []
    if getattr(run, "phase_files", ()):
        for pair in zip(run.magnitude_files or [None] * len(run.phase_files), run.phase_files):
            files += [Path(f) for f in pair if f is not None]
    else:
        for pair in zip(run.real_files, run.imag_files):
            files += [Path(f) for f in pair]
        files += [Path(f) for f in getattr(run, "magnitude_files", ())]
    return [bids_uri(f, bids_dir) for f in files]


# --------------------------------------------------------------------------------------------------
# sidecars
# --------------------------------------------------------------------------------------------------


def _step(params: Mapping | None) -> dict | None:
    return jsonable(dict(params)) if params else None


def build_sidecars(
    *,
    sources: Sequence[str],
    load: Mapping[str, Any],
    mask: Mapping[str, Any],
    unwrap: Mapping[str, Any],
    b0: Mapping[str, Any],
    bgremove: Mapping[str, Any],
    inversion: Mapping[str, Any],
    reference: Mapping[str, Any],
    offset: Mapping[str, Any] | None = None,
    r2star: Mapping[str, Any] | None = None,
    swi: Mapping[str, Any] | None = None,
) -> dict[str, dict]:
    """JSON sidecars of one run's outputs from the ``params`` of each processing step.

    Returns ``{"chimap", "brain_mask", "total_fieldmap", "local_fieldmap", "r2starmap", "t2starmap",
    "reference_mask", "swi", "minip"}`` -> dict. Keys follow BIDS (``Units``, ``SkullStripped``, ``Sources``,
    ``Description``, ``EstimationAlgorithm``, ``EstimationReference``, ``MagneticFieldStrength``,
    ``EchoTime`` array, mask ``Type``); qsmprep adds ``B0Direction`` (voxel frame), ``ReferenceRegion``,
    ``ReferenceOffsetPPM``, ``ProcessingSteps`` (every step's method and parameters) and
    ``ProcessingSoftware`` (versions).
    """
    versions = software_versions()
    acq = {
        "MagneticFieldStrength": load.get("MagneticFieldStrength"),
        "EchoTime": list(load.get("EchoTime", [])),
        "B0Direction": load.get("B0Direction"),
        "B0DirectionSource": load.get("B0DirectionSource"),
        "ObliquityDeg": load.get("ObliquityDeg"),
    }
    steps_field = {
        "Loading": _step(load),
        "PhaseOffsetCorrection": _step(offset),
        "Masking": _step(mask),
        "Unwrapping": _step(unwrap),
        "B0Fit": _step(b0),
    }
    steps_local = dict(steps_field, BackgroundFieldRemoval=_step(bgremove))
    steps_chi = dict(steps_local, DipoleInversion=_step(inversion), Referencing=_step(reference))
    if reference.get("Method") == "csf" and r2star:
        steps_chi["R2starFit"] = _step(r2star)

    def clean(d):
        return {k: v for k, v in d.items() if v is not None}

    offset_method = (offset or {}).get("Method", "none")
    algo = []
    refs: list[str] = []
    if offset_method not in (None, "none"):
        algo.append(f"{method_label('offset', offset_method)} phase-offset removal")
        refs += method_references("offset", offset_method)
    algo.append(f"{method_label('unwrapping', unwrap.get('Method', ''))} unwrapping")
    refs += method_references("unwrapping", unwrap.get("Method", ""))
    algo.append("weighted multi-echo B0 fit")
    field_algo = list(algo)
    field_refs = list(refs)
    algo.append(f"{method_label('bgremove', bgremove.get('Method', ''))} background field removal")
    refs += method_references("bgremove", bgremove.get("Method", ""))
    local_algo, local_refs = list(algo), list(refs)
    algo.append(f"{method_label('inversion', inversion.get('Method', ''))} dipole inversion")
    refs += method_references("inversion", inversion.get("Method", ""))
    ref_method = reference.get("Method", "mean")
    algo.append(f"referencing: {method_label('reference', ref_method)}")
    refs += method_references("reference", ref_method)
    mask_refs = method_references("masking", mask.get("Method", ""))

    def cites(keys):
        seen = []
        for k in keys:
            if k not in seen:
                seen.append(k)
        return [format_reference(k) for k in seen]

    region = reference.get("ReferenceRegion", ref_method)
    chimap = clean(
        {
            "Description": f"Magnetic susceptibility relative to {region}; 0 outside the brain mask "
            "(desc-brain_mask)",
            "Units": "ppm",
            "SkullStripped": True,
            "SpatialReference": "orig",
            "Sources": list(sources),
            "EstimationAlgorithm": "; ".join(algo),
            "EstimationReference": cites(refs),
            **acq,
            "ReferenceRegion": region,
            "ReferenceOffsetPPM": reference.get("ReferenceOffsetPPM"),
            "ReferenceRegionMeanPPMWholeBrainReferenced": reference.get("ReferenceRegionMeanPPMWholeBrainReferenced"),
            "ReferenceRegionStdPPMWholeBrainReferenced": reference.get("ReferenceRegionStdPPMWholeBrainReferenced"),
            "ProcessingSteps": clean(steps_chi),
            "ProcessingSoftware": versions,
        }
    )
    brain_mask = clean(
        {
            "Type": "Brain",
            "SpatialReference": "orig",
            "Description": f"Brain mask ({method_label('masking', mask.get('Method', ''))}) after the erosion of "
            f"background field removal ({method_label('bgremove', bgremove.get('Method', ''))}); the region of the "
            "local field and of the susceptibility map",
            "Sources": list(sources),
            "EstimationReference": cites(mask_refs),
            "ProcessingSteps": clean({"Loading": _step(load), "Masking": _step(mask),
                                      "BackgroundFieldRemoval": _step(bgremove)}),
            "ProcessingSoftware": versions,
        }
    )
    total = clean(
        {
            "Description": "B0 field map (frequency offset) from the unwrapped multi-echo phase; 0 outside the "
            "unwrapping (brain) mask",
            "Units": "Hz",
            "SkullStripped": True,
            "SpatialReference": "orig",
            "Sources": list(sources),
            "EstimationAlgorithm": "; ".join(field_algo),
            "EstimationReference": cites(field_refs),
            **acq,
            "ProcessingSteps": clean(steps_field),
            "ProcessingSoftware": versions,
        }
    )
    local = clean(
        {
            "Description": "Local field dB/B0 (ppm) after background field removal; 0 outside the brain mask "
            "(desc-brain_mask)",
            "Units": "ppm",
            "SkullStripped": True,
            "SpatialReference": "orig",
            "Sources": list(sources),
            "EstimationAlgorithm": "; ".join(local_algo),
            "EstimationReference": cites(local_refs),
            **acq,
            "ProcessingSteps": clean(steps_local),
            "ProcessingSoftware": versions,
        }
    )
    r2_steps = clean({"Loading": _step(load), "Masking": _step(mask), "R2starFit": _step(r2star)})
    r2_method = (r2star or {}).get("Method", "loglinear")
    r2_common = {
        "SkullStripped": True,
        "SpatialReference": "orig",
        "Sources": list(sources),
        "EstimationAlgorithm": f"{method_label('r2star', r2_method)} of the multi-echo magnitude"
        + (f" (chosen by --r2star-method {r2star['MethodRequested']}: {r2star.get('MethodChoice', '')})"
           if (r2star or {}).get("MethodRequested") else ""),
        "EstimationReference": cites(method_references("r2star", r2_method)),
        "MagneticFieldStrength": acq["MagneticFieldStrength"],
        "EchoTime": acq["EchoTime"],
        "ProcessingSteps": r2_steps,
        "ProcessingSoftware": versions,
    }
    r2map = clean(dict(r2_common, Units="1/s", Description="R2* (1/s) inside the brain mask; 0 outside"))
    t2map = clean(dict(r2_common, Units="s", Description="T2* = 1/R2* (s) inside the brain mask; 0 outside "
                                                         "and where R2* <= 0"))
    ref_mask = clean(
        {
            "Type": "ROI",
            "SpatialReference": "orig",
            "Description": f"Susceptibility reference region: {region}",
            "Sources": list(sources),
            "EstimationReference": cites(method_references("reference", ref_method)),
            "ProcessingSteps": clean({"R2starFit": _step(r2star), "Referencing": _step(reference)}),
            "ProcessingSoftware": versions,
        }
    )
    swi_params = dict((swi or {}).get("Parameters", {}))
    swi_common = {
        "Units": "arbitrary",
        "SkullStripped": False,
        "SpatialReference": "orig",
        "Sources": list(sources),
        "EstimationReference": cites(list(field_refs) + ["eckstein2021", "haacke2004"]),
        "MagneticFieldStrength": acq["MagneticFieldStrength"],
        "EchoTime": acq["EchoTime"],
        "B0Direction": acq["B0Direction"],
        "ProcessingSteps": clean({**steps_field, "SWI": _step(swi)}),
        "ProcessingSoftware": versions,
    }
    scaling = swi_params.get("phase_scaling", "tanh")
    swi_algo = (
        "CLEAR-SWI: root-sum-of-squares magnitude over echoes x phase mask of the B0 field map ("
        + "; ".join(field_algo) + f") high-pass filtered in-plane (Gaussian, sigma "
        f"{swi_params.get('highpass_sigma_voxels', 4.0):g} voxels), phase mask "
        + (f"(1 + tanh(1 - f/m))/2 with strength {swi_params.get('phase_strength', 4.0):g}" if scaling == "tanh"
           else f"linear on the positive field to the power {swi_params.get('phase_strength', 4.0):g}")
        + " (positive, paramagnetic field darkened)"
    )
    swi_map = clean(dict(swi_common, EstimationAlgorithm=swi_algo,
                         Description="Susceptibility-weighted image (CLEAR-SWI); veins dark"))
    minip_map = clean(dict(
        swi_common,
        EstimationAlgorithm=swi_algo + f"; minimum-intensity projection over {swi_params.get('minip_slab_mm', 16.0):g} mm"
        f" ({swi_params.get('minip_slices', '?')} slices) along voxel axis {swi_params.get('minip_axis', 2)}",
        Description="Minimum-intensity projection of the SWI (moving slab along the slice axis, same grid)",
    ))
    return {
        "chimap": chimap,
        "brain_mask": brain_mask,
        "total_fieldmap": total,
        "local_fieldmap": local,
        "r2starmap": r2map,
        "t2starmap": t2map,
        "reference_mask": ref_mask,
        "swi": swi_map,
        "minip": minip_map,
    }


# --------------------------------------------------------------------------------------------------
# dataset-level files
# --------------------------------------------------------------------------------------------------


def _dataset_link(bids_dir: Path, output_dir: Path) -> str:
    try:
        output_dir.resolve().relative_to(bids_dir.resolve())
    except ValueError:
        return bids_dir.resolve().as_uri()
    return Path(os.path.relpath(bids_dir.resolve(), output_dir.resolve())).as_posix()


def write_derivative_description(
    bids_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Write ``OUTPUT_DIR/dataset_description.json`` (BIDS derivative; atomic) and return its path.

    ``GeneratedBy`` names qsmprep with ``Version``, ``CodeURL`` and, inside a container,
    ``Container`` (:func:`container_info`). ``SourceDatasets`` points at the raw dataset (with its
    ``DatasetDOI`` and version when the raw description has them); ``DatasetLinks.raw`` resolves the
    ``bids:raw:`` URIs of the sidecars (a relative path when OUTPUT_DIR is inside BIDS_DIR, else a
    ``file://`` URI). The raw ``License`` is carried over.
    """
    out = Path(output_dir)
    generated = {
        "Name": DERIVATIVE_NAME,
        "Version": __version__,
        "Description": "Quantitative susceptibility mapping from multi-echo gradient-echo MRI",
        "CodeURL": CODE_URL,
    }
    container = container_info(environ)
    if container:
        generated["Container"] = container
    desc: dict[str, Any] = {
        "Name": "qsmprep - quantitative susceptibility maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "HowToAcknowledge": "Please cite the references listed in logs/CITATION.md.",
    }
    if bids_dir is not None:
        bids_dir = Path(bids_dir)
        raw: dict[str, Any] = {}
        try:
            raw = json.loads((bids_dir / "dataset_description.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        source: dict[str, Any] = {"URL": bids_dir.resolve().as_uri()}
        doi = raw.get("DatasetDOI")
        if doi:
            doi = str(doi)
            source["DOI"] = doi if doi.startswith("doi:") else f"doi:{doi}"
        if raw.get("Version") or raw.get("DatasetVersion"):
            source["Version"] = str(raw.get("Version") or raw.get("DatasetVersion"))
        desc["SourceDatasets"] = [source]
        desc["DatasetLinks"] = {"raw": _dataset_link(bids_dir, out)}
        if raw.get("License"):
            desc["License"] = raw["License"]
    path = atomic_write_json(out / "dataset_description.json", desc)
    if not (out / "README").exists() and not (out / "README.md").exists():
        atomic_write_text(
            out / "README",
            "Quantitative susceptibility maps computed by qsmprep "
            f"{__version__} ({CODE_URL}).\nFile contents and units: see the qsmprep documentation "
            "(docs/outputs.md); methods and references: logs/CITATION.md.\n",
        )
    return path


def write_bidsignore(output_dir: str | os.PathLike) -> Path:
    """Write ``OUTPUT_DIR/.bidsignore``: what the output spec marks as not BIDS data (:mod:`qsmprep.outputs`)."""
    return atomic_write_text(Path(output_dir) / ".bidsignore", bidsignore_text())
