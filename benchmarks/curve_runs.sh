#!/usr/bin/env bash
# The measurement pipeline on one GPU (issue 15), in ~6-8 minutes of an H200:
#   1. short training runs of every variant x size, all nine in parallel on the one GPU (the main job's recipe,
#      configs/tiny/cpu_demo.yaml, on each size's defaults: synthetic 8 x 32 x 32 data, batch 16, EPOCHS epochs);
#   2. their batch-1 latency at their own input shape (eager + CUDA graph) -> the accuracy-vs-inference-time curve;
#   3. the scaling report of those runs (HTML + Markdown);
#   4. the 9-model latency table at 8 x 224 x 224 (eager and CUDA graph rows, then torch.compile rows), within a hard
#      wall-clock budget of BUDGET_S seconds (benchmarks/bench_latency.py: rows predicted to overrun are written as
#      skipped, a row that overruns is stopped; one progress line per row).
# Usage (repository root; python with torch + CUDA + mamba-ssm, the package on PYTHONPATH):
#   bash benchmarks/curve_runs.sh OUT
# Knobs (environment): PARTS="curve table" (either alone splits the work in two commands) EPOCHS=3 BUDGET_S=300 RUNS_PER=50 VARIANTS="videomamba msf_mamba msf_mamba_plus"
#   SIZES="tiny small base" WORK=/tmp/msf_curve; BENCH_ARGS (more bench_latency.py flags, e.g. "--compile-reserve-s 120");
#   for a CPU smoke test also TRAIN_ARGS="--max-steps 2"
#   SYNTH_ARGS="--train-per-class 4 --test-per-class 2" RUN_MODES=eager BENCH_ARGS="--frames 4 --img-size 32 --modes eager"
# OUT receives at most 8 files: latency.csv/.json (the 224 table, written into OUT after every row, so a run killed
# at any point keeps its finished rows), curve.png/.svg/.csv, report.html, summary.md and extras.tar.gz (the runs'
# logs, metrics and evals, their own latency.json, the table's log); with PARTS=table alone also latency.log (the
# table's progress, tee'd into OUT as it is printed). Nothing is hidden behind a tail: every progress line goes to
# stdout as it is printed. Whatever happened (a failed step, SIGTERM), the EXIT trap still packs extras.tar.gz.
set -euo pipefail
OUT=${1:?usage: bash benchmarks/curve_runs.sh OUT}
EPOCHS=${EPOCHS:-3}
BUDGET_S=${BUDGET_S:-300}
RUNS_PER=${RUNS_PER:-50}
VARIANTS=${VARIANTS:-"videomamba msf_mamba msf_mamba_plus"}
SIZES=${SIZES:-"tiny small base"}
WORK=${WORK:-/tmp/msf_curve}
PY=${PYTHON:-python}
mkdir -p "$OUT" "$WORK/runs" "$WORK/logs"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

PARTS=${PARTS:-"curve table"}
finish() {   # on every exit (normal, a failed command under set -e, SIGTERM/SIGINT): pack what exists, never fail
  local rc=$?
  trap - EXIT
  for f in curve/curve.png curve/curve.svg curve/curve.csv report/report.html report/summary.md; do
    [[ -f "$WORK/$f" && ! -f "$OUT/$(basename "$f")" ]] && cp "$WORK/$f" "$OUT/" || true
  done
  tar czf "$OUT/extras.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d lat_runs \
    runs/*/{config.yaml,run_meta.json,metrics.jsonl,eval.json,final_metrics.json} 2>/dev/null) 2>/dev/null || true
  [[ -f "$WORK/report/summary.md" ]] && cat "$WORK/report/summary.md" || true
  stamp "done (exit $rc) -> $OUT: $(ls "$OUT" | tr '\n' ' ')"
  exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
if [[ " $PARTS " == *" curve "* ]]; then
$PY -c "import matplotlib, fvcore, tabulate" || { echo "needs matplotlib, fvcore and tabulate" >&2; exit 1; }
stamp "data"
$PY -m msf_scale.cli data synth --out "$WORK/data" ${SYNTH_ARGS:-} > "$WORK/logs/data.log" 2>&1   # once, before the parallel runs

stamp "training: $VARIANTS x $SIZES, $EPOCHS epochs each, in parallel"
pids=()
for v in $VARIANTS; do
  for s in $SIZES; do
    $PY msf_scale/train.py --config msf_scale/configs/tiny/cpu_demo.yaml --size "$s" --variant "$v" \
      --data "$WORK/data" --output-dir "$WORK/runs/${v}_${s}" --epochs "$EPOCHS" --train.eval_every 1 \
      --log.progress false --log.tensorboard false --data.num_workers 1 ${TRAIN_ARGS:-} > "$WORK/logs/${v}_${s}.log" 2>&1 &
    pids+=("$!")
  done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
stamp "training done: $failed failed (logs in extras.tar.gz)"

stamp "latency of the runs at their own shape"
$PY -m msf_scale.cli latency --runs "$WORK/runs" --modes "${RUN_MODES:-eager,graph}" --measures clip --runs-per "$RUNS_PER" \
  --out "$WORK/lat_runs" > "$WORK/logs/lat_runs.log" 2>&1 || tail -5 "$WORK/logs/lat_runs.log"
$PY -m msf_scale.cli curve --runs "$WORK/runs" --latency "$WORK/lat_runs/latency.json" --out "$WORK/curve"
$PY -m msf_scale.cli report --runs "$WORK/runs" --latency "$WORK/lat_runs/latency.json" --out "$WORK/report"
cp "$WORK/curve/curve."{png,svg,csv} "$WORK/report/report.html" "$WORK/report/summary.md" "$OUT/"
fi

if [[ " $PARTS " == *" table "* ]]; then
# the log goes into OUT itself when there is room (8 files come back from the GPU machine), else into extras
if [[ " $PARTS " == *" curve "* ]]; then TABLE_LOG="$WORK/logs/lat224.log"; else TABLE_LOG="$OUT/latency.log"; fi
stamp "9-model latency table (8 x 224 x 224 unless BENCH_ARGS says otherwise), hard budget ${BUDGET_S} s -> $OUT/latency.{csv,json}"
rc=0
PYTHONUNBUFFERED=1 $PY benchmarks/bench_latency.py --out "$OUT" --runs-per "$RUNS_PER" --budget-s "$BUDGET_S" ${BENCH_ARGS:-} \
  2>&1 | tee "$TABLE_LOG" || rc=$?
stamp "table: exit $rc"
exit "$rc"
fi
