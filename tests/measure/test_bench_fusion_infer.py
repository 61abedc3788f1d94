"""benchmarks/bench_fusion_infer.py without a GPU: its sweep grid, and a one-line refusal (exit 2) on CPU."""
import pytest
import torch
from benchmark_scripts import load_benchmark


def test_sweep_points_cover_the_grid():
    bench = load_benchmark("bench_fusion_infer")
    points = bench.sweep_points([1, 4], [2, 8], [True])
    assert len(points) == 4 and {p["aswm_group"] for p in points} == {1, 4}
    assert all(set(p) == {"aswm_group", "fwd_frames", "fwd_shared"} for p in points)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path, capsys):
    bench = load_benchmark("bench_fusion_infer")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--out", str(tmp_path)])
    assert exc.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_points_parse_into_config_settings_and_short_labels():
    bench = load_benchmark("bench_fusion_infer")
    point = bench.parse_point("aswm_group=1, fwd_unroll=2,fwd_loop_stages=none,logit_partials=1,fwd=8/3")
    assert point == {"aswm_group": 1, "fwd_unroll": 2, "fwd_loop_stages": None, "logit_partials": 1, "fwd": (8, 3)}
    assert bench.point_label(point) == "triton[g=1,u=2,st=None,p=1,fwd=8/3]"
    assert bench.point_label({"fwd_shared": 0}, "triton+torch") == "triton+torch[s=0]"
    assert bench.parse_point("fwd_loop_stages=1,") == {"fwd_loop_stages": 1}          # a trailing comma
    assert bench.point_label({"aswm_group": 4, "fwd_frames": 2, "fwd_shared": True}) == "triton[g=4,f=2,s=1]"
