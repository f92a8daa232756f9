#!/usr/bin/env bash
# The paper's byte counting at 4 GB (issue 14 (a)): the budget is FedDST's measured 200-round total under KnownMaskSparse.
KMS_BUDGET_GB=5.4216 exec bash /work/runs/run_table1.sh "$@"
