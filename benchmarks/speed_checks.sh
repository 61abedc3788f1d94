#!/usr/bin/env bash
# Issue 19's checks in one GPU call (~7-9 minutes of an H100/H200): the GPU tests of the ops and the inference
# runners, the triton scan against mamba-ssm's (bench_biscan, with a sweep of its tiles), then the fusion backends side
# by side (with the igemm tile sweep), the igemm op's kernel profile, and the models' training clips/s and batch-1
# graph latency under `auto`, with the fusion on igemm and with the triton scan.
# Usage (repository root; python with torch + CUDA + triton + mamba-ssm, the package importable):
#   bash benchmarks/speed_checks.sh OUT
# Knobs (environment): PARTS="tests biscan fusion profile model" (any subset; "compiled", not in the default, is a second
#   call's worth: torch.compile'd training beside eager, small, every variant; "latency", not in the default either:
#   batch-1 latency through msf_scale.inference, graph replay and torch.compile, tiny models, ~2.5 minutes; "latprofile",
#   not in the default: the kernels of a batch-1 forward of videomamba / msf_mamba tiny by graph replay, torch.compile
#   and torch.compile with Inductor's freezing, ~3 minutes; "fusioninfer", not in the default: the fusion paths' batch-1
#   forwards by graph replay, 3/5/7 + ASWM with the triton launch sweep and 3 alone, ~1.5 minutes; "conv1d", not in the
#   default: batch-1 compiled latency of msf_mamba and msf_mamba_plus tiny with MSF_SCALE_CONV1D_COMPILED=cudnn, then
#   =shifted (the default since session 16), ~4 minutes; "scaninfer", not in the default: the chunked inference scan's
#   GPU tests, its batch-1 kernel against mamba-ssm's at tiny / small / base widths with a sweep of its blocks, and
#   batch-1 compiled latency of msf_mamba tiny and videomamba base with the scan on cuda (mamba-ssm), then on auto
#   (chunked at batch 1), ~5 minutes; "patchembed", not in the default: batch-1 compiled latency with
#   MSF_SCALE_PATCH_EMBED_COMPILED=conv, then =gemm (the tubelet embedding as one GEMM), four models, ~5 minutes;
#   "table", not in the default: issue 19's batch-1 bar, the nine models compiled at batch 1 with the defaults (the
#   forms and CONFIGs it ran with land in table/latency.json), ~5 minutes; "fusion3", not in the default: msf_mamba base
#   and small compiled at batch 1 with the 3^3 fusion on conv, then on the triton op (auto's choice there since
#   session 19), ~4.5 minutes; "layout", not in the default: msf_mamba base, videomamba base and msf_mamba_plus tiny
#   compiled at batch 1 with MSF_SCALE_MIXER_LAYOUT=channels, then =tokens (the default since session 20), ~5 minutes;
#   "tokens", not in the default: the token-major path's conv1d kernel with a sweep of its blocks and the chunked scan
#   on both layouts with a sweep of its step blocks, ~2 minutes; "fusionout", not in the default: msf_mamba_plus tiny
#   and base compiled at batch 1 with the fused fusion's output channel-major, then token-major, ~5 minutes; "plusbar",
#   not in the default: msf_mamba_plus tiny compiled at batch 1 three times (one process each: the tiny bar's spread on
#   one machine), small and base with the defaults, then with the stacked bands at their widths (fwd_stack=1, on the
#   padded input since session 21), ~5 minutes),
#   SIZES="tiny,small" (bench_model), SCAN_LAT_BACKENDS="cuda auto" (scaninfer's latency runs), SWEEP_S=90 (igemm
#   tile sweep budget), SCAN_TILES (triton scan CONFIGs BT,BD,warps,bwd_BD,bwd_warps,partials
#   tried by bench_biscan after the default; the default list: the untimed 4-warp backward tiles, 125-128 registers),
#   PYTHON=python.
# Each part runs under its own `timeout` and the next runs whatever its exit code; OUT/status.txt lists each part's
# exit code and seconds. Every part's output is tee'd into OUT/<part>.log as it is printed.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/speed_checks.sh OUT}
PARTS=${PARTS:-"tests biscan fusion profile model"}
SIZES=${SIZES:-tiny,small}
SWEEP_S=${SWEEP_S:-90}
SCAN_TILES=${SCAN_TILES:-"16,4,1,4,4,1 16,4,1,2,4,1 16,4,1,4,8,1 16,4,2,4,4,1 16,2,4,2,4,1 16,4,1,4,2,0"}
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$OUT/status.txt"

part() {   # part NAME TIMEOUT_S CMD...: run, tee the log, record rc and seconds
  local name=$1 limit=$2 t0 rc
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  t0=$(date +%s)
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $(( $(date +%s) - t0 )) s" | tee -a "$OUT/status.txt"
}

part tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_fusion_igemm.py \
  tests/ops/test_fusion_gemm.py tests/ops/test_fusion_triton.py tests/ops/test_gpu_ops.py tests/ops/test_scan_triton.py tests/measure/test_latency.py -s
part biscan 150 "$PY" benchmarks/bench_biscan.py --out "$OUT/biscan.json" --profile --configs $SCAN_TILES
part fusion 150 "$PY" benchmarks/bench_fusion.py --out "$OUT/fusion" --backends conv,gemm,igemm \
  --sweep-budget-s "$SWEEP_S"
part profile 45 "$PY" benchmarks/profile_fusion.py --out "$OUT/profile_igemm" --fusion-backend igemm
part model 230 "$PY" benchmarks/bench_model.py --sizes "$SIZES" --steps 5 --latency-reps 20 --setup auto: \
  --setup igemm:fusion_backend=igemm --setup triton_scan:grouped_scan=true,scan_backend=triton \
  --out "$OUT/bench_model.json"
part compiled 540 "$PY" benchmarks/bench_model.py --sizes small --steps 5 --latency-reps 20 --setup auto: \
  --setup compiled:compile=true --setup igemm_compiled:fusion_backend=igemm,compile=true \
  --out "$OUT/bench_model_compiled.json"
part latency 170 "$PY" benchmarks/bench_latency.py --out "$OUT/latency" \
  --models videomamba_tiny,msf_mamba_tiny,msf_mamba_plus_tiny --modes graph,compile --measures clip \
  --budget-s 160 --compile-cap-s 50
latprofile() {   # exit code: nonzero if any profile failed
  local m mode rc=0
  for m in videomamba msf_mamba; do
    for mode in "graph" "compile --no-freeze" "compile --freeze"; do
      "$PY" benchmarks/profile_fusion.py --out "$OUT/latprofile" --model $m --size tiny --inference $mode \
        --steps 20 || rc=1
    done
  done
  return $rc
}
export -f latprofile
export OUT PY
part latprofile 240 bash -c latprofile
part fusioninfer 150 bash -c "$PY benchmarks/bench_fusion_infer.py --out $OUT/fusioninfer && \
  $PY benchmarks/bench_fusion_infer.py --out $OUT/fusioninfer3 --scales 3"
latency_ab() {   # latency_ab TAG VAR "VALUES" MODELS BUDGET_S CAP_S: compiled batch-1 latency, VAR set to each value
  local tag=$1 var=$2 values=$3 models=$4 budget=$5 cap=$6 value rc=0
  for value in $values; do
    env "$var=$value" "$PY" benchmarks/bench_latency.py --out "$OUT/${tag}_$value" --models "$models" --modes compile \
      --measures clip --compile-measures clip --budget-s "$budget" --compile-cap-s "$cap" || rc=1
  done
  return $rc
}
export -f latency_ab
# the conv1d's compiled-inference form, cuDNN against shifted (the default), same models, one after the other
part conv1d 240 bash -c "latency_ab conv1d MSF_SCALE_CONV1D_COMPILED 'cudnn shifted' \
  msf_mamba_tiny,msf_mamba_plus_tiny 110 60"
scaninfer() {   # the chunked scan: GPU tests, kernel timings, then the models' batch-1 latency on mamba-ssm and auto
  local rc=0
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/ops/test_scan_chunked.py || rc=1
  "$PY" benchmarks/bench_scan_infer.py --out "$OUT/scan_infer.json" --configs 16,1,2048,8 \
    16,1,2048,2 16,1,2048,0 16,1,1024,4 || rc=1   # the default (4-step blocks), then 8, 2, per step, fewer programs
  latency_ab latency_scan MSF_SCALE_SCAN_BACKEND "${SCAN_LAT_BACKENDS:-cuda auto}" \
    msf_mamba_tiny,videomamba_base 100 60 || rc=1   # mamba-ssm, then auto (the chunked scan at batch 1)
  return $rc
}
export -f scaninfer
part scaninfer 420 bash -c scaninfer
patchembed() {   # the patch embedding's compiled-inference form: cuDNN's conv, then one GEMM (the default)
  local form rc=0
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/models/test_patch_embed.py || rc=1
  latency_ab patch_embed MSF_SCALE_PATCH_EMBED_COMPILED "conv gemm" \
    videomamba_tiny,msf_mamba_plus_tiny,videomamba_base,msf_mamba_base 130 60 || rc=1
  return $rc
}
export -f patchembed
part patchembed 420 bash -c patchembed
# msf_mamba's 3^3 window at batch 1 on conv, then on the triton op (auto's choice there since session 19)
part fusion3 300 bash -c "latency_ab fusion3 MSF_SCALE_FUSION_BACKEND 'conv triton' \
  msf_mamba_base,msf_mamba_small 140 70"
# the grouped mixer's batch-1 layout on the chunked scan: channel-major (as training), then token-major (the default
# since session 20: aligned GEMMs, no transposed reads)
part layout 360 bash -c "latency_ab layout MSF_SCALE_MIXER_LAYOUT 'channels tokens' \
  msf_mamba_base,videomamba_base,msf_mamba_plus_tiny 140 70"
# the token-major path's kernels alone: the one-kernel conv1d + silu against Inductor's torch form with a sweep of its
# blocks, and the chunked scan on both layouts with a sweep of its step blocks
tokens() {   # exit code: nonzero if either benchmark failed (each runs whatever the other did)
  local rc=0
  "$PY" benchmarks/bench_conv1d_tokens.py --out "$OUT/conv1d_tokens" \
    --points "BL=64,BE=64;BL=16,BE=128;BL=64,BE=128,warps=8;BL=8,BE=256,warps=2" || rc=1
  "$PY" benchmarks/bench_scan_infer.py --out "$OUT/scan_layouts.json" --layouts channels,tokens \
    --configs 16,1,2048,1 16,1,2048,2 16,1,4096,2 16,1,1024,2 || rc=1
  return $rc
}
export -f tokens
part tokens 240 bash -c tokens
# the fused fusion's ASWM output token-major (_fusion_triton.CONFIG["out_tokens"]; batch 1's default since session
# 21, on the padded input): msf_mamba_plus tiny and base compiled at batch 1 without, then with it
fusionout() {
  local on rc=0
  for on in 0 1; do
    "$PY" benchmarks/bench_latency.py --out "$OUT/fusionout_$on" --fusion-config "out_tokens=$on" \
      --models msf_mamba_plus_tiny,msf_mamba_plus_base --modes compile --measures clip --compile-measures clip \
      --budget-s 140 --compile-cap-s 70 || rc=1
  done
  return $rc
}
export -f fusionout
part fusionout 320 bash -c fusionout
# msf_mamba_plus at batch 1 after session 21 (padded input, token-major output): the tiny bar three times, then small
# and base with the defaults and with the stacked bands (STACK_MAX_CHANNELS was timed on the unpadded input)
plusbar() {
  local i rc=0
  for i in 1 2 3; do
    "$PY" benchmarks/bench_latency.py --out "$OUT/plusbar_tiny_$i" --models msf_mamba_plus_tiny --modes compile \
      --measures clip --compile-measures clip --budget-s 60 --compile-cap-s 50 || rc=1
  done
  "$PY" benchmarks/bench_latency.py --out "$OUT/plusbar_default" --models msf_mamba_plus_small,msf_mamba_plus_base \
    --modes compile --measures clip --compile-measures clip --budget-s 120 --compile-cap-s 60 || rc=1
  "$PY" benchmarks/bench_latency.py --out "$OUT/plusbar_stack" --models msf_mamba_plus_small,msf_mamba_plus_base \
    --fusion-config fwd_stack=1 --modes compile --measures clip --compile-measures clip --budget-s 120 \
    --compile-cap-s 60 || rc=1
  return $rc
}
export -f plusbar
part plusbar 460 bash -c plusbar
NINE=videomamba_tiny,videomamba_small,msf_mamba_tiny,msf_mamba_small,msf_mamba_plus_tiny,msf_mamba_plus_small
NINE=$NINE,videomamba_base,msf_mamba_base,msf_mamba_plus_base
part table 480 "$PY" benchmarks/bench_latency.py --out "$OUT/table" --models "$NINE" --modes compile --measures clip \
  --compile-measures clip --budget-s 400 --compile-cap-s 60
cat "$OUT/status.txt"
