"""Anatomical and template-space nodes: rigid GRE -> T1w, T1w brain, SyN T1w -> template, applying
transforms, label images (aseg.mgz, atlases) and their label tables. The registration itself is in
:mod:`qsmprep.anat.registration` (ANTsPy); these are thin wrappers that read and write files.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)
from scipy import ndimage as ndi

from qsmprep.utils.derivatives import atomic_write_json, jsonable

__all__ = [
    "RegisterGreToT1w",
    "T1wBrain",
    "RegisterT1wToTemplate",
    "ApplyTransforms",
    "LabelImage",
    "TransformSink",
    "echo_combined_magnitude",
]

LOGGER = logging.getLogger("qsmprep")


def echo_combined_magnitude(files) -> nib.Nifti1Image:
    """Root-sum-of-squares over echoes of the magnitude images (first echo's grid)."""
    imgs = [nib.load(str(f)) for f in files]
    acc = np.zeros(imgs[0].shape[:3], np.float64)
    for img in imgs:
        d = np.asarray(img.get_fdata(dtype=np.float32))
        d = d.reshape(d.shape[:3] + (-1,))
        acc += (d.astype(np.float64) ** 2).sum(axis=-1)
    return nib.Nifti1Image(np.sqrt(acc).astype(np.float32), imgs[0].affine)


def _save(img: nib.Nifti1Image, name: str, dtype="float32") -> str:
    arr = np.asarray(img.dataobj).astype(dtype)
    out = nib.Nifti1Image(arr, img.affine)
    out.set_qform(img.affine, 1)
    out.set_sform(img.affine, 1)
    path = os.path.abspath(name)
    nib.save(out, path)
    return path


class _GreT1wInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(File(exists=True), mandatory=True, desc="magnitude images (echoes)")
    t1w = File(exists=True, mandatory=True, desc="T1w image (fixed)")
    t1w_reason = Str("", usedefault=True, desc="why this T1w (recorded in the sidecar)")
    num_threads = traits.Int(1, usedefault=True)


class _GreT1wOutputSpec(TraitedSpec):
    xfm = File(exists=True, desc="GRE -> T1w rigid transform (ITK text)")
    gre_ref = File(exists=True, desc="echo-combined magnitude (the moving image)")
    gre_in_t1w = File(exists=True, desc="echo-combined magnitude resampled on the T1w grid (report)")
    metadata = traits.Dict(desc="sidecar of the transform")
    seconds = traits.Float()


class RegisterGreToT1w(SimpleInterface):
    """Rigid registration of the echo-combined GRE magnitude (root-sum-of-squares) to the T1w (Mattes MI)."""

    input_spec = _GreT1wInputSpec
    output_spec = _GreT1wOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.anat import registration as reg

        gre = echo_combined_magnitude(self.inputs.magnitude_files)
        gre_path = _save(gre, "gre_ref.nii.gz")
        t1w = nib.load(self.inputs.t1w)
        r = reg.rigid(t1w, gre, os.path.abspath("from-GRE_to-T1w_mode-image_xfm.txt"),
                      num_threads=self.inputs.num_threads)
        moved = reg.apply(gre, t1w, r.forward, interpolation="linear")
        self._results["gre_in_t1w"] = _save(moved, "gre_in_t1w.nii.gz")
        self._results["xfm"] = r.forward[0]
        self._results["gre_ref"] = gre_path
        self._results["seconds"] = r.seconds
        self._results["metadata"] = jsonable({
            "Description": "Rigid transform from the GRE grid (echo-combined magnitude, root-sum-of-squares) "
                           "to the T1w; ITK/ANTs text format, maps points of the T1w to the GRE (image mode: "
                           "resamples a GRE-space image onto the T1w with antsApplyTransforms)",
            "FromSpace": "GRE", "ToSpace": "T1w", "Mode": "image", "Registration": r.params,
            "AnatomicalReference": self.inputs.t1w_reason or str(self.inputs.t1w),
            "Sources": [str(self.inputs.t1w)] + [str(f) for f in self.inputs.magnitude_files],
            "WallTimeSeconds": round(r.seconds, 2)})
        return runtime


class _T1wBrainInputSpec(BaseInterfaceInputSpec):
    t1w = File(exists=True, mandatory=True)
    t1w_mask = File(exists=True, desc="T1w brain mask (sMRIPrep's desc-brain_mask); else from the GRE mask")
    gre_mask = File(exists=True, desc="GRE brain mask (before erosion) to carry onto the T1w")
    xfm = File(exists=True, desc="GRE -> T1w transform")
    dilate_mm = traits.Float(4.0, usedefault=True)


class _T1wBrainOutputSpec(TraitedSpec):
    brain = File(exists=True)
    mask = File(exists=True)


class T1wBrain(SimpleInterface):
    """Skull-stripped T1w: with sMRIPrep's brain mask, or the GRE brain mask resampled onto the T1w
    (nearest), dilated by ``dilate_mm`` and hole-filled (the GRE mask excludes a thin rim of brain)."""

    input_spec = _T1wBrainInputSpec
    output_spec = _T1wBrainOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.anat import registration as reg

        t1w = nib.load(self.inputs.t1w)
        if isdefined(self.inputs.t1w_mask):
            m = nib.load(self.inputs.t1w_mask)
            if m.shape[:3] != t1w.shape[:3]:
                m = reg.apply(m, t1w, [], interpolation="nearestNeighbor")
            mask = np.asarray(m.dataobj).reshape(t1w.shape[:3]) > 0
        else:
            if not (isdefined(self.inputs.gre_mask) and isdefined(self.inputs.xfm)):
                raise ValueError("T1wBrain needs t1w_mask, or gre_mask and xfm")
            m = reg.apply(nib.load(self.inputs.gre_mask), t1w, [self.inputs.xfm], interpolation="genericLabel")
            mask = np.asarray(m.dataobj) > 0
            vs = np.sqrt((t1w.affine[:3, :3] ** 2).sum(axis=0))
            it = max(1, int(round(self.inputs.dilate_mm / float(vs.min()))))
            mask = ndi.binary_fill_holes(ndi.binary_dilation(mask, iterations=it))
        data = np.asarray(t1w.get_fdata(dtype=np.float32)).reshape(t1w.shape[:3])
        self._results["brain"] = _save(nib.Nifti1Image(data * mask, t1w.affine), "t1w_brain.nii.gz")
        self._results["mask"] = _save(nib.Nifti1Image(mask.astype(np.uint8), t1w.affine), "t1w_mask.nii.gz",
                                      "uint8")
        return runtime


class _TplInputSpec(BaseInterfaceInputSpec):
    t1w_brain = File(exists=True, mandatory=True)
    template = Str(mandatory=True, desc="TemplateFlow identifier")
    template_t1w = File(exists=True, mandatory=True)
    template_mask = File(exists=True, mandatory=True)
    given_forward = File(exists=True, desc="T1w -> template transform given (sMRIPrep): not recomputed")
    given_inverse = File(exists=True)
    num_threads = traits.Int(1, usedefault=True)


class _TplOutputSpec(TraitedSpec):
    forward = File(exists=True, desc="T1w -> template composite transform (.h5)")
    inverse = File(exists=True, desc="template -> T1w composite transform (.h5)")
    t1w_in_template = File(exists=True, desc="T1w brain resampled on the template grid (report)")
    metadata = traits.Dict()
    inverse_metadata = traits.Dict()
    seconds = traits.Float()
    computed = traits.Bool()


class RegisterT1wToTemplate(SimpleInterface):
    """Affine + SyN registration of the skull-stripped T1w to the template brain (template brain mask),
    unless a transform is given (sMRIPrep/fMRIPrep), which is used as is."""

    input_spec = _TplInputSpec
    output_spec = _TplOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.anat import registration as reg

        i = self.inputs
        tpl = nib.load(i.template_t1w)
        tmask = nib.load(i.template_mask)
        brain = nib.Nifti1Image(np.asarray(tpl.get_fdata(dtype=np.float32)) * (np.asarray(tmask.dataobj) > 0),
                                tpl.affine)
        fwd = os.path.abspath(f"from-T1w_to-{i.template}_mode-image_xfm.h5")
        inv = os.path.abspath(f"from-{i.template}_to-T1w_mode-image_xfm.h5")
        base = {"Mode": "image", "Sources": [str(i.t1w_brain), str(i.template_t1w)]}
        if isdefined(i.given_forward):
            shutil.copyfile(i.given_forward, fwd)
            computed, params, seconds = False, {"GivenBy": str(i.given_forward)}, 0.0
            if isdefined(i.given_inverse):
                shutil.copyfile(i.given_inverse, inv)
            else:
                raise ValueError(f"{i.given_forward}: the inverse transform (from-{i.template}_to-T1w) is missing")
        else:
            r = reg.syn(brain, nib.load(i.t1w_brain), fwd, inv, fixed_mask=tmask, num_threads=i.num_threads)
            computed, params, seconds = True, r.params, r.seconds
        moved = reg.apply(nib.load(i.t1w_brain), tpl, [fwd], interpolation="linear")
        self._results.update(
            forward=fwd, inverse=inv, seconds=seconds, computed=computed,
            t1w_in_template=_save(moved, "t1w_in_template.nii.gz"),
            metadata=jsonable(dict(base, FromSpace="T1w", ToSpace=i.template, Registration=params,
                                   Description="Composite ANTs/ITK transform (affine + SyN warp) from the T1w "
                                               f"to {i.template} (TemplateFlow)", WallTimeSeconds=round(seconds, 2))),
            inverse_metadata=jsonable(dict(base, FromSpace=i.template, ToSpace="T1w", Registration=params,
                                           Description=f"Inverse of from-T1w_to-{i.template}")),
        )
        return runtime


class _ApplyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    reference = File(exists=True, mandatory=True, desc="grid of the output")
    transforms = InputMultiObject(File(exists=True), desc="ANTs order: the last is applied first")
    invert = traits.List(traits.Bool, desc="invert each (linear) transform")
    interpolation = traits.Enum("linear", "genericLabel", "nearestNeighbor", "bSpline", usedefault=True)
    out_name = Str("resampled.nii.gz", usedefault=True)
    num_threads = traits.Int(1, usedefault=True)


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class ApplyTransforms(SimpleInterface):
    """Resample an image through ANTs transforms (labels: ``genericLabel``; chi: ``linear``)."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.anat import registration as reg

        i = self.inputs
        tl = list(i.transforms) if isdefined(i.transforms) else []
        inv = list(i.invert) if isdefined(i.invert) and i.invert else None
        img = reg.apply(nib.load(i.in_file), nib.load(i.reference), tl, invert=inv, interpolation=i.interpolation,
                        num_threads=i.num_threads)
        label = i.interpolation in ("genericLabel", "nearestNeighbor")
        self._results["out_file"] = _save(img, i.out_name, "int32" if label else "float32")
        return runtime


class _LabelInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="label image (NIfTI or FreeSurfer .mgz)")
    label_names = traits.Dict(traits.Int, Str, desc="{index: name}")
    label_tsv = File(exists=True, desc="BIDS dseg.tsv (index, name) instead of label_names")


class _LabelOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="label image (NIfTI, int32)")
    label_tsv = File(exists=True, desc="index/name table of the labels present")


class LabelImage(SimpleInterface):
    """A label image as NIfTI int32 (reads .mgz) and its ``index``/``name`` table (labels present only)."""

    input_spec = _LabelInputSpec
    output_spec = _LabelOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.interfaces.reports import read_label_table

        img = nib.load(self.inputs.in_file)
        data = np.rint(np.asarray(img.dataobj, dtype=np.float64)).astype(np.int32).reshape(img.shape[:3])
        names = dict(self.inputs.label_names) if isdefined(self.inputs.label_names) else {}
        if isdefined(self.inputs.label_tsv):
            names.update(read_label_table(self.inputs.label_tsv))
        self._results["out_file"] = _save(nib.Nifti1Image(data, img.affine), "labels.nii.gz", "int32")
        present = [int(v) for v in np.unique(data) if v > 0]
        lines = ["index\tname"] + [f"{k}\t{names.get(k, 'n/a')}" for k in present]
        path = os.path.abspath("labels.tsv")
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._results["label_tsv"] = path
        return runtime


class _TransformSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    out_file = Str(mandatory=True, desc="absolute output path")
    metadata = traits.Dict(usedefault=True, desc="JSON sidecar content")


class _TransformSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_meta = File(exists=True)


class TransformSink(SimpleInterface):
    """Copy a transform (binary .h5 or text .txt) into the output dataset with a JSON sidecar, atomically."""

    input_spec = _TransformSinkInputSpec
    output_spec = _TransformSinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        out = Path(self.inputs.out_file)
        if not out.is_absolute():
            raise ValueError(f"out_file must be an absolute path, got {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(self.inputs.in_file, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        meta = out.with_name(out.name.rsplit(".", 1)[0] + ".json")
        atomic_write_json(meta, dict(self.inputs.metadata))
        self._results.update(out_file=str(out), out_meta=str(meta))
        return runtime
