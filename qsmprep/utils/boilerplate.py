"""Methods boilerplate (``OUTPUT_DIR/logs/CITATION.md``) and the catalogue of method names.

The text describes the methods a run actually uses (the choices in
:class:`~qsmprep.config.QsmprepConfig` and the parameters each function will run with, defaults
included) and cites the paper of each. The same catalogue gives the sidecars their
``EstimationAlgorithm`` and ``EstimationReference`` values.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qsmprep.__about__ import __version__

__all__ = [
    "REFERENCES",
    "METHODS",
    "canonical_method",
    "method_label",
    "method_references",
    "method_params",
    "build_boilerplate",
    "write_citation",
]

#: key -> (citation, DOI)
REFERENCES: dict[str, tuple[str, str]] = {
    "dymerska2021": (
        "Dymerska B, Eckstein K, Bachrata B, et al. Phase unwrapping with a rapid opensource minimum spanning "
        "tree algorithm (ROMEO). Magn Reson Med. 2021;85:2294-2308.",
        "10.1002/mrm.28563",
    ),
    "eckstein2018": (
        "Eckstein K, Dymerska B, Bachrata B, et al. Computationally efficient combination of multi-channel "
        "phase data from multi-echo acquisitions (ASPIRE). Magn Reson Med. 2018;79:2996-3006.",
        "10.1002/mrm.26963",
    ),
    "stewart2022": (
        "Stewart AW, Robinson SD, O'Brien K, et al. QSMxT: Robust masking and artifact reduction for "
        "quantitative susceptibility mapping. Magn Reson Med. 2022;87:1289-1300.",
        "10.1002/mrm.29048",
    ),
    "schofield2003": (
        "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric applications. "
        "Opt Lett. 2003;28:1194-1196.",
        "10.1364/OL.28.001194",
    ),
    "wu2012": (
        "Wu B, Li W, Guidon A, Liu C. Whole brain susceptibility mapping using compressed sensing. "
        "Magn Reson Med. 2012;67:137-147.",
        "10.1002/mrm.23000",
    ),
    "li2011": (
        "Li W, Wu B, Liu C. Quantitative susceptibility mapping of human brain reflects spatial variation in "
        "tissue composition. NeuroImage. 2011;55:1645-1656.",
        "10.1016/j.neuroimage.2010.11.088",
    ),
    "schweser2011": (
        "Schweser F, Deistung A, Lehr BW, Reichenbach JR. Quantitative imaging of intrinsic magnetic tissue "
        "properties using MRI signal phase: an approach to in vivo brain iron metabolism? NeuroImage. "
        "2011;54:2789-2807.",
        "10.1016/j.neuroimage.2010.10.070",
    ),
    "liu2011": (
        "Liu T, Khalidov I, de Rochefort L, et al. A novel background field removal method for MRI using "
        "projection onto dipole fields (PDF). NMR Biomed. 2011;24:1129-1136.",
        "10.1002/nbm.1670",
    ),
    "wen2014": (
        "Wen Y, Zhou D, Liu T, Spincemaille P, Wang Y. An iterative spherical mean value method for background "
        "field removal in MRI. Magn Reson Med. 2014;72:1065-1071.",
        "10.1002/mrm.24998",
    ),
    "zhou2014": (
        "Zhou D, Liu T, Spincemaille P, Wang Y. Background field removal by solving the Laplacian boundary "
        "value problem. NMR Biomed. 2014;27:312-319.",
        "10.1002/nbm.3064",
    ),
    "bollmann2019": (
        "Bollmann S, Rasmussen KGB, Kristensen M, et al. DeepQSM - using deep learning to solve the dipole "
        "inversion for quantitative susceptibility mapping. NeuroImage. 2019;195:373-383.",
        "10.1016/j.neuroimage.2019.03.060",
    ),
    "cognolato2023": (
        "Cognolato F, O'Brien K, Jin J, et al. NeXtQSM - A complete deep learning pipeline for data-consistent "
        "quantitative susceptibility mapping trained with hybrid data. Med Image Anal. 2023;84:102700.",
        "10.1016/j.media.2022.102700",
    ),
    "aggarwal2019": (
        "Aggarwal HK, Mani MP, Jacob M. MoDL: Model-based deep learning architecture for inverse problems. "
        "IEEE Trans Med Imaging. 2019;38:394-405.",
        "10.1109/TMI.2018.2865356",
    ),
    "jung2020": (
        "Jung W, Yoon J, Ji S, et al. Exploring linearity of deep neural network trained QSM: QSMnet+. "
        "NeuroImage. 2020;211:116619.",
        "10.1016/j.neuroimage.2020.116619",
    ),
    "kames2018": (
        "Kames C, Wiggermann V, Rauscher A. Rapid two-step dipole inversion for susceptibility mapping with "
        "sparsity priors. NeuroImage. 2018;167:276-283.",
        "10.1016/j.neuroimage.2017.11.018",
    ),
    "bilgic2014tv": (
        "Bilgic B, Fan AP, Polimeni JR, et al. Fast quantitative susceptibility mapping with L1-regularization "
        "and automatic parameter selection. Magn Reson Med. 2014;72:1444-1459.",
        "10.1002/mrm.25029",
    ),
    "bilgic2014l2": (
        "Bilgic B, Chatnuntawech I, Fan AP, et al. Fast image reconstruction with L2-regularization. "
        "J Magn Reson Imaging. 2014;40:181-191.",
        "10.1002/jmri.24365",
    ),
    "shmueli2009": (
        "Shmueli K, de Zwart JA, van Gelderen P, Li TQ, Dodd SJ, Duyn JH. Magnetic susceptibility mapping of "
        "brain tissue in vivo using MRI phase data. Magn Reson Med. 2009;62:1510-1522.",
        "10.1002/mrm.22135",
    ),
    "wharton2010": (
        "Wharton S, Schafer A, Bowtell R. Susceptibility mapping in the human brain using threshold-based "
        "k-space division. Magn Reson Med. 2010;63:1292-1304.",
        "10.1002/mrm.22334",
    ),
    "consensus2024": (
        "QSM Consensus Organization Committee; Bilgic B, Costagli M, Chan KS, et al. Recommended implementation "
        "of quantitative susceptibility mapping for clinical research in the brain: a consensus of the ISMRM "
        "electro-magnetic tissue properties study group. Magn Reson Med. 2024;91:1834-1862.",
        "10.1002/mrm.30006",
    ),
    "liu2018csf": (
        "Liu Z, Spincemaille P, Yao Y, Zhang Y, Wang Y. MEDI+0: Morphology enabled dipole inversion with automatic "
        "uniform cerebrospinal fluid zero reference for quantitative susceptibility mapping. Magn Reson Med. "
        "2018;79:2795-2803.",
        "10.1002/mrm.26946",
    ),
    "pei2015": (
        "Pei M, Nguyen TD, Thimmappa ND, et al. Algorithm for fast monoexponential fitting based on "
        "Auto-Regression on Linear Operations (ARLO) of data. Magn Reson Med. 2015;73:843-850.",
        "10.1002/mrm.25137",
    ),
    "gorgolewski2011": (
        "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and extensible neuroimaging "
        "data processing framework in Python. Front Neuroinform. 2011;5:13.",
        "10.3389/fninf.2011.00013",
    ),
}

#: stage -> method -> (display label, sentence fragment describing it, reference keys)
METHODS: dict[str, dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "masking": {
        "phase": (
            "QSMxT phase-quality mask",
            "thresholding the ROMEO voxel-quality map of the first echo (Otsu threshold scaled by a factor), "
            "followed by hole filling and erosion, as in QSMxT",
            ("stewart2022", "dymerska2021"),
        ),
        "magnitude": (
            "magnitude threshold mask",
            "thresholding the root-sum-of-squares magnitude over echoes (Otsu), followed by hole filling and "
            "erosion as in QSMxT",
            ("stewart2022",),
        ),
        "robust": (
            "robust magnitude mask",
            "a robust threshold of the combined magnitude (noise and signal levels from quantiles, as in "
            "MriResearchTools) with smoothing and hole filling",
            (),
        ),
    },
    "unwrapping": {
        "romeo": (
            "ROMEO",
            "ROMEO, a quality-guided region-growing unwrapper (template mode: echo 1 spatially, the other echoes "
            "temporally)",
            ("dymerska2021",),
        ),
        "laplacian": (
            "Laplacian unwrapping",
            "Laplacian (Poisson) unwrapping of each echo",
            ("schofield2003",),
        ),
    },
    "offset": {
        "mcpc3ds": (
            "MCPC-3D-S",
            "MCPC-3D-S, which estimates it from the phase difference of the first two echoes and smooths it",
            ("eckstein2018",),
        ),
    },
    "bgremove": {
        "vsharp": ("V-SHARP", "variable-kernel sophisticated harmonic artifact reduction for phase data (V-SHARP)",
                   ("wu2012", "li2011")),
        "sharp": ("SHARP", "sophisticated harmonic artifact reduction for phase data (SHARP)", ("schweser2011",)),
        "pdf": ("PDF", "projection onto dipole fields (PDF)", ("liu2011",)),
        "ismv": ("iSMV", "the iterative spherical mean value method (iSMV)", ("wen2014",)),
        "lbv": ("LBV", "the Laplacian boundary value method (LBV)", ("zhou2014",)),
        "nextqsm": ("NeXtQSM background removal (PDF with a learned susceptibility prior)",
                    "projection onto dipole fields (PDF) alternated with a NeXtQSM-style variational network as "
                    "the susceptibility prior: the background sources outside the brain were refitted (PDF's "
                    "conjugate gradients, warm-started) to the part of the total field that the network's "
                    "susceptibility inside the brain does not explain, which restores the smooth part of the "
                    "local field that PDF alone removes; the network was trained by qsmprep on simulated hybrid "
                    "brains",
                    ("liu2011", "cognolato2023")),
        "nextqsm-unet": ("NeXtQSM background U-Net",
                         "a NeXtQSM-style 3D U-Net (a user-supplied trained model) that maps the masked total "
                         "field to the local field; a PDF-guided model predicts a smooth correction of PDF on a "
                         "coarse B0-aligned grid of the whole brain",
                         ("cognolato2023", "liu2011")),
    },
    "inversion": {
        "rts": ("RTS", "rapid two-step dipole inversion (RTS)", ("kames2018",)),
        "tv": ("TV-ADMM", "total-variation regularised dipole inversion solved by ADMM", ("bilgic2014tv",)),
        "tkd": ("TKD", "truncated k-space division (TKD)", ("shmueli2009",)),
        "tsvd": ("TSVD", "truncated singular value decomposition in k-space (TSVD)", ("wharton2010",)),
        "tikhonov": ("Tikhonov", "closed-form L2 (Tikhonov) regularised dipole inversion", ("bilgic2014l2",)),
        "deepqsm": ("DeepQSM", "a DeepQSM-style 3D U-Net primed with truncated k-space division (it sees the "
                    "local field and its TKD estimate and predicts a correction of TKD), trained by qsmprep on "
                    "simulated random shapes and hybrid brains with QSMnet+ range augmentation (field resampled "
                    "to a B0-aligned 1 mm grid and back), followed by one exact dipole data-consistency step",
                    ("bollmann2019", "jung2020", "shmueli2009", "aggarwal2019")),
        "nextqsm": ("NeXtQSM VarNet", "a NeXtQSM-style variational network (unrolled steps of learned CNN "
                    "regularisers, each followed by an exact dipole data-consistency solve) trained by qsmprep on "
                    "simulated hybrid brains", ("cognolato2023", "aggarwal2019", "jung2020")),
    },
    "reference": {
        "mean": ("whole-brain mean", "the mean susceptibility within the final brain mask", ("consensus2024",)),
        "csf": (
            "ventricular CSF",
            "the mean susceptibility of ventricular cerebrospinal fluid, segmented from the R2* map by "
            "thresholding near the brain centre",
            ("liu2018csf", "consensus2024"),
        ),
        "none": ("none", "no reference (the mean susceptibility is undetermined)", ()),
    },
    "r2star": {
        "loglinear": ("log-linear fit", "a weighted log-linear least-squares fit of the magnitude decay", ()),
        "arlo": ("ARLO", "auto-regression on linear operations (ARLO)", ("pei2015",)),
    },
}

#: accepted spellings of method names (lower case) -> registry name
ALIASES: dict[str, dict[str, str]] = {
    "masking": {"phase-quality": "phase", "phase_quality": "phase", "phasequality": "phase", "quality": "phase",
                "mag": "magnitude"},
    "unwrapping": {},
    "bgremove": {"v-sharp": "vsharp", "i-smv": "ismv"},
    "inversion": {"tv-admm": "tv", "tvadmm": "tv"},
    "reference": {"whole-brain": "mean", "wholebrain": "mean"},
    "r2star": {},
    "offset": {"mcpc-3d-s": "mcpc3ds", "mcpc3d-s": "mcpc3ds"},
}

_STAGE_ALIASES = {"unwrap": "unwrapping", "bgr": "bgremove", "mask": "masking"}


def _stage(stage: str) -> str:
    return _STAGE_ALIASES.get(stage, stage)


def canonical_method(stage: str, name: str) -> str:
    """The registry name of ``name`` for ``stage`` (lower case, aliases such as
    ``"phase-quality"`` -> ``"phase"`` resolved); unknown names are returned lower-cased."""
    key = str(name).strip().lower()
    return ALIASES.get(_stage(stage), {}).get(key, key)


def method_function(stage: str, name: str):
    """``(registry name, function)`` of a method. The learned methods of :mod:`qsmprep.nn` are registered
    (importing PyTorch) only when a name is not among the classical ones; unknown names raise the
    registry's ValueError listing the choices."""
    from qsmprep.qsm import registry

    stage = _stage(stage)
    table = {"masking": registry.MASKING, "unwrapping": registry.UNWRAP, "bgremove": registry.BGREMOVE,
             "inversion": registry.INVERSION, "reference": registry.REFERENCE}[stage]
    key = canonical_method(stage, name)
    if key not in table and stage in ("bgremove", "inversion"):
        import qsmprep.nn  # noqa: F401  (registers the learned methods)
    return key, table.get(key)


def method_label(stage: str, name: str) -> str:
    """Display name of a method (``"V-SHARP"``); the name itself when not catalogued."""
    key = canonical_method(stage, name)
    entry = METHODS.get(_stage(stage), {}).get(key)
    return entry[0] if entry else key


def method_references(stage: str, name: str) -> list[str]:
    """Reference keys (in :data:`REFERENCES`) of a method; empty when not catalogued."""
    entry = METHODS.get(_stage(stage), {}).get(canonical_method(stage, name))
    return list(entry[2]) if entry else []


def method_params(config: Any, stage: str) -> dict:
    """User parameters of ``stage`` from the config: ``config.method_params[stage]`` or
    ``config.<stage>_params`` (empty dict when the config has neither)."""
    stage = _stage(stage)
    table = getattr(config, "method_params", None) or {}
    if isinstance(table, Mapping) and isinstance(table.get(stage), Mapping):
        return dict(table[stage])
    value = getattr(config, f"{stage}_params", None)
    return dict(value) if isinstance(value, Mapping) else {}


def format_reference(key: str) -> str:
    """``"<citation> doi:<doi>"`` of a reference key."""
    text, doi = REFERENCES[key]
    return f"{text} doi:{doi}"


# --------------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------------


class _Citer:
    """Numbers references in order of first citation."""

    def __init__(self):
        self.order: list[str] = []

    def cite(self, keys: Iterable[str]) -> str:
        nums = []
        for k in keys:
            if k not in REFERENCES:
                continue
            if k not in self.order:
                self.order.append(k)
            nums.append(self.order.index(k) + 1)
        return f" [{', '.join(str(n) for n in nums)}]" if nums else ""


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _fmt_params(params: Mapping[str, Any]) -> str:
    items = [f"{k} = {_fmt_value(v) if v is not None else 'default'}" for k, v in params.items()]
    return "; ".join(items)


def _registry_params(stage: str, method: str, user: Mapping[str, Any]) -> dict:
    """Parameters a registry method will run with (its defaults overlaid by the user's)."""
    from qsmprep.utils.derivatives import resolve_params

    try:
        if stage == "bgremove":
            from qsmprep.qsm.registry import BGREMOVE

            out = resolve_params(BGREMOVE.get(method), user, skip=("total_field_ppm", "mask", "voxel_size_mm",
                                                                   "b0_dir", "weight"))
            if method == "vsharp" and out.get("radii_mm") is None:
                out["radii_mm"] = "12 mm down to twice the largest voxel size, in steps of max(voxel size, 1 mm)"
            return out
        if stage == "inversion":
            from qsmprep.qsm.registry import INVERSION

            return resolve_params(INVERSION.get(method), user, skip=("local_field_ppm", "mask", "voxel_size_mm",
                                                                     "b0_dir"))
        if stage == "masking":
            from qsmprep.qsm import masking
            from qsmprep.qsm.registry import MASKING

            under = {"phase": "phase_quality_mask", "magnitude": "magnitude_mask", "robust": "robust_mask"}.get(method)
            funcs = [MASKING.get(method)] + ([getattr(masking, under)] if under else [])
            return resolve_params(funcs, user, skip=("phase_rad_4d", "magnitude_4d", "echo_times_s", "voxel_size_mm",
                                                     "magnitude", "weight", "return_unfilled"))
    except (ImportError, ValueError):
        return dict(user)
    return dict(user)


def _series_summary(runs: Sequence[Any] | None) -> str:
    if not runs:
        return ""
    subjects = sorted({r.subject for r in runs})
    n_echoes = sorted({len(r.echo_times_s) for r in runs})
    fields = sorted({float(r.field_strength_t) for r in runs})
    echo_txt = " or ".join(str(n) for n in n_echoes)
    field_txt = ", ".join(f"{b:g}" for b in fields)
    return (
        f"{len(runs)} gradient-echo series of {len(subjects)} participant{'s' if len(subjects) != 1 else ''} "
        f"({echo_txt} echo{'es' if n_echoes != [1] else ''}; {field_txt} T) "
        f"{'was' if len(runs) == 1 else 'were'} processed. "
    )


def build_boilerplate(config: Any, runs: Sequence[Any] | None = None) -> str:
    """Markdown methods description of a qsmprep run with numbered references.

    ``config`` is a :class:`~qsmprep.config.QsmprepConfig` (or any object with its method attributes);
    ``runs`` (optional :class:`~qsmprep.utils.bids.QsmRun` list) adds a summary of the data and says
    when single-echo series skip the phase-offset correction.
    """
    c = _Citer()
    masking = canonical_method("masking", getattr(config, "masking", "phase"))
    unwrapping = canonical_method("unwrapping", getattr(config, "unwrapping", "romeo"))
    bgremove = canonical_method("bgremove", getattr(config, "bgremove", "vsharp"))
    inversion = canonical_method("inversion", getattr(config, "inversion", "rts"))
    reference = canonical_method("reference", getattr(config, "reference", "mean"))
    r2star = bool(getattr(config, "r2star", False))
    t2star = bool(getattr(config, "t2star", False))
    any_single = bool(runs) and any(len(r.echo_times_s) < 2 for r in runs)
    any_multi = not runs or any(len(r.echo_times_s) >= 2 for r in runs)
    any_complex = bool(runs) and any(getattr(r, "is_complex", False) for r in runs)

    def describe(stage: str, method: str) -> tuple[str, str]:
        entry = METHODS.get(stage, {}).get(method)
        if entry is None:
            return f"the '{method}' method", ""
        return entry[1], c.cite(entry[2])

    p = []
    p.append(
        f"Quantitative susceptibility mapping (QSM) was performed with *qsmprep* {__version__}, a BIDS App "
        f"built on Nipype {_version('nipype')}{c.cite(['gorgolewski2011'])}, NumPy {_version('numpy')}, "
        f"SciPy {_version('scipy')} and NiBabel {_version('nibabel')} (Python {platform.python_version()}), "
        "following the recommendations of the ISMRM QSM consensus"
        f"{c.cite(['consensus2024'])}. " + _series_summary(runs)
    )
    steps = []
    prep = "Phase images were scaled to radians"
    if any_complex:
        prep += " (magnitude and phase were first computed from the real and imaginary images)"
    prep += (
        ", and all echoes were kept on the grid of the first-echo magnitude image. The direction of the main "
        "magnetic field in the image frame was taken from the NIfTI affine (or from a `B0_dir` sidecar entry), so "
        "oblique acquisitions were processed without resampling."
    )
    steps.append(prep)
    if any_multi:
        text, refs = describe("offset", "mcpc3ds")
        s = f"The echo-independent phase offset was removed with {text}{refs}"
        s += " (single-echo series skip this step)." if any_single else "."
        steps.append(s)
    text, refs = describe("masking", masking)
    mp = _fmt_params(_registry_params("masking", masking, method_params(config, "masking")))
    steps.append(f"A brain mask was obtained by {text}{refs}" + (f" (parameters: {mp})." if mp else "."))
    text, refs = describe("unwrapping", unwrapping)
    steps.append(f"The phase was unwrapped within the mask with {text}{refs}.")
    steps.append(
        "The B0 field map (Hz) was estimated from the unwrapped phase as an average of phase over echo time across "
        "echoes, weighted by magnitude and echo time (phase-SNR weighting, as in ROMEO)"
        f"{c.cite(['dymerska2021'])}, and converted to a relative field in ppm with gamma/2pi = 42.577 MHz/T and "
        "the nominal field strength."
    )
    text, refs = describe("bgremove", bgremove)
    bp = _fmt_params(_registry_params("bgremove", bgremove, method_params(config, "bgremove")))
    steps.append(
        f"Background fields were removed with {text}{refs}" + (f" (parameters: {bp})" if bp else "")
        + "; the mask was eroded accordingly and this eroded mask defines the susceptibility map."
    )
    text, refs = describe("inversion", inversion)
    ip = _fmt_params(_registry_params("inversion", inversion, method_params(config, "inversion")))
    steps.append(
        f"The local field (ppm) was inverted to magnetic susceptibility (ppm) with {text}{refs}"
        + (f" (parameters: {ip})" if ip else "")
        + ", using a dipole kernel oriented along the measured B0 direction."
    )
    if r2star or t2star or reference == "csf":
        r2_text = "R2* (1/s) and T2* (s) maps were" if (r2star and t2star) else (
            "T2* (s) maps were" if t2star and not r2star else "R2* (1/s) maps were")
        if not (r2star or t2star):
            r2_text = "An R2* map (1/s) was"
        steps.append(f"{r2_text} estimated from the multi-echo magnitude with a weighted log-linear least-squares fit.")
    text, refs = describe("reference", reference)
    if reference == "none":
        steps.append("Susceptibility values were not referenced; their mean is arbitrary.")
    else:
        steps.append(
            f"Susceptibility values are reported in ppm relative to {text}{refs}; the reference region and the "
            "subtracted offset are recorded in each map's JSON sidecar"
            + (" together with the region's susceptibility referenced to the whole-brain mean." if reference != "mean"
               else ".")
        )
    p.append(" ".join(steps))
    p.append(
        "### Copyright waiver\n\nThe above boilerplate text was automatically generated by qsmprep with the "
        "express intention that users should copy and paste this text into their manuscripts *unchanged*. "
        "It is released under the CC0 license."
    )
    refs_md = "\n".join(f"{i + 1}. {format_reference(k)}" for i, k in enumerate(c.order))
    p.append("### References\n\n" + refs_md)
    return "\n\n".join(p).strip() + "\n"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(not installed)"


def _bibtex() -> str:
    out = []
    for key, (text, doi) in REFERENCES.items():
        out.append(f"@article{{{key},\n  note = {{{text}}},\n  doi = {{{doi}}}\n}}\n")
    return "\n".join(out)


def write_citation(output_dir: str | os.PathLike, config: Any, runs: Sequence[Any] | None = None) -> Path:
    """Write ``OUTPUT_DIR/logs/CITATION.md`` (and ``CITATION.bib``) atomically; returns the .md path."""
    from qsmprep.utils.derivatives import atomic_write_text

    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    md = logs / "CITATION.md"
    atomic_write_text(md, build_boilerplate(config, runs))
    atomic_write_text(logs / "CITATION.bib", _bibtex())
    return md
