"""Registers, spills and shared memory of Triton kernels (the igemm fusion's by default, the scans' by flag) for a GPU,
compiled ahead of time: no GPU needed.

    python benchmarks/kernel_resources.py                          # sm_90, bf16, (32, 384, 8, 14, 14), scales 3,5,7
    python benchmarks/kernel_resources.py --arch 90 --dtype bfloat16 --shape 1,384,8,14,14 --tiles 64,64,4,2
    python benchmarks/kernel_resources.py --scan-tiles 16,32,8 --scan-tiles 4,32,4   # the triton scan instead
    python benchmarks/kernel_resources.py --chunked-scan 16,1 --chunked-scan 8,1     # the chunked inference scan
    python benchmarks/kernel_resources.py --inference --shape 1,192,8,14,14     # batch-1 conv1d + fused fusion forward

Why: tile sizes that spill registers to local memory are slow on every GPU run, and ptxas says so at compile time.
Triton compiles a kernel for a named target on any machine (its ASTSource + GPUTarget), and the ptxas it ships
reports per-kernel registers and spill bytes (-v); the PTX's shuffles, barriers and exp2 are counted. Each row is
one kernel as ops/_fusion_igemm.py would launch it at --shape: the forward, the input gradient and the kernel
gradients (each every window in one launch); whether the tensor-core path is wgmma (Hopper) or mma.sync.
Compile-time facts, not timings.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # compile for real, even when called from a test environment

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from msf_scale.ops import _fusion_igemm as fi  # noqa: E402
from msf_scale.ops import _scan_chunked as sc  # noqa: E402
from msf_scale.ops import _scan_triton as st  # noqa: E402

DTYPES = {"bfloat16": ("*bf16", tl.float32, "tf32"), "float16": ("*fp16", tl.float32, "tf32"),
          "float32": ("*fp32", tl.float32, "ieee"), "tf32": ("*fp32", tl.float32, "tf32"),
          "float64": ("*fp64", tl.float64, "ieee")}


def _compile(fn, signature: dict, constants: dict, arch: int, warps: int, stages: int):
    signature = dict(signature, **{name: "constexpr" for name in constants})
    src = triton.compiler.ASTSource(fn, signature, constexprs=constants)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def _resources(kernel, arch: int) -> dict:
    """ptxas -v on the kernel's PTX: registers and spill bytes; shared memory from Triton; the MMA instruction; the
    PTX's shuffle, barrier and exp2 instructions (static counts: what layout round trips a kernel carries)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    suffix = "a" if arch == 90 else ""
    log = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs[-1]) if regs else None,
            "spill_store_bytes": int(spills[-1][0]) if spills else None,
            "spill_load_bytes": int(spills[-1][1]) if spills else None,
            "shared_bytes": kernel.metadata.shared,
            "mma": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none (CUDA cores)",
            "shuffles": len(re.findall(r"shfl\.sync", ptx)),
            "barriers": len(re.findall(r"bar\.sync|barrier\.sync", ptx)), "exp2": len(re.findall(r"ex2\.approx", ptx))}


def row_conv(shape, ks, dtype: str, arch: int, cfg: dict, shared: bool):
    """_row_conv as _fusion_igemm._conv launches it for windows ks (shared: the forward; else the input grad)."""
    ptr, acc, prec = DTYPES[dtype]
    b, _, t, hh, ww = shape
    g = fi.Geometry(hh, ww, ks)
    bm = max(16, min(fi._pow2(cfg["BM"]), fi._pow2(b * t * hh)))
    kk = list(ks) + [1] * (fi.MAX_SCALES - len(ks))
    signature = {**{f"x{i}": ptr for i in range(3)}, **{f"b{i}": ptr for i in range(3)},
                 **{f"o{i}": ptr for i in range(3)},
                 "C": "i32", "T": "i32", "H": "i32", "W": "i32", "HP": "i32", "ROWS": "i32"}
    constants = dict(SHARED=shared, NS=len(ks), K0=kk[0], K1=kk[1], K2=kk[2], R=g.r, XP=g.xp, NP=g.np, XN=g.xn,
                     BM=bm, BK=max(16, min(fi._pow2(cfg["BK"]), g.np)), FLAT=bool(cfg["flat"]), PREC=prec, ACC=acc)
    return _compile(fi._row_conv, signature, constants, arch, cfg["warps"], cfg["stages"])


def tap_grad(shape, ks, dtype: str, arch: int, cfg: dict):
    """_tap_grad as _fusion_igemm._kernel_grads launches it for windows ks (every window in one launch)."""
    ptr, acc, prec = DTYPES[dtype]
    b, c, t, hh, ww = shape
    g = fi.Geometry(hh, ww, ks)
    rows, br, kmax = b * t * hh, max(16, fi._pow2(cfg["BR"])), 2 * g.r + 1
    splits = max(1, min(triton.cdiv(cfg["grad_programs"], c * kmax), triton.cdiv(rows, br)))
    chunk = triton.cdiv(triton.cdiv(rows, splits), br) * br
    kk = list(ks) + [1] * (fi.MAX_SCALES - len(ks))
    part = "*fp64" if dtype == "float64" else "*fp32"
    signature = {"hp_ptr": ptr, **{f"g{i}": ptr for i in range(3)}, **{f"p{i}": part for i in range(3)},
                 "C": "i32", "T": "i32", "H": "i32", "W": "i32", "HP": "i32", "NR": "i32"}
    constants = dict(CHUNK=chunk, NS=len(ks), K0=kk[0], K1=kk[1], K2=kk[2], R=g.r, XP=g.xp, NP=g.np, XN=g.xn,
                     BR=br, PREC=prec, ACC=acc)
    return _compile(fi._tap_grad, signature, constants, arch, cfg["grad_warps"], cfg["grad_stages"])


def scan_kernels(tiles: tuple[int, int, int], dtype: str, arch: int, length: int, d_state: int,
                 partials: bool | None = None):
    """ops/_scan_triton.py's forward and backward as the bidirectional mixer calls them (D, delta_bias, softplus,
    no z; u, delta, B, C in ``dtype``, A, D, bias and the states float32), both with tiles BD, BT, warps (CONFIG
    has its own BD and warps for each)."""
    ptr, acc, _ = DTYPES[dtype]
    bd, bt, warps = tiles
    partials = st.CONFIG["partials"] if partials is None else partials   # the backward's dB / dC variant
    fp32 = "*fp64" if dtype == "float64" else "*fp32"
    strides = [f"s{t}_{a}" for t, axes in (("u", "bdl"), ("dt", "bdl"), ("z", "bdl"), ("B", "bgnl"), ("C", "bgnl"))
               for a in axes]
    tiles_n = triton.cdiv(length, bt)
    common = dict(N=d_state, BD=bd, BT=bt, HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, CDT=acc)
    # the chunked forward as batch-1 inference of a tiny model runs it (D = 2 x 384 grouped channels)
    chunks, per_chunk = st.chunking(2 * 384 // bd, tiles_n)
    wide = {"A", "Dv", "BIAS", "LAST", "STATES", "HEND", "PROD", "DA", "DB", "DC", "DD", "DBIAS"}
    fwd_ptrs = "U DT Z A Bm Cm Dv BIAS Y LAST STATES HEND PROD"
    out = {}
    for name, fn, ptrs, tail, ints_, constants in (
            ("forward", st._scan_fwd, fwd_ptrs, ["sy_b", "sy_d", "sy_l"], "L DIM DPG REV_FROM",
             dict(NT=tiles_n, NC=1, TPC=tiles_n, HAS_Z=False, SAVE=True)),
            ("backward", st._scan_bwd, "U DT Z A Bm Cm Dv BIAS STATES DOUT DU DDT DZ DA DB DC DD DBIAS",
             ["so_b", "so_d", "so_l"], "L DIM G DPG REV_FROM", dict(NT=tiles_n, HAS_Z=False, PARTIAL=partials)),
            (f"chunk ends NC={chunks}", st._chunk_ends, "U DT A Bm Cm Dv BIAS HEND PROD", [], "L DIM DPG REV_FROM",
             dict(NC=chunks, TPC=per_chunk)),
            (f"forward NC={chunks}", st._scan_fwd, fwd_ptrs, ["sy_b", "sy_d", "sy_l"], "L DIM DPG REV_FROM",
             dict(NT=tiles_n, NC=chunks, TPC=per_chunk, HAS_Z=False, SAVE=False))):
        names = [k for k in strides if not k.startswith("sz_")] if fn is st._chunk_ends else strides
        signature = {p: fp32 if p in wide else ptr for p in ptrs.split()}
        signature.update({k: "i32" for k in names + tail + ints_.split()})
        out[name] = _compile(fn, signature, dict(common, **constants), arch, warps, 1)
    return out


def chunked_scan_kernels(block: tuple[int, int], dtype: str, arch: int, length: int, d_state: int,
                         batch: int = 1, channels: int = 2 * 384) -> dict:
    """ops/_scan_chunked.py's three kernels as batch-1 inference of a tiny model runs them (D = 2 x 384 grouped
    channels, D, delta_bias, softplus, no z), with BD channels and ``warps`` a program and optionally ``steps``
    (CONFIG's by default; the prefix kernel: its own block and 4 warps, as the op launches it)."""
    ptr, acc, _ = DTYPES[dtype]
    bd, warps, steps = (*block, sc.CONFIG["steps"])[:3]
    fp32 = "*fp64" if dtype == "float64" else "*fp32"
    nc, lc = sc.chunking(batch, channels, length, bd)
    ncp = triton.next_power_of_2(nc)
    ud = ["su_b", "su_d", "su_l", "sdt_b", "sdt_d", "sdt_l"]
    bstr, cstr = [f"sB_{a}" for a in "bgnl"], [f"sC_{a}" for a in "bgnl"]
    ints_ = ["L", "DIM", "DPG", "REV_FROM"]
    common = dict(N=d_state, BD=bd, CDT=acc, NC=nc, LC=lc, HAS_BIAS=True, SOFTPLUS=True, TS=steps)
    ends = {**{p: ptr for p in ("U", "DT", "Bm")}, **{p: fp32 for p in ("A", "BIAS", "HEND", "PROD")},
            **{k: "i32" for k in ud + bstr + ints_}}
    outs = {**{p: ptr for p in ("U", "DT", "Z", "Bm", "Cm", "Y")}, **{p: fp32 for p in ("A", "Dv", "BIAS", "HEND")},
            **{k: "i32" for k in ud + ["sz_b", "sz_d", "sz_l"] + bstr + cstr + ["sy_b", "sy_d", "sy_l"] + ints_}}
    prefix_block = min(bd, max(1, sc.PREFIX_ELEMENTS // (ncp * d_state)))
    return {f"chunk ends NC={nc}": _compile(sc._chunk_ends, ends, common, arch, warps, 1),
            f"chunk prefix NC={nc}": _compile(sc._chunk_prefix, {"HEND": fp32, "PROD": fp32, "DIM": "i32"},
                                              dict(NC=nc, NCP=ncp, N=d_state, BD=prefix_block), arch, 4, 1),
            f"chunk outputs NC={nc}": _compile(sc._chunk_outputs, outs, dict(common, HAS_D=True, HAS_Z=False),
                                               arch, warps, 1)}


def inference_kernels(shape, ks, dtype: str, arch: int, width: int = 384) -> dict:
    """The batch-1 inference launches beside the chunked scan, as the ops would launch them: the token-major mixer's
    conv1d (ops/_conv1d_triton.py at its CONFIG, d_conv 4) and the fused fusion forward's kernels at ``shape`` with
    ASWM (ops/_fusion_triton.py: _fwd with _forward_knobs' settings for that batch and width, _alpha, _combine and
    _combine_tokens). Why: the interpreter runs any Python the compiler rejects (a reassigned constexpr compiled on
    no GPU in session 20), so each kernel is compiled here too."""
    from msf_scale.ops import _conv1d_triton as ct
    from msf_scale.ops import _fusion_triton as ft
    import torch

    ptr, acc, _ = DTYPES[dtype]
    fp32 = "*fp64" if dtype == "float64" else "*fp32"
    conv = {**{p: ptr for p in ("X", "W", "BIAS", "OUT")},
            **{k: "i32" for k in ("L", "E", "sx_b", "sx_l", "so_b", "so_l")}}
    out = {f"conv1d both silu E={width}": _compile(ct._conv_both, conv, dict(K=4, BL=ct.CONFIG["BL"],
                                                                            BE=ct.CONFIG["BE"], ACC=acc),
                                                   arch, ct.CONFIG["warps"], 3)}
    torch_dtype = {"tf32": torch.float32}.get(dtype) or getattr(torch, dtype)
    h = torch.empty(shape, device="meta", dtype=torch_dtype)
    g = ft._Geom(h, tuple(ks))
    knob = ft._forward_knobs(g.B, g.C)
    fwd = {**{p: ptr for p in ("h_ptr", "f0_ptr", "f1_ptr", "f2_ptr", "aw_ptr")}, "w_ptr": fp32, "logit_ptr": fp32,
           **{k: "i32" for k in ("C", "T", "H", "W", "n_cg")}}
    warps, stages = g.launch("fwd", True, rows=g.fwd_BT * g.BH,
                             cfg=knob["fwd"] if ft.CONFIG.get("fwd") or not g.fp32 else None).values()
    form = "stacked" if knob["fwd_stack"] else "shared" if knob["fwd_shared"] else "loop"
    consts = dict(g.scale_kw(), CG=ft._channel_group(g.C, g.B), BT=g.fwd_BT, BH=g.BH, BW=g.BW, ASWM=True,
                  SHARE=bool(knob["fwd_shared"]), ACC=g.ACC, PREC=g.PREC, STAGES=knob["fwd_loop_stages"],
                  UNROLL=knob["fwd_unroll"], PARTIALS=bool(knob["logit_partials"]), STACK=bool(knob["fwd_stack"]),
                  NSP=ft._pow2(g.NS))
    if form != "loop":   # with and without the padded input (_forward_knobs' fwd_pad_input: batch 1's default)
        pad = bool(knob["fwd_pad_input"])
        out[f"fusion forward ({form}, {'unpadded' if pad else 'padded'} input) C={g.C}"] = _compile(
            ft._fwd, fwd, dict(consts, PADIN=not pad), arch, warps, stages)
        consts["PADIN"] = pad
    out[f"fusion forward ({form}) C={g.C}"] = _compile(ft._fwd, fwd, consts, arch, warps, stages)
    tile_g, tile_p = ft.CONFIG.get("alpha_tile") or (64, 16)
    out["fusion alpha"] = _compile(ft._alpha, {"logit_ptr": fp32, "bias_ptr": ptr, "alpha_ptr": fp32, "B": "i32",
                                               "THW": "i32"},
                                   dict(N_PART=g.C, NS=g.NS, HAS_BIAS=True, G=tile_g, P=tile_p, ACC=g.ACC), arch, 4, 3)
    comb = {"f0_ptr": ptr, "f1_ptr": ptr, "f2_ptr": ptr, "alpha_ptr": fp32, "out_ptr": ptr, "C": "i32", "THW": "i32"}
    out["fusion combine"] = _compile(ft._combine, comb, dict(NS=g.NS, BLOCK=ft._pos_block(g.THW), ACC=g.ACC),
                                     arch, 4, 3)
    cb, p = ft.COMBINE_TOKENS_BLOCK
    out["fusion combine token-major"] = _compile(ft._combine_tokens, comb, dict(NS=g.NS, CB=cb, P=p, ACC=g.ACC),
                                                 arch, 4, 3)
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--shape", default="32,384,8,14,14", help="B,C,T,H,W")
    ap.add_argument("--scales", default="3,5,7")
    ap.add_argument("--tiles", action="append", default=None,
                    help="BM,BK,warps,stages of the row conv (repeatable; default: CONFIG's)")
    ap.add_argument("--grad-tiles", action="append", default=None,
                    help="BR,warps,stages of the kernel gradient (repeatable; default: CONFIG's)")
    loop = ap.add_mutually_exclusive_group()
    loop.add_argument("--flat", action="store_true", help="the row conv's flat loop (CONFIG['flat'] = True)")
    loop.add_argument("--nested", action="store_true", help="the row conv's nested loop (CONFIG['flat'] = False)")
    ap.add_argument("--scan-tiles", action="append", default=None,
                    help="BD,BT,warps of the triton selective scan (repeatable): report its kernels instead")
    ap.add_argument("--chunked-scan", action="append", default=None,
                    help="BD,warps[,steps] of the chunked inference scan (repeatable): report its kernels instead")
    ap.add_argument("--scan-length", type=int, default=1569, help="the scan's L (tiles are a compile constant)")
    ap.add_argument("--inference", action="store_true",
                    help="report the batch-1 inference kernels instead: the token-major conv1d and the fused fusion "
                         "forward's launches at --shape (use a batch-1 shape) and --scales")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)

    def ints(text: str, n: int | None, what: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or (n is not None and len(values) != n):
            ap.error(f"{what} must be {n or 'some'} comma-separated integers, got {text!r}")
        return values

    shape = ints(args.shape, 5, "--shape")
    ks = ints(args.scales, None, "--scales")
    if not 1 <= len(ks) <= fi.MAX_SCALES or any(k % 2 == 0 or k < 1 for k in ks):
        ap.error(f"--scales must be 1..{fi.MAX_SCALES} odd windows, got {args.scales!r}")
    cfg = dict(fi.CONFIG, **({"flat": True} if args.flat else {"flat": False} if args.nested else {}))
    rows = []

    def row(kernel: str, setting: str, compiled) -> None:
        rows.append({"kernel": kernel, "setting": setting, **_resources(compiled, args.arch)})

    scales = ",".join(map(str, ks))
    for tiles in args.scan_tiles or []:
        for kernel, compiled in scan_kernels(ints(tiles, 3, "--scan-tiles"), args.dtype, args.arch,
                                             args.scan_length, 16).items():
            row(f"scan {kernel} L={args.scan_length}", tiles, compiled)
    for block in args.chunked_scan or []:
        setting = ints(block, None, "--chunked-scan")
        if not 2 <= len(setting) <= 3:
            ap.error(f"--chunked-scan is BD,warps[,steps], got {block!r}")
        for kernel, compiled in chunked_scan_kernels(setting, args.dtype, args.arch,
                                                     args.scan_length, 16).items():
            row(f"chunked scan {kernel} L={args.scan_length}", block, compiled)
    if args.inference:
        if len(ks) < 2:
            ap.error("--inference: the fused forward's ASWM launches need 2..3 --scales")
        for kernel, compiled in inference_kernels(shape, ks, args.dtype, args.arch).items():
            row(kernel, "CONFIG", compiled)
    scans = args.scan_tiles or args.chunked_scan or args.inference
    for tiles in ([] if scans else args.tiles
                  or [",".join(str(cfg[k]) for k in ("BM", "BK", "warps", "stages"))]):
        bm, bk, warps, stages = ints(tiles, 4, "--tiles")
        c = dict(cfg, BM=bm, BK=bk, warps=warps, stages=stages)
        row(f"forward k={scales}", tiles, row_conv(shape, ks, args.dtype, args.arch, c, shared=True))
        row(f"input grad k={scales}", tiles, row_conv(shape, ks, args.dtype, args.arch, c, shared=False))
    for tiles in ([] if scans else args.grad_tiles
                  or [",".join(str(cfg[k]) for k in ("BR", "grad_warps", "grad_stages"))]):
        br, warps, stages = ints(tiles, 3, "--grad-tiles")
        c = dict(cfg, BR=br, grad_warps=warps, grad_stages=stages)
        row(f"kernel grad k={scales}", tiles, tap_grad(shape, ks, args.dtype, args.arch, c))
    if args.json:
        print(json.dumps(rows))
        return rows
    what = ("inference kernels" if args.inference else "scan kernels") if scans else f"igemm kernels, shape {shape},"
    print(f"{what} for sm_{args.arch}, {args.dtype} (ptxas -v; compile-time facts)\n")
    print("| kernel | tiles | registers | spill stores / loads (B) | shared (B) | MMA | shuffles / barriers / exp2 "
          "(PTX) |\n|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['kernel']} | {r['setting']} | {r['registers']} | {r['spill_store_bytes']} / "
              f"{r['spill_load_bytes']} | {r['shared_bytes']} | {r['mma']} | {r['shuffles']} / {r['barriers']} / "
              f"{r['exp2']} |")
    return rows


if __name__ == "__main__":
    main()
