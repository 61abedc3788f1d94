"""The curve and the report from fixture run directories: the data behind each plot, missing entries named,
bad input as one-line errors (exit 2)."""
import csv
import re

import pytest

from msf_scale import cli, curve, report
from tests.measure.conftest import CLIPS_S, LATENCY, MFU, RUNS, write_run


def _csv(path):
    return {r["run"]: r for r in csv.DictReader(open(path))}


def test_curve_csv_holds_each_run_in_one_latency_mode(run_root, latency_file, tmp_path):
    assert cli.main(["curve", "--runs", str(run_root), "--latency", str(latency_file), "--out", str(tmp_path / "c")]) == 0
    rows = _csv(tmp_path / "c" / "curve.csv")
    assert set(rows) == {f"{v}_{s}" for v, s in RUNS}                         # nothing dropped
    for (v, s), top1 in RUNS.items():
        r = rows[f"{v}_{s}"]
        graph = LATENCY.get((v, s), {}).get("graph")
        assert r["latency_mode"] == ("graph" if graph else "")                 # never an eager point among graph ones
        assert (float(r["latency_ms"]) if r["latency_ms"] else None) == graph
        assert (float(r["test_top1_pct"]) if r["test_top1_pct"] else None) == (None if top1 is None else pytest.approx(100 * top1))
        expected = [m for m, bad in (("no test evaluation", top1 is None), ("not timed (graph)", graph is None)) if bad]
        assert r["status"] == ("; ".join(expected) or "ok")
    for ext in ("png", "svg"):
        assert (tmp_path / "c" / f"curve.{ext}").stat().st_size > 1000
    assert (tmp_path / "c" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_lines_go_through_each_variants_sizes(run_root, latency_file):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = curve.find_runs([run_root])
    rows = curve.curve_rows(runs, curve.latency_index(curve.read_latency(latency_file)[0]))
    fig, ax = plt.subplots()
    missing = curve.plot_lines(ax, rows, "latency_ms")
    lines = {ln.get_label(): ln.get_xydata().tolist() for ln in ax.lines}
    expected = {}
    for (v, s), top1 in sorted(RUNS.items(), key=lambda kv: curve.SIZE_ORDER[kv[0][1]]):
        graph = LATENCY.get((v, s), {}).get("graph")
        if top1 is not None and graph is not None:
            expected.setdefault(v, []).append([graph, pytest.approx(100 * top1)])
    assert lines == expected
    assert sorted(m.split(" ")[0] for m in missing) == ["msf_mamba_plus_small", "msf_mamba_plus_tiny", "msf_mamba_small"]
    plt.close(fig)


def test_a_variant_that_is_not_ssm_gets_its_own_line(tmp_path, latency_file):
    write_run(tmp_path / "r", "cnn3d", "tiny", 0.4)
    write_run(tmp_path / "r", "cnn3d", "small", 0.5)
    rows = curve.curve_rows(curve.find_runs([tmp_path / "r"]), {("cnn3d", "tiny"): {"median_ms": 1.0, "mode": "graph"},
                                                                 ("cnn3d", "small"): {"median_ms": 2.0, "mode": "graph"}})
    assert [(r["size"], r["latency_ms"], r["status"]) for r in rows] == [("tiny", 1.0, "ok"), ("small", 2.0, "ok")]


def test_report_table_marks_missing_and_embeds_every_plot(run_root, latency_file, tmp_path):
    out = tmp_path / "rep"
    assert cli.main(["report", "--runs", str(run_root), "--latency", str(latency_file), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert len(re.findall(r"src='data:image/png;base64,", page)) == 5
    for title in ("Accuracy vs parameters", "Accuracy vs GFLOPs", "Accuracy vs latency",
                  "Training throughput and MFU vs size", "Loss and test accuracy per run"):
        assert f"<h2>{title}</h2>" in page
    md = (out / "summary.md").read_text().splitlines()
    table = {line.split(" | ")[0].strip("| "): line for line in md if line.startswith("| ") and "---" not in line}
    assert set(table) - {"run"} == {f"{v}_{s}" for v, s in RUNS}
    assert "missing (no evaluation)" in table["msf_mamba_plus_small"]
    assert "not timed" in table["msf_mamba_plus_tiny"] and "not timed" in table["msf_mamba_small"]
    assert "5.00 (graph)" in table["msf_mamba_tiny"]


def test_report_data_behind_throughput_and_mfu(run_root):
    rows = report.summary_rows(curve.find_runs([run_root]), {})
    for r in rows:
        if RUNS[(r["variant"], r["size"])] is not None:   # finished runs: final_metrics.json
            assert float(r["train clips/s"]) == CLIPS_S[r["size"]]
            assert float(r["MFU (%)"]) == pytest.approx(100 * MFU[r["size"]])
        assert r["latency (ms)"] == "not timed"


def test_report_without_latency_file_says_not_timed(run_root, tmp_path):
    assert cli.main(["report", "--runs", str(run_root), "--out", str(tmp_path / "o")]) == 0
    assert "not timed" in (tmp_path / "o" / "summary.md").read_text()


@pytest.mark.parametrize("case", ["empty", "unknown", "no_metrics", "bad_latency"])
@pytest.mark.parametrize("command", ["report", "curve"])
def test_bad_input_is_one_line_exit_2(case, command, tmp_path, capsys, run_root, latency_file):
    runs, lat = run_root, latency_file
    if case == "empty":
        runs = tmp_path / "empty"
        runs.mkdir()
    elif case == "unknown":
        runs = tmp_path / "nope"
    elif case == "no_metrics":
        (run_root / "msf_mamba_tiny" / "metrics.jsonl").unlink()
    else:
        lat = tmp_path / "lat.json"
        lat.write_text("[]")
    argv = [command, "--runs", str(runs), "--out", str(tmp_path / "o"), "--latency", str(lat)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"msf-scale {command}: error:") and "\n" not in err and "Traceback" not in err


def test_a_real_tiny_run_goes_through_latency_curve_and_report(tmp_path, capsys):
    """train.py's own run directory (a 2-block model, 2 steps, one evaluation), not a fixture's imitation."""
    from msf_scale import train
    from tests.train.conftest import TINY_MODEL, TINY_RUN, TINY_SYNTH

    run = tmp_path / "runs" / "msf_mamba_tiny"
    train.main([*TINY_MODEL, *TINY_RUN, *TINY_SYNTH, "--data.synth.cache_dir", str(tmp_path / "cache"),
                "--output-dir", str(run), "--max-steps", "2"])
    lat = tmp_path / "lat"
    assert cli.main(["latency", "--runs", str(tmp_path / "runs"), "--device", "cpu", "--measures", "clip",
                     "--runs-per", "2", "--warmup", "0", "--out", str(lat)]) == 0
    assert cli.main(["curve", "--runs", str(tmp_path / "runs"), "--latency", str(lat), "--out", str(tmp_path / "c")]) == 0
    (row,) = _csv(tmp_path / "c" / "curve.csv").values()
    final = __import__("json").loads((run / "final_metrics.json").read_text())
    assert row["status"] == "ok" and float(row["test_top1_pct"]) == pytest.approx(100 * final["test_top1"])
    assert row["latency_mode"] == "eager" and row["run_input"] == row["latency_input"] == "3 x 4 x 32 x 32"
    assert cli.main(["report", "--runs", str(tmp_path / "runs"), "--latency", str(lat), "--out", str(tmp_path / "r")]) == 0
    assert "| msf_mamba_tiny | msf_mamba | tiny |" in (tmp_path / "r" / "summary.md").read_text()
