"""Helpers of the anatomical/template tests: an offline TemplateFlow folder made of genuine TemplateFlow
files shipped in a PyPI wheel, and a socket guard.

NiMARE's wheel (``nimare/resources/templates``) carries TemplateFlow's ``tpl-MNI152NLin6Asym`` res-01/res-02
T1w and brain masks under their TemplateFlow names, and FSL's Harvard-Oxford cortical maximum-probability
atlas (thr25, 2 mm, FSL's MNI152 = MNI152NLin6Asym grid) with its licence. They are copied, unchanged, to
their TemplateFlow paths (the atlas as ``atlas-HOCPA_desc-th25_dseg``, TemplateFlow's name for the same
FSL file); nothing else is filed (nilearn's MNI files are the 2009a symmetric template and are never filed
under a TemplateFlow name). The wheel is looked up in ``$QSMPREP_TEMPLATE_WHEEL`` or
``tests/data/wheels/nimare-*.whl`` (``.ci/run`` downloads it there:
``pip download --no-deps nimare==0.22.1 -d tests/data/wheels``).
"""

from __future__ import annotations

import json
import os
import socket
import zipfile
from contextlib import contextmanager
from pathlib import Path

WHEEL_HINT = "pip download --no-deps nimare==0.22.1 -d tests/data/wheels"

_FILES = {
    "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz": "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
    "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_T1w.nii.gz": "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz",
    "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz":
        "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
    "nimare/resources/templates/tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz":
        "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz",
    "nimare/resources/atlases/HarvardOxford-cort-maxprob-thr25-2mm.nii.gz":
        "tpl-MNI152NLin6Asym_res-02_atlas-HOCPA_desc-th25_dseg.nii.gz",
    "nimare/resources/atlases/Harvard-Oxford-LICENSE": "Harvard-Oxford-LICENSE",
}


def find_template_wheel() -> Path | None:
    env = os.environ.get("QSMPREP_TEMPLATE_WHEEL")
    if env and Path(env).is_file():
        return Path(env)
    found = sorted((Path(__file__).parent / "data" / "wheels").glob("nimare-*.whl"))
    return found[-1] if found else None


def build_templateflow_home(home: Path, wheel: Path) -> Path:
    """``home/tpl-MNI152NLin6Asym/...`` from the wheel (see the module docstring); returns ``home``."""
    tpl = Path(home) / "tpl-MNI152NLin6Asym"
    tpl.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for src, dst in _FILES.items():
            (tpl / dst).write_bytes(zf.read(src))
    (Path(home) / "dataset_description.json").write_text(json.dumps(
        {"Name": "TemplateFlow (offline subset for qsmprep tests)", "BIDSVersion": "1.10.0"}))
    (tpl / "template_description.json").write_text(json.dumps(
        {"Name": "FSL's MNI ICBM 152 non-linear 6th Generation Asymmetric Average Brain Stereotaxic Registration Model",
         "Identifier": "MNI152NLin6Asym", "_note": "subset copied from the NiMARE wheel by qsmprep's tests"}))
    return Path(home)


@contextmanager
def no_network():
    """Any attempt to open an internet socket (connect / getaddrinfo) raises ``RuntimeError`` inside."""
    real_connect, real_gai = socket.socket.connect, socket.getaddrinfo

    def guard(*args, **kwargs):
        raise RuntimeError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"network access attempted: {address}")
        return real_connect(self, address)

    socket.socket.connect = connect
    socket.getaddrinfo = guard
    try:
        yield
    finally:
        socket.socket.connect, socket.getaddrinfo = real_connect, real_gai


# --------------------------------------------------------------------------------------------------
# the deformed-phantom registration experiment (tests/test_anat_integration.py, benchmarks/bench_registration.py)
# --------------------------------------------------------------------------------------------------

DGM = (1, 2, 3, 4, 5, 6, 7)


def dice(a, b) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / s if s else float("nan")


def template_dgm_labels(ph, template_t1w, template_mask, eval_grid, t1w_downsample: int, workdir):
    """The template's deep-grey-matter labels: the undeformed phantom's T1w (its own contrast) registered to the
    template brain once (the same affine + SyN as qsmprep), its labels warped onto ``eval_grid`` (generic label).
    Honest reference: the subjects are this phantom deformed by a known deformation, so a registration that
    undoes the deformation maps their labels onto these."""
    import nibabel as nib
    import numpy as np

    from qsmprep.anat import registration as reg
    from qsmprep.simulate.anatomy import t1w_from_phantom
    from qsmprep.simulate.phantom import downsample_phantom

    tp = downsample_phantom(ph, t1w_downsample) if t1w_downsample > 1 else ph
    t1w = nib.Nifti1Image(t1w_from_phantom(tp, seed=0) * np.asarray(tp.brain_mask), tp.affine)
    brain = nib.Nifti1Image(np.asarray(template_t1w.dataobj, np.float32) * (np.asarray(template_mask.dataobj) > 0),
                            template_t1w.affine)
    r = reg.syn(brain, t1w, Path(workdir) / "phantom_to_tpl.h5", Path(workdir) / "tpl_to_phantom.h5",
                fixed_mask=template_mask, num_threads=2)
    lab = nib.Nifti1Image(np.asarray(ph.labels, np.int16), ph.affine)
    on_eval = np.asarray(reg.apply(lab, eval_grid, r.forward, interpolation="genericLabel").dataobj)
    return np.where(np.isin(on_eval, DGM), on_eval, 0).astype(np.int16), r


def register_subject(subj, template_t1w, template_mask, workdir, num_threads=2) -> dict:
    """qsmprep's two registrations for a simulated subject: rigid echo-combined GRE magnitude -> T1w, then
    affine + SyN of the skull-stripped T1w (true brain mask of the simulation) to the template brain.
    Returns the transforms and the wall times."""
    import nibabel as nib
    import numpy as np

    from qsmprep.anat import registration as reg
    from qsmprep.simulate.phantom import downsample_phantom

    w = Path(workdir)
    mag = np.sqrt((np.asarray(subj.gre.magnitude, np.float64) ** 2).sum(axis=-1)).astype(np.float32)
    gre = nib.Nifti1Image(mag, subj.gre.affine)
    t1w = nib.Nifti1Image(subj.t1w, subj.t1w_affine)
    rigid = reg.rigid(t1w, gre, w / "from-GRE_to-T1w_mode-image_xfm.txt", num_threads=num_threads)
    f = int(round(abs(subj.t1w_affine[0, 0])))
    mask = np.asarray(downsample_phantom(subj.phantom, f).brain_mask if f > 1 else subj.phantom.brain_mask)
    brain = nib.Nifti1Image(np.asarray(template_t1w.dataobj, np.float32) * (np.asarray(template_mask.dataobj) > 0),
                            template_t1w.affine)
    syn = reg.syn(brain, nib.Nifti1Image(subj.t1w * mask, subj.t1w_affine), w / "t1w_to_tpl.h5", w / "tpl_to_t1w.h5",
                  fixed_mask=template_mask, num_threads=num_threads)
    return {"rigid": rigid, "syn": syn, "gre": gre}


def evaluate_subject(subj, regs: dict, tpl_labels, eval_grid, erode_voxels: int = 0) -> dict:
    """Per nucleus: Dice of the GRE's true labels carried GRE -> T1w -> template against the template labels
    (on ``eval_grid``), and the mean true chi read through the template labels carried back to the GRE grid
    (template -> T1w -> GRE) minus the mean true chi over the true labels."""
    import nibabel as nib
    import numpy as np

    from qsmprep.anat import registration as reg
    from qsmprep.qsm.roi import erode_labels

    gre_labels = nib.Nifti1Image(np.asarray(subj.gre.labels, np.int16), subj.gre.affine)
    fwd = [regs["syn"].forward[0], regs["rigid"].forward[0]]
    in_tpl = np.asarray(reg.apply(gre_labels, eval_grid, fwd, interpolation="genericLabel").dataobj)
    back = [regs["rigid"].forward[0], regs["syn"].inverse[0]]
    atlas_gre = np.asarray(reg.apply(nib.Nifti1Image(tpl_labels, eval_grid.affine), regs["gre"], back,
                                     invert=[True, False], interpolation="genericLabel").dataobj)
    if erode_voxels:
        atlas_gre = erode_labels(atlas_gre, erode_voxels)
    chi = np.asarray(subj.gre.chi_ppm)
    true = np.asarray(subj.gre.labels)
    brain = np.asarray(subj.gre.brain_mask, bool)
    out = {}
    for k in DGM:
        t = chi[(true == k) & brain].mean()
        sel = (atlas_gre == k) & brain
        a = chi[sel].mean() if sel.any() else float("nan")
        out[k] = {"dice": dice(in_tpl == k, tpl_labels == k), "chi_true": float(t), "chi_atlas": float(a),
                  "chi_error": float(a - t), "n_atlas": int(sel.sum())}
    return out
