"""Anatomical and template spaces of one GRE series (``init_anat_wf``).

Graph::

    magnitude echoes + T1w -> gre_to_t1w (rigid, Mattes MI) -> from-GRE_to-T1w xfm
    T1w + (sMRIPrep brain mask | GRE mask through the rigid) -> t1w_brain
    t1w_brain + template (TemplateFlow) -> t1w_to_<template> (affine + SyN, or sMRIPrep's transform)
    chi, mask -> resample into each --output-spaces space (chi linear, mask nearest) -> ds_*
    aseg/dseg (T1w space) -> GRE grid (generic label) -> roi stats seg-<name>
    --atlas (template space) -> GRE grid through template -> T1w -> GRE -> roi stats seg-<atlas>

ANTs transform lists name the transform nearest the output grid first (fMRIPrep's convention): chi
into a template is ``[T1w->template, GRE->T1w]``, an atlas onto the GRE grid ``[GRE->T1w (inverted),
template->T1w]``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from qsmprep.anat.inputs import AnatInputs
from qsmprep.anat.templates import (
    Space,
    atlas_files,
    parse_atlas,
    parse_spaces,
    registration_templates,
    template_files,
)
from qsmprep.interfaces.anat import (
    ApplyTransforms,
    LabelImage,
    RegisterGreToT1w,
    RegisterT1wToTemplate,
    T1wBrain,
    TransformSink,
)
from qsmprep.interfaces.bids import DerivativesDataSink
from qsmprep.interfaces.reports import ROIStats
from qsmprep.outputs import output
from qsmprep.utils.derivatives import bids_uri

if TYPE_CHECKING:  # pragma: no cover
    from qsmprep.config import QsmprepConfig
    from qsmprep.utils.bids import QsmRun

__all__ = ["init_anat_wf", "anat_requested", "ANAT_INPUTS"]

LOGGER = logging.getLogger("qsmprep")

#: inputnode fields of :func:`init_anat_wf`
ANAT_INPUTS = ["chi", "mask", "gre_mask", "chi_meta"]


def anat_requested(config: "QsmprepConfig") -> bool:
    """Whether the settings ask for anything anatomical (spaces, atlases, derivatives)."""
    return bool(parse_spaces(config.output_spaces) or config.atlas or config.derivatives)


def space_metadata(meta: dict, extra: dict) -> dict:
    """The native Chimap sidecar updated by the space's keys (a Nipype Function)."""
    out = dict(meta or {})
    out.update(extra or {})
    return out


def _space_extra(space: Space, t1w_uri: str, kind: str) -> dict:
    extra: dict = {"SkullStripped": True}
    if space.name == "T1w":
        extra["SpatialReference"] = t1w_uri
    else:
        extra["SpatialReference"] = f"https://templateflow.s3.amazonaws.com/tpl-{space.name}/tpl-{space.name}_res-" \
                                    f"{space.res:02d}_T1w.nii.gz"
        extra["Resolution"] = {str(space.res): f"TemplateFlow res-{space.res:02d} of {space.name} "
                                               f"({'1 mm' if space.res == 1 else '2 mm'} isotropic)"}
    extra["Interpolation"] = "linear" if kind == "chi" else "NearestNeighbor"
    if kind == "mask":
        extra["Type"] = "Brain"
    return extra


def init_anat_wf(run: "QsmRun", config: "QsmprepConfig", anat: AnatInputs, reference: str,
                 name: str = "anat_wf") -> pe.Workflow:
    """Registration, resampling and region statistics of one series with a T1w (``anat``); ``reference``
    is the echo-1 image (the GRE grid). Inputs (``inputnode``): ``chi`` (referenced Chimap), ``mask``
    (final brain mask), ``gre_mask`` (masking-step mask), ``chi_meta`` (the Chimap's sidecar)."""
    if anat.t1w is None:
        raise ValueError(f"{run.prefix()}: no T1w ({anat.t1w_reason})")
    nthreads = max(1, int(config.omp_nthreads or config.nprocs or 1))
    spaces = parse_spaces(config.output_spaces)
    atlases = [parse_atlas(a) for a in config.atlas]
    # one T1w -> template registration per template name (grid: the first resolution asked for)
    tpl_res = registration_templates(spaces, atlases)

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=ANAT_INPUTS), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["xfm", "gre_in_t1w", "t1w_in_template", "seconds"]),
                         name="outputnode")
    gre_t1w = pe.Node(RegisterGreToT1w(magnitude_files=[str(p) for p in run.magnitude_files], t1w=str(anat.t1w),
                                       t1w_reason=anat.t1w_reason, num_threads=nthreads), name="gre_to_t1w", n_procs=nthreads, mem_gb=2.0)
    wf.connect([(gre_t1w, outputnode, [("xfm", "xfm"), ("gre_in_t1w", "gre_in_t1w")])])
    out_dir = config.output_dir
    t1w_uri = bids_uri(anat.t1w, config.bids_dir) if config.bids_dir else str(anat.t1w)

    def sink_xfm(node, field, meta_field, key, **fill):
        if out_dir is None:
            return
        spec = output(key)
        s = pe.Node(TransformSink(out_file=str(spec.path(out_dir, run, **fill).absolute())),
                    name=f"ds_{key}" + (f"_{fill.get('template', '')}" if fill else ""), run_without_submitting=True)
        wf.connect([(node, s, [(field, "in_file"), (meta_field, "metadata")])])

    sink_xfm(gre_t1w, "xfm", "metadata", "xfm_gre_t1w")

    regs: dict[str, pe.Node] = {}
    if tpl_res:
        brain = pe.Node(T1wBrain(t1w=str(anat.t1w)), name="t1w_brain", mem_gb=1.0)
        if anat.t1w_mask is not None:
            brain.inputs.t1w_mask = str(anat.t1w_mask)
        else:
            wf.connect([(inputnode, brain, [("gre_mask", "gre_mask")]), (gre_t1w, brain, [("xfm", "xfm")])])
        for template, res in tpl_res.items():
            files = template_files(Space(template, res))
            node = pe.Node(RegisterT1wToTemplate(template=template, template_t1w=str(files["T1w"]),
                                                 template_mask=str(files["mask"]), num_threads=nthreads),
                           name=f"t1w_to_{template}", n_procs=nthreads, mem_gb=4.0)
            given = anat.xfms.get(template)
            if given is not None:
                node.inputs.given_forward = str(given[0])
                if given[1] is not None:
                    node.inputs.given_inverse = str(given[1])
                LOGGER.info("%s: using the given T1w -> %s transform %s", run.prefix(), template, given[0])
            wf.connect(brain, "brain", node, "t1w_brain")
            regs[template] = node
            sink_xfm(node, "forward", "metadata", "xfm_t1w_template", template=template)
            sink_xfm(node, "inverse", "inverse_metadata", "xfm_template_t1w", template=template)
        first = next(iter(regs.values()))
        wf.connect(first, "t1w_in_template", outputnode, "t1w_in_template")

    # --- chi and mask into each output space
    for space in spaces:
        tag = space.entities.replace("space-", "").replace("_res-", "res")
        if space.name == "T1w":
            ref_img = str(anat.t1w)
            xfms = pe.Node(niu.Merge(1), name=f"xfms_{tag}", run_without_submitting=True)
            wf.connect(gre_t1w, "xfm", xfms, "in1")
        else:
            ref_img = str(template_files(space)["T1w"])
            xfms = pe.Node(niu.Merge(2), name=f"xfms_{tag}", run_without_submitting=True)
            wf.connect([(regs[space.name], xfms, [("forward", "in1")]), (gre_t1w, xfms, [("xfm", "in2")])])
        for kind, interp, key in (("chi", "linear", "chimap_space"), ("mask", "genericLabel", "brain_mask_space")):
            res = pe.Node(ApplyTransforms(reference=ref_img, interpolation=interp, out_name=f"{kind}_{tag}.nii.gz",
                                          num_threads=nthreads), name=f"{kind}_to_{tag}", mem_gb=1.5)
            wf.connect([(inputnode, res, [(kind, "in_file")]), (xfms, res, [("out", "transforms")])])
            if out_dir is None:
                continue
            spec = output(key)
            meta = pe.Node(niu.Function(input_names=["meta", "extra"], output_names=["out"],
                                        function=space_metadata), name=f"meta_{kind}_{tag}")
            meta.inputs.extra = _space_extra(space, t1w_uri, kind)
            if kind == "chi":
                wf.connect(inputnode, "chi_meta", meta, "meta")
            else:
                meta.inputs.meta = {"Sources": [bids_uri(output("brain_mask").path(out_dir, run), out_dir,
                                                         dataset="")]}
            ds = pe.Node(DerivativesDataSink(out_file=str(spec.path(out_dir, run, space=space.entities).absolute()),
                                             data_dtype=spec.dtype), name=f"ds_{key}_{tag}",
                         run_without_submitting=True)
            wf.connect([(res, ds, [("out_file", "in_file")]), (meta, ds, [("out", "metadata")])])

    # --- region statistics: subject segmentations (T1w space) and template atlases, on the GRE grid
    tables = []
    for seg_name, (path, names, provenance) in sorted(anat.segmentations.items()):
        tables.append((seg_name, str(path), {int(k): str(v) for k, v in names.items()}, None, None, provenance))
    for template, atlas, desc, res in atlases:
        img, tsv = atlas_files(template, res, atlas, desc)
        tables.append((atlas + (desc or ""), str(img), {}, str(tsv) if tsv else None, template,
                       f"TemplateFlow {img.name}" + (f" (names: {tsv.name})" if tsv else " (no label table: names n/a)")))
    for seg_name, path, names, tsv, template, provenance in tables:
        lab = pe.Node(LabelImage(in_file=path, label_names=names), name=f"labels_{seg_name}")
        if tsv:
            lab.inputs.label_tsv = tsv
        to_gre = pe.Node(ApplyTransforms(reference=reference, interpolation="genericLabel",
                                         out_name=f"{seg_name}_gre.nii.gz", num_threads=nthreads),
                         name=f"{seg_name}_to_gre", mem_gb=1.5)
        if template is None:
            xfms = pe.Node(niu.Merge(1), name=f"xfms_{seg_name}", run_without_submitting=True)
            wf.connect(gre_t1w, "xfm", xfms, "in1")
            to_gre.inputs.invert = [True]
            chain = ["from-GRE_to-T1w (inverted)"]
        else:
            xfms = pe.Node(niu.Merge(2), name=f"xfms_{seg_name}", run_without_submitting=True)
            wf.connect([(gre_t1w, xfms, [("xfm", "in1")]), (regs[template], xfms, [("inverse", "in2")])])
            to_gre.inputs.invert = [True, False]
            chain = ["from-GRE_to-T1w (inverted)", f"from-{template}_to-T1w"]
        roi = pe.Node(ROIStats(reference=reference, erode_voxels=int(config.roi_erode_voxels)),
                      name=f"roi_{seg_name}", mem_gb=1.0)
        wf.connect([(lab, to_gre, [("out_file", "in_file")]), (xfms, to_gre, [("out", "transforms")]),
                    (to_gre, roi, [("out_file", "segmentation")]), (lab, roi, [("label_tsv", "label_tsv")]),
                    (inputnode, roi, [("chi", "chi"), ("mask", "mask")])])
        if out_dir is not None:
            spec = output("roi_stats_seg")
            ds = pe.Node(TransformSink(out_file=str(spec.path(out_dir, run, seg=seg_name).absolute())),
                         name=f"ds_roi_{seg_name}", run_without_submitting=True)
            ds.inputs.metadata = {
                "Segmentation": provenance, "SegmentationFile": path, "Space": template or "T1w",
                "Transforms": chain, "Interpolation": "genericLabel (ANTs)", "Grid": "GRE (echo-1 image)",
                "ErodeVoxels": int(config.roi_erode_voxels), "Units": "ppm",
                "Description": "susceptibility statistics of the referenced Chimap per region, inside its brain mask",
            }
            wf.connect(roi, "out_file", ds, "in_file")
    return wf
