"""A wheel install resolves every preset as the checkout does (issue 16, defect 1): the presets are package data,
and a missing one is an error, not a silent fall-back to the dataclass defaults."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from msf_scale.config import load_config

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"base": ["--size", "base"], "cpu_demo": ["--config", "cpu_demo"]}
PROBE = """
import json, sys, msf_scale
from msf_scale.config import load_config
print(json.dumps({"file": msf_scale.__file__, **{k: load_config(v).to_dict() for k, v in json.loads(sys.argv[1]).items()}}))
"""


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_resolves_presets_like_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("msf_scale-*.whl"))
    venv = tmp_path / "venv"   # from the base interpreter: PyYAML from the system, nothing of the checkout
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--system-site-packages",
                    str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    probe = subprocess.run([py, "-c", PROBE, json.dumps(COMMANDS)], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-2000:]
    installed = json.loads(probe.stdout)
    assert installed.pop("file").startswith(str(venv)), "the probe imported the checkout, not the wheel"
    for name, argv in COMMANDS.items():
        assert installed[name] == json.loads(json.dumps(load_config(argv).to_dict())), name
    assert installed["base"]["dist"]["zero_stage"] == 2 and installed["base"]["data"]["num_clips"] == 2


def test_missing_preset_is_an_error(tmp_path, monkeypatch):
    import msf_scale.config as config

    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)   # an install without its presets
    with pytest.raises(config.UserError, match="default.yaml is missing"):
        load_config(["--size", "base"])
