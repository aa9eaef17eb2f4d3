"""The study's progress in the terminal, with ``rich``.

On a terminal, a live table (one row per loss: each stage's runs done/total, the best search trial
with its hyperparameters, elapsed, ETA; the study's line under it) redrawn in place, with a line per
started and ended run printed above it. Anywhere else (a CI log, ``ray job submit``, ``nohup``) no
cursor codes: the same run lines, and the losses' and the study's lines at most once per
``interval`` seconds and at the end.

The Tune callback calls it on the driver's main thread while ``rich`` redraws from its own thread:
a lock keeps the two from reading and changing :class:`~study.progress.StudyProgress` at once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from study.progress import STAGES, StudyProgress, duration, eta_text, format_params
from study.vocab import Stage, State, TrialKey


class ProgressView:
    """Shows ``progress`` on ``console`` (default: stdout, live when it is a terminal); a context
    manager around the study's run. ``say`` prints any other line of the study above the table."""

    def __init__(self, progress: StudyProgress, console: Console | None = None, interval: float = 60.0):
        self.progress, self.interval = progress, interval
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self._lock = threading.RLock()
        self._live: Live | None = None
        self._shown_at: float | None = None  # when the summary lines were last printed (plain output)

    def __enter__(self) -> ProgressView:
        if self.live:
            self._live = Live(console=self.console, get_renderable=self._table, refresh_per_second=1)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()  # the last table stays on the screen
            self._live = None
        else:
            self._summary()  # where the study ended

    # -- what the stages and the Tune callback tell it

    def say(self, line: str) -> None:
        with self._lock:
            self.console.print(line, markup=False, highlight=False)

    def plan(self, loss: str, stage: Stage, total: int, done: int = 0, epochs: int | None = None) -> None:
        with self._lock:
            self.progress.plan(loss, stage, total, done, epochs)

    def seed_best(self, loss: str, value: float, number: int, params: Mapping[str, Any]) -> None:
        with self._lock:
            self.progress.seed_best(loss, value, number, params)

    def started(self, key: TrialKey, params: Mapping[str, Any]) -> None:
        with self._lock:
            self.say(self.progress.start(key, params))
            self._maybe_summary()

    def result(self, key: TrialKey, epoch: int | None = None) -> None:
        with self._lock:
            self.progress.epoch(key, epoch)
            self._maybe_summary()

    def ended(self, key: TrialKey, state: State, value: float | None, params: Mapping[str, Any], error=None) -> None:
        with self._lock:
            self.say(self.progress.end(key, state, value, params, error))
            self._maybe_summary()

    # -- plain output: the summary at a steady rate

    def _maybe_summary(self) -> None:
        now = self.progress.clock()
        if not self.live and (self._shown_at is None or now - self._shown_at >= self.interval):
            self._summary()

    def _summary(self) -> None:
        with self._lock:
            self._shown_at = self.progress.clock()
            for loss in self.progress.losses:
                self.say(f"  {self.progress.loss_line(loss)}")
            self.say(self.progress.study_line())

    # -- live output: the table

    def _table(self) -> Group:
        with self._lock:
            progress = self.progress
            table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
            table.add_column("loss", no_wrap=True)
            stages = [s for s in STAGES if any(progress.tally(loss, s).total for loss in progress.losses)]
            for stage in stages:
                table.add_column(str(stage), no_wrap=True)
            table.add_column(f"best {progress.objective}", no_wrap=True)
            table.add_column("hyperparameters of the best", overflow="fold", max_width=60)
            table.add_column("elapsed", no_wrap=True, justify="right")
            table.add_column("ETA", no_wrap=True, justify="right")
            for loss in progress.losses:
                cells = [loss]
                for stage in stages:
                    tally = progress.tally(loss, stage)
                    running = f" ({len(tally.running)}▶)" if tally.running else ""
                    cells.append(f"{tally.done}/{tally.total}{running}" if tally.total else "-")
                best = progress.best(loss)
                cells += [f"{best.value:.4f} (#{best.number})", format_params(best.params)] if best else ["-", ""]
                elapsed = progress.elapsed(loss)
                cells += ["-" if elapsed is None else duration(elapsed), eta_text(progress.eta(loss))]
                table.add_row(*cells)
            return Group(table, Text(progress.study_line()))
