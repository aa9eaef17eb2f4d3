"""One schedule for the whole study: every loss's search and final stage as one stream of trials.

A single Ray Tune run holds the study. :class:`StudySchedule` (its searcher) interleaves the losses'
searches — each loss's TPE bounded by its own ``search.max_concurrent``, since many parallel
suggestions degrade TPE — and suggests a loss's final runs once that loss's search has ended,
whenever a slot has no search trial to take; no loss or stage waits for another. Search trials go
first because a loss's final runs wait for them, and nothing waits for a final run: the longest
chain of work left goes first (Hu's highest-level-first rule), so the study does not end with one
loss's last search trial and then its final runs alone on an idle cluster, and the final runs left
for the end are many and independent, to fill its last slots. Waiting final runs go longest first
(LPT: a run's epochs × its loss's seconds per epoch in its search trials), so that the study does not
end with one long run, started last, alone on the cluster. :class:`PerLossASHA` (its
scheduler) stops weak search trials with one ASHA per loss, never comparing losses, and lets final
runs train to the end. The cluster stays as full as ``search.max_concurrent_total`` (default: as
many trials as its resources fit) allows.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from study.config import StudyConfig
from study.data.images import UnreadableImageError
from study.searcher import DriverOnly, StatelessSearcher, StudySearcher
from study.spec import SPEC, UNREADABLE, TrialSpec
from study.vocab import Stage


def cluster_line(slots: int, limit: int, width: int, max_concurrent: int) -> str:
    """What a study says of its cluster when its trials start: ``slots`` (what the cluster holds), ``limit``
    trials at once (``search.max_concurrent_total``), and, when its searches (``width`` trials at once at
    most: :attr:`StudySchedule.search_width`) cannot fill them, how many slots wait for final runs and why."""
    line = f"cluster: {slots} slots, up to {limit} trials at once"
    if 0 < width < limit:
        line += (
            f"; the searches can run only {width} (search.max_concurrent={max_concurrent} per loss), so {limit - width}"
            " wait for final runs: raise search.max_concurrent (TPE's suggestions weaken as more run at once) or"
            " give them to another study"
        )
    return line


def loss_asha(cfg: StudyConfig) -> ASHAScheduler:
    """One loss's ASHA over its search trials' epochs (:class:`PerLossASHA` builds one per loss)."""
    search = cfg.search
    return ASHAScheduler(
        time_attr="epoch",
        metric=search.objective,
        mode="max",
        max_t=cfg.train.epochs,
        grace_period=search.grace_period,
        reduction_factor=search.reduction_factor,
    )


def rung_epochs(cfg: StudyConfig) -> set[int]:
    """The epochs at which :func:`loss_asha` may stop a search trial: its rungs, ``grace_period ×
    reduction_factor^k`` up to ``train.epochs``. A worker sends these epochs' results at once
    (:class:`study.worker.Reporter`), so that ASHA decides on each as if every epoch were sent."""
    rungs, epoch = set(), cfg.search.grace_period
    while epoch <= cfg.train.epochs:
        rungs.add(epoch)
        epoch *= cfg.search.reduction_factor
    return rungs


class StudySchedule(StatelessSearcher):
    """Suggests search trials of every loss in ``searches`` (loss → its searcher and how many trials
    it still has to run), round-robin, at most ``max_concurrent`` per loss at a time; once a loss's
    search has ended, ``finals(loss)`` gives its final runs, which take the slots no search trial
    can."""

    def __init__(
        self,
        searches: dict[str, tuple[StudySearcher | None, int]],
        finals: Callable[[str], list[TrialSpec]],
        max_concurrent: int,
    ):
        super().__init__()
        self._searchers = {loss: searcher for loss, (searcher, _) in searches.items()}
        self._left = {loss: left for loss, (_, left) in searches.items()}
        self._running = dict.fromkeys(searches, 0)
        self._awaiting_final = list(searches)
        self._finals, self._max_concurrent = finals, max_concurrent
        self._queue: list[TrialSpec] = []
        self._owner: dict[str, str | None] = {}  # Ray trial id in flight → its loss (search), None (final)
        self._next = 0  # round-robin position among the losses
        self.error: Exception | None = None  # what stopped the study (see stop)
        self._epoch_s: dict[str, list[float]] = {loss: [] for loss in searches}  # each search trial's s / epoch
        # True once Ray Tune had a free slot and no trial to give it: work nothing waits for (the untrained
        # baseline, stages.Baseline) takes such a slot rather than one a trial could use
        self.left_a_slot_idle = False

    @property
    def search_width(self) -> int:
        """The most search trials it can have in flight at once: ``max_concurrent`` per loss, or as many as
        the loss has left."""
        return sum(min(self._max_concurrent, left) for left in self._left.values())

    def stop(self, error: Exception) -> None:
        """End the study with ``error`` (an unreadable image, a failed baseline): nothing more is
        suggested and :class:`StopOnError` stops the trials in flight, unfinished, for resume."""
        self.error = self.error or error

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.error is not None:
            return Searcher.FINISHED
        for loss in list(self._awaiting_final):  # searches that have ended release their final runs
            if not self._left[loss] and not self._running[loss]:
                self._awaiting_final.remove(loss)
                self._queue += self._finals(loss)
                self._queue.sort(key=self._expected_s, reverse=True)  # stable: ties keep their order
        losses = list(self._left)
        for i in range(len(losses)):  # a search trial first: its loss's final runs still wait for it
            loss = losses[(self._next + i) % len(losses)]
            if self._left[loss] and self._running[loss] < self._max_concurrent:
                self._next = (self._next + i + 1) % len(losses)
                self._left[loss] -= 1
                self._running[loss] += 1
                self._owner[trial_id] = loss
                return self._searchers[loss].suggest(trial_id)
        if self._queue:  # final runs: nothing waits for them
            self._owner[trial_id] = None
            return {SPEC: self._queue.pop(0)}
        self.left_a_slot_idle = True  # (Ray Tune asks only while it has fewer trials than slots)
        if self._awaiting_final or any(self._left.values()):
            return None  # more to come once trials in flight end
        # Nothing more to suggest: Ray Tune then also stops the worker it keeps for a next trial (it keeps
        # one while more may come), freeing its slot; it still waits for the trials in flight
        return Searcher.FINISHED

    def _expected_s(self, spec: TrialSpec) -> float:
        """How long run ``spec`` is expected to train: its epochs × the mean seconds per epoch of its
        loss's search trials (of every loss's, where its own are unknown: searched by an earlier driver)."""
        own = self._epoch_s[spec.loss] or [s for times in self._epoch_s.values() for s in times]
        return spec.train.epochs * (sum(own) / len(own) if own else 0.0)

    @property
    def finished(self) -> bool:
        """Every trial of the study has been suggested and has ended. False after ``Tuner.fit``
        returned means the run was interrupted (Ctrl-C) or stopped (``error``), with trials left
        unfinished."""
        return self.error is None and not (
            self._queue or self._awaiting_final or any(self._left.values()) or self._owner
        )

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and UNREADABLE in result:  # every trial would meet it: fix it, then resume
            self.stop(UnreadableImageError(result[UNREADABLE]))
        loss = self._owner.pop(trial_id, None)
        if loss is not None:
            self._running[loss] -= 1
            if result and result.get("epoch") and result.get("time_total_s"):  # (Ray Tune's own timing)
                self._epoch_s[loss].append(result["time_total_s"] / result["epoch"])
            self._searchers[loss].on_trial_complete(trial_id, result, error)


class StopOnError(DriverOnly, Stopper):
    """Stops the Tune run once ``schedule`` has stopped the study (:meth:`StudySchedule.stop`). Ray Tune
    stops the trials in flight without telling the searcher or the callbacks, as at Ctrl-C: Optuna
    keeps them RUNNING and their MLflow runs stay open, and resume runs them again."""

    def __init__(self, schedule: StudySchedule):
        self.schedule = schedule

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.schedule.error is not None


class PerLossASHA(DriverOnly, FIFOScheduler):
    """ASHA within each loss's search trials (``make_asha()`` builds one per loss); final runs are
    never stopped."""

    def __init__(self, make_asha: Callable[[], ASHAScheduler]):
        super().__init__()
        self._make_asha = make_asha
        self._asha: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # each ASHA is built with the study's objective

    def _of(self, trial) -> ASHAScheduler | None:
        spec = trial.config[SPEC]
        if spec.key.stage is not Stage.SEARCH:
            return None
        if spec.loss not in self._asha:
            self._asha[spec.loss] = self._make_asha()
        return self._asha[spec.loss]

    def on_trial_add(self, tune_controller, trial) -> None:
        if asha := self._of(trial):
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        asha = self._of(trial)
        return asha.on_trial_result(tune_controller, trial, result) if asha else TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if asha := self._of(trial):
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if asha := self._of(trial):
            asha.on_trial_remove(tune_controller, trial)
