"""Command line of the qsmprep BIDS App: parser, config-file precedence, exit statuses, --help/--version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsmprep import __version__
from qsmprep.cli.parser import parse_config, parse_mem_gb
from qsmprep.cli.run import main
from qsmprep.config import QsmprepConfig
from qsmprep.qsm import registry
from qsmprep.methods import names as method_choices
from qsmprep.utils.errors import InputError


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("qsmprep: error: "), lines[0]
    return lines[0]


def test_help_lists_options_and_registered_methods(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qsmprep")
    for opt in (
        "--participant-label",
        "--session-label",
        "--bids-filter-file",
        "--work-dir",
        "--nprocs",
        "--omp-nthreads",
        "--mem",
        "--use-plugin",
        "--stop-on-first-crash",
        "--config-file",
        "--boilerplate-only",
        "--write-graph",
        "--resource-monitor",
        "--skip-bids-validation",
        "--device",
        "--masking",
        "--unwrapping",
        "--bgremove",
        "--inversion",
        "--reference",
        "--r2star",
        "--t2star",
        "--verbose",
        "--version",
    ):
        assert opt in out, opt
    # choices come from the registries (modules imported by build_parser)
    assert registry.UNWRAP.names(), "unwrapping registry is empty after build_parser()"
    for name in registry.UNWRAP.names() + registry.INVERSION.names() + registry.BGREMOVE.names():
        assert name in out
    assert {"romeo", "laplacian"} <= set(method_choices("unwrapping"))
    assert "none" in method_choices("reference")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qsmprep {__version__}"


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "the following arguments are required"),
        (["bids"], "the following arguments are required: output_dir, analysis_level"),
        (["bids", "out", "sideways"], "invalid choice: 'sideways'"),
        (["bids", "out", "participant", "--bogus"], "unrecognized arguments: --bogus"),
        (["bids", "out", "participant", "--unwrapping", "nope"], "argument --unwrapping: invalid choice: 'nope'"),
        (["bids", "out", "participant", "--inversion", "nope"], "argument --inversion: invalid choice"),
        (["bids", "out", "participant", "--device", "tpu"], "argument --device: invalid choice"),
        (["bids", "out", "participant", "--nprocs", "0"], "argument --nprocs/--nthreads/--n-cpus/--n_cpus: must be at least 1"),
        (["bids", "out", "participant", "--nprocs", "two"], "--nprocs/--nthreads/--n-cpus/--n_cpus: 'two' is not an integer"),
        (["bids", "out", "participant", "--mem", "lots"], "argument --mem/--mem-gb/--mem_gb: 'lots' is not a memory size"),
        (["bids", "out", "participant", "--participant-label", "a_b"], "is not a BIDS label"),
        (["bids", "out", "participant", "--participant-label"], "expected at least one argument"),
        (["bids", "out", "participant", "--nproc", "2"], "unrecognized arguments"),  # no abbreviations
    ],
)
def test_usage_errors_exit_64_with_one_line(tmp_path, capsys, argv, needle):
    argv = [str(tmp_path / a) if a in ("bids", "out") else a for a in argv]
    assert main(argv) == 64
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert needle in line
    assert line.endswith("See 'qsmprep --help'.")
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_console_script_exit_status(tmp_path):
    """`qsmprep` (console script, sys.exit(main())) exits 64 on usage errors and 0 for --version."""
    exe = shutil.which("qsmprep")
    cmd = [exe] if exe else [sys.executable, "-m", "qsmprep.cli.run"]
    env = dict(os.environ, NIPYPE_NO_ET="1")
    proc = subprocess.run(cmd + [str(tmp_path), str(tmp_path / "o"), "participant", "--bogus"], capture_output=True, text=True, env=env)
    assert proc.returncode == 64, proc.stderr
    assert proc.stderr.count("\n") == 1 and "unrecognized arguments: --bogus" in proc.stderr
    proc = subprocess.run(cmd + ["--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"qsmprep {__version__}"


@pytest.mark.integration
@pytest.mark.parametrize("call", ["rc = main(ARGV)\nprint('RC', rc)", "sys.exit(main(ARGV))"])
def test_unguarded_script_with_multiproc(call, tmp_path, shapes_bids):
    """A script that calls ``main`` at top level (no ``if __name__ == "__main__":``) with ``--nprocs 2``: every
    forkserver process imports the script again. ``main`` starts no nested run there (one note line instead of a
    second run writing into the same output folder), so the run completes; with ``sys.exit(main(...))`` the import
    itself ends the worker (Python's rule, nothing to catch), and the run ends with exit 1 and a crash file that
    names the dead worker and the guard, not with Nipype's ``TypeError`` from its crash report (no crash file)."""
    bids = shapes_bids()[0]
    argv = [str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"), "--nprocs", "2",
            "--skip-bids-validation", "--bgremove", "vsharp", "--inversion", "rts"]
    script = tmp_path / "unguarded.py"
    script.write_text("import sys\nfrom qsmprep.cli.run import main\n" + call.replace("ARGV", repr(argv)) + "\n")
    env = dict(os.environ, NIPYPE_NO_ET="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    err = proc.stderr
    assert "put the call of qsmprep.cli.run.main under if __name__ == '__main__'" in err, err[-3000:]
    assert err.count("qsmprep: found 1 QSM series") == 1, err[-3000:]  # no nested run
    assert "TypeError" not in err, err[-3000:]
    if call.startswith("rc"):
        assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "RC 0", (proc.stdout[-2000:], err[-3000:])
        assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_Chimap.nii.gz").is_file()
    else:
        assert proc.returncode == 1 and "1 processing step failed" in err, err[-3000:]
        crash = list((tmp_path / "out").glob("sub-01/log/*/crash-*.txt"))
        assert len(crash) == 1, crash
        text = crash[0].read_text()
        assert "the worker process running this node died (BrokenProcessPool" in text and "__main__" in text


def test_defaults_and_label_stripping(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(["bids", "out", "participant", "--participant-label", "sub-01", "02", "sub-01", "--session_label", "ses-a"])
    d = QsmprepConfig()
    assert cfg.bids_dir == tmp_path / "bids" and cfg.output_dir == tmp_path / "out"
    assert cfg.work_dir == tmp_path / "work"
    assert cfg.participant_label == ["01", "02"] and cfg.session_label == ["a"]
    assert cfg.analysis_level == "participant"
    for key in ("masking", "unwrapping", "bgremove", "inversion", "reference", "device", "r2star", "t2star",
                "skip_bids_validation", "stop_on_first_crash", "boilerplate_only", "write_graph", "resource_monitor"):
        assert getattr(cfg, key) == getattr(d, key), key
    assert cfg.nprocs >= 1 and cfg.omp_nthreads == min(cfg.nprocs, 8)
    assert cfg.plugin == ("Linear" if cfg.nprocs == 1 else "MultiProc")
    assert cfg.mem_gb is None and cfg.bids_filters == {} and cfg.verbose == 0
    json.dumps(cfg.to_dict())  # provenance-serialisable


def test_options_and_aliases(tmp_path):
    cfg = parse_config(
        [
            str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
            "--participant_label", "7",
            "-w", str(tmp_path / "w"),
            "--nthreads", "3", "--omp_nthreads", "2", "--mem", "16000M",
            "--skip_bids_validator", "--stop-on-first-crash", "--write_graph", "--resource-monitor",
            "--boilerplate-only", "--r2star", "--t2star", "--device", "cpu", "-vv",
            "--unwrapping", "laplacian",
        ]
    )
    assert cfg.participant_label == ["7"] and cfg.work_dir == tmp_path / "w"
    assert cfg.nprocs == 3 and cfg.omp_nthreads == 2 and cfg.mem_gb == pytest.approx(16.0)
    assert cfg.skip_bids_validation and cfg.stop_on_first_crash and cfg.write_graph and cfg.resource_monitor
    assert cfg.boilerplate_only and cfg.r2star and cfg.t2star and cfg.device == "cpu" and cfg.verbose == 2
    assert cfg.unwrapping == "laplacian"
    assert cfg.plugin == "MultiProc"
    assert cfg.plugin_args == {"n_procs": 3, "memory_gb": pytest.approx(16.0), "raise_insufficient": False}


@pytest.mark.parametrize("text,gb", [("16", 16.0), ("16G", 16.0), ("16GB", 16.0), ("16000M", 16.0), ("0.5T", 500.0), ("2e6K", 2.0)])
def test_parse_mem_gb(text, gb):
    assert parse_mem_gb(text) == pytest.approx(gb)


def test_config_file_precedence(tmp_path):
    toml = tmp_path / "conf" / "qsmprep.toml"
    toml.parent.mkdir()
    toml.write_text(
        "\n".join(
            [
                'nprocs = 3',
                'omp-nthreads = 2',
                'unwrapping = "laplacian"',
                'inversion = "tkd"',
                'participant_label = ["sub-01", "02"]',
                'r2star = true',
                'work_dir = "scratch"',  # relative to the config file
                'mem = "8G"',
                'skip_bids_validation = true',
                'verbose = 1',
                '[bids_filters.megre]',
                'acquisition = "qsm"',
            ]
        )
    )
    base = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--config-file", str(toml)]
    cfg = parse_config(base)
    assert cfg.nprocs == 3 and cfg.omp_nthreads == 2 and cfg.mem_gb == 8.0
    assert cfg.unwrapping == "laplacian" and cfg.inversion == "tkd"
    assert cfg.participant_label == ["01", "02"] and cfg.r2star is True and cfg.skip_bids_validation
    assert cfg.work_dir == toml.parent / "scratch" and cfg.verbose == 1
    assert cfg.bids_filters == {"megre": {"acquisition": "qsm"}}
    # the command line wins over the file, option by option
    flt = tmp_path / "f.json"
    flt.write_text('{"t2starw": {"run": 1}}')
    cfg = parse_config(
        base
        + ["--nprocs", "1", "--unwrapping", "romeo", "--no-r2star", "--participant-label", "9", "-w", str(tmp_path / "w"),
           "--no-skip-bids-validation", "--bids-filter-file", str(flt)]
    )
    assert cfg.nprocs == 1 and cfg.plugin == "Linear" and cfg.omp_nthreads == 2
    assert cfg.unwrapping == "romeo" and cfg.inversion == "tkd" and cfg.r2star is False
    assert cfg.participant_label == ["9"] and cfg.work_dir == tmp_path / "w" and not cfg.skip_bids_validation
    assert cfg.bids_filters == {"t2starw": {"run": 1}}
    # a [qsmprep] table is accepted too
    toml2 = tmp_path / "table.toml"
    toml2.write_text('[qsmprep]\nbgremove = "pdf"\n')
    assert parse_config(base[:3] + ["--config-file", str(toml2)]).bgremove == "pdf"


@pytest.mark.parametrize(
    "text,code,needle",
    [
        (None, 66, "config file not found"),
        ("nprocs = ", 65, "is not valid TOML"),
        ('colour = "red"', 65, "unknown option 'colour'"),
        ('unwrapping = "nope"', 65, "unwrapping = 'nope': choose one of"),
        ("nprocs = 0", 65, "nprocs = 0: must be at least 1"),
        ('r2star = "yes"', 65, "r2star = 'yes': expected true or false"),
        ('participant_label = [1, "a_b"]', 65, "is not a BIDS label"),
        ('config_file = "x.toml"', 65, "unknown option 'config_file'"),
        ('[bids_filters]\nbold = {task = "rest"}', 65, "unknown query 'bold'"),
    ],
)
def test_config_file_errors(tmp_path, capsys, text, code, needle):
    toml = tmp_path / "c.toml"
    if text is not None:
        toml.write_text(text + "\n")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "bids"), str(out), "participant", "--config-file", str(toml)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == code, line
    assert line.startswith(f"qsmprep: error: {toml}: ") and needle in line, line
    assert not out.exists()


def test_plugin_file(tmp_path, capsys):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 5\n  memory_gb: 12\n  maxtasksperchild: 1\n")
    base = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--use-plugin", str(plugin)]
    cfg = parse_config(base)
    assert cfg.plugin == "MultiProc" and cfg.nprocs == 5 and cfg.mem_gb == 12
    assert cfg.plugin_args["n_procs"] == 5 and cfg.plugin_args["maxtasksperchild"] == 1
    cfg = parse_config(base + ["--nprocs", "2", "--mem", "4"])  # the command line wins
    assert cfg.nprocs == 2 and cfg.plugin_args["n_procs"] == 2 and cfg.plugin_args["memory_gb"] == 4
    plugin.write_text("plugin: SLURMGraph\nplugin_args:\n  dont_resubmit_completed_jobs: true\n")
    cfg = parse_config(base)
    assert cfg.plugin == "SLURMGraph" and cfg.plugin_args == {"dont_resubmit_completed_jobs": True}
    for text, needle in (("plugin_args: {}\n", "needs a 'plugin:' name"), ("plugin: [\n", "is not valid YAML")):
        plugin.write_text(text)
        assert main(base) == 65
        assert needle in _one_error_line(capsys.readouterr().err)
    assert main(base[:3] + ["--use-plugin", str(tmp_path / "missing.yml")]) == 66
    assert "Nipype plugin file not found" in _one_error_line(capsys.readouterr().err)


def test_input_error_format():
    err = InputError("/data/x.json", "EchoTime is missing.", "Add it.", 65)
    assert str(err) == "/data/x.json: EchoTime is missing. Add it." and err.code == 65


def test_parser_has_no_heavy_imports():
    """--help must stay quick: neither nipype nor pybids nor torch are imported to build the parser.

    Its wall time (target <= 20 s) is measured by benchmarks/bench_reports.py."""
    code = (
        "import sys; "
        "from qsmprep.cli.parser import build_parser; build_parser(); "
        "print([m for m in ('nipype', 'bids', 'torch') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_demo_rejects_foreign_folder(tmp_path, capsys):
    from qsmprep.cli.demo import main as demo_main

    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text('{"Name": "not simulated"}')
    assert demo_main([str(tmp_path)]) == 64
    assert "was not written by qsmprep-simulate" in capsys.readouterr().err
    assert demo_main([]) == 64
    assert demo_main(["--help"]) == 0


def test_saved_settings_load_back_with_config_file(tmp_path):
    """``QsmprepConfig.to_toml`` (written per run as log/<run_uuid>/qsmprep.toml) is a valid --config-file
    that gives the same config back."""
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 3\n  maxtasksperchild: 1\n")
    pos = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant"]
    toml = tmp_path / "m.toml"
    toml.write_text('[method_params.bgremove]\nradii_mm = [8, 6, 4]\n[bids_filters.megre]\nacquisition = "qsm"\n')
    cfg = parse_config(pos + ["--participant-label", "01", "--bgremove", "V-SHARP", "--inversion", "tv", "--r2star",
                              "--r2star-method", "arlo", "--mem", "6G", "--use-plugin", str(plugin), "-w",
                              str(tmp_path / "w"), "--self-supervised-steps", "0", "--config-file", str(toml),
                              "--segmentation-dir", str(tmp_path / "seg")])
    assert cfg.bgremove == "vsharp" and cfg.r2star_method == "arlo" and cfg.method_params.bgremove == {"radii_mm": [8, 6, 4]}
    saved = tmp_path / "saved.toml"
    saved.write_text(cfg.to_toml())
    again = parse_config(pos + ["--config-file", str(saved)])
    assert again == cfg
    assert QsmprepConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "table,code,needle",
    [
        ("[method_params.bgremove]\nradius_mm = 8", 65, "has no parameter 'radius_mm' (valid: radii_mm, threshold)"),
        ("[method_params.inversion]\nmaxit = \"ten\"", 65, "maxit = 'ten' should be a number"),
        ("[method_params.bgremoval]\nradii_mm = 8", 65, "expected tables named after stages"),
        ("[method_params.bgremove]\nthreshold = 2", 65, "bgremove method 'vsharp': threshold = 2 is out of range (0, 1)"),
        ("[method_params.bgremove]\nradii_mm = [6, -2]", 65, "radii_mm = [6, -2] is out of range (0, inf)"),
        ("[method_params.inversion]\nmaxit = 0", 65, "inversion method 'rts': maxit = 0 is out of range [1, inf)"),
        ("[method_params.masking]\nfractional_threshold = 1.5", 65,
         "masking method 'bet-phase': fractional_threshold = 1.5 is out of range (0, 1)"),
        ("[method_params.reference]\nmin_voxels = 0", 65, "reference method 'mean' has no parameter 'min_voxels'"),
    ],
)
def test_method_parameters_are_checked_before_any_work(tmp_path, capsys, table, code, needle):
    toml = tmp_path / "c.toml"
    toml.write_text(table + "\n")
    out = tmp_path / "out"
    rc = main([str(tmp_path / "bids"), str(out), "participant", "--bgremove", "vsharp", "--inversion", "rts",
               "--config-file", str(toml)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == code and needle in line, line
    assert not out.exists()


def test_parameter_ranges_are_declared_at_registration():
    """Every declared range names a parameter of its method and holds the parameter's default; the
    classical methods declare ranges for their numeric parameters (radii, tolerances, iterations, ...)."""
    from qsmprep.methods import STAGES
    from qsmprep.qsm.registry import Interval

    declared = 0
    for key, registry in STAGES.items():
        for name in registry.names():
            method = registry.method(name)
            params = method.parameters()
            assert set(method.ranges) <= set(params), (key, name, set(method.ranges) - set(params))
            for param, interval in method.ranges.items():
                default = params[param].default
                assert default is None or interval.contains(default), (key, name, param, default, str(interval))
                declared += 1
    assert declared >= 50
    for key, name, param in [("bgremove", "vsharp", "threshold"), ("bgremove", "pdf", "max_iter"),
                             ("inversion", "rts", "maxit"), ("inversion", "tkd", "delta"),
                             ("masking", "phase", "erosions"), ("reference", "csf", "radius_mm")]:
        assert param in STAGES[key].method(name).ranges, (key, name, param)
    iv = Interval.parse("(0, 1)")
    assert str(iv) == "(0, 1)" and iv.contains(0.5) and not iv.contains(0) and not iv.contains(1)
    assert not iv.contains(float("nan")) and not iv.contains(True) and not iv.contains("0.5")
    assert str(Interval.parse("[1, inf)")) == "[1, inf)" and Interval.parse((0, None)).contains(1e9)
    with pytest.raises(ValueError, match="invalid interval"):
        Interval.parse("0..1")
    with pytest.raises(ValueError, match="threshold = 2 is out of range \\(0, 1\\)"):
        STAGES["bgremove"].method("vsharp").check_params({"threshold": 2})


def test_numpy_huge_page_advice_is_switched_off_only_where_the_kernel_stalls_on_it(tmp_path, monkeypatch):
    """qsmprep.cli.run.main (tune_allocation) switches NumPy's MADV_HUGEPAGE off where THP defrag compacts on
    fault (synchronous compaction made first touches 10-15x slower on the CI machine), and leaves a user's
    NUMPY_MADVISE_HUGEPAGE alone."""
    from qsmprep.utils.allocation import avoid_stalling_hugepages, thp_defrag_mode

    defrag = tmp_path / "defrag"
    defrag.write_text("always defer defer+madvise [madvise] never\n")
    assert thp_defrag_mode(defrag) == "madvise"
    assert thp_defrag_mode(tmp_path / "missing") is None
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    assert avoid_stalling_hugepages(defrag) is True
    assert os.environ["NUMPY_MADVISE_HUGEPAGE"] == "0"  # inherited by Nipype workers and SLURM jobs
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    assert avoid_stalling_hugepages(defrag) is False and os.environ["NUMPY_MADVISE_HUGEPAGE"] == "1"
    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE")
    for mode in ("always defer defer+madvise madvise [never]", "always [defer] defer+madvise madvise never"):
        defrag.write_text(mode)
        assert avoid_stalling_hugepages(defrag) is False and "NUMPY_MADVISE_HUGEPAGE" not in os.environ


def test_malloc_keeps_freed_volumes_unless_the_user_chose(monkeypatch):
    """glibc malloc without mmap blocks and a 256 MiB trim threshold (freed volumes reused without page
    faults), passed on to child processes; a user's MALLOC_* setting wins; memory is handed back on demand."""
    from qsmprep.utils.allocation import MALLOC_TRIM_THRESHOLD_BYTES, keep_freed_memory_in_heap, release_free_memory

    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert keep_freed_memory_in_heap() is True  # glibc (Debian, the container)
    assert os.environ["MALLOC_MMAP_MAX_"] == "0"
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == str(MALLOC_TRIM_THRESHOLD_BYTES)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_MMAP_MAX_'])"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "0"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert keep_freed_memory_in_heap() is False and os.environ["MALLOC_TRIM_THRESHOLD_"] == "1000"
    big = np.ones(50_000_000, np.float32)  # 200 MB from the heap, not an mmap block
    del big
    release_free_memory()
