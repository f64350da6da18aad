"""The learned methods inside the BIDS App: CLI choices, model checks before any work, provenance in
the sidecar parameters, ``--device``, and the methods boilerplate."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import save_nifti

from qsmprep.cli.run import main
from qsmprep.interfaces.qsm import BackgroundRemoval, DipoleInversion
from qsmprep.methods import method_label, method_references
from qsmprep.methods import names as method_choices
from qsmprep.nn.models import save_model
from qsmprep.nn.unet import UNet3d
from qsmprep.qsm.geometry import forward_field_ppm


def test_learned_methods_are_cli_choices_with_references():
    import inspect

    from qsmprep.methods import STAGES

    for stage in ("bgremove", "inversion"):  # learned <=> the function loads a model
        reg = STAGES[stage]
        learned = [n for n in reg.names() if "model" in inspect.signature(reg.get(n)).parameters]
        assert sorted(learned) == sorted(n for n in reg.names() if reg.method(n).learned)
    assert {"deepqsm", "nextqsm"} <= set(method_choices("inversion"))
    assert "nextqsm" in method_choices("bgremove")
    assert "vsharp" in method_choices("bgremove") and "rts" in method_choices("inversion")
    assert method_label("inversion", "deepqsm") == "DeepQSM"
    assert "bollmann2019" in method_references("inversion", "deepqsm")
    assert "cognolato2023" in method_references("bgremove", "nextqsm")


@pytest.mark.parametrize("args", [["--inversion", "deepqsm"], ["--bgremove", "nextqsm"], ["--bgremove", "nextqsm-unet"],
                                  ["--inversion", "nextqsm"]])
def test_missing_model_fails_before_any_work(tmp_path, monkeypatch, capsys, args):
    empty = tmp_path / "models"
    empty.mkdir()
    monkeypatch.setenv("QSMPREP_MODEL_DIR", str(empty))
    bids = tmp_path / "bids"
    bids.mkdir()
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "-w", str(tmp_path / "w"), "--skip-bids-validation"] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 64, err
    assert err.count("\n") == 0 and ".pt" in err and "not found" in err, err
    assert not out.exists()


def _save_tiny_unet(directory: Path, name: str) -> dict:
    torch.manual_seed(0)
    net = UNet3d(width=2, depth=1)
    return save_model(net, directory / f"{name}.pt", "unet3d", {"width": 2, "depth": 1},
                      {"name": name, "note": "plumbing test only"}, {"input_scale": 20.0, "output_scale": 5.0}, "test")


def _nifti(path: Path, data, dtype=np.float32) -> str:
    return save_nifti(path, data, dtype=dtype)


def test_interfaces_record_model_name_version_checksum(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    card_inv = _save_tiny_unet(models, "deepqsm")
    card_bg = _save_tiny_unet(models, "nextqsm-bg")
    monkeypatch.setenv("QSMPREP_MODEL_DIR", str(models))
    monkeypatch.chdir(tmp_path)
    shape = (20, 22, 18)
    mask = np.zeros(shape, bool)
    mask[3:-3, 3:-3, 3:-3] = True
    chi = np.zeros(shape, np.float32)
    chi[8:12, 9:13, 7:11] = 0.1
    field = forward_field_ppm(chi, (1, 1, 1), (0, 0, 1)).astype(np.float32)
    f_file, m_file = _nifti(tmp_path / "f.nii", field), _nifti(tmp_path / "m.nii", mask, np.uint8)
    inv = DipoleInversion(local_field=f_file, mask=m_file, voxel_size=[1.0] * 3, b0_dir=[0.0, 0.0, 1.0],
                          method="deepqsm", device="cpu").run().outputs
    assert inv.params["Method"] == "deepqsm" and inv.params["ModelName"] == "deepqsm"
    assert inv.params["ModelSHA256"] == card_inv["sha256"] and inv.params["ModelVersion"] == "test"
    assert inv.params["Parameters"]["device"] == "cpu"
    out = nib.load(inv.chi).get_fdata()
    assert out.shape == shape and np.all(out[~mask] == 0)
    bg = BackgroundRemoval(total_field=f_file, mask=m_file, voxel_size=[1.0] * 3, b0_dir=[0.0, 0.0, 1.0],
                           method="nextqsm-unet", device="cpu").run().outputs
    assert bg.params["ModelSHA256"] == card_bg["sha256"] and bg.params["MaskVoxelsOut"] == int(mask.sum())
    # a classical method records no model
    tkd = DipoleInversion(local_field=f_file, mask=m_file, voxel_size=[1.0] * 3, b0_dir=[0.0, 0.0, 1.0],
                          method="tkd").run().outputs
    assert "ModelSHA256" not in tkd.params and "device" not in tkd.params["Parameters"]


def test_device_cuda_without_gpu_is_a_usage_error(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    models = tmp_path / "models"
    models.mkdir()
    _save_tiny_unet(models, "deepqsm")
    monkeypatch.setenv("QSMPREP_MODEL_DIR", str(models))
    bids = tmp_path / "bids"
    bids.mkdir()
    rc = main([str(bids), str(tmp_path / "out"), "participant", "--inversion", "deepqsm", "--device", "cuda",
               "--skip-bids-validation"])
    err = capsys.readouterr().err.strip()
    assert rc == 64 and err.count("\n") == 0 and "--device cuda" in err and "cuda" in err.lower(), err
    assert not (tmp_path / "out").exists()


def test_unet_methods_are_linear_in_the_field_amplitude(tmp_path):
    """GroupNorm discards the input's amplitude; the RMS normalisation around the U-Nets restores it, so
    that chi (and the local field) scale with the field as the linear physics requires."""
    from qsmprep.nn.inference import deepqsm, nextqsm_unet_bgremove

    _save_tiny_unet(tmp_path, "deepqsm")
    _save_tiny_unet(tmp_path, "nextqsm-bg")
    rng = np.random.default_rng(0)
    shape = (18, 20, 16)
    mask = np.zeros(shape, bool)
    mask[2:-2, 3:-3, 2:-2] = True
    field = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    for b0 in ((0.0, 0.0, 1.0), (0.0, np.sin(0.3), np.cos(0.3))):
        one = deepqsm(field, mask, (1, 1, 1), b0, device="cpu", model_dir=str(tmp_path))
        for k in (0.1, 3.0):
            np.testing.assert_allclose(deepqsm(k * field, mask, (1, 1, 1), b0, device="cpu", model_dir=str(tmp_path)),
                                       k * one, rtol=1e-4, atol=1e-7 * k)
        loc, _ = nextqsm_unet_bgremove(field, mask, (1, 1, 1), b0, device="cpu", model_dir=str(tmp_path))
        loc3, _ = nextqsm_unet_bgremove(3 * field, mask, (1, 1, 1), b0, device="cpu", model_dir=str(tmp_path))
        np.testing.assert_allclose(loc3, 3 * loc, rtol=1e-4, atol=1e-7)
    assert np.all(deepqsm(0 * field, mask, device="cpu", model_dir=str(tmp_path)) == 0)


@pytest.mark.integration
def test_bids_app_with_the_shipped_varnet_records_the_model(tmp_path, shapes_bids):
    """``--inversion nextqsm`` end to end (Linear plugin, small shapes dataset): Chimap written, its sidecar
    names the model and its sha256, the boilerplate cites NeXtQSM."""
    import json

    from qsmprep.nn.models import model_dir, read_card

    if not (model_dir() / "nextqsm-varnet.pt").is_file():
        pytest.skip("nextqsm-varnet is not shipped")
    card = read_card("nextqsm-varnet")[0]
    bids, _, _ = shapes_bids()  # 40^3 shapes phantom, sub-01, 4 echoes (shared, read-only)
    out = tmp_path / "out"
    rc = main([str(bids), str(out), "participant", "-w", str(tmp_path / "w"), "--nprocs", "1",
               "--skip-bids-validation", "--inversion", "nextqsm", "--device", "cpu"])
    assert rc == 0
    chimap = out / "sub-01" / "anat" / "sub-01_Chimap.nii.gz"
    chi = nib.load(chimap).get_fdata()
    assert chi.shape == (40, 40, 40) and np.isfinite(chi).all() and np.abs(chi).max() > 0
    sidecar = json.loads(chimap.with_name("sub-01_Chimap.json").read_text())
    assert card["sha256"] in json.dumps(sidecar) and "nextqsm-varnet" in json.dumps(sidecar)
    qc = json.loads((out / "sub-01" / "anat" / "sub-01_desc-qc_metrics.json").read_text())
    assert qc.get("model_name") == "nextqsm-varnet" and qc.get("model_checksum") == card["sha256"], qc
    citation = (out / "logs" / "CITATION.md").read_text()
    assert "NeXtQSM" in citation and "Cognolato" in citation


def test_self_supervised_steps_option(tmp_path, capsys):
    from qsmprep.cli.parser import parse_config
    from qsmprep.workflows.qsm import _inversion_params

    bids = tmp_path / "bids"
    bids.mkdir()
    rc = main([str(bids), str(tmp_path / "out"), "participant", "--inversion", "rts", "--self-supervised-steps", "5",
               "--skip-bids-validation"])
    err = capsys.readouterr().err.strip()
    assert rc == 64 and err.count("\n") == 0 and "applies to --inversion nextqsm, not rts" in err, err
    rc = main([str(bids), str(tmp_path / "out"), "participant", "--self-supervised-steps", "-1"])
    assert rc == 64 and "must be >= 0" in capsys.readouterr().err
    cfg = parse_config([str(bids), str(tmp_path / "out"), "participant", "--inversion", "nextqsm",
                        "--self-supervised-steps", "7"])
    assert cfg.self_supervised_steps == 7 and _inversion_params(cfg) == {"self_supervised_steps": 7}
    cfg = parse_config([str(bids), str(tmp_path / "out"), "participant"])
    assert cfg.self_supervised_steps == 0 and _inversion_params(cfg) == {}


@pytest.mark.integration
def test_missing_model_check_runs_in_a_fresh_process(tmp_path):
    """The learned methods are registered on demand: a fresh ``qsmprep`` process (nothing imported
    qsmprep.nn before) still refuses a missing model before looking at the data."""
    import os
    import subprocess
    import sys

    empty = tmp_path / "models"
    empty.mkdir()
    env = dict(os.environ, QSMPREP_MODEL_DIR=str(empty), NIPYPE_NO_ET="1")
    proc = subprocess.run([sys.executable, "-m", "qsmprep.cli.run", str(tmp_path / "no_bids"), str(tmp_path / "out"),
                           "participant", "--inversion", "nextqsm"], capture_output=True, text=True, env=env)
    assert proc.returncode == 64, proc.stderr
    assert proc.stderr.count("\n") == 1 and "nextqsm-varnet.pt not found" in proc.stderr
