"""Model files: build, save (with a model card and checksum) and load the neural QSM networks.

A model ``<name>`` is two files in a model directory (default ``qsmprep/data/models/``, package data;
override with the environment variable ``QSMPREP_MODEL_DIR``):

- ``<name>.pt``: ``torch.save({"arch", "kwargs", "state_dict", "scales", "version"})``;
- ``<name>.json``: the model card (name, version, architecture, kwargs, training recipe, seed, steps,
  hardware, wall time, validation metrics, licence, command, and the ``sha256`` of the ``.pt``).

:func:`load_model` verifies the checksum and refuses missing or altered files with
:class:`ModelFileError`; it never falls back to random weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qsmprep.nn.unet import UNet3d, rms_in_mask
from qsmprep.nn.varnet import VarNet

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_SCALES",
    "ModelFileError",
    "NeXtQSM",
    "available_models",
    "build_model",
    "load_model",
    "model_dir",
    "read_card",
    "save_model",
    "sha256_file",
]

#: How to fix a missing or altered model file (quoted in :class:`ModelFileError` messages).
FIX_HINT = ("this release ships only the models that beat the classical methods on held-out data (docs/neural.md); "
            "train it with `qsmprep-train` and set QSMPREP_MODEL_DIR, or reinstall qsmprep if a shipped file is gone")

#: Input/output scalings (ppm) used by the inference functions: network input = field / input_ppm,
#: result (ppm) = network output * output_ppm. The VarNet keeps its scales in its own kwargs.
DEFAULT_SCALES: dict[str, dict[str, float]] = {
    "deepqsm": {"input_ppm": 0.05, "output_ppm": 0.2},
    "nextqsm-bg": {"input_ppm": 1.0, "output_ppm": 0.05},
    "nextqsm-varnet": {"field_ppm": 0.05, "chi_ppm": 0.2},
}


class ModelFileError(ValueError):
    """A model file or its card is missing, unreadable or does not match its recorded checksum."""


class NeXtQSM(nn.Module):
    """NeXtQSM (Cognolato et al., Med Image Anal 2023): background U-Net then VarNet.

    ``forward(total_field_ppm, mask, kernel)``: ``local = rms * bg(x / rms) * s_out / s_in`` with
    ``x = (total - mean) * mask`` and ``rms`` its RMS in the mask
    (means over the mask), minus its mean in the mask, then ``VarNet(local, mask, kernel)`` (the same
    preprocessing as :func:`qsmprep.nn.inference.nextqsm_unet_bgremove`, without its resampling). ``kwargs``: ``bg`` (UNet3d kwargs),
    ``varnet`` (VarNet kwargs), ``bg_input_ppm``, ``bg_output_ppm``.
    """

    def __init__(self, bg: dict | None = None, varnet: dict | None = None, bg_input_ppm: float = 1.0,
                 bg_output_ppm: float = 0.05):
        super().__init__()
        self.bg = UNet3d(**(bg or {}))
        self.varnet = VarNet(**(varnet or {}))
        self.bg_input_ppm, self.bg_output_ppm = float(bg_input_ppm), float(bg_output_ppm)
        self.multiple = max(self.bg.multiple, self.varnet.multiple)

    def forward(self, total_field_ppm: torch.Tensor, mask: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        m = mask.to(total_field_ppm.dtype)
        n = m.sum(dim=(-3, -2, -1), keepdim=True).clamp_min(1)
        f = total_field_ppm - (total_field_ppm * m).sum(dim=(-3, -2, -1), keepdim=True) / n
        x = f * m
        s = rms_in_mask(x, m)
        local = self.bg(x / s) * (s * self.bg_output_ppm / self.bg_input_ppm) * m
        local = local - local.sum(dim=(-3, -2, -1), keepdim=True) / n
        return self.varnet(local * m, m, kernel)


ARCHITECTURES: dict[str, type[nn.Module]] = {"unet3d": UNet3d, "varnet": VarNet, "nextqsm": NeXtQSM}


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """A freshly initialised (untrained) network of architecture ``arch`` (unet3d, varnet, nextqsm)."""
    key = str(arch).lower()
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[key](**kwargs)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_dir() -> Path:
    """The model directory: ``$QSMPREP_MODEL_DIR`` if set, else ``qsmprep/data/models`` (may not exist)."""
    env = os.environ.get("QSMPREP_MODEL_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data" / "models"


def _paths(name: str, directory: str | os.PathLike | None) -> tuple[str, Path, Path]:
    """(name, .pt path, .json path); ``name`` may also be a path to a ``.pt`` file."""
    p = Path(str(name))
    if p.suffix == ".pt" or len(p.parts) > 1:
        pt = p.with_suffix(".pt")
        return pt.stem, pt, pt.with_suffix(".json")
    d = Path(directory) if directory is not None else model_dir()
    return str(name), d / f"{name}.pt", d / f"{name}.json"


def available_models(directory: str | os.PathLike | None = None) -> list[str]:
    """Sorted names of models with both ``<name>.pt`` and ``<name>.json`` in the model directory."""
    d = Path(directory) if directory is not None else model_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.pt") if p.with_suffix(".json").is_file())


def _plain(obj: Any) -> Any:
    """JSON-friendly copy (tuples -> lists, numpy/torch scalars -> Python numbers)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_model(
    model: nn.Module,
    path_pt: str | os.PathLike,
    arch: str,
    kwargs: dict,
    card: dict,
    scales: dict,
    version: str,
) -> dict:
    """Write ``path_pt`` (deterministic bytes for the same weights) and its ``.json`` card; return the card.

    The card is ``card`` completed with name, version, architecture, kwargs, scales and the ``sha256``
    of the written ``.pt``. The ``kwargs`` must rebuild ``model`` with :func:`build_model`.
    """
    path_pt = Path(path_pt)
    if path_pt.suffix != ".pt":
        raise ValueError(f"model files end in .pt, got {path_pt}")
    arch = str(arch).lower()
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    kwargs = _plain(dict(kwargs))
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    payload = {"arch": arch, "kwargs": kwargs, "state_dict": state, "scales": _plain(dict(scales)),
               "version": str(version)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path_pt.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_pt.with_suffix(".pt.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path_pt)
    out = _plain(dict(card))
    out.update(name=path_pt.stem, version=str(version), architecture=arch, kwargs=kwargs,
               scales=_plain(dict(scales)), sha256=sha256_file(path_pt), file=path_pt.name)
    path_pt.with_suffix(".json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def read_card(name: str, directory: str | os.PathLike | None = None) -> tuple[dict, Path, Path]:
    """(card, .pt path, .json path) for model ``name``; :class:`ModelFileError` if either file is missing."""
    name, pt, js = _paths(name, directory)
    avail = available_models(pt.parent)
    listing = f" (models there: {', '.join(avail)})" if avail else ""
    if not pt.is_file():
        raise ModelFileError(f"model file {pt} not found for model {name!r}{listing}: {FIX_HINT}")
    if not js.is_file():
        raise ModelFileError(f"model card {js} not found next to model file {pt}: {FIX_HINT}")
    try:
        card = json.loads(js.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"model card {js} cannot be read ({exc}): {FIX_HINT}") from None
    if not isinstance(card, dict) or not isinstance(card.get("sha256"), str):
        raise ModelFileError(f"model card {js} has no sha256 entry: {FIX_HINT}")
    return card, pt, js


def load_model(
    name: str, device: str | torch.device = "cpu", directory: str | os.PathLike | None = None
) -> tuple[nn.Module, dict]:
    """Load model ``name`` (or a path to its ``.pt``) in eval mode after verifying its sha256; (model, card).

    The returned card also holds ``scales`` and ``card_file``/``model_file`` paths.
    """
    card, pt, js = read_card(name, directory)
    digest = sha256_file(pt)
    if digest != card["sha256"]:
        raise ModelFileError(
            f"model file {pt} has sha256 {digest[:12]}… but its model card {js.name} says "
            f"{card['sha256'][:12]}…: {FIX_HINT}"
        )
    try:
        payload = torch.load(pt, map_location="cpu", weights_only=True)
        model = build_model(payload["arch"], **payload["kwargs"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
        raise ModelFileError(f"model file {pt} cannot be loaded ({type(exc).__name__}: {exc}): {FIX_HINT}") from None
    model.to(device).eval()
    out = dict(card)
    out.setdefault("scales", payload.get("scales", {}))
    out["architecture"] = payload["arch"]
    out["model_file"], out["card_file"] = str(pt), str(js)
    return model, out
