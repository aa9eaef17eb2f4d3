"""dml-study: hyperparameter studies of deep-metric-learning losses."""

from importlib import metadata

PACKAGE = "dml-study"  # the distribution name (pyproject.toml), for its version


def package_version() -> str:
    """The installed dml-study's version ("unknown" when run from a source tree never installed)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"
