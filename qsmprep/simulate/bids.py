"""Write simulated multi-echo GRE data as a raw BIDS dataset with a ground-truth derivative dataset.

Raw (BIDS >= 1.5 ``MEGRE``, entities ``sub``, ``ses``, ``acq``, ``echo``, ``part``)::

    dataset_description.json  README  participants.tsv  participants.json
    sub-<s>/[ses-<t>/]anat/sub-<s>[_ses-<t>][_acq-<a>]_echo-<n>_part-{mag,phase}_MEGRE.nii.gz (+ .json)

Sidecars carry ``EchoTime`` (s), ``EchoNumber``, ``MagneticFieldStrength`` (T), ``ImagingFrequency``
(MHz), ``ImageType`` and, for phase, ``Units`` ("rad", or "arbitrary" with integers -4096..4095 as on
Siemens scanners). The B0 direction is carried by the NIfTI affine only (sform = qform, code 1).

Ground truth in ``derivatives/qsmprep-simulate/sub-<s>/[ses-<t>/]anat/`` (same entity prefix):
``_Chimap`` (ppm, relative to water/CSF, whole FOV), ``_desc-brain_mask``, ``_dseg`` + ``_dseg.tsv``
(index, name, nominal chi_ppm), ``_desc-{total,local,background}_fieldmap`` (ppm; local/background as
defined in :func:`qsmprep.simulate.signal.simulate_gre`), ``_desc-phaseoffset_fieldmap`` (rad),
``_R2starmap`` (1/s) and ``_S0map`` (M0, a.u.). Output is byte-identical for identical input
(gzip with mtime 0; JSON with sorted keys).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np

from qsmprep.__about__ import __version__
from qsmprep.qsm import constants
from qsmprep.simulate.signal import GreSimulation

BIDS_VERSION = "1.10.0"
DERIVATIVE_NAME = "qsmprep-simulate"
PHASE_UNITS = ("rad", "arbitrary")
#: Phantoms ``write_bids_dataset`` can simulate: the MNI152 head, the Zubal head, the geometric phantom.
PHANTOMS = ("head", "zubal", "shapes")
#: Integer range of "arbitrary" phase (Siemens convention: -pi..pi -> -4096..4095).
PHASE_INT_MAX = 4096

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


def _clean_label(label: Any, entity: str) -> str:
    s = str(label)
    if s.startswith(entity + "-"):
        s = s[len(entity) + 1 :]
    if not _LABEL_RE.match(s):
        raise ValueError(f"BIDS {entity} label must be alphanumeric, got {label!r}")
    return s


def phase_to_arbitrary(phase_rad: np.ndarray) -> np.ndarray:
    """Radians in [-pi, pi) to int16 scanner units -4096..4095 (``round(phase * 4096 / pi)``)."""
    q = np.round(np.asarray(phase_rad, dtype=np.float64) * (PHASE_INT_MAX / np.pi))
    return np.clip(q, -PHASE_INT_MAX, PHASE_INT_MAX - 1).astype(np.int16)


class _Sink(list):
    """List of written paths; gzip compression of NIfTI files runs on a small thread pool (zlib
    releases the GIL), with a bounded number of files in flight to cap memory."""

    def __init__(self, workers: int | None = None):
        super().__init__()
        self.workers = max(1, min(4, workers or os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        self.pending: list[Future] = []

    def submit(self, fn, *args) -> None:
        while len(self.pending) >= 2 * self.workers:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(fn, *args))

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)


def _write_bytes(path: Path, raw: bytes) -> None:
    if path.name.endswith(".gz"):
        # gzip level 1 with mtime 0 and no file name in the header: fast and byte-reproducible
        raw = gzip.compress(raw, compresslevel=1, mtime=0)
    path.write_bytes(raw)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, written: list[Path]) -> None:
    """Write NIfTI-1 (sform = qform = affine, code 1); ``.nii.gz`` paths are gzipped reproducibly."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if data.dtype.kind in "iub":
        img.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = img.to_bytes()
    if isinstance(written, _Sink):
        written.submit(_write_bytes, path, raw)
    else:
        _write_bytes(path, raw)
    written.append(path)


def _save_json(path: Path, obj: Mapping[str, Any], written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    written.append(path)


def _save_text(path: Path, text: str, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    written.append(path)


def _prefix(sub: str, ses: str | None, acq: str | None) -> str:
    parts = [f"sub-{sub}"]
    if ses is not None:
        parts.append(f"ses-{ses}")
    if acq is not None:
        parts.append(f"acq-{acq}")
    return "_".join(parts)


def _normalise_simulations(simulations, subjects, sessions):
    """Map (sub, ses) -> GreSimulation from the accepted input forms."""
    keys = [(s, t) for s in subjects for t in (sessions or [None])]
    if isinstance(simulations, GreSimulation):
        return {k: simulations for k in keys}
    out = {}
    for k, v in dict(simulations).items():
        if not isinstance(v, GreSimulation):
            raise TypeError(f"simulations[{k!r}] must be a GreSimulation, got {type(v).__name__}")
        if isinstance(k, tuple):
            sub, ses = k
        else:
            sub, ses = k, None
        sub = _clean_label(sub, "sub")
        ses = None if ses is None else _clean_label(ses, "ses")
        out[(sub, ses)] = v
    if not out:
        raise ValueError("simulations is empty")
    with_ses = {ses is not None for _, ses in out}
    if len(with_ses) > 1:
        raise ValueError("either all or none of the simulations must have a session label")
    return out


def _is_our_dataset(path: Path) -> bool:
    try:
        desc = json.loads((path / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return False
    return any(g.get("Name") == DERIVATIVE_NAME for g in desc.get("GeneratedBy", []) if isinstance(g, dict))


def write_bids_dataset(
    out_dir: str | Path,
    simulations: GreSimulation | Mapping[Any, GreSimulation] | None = None,
    *,
    subjects: Sequence[str] = ("1",),
    sessions: Sequence[str] | None = None,
    phase_units: str = "rad",
    acq: str | None = None,
    seed: int = 0,
    phantom: str = "head",
    phantom_kwargs: Mapping[str, Any] | None = None,
    simulate_kwargs: Mapping[str, Any] | None = None,
    derivatives: bool = True,
    overwrite: bool = False,
    compress: bool = True,
) -> list[Path]:
    """Write a raw BIDS MEGRE dataset (+ ground-truth derivatives) and return the written paths.

    ``simulations`` may be one :class:`GreSimulation` (written for every subject/session), a mapping
    ``{subject: sim}`` or ``{(subject, session): sim}``, or None: then each subject/session is
    simulated here from ``phantom`` ("head": MNI152 head, "zubal": Zubal head, whose files come from
    ``phantom_kwargs["data_dir"]`` or ``$QSMPREP_ZUBAL_DIR``, or "shapes") with ``phantom_kwargs`` and
    ``simulate_kwargs``, the n-th one with seed ``seed + n`` (different veins, phase offsets, noise).
    ``phase_units`` is "rad" (float32) or "arbitrary" (int16, -4096..4095). ``acq`` adds an
    ``acq-<label>`` entity; ``compress=False`` writes ``.nii`` instead of ``.nii.gz``. An existing
    non-empty ``out_dir`` is refused unless ``overwrite`` and it is a dataset written by this
    function (it is then deleted first).
    """
    if phase_units not in PHASE_UNITS:
        raise ValueError(f"phase_units must be one of {PHASE_UNITS}, got {phase_units!r}")
    subjects = [_clean_label(s, "sub") for s in subjects]
    if not subjects:
        raise ValueError("at least one subject is needed")
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"duplicate subject labels: {subjects}")
    sessions = None if sessions is None or len(sessions) == 0 else [_clean_label(s, "ses") for s in sessions]
    acq = None if acq is None else _clean_label(acq, "acq")
    if simulations is None and phantom not in PHANTOMS:
        raise ValueError(f"phantom must be one of {PHANTOMS}, got {phantom!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use overwrite=True)")
        if not _is_our_dataset(out):
            raise FileExistsError(f"{out} is not empty and was not written by {DERIVATIVE_NAME}; refusing to delete it")
        shutil.rmtree(out)
    if simulations is None:
        items = _simulate_all(subjects, sessions, seed, phantom, phantom_kwargs, simulate_kwargs)
        subs = subjects
    else:
        sims = _normalise_simulations(simulations, subjects, sessions)
        items = iter(sorted(sims.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")))
        subs = sorted({s for s, _ in sims})
    written = _Sink()
    try:
        _write_all(out, items, subs, written, phase_units, acq, derivatives, compress)
    finally:
        written.close()
    return sorted(written)


def _write_all(out, items, subs, written, phase_units, acq, derivatives, compress) -> None:
    ext = ".nii.gz" if compress else ".nii"
    out.mkdir(parents=True, exist_ok=True)
    deriv = out / "derivatives" / DERIVATIVE_NAME
    _save_json(
        out / "dataset_description.json",
        {
            "Name": "qsmprep simulated multi-echo GRE",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["qsmprep developers"],
            "GeneratedBy": [
                {
                    "Name": DERIVATIVE_NAME,
                    "Version": __version__,
                    "Description": "Numerical head phantom (MNI152 2009 templates) and GRE forward model",
                }
            ],
        },
        written,
    )
    b0_values = set()
    # one subject/session at a time, so that generated data need not be held in memory together
    for (sub, ses), sim in items:
        b0_values.add(float(sim.b0_tesla))
        rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses is not None else "") / "anat"
        prefix = _prefix(sub, ses, acq)
        _write_raw(out / rel, prefix, sim, phase_units, ext, written)
        if derivatives:
            _write_truth(deriv / rel, prefix, sim, f"bids:raw:{rel.as_posix()}/{prefix}", ext, written)
        del sim

    _save_text(
        out / "README",
        "Simulated multi-echo gradient-echo (MEGRE) data written by qsmprep-simulate.\n"
        f"Phase units: {phase_units}. Field strength (T): {', '.join(f'{b:g}' for b in sorted(b0_values))}.\n"
        f"Ground truth (susceptibility, fields, labels) in derivatives/{DERIVATIVE_NAME}/.\n",
        written,
    )
    _save_text(out / "participants.tsv", "participant_id\n" + "".join(f"sub-{s}\n" for s in sorted(subs)), written)
    _save_json(out / "participants.json", {"participant_id": {"Description": "Simulated subject"}}, written)
    if derivatives:
        _save_json(
            deriv / "dataset_description.json",
            {
                "Name": "qsmprep-simulate ground truth",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": DERIVATIVE_NAME, "Version": __version__}],
                "DatasetLinks": {"raw": "../../"},
            },
            written,
        )


def _write_raw(anat: Path, prefix: str, sim: GreSimulation, phase_units: str, ext: str, written: list[Path]) -> None:
    common = {
        "MagneticFieldStrength": float(sim.b0_tesla),
        "ImagingFrequency": round(constants.GAMMA_BAR_HZ_PER_T * sim.b0_tesla / 1e6, 6),
        "Manufacturer": "qsmprep-simulate",
        "MRAcquisitionType": "3D",
        "PulseSequenceType": "GR",
    }
    for e, te in enumerate(np.asarray(sim.echo_times_s, dtype=float)):
        n = e + 1
        stem = f"{prefix}_echo-{n}"
        mag = np.ascontiguousarray(sim.magnitude[..., e], dtype=np.float32)
        _save_nifti(anat / f"{stem}_part-mag_MEGRE{ext}", mag, sim.affine, written)
        meta = dict(common, EchoTime=float(te), EchoNumber=n, ImageType=["ORIGINAL", "PRIMARY", "M", "ND"])
        _save_json(anat / f"{stem}_part-mag_MEGRE.json", meta, written)
        ph = sim.phase_rad[..., e]
        if phase_units == "arbitrary":
            ph = phase_to_arbitrary(ph)
        else:
            ph = np.ascontiguousarray(ph, dtype=np.float32)
        _save_nifti(anat / f"{stem}_part-phase_MEGRE{ext}", ph, sim.affine, written)
        meta = dict(
            common, EchoTime=float(te), EchoNumber=n, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"], Units=phase_units
        )
        _save_json(anat / f"{stem}_part-phase_MEGRE.json", meta, written)


def _write_truth(anat: Path, prefix: str, sim: GreSimulation, source: str, ext: str, written: list[Path]) -> None:
    sources = [f"{source}_echo-{e + 1}_part-phase_MEGRE{ext}" for e in range(sim.n_echoes)]
    base = {
        "Sources": sources,
        "MagneticFieldStrength": float(sim.b0_tesla),
        "EchoTime": [float(t) for t in sim.echo_times_s],
    }
    sim_params = {
        "B0DirectionVoxel": [float(v) for v in sim.b0_dir],
        "NoiseSigma": float(sim.noise_sigma),
    }
    aff = sim.affine
    _save_nifti(anat / f"{prefix}_Chimap{ext}", sim.chi_ppm.astype(np.float32), aff, written)
    _save_json(
        anat / f"{prefix}_Chimap.json",
        dict(
            base,
            Units="ppm",
            SkullStripped=False,
            Description="Ground-truth susceptibility (ppm) relative to water/CSF (CSF = 0), whole field of view",
            SimulationParameters=sim_params,
        ),
        written,
    )
    _save_nifti(anat / f"{prefix}_desc-brain_mask{ext}", sim.brain_mask.astype(np.uint8), aff, written)
    _save_json(anat / f"{prefix}_desc-brain_mask.json", {"Type": "Brain", "Sources": sources}, written)
    _save_nifti(anat / f"{prefix}_dseg{ext}", sim.labels.astype(np.int16), aff, written)
    rows = ["index\tname\tchi_ppm"]
    for k in sorted(sim.label_names):
        chi = sim.label_chi_ppm.get(k, float("nan"))
        rows.append(f"{k}\t{sim.label_names[k]}\t{chi:.4f}")
    _save_text(anat / f"{prefix}_dseg.tsv", "\n".join(rows) + "\n", written)
    _save_json(
        anat / f"{prefix}_dseg.json",
        {"Description": "Tissue labels (ids 1-16 as in QSM Challenge 2.0); chi_ppm column: nominal value"},
        written,
    )
    fields = (
        ("total", sim.total_field_ppm, "ppm", "Total field dB/B0 after centre-frequency/shim removal"),
        ("local", sim.local_field_ppm, "ppm", "Field of the sources inside the brain mask; 0 outside"),
        ("background", sim.background_field_ppm, "ppm", "Total minus local field"),
        ("phaseoffset", sim.phase_offset_rad, "rad", "Echo-independent phase offset phi0"),
    )
    for desc, arr, units, text in fields:
        stem = f"{prefix}_desc-{desc}_fieldmap"
        _save_nifti(anat / f"{stem}{ext}", np.asarray(arr, dtype=np.float32), aff, written)
        _save_json(anat / f"{stem}.json", dict(base, Units=units, Description=text), written)
    if sim.r2star_hz is not None:
        _save_nifti(anat / f"{prefix}_R2starmap{ext}", sim.r2star_hz.astype(np.float32), aff, written)
        _save_json(anat / f"{prefix}_R2starmap.json", dict(base, Units="1/s", SkullStripped=False), written)
    if sim.m0 is not None:
        _save_nifti(anat / f"{prefix}_S0map{ext}", sim.m0.astype(np.float32), aff, written)
        _save_json(anat / f"{prefix}_S0map.json", dict(base, Units="arbitrary", SkullStripped=False), written)


def _simulate_all(subjects, sessions, seed, phantom, phantom_kwargs, simulate_kwargs):
    """Generate ((sub, ses), GreSimulation) pairs lazily, seed + n for the n-th."""
    from qsmprep.simulate.phantom import make_head_phantom, make_shapes_phantom, make_zubal_phantom
    from qsmprep.simulate.signal import simulate_gre

    makers = {"head": make_head_phantom, "zubal": make_zubal_phantom, "shapes": make_shapes_phantom}
    if phantom not in makers:
        raise ValueError(f"phantom must be one of {sorted(makers)}, got {phantom!r}")
    pk = dict(phantom_kwargs or {})
    sk = dict(simulate_kwargs or {})
    n = 0
    for sub in subjects:
        for ses in sessions or [None]:
            s = int(seed) + n
            ph = makers[phantom](seed=s, **pk)
            yield (sub, ses), simulate_gre(ph, seed=s, **sk)
            n += 1
