#!/usr/bin/env bash
# session 19, call 5: where batch-1 time goes now (compiled, Inductor-frozen): msf_mamba_plus tiny (2.85-2.95 ms against
# the 2.5 bar) and msf_mamba base (5.59 with the 3^3 fusion on triton) kernel by kernel
O=$1; mkdir -p $O
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/device.txt
timeout 100 python benchmarks/profile_fusion.py --out $O/prof --model msf_mamba_plus --size tiny --inference compile --freeze --steps 20 > $O/prof_plus_tiny.log 2>&1
grep -A14 "wall time" $O/prof_plus_tiny.log
timeout 100 python benchmarks/profile_fusion.py --out $O/prof --model msf_mamba --size base --inference compile --freeze --steps 20 > $O/prof_msf_base.log 2>&1
grep -A14 "wall time" $O/prof_msf_base.log
