"""Release hygiene: the version comes from the git tag; LICENSE, CITATION.cff and CHANGELOG.md ship.

The version test clones this repository, tags the clone ``v9.8.7``, builds a wheel from it (hatch-vcs,
no build isolation: hatchling and hatch-vcs come with the ``test`` extra), checks the wheel's metadata,
then installs the wheel into a temporary venv (system site-packages for the dependencies) and runs
``qsmprep --version`` from it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TAG_VERSION = "9.8.7"


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.skipif(importlib.util.find_spec("hatch_vcs") is None,
                    reason="hatch-vcs is not installed (pip install -e '.[test]')")
def test_version_comes_from_the_git_tag(tmp_path):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    _git("clone", "--quiet", "--no-hardlinks", str(REPO), str(clone), cwd=tmp_path)
    # the working tree as it is (uncommitted changes included), committed and tagged in the clone
    for rel in ("pyproject.toml", "qsmprep/__about__.py"):
        shutil.copy2(REPO / rel, clone / rel)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    env.pop("SETUPTOOLS_SCM_PRETEND_VERSION", None)
    subprocess.run(["git", "commit", "-qam", "test", "--allow-empty"], cwd=clone, env=env, check=True, timeout=60)
    subprocess.run(["git", "tag", "-a", f"v{TAG_VERSION}", "-m", "test"], cwd=clone, env=env, check=True, timeout=60)

    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(wheels), str(clone)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = wheels.glob("qsmprep-*.whl")
    assert whl.name.startswith(f"qsmprep-{TAG_VERSION}-"), whl.name
    with zipfile.ZipFile(whl) as z:
        meta = z.read(f"qsmprep-{TAG_VERSION}.dist-info/METADATA").decode()
        names = z.namelist()
    assert re.search(rf"^Version: {re.escape(TAG_VERSION)}$", meta, re.M), meta[:500]
    assert re.search(r"^Requires-Dist: bids-validator-deno", meta, re.M), "bids-validator-deno is a runtime dependency"
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names), names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(whl)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "no such option: --python" in proc.stderr:
        pytest.skip("pip too old for --python")
    assert proc.returncode == 0, proc.stderr[-2000:]
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(venv / "bin" / "qsmprep"), "--version"], capture_output=True, text=True, timeout=300,
                         env=clean_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"qsmprep {TAG_VERSION}", out.stdout


def test_release_files_are_present():
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    cff = (REPO / "CITATION.cff").read_text()
    assert re.search(r"^cff-version: 1\.2\.0$", cff, re.M) and re.search(r"^title: ", cff, re.M)
    assert re.search(r"^license: Apache-2\.0$", cff, re.M)
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog")


def test_version_is_a_string():
    from qsmprep import __version__

    assert isinstance(__version__, str) and __version__
