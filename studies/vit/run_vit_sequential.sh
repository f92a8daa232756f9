#!/usr/bin/env bash
# Resume a run_vit.sh run that started on Sequential (checkpoints resume only under the same configuration).
# Usage: bash run_vit_sequential.sh ALGO SEED. Environment: as for run_vit.sh beside this script (DATA_DIR required;
# RUNS_DIR, FL_SPARSE, SRC optional); EXECUTOR is set empty here.
EXECUTOR= exec bash "$(dirname "$0")/run_vit.sh" "$@"
