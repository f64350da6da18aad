"""Anatomical inputs of a GRE series: the subject's T1w, sMRIPrep/fMRIPrep anatomical derivatives
(``--derivatives``) and FreeSurfer/FastSurfer/SynthSeg segmentations, with label names.

* T1w (:func:`find_t1w`): ``sub-<s>/[ses-<t>/]anat/*_T1w.nii[.gz]`` of the raw dataset; same session
  preferred, then the most entities (``acq``, ``run``) equal to the GRE series', then the first name.
* sMRIPrep/fMRIPrep (:func:`find_smriprep`): in a derivatives folder
  ``sub-<s>/[ses-<t>/]anat/sub-<s>[_ses-<t>]_desc-preproc_T1w.nii.gz``, ``_desc-brain_mask``,
  ``_desc-aseg_dseg`` (FreeSurfer labels) or ``_dseg`` (sMRIPrep's 3 tissue classes), and the transforms
  ``_from-T1w_to-<template>_mode-image_xfm.h5`` / ``_from-<template>_to-T1w_mode-image_xfm.h5``.
* FreeSurfer (:func:`find_freesurfer`): ``<dir>/sourcedata/freesurfer/sub-<s>/mri/aseg.mgz`` (fMRIPrep's
  layout) or ``<dir>/sub-<s>/mri/aseg.mgz`` (a SUBJECTS_DIR; FastSurfer and SynthSeg write the same
  aseg labels); label names from a ``FreeSurferColorLUT.txt`` in the folder or ``$FREESURFER_HOME``, else
  the embedded subset :data:`FREESURFER_ASEG_LUT`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FREESURFER_ASEG_LUT",
    "SMRIPREP_DSEG_LUT",
    "AnatInputs",
    "find_t1w",
    "find_smriprep",
    "find_freesurfer",
    "read_freesurfer_lut",
    "collect_anat",
]

#: Names of the aseg labels, from FreeSurfer's colour table (FreeSurferColorLUT.txt, FreeSurfer 7;
#: https://surfer.nmr.mgh.harvard.edu/fswiki/FsTutorial/AnatomicalROI/FreeSurferColorLUT). Subset: the
#: labels that aseg.mgz (and FastSurfer/SynthSeg) use. FreeSurfer 6 called 10/49 "*-Thalamus-Proper".
FREESURFER_ASEG_LUT: dict[int, str] = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent", 7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum", 14: "3rd-Ventricle",
    15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF",
    26: "Left-Accumbens-area", 28: "Left-VentralDC", 30: "Left-vessel", 31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle",
    44: "Right-Inf-Lat-Vent", 46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum",
    53: "Right-Hippocampus", 54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC",
    62: "Right-vessel", 63: "Right-choroid-plexus", 72: "5th-Ventricle", 77: "WM-hypointensities",
    85: "Optic-Chiasm", 251: "CC_Posterior", 252: "CC_Mid_Posterior", 253: "CC_Central",
    254: "CC_Mid_Anterior", 255: "CC_Anterior",
}
#: sMRIPrep's ``_dseg`` (tissue classes)
SMRIPREP_DSEG_LUT: dict[int, str] = {1: "GM", 2: "WM", 3: "CSF"}

_ENT_RE = re.compile(r"([a-zA-Z]+)-([a-zA-Z0-9]+)")


def _entities(name: str) -> dict[str, str]:
    stem = name.split(".")[0]
    return {m.group(1): m.group(2) for p in stem.split("_") if (m := _ENT_RE.fullmatch(p))}


@dataclass
class AnatInputs:
    """The anatomical files of one GRE series (every path absolute or None)."""

    t1w: Path | None = None
    #: why this T1w (one line for the logs and the sidecars)
    t1w_reason: str = ""
    t1w_mask: Path | None = None
    #: {template: (forward T1w->template, inverse template->T1w)} given by sMRIPrep/fMRIPrep
    xfms: dict[str, tuple[Path, Path | None]] = field(default_factory=dict)
    #: segmentations on the T1w (physical space): {name: (image, {label: name}, provenance)}
    segmentations: dict[str, tuple[Path, dict[int, str], str]] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return self.t1w is not None


def _sub_ses_dirs(root: Path, subject: str, session: str | None) -> list[Path]:
    base = root / f"sub-{subject}"
    dirs = []
    if session:
        dirs.append(base / f"ses-{session}" / "anat")
    dirs.append(base / "anat")
    if not session and base.is_dir():
        dirs += sorted(p / "anat" for p in base.glob("ses-*"))
    return [d for d in dirs if d.is_dir()]


def find_t1w(bids_dir: str | os.PathLike, run: Any) -> tuple[Path | None, str]:
    """``(T1w path or None, reason)`` for a GRE series (see the module docstring for the preference)."""
    root = Path(bids_dir)
    subject, session = str(run.subject), getattr(run, "session", None)
    cands = []
    for d in _sub_ses_dirs(root, subject, session):
        for p in sorted(d.glob(f"sub-{subject}_*T1w.nii*")):
            ents = _entities(p.name)
            if not p.name.endswith(("_T1w.nii", "_T1w.nii.gz")) or ents.get("sub") != subject:
                continue
            same_ses = ents.get("ses") == (str(session) if session else None)
            score = (10 if same_ses else 0) + sum(
                1 for k, attr in (("acq", "acquisition"), ("run", "run"))
                if getattr(run, attr, None) is not None and ents.get(k) == str(getattr(run, attr)))
            cands.append((-score, p.name, p))
    if not cands:
        return None, f"no T1w of sub-{subject}" + (f" ses-{session}" if session else "") + " in the BIDS dataset"
    cands.sort()
    best = cands[0][2]
    why = f"T1w {best.name} ({len(cands)} candidate{'s' if len(cands) > 1 else ''}; same session and " \
          "matching acq/run preferred)"
    return best.resolve(), why


def find_smriprep(deriv_dir: str | os.PathLike, run: Any) -> dict[str, Any]:
    """sMRIPrep/fMRIPrep anatomical outputs of a series' subject in one derivatives folder:
    ``{"t1w", "mask", "aseg", "dseg", "xfms": {template: (fwd, inv)}}`` (missing keys: not found)."""
    root = Path(deriv_dir)
    subject, session = str(run.subject), getattr(run, "session", None)
    out: dict[str, Any] = {"xfms": {}}
    for d in _sub_ses_dirs(root, subject, session):
        for p in sorted(d.iterdir()):
            n = p.name
            ents = _entities(n)
            if ents.get("sub") != subject or "space" in ents:
                continue
            if n.endswith("_desc-preproc_T1w.nii.gz") or n.endswith("_desc-preproc_T1w.nii"):
                out.setdefault("t1w", p.resolve())
            elif re.search(r"_desc-brain_mask\.nii(\.gz)?$", n) and "T1w" not in ents.get("from", ""):
                out.setdefault("mask", p.resolve())
            elif re.search(r"_desc-aseg_dseg\.nii(\.gz)?$", n):
                out.setdefault("aseg", p.resolve())
            elif re.search(r"_dseg\.nii(\.gz)?$", n) and "desc" not in ents:
                out.setdefault("dseg", p.resolve())
            elif n.endswith("_xfm.h5") and ents.get("mode") == "image":
                src, dst = ents.get("from"), ents.get("to")
                if src == "T1w" and dst:
                    fwd, inv = out["xfms"].get(dst, (None, None))
                    out["xfms"][dst] = (p.resolve(), inv)
                elif dst == "T1w" and src:
                    fwd, inv = out["xfms"].get(src, (None, None))
                    out["xfms"][src] = (fwd, p.resolve())
    out["xfms"] = {k: v for k, v in out["xfms"].items() if v[0] is not None}
    return out


def read_freesurfer_lut(path: str | os.PathLike) -> dict[int, str]:
    """``{index: name}`` of a FreeSurfer colour table (``index name R G B A`` lines, ``#`` comments)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0].isdigit():
            out[int(parts[0])] = parts[1]
    if not out:
        raise ValueError(f"{path}: no 'index name R G B A' lines (not a FreeSurfer colour table)")
    return out


def find_freesurfer(deriv_dir: str | os.PathLike, subject: str) -> tuple[Path, dict[int, str], str] | None:
    """``(aseg.mgz, {label: name}, provenance)`` of a subject in a derivatives/SUBJECTS_DIR folder, or None."""
    root = Path(deriv_dir)
    for base in (root / "sourcedata" / "freesurfer" / f"sub-{subject}", root / f"sub-{subject}",
                 root / "freesurfer" / f"sub-{subject}"):
        aseg = base / "mri" / "aseg.mgz"
        if aseg.is_file():
            for lut in (base / "mri" / "FreeSurferColorLUT.txt", root / "FreeSurferColorLUT.txt",
                        Path(os.environ.get("FREESURFER_HOME", "/nonexistent")) / "FreeSurferColorLUT.txt"):
                if lut.is_file():
                    return aseg.resolve(), read_freesurfer_lut(lut), f"{aseg} (names: {lut})"
            return aseg.resolve(), dict(FREESURFER_ASEG_LUT), f"{aseg} (names: FreeSurfer colour table, embedded)"
    return None


def collect_anat(bids_dir: str | os.PathLike | None, derivatives, run: Any) -> AnatInputs:
    """Everything anatomical for a series: sMRIPrep's preprocessed T1w wins over the raw T1w (its
    transforms and segmentations are in its space); FreeSurfer asegs come from any ``derivatives`` folder."""
    anat = AnatInputs()
    for d in derivatives or ():
        sm = find_smriprep(d, run)
        if "t1w" in sm and anat.t1w is None:
            anat.t1w = sm["t1w"]
            anat.t1w_reason = f"sMRIPrep/fMRIPrep T1w {sm['t1w'].name} in {d}"
            anat.t1w_mask = sm.get("mask")
            anat.xfms.update(sm["xfms"])
            if "aseg" in sm:
                anat.segmentations["aseg"] = (sm["aseg"], dict(FREESURFER_ASEG_LUT),
                                              f"{sm['aseg']} (FreeSurfer aseg labels via sMRIPrep)")
            if "dseg" in sm:
                anat.segmentations["dseg"] = (sm["dseg"], dict(SMRIPREP_DSEG_LUT),
                                              f"{sm['dseg']} (sMRIPrep tissue classes)")
        fs = find_freesurfer(d, str(run.subject))
        if fs is not None and "aseg" not in anat.segmentations:
            anat.segmentations["aseg"] = fs
    if anat.t1w is None and bids_dir is not None:
        anat.t1w, anat.t1w_reason = find_t1w(bids_dir, run)
    return anat
