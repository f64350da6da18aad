"""Discovery of QSM-able gradient-echo series in a raw BIDS dataset (pybids, read-only).

A *run* (:class:`QsmRun`) is one gradient-echo acquisition: the files of one subject, session,
``acq``, ``run`` (and any other entity) that differ only in ``echo`` and ``part``. Supported inputs
(BIDS 1.10):

- ``MEGRE`` with ``echo-<index>`` and ``part-mag``/``part-phase`` (or ``part-real``/``part-imag``);
- single-echo ``T2starw`` with ``part-mag``/``part-phase`` (or ``part-real``/``part-imag``).

Echo indices are parsed as integers (``echo-10`` sorts after ``echo-9``; ``echo-01`` == ``echo-1``).
Metadata are read with BIDS inheritance (a top-level ``MEGRE.json`` applies to all runs). The layout
is indexed in memory (``database_path=None``): nothing is written into the dataset.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qsmprep.utils.errors import EX_DATAERR, EX_NOINPUT, InputError

__all__ = [
    "QsmRun", "collect_runs", "load_bids_filters", "check_filters", "make_layout", "strip_label", "sidecar_path",
    "QUERIES",
]

LOGGER = logging.getLogger("qsmprep")

#: pybids queries of the inputs qsmprep uses; ``--bids-filter-file`` refines them by name.
QUERIES: dict[str, dict[str, Any]] = {
    "megre": {"datatype": "anat", "suffix": "MEGRE", "extension": [".nii", ".nii.gz"]},
    "t2starw": {"datatype": "anat", "suffix": "T2starw", "extension": [".nii", ".nii.gz"]},
}
#: Entities of a run that :class:`QsmRun` names; other entities (rec, ce, task, ...) only split runs.
_RUN_ENTITIES = ("subject", "session", "acquisition", "run")
_PREFIXES = {"subject": "sub", "session": "ses", "acquisition": "acq", "run": "run"}
_NOT_GROUPING = {"echo", "part", "extension", "datatype"}


@dataclass(frozen=True)
class QsmRun:
    """One gradient-echo series of one subject/session, ready for the QSM workflow.

    Entity values carry no prefix (``subject="01"``). File tuples are ordered by echo index (int);
    ``phase_files`` is empty when the data are given as real/imaginary pairs (``real_files``,
    ``imag_files``), which the workflow converts to magnitude/phase. ``echo_times_s`` are in seconds,
    ``field_strength_t`` in tesla; ``phase_units`` is the sidecar ``Units`` of the phase images
    (``"rad"``, ``"arbitrary"`` or None when absent); ``b0_dir`` is the optional (non-BIDS) sidecar key
    ``B0_dir`` normalised to a unit vector, None when absent (then derive it from the affine).
    """

    subject: str
    session: str | None
    acquisition: str | None
    run: str | None
    suffix: str
    magnitude_files: tuple[Path, ...]
    phase_files: tuple[Path, ...]
    real_files: tuple[Path, ...]
    imag_files: tuple[Path, ...]
    echo_times_s: tuple[float, ...]
    field_strength_t: float
    phase_units: str | None
    b0_dir: tuple[float, float, float] | None = None

    @property
    def n_echoes(self) -> int:
        """Number of echoes."""
        return len(self.echo_times_s)

    @property
    def has_magnitude(self) -> bool:
        """True when magnitude images are given or can be computed (real/imaginary pairs)."""
        return bool(self.magnitude_files) or bool(self.real_files)

    @property
    def is_complex(self) -> bool:
        """True when the series is given as real/imaginary pairs (no phase files)."""
        return not self.phase_files and bool(self.real_files)

    def entities(self) -> dict:
        """``{"subject": .., "session": .., "acquisition": .., "run": ..}`` without None values."""
        return {k: getattr(self, k) for k in _RUN_ENTITIES if getattr(self, k) is not None}

    def prefix(self) -> str:
        """BIDS file-name prefix in entity order, e.g. ``"sub-1_ses-2_acq-x_run-1"``."""
        return "_".join(f"{_PREFIXES[k]}-{v}" for k, v in self.entities().items())


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar next to a ``.nii``/``.nii.gz`` file (it need not exist)."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def strip_label(label: str, prefix: str) -> str:
    """``"sub-01"`` -> ``"01"`` for ``prefix="sub"``; labels without the prefix are returned as is."""
    label = str(label).strip()
    return label[len(prefix) + 1 :] if label.startswith(prefix + "-") else label


def make_layout(bids_dir: str | Path):
    """An in-memory, non-validating :class:`bids.BIDSLayout` (writes nothing into ``bids_dir``)."""
    from bids import BIDSLayout

    bids_dir = Path(bids_dir).resolve()
    try:
        return BIDSLayout(str(bids_dir), validate=False, database_path=None)
    except Exception as exc:  # pybids raises many types (JSON errors, BIDSValidationError, ...)
        m = re.search(r"filename='([^']+\.json)'", str(exc))
        if m and "JSON" in str(exc):
            bad = Path(m.group(1))
            try:
                json.loads(bad.read_text(encoding="utf-8"))
                detail = "pybids could not read it"
            except (OSError, UnicodeDecodeError, ValueError) as err:
                detail = str(err)
            raise InputError(bad, f"is not valid JSON ({detail})", "Fix the JSON syntax of this sidecar") from None
        raise InputError(
            bids_dir,
            f"could not index the dataset with pybids ({type(exc).__name__}: {' '.join(str(exc).split())})",
            "Fix the file named in the message (invalid JSON sidecars are the usual cause)",
            EX_DATAERR,
        ) from None


# --------------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------------


def load_bids_filters(path: str | Path) -> dict:
    """Read a ``--bids-filter-file``: JSON ``{"megre": {<entity>: <value>}, "t2starw": {...}}``.

    ``null`` selects files without the entity, ``"*"`` files with any value (as in fMRIPrep).
    Missing file: :class:`InputError` with exit 66; bad JSON or structure: exit 65.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "BIDS filter file not found", "Check the path given to --bids-filter-file", EX_NOINPUT)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"is not valid JSON ({exc})", "Fix the JSON syntax of the BIDS filter file") from None
    return check_filters(obj, path)


def check_filters(obj: Any, source) -> dict:
    example = 'Write e.g. {"megre": {"acquisition": "qsm", "run": 1}}'
    if not isinstance(obj, Mapping):
        raise InputError(source, "a BIDS filter file must hold a JSON object of queries", example)
    out = {}
    for key, value in obj.items():
        name = str(key).lower()
        if name not in QUERIES:
            raise InputError(
                source, f"unknown query {key!r} (qsmprep reads {', '.join(sorted(QUERIES))})", example
            )
        if not isinstance(value, Mapping):
            raise InputError(source, f"query {key!r} must be a JSON object of entity filters", example)
        out[name] = dict(value)
    return out


def _to_pybids(value):
    from bids.layout import Query

    if value is None:
        return Query.NONE
    if value == "*":
        return Query.ANY
    if isinstance(value, (list, tuple)):
        return [_to_pybids(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------------


def _echo_index(value, path: Path) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise InputError(path, f"echo entity {value!r} is not an integer index", "Name echoes echo-1, echo-2, ...") from None


def _number(meta: Mapping, key: str, path: Path, unit: str) -> float | None:
    if key not in meta or meta[key] is None:
        return None
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise InputError(sidecar_path(path), f'"{key}" is {value!r}, not a number', f'Write "{key}" as a number in {unit}')
    return float(value)


def _echo_time(files: Sequence[Path], metas: Sequence[Mapping], echo: int | None, suffix: str) -> float:
    values = []
    for path, meta in zip(files, metas):
        te = _number(meta, "EchoTime", path, "seconds")
        if te is not None:
            values.append((path, te))
    target = files[0]
    if not values:
        which = f"echo {echo}" if echo is not None else "this image"
        raise InputError(
            sidecar_path(target),
            f'"EchoTime" is missing (needed for {which})',
            f'Add "EchoTime" in seconds to this sidecar (or to a {suffix}.json inherited by all echoes)',
        )
    path, te = values[0]
    if te <= 0:
        raise InputError(sidecar_path(path), f'"EchoTime" is {te:g}; it must be positive', 'Write "EchoTime" in seconds')
    if te > 1.0:
        raise InputError(
            sidecar_path(path),
            f'"EchoTime" is {te:g}, which looks like milliseconds',
            f'BIDS uses seconds: write {te / 1000:g} instead',
        )
    for other, te2 in values[1:]:
        if abs(te2 - te) > 1e-6:
            raise InputError(
                sidecar_path(other),
                f'"EchoTime" {te2:g} s differs from {te:g} s of {path.name} (same echo)',
                "Make the sidecars of one echo agree",
            )
    return te


def _field_strength(files: Sequence[Path], metas: Sequence[Mapping]) -> float:
    values = []
    for path, meta in zip(files, metas):
        b0 = _number(meta, "MagneticFieldStrength", path, "tesla")
        if b0 is not None:
            values.append((path, b0))
    if not values:
        raise InputError(
            sidecar_path(files[0]),
            '"MagneticFieldStrength" is missing, and QSM needs the field strength to convert phase to ppm',
            'Add "MagneticFieldStrength" (tesla, e.g. 3) to the sidecars or to an inherited top-level JSON',
        )
    path, b0 = values[0]
    if not 0.0 < b0 <= 30.0:
        raise InputError(
            sidecar_path(path), f'"MagneticFieldStrength" is {b0:g}; expected tesla (0 < B0 <= 30)', 'Write it in tesla, e.g. 3'
        )
    for other, b in values[1:]:
        if abs(b - b0) > 1e-3:
            raise InputError(
                sidecar_path(other),
                f'"MagneticFieldStrength" {b:g} T differs from {b0:g} T of {path.name} (same series)',
                "Make the sidecars of one series agree",
            )
    return b0


def _b0_dir(files: Sequence[Path], metas: Sequence[Mapping]) -> tuple[float, float, float] | None:
    for path, meta in zip(files, metas):
        if meta.get("B0_dir") is None:
            continue
        v = meta["B0_dir"]
        ok = isinstance(v, (list, tuple)) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )
        norm = math.sqrt(sum(float(x) ** 2 for x in v)) if ok else 0.0
        if not ok or norm < 1e-6:
            raise InputError(sidecar_path(path), f'"B0_dir" is {v!r}, not a non-zero 3-vector', 'Write e.g. "B0_dir": [0, 0, 1]')
        return tuple(float(x) / norm for x in v)  # type: ignore[return-value]
    return None


def _phase_units(files: Sequence[Path], metas: Sequence[Mapping]) -> str | None:
    units = [(p, m.get("Units")) for p, m in zip(files, metas)]
    given = {u for _, u in units if u is not None}
    if len(given) > 1:
        raise InputError(
            sidecar_path(files[0]),
            f'phase images of one series have different "Units" ({", ".join(sorted(map(str, given)))})',
            "Use one unit for all echoes",
        )
    return next(iter(given)) if given else None


def _expected_name(path: Path, part: str) -> str:
    name = path.name
    for p in ("mag", "phase", "real", "imag"):
        if f"_part-{p}_" in name:
            return name.replace(f"_part-{p}_", f"_part-{part}_")
    return f"a part-{part} file"


def _group_key(entities: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in entities.items() if k not in _NOT_GROUPING))


def _build_run(layout, key: tuple, files: list) -> QsmRun | None:
    """A :class:`QsmRun` from the BIDSFiles of one series; None for magnitude-only series."""
    ents = dict(key)
    suffix = ents["suffix"]
    by_echo: dict[int | None, dict[str, Path]] = defaultdict(dict)
    seen_echo_entity = set()
    for f in sorted(files, key=lambda f: f.path):
        path = Path(f.path)
        fe = f.get_entities()
        echo = _echo_index(fe.get("echo"), path)
        seen_echo_entity.add(echo is None)
        part = str(fe.get("part", "mag"))
        if part in by_echo[echo]:
            raise InputError(
                path,
                f"duplicates {by_echo[echo][part].name} (same echo and part)",
                "Keep one file per echo and part (e.g. remove the .nii copy of a .nii.gz)",
            )
        by_echo[echo][part] = path
    if len(seen_echo_entity) > 1:
        path = next(iter(by_echo[None].values()))
        raise InputError(
            path, "some files of this series have an echo-<index> entity and this one has none", "Give every echo file an echo-<index> entity"
        )
    echoes = sorted(by_echo, key=lambda e: -1 if e is None else e)
    parts = set().union(*(set(d) for d in by_echo.values()))
    if "phase" in parts:
        needed = ("mag", "phase")
    elif parts & {"real", "imag"}:
        needed = ("real", "imag")
    else:
        return None  # magnitude only: not QSM-able
    names = {"mag": "magnitude", "phase": "phase", "real": "real", "imag": "imaginary"}
    for e in echoes:
        have = by_echo[e]
        a, b = needed
        for x, y in ((a, b), (b, a)):
            if x in have and y not in have:
                which = f"echo {e}" if e is not None else "this series"
                raise InputError(
                    have[x],
                    f"{which} has a {names[x]} image but no {names[y]} image (expected {_expected_name(have[x], y)})",
                    f"Add the missing part-{y} file, or remove this echo",
                )
    files_of = {p: tuple(by_echo[e][p] for e in echoes) if all(p in by_echo[e] for e in echoes) else () for p in names}
    tes = []
    all_paths, all_metas = [], []
    borrowed: list[tuple[Path, Path]] = []  # (file without EchoTime, file of the same echo that has it)
    for e in echoes:
        paths = [by_echo[e][p] for p in ("phase", "mag", "real", "imag") if p in by_echo[e]]
        metas = [layout.get_metadata(str(p)) for p in paths]
        tes.append(_echo_time(paths, metas, e, suffix))
        given = [p for p, m in zip(paths, metas) if m.get("EchoTime") is not None]
        borrowed += [(p, given[0]) for p, m in zip(paths, metas) if m.get("EchoTime") is None]
        all_paths += paths
        all_metas += metas
    phase_metas = [m for p, m in zip(all_paths, all_metas) if p in set(files_of["phase"])]
    if borrowed:
        missing, source = borrowed[0]
        LOGGER.warning(
            "%s: no EchoTime in its sidecar or an inherited one (%d file%s of this series); qsmprep uses the "
            "EchoTime of the other part of each echo (here %s). BIDS requires EchoTime for every file: add it to "
            "these sidecars or to one per echo without the part entity (e.g. %s)",
            missing, len(borrowed), "s" if len(borrowed) != 1 else "", sidecar_path(source).name,
            re.sub(r"_part-[a-z]+_", "_", sidecar_path(missing).name),
        )
    return QsmRun(
        subject=str(ents["subject"]),
        session=ents.get("session"),
        acquisition=ents.get("acquisition"),
        run=ents.get("run"),
        suffix=suffix,
        magnitude_files=files_of["mag"],
        phase_files=files_of["phase"] if needed[0] == "mag" else (),
        real_files=files_of["real"],
        imag_files=files_of["imag"],
        echo_times_s=tuple(tes),
        field_strength_t=_field_strength(all_paths, all_metas),
        phase_units=_phase_units(list(files_of["phase"]), phase_metas) if files_of["phase"] else None,
        b0_dir=_b0_dir(all_paths, all_metas),
    )


def collect_runs(
    bids_dir: str | Path,
    participant_labels: Iterable[str] = (),
    session_labels: Iterable[str] = (),
    bids_filters: Mapping | None = None,
    *,
    layout=None,
    filters_source: str | Path = "--bids-filter-file",
) -> list[QsmRun]:
    """All QSM-able series of the selected participants/sessions, sorted by entities.

    Raises :class:`InputError` (exit 66) when the dataset has no participants, a requested label is
    absent, or no QSM-able series (mag+phase or real+imag) remains; (exit 65) for unpaired parts,
    missing/invalid ``EchoTime`` or ``MagneticFieldStrength``, duplicate echoes, and several series
    that differ only in entities qsmprep does not name (select one with ``bids_filters``).
    """
    bids_dir = Path(bids_dir).resolve()
    layout = layout if layout is not None else make_layout(bids_dir)
    filters = check_filters(bids_filters or {}, filters_source)
    subjects = sorted(str(s) for s in layout.get_subjects())
    if not subjects:
        raise InputError(
            bids_dir, "no participants found (no sub-<label> folders with data)", "Point BIDS_DIR at the root of a BIDS dataset", EX_NOINPUT
        )
    labels = sorted({strip_label(s, "sub") for s in participant_labels})
    missing = [s for s in labels if s not in subjects]
    if missing:
        raise InputError(
            bids_dir,
            f"participant label{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found "
            f"(the dataset has: {', '.join(subjects[:20])}{', ...' if len(subjects) > 20 else ''})",
            "Check --participant-label (the sub- prefix is optional)",
            EX_NOINPUT,
        )
    sessions = sorted({strip_label(s, "ses") for s in session_labels})
    if sessions:
        have = sorted(str(s) for s in layout.get_sessions(subject=labels or subjects))
        missing = [s for s in sessions if s not in have]
        if missing:
            raise InputError(
                bids_dir,
                f"session label{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found "
                f"for the selected participants (found: {', '.join(have) or 'no sessions'})",
                "Check --session-label (the ses- prefix is optional)",
                EX_NOINPUT,
            )
    groups: dict[tuple, list] = defaultdict(list)
    for name, base in QUERIES.items():
        query = dict(base)
        for k, v in filters.get(name, {}).items():
            query[k] = _to_pybids(v)
        if labels:
            query["subject"] = labels
        if sessions:
            query["session"] = sessions
        try:
            found = layout.get(**query)
        except ValueError as exc:
            raise InputError(
                filters_source, f"invalid filter for {name!r}: {exc}".split(". If you")[0], "Use pybids entity names (subject, session, acquisition, run, ...)"
            ) from None
        for f in found:
            groups[_group_key(f.get_entities())].append(f)
    built: list[tuple[tuple, QsmRun]] = []
    magnitude_only: list[str] = []
    for key in sorted(groups):
        run = _build_run(layout, key, groups[key])
        if run is None:
            magnitude_only.append(Path(groups[key][0].path).name)
        else:
            built.append((key, run))
    if not built:
        who = f"participant{'s' if len(labels) > 1 else ''} {', '.join(labels)}" if labels else "any participant"
        what = (
            f"; only magnitude images were found (e.g. {magnitude_only[0]}), and QSM needs phase"
            if magnitude_only
            else ""
        )
        raise InputError(
            bids_dir,
            f"no QSM-able data found for {who} (anat/*_MEGRE or *_T2starw with part-mag/part-phase or part-real/part-imag){what}",
            "Add the phase images (part-phase, with Units in the sidecar), or check --participant-label/--bids-filter-file",
            EX_NOINPUT,
        )
    # series that would share one output prefix (they differ in rec, ce, task, ... or suffix only)
    by_prefix: dict[str, list[tuple]] = defaultdict(list)
    for key, run in built:
        by_prefix[run.prefix()].append(key)
    for prefix, keys in by_prefix.items():
        if len(keys) > 1:
            a, b = dict(keys[0]), dict(keys[1])
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise InputError(
                Path(groups[keys[1]][0].path),
                f"several series of {prefix} differ only in {', '.join(diff)}, which qsmprep does not keep apart",
                'Select one with --bids-filter-file (e.g. {"megre": {"reconstruction": "x"}})',
            )
    runs = [run for _, run in built]

    def order(r: QsmRun):
        return (r.subject, r.session or "", r.acquisition or "", int(r.run) if r.run and r.run.isdigit() else -1, r.suffix)

    return sorted(runs, key=order)

