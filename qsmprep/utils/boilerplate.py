"""Methods boilerplate (``OUTPUT_DIR/logs/CITATION.md`` and ``CITATION.bib``): text only.

The text describes the methods a run actually uses (the choices in
:class:`~qsmprep.config.QsmprepConfig` and the parameters each function will run with, defaults
included, from the method catalogue :mod:`qsmprep.methods`) and cites the paper of each
(:mod:`qsmprep.references`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from qsmprep.__about__ import __version__
from qsmprep.methods import STAGES
from qsmprep.references import REFERENCES, bibtex_entry, format_reference
from qsmprep.utils.derivatives import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from qsmprep.config import QsmprepConfig

__all__ = ["build_boilerplate", "cited_references", "write_citation"]

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


def _anatomical_text(config: "QsmprepConfig", c: "_Citer") -> str:
    """The registration paragraph (``--output-spaces``, ``--atlas``, ``--derivatives``), or ``""``."""
    spaces = [str(s) for s in (config.output_spaces or []) if str(s) != "GRE"]
    if not (spaces or config.atlas or config.derivatives):
        return ""
    templates = sorted({s.split(":")[0] for s in spaces if s != "T1w"} | {a.split(":")[0] for a in config.atlas})
    text = (f"The echo-combined (root-sum-of-squares) GRE magnitude was registered rigidly to the subject's T1w "
            f"image with ANTsPy {_version('antspyx')} (Mattes mutual information)")
    if templates:
        text += (f"; the skull-stripped T1w was registered to {', '.join(templates)} (TemplateFlow "
                 f"{_version('templateflow')}{c.cite(['ciric2022'])}) with an affine and a symmetric diffeomorphic "
                 f"(SyN, cross-correlation) transform{c.cite(['avants2008'])}, unless sMRIPrep/fMRIPrep provided it")
    text += (". Susceptibility maps were resampled with linear interpolation and label images (segmentations, "
             "atlases) with generic-label interpolation through the composed transforms")
    if spaces:
        text += f", into {', '.join(spaces)}"
    if config.atlas:
        text += f"; regional statistics were computed on the GRE grid for the atlases {', '.join(config.atlas)}"
    return text + "."


def build_boilerplate(config: "QsmprepConfig", runs: Sequence[Any] | None = None) -> str:
    """Markdown methods description of a qsmprep run with numbered references.

    ``runs`` (optional :class:`~qsmprep.utils.bids.QsmRun` list) adds a summary of the data and says
    when single-echo series skip the phase-offset correction.
    """
    return _boilerplate(config, runs)[0]


def cited_references(config: "QsmprepConfig", runs: Sequence[Any] | None = None) -> list[str]:
    """The reference keys :func:`build_boilerplate` cites for ``config`` and ``runs``, in citation order
    (the entries of ``logs/CITATION.bib``)."""
    return _boilerplate(config, runs)[1]


def _boilerplate(config: "QsmprepConfig", runs: Sequence[Any] | None) -> tuple[str, list[str]]:
    c = _Citer()
    chosen = config.chosen_methods()
    reference = config.reference
    r2star, t2star = bool(config.r2star), bool(config.t2star)
    any_single = bool(runs) and any(len(r.echo_times_s) < 2 for r in runs)
    any_multi = not runs or any(len(r.echo_times_s) >= 2 for r in runs)
    any_complex = bool(runs) and any(getattr(r, "is_complex", False) for r in runs)

    def describe(stage: str) -> tuple[str, str]:
        method = STAGES[stage].method(chosen[stage])
        return method.description, c.cite(method.references)

    def params(stage: str) -> str:
        method = STAGES[stage].method(chosen[stage])
        return _fmt_params(method.resolve_params(config.method_params.for_stage(stage)))

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
        text, refs = describe("offset")
        s = f"The echo-independent phase offset was removed with {text}{refs}"
        s += " (single-echo series skip this step)." if any_single else "."
        steps.append(s)
    text, refs = describe("masking")
    mp = params("masking")
    steps.append(f"A brain mask was obtained by {text}{refs}" + (f" (parameters: {mp})." if mp else "."))
    text, refs = describe("unwrapping")
    steps.append(f"The phase was unwrapped within the mask with {text}{refs}.")
    steps.append(
        "The B0 field map (Hz) was estimated from the unwrapped phase as an average of phase over echo time across "
        "echoes, weighted by magnitude and echo time (phase-SNR weighting, as in ROMEO)"
        f"{c.cite(['dymerska2021'])}, and converted to a relative field in ppm with gamma/2pi = 42.577 MHz/T and "
        "the nominal field strength."
    )
    text, refs = describe("bgremove")
    bp = params("bgremove")
    steps.append(
        f"Background fields were removed with {text}{refs}" + (f" (parameters: {bp})" if bp else "")
        + "; the mask was eroded accordingly and this eroded mask defines the susceptibility map."
    )
    text, refs = describe("inversion")
    ip = params("inversion")
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
        steps.append(f"{r2_text} estimated from the multi-echo magnitude with {_r2star_text(config, runs, c)}.")
    if config.swi:
        power = (f"(1 + tanh(1 - f/m))/2, m being the median positive filtered field times 10/"
                 f"{config.swi_phase_strength:g}" if config.swi_phase_scaling == "tanh"
                 else f"a linear mask of the positive filtered field raised to the power {config.swi_phase_strength:g}"
                 f"{c.cite(['haacke2004'])}")
        steps.append(
            "Susceptibility-weighted images (SWI) were computed as in CLEAR-SWI"
            f"{c.cite(['eckstein2021', 'haacke2004'])}: the root-sum-of-squares of the echo magnitudes was "
            "multiplied by a phase mask of the B0 field map, high-pass filtered by subtracting its in-plane "
            f"Gaussian-smoothed version (sigma 4 voxels), which darkens positive (paramagnetic) field with {power}; "
            f"minimum-intensity projections were taken over {config.swi_minip_slab_mm:g} mm slabs along the slice "
            "axis."
        )
    text, refs = describe("reference")
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
    anat = _anatomical_text(config, c)
    if anat:
        p.append(anat)
    p.append(
        "### Copyright waiver\n\nThe above boilerplate text was automatically generated by qsmprep with the "
        "express intention that users should copy and paste this text into their manuscripts *unchanged*. "
        "It is released under the CC0 license."
    )
    refs_md = "\n".join(f"{i + 1}. {format_reference(k)}" for i, k in enumerate(c.order))
    p.append("### References\n\n" + refs_md)
    return "\n\n".join(p).strip() + "\n", list(c.order)


def _r2star_text(config: "QsmprepConfig", runs: Sequence[Any] | None, c: _Citer) -> str:
    """The R2* method used: with ``runs``, the method each series with >= 2 echoes is fitted with
    (``auto`` resolved per series, :func:`qsmprep.qsm.multiecho.r2star_method_for`); without, the
    configured method's description."""
    from qsmprep.qsm.multiecho import r2star_method_for

    registry = STAGES["r2star"]
    if runs:
        used = list(dict.fromkeys(r2star_method_for(config.r2star_method, r.echo_times_s)
                                  for r in runs if len(r.echo_times_s) >= 2))
    else:
        used = [config.r2star_method]
    if not used:
        used = [config.r2star_method]
    parts = []
    for name in used:
        method = registry.method(name)
        parts.append(method.description + c.cite(method.references))
    if len(parts) == 1:
        return parts[0]
    return " for series with at least 3 equally spaced echoes, and ".join(
        sorted(parts, key=lambda t: not t.startswith("auto-regression"))) + " for the others"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "(not installed)"


def _bibtex(keys: Sequence[str]) -> str:
    return "\n".join(bibtex_entry(k) for k in keys)


def write_citation(output_dir: str | os.PathLike, config: "QsmprepConfig", runs: Sequence[Any] | None = None,
                   text: str | None = None) -> Path:
    """Write ``OUTPUT_DIR/logs/CITATION.md`` (``text``, default :func:`build_boilerplate`) and
    ``CITATION.bib`` (the papers the boilerplate of ``config`` and ``runs`` cites, nothing else)
    atomically; returns the .md path."""
    logs = Path(output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    md = logs / "CITATION.md"
    atomic_write_text(md, text if text is not None else build_boilerplate(config, runs))
    atomic_write_text(logs / "CITATION.bib", _bibtex(cited_references(config, runs)))
    return md
