"""Stanford Cars (Krause et al. 2013): 16,185 car images, 196 make/model/year classes.

The DML split (Oh Song et al. 2016): classes 1–98 train, 99–196 test, whatever the annotation's
``test`` flag says (that flag is the classification split, which shares all 196 classes); labels
keep the dataset's class ids 1–196.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from study.data.images import DatasetLayoutError, ImageIndex
from study.data.layout import check_listed, dataset_folder, no_download, require

EXPECTED = "a folder with cars_annos.mat and car_ims/ (car_ims.tgz extracted)"
TOPS = ("stanford_cars", "cars196")
TRAIN_CLASSES = 98
MANUAL = "cars_annos.mat and car_ims.tgz from a mirror of https://ai.stanford.edu/~jkrause/cars/car_dataset.html"


def index_cars196(root: Path, *, download: bool = False) -> ImageIndex:
    """The images of ``cars_annos.mat`` (struct array ``annotations``: ``relative_im_path``, ``class``).

    ``root`` is the folder with ``cars_annos.mat`` or a parent holding it as ``stanford_cars/`` or
    ``cars196/``. Checks that ``car_ims/`` and the first and last listed images exist, not every image.
    """
    if download:
        raise no_download("cars196", MANUAL)
    folder = dataset_folder(root, ["cars_annos.mat"], TOPS)
    annos_path = require(folder / "cars_annos.mat", "cars196", EXPECTED)
    require(folder / "car_ims", "cars196", EXPECTED)
    try:
        annotations = np.atleast_1d(scipy.io.loadmat(annos_path, squeeze_me=True)["annotations"])
        relative = [str(path) for path in annotations["relative_im_path"]]
        labels = annotations["class"].astype(np.int64)
    except (KeyError, ValueError, TypeError, OSError) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise DatasetLayoutError(
            f"cars196: cannot read {annos_path} ({reason}); expected a struct array 'annotations' "
            "with fields relative_im_path and class"
        ) from error
    paths = [folder / path for path in relative]
    check_listed(paths, "cars_annos.mat", "cars196", EXPECTED)
    return ImageIndex(paths=paths, labels=labels, split=np.where(labels <= TRAIN_CLASSES, "train", "test"))
