"""Quality control and ROI statistics of one run: :class:`QCMetrics`, :class:`ROIStats` and the sink that
copies their JSON/TSV files into the derivative dataset (:class:`DerivativeFileSink`).

Files written per run (next to the Chimap, ``OUTPUT_DIR/sub-<s>/[ses-<t>/]anat/``):

- ``<prefix>_desc-qc_metrics.json``: flat object ``{metric: number | string}`` from
  :func:`qsmprep.qsm.qc.qc_metrics` plus ``"Flags": [{"metric", "value", "expected": "[lo, hi]",
  "reason"}]`` (:func:`qsmprep.qsm.qc.flag_metrics`; empty list when nothing is out of range);
- ``<prefix>_desc-roi_stats.tsv`` (with a segmentation, ``--segmentation-dir``): columns ``label``,
  ``name``, ``n_voxels``, ``mean_ppm``, ``median_ppm``, ``std_ppm`` (statistics of the referenced Chimap
  inside its mask; ``n/a`` for a label without a name).

Segmentations (:func:`find_segmentation`) come from a BIDS derivative dataset with
``sub-<s>/[ses-<t>/]anat/*_dseg.nii[.gz]`` and their label tables (``*_dseg.tsv``, columns ``index``
and ``name``). They must be on the grid of the echo-1 magnitude: registration of segmentations from
other spaces (e.g. T1w) is not implemented yet (planned: ANTsPy).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmprep.__about__ import __version__
from qsmprep.interfaces._nifti import load_float, load_mask, set_threads
from qsmprep.outputs import ROI_COLUMNS
from qsmprep.utils.derivatives import atomic_write_json, atomic_write_text, jsonable

__all__ = [
    "FieldQCMetrics",
    "QCMetrics",
    "ROIStats",
    "DerivativeFileSink",
    "find_segmentation",
    "check_segmentation_grid",
    "read_label_table",
    "write_roi_tsv",
    "ROI_COLUMNS",
]

LOGGER = logging.getLogger("qsmprep")


_MODEL_KEYS = {
    "model_name": ("ModelName", "Model", "model_name", "model"),
    "model_checksum": ("ModelChecksum", "ModelSHA256", "Checksum", "model_checksum", "sha256", "checksum"),
}


# --------------------------------------------------------------------------------------------------
# segmentations
# --------------------------------------------------------------------------------------------------

_DSEG_RE = re.compile(r"^(?P<ents>(?:[a-zA-Z]+-[a-zA-Z0-9]+_)*)dseg\.nii(?:\.gz)?$")


def _file_entities(name: str) -> dict[str, str] | None:
    m = _DSEG_RE.match(name)
    if not m:
        return None
    ents = {}
    for part in m.group("ents").rstrip("_").split("_"):
        if part:
            key, _, value = part.partition("-")
            ents[key] = value
    return ents


def find_segmentation(segmentation_dir: str | os.PathLike, run: Any) -> tuple[Path, Path | None] | None:
    """The segmentation of a run in a BIDS derivative folder: ``(dseg image, label TSV or None)``, or None.

    Candidates are ``sub-<s>/**/*_dseg.nii[.gz]`` of the run's subject. An entity ``ses``, ``acq`` or
    ``run`` in the file name must equal the run's; a file without it applies to every value (the
    most specific match wins). Files with a ``space`` entity other than ``orig`` are not on the GRE
    grid and are ignored. Two equally specific matches are an error (ambiguous). The label table is
    the ``_dseg.tsv`` with the same name, else the dataset-level ``[desc-<d>_]dseg.tsv``.
    """
    root = Path(segmentation_dir)
    if not root.is_dir():
        raise ValueError(f"segmentation folder {root} does not exist")
    sub_dir = root / f"sub-{run.subject}"
    if not sub_dir.is_dir():
        return None
    want = {"ses": getattr(run, "session", None), "acq": getattr(run, "acquisition", None),
            "run": getattr(run, "run", None)}
    scored: list[tuple[int, Path, dict]] = []
    for path in sorted(sub_dir.rglob("*_dseg.nii*")):
        ents = _file_entities(path.name)
        if ents is None or ents.get("sub") != str(run.subject):
            continue
        if ents.get("space", "orig") != "orig":
            continue
        score = 0
        for key, value in want.items():
            if key in ents:
                if value is None or ents[key] != str(value):
                    break
                score += 1
        else:
            scored.append((score, path, ents))
    if not scored:
        return None
    best = max(s for s, _, _ in scored)
    top = [(p, e) for s, p, e in scored if s == best]
    if len(top) > 1:
        names = ", ".join(p.name for p, _ in top)
        raise ValueError(
            f"several segmentations in {root} match {getattr(run, 'prefix', lambda: run.subject)()}: {names}; "
            "keep one per series (or give each an acq/run entity)"
        )
    dseg, ents = top[0]
    stem = dseg.name[: -len(".nii.gz")] if dseg.name.endswith(".nii.gz") else dseg.name[: -len(".nii")]
    candidates = [dseg.with_name(stem + ".tsv")]
    if "desc" in ents:
        candidates.append(root / f"desc-{ents['desc']}_dseg.tsv")
    candidates.append(root / "dseg.tsv")
    tsv = next((c for c in candidates if c.is_file()), None)
    return dseg, tsv


def check_segmentation_grid(segmentation: str | os.PathLike, reference: str | os.PathLike) -> None:
    """Raise ValueError unless ``segmentation`` has the 3D shape and affine (1e-3 mm) of ``reference``."""
    import nibabel as nib

    seg, ref = nib.load(str(segmentation)), nib.load(str(reference))
    same = tuple(seg.shape[:3]) == tuple(ref.shape[:3]) and np.allclose(seg.affine, ref.affine, atol=1e-3, rtol=0)
    if not same or (len(seg.shape) > 3 and int(np.prod(seg.shape[3:])) != 1):
        raise ValueError(
            f"the segmentation {Path(segmentation).name} (shape {tuple(seg.shape)}) is not on the grid of the "
            f"GRE echo-1 image {Path(reference).name} (shape {tuple(ref.shape[:3])}, or a different affine). "
            "Registration of segmentations to the GRE space is not implemented yet: resample the label image "
            "to the echo-1 magnitude grid (nearest neighbour) first."
        )


def read_label_table(path: str | os.PathLike) -> dict[int, str]:
    """``{index: name}`` from a BIDS ``dseg.tsv`` (columns ``index`` and ``name``; ``n/a`` names skipped)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        cols = reader.fieldnames or []
        if "index" not in cols or "name" not in cols:
            raise ValueError(f"{path}: a label table needs the columns 'index' and 'name' (found {cols})")
        out = {}
        for row_no, row in enumerate(reader, start=2):
            try:
                idx = int(float(row["index"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {row_no}: index {row['index']!r} is not an integer") from None
            name = (row.get("name") or "").strip()
            if name and name != "n/a":
                out[idx] = name
    return out


def _num(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.6g}"


def write_roi_tsv(rows, path: str | os.PathLike) -> Path:
    """Write :func:`qsmprep.qsm.roi.roi_statistics` rows as the ROI TSV (:data:`ROI_COLUMNS`), atomically."""
    lines = ["\t".join(ROI_COLUMNS)]
    for r in rows:
        name = r.get("name") or "n/a"
        name = re.sub(r"[\t\r\n]+", " ", str(name))
        lines.append("\t".join([str(int(r["label"])), name, str(int(r["n_voxels"])), _num(r["mean"]),
                                _num(r["median"]), _num(r["std"])]))
    return atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# interfaces
# --------------------------------------------------------------------------------------------------


class _FieldQCMetricsInputSpec(BaseInterfaceInputSpec):
    mask = File(exists=True, mandatory=True, desc="mask of chi (final, eroded)")
    quality_mask = File(exists=True, desc="mask of unwrapping and the B0 fit (default: mask)")
    local_field = File(exists=True, desc="local field (ppm)")
    fieldmap_hz = File(exists=True, desc="B0 field map (Hz)")
    unwrapped = File(exists=True, desc="4D unwrapped, offset-corrected phase (rad)")
    magnitude = File(exists=True, desc="4D magnitude")
    echo_times = traits.List(traits.Float, desc="echo times (s)")
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="voxel size (mm)")
    field_strength = traits.Float(desc="B0 (T)")
    quality_threshold = traits.Float(0.5, usedefault=True, desc="ROMEO voxel quality below which a voxel is 'low'")
    harmonic_order = traits.Int(3, usedefault=True, desc="degree of the residual-background harmonic fit")
    num_threads = traits.Int(0, usedefault=True, nohash=True, desc="numba/FFT threads (0: all cores)")
    qsmprep_version = traits.Str(__version__, usedefault=True, desc="cache key")


class _QCMetricsInputSpec(_FieldQCMetricsInputSpec):
    chi = File(exists=True, mandatory=True, desc="referenced susceptibility (ppm)")
    b0_dir = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="B0 direction (voxel frame)")
    methods = traits.Dict(usedefault=True, desc="passthrough strings, e.g. {'inversion_method': 'rts'}")
    inversion_params = traits.Dict(usedefault=True, desc="params of the inversion (model name/checksum)")
    series = Str(desc="the run's file-name prefix")
    field_metrics = traits.Dict(desc="FieldQCMetrics' result for the same run: unwrapped, magnitude and field "
                                     "map are then not read")


def _qc_inputs(i, read_series: bool = True) -> dict[str, Any]:
    """The keyword arguments that :func:`~qsmprep.qsm.qc.field_qc_metrics` and
    :func:`~qsmprep.qsm.qc.qc_metrics` share, read from the node's inputs ``i``; without ``read_series``
    the 4D series and the field map are left out (their metrics were computed by :class:`FieldQCMetrics`)."""

    def opt_float(name):
        return load_float(getattr(i, name))[0] if isdefined(getattr(i, name)) else None

    return {
        "local_field_ppm": opt_float("local_field"),
        "unwrapped_phase_4d": opt_float("unwrapped") if read_series else None,
        "fieldmap_hz": opt_float("fieldmap_hz") if read_series else None,
        "magnitude_4d": opt_float("magnitude") if read_series else None,
        "echo_times_s": list(i.echo_times) if isdefined(i.echo_times) and i.echo_times else None,
        "field_strength_t": float(i.field_strength) if isdefined(i.field_strength) else None,
        "quality_mask": load_mask(i.quality_mask) if isdefined(i.quality_mask) else None,
        "quality_threshold": i.quality_threshold,
        "harmonic_order": i.harmonic_order,
    }


class _FieldQCMetricsOutputSpec(TraitedSpec):
    metrics = traits.Dict(desc="the metrics that do not depend on chi")


class FieldQCMetrics(SimpleInterface):
    """The QC metrics that do not need the susceptibility map (:func:`qsmprep.qsm.qc.field_qc_metrics`):
    a workflow computes them while the dipole inversion runs and passes them to :class:`QCMetrics`."""

    input_spec = _FieldQCMetricsInputSpec
    output_spec = _FieldQCMetricsOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.qsm.qc import field_qc_metrics

        set_threads(self.inputs.num_threads)
        i = self.inputs
        self._results["metrics"] = jsonable(field_qc_metrics(load_mask(i.mask), i.voxel_size, **_qc_inputs(i)))
        return runtime


class _QCMetricsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="QC metrics JSON (in the node folder)")
    metrics = traits.Dict(desc="the metrics, with Flags")
    n_flags = traits.Int(desc="number of metrics outside their expected range")


def _model_info(params: Mapping[str, Any]) -> dict[str, str]:
    """``model_name`` / ``model_checksum`` of a learned inversion from its ``params`` (top level or
    ``Parameters``), under any of the usual key spellings."""
    out = {}
    scopes = [params, params.get("Parameters") or {}]
    for key, names in _MODEL_KEYS.items():
        for scope in scopes:
            hit = next((scope[n] for n in names if isinstance(scope, Mapping) and scope.get(n)), None)
            if hit is not None:
                out[key] = str(hit)
                break
    return out


class QCMetrics(SimpleInterface):
    """QC metrics of one run (:func:`qsmprep.qsm.qc.qc_metrics`) with their flags, as a JSON file."""

    input_spec = _QCMetricsInputSpec
    output_spec = _QCMetricsOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.qsm.qc import flag_metrics, qc_metrics

        set_threads(self.inputs.num_threads)
        i = self.inputs
        chi, _ = load_float(i.chi)
        field_metrics = dict(i.field_metrics) if isdefined(i.field_metrics) else None
        extra: dict[str, Any] = {}
        if isdefined(i.series):
            extra["series"] = i.series
        extra.update({str(k): v for k, v in dict(i.methods).items()})
        extra.update(_model_info(dict(i.inversion_params)))
        extra["qsmprep_version"] = __version__
        metrics = qc_metrics(
            chi,
            load_mask(i.mask),
            i.voxel_size,
            i.b0_dir,
            **_qc_inputs(i, read_series=field_metrics is None),  # FieldQCMetrics' result: series not read again
            reference=dict(i.methods).get("reference_method"),
            extra=extra,
            field_metrics=field_metrics,
        )
        metrics["Flags"] = flag_metrics(metrics)
        metrics = jsonable(metrics)
        out = atomic_write_json(os.path.abspath("qc_metrics.json"), metrics)
        self._results["out_file"] = str(out)
        self._results["metrics"] = metrics
        self._results["n_flags"] = len(metrics["Flags"])
        return runtime


class _ROIStatsInputSpec(BaseInterfaceInputSpec):
    chi = File(exists=True, mandatory=True, desc="susceptibility (ppm)")
    segmentation = File(exists=True, mandatory=True, desc="label image (integers; 0 = background)")
    label_tsv = File(exists=True, desc="BIDS dseg.tsv with columns index and name")
    mask = File(exists=True, desc="statistics inside this mask only (the Chimap's mask)")
    reference = File(exists=True, desc="image whose grid the segmentation must have (default: chi)")
    erode_voxels = traits.Int(0, usedefault=True, desc="erode each region by this many voxels first")


class _ROIStatsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="ROI statistics TSV (in the node folder)")
    n_rois = traits.Int(desc="number of labels with voxels in the mask")


class ROIStats(SimpleInterface):
    """Per-label susceptibility statistics (:func:`qsmprep.qsm.roi.roi_statistics`) as a TSV file.

    The segmentation must be on the grid of ``reference`` (the echo-1 magnitude); registration is not
    implemented yet (:func:`check_segmentation_grid`).
    """

    input_spec = _ROIStatsInputSpec
    output_spec = _ROIStatsOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib

        from qsmprep.qsm.roi import roi_statistics

        i = self.inputs
        check_segmentation_grid(i.segmentation, i.reference if isdefined(i.reference) else i.chi)
        chi, _ = load_float(i.chi)
        labels = np.asanyarray(nib.load(i.segmentation).dataobj)
        labels = labels.reshape(labels.shape[:3])
        if i.erode_voxels > 0:
            from qsmprep.qsm.roi import erode_labels

            labels = erode_labels(labels, i.erode_voxels)
        names = read_label_table(i.label_tsv) if isdefined(i.label_tsv) else None
        mask = load_mask(i.mask) if isdefined(i.mask) else None
        if mask is not None and not mask.any():
            raise ValueError("the mask of the susceptibility map is empty")
        rows = roi_statistics(chi, labels, mask=mask, label_names=names)
        if not rows:
            LOGGER.warning("ROI statistics: no label of %s overlaps the brain mask", Path(i.segmentation).name)
        out = write_roi_tsv(rows, os.path.abspath("roi_stats.tsv"))
        self._results["out_file"] = str(out)
        self._results["n_rois"] = len(rows)
        return runtime


class _DerivativeFileSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="text file to copy (JSON, TSV)")
    out_file = Str(mandatory=True, desc="absolute output path")


class _DerivativeFileSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="written file")


class DerivativeFileSink(SimpleInterface):
    """Copy a text derivative (QC JSON, ROI TSV) atomically to its place in the output dataset.

    Always runs (also when cached), so a deleted output is rewritten on a resumed run.
    """

    input_spec = _DerivativeFileSinkInputSpec
    output_spec = _DerivativeFileSinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        out = Path(self.inputs.out_file)
        if not out.is_absolute():
            raise ValueError(f"out_file must be an absolute path, got {out}")
        atomic_write_text(out, Path(self.inputs.in_file).read_text(encoding="utf-8"))
        self._results["out_file"] = str(out)
        return runtime
