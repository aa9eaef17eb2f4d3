"""Stanford Online Products (Oh Song et al. 2016): 120,053 product images, 22,634 classes.

The official split is the DML split: ``Ebay_train.txt`` lists the 11,318 training classes,
``Ebay_test.txt`` the 11,316 test classes; labels keep the dataset's ``class_id``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from study.data.images import DatasetLayoutError, ImageIndex
from study.data.layout import check_listed, dataset_folder, no_download, read_rows

TOP = "Stanford_Online_Products"
EXPECTED = f"{TOP}/ with Ebay_train.txt, Ebay_test.txt and the <category>_final/ image folders"
HEADER = ["image_id", "class_id", "super_class_id", "path"]
MANUAL = "Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/"


def index_sop(root: Path, *, download: bool = False) -> ImageIndex:
    """The images of ``Ebay_train.txt`` (split "train") then ``Ebay_test.txt`` (split "test").

    ``root`` is ``Stanford_Online_Products/`` or the folder that contains it. Checks that the first
    and last images of each list exist, not every image.
    """
    if download:
        raise no_download("sop", MANUAL)
    folder = dataset_folder(root, ["Ebay_train.txt"], [TOP])
    paths: list[Path] = []
    labels: list[int] = []
    split: list[str] = []
    for name in ("train", "test"):
        listing = f"Ebay_{name}.txt"
        lines = read_rows(folder / listing, "sop", EXPECTED, columns=len(HEADER), skip=1)
        rows = lines[1:]
        if lines[:1] != [HEADER]:
            raise DatasetLayoutError(f"sop: {folder / listing} must start with the header {' '.join(HEADER)}")
        part = [folder / row[3] for row in rows]
        check_listed(part, listing, "sop", EXPECTED)
        paths += part
        labels += [int(row[1]) for row in rows]
        split += [name] * len(rows)
    return ImageIndex(paths=paths, labels=np.array(labels, dtype=np.int64), split=np.array(split))
