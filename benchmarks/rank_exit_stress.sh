#!/usr/bin/env bash
# How often a finished rank fails to exit 0: the ZeRO-3 launch test (2 CPU ranks, DeepSpeed, 8 steps, export)
# run N times in each of P parallel loops, so that the ranks compete for the cores as they do under CI's
# `pytest -n 2`. Prints one line per run and a total, and the runs whose log shows the exit abort
# ("terminate called without an active exception"; docs/TRAINING.md). Core dumps (ulimit -c) land in OUT.
# Each run is two launches: the module's ZeRO-2 reference run, then the ZeRO-3 run. To compare two checkouts side by
# side, start this script of each with P=1 at the same time.
#   bash benchmarks/rank_exit_stress.sh [N=15] [P=2] [OUT=/tmp/rank_exit_stress]
set -u
N=${1:-15}; P=${2:-2}; OUT=${3:-/tmp/rank_exit_stress}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's msf_scale, whatever is installed
rm -rf "$OUT" && mkdir -p "$OUT"
rm -f ~/.cache/torch_extensions/py3*_cpu/deepspeed_shm_comm/lock   # a build killed earlier leaves it: runs would wait
ulimit -c unlimited 2>/dev/null || true
loop() {
  local tag=$1
  mkdir -p "$OUT/cwd_$tag" && cd "$OUT/cwd_$tag" || exit 1
  for i in $(seq 1 "$N"); do
    PYTHONFAULTHANDLER=1 timeout 900 python -m pytest -x -q -p no:cacheprovider --rootdir="$REPO" \
      -c "$REPO/pyproject.toml" "$REPO/tests/train/test_launch.py" \
      -k "test_zero_trains_checkpoints_and_exports and 3" --basetemp="$OUT/bt_${tag}_$i" > "$OUT/log_${tag}_$i.txt" 2>&1
    rc=$?
    aborted=$(grep -c "terminate called without an active exception" "$OUT/log_${tag}_$i.txt")
    echo "loop $tag run $i: rc=$rc exit_aborts=$aborted $(date +%T)" | tee -a "$OUT/summary.txt"
    for c in core*; do [ -e "$c" ] && mv "$c" "$OUT/${c}_${tag}_$i"; done
  done
}
for p in $(seq 1 "$P"); do loop "$p" & done
wait
runs=$(wc -l < "$OUT/summary.txt"); failed=$(grep -vc "rc=0" "$OUT/summary.txt"); aborts=$(grep -c "exit_aborts=[1-9]" "$OUT/summary.txt")
echo "$runs runs, $failed failed, $aborts with the exit abort (logs: $OUT)"
