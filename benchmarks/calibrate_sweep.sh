#!/usr/bin/env bash
# One GPU call: calibrate the micro preset with cnn3d over several difficulty settings, and explore the SSMs on
# two of them, all in memory (benchmarks/calibrate_micro.py), in parallel on one GPU. Logs and JSON under $OUT.
#   OUT=/tmp/cal EPOCHS=150 SSM_EPOCHS=100 bash benchmarks/calibrate_sweep.sh
set -uo pipefail
OUT=${OUT:?set OUT}; EPOCHS=${EPOCHS:-150}; SSM_EPOCHS=${SSM_EPOCHS:-100}; LIMIT=${LIMIT:-520}
CACHE=${CACHE:-/tmp/microcache}; mkdir -p "$OUT" "$CACHE"
export OMP_NUM_THREADS=1
CAL="python benchmarks/calibrate_micro.py --cache $CACHE --workers 2"
declare -A DATA=(
  [c0]=""
  [c1]="--set num_frames=16"
  [c2]="--set gesture_px=20"
  [c3]="--set gesture_px=20 --set num_frames=16"
  [c4]="--set distractors=0"
  [c5]="--set train_per_class=144"
  [c6]="--set gesture_px=20 --set object_px=14 --set num_frames=16"
  [c7]="--set gesture_px=28 --set num_frames=16"
)
for c in "${!DATA[@]}"; do   # render, then the cnn3d calibration of that setting
  ( $CAL ${DATA[$c]} --render-only > "$OUT/render_$c.log" 2>&1 && touch "$OUT/.ready_$c" &&
    timeout $LIMIT $CAL ${DATA[$c]} --model cnn3d --epochs $EPOCHS --lr 2e-3 --out "$OUT/cnn3d_$c.json" \
      > "$OUT/cnn3d_$c.log" 2>&1 ) &
done
ssm() {  # name data-key model args...
  local name=$1 c=$2; shift 2
  ( while [ ! -e "$OUT/.ready_$c" ]; do sleep 2; done
    timeout $LIMIT $CAL ${DATA[$c]} --epochs $SSM_EPOCHS "$@" --out "$OUT/${name}_$c.json" > "$OUT/${name}_$c.log" 2>&1 ) &
}
for c in c0 c3; do
  ssm msf $c --model msf_mamba --lr 2e-3
  ssm msfconv3 $c --model msf_mamba --arch stem=conv --arch stem_temporal_kernel=3 --lr 2e-3
  ssm vmconv3 $c --model videomamba --arch stem=conv --arch stem_temporal_kernel=3 --lr 2e-3
done
ssm msfconv3lr5 c3 --model msf_mamba --arch stem=conv --arch stem_temporal_kernel=3 --lr 5e-4
wait
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for f in "$OUT"/*.log; do echo "== $f"; tail -n 3 "$f"; done
