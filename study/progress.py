"""Where a running study stands: per loss and stage, runs done / running / planned, the best search
trial so far with its hyperparameters, elapsed time and an ETA; and the lines that say so.

Plain Python (no Ray, no terminal): :mod:`study.progress_view` shows it, the Tune callback in
:mod:`study.progress_callback` feeds it, the tests drive it with a fake clock.

The ETA is an estimate from what this driver has seen: the mean wall time of one epoch of one run
(every reported result is one epoch), times the epochs still to train, divided by the runs training
at once. A search trial is expected to train as many epochs as the loss's ended search trials did on
average (ASHA stops many early), the study's full budget until one has ended; a final or ablation run
trains its full budget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from study.vocab import Stage, State, TrialKey, objective_name

STAGES = (Stage.SEARCH, Stage.FINAL, Stage.ABLATION)  # the stages of the Tune run, in the order they run


@dataclass
class Tally:
    """One loss's runs of one stage: how many it has (``total``), how many have ended (earlier
    drivers' included), the epochs a run trains at most, and the runs training now (key → the last
    epoch it reported)."""

    total: int = 0
    done: int = 0
    epochs: int = 1
    running: dict[str, int] = field(default_factory=dict)

    @property
    def waiting(self) -> int:
        return max(self.total - self.done - len(self.running), 0)


@dataclass(frozen=True)
class Best:
    """A loss's best COMPLETE search trial so far: its objective value, Optuna number and point."""

    value: float
    number: int
    params: Mapping[str, Any]


class StudyProgress:
    """The progress of one study, fed with planned counts (:meth:`plan`) and trial events
    (:meth:`start`, :meth:`epoch`, :meth:`end`); ``clock`` gives seconds (monotonic)."""

    def __init__(self, objective: str, losses: list[str], clock: Callable[[], float] = time.monotonic):
        self.objective, self.losses, self.clock = objective, list(losses), clock
        self.started_at = clock()
        self._tallies = {loss: {stage: Tally() for stage in STAGES} for loss in losses}
        self._best: dict[str, Best] = {}
        self._loss_started: dict[str, float] = {}
        self._search_epochs: dict[str, list[int]] = {loss: [] for loss in losses}  # of ended search trials
        self._epoch_seconds, self._epochs_seen = 0.0, 0
        self._last_at: dict[str, float] = {}  # running key → when it started or last reported

    # -- what the stages and the callback tell it

    def plan(self, loss: str, stage: Stage, total: int, done: int = 0, epochs: int | None = None) -> None:
        """``loss``'s ``stage`` has ``total`` runs, ``done`` of them ended already (a resumed study),
        each training up to ``epochs``."""
        tally = self._tallies[loss][stage]
        tally.total, tally.done = total, done
        if epochs is not None:
            tally.epochs = epochs

    def seed_best(self, loss: str, value: float, number: int, params: Mapping[str, Any]) -> None:
        """The best search trial an earlier driver finished (a resumed study)."""
        self._keep_if_best(loss, Best(value, number, dict(params)))

    def start(self, key: TrialKey, params: Mapping[str, Any]) -> str:
        """Run ``key`` started, or started again after its worker died (Ray Tune retries it from its
        last checkpoint); returns its line."""
        tally, name = self._tally(key), str(key)
        again = name in tally.running
        tally.running.setdefault(name, 0)
        now = self.clock()
        self._last_at[name] = now
        self._loss_started.setdefault(key.loss, now)
        return f"▶ {key} {'retried' if again else 'started'}: {format_params(params)}"

    def epoch(self, key: TrialKey, epoch: int | None = None) -> None:
        """Run ``key`` trained up to ``epoch`` (default: one more epoch; a result may carry several, see
        :class:`study.worker.Reporter`); a run resumed from a checkpoint goes on from that checkpoint's
        epoch."""
        tally, name = self._tally(key), str(key)
        if name not in tally.running:  # a result without a start (cannot happen in Ray Tune): count it from now
            self.start(key, {})
        now = self.clock()
        self._epoch_seconds += now - self._last_at[name]
        self._last_at[name] = now
        previous = tally.running[name]
        tally.running[name] = previous + 1 if epoch is None else epoch
        self._epochs_seen += max(tally.running[name] - previous, 1)

    def end(
        self, key: TrialKey, state: State, value: float | None, params: Mapping[str, Any], error: str | None = None
    ):
        """Run ``key`` ended with ``state`` (``value``: its objective); returns its line."""
        tally, name = self._tally(key), str(key)
        epochs = tally.running.pop(name, 0)
        self._last_at.pop(name, None)
        tally.done += 1
        tally.total = max(tally.total, tally.done)  # a run the plan did not know of (a retry is not one)
        if key.stage is Stage.SEARCH:
            self._search_epochs[key.loss].append(epochs)
            if state is State.COMPLETE and value is not None and math.isfinite(value):
                self._keep_if_best(key.loss, Best(value, key.number, dict(params)))
        metric = objective_name(key.stage, self.objective)  # test_<objective> on a final or ablation run
        shown = f" {metric}={value:.4f}" if value is not None and state is not State.FAIL else ""
        line = f"{'✗' if state is State.FAIL else '■'} {key} {state}{shown} after {epochs} epoch{'s' * (epochs != 1)}"
        line += f" · {key.stage} {tally.done}/{tally.total}"
        if key.stage is Stage.SEARCH and key.loss in self._best:
            line += f" · best {self._best_text(key.loss)}"
        if error:
            line += f"\n    {last_line(error)}"
        return line

    # -- what it says

    def tally(self, loss: str, stage: Stage) -> Tally:
        return self._tallies[loss][stage]

    def best(self, loss: str) -> Best | None:
        return self._best.get(loss)

    def seconds_per_epoch(self) -> float | None:
        """Mean wall time of one epoch of one run so far; None before the first epoch."""
        return self._epoch_seconds / self._epochs_seen if self._epochs_seen else None

    def epochs_left(self, loss: str) -> float:
        """Epochs ``loss``'s runs still have to train (an estimate for search trials: see the module)."""
        left = 0.0
        for stage, tally in self._tallies[loss].items():
            expected = tally.epochs
            if stage is Stage.SEARCH and self._search_epochs[loss]:
                expected = sum(self._search_epochs[loss]) / len(self._search_epochs[loss])
            left += tally.waiting * expected + sum(max(expected - done, 0) for done in tally.running.values())
        return left

    def elapsed(self, loss: str | None = None) -> float | None:
        """Seconds since the study (this driver) or ``loss``'s first run started; None before that."""
        started = self._loss_started.get(loss) if loss else self.started_at
        return None if started is None else self.clock() - started

    def running(self, loss: str | None = None) -> int:
        losses = [loss] if loss else self.losses
        return sum(len(t.running) for name in losses for t in self._tallies[name].values())

    def eta(self, loss: str | None = None) -> float | None:
        """Seconds until ``loss``'s runs (all losses' without one) are done: 0 when nothing is left,
        None before the first epoch gives a time per epoch."""
        losses = [loss] if loss else self.losses
        left = sum(self.epochs_left(name) for name in losses)
        if not left:
            return 0.0
        per_epoch = self.seconds_per_epoch()
        return None if per_epoch is None else left * per_epoch / max(self.running(loss), 1)

    def loss_line(self, loss: str) -> str:
        """``loss``: each stage's runs done/total (and running), best so far, elapsed, ETA."""
        parts = [loss]
        for stage, tally in self._tallies[loss].items():
            if tally.total:
                running = f" ({len(tally.running)} running)" if tally.running else ""
                parts.append(f"{stage} {tally.done}/{tally.total}{running}")
        if loss in self._best:
            parts.append(f"best {self._best_text(loss)}")
        elapsed = self.elapsed(loss)
        parts.append(f"elapsed {'-' if elapsed is None else duration(elapsed)}")
        parts.append(f"ETA {eta_text(self.eta(loss))}")
        return " · ".join(parts)

    def study_line(self) -> str:
        """The whole study: each stage's runs done/total over every loss, elapsed, ETA."""
        parts = []
        for stage in STAGES:
            done = sum(self._tallies[loss][stage].done for loss in self.losses)
            total = sum(self._tallies[loss][stage].total for loss in self.losses)
            if total:
                parts.append(f"{stage} {done}/{total}")
        tallies = [t for loss in self.losses for t in self._tallies[loss].values()]
        parts.append(f"runs {sum(t.done for t in tallies)}/{sum(t.total for t in tallies)}")
        parts.append(f"{self.running()} running")
        parts.append(f"elapsed {duration(self.elapsed())}")
        parts.append(f"ETA {eta_text(self.eta())}")
        return "study: " + " · ".join(parts)

    def _best_text(self, loss: str) -> str:
        best = self._best[loss]
        return f"{self.objective}={best.value:.4f} (#{best.number}: {format_params(best.params)})"

    def _keep_if_best(self, loss: str, best: Best) -> None:
        if loss not in self._best or best.value > self._best[loss].value:
            self._best[loss] = best

    def _tally(self, key: TrialKey) -> Tally:
        return self._tallies[key.loss][key.stage]


def format_params(params: Mapping[str, Any]) -> str:
    """Hyperparameters on one line, numbers to 4 significant digits: ``alpha=2.588, mining=False``."""
    if not params:
        return "(defaults)"
    return ", ".join(
        f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}" for name, value in params.items()
    )


def last_line(error: str) -> str:
    """An error's last non-empty line (the exception), what a terminal line has room for."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error


def duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``1h02m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return "done" if seconds == 0 else f"~{duration(seconds)}"
