#!/usr/bin/env bash
# session 20, call 4: msf_mamba base compiled at batch 1 with the chunked scan's token-major blocks of 4 steps (before)
# then 2 (the new steps_tokens default), one machine
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
for st in 4 2; do
  timeout 80 python -c "import runpy, sys
from msf_scale.ops import _scan_chunked as sc
sc.CONFIG['steps_tokens'] = $st
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/latency_st$st \
    --models msf_mamba_base --modes compile --measures clip --compile-measures clip --budget-s 75 --compile-cap-s 60 \
    > $O/latency_st$st.log 2>&1
  echo "steps_tokens=$st"; grep -E "^\| base |rror" $O/latency_st$st.log | head -2
done
