"""The trial spec, its outcome, the Optuna searcher and the MLflow callback — without a Ray study."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from study.callback import TrackingCallback
from study.config import parse_study, search_spaces
from study.searcher import StudySearcher
from study.spec import FAILED, SPEC, UNREADABLE, Outcome, final_spec, search_spec
from study.stages import close_finished_runs
from study.tracking import TAG_LOG_PARAMS, TAG_LOSS_LR, TAG_LR, TAG_STATE, TAG_TRIAL_METRICS, StudyTracker
from study.train import save_state
from study.vocab import EMBEDDINGS_ARTIFACT, Stage, State, TrialKey, checkpoint_dir, embeddings_file
from tests.conftest import TINY_STUDY

SEARCH = {
    "losses": ["multi_similarity", "proxy_anchor"],
    "trials_per_loss": 3,
    "train": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
}


@pytest.fixture
def cfg(tmp_path):
    import yaml

    text = yaml.safe_dump({**TINY_STUDY, "search": SEARCH, "output_dir": str(tmp_path / "runs")})
    return parse_study(text, "study.yaml")


@pytest.fixture
def spaces(cfg):
    return search_spaces(cfg)


def _searcher(cfg, space, study, first=True):
    make = lambda number, params: search_spec(cfg, space, number, params)  # noqa: E731
    return StudySearcher(study, space, make, "map_at_r", first=space.to_optuna(space.defaults()) if first else None)


def test_search_spec_resolves_a_point_once(cfg, spaces):
    space = spaces["proxy_anchor"]
    spec = search_spec(cfg, space, 5, {"alpha": 16.0, "so_weight_is_zero": True, "loss_lr_mult": 10.0, "lr": 3e-3})
    assert spec.key == TrialKey.search("proxy_anchor", 5) and spec.loss == "proxy_anchor" and spec.fold is None
    assert spec.loss_kwargs == {"alpha": 16.0, "so_weight": 0.0}
    assert (spec.train.lr, spec.train.loss_lr_mult, spec.train.epochs) == (3e-3, 10.0, cfg.train.epochs)
    assert spec.train.batch_size == cfg.train.batch_size and spec.seed == cfg.seed
    assert spec.params == {"alpha": 16.0, "so_weight": 0.0, "loss_lr_mult": 10.0, "lr": 3e-3}


def test_final_spec_keeps_the_point_with_a_new_seed_and_the_final_epochs(cfg, spaces):
    cfg = cfg.model_copy(update={"final": cfg.final.model_copy(update={"epochs": 7})})
    spec = final_spec(cfg, spaces["multi_similarity"], 3, {"alpha": 3.0, "lr": 2e-3}, seed=4, fold=1)
    assert spec.key == TrialKey.final("multi_similarity", 3, 4, 1) and spec.seed == 4 and spec.fold == 1
    assert (spec.train.epochs, spec.train.lr, spec.loss_kwargs) == (7, 2e-3, {"alpha": 3.0})
    assert spec.params == {"alpha": 3.0, "lr": 2e-3, "seed": 4, "fold": 1}


def test_outcome(cfg, spaces):
    spec = search_spec(cfg, spaces["multi_similarity"], 0, {})  # 2 epochs
    assert Outcome.of(spec, {"map_at_r": 0.3, "epoch": 2}, "map_at_r") == Outcome(State.COMPLETE, 0.3)
    assert Outcome.of(spec, {"map_at_r": 0.3, "epoch": 1}, "map_at_r") == Outcome(State.PRUNED, 0.3)
    assert Outcome.of(spec, {FAILED: "NonFiniteLossError: nan", "epoch": 1}, "map_at_r") == Outcome(
        State.FAIL, error="NonFiniteLossError: nan"
    )
    assert Outcome.of(spec, {"map_at_r": 0.3, "epoch": 2}, "map_at_r", error="trace").state is State.FAIL
    assert Outcome.of(spec, {"map_at_r": float("nan"), "epoch": 2}, "map_at_r").state is State.FAIL
    assert Outcome.of(spec, None, "map_at_r").state is State.FAIL
    final = final_spec(cfg, spaces["multi_similarity"], 0, {}, seed=1, fold=None)  # tested: test_<objective>
    assert Outcome.of(final, {"test_map_at_r": 0.4, "epoch": 2}, "map_at_r") == Outcome(State.COMPLETE, 0.4)
    wrong = Outcome.of(final, {"map_at_r": 0.4, "epoch": 2}, "map_at_r")  # a validation score: not its objective
    assert wrong.state is State.FAIL and "test_map_at_r" in wrong.error


def test_searcher_starts_from_the_defaults_and_tells_optuna_each_outcome(cfg, spaces):
    space = spaces["multi_similarity"]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    searcher = _searcher(cfg, space, study)
    specs = [searcher.suggest(f"t{i}")[SPEC] for i in range(4)]
    assert [s.key.number for s in specs] == [0, 1, 2, 3]
    assert specs[0].params == space.defaults()  # the paper's point first, the study's lr with it
    assert specs[1].params != specs[0].params and specs[1].train.lr != specs[0].train.lr
    searcher.on_trial_complete("t0", {"map_at_r": 0.4, "epoch": 2})
    searcher.on_trial_complete("t1", {"map_at_r": 0.2, "epoch": 1})
    searcher.on_trial_complete("t2", {FAILED: "NonFiniteLossError", "epoch": 1})
    searcher.on_trial_complete("t3", {"map_at_r": 0.9, "epoch": 2}, error=True)
    searcher.on_trial_complete("t0", {"map_at_r": 0.1, "epoch": 2})  # told once only
    states = [(t.state.name, t.value) for t in study.trials]
    assert states == [("COMPLETE", 0.4), ("PRUNED", None), ("FAIL", None), ("FAIL", None)]


def test_trials_a_dead_driver_left_running_go_first_with_their_numbers_and_params(cfg, spaces):
    space = spaces["multi_similarity"]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    first = _searcher(cfg, space, study)
    left = [first.suggest(f"t{i}")[SPEC] for i in range(3)]
    first.on_trial_complete("t1", {"map_at_r": 0.5, "epoch": 2})  # 0 and 2 stay RUNNING: the driver dies

    again = _searcher(cfg, space, study, first=False)
    resumed = [again.suggest(f"u{i}")[SPEC] for i in range(3)]
    assert [s.key.number for s in resumed] == [0, 2, 3]
    assert resumed[0] == left[0] and resumed[1] == left[2]  # the same spec: same params, same checkpoint key
    for i in range(3):
        again.on_trial_complete(f"u{i}", {"map_at_r": 0.1 * i, "epoch": 2})
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4


class FakeTracker:
    """Records what the callback asks of the tracker."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def after_logged(self, action):  # as the TrackingWriter does once the calls before it are written
        action()


def _trial(spec, last_result=None, error_file=None):
    return SimpleNamespace(config={SPEC: spec}, last_result=last_result, error_file=error_file)


def test_callback_logs_a_search_trial_from_its_spec(cfg, spaces):
    tracker = FakeTracker()
    callback = TrackingCallback(tracker, cfg, spaces)
    spec = search_spec(cfg, spaces["proxy_anchor"], 2, {"alpha": 16.0, "loss_lr_mult": 10.0, "lr": 2e-3})
    folder = checkpoint_dir(cfg.storage, spec.key)
    folder.child("trial.pt").write_bytes(b"weights")
    trial = _trial(spec, {"map_at_r": 0.25, "epoch": 2, "proxy_abs_cos": 0.1, "time_this_iter_s": 3.0})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, trial.last_result)
    callback.on_trial_complete(0, [], trial)

    (start, start_args, start_kwargs), (log, log_args, log_kwargs), (end, end_args, end_kwargs) = tracker.calls
    assert start == "start_trial" and log == "log_metrics" and end == "end_trial"
    key, loss, stage, params, run_name, resolved = start_args
    assert (key, loss, stage, run_name) == ("proxy_anchor/2", "proxy_anchor", Stage.SEARCH, "proxy_anchor-2")
    assert params == spec.params and resolved["loss_params"]["alpha"] == 16.0 and resolved["train"]["lr"] == 2e-3
    assert start_kwargs["tags"][TAG_LR] == "0.002" and float(start_kwargs["tags"][TAG_LOSS_LR]) == pytest.approx(0.02)
    assert start_kwargs["tags"][TAG_TRIAL_METRICS] == "proxy_abs_cos"
    assert "lr" in start_kwargs["tags"][TAG_LOG_PARAMS].split(",")
    assert log_args == ("proxy_anchor/2", {"map_at_r": 0.25, "proxy_abs_cos": 0.1}) and log_kwargs == {"step": 2}
    assert end_args == ("proxy_anchor/2", State.COMPLETE) and end_kwargs == {"error": None}
    assert not folder.exists()  # the checkpoint of an ended trial is deleted


def test_callback_fails_a_diverged_trial_with_its_reason_and_tags_no_loss_lr_without_parameters(cfg, spaces):
    tracker = FakeTracker()
    callback = TrackingCallback(tracker, cfg, spaces)
    spec = search_spec(cfg, spaces["multi_similarity"], 0, {})
    trial = _trial(spec, {FAILED: "NonFiniteLossError: loss is nan", "epoch": 1})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, trial.last_result)  # not a metric: nothing logged
    callback.on_trial_complete(0, [], trial)
    assert [c[0] for c in tracker.calls] == ["start_trial", "end_trial"]
    assert TAG_LOSS_LR not in tracker.calls[0][2]["tags"]
    assert tracker.calls[1][1:] == (("multi_similarity/0", State.FAIL), {"error": "NonFiniteLossError: loss is nan"})


def test_callback_attaches_a_final_runs_embeddings_and_keeps_a_raised_trials_trace(cfg, spaces, tmp_path):
    tracker = FakeTracker()
    callback = TrackingCallback(tracker, cfg, spaces)
    spec = final_spec(cfg, spaces["multi_similarity"], 0, {}, seed=1, fold=None)
    embeddings_file(cfg.storage, spec.key).write_bytes(b"npz")
    trace = tmp_path / "error.txt"
    trace.write_text("Traceback ...\nRuntimeError: worker died")
    callback.on_trial_error(0, [], _trial(spec, {"epoch": 1}, error_file=str(trace)))
    names = [c[0] for c in tracker.calls]
    assert names == ["start_trial", "log_file", "end_trial"]
    assert tracker.calls[1][1] == ("multi_similarity/final/0/s1", EMBEDDINGS_ARTIFACT, b"npz")
    assert tracker.calls[2][1] == ("multi_similarity/final/0/s1", State.FAIL)
    assert tracker.calls[2][2]["error"].endswith("RuntimeError: worker died")
    assert tracker.calls[0][1][2] == Stage.FINAL and tracker.calls[0][1][3]["seed"] == 1


def test_a_trial_run_logs_every_setting_as_dotted_params_beside_its_sampled_ones(mlflow_db, cfg, spaces, tmp_path):
    """The naming rule: sampled hyperparameters (the loss's and the shared ``lr``) and a final run's seed
    under their own dot-free names, every setting as ``<section>.<key>``; secrets never logged."""
    uri = f"sqlite:///{mlflow_db}"
    secret = "postgresql://user:hunter2@db:5432/optuna"
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": SecretStr(secret)})})
    tracker = StudyTracker("settings", uri)
    tracker.start(cfg.public_dump(), "map_at_r")
    callback = TrackingCallback(tracker, cfg, spaces)
    space = spaces["proxy_anchor"]
    point = {"alpha": 16.0, "loss_lr_mult": 10.0, "lr": 2e-3}
    for spec in (search_spec(cfg, space, 2, point), final_spec(cfg, space, 2, point, seed=1, fold=None)):
        callback.on_trial_start(0, [], _trial(spec))
        params = tracker.find_trial(str(spec.key)).data.params
        bare = {k: v for k, v in params.items() if "." not in k}
        assert bare == {k: str(v) for k, v in spec.params.items()}  # what analysis reads as hyperparameters
        assert (params["loss.alpha"], params["loss.delta"], params["train.lr"]) == ("16.0", "0.1", "0.002")
        assert (params["train.loss_lr_mult"], params["train.epochs"], params["train.optimizer"]) == (
            "10.0",
            "2",
            "adamw",
        )
        assert (params["model.backbone"], params["model.embedding_dim"]) == ("test_resnet", "16")
        assert (params["dataset.name"], params["dataset.options.num_classes"]) == ("synthetic", "16")
        assert (params["resources.cpu"], params["trial.seed"]) == ("1.0", str(spec.seed))
        assert {k.split(".")[0] for k in params if "." in k} == {
            "loss",
            "train",
            "model",
            "dataset",
            "resources",
            "trial",
        }
        assert not [v for v in params.values() if "hunter2" in v]
    assert params["seed"] == "1" and "trial.fold" not in params


def test_resume_repair_closes_runs_a_killed_driver_left_running(mlflow_db, cfg, tmp_path):
    uri = f"sqlite:///{mlflow_db}"
    tracker = StudyTracker("repair", uri)
    parent = tracker.start({}, "map_at_r")
    key = TrialKey.search("multi_similarity", 0)
    tracker.start_trial(str(key), "multi_similarity", Stage.SEARCH, {"alpha": 2.0}, key.run_name)
    tracker.log_metrics(str(key), {"map_at_r": 0.1}, step=1)  # the driver died after epoch 1 was logged
    history = [{"epoch": 1, "map_at_r": 0.1}, {"epoch": 2, "map_at_r": 0.2, "time_this_iter_s": 1.0}]
    save_state(checkpoint_dir(cfg.storage, key), {"history": history})
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.2))

    again = StudyTracker("repair", uri)
    again.resume(parent)
    close_finished_runs(again, cfg, "multi_similarity", study.trials)
    run = again.find_trial(str(key))
    client = MlflowClient(uri)
    assert run.data.tags[TAG_STATE] == "COMPLETE" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "map_at_r")] == [(1, 0.1), (2, 0.2)]
    assert "time_this_iter_s" not in run.data.metrics


def test_a_search_trials_worker_sends_at_once_every_epoch_its_asha_decides_at(cfg):
    """``rung_epochs`` (the epochs a worker's Reporter sends at once) holds every rung of the ASHA that
    PerLossASHA builds (``loss_asha``), read from Ray's own scheduler, so ASHA sees each rung's result as it
    would if every epoch were sent (Ray computes its rung count in floats and may drop the last one: 243 =
    3^5)."""
    from study.schedule import loss_asha, rung_epochs

    def study(grace, factor, max_t):
        search = cfg.search.model_copy(update={"grace_period": grace, "reduction_factor": factor})
        return cfg.model_copy(update={"search": search, "train": cfg.train.model_copy(update={"epochs": max_t})})

    for grace, factor, max_t in itertools.product((1, 2, 3), (2, 3, 4), (1, 5, 8, 9, 27, 100, 243)):
        if grace <= max_t:
            shape = study(grace, factor, max_t)
            assert {milestone for milestone, _ in loss_asha(shape)._brackets[0]._rungs} <= rung_epochs(shape)
    assert rung_epochs(study(1, 2, 20)) == {1, 2, 4, 8, 16} and rung_epochs(study(3, 3, 100)) == {3, 9, 27, 81}


def test_the_cluster_line_says_how_many_slots_the_searches_leave_waiting(cfg, spaces):
    from study.schedule import StudySchedule, cluster_line

    study = optuna.create_study(direction="maximize")
    searches = {"multi_similarity": 6, "proxy_anchor": 1, "soft_triple": 0}  # trials left: 4 + 1 + 0 at once
    schedule = StudySchedule(
        {loss: (_searcher(cfg, spaces["multi_similarity"], study), left) for loss, left in searches.items()}, list, 4
    )
    assert schedule.search_width == 5
    line = cluster_line(64, 64, schedule.search_width, 4)
    assert line.startswith("cluster: 64 slots, up to 64 trials at once; the searches can run only 5")
    assert "so 59 wait for final runs" in line and "search.max_concurrent=4" in line
    assert cluster_line(8, 4, 5, 4) == "cluster: 8 slots, up to 4 trials at once"  # the searches fill the limit
    assert cluster_line(8, 8, 0, 4) == "cluster: 8 slots, up to 8 trials at once"  # resumed: no search left


def test_the_study_schedule_interleaves_losses_and_runs_search_trials_ahead_of_final_runs(cfg, spaces):
    from ray.tune.search import Searcher

    from study.schedule import StudySchedule

    def searcher(loss):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
        return _searcher(cfg, spaces[loss], study), 2

    finals_asked = []

    def finals(loss):
        finals_asked.append(loss)
        return [final_spec(cfg, spaces[loss], 0, {}, seed=s, fold=None) for s in (1, 2)]

    schedule = StudySchedule(
        {"multi_similarity": searcher("multi_similarity"), "proxy_anchor": searcher("proxy_anchor")}, finals, 1
    )
    key = lambda suggestion: str(suggestion[SPEC].key)  # noqa: E731
    assert key(schedule.suggest("a")) == "multi_similarity/0"
    assert key(schedule.suggest("b")) == "proxy_anchor/0"  # side by side, one trial each at a time
    assert not schedule.left_a_slot_idle
    assert schedule.suggest("c") is None and schedule.left_a_slot_idle  # both at their limit: wait
    schedule.on_trial_complete("a", {"map_at_r": 0.3, "epoch": 2})
    assert key(schedule.suggest("c")) == "multi_similarity/1"
    schedule.on_trial_complete("c", {"map_at_r": 0.2, "epoch": 1})
    assert finals_asked == []  # nothing final before its search ended
    # multi_similarity's search has ended; proxy_anchor's is at its limit: the final runs take the slot
    assert key(schedule.suggest("d")) == "multi_similarity/final/0/s1"
    assert finals_asked == ["multi_similarity"]
    schedule.on_trial_complete("b", {"map_at_r": 0.1, "epoch": 2})
    # proxy_anchor's last search trial goes ahead of the final run left: its own final runs wait for it
    assert [key(schedule.suggest(t)) for t in "ef"] == ["proxy_anchor/1", "multi_similarity/final/0/s2"]
    assert schedule.suggest("g") is None  # proxy_anchor's search has not ended
    schedule.on_trial_complete("e", {"map_at_r": 0.1, "epoch": 2})
    assert [key(schedule.suggest(t)) for t in "gh"] == ["proxy_anchor/final/0/s1", "proxy_anchor/final/0/s2"]
    # nothing more to suggest (so Ray Tune frees the worker it keeps for one), final runs still in flight
    assert schedule.suggest("i") == Searcher.FINISHED and not schedule.finished
    for trial_id in "dfgh":
        schedule.on_trial_complete(trial_id, {"map_at_r": 0.1, "epoch": 2})
    assert schedule.finished
    states = {t.number: t.state.name for t in schedule._searchers["multi_similarity"].study.trials}
    assert states == {0: "COMPLETE", 1: "PRUNED"}  # each told to its own loss's Optuna study


def test_waiting_final_runs_go_longest_first_by_their_losss_search_epochs(cfg, spaces):
    """LPT: final runs released together go in order of epochs × their loss's seconds per search epoch,
    whatever order their searches ended in; a loss searched by an earlier driver counts as the mean."""
    from study.schedule import StudySchedule

    def searcher(loss):
        return _searcher(cfg, spaces[loss], optuna.create_study(direction="maximize")), 1

    finals = lambda loss: [final_spec(cfg, spaces[loss], 0, {}, seed=s, fold=None) for s in (1, 2)]  # noqa: E731
    schedule = StudySchedule(
        {"multi_similarity": searcher("multi_similarity"), "proxy_anchor": searcher("proxy_anchor")}, finals, 1
    )
    key = lambda suggestion: str(suggestion[SPEC].key)  # noqa: E731
    assert [key(schedule.suggest(t)) for t in "ab"] == ["multi_similarity/0", "proxy_anchor/0"]
    schedule.on_trial_complete("a", {"map_at_r": 0.3, "epoch": 2, "time_total_s": 2.0})  # 1 s per epoch
    schedule.on_trial_complete("b", {"map_at_r": 0.3, "epoch": 1, "time_total_s": 3.0})  # pruned: 3 s per epoch
    order = [key(schedule.suggest(t)) for t in "cdef"]
    assert order == [f"proxy_anchor/final/0/s{s}" for s in (1, 2)] + [f"multi_similarity/final/0/s{s}" for s in (1, 2)]

    resumed = StudySchedule({"multi_similarity": (None, 0), "proxy_anchor": searcher("proxy_anchor")}, finals, 1)
    resumed.suggest("a")
    resumed.on_trial_complete("a", {"map_at_r": 0.3, "epoch": 2, "time_total_s": 4.0})
    assert resumed._expected_s(finals("multi_similarity")[0]) == resumed._expected_s(finals("proxy_anchor")[0]) > 0


def test_an_unreadable_image_stops_the_schedule_and_leaves_every_trial_unfinished(cfg, spaces):
    """A trial that met an unreadable image ends the study: nothing more is suggested, Ray Tune is told
    to stop the rest (StopOnError), and neither Optuna nor MLflow nor the terminal hears of its end."""
    from ray.tune.search import Searcher

    from study.data.images import UnreadableImageError
    from study.progress import StudyProgress
    from study.progress_callback import ProgressCallback
    from study.progress_view import ProgressView
    from study.schedule import StopOnError, StudySchedule

    study = optuna.create_study(direction="maximize")
    schedule = StudySchedule({"multi_similarity": (_searcher(cfg, spaces["multi_similarity"], study), 3)}, list, 2)
    stopper = StopOnError(schedule)
    a, _ = schedule.suggest("a"), schedule.suggest("b")
    assert not stopper.stop_all()
    unreadable = {UNREADABLE: "/data/102.class/1.jpg: cannot read image (not a jpeg)"}
    tracker, lines = FakeTracker(), []
    view = ProgressView(StudyProgress("map_at_r", ["multi_similarity"]), console=None)
    view.say = lines.append
    for callback in (TrackingCallback(tracker, cfg, spaces), ProgressCallback(view, "map_at_r")):
        trial = _trial(a[SPEC], unreadable)
        callback.on_trial_result(0, [], trial, unreadable)
        callback.on_trial_complete(0, [], trial)
    schedule.on_trial_complete("a", unreadable)
    assert tracker.calls == [] and lines == []  # its run stays open, and nothing says it ended
    assert isinstance(schedule.error, UnreadableImageError) and str(schedule.error) == unreadable[UNREADABLE]
    assert stopper.stop_all() and schedule.suggest("c") == Searcher.FINISHED and not schedule.finished
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]  # both run again on resume


def test_per_loss_asha_never_compares_losses_and_never_stops_a_final_run(cfg, spaces):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from study.schedule import PerLossASHA

    def asha():
        return ASHAScheduler(
            time_attr="epoch", metric="map_at_r", mode="max", max_t=4, grace_period=1, reduction_factor=2
        )

    scheduler = PerLossASHA(asha)
    trials = {
        name: _trial(spec)
        for name, spec in {
            "ms_good": search_spec(cfg, spaces["multi_similarity"], 0, {}),
            "ms_bad": search_spec(cfg, spaces["multi_similarity"], 1, {}),
            "pa": search_spec(cfg, spaces["proxy_anchor"], 0, {}),
            "final": final_spec(cfg, spaces["multi_similarity"], 0, {}, seed=1, fold=None),
        }.items()
    }
    for trial in trials.values():
        trial.trial_id = str(id(trial))
        scheduler.on_trial_add(None, trial)
    decide = lambda name, value: scheduler.on_trial_result(None, trials[name], {"epoch": 1, "map_at_r": value})  # noqa: E731
    assert decide("ms_good", 0.5) == TrialScheduler.CONTINUE
    assert decide("ms_bad", 0.1) == TrialScheduler.STOP  # below its own loss's rung
    assert decide("pa", 0.01) == TrialScheduler.CONTINUE  # first of its loss: not compared with the others
    assert decide("final", 0.0) == TrialScheduler.CONTINUE


def test_a_deterministic_error_fails_the_trial_with_its_trace_and_anything_else_is_left_to_retries(
    cfg, spaces, monkeypatch
):
    import dataclasses

    from study import train, worker

    reported = []
    monkeypatch.setattr(worker.tune, "report", reported.append)
    spec = search_spec(cfg, spaces["multi_similarity"], 0, {})
    bad = dataclasses.replace(spec, loss_kwargs={**spec.loss_kwargs, "no_such_argument": 1})
    worker.run_spec({SPEC: bad}, cfg=cfg, storage=cfg.storage)  # returns: Ray Tune sees it end, no retry
    assert len(reported) == 1 and "Traceback" in reported[0][FAILED] and "no_such_argument" in reported[0][FAILED]
    assert Outcome.of(bad, reported[0], "map_at_r").state == State.FAIL

    def lost(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")  # may pass on another worker

    monkeypatch.setattr(train, "run_trial", lost)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        worker.run_spec({SPEC: spec}, cfg=cfg, storage=cfg.storage)


def test_an_ablation_changes_only_the_claims_factor_to_the_arm_the_best_point_lacks(cfg, spaces):
    from study.claims import BY_ID
    from study.spec import ablation_spec

    space = spaces["multi_similarity"]
    best = space.to_optuna({**space.defaults(), "alpha": 3.0, "mining": True, "positive": "all"})
    final = final_spec(cfg, space, 7, best, seed=1, fold=None)
    mining = ablation_spec(cfg, space, 7, best, BY_ID["multi_similarity.mining"], seed=1)
    assert str(mining.key) == "multi_similarity/ablation/7/mining/s1"
    assert (mining.claim, mining.arm) == ("multi_similarity.mining", "alternative")  # the best has the paper's
    assert mining.loss_kwargs == {**final.loss_kwargs, "mining": False}
    assert mining.train == final.train and mining.seed == final.seed and mining.fold is None
    easy = ablation_spec(cfg, space, 7, best, BY_ID["multi_similarity.easy_positives"], seed=2)
    assert (easy.arm, easy.loss_kwargs["positive"], easy.params["seed"]) == ("paper", "easy", 2)


def test_claims_apply_to_the_studys_losses_whose_factor_is_searched():
    from study.claims import CLAIMS, claims_for

    assert [c.id for c in claims_for({"multi_similarity": ["alpha", "mining"], "normalized_softmax": ["scale"]})] == [
        "multi_similarity.mining"
    ]
    soft_triple = next(c for c in CLAIMS if c.id == "soft_triple.centers")
    assert soft_triple.arms({"centers_per_class": 4}, 10) == (4, 1)  # the best K is the paper's arm
    assert soft_triple.arms({"centers_per_class": 1}, 10) == (10, 1)  # K = 1 won the search: the default stands in
    assert soft_triple.ablated({"centers_per_class": 1}, 10) == ("paper", 10)
    assert soft_triple.ablated({"centers_per_class": 4}, 10) == ("alternative", 1)
