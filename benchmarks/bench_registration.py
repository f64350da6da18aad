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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--t1w-mm", type=int, default=1)
    p.add_argument("--gre-mm", type=int, default=2)
    p.add_argument("--template-res", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    p.add_argument("--erode", type=int, default=0)
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
    ph = make_head_phantom(downsample=1, seed=0)
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
            print(f"  {names[k]:18s} Dice {r['dice']:.3f}  chi true {r['chi_true']:+.4f}  via atlas "
                  f"{r['chi_atlas']:+.4f}  error {r['chi_error']:+.4f} ppm", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
