#!/usr/bin/env bash
# session 21, call 3: the fused fusion forward's batch-1 forms built after call 2 (the padded input, the band table)
# and the token-major output as fixed: GPU tests, the op by CUDA-graph replay at 192 / 384 / 576 channels, then
# msf_mamba_plus tiny / base / small compiled at batch 1 with each against the defaults, one after the other
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 170 python -m pytest -m gpu -q -p no:cacheprovider tests/measure/test_latency.py tests/ops/test_fusion_triton.py \
  tests/ops/test_causal_conv1d.py -k "frozen or batch_one_inference or conv" > $O/gpu_tests.txt 2>&1
tail -2 $O/gpu_tests.txt; grep -E "^FAILED" $O/gpu_tests.txt | head -8
timeout 120 python benchmarks/bench_fusion_infer.py --out $O/finfer --reps 20 \
  --points "fwd_pad_input=1;fwd_pad_input=1,fwd_bands=1;fwd_bands=1" > $O/finfer.log 2>&1
grep -E "^\| \(" $O/finfer.log | grep -v "conv \|gemm \|triton+torch"
lat() {   # lat NAME MODEL FUSION_CONFIG
  timeout 100 python benchmarks/bench_latency.py --out $O/lat_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 90 --compile-cap-s 75 ${3:+--fusion-config "$3"} > $O/lat_$1.log 2>&1
  echo "$1 [$3]: $(grep -E "compile clip \(batch 1\): (median|compile failed)" $O/lat_$1.log | sed 's/.*(batch 1): //')"
}
lat tiny_default msf_mamba_plus_tiny ""
lat tiny_pb msf_mamba_plus_tiny "fwd_pad_input=1,fwd_bands=1"
lat tiny_pbo msf_mamba_plus_tiny "fwd_pad_input=1,fwd_bands=1,out_tokens=1"
lat tiny_out msf_mamba_plus_tiny "out_tokens=1"
lat base_default msf_mamba_plus_base ""
lat base_p msf_mamba_plus_base "fwd_pad_input=1"
lat base_po msf_mamba_plus_base "fwd_pad_input=1,out_tokens=1"
lat small_default msf_mamba_plus_small ""
lat small_po msf_mamba_plus_small "fwd_pad_input=1,out_tokens=1"
echo done
