"""The docs state what the code does: generated tables are up to date, and the defaults written in prose
are the code's defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qsmprep.cli import docs as gen
from qsmprep.methods import STAGES, method
from qsmprep.utils.validation import MIN_VOXELS_PER_AXIS

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_generated_blocks_are_up_to_date(path):
    text = path.read_text(encoding="utf-8")
    assert gen.render(text, str(path)) == text, f"run: python -m qsmprep.cli.docs {path.relative_to(ROOT)}"


def test_every_stage_options_and_outputs_have_their_generated_table():
    used = {p.name: gen.blocks_in(p.read_text(encoding="utf-8")) for p in FILES}
    assert sorted(used["methods.md"]) == sorted(f"methods:{k}" for k in STAGES)
    assert "options:methods" in used["usage.md"]
    assert "outputs:images" in used["outputs.md"] and "outputs:tree" in used["outputs.md"]
    assert "qc:metrics" in used["qc.md"] and "reports:windows" in used["reports.md"]
    assert set(gen.BLOCKS) <= {b for names in used.values() for b in names}


def test_a_changed_default_makes_the_docs_check_fail(tmp_path, monkeypatch):
    doc = tmp_path / "m.md"
    doc.write_text("x\n<!-- BEGIN GENERATED methods:bgremove -->\n" + gen.method_parameter_table("bgremove")
                   + "<!-- END GENERATED -->\n", encoding="utf-8")
    assert gen.main(["--check", str(doc)]) == 0
    text = doc.read_text(encoding="utf-8")
    doc.write_text(text.replace("`threshold` = 0.05", "`threshold` = 0.5", 1), encoding="utf-8")
    assert gen.main(["--check", str(doc)]) == 1
    assert gen.main([str(doc)]) == 0 and doc.read_text(encoding="utf-8") == text
    with pytest.raises(ValueError, match="unknown generated block 'methods:nope'"):
        gen.render("<!-- BEGIN GENERATED methods:nope -->\n<!-- END GENERATED -->")


def test_the_method_table_holds_every_parameter_with_its_default_and_range():
    table = gen.method_parameter_table("masking")
    row = next(line for line in table.splitlines() if line.startswith("| `phase`"))
    params = method("masking", "phase").parameters()
    for name in params:
        assert f"`{name}` = " in row
    assert "`erosions` = [3, 0] [0, inf)" in row
    assert "(default)" in next(line for line in table.splitlines() if line.startswith("| `bet-phase`"))
    vsharp = next(line for line in gen.method_parameter_table("bgremove").splitlines() if "`vsharp`" in line)
    assert "12 mm down to twice the largest voxel size" in vsharp  # a data-dependent default, in words


def _number(path: str, pattern: str) -> list[float]:
    text = " ".join((ROOT / path).read_text(encoding="utf-8").split())
    m = re.search(pattern, text)
    assert m, f"{path}: {pattern!r} not found"
    return [float(g) for g in m.groups()]


_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


def test_defaults_stated_in_prose_are_the_code_defaults():
    phase = method("masking", "phase").resolve_params()
    assert _number("docs/usage.md", r"eroded by up to (\d+) voxels after smoothing with a Gaussian of sigma (\d+) voxels") \
        == [max(phase["erosions"]), phase["gaussian_sigma_vox"]]
    assert _number("docs/usage.md", r"fewer than (\d+) voxels along any axis") == [MIN_VOXELS_PER_AXIS]
    assert _number("docs/usage.md", r"minimum of (\d+) voxels per axis") == [MIN_VOXELS_PER_AXIS]
    nextqsm = method("bgremove", "nextqsm").resolve_params()
    text = " ".join((ROOT / "docs/neural.md").read_text(encoding="utf-8").split())
    m = re.search(r"(\w+) alternations of (\d+) CG iterations each \(`n_outer`, `refit_max_iter`", text)
    assert m and _WORDS[m.group(1).lower()] == nextqsm["n_outer"] and int(m.group(2)) == nextqsm["refit_max_iter"]
    assert _number("docs/neural.md", r"outer (\d+) mm shell is dropped first \(`rim_mm`\)") == [nextqsm["rim_mm"]]
    csf = method("reference", "csf").resolve_params()
    assert _number("docs/limits.md", r"ventricles within (\d+) mm of the brain's centre") == [csf["radius_mm"]]
    bet = method("masking", "bet").resolve_params()
    assert _number("docs/methods.md", r"Parameters: `fractional_threshold` ([\d.]+) \(BET's `-f`") == [bet["fractional_threshold"]]
    bet_phase = method("masking", "bet-phase").resolve_params()
    assert _number("docs/methods.md", r"× `quality_factor` \(([\d.]+)\)") == [bet_phase["quality_factor"]]
