"""Repair of Optuna's journal file (``optuna.journal``) before a study is resumed.

The journal is one JSON record per line, each line ending in ``\\n``, only ever appended to. A
driver killed mid-append, a full disk or a ``truncate`` leaves a *torn* last line: bytes after the
last ``\\n``. Optuna skips a torn line when it reads, but its next append lands right after it, so
the torn bytes and the new record become one *glued* line that is not JSON. While the glued line
is the last one Optuna skips it too (its writer fails: the record it wrote is never seen); once
anything is appended after it, every read raises ``JSONDecodeError`` and the study can never be
loaded again.

:func:`repair_journal` cuts a torn tail off, and a glued last line with it, before the driver
touches the journal: what it removes is exactly what no reader could ever have seen, so no trial
that Optuna reported is lost. A bad line with complete records after it is refused
(:class:`JournalCorruptError`), never dropped silently. Call it only while holding the study's
:class:`~study.lock.StudyLock`: another driver appending meanwhile would look torn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class JournalCorruptError(ValueError):
    """A journal line that is not JSON has complete records after it: one line, no traceback."""


def repair_journal(path: Path) -> int:
    """Cut a torn or glued tail off the journal at ``path``; the number of bytes removed.

    0 when the file is absent or intact. The tail is torn when bytes follow the last ``\\n`` (a
    record without its newline is torn even if it parses: Optuna skips it, and the next append
    would glue onto it). A glued last line (a complete line that is not JSON) is cut with it.
    The cut is a truncate, fsync'd, so it survives a crash right after.

    Raises :class:`JournalCorruptError` naming the file and line when a line that is not JSON is
    followed by complete records: Optuna cannot read past it, and dropping records from the middle
    would silently change the study.
    """
    path = Path(path)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = os.fstat(f.fileno()).st_size
        keep = 0  # the end of the last good complete line
        offset = 0  # the start of the line being read
        bad_line: int | None = None  # the number of a complete line that is not JSON
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break  # the torn tail: always the last piece
            if bad_line is not None:
                raise JournalCorruptError(
                    f"{path}: line {bad_line} is not a JSON record and records follow it, so Optuna cannot "
                    f"read the study; restore the journal from a backup, or cut it before line {bad_line} "
                    "to resume from the records before it"
                )
            try:
                json.loads(line)
            except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                bad_line = number
            else:
                keep = offset + len(line)
            offset += len(line)
        if keep == size:
            return 0
        f.truncate(keep)
        os.fsync(f.fileno())
    return size - keep


def clear_writer_lock(path: Path) -> bool:
    """Remove the lock Optuna's journal writer holds while appending (``<journal>.lock``, a
    symlink or a file) if it is left over; whether there was one.

    A driver killed mid-append (the way a torn tail is made) leaves it behind, and the next
    driver's first write then waits out Optuna's 30-second grace period and warns. Call it only
    while holding the study's :class:`~study.lock.StudyLock`: then no other process can be writing.
    """
    lock = Path(f"{path}.lock")
    try:
        lock.unlink()
    except FileNotFoundError:
        return False
    return True
