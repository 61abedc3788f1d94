#!/usr/bin/env bash
# session 20, call 1: the grouped mixer's token-major batch-1 path (MSF_SCALE_MIXER_LAYOUT=tokens, the new default)
# against channel-major, compiled at batch 1, side by side on one machine; the CFD fold constructor-free (a constant
# under freezing); GPU tests of the mixer on auto and of session 19's unrun 3^3 batch-1 check; a profile of msf_mamba
# base on the new path
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_scan_chunked.py tests/ops/test_fusion_triton.py \
  -k "bimamba or 3x3x3 or batch_one" > $O/gpu_tests.txt 2>&1; tail -3 $O/gpu_tests.txt; grep -E "^FAILED|Error" $O/gpu_tests.txt | head -5
lat() {   # lat NAME MODELS [ENV=VAL]
  env $3 timeout 100 python benchmarks/bench_latency.py --out $O/latency_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 95 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "^\| (tiny|small|base) |failed|rror" $O/latency_$1.log | grep -v "| — |" | head -3
}
lat msf_base_channels msf_mamba_base MSF_SCALE_MIXER_LAYOUT=channels
lat msf_base_tokens msf_mamba_base MSF_SCALE_MIXER_LAYOUT=tokens
lat vm_base_channels videomamba_base MSF_SCALE_MIXER_LAYOUT=channels
lat vm_base_tokens videomamba_base MSF_SCALE_MIXER_LAYOUT=tokens
lat plus_tiny_channels msf_mamba_plus_tiny MSF_SCALE_MIXER_LAYOUT=channels
lat plus_tiny_tokens msf_mamba_plus_tiny MSF_SCALE_MIXER_LAYOUT=tokens
timeout 90 python benchmarks/profile_fusion.py --out $O/prof --model msf_mamba --size base --inference compile --freeze --steps 20 > $O/prof_msf_base.log 2>&1
grep -A22 "wall time" $O/prof_msf_base.log
