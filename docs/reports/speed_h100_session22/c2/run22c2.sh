#!/usr/bin/env bash
# session 22, call 2: the nine-model batch-1 latency table (compiled, frozen) with session 21's defaults, one process
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
NINE=videomamba_tiny,videomamba_small,msf_mamba_tiny,msf_mamba_small,msf_mamba_plus_tiny,msf_mamba_plus_small
NINE=$NINE,videomamba_base,msf_mamba_base,msf_mamba_plus_base
timeout 500 python benchmarks/bench_latency.py --out $O/table --models "$NINE" --modes compile --measures clip \
  --compile-measures clip --budget-s 480 --compile-cap-s 55 > $O/table.log 2>&1
grep -E "compile clip \(batch 1\): (median|compile)" $O/table.log | sed 's/^.*s\] //'
