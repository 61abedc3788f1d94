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
