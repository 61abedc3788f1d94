#!/usr/bin/env bash
# session 21, call 4: the new batch-1 defaults (padded input, token-major output) as the defaults, not set by
# --fusion-config: the frozen-compile GPU tests, msf_mamba_plus tiny / small / base compiled at batch 1, then tiny with
# the shared form instead of the stacked one (fwd_stack=0) on the padded input
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 60 python -m pytest -m gpu -q -p no:cacheprovider tests/measure/test_latency.py -k "frozen" > $O/gpu_tests.txt 2>&1
tail -1 $O/gpu_tests.txt; grep -E "^FAILED" $O/gpu_tests.txt | head -8
timeout 130 python benchmarks/bench_latency.py --out $O/plus --models msf_mamba_plus_tiny,msf_mamba_plus_small,msf_mamba_plus_base \
  --modes compile --measures clip --compile-measures clip --budget-s 125 --compile-cap-s 60 > $O/plus.log 2>&1
grep -E "compile clip \(batch 1\): (median|compile)" $O/plus.log | sed 's/^.*s\] //'
timeout 45 python benchmarks/bench_latency.py --out $O/tiny_shared --models msf_mamba_plus_tiny --fusion-config fwd_stack=0 \
  --modes compile --measures clip --compile-measures clip --budget-s 40 --compile-cap-s 35 > $O/tiny_shared.log 2>&1
grep -E "compile clip \(batch 1\): (median|compile)" $O/tiny_shared.log | sed 's/^.*s\] /shared: /'
