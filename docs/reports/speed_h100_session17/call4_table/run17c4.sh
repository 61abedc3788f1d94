#!/usr/bin/env bash
# session 17, call 4: the nine models' batch-1 compiled latency with the session's defaults (patch embedding as one
# GEMM, the chunked scan in blocks of 4 steps)
O=$1; mkdir -p $O
M=videomamba_tiny,videomamba_small,videomamba_base,msf_mamba_tiny,msf_mamba_small,msf_mamba_base
M=$M,msf_mamba_plus_tiny,msf_mamba_plus_small,msf_mamba_plus_base
python -c "from msf_scale.models import stem; from msf_scale.ops import _scan_chunked as sc
print('defaults:', stem.PATCH_EMBED_COMPILED_FORM, sc.CONFIG)"
python benchmarks/bench_latency.py --out $O/table --models $M --modes compile --measures clip --compile-measures clip \
  --budget-s 400 --compile-cap-s 60 2>&1 | grep -vE "^\s*$"
