#!/usr/bin/env bash
# The paper's byte counting at 4 GB (issue 14 (a)): the budget is FedDST's measured 200-round total under
# KnownMaskSparse. Usage: bash run_kms.sh ALGO+kms SEED (e.g. pffdst_wo_smr+kms 0).
KMS_BUDGET_GB=5.4216 exec bash "$(dirname "$0")/run_table1.sh" "$@"
