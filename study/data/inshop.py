"""In-Shop Clothes Retrieval (Liu et al. 2016, DeepFashion): 52,712 images of 7,982 clothing items.

The official protocol: 3,997 training items; the 3,985 test items are split into query and
gallery images, and each query is retrieved against the gallery only. Labels are the item
numbers (``id_00000001`` → 1).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from study.data.images import DatasetLayoutError, ImageIndex
from study.data.layout import check_listed, dataset_folder, no_download, read_rows, require

TOP = "In-shop Clothes Retrieval Benchmark"
LISTING = "list_eval_partition.txt"
EXPECTED = f"{LISTING} and img/, or the official Eval/{LISTING} and Img/img/"
HEADER = ["image_name", "item_id", "evaluation_status"]
STATUSES = ("train", "query", "gallery")
MANUAL = "Eval/ and Img/img.zip from http://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"


def index_inshop(root: Path, *, download: bool = False) -> ImageIndex:
    """The images of ``list_eval_partition.txt``: "train" rows are the train split, "query" and
    "gallery" rows the test split with their ``is_query`` / ``is_gallery`` masks.

    ``root`` holds either ``list_eval_partition.txt`` and ``img/`` (flat) or the official
    ``Eval/list_eval_partition.txt`` and ``Img/img/``, or is the parent of the official top folder.
    Checks that ``img/`` and the first and last listed images exist, not every image.
    """
    if download:
        raise no_download("inshop", MANUAL)
    folder = dataset_folder(root, [LISTING, f"Eval/{LISTING}"], [TOP])
    official = (folder / "Eval" / LISTING).exists()
    listing, images = (folder / "Eval" / LISTING, folder / "Img") if official else (folder / LISTING, folder)
    lines = read_rows(listing, "inshop", EXPECTED, columns=len(HEADER), skip=2)
    rows = lines[2:]
    if lines[:2] != [[str(len(rows))], HEADER]:
        raise DatasetLayoutError(
            f"inshop: {listing} must start with a line with the image count ({len(rows)}), then the header "
            f"{' '.join(HEADER)}"
        )
    require(images / "img", "inshop", EXPECTED)
    bad = next((row for row in rows if row[2] not in STATUSES or not re.fullmatch(r"id_\d+", row[1])), None)
    if bad is not None:
        raise DatasetLayoutError(
            f"inshop: {listing} row {' '.join(bad)}: item_id must be id_<digits> and evaluation_status one of "
            f"{', '.join(STATUSES)}"
        )
    paths = [images / row[0] for row in rows]
    check_listed(paths, LISTING, "inshop", EXPECTED)
    status = np.array([row[2] for row in rows])
    return ImageIndex(
        paths=paths,
        labels=np.array([int(row[1][3:]) for row in rows], dtype=np.int64),
        split=np.where(status == "train", "train", "test"),
        is_query=status == "query",
        is_gallery=status == "gallery",
    )
