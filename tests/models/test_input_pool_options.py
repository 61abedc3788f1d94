"""The two [ours] options of issue 14's speed sweep: the stem's frame-difference input and max pooling."""
import pytest
import torch

from msf_scale import flops
from msf_scale.models import create_model

KW = dict(num_classes=4, num_frames=4, img_size=32, depth=2, embed_dim=32, patch_size=8)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_rgb_diff_feeds_the_stem_each_frame_minus_the_previous(stem):
    torch.manual_seed(0)
    model = create_model("msf_mamba", size="tiny", stem=stem, stem_input="rgb_diff", **KW).eval()
    seen = {}
    model.patch_embed.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.randn(2, 3, 4, 32, 32)
    model(x)
    stem_in = seen["x"]
    assert stem_in.shape == (2, 6, 4, 32, 32)
    torch.testing.assert_close(stem_in[:, :3], x)
    assert torch.equal(stem_in[:, 3:, 0], torch.zeros_like(x[:, :, 0]))     # the first frame has no previous one
    torch.testing.assert_close(stem_in[:, 3:, 1:], x[:, :, 1:] - x[:, :, :-1])


def test_rgb_diff_of_a_still_clip_is_zero_so_only_rgb_weights_matter():
    torch.manual_seed(0)
    model = create_model("msf_mamba", size="tiny", stem_input="rgb_diff", **KW).eval()
    still = torch.randn(1, 3, 1, 32, 32).expand(1, 3, 4, 32, 32).contiguous()
    before = model(still)
    with torch.no_grad():
        model.patch_embed.weight[:, 3:].normal_()          # the difference channels' weights
    torch.testing.assert_close(model(still), before)


def test_max_pool_reads_the_channelwise_max_of_the_video_tokens():
    torch.manual_seed(0)
    model = create_model("videomamba", size="tiny", pool="max", **KW).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    tokens = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens.amax(dim=1))
    torch.testing.assert_close(model(x), model.head(tokens.amax(dim=1)))


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_fvcore_counts_the_options_as_the_analytic_count(stem):
    model = create_model("msf_mamba", size="tiny", device="meta", stem=stem, stem_input="rgb_diff", pool="max", **KW)
    report = flops.count_model(model, device="meta")
    assert report.unsupported == {}
    assert report.flops == report.analytic, report.by_operator


@pytest.mark.parametrize("field,value,match", [("stem_input", "flow", "stem_input must be"),
                                               ("pool", "median", "pool must be"),
                                               ("grouped_scan", "maybe", "grouped_scan must be true or false"),
                                               ("class_token", "yes", "class_token must be true or false"),
                                               ("fusion_backend", "igem", "fusion_backend must be one of"),
                                               ("scan_backend", "mamba", "scan_backend must be one of")])
def test_unknown_option_values_are_refused_in_one_line(field, value, match):
    with pytest.raises(ValueError, match=match):
        create_model("msf_mamba", size="tiny", device="meta", **{field: value})


def test_max_pool_leaves_a_class_token_out():
    torch.manual_seed(0)
    model = create_model("videomamba", size="tiny", pool="max", class_token=True, **KW).eval()
    tokens = model.forward_features(torch.randn(2, 3, 4, 32, 32))
    tokens[:, 0] = 1e6                                         # a class token that would win every max
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 1:].amax(dim=1))


def test_cnn3d_takes_the_same_difference_input():
    """The baseline can be given the SSM's input: its first conv sees [x, x_t - x_{t-1}], FLOPs count it, and a
    bad value is refused like the SSM's."""
    from test_cnn3d import _conv_macs   # tests/models is on sys.path (pytest's prepend import mode)

    torch.manual_seed(0)
    model = create_model("cnn3d", size="tiny", num_classes=4, num_frames=4, img_size=32, stem_input="rgb_diff").eval()
    seen = {}
    model.features[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.randn(2, 3, 4, 32, 32)
    assert model.flops_per_clip() == _conv_macs(model, x)
    torch.testing.assert_close(seen["x"][:, 3:, 1:], x[:, :, 1:] - x[:, :, :-1])
    assert torch.equal(seen["x"][:, 3:, 0], torch.zeros_like(x[:, :, 0]))
    with pytest.raises(ValueError, match="stem_input must be"):
        create_model("cnn3d", size="tiny", stem_input="flow")
