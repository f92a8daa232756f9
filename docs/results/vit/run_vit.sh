#!/usr/bin/env bash
# The transformer experiment of issue 17 (item 3): one run of ALGO with SEED on cifar10_vit at s = 0.8 under
# FedDST's measured 200-round budget (registry/vit_cifar10_budget.gin). Resumable: re-run it to continue.
# Executor: EXECUTOR (default vectorized: 1.2x Sequential on this ViT, docs/benchmarks.md). Usage: bash run_vit.sh ALGO SEED   for ALGO in fedavg feddst pffdst pffdst_wo_pf pffdst_wo_smr sparsyfed
# Paths are this workplace's (/work/data, /work/runs); SRC is a frozen snapshot of fl_sparse (as for Table 1)
# that must include the ViT32 model and the budget rule (commit a9b0a1a or later).
set -u
cd /work/runs
export PYTHONPATH=${SRC:-/work/runs/src} HF_HUB_OFFLINE=1
algo=$1; seed=$2; dir=ck/vit-$algo-s$seed
args=(run "$algo" vit_cifar10_budget --data-dir /work/data --seed "$seed" --checkpoint-every 10
      --tracking-uri sqlite:////work/runs/mlflow.db --experiment-name vit_cifar10)
# EXECUTOR= (empty) leaves the preset's Sequential, with no --executor flag (as the first FedDST run started).
[ -n "${EXECUTOR-vectorized}" ] && args+=(--executor "${EXECUTOR-vectorized}")
if [ -d "$dir" ] && ls "$dir"/round-* >/dev/null 2>&1; then
  /work/main/.venv/bin/python -m fl_sparse.cli "${args[@]}" --threads 1 --resume "$dir"
else
  /work/main/.venv/bin/python -m fl_sparse.cli "${args[@]}" --threads 1 --checkpoint-dir "$dir"
fi
