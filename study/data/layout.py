"""Finding a dataset's folder and checking its official layout, shared by the dataset loaders.

Every failure is a :class:`DatasetLayoutError` of one line that names the missing path and
describes the expected layout, so a user can fix a wrong ``root`` without reading code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from study.data.images import DatasetLayoutError


def dataset_folder(root: Path, markers: Sequence[str], tops: Sequence[str] = ()) -> Path:
    """The folder holding the dataset: ``root`` itself, or ``root/<top>`` for one of the official top
    folder names. A folder that has one of ``markers`` wins; otherwise an existing ``root/<top>``,
    else ``root`` (so that the error about the missing marker names the folder the user meant)."""
    root = Path(root).expanduser().resolve()
    candidates = [root, *(root / top for top in tops)]
    for folder in candidates:
        if any((folder / marker).exists() for marker in markers):
            return folder
    return next((folder for folder in candidates[1:] if folder.is_dir()), root)


def require(path: Path, dataset: str, expected: str) -> Path:
    """``path`` if it exists, else a DatasetLayoutError naming it and the expected layout."""
    if not path.exists():
        raise DatasetLayoutError(f"{dataset}: {path} not found; expected {expected}")
    return path


def check_listed(paths: Sequence[Path], listing: str, dataset: str, expected: str) -> None:
    """The first and last images an index file lists exist: catches a wrong root or a half-extracted
    archive in two stats, where checking every image of SOP (120k files) would cost seconds."""
    if not paths:
        raise DatasetLayoutError(f"{dataset}: {listing} lists no images; expected {expected}")
    for path in (paths[0], paths[-1]):
        if not path.exists():
            raise DatasetLayoutError(f"{dataset}: {path} not found (listed in {listing}); expected {expected}")


def read_rows(path: Path, dataset: str, expected: str, columns: int, skip: int = 0) -> list[list[str]]:
    """The whitespace-separated lines of an index file (blank ones dropped); each line after the first
    ``skip`` (headers) must have exactly ``columns`` fields."""
    lines = require(path, dataset, expected).read_text().splitlines()
    for number, line in enumerate(lines[skip:], skip + 1):
        if line.strip() and len(line.split()) != columns:
            raise DatasetLayoutError(
                f"{dataset}: {path} line {number} has {len(line.split())} fields, not {columns}; expected {expected}"
            )
    return [line.split() for line in lines if line.strip()]


def no_download(dataset: str, where: str) -> DatasetLayoutError:
    """The error for ``download=True`` on a dataset whose upstream has no stable URL."""
    return DatasetLayoutError(f"{dataset}: the upstream has no stable download URL; get it by hand: {where}")
