"""The method catalogue: one registry per pipeline stage, each entry a function with its metadata.

Adding an algorithm is one function plus one decorator line; everything the rest of qsmprep needs to
know about it is declared there::

    @BGREMOVE.register("vsharp", label="V-SHARP", references=("wu2012", "li2011"),
                       description="variable-kernel SHARP (V-SHARP)", defaults=_vsharp_defaults)
    def vsharp(total_field_ppm, mask, voxel_size_mm, b0_dir, radii_mm=None, threshold=0.05): ...

- ``label``/``description``/``references``: the sidecars' ``EstimationAlgorithm``/``EstimationReference``
  and the methods boilerplate (reference keys of :mod:`qsmprep.references`);
- the stage's data arguments (:attr:`Registry.data_args`, plus ``data_args`` of the method) are
  supplied by the pipeline; every other keyword parameter of the function (and of the functions in
  ``forwards`` it passes ``**kwargs`` to) is a user parameter (``[method_params.<stage>]``), checked by
  :meth:`Method.check_params` and recorded with its value by :meth:`Method.resolve_params`;
- ``ranges``: the allowed values of numeric parameters in interval notation (``{"threshold": "(0, 1)",
  "max_iter": "[1, inf)"}``), checked by :meth:`Method.check_params` before any work (each element of a
  list parameter); parameters without a declared range are checked for name and type only;
- ``defaults(params, data)`` fills parameters whose default depends on the data (V-SHARP's radii);
- learned methods (:mod:`qsmprep.nn`, which imports PyTorch) are registered with
  :meth:`Registry.register_lazy` by a light manifest (:mod:`qsmprep.nn.catalogue`): their names and
  metadata are known without importing torch; the function is imported on first use.

The BIDS App lists :meth:`Registry.names` as the choices of ``--<stage>``; :mod:`qsmprep.methods`
gathers the registries of every stage.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = [
    "Interval",
    "Method",
    "Registry",
    "MASKING",
    "OFFSET",
    "UNWRAP",
    "B0FIT",
    "BGREMOVE",
    "INVERSION",
    "REFERENCE",
    "R2STAR",
]

#: ``defaults(params, data) -> params``: fills parameters whose default depends on the data. ``data`` holds
#: ``voxel_size_mm`` and ``n_echoes`` of the series, or is None before there are data (the methods
#: boilerplate), where the hook states the default in words.
DefaultsHook = Callable[[dict, Mapping[str, Any] | None], dict]


def _resolve_target(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Method:
    """One registered method of a stage and its catalogue entry."""

    stage: str
    name: str
    label: str
    description: str
    references: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    #: pipeline-supplied arguments (the stage's and the method's own); never user parameters
    data_args: tuple[str, ...] = ()
    #: functions (or ``"module:function"``) that receive the method's ``**kwargs``
    forwards: tuple[Callable | str, ...] = ()
    defaults: DefaultsHook | None = None
    learned: bool = False
    #: parameter name -> allowed interval (:class:`Interval`, from the ``ranges`` of the registration)
    ranges: Mapping[str, "Interval"] = field(default_factory=dict, compare=False)
    #: the function, or ``"module:function"`` imported on first use (learned methods)
    target: Callable | str = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def function(self) -> Callable:
        """The method's function (imports its module for lazily registered methods)."""
        return _resolve_target(self.target) if isinstance(self.target, str) else self.target

    def _functions(self) -> list[Callable]:
        return [self.function] + [_resolve_target(f) if isinstance(f, str) else f for f in self.forwards]

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The typed parameter set: every keyword parameter with a default that is not a data argument,
        in signature order (the function's first, then those of ``forwards``)."""
        out: dict[str, inspect.Parameter] = {}
        for func in self._functions():
            for name, p in inspect.signature(func).parameters.items():
                if name in self.data_args or name in out or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                if p.default is inspect.Parameter.empty:
                    continue
                out[name] = p
        return out

    def check_params(self, user: Mapping[str, Any]) -> dict:
        """``user`` checked against :meth:`parameters`: ``ValueError`` (one line, with the valid names)
        for an unknown name, a value whose type does not fit the parameter's default, or a value outside
        the parameter's declared range (:attr:`ranges`)."""
        params = self.parameters()
        for key, value in dict(user or {}).items():
            if key not in params:
                valid = ", ".join(params) or "none"
                raise ValueError(f"{self.stage} method {self.name!r} has no parameter {key!r} (valid: {valid})")
            default = params[key].default
            if not _fits(value, default):
                raise ValueError(
                    f"{self.stage} method {self.name!r}: {key} = {value!r} should be "
                    f"{_kind(default)} like its default {default!r}"
                )
            interval = self.ranges.get(key)
            if interval is not None and value is not None and not interval.contains(value):
                raise ValueError(f"{self.stage} method {self.name!r}: {key} = {value!r} is out of range {interval}"
                                 + ("" if _numbers(value) is not None else " (a number is expected)"))
        return dict(user or {})

    def resolve_params(self, user: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None) -> dict:
        """Every parameter the call will run with: the defaults overlaid with ``user``, then the
        ``defaults`` hook (data-dependent defaults, e.g. V-SHARP's radii from ``data["voxel_size_mm"]``)."""
        out = {name: p.default for name, p in self.parameters().items()}
        out.update(dict(user or {}))
        return self.defaults(out, data) if self.defaults is not None else out


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")


@dataclass(frozen=True)
class Interval:
    """An interval of allowed values, written ``"[0, 1]"``, ``"(0, inf)"``, ``"[1, inf)"`` (``inf``/``-inf``
    for no bound); a 2-tuple ``(low, high)`` is closed, None meaning no bound."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, spec: "str | Sequence | Interval") -> "Interval":
        if isinstance(spec, Interval):
            return spec
        if isinstance(spec, str):
            m = _INTERVAL.match(spec)
            if m is None:
                raise ValueError(f"invalid interval {spec!r}; write e.g. '[0, 1]' or '(0, inf)'")
            low, high = float(m.group(2)), float(m.group(3))
            out = cls(low, high, m.group(1) == "(" or math.isinf(low), m.group(4) == ")" or math.isinf(high))
        else:
            lo, hi = spec
            out = cls(-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi),
                      lo is None, hi is None)
        if not out.low <= out.high:
            raise ValueError(f"empty interval {spec!r}")
        return out

    def contains(self, value: Any) -> bool:
        """Whether ``value`` (a number or each number of a list) lies in the interval."""
        values = _numbers(value)
        if values is None:
            return False
        for v in values:
            if math.isnan(v):
                return False
            if v < self.low or (self.low_open and v == self.low):
                return False
            if v > self.high or (self.high_open and v == self.high):
                return False
        return True

    def __str__(self) -> str:
        def num(x: float) -> str:
            return ("-inf" if x < 0 else "inf") if math.isinf(x) else f"{x:g}"

        return f"{'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}{')' if self.high_open else ']'}"


def _numbers(value: Any) -> list[float] | None:
    """``value`` as a list of floats (a number, or a list/tuple of numbers); None if it is not numeric."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items):
        return None
    return [float(v) for v in items]


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, str):
        return "a string"
    if isinstance(default, (list, tuple)):
        return "a list"
    return type(default).__name__


def _fits(value: Any, default: Any) -> bool:
    """Whether a config value may replace ``default`` (None defaults accept anything)."""
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(default, float) or isinstance(value, int) or float(value).is_integer())
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool)
    return True


class Registry:
    """The methods of one pipeline stage (``key`` as in the config, ``title`` for messages)."""

    def __init__(self, key: str, title: str, data_args: Sequence[str] = ()):
        self.key = key
        self.title = title
        self.data_args = tuple(data_args)
        self._methods: dict[str, Method] = {}
        self._aliases: dict[str, str] = {}

    def _add(self, method: Method) -> Method:
        if method.name in self._methods and self._methods[method.name].target is not method.target:
            raise ValueError(f"{self.title} method {method.name!r} is registered twice")
        self._methods[method.name] = method
        for alias in method.aliases:
            self._aliases[alias.lower()] = method.name
        return method

    def _method(self, name: str, target, label: str, description: str, references, aliases, data_args,
                forwards, defaults, learned, ranges=None) -> Method:
        return Method(stage=self.key, name=name.lower(), label=label, description=description,
                      references=tuple(references), aliases=tuple(aliases),
                      data_args=self.data_args + tuple(data_args), forwards=tuple(forwards),
                      defaults=defaults, learned=learned, target=target,
                      ranges={k: Interval.parse(v) for k, v in dict(ranges or {}).items()})

    def register(self, name: str, *, label: str, description: str, references: Sequence[str] = (),
                 aliases: Sequence[str] = (), data_args: Sequence[str] = (),
                 forwards: Sequence[Callable | str] = (), defaults: DefaultsHook | None = None,
                 ranges: Mapping[str, Any] | None = None) -> Callable[[Callable], Callable]:
        """Decorator registering a function under ``name`` with its catalogue entry (``ranges``: allowed
        interval of numeric parameters, see :class:`Interval`)."""

        def deco(func: Callable) -> Callable:
            self._add(self._method(name, func, label, description, references, aliases, data_args, forwards,
                                   defaults, learned=False, ranges=ranges))
            return func

        return deco

    def register_lazy(self, name: str, target: str, *, label: str, description: str,
                      references: Sequence[str] = (), aliases: Sequence[str] = (), data_args: Sequence[str] = (),
                      defaults: DefaultsHook | None = None, learned: bool = True,
                      ranges: Mapping[str, Any] | None = None) -> Method:
        """Register ``"module:function"`` without importing it (learned methods: torch stays unloaded)."""
        return self._add(self._method(name, target, label, description, references, aliases, data_args, (),
                                      defaults, learned, ranges))

    def unregister(self, name: str) -> None:
        """Remove a method and its aliases (for plug-ins and tests that register a method temporarily)."""
        method = self._methods.pop(self.canonical(name))
        for alias in method.aliases:
            self._aliases.pop(alias.lower(), None)

    def canonical(self, name: str) -> str:
        """The registered name of ``name`` (case and aliases such as ``v-sharp`` resolved); unknown
        names are returned lower-cased."""
        key = str(name).strip().lower()
        return self._aliases.get(key, key)

    def method(self, name: str) -> Method:
        """The catalogue entry of ``name``; ``ValueError`` listing the choices otherwise."""
        key = self.canonical(name)
        if key not in self._methods:
            raise ValueError(f"unknown {self.title} method {name!r}; choose one of: {', '.join(self.names())}")
        return self._methods[key]

    def get(self, name: str) -> Callable:
        """The function registered as ``name`` (see :meth:`method`)."""
        return self.method(name).function

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._methods)

    def __contains__(self, name: object) -> bool:
        return self.canonical(str(name)) in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)


#: Brain masking: ``f(phase_rad_4d, magnitude_4d, echo_times_s, voxel_size_mm, **kw) -> mask``.
MASKING = Registry("masking", "masking", ("phase_rad_4d", "magnitude_4d", "echo_times_s", "voxel_size_mm"))
#: Phase-offset removal: ``f(phase_rad_4d, magnitude_4d, echo_times_s, voxel_size_mm, **kw) -> (phase, offset)``.
OFFSET = Registry("offset", "phase-offset removal",
                  ("phase_rad_4d", "magnitude_4d", "echo_times_s", "voxel_size_mm", "mask"))
#: Phase unwrapping: ``f(phase_rad, magnitude, mask, echo_times_s, voxel_size_mm, **kw) -> unwrapped_rad``.
UNWRAP = Registry("unwrapping", "unwrapping",
                  ("phase_rad", "phase_rad_4d", "magnitude", "magnitude_4d", "mask", "echo_times_s", "voxel_size_mm"))
#: Multi-echo B0 fit: ``f(unwrapped_phase_4d, echo_times_s, magnitude_4d, mask, **kw) -> b0_hz``.
B0FIT = Registry("b0", "B0 fit", ("unwrapped_phase_4d", "echo_times_s", "magnitude_4d", "mask"))
#: Background field removal: ``f(total_field_ppm, mask, voxel_size_mm, b0_dir, **kw) -> (local_field_ppm, mask)``.
BGREMOVE = Registry("bgremove", "background field removal", ("total_field_ppm", "mask", "voxel_size_mm", "b0_dir"))
#: Dipole inversion: ``f(local_field_ppm, mask, voxel_size_mm, b0_dir, **kw) -> chi_ppm``.
INVERSION = Registry("inversion", "dipole inversion", ("local_field_ppm", "mask", "voxel_size_mm", "b0_dir"))
#: Susceptibility referencing: ``f(chi_ppm, mask, **kw) -> chi_ppm``.
REFERENCE = Registry("reference", "referencing", ("chi_ppm", "mask", "csf_mask", "r2star_hz", "voxel_size_mm"))
#: R2* mapping: ``f(magnitude_4d, echo_times_s, mask, **kw) -> (r2star_hz, s0)``.
R2STAR = Registry("r2star", "R2* mapping", ("magnitude_4d", "echo_times_s", "mask"))
