"""How well a study fills a cluster: the study's one schedule against one loss after another.

Starts a local multi-node Ray cluster on this machine for each slot count: a head with no resources and two
worker nodes, separate ``ray start`` processes with their own temp dirs (the same nodes as the multi-node
test, ``tests/test_multinode.py``: loopback addresses, Ray's token authentication on). Each worker node
declares ``slots / 2`` GPUs and as many CPUs: a trial asks for 1 GPU and 1 CPU, as on a GPU cluster, so
the GPUs are the slots. Where torch sees no CUDA (this is a benchmark of the scheduling, runnable
anywhere), the trials train on the CPU: the declared GPUs stand in for real ones.

On each cluster it runs studies of 1, 3 and 9 losses (the first of ``search_spaces/all_losses.yaml``'s
list), each loss ``--trials`` search trials plus one final run, short trials (``test_resnet`` on the
synthetic dataset, no ASHA stop, no ablations; 100 epochs of 0.2 s, about 20 s a trial here: longer than a
worker's start-up, 10–25 s here to import torch, or a worker a finished trial leaves takes every next trial
and the new ones never start, see ``search.reuse_actors``), two ways:

- **one schedule**: the study as ``dml-study run`` runs it (``study.stages.run_study``): every loss's
  search at once, search trials first, each loss's final run once its search has ended;
- **one loss at a time**: a study per loss, run one after another (how the study ran before the one
  schedule: each loss waited for the previous one, and each search's tail ran alone).

The driver is this process (``run_study`` joins the cluster through ``RAY_ADDRESS``); MLflow is a SQLite
file. For each study it prints (summed over the studies of "one loss at a time"):

- **wall**: from calling ``run_study`` until it returns, everything included: joining the cluster, the
  untrained baseline, starting the trials' actors, writing MLflow;
- **start-up**: from calling ``run_study`` to the first trial's start;
- **trial time**: each trial's own time, its trainable's ``time_total_s`` at its last result, read from Ray
  Tune's ``result.json`` files (with its last ``timestamp``, to the second, for the span);
- **busy**: Σ trial time / (wall × slots), the fraction of the slots' time spent in trials;
- **busy in span**: the same over the span from the first trial's start to the last one's end: how full the
  schedule keeps the slots once trials run, start-up aside;
- **shape's best**: the most busy any schedule could reach for the study's shape with trials of equal
  length and no time lost (``benchmarks/shape.py``): a loss's final run waits for its last search trial, so
  a study with few trials per slot leaves slots idle whatever the schedule (3 losses at 4 slots: 0.75).
  Here trials are not of equal length: more slots than cores slow each trial down by how many run beside
  it, so the first, crowded trials are longer than the last ones, and a study can pass this figure;
- **gap / trial**: (wall × slots − Σ trial time) / trials, the slot time each trial costs beyond its own:
  start-up, actor start, scheduling, the driver, slots idle while the schedule has nothing to give them;
- **driver wait / trial**: of that gap, the seconds a trial's training waited for the driver to take its
  results (Ray Tune holds a trial at each result until the driver asks for the next one; the trial's
  ``driver_wait_seconds``);
- **workers**: how many worker processes ran the study's trials (a worker that finishes a trial takes the
  next one, ``search.reuse_actors``);
- **driver CPU**: this process's CPU time (Ray Tune's event loop, the searchers, the MLflow writer thread).

Then, per schedule and slot count, straight lines through the loss counts: wall = fixed + per trial ×
trials (with the largest deviation from it), and the driver's CPU time the same way; and the goals:
busy ≥ 0.9 wherever trials ≥ 3 × slots (naming the studies whose shape cannot reach it), driver ≤ 1 s per
trial (the fitted slope), wall linear in trials; and the lowest busy against the shape's best.

Run from the repository root: ``PYTHONPATH=. .venv/bin/python benchmarks/scaling.py [--slots 2 4 8]
[--losses 1 3 9] [--trials 3] [--epochs 100] [--schedules one sequential] [--fresh-workers]``
(``--fresh-workers``: ``search.reuse_actors: false``, a new worker process per trial;
``TUNE_MAX_PENDING_TRIALS_PG=1`` in the environment: Ray Tune starts one worker at a time, as the study did
before ``search.max_concurrent_total`` defaulted to the cluster's slots). The slot counts must
be even (two worker nodes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tests.test_multinode import AUTH, ray_cluster

os.environ.update(AUTH)  # the nodes' token, for this driver too: set before Ray reads its configuration

import numpy as np  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from rich.console import Console  # noqa: E402
from tabulate import tabulate  # noqa: E402

from benchmarks.shape import best_busy  # noqa: E402
from study.config import parse_study  # noqa: E402
from study.stages import run_study  # noqa: E402
from study.worker import DRIVER_WAIT  # noqa: E402

ALL_LOSSES = yaml.safe_load(Path("search_spaces/all_losses.yaml").read_text())["search"]["losses"]
WORKER_IPS = ("127.0.0.2", "127.0.0.4")
SCHEDULES = {"one": "one schedule", "sequential": "one loss at a time"}
BEST = "shape's best"  # the most busy any schedule reaches for the study's shape: benchmarks/shape.py
CONCURRENT = 4  # search.max_concurrent: the presets' TPE concurrency per loss


@contextlib.contextmanager
def cluster(slots: int, folder: Path) -> Iterator[str]:
    """A head (no resources) and two worker nodes with ``slots / 2`` GPUs and CPUs each, working in ``folder``;
    yields the head's address. This driver leaves it, then its processes are killed."""
    folder.mkdir()
    workers = [(ip, slots // 2, slots // 2) for ip in WORKER_IPS]
    with ray_cluster(folder, workers, f"sc{os.getpid()}-{slots}") as (address, _, _):
        try:
            yield address
        finally:
            ray.shutdown()


def study_config(name: str, losses: list[str], args, output_dir: Path):
    """A study of short trials: ``args.trials`` search trials per loss trained to the end, one final run each."""
    study = {
        "name": name,
        "output_dir": str(output_dir),
        "dataset": {
            "name": "synthetic",
            "options": {"num_classes": 16, "samples_per_class": 16, "image_size": 16},
            "val_fraction": 0.5,
        },
        "model": {"backbone": "test_resnet", "embedding_dim": 16},
        "train": {"epochs": args.epochs, "batch_size": 16, "m_per_class": 4, "lr": 1e-3},
        "search": {
            "losses": losses,
            "trials_per_loss": args.trials,
            "objective": "map_at_r",
            "max_concurrent": CONCURRENT,
            "grace_period": args.epochs,  # no ASHA stop: every trial is as long as the others
            "reuse_actors": not args.fresh_workers,
        },
        "final": {"seeds": 1},
        "ablations": False,
        "resources": {"cpu": 1, "gpu": 1},
    }
    return parse_study(yaml.safe_dump(study), name)


class Trial(NamedTuple):
    """A trial's times, from its Ray Tune result file: ``duration``, the trainable's own time
    (``time_total_s``, to the microsecond); ``start`` and ``end``, Unix times to the second (Ray Tune's
    ``timestamp``), enough for a study's span; ``wait``, the seconds its training waited for the driver to
    take its results (``DRIVER_WAIT`` of its last result: time Ray Tune leaves out of ``time_total_s``);
    ``worker``, the node and pid of the process that ran it."""

    start: float
    end: float
    duration: float
    wait: float
    worker: str


def trial_times(study_folder: Path) -> list[Trial]:
    """Each trial of the study in ``study_folder``."""
    times = []
    for path in study_folder.glob("ray/*/*/result.json"):
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if results:
            last = results[-1]
            end, duration = last["timestamp"], last["time_total_s"]
            worker = f"{last['node_ip']}:{last['pid']}"
            times.append(Trial(end - duration, end, duration, last[DRIVER_WAIT], worker))
    return times


def measure(schedule: str, losses: list[str], slots: int, args, root: Path) -> dict:
    """Run the study ``schedule``'s way and return its figures."""
    name = f"{schedule}-{len(losses)}l-{slots}s"
    studies = [(name, losses)] if schedule == "one" else [(f"{name}-{loss}", [loss]) for loss in losses]
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 — the progress view's output, discarded
    wall = cpu = start_up = span = busy_time = wait = 0.0
    trials = 0
    workers = set()
    for study_name, study_losses in studies:
        cfg = study_config(study_name, study_losses, args, root / "runs")
        cpu_before, called, started = time.process_time(), time.time(), time.monotonic()
        run_study(cfg, console=quiet)
        wall += time.monotonic() - started
        cpu += time.process_time() - cpu_before
        times = trial_times(root / "runs" / study_name)
        first, last = min(t.start for t in times), max(t.end for t in times)
        start_up, span = start_up + first - called, span + last - first
        busy_time += sum(t.duration for t in times)
        wait += sum(t.wait for t in times)
        trials += len(times)
        workers |= {t.worker for t in times}
    expected = len(losses) * (args.trials + 1)
    if trials != expected:
        raise RuntimeError(f"{name}: {trials} trials ran, {expected} expected")
    best = best_busy(len(losses) if schedule == "one" else 1, args.trials, CONCURRENT, slots)
    return {
        "schedule": SCHEDULES[schedule],
        "slots": slots,
        "losses": len(losses),
        "trials": trials,
        "wall s": wall,
        "start-up s": start_up,
        "trial s (mean)": busy_time / trials,
        "busy": busy_time / (wall * slots),
        "busy in span": busy_time / (span * slots),
        BEST: best,
        "gap s / trial": (wall * slots - busy_time) / trials,
        "driver wait s / trial": wait / trials,
        "workers": len(workers),
        "driver CPU s": cpu,
    }


def linearity(rows: list[dict]) -> list[dict]:
    """Per schedule and slot count, straight lines through the loss counts (least squares): wall = fixed +
    per trial × trials, with the largest relative deviation of a measured wall from it, and the driver's CPU
    time the same way."""
    fits = []
    for schedule in dict.fromkeys(r["schedule"] for r in rows):
        for slots in dict.fromkeys(r["slots"] for r in rows):
            group = [r for r in rows if r["schedule"] == schedule and r["slots"] == slots]
            if len(group) < 2:
                continue
            n = np.array([r["trials"] for r in group], float)
            wall, cpu = (np.array([r[key] for r in group]) for key in ("wall s", "driver CPU s"))
            per_trial, fixed = np.polyfit(n, wall, 1)
            deviation = np.abs(wall - (fixed + per_trial * n)) / wall
            cpu_per_trial, cpu_fixed = np.polyfit(n, cpu, 1)
            fits.append(
                {"schedule": schedule, "slots": slots, "wall: fixed s": fixed, "wall: s per trial": per_trial,
                 "largest deviation": f"{deviation.max():.0%}", "driver CPU: fixed s": cpu_fixed,
                 "driver CPU: s per trial": cpu_per_trial}
            )  # fmt: skip
    return fits


def goals(rows: list[dict], fits: list[dict]) -> list[str]:
    """One line per goal of the one schedule: met or not, with the figures that decide it."""
    one = [r for r in rows if r["schedule"] == SCHEDULES["one"]]
    full = [r for r in one if r["trials"] >= 3 * r["slots"]]
    lines = []
    for key in ("busy", "busy in span"):
        low = [
            f"{r['losses']} losses at {r['slots']} slots: {r[key]:.2f} (shape's best {r[BEST]:.2f})"
            for r in full
            if r[key] < 0.9
        ]
        verdict = "no such study" if not full else "met" if not low else "not met: " + "; ".join(low)
        lines.append(f"{key} >= 0.9 wherever trials >= 3 x slots ({len(full)} studies): {verdict}")
    if one:
        worst = min(one, key=lambda r: r["busy"] / r[BEST])
        lines.append(
            f"busy against its shape's best, lowest: {worst['busy'] / worst[BEST]:.2f} "
            f"({worst['losses']} losses at {worst['slots']} slots: {worst['busy']:.2f} of {worst[BEST]:.2f})"
        )
    per_trial = [f["driver CPU: s per trial"] for f in fits if f["schedule"] == SCHEDULES["one"]]
    if per_trial:
        met = "met" if max(per_trial) <= 1 else "not met"
        lines.append(f"driver CPU <= 1 s per trial (slope of the fit): {met} (largest {max(per_trial):.2f} s)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--losses", type=int, nargs="+", default=[1, 3, 9], choices=range(1, len(ALL_LOSSES) + 1))
    parser.add_argument("--trials", type=int, default=3, help="search trials per loss (each loss adds one final run)")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--fresh-workers", action="store_true", help="search.reuse_actors: false")
    args = parser.parse_args()
    if any(s % 2 or s < 2 for s in args.slots):
        parser.error("--slots: even numbers (two worker nodes), at least 2")

    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        MlflowClient().search_experiments()  # creates the database now, not in the first study's time
        for slots in args.slots:
            with cluster(slots, root / f"cluster-{slots}") as address:
                os.environ["RAY_ADDRESS"] = address
                for count in args.losses:
                    for schedule in args.schedules:
                        rows.append(measure(schedule, ALL_LOSSES[:count], slots, args, root))
                        print(tabulate([rows[-1]], headers="keys", floatfmt=".2f"), flush=True)
    workers = "a fresh worker per trial" if args.fresh_workers else "workers reused"
    pending = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")
    pending = f"; TUNE_MAX_PENDING_TRIALS_PG={pending}" if pending else ""
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs; {args.trials} search trials + 1 final run per loss, "
          f"{args.epochs} epochs each; {workers}{pending}; Ray {ray.__version__}\n")  # fmt: skip
    print(tabulate(rows, headers="keys", floatfmt=".2f"))
    print()
    fits = linearity(rows)
    print(tabulate(fits, headers="keys", floatfmt=".2f"))
    print()
    print("\n".join(goals(rows, fits)))


if __name__ == "__main__":
    main()
