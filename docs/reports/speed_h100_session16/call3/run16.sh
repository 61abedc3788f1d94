#!/bin/bash
# session 16 call: GPU tests, padded-rows A/B, fusion 3^3 alone, the 9-model table
OUT=$1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/device.txt
python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_scan_chunked.py tests/ops/test_fusion_triton.py tests/ops/test_gpu_ops.py 2>&1 | tail -15 > $OUT/gpu_tests.txt; tail -3 $OUT/gpu_tests.txt
timeout 60 python benchmarks/bench_fusion_infer.py --out $OUT/fusioninfer3 --scales 3 2>&1 | grep "^|"
LAT="--modes compile --measures clip --compile-measures clip --compile-cap-s 60"
timeout 110 python -c "
import sys, runpy
from msf_scale.models.blocks import BiMamba
BiMamba._aligned_length = lambda self, x: 0
sys.argv = ['bench_latency.py', '--out', '$OUT/unpadded', '--models', 'msf_mamba_tiny,videomamba_base', '--budget-s', '100'] + '$LAT'.split()
runpy.run_path('benchmarks/bench_latency.py', run_name='__main__')" > $OUT/unpadded.log 2>&1
timeout 330 python benchmarks/bench_latency.py --out $OUT/latency_9 --models msf_mamba_tiny,videomamba_base,msf_mamba_base,videomamba_tiny,msf_mamba_plus_tiny,videomamba_small,msf_mamba_small,msf_mamba_plus_small,msf_mamba_plus_base --budget-s 320 $LAT > $OUT/latency_9.log 2>&1
MSF_SCALE_FUSION_BACKEND=triton timeout 80 python benchmarks/bench_latency.py --out $OUT/msf_fusion_triton --models msf_mamba_tiny,msf_mamba_base --budget-s 75 $LAT > $OUT/msf_fusion_triton.log 2>&1
for f in unpadded latency_9 msf_fusion_triton; do python -c "
import json;d=json.load(open('$OUT/$f/latency.json'))
for r in d['results']: print('$f', r['model'], round(r['median_ms'],4), r['error'][:150])"; done
