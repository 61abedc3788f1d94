#!/usr/bin/env bash
# session 18, call 4: the fusion's GPU tests with the batch-1 defaults of calls 2-3; msf_mamba_plus tiny compiled at
# batch 1 with them; tiny with session 17's forward settings (8 warps, frame blocks of 8, torch's ASWM
# weights, no stacked bands) on the same machine; msf_mamba_plus base; msf_mamba base with its 3^3 fusion on conv (auto) and on triton;
# the 3^3 op alone
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 100 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_triton.py -k "batch_one or inference" 2>&1 | tail -2 | tee $O/gpu_tests.txt
ab() {   # ab NAME MODELS SETTINGS(python dict)
  timeout 200 python -c "import runpy, sys
from msf_scale.ops import _fusion_triton as ft
ft.CONFIG.update($3)
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/latency_$1 \
    --models $2 --modes compile --measures clip --compile-measures clip --budget-s 190 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3 ${MSF_SCALE_FUSION_BACKEND:-}"; grep -E "median|skipped" $O/latency_$1.log
}
ab plus_tiny msf_mamba_plus_tiny "{}"
ab s17 msf_mamba_plus_tiny "{'alpha_kernel': False, 'fwd': (8, 3), 'fwd_frames': 8, 'fwd_stack': False}"
ab plus_base msf_mamba_plus_base "{}"
ab msf_base_auto msf_mamba_base "{}"
MSF_SCALE_FUSION_BACKEND=triton ab msf_base_triton msf_mamba_base "{}"
timeout 60 python benchmarks/bench_fusion_infer.py --out $O/fusioninfer3 --scales 3 --shapes "1,192,8,14,14;1,576,8,14,14" > $O/fusioninfer3.log 2>&1
grep "^| (1" $O/fusioninfer3.log
