#!/usr/bin/env bash
# session 18, call 1: the stacked-band fusion forward (CONFIG fwd_stack) and the one-launch ASWM weights (alpha_kernel):
# GPU tests, the op at batch 1 against BATCH1_FORWARD, then msf_mamba_plus tiny / base compiled with each
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 170 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_triton.py -k "batch_one or inference or realistic" 2>&1 | tail -8 | tee $O/gpu_tests.txt
timeout 200 python benchmarks/bench_fusion_infer.py --out $O/fusioninfer --points "fwd_stack=1;alpha_kernel=1;fwd_stack=1,alpha_kernel=1;fwd_stack=1,fwd_loop_stages=2;fwd_stack=1,fwd_loop_stages=3;fwd_stack=1,fwd=4/1;fwd_stack=1,fwd_frames=4;fwd_stack=1,alpha_kernel=1,alpha_tile=32/32;fwd_stack=1,alpha_kernel=1,alpha_tile=128/8" > $O/fusioninfer.log 2>&1
grep "^| (1" $O/fusioninfer.log
for on in 0 1; do
  timeout 200 python -c "import runpy, sys
from msf_scale.ops import _fusion_triton as ft
ft.CONFIG['fwd_stack'] = ft.CONFIG['alpha_kernel'] = bool($on) or None
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/latency_stack$on \
    --models msf_mamba_plus_tiny,msf_mamba_plus_base --modes compile --measures clip --compile-measures clip \
    --budget-s 180 --compile-cap-s 60 > $O/latency_stack$on.log 2>&1
  echo "stack+alpha=$on"; grep -E "median|skipped" $O/latency_stack$on.log
done
