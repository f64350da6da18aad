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
