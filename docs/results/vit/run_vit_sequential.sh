#!/usr/bin/env bash
# Resume a run_vit.sh run that started on Sequential (checkpoints resume only under the same configuration).
EXECUTOR= exec bash /work/runs/run_vit.sh "$@"
