"""benchmarks/bench_model.py compares execution setups side by side on a lent GPU, where a setup that silently
did not reach the model (a misparsed option, a bool left as the string "false") would be a wrong ratio in the
issue's table. Its parsing and one CPU row are checked here; its timings are benchmarks, not tests."""
import pytest
from benchmark_scripts import load_benchmark

BM = load_benchmark("bench_model")


def test_setup_options_parse_to_typed_model_options():
    assert BM.parse_setup("eager:") == ("eager", {}, False)
    assert BM.parse_setup("g:grouped_scan=true,fusion_backend=triton,compile=true") == (
        "g", {"grouped_scan": True, "fusion_backend": "triton"}, True)
    assert BM.parse_setup("x:grouped_scan=false,depth=2,fusion_theta=0.5") == (
        "x", {"grouped_scan": False, "depth": 2, "fusion_theta": 0.5}, False)
    assert BM.parse_setup("r:compile=regional") == ("r", {}, "regional")
    with pytest.raises(SystemExit):
        BM.parse_setup("bad:grouped_scan")
    with pytest.raises(SystemExit):
        BM.parse_setup("bad:compile=everything")


def test_each_setup_reaches_the_model(monkeypatch):
    built = []
    real = BM.create_model
    monkeypatch.setattr(BM, "create_model", lambda *a, **k: built.append(k) or real(*a, **k))
    rows = BM.main(["--device", "cpu", "--sizes", "tiny", "--variants", "msf_mamba", "--frames", "2", "--img", "32",
                    "--batch", "1", "--precision", "fp32", "--steps", "1", "--warmup", "1", "--latency-reps", "1",
                    "--setup", "plain:", "--setup", "grouped:grouped_scan=true"])
    assert [r["setup"] for r in rows] == ["plain", "grouped"]
    assert built[0].get("grouped_scan") is None and built[1]["grouped_scan"] is True
    assert all(r["clips_per_s"] > 0 and r["latency_b1_ms"] > 0 and r["latency_mode"] == "eager" for r in rows)
    assert all(r["first_step_s"] > 0 for r in rows)
    no_latency = BM.main(["--device", "cpu", "--sizes", "tiny", "--variants", "videomamba", "--frames", "2", "--img",
                          "32", "--batch", "1", "--precision", "fp32", "--steps", "1", "--latency-reps", "0"])
    assert no_latency[0]["latency_b1_ms"] is None
