#!/bin/bash
# Session 24: compiled (regional) training against eager, sizes in the order given ($2, default "small tiny base"),
# then the GPU tests of the fft / fusion ops. Each size's bench has its own time limit; files land as they finish.
OUT=${1:?out dir}; SIZES=${2:-small tiny base}; SIZES=${SIZES//,/ }; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
declare -A LIM=([small]=215 [tiny]=140 [base]=165)
for size in $SIZES; do
  timeout ${LIM[$size]:?unknown size $size (tiny, small, base)} python benchmarks/bench_model.py --sizes $size --setup eager: \
      --setup regional:compile=regional,grouped_scan=true --latency-reps 0 --steps 10 \
      --out "$OUT/train_$size.json" > "$OUT/train_$size.log" 2>&1
  echo "$size rc=$?"; grep -E "^\||device" "$OUT/train_$size.log"
done
timeout 60 python -m pytest -m gpu -q tests/ops/test_fusion_fft.py tests/ops/test_state_fusion.py > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/gpu_tests.txt"
