#!/usr/bin/env bash
# session 20, call 6 (warm machine): msf_mamba_plus tiny batch-1 compiled and frozen, kernel by kernel, with the defaults as of call 3
O=$1; mkdir -p $O
timeout 100 python benchmarks/profile_fusion.py --out $O/prof --model msf_mamba_plus --size tiny --inference compile --freeze --steps 20 > $O/prof_plus_tiny.log 2>&1
