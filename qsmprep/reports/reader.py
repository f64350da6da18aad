"""Reading an existing qsmprep output folder: processed runs, their files, QC, ROI tables, logs.

Everything here reads ``OUTPUT_DIR`` only (and, for the raw echo-1 images, the raw dataset named by
``BIDS_DIR`` or by ``DatasetLinks.raw`` of the derivative ``dataset_description.json``). A *processed
run* is a ``sub-<s>/[ses-<t>/]anat/<prefix>_Chimap.nii.gz``; per-run QC files follow the contract
``<prefix>_desc-qc_metrics.json`` (flat JSON ``metric -> value`` plus ``"Flags": [{"metric", "value",
"expected", "reason"}]``) and ``<prefix>_desc-roi_stats.tsv`` (``label name n_voxels mean_ppm
median_ppm std_ppm``).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlparse

from qsmprep.outputs import IMAGES, output

__all__ = [
    "MAPS",
    "ProcessedRun",
    "parse_prefix",
    "find_processed_runs",
    "subjects_with_outputs",
    "latest_settings",
    "crash_files",
    "read_json",
    "load_qc",
    "numeric_metrics",
    "read_roi_tsv",
    "raw_root",
    "echo1_sources",
]

#: key (of the output spec, :data:`qsmprep.outputs.IMAGES`) -> file-name stem (after ``<prefix>_``) of the
#: per-run images qsmprep writes
MAPS: dict[str, str] = {key: spec.stem for key, spec in IMAGES.items()}

_ENTITY_KEYS = {"sub": "subject", "ses": "session", "acq": "acquisition", "run": "run"}


def parse_prefix(prefix: str) -> dict[str, str]:
    """``"sub-1_ses-2_acq-x_run-1"`` -> ``{"sub": "1", "ses": "2", "acq": "x", "run": "1"}`` (file order)."""
    out: dict[str, str] = {}
    for part in str(prefix).split("_"):
        key, sep, value = part.partition("-")
        if sep and key and value:
            out[key] = value
    return out


@dataclass
class ProcessedRun:
    """One series found in OUTPUT_DIR (its ``<prefix>`` and ``anat`` folder)."""

    prefix: str
    anat_dir: Path
    entities: dict = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return self.entities.get("sub", "")

    @property
    def session(self) -> str | None:
        return self.entities.get("ses")

    @property
    def acquisition(self) -> str | None:
        return self.entities.get("acq")

    @property
    def run(self) -> str | None:
        return self.entities.get("run")

    def path(self, key: str, ext: str = ".nii.gz") -> Path:
        """Path of a map (key of :data:`MAPS`, or a literal stem such as ``"desc-qc_metrics"``)."""
        return self.anat_dir / f"{self.prefix}_{MAPS.get(key, key)}{ext}"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    @property
    def qc_json(self) -> Path:
        return self.anat_dir / output("qc_metrics").name(self.prefix)

    @property
    def roi_tsv(self) -> Path:
        return self.anat_dir / output("roi_stats").name(self.prefix)

    @property
    def anchor(self) -> str:
        """HTML id of this run's section in the subject report."""
        return "run-" + re.sub(r"[^A-Za-z0-9_-]", "_", self.prefix)


def _labels(values: Iterable[str] | None, prefix: str) -> set[str] | None:
    if not values:
        return None
    out = set()
    for v in values:
        v = str(v)
        out.add(v[len(prefix) + 1 :] if v.startswith(prefix + "-") else v)
    return out


def find_processed_runs(
    output_dir: str | Path,
    subjects: Iterable[str] | None = None,
    sessions: Iterable[str] | None = None,
) -> list[ProcessedRun]:
    """Every native ``*_Chimap.nii.gz`` under ``OUTPUT_DIR/sub-*/[ses-*/]anat`` (not the ``space-<x>`` copies),
    sorted by prefix.

    ``subjects``/``sessions`` (labels with or without ``sub-``/``ses-``) restrict the result.
    """
    root = Path(output_dir)
    subs, sess = _labels(subjects, "sub"), _labels(sessions, "ses")
    found = []
    if not root.is_dir():
        return found
    for pattern in ("sub-*/anat/*_Chimap.nii.gz", "sub-*/ses-*/anat/*_Chimap.nii.gz"):
        for p in root.glob(pattern):
            prefix = p.name[: -len("_Chimap.nii.gz")]
            ents = parse_prefix(prefix)
            if "sub" not in ents or "space" in ents or not p.is_file():  # space-<x>: a resampled copy of a series
                continue
            if subs is not None and ents["sub"] not in subs:
                continue
            if sess is not None and ents.get("ses") not in sess:
                continue
            found.append(ProcessedRun(prefix=prefix, anat_dir=p.parent, entities=ents))
    return sorted(found, key=lambda r: r.prefix)


def subjects_with_outputs(output_dir: str | Path) -> list[str]:
    """Labels of the ``sub-*`` folders of OUTPUT_DIR (with or without maps)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir())


def read_json(path: str | Path) -> dict:
    """The JSON object in ``path``; ``{}`` when missing or unreadable."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def latest_settings(output_dir: str | Path, subject: str) -> tuple[str | None, dict]:
    """``(run_uuid, settings)`` of the newest ``sub-<s>/log/<run_uuid>/qsmprep.json`` (``(None, {})``)."""
    log = Path(output_dir) / f"sub-{subject}" / "log"
    files = sorted(log.glob("*/qsmprep.json"), key=lambda p: (p.parent.name, p.stat().st_mtime))
    if not files:
        return None, {}
    newest = files[-1]
    return newest.parent.name, read_json(newest)


def crash_files(output_dir: str | Path, subject: str) -> list[Path]:
    """Crash files under ``OUTPUT_DIR/sub-<s>/log/`` (any run), oldest first."""
    log = Path(output_dir) / f"sub-{subject}" / "log"
    if not log.is_dir():
        return []
    files = [p for p in log.rglob("crash-*") if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def load_qc(path: str | Path) -> tuple[dict[str, Any], list[dict], str | None]:
    """``(metrics, flags, problem)`` of a QC JSON.

    ``metrics``: every key except ``Flags`` (values as stored); ``flags``: list of dicts with
    ``metric``, ``value``, ``expected``, ``reason``; ``problem``: None, or why the file could not be used.
    """
    path = Path(path)
    if not path.is_file():
        return {}, [], "missing"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {}, [], f"unreadable ({' '.join(str(exc).split())})"
    if not isinstance(obj, dict):
        return {}, [], "not a JSON object"
    flags = []
    for f in obj.get("Flags") or []:
        if isinstance(f, Mapping):
            flags.append({k: f.get(k) for k in ("metric", "value", "expected", "reason")})
        elif f is not None:
            flags.append({"metric": None, "value": None, "expected": None, "reason": str(f)})
    metrics = {str(k): v for k, v in obj.items() if k != "Flags"}
    return metrics, flags, None


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The numeric scalar metrics (bools excluded); non-finite values become None."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = _number(v)
        elif v is None:
            continue
    return out


def read_roi_tsv(path: str | Path) -> list[dict]:
    """Rows of a ROI statistics TSV (numbers converted; ``n/a`` -> None); ``[]`` when missing."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                out = {}
                for k, v in row.items():
                    if k is None:
                        continue
                    v = (v or "").strip()
                    if v in ("", "n/a", "nan", "NaN"):
                        out[k] = None
                        continue
                    if k in ("label", "n_voxels"):
                        try:
                            out[k] = int(float(v))
                            continue
                        except ValueError:
                            pass
                    if k.endswith("_ppm"):
                        try:
                            out[k] = float(v)
                            continue
                        except ValueError:
                            out[k] = None
                            continue
                    out[k] = v
                rows.append(out)
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return rows


# --------------------------------------------------------------------------------------------------
# raw data
# --------------------------------------------------------------------------------------------------


def raw_root(output_dir: str | Path, bids_dir: str | Path | None = None) -> Path | None:
    """The raw dataset of OUTPUT_DIR: ``bids_dir`` when it exists, else ``DatasetLinks.raw``."""
    if bids_dir is not None and Path(bids_dir).is_dir():
        return Path(bids_dir)
    link = (read_json(Path(output_dir) / "dataset_description.json").get("DatasetLinks") or {}).get("raw")
    if not isinstance(link, str) or not link:
        return None
    if link.startswith("file:"):
        p = Path(unquote(urlparse(link).path))
    elif "://" in link:
        return None
    else:
        p = Path(link)
        if not p.is_absolute():
            p = Path(output_dir) / p
    return p if p.is_dir() else None


def _resolve_uri(uri: str, root: Path | None) -> Path | None:
    if uri.startswith("bids:"):
        _, _, rest = uri.partition(":")
        dataset, _, rel = rest.partition(":")
        if root is None or dataset not in ("raw", ""):
            return None
        return root / rel
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return None


def echo1_sources(sources: Iterable[str], root: Path | None) -> dict[str, Path]:
    """Raw files of the first echo by part (``mag``, ``phase``, ``real``, ``imag``) from ``Sources``.

    Only existing files are returned; a file without ``echo-`` counts as echo 1 (single-echo series).
    """
    by_echo: dict[int, dict[str, Path]] = {}
    for uri in sources or []:
        if not isinstance(uri, str):
            continue
        p = _resolve_uri(uri, root)
        if p is None:
            continue
        m = re.search(r"_echo-(\d+)", p.name)
        echo = int(m.group(1)) if m else 1
        pm = re.search(r"_part-(mag|phase|real|imag)", p.name)
        part = pm.group(1) if pm else "mag"
        by_echo.setdefault(echo, {})[part] = p
    if not by_echo:
        return {}
    first = by_echo[min(by_echo)]
    return {k: v for k, v in first.items() if v.is_file()}
