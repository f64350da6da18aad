"""Settings of one qsmprep run: one typed dataclass, the only source of defaults.

The CLI (:mod:`qsmprep.cli.parser`) layers these defaults < ``--config-file`` (TOML) < the command line
and builds a :class:`QsmprepConfig` with :meth:`QsmprepConfig.from_dict` (generic over the fields);
:meth:`QsmprepConfig.validate` checks every choice against the method catalogue and the data before any
work; the workflow builders read the validated config; :meth:`QsmprepConfig.to_toml` saves the settings of
a run as a file that ``--config-file`` loads back.

Method fields are typed ``Annotated[str, Stage(<stage>)]`` (a name of a stage of :mod:`qsmprep.methods`):
their choices come from the registries, so registering a method makes it a valid value everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Mapping, Sequence

from qsmprep.utils.errors import EX_DATAERR, EX_USAGE, InputError

__all__ = ["Stage", "MethodParams", "QsmprepConfig", "DEVICES", "ANALYSIS_LEVELS"]

DEVICES = ("auto", "cuda", "cpu")
#: the default masking (brain extraction within reliable phase: ISMRM 2024 consensus) and the mask of a
#: series without magnitude images, where brain extraction cannot run
DEFAULT_MASKING = "bet-phase"
PHASE_ONLY_MASKING = "phase"
LOGGER = logging.getLogger("qsmprep")
ANALYSIS_LEVELS = ("participant", "group")


@dataclass(frozen=True)
class Stage:
    """Annotation of a method field: the stage key of its registry in :mod:`qsmprep.methods`."""

    key: str


#: Types of the method fields: a name registered in the stage's registry (:mod:`qsmprep.methods`). Not a
#: ``Literal``: the choices are whatever is registered, so one registration adds a method everywhere.
MaskingMethod = Annotated[str, Stage("masking")]
UnwrappingMethod = Annotated[str, Stage("unwrapping")]
BgremoveMethod = Annotated[str, Stage("bgremove")]
InversionMethod = Annotated[str, Stage("inversion")]
ReferenceMethod = Annotated[str, Stage("reference")]
R2starMethod = Annotated[str, Stage("r2star")]


@dataclass
class MethodParams:
    """Extra keyword parameters per stage (``[method_params.<stage>]`` in a config file), checked against
    the typed parameter set of the stage's chosen method (:meth:`qsmprep.qsm.registry.Method.check_params`)."""

    masking: dict[str, Any] = field(default_factory=dict)
    offset: dict[str, Any] = field(default_factory=dict)
    unwrapping: dict[str, Any] = field(default_factory=dict)
    b0: dict[str, Any] = field(default_factory=dict)
    bgremove: dict[str, Any] = field(default_factory=dict)
    inversion: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    r2star: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def stages(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, value: Mapping[str, Mapping[str, Any]] | "MethodParams" | None) -> "MethodParams":
        """From ``{"bgremove": {...}, ...}``; ``ValueError`` naming the valid stages for other keys."""
        if isinstance(value, MethodParams):
            return value
        value = dict(value or {})
        bad = [k for k, v in value.items() if k not in cls.stages() or not isinstance(v, Mapping)]
        if bad:
            raise ValueError(f"expected tables named after stages ({', '.join(cls.stages())}), got {', '.join(bad)}")
        return cls(**{k: dict(v) for k, v in value.items()})

    def for_stage(self, stage: str) -> dict[str, Any]:
        """A copy of the parameters of ``stage``."""
        return dict(getattr(self, stage))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Non-empty stages only."""
        return {s: dict(v) for s in self.stages() if (v := getattr(self, s))}


@dataclass
class QsmprepConfig:
    """All options of a qsmprep run (paths are absolute :class:`~pathlib.Path`).

    The methods are the default pipeline: BET brain extraction within reliable phase quality, ROMEO, PDF,
    MEDI-weighted TV-ADMM, whole-brain mean reference (docs/limits.md names the data this choice rests on).
    """

    bids_dir: Path | None = None
    output_dir: Path | None = None
    work_dir: Path | None = None
    analysis_level: str = "participant"
    participant_label: list[str] = field(default_factory=list)
    session_label: list[str] = field(default_factory=list)
    bids_filters: dict = field(default_factory=dict)
    # execution
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_gb: float | None = None
    plugin: str | None = None
    plugin_args: dict = field(default_factory=dict)
    stop_on_first_crash: bool = False
    boilerplate_only: bool = False
    write_graph: bool = False
    resource_monitor: bool = False
    skip_bids_validation: bool = False
    device: str = "auto"
    #: uQSM test-time refinement steps of the learned inversion (0: off)
    self_supervised_steps: int = 0
    verbose: int = 0
    # methods (registered names of the stage's registry in qsmprep.methods)
    masking: MaskingMethod = DEFAULT_MASKING
    unwrapping: UnwrappingMethod = "romeo"
    bgremove: BgremoveMethod = "pdf"
    inversion: InversionMethod = "medi-tv"
    reference: ReferenceMethod = "mean"
    r2star_method: R2starMethod = "auto"
    r2star: bool = False
    t2star: bool = False
    #: CLEAR-SWI and its minimum-intensity projection (qsmprep.qsm.swi)
    swi: bool = False
    #: minIP slab thickness (mm) along the slice axis: 16 mm, about CLEAR-SWI's 7 slices of 2-2.3 mm
    swi_minip_slab_mm: float = 16.0
    #: SWI phase-mask scaling: CLEAR-SWI's "tanh" or Haacke's "positive" (linear mask to a power)
    swi_phase_scaling: str = "tanh"
    #: tanh strength or power of the phase mask (4: the CLEAR-SWI and Haacke 2004 defaults)
    swi_phase_strength: float = 4.0
    # reports and group level
    reports_only: bool = False
    segmentation_dir: Path | None = None
    # anatomical and template spaces (qsmprep.anat)
    #: output spaces besides the native GRE grid: T1w, MNI152NLin6Asym[:res-2], MNI152NLin2009cAsym[:res-1]
    output_spaces: list[str] = field(default_factory=list)
    #: sMRIPrep/fMRIPrep (and FreeSurfer) derivative folders with anatomical outputs to reuse
    derivatives: list[Path] = field(default_factory=list)
    #: TemplateFlow atlases for region statistics on the GRE grid: <template>:<atlas>[:desc-<d>][:res-<r>]
    atlas: list[str] = field(default_factory=list)
    #: erode every region by this many voxels (GRE grid) before its statistics (partial volume)
    roi_erode_voxels: int = 0
    #: extra keyword parameters per stage
    method_params: MethodParams = field(default_factory=MethodParams)

    def __post_init__(self):
        self.method_params = MethodParams.from_mapping(self.method_params)
        from qsmprep.methods import STAGES

        for name, stage in _method_fields(type(self)):
            setattr(self, name, STAGES[stage].canonical(getattr(self, name)))

    # ----------------------------------------------------------------------------------------------
    # fields

    @classmethod
    def method_fields(cls) -> dict[str, str]:
        """Method field name -> stage key (from the :class:`Stage` annotations)."""
        return dict(_method_fields(cls))

    def chosen_methods(self) -> dict[str, str]:
        """Stage key -> registered method name for every stage of a run; a stage without a config field
        (phase offset, B0 fit) has one registered method."""
        from qsmprep.methods import STAGES

        chosen = {stage: getattr(self, name) for name, stage in _method_fields(type(self))}
        return {key: chosen.get(key) or registry.names()[0] for key, registry in STAGES.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QsmprepConfig":
        """A config from ``{field: value}`` (unknown keys: ``ValueError``); values are converted to the
        field's type (paths to absolute :class:`~pathlib.Path`, numbers, lists, method parameters)."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
        kwargs = {k: _convert(hints[k], v) for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """JSON-friendly dict (paths as strings) for provenance."""
        out = dataclasses.asdict(self)
        out["method_params"] = self.method_params.to_dict()
        return {k: (str(v) if isinstance(v, Path) else [str(x) if isinstance(x, Path) else x for x in v]
                    if isinstance(v, list) else v) for k, v in out.items()}

    def to_toml(self) -> str:
        """The settings as a TOML file that ``--config-file`` loads back (None values are left out; the
        positional arguments, which the command line always gives, are comments)."""
        import tomli_w

        data = {k: v for k, v in self.to_dict().items() if v is not None and v != {} and v != []}
        head = "".join(f"# {k} = {data.pop(k)!r}\n" for k in ("bids_dir", "output_dir", "analysis_level") if k in data)
        return "# qsmprep settings (load with --config-file; the command line overrides them)\n" + head + tomli_w.dumps(data)

    # ----------------------------------------------------------------------------------------------
    # validation

    def validate(self) -> "QsmprepConfig":
        """Every check of the settings alone, before any work; :class:`InputError` (one line, exit 64/65).

        Method names against the catalogue, method parameters against each method's parameter set,
        options that need another option, the device, and the model files of learned methods. The
        checks against the data are :meth:`check_runs`.
        """
        from qsmprep.methods import STAGES

        if self.analysis_level not in ANALYSIS_LEVELS:
            raise InputError("analysis_level", f"{self.analysis_level!r} is not a level",
                             f"Use one of {', '.join(ANALYSIS_LEVELS)}", EX_USAGE)
        if self.device not in DEVICES:
            raise InputError("--device", f"{self.device!r} is not a device", f"Use one of {', '.join(DEVICES)}",
                             EX_USAGE)
        for name, stage in self.method_fields().items():
            value = getattr(self, name)
            if value not in STAGES[stage]:
                option = "--" + name.replace("_", "-")
                raise InputError(option, f"the method {value!r} is not available (choices: "
                                 f"{', '.join(STAGES[stage].names())})", f"Pass {option} with one of the choices",
                                 EX_USAGE)
        for stage, name in self.chosen_methods().items():
            try:
                STAGES[stage].method(name).check_params(self.method_params.for_stage(stage))
            except ValueError as exc:
                raise InputError(f"[method_params.{stage}]", str(exc), "Fix the parameter in the config file",
                                 EX_DATAERR) from None
        if self.self_supervised_steps and self.inversion != "nextqsm":
            raise InputError("--self-supervised-steps", f"applies to --inversion nextqsm, not {self.inversion}",
                             "add --inversion nextqsm or drop the option", EX_USAGE)
        self._check_swi()
        self._check_spaces()
        self._check_device()
        self._check_models()
        return self

    def masking_for(self, run: Any) -> str:
        """The masking method of a series: the default, BET with phase quality, needs magnitude images; a
        series without them is masked by phase quality alone (QSMxT's mask). A method given on purpose
        other than the default is kept (and :meth:`check_runs` refuses it where it cannot run)."""
        if self.masking == DEFAULT_MASKING and not run.has_magnitude and not self.method_params.for_stage("masking"):
            return PHASE_ONLY_MASKING
        return self.masking

    def _check_spaces(self) -> None:
        """``--output-spaces`` and ``--atlas`` values (exit 64), ``--derivatives`` folders (exit 66), and every
        template and atlas file present in TEMPLATEFLOW_HOME (exit 66; nothing is downloaded during a run)."""
        from qsmprep.anat.templates import (
            Space,
            atlas_files,
            parse_atlas,
            parse_spaces,
            registration_templates,
            template_files,
        )
        from qsmprep.utils.errors import EX_NOINPUT

        try:
            spaces = parse_spaces(self.output_spaces)
        except ValueError as exc:
            raise InputError("--output-spaces", str(exc), "Use e.g. --output-spaces T1w MNI152NLin6Asym:res-2",
                             EX_USAGE) from None
        if self.roi_erode_voxels < 0:
            raise InputError("--roi-erode-voxels", f"{self.roi_erode_voxels} is negative", "Pass 0 or more",
                             EX_USAGE)
        for d in self.derivatives:
            if not Path(d).is_dir():
                raise InputError(d, "derivatives folder not found", "Give --derivatives the root of an "
                                 "sMRIPrep/fMRIPrep output folder (or a FreeSurfer SUBJECTS_DIR)", EX_NOINPUT)
        for space in spaces:
            if space.is_template:
                try:
                    template_files(space)
                except FileNotFoundError as exc:
                    raise InputError("--output-spaces", str(exc), "then run qsmprep again", EX_NOINPUT) from None
        atlases = []
        for text in self.atlas:
            try:
                template, atlas, desc, res = parse_atlas(text)
                atlas_files(template, res, atlas, desc)
            except ValueError as exc:
                raise InputError("--atlas", str(exc), "Use --atlas <template>:<atlas>[:desc-<d>][:res-<r>], e.g. "
                                 "MNI152NLin6Asym:HOCPA:desc-th25:res-2", EX_USAGE) from None
            except FileNotFoundError as exc:
                raise InputError("--atlas", str(exc), "then run qsmprep again", EX_NOINPUT) from None
            atlases.append((template, atlas, desc, res))
        # an atlas's template is registered to even when no output space names it: its T1w and mask too
        # (templates named by an output space were checked above)
        named = {s.name for s in spaces if s.is_template}
        for template, res in registration_templates(spaces, atlases).items():
            if template in named:
                continue
            try:
                template_files(Space(template, res))
            except FileNotFoundError as exc:
                raise InputError("--atlas", str(exc), "then run qsmprep again", EX_NOINPUT) from None

    def check_runs(self, runs: Sequence[Any]) -> None:
        """Choices the data cannot support (``runs``: the :class:`~qsmprep.utils.bids.QsmRun` to process)."""
        from qsmprep.qsm.masking import MAGNITUDE_MASKING

        for run in runs:
            masking = self.masking_for(run)
            if masking != self.masking:
                LOGGER.warning("%s: no magnitude images: masking with %s instead of %s", run.prefix(), masking,
                               self.masking)
            if masking in MAGNITUDE_MASKING and not run.has_magnitude:
                raise InputError(run.prefix(), f"--masking {self.masking} needs magnitude images (this series has "
                                 "phase only)", "Use --masking phase, or add the magnitude images", EX_USAGE)
            if self.reference == "csf" and (len(run.echo_times_s) < 2 or not run.has_magnitude):
                raise InputError(
                    run.prefix(),
                    f"--reference csf needs an R2* map, which needs >= 2 echoes with magnitude (this series has "
                    f"{len(run.echo_times_s)} echo{'es' if len(run.echo_times_s) != 1 else ''}"
                    f"{'' if run.has_magnitude else ' and no magnitude'})",
                    "Use --reference mean, or select series with several echoes (--bids-filter-file)",
                    EX_USAGE,
                )

    def _check_swi(self) -> None:
        from qsmprep.qsm.swi import SWI_PHASE_SCALINGS

        if self.swi_phase_scaling not in SWI_PHASE_SCALINGS:
            raise InputError("--swi-phase-scaling", f"{self.swi_phase_scaling!r} is not a scaling",
                             f"Use one of {', '.join(SWI_PHASE_SCALINGS)}", EX_USAGE)
        for name in ("swi_minip_slab_mm", "swi_phase_strength"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                option = "--" + name.replace("_", "-")
                raise InputError(option, f"{value!r} is not a positive number", f"Pass {option} > 0", EX_USAGE)

    def _check_device(self) -> None:
        if self.device != "cuda":
            return
        try:
            import torch

            ok = bool(torch.cuda.is_available())
        except Exception:
            ok = False
        if not ok:
            raise InputError(
                "--device cuda",
                "no CUDA GPU is available to PyTorch",
                "Use --device auto or cpu (in a container, expose the GPU: docker run --gpus all / apptainer run --nv)",
                EX_USAGE,
            )

    def _check_models(self) -> None:
        """The model file of every learned method chosen must exist and match its checksum."""
        from qsmprep.methods import STAGES

        for stage in ("bgremove", "inversion"):
            method = STAGES[stage].method(getattr(self, stage))
            if not method.learned:
                continue
            from qsmprep.nn.models import ModelFileError, load_model

            params = method.resolve_params(self.method_params.for_stage(stage))
            try:
                load_model(params["model"], device="cpu", directory=params.get("model_dir"))
            except ModelFileError as exc:
                raise InputError(f"--{stage} {method.name}", str(exc), f"or choose another --{stage} method",
                                 EX_USAGE) from None


@functools.cache
def _method_fields(cls: type) -> tuple[tuple[str, str], ...]:
    """``(field, stage key)`` of the method fields of a config class (type hints are evaluated once)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple((f.name, meta.key) for f in fields(cls)
                 for meta in getattr(hints[f.name], "__metadata__", ()) if isinstance(meta, Stage))


def _convert(tp: Any, value: Any) -> Any:
    """``value`` as the field type ``tp`` (``X | None``, Path, int, float, bool, list[str], dict)."""
    if value is None:
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        tp = args[0]
    if tp is Path:
        return Path(value).expanduser().absolute()
    if tp is MethodParams:
        return MethodParams.from_mapping(value)
    if tp is bool:
        return bool(value)
    if tp in (int, float):
        return tp(value)
    if typing.get_origin(tp) is list:
        items = list(dict.fromkeys(value)) if not isinstance(value, str) else [value]
        if typing.get_args(tp) == (Path,):
            items = [Path(v).expanduser().absolute() for v in items]
        return items
    if tp is dict or typing.get_origin(tp) is dict:
        return dict(value)
    return value
