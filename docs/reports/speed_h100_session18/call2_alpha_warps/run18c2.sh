#!/usr/bin/env bash
# session 18, call 2: the fused forward's warps at batch 1 and the one-launch ASWM weights (alpha_kernel): the op,
# then msf_mamba_plus tiny / base compiled with BATCH1_FORWARD, with alpha_kernel, with alpha_kernel and 4 warps
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 200 python benchmarks/bench_fusion_infer.py --out $O/fusioninfer --points "alpha_kernel=1;fwd=4/1;fwd=4/1,alpha_kernel=1;fwd=4/3,alpha_kernel=1;fwd=2/1,alpha_kernel=1;fwd_stack=1,fwd=4/1,alpha_kernel=1;fwd_stack=1,fwd=2/1,alpha_kernel=1;alpha_kernel=1,alpha_tile=64/8;alpha_kernel=1,alpha_tile=32/16" > $O/fusioninfer.log 2>&1
grep "^| (1" $O/fusioninfer.log | grep -v "conv\|gemm"
ab() {   # ab NAME MODELS SETTINGS(python dict)
  timeout 150 python -c "import runpy, sys
from msf_scale.ops import _fusion_triton as ft
ft.CONFIG.update($3)
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/latency_$1 \
    --models $2 --modes compile --measures clip --compile-measures clip --budget-s 140 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "median|skipped" $O/latency_$1.log
}
ab default msf_mamba_plus_tiny,msf_mamba_plus_base "{}"
ab alpha msf_mamba_plus_tiny,msf_mamba_plus_base "{'alpha_kernel': True}"
ab alpha_w4 msf_mamba_plus_tiny,msf_mamba_plus_base "{'alpha_kernel': True, 'fwd': (4, 1)}"
