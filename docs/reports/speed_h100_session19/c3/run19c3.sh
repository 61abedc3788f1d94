#!/usr/bin/env bash
# session 19, call 3 (same warm machine as call 2): msf_mamba base and small compiled at batch 1 with the 3^3 fusion on
# conv (auto) and on the triton op (session 18's batch-1 forward), and msf_mamba_plus small (last timed in session 17)
O=$1; mkdir -p $O
lat() {   # lat NAME MODELS [ENV=VAL]
  env $3 timeout 100 python benchmarks/bench_latency.py --out $O/latency_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 95 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "median|failed" $O/latency_$1.log | head -3
}
lat msf_base_auto msf_mamba_base
lat msf_base_triton msf_mamba_base MSF_SCALE_FUSION_BACKEND=triton
lat msf_small_auto msf_mamba_small
lat msf_small_triton msf_mamba_small MSF_SCALE_FUSION_BACKEND=triton
lat plus_small msf_mamba_plus_small
