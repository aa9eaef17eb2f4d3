"""Any image dataset described by one CSV or Parquet file: a row per image.

Columns: ``path`` (relative to the manifest's folder, or absolute) and ``label`` (any values);
optional ``split`` ("train"/"test"; without it, the first half of the sorted classes is train, the
second half test, the DML convention) and optional ``is_query`` and ``is_gallery`` (both or
neither; true/false or 1/0) for query/gallery protocols. With ``split``, the splits must be
class-disjoint. Optional ``submode`` (any values, no empty cell): which sub-mode of its class an image
shows (a viewpoint, a variety), for the class-collapse metric (:func:`study.metrics.submode_recall_at_1`);
values are compared within a class only, so ``front`` in two classes names two sub-modes.

Labels are read as text, in CSV and Parquet alike: ``1``, ``01`` and ``1.0`` are three classes (read
as numbers, they would silently merge, or differ between the two formats). Classes are numbered 0.. in
sorted order: integers (``-?[0-9]+``) by value first (``2`` before ``10``, so that a manifest made
from numbered classes splits as the numbers do; equal values by their text, ``01`` before ``1``),
then every other label in text order. Sub-modes are read as text too and numbered in the same order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from study.data.images import DatasetLayoutError, ImageIndex
from study.data.layout import check_listed, require
from study.data.splits import first_half_split, require_disjoint

EXPECTED = "a .csv or .parquet file with columns path, label and optionally split, is_query and is_gallery, submode"
SPLITS = ("train", "test")
TEXT_COLUMNS = ("path", "label", "split", "submode")  # read as str: see the module docstring
INTEGER = re.compile(r"-?[0-9]+")


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
    names = table["label"].astype(str).to_numpy()
    classes = sorted(set(names), key=_class_order)
    labels = pd.Categorical(names, categories=classes).codes.astype(np.int64)
    submodes = _submodes(table, path)
    if "split" in table.columns:
        split = table["split"].to_numpy()
        if not np.isin(split, SPLITS).all():
            bad = next(value for value in split if value not in SPLITS)
            raise DatasetLayoutError(f"manifest: {path}: column split has value {bad!r}; allowed: {', '.join(SPLITS)}")
        split = split.astype(str)
        require_disjoint(labels, split, f"manifest: {path}", name=lambda c: repr(classes[c]))
    else:
        split = first_half_split(labels)
    paths = [path.parent / p for p in table["path"].astype(str)]
    check_listed(paths, path.name, "manifest", EXPECTED)
    is_query, is_gallery = _masks(table, path, split)
    return ImageIndex(
        paths=paths, labels=labels, split=split, is_query=is_query, is_gallery=is_gallery, submodes=submodes
    )


def _class_order(label: str) -> tuple[int, int, str]:
    """Sort key of a class label: integers by value (then text), before every other label (by text)."""
    return (0, int(label), label) if INTEGER.fullmatch(label) else (1, 0, label)


def _submodes(table: pd.DataFrame, path: Path) -> np.ndarray | None:
    """The ``submode`` column as int64 codes (its text values in class-label order), or None without it.

    An empty cell is an error, not "unknown": as text it would become one more sub-mode ("nan") that silently
    groups every unlabelled image of a class, and the metric would count their neighbours as same sub-mode."""
    if "submode" not in table.columns:
        return None
    if table["submode"].isna().any():
        row = int(np.flatnonzero(table["submode"].isna().to_numpy())[0])
        raise DatasetLayoutError(
            f"manifest: {path}: column submode has an empty value (row {row + 1}); fill every row or drop the column"
        )
    names = table["submode"].astype(str).to_numpy()
    return pd.Categorical(names, categories=sorted(set(names), key=_class_order)).codes.astype(np.int64)


def _read(path: Path) -> pd.DataFrame:
    """The table, ``path``, ``label``, ``split`` and ``submode`` as text; only the file's suffix decides the format.

    In a CSV only an empty cell is missing (a class may be called ``NA`` or ``null``)."""
    try:
        if path.suffix.lower() == ".csv":
            dtype = dict.fromkeys(TEXT_COLUMNS, str)
            return pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""])
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
