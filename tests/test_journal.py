"""The Optuna journal's torn tail is cut before a study resumes (study/journal.py): a real study on a
JournalFileBackend, its last record torn at every byte."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from study.journal import JournalCorruptError, clear_writer_lock, repair_journal

STUDY = "tiny.multi_similarity"


def _storage(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def _trials(path: Path) -> list[tuple]:
    """Every trial in the journal as (number, state, values, params): what a resumed study sees."""
    study = optuna.load_study(study_name=STUDY, storage=_storage(path))
    return [(t.number, t.state, t.values, t.params) for t in study.get_trials(deepcopy=False)]


def _one_more_trial(path: Path) -> tuple:
    """Ask and tell one trial through a fresh storage, as a resumed driver would."""
    study = optuna.load_study(study_name=STUDY, storage=_storage(path), sampler=optuna.samplers.RandomSampler(1))
    trial = study.ask()
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    study.tell(trial, 0.5)
    return (trial.number, optuna.trial.TrialState.COMPLETE, [0.5], {"lr": lr})


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> tuple[bytes, int]:
    """A journal of five finished trials (two parameters each, one with intermediate values): its
    bytes and where its last record starts."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = tmp_path_factory.mktemp("journal") / "optuna.journal"
    study = optuna.create_study(study_name=STUDY, storage=_storage(path), sampler=optuna.samplers.RandomSampler(0))
    for _ in range(5):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        margin = trial.suggest_float("margin", 0.0, 1.0)
        trial.report(lr * margin, step=0)
        study.tell(trial, lr + margin)
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") > 20
    return data, data.rstrip(b"\n").rfind(b"\n") + 1


def test_every_torn_last_record_is_cut_and_the_study_resumes(journal, tmp_path):
    data, last = journal
    (tmp_path / "before.journal").write_bytes(data[:last])
    before = _trials(tmp_path / "before.journal")  # every trial up to the last record
    assert len(before) == 5 and before[-1][1] is optuna.trial.TrialState.RUNNING  # its tell was the last record
    for length in range(last + 1, len(data)):
        path = tmp_path / f"torn{length}.journal"
        path.write_bytes(data[:length])
        assert repair_journal(path) == length - last, length
        assert path.read_bytes() == data[:last], length
        added = _one_more_trial(path)
        assert _trials(path) == [*before, added], length
        path.unlink()


def test_a_record_without_its_newline_is_torn_even_though_it_parses(journal, tmp_path):
    data, last = journal
    path = tmp_path / "optuna.journal"
    path.write_bytes(data[:-1])
    json.loads(data[last:-1])  # the record is whole, only its newline is missing
    assert repair_journal(path) == len(data) - 1 - last
    assert path.read_bytes() == data[:last]


def test_without_repair_a_torn_tail_and_two_writes_make_the_journal_unreadable(journal, tmp_path):
    """The failure repair_journal prevents, as this Optuna version shows it: the first write after
    a torn tail is glued onto it and fails (the writer cannot find the trial it created); the
    journal still loads while the glued line is last; the second write buries it, and from then on
    every load raises JSONDecodeError."""
    data, last = journal
    path = tmp_path / "optuna.journal"
    path.write_bytes(data[:-10])
    (tmp_path / "before.journal").write_bytes(data[:last])
    before = _trials(tmp_path / "before.journal")
    assert _trials(path) == before  # Optuna skips the torn record on read...
    with pytest.raises(AttributeError):  # ...but appends onto it: its new trial is lost
        _one_more_trial(path)
    assert _trials(path) == before  # a glued last line is skipped too
    with pytest.raises(json.JSONDecodeError):  # the second write lands after the glued line
        _one_more_trial(path)
    for _ in range(2):
        with pytest.raises(json.JSONDecodeError):
            _trials(path)
    glued = data[:last].count(b"\n") + 1
    with pytest.raises(JournalCorruptError, match=f"{path}: line {glued} is not a JSON record"):
        repair_journal(path)
    assert path.read_bytes().startswith(data[:-10])  # refused, not cut


def test_a_glued_last_line_is_cut_with_its_torn_part(journal, tmp_path):
    """A driver without repair that resumed once (its write glued onto the torn tail, then failed)."""
    data, last = journal
    path = tmp_path / "optuna.journal"
    path.write_bytes(data[:-10])
    optuna.storages.journal.JournalFileBackend(str(path)).append_logs([json.loads(data[last:])])
    size = path.stat().st_size
    assert repair_journal(path) == size - last
    assert path.read_bytes() == data[:last]
    (tmp_path / "before.journal").write_bytes(data[:last])
    before = _trials(tmp_path / "before.journal")
    added = _one_more_trial(path)
    assert _trials(path) == [*before, added]


def test_a_bad_line_with_records_after_it_is_refused(journal, tmp_path):
    data, last = journal
    lines = data.splitlines(keepends=True)
    lines[3] = b'{"op_code": 4, "torn\n'
    path = tmp_path / "optuna.journal"
    path.write_bytes(b"".join(lines))
    with pytest.raises(JournalCorruptError, match=f"^{path}: line 4 is not a JSON record") as error:
        repair_journal(path)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == b"".join(lines)


def test_an_intact_journal_is_left_alone(journal, tmp_path):
    data, _ = journal
    path = tmp_path / "optuna.journal"
    path.write_bytes(data)
    mtime = path.stat().st_mtime_ns
    assert repair_journal(path) == 0
    assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime


def test_a_missing_or_empty_journal_is_left_alone(tmp_path):
    assert repair_journal(tmp_path / "optuna.journal") == 0
    assert not (tmp_path / "optuna.journal").exists()
    (tmp_path / "optuna.journal").write_bytes(b"")
    assert repair_journal(tmp_path / "optuna.journal") == 0


def test_a_torn_single_record_is_cut_to_an_empty_journal(tmp_path):
    path = tmp_path / "optuna.journal"
    path.write_bytes(b'{"op_code": 0, "study_na')
    assert repair_journal(path) == 24
    assert path.read_bytes() == b""


def test_a_writer_lock_left_by_a_killed_driver_is_cleared(tmp_path):
    path = tmp_path / "optuna.journal"
    assert not clear_writer_lock(path)
    Path(f"{path}.lock").symlink_to(path)  # what JournalFileSymlinkLock holds while appending
    assert clear_writer_lock(path)
    assert not Path(f"{path}.lock").is_symlink()
