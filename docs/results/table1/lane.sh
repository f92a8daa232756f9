#!/usr/bin/env bash
# Worker lane: pops one "SCRIPT ARGS..." line from queue.txt (under flock) at a time and runs it to completion,
# e.g. "run_table1.sh pffdst 3" or "run_vit.sh feddst 0". Usage: bash lane.sh LANE_NAME
cd /work/runs
while true; do
  job=$(flock queue.lock bash -c 'line=$(head -n1 queue.txt); [ -n "$line" ] && sed -i 1d queue.txt; echo "$line"')
  [ -z "$job" ] && { echo "lane $1: queue empty $(date)"; exit 0; }
  echo "lane $1: start $job $(date)"
  start=$(date +%s)
  bash $job > "log_${job//[ .\/]/_}.txt" 2>&1
  echo "lane $1: done $job rc=$? wall=$(( $(date +%s) - start ))s $(date)"
done
