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


def _regional_frames(variant: str, depth: int) -> int:
    """Frames dynamo compiles for one training forward + backward of a regionally compiled model (accelerate's
    compile_regions: each block compiled on its own, dynamo's cache shared by all of them)."""
    from accelerate.utils import compile_regions
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = create_model(variant, size="tiny", num_frames=2, img_size=32, num_classes=4, depth=depth,
                         embed_dim=32, drop_path_rate=0.3, scan_backend="torch", fusion_backend="ref").train()
    assert len({blk.drop_path.p for blk in model.blocks}) == depth   # every block its own rate
    torch._dynamo.reset()
    counter = CompileCounter()   # dynamo's frames only: no inductor, fast on CPU
    compiled = compile_regions(model, backend=counter)
    compiled(torch.randn(2, 3, 2, 32, 32)).sum().backward()
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba_plus"])
def test_regional_training_compile_does_not_recompile_per_block(variant):
    # accelerate launch --dynamo_use_regional_compilation: one compiled block serves every block only if no
    # per-block value (DropPath's rate) is a guard; the rate 0 of the first block may add one variant, not more.
    # DropPath's eager bernoulli_(1 - p) under compile (planted) gave 8 frames at depth 4 and 12 at depth 12.
    assert _regional_frames(variant, 12) == _regional_frames(variant, 4)


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
