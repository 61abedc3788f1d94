#!/bin/bash
# Session 23, call 2: compiled (regional) training against eager at base; whole-model compile beside regional (tiny).
OUT=${1:?out dir}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 330 python benchmarks/bench_model.py --sizes base --setup eager: \
    --setup regional:compile=regional,grouped_scan=true --latency-reps 0 --steps 10 \
    --out "$OUT/train_base.json" > "$OUT/train_base.log" 2>&1
echo "rc=$?"; grep -E "^\||device" "$OUT/train_base.log"
timeout 220 python benchmarks/bench_model.py --sizes tiny --variants videomamba,msf_mamba_plus \
    --setup regional:compile=regional,grouped_scan=true --setup whole:compile=true,grouped_scan=true \
    --latency-reps 0 --steps 10 --out "$OUT/compile_time_tiny.json" > "$OUT/compile_time_tiny.log" 2>&1
echo "rc=$?"; grep -E "^\||device" "$OUT/compile_time_tiny.log"
