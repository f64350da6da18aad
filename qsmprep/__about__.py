"""Version of qsmprep.

The version is set by the git tag at build time (hatch-vcs: tag ``vX.Y.Z`` -> ``X.Y.Z``) and read here
from the installed package's metadata; a source tree that is not installed reports ``0.0.0+unknown``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qsmprep")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
