"""torch.compile of the models in eval must not recompile per block.

On the lent H200 the mamba-ssm scan is an opaque extension call, so dynamo breaks the graph inside every block and
compiles one resume function that all blocks share. DropPath used to test ``p`` before ``training``: every block's
different stochastic-depth rate became a guard, dynamo recompiled per block, hit its recompile limit (8) and ran
the rest eagerly (compile was slower than eager in the 9-model table). Here a graph break is forced in the mixer
(the CPU scan backends are traceable): the mixer is left untraced and any recompile is an error.
"""
import pytest
import torch
import torch._dynamo

from msf_scale.models import create_model
from msf_scale.models.blocks import BiMamba


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba"])
def test_eval_compile_does_not_recompile_per_block(monkeypatch, variant):
    torch.manual_seed(0)
    model = create_model(variant, size="tiny", num_frames=2, img_size=32, num_classes=4, depth=10,
                         embed_dim=32, drop_path_rate=0.3, scan_backend="torch", fusion_backend="ref").eval()
    rates = {blk.drop_path.p for blk in model.blocks}
    assert len(rates) == 10   # every block its own rate: the guard this test is about

    # the mixer as dynamo sees the CUDA scan: not traced, a graph break around it
    monkeypatch.setattr(BiMamba, "forward", torch._dynamo.disable(BiMamba.forward))
    x = torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")   # dynamo's guards only: no inductor, fast on CPU
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, expected)


def _regional_frames(variant: str, depth: int, in_place: bool = False, dynamic: bool | None = None) -> int:
    """Frames dynamo compiles for one training forward + backward of a regionally compiled model: Accelerate's
    compile_regions (in_place: compile_regions_deepspeed, its DeepSpeed form), each block compiled on its own,
    dynamo's cache shared by all of them. Over dynamo's recompile limit the test fails (not a silent eager fallback)."""
    from accelerate.utils import compile_regions, compile_regions_deepspeed
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = create_model(variant, size="tiny", num_frames=2, img_size=32, num_classes=4, depth=depth,
                         embed_dim=32, drop_path_rate=0.3, scan_backend="torch", fusion_backend="ref").train()
    assert len({blk.drop_path.p for blk in model.blocks}) == depth   # every block its own rate
    torch._dynamo.reset()
    counter = CompileCounter()   # dynamo's frames only: no inductor, fast on CPU
    if in_place:
        compile_regions_deepspeed(model, backend=counter, dynamic=dynamic)
        compiled = model
    else:
        compiled = compile_regions(model, backend=counter, dynamic=dynamic)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled(torch.randn(2, 3, 2, 32, 32)).sum().backward()
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("variant,in_place,dynamic", [("videomamba", False, None), ("msf_mamba_plus", False, None),
                                                      ("msf_mamba_plus", True, None), ("videomamba", False, False)])
def test_regional_training_compile_does_not_recompile_per_block(variant, in_place, dynamic):
    # --dynamo_use_regional_compilation: one compiled block serves every block only if no per-block value (DropPath's
    # rate) is a guard; the first block (rate 0, its branch skipped) adds one variant, not more. dynamic=False is what
    # an accelerate config with `dynamo_use_dynamic: false` passes. Planted: bernoulli_(1 - p) under compile hit the
    # recompile limit at depth 12 (every case); the rate or the branch read from the Python float, the dynamic=False case.
    frames = _regional_frames(variant, 4, in_place, dynamic)
    assert frames > 0
    assert _regional_frames(variant, 12, in_place, dynamic) == frames


def test_compiled_drop_path_drops_at_its_rate():
    from msf_scale.models.blocks import DropPath

    torch.manual_seed(0)
    drop = DropPath(0.2).train()
    torch._dynamo.reset()
    out = torch.compile(drop, backend="aot_eager", fullgraph=True)(torch.ones(20000, 3, 2))
    torch._dynamo.reset()
    kept = out[:, 0, 0] != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01   # binomial sd 0.003
    assert torch.all(out[kept] == 1 / 0.8) and torch.all(out[~kept] == 0)   # whole samples dropped, the rest rescaled


def test_compiled_drop_path_is_the_documented_draw():
    # aot_eager runs the traced ops eagerly from the global generator: the same seed gives the same mask as
    # x * (rand >= p) / (1 - p) computed by hand, with the rate changed after compiling (no recompile, no stale rate).
    from msf_scale.models.blocks import DropPath

    drop = DropPath(0.3).train()
    x = torch.randn(64, 5, 3)
    torch._dynamo.reset()
    compiled = torch.compile(drop, backend="aot_eager", fullgraph=True)
    for p in (0.3, 0.6):
        drop.p = p
        torch.manual_seed(1)
        with torch._dynamo.config.patch(error_on_recompile=True) if p != 0.3 else torch._dynamo.config.patch():
            got = compiled(x)
        torch.manual_seed(1)
        want = x * (torch.rand(64, 1, 1) >= p) / (1 - p)
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_double", "to_empty"])
def test_drop_path_rate_survives_a_model_cast(cast):
    # A rate buffer cast with the model read 0.0999 for 0.1 (fp16) under compile; to_empty (meta-device builds
    # materialised) left it uninitialised.
    from msf_scale.models.blocks import DropPath

    drop = DropPath(0.1)
    if cast == "to_empty":
        with torch.device("meta"):
            drop = DropPath(0.1)
        drop = drop.to_empty(device="cpu")
    else:
        drop = drop.to(torch.float64) if cast == "to_double" else getattr(drop, cast)()
    assert drop.rate.dtype == torch.float32 and drop.rate.item() == torch.tensor(0.1).item()
    drop.p = 0.3   # and a later change still reaches it
    assert drop.rate.item() == torch.tensor(0.3).item()


def test_drop_path_built_under_inference_mode_casts_and_sets_outside_it():
    # An in-place write to an inference tensor outside inference_mode raises: a model built under it must still move,
    # cast and take a new rate afterwards.
    from msf_scale.models.blocks import DropPath

    with torch.inference_mode():
        drop = DropPath(0.1)
        half = DropPath(0.2).half()
    drop = drop.float().to("cpu")
    drop.p = 0.3
    half.float().p = 0.4
    assert drop.rate.item() == torch.tensor(0.3).item() and half.rate.item() == torch.tensor(0.4).item()
