#!/usr/bin/env bash
# The transformer experiment of issue 17 (item 3): one run of ALGO with SEED on cifar10_vit at s = 0.8 under
# FedDST's measured 200-round budget (registry/vit_cifar10_budget.gin). Resumable: re-run it to continue.
# Usage: bash run_vit.sh ALGO SEED   for ALGO in fedavg feddst pffdst pffdst_wo_pf pffdst_wo_smr sparsyfed
# Environment (no path of one machine is written here; relative paths are taken from the current directory):
#   DATA_DIR   required: the directory holding cifar-10-batches-py (the full CIFAR-10)
#   RUNS_DIR   where the MLflow store (mlflow.db), the checkpoints (ck/) and the logs go; default ./runs
#   FL_SPARSE  the fl-sparse command; default the repository's .venv/bin/fl-sparse if it exists, else fl-sparse on PATH
#   SRC        a frozen snapshot of the code, put on PYTHONPATH (as for Table 1); it must include the ViT32 model and
#              the budget rule (commit a9b0a1a or later); default RUNS_DIR/src if that exists, else none
#   EXECUTOR   default vectorized (1.2x Sequential on this ViT, docs/benchmarks.md); empty: the preset's Sequential
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
[ -n "${DATA_DIR:-}" ] || { echo "run_vit.sh: set DATA_DIR to the directory holding cifar-10-batches-py" >&2; exit 2; }
data=$(realpath -m "$DATA_DIR")
runs=$(realpath -m "${RUNS_DIR:-runs}")
if [ -z "${FL_SPARSE:-}" ]; then
  if [ -x "$repo/.venv/bin/fl-sparse" ]; then FL_SPARSE=$repo/.venv/bin/fl-sparse; else FL_SPARSE=fl-sparse; fi
fi
case "$FL_SPARSE" in */*) FL_SPARSE=$(realpath -m "$FL_SPARSE") ;; esac
if [ -n "${SRC:-}" ]; then
  src=$(realpath -m "$SRC"); [ -d "$src" ] || { echo "run_vit.sh: SRC=$SRC is not a directory" >&2; exit 2; }
elif [ -d "$runs/src" ]; then src=$runs/src; else src=; fi
mkdir -p "$runs" && cd "$runs" || exit 2
[ -n "$src" ] && export PYTHONPATH=$src
export HF_HUB_OFFLINE=1
algo=$1; seed=$2; dir=ck/vit-$algo-s$seed
args=(run "$algo" vit_cifar10_budget --data-dir "$data" --seed "$seed" --checkpoint-every 10
      --tracking-uri "sqlite:///$runs/mlflow.db" --experiment-name vit_cifar10)
# EXECUTOR= (empty) leaves the preset's Sequential, with no --executor flag (as the first FedDST run started).
[ -n "${EXECUTOR-vectorized}" ] && args+=(--executor "${EXECUTOR-vectorized}")
if [ -d "$dir" ] && ls "$dir"/round-* >/dev/null 2>&1; then
  "$FL_SPARSE" "${args[@]}" --threads 1 --resume "$dir"
else
  "$FL_SPARSE" "${args[@]}" --threads 1 --checkpoint-dir "$dir"
fi
