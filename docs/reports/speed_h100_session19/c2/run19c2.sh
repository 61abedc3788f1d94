#!/usr/bin/env bash
# session 19, call 2: why call 1's fusion autograd batch-1 test failed (its traceback); whether videomamba base's compiled
# batch-1 forward on the default (Triton) chunked scan fails again (call 1: illegal memory access), and with the scan
# on mamba-ssm
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 60 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_triton.py -k "autograd" -x --tb=short 2>&1 | tail -45 > $O/gpu_tests_fusion.txt
grep -E "Error|assert|passed|failed" $O/gpu_tests_fusion.txt | head -12
lat() {   # lat NAME MODELS [ENV=VAL]
  env $3 timeout 120 python benchmarks/bench_latency.py --out $O/latency_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 110 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "median|failed" $O/latency_$1.log | head -3
}
lat vm_base_default videomamba_base
lat vm_base_default2 videomamba_base
lat vm_base_cuda videomamba_base MSF_SCALE_SCAN_BACKEND=cuda
