"""CUB-200-2011 (Wah et al. 2011): 11,788 bird images, 200 species.

The DML split (Oh Song et al. 2016): classes 1–100 train, 101–200 test; labels keep the dataset's
class ids 1–200. The official train/test image split (``train_test_split.txt``) is a classification
split and is not used.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from study.data.images import DatasetLayoutError, ImageIndex
from study.data.layout import check_listed, dataset_folder, read_rows, require

# Module constants so that a test can point them at a local archive.
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
TOP = "CUB_200_2011"
EXPECTED = f"{TOP}/ with images.txt, image_class_labels.txt and images/"
TRAIN_CLASSES = 100


def download_url(url: str, root: str, filename: str, md5: str) -> None:
    """torchvision's ``download_url``, imported when a download starts: torchvision takes seconds to
    import, and every process that reads a study file imports this module."""
    from torchvision.datasets.utils import download_url as download

    download(url, root, filename=filename, md5=md5)


def index_cub200(root: Path, *, download: bool = False) -> ImageIndex:
    """The images listed in ``images.txt`` with their ``image_class_labels.txt`` classes.

    ``root`` is ``CUB_200_2011/`` or the folder that contains it. With ``download``, a missing
    dataset is downloaded (1.1 GB, checked against its MD5) and extracted into ``root`` first.
    Checks that ``images/`` and the first and last listed images exist, not every image.
    """
    folder = dataset_folder(root, ["images.txt"], [TOP])
    if download and not (folder / "images.txt").exists():
        _download(Path(root).expanduser().resolve())
        folder = dataset_folder(root, ["images.txt"], [TOP])
    images = read_rows(folder / "images.txt", "cub200", EXPECTED, columns=2)
    classes = dict(read_rows(folder / "image_class_labels.txt", "cub200", EXPECTED, columns=2))
    image_dir = require(folder / "images", "cub200", EXPECTED)
    missing = next((image_id for image_id, _ in images if image_id not in classes), None)
    if missing is not None:
        raise DatasetLayoutError(
            f"cub200: image id {missing} of images.txt has no row in {folder / 'image_class_labels.txt'}"
        )
    paths = [image_dir / relative for _, relative in images]
    check_listed(paths, "images.txt", "cub200", EXPECTED)
    labels = np.array([int(classes[image_id]) for image_id, _ in images], dtype=np.int64)
    return ImageIndex(paths=paths, labels=labels, split=np.where(labels <= TRAIN_CLASSES, "train", "test"))


def _download(root: Path) -> None:
    """Download the archive into ``root`` (checked against :data:`MD5`), extract it there, then delete it.

    A failed or corrupt download is deleted before the error: left behind, a truncated archive would
    be taken for the dataset's. Extraction uses tarfile's "data" filter, and checks every member before
    writing any: a member that would land outside ``root`` (``../x``, an absolute path, a link out)
    refuses the whole archive, and nothing is written.
    """
    archive = root / f"{TOP}.tgz"
    try:
        download_url(URL, str(root), filename=archive.name, md5=MD5)  # reuses a complete archive already there
    except BaseException as error:  # Ctrl-C too: a partial archive must not stay
        archive.unlink(missing_ok=True)
        if not isinstance(error, Exception):
            raise
        # torchvision raises a plain RuntimeError when the MD5 differs (RecursionError, a subclass: redirects)
        reason = (
            "its MD5 differs" if type(error) is RuntimeError else " ".join(f"{type(error).__name__}: {error}".split())
        )
        raise DatasetLayoutError(
            f"cub200: cannot download {URL} ({reason}); expected an archive with MD5 {MD5}; the partial or "
            f"corrupt archive was deleted: try again, or download and extract it into {root} by hand"
        ) from error
    try:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                tarfile.data_filter(member, str(root))
            tar.extractall(root, filter="data")
    except (tarfile.TarError, OSError) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise DatasetLayoutError(f"cub200: cannot extract {archive} into {root} ({reason})") from error
    archive.unlink()
