#!/usr/bin/env bash
# Table 1 runs (issue 14); resumable: re-run to continue. Usage: bash run_table1.sh ALGO[+variant] SEED [BUDGET]
# Code: a frozen snapshot in /work/runs/src (commit in src/COMMIT), so edits in /work/main never reach running jobs.
set -u
cd /work/runs
export PYTHONPATH=/work/runs/src HF_HUB_OFFLINE=1
algo=${1%+*}; variant=${1#"$algo"}; seed=$2; budget=${3:-4gb}; dir=ck/$1-$budget-s${seed}; experiment=table1_$budget
extra=()
case "$variant" in
  +compat) experiment=table1_reference_softmax
           extra=(--bind "CrossEntropy.reference_softmax = True" --bind "Proximal.reference_softmax = True") ;;
  +nobudget) experiment=table1_full_schedule; extra=(--bind "Experiment.budget_gb = None") ;;
esac
args=(run "$algo" table1_$budget --data-dir /work/data --seed "$seed" --checkpoint-every 10
      --tracking-uri sqlite:////work/runs/mlflow.db --experiment-name "$experiment" "${extra[@]}")
if [ -d "$dir" ] && ls "$dir"/round-* >/dev/null 2>&1; then
  /work/main/.venv/bin/python -m fl_sparse.cli "${args[@]}" --threads 1 --resume "$dir"
else
  /work/main/.venv/bin/python -m fl_sparse.cli "${args[@]}" --threads 1 --checkpoint-dir "$dir"
fi
