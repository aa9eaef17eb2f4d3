"""The ``dml-study`` command line: ``check`` a study file and see what it would run, ``run`` a study,
``resume`` one whose driver died, rebuild its ``report`` from MLflow, ``compare`` several studies in
one table; ``--version``."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from study import package_version
from study.storage import Storage

if TYPE_CHECKING:
    import pandas as pd

    from study.config import StudyConfig
    from study.search_space import Param

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

SET_HELP = "Override a value of the study file; repeat it for several: --set train.epochs=2 --set seed=1"
RUN_TRACKING_HELP = (
    "MLflow tracking URI for this invocation; wins over $MLFLOW_TRACKING_URI, which wins over the study's tracking.uri"
)
READ_TRACKING_HELP = "Default: $MLFLOW_TRACKING_URI, else MLflow's"
VERBOSE_HELP = "Also show Ray's, Optuna's and MLflow's own output (Ray Tune's status tables, the workers' lines)"


def _fail(message: str) -> None:
    typer.echo(f"dml-study: {message}", err=True)
    raise typer.Exit(2)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"dml-study {package_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit"),
    ] = False,
) -> None:
    """Hyperparameter studies of deep-metric-learning losses: Ray Tune + Optuna trials tracked in MLflow."""


def _use_tracking_uri(uri: str | None) -> None:
    """``--tracking-uri`` of ``run`` and ``resume``: set as this process's ``MLFLOW_TRACKING_URI``.

    Every part of a run resolves the URI with :func:`study.tracking.resolve_tracking_uri` (command
    line, else environment, else the study's ``tracking.uri``): the tracking-server check, the
    parent-run check of a resume, the driver's tracker in :mod:`study.stages`, the tables. Setting it
    once here, before any of them, makes them all agree; like the environment variable it is never
    written to the study's ``config.yaml``."""
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri


@app.command()
def check(
    study_file: Annotated[Path, typer.Argument(help="Study YAML, e.g. search_spaces/quickstart.yaml")],
    set_: Annotated[list[str], typer.Option("--set", help=SET_HELP)] = [],  # noqa: B006
    tracking_uri: Annotated[str | None, typer.Option(help=RUN_TRACKING_HELP)] = None,
) -> None:
    """Check a study file as `run` would and show what it would run, writing nothing.

    Prints the resolved study (secrets redacted), each loss's search trials with their ranges, its final
    and ablation runs, and the total. Starts no Ray and contacts no tracking server."""
    from study.config import ConfigError, load_study

    try:
        cfg = load_study(study_file, set_)
    except ConfigError as exc:
        _fail(str(exc))
    _preflight(cfg)  # what run decides before Ray starts
    if cfg.storage.is_local and _holds_anything(cfg.storage):  # an object store would be contacted: not checked
        typer.echo(f"warning: {cfg.storage} exists: run needs --resume to continue it or --new to replace it", err=True)
    typer.echo(_describe(cfg, tracking_uri))


@app.command()
def run(
    study_file: Annotated[Path, typer.Argument(help="Study YAML, e.g. search_spaces/quickstart.yaml")],
    set_: Annotated[list[str], typer.Option("--set", help=SET_HELP)] = [],  # noqa: B006
    new: Annotated[bool, typer.Option("--new", help="Replace an existing study folder")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the study in an existing folder")] = False,
    tracking_uri: Annotated[str | None, typer.Option(help=RUN_TRACKING_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help=VERBOSE_HELP)] = False,
) -> None:
    """Run a study: search every loss with Ray Tune + Optuna, log to MLflow, print the table.

    The terminal shows each run as it starts (its hyperparameters) and ends, and per loss the runs
    done of each stage, the best trial so far, elapsed time and an ETA."""
    from study.config import ConfigError, load_study

    _use_tracking_uri(tracking_uri)
    _quiet(verbose)
    try:
        cfg = load_study(study_file, set_)
    except ConfigError as exc:
        _fail(str(exc))
    if new and resume:
        _fail("--new and --resume exclude each other")
    if _holds_anything(cfg.storage) and not (new or resume):
        _fail(f"{cfg.storage} already exists: pass --resume to continue it or --new to replace it")
    if resume:
        _resume(cfg.storage, cfg, verbose)
        return
    _check_tracking(cfg)
    _preflight(cfg)
    _run(cfg, resume=False, replace=new, verbose=verbose)


@app.command("resume")
def resume_(
    location: Annotated[
        str, typer.Argument(help="The study's folder: runs/quickstart, or s3://bucket/runs/quickstart")
    ],
    tracking_uri: Annotated[str | None, typer.Option(help=RUN_TRACKING_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help=VERBOSE_HELP)] = False,
) -> None:
    """Continue a study whose driver died: finished trials are kept, unfinished ones resume."""
    _use_tracking_uri(tracking_uri)
    _quiet(verbose)
    _resume(Storage.at(location), None, verbose)


def _quiet(verbose: bool) -> None:
    """Optuna's and MLflow's log lines off, unless ``--verbose`` (:mod:`study.quiet`); before the
    first of them could print (the tracking store is created by the checks)."""
    if not verbose:
        from study.quiet import quiet_libraries

        quiet_libraries()


def _resume(storage: Storage, given, verbose: bool = False) -> None:
    """Resume from the study folder's own config.yaml; a study file given with it must agree.

    config.yaml holds secrets (database and tracking URLs) redacted: a study file given brings the
    real values; otherwise each redacted one comes from its environment variable
    (``DML_STUDY_OPTUNA_STORAGE``, ``MLFLOW_TRACKING_URI``)."""
    from study.config import ConfigError, parse_study, restore_secrets
    from study.vocab import CONFIG_FILE, PARENT_RUN_FILE

    if not _exists(storage.child(PARENT_RUN_FILE)):
        _fail(f"{storage}: not a study folder that can be resumed (no {PARENT_RUN_FILE}; expected runs/<study>)")
    # a local folder may have been reached from another working directory; a URI is absolute
    overrides = [f"output_dir={Path(storage.root).parent}"] if storage.is_local else []
    source = f"{storage}/{CONFIG_FILE}"
    try:
        cfg = parse_study(storage.child(CONFIG_FILE).read_text(), source, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if given is not None:  # compared without secrets: the saved ones are redacted
        saved, now = ({k: v for k, v in c.public_dump().items() if k != "output_dir"} for c in (cfg, given))
        changed = [k for k in saved if saved[k] != now[k]]
        if changed:
            _fail(f"{storage}: the study file differs from the study being resumed in '{changed[0]}'")
        cfg = given.model_copy(update={"output_dir": cfg.output_dir})  # the file's real secrets
    else:
        try:
            cfg = restore_secrets(cfg, os.environ)
        except ConfigError as exc:
            _fail(f"{source}: {exc}, or resume with the study file: dml-study run STUDY_FILE --resume")
    _check_tracking(cfg)
    _preflight(cfg, parent_id=storage.child(PARENT_RUN_FILE).read_text().strip())
    _run(cfg, resume=True, verbose=verbose)


def _describe(cfg: StudyConfig, tracking_uri: str | None) -> str:
    """``check``'s report: the resolved study as YAML (what ``config.yaml`` gets: secrets redacted),
    then what ``run`` would train, loss by loss, counted as :mod:`study.stages` schedules it (every
    search and final run assumed to happen), and the tracking URI it would log to."""
    import yaml

    from study.claims import ablation_plan
    from study.config import search_spaces, shared_space

    seeds, folds = cfg.final.seeds, cfg.dataset.folds if cfg.final.train_on == "folds" else 1
    per_fold = f" × {folds} folds, each on its fold's training classes" if folds > 1 else ", on all training classes"
    trained_on = f"{seeds} seeds{per_fold}"
    final_text = f"{trained_on}; {cfg.final.epochs or cfg.train.epochs} epochs" if seeds else "final.seeds: 0"
    shared = shared_space(cfg)
    lines = [f"# {cfg.name}: the resolved study (secrets redacted), as run saves it in {cfg.storage}/config.yaml"]
    lines += [*yaml.safe_dump(cfg.public_dump(), sort_keys=False).splitlines(), "", "# what run would train"]
    counts = {"search": 0, "final": 0, "ablation": 0}
    for loss, space in search_spaces(cfg).items():
        claims, ablation_text = ablation_plan(
            loss, space.params, ablations=cfg.ablations, seeds=seeds, train_on=cfg.final.train_on
        )
        ablations = len(claims) * seeds
        counts["search"] += cfg.search.trials_per_loss
        counts["final"] += seeds * folds
        counts["ablation"] += ablations
        lines.append(
            f"{loss}: {cfg.search.trials_per_loss} search trials (up to {cfg.train.epochs} epochs each; ASHA stops "
            f"weak ones early), {len(space.params)} searched hyperparameters:"
        )
        width = max(map(len, space.params), default=0)
        for name, param in space.params.items():
            where = " [search.train]" if name in shared else ""
            lines.append(f"  {name:<{width}}  {_describe_param(param)}{where}")
        lines.append(f"  final runs: {seeds * folds} ({final_text})")
        lines.append(f"  ablation runs: {ablations} ({ablation_text})")
    ensembles = f", {seeds * len(cfg.search.losses)} fold ensembles" if folds > 1 and seeds else ""
    lines.append(
        f"total: {sum(counts.values())} training runs ({', '.join(f'{n} {k}' for k, n in counts.items())}), "
        f"plus the untrained baseline{ensembles} evaluated once"
    )
    lines.append(f"tracking: {_tracking_text(cfg, tracking_uri)}")
    return "\n".join(lines)


def _describe_param(param: Param) -> str:
    """One searched hyperparameter as ``check`` shows it: its range or choices, scale, default, condition."""
    if param.type == "categorical":
        text = f"one of {', '.join(map(_text, param.choices))}"
    else:
        text = f"{param.type} in [{_text(param.low)}, {_text(param.high)}]"
        text += ", log scale" if param.log else ""
        text += f", step {_text(param.step)}" if param.step is not None else ""
        text += ", or exactly 0" if param.zero else ""
    text += f"; default {_text(param.default)}"
    for dep, allowed in param.when.items():
        text += f"; only when {dep} is {' or '.join(map(_text, allowed))}"
    return text


def _text(value: Any) -> str:
    """A value as the study and space files write it (YAML's true/false, numbers without trailing zeros)."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _tracking_text(cfg: StudyConfig, tracking_uri: str | None) -> str:
    """The tracking URI ``run`` would log to (credentials redacted) and where it comes from."""
    import mlflow

    from study.redaction import redact
    from study.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri, tracking_uri)
    if tracking_uri:
        source = "--tracking-uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        source = "MLFLOW_TRACKING_URI"
    elif uri:
        source = "the study's tracking.uri"
    else:
        uri, source = mlflow.get_tracking_uri(), "MLflow's default"
    return f"{redact(uri)} ({source})"


def _exists(storage: Storage) -> bool:
    try:
        return storage.exists()
    except OSError as exc:  # an unreachable object store, missing credentials, ...
        _fail(f"{storage}: cannot read the study storage ({str(exc).splitlines()[0]})")


def _preflight(cfg, parent_id: str | None = None) -> None:
    """What can be decided before Ray starts (:mod:`study.preflight`): exit 2 with one line, or go on
    after printing the warnings."""
    from study.data.images import DatasetLayoutError
    from study.preflight import PreflightError, RayAddressError, check_parent_run, check_study, ray_address
    from study.tracking import resolve_tracking_uri

    try:
        ray_address()
        if parent_id is not None:
            check_parent_run(resolve_tracking_uri(cfg.tracking.uri), parent_id, str(cfg.storage))
        for warning in check_study(cfg):
            typer.echo(f"warning: {warning}", err=True)
    except (PreflightError, DatasetLayoutError, RayAddressError) as exc:
        _fail(str(exc))


def _holds_anything(storage: Storage) -> bool:
    """The study folder exists with something in it besides a lock (a driver that stopped before
    writing anything leaves its lock files)."""
    from study.lock import FLOCK_FILE, LOCK_FILE

    if not _exists(storage):
        return False
    return any(info.base_name not in (LOCK_FILE, FLOCK_FILE) for info in storage.list())


def _check_tracking(cfg) -> None:
    from study.tracking import resolve_tracking_uri

    _check_server(resolve_tracking_uri(cfg.tracking.uri))


def _check_server(uri: str | None) -> None:
    """An http(s) tracking server answers within seconds, else exit 2 with one line (MLflow's own
    client would retry for minutes)."""
    from study.tracking import check_tracking_server

    try:
        check_tracking_server(uri)
    except ConnectionError as exc:
        _fail(str(exc))


def _run(cfg, resume: bool, replace: bool = False, verbose: bool = False) -> None:
    """Run or resume the study while holding its folder's lock: one driver per study. A new run
    (``--new``) first empties the folder, under the lock, so a live study is never deleted. Once it
    finished: the tables, and the headline result on the parent run (:func:`_headline`)."""
    from analysis.runs import load_runs
    from analysis.tables import write_tables
    from study.data.images import UnreadableImageError
    from study.journal import JournalCorruptError
    from study.lock import FLOCK_FILE, LOCK_FILE, StudyLock, StudyLockedError
    from study.preflight import PreflightError, RayAddressError
    from study.stages import StudyInterrupted, run_study
    from study.tracking import resolve_tracking_uri
    from study.tracking_writer import TrackingError

    lock = StudyLock(cfg.storage)
    try:
        lock.acquire()
    except StudyLockedError as exc:
        _fail(str(exc))
    try:
        if replace:
            cfg.storage.clear(keep=(LOCK_FILE, FLOCK_FILE))
        tracker = run_study(cfg, resume=resume, verbose=verbose)
    except (JournalCorruptError, PreflightError, RayAddressError) as exc:  # raised before anything is written
        _fail(str(exc))
    except StudyInterrupted:
        typer.echo(
            f"dml-study: interrupted; finished trials are kept, unfinished ones go on from their last epoch "
            f"with: dml-study resume {cfg.storage}",
            err=True,
        )
        raise typer.Exit(130) from None
    except UnreadableImageError as exc:  # met by a trial before it trains (or the baseline); fix it, then --resume
        _fail(f"{exc}; fix or remove it, then run again with --resume")
    except TrackingError as exc:  # mid-study: what MLflow holds is kept, the rest is logged again on resume
        typer.echo(f"dml-study: {exc}; the study stopped; fix it, then: dml-study resume {cfg.storage}", err=True)
        raise typer.Exit(1) from None
    finally:
        if not _holds_anything(cfg.storage):  # stopped before writing anything: leave no trace
            cfg.storage.delete()
        lock.release()
    runs = load_runs(cfg.name, resolve_tracking_uri(cfg.tracking.uri))
    markdown = write_tables(runs, cfg.storage)[0]
    tracker.log_headline(cfg.search.objective, _headline(runs, cfg.search.objective))
    typer.echo(markdown)
    typer.echo(f"results: {cfg.storage}/results.md, results.csv; browse the runs with `mlflow ui`")
    typer.echo(f"the HTML report (tables, plots, hyperparameter analysis): dml-study report {cfg.name}")


def _headline(runs: pd.DataFrame, objective: str) -> dict[str, float]:
    """Each loss's mean test ``objective`` over its COMPLETE final runs (stale ones are not in
    ``runs``), as the final table computes it: per seed the mean over its runs (its fold models),
    then the mean over seeds. Empty when the final stage did not run."""
    from analysis.tables import mean_ci, seed_means
    from study.vocab import Stage, State, as_test_name

    tested = as_test_name(objective)  # final runs log their test scores so
    if tested not in runs:
        return {}
    final = runs[(runs["stage"] == Stage.FINAL) & (runs["state"] == State.COMPLETE)]
    return {
        loss: mean_ci(seed_means(group, [tested])[tested].to_numpy(float))[0]
        for loss, group in final.groupby("loss", sort=False)
    }


@app.command()
def report(
    study: Annotated[str, typer.Argument(help="Study name (the MLflow experiment)")],
    tracking_uri: Annotated[str | None, typer.Option(help=READ_TRACKING_HELP)] = None,
    out: Annotated[str | None, typer.Option(help="Output folder or URI (default: runs/<study>)")] = None,
) -> None:
    """Rebuild a study's tables and its HTML report from MLflow alone; log them to its parent run."""
    from analysis.study_report import ARTIFACTS, write_report
    from study.quiet import no_progress_bars
    from study.tracking import StudyNotFoundError, resolve_tracking_uri

    no_progress_bars()
    uri = resolve_tracking_uri(None, tracking_uri)
    _check_server(uri)
    try:
        markdown, html = write_report(study, uri, Storage.at(out or f"runs/{study}"))
    except StudyNotFoundError as exc:
        _fail(str(exc))
    typer.echo(markdown)
    typer.echo(f"report: {html} (also in MLflow: the study's parent run, artifacts {ARTIFACTS}/)")


@app.command()
def compare(
    studies: Annotated[list[str], typer.Argument(help="Two or more study names (MLflow experiments)")],
    tracking_uri: Annotated[str | None, typer.Option(help=READ_TRACKING_HELP)] = None,
    out: Annotated[str, typer.Option(help="Output folder or URI")] = "runs/compare",
) -> None:
    """Several studies in one table (rows per study, dataset and loss; best values marked per study)."""
    from analysis.runs import load_runs
    from analysis.tables import IncomparableStudiesError, write_tables
    from study.tracking import StudyNotFoundError, resolve_tracking_uri

    names = list(dict.fromkeys(studies))
    if len(names) < 2:
        _fail("compare needs two or more different studies; for one, use `dml-study report STUDY`")
    uri = resolve_tracking_uri(None, tracking_uri)
    _check_server(uri)
    try:
        markdown, _, _ = write_tables(load_runs(names, uri), Storage.at(out))
    except (StudyNotFoundError, IncomparableStudiesError) as exc:
        _fail(str(exc))
    typer.echo(markdown)
    typer.echo(f"tables: {Storage.at(out).child('results.md')} (and .csv, .tex, .html; final.* for the final stage)")


def main() -> None:
    """The ``dml-study`` command; its exit skips the interpreter's teardown (:func:`_exit`)."""
    try:
        app()
    except SystemExit as exc:  # how typer ends every command, a failed one included
        _exit(exc.code)


def _exit(code: int | str | None) -> NoReturn:
    """Exit as ``sys.exit(code)`` would, in the order the interpreter's own exit goes: threading's
    shutdown (its exit hooks, such as the one that ends idle thread pools, then the non-daemon threads
    joined), the ``atexit`` handlers (Ray's shutdown, logging's flush, ...), stdout and stderr flushed.
    But not the teardown that follows, which frees every object of every module one by one: 2.6–5.5 s with
    torch, timm, MLflow and pydantic loaded (benchmarks/RESULTS.md), for nothing, the process's memory
    being returned whole."""
    threading._shutdown()  # what Py_FinalizeEx calls first (joining threads alone would wait on idle pools forever)
    atexit._run_exitfuncs()
    if code is None or isinstance(code, int):
        status = code or 0
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader gone (`| head`), a stream closed
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
