"""Image datasets on disk: what a loader returns (:class:`ImageIndex`) and the decode-once cache.

A loader (``study/data/<name>.py``) reads a dataset's official layout and
returns an :class:`ImageIndex`: the image paths with their class ids, the
official train/test split and, for query/gallery protocols (In-Shop), which
test images are queries and which are gallery. Loaders read index files only;
images are decoded once, by :func:`load_images`, into a cache file of uint8
pixels at a fixed height that every trial then memory-maps.

The cache keeps each image's aspect ratio (the training crops and the evaluation
center crop are taken from the whole image, as torchvision's transforms on the
original files would): shorter side resized to S, the longer side laid along the
columns (portrait images are stored transposed), cut to its central S·max_aspect
px when longer. One dense uint8 array (N, 3, S, W) holds them all, each image
left-aligned (columns [0, w_i)) and zero-padded to W, the widest image's width;
its geometry (w_i and the transposed flag) is in a side-car file next to it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import ExifTags, Image, ImageOps

# Part of the cache key: bump it when _decode changes, so that old cache files are not reused.
# 2: aspect kept (S × w_i, portrait transposed), not a center square
# 3: EXIF orientation applied, 16-bit scaled to 8-bit (was clipped to white), transparency on white
CACHE_VERSION = 3
# EXIF orientations that turn the image a quarter (swap width and height)
QUARTER_TURNS = (5, 6, 7, 8)
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class DatasetLayoutError(ValueError):
    """A dataset folder is missing a file or does not have the expected layout (one line)."""


class UnreadableImageError(RuntimeError):
    """An image file cannot be decoded; the message names its path."""


@dataclass(frozen=True)
class ImageIndex:
    """The images of a dataset: ``paths`` (absolute), ``labels`` (int64 class ids, as the dataset
    numbers them), ``split`` ("train" or "test" per image, the official split), where the
    protocol has them, boolean ``is_query`` / ``is_gallery`` masks (False on training images) and,
    where the dataset says which sub-mode of its class each image shows (a manifest's ``submode``
    column), int64 ``submodes``: the class-collapse metric needs them, and no file of an official
    benchmark has them (None)."""

    paths: list[Path]
    labels: np.ndarray
    split: np.ndarray
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    submodes: np.ndarray | None = None


@dataclass(frozen=True)
class ImageCache:
    """Decoded images: ``pixels``, a read-only uint8 memory map (N, 3, S, W); image i fills columns
    [0, ``widths[i]``) of its row, zeros after; ``transposed[i]``: stored transposed (a portrait image,
    its longer side along the columns). Widths are ≥ S: each image's valid region is S × w_i."""

    pixels: np.ndarray
    widths: np.ndarray  # int32 (N,)
    transposed: np.ndarray  # bool (N,)


def load_images(index: ImageIndex, size: int, cache_dir: Path, workers: int = 8, max_aspect: float = 2.0) -> ImageCache:
    """All images of ``index``, decoded once into a cache file (see :class:`ImageCache`).

    Each image: shorter side resized to ``size`` (bilinear, antialiased; the longer side to
    ``int(size · long / short)``, torchvision's ``Resize(size)``), transposed when portrait, its longer side
    center-cropped to ``round(size · max_aspect)`` px when longer. W is the largest width any image needs,
    so square images cost size × size each. The pixels are a ``.npy`` file in ``cache_dir`` named after a
    hash of the resolved paths, their sizes and mtimes, ``size`` and ``max_aspect``: a changed dataset or
    option gets a new file (old ones are left for the user to delete); the geometry is a side-car
    ``<name>.geometry.npz`` written before it. Both are written to temp files and renamed, under a file
    lock, so concurrent callers (trials on one machine) decode once and never see a partial file.
    """
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be ≥ 1, got {max_aspect}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(path).resolve() for path in index.paths]
    target = cache_dir / f"images_{size}px_{len(paths)}_{_cache_key(paths, size, max_aspect)}.npy"
    write = functools.partial(_write_cache, paths, size, round(size * max_aspect), geometry_file=_geometry_file(target))
    pixels = np.load(cached_file(target, functools.partial(write, workers=workers)), mmap_mode="r")
    geometry = read_geometry(pixels)
    if geometry is None:
        raise FileNotFoundError(f"{_geometry_file(target)} is missing: delete {target} to decode the images again")
    return ImageCache(pixels, *geometry)


def read_geometry(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(widths, transposed) of an image cache's whole memory map ``pixels`` (from its side-car file), or
    None for another array (e.g. the synthetic dataset's tensor)."""
    filename = getattr(pixels, "filename", None)
    if filename is None or not _geometry_file(Path(filename)).exists():
        return None
    with np.load(_geometry_file(Path(filename))) as geometry:
        widths, transposed = geometry["widths"], geometry["transposed"]
    if len(widths) != len(pixels):
        raise ValueError(f"{filename}: {len(pixels)} rows given, the cache has {len(widths)}: pass the whole array")
    return widths, transposed


def cached_file(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, made once: ``write(temp)`` fills a temp file next to it, which is renamed to
    ``target``, under a file lock. Concurrent callers (trials on one machine) wait for the first and
    never see a partial file; a failed ``write`` leaves nothing behind."""
    if target.exists():
        return target
    with FileLock(f"{target}.lock"):
        if target.exists():  # another process wrote it while we waited
            return target
        _write_atomically(target, write)
    return target


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(temp)`` to a temp file next to ``target``, then renamed to it; on failure, nothing is left."""
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temp))
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _geometry_file(pixels: Path) -> Path:
    return pixels.with_name(f"{pixels.stem}.geometry.npz")


def _cache_key(paths: list[Path], size: int, max_aspect: float) -> str:
    """A hash of what the pixels depend on; stats every file (about a second for SOP's 120k images)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} size={size} max_aspect={float(max_aspect)!r}\n".encode())
    for path in paths:
        try:
            stat = path.stat()
        except OSError as error:
            raise UnreadableImageError(f"{path}: cannot read image ({error.strerror})") from error
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _write_cache(
    paths: list[Path], size: int, max_width: int, temp: Path, *, geometry_file: Path, workers: int
) -> None:
    """Decode into the memory-mapped file ``temp`` (bounded memory), then write the geometry side-car: the
    pixel file, renamed last, is the mark of a complete cache. W comes from the images' headers (no decode)."""
    width = max(_parallel(lambda path: _stored_width(_image_size(path), size, max_width), paths, workers), default=size)
    out = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, width))

    def decode_into(i: int) -> tuple[int, bool]:
        pixels, transposed = _decode(paths[i], size, max_width)
        if pixels.shape[-1] > width:  # the header said otherwise: never happens with PIL's formats
            raise UnreadableImageError(f"{paths[i]}: cannot read image (decoded size differs from its header)")
        out[i, :, :, : pixels.shape[-1]] = pixels
        return pixels.shape[-1], transposed

    geometry = _parallel(decode_into, range(len(paths)), workers)
    out.flush()
    widths = np.array([w for w, _ in geometry], dtype=np.int32).reshape(-1)
    transposed = np.array([t for _, t in geometry], dtype=bool).reshape(-1)

    def write_geometry(file: Path) -> None:
        with file.open("wb") as handle:
            np.savez(handle, widths=widths, transposed=transposed)

    _write_atomically(geometry_file, write_geometry)


def _parallel(function: Callable, items, workers: int) -> list:
    """``function`` of each item, in ``workers`` threads (PIL releases the GIL), results in order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            return [future.result() for future in futures]  # in order: the error names the first unreadable image
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _long_side(image_size: tuple[int, int], size: int) -> int:
    """The longer side of an image of PIL ``image_size`` (w, h) resized to shorter side ``size``
    (torchvision's Resize rounding)."""
    short, long = sorted(image_size)
    return int(size * long / short)


def _stored_width(image_size: tuple[int, int], size: int, max_width: int) -> int:
    """The stored width of an image of PIL ``image_size``: its resized longer side, at most ``max_width``."""
    return min(_long_side(image_size, size), max_width)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels: the size :func:`_decode` sees,
    after the EXIF orientation (a quarter turn swaps width and height)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) in QUARTER_TURNS
            return (height, width) if turned else (width, height)
    except Exception as error:
        raise _unreadable(path, error) from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, as a viewer shows it. PIL's plain ``convert("RGB")`` gets three kinds of
    files wrong: it ignores the EXIF orientation (phone photos come out on their side), clips 16-bit
    values to 255 (a 16-bit PNG comes out white) and drops transparency, exposing whatever colour the
    transparent pixels happen to hold (often black or editing leftovers); those are laid on white, the
    background of product photos. 16-bit values keep their top 8 bits (``v >> 8``). Palette, grey, CMYK
    and the other modes convert as PIL does (CMYK JPEGs: Pillow undoes Adobe's inverted storage)."""
    image = ImageOps.exif_transpose(image)  # first: every step below works on the upright image
    if image.mode in SIXTEEN_BIT:
        grey = np.clip(np.asarray(image).astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path: str | Path, size: int, max_width: int) -> tuple[np.ndarray, bool]:
    """One image file as the cache stores it (see :func:`_decode`): uint8 (3, size, w ≤ ``max_width``) and
    whether it is transposed. A kept model embeds new images through it (:mod:`study.models.embedder`)."""
    return _decode(Path(path), size, max_width)


def _decode(path: Path, size: int, max_width: int) -> tuple[np.ndarray, bool]:
    """One image as uint8 (3, size, w) and whether it is stored transposed: RGB, shorter side resized to
    ``size`` (what torchvision's ``Resize(size)`` does to the file), the longer side along the columns, its
    central ``max_width`` px when longer; colours and orientation as a viewer shows them (:func:`_to_rgb`)."""
    try:
        with Image.open(path) as image:
            image = _to_rgb(image)
            transposed = image.height > image.width
            long = _long_side(image.size, size)
            width, height = (size, long) if transposed else (long, size)
            if (width, height) != image.size:
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image).transpose((2, 1, 0) if transposed else (2, 0, 1))  # (3, size, long)
            left = max(0, long - max_width) // 2
            return pixels[:, :, left : left + max_width], transposed
    except Exception as error:  # any failure to decode is the file's fault: name it, on one line
        raise _unreadable(path, error) from error


def _unreadable(path: Path, error: Exception) -> UnreadableImageError:
    reason = " ".join(f"{type(error).__name__}: {error}".split())
    return UnreadableImageError(f"{path}: cannot read image ({reason})")
