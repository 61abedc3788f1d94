"""PTX instructions a thread executes per window row in the fused fusion forward's loop (the stacked form at batch 1,
192 channels, bf16, sm_90, pointers 16-divisible as the runtime specializes them), unpadded and padded input. Run on
any machine with triton: python docs/reports/speed_h100_session21/ptx_loop.py (session 21: 193 and 119; the band
table form, commit 0a72c6c, removed in 6fd48ce: 83)."""
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from msf_scale.ops import _fusion_triton as ft  # noqa: E402

SIG = {"h_ptr": "*bf16", "w_ptr": "*fp32", "f0_ptr": "*bf16", "f1_ptr": "*bf16", "f2_ptr": "*bf16",
       "aw_ptr": "*bf16", "logit_ptr": "*fp32", "C": "i32", "T": "i32", "H": "i32", "W": "i32", "n_cg": "i32"}
BASE = dict(NS=3, K0=3, K1=5, K2=7, OFF1=27, OFF2=152, KTOT=495, KM=7, CG=1, BT=4, BH=16, BW=16, ASWM=True,
            SHARE=True, ACC=tl.float32, PREC="tf32", STAGES=1, UNROLL=None, PARTIALS=True, STACK=True, NSP=4)
for name, extra in [("unpadded input", {}), ("padded input", {"PADIN": True})]:
    consts = {**BASE, **extra}
    src = triton.compiler.ASTSource(ft._fwd, dict(SIG, **{k: "constexpr" for k in consts}), constexprs=consts,
                                    attrs={(i,): [["tt.divisibility", 16]] for i in range(7)})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1}).asm["ptx"]
    loop = ptx[ptx.index("$L__BB0_1:"):ptx.index("bra \t$L__BB0_1")]
    n = len([l for l in loop.split("\n") if l.strip() and l.strip()[0] not in "/$.{}"])
    loads = re.findall(r"ld\.global[\.\w]*", loop)
    print(f"{name}: {n} instructions a window row; global loads {len(loads)} ({', '.join(sorted(set(loads)))})")
