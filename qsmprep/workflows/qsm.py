"""The QSM workflow of one gradient-echo series (``init_qsm_wf``) and its outputs (``init_ds_qsm_wf``).

Graph (node names are stable: they are the keys of Nipype's cache in the work directory)::

    load_echoes -> phase_offset (MCPC-3D-S) -> brain_mask -> unwrap -> fit_b0 -> bgremove -> inversion
                                                                 [r2star] ------------------> reference
                                          fit_b0 + magnitude -> [swi] (SWI and minIP)
    every step's ``params`` -> sidecars -> ds_* (DerivativesDataSink)
    bgremove + intermediate maps -> qc_field (metrics without chi, next to the inversion)
    reference + local field + qc_field -> qc (QC metrics JSON) -> ds_qc_metrics
    reference + segmentation (config.segmentation_dir) -> [roi_stats] -> [ds_roi_stats]

All physics lives in :mod:`qsmprep.qsm`; nodes are the thin interfaces of
:mod:`qsmprep.interfaces.qsm`. Methods come from the validated config (``masking``, ``unwrapping``,
``bgremove``, ``inversion``, ``reference``, ``r2star_method``), their parameters from
``config.method_params.<stage>``; file names from the output spec (:mod:`qsmprep.outputs`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmprep.interfaces.bids import DerivativesDataSink, QsmSidecars
from qsmprep.interfaces.qsm import (
    BackgroundRemoval,
    DipoleInversion,
    FitB0,
    LoadEchoes,
    Mask,
    PhaseOffsetCorrection,
    R2Star,
    Reference,
    SWI,
    Unwrap,
)
from qsmprep.interfaces.reports import (
    DerivativeFileSink,
    FieldQCMetrics,
    QCMetrics,
    ROIStats,
    check_segmentation_grid,
    find_segmentation,
)
from qsmprep.outputs import IMAGES, output
from qsmprep.qsm.masking import BET_PHASE_QUALITY_PARAMS
from qsmprep.utils.derivatives import run_sources

if TYPE_CHECKING:  # pragma: no cover
    from qsmprep.config import QsmprepConfig
    from qsmprep.utils.bids import QsmRun

__all__ = ["init_qsm_wf", "init_ds_qsm_wf", "run_workflow_name", "omp_nthreads", "estimate_memory_gb",
           "reference_image"]

LOGGER = logging.getLogger("qsmprep")

#: outputnode fields of :func:`init_qsm_wf`
QSM_OUTPUTS = [
    "chi",
    "mask",
    "fieldmap_hz",
    "total_field_ppm",
    "local_field_ppm",
    "r2star",
    "t2star",
    "reference_mask",
    "swi",
    "minip",
    "sidecars",
    "qc_metrics",
    "roi_stats",
    "gre_mask",
]


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_")


def run_workflow_name(run: "QsmRun") -> str:
    """``qsm_<entities without sub>_wf`` (e.g. ``qsm_ses_1_acq_qsm_run_1_wf``; ``qsm_wf`` when none)."""
    parts = []
    for key, pre in (("session", "ses"), ("acquisition", "acq"), ("run", "run")):
        value = getattr(run, key, None)
        if value is not None:
            parts.append(f"{pre}_{_clean(value)}")
    return "qsm_" + "_".join(parts) + "_wf" if parts else "qsm_wf"


def omp_nthreads(config: "QsmprepConfig") -> int:
    """Threads per node: ``config.omp_nthreads``, else ``config.nprocs``, else all cores."""
    return max(1, int(config.omp_nthreads or config.nprocs or os.cpu_count() or 1))


def reference_image(run: "QsmRun") -> Path:
    """The image that defines the output grid: echo-1 magnitude (else phase, else real)."""
    for attr in ("magnitude_files", "phase_files", "real_files"):
        files = getattr(run, attr, ())
        if files:
            return Path(files[0])
    raise ValueError(f"run {getattr(run, 'subject', '?')} has no image files")


def estimate_memory_gb(run: "QsmRun") -> tuple[float, float]:
    """(one 3D float32 volume, one 4D float32 series) in GB, from the echo-1 header (0.01 GB if unreadable)."""
    try:
        import nibabel as nib

        shape = nib.load(str(reference_image(run))).shape
        n_vox = int(shape[0]) * int(shape[1]) * int(shape[2])
    except Exception:  # pragma: no cover - unreadable header: the node will report the problem
        return 0.01, 0.01 * max(1, len(run.echo_times_s))
    vol = n_vox * 4 / 1e9
    return vol, vol * max(1, len(run.echo_times_s))


def _inversion_params(config) -> dict:
    """User parameters of the inversion, plus ``self_supervised_steps`` for the learned VarNet."""
    params = config.method_params.for_stage("inversion")
    if config.self_supervised_steps and config.inversion == "nextqsm":
        params.setdefault("self_supervised_steps", int(config.self_supervised_steps))
    return params


def init_qsm_wf(run: "QsmRun", config: "QsmprepConfig", name: str | None = None) -> pe.Workflow:
    """QSM of one :class:`~qsmprep.utils.bids.QsmRun`: load -> offset -> mask -> unwrap -> B0 ->
    background removal -> inversion -> referencing, plus output sinks when ``config.output_dir`` is set.

    Outputs (``outputnode``): ``chi`` (referenced, ppm), ``mask`` (final, eroded), ``fieldmap_hz``,
    ``total_field_ppm``, ``local_field_ppm``, ``r2star``/``t2star`` (when computed), ``swi``/``minip``
    (``config.swi``: CLEAR-SWI of the echo-combined magnitude and the B0 map, and its minIP),
    ``reference_mask`` (CSF referencing), ``sidecars`` (the Chimap's sidecar metadata),
    ``qc_metrics`` (QC JSON, always) and ``roi_stats`` (ROI TSV, when ``config.segmentation_dir`` holds a
    segmentation of this series on its grid; one on another grid is an error: registration is not
    implemented yet). Single-echo series skip MCPC-3D-S (the node passes the phase through) and cannot
    give R2*.
    """
    nthreads = omp_nthreads(config)
    vol_gb, vol4_gb = estimate_memory_gb(run)
    n_e = len(run.echo_times_s)
    reference = config.reference
    params = config.method_params
    want_r2 = bool(config.r2star or config.t2star)
    if want_r2 and (n_e < 2 or not run.has_magnitude):
        LOGGER.warning("%s: R2*/T2* maps need >= 2 echoes with magnitude; not computed", run.prefix())
        want_r2 = False
    do_r2 = want_r2 or reference == "csf"
    do_swi = bool(config.swi)
    if do_swi and not run.has_magnitude:
        LOGGER.warning("%s: SWI needs magnitude images; not computed", run.prefix())
        do_swi = False

    wf = pe.Workflow(name=name or run_workflow_name(run))
    outputnode = pe.Node(niu.IdentityInterface(fields=QSM_OUTPUTS), name="outputnode")

    load = pe.Node(
        LoadEchoes(
            echo_times=[float(t) for t in run.echo_times_s],
            field_strength=float(run.field_strength_t),
            phase_units=run.phase_units,
            b0_dir=None if run.b0_dir is None else [float(v) for v in run.b0_dir],
        ),
        name="load_echoes",
        mem_gb=0.2 + 4 * vol4_gb,
    )
    if getattr(run, "phase_files", ()):
        load.inputs.phase_files = [str(p) for p in run.phase_files]
        if run.magnitude_files:
            load.inputs.magnitude_files = [str(p) for p in run.magnitude_files]
    else:
        load.inputs.real_files = [str(p) for p in run.real_files]
        load.inputs.imag_files = [str(p) for p in run.imag_files]
        if getattr(run, "magnitude_files", ()):
            load.inputs.magnitude_files = [str(p) for p in run.magnitude_files]

    masking = config.masking_for(run)
    # BET + phase quality: the brain extraction needs only the magnitude, so it runs as a node of its own
    # next to the phase-offset correction (one slot each; BET's surface evolution is one thread), and
    # brain_mask adds the phase quality of the corrected phase
    separate_bet = masking == "bet-phase"
    offset_threads = max(1, nthreads - 1) if separate_bet else nthreads
    offset = pe.Node(
        PhaseOffsetCorrection(
            method="mcpc3ds" if n_e >= 2 else "none",
            method_params=params.for_stage("offset"),
            num_threads=offset_threads,
        ),
        name="phase_offset",
        n_procs=offset_threads,
        mem_gb=0.2 + 3 * vol4_gb + 12 * vol_gb,
    )
    mask = pe.Node(
        Mask(method=masking, method_params=params.for_stage("masking"), num_threads=nthreads),
        name="brain_mask",
        n_procs=nthreads,
        mem_gb=0.2 + 2 * vol4_gb + 12 * vol_gb,
    )
    bet = None
    if separate_bet:
        bet_params = {k: v for k, v in params.for_stage("masking").items() if k not in BET_PHASE_QUALITY_PARAMS}
        bet = pe.Node(Mask(method="bet", method_params=bet_params, num_threads=1), name="brain_extraction",
                      mem_gb=0.2 + vol4_gb + 12 * vol_gb)
    unwrap = pe.Node(
        Unwrap(method=config.unwrapping, method_params=params.for_stage("unwrapping"), num_threads=nthreads),
        name="unwrap",
        n_procs=nthreads,
        mem_gb=0.2 + 3 * vol4_gb + 12 * vol_gb,
    )
    fit_b0 = pe.Node(
        FitB0(method_params=params.for_stage("b0"), num_threads=nthreads),
        name="fit_b0",
        mem_gb=0.2 + 2 * vol4_gb + 6 * vol_gb,
    )
    bgremove = pe.Node(
        BackgroundRemoval(method=config.bgremove, method_params=params.for_stage("bgremove"),
                          num_threads=nthreads, device=config.device),
        name="bgremove",
        n_procs=nthreads,
        mem_gb=0.3 + 30 * vol_gb,
    )
    inversion = pe.Node(
        DipoleInversion(method=config.inversion, method_params=_inversion_params(config), num_threads=nthreads,
                        device=config.device),
        name="inversion",
        n_procs=nthreads,
        mem_gb=0.3 + 40 * vol_gb,
    )
    ref = pe.Node(
        Reference(method=reference, method_params=params.for_stage("reference"), num_threads=nthreads),
        name="reference",
        mem_gb=0.2 + 8 * vol_gb,
    )
    sidecars = pe.Node(QsmSidecars(sources=run_sources(run, config.bids_dir)), name="sidecars")
    methods = {"masking_method": config.masking_for(run), "unwrapping_method": config.unwrapping,
               "bgremove_method": config.bgremove, "inversion_method": config.inversion,
               "reference_method": reference}
    # the QC metrics that do not need chi run next to the dipole inversion; the rest after referencing
    qc_field = pe.Node(
        FieldQCMetrics(num_threads=1),
        name="qc_field",
        mem_gb=0.3 + 2 * vol4_gb + 20 * vol_gb,
    )
    qc = pe.Node(
        QCMetrics(methods=methods, series=run.prefix(), num_threads=nthreads),
        name="qc",
        n_procs=nthreads,
        mem_gb=0.3 + 12 * vol_gb,
    )
    segmentation = _segmentation(run, config)
    if bet is not None:
        wf.connect([(load, bet, [("phase", "phase"), ("magnitude", "magnitude"), ("echo_times", "echo_times"),
                                 ("voxel_size", "voxel_size")]),
                    (bet, mask, [("mask_file", "brain_extraction")])])

    # fmt: off
    wf.connect([
        (load, offset, [("phase", "phase"), ("magnitude", "magnitude"), ("echo_times", "echo_times"),
                        ("voxel_size", "voxel_size")]),
        (offset, mask, [("phase_corrected", "phase")]),
        (load, mask, [("magnitude", "magnitude"), ("echo_times", "echo_times"), ("voxel_size", "voxel_size")]),
        (offset, unwrap, [("phase_corrected", "phase")]),
        (load, unwrap, [("magnitude", "magnitude"), ("echo_times", "echo_times"), ("voxel_size", "voxel_size")]),
        (mask, unwrap, [("mask_file", "mask")]),
        (unwrap, fit_b0, [("unwrapped", "unwrapped")]),
        (load, fit_b0, [("magnitude", "magnitude"), ("echo_times", "echo_times"),
                        ("field_strength", "field_strength")]),
        (mask, fit_b0, [("mask_file", "mask")]),
        (fit_b0, bgremove, [("total_field_ppm", "total_field")]),
        (mask, bgremove, [("mask_file", "mask")]),
        (load, bgremove, [("voxel_size", "voxel_size"), ("b0_dir", "b0_dir")]),
        (bgremove, inversion, [("local_field", "local_field"), ("mask_out", "mask")]),
        (load, inversion, [("magnitude", "magnitude")]),
        (load, inversion, [("voxel_size", "voxel_size"), ("b0_dir", "b0_dir")]),
        (inversion, ref, [("chi", "chi")]),
        (bgremove, ref, [("mask_out", "mask")]),
        (load, ref, [("voxel_size", "voxel_size")]),
        (load, sidecars, [("params", "load")]),
        (offset, sidecars, [("params", "offset")]),
        (mask, sidecars, [("params", "mask")]),
        (unwrap, sidecars, [("params", "unwrap")]),
        (fit_b0, sidecars, [("params", "b0")]),
        (bgremove, sidecars, [("params", "bgremove")]),
        (inversion, sidecars, [("params", "inversion")]),
        (ref, sidecars, [("params", "reference")]),
        (ref, outputnode, [("chi_referenced", "chi"), ("reference_mask", "reference_mask")]),
        (bgremove, outputnode, [("mask_out", "mask"), ("local_field", "local_field_ppm")]),
        (fit_b0, outputnode, [("fieldmap_hz", "fieldmap_hz"), ("total_field_ppm", "total_field_ppm")]),
        (sidecars, outputnode, [("chimap", "sidecars")]),
        (bgremove, qc_field, [("mask_out", "mask"), ("local_field", "local_field")]),
        (mask, qc_field, [("mask_file", "quality_mask")]),
        (unwrap, qc_field, [("unwrapped", "unwrapped")]),
        (fit_b0, qc_field, [("fieldmap_hz", "fieldmap_hz")]),
        (load, qc_field, [("magnitude", "magnitude"), ("echo_times", "echo_times"), ("voxel_size", "voxel_size"),
                          ("field_strength", "field_strength")]),
        (qc_field, qc, [("metrics", "field_metrics")]),
        (ref, qc, [("chi_referenced", "chi")]),
        (bgremove, qc, [("mask_out", "mask"), ("local_field", "local_field")]),
        (mask, qc, [("mask_file", "quality_mask")]),
        (load, qc, [("echo_times", "echo_times"), ("voxel_size", "voxel_size"), ("b0_dir", "b0_dir"),
                    ("field_strength", "field_strength")]),
        (inversion, qc, [("params", "inversion_params")]),
        (qc, outputnode, [("out_file", "qc_metrics")]),
        (mask, outputnode, [("mask_file", "gre_mask")]),
    ])
    # fmt: on
    roi = None
    if segmentation is not None:
        roi = pe.Node(ROIStats(segmentation=str(segmentation[0]), reference=str(reference_image(run))),
                      name="roi_stats", mem_gb=0.2 + 8 * vol_gb)
        if segmentation[1] is not None:
            roi.inputs.label_tsv = str(segmentation[1])
        wf.connect([(ref, roi, [("chi_referenced", "chi")]), (bgremove, roi, [("mask_out", "mask")]),
                    (roi, outputnode, [("out_file", "roi_stats")])])
    if do_r2:
        r2star = pe.Node(
            R2Star(method=config.r2star_method, method_params=params.for_stage("r2star"), num_threads=nthreads),
            name="r2star",
            mem_gb=0.2 + 2 * vol4_gb + 10 * vol_gb,
        )
        # fmt: off
        wf.connect([
            (load, r2star, [("magnitude", "magnitude"), ("echo_times", "echo_times")]),
            (mask, r2star, [("mask_file", "mask")]),
            (r2star, sidecars, [("params", "r2star")]),
            (r2star, outputnode, [("r2star", "r2star"), ("t2star", "t2star")]),
        ])
        # fmt: on
        if reference == "csf":
            wf.connect(r2star, "r2star", ref, "r2star")

    swi = None
    if do_swi:
        swi = pe.Node(
            SWI(phase_scaling=config.swi_phase_scaling, phase_strength=float(config.swi_phase_strength),
                minip_slab_mm=float(config.swi_minip_slab_mm)),
            name="swi",
            mem_gb=0.2 + 2 * vol4_gb + 10 * vol_gb,
        )
        # fmt: off
        wf.connect([
            (load, swi, [("magnitude", "magnitude"), ("voxel_size", "voxel_size"), ("b0_dir", "b0_dir")]),
            (fit_b0, swi, [("fieldmap_hz", "fieldmap_hz")]),
            (mask, swi, [("mask_file", "mask")]),
            (swi, sidecars, [("params", "swi")]),
            (swi, outputnode, [("swi", "swi"), ("minip", "minip")]),
        ])
        # fmt: on

    output_dir = config.output_dir
    if output_dir is not None:
        # the images written (keys of the output spec) and the node output that holds each
        images = {"chimap": (ref, "chi_referenced"), "brain_mask": (bgremove, "mask_out"),
                  "total_fieldmap": (fit_b0, "fieldmap_hz"), "local_fieldmap": (bgremove, "local_field")}
        if want_r2 and config.r2star:
            images["r2starmap"] = (r2star, "r2star")
        if want_r2 and config.t2star:
            images["t2starmap"] = (r2star, "t2star")
        if swi is not None:
            images["swi"] = (swi, "swi")
            images["minip"] = (swi, "minip")
        if reference == "csf":
            images["reference_mask"] = (ref, "reference_mask")
        ds_wf = init_ds_qsm_wf(run, output_dir, list(images))
        for key, (node, field) in images.items():
            wf.connect([(node, ds_wf, [(field, f"inputnode.{key}")]),
                        (sidecars, ds_wf, [(key, f"inputnode.{key}_meta")])])
        # the QC JSON and ROI TSV sit next to the Chimap (text files: copied, not DerivativesDataSink)
        tables = [("qc_metrics", qc)] + ([("roi_stats", roi)] if roi is not None else [])
        for key, node in tables:
            spec = output(key)
            sink = pe.Node(DerivativeFileSink(out_file=str(spec.path(output_dir, run).absolute())), name=spec.sink,
                           run_without_submitting=True)
            wf.connect(node, "out_file", sink, "in_file")
    return wf


def _segmentation(run: "QsmRun", config: "QsmprepConfig") -> tuple[Path, Path | None] | None:
    """The run's segmentation in ``config.segmentation_dir`` (checked to be on the echo-1 grid), or None."""
    seg_dir = config.segmentation_dir
    if seg_dir is None:
        return None
    found = find_segmentation(seg_dir, run)
    if found is None:
        LOGGER.warning("%s: no segmentation (sub-%s/**/*_dseg.nii[.gz]) in %s; no ROI statistics",
                       run.prefix(), run.subject, seg_dir)
        return None
    check_segmentation_grid(found[0], reference_image(run))
    if found[1] is None:
        LOGGER.warning("%s: no label table (*_dseg.tsv) for %s; ROI names will be n/a", run.prefix(), found[0].name)
    return found


def init_ds_qsm_wf(run: "QsmRun", output_dir: str | os.PathLike, images: Sequence[str],
                   name: str = "ds_qsm_wf") -> pe.Workflow:
    """Sinks of one run's derivative images: ``images`` are keys of the output spec
    (:data:`qsmprep.outputs.IMAGES`); ``inputnode.<key>`` takes the image, ``inputnode.<key>_meta`` its
    sidecar metadata.

    Every sink checks that its image has the shape and affine of the echo-1 magnitude.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=[f for k in images for f in (k, f"{k}_meta")]),
                        name="inputnode")
    reference = str(reference_image(run))
    for key in images:
        spec = IMAGES[key]
        node = pe.Node(
            DerivativesDataSink(out_file=str(spec.path(output_dir, run).absolute()), data_dtype=spec.dtype,
                                reference=reference),
            name=spec.sink,
            run_without_submitting=True,
        )
        wf.connect([(inputnode, node, [(key, "in_file"), (f"{key}_meta", "metadata")])])
    return wf
