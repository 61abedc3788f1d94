#!/usr/bin/env bash
# One GPU call (about 9 min): calibrate the micro preset with cnn3d over several difficulty settings, pick the
# hardest setting at which cnn3d lands in 75-90% test top-1, and train the SSM conditions on it, all in memory
# (benchmarks/calibrate_micro.py) and in parallel on one GPU. Logs and JSON are packed into $OUT/cal.tgz every 30 s
# (the device returns at most 8 files), so a run stopped at its limit still returns its partial curves.
#   OUT=/tmp/cal bash benchmarks/calibrate_sweep.sh
set -uo pipefail
OUT=${OUT:?set OUT}; EPOCHS=${EPOCHS:-150}; SSM_EPOCHS=${SSM_EPOCHS:-40}; END=${END:-520}; PICK_BY=${PICK_BY:-200}
CACHE=${CACHE:-/tmp/microcache}; W=${W:-/tmp/calwork}; mkdir -p "$OUT" "$CACHE" "$W"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
T0=$SECONDS
CAL="python benchmarks/calibrate_micro.py --cache $CACHE --workers 2"
declare -A DATA=(
  [c0]="" [c1]="--set num_frames=16" [c2]="--set gesture_px=20" [c3]="--set gesture_px=20 --set num_frames=16"
  [c4]="--set distractors=0" [c5]="--set train_per_class=144"
  [c6]="--set gesture_px=20 --set object_px=14 --set num_frames=16" [c7]="--set gesture_px=28 --set num_frames=16"
)
( while true; do tar czf "$OUT/.cal.tgz" -C "$W" . 2>/dev/null && mv "$OUT/.cal.tgz" "$OUT/cal.tgz"; sleep 30; done ) &
PACKER=$!
for c in "${!DATA[@]}"; do   # render, then the cnn3d calibration of that setting
  ( $CAL ${DATA[$c]} --render-only > "$W/render_$c.log" 2>&1 &&
    timeout $((END - 10)) $CAL ${DATA[$c]} --model cnn3d --epochs $EPOCHS --lr 2e-3 --out "$W/cnn3d_$c.json" \
      > "$W/cnn3d_$c.log" 2>&1 ) &
done
while [ $(ls "$W"/cnn3d_*.json 2>/dev/null | wc -l) -lt ${#DATA[@]} ] && [ $((SECONDS - T0)) -lt $PICK_BY ]; do sleep 3; done
PICK=$(python - "$W" <<'PY'
import json, sys, glob, os
res = {os.path.basename(f)[6:-5]: json.load(open(f))["curve"][-1]["test_top1"] for f in glob.glob(sys.argv[1] + "/cnn3d_*.json")}
inband = [c for c, a in res.items() if 75 <= a <= 90]
print(min(inband, key=res.get) if inband else min(res, key=lambda c: abs(res[c] - 82.5)) if res else "c3")
PY
)
echo "picked $PICK at $((SECONDS - T0)) s" | tee "$W/pick.txt"
LEFT=$((END - (SECONDS - T0)))
ssm() {  # name seed args...
  local name=$1 seed=$2; shift 2
  timeout $LEFT $CAL ${DATA[$PICK]} --epochs $SSM_EPOCHS --eval-every 5 --seed $seed "$@" \
    --out "$W/${name}_s${seed}.json" > "$W/${name}_s${seed}.log" 2>&1 &
}
CONV="--arch stem=conv --arch stem_temporal_kernel=3"
ssm msf 0 --model msf_mamba
ssm vm 0 --model videomamba
ssm msf_conv3 0 --model msf_mamba $CONV
ssm vm_conv3 0 --model videomamba $CONV
ssm msf_conv3_theta0 0 --model msf_mamba $CONV --arch fusion_theta=0
ssm plus_conv3 0 --model msf_mamba_plus $CONV
ssm msf_conv3_lr5e-4 0 --model msf_mamba $CONV --lr 5e-4
for s in 1 2; do ( timeout $LEFT $CAL ${DATA[$PICK]} --model cnn3d --epochs $EPOCHS --lr 2e-3 --seed $s \
  --out "$W/cnn3d_pick_s$s.json" > "$W/cnn3d_pick_s$s.log" 2>&1 ) & done
wait $(jobs -p | grep -v "^$PACKER$") 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv > "$W/gpu.txt" 2>&1
kill $PACKER; tar czf "$OUT/cal.tgz" -C "$W" .
for f in "$W"/*.log; do echo "== $f"; tail -n 2 "$f"; done
