#!/usr/bin/env bash
# Table 1 runs (issue 14); resumable: re-run to continue. Usage: bash run_table1.sh ALGO[+variant] SEED [BUDGET]
# Environment (no path of one machine is written here; relative paths are taken from the current directory):
#   DATA_DIR   required: the directory holding cifar-10-batches-py (the full CIFAR-10)
#   RUNS_DIR   where the MLflow store (mlflow.db), the checkpoints (ck/) and the logs go; default ./runs
#   FL_SPARSE  the fl-sparse command; default the repository's .venv/bin/fl-sparse if it exists, else fl-sparse on PATH
#   SRC        a frozen snapshot of the code (a `git worktree` of main, its commit in SRC/COMMIT), put on PYTHONPATH
#              so that edits to the checkout never reach running jobs; default RUNS_DIR/src if that exists, else none
#   KMS_BUDGET_GB  the +kms variant's budget in GB (unset: none; run_kms.sh sets it)
# Variants (each goes to its own MLflow experiment, so table1_<budget> never mixes them in):
#   +compat    the reference's double softmax                 +nobudget  no budget: the full round schedule
#   +kms       the paper's byte counting: KnownMaskSparse on the uplink; budget KMS_BUDGET_GB (unset: none)
#   +refstart  stage 2 from the best stage-1 model on the TEST set (the reference's model selection)
#   +refsched  the reference's PFFDST schedule (the `~` on bools)   +refboth  both reference behaviours
#   +tiebreak  FedDST's server prune breaks zero-value ties by a seeded draw
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
[ -n "${DATA_DIR:-}" ] || { echo "run_table1.sh: set DATA_DIR to the directory holding cifar-10-batches-py" >&2; exit 2; }
data=$(realpath -m "$DATA_DIR")
runs=$(realpath -m "${RUNS_DIR:-runs}")
if [ -z "${FL_SPARSE:-}" ]; then
  if [ -x "$repo/.venv/bin/fl-sparse" ]; then FL_SPARSE=$repo/.venv/bin/fl-sparse; else FL_SPARSE=fl-sparse; fi
fi
case "$FL_SPARSE" in */*) FL_SPARSE=$(realpath -m "$FL_SPARSE") ;; esac
if [ -n "${SRC:-}" ]; then
  src=$(realpath -m "$SRC"); [ -d "$src" ] || { echo "run_table1.sh: SRC=$SRC is not a directory" >&2; exit 2; }
elif [ -d "$runs/src" ]; then src=$runs/src; else src=; fi
mkdir -p "$runs" && cd "$runs" || exit 2
[ -n "$src" ] && export PYTHONPATH=$src
export HF_HUB_OFFLINE=1
algo=${1%+*}; variant=${1#"$algo"}; seed=$2; budget=${3:-4gb}; dir=ck/$1-$budget-s${seed}; experiment=table1_$budget
extra=()
refstart=(--bind "FreezeAtStage.reference_stage2_from_best_test = True")
refsched=(--bind "TwoStage.reference_schedule = True")
case "$variant" in
  +compat) experiment=table1_reference_softmax
           extra=(--bind "CrossEntropy.reference_softmax = True" --bind "Proximal.reference_softmax = True") ;;
  +nobudget) experiment=table1_full_schedule; extra=(--bind "Experiment.budget_gb = None") ;;
  +kms) experiment=table1_${budget}_known_mask
        case "$algo" in pffdst|pffdst_wo_smr) extra=(--bind "FreezeAware.inner = @KnownMaskSparse()") ;;
                        *) extra=(--bind "Experiment.uplink_codec = @KnownMaskSparse()") ;; esac
        extra+=(--bind "Experiment.budget_gb = ${KMS_BUDGET_GB:-None}") ;;
  +refstart) experiment=table1_${budget}_reference_start; extra=("${refstart[@]}") ;;
  +refsched) experiment=table1_${budget}_reference_schedule; extra=("${refsched[@]}") ;;
  +refboth) experiment=table1_${budget}_reference_both; extra=("${refstart[@]}" "${refsched[@]}") ;;
  +tiebreak) experiment=table1_${budget}_tie_break; extra=(--bind "ClientReadjust.random_tie_break = True") ;;
  "") ;;
  *) echo "unknown variant $variant" >&2; exit 2 ;;
esac
args=(run "$algo" table1_$budget --data-dir "$data" --seed "$seed" --checkpoint-every 10
      --tracking-uri "sqlite:///$runs/mlflow.db" --experiment-name "$experiment" "${extra[@]}")
if [ -d "$dir" ] && ls "$dir"/round-* >/dev/null 2>&1; then
  "$FL_SPARSE" "${args[@]}" --threads 1 --resume "$dir"
else
  "$FL_SPARSE" "${args[@]}" --threads 1 --checkpoint-dir "$dir"
fi
