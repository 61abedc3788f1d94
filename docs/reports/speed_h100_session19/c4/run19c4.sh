#!/usr/bin/env bash
# session 19, call 4: `auto` now runs msf_mamba's 3^3 fusion on the triton op at batch 1 (no gradients); msf_mamba tiny
# compiled at batch 1 on it, against conv by name, same machine; the GPU tests of the fusion's auto choice
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
lat() {   # lat NAME MODELS [ENV=VAL]
  env $3 timeout 100 python benchmarks/bench_latency.py --out $O/latency_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 95 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "median|failed" $O/latency_$1.log | head -3
}
lat msf_tiny_auto msf_mamba_tiny
lat msf_tiny_conv msf_mamba_tiny MSF_SCALE_FUSION_BACKEND=conv
timeout 60 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_gpu_ops.py 2>&1 | tail -2 | tee $O/gpu_tests.txt
