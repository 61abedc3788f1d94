#!/usr/bin/env bash
# session 22, call 1: the fft fusion backend on the GPU: its bf16 GPU tests (and session 21's unrun frozen-compile
# test), the op at batch 32 forward + backward beside conv and gemm (eager and compiled fft), the batch-1 forward
# beside the triton op (CUDA-graph replay), then msf_mamba_plus tiny and base compiled at batch 1 with the fft backend
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 100 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_fft.py tests/measure/test_latency.py -k "fft or frozen" -s > $O/gpu_tests.txt 2>&1
tail -1 $O/gpu_tests.txt; grep -E "^FAILED|rel err vs" $O/gpu_tests.txt | head -8
timeout 150 python benchmarks/bench_fusion.py --out $O/op32 --backends conv,gemm,fft,fft+compile --no-sweep > $O/op32.log 2>&1
grep -E "^\|" $O/op32.log; tail -2 $O/op32.log | grep -v "^|"
timeout 120 python benchmarks/bench_fusion_infer.py --out $O/op1 --points "fwd_frames=4" > $O/op1.log 2>&1
grep -E "^\|" $O/op1.log | grep -v "triton\[" ; tail -1 $O/op1.log | grep -v "^|"
for m in msf_mamba_plus_tiny msf_mamba_plus_base; do
  for be in auto fft; do
    MSF_SCALE_FUSION_BACKEND=$be timeout 75 python benchmarks/bench_latency.py --out $O/lat_${m}_$be --models $m \
      --modes compile --measures clip --compile-measures clip --budget-s 70 --compile-cap-s 60 > $O/lat_${m}_$be.log 2>&1
    grep -E "compile clip \(batch 1\): (median|compile)" $O/lat_${m}_$be.log | sed "s/^.*s\] /$be: /"
  done
done
