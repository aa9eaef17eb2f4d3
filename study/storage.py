"""Where a study's files live: a local or shared folder, or an object store, through pyarrow's
filesystems (the layer Ray Tune itself uses for its results).

A location is a path (``runs``, ``/shared/runs``) or a URI pyarrow understands
(``s3://bucket/runs``, ``gs://bucket/runs``; options such as
``?endpoint_override=host:9000&scheme=http`` for S3-compatible stores; credentials
come from the usual environment, never from the URI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Storage:
    """A folder in a filesystem: ``fs`` and the ``root`` path inside it."""

    fs: pafs.FileSystem
    root: str
    display: str

    @classmethod
    def at(cls, location: str | Path) -> Storage:
        location = str(location)
        if "://" in location:
            fs, root = pafs.FileSystem.from_uri(location)
            return cls(fs, root.rstrip("/"), location.split("?", 1)[0].rstrip("/"))
        path = Path(location).resolve()
        return cls(pafs.LocalFileSystem(), path.as_posix(), str(location).rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, *parts: str) -> Storage:
        return Storage(self.fs, str(PurePosixPath(self.root, *parts)), "/".join([self.display, *parts]))

    def exists(self) -> bool:
        return self.fs.get_file_info(self.root).type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.root) as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        """Write atomically: a temporary file, then a rename (a copy on object stores, where the
        new object appears whole), so a crash mid-write leaves the previous version."""
        parent = str(PurePosixPath(self.root).parent)
        self.fs.create_dir(parent, recursive=True)
        tmp = str(PurePosixPath(parent, f".{PurePosixPath(self.root).name}.tmp"))
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.root)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def delete(self) -> None:
        """Remove this file, or this folder and everything in it (nothing if it does not exist)."""
        kind = self.fs.get_file_info(self.root).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.root)
        elif kind != pafs.FileType.NotFound:
            self.fs.delete_file(self.root)

    def list(self) -> list[pafs.FileInfo]:
        """This folder's entries (not recursive; none if it does not exist)."""
        return self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove everything in this folder but the entries named in ``keep`` (a lock held on it)."""
        for info in self.list():
            if info.base_name in keep:
                continue
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            else:
                self.fs.delete_file(info.path)

    def __str__(self) -> str:
        return self.display
