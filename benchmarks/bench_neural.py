#!/usr/bin/env python
"""Held-out benchmark of the neural QSM stages against the classical ones on the simulated head.

    python benchmarks/bench_neural.py                          # full size (1 mm, 197x233x189), all cases
    python benchmarks/bench_neural.py --downsample 2 --json neural.json
    python benchmarks/bench_neural.py --cases a,d --model-dir /tmp/models_dev --resources off

Held out: the networks were trained on phantom seed 0 (configs in qsmprep/training/configs); every
case here uses its own phantom seed >= 100 and its own noise seed. Cases (``--cases``):

====  ==========================================================================================
a     3 T, axial B0, 1 mm isotropic, SNR 50 (phantom seed 101)
a25   case a at half the SNR (25): same phantom, same noise seed (noise twice as large)
b     3 T, oblique: head tilted 22 deg about (1, 0.5, 0) (compound obliquity; seed 102)
c     7 T, axial, 1 mm, SNR 50 (seed 103; same echo times, so the field noise in ppm is ~3/7)
d     3 T, axial, 1 mm, graded lesions -1.4..+1.4 ppm (labels 16-21; seed 104)
e     3 T, axial, 0.75 x 0.75 x 1.5 mm voxels (the 1 mm phantom, seed 105, resampled with
      scipy.ndimage.zoom: chi/M0/R2* order 1, labels and brain mask order 0)
====  ==========================================================================================

With ``--downsample N`` cases a-d use ``make_head_phantom(downsample=N)`` (N mm voxels) and case e
uses N x (0.75, 0.75, 1.5) mm voxels.

Inputs. "True" fields are the simulator's noise-free total and local fields plus the measurement
noise of the simulated multi-echo signal at the case's SNR: the wrapped phase of each echo is
unwrapped with the true field (oracle unwrapping, no unwrapping errors), the true phase offset is
removed and the B0 map is fitted with :func:`qsmprep.qsm.multiecho.fit_b0_hz` (default weighting);
``noise = fitted field - true total field`` in the brain mask. Inversions get
``(local_true + noise) * brain_mask`` with the true brain mask; background removal gets the true
total field plus the same noise, with the true brain mask.

Metrics (as in tests/test_head_acceptance.py): demeaned NRMSE (%) and HFEN (%) from
:mod:`qsmprep.qsm.metrics` against the true chi; for inversions from the local field in the true
brain mask and in V-SHARP's eroded mask of the same case; for the chains (V-SHARP + RTS, PDF + RTS,
V-SHARP + VarNet, PDF + VarNet = the learned chain without its learned background step, NeXtQSM
background removal (PDF whose lost local field is restored with the VarNet's prior; the default drops the
mask's 2 mm rim, which estimated masks need, and "rim_mm=0" keeps it, which the true masks here allow)
+ VarNet) in
the intersection of all chains' output masks (= V-SHARP's eroded mask), and for a chain with a larger
output mask (PDF's and the learned removal's are the whole brain) also in that mask. Lesion linearity (case d): per-lesion means of the estimate and of the true
chi, both demeaned in the evaluation mask, regressed (slope, intercept) with the RMSE of the lesion
means (ppm). Deep-GM slope: :func:`qsmprep.qsm.metrics.dgm_slope` over labels 1-7 (caudate, pallidum,
putamen, red nucleus, dentate, substantia nigra, thalamus). Wall times are warm (each method is run
once on a small volume first) and measured in-process. Resources (``--resources``): each network (and
RTS for reference) runs in its own subprocess on the full-size head of case a (``full``, default), or on
this run's grid (``grid``); peak memory is the kernel's VmHWM of that subprocess, absolute and above
its baseline (inputs loaded, torch imported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

TWO_PI = 2.0 * np.pi
DGM_LABELS = (1, 2, 3, 4, 5, 6, 7)
LESION_LABELS = (16, 17, 18, 19, 20, 21)
ECHO_TIMES_S = (0.004, 0.008, 0.012, 0.016, 0.020, 0.024)

#: case key -> settings (phantom seed >= 100: never seen in training; noise seeds new as well)
CASES = {
    "a": dict(title="3 T, axial, 1 mm, SNR 50", seed=101, noise_seed=1101, b0_tesla=3.0, tilt_deg=0.0, snr=50.0),
    "a25": dict(title="3 T, axial, 1 mm, SNR 25 (case a at half SNR)", seed=101, noise_seed=1101, b0_tesla=3.0,
                tilt_deg=0.0, snr=25.0),
    "b": dict(title="3 T, oblique 22 deg, 1 mm, SNR 50", seed=102, noise_seed=1102, b0_tesla=3.0, tilt_deg=22.0,
              tilt_axis=(1.0, 0.5, 0.0), snr=50.0),
    "c": dict(title="7 T, axial, 1 mm, SNR 50", seed=103, noise_seed=1103, b0_tesla=7.0, tilt_deg=0.0, snr=50.0),
    "d": dict(title="3 T, axial, 1 mm, lesions, SNR 50", seed=104, noise_seed=1104, b0_tesla=3.0, tilt_deg=0.0,
              snr=50.0, lesions=True),
    "e": dict(title="3 T, axial, 0.75x0.75x1.5 mm, SNR 50", seed=105, noise_seed=1105, b0_tesla=3.0, tilt_deg=0.0,
              snr=50.0, voxel_mm=(0.75, 0.75, 1.5)),
}
INVERSIONS = ("tkd", "rts", "deepqsm", "varnet")
INV_LABEL = {"tkd": "TKD", "rts": "RTS", "deepqsm": "DeepQSM", "varnet": "NeXtQSM-VarNet"}
#: chain -> (background removal, inversion); "pdf+varnet" is the learned chain without its learned
#: background step (PDF's lost local field restored with the VarNet's prior), i.e. what that step adds;
#: "pdf+rts" the strongest classical chain here
CHAINS = {"vsharp+rts": ("vsharp", "rts"), "pdf+rts": ("pdf", "rts"), "vsharp+varnet": ("vsharp", "varnet"),
          "pdf+varnet": ("pdf", "varnet"), "nextqsm": ("nextqsm", "varnet"), "nextqsm-rim0": ("nextqsm-rim0", "varnet")}
CHAIN_LABEL = {"vsharp+rts": "V-SHARP + RTS", "pdf+rts": "PDF + RTS", "vsharp+varnet": "V-SHARP + VarNet",
               "pdf+varnet": "PDF + VarNet", "nextqsm": "NeXtQSM bg (PDF + VarNet prior) + VarNet (default)",
               "nextqsm-rim0": "NeXtQSM bg, rim_mm=0 + VarNet"}
#: model files each method needs
#: (the learned background removal, "nextqsm-bg" here, uses the VarNet as its susceptibility prior)
NEEDS = {"deepqsm": ("deepqsm",), "varnet": ("nextqsm-varnet",), "nextqsm": ("nextqsm-varnet",),
         "nextqsm-rim0": ("nextqsm-varnet",),
         "nextqsm-bg": ("nextqsm-varnet",), "vsharp+varnet": ("nextqsm-varnet",), "pdf+varnet": ("nextqsm-varnet",)}
#: what the resource subprocesses run
RESOURCE_METHODS = ("deepqsm", "nextqsm-bg", "varnet", "rts")


# --------------------------------------------------------------------------------------------------
# threads, models
# --------------------------------------------------------------------------------------------------


def set_threads(n: int) -> None:
    """Use ``n`` threads: CPU affinity (read by qsmprep.nn's thread setting), torch, scipy.fft, numba."""
    n = int(n)
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if n < len(cpus):
            os.sched_setaffinity(0, set(cpus[:n]))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        pass
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    from qsmprep.qsm import fft as _fft

    _fft.FFT_WORKERS = n
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except Exception:  # noqa: BLE001 - numba optional here
        pass
    try:
        import torch

        torch.set_num_threads(n)
    except Exception:  # noqa: BLE001
        pass


def check_models(model_dir: str | None) -> dict[str, dict]:
    """{model name: card or {"missing": reason}} for the shipped networks (checksums verified)."""
    from qsmprep.nn.models import ModelFileError, load_model

    out = {}
    for name in ("deepqsm", "nextqsm-varnet"):
        try:
            _, card = load_model(name, "cpu", model_dir)
            out[name] = {k: card.get(k) for k in ("name", "version", "steps", "sha256", "model_file", "wall_time_s")}
            out[name]["val_nrmse_percent"] = (card.get("validation") or {}).get("nrmse_percent")
        except ModelFileError as exc:
            out[name] = {"missing": str(exc)}
    return out


def available(method: str, models: dict) -> bool:
    return all("missing" not in models.get(m, {"missing": 1}) for m in NEEDS.get(method, ()))


# --------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------


def anisotropic_phantom(ph, voxel_mm):
    """Resample a phantom to ``voxel_mm`` (scipy.ndimage.zoom, grid mode: chi/M0/R2* order 1, labels and
    brain mask order 0); same field of view."""
    src = np.asarray(ph.voxel_size_mm, dtype=np.float64)
    dst = np.asarray(voxel_mm, dtype=np.float64)
    zoom = src / dst
    shape = tuple(int(round(n * z)) for n, z in zip(ph.chi_ppm.shape, zoom))
    zoom = tuple(s / n for s, n in zip(shape, ph.chi_ppm.shape))

    def rs(a, order, cval):
        return ndi.zoom(a, zoom, order=order, mode="grid-constant", cval=cval, grid_mode=True, prefilter=False)

    amb = float(ph.chi_ambient_ppm)
    affine = np.array(ph.affine, dtype=np.float64)
    affine[:3, :3] = np.diag(dst)
    affine[:3, 3] = np.asarray(ph.affine)[:3, 3] - 0.5 * src + 0.5 * dst
    return dataclasses.replace(
        ph,
        chi_ppm=rs(ph.chi_ppm.astype(np.float32), 1, amb).astype(np.float32),
        m0=rs(ph.m0.astype(np.float32), 1, 0.0).astype(np.float32),
        r2star_hz=rs(ph.r2star_hz.astype(np.float32), 1, 0.0).astype(np.float32),
        labels=rs(ph.labels.astype(np.int16), 0, 0).astype(np.int16),
        brain_mask=rs(ph.brain_mask.astype(np.uint8), 0, 0).astype(bool),
        voxel_size_mm=tuple(float(v) for v in dst),
        affine=affine,
    )


def make_phantom(key: str, downsample: int):
    from qsmprep.simulate import make_head_phantom

    c = CASES[key]
    if "voxel_mm" in c:
        ph = make_head_phantom(downsample=1, lesions=c.get("lesions", False), seed=c["seed"])
        return anisotropic_phantom(ph, tuple(v * downsample for v in c["voxel_mm"]))
    return make_head_phantom(downsample=downsample, lesions=c.get("lesions", False), seed=c["seed"])


def measured_field_ppm(sim) -> np.ndarray:
    """B0 map (ppm) fitted from the simulated noisy phase after oracle unwrapping and offset removal."""
    from qsmprep.qsm.constants import hz_to_ppm
    from qsmprep.qsm.multiecho import fit_b0_hz

    te = np.asarray(sim.echo_times_s, dtype=np.float32)
    ph = np.empty_like(sim.phase_rad)
    for e in range(te.size):
        true = np.float32(TWO_PI * te[e]) * sim.field_hz
        p = sim.phase_rad[..., e] - sim.phase_offset_rad
        ph[..., e] = p + np.float32(TWO_PI) * np.round((true - p) / np.float32(TWO_PI))
    b0 = fit_b0_hz(ph, te, sim.magnitude, mask=sim.brain_mask)
    return np.asarray(hz_to_ppm(b0, sim.b0_tesla), dtype=np.float32)


@dataclasses.dataclass
class Case:
    key: str
    title: str
    shape: tuple
    voxel_size_mm: tuple
    b0_dir: np.ndarray
    b0_tesla: float
    snr: float
    chi: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    total: np.ndarray  # true total field + noise (ppm)
    local: np.ndarray  # (true local field + noise) * mask (ppm)
    local_true: np.ndarray
    noise_std_ppm: float
    sim_s: float
    obliquity: float = 0.0


def build_case(key: str, downsample: int, phantom=None) -> Case:
    from qsmprep.qsm.geometry import obliquity_deg
    from qsmprep.simulate import simulate_gre

    c = CASES[key]
    t0 = time.perf_counter()
    ph = phantom if phantom is not None else make_phantom(key, downsample)
    kw = {"tilt_axis": c["tilt_axis"]} if "tilt_axis" in c else {}
    sim = simulate_gre(ph, echo_times_s=ECHO_TIMES_S, b0_tesla=c["b0_tesla"], tilt_deg=c["tilt_deg"], snr=c["snr"],
                       seed=c["noise_seed"], **kw)
    m = sim.brain_mask
    noise = np.where(m, measured_field_ppm(sim) - sim.total_field_ppm, np.float32(0.0)).astype(np.float32)
    total = (sim.total_field_ppm + noise).astype(np.float32)
    local = ((sim.local_field_ppm + noise) * m).astype(np.float32)
    title = c["title"] if downsample == 1 else f"{c['title']} (grid x{downsample})"
    out = Case(key=key, title=title, shape=tuple(m.shape), voxel_size_mm=tuple(sim.voxel_size_mm),
               b0_dir=np.asarray(sim.b0_dir), b0_tesla=float(sim.b0_tesla), snr=float(c["snr"]),
               chi=sim.chi_ppm, labels=sim.labels, mask=m, total=total, local=local,
               local_true=sim.local_field_ppm, noise_std_ppm=float(np.std(noise[m])),
               sim_s=time.perf_counter() - t0, obliquity=float(obliquity_deg(sim.b0_dir)))
    return out


# --------------------------------------------------------------------------------------------------
# methods and metrics
# --------------------------------------------------------------------------------------------------


def inversion_fn(method: str, device: str, model_dir: str | None):
    from qsmprep.qsm.registry import INVERSION

    if method in ("tkd", "rts"):
        return INVERSION.get(method)
    from qsmprep.nn import inference as nn_inf

    if method == "deepqsm":
        return lambda f, m, vs, b: nn_inf.deepqsm(f, m, vs, b, device=device, model_dir=model_dir)
    if method == "varnet":
        return lambda f, m, vs, b: nn_inf.nextqsm_inversion(f, m, vs, b, device=device, model_dir=model_dir)
    raise KeyError(method)


def bgremove_fn(method: str, device: str, model_dir: str | None):
    if method in ("vsharp", "pdf"):
        from qsmprep.qsm.registry import BGREMOVE

        return BGREMOVE.get(method)
    from qsmprep.nn import inference as nn_inf

    rim = {"rim_mm": 0.0} if method == "nextqsm-rim0" else {}  # the mask's rim kept (a clean, true brain mask)
    return lambda f, m, vs, b: nn_inf.nextqsm_bgremove(f, m, vs, b, device=device, model_dir=model_dir, **rim)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def lesion_linearity(est, truth, mask, labels) -> dict | None:
    """Slope, intercept (ppm) and RMSE (ppm) of per-lesion means (estimate and truth demeaned in ``mask``)."""
    x = est - np.float32(est[mask].mean(dtype=np.float64))
    t = truth - np.float32(truth[mask].mean(dtype=np.float64))
    xs, ts = [], []
    for lab in LESION_LABELS:
        sel = mask & (labels == lab)
        if sel.sum() >= 3:
            xs.append(float(x[sel].mean(dtype=np.float64)))
            ts.append(float(t[sel].mean(dtype=np.float64)))
    if len(xs) < 2:
        return None
    xs, ts = np.array(xs), np.array(ts)
    slope, intercept = np.polyfit(ts, xs, 1)
    return {"slope": float(slope), "intercept_ppm": float(intercept),
            "rmse_ppm": float(np.sqrt(np.mean((xs - ts) ** 2))), "n_lesions": int(len(xs)),
            "est_means_ppm": [round(v, 4) for v in xs], "true_means_ppm": [round(v, 4) for v in ts]}


def scores(est, case: Case, masks: dict) -> dict:
    from qsmprep.qsm import metrics

    out = {}
    for name, m in masks.items():
        out[f"nrmse_{name}"] = metrics.nrmse(est, case.chi, m)
        out[f"hfen_{name}"] = metrics.hfen(est, case.chi, m)
    m0 = next(iter(masks.values()))
    try:
        out["dgm_slope"] = metrics.dgm_slope(est, case.chi, m0, case.labels, DGM_LABELS, min_voxels=3)
    except ValueError:
        out["dgm_slope"] = None
    if any(np.any(case.labels == lab) for lab in LESION_LABELS):
        out["lesions"] = lesion_linearity(est, case.chi, m0, case.labels)
    return out


def warm_up(methods, device: str, model_dir: str | None) -> float:
    """Run every method once on a small volume (numba compilation, torch/oneDNN set-up)."""
    from qsmprep.qsm.geometry import forward_field_ppm

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    n = 40
    g = np.indices((n, n, n)).astype(np.float32) - n / 2
    m = (g**2).sum(0) < (n / 2 - 3) ** 2
    chi = (ndi.gaussian_filter(rng.standard_normal((n, n, n)), 2) * m).astype(np.float32)
    f = forward_field_ppm(chi, (1, 1, 1), (0, 0, 1), 8) * m
    for meth in methods:
        try:
            if meth in INVERSIONS:
                inversion_fn(meth, device, model_dir)(f, m, (1, 1, 1), (0, 0, 1))
            elif meth in ("vsharp", "pdf", "nextqsm-bg"):
                bgremove_fn("nextqsm" if meth == "nextqsm-bg" else meth, device, model_dir)(f, m, (1, 1, 1), (0, 0, 1))
        except Exception as exc:  # noqa: BLE001 - reported when the method runs for real
            print(f"  warm-up of {meth} failed: {type(exc).__name__}: {exc}", flush=True)
    return time.perf_counter() - t0


def run_case(case: Case, models: dict, device: str, model_dir: str | None) -> dict:
    from qsmprep.qsm import metrics

    vs, b = case.voxel_size_mm, case.b0_dir
    res = {"title": case.title, "shape": list(case.shape), "voxel_size_mm": list(case.voxel_size_mm),
           "b0_tesla": case.b0_tesla, "obliquity_deg": round(case.obliquity, 2), "snr": case.snr,
           "field_noise_std_ppm": case.noise_std_ppm, "brain_voxels": int(case.mask.sum()),
           "simulation_s": round(case.sim_s, 1), "inversion": {}, "chain": {}, "skipped": []}
    # chain 1 first: V-SHARP's mask is the eroded evaluation mask of the inversions too
    (loc_v, m_v), t_bv = timed(bgremove_fn("vsharp", device, model_dir), case.total, case.mask, vs, b)
    res["vsharp_mask_voxels"] = int(m_v.sum())
    masks = {"brain": case.mask, "eroded": m_v}
    for meth in INVERSIONS:
        if meth in NEEDS and not available(meth, models):
            res["skipped"].append(meth)
            continue
        chi, t = timed(inversion_fn(meth, device, model_dir), case.local, case.mask, vs, b)
        assert chi.dtype == np.float32 and chi.shape == case.shape
        r = scores(chi, case, masks)
        r["seconds"] = t
        res["inversion"][meth] = r
        del chi
    # chains from the total field with the true brain mask
    outs, bfr = {}, {"vsharp": ((loc_v, m_v), t_bv)}
    for name, (bg, inv) in CHAINS.items():
        if name in NEEDS and not available(name, models):
            res["skipped"].append(f"{name} chain")
            continue
        if bg not in bfr:
            bfr[bg] = timed(bgremove_fn(bg, device, model_dir), case.total, case.mask, vs, b)
        (loc, m), tb = bfr[bg]
        chi, ti = timed(inversion_fn(inv, device, model_dir), loc, m, vs, b)
        outs[name] = (loc, m, chi, tb, ti)
    common = np.logical_and.reduce([o[1] for o in outs.values()])
    res["chain_mask_voxels"] = int(common.sum())
    for name, (loc, m, chi, tb, ti) in outs.items():
        r = scores(chi, case, {"common": common})
        r["bfr_nrmse"] = metrics.nrmse(loc, case.local_true, common)
        r["bfr_seconds"], r["inversion_seconds"], r["seconds"] = tb, ti, tb + ti
        r["mask_voxels"] = int(m.sum())
        if m.sum() > common.sum():  # also in the chain's own (larger) output mask, e.g. the whole brain
            r["own"] = {"bfr_nrmse": metrics.nrmse(loc, case.local_true, m), **scores(chi, case, {"own": m})}
        res["chain"][name] = r
    return res


# --------------------------------------------------------------------------------------------------
# resources (one subprocess per method)
# --------------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def worker(args) -> None:
    """Subprocess entry: run one method on the saved inputs, print a JSON line with time and memory."""
    set_threads(args.threads)
    d = Path(args.worker_dir)
    meta = json.loads((d / "meta.json").read_text())
    mask = np.load(d / "mask.npy")
    field = np.load(d / ("total.npy" if args.worker == "nextqsm-bg" else "local.npy"))
    vs, b = tuple(meta["voxel_size_mm"]), tuple(meta["b0_dir"])
    import torch  # noqa: F401 - part of the baseline

    from qsmprep.nn.models import load_model

    t_load = None
    if args.worker in NEEDS:
        t0 = time.perf_counter()
        for name in NEEDS[args.worker]:
            load_model(name, args.device, args.model_dir)
        t_load = time.perf_counter() - t0
    if args.worker == "nextqsm-bg":
        fn = bgremove_fn("nextqsm", args.device, args.model_dir)
    else:
        fn = inversion_fn(args.worker, args.device, args.model_dir)
    base_rss = _status_kb("VmRSS")
    base_hwm = _status_kb("VmHWM")
    t0 = time.perf_counter()
    fn(field, mask, vs, b)
    seconds = time.perf_counter() - t0
    hwm = _status_kb("VmHWM")
    print(json.dumps({"method": args.worker, "seconds": seconds, "model_load_s": t_load,
                      "peak_rss_gb": hwm / 1e6 * 1.024, "peak_above_baseline_gb": (hwm - base_rss) / 1e6 * 1.024,
                      "baseline_hwm_gb": base_hwm / 1e6 * 1.024, "threads": args.threads}))


def run_resources(case: Case, models: dict, args) -> dict:
    out = {"grid": list(case.shape), "voxel_size_mm": list(case.voxel_size_mm), "threads": args.threads,
           "device": args.device, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="bench_neural_") as tmp:
        d = Path(tmp)
        np.save(d / "mask.npy", case.mask)
        np.save(d / "total.npy", case.total)
        np.save(d / "local.npy", case.local)
        (d / "meta.json").write_text(json.dumps({"voxel_size_mm": list(case.voxel_size_mm),
                                                 "b0_dir": [float(v) for v in case.b0_dir]}))
        for meth in RESOURCE_METHODS:
            if meth in NEEDS and not available(meth, models):
                out["methods"][meth] = {"skipped": "model file missing"}
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", meth, "--worker-dir", tmp,
                   "--threads", str(args.threads), "--device", args.device]
            if args.model_dir:
                cmd += ["--model-dir", args.model_dir]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                out["methods"][meth] = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
                print(f"  resources: {meth} failed:\n{p.stderr[-2000:]}", flush=True)
                continue
            out["methods"][meth] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"  resources: {meth} {out['methods'][meth]['seconds']:.1f} s, "
                  f"peak {out['methods'][meth]['peak_rss_gb']:.2f} GB", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _f(v, fmt="{:.1f}"):
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def _jsonable(obj):
    """Plain JSON: numpy scalars -> Python numbers, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    return obj


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def case_tables(key: str, r: dict) -> str:
    s = [f"### Case {key}: {r['title']}",
         f"grid {'x'.join(map(str, r['shape']))}, voxels {'x'.join(f'{v:g}' for v in r['voxel_size_mm'])} mm, "
         f"B0 {r['b0_tesla']:g} T, obliquity {r['obliquity_deg']:.1f} deg, SNR {r['snr']:g}, field noise "
         f"{1e3 * r['field_noise_std_ppm']:.2f} ppb (std in brain), brain {r['brain_voxels']} voxels, V-SHARP mask "
         f"{r['vsharp_mask_voxels']}", ""]
    rows = []
    for meth in INVERSIONS:
        if meth not in r["inversion"]:
            rows.append([INV_LABEL[meth]] + ["skipped (model missing)"] + [""] * 5)
            continue
        v = r["inversion"][meth]
        rows.append([INV_LABEL[meth], _f(v["nrmse_brain"]), _f(v["nrmse_eroded"]), _f(v["hfen_brain"]),
                     _f(v["hfen_eroded"]), _f(v["dgm_slope"], "{:.2f}"), _f(v["seconds"], "{:.2f}")])
    s.append("Inversion of the true local field (+ noise), true brain mask:\n")
    s.append(table(["method", "NRMSE % brain", "NRMSE % eroded", "HFEN % brain", "HFEN % eroded", "DGM slope",
                    "time s"], rows))
    rows = []
    for name in CHAINS:
        if name not in r["chain"]:
            rows.append([CHAIN_LABEL[name], "skipped (model missing)"] + [""] * 6)
            continue
        v = r["chain"][name]
        rows.append([CHAIN_LABEL[name], _f(v["bfr_nrmse"]), _f(v["nrmse_common"]), _f(v["hfen_common"]),
                     _f(v["dgm_slope"], "{:.2f}"), _f(v["bfr_seconds"], "{:.2f}"), _f(v["inversion_seconds"], "{:.2f}"),
                     _f(v["seconds"], "{:.2f}")])
    s.append(f"\nChain from the true total field (+ noise), true brain mask; compared in the intersection of the "
             f"output masks ({r['chain_mask_voxels']} voxels):\n")
    s.append(table(["chain", "local field NRMSE %", "chi NRMSE %", "chi HFEN %", "DGM slope", "BFR s", "inversion s",
                    "total s"], rows))
    own = [(n, r["chain"][n]) for n in CHAINS if "own" in r["chain"].get(n, {})]
    if own:
        s.append("\nChains whose output mask is larger, in their own output mask:\n")
        s.append(table(["chain", "mask voxels", "local field NRMSE %", "chi NRMSE %", "chi HFEN %"],
                       [[CHAIN_LABEL[n], v["mask_voxels"], _f(v["own"]["bfr_nrmse"]), _f(v["own"]["nrmse_own"]),
                         _f(v["own"]["hfen_own"])] for n, v in own]))
    return "\n".join(s) + "\n"


def _mean(values):
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if len(v) == len(values) and v else None


def summary_tables(results: dict) -> str:
    keys = list(results["cases"])
    out = ["## Summary: NRMSE % (true brain mask) of the inversions of the local field\n"]
    rows = []
    for meth in INVERSIONS:
        rows.append([INV_LABEL[meth]] + [_f(results["cases"][k]["inversion"].get(meth, {}).get("nrmse_brain"))
                                         for k in keys])
    out.append(table(["method"] + keys, rows))
    for metric, what in (("nrmse_common", "chi NRMSE %"), ("hfen_common", "chi HFEN %"),
                         ("bfr_nrmse", "local-field NRMSE %")):
        out.append(f"\n## Summary: {what} of the chains (intersection of output masks)\n")
        rows = []
        for name in CHAINS:
            vals = [results["cases"][k]["chain"].get(name, {}).get(metric) for k in keys]
            rows.append([CHAIN_LABEL[name]] + [_f(v) for v in vals] + [_f(_mean(vals))])
        out.append(table(["chain"] + keys + ["mean"], rows))
    lin_case = next((k for k in keys if "lesions" in CASES[k] or
                     any("lesions" in v for v in results["cases"][k]["inversion"].values())), None)
    if lin_case:
        r = results["cases"][lin_case]
        out.append(f"\n## Linearity (case {lin_case}): lesion means (labels 16-21) vs truth, deep-GM slope\n")
        rows = []
        for group, labels in (("inversion", INV_LABEL), ("chain", CHAIN_LABEL)):
            for meth, lab in labels.items():
                v = r[group].get(meth)
                if v is None:
                    continue
                le = v.get("lesions") or {}
                src = "local field" if group == "inversion" else "total field"
                rows.append([f"{lab} ({src})", _f(le.get("slope"), "{:.3f}"), _f(le.get("intercept_ppm"), "{:+.3f}"),
                             _f(le.get("rmse_ppm"), "{:.3f}"), _f(v.get("dgm_slope"), "{:.3f}")])
        out.append(table(["method", "lesion slope", "intercept ppm", "lesion-mean RMSE ppm", "DGM slope"], rows))
    if "a" in results["cases"] and "a25" in results["cases"]:
        out.append("\n## Noise: NRMSE % (true brain mask) at SNR 50 (case a) vs SNR 25 (case a25)\n")
        rows = []
        ra, rb = results["cases"]["a"], results["cases"]["a25"]
        for meth in INVERSIONS:
            x, y = ra["inversion"].get(meth, {}).get("nrmse_brain"), rb["inversion"].get(meth, {}).get("nrmse_brain")
            rows.append([INV_LABEL[meth], _f(x), _f(y), _f(None if x is None or y is None else y - x, "{:+.1f}")])
        for name in CHAINS:
            x, y = ra["chain"].get(name, {}).get("nrmse_common"), rb["chain"].get(name, {}).get("nrmse_common")
            rows.append([CHAIN_LABEL[name] + " (chain)", _f(x), _f(y),
                         _f(None if x is None or y is None else y - x, "{:+.1f}")])
        out.append(table(["method", "SNR 50", "SNR 25", "rise pp"], rows))
    res = results.get("resources")
    if res:
        out.append(f"\n## Inference time and peak memory on {'x'.join(map(str, res['grid']))} "
                   f"({res['threads']} threads, device {res['device']}; one subprocess per method)\n")
        rows = []
        for meth, v in res["methods"].items():
            if "seconds" not in v:
                rows.append([meth, v.get("skipped") or v.get("error"), "", "", ""])
                continue
            rows.append([meth, _f(v["seconds"], "{:.1f}"), _f(v["model_load_s"], "{:.2f}"),
                         _f(v["peak_rss_gb"], "{:.2f}"), _f(v["peak_above_baseline_gb"], "{:.2f}")])
        out.append(table(["method", "time s", "model load s", "peak RSS GB", "peak above baseline GB"], rows))
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--downsample", type=int, default=1, help="phantom grid factor (1: full size 1 mm; 2: quick)")
    p.add_argument("--cases", default="a,a25,b,c,d,e", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--model-dir", default=None, help="model directory (default: $QSMPREP_MODEL_DIR or the package's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (networks only)")
    p.add_argument("--threads", type=int, default=2, help="threads for torch, FFTs and numba (default 2)")
    p.add_argument("--resources", choices=("full", "grid", "off"), default="full",
                   help="time/memory per network in subprocesses on the full-size head (default), this grid, or not")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    bad = [k for k in keys if k not in CASES]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    if args.downsample < 1:
        raise SystemExit("--downsample must be >= 1")
    set_threads(args.threads)
    t_start = time.perf_counter()
    import torch

    models = check_models(args.model_dir)
    print(f"# Neural QSM benchmark (held-out phantoms, seeds >= 101)\n\nhost {platform.node()}, "
          f"{os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}, device {args.device}, "
          f"downsample {args.downsample}\n", flush=True)
    for name, card in models.items():
        if "missing" in card:
            print(f"- model {name}: MISSING ({card['missing']}); its columns are skipped", flush=True)
        else:
            print(f"- model {name}: {card['model_file']} ({card['steps']} steps, sha256 {card['sha256'][:12]}, "
                  f"validation NRMSE {_f(card['val_nrmse_percent'])} %)", flush=True)
    methods = [m for m in ("tkd", "rts", "vsharp", "pdf", "deepqsm", "varnet", "nextqsm-bg")
               if m not in NEEDS or available(m, models)]
    print(f"\nwarm-up {warm_up(methods, args.device, args.model_dir):.1f} s\n", flush=True)
    results = {"config": {"downsample": args.downsample, "cases": keys, "threads": args.threads, "device": args.device,
                          "model_dir": args.model_dir, "echo_times_s": list(ECHO_TIMES_S), "host": platform.node(),
                          "python": platform.python_version(), "torch": torch.__version__},
               "models": models, "cases": {}}
    phantoms: dict = {}
    case_a_full = None
    for key in keys:
        c = CASES[key]
        pkey = (c["seed"], c.get("lesions", False), c.get("voxel_mm"))
        if pkey not in phantoms:
            phantoms.clear()
            phantoms[pkey] = make_phantom(key, args.downsample)
        case = build_case(key, args.downsample, phantoms[pkey])
        r = run_case(case, models, args.device, args.model_dir)
        results["cases"][key] = r
        print(case_tables(key, r), flush=True)
        if key == "a" and args.downsample == 1:
            case_a_full = case
        del case
    phantoms.clear()
    if args.resources != "off":
        if args.resources == "full" and case_a_full is None:
            print("resources: simulating case a at full size ...", flush=True)
            case_a_full = build_case("a", 1)
        elif args.resources == "grid":
            case_a_full = build_case("a", args.downsample)
        results["resources"] = run_resources(case_a_full, models, args)
    results["wall_s"] = time.perf_counter() - t_start
    print(summary_tables(results))
    print(f"total wall time {results['wall_s']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(results), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
