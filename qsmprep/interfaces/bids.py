"""Interfaces that write the derivative dataset: :class:`DerivativesDataSink` and :class:`QsmSidecars`.

qsmprep does not use niworkflows' ``DerivativesDataSink``: its path patterns have no ``Chimap``,
``R2starmap`` or ``_fieldmap`` in ``anat``. The output name is decided when the workflow is built
(from the output spec, :mod:`qsmprep.outputs`), so this sink only
casts, checks the grid against a reference image, and writes image + sidecar atomically.
"""

from __future__ import annotations

from pathlib import Path

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

from qsmprep.utils.derivatives import atomic_save_nifti, atomic_write_json, build_sidecars, jsonable

__all__ = ["DerivativesDataSink", "QsmSidecars"]


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to write")
    out_file = Str(mandatory=True, desc="absolute output path (.nii.gz or .nii)")
    data_dtype = traits.Enum("float32", "uint8", "int16", usedefault=True, desc="on-disk data type")
    reference = File(exists=True, desc="image whose 3D shape and affine the output must have")
    meta_dict = traits.Dict(usedefault=True, desc="static sidecar metadata")
    metadata = traits.Dict(usedefault=True, desc="sidecar metadata from upstream nodes (wins over meta_dict)")
    write_json = traits.Bool(True, usedefault=True, desc="write a JSON sidecar next to the image")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="written image")
    out_meta = File(desc="written JSON sidecar")


class DerivativesDataSink(SimpleInterface):
    """Write one derivative image (and its JSON sidecar) atomically into the output dataset.

    The image keeps the affine and qform/sform codes of ``in_file``; data are cast to
    ``data_dtype`` (masks: uint8 0/1) without scaling. With ``reference`` the 3D shape and affine
    must match it (the echo-1 magnitude), else the sink fails rather than write a misaligned map.
    It always runs (also when cached), so deleted outputs are rewritten on a resumed run.
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        import nibabel as nib

        out = Path(self.inputs.out_file)
        if not out.is_absolute():
            raise ValueError(f"out_file must be an absolute path, got {out}")
        if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
            raise ValueError(f"out_file must end in .nii.gz or .nii, got {out.name}")
        img = nib.load(self.inputs.in_file)
        dtype = np.dtype(self.inputs.data_dtype)
        data = np.asanyarray(img.dataobj)
        if dtype == np.uint8:
            data = (data != 0).astype(np.uint8)
        else:
            data = np.asarray(img.get_fdata(dtype=np.float32)).astype(dtype, copy=False)
        if isdefined(self.inputs.reference):
            ref = nib.load(self.inputs.reference)
            if tuple(data.shape[:3]) != tuple(ref.shape[:3]):
                raise ValueError(f"{out.name}: shape {data.shape[:3]} differs from the reference {ref.shape[:3]}")
            if not np.allclose(img.affine, ref.affine, atol=1e-4, rtol=0):
                raise ValueError(f"{out.name}: affine differs from the reference image's")
        hdr = img.header.copy()
        new = nib.Nifti1Image(data, img.affine, hdr)
        new.set_data_dtype(dtype)
        sc, qc = int(img.header["sform_code"]), int(img.header["qform_code"])
        new.set_sform(img.get_sform(), code=sc)
        new.set_qform(img.get_qform(), code=qc)
        new.header.set_slope_inter(None, None)
        atomic_save_nifti(new, out)
        self._results["out_file"] = str(out)
        if self.inputs.write_json:
            meta = dict(self.inputs.meta_dict)
            meta.update(dict(self.inputs.metadata))
            stem = out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.name[: -len(".nii")]
            sidecar = out.with_name(stem + ".json")
            atomic_write_json(sidecar, jsonable(meta))
            self._results["out_meta"] = str(sidecar)
        return runtime


class _QsmSidecarsInputSpec(BaseInterfaceInputSpec):
    sources = traits.List(Str, usedefault=True, desc="BIDS URIs of the raw images")
    load = traits.Dict(mandatory=True)
    offset = traits.Dict(usedefault=True)
    mask = traits.Dict(mandatory=True)
    unwrap = traits.Dict(mandatory=True)
    b0 = traits.Dict(mandatory=True)
    bgremove = traits.Dict(mandatory=True)
    inversion = traits.Dict(mandatory=True)
    reference = traits.Dict(mandatory=True)
    r2star = traits.Dict(usedefault=True)
    swi = traits.Dict(usedefault=True)


class _QsmSidecarsOutputSpec(TraitedSpec):
    chimap = traits.Dict()
    brain_mask = traits.Dict()
    total_fieldmap = traits.Dict()
    local_fieldmap = traits.Dict()
    r2starmap = traits.Dict()
    t2starmap = traits.Dict()
    reference_mask = traits.Dict()
    swi = traits.Dict()
    minip = traits.Dict()


class QsmSidecars(SimpleInterface):
    """Sidecar metadata of one run's outputs from the ``params`` of every step
    (:func:`qsmprep.utils.derivatives.build_sidecars`)."""

    input_spec = _QsmSidecarsInputSpec
    output_spec = _QsmSidecarsOutputSpec

    def _run_interface(self, runtime):
        i = self.inputs
        cars = build_sidecars(
            sources=list(i.sources),
            load=i.load,
            offset=i.offset or None,
            mask=i.mask,
            unwrap=i.unwrap,
            b0=i.b0,
            bgremove=i.bgremove,
            inversion=i.inversion,
            reference=i.reference,
            r2star=i.r2star or None,
            swi=i.swi or None,
        )
        self._results.update(cars)
        return runtime
