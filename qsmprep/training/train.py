"""Training loop: seeded, resumable (exactly), time-budgeted; export to a model file with its card.

Config files (TOML) hold one or more top-level tables named after the network, e.g.::

    [deepqsm]                 # the section name is the default export name
    kind = "deepqsm"          # deepqsm | nextqsm-bg | nextqsm-varnet
    patch = 48
    ...
    [deepqsm.model]           # arch + its kwargs (qsmprep.nn.models.build_model)
    arch = "unet3d"
    width = 12
    [deepqsm.data]            # options of the data generator (qsmprep.training.data)
    [deepqsm.scales]          # input_scale / output_scale (see qsmprep.training docstring)

A file with several tables needs ``section=`` (CLI ``--section``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import platform
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsmprep.training import data as _data
from qsmprep.training import losses as _losses

LICENCE = "Apache-2.0"
CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "loss.tsv"
LOSSES = ("l1", "l2", "l1+uqsm", "l2+uqsm")
SCHEDULES = ("cosine", "step", "constant")
#: The data kind -> architecture it trains.
KIND_ARCH = {"deepqsm": "unet3d", "nextqsm-bg": "unet3d", "nextqsm-varnet": "varnet"}


class ConfigError(ValueError):
    """A training configuration file or value is invalid."""


@dataclasses.dataclass
class TrainConfig:
    """Training settings (see the module docstring for the TOML layout)."""

    name: str
    kind: str
    model: dict[str, Any]
    patch: int = 48
    batch_size: int = 1
    steps: int = 1000
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_min: float = 1e-5
    lr_step_every: int = 1000
    lr_gamma: float = 0.5
    warmup_steps: int = 0
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int = 2
    checkpoint_every: int = 100
    validate_every: int = 100
    n_val: int = 4
    val_seed: int = 1_000_003
    loss: str = "l1"
    #: data seeding: "stream" (one generator drawn serially; the shipped weights) or "per-step" (a generator per
    #: step: the data do not depend on the number of data workers, ``train(workers=N)``)
    data_rng: str = "stream"
    #: VarNet only: one forward/backward pass for the whole batch (per-sample dipole kernels stacked), the same
    #: loss as the per-sample loop (mean over samples of the per-sample masked loss), faster on a GPU
    batched_forward: bool = False
    uqsm_weight: float = 0.1
    uqsm_b0_tesla: float = 3.0
    uqsm_te_s: float = 0.02
    uqsm_tv_weight: float = 0.0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    scales: dict[str, float] = dataclasses.field(default_factory=dict)
    recipe: str = ""
    version: str = ""
    source_path: str | None = None
    section: str | None = None

    @property
    def bg_prior(self) -> str:
        """The classical prior a ``nextqsm-bg`` net corrects (``data.prior``), ``"none"`` otherwise."""
        return str(self.data.get("prior", "none")) if self.kind == "nextqsm-bg" else "none"

    @property
    def arch(self) -> str:
        return str(self.model.get("arch", KIND_ARCH.get(self.kind, "")))

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "arch"}

    def validate(self) -> "TrainConfig":
        if self.kind not in KIND_ARCH:
            raise ConfigError(f"kind must be one of {', '.join(KIND_ARCH)}, got {self.kind!r}")
        if self.arch != KIND_ARCH[self.kind]:
            raise ConfigError(f"kind {self.kind!r} trains arch {KIND_ARCH[self.kind]!r}, got model.arch={self.arch!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if "uqsm" in self.loss and self.kind == "nextqsm-bg":
            raise ConfigError("the uQSM loss applies to dipole inversion (deepqsm, nextqsm-varnet), not nextqsm-bg")
        if self.data_rng not in _data.DATA_RNGS:
            raise ConfigError(f"data_rng must be one of {', '.join(_data.DATA_RNGS)}, got {self.data_rng!r}")
        if self.batched_forward and "uqsm" in self.loss:
            raise ConfigError("batched_forward does not support the uQSM loss; use the per-sample loop")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        for key in ("patch", "batch_size", "steps", "num_threads", "checkpoint_every", "validate_every", "n_val"):
            if int(getattr(self, key)) < (0 if key == "n_val" else 1):
                raise ConfigError(f"{key} must be a positive integer, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        mult = 2 ** int(self.model.get("depth", 0))
        if self.patch % mult:
            raise ConfigError(f"patch {self.patch} must be a multiple of 2**depth = {mult}")
        if self.arch == "unet3d":
            cin = int(self.model.get("in_channels", 1))
            prior = self.bg_prior
            if prior not in ("none",) + _data.BG_PRIORS:
                raise ConfigError(f"data.prior must be 'none' or one of {', '.join(_data.BG_PRIORS)}, got {prior!r}")
            want = 3 if prior != "none" else (cin if self.kind == "deepqsm" and cin in (1, 2) else 1)
            if cin != want:
                raise ConfigError(
                    f"model.in_channels must be {want} for kind {self.kind!r}"
                    + (f" with data.prior={prior!r} (prior, total field, prior mask)" if prior != "none" else "")
                    + (" (deepqsm: 1 = field, 2 = TKD + field)" if self.kind == "deepqsm" else "") + f", got {cin}")
            if prior != "none" and not self.model.get("residual", False):
                raise ConfigError("a prior-guided background net (data.prior) must set model.residual = true")
            for k in ("input_scale", "output_scale"):
                if not float(self.scales.get(k, 0)) > 0:
                    raise ConfigError(f"[scales] needs a positive {k} for a U-Net")
        return self

    @classmethod
    def from_toml(cls, path: str | os.PathLike, section: str | None = None, **overrides) -> "TrainConfig":
        """Load one section of a TOML config file (``section`` may be omitted when there is one)."""
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} not found") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {p} cannot be read: {exc}") from None
        sections = [k for k, v in raw.items() if isinstance(v, dict)]
        if section is None:
            if len(sections) != 1:
                raise ConfigError(f"config file {p} has sections {', '.join(sections) or '(none)'}; choose one with --section")
            section = sections[0]
        if section not in raw or not isinstance(raw[section], dict):
            raise ConfigError(f"config file {p} has no section [{section}] (sections: {', '.join(sections)})")
        return cls.from_dict(raw[section], name=section, source_path=str(p), section=section, **overrides)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        d = dict(d)
        d.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        if "model" not in d or "kind" not in d:
            raise ConfigError("a config section needs 'kind' and a [model] table")
        d.setdefault("name", d["kind"])
        try:
            cfg = cls(**d)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        return cfg.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Learning rate at (0-based) ``step``: linear warm-up then cosine / step decay / constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        t = min(step / max(cfg.steps, 1), 1.0)
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * t))
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** (step // max(cfg.lr_step_every, 1))
    return cfg.lr


def hardware_description(device: str) -> str:
    """CPU model and torch threads, or the GPU name."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}; torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads (of {os.cpu_count()} cores); torch {torch.__version__}"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    return device


def rms_in_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS of ``x`` in ``mask`` (shape (B,1,1,1,1), at least 1e-9): the U-Nets see ``x / rms``
    and their output is multiplied back, which makes the prediction linear in the field's amplitude
    (GroupNorm alone would discard it)."""
    from qsmprep.nn.unet import rms_in_mask as _rms

    return _rms(x, mask)


class _Runner:
    """Model forward + loss for one config (shared by training and validation)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: str):
        self.cfg, self.model, self.device = cfg, model, device
        self._kernels: dict[tuple, torch.Tensor] = {}
        if cfg.arch == "varnet":
            self.in_s, self.out_s = 1.0, 1.0
            self.loss_s = 1.0 / float(getattr(model, "chi_scale_ppm", 0.2))
        else:
            self.in_s, self.out_s = float(cfg.scales["input_scale"]), float(cfg.scales["output_scale"])
            self.loss_s = 1.0

    def kernel(self, shape, vs, b0) -> torch.Tensor:
        from qsmprep.nn.dipole import dipole_kernel_torch

        key = (tuple(shape), tuple(np.round(np.asarray(vs, np.float64), 6)), tuple(np.round(np.asarray(b0, np.float64), 6)))
        if key not in self._kernels:
            if len(self._kernels) > 64:
                self._kernels.clear()
            b = np.asarray(b0, np.float64)
            self._kernels[key] = dipole_kernel_torch(shape, vs, b / np.linalg.norm(b), self.device)
        return self._kernels[key]

    def tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}

    def batch_kernels(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dipole kernels of all samples stacked, ``(B, 1, X, Y, Z//2+1)`` (batched VarNet pass)."""
        shape = t["input"].shape[-3:]
        return torch.stack([self.kernel(shape, t["voxel_size_mm"][i].cpu().numpy(), t["b0_dir"][i].cpu().numpy())
                            for i in range(t["input"].shape[0])])[:, None]

    def predict(self, t: dict[str, torch.Tensor], i: int | None = None) -> torch.Tensor:
        """Prediction in ppm for the whole batch (U-Net; VarNet with ``i=None``: batched pass) or sample ``i`` (VarNet)."""
        if self.cfg.arch == "varnet" and i is None:
            return self.model(t["input"], t["mask"], self.batch_kernels(t))
        if self.cfg.arch == "varnet":
            sl = slice(i, i + 1)
            k = self.kernel(t["input"].shape[-3:], t["voxel_size_mm"][i].cpu().numpy(), t["b0_dir"][i].cpu().numpy())
            return self.model(t["input"][sl], t["mask"][sl], k)
        from qsmprep.nn.unet import BG_PRIOR_CHANNELS, bg_unet_input, unet_input

        if t["input"].shape[1] == BG_PRIOR_CHANNELS:  # prior-guided background net, output demeaned in the mask
            xin, s = bg_unet_input(t["input"], t["mask"])
            y = self.model(xin) * (s * self.in_s / self.out_s)
            m = t["mask"]
            mean = (y * m).sum(dim=(-3, -2, -1), keepdim=True) / m.sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1)
            return (y - mean) * m
        x = t["input"] * t["mask"]
        s = rms_in_mask(x, t["mask"])
        xin = unet_input(x / s, t["mask"], self.model.in_channels, self.out_s / self.in_s,
                         float(self.cfg.scales.get("tkd_delta", 0.15)))
        return self.model(xin) * (s * self.in_s / self.out_s)

    def loss(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss of one batch; VarNet: backpropagated per sample (returns the batch mean, detached)."""
        cfg = self.cfg
        base = _losses.masked_l1 if cfg.loss.startswith("l1") else _losses.masked_l2
        n = t["input"].shape[0]
        if cfg.arch == "varnet" and cfg.batched_forward:  # one pass; per-sample masked loss, averaged
            pred = self.predict(t) * self.loss_s
            tgt, m = t["target"] * self.loss_s, t["mask"]
            loss = torch.stack([base(pred[j : j + 1], tgt[j : j + 1], m[j : j + 1]) for j in range(n)]).mean()
            loss.backward()
            return loss.detach().cpu()
        groups = range(n) if cfg.arch == "varnet" else [None]
        total = 0.0
        for i in groups:
            sl = slice(None) if i is None else slice(i, i + 1)
            pred = self.predict(t, i)
            m, tgt = t["mask"][sl], t["target"][sl]
            scale = self.out_s if cfg.arch != "varnet" else self.loss_s
            loss = base(pred * scale, tgt * scale, m)
            if "uqsm" in cfg.loss:
                for j in range(pred.shape[0]):
                    jj = j if i is None else i
                    k = self.kernel(pred.shape[-3:], t["voxel_size_mm"][jj].cpu().numpy(), t["b0_dir"][jj].cpu().numpy())
                    loss = loss + cfg.uqsm_weight / pred.shape[0] * _losses.uqsm_loss(
                        pred[j : j + 1], t["field_ppm"][jj : jj + 1], m[j : j + 1], k,
                        b0_tesla=cfg.uqsm_b0_tesla, te_s=cfg.uqsm_te_s, tv_weight=cfg.uqsm_tv_weight)
            frac = 1.0 if i is None else 1.0 / n
            (loss * frac).backward()
            total += float(loss.detach()) * frac
        return torch.tensor(total)

    @torch.no_grad()
    def validate(self, val: list[dict[str, np.ndarray]]) -> float:
        """Mean NRMSE (%, demeaned in the mask) over the validation samples."""
        if not val:
            return float("nan")
        was = self.model.training
        self.model.eval()
        out = []
        for b in val:
            t = self.tensors(b)
            for i in range(t["input"].shape[0]):
                pred = self.predict(t, i) if self.cfg.arch == "varnet" else self.predict(t)[i : i + 1]
                out.append(float(_losses.nrmse(pred, t["target"][i : i + 1], t["mask"][i : i + 1])))
        self.model.train(was)
        return float(np.mean(out))


def _build(cfg: TrainConfig):
    from qsmprep.nn.models import build_model

    torch.manual_seed(int(cfg.seed))
    return build_model(cfg.arch, **cfg.model_kwargs)


#: config keys a checkpoint must share with the config that resumes it (their defaults for older checkpoints)
RESUME_KEYS = ("kind", "model", "patch", "batch_size", "seed", "data", "scales", "loss", "data_rng", "batched_forward")


def _read_log(path: Path, max_step: int) -> list[list[str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    return [r for r in rows[1:] if r and int(r[0]) <= max_step]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    device: str = "cpu",
    max_minutes: float | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    """Train ``config`` into ``out_dir`` (``checkpoint.pt``, ``loss.tsv``); return a summary dict.

    Deterministic for ``config.seed`` (torch seed for the initial weights, numpy Generator for the
    data); resuming from ``checkpoint.pt`` restores model, Adam state, both RNG states and the step,
    so an interrupted run reproduces the uninterrupted one. Stops at ``config.steps`` or after
    ``max_minutes`` of wall time or at step ``stop_after`` (checkpointing on stop; the learning-rate
    schedule still spans ``config.steps``, so ``--stop-after`` reproduces a run that ran out of time). ``loss.tsv`` columns: step (1-based),
    train_loss, val_nrmse (%; empty when not validated), lr, seconds (cumulative wall time).

    ``workers``: with ``config.data_rng = "per-step"``, the number of processes that make the batches ahead
    (:class:`qsmprep.training.data.ParallelBatches`; 0 = in this process); the data, and so the run, do not
    depend on it. A ``"stream"`` run (one generator drawn serially) needs ``workers = 0``.
    Every invocation that trains is appended to the checkpoint's ``runs`` (steps, wall time, hardware,
    device, workers, torch version, date), which :func:`export` writes to the model card.
    """
    cfg = config.validate()
    workers = int(workers)
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if workers and cfg.data_rng != "per-step":
        raise ConfigError("data workers need data_rng = \"per-step\" (a \"stream\" run draws its data serially)")
    device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.num_threads))
    model = _build(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate(cfg, 0))
    rng = np.random.default_rng(int(cfg.seed))
    step, elapsed0, last_val, runs = 0, 0.0, float("nan"), []
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        old = ck["config"]
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        for key in RESUME_KEYS:
            if old.get(key, defaults.get(key)) != cfg.to_dict().get(key):
                raise ConfigError(f"checkpoint {ckpt_path} was trained with a different {key!r} "
                                  f"({old.get(key)!r} vs {cfg.to_dict().get(key)!r}); use --no-resume or another OUT_DIR")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        rng.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
        step, elapsed0, last_val = int(ck["step"]), float(ck["elapsed_s"]), float(ck.get("val_nrmse", float("nan")))
        runs = list(ck.get("runs", []))
    log_path = out / LOSS_LOG
    rows = _read_log(log_path, step) if step else []
    with open(log_path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(["step", "train_loss", "val_nrmse", "lr", "seconds"])
        w.writerows(rows)
    runner = _Runner(cfg, model, device)
    val = _data.validation_set(cfg.kind, cfg.n_val, cfg.val_seed, cfg.patch, **cfg.data) if cfg.n_val else []
    hardware = hardware_description(device)

    def run_record(reason: str) -> dict[str, Any]:
        return {"start_step": start_step, "end_step": step, "wall_s": round(time.perf_counter() - t0, 1),
                "hardware": hardware, "device": device, "workers": workers, "torch_version": torch.__version__,
                "started": started, "stopped": reason}

    def save(reason: str) -> None:
        trained = step > start_step
        _atomic_save({
            "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "elapsed_s": elapsed0 + (time.perf_counter() - t0), "val_nrmse": last_val,
            "config": cfg.to_dict(), "hardware": hardware, "device": device, "reason": reason,
            "torch_version": torch.__version__, "workers": workers,
            "runs": runs + ([run_record(reason)] if trained else []),
        }, ckpt_path)

    bar = None
    if progress and step < cfg.steps:
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc=cfg.name, unit="step", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm is optional
            bar = None
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    start_step, stopped, train_loss = step, "steps", float("nan")
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, max(int(stop_after), step))
    pool = None
    if workers and step < end:
        pool = _data.ParallelBatches(cfg.kind, cfg.seed, cfg.batch_size, cfg.patch, cfg.data, workers, step, end)

    def next_batch(i: int) -> dict[str, np.ndarray]:
        if pool is not None:
            return pool.get(i)
        if cfg.data_rng == "per-step":
            return _data.batch_for_step(cfg.kind, cfg.seed, i, cfg.batch_size, cfg.patch, cfg.data)
        return _data.make_batch(cfg.kind, rng, cfg.batch_size, cfg.patch, **cfg.data)

    with open(log_path, "a", newline="") as fh, (contextlib.closing(pool) if pool else contextlib.nullcontext()):
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        while step < cfg.steps:
            if stop_after is not None and step >= int(stop_after):
                stopped = "stop_after"
                break
            if max_minutes is not None and (time.perf_counter() - t0) >= 60.0 * float(max_minutes):
                stopped = "time"
                break
            lr = learning_rate(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = next_batch(step)
            opt.zero_grad(set_to_none=True)
            train_loss = float(runner.loss(runner.tensors(batch)))
            if not math.isfinite(train_loss):
                save("non-finite loss")
                raise FloatingPointError(f"training loss is {train_loss} at step {step + 1}; lower lr (checkpoint kept)")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            val_txt = ""
            if val and (step % cfg.validate_every == 0 or step == cfg.steps):
                last_val = runner.validate(val)
                val_txt = f"{last_val:.4f}"
            w.writerow([step, f"{train_loss:.6g}", val_txt, f"{lr:.6g}", f"{elapsed0 + time.perf_counter() - t0:.2f}"])
            fh.flush()
            if step % cfg.checkpoint_every == 0:
                save("periodic")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{last_val:.3g}")
            elif progress and (step % max(cfg.steps // 20, 1) == 0):
                print(f"[{cfg.name}] step {step}/{cfg.steps} loss {train_loss:.4g} val_nrmse {last_val:.3g}% "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    save("time budget" if stopped == "time" else "done")
    wall = time.perf_counter() - t0
    done = step - start_step
    return {
        "step": step, "steps": cfg.steps, "stopped": stopped, "train_loss": train_loss, "val_nrmse": last_val,
        "elapsed_s": elapsed0 + wall, "seconds_per_step": wall / done if done else float("nan"),
        "samples_per_s": done * cfg.batch_size / wall if done and wall > 0 else float("nan"),
        "workers": workers, "checkpoint": str(ckpt_path), "loss_log": str(log_path), "hardware": hardware,
    }


def read_loss_log(out_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of ``loss.tsv`` as float arrays (empty val_nrmse -> NaN)."""
    with open(Path(out_dir) / LOSS_LOG, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    head, body = rows[0], rows[1:]
    return {h: np.array([float(r[i]) if r[i] else np.nan for r in body]) for i, h in enumerate(head)}


def _command(cfg: TrainConfig, steps: int, threads: int, device: str, name: str, workers: int = 0) -> str:
    src = cfg.source_path or "CONFIG.toml"
    try:
        src = os.path.relpath(src, Path(__file__).resolve().parents[2])
        if src.startswith(".."):
            src = cfg.source_path
    except ValueError:
        pass
    sec = f" --section {cfg.section}" if cfg.section else ""
    stop = f" --stop-after {steps}" if steps < cfg.steps else ""
    wk = f" --workers {int(workers)}" if workers else ""
    return (f"qsmprep-train {src} OUT{sec} --steps {cfg.steps}{stop} --threads {threads} --device {device}{wk} "
            f"--export {name} --export-dir MODEL_DIR")


def export(
    out_dir: str | os.PathLike,
    name: str | None = None,
    export_dir: str | os.PathLike | None = None,
    card_extra: dict | None = None,
) -> dict[str, Any]:
    """Write ``<export_dir>/<name>.pt`` + ``.json`` model card from ``out_dir/checkpoint.pt``; return the card.

    ``name`` defaults to the config's section name; ``export_dir`` to :func:`qsmprep.nn.models.model_dir`.
    """
    from qsmprep import __about__
    from qsmprep.nn.models import DEFAULT_SCALES, model_dir, save_model

    ckpt_path = Path(out_dir) / CHECKPOINT
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint {ckpt_path} to export; train first")
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    d = dict(ck["config"])
    cfg = TrainConfig(**d)
    name = name or cfg.name
    model = _build(cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    if cfg.arch == "varnet":
        scales = dict(DEFAULT_SCALES.get("nextqsm-varnet", {}))
        scales.update(field_ppm=float(model.field_scale_ppm), chi_ppm=float(model.chi_scale_ppm),
                      input_scale=1.0, output_scale=1.0)
    else:
        a, b = float(cfg.scales["input_scale"]), float(cfg.scales["output_scale"])
        scales = {"input_scale": a, "output_scale": b, "input_ppm": 1.0 / a, "output_ppm": 1.0 / b}
        if "tkd_delta" in cfg.scales:
            scales["tkd_delta"] = float(cfg.scales["tkd_delta"])
    prior = cfg.bg_prior
    version = cfg.version or __about__.__version__
    threads = int(cfg.num_threads)
    card = {
        "description": {
            "deepqsm": "DeepQSM-style U-Net dipole inversion: local field (ppm) -> susceptibility (ppm), axial B0, 1 mm",
            "nextqsm-bg": ("NeXtQSM background-field U-Net: masked total field (ppm) -> local field (ppm), axial B0"
                           if prior == "none" else
                           f"NeXtQSM-style background-field U-Net guided by {prior}: [{prior} local field, masked total "
                           f"field, {prior} mask] (ppm) -> correction of the local field in the whole mask (ppm), "
                           f"{float(cfg.data.get('local_voxel_mm', 1.0)):g} mm"
                           + (" whole-brain grid, added to the scan-resolution prior" if prior == "pdf" else "")),
            "nextqsm-varnet": "NeXtQSM variational network: local field (ppm) + mask + dipole kernel -> susceptibility (ppm)",
        }[cfg.kind],
        "task": cfg.kind,
        "training_data": {"recipe": cfg.recipe.strip(), "kind": cfg.kind, "patch": cfg.patch, "options": cfg.data,
                          "phantom_seeds_reserved_for_evaluation": "100-199 (never used in training)"},
        "training": {"steps": int(ck["step"]), "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
                     "loss": cfg.loss, "optimizer": "Adam", "seed": cfg.seed, "grad_clip": cfg.grad_clip},
        "seed": cfg.seed,
        "steps": int(ck["step"]),
        "hardware": ck.get("hardware", ""),
        "wall_time_s": round(float(ck["elapsed_s"]), 1),
        "validation": {"nrmse_percent": ck.get("val_nrmse"), "n_samples": cfg.n_val, "seed": cfg.val_seed,
                       "patch": cfg.patch, "metric": "demeaned NRMSE (%) in the mask, synthetic held-out patches"},
        "licence": LICENCE,
        "command": _command(cfg, int(ck["step"]), threads, ck.get("device", "cpu"), name, int(ck.get("workers", 0))),
        "config": {k: v for k, v in d.items() if k not in ("source_path",)},
        "torch_version": ck.get("torch_version", torch.__version__),
        "references": {
            "deepqsm": ["Bollmann S et al., NeuroImage 2019;195:373 (DeepQSM)",
                        "Jung W et al., NeuroImage 2020;211:116619 (QSMnet+)"],
            "nextqsm-bg": ["Cognolato F et al., Med Image Anal 2023;84:102700 (NeXtQSM)"]
            + {"vsharp": ["Wu B et al., MRM 2012;67:137 (V-SHARP)"],
               "pdf": ["Liu T et al., NMR Biomed 2011;24:1129 (PDF)"]}.get(prior, []),
            "nextqsm-varnet": ["Cognolato F et al., Med Image Anal 2023;84:102700 (NeXtQSM)",
                               "Hammernik K et al., MRM 2018;79:3055 (variational network)"],
        }[cfg.kind],
    }
    if ck.get("runs"):  # every invocation that trained (and so every resume)
        card["training_runs"] = ck["runs"]
    if prior != "none":
        card["prior"] = prior
        if prior == "pdf":  # whole-brain coarse-grid correction (qsmprep.nn.inference._coarse_prior_correction)
            card["grid_mm"] = float(cfg.data.get("local_voxel_mm", 1.0))
    card.update(card_extra or {})
    directory = Path(export_dir) if export_dir is not None else model_dir()
    return save_model(model, directory / f"{name}.pt", cfg.arch, cfg.model_kwargs, card, scales, version)


def export_nextqsm(
    bg_out_dir: str | os.PathLike,
    varnet_out_dir: str | os.PathLike,
    name: str = "nextqsm",
    export_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Combine a trained ``nextqsm-bg`` U-Net and ``nextqsm-varnet`` into one ``nextqsm`` model file
    (:class:`qsmprep.nn.models.NeXtQSM`: total field -> chi); the card lists both parts' cards."""
    from qsmprep import __about__
    from qsmprep.nn.models import build_model, model_dir, save_model

    cks = {}
    for key, d in (("nextqsm-bg", bg_out_dir), ("nextqsm-varnet", varnet_out_dir)):
        p = Path(d) / CHECKPOINT
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint {p} to export; train {key} first")
        cks[key] = torch.load(p, map_location="cpu", weights_only=False)
        if cks[key]["config"]["kind"] != key:
            raise ConfigError(f"{p} holds a {cks[key]['config']['kind']!r} run, expected {key!r}")
    cb, cv = TrainConfig(**cks["nextqsm-bg"]["config"]), TrainConfig(**cks["nextqsm-varnet"]["config"])
    kwargs = {"bg": cb.model_kwargs, "varnet": cv.model_kwargs,
              "bg_input_ppm": 1.0 / float(cb.scales["input_scale"]), "bg_output_ppm": 1.0 / float(cb.scales["output_scale"])}
    model = build_model("nextqsm", **kwargs)
    model.bg.load_state_dict(cks["nextqsm-bg"]["model"])
    model.varnet.load_state_dict(cks["nextqsm-varnet"]["model"])
    model.eval()
    card = {
        "description": "NeXtQSM (background U-Net then VarNet): masked total field (ppm) + mask + kernel -> chi (ppm)",
        "task": "nextqsm",
        "licence": LICENCE,
        "parts": {k: {"steps": int(c["step"]), "seed": c["config"]["seed"], "val_nrmse_percent": c.get("val_nrmse"),
                      "wall_time_s": round(float(c["elapsed_s"]), 1), "recipe": c["config"].get("recipe", "").strip(),
                      "command": _command(TrainConfig(**c["config"]), int(c["step"]), int(c["config"]["num_threads"]),
                                          c.get("device", "cpu"), k)}
                  for k, c in cks.items()},
        "hardware": cks["nextqsm-varnet"].get("hardware", ""),
        "seed": cv.seed,
        "steps": int(cks["nextqsm-bg"]["step"]) + int(cks["nextqsm-varnet"]["step"]),
        "wall_time_s": round(sum(float(c["elapsed_s"]) for c in cks.values()), 1),
        "command": "python -c \"from qsmprep.training.train import export_nextqsm; "
                   f"export_nextqsm('OUT_BG', 'OUT_VARNET', '{name}', 'MODEL_DIR')\"",
        "references": ["Cognolato F et al., Med Image Anal 2023;84:102700 (NeXtQSM)"],
    }
    scales = {"bg_input_ppm": kwargs["bg_input_ppm"], "bg_output_ppm": kwargs["bg_output_ppm"]}
    directory = Path(export_dir) if export_dir is not None else model_dir()
    return save_model(model, directory / f"{name}.pt", "nextqsm", kwargs, card, scales,
                      cv.version or __about__.__version__)
