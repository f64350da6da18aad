"""The output spec: every file qsmprep writes into OUTPUT_DIR, defined once as data.

The workflow's sinks (:func:`qsmprep.workflows.qsm.init_ds_qsm_wf`), the ``.bidsignore``
(:func:`bidsignore_text`), the report reader (:mod:`qsmprep.reports.reader`) and the table of
docs/outputs.md (:func:`markdown_table`, kept equal to the docs by a test) all read it.

Per series the files are ``sub-<s>/[ses-<t>/]anat/<prefix>_<stem><extension>`` (``<prefix>`` the raw
entities without ``echo`` and ``part``; :attr:`Output.stem`), each image with a JSON sidecar. Dataset
level: ``dataset_description.json``, ``.bidsignore``, ``logs/CITATION.md``/``.bib``, per participant
``sub-<s>/log/<run_uuid>/`` (crash files and ``qsmprep.toml``, the settings of the run), the HTML
reports and the group tables.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Output",
    "OUTPUTS",
    "IMAGES",
    "ROI_COLUMNS",
    "output",
    "run_anat_dir",
    "bidsignore_text",
    "markdown_table",
    "DATASET_FILES",
    "tree_markdown",
    "output_globs",
]

#: Columns of the ROI statistics table (``_desc-roi_stats.tsv``).
ROI_COLUMNS = ("label", "name", "n_voxels", "mean_ppm", "median_ppm", "std_ppm")

# why a file is not BIDS data (the comment lines of .bidsignore, in this order)
_LOGS = "qsmprep: logs, crash files and the run settings are not BIDS data"
_FIELDMAPS = "the B0 field map and local field have no anat suffix in BIDS (qsmprep writes them as *_fieldmap)"
_TABLES = "QC metrics and ROI statistics are qsmprep tables, not BIDS files"
_REPORTS = "reports (HTML and figures) and the group-level tables"
_XFMS = ("transforms (from-/to-/mode- xfm files, named as sMRIPrep/fMRIPrep name them): BIDS 1.11.1 (schema 1.2.7, "
         "bids-validator-deno 3.0.2) has no xfm suffix and no from/to/mode entities yet (BEP014)")
_SPACES = "`--output-spaces` with a T1w (found in the BIDS dataset or `--derivatives`)"


@dataclass(frozen=True)
class Output:
    """One per-series derivative file."""

    #: key of the file (also the key of its sidecar in :func:`qsmprep.utils.derivatives.build_sidecars`)
    key: str
    suffix: str
    content: str
    units: str = ""
    #: where the values are defined (images)
    defined_in: str = ""
    #: when it is written
    when: str = "always"
    desc: str | None = None
    label: str | None = None
    extension: str = ".nii.gz"
    #: on-disk data type of an image (None: a table)
    dtype: str | None = "float32"
    #: why it is not BIDS data (listed in .bidsignore), None when it is
    not_bids: str | None = None
    #: entities before the suffix with ``{placeholders}`` filled in by :meth:`path` (e.g.
    #: ``{space}_desc-brain``, ``from-T1w_to-{template}_mode-image``); replaces ``label``/``desc``
    entities: str | None = None

    @property
    def stem(self) -> str:
        """``[label-<l>_][desc-<d>_]<suffix>`` (the name after ``<prefix>_``, without extension; with
        ``{placeholders}`` for the templated ones)."""
        if self.entities:
            return f"{self.entities}_{self.suffix}"
        parts = ([f"label-{self.label}"] if self.label else []) + ([f"desc-{self.desc}"] if self.desc else [])
        return "_".join(parts + [self.suffix])

    @property
    def doc_stem(self) -> str:
        """The stem with ``<placeholder>`` (docs)."""
        return self.stem.replace("{", "<").replace("}", ">")

    @property
    def is_image(self) -> bool:
        return self.dtype is not None

    @property
    def sink(self) -> str:
        """Name of the workflow node that writes it."""
        return f"ds_{self.key}"

    def name(self, prefix: str, extension: str | None = None, **fill: str) -> str:
        stem = self.stem.format(**fill) if fill else self.stem
        return f"{prefix}_{stem}{self.extension if extension is None else extension}"

    def path(self, output_dir: str | os.PathLike, run: Any, **fill: str) -> Path:
        """``OUTPUT_DIR/sub-<s>/[ses-<t>/]anat/<prefix>_<stem><extension>`` of a run (a
        :class:`~qsmprep.utils.bids.QsmRun`); ``fill`` the placeholders of a templated stem (``space``:
        ``space-<name>[_res-<r>]``, ``template``, ``seg``)."""
        return Path(output_dir) / run_anat_dir(run) / self.name(run.prefix(), **fill)

    @property
    def ignore_pattern(self) -> str:
        """Its .bidsignore pattern (images with their sidecar)."""
        stem = re.sub(r"\{[a-z]+\}", "*", self.stem)
        return f"*_{stem}.*" if self.is_image or self.extension in (".h5", ".txt") else f"*_{stem}{self.extension}"


OUTPUTS: tuple[Output, ...] = (
    Output("chimap", "Chimap", "magnetic susceptibility, referenced (see `ReferenceRegion`)", "ppm",
           "`desc-brain_mask`; 0 outside"),
    Output("brain_mask", "mask", "final brain mask: the masking step's mask after the erosion of background field "
           "removal; region of the local field and of the Chimap", "0/1", "whole image", desc="brain", dtype="uint8"),
    Output("total_fieldmap", "fieldmap", "B0 field map (frequency offset) fitted from the unwrapped echoes, "
           "including background fields", "Hz", "masking-step mask (before erosion); 0 outside", desc="total",
           not_bids=_FIELDMAPS),
    Output("local_fieldmap", "fieldmap", "local field dB/B0 after background field removal", "ppm",
           "`desc-brain_mask`; 0 outside", desc="local", not_bids=_FIELDMAPS),
    Output("r2starmap", "R2starmap", "R2* from the magnitude decay", "1/s", "masking-step mask; 0 outside",
           when="`--r2star`"),
    Output("t2starmap", "T2starmap", "T2* = 1/R2*", "s", "masking-step mask; 0 outside and where R2* <= 0",
           when="`--t2star`"),
    Output("swi", "T2starw", "susceptibility-weighted image (CLEAR-SWI): root-sum-of-squares magnitude over echoes "
           "x phase mask of the in-plane high-pass filtered B0 field (darkens paramagnetic veins)", "a.u.",
           "whole image", when="`--swi`", desc="swi"),
    Output("minip", "T2starw", "minimum-intensity projection of the SWI over a slab along the slice axis "
           "(`--swi-minip-slab-mm`, moving window, same grid)", "a.u.", "whole image", when="`--swi`",
           desc="minIP"),
    Output("reference_mask", "mask", "reference region of `--reference csf` (ventricular CSF)", "0/1", "whole image",
           when="`--reference csf`", label="CSF", dtype="uint8"),
    Output("chimap_space", "Chimap", "the Chimap resampled into an output space (`space-T1w`, "
           "`space-<template>_res-<r>`; linear interpolation through GRE -> T1w [-> template])", "ppm",
           "`{space}_desc-brain_mask`; 0 outside", when=_SPACES, entities="{space}"),
    Output("brain_mask_space", "mask", "the brain mask resampled into an output space (nearest neighbour)", "0/1",
           "whole image", when=_SPACES, entities="{space}_desc-brain", dtype="uint8"),
    Output("xfm_gre_t1w", "xfm", "rigid transform GRE (echo-combined magnitude) -> T1w, ITK text (ANTs), with a "
           "JSON sidecar (settings, sources, time)", when=_SPACES, entities="from-GRE_to-T1w_mode-image",
           extension=".txt", dtype=None, not_bids=_XFMS),
    Output("xfm_t1w_template", "xfm", "T1w -> template composite transform (affine + SyN warp, ITK HDF5), with a "
           "JSON sidecar; copied when sMRIPrep/fMRIPrep gave one", when=_SPACES + " naming a template",
           entities="from-T1w_to-{template}_mode-image", extension=".h5", dtype=None, not_bids=_XFMS),
    Output("xfm_template_t1w", "xfm", "its inverse (template -> T1w), used to bring atlases to the GRE grid",
           when=_SPACES + " naming a template", entities="from-{template}_to-T1w_mode-image", extension=".h5",
           dtype=None, not_bids=_XFMS),
    Output("qc_metrics", "metrics", "QC metrics and their flags (see docs/qc.md)", when="always", desc="qc",
           extension=".json", dtype=None, not_bids=_TABLES),
    Output("roi_stats", "stats", "susceptibility statistics per region of a segmentation (columns "
           + ", ".join(f"`{c}`" for c in ROI_COLUMNS) + ")", when="`--segmentation-dir`", desc="roi",
           extension=".tsv", dtype=None, not_bids=_TABLES),
    Output("roi_stats_seg", "stats", "the same statistics per region of a registered segmentation (`seg-aseg`: "
           "FreeSurfer/sMRIPrep aseg, FreeSurfer names; `seg-dseg`: sMRIPrep tissue classes) or of a template atlas "
           "(`seg-<atlas>`, `--atlas`) resampled onto the GRE grid (labels: nearest/generic label interpolation); "
           "provenance in its JSON sidecar", when="a T1w with a segmentation in `--derivatives`, or `--atlas`",
           entities="seg-{seg}_desc-roi", extension=".tsv", dtype=None, not_bids=_TABLES),
    Output("roi_stats_seg_meta", "stats", "sidecar of a `seg-<name>` table: segmentation or atlas file, label "
           "names, transforms, erosion", when="with `seg-<name>_desc-roi_stats.tsv`", entities="seg-{seg}_desc-roi",
           extension=".json", dtype=None, not_bids=_TABLES),
)

#: the per-series images (with sidecars), by key
IMAGES: dict[str, Output] = {o.key: o for o in OUTPUTS if o.is_image}
_BY_KEY: dict[str, Output] = {o.key: o for o in OUTPUTS}

#: files and folders outside the series' anat folders that are not BIDS data: (reason, pattern)
_DATASET_NOT_BIDS: tuple[tuple[str, str], ...] = (
    (_LOGS, "logs/"),
    (_LOGS, "sub-*/log"),
    (_REPORTS, "sub-*.html"),
    (_REPORTS, "sub-*/figures"),
    (_REPORTS, "group.html"),
    (_REPORTS, "group_*.tsv"),
    (_REPORTS, "group"),
)


#: every file outside the series' anat folders: (path as documented, what it is). ``<label>``: a subject
#: label; ``<run_uuid>``: the id of one execution; ``*``: any name.
DATASET_FILES: tuple[tuple[str, str], ...] = (
    ("dataset_description.json", "BIDS derivative dataset description (GeneratedBy, DatasetLinks)"),
    (".bidsignore", "the files below that are not BIDS data"),
    ("README", "what the dataset holds"),
    ("logs/CITATION.md", "methods text with references (participant level)"),
    ("logs/CITATION.bib", "BibTeX of the papers the methods text cites"),
    ("sub-<label>.html", "participant report"),
    ("sub-<label>/figures/*.png", "figures of sub-<label>.html"),
    ("sub-<label>/log/<run_uuid>/qsmprep.toml", "settings of the run (load with --config-file)"),
    ("sub-<label>/log/<run_uuid>/qsmprep.json", "run record (settings, series) for the report"),
    ("sub-<label>/log/<run_uuid>/crash-*.txt", "crash files of failed steps"),
    ("group_qc.tsv", "group level: QC metrics of every series"),
    ("group_roi.tsv", "group level: ROI statistics of every series"),
    ("group.html", "group report"),
    ("group/figures/*.png", "figures of group.html"),
    ("group/space-<template>*_desc-mean_Chimap.nii.gz", "group level: voxel-wise mean of the template-space Chimaps"),
    ("group/space-<template>*_desc-sd_Chimap.nii.gz", "group level: their SD"),
    ("group/space-<template>*_desc-n_mask.nii.gz", "group level: number of series per voxel"),
)


def tree_markdown() -> str:
    """The file tree of docs/outputs.md: :data:`DATASET_FILES` and, per series, :data:`OUTPUTS`."""
    width = 66

    def line(indent: int, path: str, what: str) -> str:
        return f"{' ' * indent}{path:<{width - indent}} {what}".rstrip()

    lines = ["```", "OUTPUT_DIR/"]
    subject_done = False
    for path, what in DATASET_FILES:
        if path.startswith("sub-<label>/"):
            if not subject_done:
                lines.append("  sub-<label>/")
                for o in OUTPUTS:
                    name = f"[ses-<label>/]anat/<prefix>_{o.stem}{o.extension}" + (" (+ .json)" if o.is_image else "")
                    lines.append(line(4, name, "" if o.when == "always" else f"with {o.when.strip('`')}"))
                subject_done = True
            lines.append(line(4, path[len("sub-<label>/"):], what))
        else:
            lines.append(line(2, path, what))
    lines.append("```")
    return "\n".join(lines) + "\n"


def output_globs() -> list[str]:
    """Shell patterns (``fnmatch``) of every file qsmprep may write, relative to OUTPUT_DIR."""
    def glob(path: str) -> str:
        return path.replace("<label>", "*").replace("<run_uuid>", "*").replace("<prefix>", "sub-*").replace("<template>", "*")

    out = [glob(p) for p, _ in DATASET_FILES]
    for o in OUTPUTS:
        for ses in ("", "ses-*/"):
            base = f"sub-*/{ses}anat/sub-*_{o.stem}"
            out += [base + o.extension] + ([base + ".json"] if o.is_image else [])
    return out


def output(key: str) -> Output:
    """The spec of one per-series file (``KeyError`` for unknown keys)."""
    return _BY_KEY[key]


def run_anat_dir(run: Any) -> Path:
    """``sub-<s>/[ses-<t>/]anat`` (relative) of a run."""
    rel = Path(f"sub-{run.subject}")
    if getattr(run, "session", None):
        rel = rel / f"ses-{run.session}"
    return rel / "anat"


def bidsignore_text() -> str:
    """``OUTPUT_DIR/.bidsignore``: every file of the spec that is not BIDS data, with the reason."""
    entries = list(_DATASET_NOT_BIDS) + [(o.not_bids, o.ignore_pattern) for o in OUTPUTS if o.not_bids]
    lines: list[str] = []
    for reason in (_LOGS, _FIELDMAPS, _TABLES, _XFMS, _REPORTS):
        lines.append(f"# {reason}")
        lines += [pattern for r, pattern in entries if r == reason]
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The per-series file table of docs/outputs.md."""
    rows = ["| file | content | units | defined in | written |", "|---|---|---|---|---|"]
    for o in OUTPUTS:
        rows.append(f"| `_{o.doc_stem}{'' if o.is_image else o.extension}` | {o.content} | {o.units} | "
                    f"{o.defined_in} | {o.when} |")
    return "\n".join(rows) + "\n"
