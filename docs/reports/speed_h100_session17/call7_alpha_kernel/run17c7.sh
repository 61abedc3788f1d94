#!/usr/bin/env bash
# session 17, call 7: the ASWM weights by one kernel (CONFIG alpha_kernel): GPU tests, the op at batch 1, plus tiny
# (ran on an uncommitted tree with CONFIG "alpha_kernel" / _aswm_alpha, measured slower and not committed: as it
# stands this script fails on the unknown key; kept as the record of what ran)
O=$1; mkdir -p $O
python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_triton.py -k batch_one_inference 2>&1 | tail -1
python benchmarks/bench_fusion_infer.py --out $O/fusioninfer --points "alpha_kernel=1" 2>&1 | grep "^| (1"
for on in 0 1; do
  python -c "import runpy, sys
from msf_scale.ops import _fusion_triton as ft; ft.CONFIG['alpha_kernel'] = $on or None
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/latency_alpha$on \
    --models msf_mamba_plus_tiny --modes compile --measures clip --compile-measures clip --budget-s 60 \
    --compile-cap-s 50 2>&1 | grep -E "median|skipped|forms"
done
