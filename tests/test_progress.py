"""The progress model and its terminal view, without Ray: counts, the best trial with its
hyperparameters, ETA arithmetic on a fake clock; plain lines at a steady rate off a terminal, a live
table on one."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from study.progress import StudyProgress, duration, eta_text, format_params, last_line
from study.progress_view import ProgressView
from study.spec import FAILED, SPEC, TrialSpec
from study.vocab import Stage, State, TrialKey


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress(clock, losses=("ms", "ns")) -> StudyProgress:
    progress = StudyProgress("map_at_r", list(losses), clock)
    for loss in losses:
        progress.plan(loss, Stage.SEARCH, 4, epochs=10)
        progress.plan(loss, Stage.FINAL, 2, epochs=20)
        progress.plan(loss, Stage.ABLATION, 0, epochs=20)
    return progress


def _epochs(progress, clock, key, n, seconds):
    for _ in range(n):
        clock.now += seconds
        progress.epoch(key)


def test_counts_and_the_best_trial_with_its_hyperparameters():
    clock = Clock()
    progress = _progress(clock)
    a, b, c = (TrialKey.search("ms", n) for n in range(3))
    assert progress.start(a, {"alpha": 2.0, "mining": True}) == "▶ ms/0 started: alpha=2, mining=True"
    progress.start(b, {"alpha": 3.14159})
    tally = progress.tally("ms", Stage.SEARCH)
    assert (tally.done, len(tally.running), tally.waiting, tally.total) == (0, 2, 2, 4)

    line = progress.end(a, State.COMPLETE, 0.25, {"alpha": 2.0, "mining": True})
    assert line == (
        "■ ms/0 COMPLETE map_at_r=0.2500 after 0 epochs · search 1/4 · best map_at_r=0.2500 (#0: alpha=2, mining=True)"
    )
    progress.end(b, State.PRUNED, 0.9, {"alpha": 3.14159})  # a pruned trial is never the best
    assert progress.best("ms").number == 0
    progress.start(c, {"alpha": 1.5})
    progress.end(c, State.COMPLETE, 0.5, {"alpha": 1.5})
    assert progress.best("ms").number == 2 and progress.best("ms").params == {"alpha": 1.5}
    assert progress.best("ns") is None
    assert (tally.done, tally.running, tally.waiting) == (3, {}, 1)
    assert "search 3/4 · final 0/2 · best map_at_r=0.5000 (#2: alpha=1.5)" in progress.loss_line("ms")
    assert "ablation" not in progress.loss_line("ms")  # a stage with no runs is not shown
    assert progress.study_line().startswith("study: search 3/8 · final 0/4 · runs 3/12 · 0 running")


def test_a_failed_run_shows_its_error_and_no_value():
    progress = _progress(Clock())
    key = TrialKey.final("ns", 3, seed=1)
    progress.start(key, {"scale": 10.0, "seed": 1})
    line = progress.end(key, State.FAIL, None, {}, error="Traceback ...\n  File x\nNonFiniteLossError: loss is nan\n")
    assert line == "✗ ns/final/3/s1 FAIL after 0 epochs · final 1/2\n    NonFiniteLossError: loss is nan"


def test_a_resumed_study_counts_earlier_trials_and_keeps_their_best():
    progress = _progress(Clock())
    progress.plan("ms", Stage.SEARCH, 4, done=3)
    progress.seed_best("ms", 0.4, 1, {"alpha": 2.5})
    assert progress.tally("ms", Stage.SEARCH).waiting == 1
    key = TrialKey.search("ms", 3)
    progress.start(key, {"alpha": 1.0})
    assert progress.end(key, State.COMPLETE, 0.3, {"alpha": 1.0}).endswith(
        "search 4/4 · best map_at_r=0.4000 (#1: alpha=2.5)"
    )


def test_a_retried_run_says_so_and_goes_on_from_its_checkpoints_epoch():
    clock = Clock()
    progress = _progress(clock)
    key = TrialKey.search("ms", 0)
    progress.start(key, {"alpha": 2.0})
    _epochs(progress, clock, key, 2, seconds=1.0)
    assert progress.start(key, {"alpha": 2.0}) == "▶ ms/0 retried: alpha=2"  # its worker died
    clock.now += 1
    progress.epoch(key, 2)  # the checkpoint held epoch 1
    assert progress.tally("ms", Stage.SEARCH).running == {"ms/0": 2}
    assert "after 2 epochs" in progress.end(key, State.COMPLETE, 0.1, {})


def test_eta_is_the_epochs_left_times_the_time_per_epoch_over_the_runs_in_flight():
    clock = Clock()
    progress = _progress(clock, losses=("ms",))
    assert progress.eta() is None and eta_text(progress.eta()) == "?"  # no epoch seen yet
    first, second = TrialKey.search("ms", 0), TrialKey.search("ms", 1)
    progress.start(first, {})
    progress.start(second, {})
    _epochs(progress, clock, first, 2, seconds=3.0)  # 2 epochs of 3 s
    _epochs(progress, clock, second, 1, seconds=6.0)  # 1 epoch, 12 s after its start
    assert progress.seconds_per_epoch() == pytest.approx((3 + 3 + 12) / 3)
    # search: 2 waiting × 10 + (10 - 2) + (10 - 1) epochs; final: 2 × 20
    assert progress.epochs_left("ms") == 20 + 8 + 9 + 40
    assert progress.eta("ms") == pytest.approx(77 * 6.0 / 2)  # two runs in flight

    # ASHA stopped the first after 2 epochs: a search trial is now expected to train 2
    progress.end(first, State.PRUNED, 0.1, {})
    assert progress.epochs_left("ms") == 2 * 2 + 1 + 40
    assert progress.eta() == pytest.approx(45 * 6.0 / 1)
    assert progress.elapsed("ms") == pytest.approx(12.0) and progress.elapsed() == pytest.approx(12.0)


def test_a_study_with_nothing_left_is_done():
    clock = Clock()
    progress = StudyProgress("map_at_r", ["ms"], clock)
    progress.plan("ms", Stage.SEARCH, 1, epochs=2)
    key = TrialKey.search("ms", 0)
    progress.start(key, {})
    _epochs(progress, clock, key, 2, seconds=1.0)
    progress.end(key, State.COMPLETE, 0.2, {})
    assert progress.eta() == 0 and eta_text(progress.eta()) == "done" and progress.loss_line("ms").endswith("ETA done")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (192, "3m12s"), (3720, "1h02m"), (-3, "0s")]
)
def test_durations(seconds, text):
    assert duration(seconds) == text


def test_hyperparameters_and_errors_fit_one_line():
    assert (
        format_params({"alpha": 2.5881234, "beta": 1e-5, "positive": "easy"})
        == "alpha=2.588, beta=1e-05, positive=easy"
    )
    assert format_params({}) == "(defaults)"
    assert last_line("Traceback\n  boom\nValueError: x\n\n") == "ValueError: x"


def _view(clock, terminal: bool) -> tuple[ProgressView, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=200, highlight=False, soft_wrap=True)
    return ProgressView(_progress(clock), console, interval=60.0), out


def test_off_a_terminal_plain_lines_and_the_summary_at_most_once_a_minute():
    clock = Clock()
    view, out = _view(clock, terminal=False)
    assert not view.live
    with view:
        view.say("searching ms: 4 of 4 trials to run")
        key = TrialKey.search("ms", 0)
        view.started(key, {"alpha": 2.0})  # the first event prints the summary
        for _ in range(5):
            clock.now += 20
            view.result(key)  # at 100 s: the second summary
        view.ended(key, State.COMPLETE, 0.3, {"alpha": 2.0})
    text = out.getvalue()
    assert "\x1b" not in text  # no cursor or colour codes
    lines = text.splitlines()
    assert lines[:2] == ["searching ms: 4 of 4 trials to run", "▶ ms/0 started: alpha=2"]
    assert sum(line.startswith("study: ") for line in lines) == 3  # at 0 s, at 60 s, at the end
    assert lines[-1].startswith("study: search 1/8 · final 0/4 · runs 1/12 · 0 running · elapsed 1m40s · ETA ~")
    assert "  ms · search 1/4 · final 0/2 · best map_at_r=0.3000 (#0: alpha=2)" in text


def test_on_a_terminal_a_live_table_with_a_row_per_loss():
    clock = Clock()
    view, out = _view(clock, terminal=True)
    assert view.live
    with view:
        key = TrialKey.search("ns", 0)
        view.started(key, {"scale": 16.0})
        clock.now += 5
        view.result(key)
        view.ended(key, State.COMPLETE, 0.42, {"scale": 16.0})
    text = out.getvalue()
    assert "▶ ns/0 started: scale=16" in text and "■ ns/0 COMPLETE map_at_r=0.4200" in text
    assert "\x1b[?25l" in text and "\x1b[2K" in text and "\x1b[1A" in text  # hidden cursor, redrawn in place
    table = text.rsplit("best map_at_r", 1)[1]  # the last drawing of the table
    assert "0.4200 (#0)" in table and "scale=16" in table and "1/4" in table
    assert "study: search 1/8 · final 0/4 · runs 1/12" in table


def test_the_callback_shows_a_trial_from_its_spec_and_its_outcome(tmp_path):
    from study.progress_callback import ProgressCallback

    events = []
    view = SimpleNamespace(
        started=lambda *a: events.append(("started", *a)),
        result=lambda *a: events.append(("result", *a)),
        ended=lambda *a: events.append(("ended", *a)),
    )
    train = SimpleNamespace(epochs=2)
    spec = TrialSpec(TrialKey.search("ms", 1), {}, train, seed=0, params={"alpha": 2.0})
    trial = SimpleNamespace(config={SPEC: spec}, last_result={"map_at_r": 0.3, "epoch": 2}, error_file=None)
    callback = ProgressCallback(view, "map_at_r")
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, trial.last_result)
    callback.on_trial_result(0, [], trial, {FAILED: "ValueError: x", "epoch": 2})  # not an epoch
    callback.on_trial_complete(0, [], trial)
    trace = tmp_path / "error.txt"
    trace.write_text("Traceback ...\nRuntimeError: worker died")
    callback.on_trial_error(
        0, [], SimpleNamespace(config={SPEC: spec}, last_result={"epoch": 1}, error_file=str(trace))
    )
    assert events[:3] == [
        ("started", spec.key, {"alpha": 2.0}),
        ("result", spec.key, 2),
        ("ended", spec.key, State.COMPLETE, 0.3, {"alpha": 2.0}, None),
    ]
    assert events[3][:4] == ("ended", spec.key, State.FAIL, None) and events[3][5].endswith("RuntimeError: worker died")
