#!/usr/bin/env bash
# Tag the FINISHED runs of an experiment with the snapshot's commit (SRC/COMMIT), then export them as text.
# Usage: bash finish.sh EXPERIMENT OUT_DIR
# Environment (no path of one machine is written here; relative paths are taken from the current directory):
#   RUNS_DIR   the folder holding the MLflow store mlflow.db, as run_table1.sh and run_vit.sh use it; default ./runs
#   FL_SPARSE  the fl-sparse command; default the repository's .venv/bin/fl-sparse if it exists, else fl-sparse on PATH
#   PYTHON     a Python with mlflow installed; default the repository's .venv/bin/python if it exists, else python3
#   SRC        the frozen snapshot the runs imported, its commit in SRC/COMMIT; default RUNS_DIR/src. Without that
#              file the commit is the checkout's (git rev-parse HEAD of this repository)
set -eu
out=$(realpath -m "$2")  # OUT_DIR as the caller meant it, before the cd
repo=$(cd "$(dirname "$0")/../.." && pwd)
runs=$(realpath -m "${RUNS_DIR:-runs}")
[ -f "$runs/mlflow.db" ] || { echo "finish.sh: no MLflow store at $runs/mlflow.db (set RUNS_DIR)" >&2; exit 2; }
if [ -z "${FL_SPARSE:-}" ]; then
  if [ -x "$repo/.venv/bin/fl-sparse" ]; then FL_SPARSE=$repo/.venv/bin/fl-sparse; else FL_SPARSE=fl-sparse; fi
fi
case "$FL_SPARSE" in */*) FL_SPARSE=$(realpath -m "$FL_SPARSE") ;; esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
case "$PYTHON" in */*) PYTHON=$(realpath -m "$PYTHON") ;; esac
src=$(realpath -m "${SRC:-$runs/src}")
if [ -f "$src/COMMIT" ]; then commit=$(tr -d '[:space:]' < "$src/COMMIT"); else commit=$(git -C "$repo" rev-parse HEAD); fi
cd "$runs"
"$PYTHON" - "$1" "sqlite:///$runs/mlflow.db" "$commit" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[2])
experiment = client.get_experiment_by_name(sys.argv[1])
commit = sys.argv[3]
for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'"):
    if "commit" not in run.data.tags:
        client.set_tag(run.info.run_id, "commit", commit)
        print("tagged", run.info.run_name, commit[:7])
PY
"$FL_SPARSE" export "$out" --tracking-uri "sqlite:///$runs/mlflow.db" --experiment-name "$1"
