"""The tables of ``docs/`` that state what the code decides, generated from the code so they cannot drift.

A generated block in a Markdown file sits between two markers::

    <!-- BEGIN GENERATED methods:bgremove -->
    ...
    <!-- END GENERATED -->

``python -m qsmprep.cli.docs docs/*.md`` rewrites every block from :data:`BLOCKS`; ``--check`` exits 1
(and names the file and block) when a file is out of date, which is what the test of the docs runs.
Blocks: ``methods:<stage>`` (each method of a stage with its parameters, their defaults and allowed
ranges, from the method catalogue), ``options:methods`` / ``options:anat`` (the options of the *Methods* /
*Anatomical and template spaces* group of the command line, with their choices and defaults, from the
parser), ``outputs:tree`` and ``outputs:images`` (the file tree and the per-series file table of the output
spec), ``qc:metrics`` (every QC metric with its expected range, from ``qsmprep.qsm.qc.QC_METRICS``) and
``reports:windows`` (the display windows of the report figures).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from qsmprep.cli.parser import build_parser
from qsmprep.config import QsmprepConfig
from qsmprep.methods import STAGES
from qsmprep.outputs import markdown_table, tree_markdown
from qsmprep.qsm.qc import metrics_markdown
from qsmprep.references import REFERENCES
from qsmprep.reports.figures import windows_markdown

__all__ = ["BLOCKS", "method_parameter_table", "method_options_table", "render", "blocks_in", "main"]

_BLOCK = re.compile(r"(<!-- BEGIN GENERATED (\S+) -->\n)(.*?)(<!-- END GENERATED -->)", re.S)


def _value(value) -> str:
    """A default as written in a TOML config file (tuples as lists; None: chosen by the method)."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cite(key: str) -> str:
    """``wu2012`` -> ``Wu 2012``; a key with a longer suffix (``bilgic2014tv``) -> first author and year of
    its reference."""
    m = re.fullmatch(r"([a-z_]+?)(\d{4})[a-z]?", key)
    if m:
        return f"{m.group(1).replace('_', ' ').title()} {m.group(2)}"
    ref = REFERENCES.get(key)
    return f"{ref.authors.split()[0].rstrip(',')} {ref.year}" if ref else key


def method_parameter_table(stage_key: str) -> str:
    """Every method of a stage: name, label and papers, and each parameter with its default (from the
    function signature, data-dependent defaults in words) and allowed range (from the registration)."""
    registry = STAGES[stage_key]
    defaults = QsmprepConfig().chosen_methods()
    rows = ["| name | method | parameters: default (allowed range) |", "|---|---|---|"]
    for name in registry.names():
        m = registry.method(name)
        signature = m.parameters()
        cells = []
        for pname, value in m.resolve_params(None, None).items():
            # a default the data decide is stated in words by the method's defaults hook
            in_words = isinstance(value, str) and pname in signature and signature[pname].default is None
            text = value if in_words else _value(value)
            rng = m.ranges.get(pname)
            cells.append(f"`{pname}` = {text}" + (f" {rng}" if rng is not None else ""))
        refs = "; ".join(_cite(k) for k in m.references)
        label = m.label + (" (learned)" if m.learned else "") + (f" [{refs}]" if refs else "")
        shown = f"`{name}`" + (" (default)" if defaults.get(stage_key) == name and len(registry.names()) > 1 else "")
        rows.append(f"| {shown} | {label} | {'<br>'.join(cells) or 'none'} |")
    return "\n".join(rows) + "\n"


def _help(action: argparse.Action) -> str:
    text = re.sub(r"\s*\(default: [^()]*(\([^()]*\)[^()]*)*\)", "", action.help or "")
    return " ".join(text.split()).replace("|", "\\|")


def method_options_table(title: str = "Methods") -> str:
    """A group of ``qsmprep --help`` (default *Methods*): option, choices (default first) and what it does."""
    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == title)
    d = QsmprepConfig()
    rows = ["| option | choices (default first) | what it does |", "|---|---|---|"]
    for action in group._group_actions:
        option = f"`{action.option_strings[0]}`"
        default = getattr(d, action.dest, None)
        if action.choices:
            choices = [str(default)] + [str(c) for c in action.choices if c != default]
            values = ", ".join(f"`{c}`" for c in choices)
        elif action.nargs == 0:
            option += f", `--no-{action.option_strings[0][2:]}`"
            values = f"on/off (default {'on' if default else 'off'})"
        else:
            values = f"`{action.metavar or action.dest.upper()}` (default {_value(default)})"
        rows.append(f"| {option} | {values} | {_help(action)} |")
    return "\n".join(rows) + "\n"


#: block name -> generator
BLOCKS: dict[str, Callable[[], str]] = {
    **{f"methods:{key}": (lambda key=key: method_parameter_table(key)) for key in STAGES},
    "options:methods": method_options_table,
    "options:anat": lambda: method_options_table("Anatomical and template spaces"),
    "outputs:images": markdown_table,
    "outputs:tree": tree_markdown,
    "qc:metrics": metrics_markdown,
    "reports:windows": windows_markdown,
}


def render(text: str, where: str = "<text>") -> str:
    """``text`` with every generated block rewritten; ``ValueError`` for an unknown block name."""

    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise ValueError(f"{where}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        return m.group(1) + BLOCKS[name]() + m.group(4)

    return _BLOCK.sub(one, text)


def blocks_in(text: str) -> list[str]:
    """Names of the generated blocks of a Markdown text, in order."""
    return [m.group(2) for m in _BLOCK.finditer(text)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsmprep.cli.docs", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="Markdown files with generated blocks")
    p.add_argument("--check", action="store_true", help="only report out-of-date files (exit 1)")
    args = p.parse_args(argv)
    stale = []
    for path in args.files:
        text = path.read_text(encoding="utf-8")
        new = render(text, str(path))
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for path in stale:
        print(f"{path}: generated blocks {'out of date' if args.check else 'rewritten'}"
              + (" (run python -m qsmprep.cli.docs on it)" if args.check else ""))
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
