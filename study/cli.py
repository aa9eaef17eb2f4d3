"""The ``dml-study`` command line: ``run`` a study, ``resume`` one whose driver died, rebuild its
``report`` from MLflow, ``compare`` several studies in one table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from study.storage import Storage

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _fail(message: str) -> None:
    typer.echo(f"dml-study: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    study_file: Annotated[Path, typer.Argument(help="Study YAML, e.g. search_spaces/quickstart.yaml")],
    set_: Annotated[list[str], typer.Option("--set", help="Override a value: --set train.epochs=2")] = [],  # noqa: B006
    new: Annotated[bool, typer.Option("--new", help="Replace an existing study folder")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the study in an existing folder")] = False,
) -> None:
    """Run a study: search every loss with Ray Tune + Optuna, log to MLflow, print the table."""
    from study.config import ConfigError, load_study

    try:
        cfg = load_study(study_file, set_)
    except ConfigError as exc:
        _fail(str(exc))
    if new and resume:
        _fail("--new and --resume exclude each other")
    if _holds_anything(cfg.storage) and not (new or resume):
        _fail(f"{cfg.storage} already exists: pass --resume to continue it or --new to replace it")
    if resume:
        _resume(cfg.storage, cfg)
        return
    _check_tracking(cfg)
    _preflight(cfg)
    _run(cfg, resume=False, replace=new)


@app.command("resume")
def resume_(
    location: Annotated[
        str, typer.Argument(help="The study's folder: runs/quickstart, or s3://bucket/runs/quickstart")
    ],
) -> None:
    """Continue a study whose driver died: finished trials are kept, unfinished ones resume."""
    _resume(Storage.at(location), None)


def _resume(storage: Storage, given) -> None:
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
    _run(cfg, resume=True)


def _exists(storage: Storage) -> bool:
    try:
        return storage.exists()
    except OSError as exc:  # an unreachable object store, missing credentials, ...
        _fail(f"{storage}: cannot read the study storage ({str(exc).splitlines()[0]})")


def _preflight(cfg, parent_id: str | None = None) -> None:
    """What can be decided before Ray starts (:mod:`study.preflight`): exit 2 with one line, or go on
    after printing the warnings."""
    from study.data.images import DatasetLayoutError
    from study.preflight import PreflightError, check_parent_run, check_study
    from study.stages import RayAddressError, ray_address
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


def _run(cfg, resume: bool, replace: bool = False) -> None:
    """Run or resume the study while holding its folder's lock: one driver per study. A new run
    (``--new``) first empties the folder, under the lock, so a live study is never deleted."""
    from analysis.runs import load_runs
    from analysis.tables import write_tables
    from study.data.images import UnreadableImageError
    from study.journal import JournalCorruptError
    from study.lock import FLOCK_FILE, LOCK_FILE, StudyLock, StudyLockedError
    from study.preflight import PreflightError
    from study.stages import RayAddressError, StudyInterrupted, run_study
    from study.tracking import resolve_tracking_uri

    lock = StudyLock(cfg.storage)
    try:
        lock.acquire()
    except StudyLockedError as exc:
        _fail(str(exc))
    try:
        if replace:
            cfg.storage.clear(keep=(LOCK_FILE, FLOCK_FILE))
        run_study(cfg, say=lambda line: typer.echo(line), resume=resume)
    except (JournalCorruptError, PreflightError, RayAddressError) as exc:  # raised before anything is written
        _fail(str(exc))
    except StudyInterrupted:
        typer.echo(
            f"dml-study: interrupted; finished trials are kept, unfinished ones go on from their last epoch "
            f"with: dml-study resume {cfg.storage}",
            err=True,
        )
        raise typer.Exit(130) from None
    except UnreadableImageError as exc:  # found by the baseline, before any trial; fix it, then --resume
        _fail(f"{exc}; fix or remove it, then run again with --resume")
    finally:
        if not _holds_anything(cfg.storage):  # stopped before writing anything: leave no trace
            cfg.storage.delete()
        lock.release()
    typer.echo(write_tables(load_runs(cfg.name, resolve_tracking_uri(cfg.tracking.uri)), cfg.storage)[0])
    typer.echo(f"results: {cfg.storage}/results.md, results.csv; browse the runs with `mlflow ui`")
    typer.echo(f"the HTML report (tables, plots, hyperparameter analysis): dml-study report {cfg.name}")


@app.command()
def report(
    study: Annotated[str, typer.Argument(help="Study name (the MLflow experiment)")],
    tracking_uri: Annotated[str | None, typer.Option(help="Default: $MLFLOW_TRACKING_URI, else MLflow's")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder or URI (default: runs/<study>)")] = None,
) -> None:
    """Rebuild a study's tables and its HTML report from MLflow alone; log them to its parent run."""
    from analysis.runs import StudyNotFoundError
    from analysis.study_report import ARTIFACTS, write_report
    from study.tracking import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per download otherwise
    uri = tracking_uri or resolve_tracking_uri(None)
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
    tracking_uri: Annotated[str | None, typer.Option(help="Default: $MLFLOW_TRACKING_URI, else MLflow's")] = None,
    out: Annotated[str, typer.Option(help="Output folder or URI")] = "runs/compare",
) -> None:
    """Several studies in one table (rows per study, dataset and loss; best values marked per study)."""
    from analysis.runs import StudyNotFoundError, load_runs
    from analysis.tables import IncomparableStudiesError, write_tables
    from study.tracking import resolve_tracking_uri

    names = list(dict.fromkeys(studies))
    if len(names) < 2:
        _fail("compare needs two or more different studies; for one, use `dml-study report STUDY`")
    uri = tracking_uri or resolve_tracking_uri(None)
    _check_server(uri)
    try:
        markdown, _, _ = write_tables(load_runs(names, uri), Storage.at(out))
    except (StudyNotFoundError, IncomparableStudiesError) as exc:
        _fail(str(exc))
    typer.echo(markdown)
    typer.echo(f"tables: {Storage.at(out).child('results.md')} (and .csv, .tex, .html; final.* for the final stage)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
