#!/usr/bin/env bash
# The GPU path, proved in one run on a machine with one NVIDIA GPU (H100/H200 class), in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # run every step, print one Markdown table
#   bash benchmarks/gpu_check.sh --dry-run  # print the steps, their time boxes and commands; run nothing
#
# Steps (each time-boxed with `timeout`; its wall time and exit status recorded; a failing step never
# stops the others):
#   0  setup        .venv present, else created with the README's install command (counts against the budget)
#   1  environment  nvidia-smi name / memory / driver; torch + torch.cuda.get_device_name(); faiss.get_num_gpus()
#   2  CUDA tests   pytest on the tests skipped without a GPU + the loss tests under bf16 autocast
#   2b losses/CUDA  every loss on CUDA: float32 vs the CPU, and under bf16 autocast vs float32
#   3  faiss        study.metrics.evaluate with faiss on the GPU vs the CPU (20,000 × 128, 500 classes)
#   4  throughput   benchmarks/throughput.py at its GPU defaults; goal: cached path ≥ 90 % of backbone-only
#   5  SOP eval     throughput.py's evaluation line (60,502 × 512, 11,316 classes); goal < 3 s on the GPU
#   6  packed study 4 search trials at resources.gpu 0.25: wall time, overlap (MLflow), peak GPU memory per pid
#
# The table goes to stdout and, when $OUT is set (the device runner copies $OUT back), to $OUT/gpu_check.md;
# every step's raw log goes to $OUT/logs/ (else to a folder under /tmp, named at the end).
# Exit status: 0 every step PASS; 1 some step did not pass; 2 no GPU on this machine or a bad argument.
#
# Environment: GPU_CHECK_BUDGET (seconds for the whole run, default 440: each step's box is cut to what is
# left, a step with < 5 s left is SKIPped), GPU_CHECK_VENV (default: <repo>/.venv), OUT.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run | -n) DRY_RUN=1 ;;
        -h | --help)
            sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_check.sh: unknown argument '$arg' (usage: bash benchmarks/gpu_check.sh [--dry-run])" >&2
            exit 2
            ;;
    esac
done

# ---- time boxes (seconds) --------------------------------------------------------------------------------
# Without the install they sum to 410 s worst case (6 min 50 s); a normal run takes about half. The budget
# below cuts every box to what is left, so the script ends in time whatever a step does.
BOX_INSTALL=300 # only when .venv is missing (PyTorch is large): later steps then get what is left
BOX_ENV=15
BOX_TESTS=45
BOX_LOSSES=25
BOX_FAISS=35
BOX_THROUGHPUT=130
BOX_EVAL=30       # only when step 4 ended before its evaluation line
BOX_STUDY=110
BOX_STUDY_READ=20 # reading the study back from MLflow and the memory samples
BUDGET=${GPU_CHECK_BUDGET:-440} # + at most 10 s of kill-after on the last step: < 7 min 40 s
RESERVE=5 # kept for the table

VENV=${GPU_CHECK_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
# the README's install command (pip told to give up soon where PyPI cannot be reached)
INSTALL_CMD="python3 -m venv '$VENV' && '$VENV/bin/pip' install -q --retries 1 --timeout 15 -e '.[test]'"

# The tests that touch CUDA, listed explicitly (2 + 9 + 5 = 16 items):
CUDA_TESTS=(
    # skipped without a GPU: @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    tests/test_data_transforms.py::test_train_crop_on_the_gpu_matches_the_cpu
    tests/test_data_transforms.py::test_geometry_on_the_gpu_matches_the_cpu
    tests/test_train.py::test_on_a_gpu_an_epoch_waits_for_the_device_once_and_trains_on_the_cpus_batches
    # the loss tests under bf16 autocast (torch.autocast("cpu"); step 2b runs the same checks on CUDA).
    # Parametrized over half = [bfloat16, float16]: "half0" is bfloat16, so -k "not half1" drops the float16 half.
    tests/test_losses.py::test_autocast_is_finite_close_to_float32_and_keeps_parameters_float32
    tests/test_losses_registry.py::test_forward_promotes_and_switches_autocast_off
)
# Not listed: tests/test_preflight.py::test_a_gpu_this_machine_does_not_have is skipped *with* a GPU.
CUDA_TESTS_K="not half1"
GPU_ONLY_LISTED=3 # the "needs a GPU" tests above; step 2 warns when tests/ has another number of them

if ((DRY_RUN)); then
    W=/tmp/gpu_check.XXXXXX # made by mktemp on a real run
    LOGDIR=${OUT:+$OUT/logs}
    LOGDIR=${LOGDIR:-$W/logs}
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! timeout 20 nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        echo "gpu_check.sh: no NVIDIA GPU on this machine (nvidia-smi missing or lists no GPU): nothing run" >&2
        exit 2
    fi
    W=$(mktemp -d /tmp/gpu_check.XXXXXX)
    LOGDIR=${OUT:+$OUT/logs}
    LOGDIR=${LOGDIR:-$W/logs}
    mkdir -p "$LOGDIR" "$W/study" || exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 MPLBACKEND=Agg

# ---- inline Python, written to $W on a real run ---------------------------------------------------------------
declare -A SNIP
snippet() { SNIP[$1]=$(cat); }

snippet env.py <<'EOF'
# Step 1: torch, CUDA and faiss as this interpreter sees them.
import faiss
import torch

cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
gpus = faiss.get_num_gpus()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda available: {cuda}; device 0: {name}")
print(f"faiss {faiss.__version__}; faiss.get_num_gpus() = {gpus}")
print(f"RESULT: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); faiss {faiss.__version__} sees {gpus} GPU(s)")
print(f"VERDICT: {'PASS' if cuda and gpus >= 1 else 'FAIL'}")
EOF

snippet losses_cuda.py <<'EOF'
# Step 2b: every loss forward + backward on CUDA in float32 (against the CPU) and under bf16 autocast.
import torch
import torch.nn.functional as F

from study.losses import LOSSES, create_loss

assert torch.cuda.is_available(), "no CUDA device"
B, C, D = 256, 100, 512  # 64 classes of 4 in the batch, 100 proxies/centers
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
RANDOM = {"margin"}  # draws its negatives: CPU and CUDA generators differ, so no CPU comparison


def run(name, device, emb_dtype=torch.float32, autocast=False):
    torch.manual_seed(0)
    loss = create_loss(name, C, D).to(device)
    emb = F.normalize(torch.randn(B, D, generator=torch.Generator().manual_seed(1)), dim=1)
    emb = emb.to(device=device, dtype=emb_dtype).requires_grad_(True)
    labels = (torch.arange(B) // 4).to(device)
    torch.manual_seed(2)  # the same draws for every run on one device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        value = loss(emb, labels)
    value.backward()
    params = [p for p in loss.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    return value.detach().cpu(), [emb.grad.float().cpu()] + [g.cpu() for g in grads], [t.dtype for t in params + grads]


def rel(a, b, floor=1e-12):
    """max |a − b| over max |b| (at least ``floor``)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(floor))


worst = {"cpu": 0.0, "same": 0.0, "bf16": 0.0}
ok = True
for name in sorted(LOSSES):
    ref, ref_grads, _ = run(name, CUDA)
    same, same_grads, _ = run(name, CUDA, autocast=True)  # float32 in: the loss turns autocast off
    low, low_grads, dtypes = run(name, CUDA, torch.bfloat16, autocast=True)  # bf16 in: promoted to float32
    d_cpu = None
    if name not in RANDOM:
        cpu, cpu_grads, _ = run(name, CPU)
        d_cpu = max(rel(ref, cpu), *(rel(g, c) for g, c in zip(ref_grads, cpu_grads, strict=True)))
        worst["cpu"] = max(worst["cpu"], d_cpu)
    d_same = max(rel(same, ref), *(rel(g, r) for g, r in zip(same_grads, ref_grads, strict=True)))
    d_low = rel(low, ref, floor=1.0)  # the unit test's 3e-2, relative for losses above 1
    finite = bool(torch.isfinite(low)) and all(bool(torch.isfinite(g).all()) for g in low_grads)
    f32 = low.dtype == torch.float32 and all(t == torch.float32 for t in dtypes)
    worst["same"], worst["bf16"] = max(worst["same"], d_same), max(worst["bf16"], d_low)
    good = finite and f32 and d_same <= 1e-5 and d_low <= 3e-2 and (d_cpu is None or d_cpu <= 1e-3)
    ok &= good
    cpu_text = "random draws" if d_cpu is None else f"{d_cpu:.1e}"
    print(f"{name:20s} loss {float(ref):9.4f}  CUDA vs CPU {cpu_text:>12s}  autocast(f32 in) {d_same:.1e}  "
          f"bf16 in {d_low:.1e}  finite {finite}  float32 {f32}  {'ok' if good else 'FAILED'}")
print(f"RESULT: {len(LOSSES)} losses, batch {B}: CUDA vs CPU float32 max rel Δ {worst['cpu']:.1e} (margin skipped: "
      f"random draws); autocast, float32 in: {worst['same']:.1e}; bf16 in: {worst['bf16']:.1e}; all within bounds, "
      f"finite, float32 parameters and grads: {ok}")
print(f"VERDICT: {'PASS' if ok else 'FAIL'}")
EOF

snippet faiss_check.py <<'EOF'
# Step 3: study.metrics.evaluate with faiss on the GPU and on the CPU, same unit embeddings.
import time

import faiss
import numpy as np

from study import metrics

assert faiss.get_num_gpus() > 0, "faiss sees no GPU (faiss-cpu installed instead of faiss-gpu?)"
n, c, d = 20_000, 500, 128
rng = np.random.default_rng(0)
labels = np.arange(n) % c
centers = rng.standard_normal((c, d), dtype=np.float32)
centers /= np.linalg.norm(centers, axis=1, keepdims=True)
x = centers[labels] + 2.0 * rng.standard_normal((n, d), dtype=np.float32) / np.sqrt(d)  # R@1 ≈ 0.8: not trivial
x /= np.linalg.norm(x, axis=1, keepdims=True)

seconds = {}
results = {}
for where, use_gpu in (("gpu", True), ("cpu", False)):
    start = time.perf_counter()
    results[where] = metrics.evaluate(x, labels, seed=0, use_gpu=use_gpu)
    seconds[where] = time.perf_counter() - start
diffs = {k: abs(results["gpu"][k] - results["cpu"][k]) for k in results["cpu"]}
for k, v in diffs.items():
    print(f"{k:28s} gpu {results['gpu'][k]:.6f}  cpu {results['cpu'][k]:.6f}  |Δ| {v:.2e}")
sims_g, idx_g = metrics.knn(x, 10, use_gpu=True)  # the neighbours themselves
sims_c, idx_c = metrics.knn(x, 10, use_gpu=False)
same_rows = float((idx_g == idx_c).all(axis=1).mean())
sim_diff = float(np.abs(sims_g - sims_c).max())
retrieval = max(v for k, v in diffs.items() if k != "nmi")
print(f"kNN@10: rows identical {100 * same_rows:.2f} %, max |Δ similarity| {sim_diff:.2e}")
print(f"evaluate: GPU {seconds['gpu']:.2f} s, CPU {seconds['cpu']:.2f} s ({faiss.omp_get_max_threads()} threads)")
print(f"RESULT: max |Δ| recall@1–8 / MAP@R / R-Prec {retrieval:.1e}, NMI {diffs['nmi']:.1e}; kNN@10 rows identical "
      f"{100 * same_rows:.1f} %, max |Δ sim| {sim_diff:.1e}; GPU {seconds['gpu']:.1f} s vs CPU {seconds['cpu']:.1f} s")
print(f"VERDICT: {'PASS' if retrieval <= 1e-3 and diffs['nmi'] <= 0.02 and same_rows >= 0.99 else 'FAIL'}")
EOF

snippet eval_sop.py <<'EOF'
# Step 5 fallback (step 4 ended before its evaluation line): throughput.py's SOP-size evaluation alone.
import time

import faiss
import numpy as np

from benchmarks.throughput import SOP, sop_labels
from study.metrics import evaluate

labels = sop_labels(SOP[0], 0)
x = np.random.default_rng(0).standard_normal((len(labels), 512), dtype=np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
start = time.perf_counter()
evaluate(x, labels, ks=(1, 10, 100, 1000), seed=0)
seconds = time.perf_counter() - start
where = "GPU" if faiss.get_num_gpus() > 0 else f"CPU, {faiss.omp_get_max_threads()} threads"
print(f"Evaluation (kNN recall@1/10/100/1000, MAP@R, R-Precision, NMI k-means): {len(labels):,} × 512, "
      f"{labels.max() + 1:,} classes: {seconds:.1f} s, faiss on {where} (goal: < 3 s on one GPU)")
EOF

snippet study_read.py <<'EOF'
# Step 6, read back: the trials' MLflow runs (states, how many ran at once) and the GPU memory samples.
import collections
import os

from mlflow.tracking import MlflowClient

name, samples, gpu_total = os.environ["STUDY_NAME"], os.environ["SAMPLES"], float(os.environ["GPU_TOTAL_MIB"] or 0)
client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
experiment = client.get_experiment_by_name(name)
runs = [] if experiment is None else client.search_runs(
    [experiment.experiment_id], "tags.`dml_study.role` = 'trial'", max_results=1000
)
search = [r for r in runs if r.data.tags.get("dml_study.stage") == "search"]
states = collections.Counter(r.data.tags.get("dml_study.state", "RUNNING") for r in search)


def most_at_once(intervals):
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])  # an end before a start
    alive = best = 0
    for _, step in events:
        alive += step
        best = max(best, alive)
    return best


alive, training = [], []
for run in search:
    end = run.info.end_time or max(run.info.start_time, 0) + 10**12
    alive.append((run.info.start_time, end))
    history = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)
    if history:  # from the start of its first epoch to the report of its last
        training.append((history[0].timestamp - 1000 * history[0].value, history[-1].timestamp))
    print(f"trial {run.data.tags.get('dml_study.trial')}: {run.data.tags.get('dml_study.state')} "
          f"epochs {len(history)} alive {(end - run.info.start_time) / 1000:.1f} s")
at_once, train_at_once = most_at_once(alive), most_at_once(training)

per_pid, totals, per_sample = collections.defaultdict(float), [], collections.Counter()
if os.path.exists(samples):
    for line in open(samples):
        parts = [p.strip() for p in line.split(",")]
        try:
            if parts[1] == "app" and len(parts) >= 4:
                per_sample[parts[0]] += 1  # processes on the GPU in this one-second sample
                per_pid[parts[2]] = max(per_pid[parts[2]], float(parts[3]))
            elif parts[1] == "total" and len(parts) >= 3:
                totals.append(float(parts[2]))
        except (IndexError, ValueError):
            pass
for pid, mib in sorted(per_pid.items(), key=lambda kv: -kv[1]):
    print(f"pid {pid}: peak {mib:.0f} MiB")
if per_pid:
    top = sorted(per_pid.values(), reverse=True)
    memory = (f"peak GPU MiB per process: {', '.join(f'{m:.0f}' for m in top[:8])} "
              f"({max(per_sample.values())} processes on the GPU at once)")
    fits = top[0] <= gpu_total / 4 if gpu_total else True
else:
    memory = "nvidia-smi listed no compute processes (container PID namespace?)"
    fits = True
if totals:
    memory += f"; whole GPU {min(totals):.0f} → {max(totals):.0f} MiB used"
ended = sum(states[s] for s in ("COMPLETE", "PRUNED", "FAIL"))
print(f"RESULT: {len(search)} search trials ({', '.join(f'{k} {v}' for k, v in sorted(states.items()))}); "
      f"at once: {at_once} alive (MLflow run start–end), {train_at_once} in their epochs; {memory}")
good = len(search) == 4 and ended == 4 and states["FAIL"] == 0 and at_once >= 4 and fits
print(f"VERDICT: {'PASS' if good else 'FAIL'}")
EOF

STUDY_YAML=$(
    cat <<EOF
# 4 search trials of one loss packed on one GPU (resources.gpu 0.25), written by benchmarks/gpu_check.sh
name: gpu-check
seed: 0
output_dir: $W/study/runs
dataset: {name: synthetic, options: {num_classes: 100}, val_fraction: 0.3}
model: {backbone: resnet10t, embedding_dim: 64}
train: {epochs: 2, batch_size: 64, m_per_class: 4, lr: 1.0e-3, device: cuda, amp: true, channels_last: true}
search: {losses: [multi_similarity], trials_per_loss: 4, objective: map_at_r, max_concurrent: 4}
final: {seeds: 0}
ablations: false
resources: {cpu: 2, gpu: 0.25}
EOF
)

# ---- the steps' commands ---------------------------------------------------------------------------------------
q() { printf '%q' "$1"; }
CMD_ENV="nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'; $(q "$PY") $(q "$W/env.py")"
CMD_TESTS="$(q "$PY") -m pytest -q -rs -p no:cacheprovider -m 'not slow' -k '$CUDA_TESTS_K' ${CUDA_TESTS[*]}"
CMD_LOSSES="$(q "$PY") $(q "$W/losses_cuda.py")"
CMD_FAISS="$(q "$PY") $(q "$W/faiss_check.py")"
CMD_THROUGHPUT="$(q "$PY") benchmarks/throughput.py"
CMD_EVAL="$(q "$PY") $(q "$W/eval_sop.py")"
CMD_STUDY="cd $(q "$W/study") && RAY_AUTH_MODE=disabled MLFLOW_TRACKING_URI=$(q "sqlite:///$W/study/mlflow.db") $(q "$VENV/bin/dml-study") run study.yaml"
CMD_SAMPLER="every 1 s: nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits; nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits"
CMD_STUDY_READ="STUDY_NAME=gpu-check SAMPLES=$(q "$LOGDIR/6-gpu-memory.csv") MLFLOW_TRACKING_URI=$(q "sqlite:///$W/study/mlflow.db") $(q "$PY") $(q "$W/study_read.py")"

GOAL_SETUP="Python env with the project installed"
GOAL_ENV="CUDA available; faiss sees ≥ 1 GPU"
GOAL_TESTS="all pass, none skipped"
GOAL_LOSSES="CUDA = CPU (rel ≤ 1e-3); bf16 rel ≤ 3e-2, finite"
GOAL_FAISS="|Δ| ≤ 1e-3 (retrieval), ≤ 0.02 (NMI)"
GOAL_THROUGHPUT="cached ≥ 90 % of backbone-only"
GOAL_EVAL="< 3 s, faiss on the GPU"
GOAL_STUDY="4/4 trials end, none FAIL, 4 alive at once, each ≤ ¼ GPU memory"

if ((DRY_RUN)); then
    echo "gpu_check.sh --dry-run: nothing is run. On a machine without an NVIDIA GPU a real run prints one line and exits 2."
    echo "Budget ${BUDGET} s for the whole run (GPU_CHECK_BUDGET); boxes without the install: $((BOX_ENV + BOX_TESTS + BOX_LOSSES + BOX_FAISS + BOX_THROUGHPUT + BOX_EVAL + BOX_STUDY + BOX_STUDY_READ)) s worst case."
    echo "Work folder: $W (mktemp); logs: $LOGDIR; table: ${OUT:+$OUT/gpu_check.md}${OUT:-stdout only (set OUT to also write \$OUT/gpu_check.md)}"
    echo
    show() { printf '%-4s %-13s box %4s s  goal: %s\n       $ %s\n' "$1" "$2" "$3" "$4" "$5"; }
    show 0 setup "$BOX_INSTALL" "$GOAL_SETUP" "only if $PY is missing: $INSTALL_CMD"
    show 1 environment "$BOX_ENV" "$GOAL_ENV" "$CMD_ENV"
    show 2 "CUDA tests" "$BOX_TESTS" "$GOAL_TESTS" "$CMD_TESTS"
    show 2b "losses/CUDA" "$BOX_LOSSES" "$GOAL_LOSSES" "$CMD_LOSSES"
    show 3 faiss "$BOX_FAISS" "$GOAL_FAISS" "$CMD_FAISS"
    show 4 throughput "$BOX_THROUGHPUT" "$GOAL_THROUGHPUT" "$CMD_THROUGHPUT"
    show 5 "SOP eval" "$BOX_EVAL" "$GOAL_EVAL" "the Evaluation line of step 4's log; only if it is missing: $CMD_EVAL"
    show 6 "packed study" "$BOX_STUDY" "$GOAL_STUDY" "$CMD_STUDY"
    printf '       in the background: %s\n' "$CMD_SAMPLER"
    printf '       then (box %s s): %s\n' "$BOX_STUDY_READ" "$CMD_STUDY_READ"
    echo
    echo "Inline Python (written to $W):"
    for name in env.py losses_cuda.py faiss_check.py eval_sop.py study_read.py; do
        printf '  %-15s %3d lines  %s\n' "$name" "$(printf '%s\n' "${SNIP[$name]}" | wc -l)" "$(printf '%s\n' "${SNIP[$name]}" | head -1)"
    done
    echo "  study.yaml:"
    printf '%s\n' "$STUDY_YAML" | sed 's/^/    /'
    exit 0
fi

for name in "${!SNIP[@]}"; do printf '%s\n' "${SNIP[$name]}" >"$W/$name"; done
printf '%s\n' "$STUDY_YAML" >"$W/study/study.yaml"
cp "$W/study/study.yaml" "$LOGDIR/6-study.yaml"

# ---- running and recording --------------------------------------------------------------------------------------
T0=$(date +%s)
DEADLINE=$((T0 + BUDGET))
CURRENT_PGID=""
SAMPLER_PID=""
cleanup() {
    [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
    [[ -n $CURRENT_PGID ]] && kill -KILL -- "-$CURRENT_PGID" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -a T_STEP T_NAME T_RESULT T_GOAL T_STATUS T_SECONDS
record() { # record STEP NAME RESULT GOAL STATUS SECONDS
    T_STEP+=("$1") T_NAME+=("$2") T_RESULT+=("$3") T_GOAL+=("$4") T_STATUS+=("$5") T_SECONDS+=("$6")
    printf '[%s] %-13s %-8s %6s s  %s\n' "$1" "$2" "$5" "$6" "$3"
}

box_for() { # the box a step gets: its own, cut to what the budget has left
    local want=$1 left=$((DEADLINE - $(date +%s) - RESERVE))
    ((left < want)) && want=$left
    echo "$want"
}

RC=0
SECS=0
run_boxed() { # run_boxed LOG BOX CMD: RC (124/137: timed out) and SECS; the step's process group is ended after it
    local log=$1 box=$2 cmd=$3 t0 t1
    printf '$ %s\n(box %s s)\n\n' "$cmd" "$box" >>"$log"
    t0=$(date +%s.%N)
    timeout -k 10 "$box" bash -o pipefail -c "$cmd" >>"$log" 2>&1 </dev/null &
    CURRENT_PGID=$! # timeout puts itself and the command in a process group of its own
    wait "$CURRENT_PGID"
    RC=$?
    kill -KILL -- "-$CURRENT_PGID" 2>/dev/null # anything the step left running (Ray's processes, say)
    CURRENT_PGID=""
    t1=$(date +%s.%N)
    SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    printf '\n(exit status %s after %s s)\n' "$RC" "$SECS" >>"$log"
}

status_of() { # status_of VERDICT: TIMEOUT, ERROR(rc) for any other non-zero exit, else the step's verdict
    if [[ $RC == 124 || $RC == 137 ]]; then
        echo TIMEOUT
    elif [[ $RC != 0 ]]; then
        echo "ERROR($RC)"
    elif [[ -n $1 ]]; then
        echo "$1"
    else
        echo "ERROR(no verdict)"
    fi
}

skip_reason() { ((${1:-0} < 5)) && echo "not run: the ${BUDGET} s budget is spent" || echo "not run: no Python environment (see step 0)"; }
tag() { grep -a "^$1: " "$2" 2>/dev/null | tail -1 | sed "s/^$1: //"; } # tag NAME LOG: last "NAME: ..." line
last_error() { grep -aE 'Error|error:|Traceback|FAILED' "$1" 2>/dev/null | tail -1 | cut -c1-160; }

# step: the common path for a command whose log ends with RESULT:/VERDICT: lines
step() { # step ID NAME BOX GOAL LOG CMD [any: run without the Python environment too]
    local id=$1 name=$2 goal=$4 log=$5 cmd=$6 any=${7:-} box result
    box=$(box_for "$3")
    if ((box < 5)); then
        record "$id" "$name" "not run: the ${BUDGET} s budget is spent" "$goal" SKIP 0
        return
    fi
    if [[ ! -x $PY && -z $any ]]; then
        record "$id" "$name" "not run: no Python environment (see step 0)" "$goal" SKIP 0
        return
    fi
    run_boxed "$log" "$box" "$cmd"
    result=$(tag RESULT "$log")
    [[ -z $result ]] && result=$(last_error "$log")
    [[ -z $result ]] && result="see $(basename "$log")"
    [[ $RC == 124 || $RC == 137 ]] && result="timed out after ${box} s${result:+; $result}"
    record "$id" "$name" "$result" "$goal" "$(status_of "$(tag VERDICT "$log")")" "$SECS"
}

# 0 setup ---------------------------------------------------------------------------------------------------------
if [[ -x $PY ]]; then
    record 0 setup "$VENV present" "$GOAL_SETUP" PASS 0
elif [[ -e $VENV ]]; then
    record 0 setup "$VENV exists but its bin/python does not run here: not replaced" "$GOAL_SETUP" ERROR 0
else
    LOG="$LOGDIR/0-setup.log"
    run_boxed "$LOG" "$(box_for "$BOX_INSTALL")" "$INSTALL_CMD"
    if ((RC == 0)) && [[ -x $PY ]]; then
        record 0 setup "created .venv with the README's install command" "$GOAL_SETUP" PASS "$SECS"
    else
        ERR=$(last_error "$LOG")
        record 0 setup "install failed${ERR:+: $ERR} (see 0-setup.log)" "$GOAL_SETUP" "$(status_of "")" "$SECS"
    fi
fi

# 1 environment -------------------------------------------------------------------------------------------------
LOG="$LOGDIR/1-environment.log"
step 1 environment "$BOX_ENV" "$GOAL_ENV" "$LOG" "$CMD_ENV" any # nvidia-smi's line is worth having anyway
GPU_LINE=$(tag GPU "$LOG")
[[ -n $GPU_LINE ]] && T_RESULT[-1]="nvidia-smi: $GPU_LINE; ${T_RESULT[-1]}"
GPU_TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -dc '0-9')

# 2 the tests that touch CUDA -------------------------------------------------------------------------------------
LOG="$LOGDIR/2-cuda-tests.log"
BOX=$(box_for "$BOX_TESTS")
if ((BOX < 5)) || [[ ! -x $PY ]]; then
    record 2 "CUDA tests" "$(skip_reason "$BOX")" "$GOAL_TESTS" SKIP 0
else
    run_boxed "$LOG" "$BOX" "$CMD_TESTS"
    SUMMARY=$(grep -aE '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' "$LOG" | tail -1)
    count() { echo "$SUMMARY" | grep -oE "[0-9]+ $1" | head -1 | grep -oE '^[0-9]+' || echo 0; }
    PASSED=$(count passed) FAILED=$(count failed) SKIPPED=$(count skipped) ERRORS=$(count error)
    GPU_ONLY=$(grep -rho --include='*.py' 'reason="needs a GPU"' tests | wc -l)
    RESULT="$PASSED passed, $FAILED failed, $SKIPPED skipped, $ERRORS errors"
    ((GPU_ONLY != GPU_ONLY_LISTED)) && RESULT+="; NOTE: tests/ has $GPU_ONLY \"needs a GPU\" tests, $GPU_ONLY_LISTED listed here"
    SKIPS=$(grep -aE '^SKIPPED' "$LOG" | head -2 | cut -c1-120 | tr '\n' ' ')
    [[ -n $SKIPS ]] && RESULT+="; $SKIPS"
    if ((RC == 0 && FAILED == 0 && ERRORS == 0 && SKIPPED == 0 && PASSED > 0)); then
        STATUS=PASS
    elif ((RC == 124 || RC == 137)); then
        STATUS=TIMEOUT
    elif ((RC == 0 || RC == 1)); then
        STATUS=FAIL
    else
        STATUS="ERROR($RC)"
    fi
    record 2 "CUDA tests" "$RESULT" "$GOAL_TESTS" "$STATUS" "$SECS"
fi

# 2b every loss on CUDA ----------------------------------------------------------------------------------------------
step 2b "losses/CUDA" "$BOX_LOSSES" "$GOAL_LOSSES" "$LOGDIR/2b-losses-cuda.log" "$CMD_LOSSES"

# 3 faiss on the GPU = faiss on the CPU ------------------------------------------------------------------------------
step 3 faiss "$BOX_FAISS" "$GOAL_FAISS" "$LOGDIR/3-faiss.log" "$CMD_FAISS"

# 4 training throughput, 5 SOP-size evaluation -------------------------------------------------------------------------
LOG="$LOGDIR/4-throughput.log"
BOX=$(box_for "$BOX_THROUGHPUT")
if ((BOX < 5)) || [[ ! -x $PY ]]; then
    record 4 throughput "$(skip_reason "$BOX")" "$GOAL_THROUGHPUT" SKIP 0
else
    run_boxed "$LOG" "$BOX" "$CMD_THROUGHPUT"
    rate() { grep -a "^| $1" "$LOG" | tail -1 | awk -F'|' '{ gsub(/ /, "", $3); gsub(/^ +| +$/, "", $4); print $3 " img/s (" $4 ")" }'; }
    BACKBONE=$(rate backbone) CACHED=$(rate cached) LOADER=$(rate DataLoader)
    PERCENT=$(grep -a '^| cached' "$LOG" | tail -1 | awk -F'|' '{ print $4 + 0 }')
    DEVICE=$(grep -a '^Device:' "$LOG" | head -1 | cut -c1-80)
    FEATURES=$(grep -a '^Feature mode' "$LOG" | sed -E 's/.*: ([0-9.]+ s) in the first trial.*, ([0-9.]+ s) in every later.*/feature mode \1 first, \2 later/')
    if [[ -n $CACHED ]]; then
        RESULT="backbone-only ${BACKBONE% (*}; cached $CACHED; DataLoader $LOADER${FEATURES:+; $FEATURES}; $DEVICE"
        if [[ $DEVICE != *cuda* ]]; then
            VERDICT=FAIL
        elif ((PERCENT >= 90)); then VERDICT=PASS; else VERDICT=FAIL; fi
    else
        RESULT="no rates table: $(last_error "$LOG")"
        [[ $RESULT == "no rates table: " ]] && RESULT="no rates table (see 4-throughput.log)"
        VERDICT=""
    fi
    [[ $RC == 124 || $RC == 137 ]] && RESULT="timed out after ${BOX} s; $RESULT"
    record 4 throughput "$RESULT" "$GOAL_THROUGHPUT" "$(status_of "$VERDICT")" "$SECS"
fi

eval_line() { grep -a '^Evaluation (' "$1" 2>/dev/null | tail -1; }
EVAL=$(eval_line "$LOG")
EVAL_SECS="(in 4)"
if [[ -z $EVAL ]]; then # step 4 ended before it: the same evaluation alone
    LOG="$LOGDIR/5-eval-sop.log"
    BOX=$(box_for "$BOX_EVAL")
    if ((BOX >= 5)) && [[ -x $PY ]]; then
        run_boxed "$LOG" "$BOX" "$CMD_EVAL"
        EVAL=$(eval_line "$LOG")
        EVAL_SECS=$SECS
    fi
fi
if [[ -n $EVAL ]]; then
    SIZE=$(echo "$EVAL" | sed -E 's/^[^:]*: ([0-9,]+ × [0-9]+), ([0-9,]+ classes): .*/\1, \2/')
    TIME=$(echo "$EVAL" | sed -E 's/.* classes: ([0-9.]+) s, faiss on ([^(]*[^ (]).*/\1/')
    WHERE=$(echo "$EVAL" | sed -E 's/.* s, faiss on ([^(]*[^ (]).*/\1/')
    if [[ $WHERE == GPU ]] && awk -v t="$TIME" 'BEGIN { exit !(t < 3) }'; then STATUS=PASS; else STATUS=FAIL; fi
    record 5 "SOP eval" "$TIME s for $SIZE, faiss on $WHERE" "$GOAL_EVAL" "$STATUS" "$EVAL_SECS"
else
    record 5 "SOP eval" "no evaluation line (step 4 and the fallback ended before it)" "$GOAL_EVAL" SKIP "$EVAL_SECS"
fi

# 6 four trials packed on the GPU ----------------------------------------------------------------------------------------
LOG="$LOGDIR/6-study.log"
BOX=$(box_for "$BOX_STUDY")
if ((BOX < 5)) || [[ ! -x $PY ]]; then
    record 6 "packed study" "$(skip_reason "$BOX")" "$GOAL_STUDY" SKIP 0
else
    SAMPLES="$LOGDIR/6-gpu-memory.csv"
    (
        while :; do
            ts=$(date +%s)
            nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null | sed "s/^/$ts,app,/"
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 | sed "s/^/$ts,total,/"
            sleep 1
        done
    ) >"$SAMPLES" 2>&1 &
    SAMPLER_PID=$!
    run_boxed "$LOG" "$BOX" "$CMD_STUDY"
    STUDY_RC=$RC STUDY_SECS=$SECS
    kill "$SAMPLER_PID" 2>/dev/null
    wait "$SAMPLER_PID" 2>/dev/null
    SAMPLER_PID=""
    READ_LOG="$LOGDIR/6-study-read.log"
    READ_BOX=$(box_for "$BOX_STUDY_READ")
    ((READ_BOX < 5)) && READ_BOX=5 # the study's own numbers are worth the reserve
    run_boxed "$READ_LOG" "$READ_BOX" "GPU_TOTAL_MIB=${GPU_TOTAL_MIB:-0} $CMD_STUDY_READ"
    READ_RC=$RC
    RESULT="wall $STUDY_SECS s; $(tag RESULT "$READ_LOG")"
    [[ -z $(tag RESULT "$READ_LOG") ]] && RESULT+="read-back failed: $(last_error "$READ_LOG")"
    RC=$STUDY_RC
    if ((STUDY_RC == 0 && READ_RC != 0)); then
        STATUS="ERROR(read $READ_RC)"
    else
        STATUS=$(status_of "$(tag VERDICT "$READ_LOG")")
        ((STUDY_RC != 0 && STUDY_RC != 124 && STUDY_RC != 137)) && RESULT+="; study: $(last_error "$LOG")"
    fi
    record 6 "packed study" "$RESULT" "$GOAL_STUDY" "$STATUS" "$STUDY_SECS"
fi

# 7 the table ---------------------------------------------------------------------------------------------------------------
TOTAL=$(($(date +%s) - T0))
md() { printf '%s' "$1" | sed 's/|/\\|/g'; }
TABLE=$(
    echo "| step | result | goal | status | seconds |"
    echo "|---|---|---|---|---|"
    for i in "${!T_STEP[@]}"; do
        printf '| %s %s | %s | %s | %s | %s |\n' "${T_STEP[$i]}" "$(md "${T_NAME[$i]}")" "$(md "${T_RESULT[$i]}")" \
            "$(md "${T_GOAL[$i]}")" "${T_STATUS[$i]}" "${T_SECONDS[$i]}"
    done
)
HEADER="GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown): ${TOTAL} s in all; logs in ${LOGDIR}"
echo
echo "$HEADER"
echo
echo "$TABLE"
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT" && printf '%s\n\n%s\n' "$HEADER" "$TABLE" >"$OUT/gpu_check.md"
fi
if [[ -z ${OUT:-} ]]; then
    rm -rf "$W/study/runs" # the logs stay in $W/logs
else
    rm -rf "$W"
fi
for s in "${T_STATUS[@]}"; do [[ $s == PASS ]] || exit 1; done
exit 0
