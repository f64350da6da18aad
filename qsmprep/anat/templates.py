"""Output spaces and TemplateFlow templates/atlases, offline.

``--output-spaces`` follows fMRIPrep: ``T1w``, ``MNI152NLin6Asym:res-2``, ``MNI152NLin2009cAsym`` (a
template without ``res-`` uses resolution 1 mm, ``res-1``). Templates and atlases come through
``templateflow`` (``TEMPLATEFLOW_HOME``); nothing is downloaded during a run: every file is first looked
up at its TemplateFlow path and must exist and be non-empty (TemplateFlow serves such a file without
network); a missing one is an :class:`~qsmprep.utils.errors.InputError` (one line: the template and the
command that fetches it) before any work.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SUPPORTED_TEMPLATES",
    "Space",
    "parse_space",
    "parse_spaces",
    "templateflow_home",
    "template_path",
    "template_files",
    "atlas_files",
    "parse_atlas",
    "registration_templates",
    "fetch_command",
]

#: templates that qsmprep registers to (TemplateFlow identifiers)
SUPPORTED_TEMPLATES = ("MNI152NLin6Asym", "MNI152NLin2009cAsym")
_NONSTANDARD = ("T1w", "GRE")


@dataclass(frozen=True)
class Space:
    """One output space: ``name`` (``T1w`` or a template) and, for templates, ``res`` (TemplateFlow
    resolution index, 1 or 2)."""

    name: str
    res: int | None = None

    @property
    def is_template(self) -> bool:
        return self.name in SUPPORTED_TEMPLATES

    @property
    def entities(self) -> str:
        """``space-<name>[_res-<r>]`` (BIDS entities of a file in this space)."""
        return f"space-{self.name}" + (f"_res-{self.res}" if self.res is not None else "")

    def __str__(self) -> str:
        return self.name + (f":res-{self.res}" if self.res is not None else "")


def parse_space(text: str) -> Space:
    """``T1w`` | ``<template>[:res-<n>]`` -> :class:`Space` (``ValueError`` with the accepted values)."""
    m = re.fullmatch(r"([A-Za-z0-9]+)(?::res-(\d+))?", str(text).strip())
    if not m:
        raise ValueError(f"output space {text!r}: expected T1w or <template>[:res-<n>]")
    name, res = m.group(1), m.group(2)
    if name in _NONSTANDARD:
        if res is not None:
            raise ValueError(f"output space {text!r}: {name} takes no resolution")
        return Space(name)
    if name not in SUPPORTED_TEMPLATES:
        raise ValueError(f"output space {text!r}: unknown; use T1w, GRE or one of {', '.join(SUPPORTED_TEMPLATES)}")
    r = 1 if res is None else int(res)
    if r not in (1, 2):
        raise ValueError(f"output space {text!r}: res-{r} is not supported (res-1 or res-2)")
    return Space(name, r)


def parse_spaces(values) -> list[Space]:
    """Unique spaces in the given order (``GRE`` is the native grid, always written, and dropped here)."""
    out: list[Space] = []
    for v in values or ():
        s = parse_space(v)
        if s.name != "GRE" and s not in out:
            out.append(s)
    return out


def templateflow_home() -> Path:
    """``TEMPLATEFLOW_HOME`` (TemplateFlow's default ``~/.cache/templateflow`` when unset)."""
    home = os.environ.get("TEMPLATEFLOW_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "templateflow"


def template_path(template: str, suffix: str, res: int | None = None, desc: str | None = None,
                  atlas: str | None = None, extension: str = ".nii.gz") -> Path:
    """The TemplateFlow path of one file (``tpl-<t>/tpl-<t>[_res-0<r>][_atlas-<a>][_desc-<d>]_<suffix><ext>``)."""
    parts = [f"tpl-{template}"]
    if res is not None:
        parts.append(f"res-{int(res):02d}")
    if atlas:
        parts.append(f"atlas-{atlas}")
    if desc:
        parts.append(f"desc-{desc}")
    return templateflow_home() / f"tpl-{template}" / ("_".join(parts + [suffix]) + extension)


def fetch_command(template: str, res: int | None, queries: list[dict]) -> str:
    calls = "; ".join(f"get('{template}'" + (f", resolution={res}" if res is not None else "")
                      + "".join(f", {k}={v!r}" for k, v in q.items()) + ")" for q in queries)
    return f'python -c "from templateflow.api import get; {calls}"'


def _get(template: str, res: int | None, query: dict) -> Path:
    """One file through TemplateFlow, offline: it must already exist non-empty at its TemplateFlow path."""
    path = template_path(template, res=res, **query)
    if not path.is_file() or path.stat().st_size == 0:
        q = {k: v for k, v in query.items() if k != "extension"}
        raise FileNotFoundError(
            f"template {template} (res-{res}, {', '.join(f'{k}-{v}' for k, v in q.items() if v)}) is not in "
            f"TEMPLATEFLOW_HOME={templateflow_home()} ({path.name} missing or empty); fetch it (with network) with: "
            + fetch_command(template, res, [q]))
    try:
        from templateflow.client import TemplateFlowClient

        client = TemplateFlowClient(root=templateflow_home(), autoupdate=False)
        kw = {k: v for k, v in query.items() if k != "extension"}
        got = client.get(template, resolution=res, extension=query.get("extension", ".nii.gz"), **kw)
        got = got if isinstance(got, list) else [got]
        got = [Path(g) for g in got if Path(g).name == path.name]
        if got:
            return got[0]
    except ImportError:  # pragma: no cover - templateflow is a dependency; the path lookup is equivalent
        pass
    return path


def template_files(space: Space) -> dict[str, Path]:
    """``{"T1w": ..., "mask": ...}`` of a template space (T1w image and brain mask)."""
    q_t1 = {"suffix": "T1w", "desc": None}
    q_mask = {"suffix": "mask", "desc": "brain"}
    try:
        return {"T1w": _get(space.name, space.res, q_t1), "mask": _get(space.name, space.res, q_mask)}
    except FileNotFoundError as exc:
        raise FileNotFoundError(str(exc).split("; fetch it")[0] + "; fetch it (with network) with: "
                                + fetch_command(space.name, space.res, [q_t1, q_mask])) from None


def atlas_files(template: str, res: int, atlas: str, desc: str | None = None) -> tuple[Path, Path | None]:
    """``(dseg image, label table or None)`` of a TemplateFlow atlas
    (``tpl-<t>_res-0<r>_atlas-<a>[_desc-<d>]_dseg.nii.gz`` and ``tpl-<t>_atlas-<a>[_desc-<d>]_dseg.tsv``)."""
    img = _get(template, res, {"suffix": "dseg", "atlas": atlas, "desc": desc})
    tsv = None
    for r in (None, res):
        p = template_path(template, "dseg", res=r, atlas=atlas, desc=desc, extension=".tsv")
        if p.is_file() and p.stat().st_size > 0:
            tsv = p
            break
    return img, tsv


def parse_atlas(text: str) -> tuple[str, str, str | None, int]:
    """``<template>:<atlas>[:desc-<d>][:res-<r>]`` -> ``(template, atlas, desc, res)`` (res default 2)."""
    parts = str(text).strip().split(":")
    if len(parts) < 2 or parts[0] not in SUPPORTED_TEMPLATES or not re.fullmatch(r"[A-Za-z0-9]+", parts[1]):
        raise ValueError(f"atlas {text!r}: expected <template>:<atlas>[:desc-<d>][:res-<r>] with a template of "
                         f"{', '.join(SUPPORTED_TEMPLATES)}")
    desc, res = None, 2
    for p in parts[2:]:
        m = re.fullmatch(r"(desc|res)-([A-Za-z0-9]+)", p)
        if not m:
            raise ValueError(f"atlas {text!r}: {p!r} is neither desc-<label> nor res-<n>")
        if m.group(1) == "desc":
            desc = m.group(2)
        else:
            res = int(m.group(2))
    return parts[0], parts[1], desc, res


def registration_templates(spaces, atlases) -> dict[str, int]:
    """``{template: res}``: the templates the T1w is registered to, one per name, on the grid of the first
    resolution asked for (``spaces``: :class:`Space` list, output spaces first; ``atlases``: :func:`parse_atlas`
    tuples, an atlas adds its template at its own resolution when no output space names it)."""
    out: dict[str, int] = {}
    for s in spaces:
        if s.is_template:
            out.setdefault(s.name, s.res)
    for template, _, _, res in atlases:
        out.setdefault(template, res)
    return out


#: what the container images fetch at build time (``python -m qsmprep.anat.templates``), where the network allows:
#: the two supported templates (T1w and brain mask at the resolutions fMRIPrep's defaults use) and the
#: Harvard-Oxford cortical atlas of MNI152NLin6Asym
PREFETCH: tuple[tuple[str, int, dict], ...] = (
    ("MNI152NLin6Asym", 2, {"suffix": "T1w", "desc": None}),
    ("MNI152NLin6Asym", 2, {"suffix": "mask", "desc": "brain"}),
    ("MNI152NLin6Asym", 2, {"suffix": "dseg", "atlas": "HOCPA", "desc": "th25"}),
    ("MNI152NLin2009cAsym", 1, {"suffix": "T1w", "desc": None}),
    ("MNI152NLin2009cAsym", 1, {"suffix": "mask", "desc": "brain"}),
    ("MNI152NLin2009cAsym", 2, {"suffix": "T1w", "desc": None}),
    ("MNI152NLin2009cAsym", 2, {"suffix": "mask", "desc": "brain"}),
)


def prefetch() -> int:  # pragma: no cover - needs the network (container build)
    """Fetch :data:`PREFETCH` into TEMPLATEFLOW_HOME with ``templateflow.api.get``; returns the number missing."""
    from templateflow import api

    missing = 0
    for template, res, query in PREFETCH:
        try:
            api.get(template, resolution=res, extension=".nii.gz", **query)
        except Exception as exc:  # noqa: BLE001 - report and go on: the run-time check names what is missing
            print(f"could not fetch {template} res-{res} {query}: {exc}")
            missing += 1
    return missing


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(1 if prefetch() else 0)
