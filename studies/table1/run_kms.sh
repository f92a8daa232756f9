#!/usr/bin/env bash
# The paper's byte counting at 4 GB (issue 14 (a)): the budget is FedDST's measured 200-round total under
# KnownMaskSparse. Usage: bash run_kms.sh ALGO+kms SEED (e.g. pffdst_wo_smr+kms 0).
# Environment: as for run_table1.sh beside this script (DATA_DIR required; RUNS_DIR, FL_SPARSE, SRC optional);
# KMS_BUDGET_GB is set here.
KMS_BUDGET_GB=5.4216 exec bash "$(dirname "$0")/run_table1.sh" "$@"
