#!/usr/bin/env bash
# Submit a study to a running Ray cluster as a Ray job, wait for it, exit with its status.
#
#   jobs/submit.sh STUDY_FILE [extra `dml-study run` arguments...]
#
#   RAY_API_SERVER_ADDRESS  the cluster's dashboard (job API), as `ray job submit` reads it; else
#   RAY_ADDRESS             (its fallback, as in Ray); default http://127.0.0.1:8265
#   MLFLOW_TRACKING_URI   forwarded to the job when set (where the runs are logged, as seen from the head node)
#   DML_STUDY_OUTPUT_DIR  forwarded when set and passed on as `--set output_dir=...`: the study folder's parent,
#                         an absolute path on the head node (a shared filesystem on a multi-node cluster)
#                         or an object-store URI (s3://bucket/runs; then set search.optuna_storage)
#
# The repository (minus .gitignore'd files and .git) is uploaded as the job's working directory, so a study
# file inside it and its search_spaces/ travel with the job; a study file outside it is passed by its absolute
# path, which the head node must see. The job runs `dml-study run STUDY_FILE ...` with the cluster's own
# `dml-study` (install the repository on every node). Token authentication: export RAY_AUTH_MODE=token here
# with the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "jobs/submit.sh: study file not found: '${1-}' (usage: jobs/submit.sh STUDY_FILE [dml-study run args...])" >&2
    exit 2
fi
if [[ -n "${DML_STUDY_OUTPUT_DIR:-}" && "$DML_STUDY_OUTPUT_DIR" != /* && "$DML_STUDY_OUTPUT_DIR" != *://* ]]; then
    echo "jobs/submit.sh: DML_STUDY_OUTPUT_DIR must be an absolute path on the cluster or a URI (s3://...), got '$DML_STUDY_OUTPUT_DIR'" >&2
    exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
study="$(cd "$(dirname "$1")" && pwd -P)/$(basename "$1")"
shift
case "$study" in
    "$repo"/*) study="${study#"$repo"/}" ;;  # relative to the uploaded working directory
esac

json_string() {  # $1 as a JSON string
    local s="${1//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}

env_vars=""
output_dir_args=()
if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
    env_vars="\"MLFLOW_TRACKING_URI\": $(json_string "$MLFLOW_TRACKING_URI")"
fi
if [[ -n "${DML_STUDY_OUTPUT_DIR:-}" ]]; then
    env_vars="${env_vars:+$env_vars, }\"DML_STUDY_OUTPUT_DIR\": $(json_string "$DML_STUDY_OUTPUT_DIR")"
    output_dir_args=(--set "output_dir=$DML_STUDY_OUTPUT_DIR")
fi
runtime_env="{\"env_vars\": {$env_vars}, \"excludes\": [\".git\", \".venv\"]}"

exec ray job submit \
    --address "${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}" \
    --working-dir "$repo" \
    --runtime-env-json "$runtime_env" \
    -- dml-study run "$study" ${output_dir_args[@]+"${output_dir_args[@]}"} "$@"
