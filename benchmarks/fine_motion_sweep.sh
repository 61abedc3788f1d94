#!/usr/bin/env bash
# One GPU call (about 9 min): why the SSMs do not learn the micro preset. Renders the preset once, then trains
# every condition below in memory (benchmarks/calibrate_micro.py), all at once on the one GPU, the SSMs as replayed
# CUDA graphs (--graph; one condition also eagerly, as a check that the graph trains the same). Logs and JSON are
# packed into $OUT/sweep.tgz every 30 s (the device returns at most 8 files), so a run stopped at the limit still
# returns its partial curves.
#   OUT=/tmp/sweep bash benchmarks/fine_motion_sweep.sh
# Knobs: SET (why: call 4's conditions | speed: call 6's), EPOCHS (40), END (seconds for everything, 530), DATA (calibrate_micro --set flags; default the preset).
set -uo pipefail
OUT=${OUT:?set OUT}; EPOCHS=${EPOCHS:-40}; END=${END:-530}; DATA=${DATA:-}
case ${SET:=why} in why|speed) ;; *) echo "unknown SET=$SET (why | speed)" >&2; exit 2 ;; esac   # before any background job
CACHE=${CACHE:-/tmp/microcache}; W=${W:-/tmp/sweepwork}; mkdir -p "$OUT" "$CACHE" "$W"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
T0=$SECONDS
CAL="python benchmarks/calibrate_micro.py --cache $CACHE $DATA"
( while true; do tar czf "$OUT/.s.tgz" -C "$W" . 2>/dev/null && mv "$OUT/.s.tgz" "$OUT/sweep.tgz"; sleep 30; done ) &
PACKER=$!
$CAL --workers 16 --render-only > "$W/render.log" 2>&1
echo "rendered at $((SECONDS - T0)) s"
LEFT=$((END - (SECONDS - T0)))
run() {  # name args...
  local name=$1; shift
  timeout $LEFT $CAL --workers 1 --eval-every 5 "$@" --out "$W/$name.json" > "$W/$name.log" 2>&1 &
}
CONV="--arch stem=conv --arch stem_temporal_kernel=3"
S="--epochs $EPOCHS --graph"
case $SET in
why)    # call 4: stem, lr, theta, temporal sampling
  run cnn3d --model cnn3d --epochs 150 --lr 2e-3 --eval-every 10
  run msf_conv3_lr5e-4 --model msf_mamba $CONV --lr 5e-4 $S
  run msf_conv3_lr5e-4_eager --model msf_mamba $CONV --lr 5e-4 --epochs $EPOCHS
  run msf_patch_lr5e-4 --model msf_mamba --lr 5e-4 $S
  run vm_patch_lr5e-4 --model videomamba --lr 5e-4 $S
  run vm_conv3_lr5e-4 --model videomamba $CONV --lr 5e-4 $S
  run msf_conv3_lr2.5e-4 --model msf_mamba $CONV --lr 2.5e-4 $S
  run msf_conv3_lr1e-3 --model msf_mamba $CONV --lr 1e-3 $S
  run msf_patch_lr2.5e-4 --model msf_mamba --lr 2.5e-4 $S
  run msf_conv3_lr5e-4_theta0 --model msf_mamba $CONV --lr 5e-4 --arch fusion_theta=0 $S
  run msf_conv3_lr5e-4_fixed --model msf_mamba $CONV --lr 5e-4 --temporal fixed $S
  run plus_conv3_lr5e-4 --model msf_mamba_plus $CONV --lr 5e-4 $S
  ;;
speed)  # call 6: what makes the conv-stem SSM learn faster (36 epochs at the 5e-4 control's settings)
  run msf_conv3_lr5e-4 --model msf_mamba $CONV --lr 5e-4 $S
  run msf_conv3_diff --model msf_mamba $CONV --arch stem_input=rgb_diff --lr 5e-4 $S
  run msf_conv3_max --model msf_mamba $CONV --arch pool=max --lr 5e-4 $S
  run msf_conv3_diff_max --model msf_mamba $CONV --arch stem_input=rgb_diff --arch pool=max --lr 5e-4 $S
  run vm_conv3_diff_max --model videomamba $CONV --arch stem_input=rgb_diff --arch pool=max --lr 5e-4 $S
  run msf_conv3_lr1e-3_warm25 --model msf_mamba $CONV --lr 1e-3 --warmup 0.25 $S
  run msf_conv3_depth12 --model msf_mamba $CONV --arch depth=12 --lr 5e-4 $S
  ;;
esac
wait $(jobs -p | grep -v "^$PACKER$") 2>/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv > "$W/gpu.txt" 2>&1
kill $PACKER; tar czf "$OUT/sweep.tgz" -C "$W" .
for f in "$W"/*.log; do echo "== $f"; grep -m1 "capture failed" "$f"; tail -n 2 "$f"; done
