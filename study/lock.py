"""One driver per study folder: ``with StudyLock(cfg.storage): ...`` around a run or a resume.

Two drivers on one study folder would both append to its Optuna journal, both start trials and
both delete checkpoints the other still needs. The lock refuses the second with one line naming
the first (:class:`StudyLockedError`).

A local or shared folder is locked by the operating system (``flock`` on ``.lock.flock``, taken
without waiting): the kernel drops it when the holder dies, even by SIGKILL, so a killed driver
never blocks a resume. An object store has no such locks, so there the lock is a *lease*: an
object that its holder rewrites every ``heartbeat_every`` seconds and that anyone may take over
once it is ``stale_after`` seconds old (a killed driver blocks a resume that long at most). The
same lease serves a folder whose filesystem refuses ``flock`` (some network mounts).

Either way ``.lock`` names the holder, as JSON (:class:`LockHolder`), for the refusal message and
for people: ``cat <study>/.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from types import TracebackType

from study.storage import Storage

LOCK_FILE = ".lock"  # in the study folder: who holds the study (JSON), the lease on an object store
FLOCK_FILE = ".lock.flock"  # in a local or shared study folder: the file the OS lock is taken on
STALE_AFTER = 90.0  # seconds without a heartbeat after which a lease may be taken over
HEARTBEAT_EVERY = 30.0  # seconds between a lease holder's heartbeats
SETTLE = 1.0  # seconds between writing a lease and reading it back, to see whether another won

_CONTENDED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
_NO_FLOCK = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

log = logging.getLogger(__name__)


class StudyLockedError(RuntimeError):
    """Another driver holds the study: one line naming it, no traceback."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a study: the content of its ``.lock`` (times in seconds since the epoch)."""

    host: str
    pid: int
    started: float
    heartbeat: float  # the last sign of life (a lease's); ``started`` under an OS lock
    token: str  # unique to one acquisition: tells two drivers with the same host and pid apart

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        """The holder in ``data``; None if it is not one (an empty or hand-edited file)."""
        try:
            fields = json.loads(data)
            return cls(
                str(fields["host"]),
                int(fields["pid"]),
                float(fields["started"]),
                float(fields["heartbeat"]),
                str(fields["token"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


def _alive(holder: LockHolder) -> bool:
    """Whether the lease's holder may still run: a driver on this host whose pid is gone is dead
    now, not only after ``stale_after`` (a resume right after a kill need not wait)."""
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def read_holder(storage: Storage) -> LockHolder | None:
    """Who ``.lock`` in the study folder ``storage`` names; None if nobody (or nothing readable).

    A name, not proof: under an OS lock the file of a killed driver stays until the next driver
    takes the study over."""
    try:
        return LockHolder.parse(storage.child(LOCK_FILE).read_bytes())
    except FileNotFoundError:
        return None


class StudyLock:
    """Hold the study folder ``storage`` for one driver, from ``__enter__`` to ``__exit__``.

    Raises :class:`StudyLockedError` on entry if another driver holds it. Creates the folder if it
    does not exist yet (a new study). Not reentrant: a second lock on a held folder is refused,
    also within one process.

    A lease (object stores) compares heartbeats with this host's clock, so drivers' clocks must
    agree to well within ``stale_after - heartbeat_every``; and since an object store cannot write
    an object only if it is absent, two drivers starting within ``settle`` seconds of each other are
    told apart by reading the lease back: the one whose lease is read back wins. A holder that
    finds its lease taken over (it could not heartbeat for ``stale_after``) logs an error and sets
    :attr:`lost`; it does not stop the driver.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        stale_after: float = STALE_AFTER,
        heartbeat_every: float = HEARTBEAT_EVERY,
        settle: float = SETTLE,
    ) -> None:
        if not 0 < heartbeat_every < stale_after:
            raise ValueError(
                f"heartbeat_every ({heartbeat_every}) must be positive and below stale_after ({stale_after})"
            )
        self.storage = storage
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.settle = settle
        self._lock_file = storage.child(LOCK_FILE)
        self._holder: LockHolder | None = None  # ours, while held
        self._fd: int | None = None  # the OS lock's file, while held
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._lost = False

    @property
    def held(self) -> bool:
        return self._holder is not None

    @property
    def lost(self) -> bool:
        """Whether another driver took the lease over while we held it (object stores only)."""
        return self._lost

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        if self.held:
            raise RuntimeError(f"{self.storage} is already locked by this StudyLock")
        self.storage.fs.create_dir(self.storage.root, recursive=True)
        now = time.time()
        holder = LockHolder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        if not (self.storage.is_local and self._lock_locally(holder)):
            self._lease(holder)

    def release(self) -> None:
        """Give the study up (nothing if not held): the holder file goes; so does a lease, unless
        another driver took it over."""
        if not self.held:
            return
        ours = self._holder
        assert ours is not None
        self._holder = None
        if self._fd is not None:  # under the OS lock nobody else can write .lock: remove it, then unlock
            try:
                with contextlib.suppress(FileNotFoundError):
                    self.storage.fs.delete_file(self._lock_file.root)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        try:
            self._delete_if_ours(ours)
        except OSError as error:  # the run itself is done: a lease left behind only lapses later
            log.warning(
                "%s: cannot remove the study lock (it lapses in %.0f s): %s", self.storage, self.stale_after, error
            )

    # -- a local or shared folder: the OS lock

    def _lock_locally(self, holder: LockHolder) -> bool:
        """Take the OS lock and name ourselves in ``.lock``; False if the filesystem has no
        ``flock`` (then a lease is used instead)."""
        fd = os.open(Path(self.storage.root, FLOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)  # not inherited
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in _CONTENDED:
                raise StudyLockedError(self._locked_message(read_holder(self.storage), lease=False)) from None
            if error.errno in _NO_FLOCK:
                return False
            raise
        try:
            self._put(holder)
        except BaseException:
            os.close(fd)  # releases the lock
            raise
        self._fd = fd
        self._holder = holder
        return True

    # -- an object store (or a folder without flock): the lease

    def _lease(self, holder: LockHolder) -> None:
        current = read_holder(self.storage)
        if current is not None and time.time() - current.heartbeat < self.stale_after and _alive(current):
            raise StudyLockedError(self._locked_message(current, lease=True))
        self._put(holder)
        try:
            time.sleep(self.settle)
            current = read_holder(self.storage)
        except BaseException:  # interrupted: leave no lease behind to block the next driver
            self._delete_if_ours(holder)
            raise
        if current is None or current.token != holder.token:  # another driver wrote after us
            raise StudyLockedError(self._locked_message(current, lease=True))
        self._holder = holder
        self._stop.clear()
        self._lost = False
        self._beat = threading.Thread(target=self._heartbeat, name=f"study-lock {self.storage}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        """Rewrite the lease every ``heartbeat_every`` seconds until released, unless taken over."""
        while not self._stop.wait(self.heartbeat_every):
            ours = self._holder
            if ours is None:
                return
            try:
                current = read_holder(self.storage)
                if current is None or current.token != ours.token:
                    self._lost = True
                    log.error("%s: the study lock was taken over by another driver", self.storage)
                    return
                self._put(replace(ours, heartbeat=time.time()))
            except Exception as error:  # the store is unreachable for now: try again at the next beat
                log.warning("%s: cannot renew the study lock: %s", self.storage, error)

    # -- the holder file

    def _delete_if_ours(self, holder: LockHolder) -> None:
        current = read_holder(self.storage)
        if current is not None and current.token == holder.token:
            self.storage.fs.delete_file(self._lock_file.root)

    def _put(self, holder: LockHolder) -> None:
        """Write ``.lock`` whole: a temporary file of our own, then a rename (a copy on object
        stores), so no reader sees half of it and racing writers never share a temporary."""
        temporary = str(PurePosixPath(self.storage.root, f"{LOCK_FILE}.{holder.token}.tmp"))
        with self.storage.fs.open_output_stream(temporary) as f:
            f.write(holder.to_bytes())
        self.storage.fs.move(temporary, self._lock_file.root)

    def _locked_message(self, holder: LockHolder | None, *, lease: bool) -> str:
        if holder is None:
            who = "another dml-study driver"
        else:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.started))
            beat = f", last heartbeat {max(time.time() - holder.heartbeat, 0):.0f} s ago" if lease else ""
            who = f"dml-study (pid {holder.pid} on host {holder.host}, since {since}{beat})"
        lapse = f" (a killed driver's lock lapses {self.stale_after:.0f} s after its last heartbeat)" if lease else ""
        return f"{self.storage} is in use by {who}; wait for it to end, or stop it{lapse}"
