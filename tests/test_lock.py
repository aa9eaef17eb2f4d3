"""One driver per study folder (study/lock.py): the OS lock of a local folder, held by another
process and released by its death; the lease of an object store, on a real S3 API (moto's server)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

import study.lock
from study.lock import FLOCK_FILE, LOCK_FILE, LockHolder, StudyLock, StudyLockedError, read_holder
from study.storage import Storage
from tests.conftest import S3_CREDENTIALS, s3_server

REPO = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()

HOLD = """
import sys, time
from study.lock import StudyLock
from study.storage import Storage
with StudyLock(Storage.at(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def _foreign(heartbeat: float) -> LockHolder:
    """Another driver's lease, last renewed at ``heartbeat``."""
    return LockHolder("elsewhere", 4242, heartbeat - 60, heartbeat, "f" * 32)


def _write(storage: Storage, holder: LockHolder) -> None:
    storage.child(LOCK_FILE).write_bytes(holder.to_bytes())


# -- a local folder


def test_a_lock_held_by_another_process_is_refused_until_it_is_killed(tmp_path):
    folder = tmp_path / "runs" / "q"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StudyLockedError) as refused:
            StudyLock(Storage.at(folder)).acquire()
        message = str(refused.value)
        assert message.startswith(f"{folder} is in use by dml-study (pid {holder.pid} on host {HOST}, since ")
        assert message.endswith("UTC); wait for it to end, or stop it") and "\n" not in message
    finally:
        holder.kill()  # SIGKILL: no release runs; the kernel drops the OS lock
        holder.wait(timeout=30)
    assert read_holder(Storage.at(folder)).pid == holder.pid  # the dead driver's name stays...
    with StudyLock(Storage.at(folder)):  # ...but its lock does not
        assert read_holder(Storage.at(folder)).pid == os.getpid()


def test_a_released_lock_can_be_taken_again_and_a_new_study_folder_is_created(tmp_path):
    storage = Storage.at(tmp_path / "runs" / "new")
    for _ in range(2):
        with StudyLock(storage) as lock:
            assert lock.held and (tmp_path / "runs" / "new" / FLOCK_FILE).exists()
            holder = read_holder(storage)
            assert (holder.host, holder.pid) == (HOST, os.getpid())
        assert not lock.held and read_holder(storage) is None  # the holder file goes with the lock
    assert sorted(p.name for p in (tmp_path / "runs" / "new").iterdir()) == [FLOCK_FILE]


def test_a_second_lock_in_the_same_process_is_refused_and_an_error_releases(tmp_path):
    storage = Storage.at(tmp_path / "q")
    with pytest.raises(KeyError):
        with StudyLock(storage):
            with pytest.raises(StudyLockedError, match=f"pid {os.getpid()} on host {HOST}"):
                StudyLock(storage).acquire()
            raise KeyError("the run failed")
    with StudyLock(storage):
        pass


def test_the_name_left_by_a_killed_driver_is_taken_over(tmp_path):
    storage = Storage.at(tmp_path / "q")
    _write(storage, _foreign(time.time()))  # fresh, but nobody holds the OS lock
    with StudyLock(storage):
        assert read_holder(storage).pid == os.getpid()


def test_a_folder_without_flock_gets_a_lease(tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(study.lock.fcntl, "flock", no_flock)
    storage = Storage.at(tmp_path / "q")
    with StudyLock(storage, settle=0.0, heartbeat_every=0.1, stale_after=5.0) as lock:
        assert lock._beat is not None and lock._beat.is_alive()  # the lease's heartbeat
        with pytest.raises(StudyLockedError, match="last heartbeat 0 s ago"):
            StudyLock(storage, settle=0.0).acquire()
    assert read_holder(storage) is None


# -- an object store


@pytest.fixture(scope="module")
def s3():
    """A local S3 server with an empty bucket; yields a function giving a fresh study folder in it."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3_CREDENTIALS.items():
            patch.setenv(name, value)
        with s3_server() as options:
            folders = iter(range(1_000_000))
            yield lambda: Storage.at(f"s3://studies/runs/s{next(folders)}?{options}")


def test_a_heartbeating_lease_is_refused_and_released(s3):
    storage = s3()
    with StudyLock(storage, heartbeat_every=0.2, stale_after=1.0, settle=0.1):
        first = read_holder(storage)
        assert (first.host, first.pid) == (HOST, os.getpid())
        time.sleep(1.5)  # longer than stale_after: only the heartbeat keeps the lease
        assert read_holder(storage).heartbeat > first.heartbeat
        with pytest.raises(StudyLockedError) as refused:
            StudyLock(storage, heartbeat_every=0.2, stale_after=1.0, settle=0.1).acquire()
        message = str(refused.value)
        assert message.startswith(f"{storage} is in use by dml-study (pid {os.getpid()} on host {HOST}, since ")
        assert "s3://studies/runs/" in message and "endpoint_override" not in message and "\n" not in message
    assert not storage.child(LOCK_FILE).exists()  # released: the lease object is gone
    assert [f.base_name for f in storage.fs.get_file_info(pafs.FileSelector(storage.root))] == []
    with StudyLock(storage, settle=0.1):
        pass


def test_a_lease_that_stopped_heartbeating_is_taken_over(s3):
    storage = s3()
    _write(storage, _foreign(time.time() - 2.0))
    with pytest.raises(StudyLockedError, match=r"pid 4242 on host elsewhere, .*last heartbeat 2 s ago"):
        StudyLock(storage, heartbeat_every=0.2, stale_after=5.0, settle=0.1).acquire()
    with StudyLock(storage, heartbeat_every=0.2, stale_after=1.0, settle=0.1):
        assert read_holder(storage).pid == os.getpid()
    assert not storage.child(LOCK_FILE).exists()


def test_a_fresh_lease_of_a_dead_driver_on_this_host_is_taken_over_at_once(s3):
    storage = s3()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write(storage, LockHolder(HOST, dead.pid, time.time(), time.time(), "d" * 32))  # killed a moment ago
    with StudyLock(storage, settle=0.1):  # no wait for the 90 s lapse
        assert read_holder(storage).pid == os.getpid()
    _write(storage, LockHolder(HOST, os.getppid(), time.time(), time.time(), "e" * 32))  # alive on this host
    with pytest.raises(StudyLockedError, match=f"pid {os.getppid()} on host {HOST}"):
        StudyLock(storage, settle=0.1).acquire()


def test_a_driver_that_writes_its_lease_after_ours_wins_the_race(s3):
    storage = s3()
    theirs = _foreign(time.time())

    def race() -> None:  # another driver that read "no lease" just before we wrote ours
        while not storage.child(LOCK_FILE).exists():
            time.sleep(0.01)
        _write(storage, theirs)

    racer = threading.Thread(target=race)
    racer.start()
    with pytest.raises(StudyLockedError, match="pid 4242 on host elsewhere"):
        StudyLock(storage, settle=1.0).acquire()
    racer.join()
    assert read_holder(storage) == theirs  # the loser leaves the winner's lease alone


def test_a_lease_taken_over_while_held_is_lost_and_not_deleted(s3):
    storage = s3()
    theirs = _foreign(time.time())
    with StudyLock(storage, heartbeat_every=0.1, stale_after=1.0, settle=0.1) as lock:
        deadline = time.monotonic() + 5
        while not lock.lost:  # a beat that read its lease just before we wrote overwrites ours: write again
            assert time.monotonic() < deadline, "the heartbeat did not notice"
            _write(storage, theirs)
            time.sleep(0.05)
        time.sleep(0.3)
        assert read_holder(storage) == theirs  # no heartbeat overwrote it
    assert read_holder(storage) == theirs


def test_bad_timings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_every"):
        StudyLock(Storage.at(tmp_path), heartbeat_every=90, stale_after=90)


def test_the_holder_file_is_json_with_its_fields(tmp_path):
    storage = Storage.at(tmp_path / "q")
    with StudyLock(storage):
        fields = json.loads((tmp_path / "q" / LOCK_FILE).read_text())
    assert set(fields) == {"host", "pid", "started", "heartbeat", "token"}
    assert LockHolder.parse(b"not json") is None and LockHolder.parse(b'{"host": "h"}') is None


# -- the command line: a second driver on a live study is refused before it touches anything


@pytest.mark.usefixtures("study_workdir")  # creates the MLflow store anyway: it comes migrated
def test_a_second_run_or_resume_on_a_live_study_exits_2_naming_the_holder(workdir):
    from typer.testing import CliRunner

    from study.cli import app
    from study.config import load_study
    from study.tracking import StudyTracker
    from tests.conftest import write_study

    path = write_study(workdir)
    folder = workdir / "runs" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(load_study(path).public_dump(), sort_keys=False))
    cfg = load_study(path)
    parent = StudyTracker(cfg.name, os.environ["MLFLOW_TRACKING_URI"]).start(cfg.public_dump(), "map_at_r")
    (folder / "mlflow_run_id").write_text(parent)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".lock")}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["run", str(path), "--new"], ["run", str(path), "--resume"], ["resume", "runs/tiny"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 2, result.output
            assert f"is in use by dml-study (pid {holder.pid} on host {HOST}" in result.output
            assert len(result.output.strip().splitlines()) == 1
            assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".lock")} == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
