#!/usr/bin/env bash
# session 20, call 3: the GPU tests of the token-major path's pieces, then issue 19's batch-1 bar: the nine models
# compiled at batch 1 with the defaults as of this commit (token-major mixer, one-kernel conv1d, 2-step scan blocks)
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 70 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_scan_chunked.py tests/ops/test_causal_conv1d.py -k "tokens or bimamba or both_directions" \
  > $O/gpu_tests.txt 2>&1; tail -1 $O/gpu_tests.txt; grep -E "^FAILED|Error" $O/gpu_tests.txt | head -5
NINE=videomamba_tiny,videomamba_small,msf_mamba_tiny,msf_mamba_small,msf_mamba_plus_tiny,msf_mamba_plus_small
NINE=$NINE,videomamba_base,msf_mamba_base,msf_mamba_plus_base
timeout 420 python benchmarks/bench_latency.py --out $O/table --models "$NINE" --modes compile --measures clip \
  --compile-measures clip --budget-s 400 --compile-cap-s 60 > $O/table.log 2>&1
grep -vE "^\s*$|it/s|%\|" $O/table.log | tail -22
