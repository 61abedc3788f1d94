"""The 3-D CNN baseline and the conv stem: shapes, registry, and FLOP counts against a count of the real layers."""
import pytest
import torch
import torch.nn as nn

from msf_scale.models import CNN3D_SIZES, create_model, list_models


def _conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every Conv3d / Linear, read from the shapes the forward really produced (hooks)."""
    total = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv3d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.kernel_size[2]
            total.append(out[0].numel() * (m.in_channels // m.groups) * k)
        elif isinstance(m, nn.Linear):
            total.append(out[0].numel() * m.in_features)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("size", sorted(CNN3D_SIZES))
def test_cnn3d_sizes_shapes_and_flops(size):
    m = create_model("cnn3d", size=size, num_classes=5, num_frames=8, img_size=48).eval()
    x = torch.randn(1, 3, 8, 48, 48)
    assert m(x).shape == (1, 5)
    assert m.flops_per_clip() == _conv_macs(m, x)
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert [w for w in m.cfg.widths] == list(CNN3D_SIZES[size])


def test_cnn3d_registered_and_accepts_the_train_call():
    assert {"cnn3d_tiny", "cnn3d_small", "cnn3d_base"} <= set(list_models("cnn3d*"))
    # train.py passes these for every variant (drop_path_rate may be None)
    m = create_model("cnn3d", size="tiny", num_classes=3, num_frames=4, img_size=32, drop_path_rate=None)
    assert m.no_weight_decay() == set()
    with pytest.raises(ValueError, match="unknown cnn3d option"):
        create_model("cnn3d", size="tiny", patch_size=8)
    with pytest.raises(ValueError, match=r"expected video"):
        m(torch.randn(1, 3, 4, 16, 16))


def test_cnn3d_sees_time_order():
    """A clip and its time reverse give different logits (3 x 3 x 3 kernels are not symmetric in time)."""
    torch.manual_seed(0)
    m = create_model("cnn3d", size="tiny", num_classes=4, num_frames=8, img_size=32).eval()
    x = torch.randn(2, 3, 8, 32, 32)
    assert not torch.allclose(m(x), m(x.flip(2)), atol=1e-4)


@pytest.mark.parametrize("kt", [1, 3])
def test_conv_stem_flops_and_grid(kt):
    """The conv stem reaches the patch grid and flops_per_clip counts exactly its convolutions' multiply-adds."""
    kw = dict(num_classes=4, num_frames=4, img_size=32, patch_size=8, depth=2, embed_dim=32)
    patch = create_model("msf_mamba", size="tiny", **kw).eval()
    conv = create_model("msf_mamba", size="tiny", stem="conv", stem_temporal_kernel=kt, **kw).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    assert conv.patch_embed(x).shape == patch.patch_embed(x).shape == (1, 32, 4, 4, 4)
    counted = _conv_macs(conv.patch_embed, x)
    stem_in_total = conv.flops_per_clip() - patch.flops_per_clip() + _conv_macs(patch.patch_embed, x)
    assert stem_in_total == counted
    assert conv(x).shape == (1, 4)


def test_conv_stem_temporal_kernel_mixes_frames():
    """kt = 3: a change in frame 0 reaches frame 1's tokens; kt = 1 keeps frames apart."""
    kw = dict(num_classes=4, num_frames=4, img_size=32, patch_size=8, depth=1, embed_dim=32, stem="conv")
    x = torch.randn(1, 3, 4, 32, 32)
    y = x.clone()
    y[:, :, 0] += 1.0
    for kt, mixes in ((1, False), (3, True)):
        stem = create_model("msf_mamba", size="tiny", stem_temporal_kernel=kt, **kw).patch_embed.eval()
        with torch.no_grad():
            diff = (stem(x) - stem(y))[:, :, 1].abs().max().item()
        assert (diff > 1e-6) == mixes, (kt, diff)


def test_conv_stem_rejects_bad_settings():
    with pytest.raises(ValueError, match="power-of-two"):
        create_model("msf_mamba", size="tiny", stem="conv", patch_size=12, img_size=48, num_frames=2)
    with pytest.raises(ValueError, match="tubelet_size must be 1"):
        create_model("msf_mamba", size="tiny", stem="conv", tubelet_size=2, num_frames=2)
    with pytest.raises(ValueError, match="stem must be"):
        create_model("msf_mamba", size="tiny", stem="resnet", num_frames=2)
