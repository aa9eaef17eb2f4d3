"""jobs/: the cluster files name the same entrypoint and variables; submit.sh runs a real study as a Ray job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_STUDY, copy_mlflow_db, free_ports, stop_head

JOBS = REPO / "jobs"
SUBMIT = JOBS / "submit.sh"
SBATCH = JOBS / "slurm.sbatch"
BIN = Path(sys.executable).parent  # the virtualenv's bin: ray, dml-study
ENTRYPOINT = "dml-study run"
JOB_ENV = ("MLFLOW_TRACKING_URI", "DML_STUDY_OUTPUT_DIR")
STRIPPED = (*JOB_ENV, "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables the job files read, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    return {**env, **extra}


def fake_bin(folder: Path, scripts: dict[str, str]) -> str:
    """Write executable bash scripts into ``folder``; return a PATH that finds them first."""
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Running on a GPU box or a cluster")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


# --- the four files agree ---------------------------------------------------------------------------


def test_rayjob_manifest_runs_dml_study_with_the_job_variables_on_gpu_workers():
    job = yaml.safe_load((JOBS / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert f"{ENTRYPOINT} search_spaces/quickstart.yaml" in spec["entrypoint"]
    assert '"output_dir=$DML_STUDY_OUTPUT_DIR"' in spec["entrypoint"]  # expanded on the head, not by kubectl
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env["env_vars"]) == set(JOB_ENV)
    assert runtime_env["env_vars"]["DML_STUDY_OUTPUT_DIR"].startswith("/")
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert workers and all(c["resources"]["limits"]["nvidia.com/gpu"] >= 1 for c in workers)


def test_cluster_launcher_config_installs_the_repo_with_token_auth_and_gpu_workers():
    text = (JOBS / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5.")) for t in gpu_types)
    assert any("pip install" in c and "dml-study" in c for c in cfg["setup_commands"])
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "disabled" not in text and "0.0.0.0" not in text
    for needle in ("ray up jobs/cluster.yaml", "jobs/submit.sh", "RAY_ADDRESS=", *JOB_ENV):
        assert needle in text, needle
    # what a study keeps is on the shared EFS mount, which every node's container sees and `ray down` keeps
    assert any("/mnt/shared" in c and "mount -t nfs4" in c for c in cfg["initialization_commands"])
    assert "--volume /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert "MLFLOW_TRACKING_URI=sqlite:////mnt/shared/" in text and "DML_STUDY_OUTPUT_DIR=/mnt/shared/" in text
    assert "/home/ray/mlflow.db" not in text and "DML_STUDY_OUTPUT_DIR=/home/ray" not in text


@pytest.mark.parametrize("name", ["submit.sh", "slurm.sbatch"])
def test_scripts_parse_and_name_the_entrypoint_and_variables(name):
    path = JOBS / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    for needle in (ENTRYPOINT, "RAY_ADDRESS", '"output_dir=$DML_STUDY_OUTPUT_DIR"', *JOB_ENV):
        assert needle in text, needle
    assert "0.0.0.0" not in text and "ray stop" not in text


def test_readme_section_documents_every_job_file():
    section = readme_section()
    for needle in ("jobs/submit.sh", "jobs/cluster.yaml", "jobs/rayjob.yaml", "jobs/slurm.sbatch", *JOB_ENV):
        assert needle in section, needle
    assert "`--set output_dir=...`" in section  # how the job files pass DML_STUDY_OUTPUT_DIR on


# --- submit.sh without a cluster --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, env",
    [
        ([], {}),
        (["no/such/study.yaml"], {}),
        (["search_spaces/quickstart.yaml"], {"DML_STUDY_OUTPUT_DIR": "relative/runs"}),
    ],
    ids=["no-argument", "missing-file", "relative-output-dir"],
)
def test_submit_refuses_with_exit_2_and_one_line(tmp_path, args, env):
    marker = tmp_path / "ray-was-called"
    path = fake_bin(tmp_path / "bin", {"ray": f"touch {marker}\n"})
    result = subprocess.run(
        [str(SUBMIT), *args], cwd=REPO, env=clean_env(PATH=path, **env), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("jobs/submit.sh: ")
    assert not marker.exists()


def test_submit_command_line_forwards_the_variables_and_the_exit_status(tmp_path):
    argv_file = tmp_path / "argv"
    path = fake_bin(tmp_path / "bin", {"ray": f"printf '%s\\0' \"$@\" > {argv_file}\nexit 7\n"})
    uri = 'sqlite:////data/a "b" \\c.db'  # survives the JSON quoting
    env = clean_env(PATH=path, MLFLOW_TRACKING_URI=uri, DML_STUDY_OUTPUT_DIR="/data/runs")
    study = REPO / "search_spaces" / "quickstart.yaml"
    result = subprocess.run(
        [str(SUBMIT), str(study), "--set", "train.epochs=1"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 7, result.stderr  # ray job submit's status is the script's
    argv = argv_file.read_text().split("\0")[:-1]
    sep = argv.index("--")
    assert argv[:2] == ["job", "submit"]
    options = dict(zip(argv[2:sep:2], argv[3:sep:2], strict=True))
    assert set(options) == {"--address", "--working-dir", "--runtime-env-json"}  # waits: no --no-wait
    assert options["--address"] == "http://127.0.0.1:8265"
    assert options["--working-dir"] == str(REPO)
    runtime_env = json.loads(options["--runtime-env-json"])
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": uri, "DML_STUDY_OUTPUT_DIR": "/data/runs"}
    assert {".git", ".venv"} <= set(runtime_env["excludes"])
    # the study, inside the repository, is named relative to the uploaded working directory
    assert argv[sep + 1 :] == [
        *ENTRYPOINT.split(),
        "search_spaces/quickstart.yaml",
        "--set",
        "output_dir=/data/runs",
        "--set",
        "train.epochs=1",
    ]

    env = clean_env(PATH=path, RAY_ADDRESS="http://10.0.0.1:8265")
    result = subprocess.run([str(SUBMIT), str(study)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 7, result.stderr
    argv = argv_file.read_text().split("\0")[:-1]
    assert argv[3] == "http://10.0.0.1:8265"
    assert json.loads(argv[argv.index("--runtime-env-json") + 1])["env_vars"] == {}
    assert argv[argv.index("--") :] == ["--", *ENTRYPOINT.split(), "search_spaces/quickstart.yaml"]

    # Ray 2.60's own variable for the job API wins over RAY_ADDRESS, as in `ray job submit`
    env = clean_env(PATH=path, RAY_ADDRESS="http://10.0.0.1:8265", RAY_API_SERVER_ADDRESS="http://10.0.0.2:8265")
    result = subprocess.run([str(SUBMIT), str(study)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 7, result.stderr
    assert argv_file.read_text().split("\0")[3] == "http://10.0.0.2:8265"


# --- slurm.sbatch with fake SLURM and Ray commands ----------------------------------------------------

FAKE_SLURM = {
    "scontrol": "printf 'n1\\nn2\\nn3\\n'\n",
    "hostname": "echo '10.9.8.7 fe80::1'\n",
    # srun: log the step, drop its options, run the command (as srun would, on the named nodes)
    "srun": 'echo "srun $*" >> "$LOG"\nwhile [[ $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done\nexec "$@"\n',
    # ray: `start` runs until SIGTERM (logged once it can be stopped); `status` answers once the head is up
    "ray": (
        "if [[ $1 == start ]]; then\n"
        "    sleep 30 > /dev/null 2>&1 &\n"
        '    trap \'kill $!; echo "stopped $*" >> "$LOG"; exit 0\' TERM\n'
        "fi\n"
        'echo "ray $* auth=$RAY_AUTH_MODE token=${#RAY_AUTH_TOKEN}" >> "$LOG"\n'
        "if [[ $1 == status ]]; then\n"
        '    until grep -q "^ray start --head" "$LOG"; do sleep 0.1; done\n'
        "fi\n"
        "if [[ $1 == start ]]; then wait; fi\n"
    ),
    # python3: the script's wait-for-nodes snippet (python3 - ...) returns once the workers are up
    "python3": (
        '[[ $1 == - ]] || exec "$REAL_PYTHON" "$@"\n'
        "cat > /dev/null\n"
        'until grep -q "^ray start --block --address" "$LOG"; do sleep 0.1; done\n'
        'echo "wait-for-nodes $*" >> "$LOG"\n'
    ),
    "dml-study": 'echo "dml-study $* RAY_ADDRESS=$RAY_ADDRESS" >> "$LOG"\nexit "$STATUS"\n',
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("addresses", "host"),
    [("10.9.8.7 fe80::1", "10.9.8.7"), ("127.0.1.1 fe80::1 2001:db8::7 10.9.8.7", "10.9.8.7"),
     ("127.0.1.1 fe80::1 2001:db8::7", "[2001:db8::7]")],
)  # fmt: skip
def test_sbatch_starts_head_and_workers_runs_the_study_and_tears_down(tmp_path, addresses, host):
    log = tmp_path / "log"
    env = clean_env(
        PATH=fake_bin(tmp_path / "bin", {**FAKE_SLURM, "hostname": f"echo '{addresses}'\n"}),
        LOG=str(log),
        REAL_PYTHON=sys.executable,
        STATUS="3",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="n[1-3]",
        SLURM_CPUS_PER_TASK="8",
        SLURM_GPUS_PER_TASK="1",
        STUDY="search_spaces/quickstart.yaml",
        DML_STUDY_OUTPUT_DIR="/shared/runs",
    )
    result = subprocess.run(
        ["bash", str(SBATCH), "--set", "train.epochs=1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr  # dml-study's status is the job's
    lines = log.read_text().splitlines()

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    # the steps run in the background: only the order the script enforces is checked
    head, workers = first("ray start --head"), first("ray start --block --address")
    ip = host.strip("[]")
    assert first(f"ray status --address {host}:6379") < first("srun --nodes=2 --ntasks=2 --exclude=n1 ray start")
    assert first(f"wait-for-nodes - {host}:6379 3 ") < first("dml-study")
    assert f"--node-ip-address={ip} " in lines[head] and f"--dashboard-host={ip} " in lines[head]
    assert f"--address={host}:6379 " in lines[workers] and "--temp-dir=/tmp/ray-4242" in lines[workers]
    assert all("auth=token token=64" in line for line in (lines[head], lines[workers]))
    assert lines[first("dml-study")] == (
        "dml-study run search_spaces/quickstart.yaml --set output_dir=/shared/runs --set train.epochs=1 "
        f"RAY_ADDRESS={host}:6379"
    )
    stopped = [line for line in lines if line.startswith("stopped")]
    assert [s.split()[2] for s in stopped] == ["--block", "--head"]  # workers first, then the head


def test_sbatch_without_a_study_exits_2(tmp_path):
    env = clean_env(PATH=fake_bin(tmp_path / "bin", FAKE_SLURM), LOG=str(tmp_path / "log"), STUDY="nope.yaml")
    result = subprocess.run(["bash", str(SBATCH)], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "log").exists()  # nothing was started


# --- a real Ray job on a real local head ------------------------------------------------------------


@pytest.fixture
def ray_head(tmp_path):
    """A real local Ray head (auth off, loopback only) in its own process group; yields (dashboard URL, temp dir)."""
    gcs, dashboard, client, agent = free_ports(4)
    temp_dir = Path(f"/tmp/rj{os.getpid()}")
    env = clean_env(PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp_dir), "--num-cpus", "2",
        "--include-dashboard", "true",
    ]  # fmt: skip
    log = (tmp_path / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, temp_dir
    finally:
        stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_a_study_as_a_ray_job(tmp_path, ray_head, migrated_mlflow_db):
    from mlflow import MlflowClient

    url, temp_dir = ray_head
    study = {**TINY_STUDY, "search": {**TINY_STUDY["search"], "trials_per_loss": 2}}
    study_file = tmp_path / "study.yaml"  # outside the repository: passed by its absolute path
    study_file.write_text(yaml.safe_dump(study))
    tracking_uri = f"sqlite:///{copy_mlflow_db(migrated_mlflow_db, tmp_path / 'mlflow.db')}"  # created, empty
    env = clean_env(
        PATH=f"{BIN}:{os.environ['PATH']}",
        RAY_ADDRESS=url,
        RAY_AUTH_MODE="disabled",
        MLFLOW_TRACKING_URI=tracking_uri,
        DML_STUDY_OUTPUT_DIR=str(tmp_path / "runs"),
    )
    result = subprocess.run(
        [str(SUBMIT), str(study_file)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    # the repository travelled as the working directory, without .venv and .git
    (package,) = [p for p in (temp_dir / "session_latest/runtime_resources/working_dir_files").iterdir() if p.is_dir()]
    assert (package / "jobs" / "submit.sh").is_file() and (package / "study" / "cli.py").is_file()
    assert not (package / ".venv").exists() and not (package / ".git").exists()
    assert sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) < 20 * 2**20

    # MLflow: the URI was forwarded (nothing else points the job at this database)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study["name"])
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dml_study.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("dml_study.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    expected = len(study["search"]["losses"]) * study["search"]["trials_per_loss"] + 1  # + the untrained baseline
    assert len(trials) == expected
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # DML_STUDY_OUTPUT_DIR became --set output_dir=...
    assert (tmp_path / "runs" / study["name"] / "results.csv").is_file()
