#!/usr/bin/env python3
"""Compare two qsmprep output folders (e.g. a run in the container and the same run on the host).

    python scripts/ci/compare_derivatives.py OUT_A OUT_B [--rtol 1e-5] [--atol 1e-6] [--ignore GLOB ...]

Checks, and exits 1 listing every difference:

- the same files (the run's own log folder name ``log/<date>-<time>_<uuid>`` is normalised to ``log/RUN``);
- every NIfTI: same shape, dtype, affine, and data equal within ``rtol``/``atol`` (float maps) or exactly
  (integer maps such as the brain mask);
- every JSON sidecar: the same keys, and equal values except for those that record where and when the
  run happened (software versions, run ids, times, the container) -- see ``VOLATILE_KEYS``.

Other files (HTML reports, figures, TSV tables, logs) must exist on both sides; their contents are not
compared (they embed paths and times). Importable: :func:`compare` returns the list of differences.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
from pathlib import Path

#: JSON keys (at any depth) whose values describe the run environment, not the result
VOLATILE_KEYS = {
    "GeneratedBy",
    "SoftwareVersions",
    "Software",
    "Versions",
    "Version",
    "CodeURL",
    "Container",
    "RunID",
    "RunId",
    "run_uuid",
    "Date",
    "DateTime",
    "Time",
    "ElapsedTime",
    "Host",
    "Hostname",
    "Platform",
    "Python",
    "Command",
    "CommandLine",
    "WorkDir",
    "Environment",
    "Sources",
    "RawSources",
    "Resources",
    "ElapsedSeconds",
    "ProcessingSoftware",
    "DatasetLinks",
    "SourceDatasets",
}
_RUN_DIR = re.compile(r"/log/\d{8}-\d{6}_[0-9a-f-]{36}/")


def _norm(rel: str) -> str:
    return _RUN_DIR.sub("/log/RUN/", "/" + rel)[1:]


def _files(root: Path) -> dict[str, Path]:
    return {_norm(p.relative_to(root).as_posix()): p for p in sorted(root.rglob("*")) if p.is_file()}


def _json_diff(a, b, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{where}: keys differ: only A {sorted(set(a) - set(b))}, only B {sorted(set(b) - set(a))}")
        for k in sorted(set(a) & set(b)):
            if k in VOLATILE_KEYS:
                continue
            _json_diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: list lengths {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _json_diff(x, y, f"{where}[{i}]", out)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or abs(a - b) > 1e-6 * max(1.0, abs(a)):
            out.append(f"{where}: {a!r} != {b!r}")
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def compare(a: Path, b: Path, rtol: float = 1e-5, atol: float = 1e-6, ignore: tuple[str, ...] = ()) -> list[str]:
    """Differences between output folders ``a`` and ``b`` (empty list: equal within tolerance)."""
    import nibabel as nib
    import numpy as np

    fa, fb = _files(Path(a)), _files(Path(b))
    keep = lambda rel: not any(fnmatch.fnmatch(rel, g) for g in ignore)  # noqa: E731
    fa = {k: v for k, v in fa.items() if keep(k)}
    fb = {k: v for k, v in fb.items() if keep(k)}
    diffs = [f"only in A: {k}" for k in sorted(set(fa) - set(fb))]
    diffs += [f"only in B: {k}" for k in sorted(set(fb) - set(fa))]
    n_maps = 0
    for rel in sorted(set(fa) & set(fb)):
        if rel.endswith((".nii", ".nii.gz")):
            ia, ib = nib.load(fa[rel]), nib.load(fb[rel])
            da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
            if da.shape != db.shape or da.dtype != db.dtype:
                diffs.append(f"{rel}: shape/dtype {da.shape} {da.dtype} != {db.shape} {db.dtype}")
                continue
            if not np.allclose(ia.affine, ib.affine, rtol=0, atol=1e-5):
                diffs.append(f"{rel}: affines differ")
            if np.issubdtype(da.dtype, np.floating):
                bad = ~np.isclose(da, db, rtol=rtol, atol=atol, equal_nan=True)
                if bad.any():
                    diffs.append(
                        f"{rel}: {int(bad.sum())} of {bad.size} voxels differ beyond rtol={rtol} atol={atol} "
                        f"(max |a-b| = {float(np.nanmax(np.abs(da.astype(float) - db))):.3g})"
                    )
            elif not np.array_equal(da, db):
                diffs.append(f"{rel}: {int((da != db).sum())} voxels differ")
            n_maps += 1
        elif rel.endswith(".json") and "/log/" not in "/" + rel:
            try:
                ja, jb = json.loads(fa[rel].read_text()), json.loads(fb[rel].read_text())
            except ValueError as exc:
                diffs.append(f"{rel}: not JSON ({exc})")
                continue
            _json_diff(ja, jb, rel, diffs)
    if n_maps == 0:
        diffs.append("no NIfTI map found to compare")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--ignore", nargs="*", default=[], help="glob(s) of relative paths not compared")
    args = p.parse_args(argv)
    diffs = compare(args.a, args.b, args.rtol, args.atol, tuple(args.ignore))
    n = len(_files(args.a))
    if diffs:
        print(f"compare: {args.a} vs {args.b}: {len(diffs)} difference(s):", file=sys.stderr)
        for d in diffs:
            print(f"  {d}", file=sys.stderr)
        return 1
    print(f"compare: {args.a} and {args.b}: the same {n} files; maps equal within rtol={args.rtol} atol={args.atol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
