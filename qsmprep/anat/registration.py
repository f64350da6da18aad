"""Registration with ANTsPy (antspyx): rigid GRE -> T1w, SyN T1w -> template, applying transforms.

Images go in and out as nibabel images (RAS affines); ANTs works in LPS physical space, and the
conversion is done here (:func:`to_ants`, :func:`to_nibabel`), so every other module stays with
nibabel. Transforms are ANTs/ITK files: the rigid one an ITK text file (``.txt``), the nonlinear one a
composite HDF5 (``.h5``, affine + SyN warp, as written by ``antsRegistration
--write-composite-transform``; fMRIPrep's ``_xfm.h5`` files are the same kind). A transform list follows
ANTs' convention: ``apply([A, B], ...)`` applies ``B`` first.

Settings (documented in docs/anatomical.md):

* :func:`rigid`: ANTs "Rigid", Mattes mutual information (32 bins, 10 % random sampling), four levels
  (shrink 8/4/2/1, smoothing 3/2/1/0 voxels, 500/250/100/25 iterations), centre-of-mass initialisation. Mutual information is
  the right cost for GRE magnitude against T1w (different contrasts); a boundary-based cost is not used.
* :func:`syn`: ANTs "SyN" (affine with Mattes MI, then symmetric normalisation with neighbourhood
  cross-correlation, radius 2), with a reduced schedule ``reg_iterations=(60, 30, 10)`` at shrink factors
  4/2/1 (ANTsPy's default is (40, 20, 0), which leaves the full resolution unrefined; fMRIPrep's is
  (100, 70, 50, 20), several times slower), restricted to the brain: skull-stripped moving image and the
  template's brain mask.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

__all__ = [
    "Registration",
    "to_ants",
    "to_nibabel",
    "rigid",
    "syn",
    "apply",
    "ants_version",
    "INTERPOLATIONS",
    "SYN_ITERATIONS",
]

#: interpolations accepted by :func:`apply` (ANTs names): labels ``genericLabel``/``nearestNeighbor``
INTERPOLATIONS = ("linear", "genericLabel", "nearestNeighbor", "bSpline")
#: the SyN schedule (iterations at shrink factors 4, 2, 1)
SYN_ITERATIONS = (60, 30, 10)
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ants_version() -> str:
    from importlib.metadata import version

    try:
        return version("antspyx")
    except Exception:  # pragma: no cover - not installed from a distribution
        return "unknown"


def to_ants(img: nib.spatialimages.SpatialImage, dtype=np.float32):
    """A 3D nibabel image as an ANTs image (origin, spacing and direction from the RAS affine)."""
    import ants

    data = np.asarray(img.dataobj, dtype=dtype)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    lps = _LPS @ np.asarray(img.affine, dtype=np.float64)
    m = lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing[None, :]
    return ants.from_numpy(np.ascontiguousarray(data), origin=tuple(float(v) for v in lps[:3, 3]),
                           spacing=tuple(float(v) for v in spacing), direction=direction)


def to_nibabel(aimg, dtype=np.float32) -> nib.Nifti1Image:
    """An ANTs image as a NIfTI image (RAS affine)."""
    direction = np.asarray(aimg.direction, dtype=np.float64)
    spacing = np.asarray(aimg.spacing, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = np.asarray(aimg.origin, dtype=np.float64)
    affine = _LPS @ lps
    img = nib.Nifti1Image(np.asarray(aimg.numpy(), dtype=dtype), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    return img


@dataclass
class Registration:
    """Result of :func:`rigid` or :func:`syn`: transform files (``forward`` maps the moving image onto the
    fixed grid, ``inverse`` the fixed onto the moving), wall time and the settings used."""

    forward: list[str]
    inverse: list[str]
    seconds: float
    kind: str
    params: dict = field(default_factory=dict)


def _threads(n: int | None, seed: int | None = None) -> None:
    """ITK threads, and ANTs' random seed (the metric's random sampling) for reproducible results."""
    if n:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(n))
    if seed is not None:
        import ants

        ants.config._random_seed = int(seed)  # read by ants.registration (--random-seed)


def rigid(fixed: nib.spatialimages.SpatialImage, moving: nib.spatialimages.SpatialImage, out_file: str | os.PathLike,
          fixed_mask: nib.spatialimages.SpatialImage | None = None, num_threads: int | None = None,
          seed: int = 1) -> Registration:
    """Rigid registration of ``moving`` onto ``fixed`` (Mattes MI); writes the moving -> fixed transform to
    ``out_file`` (ITK text, ``.txt``) and returns it (``inverse``: the same file, to be applied inverted)."""
    import ants

    _threads(num_threads, seed)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    f, m = to_ants(fixed), to_ants(moving)
    mask = None if fixed_mask is None else to_ants(fixed_mask)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qsmprep_rigid_") as tmp:
        reg = ants.registration(f, m, type_of_transform="Rigid", mask=mask, aff_metric="mattes", aff_sampling=32,
                                aff_random_sampling_rate=0.1, aff_iterations=(500, 250, 100, 25),
                                aff_shrink_factors=(8, 4, 2, 1), aff_smoothing_sigmas=(3, 2, 1, 0),
                                outprefix=str(Path(tmp) / "rigid_"))
        mats = [t for t in reg["fwdtransforms"] if t.endswith(".mat")]
        if len(mats) != 1:
            raise RuntimeError(f"ANTs rigid registration returned {reg['fwdtransforms']}")
        ants.write_transform(ants.read_transform(mats[0]), str(out))
    dt = time.perf_counter() - t0
    params = {"Software": f"ANTsPy {ants_version()}", "Type": "Rigid", "Metric": "MattesMutualInformation",
              "MetricBins": 32, "SamplingRate": 0.1, "Iterations": [500, 250, 100, 25],
              "ShrinkFactors": [8, 4, 2, 1], "SmoothingSigmasVoxels": [3, 2, 1, 0],
              "Initialization": "centre of mass"}
    return Registration([str(out)], [str(out)], dt, "rigid", params)


def syn(fixed: nib.spatialimages.SpatialImage, moving: nib.spatialimages.SpatialImage, out_forward: str | os.PathLike,
        out_inverse: str | os.PathLike, fixed_mask: nib.spatialimages.SpatialImage | None = None,
        iterations: Sequence[int] = SYN_ITERATIONS, num_threads: int | None = None, seed: int = 1,
        metric: str = "CC", grad_step: float = 0.2) -> Registration:
    """Affine + SyN registration of ``moving`` onto ``fixed``; writes the composite forward (moving -> fixed)
    and inverse transforms (``.h5``)."""
    import ants

    _threads(num_threads, seed)
    f, m = to_ants(fixed), to_ants(moving)
    mask = None if fixed_mask is None else to_ants(fixed_mask)
    t0 = time.perf_counter()
    iters = tuple(int(i) for i in iterations)
    with tempfile.TemporaryDirectory(prefix="qsmprep_syn_") as tmp:
        reg = ants.registration(f, m, type_of_transform="SyN", mask=mask, reg_iterations=iters,
                                syn_metric=metric, syn_sampling=32 if metric == "mattes" else 2,
                                grad_step=float(grad_step), flow_sigma=3, total_sigma=0,
                                aff_metric="mattes", write_composite_transform=True,
                                outprefix=str(Path(tmp) / "syn_"))
        fwd, inv = reg["fwdtransforms"], reg["invtransforms"]
        fwd = fwd[0] if isinstance(fwd, (list, tuple)) else fwd
        inv = inv[0] if isinstance(inv, (list, tuple)) else inv
        for src, dst in ((fwd, out_forward), (inv, out_inverse)):
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    dt = time.perf_counter() - t0
    params = {"Software": f"ANTsPy {ants_version()}", "Type": "Affine+SyN",
              "Metric": {"mattes": "MattesMutualInformation", "CC": "CrossCorrelation (radius 2)"}.get(metric, metric),
              "GradientStep": float(grad_step), "FlowSigma": 3, "TotalSigma": 0, "Iterations": list(iters),
              "ShrinkFactors": [4, 2, 1][-len(iters):] if len(iters) <= 3 else None,
              "Masked": fixed_mask is not None}
    return Registration([str(out_forward)], [str(out_inverse)], dt, "syn", params)


def apply(image: nib.spatialimages.SpatialImage, reference: nib.spatialimages.SpatialImage,
          transforms: Sequence[str | os.PathLike], invert: Sequence[bool] | None = None,
          interpolation: str = "linear", num_threads: int | None = None) -> nib.Nifti1Image:
    """``image`` resampled onto the grid of ``reference`` through ``transforms`` (ANTs order: the last is
    applied first to the image; each moves the image towards the reference; ``invert[i]`` inverts a linear
    transform). ``interpolation``: one of :data:`INTERPOLATIONS` (``genericLabel`` for label images, which
    are returned as int32). A 4D image is resampled volume by volume."""
    import ants

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    _threads(num_threads)
    tl = [str(t) for t in transforms]
    inv = [False] * len(tl) if invert is None else [bool(v) for v in invert]
    if len(inv) != len(tl):
        raise ValueError("invert must have one entry per transform")
    ref = to_ants(reference)
    label = interpolation in ("genericLabel", "nearestNeighbor")
    data = np.asarray(image.dataobj)
    vols = [data] if data.ndim == 3 else [data[..., i] for i in range(data.shape[-1])]
    out = []
    with tempfile.TemporaryDirectory(prefix="qsmprep_apply_") as tmp:
        for k, (t, v) in enumerate(zip(tl, inv)):
            if v and not t.endswith(".mat"):  # ANTsPy inverts .mat files only: invert an ITK text transform here
                if t.endswith(".h5"):
                    raise ValueError(f"{t}: a composite (nonlinear) transform cannot be inverted; use its inverse file")
                tl[k] = str(Path(tmp) / f"inverse_{k}.mat")
                ants.write_transform(ants.read_transform(t).invert(), tl[k])
                inv[k] = False
        for v in vols:
            moving = to_ants(nib.Nifti1Image(np.asarray(v, np.float32), image.affine))
            if tl:
                res = ants.apply_transforms(ref, moving, tl, interpolator=interpolation, whichtoinvert=inv,
                                            singleprecision=True)
            elif interpolation in ("linear", "nearestNeighbor"):
                res = ants.resample_image_to_target(moving, ref, interp_type=interpolation)
            else:
                raise ValueError(f"interpolation {interpolation!r} needs a transform list")
            arr = res.numpy()
            out.append(np.rint(arr).astype(np.int32) if label else arr.astype(np.float32))
    arr = out[0] if data.ndim == 3 else np.stack(out, axis=-1)
    aff = to_nibabel(ref).affine
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, 1)
    img.set_sform(aff, 1)
    return img
