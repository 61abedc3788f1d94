#!/usr/bin/env bash
# session 17, call 3: patch embedding GEMM A/B, chunked scan steps=4, a sweep of the scan's blocks
set -u
O=$1; mkdir -p $O
python -m pytest -m gpu -q -p no:cacheprovider tests/models/test_patch_embed.py 2>&1 | tail -2
python benchmarks/bench_scan_infer.py --out $O/scan_sweep.json --configs 16,1,2048,4 16,1,2048,2 16,1,4096,4 8,1,4096,4 16,2,2048,4 32,1,2048,4 2>&1 | grep width
M=videomamba_base,msf_mamba_base,msf_mamba_plus_tiny
for form in conv gemm; do
  MSF_SCALE_PATCH_EMBED_COMPILED=$form python benchmarks/bench_latency.py --out $O/pe_$form --models $M --modes compile \
    --measures clip --compile-measures clip --budget-s 150 --compile-cap-s 60 2>&1 | grep -E "median|skipped"
done
MSF_SCALE_PATCH_EMBED_COMPILED=gemm python -c "import runpy, sys
from msf_scale.ops import _scan_chunked as sc; sc.CONFIG['steps'] = 4
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/pe_gemm_steps4 \
  --models $M --modes compile --measures clip --compile-measures clip --budget-s 150 --compile-cap-s 60 2>&1 | grep -E "median|skipped"
