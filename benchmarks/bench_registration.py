"""Registration of simulated subjects to MNI152NLin6Asym: time and memory split, and accuracy (issue 15).

Subjects are qsmprep's MNI152-2009-based head phantom deformed by a known smooth nonlinear deformation
(seeded; up to 4 mm plus a global scaling), with a T1w-like image of the same labels and a tilted GRE. The
template is TemplateFlow's MNI152NLin6Asym (genuine files from NiMARE's wheel, tests/anat_helpers.py), a
different template from the phantom's, so the registration does real work. The template's deep-grey-matter
labels come from registering the undeformed phantom's T1w to the template once (tests/anat_helpers.py).

Printed per subject: rigid (GRE -> T1w) and affine + SyN (T1w -> template) wall time, peak RSS, per-nucleus
Dice (GRE -> T1w -> template, on the 1 mm template grid) and the chi error of the template labels read on
the GRE grid. Usage::

    python benchmarks/bench_registration.py [--t1w-mm 1] [--gre-mm 2] [--template-res 2] [--seeds 3 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


#: Zubal label -> head-phantom label. Deep grey matter identified by the chi of Biondetti's recipe (pallidus
#: 0.19 -> 120, thalamus 0.07 -> 109; caudate/putamen both 0.09: 101 (higher, more anterior centroid) is taken as
#: caudate, 105 as putamen); white matter: in-brain labels with chi -0.05; every other in-brain label is treated as
#: grey matter (Zubal's lobes), except 2 (centre of the head, in the brain mask) which is treated as CSF. These
#: identifications are ours, not Zubal's label list: the T1w-like contrast they give is the same for the template
#: reference and the subjects, so the experiment measures how well a known deformation is recovered.
ZUBAL_MAP = {120: 2, 109: 7, 101: 1, 105: 3, 83: 8, 26: 8, 107: 8, 111: 8, 2: 10}


def zubal_phantom():
    """The Zubal head as a :class:`~qsmprep.simulate.phantom.Phantom` (1 mm, cropped to the head)."""
    import nibabel as nib
    import numpy as np

    from qsmprep.simulate.phantom import AIR_PPM, HEAD_TISSUES, Phantom

    d = Path(os.environ.get("QSMPREP_ZUBAL_DIR") or HERE.parent.parent / "shared" / "data" / "zubal")
    img = nib.load(d / "zubal_labels_1mm.nii.gz")
    zl = np.asarray(img.dataobj).astype(np.int16)
    chi = np.asarray(nib.load(d / "zubal_chi_ppm_derived.nii.gz").dataobj, np.float32)
    bm = np.asarray(nib.load(d / "zubal_brainmask_1mm.nii.gz").dataobj) > 0
    head = np.argwhere(zl > 0)
    lo, hi = np.maximum(head.min(0) - 6, 0), np.minimum(head.max(0) + 7, zl.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    zl, chi, bm = zl[sl], chi[sl], bm[sl]
    lab = np.where(zl > 0, 15, 0).astype(np.int16)
    lab[bm] = 9
    for z, k in ZUBAL_MAP.items():
        lab[(zl == z) & bm] = k
    lab[(zl > 0) & (chi > 5)] = 14
    m0 = np.zeros(lab.shape, np.float32)
    r2 = np.zeros(lab.shape, np.float32)
    for k, (_, _, m, r) in HEAD_TISSUES.items():
        m0[lab == k] = m
        r2[lab == k] = r
    aff = img.affine.copy()
    aff[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    names = {k: v[0] for k, v in HEAD_TISSUES.items()}
    return Phantom(chi_ppm=chi, labels=lab, label_names=names, brain_mask=bm, m0=m0, r2star_hz=r2,
                   voxel_size_mm=(1.0, 1.0, 1.0), affine=aff, label_chi_ppm={k: v[1] for k, v in HEAD_TISSUES.items()},
                   chi_ambient_ppm=AIR_PPM, extend_faces=((2, 0),))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t1w-mm", type=int, default=1)
    p.add_argument("--gre-mm", type=int, default=2)
    p.add_argument("--template-res", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    p.add_argument("--erode", type=int, default=0)
    p.add_argument("--anatomy", choices=("mni", "zubal"), default="mni",
                   help="mni: qsmprep's head phantom; zubal: the Zubal head ($QSMPREP_ZUBAL_DIR or ../shared/data/zubal)")
    a = p.parse_args(argv)

    from _measure import measure
    from anat_helpers import (DGM, build_templateflow_home, evaluate_subject, find_template_wheel,
                              register_subject, template_dgm_labels)

    tmp = Path(tempfile.mkdtemp(prefix="bench_registration_"))
    os.environ["TEMPLATEFLOW_HOME"] = str(build_templateflow_home(tmp / "tf", find_template_wheel()))
    import nibabel as nib

    from qsmprep.anat.templates import Space, template_files
    from qsmprep.simulate import make_head_phantom
    from qsmprep.simulate.anatomy import simulate_anatomy_subject

    files = template_files(Space("MNI152NLin6Asym", a.template_res))
    tpl, tmask = nib.load(files["T1w"]), nib.load(files["mask"])
    grid = nib.load(template_files(Space("MNI152NLin6Asym", 1))["T1w"])
    ph = make_head_phantom(downsample=1, seed=0) if a.anatomy == "mni" else zubal_phantom()
    labels, ref = template_dgm_labels(ph, tpl, tmask, grid, a.t1w_mm, tmp)
    print(f"template labels (phantom -> template SyN): {ref.seconds:.0f} s", flush=True)
    names = {k: ph.label_names[k] for k in DGM}
    for seed in a.seeds:
        subj = simulate_anatomy_subject(ph, seed=seed, t1w_downsample=a.t1w_mm, gre_downsample=a.gre_mm, snr=100)
        with measure() as m:
            regs = register_subject(subj, tpl, tmask, tmp / f"s{seed}")
        res = evaluate_subject(subj, regs, labels, grid, erode_voxels=a.erode)
        print(f"seed {seed}: T1w {a.t1w_mm} mm, GRE {a.gre_mm} mm, template res-{a.template_res}: rigid "
              f"{regs['rigid'].seconds:.0f} s + SyN {regs['syn'].seconds:.0f} s = {m.seconds:.0f} s wall, peak RSS "
              f"{m.peak_gb:.2f} GB", flush=True)
        for k in DGM:
            r = res[k]
            if r["n_atlas"] == 0 and not (r["dice"] == r["dice"]):
                continue
            print(f"  {names[k]:18s} Dice {r['dice']:.3f}  chi true {r['chi_true']:+.4f}  via atlas "
                  f"{r['chi_atlas']:+.4f}  error {r['chi_error']:+.4f} ppm", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
