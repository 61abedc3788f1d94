#!/usr/bin/env bash
# session 19, call 1: the chunked scan's Gluon passes (ops/_scan_chunked_gluon.py): GPU tests against float64, a planted
# error in them (the reversed walk's column order) must fail; the fusion's unrun autograd batch-1 test; the op at
# batch 1 against mamba-ssm and the Triton passes with a sweep; compiled batch-1 latency with GLUON off / on
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_scan_chunked.py -k gluon 2>&1 | tail -4 | tee $O/gpu_tests_gluon.txt
cp msf_scale/ops/_scan_chunked_gluon.py /tmp/sg.bak
sed -i 's/start: gl.constexpr = (TS - 1 - i) \* N/start: gl.constexpr = i * N/' msf_scale/ops/_scan_chunked_gluon.py
grep -c "start: gl.constexpr = i \* N" msf_scale/ops/_scan_chunked_gluon.py | sed 's/^/planted lines: /' | tee $O/planted.txt
timeout 60 python -m pytest -m gpu -q -p no:cacheprovider "tests/ops/test_scan_chunked.py::test_gpu_gluon_matches_float64[dtype0-1e-05-1-1-16-4096]" 2>&1 | tail -3 | tee -a $O/planted.txt
cp /tmp/sg.bak msf_scale/ops/_scan_chunked_gluon.py
timeout 90 python -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_triton.py -k "autograd" 2>&1 | tail -2 | tee $O/gpu_tests_fusion.txt
timeout 150 python benchmarks/bench_scan_infer.py --out $O/scan_infer.json --gluon 1,16,4096 1,16,2048 1,16,8192 1,8,4096 1,32,4096 2,16,4096 4,16,4096 2>&1 | tee $O/scan_infer.log | grep -v "^$"
ab() {   # ab NAME MODELS GLUON-SETTINGS(python dict)
  timeout 170 python -c "import runpy, sys
from msf_scale.ops import _scan_chunked as sc
sc.GLUON.update($3)
sys.argv[0] = 'benchmarks/bench_latency.py'; runpy.run_path(sys.argv[0], run_name='__main__')" --out $O/latency_$1 \
    --models $2 --modes compile --measures clip --compile-measures clip --budget-s 160 --compile-cap-s 70 > $O/latency_$1.log 2>&1
  echo "$1 $3"; grep -E "median|skipped" $O/latency_$1.log
}
ab vm_base_triton videomamba_base "{'gluon': False}"
ab vm_base_gluon videomamba_base "{'gluon': True}"
ab plus_tiny_triton msf_mamba_plus_tiny "{'gluon': False}"
ab plus_tiny_gluon msf_mamba_plus_tiny "{'gluon': True}"
