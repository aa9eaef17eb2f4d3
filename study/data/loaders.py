"""The image dataset loaders by name: each returns an :class:`~study.data.images.ImageIndex`."""

from __future__ import annotations

from collections.abc import Callable

from study.data.cars196 import index_cars196
from study.data.cub200 import index_cub200
from study.data.image_folder import index_image_folder
from study.data.images import ImageIndex
from study.data.inshop import index_inshop
from study.data.manifest import index_manifest
from study.data.sop import index_sop

INDEXES: dict[str, Callable[..., ImageIndex]] = {
    "cub200": index_cub200,
    "cars196": index_cars196,
    "sop": index_sop,
    "inshop": index_inshop,
    "manifest": index_manifest,
    "image_folder": index_image_folder,
}
