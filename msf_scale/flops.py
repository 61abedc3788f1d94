"""fvcore FLOP counting of the real models: `msf-scale flops --variant V --size S`.

Convention (fvcore's): one multiply-add = 1 FLOP. Counted: every matmul / linear / convolution (fvcore's own
handles), the selective scan (9 B L D N, the Mamba lineage's handle: VMamba, state-spaces/mamba#110, plus B D L for
the D skip and B D L for a z gate passed to the scan), the CFD fusion (one depthwise k^3 multiply-add per output
element and window), and tensor-by-tensor multiplies (the silu(z) gate, ASWM's weighted sum, the CPU path's
causal-conv taps). Zero: adds, activations, softmax, norms (they fold into neighbours at inference) and
reshapes. The scan and the fusion reach the tracer as single named ops (``msf_scale::selective_scan``,
``msf_scale::state_fusion``, see msf_scale/ops), so any backend counts the same.

The model is traced on the meta device: shapes only, no compute, so base at 8 x 224 x 224 counts in ~2 s.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONVENTION = ("fvcore convention: 1 multiply-add = 1 FLOP; matmuls, convolutions, the scan (9·B·L·D·N + B·D·L "
              "per D skip / z gate), the CFD fusion (k³ per element and scale) and tensor-by-tensor multiplies "
              "count; adds, activations, softmax and norms count 0")

# Element-wise, normalisation and reduction ops: zero FLOPs under the convention above (fvcore would warn on them).
ZERO_FLOP_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::div", "aten::neg", "aten::exp", "aten::silu",
    "aten::sigmoid", "aten::softplus", "aten::gelu", "aten::relu", "aten::relu_", "aten::tanh", "aten::softmax",
    "aten::mean", "aten::sum", "aten::flip", "aten::pad", "aten::rms_norm", "aten::layer_norm",
    "aten::group_norm", "aten::batch_norm", "aten::max_pool3d", "aten::avg_pool3d", "aten::adaptive_avg_pool3d",
    "aten::clone", "aten::fill_", "aten::masked_fill_", "aten::diff", "aten::amax",
)


def _shape(v) -> list[int] | None:
    t = v.type()
    return t.sizes() if isinstance(t, torch._C.TensorType) and v.isCompleteTensor() else None


def scan_flop_jit(inputs: list, outputs: list) -> int:
    """msf_scale::selective_scan(u, delta, A, B, C, D?, z?, delta_bias?, softplus, backend): 9·B·L·D·N for the
    recurrence (discretise, update, read out), + B·D·L for the D skip and + B·D·L for the z gate where passed."""
    b, d, length = _shape(inputs[0])
    n = _shape(inputs[2])[1]
    extra = sum(b * d * length for v in (inputs[5], inputs[6]) if _shape(v) is not None)
    return 9 * b * length * d * n + extra


def fusion_flop_jit(inputs: list, outputs: list) -> int:
    """msf_scale::state_fusion(h, kernels, theta, backend): each k x k x k depthwise kernel costs k^3 multiply-adds
    per output element (the CFD centre-tap adjustment is kernel-sized: not counted)."""
    numel = prod(_shape(inputs[0]))
    kernels = [_shape(v)[-1] for v in inputs[1].node().inputs()]
    return numel * sum(k ** 3 for k in kernels)


def _is_array(v) -> bool:
    s = _shape(v)
    return s is not None and prod(s) > 1


def mul_flop_jit(inputs: list, outputs: list) -> int:
    """aten::mul of two tensors: one multiply per output element; by a scalar (0.5 * y): 0, a rescale."""
    return prod(_shape(outputs[0])) if _is_array(inputs[0]) and _is_array(inputs[1]) else 0


def addcmul_flop_jit(inputs: list, outputs: list) -> int:
    """aten::addcmul(x, a, b): one multiply-add per output element."""
    return prod(_shape(outputs[0]))


HANDLES = {"msf_scale::selective_scan": scan_flop_jit, "msf_scale::state_fusion": fusion_flop_jit,
           "aten::mul": mul_flop_jit, "aten::mul_": mul_flop_jit, "aten::addcmul": addcmul_flop_jit}


def _conv_out_shape(x, w, stride, padding, dilation, transposed, output_padding, groups) -> list[int]:
    n, wshape = [int(s) for s in x.shape], [int(s) for s in w.shape]
    out = [n[0], wshape[1] * groups if transposed else wshape[0]]
    for i, size in enumerate(n[2:]):
        k, s, p, d = wshape[2 + i], int(stride[i]), int(padding[i]), int(dilation[i])
        out.append((size - 1) * s - 2 * p + d * (k - 1) + int(output_padding[i]) + 1 if transposed
                   else (size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out


@contextmanager
def meta_convolution():
    """While the JIT tracer runs, sizes are traced tensors, and PyTorch's Python meta kernel for convolution fails
    on them (torch._check gets a tensor); it also skips aten::_convolution, the node fvcore counts. For the extent
    of the block, meta convolutions go through _convolution with a plain-int shape rule (removed afterwards)."""
    lib = torch.library.Library("aten", "IMPL")

    def convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
        return torch.ops.aten._convolution(x, w, bias, stride, padding, dilation, transposed, output_padding,
                                           groups, False, False, True, True)

    def _convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups, *flags):
        return x.new_empty(_conv_out_shape(x, w, stride, padding, dilation, transposed, output_padding, groups))

    with warnings.catch_warnings():   # "overriding a previously registered kernel": intended, and undone below
        warnings.simplefilter("ignore")
        lib.impl("convolution", convolution, "Meta")
        lib.impl("_convolution", _convolution, "Meta")
    try:
        yield
    finally:
        lib._destroy()


def flop_analysis(model: nn.Module, video: torch.Tensor):
    """An fvcore FlopCountAnalysis of ``model(video)`` with this module's handles and zero-FLOP ops. Traced on the
    meta device when the model and video are meta tensors (inside :func:`meta_convolution`)."""
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(model.eval(), (video,))
    for op in ZERO_FLOP_OPS:            # None = ignored, but fvcore's own handles (batch_norm...) take precedence
        fca._op_handles.pop(op, None)
    fca.set_op_handle(**HANDLES, **{op: None for op in ZERO_FLOP_OPS})
    fca.uncalled_modules_warnings(False)   # conv1d / x_proj / dt_proj weights are used functionally in the mixer
    return fca


@dataclass
class FlopReport:
    name: str
    input_shape: tuple[int, ...]          # one view [1, C, T, H, W]
    views: int
    flops: int                            # one view
    params: int
    analytic: int | None                  # the model's own flops_per_clip(), for comparison
    by_operator: dict[str, int]
    unsupported: dict[str, int]
    table: str = ""                       # fvcore's per-module table (markdown)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.name, "input": list(self.input_shape), "views": self.views,
                "gflops_per_view": self.flops / 1e9, "gflops_per_video": self.flops * self.views / 1e9,
                "params": self.params, "analytic_gflops_per_view": None if self.analytic is None else self.analytic / 1e9,
                "by_operator": self.by_operator, "unsupported": self.unsupported, "convention": CONVENTION}


def count_model(model: nn.Module, name: str = "", views: int = 1, max_depth: int = 2,
                device: str = "meta") -> FlopReport:
    """Count one view of ``model`` (built with its input shape in model.cfg). ``device="meta"`` (default) rebuilds
    nothing: pass a meta model; ``cpu`` traces with real tensors (slower, same count)."""
    from fvcore.nn import flop_count_table

    cfg = model.cfg
    shape = (1, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    model = model.to(device)
    video = torch.zeros(shape, device=device)
    fca = flop_analysis(model, video)
    with torch.no_grad(), (meta_convolution() if device == "meta" else _null()):
        total = int(fca.total())
    table = flop_count_table(fca, max_depth=max_depth, show_param_shapes=False)
    by_module = fca.by_module()
    if "blocks.0" in by_module:   # one block's inside: where a block's FLOPs go
        params = dict(model.named_parameters())
        rows = ["| module (first block) | #parameters | GFLOPs |", "|:---|---:|---:|"]
        for name, v in by_module.items():
            if (name == "blocks.0" or name.startswith("blocks.0.")) and name.count(".") <= 3:
                n = sum(p.numel() for k, p in params.items() if k.startswith(name + "."))
                rows.append(f"| {name} | {n / 1e3:.1f}K | {v / 1e9:.4f} |")
        table += "\n\n" + "\n".join(rows)
    analytic = model.flops_per_clip() if hasattr(model, "flops_per_clip") else None
    return FlopReport(name, shape, views, total, sum(p.numel() for p in model.parameters()), analytic,
                      dict(fca.by_operator()), dict(fca.unsupported_ops()), table)


@contextmanager
def _null():
    yield


def build(variant: str, size: str, frames: int = 8, img_size: int = 224, num_classes: int = 32,
          device: str = "meta") -> nn.Module:
    from msf_scale.models import create_model

    return create_model(variant, size=size, num_classes=num_classes, num_frames=frames, img_size=img_size,
                        device=device)


def format_report(r: FlopReport) -> str:
    c, t, h, w = r.input_shape[1:]
    lines = [f"# {r.name}: {t} x {h} x {w} (C={c}), {r.views} view(s) per video", "",
             f"- {CONVENTION}.",
             f"- parameters: {r.params / 1e6:.2f} M",
             f"- GFLOPs per view: {r.flops / 1e9:.3f}",
             f"- GFLOPs per video ({r.views} views): {r.flops * r.views / 1e9:.3f}"]
    if r.analytic:
        lines.append(f"- analytic count (model.flops_per_clip): {r.analytic / 1e9:.3f} GFLOPs "
                     f"(fvcore / analytic = {r.flops / r.analytic:.4f})")
    lines.append("- unsupported operators: " + (", ".join(f"{k} x{v}" for k, v in r.unsupported.items()) or "none"))
    lines += ["", "By operator (GFLOPs per view):", "", "| operator | GFLOPs | share |", "|---|---:|---:|"]
    for op, v in sorted(r.by_operator.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {op} | {v / 1e9:.3f} | {100 * v / max(r.flops, 1):.1f}% |")
    lines += ["", "Per module (fvcore.nn.flop_count_table, one view; conv1d / x_proj / dt_proj are counted in their "
              "direction module, which uses their weights):", "", r.table]
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--variant", required=True, help="videomamba, msf_mamba, msf_mamba_plus, cnn3d, ...")
    p.add_argument("--size", required=True, help="tiny, small or base")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--views", type=int, default=6, help="test views per video (2 clips x 3 crops, the configs')")
    p.add_argument("--num-classes", type=int, default=32)
    p.add_argument("--max-depth", type=int, default=2, help="module depth of the per-module table")
    p.add_argument("--device", choices=("meta", "cpu"), default="meta",
                   help="meta: shapes only (default, instant); cpu: real tensors (same count, slower)")
    p.add_argument("--json", default=None, help="also write the counts to this JSON file")


def run_command(args) -> int:
    import json

    from msf_scale.config import UserError

    if args.views < 1:
        raise UserError("--views must be >= 1")
    try:
        model = build(args.variant, args.size, args.frames, args.img_size, args.num_classes, args.device)
    except ValueError as e:
        raise UserError(str(e)) from e
    report = count_model(model, f"{args.variant}_{args.size}", args.views, args.max_depth, args.device)
    print(format_report(report))
    if report.unsupported:
        print(f"\nwarning: operators without a FLOP handle (counted as 0): {report.unsupported}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=1))
    return 0
