"""Every registered variant x size: builds, runs forward + backward, reaches every parameter; API and errors."""
import copy
import pytest
import torch

from msf_scale.models import MODEL_SIZES, create_model, list_models
from msf_scale.models.blocks import StateFusion

SMALL_CLIP = dict(num_classes=5, num_frames=4, img_size=32, patch_size=16)
MAMBA_MODELS = list_models("*mamba*")    # the 3-D CNN baseline has its own tests (test_cnn3d.py)


@pytest.mark.parametrize("name", MAMBA_MODELS)
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    # drop path could skip a whole block (off here); mean pooling (the default) lets every block reach the logits;
    # zero-initialised fusion kernels would leave ASWM without a gradient until the first step (tests/ops)
    model = create_model(name, drop_path_rate=0.0, fusion_init="uniform", **SMALL_CLIP)
    x = torch.randn(2, 3, 4, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().max() == 0]
    assert not zero, f"parameters whose gradient is exactly zero: {zero[:5]}"


def test_registry_covers_every_variant_and_size():
    assert MAMBA_MODELS == sorted(f"{v}_{s}" for v in ("videomamba", "msf_mamba", "msf_mamba_plus")
                                  for s in MODEL_SIZES)
    assert list_models() == sorted(MAMBA_MODELS + [f"cnn3d_{s}" for s in ("tiny", "small", "base")])


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba", "msf_mamba_plus"])
def test_sizes_grow(variant):
    n = [create_model(variant, size=s, num_classes=32).num_params() for s in ("tiny", "small", "base")]
    assert n[0] < n[1] < n[2]


def test_param_counts_near_videomamba_counterparts():
    """SPEC.md: tiny ~7M, small ~26M, base ~74M for the plain backbone (VideoMamba Ti/S/M)."""
    for size, want in (("tiny", 7e6), ("small", 26e6), ("base", 74e6)):
        got = create_model("videomamba", size=size, num_classes=400).num_params()
        assert abs(got - want) / want < 0.06, f"{size}: {got / 1e6:.1f}M vs ~{want / 1e6:.0f}M"


def test_variants_differ_in_fusion():
    vm = create_model("videomamba", size="tiny", **SMALL_CLIP)
    assert not any(isinstance(m, StateFusion) for m in vm.modules())
    msf = create_model("msf_mamba", size="tiny", **SMALL_CLIP)
    fusions = [m for m in msf.modules() if isinstance(m, StateFusion)]
    assert len(fusions) == 24 and all(f.scales == (3,) and f.aswm is None for f in fusions)
    plus = create_model("msf_mamba_plus", size="tiny", **SMALL_CLIP)
    fusions = [m for m in plus.modules() if isinstance(m, StateFusion)]
    assert all(f.scales == (3, 5, 7) and f.aswm is not None for f in fusions)
    assert vm.flops_per_clip() < msf.flops_per_clip() < plus.flops_per_clip()
    last4 = create_model("msf_mamba", size="tiny", fusion_blocks="last_4", **SMALL_CLIP)
    assert [i for i, b in enumerate(last4.blocks) if b.fusion is not None] == [20, 21, 22, 23]


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba", "msf_mamba_plus"])
def test_output_depends_on_frame_order(variant):
    torch.manual_seed(0)
    model = create_model(variant, size="tiny", depth=4, **SMALL_CLIP).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x[:, :, [2, 0, 3, 1]])
    assert (a - b).abs().max() > 1e-4 * a.abs().max()


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = create_model("msf_mamba_plus", size="tiny", depth=3, drop_path_rate=0.0, **SMALL_CLIP)
    x = torch.randn(2, 3, 4, 32, 32)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6, rtol=1e-5), n


def test_deepest_model_has_sane_gradients_at_init():
    """SPEC.md: a badly initialised deep VideoMamba grows gradients ~100x per block. Base (32 blocks) must not."""
    torch.manual_seed(0)
    model = create_model("msf_mamba_plus", size="base", num_classes=32, num_frames=4, img_size=64)
    x = torch.randn(2, 3, 4, 64, 64)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    norms = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    assert all(torch.isfinite(torch.tensor(v)) for v in norms.values())
    assert max(norms.values()) < 100.0, f"largest grad norm {max(norms.values()):.3g}"
    for name in ("mixer.in_proj.weight", "mixer.out_proj.weight"):   # no growth on the way down
        first, last = norms[f"blocks.0.{name}"], norms[f"blocks.31.{name}"]
        assert 0.1 < first / last < 10, f"{name} grad norm block 0 / block 31 = {first / last:.3g}"


def test_no_weight_decay_names_exist():
    model = create_model("msf_mamba", size="tiny", fusion_theta_learnable=True, class_token=True, pool="cls",
                         **SMALL_CLIP)
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"pos_embed", "cls_token", "temporal_pos_embedding"} <= names <= set(params)
    assert any(n.endswith("A_log") for n in names) and any(n.endswith(".theta") for n in names)
    assert copy.deepcopy(model).no_weight_decay() == names   # an EMA copy or a replica decays the same params
    assert not any(n.endswith(".theta") for n in create_model("msf_mamba", size="tiny", **SMALL_CLIP).no_weight_decay())


def test_dt_init_matches_mamba_and_flag_restores_videomamba():
    model = create_model("videomamba", size="tiny", **SMALL_CLIP)
    dt = torch.nn.functional.softplus(model.blocks[0].mixer.fwd.dt_proj.bias)
    assert 1e-3 * 0.99 <= dt.min() and dt.max() <= 0.1 * 1.01
    vm = create_model("videomamba", size="tiny", dt_init="videomamba", **SMALL_CLIP)
    assert torch.all(vm.blocks[0].mixer.fwd.dt_proj.bias == 0)


def test_errors_name_the_expected_value():
    with pytest.raises(ValueError, match="unknown model variant 'vit'"):
        create_model("vit", size="tiny")
    with pytest.raises(ValueError, match=r"unknown size 'huge'.*\['base', 'small', 'tiny'\]"):
        create_model("msf_mamba", size="huge")
    with pytest.raises(ValueError, match="divisible by patch_size 16"):
        create_model("msf_mamba", size="tiny", img_size=100)
    with pytest.raises(ValueError, match="divisible by tubelet_size 2"):
        create_model("msf_mamba", size="tiny", num_frames=7, tubelet_size=2)
    with pytest.raises(ValueError, match="did you mean fusion_theta"):
        create_model("msf_mamba", size="tiny", fusion_thetta=0.5)
    with pytest.raises(ValueError, match="fusion_init must be 'zero' or 'uniform'"):
        create_model("videomamba", size="tiny", fusion_init="ones")
    with pytest.raises(ValueError, match="fusion_blocks"):
        create_model("msf_mamba", size="tiny", fusion_blocks="some")
    model = create_model("msf_mamba", size="tiny", **SMALL_CLIP)
    with pytest.raises(ValueError, match=r"\(C, T, H, W\) = \(3, 4, 32, 32\)"):
        model(torch.randn(1, 3, 8, 32, 32))


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_cpu_scan_backends_give_the_reference_model(backend):
    """In a model the scan gets strided views (delta, B, C are transposes of time-major projections, the reverse
    direction is flipped) and its results flow on through the gate and out_proj: logits and every gradient must
    match the per-step loop (fp32: the model keeps its residual stream in fp32)."""
    torch.manual_seed(0)
    model = create_model("msf_mamba", size="tiny", depth=2, drop_path_rate=0.0, fusion_init="uniform",
                         **SMALL_CLIP)
    x = torch.randn(2, 3, 4, 32, 32)
    results = {}
    for name in ("ref", backend):
        model.set_backends(scan=name)
        model.zero_grad()
        logits = model(x)
        logits.logsumexp(-1).sum().backward()
        results[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lr, gr), (lb, gb) = results["ref"], results[backend]
    assert (lb - lr).abs().max() <= 1e-5 * lr.abs().max()
    worst = max(((gb[n] - gr[n]).norm() / gr[n].norm().clamp_min(1e-30)).item() for n in gr)
    assert worst < 1e-4, f"largest relative gradient difference {worst:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba_plus"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_scan_and_torch_scan_give_the_same_model(variant, precision, mamba_ssm_kernel):
    """Video-shaped (8 x 224 x 224, L = 1569): logits and gradients agree between mamba-ssm and the torch scan.
    In fp32 they must agree closely; bf16 autocast through 24 blocks differs by rounding alone (looser bound)."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = create_model(variant, size="tiny", num_classes=32, drop_path_rate=0.0).cuda()
    x = torch.randn(2, 3, 8, 224, 224, device="cuda")
    results = {}
    for backend in ("cuda", "torch"):
        model.set_backends(scan=backend)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        logits.float().logsumexp(-1).sum().backward()
        results[backend] = (logits.float(), {n: p.grad.float().clone() for n, p in model.named_parameters()})
    (la, ga), (lb, gb) = results["cuda"], results["torch"]
    if precision == "fp32":   # every parameter's gradient, tightly
        assert (la - lb).abs().max() < 1e-3 * lb.abs().max()
        worst = max(((ga[n] - gb[n]).norm() / gb[n].norm().clamp_min(1e-12)).item() for n in ga)
        assert worst < 1e-3, f"largest relative gradient difference {worst:.3g}"
    else:   # bf16 rounding through 24 blocks: single small gradients differ by ~15%, the whole gradient by little
        assert (la - lb).abs().max() < 5e-2 * lb.abs().max()
        flat_a, flat_b = torch.cat([g.flatten() for g in ga.values()]), torch.cat([g.flatten() for g in gb.values()])
        err = ((flat_a - flat_b).norm() / flat_b.norm()).item()
        assert err < 5e-2, f"relative difference of the whole gradient {err:.3g}"
