#!/usr/bin/env bash
# Worker lane: pops one "SCRIPT ARGS..." line from RUNS_DIR/queue.txt (under flock on RUNS_DIR/queue.lock) at a
# time and runs it to completion, e.g. "run_table1.sh pffdst 3" or "run_vit.sh feddst 0"; each job's output goes
# to RUNS_DIR/log_<job>.txt. Usage: bash lane.sh LANE_NAME
# SCRIPT is looked up beside this script, then in the other study folders (studies/*/), else taken as a path
# from RUNS_DIR.
# Environment (no path of one machine is written here; relative paths are taken from the current directory):
#   RUNS_DIR   the folder holding queue.txt and the logs, passed on to the jobs; default ./runs
#   DATA_DIR, FL_SPARSE, SRC, EXECUTOR, KMS_BUDGET_GB pass through to the jobs (see run_table1.sh, run_vit.sh);
#   the lane makes relative RUNS_DIR, DATA_DIR, FL_SPARSE and SRC absolute first, since it works from RUNS_DIR.
here=$(cd "$(dirname "$0")" && pwd)
lane=$1
export RUNS_DIR=$(realpath -m "${RUNS_DIR:-runs}")
[ -n "${DATA_DIR:-}" ] && export DATA_DIR=$(realpath -m "$DATA_DIR")
[ -n "${SRC:-}" ] && export SRC=$(realpath -m "$SRC")
case "${FL_SPARSE:-}" in */*) export FL_SPARSE=$(realpath -m "$FL_SPARSE") ;; esac
cd "$RUNS_DIR" || exit 2
resolve() {  # the script a queue line names: beside this one, in a sibling study folder, or as given
  local d
  for d in "$here" "$here"/../*; do [ -f "$d/$1" ] && { realpath "$d/$1"; return; }; done
  echo "$1"
}
while true; do
  job=$(flock queue.lock bash -c 'line=$(head -n1 queue.txt); [ -n "$line" ] && sed -i 1d queue.txt; echo "$line"')
  [ -z "$job" ] && { echo "lane $lane: queue empty $(date)"; exit 0; }
  echo "lane $lane: start $job $(date)"
  start=$(date +%s)
  read -r script args <<< "$job"
  bash "$(resolve "$script")" $args > "log_${job//[ .\/]/_}.txt" 2>&1
  echo "lane $lane: done $job rc=$? wall=$(( $(date +%s) - start ))s $(date)"
done
