"""`msf-scale report --tune DIR`: a search directory of msf-scale tune (fixture files shaped like its outputs) in the
report: its curves embedded, its trials table, links to its files; a directory that is no search is one line, exit 2."""
from __future__ import annotations

import base64
import json

import pytest

from msf_scale import cli

TRIALS_MD = """| trial | status | optim.lr | val top-1 (%) | best val top-1 (%) | epochs | starts | error |
|---|---|---|---:|---:|---:|---:|---|
| 792e3_00000 | stopped early | 0.03108 | 12.5 | 12.5 | 1 | 1 |  |
| 792e3_00003 | completed | 0.004035 | 14.6 | 16.7 | 4 | 1 | a \\| b |
"""


def write_search(root, name="tune_msf_mamba_tiny"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = root / name
    d.mkdir(parents=True)
    (d / "trials.md").write_text(TRIALS_MD)
    (d / "trials.csv").write_text("trial,status\n792e3_00000,stopped early\n")
    (d / "best_config.yaml").write_text("model: {size: tiny}\n")
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2], [10, 20])
    fig.savefig(d / "search_curves.png")
    plt.close(fig)
    (d / "search_summary.json").write_text(json.dumps({
        "experiment": str(d), "metric": "val_top1", "mode": "max", "trials": 2,
        "data": {"val": "the dataset's own val split"}, "by_status": {"completed": 1, "stopped early": 1},
        "best": {"trial": "792e3_00003", "val_top1": 0.1458, "epochs": 4}}))
    return d


def test_report_includes_a_searchs_curves_and_trials(tmp_path, run_root):
    search = write_search(tmp_path / "tune")
    out = tmp_path / "report"
    assert cli.main(["report", "--runs", str(run_root), "--tune", str(search), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Hyper-parameter search: tune_msf_mamba_tiny" in page
    assert base64.b64encode((search / "search_curves.png").read_bytes()).decode() in page     # embedded
    assert "<td>792e3_00003</td>" in page and "<td>a | b</td>" in page and "<th>val top-1 (%)</th>" in page
    assert "href='../tune/tune_msf_mamba_tiny/best_config.yaml'" in page
    assert "best trial 792e3_00003: val top-1 14.6% after 4 epochs" in page
    assert "Accuracy vs parameters" in page                                      # the runs' part is still there
    md = (out / "summary.md").read_text()
    assert "# Summary" in md and "## Hyper-parameter search: tune_msf_mamba_tiny" in md
    assert "![search curves](../tune/tune_msf_mamba_tiny/search_curves.png)" in md and TRIALS_MD.strip() in md


def test_report_of_searches_alone_from_their_storage_folder(tmp_path):
    write_search(tmp_path / "tune", "a")
    write_search(tmp_path / "tune", "b")
    assert cli.main(["report", "--tune", str(tmp_path / "tune"), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert "Hyper-parameter search: a" in page and "Hyper-parameter search: b" in page and "Summary" not in page


def test_an_unfinished_search_in_a_storage_folder_is_named_as_unfinished(tmp_path):
    write_search(tmp_path / "tune", "a")
    (tmp_path / "tune" / "b").mkdir()
    (tmp_path / "tune" / "b" / "search.json").write_text("{}")        # running, or interrupted: no summary yet
    assert cli.main(["report", "--tune", str(tmp_path / "tune"), "--out", str(tmp_path / "r")]) == 0
    page, md = (tmp_path / "r" / "report.html").read_text(), (tmp_path / "r" / "summary.md").read_text()
    assert "Hyper-parameter search: a</h2>" in page and "Hyper-parameter search: b (unfinished)</h2>" in page
    assert "unfinished: no search_summary.json yet" in page and "--resume finishes it" in page
    assert "## Hyper-parameter search: b (unfinished)" in md and "- unfinished: no search_summary.json yet" in md


@pytest.mark.parametrize("case", ["missing", "not_a_search", "unfinished", "bad_json", "nothing"])
def test_a_bad_search_directory_is_one_line_exit_2(case, tmp_path, capsys):
    d = tmp_path / "s"
    if case == "not_a_search":
        d.mkdir()
        (d / "notes.txt").write_text("x")
    elif case == "unfinished":
        d.mkdir()
        (d / "search.json").write_text("{}")          # a search that has not written its outputs yet
    elif case == "bad_json":
        write_search(tmp_path, "s")
        (d / "search_summary.json").write_text("{")
    argv = ["report", "--out", str(tmp_path / "o")] + ([] if case == "nothing" else ["--tune", str(d)])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msf-scale report: error:") and "\n" not in err and "Traceback" not in err
