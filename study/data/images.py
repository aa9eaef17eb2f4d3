"""Image datasets on disk: what a loader returns (:class:`ImageIndex`) and the decode-once cache.

A loader (``study/data/<name>.py``) reads a dataset's official layout and
returns an :class:`ImageIndex`: the image paths with their class ids, the
official train/test split and, for query/gallery protocols (In-Shop), which
test images are queries and which are gallery. Loaders read index files only;
images are decoded once, by :func:`load_images`, into a cache file of uint8
pixels at a fixed size that every trial then memory-maps.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

# Part of the cache key: bump it when _decode changes, so that old cache files are not reused.
CACHE_VERSION = 1


class DatasetLayoutError(ValueError):
    """A dataset folder is missing a file or does not have the expected layout (one line)."""


class UnreadableImageError(RuntimeError):
    """An image file cannot be decoded; the message names its path."""


@dataclass(frozen=True)
class ImageIndex:
    """The images of a dataset: ``paths`` (absolute), ``labels`` (int64 class ids, as the dataset
    numbers them), ``split`` ("train" or "test" per image, the official split) and, where the
    protocol has them, boolean ``is_query`` / ``is_gallery`` masks (False on training images)."""

    paths: list[Path]
    labels: np.ndarray
    split: np.ndarray
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None


def load_images(index: ImageIndex, size: int, cache_dir: Path, workers: int = 8) -> np.ndarray:
    """All images of ``index`` as one read-only memory-mapped uint8 array (N, 3, size, size).

    Each image is decoded once: shorter side resized to ``size`` (bilinear, antialiased), then
    center-cropped. The result is a ``.npy`` file in ``cache_dir`` named after a hash of the resolved
    paths, their sizes and mtimes and ``size``: a changed dataset or size gets a new file (old ones
    are left for the user to delete). The file is written to a temp file and renamed, under a file
    lock, so concurrent callers (trials on one machine) decode once and never see a partial file.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(path).resolve() for path in index.paths]
    target = cache_dir / f"images_{size}px_{len(paths)}_{_cache_key(paths, size)}.npy"
    return np.load(cached_file(target, lambda temp: _write_cache(paths, size, temp, workers)), mmap_mode="r")


def cached_file(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, made once: ``write(temp)`` fills a temp file next to it, which is renamed to
    ``target``, under a file lock. Concurrent callers (trials on one machine) wait for the first and
    never see a partial file; a failed ``write`` leaves nothing behind."""
    if target.exists():
        return target
    with FileLock(f"{target}.lock"):
        if target.exists():  # another process wrote it while we waited
            return target
        handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
        os.close(handle)
        try:
            write(Path(temp))
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    return target


def _cache_key(paths: list[Path], size: int) -> str:
    """A hash of what the pixels depend on; stats every file (about a second for SOP's 120k images)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} size={size}\n".encode())
    for path in paths:
        try:
            stat = path.stat()
        except OSError as error:
            raise UnreadableImageError(f"{path}: cannot read image ({error.strerror})") from error
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _write_cache(paths: list[Path], size: int, temp: Path, workers: int) -> None:
    """Decode into the memory-mapped file ``temp`` (bounded memory)."""
    out = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size))
    _decode_all(paths, size, out, workers)
    out.flush()


def _decode_all(paths: list[Path], size: int, out: np.ndarray, workers: int) -> None:
    """Decode ``paths`` into the rows of ``out`` in ``workers`` threads (PIL releases the GIL)."""

    def decode_into(i: int) -> None:
        out[i] = _decode(paths[i], size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(decode_into, i) for i in range(len(paths))]
        try:
            for future in futures:  # in order: the error names the first unreadable image
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _decode(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (3, size, size): RGB, shorter side resized to ``size``, center crop."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            return np.asarray(image).transpose(2, 0, 1)
    except Exception as error:  # any failure to decode is the file's fault: name it, on one line
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise UnreadableImageError(f"{path}: cannot read image ({reason})") from error
