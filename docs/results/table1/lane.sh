#!/usr/bin/env bash
# Worker lane: pops "ALGO SEED" lines from queue.txt (under flock) and runs each to completion.
cd /work/runs
while true; do
  job=$(flock queue.lock bash -c 'line=$(head -n1 queue.txt); [ -n "$line" ] && sed -i 1d queue.txt; echo "$line"')
  [ -z "$job" ] && { echo "lane $1: queue empty $(date)"; exit 0; }
  set -- "$1" $job
  echo "lane $1: start $2 s$3 $(date)"
  start=$(date +%s)
  bash run_table1.sh "$2" "$3" > "log_$2_s$3.txt" 2>&1
  echo "lane $1: done $2 s$3 rc=$? wall=$(( $(date +%s) - start ))s $(date)"
  set -- "$1"
done
