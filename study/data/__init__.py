"""Datasets: the embedded synthetic one and the image benchmarks, class-disjoint splits, sampling.

:func:`create_dataset` returns a :class:`Dataset`: uint8 images (N, 3, S, S), class labels, the
official train/test split, for query/gallery protocols the query and gallery masks and, where the
dataset knows them, each image's sub-mode (for the class-collapse metric). The
synthetic dataset is generated in memory; the image datasets (``study/data/loaders.py``) are read
from the official layout in ``root`` and decoded once into a cache file that is memory-mapped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from study.data.images import ImageIndex, load_images
from study.data.loaders import INDEXES
from study.data.splits import first_half_split, require_disjoint, single_image_classes
from study.data.synthetic import make_synthetic

DATASETS = ("synthetic", *INDEXES)
DEFAULT_CACHE = Path.home() / ".cache" / "dml-study"
# Recall@K as each dataset's papers report it; every other dataset: 1, 2, 4, 8 (CUB, Cars)
RECALL_KS = {"sop": (1, 10, 100, 1000), "inshop": (1, 10, 20, 30, 40, 50)}


@dataclass(frozen=True)
class Dataset:
    images: torch.Tensor | np.ndarray  # uint8 (N, 3, S, W); a read-only memory map for image datasets
    labels: np.ndarray  # int64 class ids (N,)
    split: np.ndarray  # "train" | "test" (N,), the official split
    is_query: np.ndarray | None = None  # query/gallery protocols (In-Shop): masks over all N
    is_gallery: np.ndarray | None = None
    # image datasets: each image's valid width (columns [0, w_i)) and whether it is stored transposed
    # (see study.data.images.ImageCache); None for synthetic data (square, the whole array)
    widths: np.ndarray | None = None
    transposed: np.ndarray | None = None
    # int64 sub-mode ids (N,) (the synthetic data's glyphs, a manifest's submode column), compared within a
    # class only: what study.metrics.submode_recall_at_1 measures class collapse with; None when unknown
    submodes: np.ndarray | None = None


def dataset_options(name: str) -> list[str]:
    """The ``dataset.options`` dataset ``name`` accepts (its builder's keyword arguments)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    builder = make_synthetic if name == "synthetic" else INDEXES[name]
    return [p for p in inspect.signature(builder).parameters if p != "root"]


def recall_ks(name: str) -> tuple[int, ...]:
    """The K of the Recall@K dataset ``name`` is evaluated with (:data:`RECALL_KS`, else 1, 2, 4, 8)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return RECALL_KS.get(name, (1, 2, 4, 8))


def index_dataset(name: str, root: str | Path | None, **options) -> ImageIndex:
    """Read an image dataset's index files: fast, and raises DatasetLayoutError on a wrong folder.

    Also checks, for every loader, that the train and test splits are class-disjoint: a loader bug or a
    hand-made layout that mixes them would otherwise evaluate on classes seen in training, silently."""
    if root is None:
        raise ValueError(f"dataset.root: the {name} dataset needs the folder it is in")
    index = INDEXES[name](Path(root), **options)
    require_disjoint(index.labels, index.split, name)
    return index


def index_warnings(index: ImageIndex, name: str = "dataset") -> list[str]:
    """One-line warnings about dataset ``name``'s index that do not stop a study but skew it: classes with a
    single image (:func:`~study.data.splits.single_image_classes`), which can never be answered queries."""
    why = {  # split → (for one class, for several)
        "train": (
            "it gives no positive pair in training and cannot be a validation query",
            "they give no positive pair in training and cannot be validation queries",
        ),
        "test": (
            "it cannot be a query (no other image of its class)",
            "they cannot be queries (no other image of their class)",
        ),
    }
    warnings = []
    for split, count in single_image_classes(index.labels, index.split).items():
        classes = f"1 {split} class has" if count == 1 else f"{count} {split} classes have"
        warnings.append(f"{name}: {classes} a single image; {why[split][count > 1]}")
    return warnings


def create_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    decode_size: int = 256,
    cache_dir: Path | None = None,
    max_aspect: float = 2.0,
    **options,
) -> Dataset:
    """Build dataset ``name``. Image datasets are decoded once into ``cache_dir``: shorter side resized to
    ``decode_size`` px, aspect kept up to ``max_aspect`` (:func:`~study.data.images.load_images`). Unknown
    names and options raise ValueError."""
    allowed = dataset_options(name)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(f"dataset.options.{unknown[0]}: unknown option; allowed: {', '.join(allowed)}")
    if name == "synthetic":
        images, labels, modes = make_synthetic(root, **options)
        return Dataset(images, labels, first_half_split(labels), submodes=np.asarray(modes, dtype=np.int64))
    index = index_dataset(name, root, **options)
    cache = load_images(index, decode_size, Path(cache_dir or DEFAULT_CACHE), max_aspect=max_aspect)
    return Dataset(
        cache.pixels,
        index.labels,
        index.split,
        index.is_query,
        index.is_gallery,
        cache.widths,
        cache.transposed,
        submodes=index.submodes,
    )
