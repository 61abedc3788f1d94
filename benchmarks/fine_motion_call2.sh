#!/bin/bash
# The second fine-motion GPU call of 2026-12-01 (docs/BENCHMARKS.md, "Fine motion"), as run (then from an ignored
# copy of the tree): calibrate candidates of the micro preset with cnn3d in memory while train.py runs on candidate A.
# Usage, from the repository root with the package importable and OUT set: bash benchmarks/fine_motion_call2.sh
# (generator version 1 of the body scene; the current version places the body independently of the hand).
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
cal() { python benchmarks/calibrate_micro.py --epochs 25 "$@"; }
cal --set sway_px=3 --set hand_contrast=0.8 --set gesture_min_frac=0.7 > $OUT/cal_B.log 2>&1 &
cal --set sway_px=1 --set hand_contrast=1.0 --set gesture_min_frac=1.0 > $OUT/cal_C.log 2>&1 &
cal --set sway_px=2 --set hand_contrast=1.0 --set gesture_min_frac=0.8 > $OUT/cal_A.log 2>&1 &
python -c "from msf_scale.data.synthetic import synthesize; synthesize('/tmp/microA', preset='micro', workers=8, sway_px=2.0, hand_contrast=1.0, gesture_min_frac=0.8)"
echo "data A ready at $SECONDS s"
python benchmarks/fine_motion.py --data /tmp/microA --out /tmp/fm --parallel 10 --timeout ${FM_TIMEOUT:-430} \
  --runs cnn3d:0,cnn3d:1,videomamba:0,msf_mamba:0,msf_conv3:0,msf_conv3:1,vm_conv3:0,vm_conv3:1,msf_conv3_theta0:0,msf_conv1:0 \
  --extra "--optim.lr 1.6e-2 --epochs 22 --schedule.warmup_epochs 2 --train.eval_every 11"
cp /tmp/fm/table.md /tmp/fm/results.json $OUT/
(cd /tmp/fm && tar czf $OUT/logs.tgz runs/*.log runs/*/metrics.jsonl runs/*/final_metrics.json)
wait
tail -n 3 $OUT/cal_*.log
