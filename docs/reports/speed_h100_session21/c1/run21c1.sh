#!/usr/bin/env bash
# session 21, call 1: the fused fusion forward with the window rows stacked along the product's K axis
# (CONFIG fwd_kstack, _fwd_kstacked): GPU tests, the batch-1 op by CUDA-graph replay at 192 / 384 / 576 channels
# against today's default (the stacked / shared forms), then msf_mamba_plus tiny and base compiled at batch 1 with the
# op's fastest kstack setting at their width against the defaults (and tiny with the ASWM output token-major too)
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_triton.py -k "batch_one" \
  > $O/gpu_tests.txt 2>&1; tail -2 $O/gpu_tests.txt; grep -E "^FAILED" $O/gpu_tests.txt | head -8
PTS="fwd_kstack=1;fwd_kstack=1,fwd=8/1;fwd_kstack=1,fwd_frames=2;fwd_kstack=1,fwd_frames=8,fwd=8/1"
PTS="$PTS;fwd_kstack=1,kstack_frames=2,fwd=8/1;fwd_kstack=1,fwd_loop_stages=2,fwd=8/2"
timeout 200 python benchmarks/bench_fusion_infer.py --out $O/finfer --reps 20 --points "$PTS" > $O/finfer.log 2>&1
grep -E "^\| \(" $O/finfer.log | grep -v "conv \|gemm \|triton+torch" 
best() {   # best C: the fastest kstack point at C channels (or "" when the default is faster)
  python - "$O/finfer/bench_fusion_infer.json" "$PTS" "$1" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from bench_fusion_infer import parse_point, point_label
rows = json.load(open(sys.argv[1]))["rows"]
c = int(sys.argv[3])
ms = {r["path"]: r["graph_ms"] for r in rows if r["shape"][1] == c and "graph_ms" in r}
cands = [(ms.get(point_label(parse_point(p))), p) for p in sys.argv[2].split(";")]
cands = sorted((m, p) for m, p in cands if m is not None)
print(cands[0][1] if cands and cands[0][0] < ms.get("triton", 1e9) else "")
PY
}
B192=$(best 192); B576=$(best 576); echo "best kstack: 192 [$B192] 576 [$B576]"
lat() {   # lat NAME MODEL FUSION_CONFIG
  timeout 110 python benchmarks/bench_latency.py --out $O/lat_$1 --models $2 --modes compile --measures clip \
    --compile-measures clip --budget-s 100 --compile-cap-s 75 ${3:+--fusion-config "$3"} > $O/lat_$1.log 2>&1
  echo "$1 [$3]: $(grep -E "compile clip \(batch 1\): median" $O/lat_$1.log | sed 's/.*median/median/')"
  grep -E "rror" $O/lat_$1.log | head -2
}
lat tiny_default msf_mamba_plus_tiny ""
[ -n "$B192" ] && lat tiny_kstack msf_mamba_plus_tiny "$B192"
lat tiny_kstack_out msf_mamba_plus_tiny "${B192:+$B192,}out_tokens=1"
lat base_default msf_mamba_plus_base ""
[ -n "$B576" ] && lat base_kstack msf_mamba_plus_base "$B576"
echo done
