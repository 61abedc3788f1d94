#!/usr/bin/env bash
# session 20, call 5 (warm machine): GPU tests of the inference runners, ops and models after the token-major path
O=$1; mkdir -p $O
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests/measure/test_latency.py tests/ops/test_gpu_ops.py tests/models tests/ops/test_fusion_triton.py -k "not realistic" -x > $O/gpu_tests.txt 2>&1
