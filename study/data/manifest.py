"""Any image dataset described by one CSV or Parquet file: a row per image.

Columns: ``path`` (relative to the manifest's folder, or absolute) and ``label`` (any values:
numbered 0.. in sorted order); optional ``split`` ("train"/"test"; without it, the first half of
the sorted classes is train, the second half test, the DML convention) and optional ``is_query``
and ``is_gallery`` (both or neither; true/false or 1/0) for query/gallery protocols.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from study.data.images import DatasetLayoutError, ImageIndex
from study.data.layout import check_listed, require
from study.data.splits import first_half_split

EXPECTED = "a .csv or .parquet file with columns path, label and optionally split, is_query and is_gallery"
SPLITS = ("train", "test")


def index_manifest(root: Path) -> ImageIndex:
    """The images of the manifest file ``root``.

    Checks that the first and last listed images exist, not every image.
    """
    path = require(Path(root).expanduser().resolve(), "manifest", EXPECTED)
    table = _read(path)
    for column in ("path", "label"):
        if column not in table.columns or table[column].isna().any():
            raise DatasetLayoutError(
                f"manifest: {path}: column {column} is missing or has empty values; expected {EXPECTED}"
            )
    labels = pd.factorize(table["label"], sort=True)[0].astype(np.int64)
    if "split" in table.columns:
        split = table["split"].to_numpy()
        if not np.isin(split, SPLITS).all():
            bad = next(value for value in split if value not in SPLITS)
            raise DatasetLayoutError(f"manifest: {path}: column split has value {bad!r}; allowed: {', '.join(SPLITS)}")
        split = split.astype(str)
    else:
        split = first_half_split(labels)
    paths = [path.parent / p for p in table["path"].astype(str)]
    check_listed(paths, path.name, "manifest", EXPECTED)
    is_query, is_gallery = _masks(table, path, split)
    return ImageIndex(paths=paths, labels=labels, split=split, is_query=is_query, is_gallery=is_gallery)


def _read(path: Path) -> pd.DataFrame:
    """The table; only the file's suffix decides the format."""
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (OSError, ValueError) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise DatasetLayoutError(f"manifest: cannot read {path} ({reason}); expected {EXPECTED}") from error
    raise DatasetLayoutError(f"manifest: {path} is not a .csv or .parquet file; expected {EXPECTED}")


def _masks(table: pd.DataFrame, path: Path, split: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ``is_query`` / ``is_gallery`` columns as booleans, false on training rows; None without them."""
    present = [column for column in ("is_query", "is_gallery") if column in table.columns]
    if not present:
        return None, None
    if len(present) == 1:
        raise DatasetLayoutError(
            f"manifest: {path}: column {present[0]} without its partner; give both is_query and is_gallery or neither"
        )
    masks = []
    for column in present:
        values = table[column]
        if values.isna().any() or not values.isin([True, False]).all():
            raise DatasetLayoutError(f"manifest: {path}: column {column} must be true/false or 1/0 on every row")
        mask = values.to_numpy().astype(bool)
        if (mask & (split == "train")).any():
            raise DatasetLayoutError(
                f"manifest: {path}: column {column} is true on a train row; it must be false there"
            )
        masks.append(mask)
    return masks[0], masks[1]
