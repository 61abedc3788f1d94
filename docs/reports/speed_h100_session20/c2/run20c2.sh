#!/usr/bin/env bash
# session 20, call 2: the token-major path's both-direction conv1d + silu as one Triton kernel (MSF_SCALE_CONV1D_TOKENS=
# triton, the new default) against the torch form Inductor compiles (two kernels), batch-1 compiled, one machine; the
# chunked scan's kernel on token-major inputs against channel-major with a sweep of its step blocks; GPU tests
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 120 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_causal_conv1d.py tests/ops/test_scan_chunked.py \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt; grep -E "^FAILED|Error" $O/gpu_tests.txt | head -5
timeout 150 python benchmarks/bench_scan_infer.py --out $O/scan_layouts.json --widths 384,1152 --layouts channels,tokens \
  --configs 16,1,2048,0 16,1,2048,2 16,1,2048,8 16,2,2048,4 > $O/scan_layouts.log 2>&1; grep -E "width|rror" $O/scan_layouts.log
lat() {   # lat NAME MODELS [ENV=VAL]
  env $3 timeout 100 python benchmarks/bench_latency.py --out $O/latency_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 95 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "^\| (tiny|small|base) |failed|rror" $O/latency_$1.log | grep -v "| — |" | head -3
}
lat msf_base_torch msf_mamba_base MSF_SCALE_CONV1D_TOKENS=torch
lat msf_base_triton msf_mamba_base MSF_SCALE_CONV1D_TOKENS=triton
lat plus_tiny_torch msf_mamba_plus_tiny MSF_SCALE_CONV1D_TOKENS=torch
lat plus_tiny_triton msf_mamba_plus_tiny MSF_SCALE_CONV1D_TOKENS=triton
timeout 90 python benchmarks/profile_fusion.py --out $O/prof --model msf_mamba --size base --inference compile --freeze --steps 20 > $O/prof_msf_base.log 2>&1
grep -A40 "wall time" $O/prof_msf_base.log | grep -v "^$"
