"""Fixed-shape inference runners: the same forward as eager PyTorch, a CUDA-graph replay, or torch.compile.

    run = build_runner(model, example, mode="graph")     # example: a tensor of the shape every call will have
    logits = run(video)                                  # the output buffer is reused by the next call (graph)

Why three: at batch 1 the eager forward of a 24-32 block Mamba is launch-bound (hundreds of small kernels, each
waiting on Python), so its time measures the host, not the model, and swings by 2x between runs. A CUDA graph
records the kernels once and replays them with one launch; torch.compile fuses the element-wise ops around the
scan. Graph replay (or compile) is the figure to quote. All three run under torch.no_grad in eval mode, with
bf16 autocast where ``dtype`` is bfloat16 (as training and evaluation run on GPU).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

MODES = ("eager", "graph", "compile")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def group_scans(model: nn.Module, on: bool = True) -> int:
    """Switch every bidirectional mixer (models.blocks.BiMamba) in ``model`` to computing both scan directions as one
    grouped call (``on``) or one call each: the same parameters and result, fewer launches. Returns how many."""
    mixers = [m for m in model.modules() if hasattr(m, "grouped_scan")]
    for m in mixers:
        m.grouped_scan = on
    return len(mixers)


def cache_for_inference(model: nn.Module, on: bool = True) -> int:
    """Let every module with an ``inference_cache`` (the grouped mixer's packed parameters and its token-major path's
    tap-major conv taps and block-diagonal projections, each direction's A, StateFusion's CFD-folded kernels;
    models.blocks.cached_for_inference) build it once and reuse it in forwards
    without autograd, until a parameter's identity, storage or in-place version changes; ``on=False`` also drops what
    was cached. For a model whose weights stay put while it serves: evaluation
    inside training does not use it (DeepSpeed ZeRO-3 regathers parameters into reused storage, which that key would
    not notice). Returns how many modules."""
    mods = [m for m in model.modules() if hasattr(m, "inference_cache")]
    for m in mods:
        m.inference_cache = on
        if not on:
            for slot in [k for k in m.__dict__ if k.startswith("_inference_")]:
                del m.__dict__[slot]
    return len(mods)


def build_runner(model: nn.Module, example: torch.Tensor, mode: str = "eager", dtype: torch.dtype | None = None,
                 warmup: int = 3, compile_mode: str | None = None, grouped_scan: bool | None = True,
                 inference_cache: bool = True, freeze: bool | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``video -> logits`` for inputs shaped like ``example`` (on the model's device).

    The model is put in eval mode and, with ``grouped_scan`` True (the default), its mixers run both scan directions
    as one grouped call (:func:`group_scans`; False: one call each, None: as the model is configured): the same
    logits; measured on the H200 it cut batch-1 graph latency 4-11% across variants and sizes (docs/BENCHMARKS.md,
    session 6), while training gains nothing from it. With ``inference_cache`` (the default) the model's per-forward
    parameter work is done once (:func:`cache_for_inference`): fewer launches, the same logits.

    eager: model(x). graph: CUDA graph captured after ``warmup`` calls on a side stream; each call copies x into the
    captured input and replays (the returned tensor is the graph's output buffer); with the inference caches on it
    reads their tensors as captured while reading the other weights live: build a new runner after changing weights.
    compile: torch.compile(model) with ``compile_mode`` (default on CUDA "reduce-overhead": the fused kernels
    replayed as CUDA graphs, PyTorch's mode for small batches, whose outputs the next call may overwrite like
    graph's; on CPU PyTorch's default), compiled and recorded here on ``example``, not inside the first timed
    call. ``freeze`` (compile only; default: on CUDA): Inductor's freezing, which treats the parameters as constants
    and folds the work done on them alone (autocast's weight casts, A = -exp(A_log), the packed directions, the CFD
    fold) into the compiled graph once: batch-1 latency of videomamba tiny 3.23 -> 2.58 ms on the lent H100
    (docs/BENCHMARKS.md, session 11). The same contract as the inference caches: build a new runner after changing
    weights."""
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; expected one of {MODES}")
    if freeze and mode != "compile":
        raise ValueError(f"freeze is Inductor's (mode 'compile'), not mode {mode!r}")
    if freeze is None:
        freeze = mode == "compile" and example.device.type == "cuda"
    model.eval()
    if grouped_scan is not None:
        group_scans(model, grouped_scan)
    cache_for_inference(model, inference_cache)
    device = example.device
    amp = lambda: _autocast(device, dtype)   # noqa: E731 - a fresh context per call

    if mode == "eager":
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), amp():
                return model(x)
        return run

    if mode == "compile":
        # A fresh dynamo cache per runner: timing model after model through one forward() would otherwise hit
        # dynamo's recompile limit and silently fall back to eager.
        torch._dynamo.reset()
        if compile_mode is None and device.type == "cuda":
            compile_mode = "reduce-overhead"
        compiled = torch.compile(model, mode=compile_mode, dynamic=False)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), amp():
                return compiled(x)
        # cudagraph trees record on the third call; warmup as asked beyond that. Inductor reads its config when it
        # compiles (the first call), so freezing needs to be on only around these calls.
        with torch._inductor.config.patch(freezing=True) if freeze else nullcontext():
            for _ in range(max(warmup, 3 if compile_mode == "reduce-overhead" else 1)):
                run(example)
        return run

    if device.type != "cuda":
        raise ValueError("mode 'graph' needs a CUDA device (CUDA graphs); use --modes eager,compile on CPU")
    static_in = example.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad(), amp():
        for _ in range(max(warmup, 1)):   # lazy init (cuBLAS handles, autotuning) must happen outside capture
            model(static_in)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), amp():
        static_out = model(static_in)

    def run(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x, non_blocking=True)
        graph.replay()
        return static_out
    run.graph = graph   # keep the graph (and its memory pool) alive with the runner
    # the captured kernels read the inference caches' tensors (not the parameters): keep them alive with the graph,
    # whatever later rebuilds the caches
    run.cached = [v for m in model.modules() for k, v in m.__dict__.items() if k.startswith("_inference_")]
    return run
