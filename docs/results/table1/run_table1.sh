#!/usr/bin/env bash
# Table 1 runs (issue 14); resumable: re-run to continue. Usage: bash run_table1.sh ALGO[+variant] SEED [BUDGET]
# Code: a frozen snapshot in /work/runs/src (commit in src/COMMIT), so edits in /work/main never reach running jobs.
# Variants (each goes to its own MLflow experiment, so table1_<budget> never mixes them in):
#   +compat    the reference's double softmax                 +nobudget  no budget: the full round schedule
#   +kms       the paper's byte counting: KnownMaskSparse on the uplink; budget KMS_BUDGET_GB (unset: none)
#   +refstart  stage 2 from the best stage-1 model on the TEST set (the reference's model selection)
#   +refsched  the reference's PFFDST schedule (the `~` on bools)   +refboth  both reference behaviours
#   +tiebreak  FedDST's server prune breaks zero-value ties by a seeded draw
set -u
cd /work/runs
export PYTHONPATH=/work/runs/src HF_HUB_OFFLINE=1
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
args=(run "$algo" table1_$budget --data-dir /work/data --seed "$seed" --checkpoint-every 10
      --tracking-uri sqlite:////work/runs/mlflow.db --experiment-name "$experiment" "${extra[@]}")
if [ -d "$dir" ] && ls "$dir"/round-* >/dev/null 2>&1; then
  /work/main/.venv/bin/python -m fl_sparse.cli "${args[@]}" --threads 1 --resume "$dir"
else
  /work/main/.venv/bin/python -m fl_sparse.cli "${args[@]}" --threads 1 --checkpoint-dir "$dir"
fi
