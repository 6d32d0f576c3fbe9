#!/usr/bin/env bash
# Runs independent GPU jobs side by side, one per GPU, on a machine with several GPUs
# (on one GPU they simply run one after another).
#
#   OUT=out JOBS_DEADLINE=540 bash benchmarks/gpu_jobs.sh JOBFILE
#
# JOBFILE: one job per line, `name timeout_s command...` (blank lines and lines starting
# with '#' are skipped). Jobs start in file order, each on the first idle GPU
# (CUDA_VISIBLE_DEVICES set to it), with its output in $OUT/jobs/<name>.txt and
# JOB_OUT=$OUT/jobs for files it writes. A job runs at most timeout_s seconds and never
# past JOBS_DEADLINE seconds after the script started (a job that would get less than
# 30 s is skipped). At the end $OUT/jobs is packed into $OUT/jobs.tgz (one file back),
# and $OUT/jobs.txt lists each job's GPU, exit status and duration.
# Build the extension first (benchmarks/gpu_check.sh build).
set -u
jobfile=${1:?usage: gpu_jobs.sh JOBFILE}
OUT=${OUT:-$PWD/gpu_out}
work=$OUT/jobs
mkdir -p "$work"
deadline=$(( $(date +%s) + ${JOBS_DEADLINE:-540} ))
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
[ "$ngpu" -ge 1 ] || { echo "no GPU visible" | tee -a "$OUT/jobs.txt"; exit 1; }
declare -A running  # GPU index -> pid of the job on it

idle_gpu() {
  local g pid
  for g in $(seq 0 $((ngpu - 1))); do
    pid=${running[$g]:-}
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo "$g"; return 0; fi
  done
  return 1
}

while read -r name limit cmd; do
  [ -z "${name:-}" ] && continue
  case $name in \#*) continue;; esac
  until gpu=$(idle_gpu); do sleep 2; done
  left=$(( deadline - $(date +%s) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$left" -lt 30 ]; then
    echo "job $name skipped: ${left} s left before the deadline" | tee -a "$OUT/jobs.txt"
    continue
  fi
  (
    start=$(date +%s)
    CUDA_VISIBLE_DEVICES=$gpu JOB_OUT=$work timeout "$limit" bash -c "$cmd" \
      > "$work/$name.txt" 2>&1 < /dev/null
    rc=$?
    echo "job $name gpu=$gpu rc=$rc in $(( $(date +%s) - start )) s (limit $limit s)" \
      | tee -a "$OUT/jobs.txt"
  ) &
  running[$gpu]=$!
  sleep 1
done < "$jobfile"
wait
tar czf "$OUT/jobs.tgz" -C "$OUT" jobs && rm -rf "$work"
