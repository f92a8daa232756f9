#!/usr/bin/env bash
# Table 1 (4 GB column) runs for fl_sparse issue 7; resumable: re-run this script to continue.
# (Copied from the machine that ran Table 1; paths are that machine's: /work/data, /work/runs, /work/main.)
# Usage: bash /work/runs/run_table1.sh ALGO SEED
set -u
cd /work/runs
export PYTHONPATH=/work/runs/src  # a frozen snapshot of fl_sparse, so edits in /work/main do not reach running jobs
# Variants, into their own MLflow experiments (so the main report never mixes them in):
#   ALGO+compat    the reference code's double softmax            -> table1_reference_softmax
#   ALGO+nobudget  the planned rounds, no communication budget    -> table1_full_schedule
algo=${1%+*}; variant=${1#"$algo"}; seed=$2; dir=ck/$1-4gb-s${seed}; experiment=table1
extra=()
case "$variant" in
  +compat) experiment=table1_reference_softmax
           extra=(--bind "CrossEntropy.reference_softmax = True" --bind "Proximal.reference_softmax = True") ;;
  +nobudget) experiment=table1_full_schedule; extra=(--bind "Experiment.budget_gb = None") ;;
esac
args=(run "$algo" table1_4gb --data-dir /work/data --seed "$seed" --checkpoint-every 10
      --tracking-uri sqlite:////work/runs/mlflow.db --experiment-name "$experiment" "${extra[@]}")
if [ -d "$dir" ] && ls "$dir"/round-* >/dev/null 2>&1; then
  /work/main/.venv/bin/fl-sparse "${args[@]}" --threads 1 --resume "$dir"
else
  /work/main/.venv/bin/fl-sparse "${args[@]}" --threads 1 --checkpoint-dir "$dir"
fi
