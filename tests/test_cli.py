"""The `msf-scale` entry point: subcommands reach their tools with every flag intact."""
import pytest

from msf_scale import cli


def test_models_table_lists_every_variant_and_size(capsys):
    assert cli.main(["models", "--img-size", "32", "--num-frames", "4"]) == 0
    out = capsys.readouterr().out
    for variant in ("videomamba", "msf_mamba", "msf_mamba_plus", "cnn3d"):
        for size in ("tiny", "small", "base"):
            assert f"| {variant} | {size} |" in out


def test_passthrough_keeps_leading_flags(monkeypatch):
    seen = {}

    class Fake:
        @staticmethod
        def main(argv):
            seen["argv"] = argv
            return 0

    monkeypatch.setattr("importlib.import_module", lambda name: Fake)
    assert cli.main(["eval", "--ckpt", "runs/x", "--num-clips", "2"]) == 0
    assert seen["argv"] == ["--ckpt", "runs/x", "--num-clips", "2"]


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        cli.main(["nope"])


def test_flops_prints_convention_totals_and_per_module_table(capsys):
    assert cli.main(["flops", "--variant", "msf_mamba_plus", "--size", "tiny", "--frames", "4", "--img-size", "64",
                     "--views", "3"]) == 0
    out = capsys.readouterr().out
    from msf_scale.models import create_model
    analytic = create_model("msf_mamba_plus", size="tiny", num_frames=4, img_size=64, device="meta").flops_per_clip()
    assert "1 multiply-add = 1 FLOP" in out and "unsupported operators: none" in out
    assert f"GFLOPs per view: {analytic / 1e9:.3f}" in out and f"GFLOPs per video (3 views): {3 * analytic / 1e9:.3f}" in out
    for row in ("| patch_embed ", "| blocks.0.mixer.fwd |", "| blocks.0.fusion.aswm |", "| selective_scan |",
                "| state_fusion |"):
        assert row in out


@pytest.mark.parametrize("argv", [["flops", "--variant", "msf_mamba", "--size", "huge"],
                                  ["flops", "--variant", "mamba2", "--size", "tiny"]])
def test_flops_bad_model_is_one_line_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msf-scale flops: error:") and "\n" not in err


@pytest.mark.parametrize("command", ["flops", "latency", "curve", "report"])
def test_measurement_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and "usage: msf-scale " + command in capsys.readouterr().out


def test_a_bad_form_variable_is_one_line_exit_2():
    """An MSF_SCALE_* form variable with an unknown value (read when a command imports the models) ends the command
    in one line and exit 2, not a traceback. A fresh interpreter: the forms are read once, at import."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MSF_SCALE_MIXER_LAYOUT="rows")
    done = subprocess.run([sys.executable, "-m", "msf_scale.cli", "latency", "--models", "videomamba_tiny", "--device",
                           "cpu", "--out", "unused"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("msf-scale latency: error: MSF_SCALE_MIXER_LAYOUT must be tokens or channels, "
                                   "got 'rows'")


def test_console_script_ends_through_run_rank():
    """`msf-scale` (pyproject's console script) is `cli.entry`, which ends a rank of a launch through `run_rank`."""
    from importlib.metadata import entry_points
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "msf-scale"]
    assert script.load() is cli.entry
