"""Thin Nipype interfaces around :mod:`qsmprep.qsm`: load NIfTI, call one core function, save.

Every interface

- reads its inputs (float32; masks as bool), calls one function of the physics library (looked up in
  the method catalogue :mod:`qsmprep.methods` by method name, so new methods need no new interface), and
- writes its outputs with the affine/header of the input (float32, masks uint8; uncompressed
  ``.nii`` in the node directory), and
- returns ``params``: a JSON-friendly dict with the method and every parameter it ran with
  (defaults included), for the provenance sidecars.

Inputs ``method_params`` pass extra keyword arguments to the method; ``num_threads`` caps the
numba/FFT threads (set the node's ``n_procs`` to the same number).
"""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from qsmprep.__about__ import __version__
from qsmprep.interfaces._nifti import load_float, load_mask, save_like, set_threads
from qsmprep.methods import STAGES
from qsmprep.utils.derivatives import jsonable

__all__ = [
    "LoadEchoes",
    "Mask",
    "PhaseOffsetCorrection",
    "Unwrap",
    "FitB0",
    "BackgroundRemoval",
    "DipoleInversion",
    "R2Star",
    "Reference",
    "SWI",
]


def _out(name: str) -> str:
    return os.path.abspath(name)


def _opt(inputs, name, default=None):
    value = getattr(inputs, name)
    return value if isdefined(value) else default


class _ThreadsInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(0, usedefault=True, nohash=True, desc="numba/FFT threads (0: all cores)")
    qsmprep_version = traits.Str(
        __version__, usedefault=True, desc="part of the cache key: a new qsmprep version recomputes the node"
    )


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


class _LoadEchoesInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(File(exists=True), desc="magnitude image per echo (echo order)")
    phase_files = InputMultiObject(File(exists=True), desc="phase image per echo (echo order)")
    real_files = InputMultiObject(File(exists=True), desc="real image per echo (instead of mag/phase)")
    imag_files = InputMultiObject(File(exists=True), desc="imaginary image per echo")
    echo_times = traits.List(traits.Float, mandatory=True, minlen=1, desc="echo times (s), one per echo")
    field_strength = traits.Float(mandatory=True, desc="B0 field strength (T)")
    phase_units = traits.Either(None, traits.Str, default=None, usedefault=True, desc="sidecar Units of phase")
    b0_dir = traits.Either(
        None, traits.List(traits.Float, minlen=3, maxlen=3), default=None, usedefault=True,
        desc="B0 direction in the voxel frame (default: from the affine of the echo-1 image)",
    )


class _LoadEchoesOutputSpec(TraitedSpec):
    magnitude = File(desc="4D float32 magnitude (x, y, z, echo); undefined without magnitude images")
    phase = File(exists=True, desc="4D float32 wrapped phase (rad, [-pi, pi)) on the echo-1 grid")
    echo_times = traits.List(traits.Float, desc="echo times (s), increasing")
    b0_dir = traits.List(traits.Float, desc="unit B0 direction in the voxel frame")
    voxel_size = traits.List(traits.Float, desc="voxel size (mm)")
    field_strength = traits.Float(desc="B0 field strength (T)")
    n_echoes = traits.Int()
    params = traits.Dict(desc="provenance")


def _load_series(paths) -> tuple[list[np.ndarray], list]:
    """3D volumes (float32) and their images from files that hold one echo each (or a 4D series)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = list(paths)
    # decompression releases the GIL: read the files of a series in two threads
    with ThreadPoolExecutor(max(1, min(2, len(paths)))) as pool:
        loaded = list(pool.map(load_float, paths))
    vols, imgs = [], []
    for p, (data, img) in zip(paths, loaded):
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim == 3:
            vols.append(data)
            imgs.append(img)
        elif data.ndim == 4:
            for e in range(data.shape[3]):
                vols.append(data[..., e])
                imgs.append(img)
        else:
            raise ValueError(f"{p}: expected a 3D (or 4D echo series) image, got shape {data.shape}")
    return vols, imgs


def _stack4(vols) -> np.ndarray:
    """3D volumes stacked along a last axis, as a float32 Fortran-ordered 4D array (NIfTI's layout:
    every volume is contiguous, the stack is written to disk in one copy)."""
    out = np.empty(tuple(vols[0].shape) + (len(vols),), np.float32, order="F")
    for e, v in enumerate(vols):
        out[..., e] = v
    return out


def _same_grid(img, ref, shape) -> bool:
    return tuple(shape) == tuple(ref.shape[:3]) and np.allclose(img.affine, ref.affine, atol=1e-3, rtol=0)


def _to_grid(vol: np.ndarray, img, ref, order: int = 1) -> np.ndarray:
    """``vol`` (on ``img``'s grid) resampled onto the 3D grid of ``ref`` (linear interpolation)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    src = nib.Nifti1Image(np.asarray(vol, np.float32), img.affine)
    out = resample_from_to(src, (tuple(ref.shape[:3]), ref.affine), order=order, mode="constant", cval=0.0)
    return np.asarray(out.get_fdata(dtype=np.float32))


class LoadEchoes(SimpleInterface):
    """Magnitude + phase (rad) 4D float32 volumes on the echo-1 grid, with TE, B0 direction, voxel size.

    Inputs are per-echo magnitude/phase (phase scaled to radians with
    :func:`qsmprep.qsm.phase.scale_phase_to_rad` over all echoes together, honouring the sidecar
    ``Units``) or real/imaginary pairs (:func:`qsmprep.qsm.phase.mag_phase_from_real_imag`). The grid
    is that of the echo-1 magnitude (phase or real image when there is no magnitude); images on
    another grid are resampled to it (complex-valued for phase). Echoes are sorted by echo time.
    """

    input_spec = _LoadEchoesInputSpec
    output_spec = _LoadEchoesOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.qsm.geometry import b0_direction_from_affine, obliquity_deg, voxel_size_from_affine
        from qsmprep.qsm.phase import detect_phase_units, mag_phase_from_real_imag, scale_phase_to_rad, wrap_to_pi

        inp = self.inputs
        mag_files = list(_opt(inp, "magnitude_files", []) or [])
        phase_files = list(_opt(inp, "phase_files", []) or [])
        real_files = list(_opt(inp, "real_files", []) or [])
        imag_files = list(_opt(inp, "imag_files", []) or [])
        te = np.asarray(inp.echo_times, dtype=np.float64)
        n_e = te.size
        complex_input = not phase_files
        if complex_input and not (real_files and imag_files):
            raise ValueError("LoadEchoes needs phase_files (with magnitude_files) or real_files and imag_files")

        mags, mag_imgs = _load_series(mag_files) if mag_files else ([], [])
        if complex_input:
            re, re_imgs = _load_series(real_files)
            im, im_imgs = _load_series(imag_files)
            if len(re) != len(im):
                raise ValueError(f"{len(re)} real but {len(im)} imaginary volumes")
            first_imgs = re_imgs
        else:
            ph, ph_imgs = _load_series(phase_files)
            first_imgs = ph_imgs
        ref = mag_imgs[0] if mag_imgs else first_imgs[0]
        shape3 = tuple(int(n) for n in ref.shape[:3])
        n_vol = len(re) if complex_input else len(ph)
        if n_vol != n_e:
            raise ValueError(f"{n_vol} phase (or real/imaginary) volumes but {n_e} echo times")
        if mags and len(mags) != n_e:
            raise ValueError(f"{len(mags)} magnitude volumes but {n_e} echo times")

        resampled = []
        # complex data per echo on the reference grid
        for e in range(n_e):
            if complex_input:
                r, i, ri, ii = re[e], im[e], re_imgs[e], im_imgs[e]
                if r.shape != i.shape or not _same_grid(ii, ri, i.shape):
                    raise ValueError(f"echo {e + 1}: the real and imaginary images are on different grids")
                if not _same_grid(ri, ref, r.shape):
                    re[e], im[e] = _to_grid(r, ri, ref), _to_grid(i, ii, ref)
                    resampled.append(f"echo-{e + 1} real/imag")
            else:
                p, pi_ = ph[e], ph_imgs[e]
                if not _same_grid(pi_, ref, p.shape):
                    resampled.append(f"echo-{e + 1} phase")
            if mags and not _same_grid(mag_imgs[e], ref, mags[e].shape):
                mags[e] = _to_grid(mags[e], mag_imgs[e], ref)
                resampled.append(f"echo-{e + 1} magnitude")

        units_detected = None
        if complex_input:
            mag_c, phase = mag_phase_from_real_imag(np.stack(re, axis=-1), np.stack(im, axis=-1))
            del re, im
            if not mags:
                mags = [mag_c[..., e] for e in range(n_e)]
        else:
            units = inp.phase_units if inp.phase_units else None
            stack = _stack4(ph) if all(_same_grid(i, ref, p.shape) for i, p in zip(ph_imgs, ph)) else None
            if stack is None:  # phase on another grid: scale on the native grid, resample complex
                scaled = [scale_phase_to_rad(p, units) for p in ph]
                units_detected = detect_phase_units(ph[0], units)
                out = []
                for e, (p, img) in enumerate(zip(scaled, ph_imgs)):
                    if _same_grid(img, ref, p.shape):
                        out.append(p)
                    else:  # interpolate the unit phasor, not the wrapped angle
                        c, s = _to_grid(np.cos(p), img, ref), _to_grid(np.sin(p), img, ref)
                        out.append(wrap_to_pi(np.arctan2(s, c)))
                phase = np.stack(out, axis=-1)
            else:
                units_detected = detect_phase_units(stack, units)
                phase = scale_phase_to_rad(stack, units)
            del ph
        if phase.shape[:3] != shape3:
            raise ValueError(f"phase grid {phase.shape[:3]} differs from the reference grid {shape3}")

        order = np.argsort(te, kind="stable")
        te = te[order]
        if np.any(order != np.arange(n_e)):
            phase = _stack4([phase[..., e] for e in order])
        phase = np.asfortranarray(phase, dtype=np.float32)
        magnitude = None
        if mags:
            magnitude = _stack4([mags[e] for e in order])
            if np.any(magnitude < 0):
                raise ValueError("magnitude images contain negative values")

        if inp.b0_dir is not None:
            b = np.asarray(inp.b0_dir, dtype=np.float64)
            norm = float(np.linalg.norm(b))
            if not np.isfinite(norm) or norm < 1e-6:
                raise ValueError(f"b0_dir {inp.b0_dir} is not a non-zero 3-vector")
            b0_dir, b0_source = b / norm, "sidecar B0_dir"
        else:
            b0_dir, b0_source = b0_direction_from_affine(ref.affine), "NIfTI affine"
        vs = voxel_size_from_affine(ref.affine)

        self._results["phase"] = save_like(phase, ref, _out("phase.nii"))
        if magnitude is not None:
            self._results["magnitude"] = save_like(magnitude, ref, _out("magnitude.nii"))
        self._results["echo_times"] = [float(t) for t in te]
        self._results["b0_dir"] = [float(v) for v in b0_dir]
        self._results["voxel_size"] = [float(v) for v in vs]
        self._results["field_strength"] = float(inp.field_strength)
        self._results["n_echoes"] = int(n_e)
        self._results["params"] = jsonable(
            {
                "InputType": "real/imaginary" if complex_input else "magnitude/phase",
                "PhaseUnits": inp.phase_units,
                "PhaseEncodingDetected": units_detected,
                "EchoTime": te,
                "MagneticFieldStrength": float(inp.field_strength),
                "B0Direction": b0_dir,
                "B0DirectionSource": b0_source,
                "ObliquityDeg": round(obliquity_deg(b0_dir), 3),
                "VoxelSize": vs,
                "Shape": list(shape3),
                "ResampledToEcho1Grid": resampled,
                "HasMagnitude": magnitude is not None,
            }
        )
        return runtime


# --------------------------------------------------------------------------------------------------
# masking, phase offsets, unwrapping, B0
# --------------------------------------------------------------------------------------------------


class _MaskInputSpec(_ThreadsInputSpec):
    phase = File(exists=True, mandatory=True, desc="4D phase (rad)")
    magnitude = File(exists=True, desc="4D magnitude")
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo times (s)")
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="voxel size (mm)")
    method = traits.Str(mandatory=True, desc="masking method (qsmprep.methods)")
    method_params = traits.Dict(usedefault=True, desc="keyword arguments of the method")
    brain_extraction = File(
        exists=True,
        desc="the method's brain extraction, computed beforehand (uint8; methods with a ``brain`` argument: bet-phase)",
    )


class _MaskOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="brain mask (uint8)")
    params = traits.Dict()


class Mask(SimpleInterface):
    """Brain mask with a :data:`~qsmprep.qsm.registry.MASKING` method (default: QSMxT phase quality)."""

    input_spec = _MaskInputSpec
    output_spec = _MaskOutputSpec

    def _run_interface(self, runtime):
        set_threads(self.inputs.num_threads)
        method = STAGES["masking"].method(self.inputs.method)
        phase, ref = load_float(self.inputs.phase)
        mag = load_float(self.inputs.magnitude)[0] if isdefined(self.inputs.magnitude) else None
        kw = dict(self.inputs.method_params)
        data = {}
        if isdefined(self.inputs.brain_extraction):
            if "brain" not in method.data_args:
                raise ValueError(f"the {method.name} masking method takes no precomputed brain extraction")
            data["brain"] = load_mask(self.inputs.brain_extraction)
        mask = method.function(
            phase_rad_4d=phase,
            magnitude_4d=mag,
            echo_times_s=self.inputs.echo_times,
            voxel_size_mm=self.inputs.voxel_size,
            **kw,
            **data,
        )
        if isinstance(mask, tuple):  # (filled, unfilled) variants: the filled mask is the brain mask
            mask = mask[0]
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            raise ValueError(f"the {method.name} brain mask is empty")
        self._results["mask_file"] = save_like(mask, ref, _out("mask.nii"), "uint8")
        self._results["params"] = {
            "Method": method.name,
            "Parameters": jsonable(method.resolve_params(kw, {"voxel_size_mm": self.inputs.voxel_size})),
            "MaskVoxels": int(mask.sum()),
        }
        return runtime


class _PhaseOffsetInputSpec(_ThreadsInputSpec):
    phase = File(exists=True, mandatory=True, desc="4D wrapped phase (rad)")
    magnitude = File(exists=True, desc="4D magnitude")
    echo_times = traits.List(traits.Float, mandatory=True)
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True)
    method = traits.Enum("mcpc3ds", "none", usedefault=True, desc="mcpc3ds, or none (no correction)")
    method_params = traits.Dict(usedefault=True)


class _PhaseOffsetOutputSpec(TraitedSpec):
    phase_corrected = File(exists=True, desc="4D phase without the echo-independent offset (rad)")
    offset = File(desc="estimated phase offset phi0 (rad); undefined when not corrected")
    params = traits.Dict()


class PhaseOffsetCorrection(SimpleInterface):
    """Remove the echo-independent phase offset with MCPC-3D-S (Eckstein et al., MRM 2018).

    With one echo (or ``method="none"``) the input phase is passed through unchanged.
    """

    input_spec = _PhaseOffsetInputSpec
    output_spec = _PhaseOffsetOutputSpec

    def _run_interface(self, runtime):
        set_threads(self.inputs.num_threads)
        te = list(self.inputs.echo_times)
        if self.inputs.method == "none" or len(te) < 2:
            self._results["phase_corrected"] = os.path.abspath(self.inputs.phase)
            reason = "single echo: the offset cannot be estimated" if len(te) < 2 else "disabled"
            self._results["params"] = {"Method": "none", "Reason": reason}
            return runtime
        phase, ref = load_float(self.inputs.phase)
        mag = load_float(self.inputs.magnitude)[0] if isdefined(self.inputs.magnitude) else None
        kw = dict(self.inputs.method_params)
        method = STAGES["offset"].method(self.inputs.method)
        corrected, offset = method.function(phase, mag, te, self.inputs.voxel_size, **kw)
        self._results["phase_corrected"] = save_like(corrected, ref, _out("phase_mcpc3ds.nii"))
        self._results["offset"] = save_like(offset, ref, _out("phase_offset.nii"))
        self._results["params"] = {
            "Method": method.name,
            "Parameters": jsonable(method.resolve_params(kw, {"voxel_size_mm": self.inputs.voxel_size})),
        }
        return runtime


class _UnwrapInputSpec(_ThreadsInputSpec):
    phase = File(exists=True, mandatory=True, desc="4D wrapped phase (rad)")
    magnitude = File(exists=True)
    mask = File(exists=True, desc="region to unwrap")
    echo_times = traits.List(traits.Float, mandatory=True)
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True)
    method = traits.Str(mandatory=True, desc="unwrapping method (qsmprep.methods)")
    method_params = traits.Dict(usedefault=True)


class _UnwrapOutputSpec(TraitedSpec):
    unwrapped = File(exists=True, desc="4D unwrapped phase (rad)")
    params = traits.Dict()


class Unwrap(SimpleInterface):
    """Phase unwrapping with an :data:`~qsmprep.qsm.registry.UNWRAP` method (default ROMEO)."""

    input_spec = _UnwrapInputSpec
    output_spec = _UnwrapOutputSpec

    def _run_interface(self, runtime):
        set_threads(self.inputs.num_threads)
        method = STAGES["unwrapping"].method(self.inputs.method)
        phase, ref = load_float(self.inputs.phase)
        mag = load_float(self.inputs.magnitude)[0] if isdefined(self.inputs.magnitude) else None
        mask = load_mask(self.inputs.mask) if isdefined(self.inputs.mask) else None
        kw = dict(self.inputs.method_params)
        out = method.function(phase, magnitude=mag, mask=mask, echo_times_s=self.inputs.echo_times,
                   voxel_size_mm=self.inputs.voxel_size, **kw)
        out = np.asarray(out, dtype=np.float32)
        if out.shape != phase.shape:
            out = out.reshape(phase.shape)
        self._results["unwrapped"] = save_like(out, ref, _out("phase_unwrapped.nii"))
        n_echoes = phase.shape[3] if phase.ndim == 4 else 1
        self._results["params"] = {
            "Method": method.name,
            "Parameters": jsonable(method.resolve_params(kw, {"voxel_size_mm": self.inputs.voxel_size,
                                                              "n_echoes": n_echoes})),
        }
        return runtime


class _FitB0InputSpec(_ThreadsInputSpec):
    unwrapped = File(exists=True, mandatory=True, desc="4D unwrapped, offset-free phase (rad)")
    magnitude = File(exists=True)
    mask = File(exists=True)
    echo_times = traits.List(traits.Float, mandatory=True)
    field_strength = traits.Float(mandatory=True, desc="B0 (T)")
    method_params = traits.Dict(usedefault=True, desc="keyword arguments of fit_b0_hz (weighting, fit_offset)")


class _FitB0OutputSpec(TraitedSpec):
    fieldmap_hz = File(exists=True, desc="B0 frequency offset (Hz)")
    total_field_ppm = File(exists=True, desc="total field dB/B0 (ppm)")
    params = traits.Dict()


class FitB0(SimpleInterface):
    """Weighted multi-echo B0 fit (ROMEO/MRT ``calculateB0_unwrapped``): Hz and ppm field maps."""

    input_spec = _FitB0InputSpec
    output_spec = _FitB0OutputSpec

    def _run_interface(self, runtime):
        from qsmprep.qsm.constants import GAMMA_BAR_HZ_PER_T, hz_to_ppm

        set_threads(self.inputs.num_threads)
        unwrapped, ref = load_float(self.inputs.unwrapped)
        mag = load_float(self.inputs.magnitude)[0] if isdefined(self.inputs.magnitude) else None
        mask = load_mask(self.inputs.mask) if isdefined(self.inputs.mask) else None
        b0 = float(self.inputs.field_strength)
        if not np.isfinite(b0) or b0 <= 0:
            raise ValueError(f"field_strength must be positive (tesla), got {b0}")
        method = STAGES["b0"].method("weighted")
        kw = dict(self.inputs.method_params)
        hz = method.function(unwrapped, self.inputs.echo_times, magnitude_4d=mag, mask=mask, **kw)
        self._results["fieldmap_hz"] = save_like(hz, ref, _out("fieldmap_hz.nii"))
        self._results["total_field_ppm"] = save_like(hz_to_ppm(hz, b0), ref, _out("total_field_ppm.nii"))
        resolved = method.resolve_params(kw)
        self._results["params"] = {
            "Method": ("weighted multi-echo line fit with a per-voxel phase offset (fit_b0_hz)"
                       if resolved.get("fit_offset", True) else "weighted echo average (fit_b0_hz)"),
            "Parameters": jsonable(resolved),
            "GyromagneticRatioHzPerT": GAMMA_BAR_HZ_PER_T,
            "MagneticFieldStrength": b0,
        }
        return runtime


# --------------------------------------------------------------------------------------------------
# background removal, inversion, referencing, R2*
# --------------------------------------------------------------------------------------------------


class _FieldInputSpec(_ThreadsInputSpec):
    mask = File(exists=True, mandatory=True)
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True)
    b0_dir = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True)
    method_params = traits.Dict(usedefault=True)
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, desc="device of learned methods")


def _method_kwargs(method, kw: dict, device: str) -> dict:
    """``kw`` plus the ``device`` of a learned method (:mod:`qsmprep.nn`)."""
    return {"device": device, **kw} if method.learned else kw


def _model_record(method, used: dict) -> dict:
    """Sidecar entries of a learned method: the model's name, version and sha256 (empty otherwise)."""
    if not method.learned:
        return {}
    from qsmprep.nn.inference import model_provenance

    prov = model_provenance(used["model"], model_dir=used.get("model_dir"))
    return {"ModelName": prov.get("name"), "ModelVersion": prov.get("version"), "ModelSHA256": prov.get("sha256")}


class _BgInputSpec(_FieldInputSpec):
    total_field = File(exists=True, mandatory=True, desc="total field (ppm)")
    method = traits.Str(mandatory=True, desc="background field removal method (qsmprep.methods)")


class _BgOutputSpec(TraitedSpec):
    local_field = File(exists=True, desc="local field (ppm)")
    mask_out = File(exists=True, desc="mask of the local field (eroded; uint8)")
    params = traits.Dict()


class BackgroundRemoval(SimpleInterface):
    """Background field removal with a :data:`~qsmprep.qsm.registry.BGREMOVE` method (ppm in and out)."""

    input_spec = _BgInputSpec
    output_spec = _BgOutputSpec

    def _run_interface(self, runtime):
        set_threads(self.inputs.num_threads)
        method = STAGES["bgremove"].method(self.inputs.method)
        field, ref = load_float(self.inputs.total_field)
        mask = load_mask(self.inputs.mask)
        kw = _method_kwargs(method, dict(self.inputs.method_params), self.inputs.device)
        local, mask_out = method.function(field, mask, self.inputs.voxel_size, self.inputs.b0_dir, **kw)
        mask_out = np.asarray(mask_out, dtype=bool)
        if not mask_out.any():
            raise ValueError(f"background removal ({method.name}) left an empty mask; use a smaller kernel radius")
        self._results["local_field"] = save_like(local, ref, _out("local_field_ppm.nii"))
        self._results["mask_out"] = save_like(mask_out, ref, _out("mask_bgremove.nii"), "uint8")
        used = jsonable(method.resolve_params(kw, {"voxel_size_mm": self.inputs.voxel_size}))
        self._results["params"] = {
            "Method": method.name,
            "Parameters": used,
            "MaskVoxelsIn": int(mask.sum()),
            "MaskVoxelsOut": int(mask_out.sum()),
            **_model_record(method, used),
        }
        return runtime


class _InvInputSpec(_FieldInputSpec):
    local_field = File(exists=True, mandatory=True, desc="local field (ppm)")
    method = traits.Str(mandatory=True, desc="dipole inversion method (qsmprep.methods)")
    magnitude = File(exists=True, desc="4D magnitude (used by methods with the data argument 'magnitude')")


class _InvOutputSpec(TraitedSpec):
    chi = File(exists=True, desc="susceptibility (ppm), not referenced")
    params = traits.Dict()


class DipoleInversion(SimpleInterface):
    """Dipole inversion with an :data:`~qsmprep.qsm.registry.INVERSION` method (ppm -> ppm)."""

    input_spec = _InvInputSpec
    output_spec = _InvOutputSpec

    def _run_interface(self, runtime):
        set_threads(self.inputs.num_threads)
        method = STAGES["inversion"].method(self.inputs.method)
        field, ref = load_float(self.inputs.local_field)
        mask = load_mask(self.inputs.mask)
        kw = _method_kwargs(method, dict(self.inputs.method_params), self.inputs.device)
        data = {}
        if "magnitude" in method.data_args and isdefined(self.inputs.magnitude):
            data["magnitude"] = load_float(self.inputs.magnitude)[0]
        chi = method.function(field, mask, self.inputs.voxel_size, self.inputs.b0_dir, **data, **kw)
        chi = np.where(mask, np.asarray(chi, dtype=np.float32), np.float32(0))
        self._results["chi"] = save_like(chi, ref, _out("chi_ppm.nii"))
        used = jsonable(method.resolve_params(kw, {"voxel_size_mm": self.inputs.voxel_size}))
        self._results["params"] = {"Method": method.name, "Parameters": used, **_model_record(method, used)}
        if "magnitude" in method.data_args:  # MEDI-TV without magnitude images has no edge weighting: say which ran
            self._results["params"]["MagnitudeWeighting"] = "magnitude" in data
        return runtime


class _R2sInputSpec(_ThreadsInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="4D magnitude")
    echo_times = traits.List(traits.Float, mandatory=True)
    mask = File(exists=True)
    method = traits.Str(mandatory=True, desc="R2* method (qsmprep.methods)")
    method_params = traits.Dict(usedefault=True)


class _R2sOutputSpec(TraitedSpec):
    r2star = File(exists=True, desc="R2* (1/s)")
    t2star = File(exists=True, desc="T2* (s); 0 where R2* <= 0")
    s0 = File(exists=True, desc="S0 (a.u.)")
    params = traits.Dict()


class R2Star(SimpleInterface):
    """R2*/T2*/S0 maps from the multi-echo magnitude with an R2* method (:mod:`qsmprep.methods`)."""

    input_spec = _R2sInputSpec
    output_spec = _R2sOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.qsm.multiecho import r2star_method_for, t2star_s

        set_threads(self.inputs.num_threads)
        requested = STAGES["r2star"].method(self.inputs.method)
        # "auto": the method chosen for these echo times runs and is recorded (with its own parameters)
        method = STAGES["r2star"].method(r2star_method_for(requested.name, self.inputs.echo_times))
        mag, ref = load_float(self.inputs.magnitude)
        mask = load_mask(self.inputs.mask) if isdefined(self.inputs.mask) else None
        kw = {k: v for k, v in dict(self.inputs.method_params).items() if k in method.parameters()}
        r2, s0 = method.function(mag, self.inputs.echo_times, mask=mask, **kw)
        self._results["r2star"] = save_like(r2, ref, _out("r2star_hz.nii"))
        self._results["t2star"] = save_like(t2star_s(r2), ref, _out("t2star_s.nii"))
        self._results["s0"] = save_like(s0, ref, _out("s0.nii"))
        self._results["params"] = {
            "Method": method.name,
            "Parameters": jsonable(method.resolve_params(kw)),
        }
        if requested.name != method.name:
            self._results["params"]["MethodRequested"] = requested.name
            self._results["params"]["MethodChoice"] = "ARLO for >= 3 equally spaced echoes, else the log-linear fit"
        return runtime


class _SWIInputSpec(_ThreadsInputSpec):
    magnitude = File(exists=True, mandatory=True, desc="magnitude (3D or 4D, echoes last)")
    fieldmap_hz = File(exists=True, mandatory=True, desc="B0 field map (Hz) from the unwrapped echoes")
    mask = File(exists=True, mandatory=True, desc="mask of the field map")
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="voxel size (mm)")
    b0_dir = traits.List(traits.Float, minlen=3, maxlen=3, mandatory=True, desc="B0 direction (voxel frame)")
    highpass_sigma_voxels = traits.Float(4.0, usedefault=True, desc="in-plane Gaussian sigma (voxels)")
    phase_scaling = traits.Str("tanh", usedefault=True, desc="phase-mask scaling (qsmprep.qsm.swi)")
    phase_strength = traits.Float(4.0, usedefault=True, desc="tanh strength or power of the phase mask")
    minip_slab_mm = traits.Float(16.0, usedefault=True, desc="minIP slab thickness (mm)")


class _SWIOutputSpec(TraitedSpec):
    swi = File(exists=True, desc="SWI (magnitude units)")
    minip = File(exists=True, desc="minimum-intensity projection of the SWI")
    params = traits.Dict()


class SWI(SimpleInterface):
    """CLEAR-SWI and its minIP (:func:`qsmprep.qsm.swi.swi`, :func:`~qsmprep.qsm.swi.minimum_intensity_projection`)."""

    input_spec = _SWIInputSpec
    output_spec = _SWIOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.qsm.swi import minimum_intensity_projection, slice_axis, swi

        set_threads(self.inputs.num_threads)
        i = self.inputs
        mag, ref = load_float(i.magnitude)
        field, _ = load_float(i.fieldmap_hz)
        mask = load_mask(i.mask)
        image, _ = swi(mag, field, mask, i.b0_dir, i.highpass_sigma_voxels, i.phase_scaling, i.phase_strength)
        axis = slice_axis(i.b0_dir)
        minip = minimum_intensity_projection(image, i.voxel_size, axis, i.minip_slab_mm)
        self._results["swi"] = save_like(image, ref, _out("swi.nii"))
        self._results["minip"] = save_like(minip, ref, _out("minip.nii"))
        n_slices = max(1, int(round(i.minip_slab_mm / i.voxel_size[axis])))
        self._results["params"] = {
            "Method": "clearswi",
            "Parameters": {
                "magnitude_combination": "root-sum-of-squares",
                "highpass_sigma_voxels": float(i.highpass_sigma_voxels),
                "highpass_sigma_mm": [0.0 if a == axis else float(i.highpass_sigma_voxels * v)
                                      for a, v in enumerate(i.voxel_size)],
                "phase_scaling": i.phase_scaling,
                "phase_strength": float(i.phase_strength),
                "minip_slab_mm": float(i.minip_slab_mm),
                "minip_slices": n_slices,
                "minip_axis": axis,
            },
        }
        return runtime


class _RefInputSpec(_ThreadsInputSpec):
    chi = File(exists=True, mandatory=True, desc="susceptibility (ppm)")
    mask = File(exists=True, mandatory=True, desc="mask of chi (whole-brain reference region)")
    method = traits.Str(mandatory=True, desc="referencing method (qsmprep.methods)")
    method_params = traits.Dict(usedefault=True)
    r2star = File(exists=True, desc="R2* (1/s), for CSF referencing")
    csf_mask = File(exists=True, desc="CSF mask, for CSF referencing (else derived from R2*)")
    voxel_size = traits.List(traits.Float, minlen=3, maxlen=3, desc="voxel size (mm)")


class _RefOutputSpec(TraitedSpec):
    chi_referenced = File(exists=True, desc="referenced susceptibility (ppm)")
    reference_mask = File(desc="mask of the reference region (uint8); undefined for mean/none")
    params = traits.Dict()


_REGION_NAMES = {"mean": "whole-brain mask (mean)", "csf": "ventricular CSF (mean)", "none": "none (not referenced)"}


class Reference(SimpleInterface):
    """Susceptibility referencing with a :data:`~qsmprep.qsm.registry.REFERENCE` method.

    ``params`` records the reference region, the offset subtracted (ppm) and, as the ISMRM
    consensus (MRM 2024) asks when the region is not the whole brain, the mean and standard
    deviation of the region's susceptibility referenced to the whole-brain mask.
    """

    input_spec = _RefInputSpec
    output_spec = _RefOutputSpec

    def _run_interface(self, runtime):
        from qsmprep.qsm.reference import csf_mask_from_r2star

        set_threads(self.inputs.num_threads)
        entry = STAGES["reference"].method(self.inputs.method)
        method, func = entry.name, entry.function
        chi, ref = load_float(self.inputs.chi)
        mask = load_mask(self.inputs.mask)
        kw = dict(self.inputs.method_params)
        vs = list(self.inputs.voxel_size) if isdefined(self.inputs.voxel_size) else [1.0, 1.0, 1.0]
        region, source = None, None
        record = dict(kw)
        if method == "csf":
            if isdefined(self.inputs.csf_mask):
                region = load_mask(self.inputs.csf_mask) & mask
                source = "given CSF mask"
            else:
                if not isdefined(self.inputs.r2star):
                    raise ValueError("CSF referencing needs an R2* map (r2star) or a csf_mask")
                r2, _ = load_float(self.inputs.r2star)
                ckw = {k: kw.pop(k) for k in ("threshold_hz", "radius_mm", "n_central", "erode_mm") if k in kw}
                region = csf_mask_from_r2star(r2, mask, vs, **ckw)
                source = "R2* threshold (after MEDI extract_CSF)"
            out = func(chi, mask, csf_mask=region, **kw)
        else:
            out = func(chi, mask, **kw)
        out = np.asarray(out, dtype=np.float32)
        diff = (chi - out)[mask]
        offset = float(np.median(diff)) if diff.size else 0.0
        info = {
            "Method": method,
            "Parameters": entry.resolve_params(record),
            "ReferenceRegion": _REGION_NAMES.get(method, method),
            "ReferenceOffsetPPM": offset,
        }
        if region is not None:
            self._results["reference_mask"] = save_like(region, ref, _out("reference_mask.nii"), "uint8")
            whole = chi - np.float32(np.mean(chi[mask], dtype=np.float64))
            vals = whole[region]
            info.update(
                {
                    "ReferenceRegionSource": source,
                    "ReferenceRegionVoxels": int(region.sum()),
                    "ReferenceRegionMeanPPMWholeBrainReferenced": float(np.mean(vals, dtype=np.float64)),
                    "ReferenceRegionStdPPMWholeBrainReferenced": float(np.std(vals, dtype=np.float64)),
                }
            )
        self._results["chi_referenced"] = save_like(out, ref, _out("chi_referenced_ppm.nii"))
        self._results["params"] = jsonable(info)
        return runtime
