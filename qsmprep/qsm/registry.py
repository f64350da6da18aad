"""Registries of interchangeable algorithms, one per pipeline stage.

Adding an algorithm is one function plus one decorator line::

    @BGREMOVE.register("vsharp")
    def vsharp(total_field_ppm, mask, voxel_size_mm, ...): ...

The BIDS App lists ``BGREMOVE.names()`` as the choices of ``--bgremove`` and looks functions up with
``BGREMOVE.get(name)``, which raises a clear error for unknown names.
"""

from __future__ import annotations

from typing import Callable, Iterator


class Registry:
    """A named mapping from algorithm names to functions for one pipeline stage."""

    def __init__(self, stage: str):
        self.stage = stage
        self._funcs: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator registering ``func`` under ``name`` (lower-case, unique within the stage)."""

        def deco(func: Callable) -> Callable:
            key = name.lower()
            if key in self._funcs and self._funcs[key] is not func:
                raise ValueError(f"{self.stage} method {key!r} is registered twice")
            self._funcs[key] = func
            return func

        return deco

    def get(self, name: str) -> Callable:
        """The function registered as ``name``; ``ValueError`` listing the choices otherwise."""
        key = str(name).lower()
        if key not in self._funcs:
            raise ValueError(
                f"unknown {self.stage} method {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._funcs[key]

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._funcs)

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._funcs

    def __iter__(self) -> Iterator[str]:
        return iter(self._funcs)


#: Phase unwrapping: ``f(phase_rad, ...) -> unwrapped_rad``.
UNWRAP = Registry("unwrapping")
#: Background field removal: ``f(total_field_ppm, mask, voxel_size_mm, b0_dir, **kw) -> (local_field_ppm, mask)``.
BGREMOVE = Registry("background field removal")
#: Dipole inversion: ``f(local_field_ppm, mask, voxel_size_mm, b0_dir, **kw) -> chi_ppm``.
INVERSION = Registry("dipole inversion")
#: Susceptibility referencing: ``f(chi_ppm, mask, **kw) -> chi_ppm``.
REFERENCE = Registry("referencing")
#: Brain masking: ``f(...) -> mask``.
MASKING = Registry("masking")
