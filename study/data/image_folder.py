"""Any image dataset stored as one folder per class (the torchvision ImageFolder layout).

Either ``root/<class>/…`` (classes sorted by folder name: first half train, second half test, the
DML convention) or ``root/train/<class>/…`` and ``root/test/<class>/…`` when ``root`` holds
exactly those two folders. Labels number the classes 0.. in sorted order, training classes first.

A ``train`` or ``test`` folder next to other folders (``val/``, or classes) or alone is an error,
not a guess: read as the flat layout it would silently turn a split into a class, and read as the
split layout it would silently drop the other folders. Hidden folders and ``__MACOSX`` (macOS's
zip side-cars) are skipped everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from study.data.images import DatasetLayoutError, ImageIndex
from study.data.layout import require

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EXPECTED = "root/<class>/<image> or root/train/<class>/<image> and root/test/<class>/<image>"
SPLITS = ("train", "test")


def index_image_folder(root: Path) -> ImageIndex:
    """The images (by extension, case-insensitive, in sub-folders too) of every class folder.

    Hidden files and folders are skipped. Splits must be class-disjoint: a class under both
    ``train/`` and ``test/`` is an error.
    """
    root = require(Path(root).expanduser().resolve(), "image_folder", EXPECTED)
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not _skipped(entry.name))
    _check_top(root, folders)
    if folders == ["test", "train"]:
        train, test = _classes(root / "train"), _classes(root / "test")
        shared = sorted(set(train) & set(test))
        if shared:
            raise DatasetLayoutError(
                f"image_folder: class {shared[0]!r} is in both {root / 'train'} and {root / 'test'}; "
                "the splits must be class-disjoint"
            )
    else:
        classes = list(_classes(root).items())
        train, test = dict(classes[: len(classes) // 2]), dict(classes[len(classes) // 2 :])
    if not train or not test:
        raise DatasetLayoutError(
            f"image_folder: {root} has no class folders with images for the {'test' if train else 'train'} split "
            f"(extensions {' '.join(EXTENSIONS)}); expected {EXPECTED}"
        )
    groups = [("train", images) for images in train.values()] + [("test", images) for images in test.values()]
    paths = [path for _, images in groups for path in images]
    labels = np.repeat(np.arange(len(groups), dtype=np.int64), [len(images) for _, images in groups])
    split = np.repeat([name for name, _ in groups], [len(images) for _, images in groups])
    return ImageIndex(paths=paths, labels=labels, split=split)


def _skipped(name: str) -> bool:
    """Hidden entries and ``__MACOSX`` (the resource forks a zip made on macOS carries) are not data."""
    return name.startswith(".") or name == "__MACOSX"


def _check_top(root: Path, folders: list[str]) -> None:
    """``train``/``test`` at the top only as exactly the pair: else a DatasetLayoutError naming what is wrong."""
    present = [name for name in SPLITS if name in folders]
    if not present or len(present) == len(folders) == 2:
        return
    others = [name for name in folders if name not in SPLITS]
    if others:
        beside = " and ".join(map(repr, present))
        problem = (
            f"has folder {others[0]!r} next to {beside} (the split layout has only train/ and test/; "
            "a class folder cannot be named train or test)"
        )
    else:
        problem = f"has a {present[0]!r} folder but no {'test' if present[0] == 'train' else 'train'!r} folder"
    raise DatasetLayoutError(f"image_folder: {root} {problem}; expected {EXPECTED}")


def _classes(folder: Path) -> dict[str, list[Path]]:
    """Class folder name → its image paths (sorted), for the class folders that hold images."""
    classes = {}
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if not entry.is_dir() or _skipped(entry.name):
            continue
        images = []
        for dirpath, dirnames, names in os.walk(entry.path):
            dirnames[:] = [name for name in dirnames if not _skipped(name)]  # prune hidden folders, __MACOSX
            images += [Path(dirpath, name) for name in names if name.lower().endswith(EXTENSIONS)]
        if images:
            classes[entry.name] = sorted(path for path in images if not path.name.startswith("."))
    return classes
