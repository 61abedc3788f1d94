"""The `msf-scale` entry point: subcommands reach their tools with every flag intact."""
import pytest

from msf_scale import cli


def test_models_table_lists_every_variant_and_size(capsys):
    assert cli.main(["models", "--img-size", "32", "--num-frames", "4"]) == 0
    out = capsys.readouterr().out
    for variant in ("videomamba", "msf_mamba", "msf_mamba_plus"):
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
