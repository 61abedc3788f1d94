"""How a launched rank's process ends (`distributed.exit_rank`): the atexit handlers run, the interpreter's
finalization does not, so that no process-group worker thread still holding a finished collective's tensors can
abort the rank after a complete run. Each check runs in a fresh interpreter (a few seconds: it imports torch)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A module-level object whose __del__ runs only if the interpreter finalizes, and an atexit handler.
_PROBE = """
import atexit, os, sys
atexit.register(os.write, 1, b"atexit ran\\n")
class Finalized:
    def __del__(self, write=os.write):
        write(1, b"finalized\\n")
keep = Finalized()
"""


def _python(code: str, world_size: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("world_size", [None, "1", "2"])
def test_exit_rank_skips_finalization_only_in_a_multi_process_launch(world_size):
    out = _python(_PROBE + "from msf_scale.distributed import exit_rank\nraise SystemExit(exit_rank(3))\n",
                  world_size)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "atexit ran" in out.stdout                          # logging's flush, compile-worker shutdown, ...
    launched = world_size == "2"
    assert ("finalized" in out.stdout) is not launched, out.stdout


@pytest.mark.parametrize("script, argv", [
    ("msf_scale/train.py", ["--no-such-flag", "1"]),
    ("msf_scale/evaluate.py", ["--ckpt", "/nonexistent/run"]),
    ("msf_scale/cli.py", ["train", "--no-such-flag", "1"]),
])
def test_launchable_scripts_end_through_exit_rank(script, argv):
    """What `accelerate launch <script>` runs: a user error (exit status 2, no process group needed) must leave a
    rank of a launch the same way as a finished run."""
    code = _PROBE + f"import runpy\nsys.argv = {[script, *argv]!r}\nrunpy.run_path({script!r}, run_name='__main__')\n"
    out = _python(code, "2")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "atexit ran" in out.stdout and "finalized" not in out.stdout, (out.stdout, out.stderr[-2000:])
