"""benchmarks/profile_fusion.py's kernel kinds: each kernel name lands in the kind it does, and the kind table sums
the full kernel table (not its top rows)."""
import pytest

from benchmark_scripts import load_benchmark

prof = load_benchmark("profile_fusion")


@pytest.mark.parametrize("name, kind", [
    ("void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<128, 16, 1, true>>(SSMParamsBase)", "scan"),
    ("_scan_fwd_kernel", "scan"),
    ("_chunk_ends", "scan"),
    ("_chunk_outputs", "scan"),
    ("_chunk_prefix", "scan"),
    ("_fwd", "fusion"),
    ("_bwd", "fusion"),
    # Inductor's kernels name every aten op they fused: their prefix says what kind of kernel they are
    ("triton_poi_fused_cat_exp_neg_selective_scan_fwd_split_with_sizes_view_9", "elementwise"),
    ("triton_poi_fused__unsafe_view_cat_convolution_flip_silu_slice_split_transpose_16", "elementwise"),
    ("triton_red_fused__fused_rms_norm__to_copy_add_bmm_transpose_view_17", "reduce"),
    ("triton_per_fused__to_copy_fill_lift_fresh_mul_select_sub_sum_unsqueeze_zeros_like_13", "reduce"),
    ("triton_tem_fused_mm_0", "gemm"),
    ("_row_conv", "fusion"),
    ("void causal_conv1d_fwd_kernel<...>", "conv"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_64x8_64x16_2x1_v_bz_TNT", "gemm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "norm"),
    ("void at::native::elementwise_kernel<128, 2, ...>", "elementwise"),
    ("triton_poi_fused_add_mul_0", "elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy"),
    ("Memset (Device)", "copy"),
    ("something_new", "other"),
])
def test_kernel_names_land_in_their_kind(name, kind):
    assert prof.kind_of(name) == kind


def test_kind_table_sums_every_kernel_once():
    rows = [{"kernel": "_row_conv", "calls_per_step": 2, "ms_per_step": 1.0},
            {"kernel": "triton_poi_fused_0", "calls_per_step": 3, "ms_per_step": 0.25},
            {"kernel": "triton_poi_fused_1", "calls_per_step": 1, "ms_per_step": 0.5},
            {"kernel": "(total of 3 kernels)", "calls_per_step": 6, "ms_per_step": 1.75}]
    assert prof.kind_table(rows) == [{"kind": "fusion", "calls_per_step": 2, "ms_per_step": 1.0},
                                     {"kind": "elementwise", "calls_per_step": 4, "ms_per_step": 0.75}]



@pytest.mark.parametrize("argv, says", [
    (["--inference", "graph"], "give --model"),
    (["--model", "msf_mamba", "--inference", "graph", "--freeze"], "are for --inference compile"),
    (["--model", "msf_mamba", "--no-freeze"], "are for --inference compile"),
])
def test_misuse_is_one_line_exit_2(argv, says, tmp_path, capsys):
    """Checked before the GPU is looked for, so the same on CPU: argparse's error line, exit 2."""
    with pytest.raises(SystemExit) as exc:
        prof.main(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last and says in last, last
