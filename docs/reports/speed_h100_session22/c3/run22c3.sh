#!/usr/bin/env bash
# session 22, call 3: where msf_mamba_plus base's batch-1 time goes (compiled, frozen, the defaults), then the whole
# GPU test suite at this commit
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 170 python benchmarks/profile_fusion.py --out $O/prof_plus_base --model msf_mamba_plus --size base --inference compile \
  --freeze --steps 20 > $O/prof.log 2>&1; echo "profile rc=$?"
grep -A28 -iE "self cuda|kernel.*total|^\| " $O/prof.log | head -45
timeout 330 python -m pytest -m gpu -q -p no:cacheprovider -x --timeout 300 tests > $O/gpu_suite.txt 2>&1 || timeout 330 python -m pytest -m gpu -q -p no:cacheprovider tests > $O/gpu_suite.txt 2>&1
tail -3 $O/gpu_suite.txt; grep -E "^FAILED|^ERROR" $O/gpu_suite.txt | head -10
