#!/usr/bin/env bash
# Worker lane: pops "ALGO SEED [BUDGET]" lines from queue.txt (under flock) and runs each to completion.
cd /work/runs
while true; do
  job=$(flock queue.lock bash -c 'line=$(head -n1 queue.txt); [ -n "$line" ] && sed -i 1d queue.txt; echo "$line"')
  [ -z "$job" ] && { echo "lane $1: queue empty $(date)"; exit 0; }
  echo "lane $1: start $job $(date)"
  start=$(date +%s)
  bash run_table1.sh $job > "log_${job// /_}.txt" 2>&1
  echo "lane $1: done $job rc=$? wall=$(( $(date +%s) - start ))s $(date)"
done
