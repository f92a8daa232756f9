#!/usr/bin/env bash
# Tag the FINISHED runs of an experiment with the snapshot's commit (src/COMMIT), then export them as text.
# Usage: bash finish.sh EXPERIMENT OUT_DIR
set -eu
out=$(realpath -m "$2")  # OUT_DIR as the caller meant it, before the cd
cd /work/runs
/work/main/.venv/bin/python - "$1" <<'PY'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient("sqlite:////work/runs/mlflow.db")
experiment = client.get_experiment_by_name(sys.argv[1])
commit = open("/work/runs/src/COMMIT").read().strip()
for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'"):
    if "commit" not in run.data.tags:
        client.set_tag(run.info.run_id, "commit", commit)
        print("tagged", run.info.run_name, commit[:7])
PY
/work/main/.venv/bin/fl-sparse export "$out" --tracking-uri sqlite:////work/runs/mlflow.db --experiment-name "$1"
