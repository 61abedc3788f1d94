"""benchmarks/bench_conv1d_tokens.py on CPU: its settings parse into the kernel's CONFIG names (timing needs a GPU)."""
import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("triton")
bench = load_benchmark("bench_conv1d_tokens")


def test_points_parse_into_config_names_and_refuse_others():
    assert bench.parse_point("BL=64,BE=128,warps=2") == {"BL": 64, "BE": 128, "warps": 2}
    assert bench.parse_point("") == {}
    with pytest.raises(SystemExit, match="unknown setting 'BX'"):
        bench.parse_point("BX=3")
    with pytest.raises(SystemExit, match="positive integer"):
        bench.parse_point("BL=big")


def test_refuses_without_a_gpu(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--out", "unused"])
