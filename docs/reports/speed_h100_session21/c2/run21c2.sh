#!/usr/bin/env bash
# session 21, call 2: the token-major conv1d kernel as fixed (it did not compile on the GPU since session 20's last
# edit): GPU tests of the batch-1 paths, the kernel's block sweep, then compiled batch-1 latency side by side:
# msf_mamba_plus tiny and base with the fused fusion's ASWM output channel-major (default) and token-major
# (CONFIG out_tokens, untimed since session 20); msf_mamba base with the conv1d kernel and with the torch form
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 170 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_causal_conv1d.py tests/ops/test_scan_chunked.py \
  tests/ops/test_fusion_triton.py -k "conv or bimamba or token or graph or 3x3x3" > $O/gpu_tests.txt 2>&1
tail -2 $O/gpu_tests.txt; grep -E "^FAILED" $O/gpu_tests.txt | head -8
timeout 100 python benchmarks/bench_conv1d_tokens.py --out $O/conv1d_tokens \
  --points "BL=64,BE=64;BL=16,BE=128;BL=64,BE=128,warps=8;BL=8,BE=256,warps=2" > $O/conv1d_tokens.log 2>&1
grep -E "^\|" $O/conv1d_tokens.log | head -30
lat() {   # lat NAME MODEL FUSION_CONFIG [ENV=VAL]
  env $4 timeout 110 python benchmarks/bench_latency.py --out $O/lat_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 100 --compile-cap-s 75 ${3:+--fusion-config "$3"} > $O/lat_$1.log 2>&1
  echo "$1 [$3] $4: $(grep -E "compile clip \(batch 1\): (median|compile failed)" $O/lat_$1.log | sed 's/.*(batch 1): //')"
}
lat tiny_default msf_mamba_plus_tiny ""
lat tiny_out msf_mamba_plus_tiny "out_tokens=1"
lat base_default msf_mamba_plus_base ""
lat base_out msf_mamba_plus_base "out_tokens=1"
lat msfbase_triton msf_mamba_base ""
lat msfbase_torch msf_mamba_base "" MSF_SCALE_CONV1D_TOKENS=torch
echo done
