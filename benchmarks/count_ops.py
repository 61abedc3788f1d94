"""Operators per batch-1 inference forward, by name: a CPU stand-in for the kernels a GPU launches (issue 19).

    python benchmarks/count_ops.py                                  # tiny, every variant, ungrouped and grouped
    python benchmarks/count_ops.py --sizes tiny,small --out /tmp/ops.json

Why: at batch 1 a graph-replayed forward is bound by its kernel count (hundreds of small kernels, a few
microseconds each), so "fewer launches" can be checked without a GPU, exactly and repeatably. Counted: the top-level
operators of one eval forward under torch.no_grad, as torch.profiler records them, minus views and dtype no-ops
(they launch nothing) but plus the views that copy (a reshape of a non-viewable layout, counted as "aten::reshape
(copy)"); the scan is counted as one op (the GPU runs one mamba-ssm kernel per call) plus the copies its CUDA path
makes of inputs whose time axis is not innermost (``aten::contiguous``, as ops/scan.py's _stride1), and the causal
conv1d as F.conv1d (its GPU path) instead of the CPU's shifted multiply-adds; the fusion runs on ``--fusion-backend``
(default conv: what `auto` picks on a GPU at batch 1). Deterministic: no timing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from msf_scale.inference import cache_for_inference, group_scans  # noqa: E402
from msf_scale.models import create_model  # noqa: E402
from msf_scale.ops.scan import _stride1  # noqa: E402

NO_LAUNCH = {"aten::view", "aten::transpose", "aten::permute", "aten::reshape", "aten::unsqueeze", "aten::split",
             "aten::chunk", "aten::slice", "aten::select", "aten::unflatten", "aten::expand", "aten::t",
             "aten::squeeze", "aten::as_strided", "aten::narrow", "aten::detach", "aten::alias", "aten::unbind",
             "aten::split_with_sizes", "aten::flatten", "aten::lift_fresh", "aten::empty", "aten::view_as",
             "aten::dropout"}   # dropout: identity in eval


def _gpu_shaped_conv1d(x, weight, bias):
    k = weight.shape[-1]
    return F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., :x.shape[-1]]


def _one_op_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
                 backend="auto", reverse_groups=0):
    assert reverse_groups == 0, "count_ops counts the mixer on a forward-only scan (flipped copies)"
    u, delta, B, C, z = map(_stride1, (u, delta, B, C, z))   # the copies mamba-ssm's path makes
    y, last = torch.ops.msf_scale.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, "torch")
    return (y, last) if return_last_state else y


def _copies(event) -> bool:
    """Whether a view-like operator launched a copy (a reshape that could not view: clone -> copy_ below it)."""
    return any(c.name == "aten::copy_" or _copies(c) for c in event.cpu_children)


def count(variant: str, size: str, grouped: bool, frames: int, img: int, fusion: str = "conv") -> collections.Counter:
    """Top-level operators of the second eval forward (the first may build caches) of one batch-1 clip."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = create_model(variant, size=size, num_classes=32, num_frames=frames, img_size=img,
                         fusion_backend=fusion).eval()
    group_scans(model, grouped)
    cache_for_inference(model)   # as build_runner (the latency harness) runs it
    x = torch.randn(1, 3, frames, img, img)
    with mock.patch("msf_scale.models.blocks.causal_depthwise_conv1d", _gpu_shaped_conv1d), \
            mock.patch("msf_scale.models.blocks.selective_scan", _one_op_scan), torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    top = [e for e in prof.events() if e.cpu_parent is None]
    ops = collections.Counter(e.name for e in top if e.name not in NO_LAUNCH)
    ops.update(f"{e.name} (copy)" for e in top if e.name in NO_LAUNCH and _copies(e))
    for name in [n for n in ops if n == "aten::to"]:   # fp32 .float() on fp32 parameters: returns self
        del ops[name]
    return ops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="videomamba,msf_mamba,msf_mamba_plus")
    ap.add_argument("--sizes", default="tiny")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--img", type=int, default=64, help="the count does not depend on it beyond the grid's size")
    ap.add_argument("--fusion-backend", default="conv", help="conv: auto's choice on a GPU at batch 1")
    ap.add_argument("--top", type=int, default=6, help="most frequent operators listed per row")
    ap.add_argument("--out", default=None, help="JSON with every row's full count")
    args = ap.parse_args(argv)
    from msf_scale.catalog import SSM_SIZES, SSM_VARIANTS
    for name, given, known in (("--variants", args.variants, SSM_VARIANTS), ("--sizes", args.sizes, SSM_SIZES)):
        bad = [v for v in given.split(",") if v not in known]
        if bad:
            ap.error(f"{name}: unknown {bad}; expected some of {sorted(known)}")
    rows = []
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            for grouped in (False, True):
                ops = count(variant, size, grouped, args.frames, args.img, args.fusion_backend)
                rows.append({"variant": variant, "size": size, "scan": "grouped" if grouped else "separate",
                             "ops": sum(ops.values()), "by_name": dict(ops.most_common())})
    print(f"top-level operators per batch-1 eval forward ({args.frames} x {args.img} x {args.img}, torch "
          f"{torch.__version__}; scan = 1 op, conv1d as on GPU, fusion {args.fusion_backend})\n")
    print("| variant | size | scan | ops | most frequent |\n|---|---|---|---:|---|")
    for r in rows:
        top = ", ".join(f"{n.split('::')[-1]} {c}" for n, c in list(r["by_name"].items())[:args.top])
        print(f"| {r['variant']} | {r['size']} | {r['scan']} | {r['ops']} | {top} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"frames": args.frames, "img": args.img, "fusion_backend": args.fusion_backend,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
