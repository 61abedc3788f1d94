#!/usr/bin/env bash
# session 18, call 3: the batch-1 defaults after call 2 (alpha_kernel, 4 warps) against smaller frame blocks / fewer
# warps / the stacked bands on top of them; then msf_mamba_plus tiny compiled: the defaults against the op's best point
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 120 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_triton.py -k "batch_one or inference" 2>&1 | tail -2 | tee $O/gpu_tests.txt
PTS="fwd_frames=4;fwd_frames=2;fwd=2/1,fwd_frames=4;fwd=2/1,fwd_frames=2;fwd=1/1,fwd_frames=2;fwd=1/1,fwd_frames=1;fwd_stack=1;fwd_stack=1,fwd_frames=4;fwd_stack=1,fwd=2/1,fwd_frames=4"
timeout 150 python benchmarks/bench_fusion_infer.py --out $O/fusioninfer --shapes "1,192,8,14,14;1,576,8,14,14" --points "$PTS" > $O/fusioninfer.log 2>&1
grep "^| (1" $O/fusioninfer.log | grep -v "conv\|gemm"
BEST=$(python - "$O/fusioninfer/bench_fusion_infer.json" "$PTS" <<'PY'
import json, sys, runpy
bench = runpy.run_path("benchmarks/bench_fusion_infer.py")
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["shape"][1] == 192 and r["path"].startswith("triton[")]
best = min(rows, key=lambda r: r["graph_ms"])
points = [bench["parse_point"](p) for p in sys.argv[2].split(";")]
print(next(p for p in points if bench["point_label"](p) == best["path"]), file=sys.stdout)
PY
)
echo "best at 192: $BEST"
ab() {   # ab NAME MODELS SETTINGS(python dict)
  timeout 120 python -c "import runpy, sys
from msf_scale.ops import _fusion_triton as ft
ft.CONFIG.update($3)
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/latency_$1 \
    --models $2 --modes compile --measures clip --compile-measures clip --budget-s 110 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "median|skipped" $O/latency_$1.log
}
ab default msf_mamba_plus_tiny "{}"
ab best msf_mamba_plus_tiny "$BEST"
ab default2 msf_mamba_plus_tiny "{}"
