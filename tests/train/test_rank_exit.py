"""How a run's distributed state and a launched rank's process end (`distributed.shutdown`, `exit_rank`,
`run_rank`): the run's objects are released; a rank's non-daemon threads and atexit handlers run, the interpreter's
finalization does not, so that no process-group worker thread still holding a finished collective's tensors can
abort the rank after a complete run. The exit checks run in a fresh interpreter (a few seconds: it imports torch)."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

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
def test_exit_rank_skips_finalization_only_in_a_launch(world_size):
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


def test_exit_rank_waits_for_non_daemon_threads():
    """The interpreter joins non-daemon threads before it exits; so must a rank that skips finalization."""
    code = _PROBE + ("import threading, time\nfrom msf_scale.distributed import exit_rank\n"
                     "threading.Thread(target=lambda: (time.sleep(0.5), os.write(1, b'thread done\\n'))).start()\n"
                     "raise SystemExit(exit_rank(0))\n")
    out = _python(code, "2")
    assert out.returncode == 0 and "thread done" in out.stdout, (out.stdout, out.stderr[-2000:])
    assert out.stdout.index("thread done") < out.stdout.index("atexit ran")   # the interpreter's order


@pytest.mark.parametrize("shut_down", [False, True])
def test_exit_rank_after_a_process_group_without_a_launcher(shut_down):
    """Single-process DeepSpeed creates a (1-rank) gloo group with WORLD_SIZE=1: it exits the same way, before and
    after `shutdown` has destroyed the group (ZeRO-3 keeps it alive past that)."""
    code = _PROBE + ("import socket, torch.distributed as dist\nfrom accelerate import Accelerator\n"
                     "from msf_scale.distributed import exit_rank, shutdown\n"
                     "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
                     "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)\n"
                     + ("shutdown(Accelerator(cpu=True))\nassert not dist.is_initialized()\n" if shut_down else "")
                     + "raise SystemExit(exit_rank(0))\n")
    out = _python(code, "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "atexit ran" in out.stdout and "finalized" not in out.stdout, out.stdout


@pytest.mark.parametrize("body, status, message", [
    ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ("raise SystemExit('bad flag')", 1, "bad flag"),
    ("raise SystemExit(None)", 0, ""),
    ("return 4", 4, ""),
    ("return 'oops'", 1, "oops"),              # SystemExit's reading of a status, as Python exits
    ("raise SystemExit(2.5)", 1, "2.5"),
    ("raise SystemExit(True)", 1, ""),
    ("raise SystemExit(2 ** 40)", 0, ""),        # the low byte, as the C exit() Python calls
    ("raise KeyboardInterrupt", 130, "KeyboardInterrupt"),
])
def test_run_rank_keeps_a_failing_ranks_status_and_error(body, status, message):
    code = _PROBE + f"from msf_scale.distributed import run_rank\ndef main():\n    {body}\nraise SystemExit(run_rank(main))\n"
    out = _python(code, "2")
    assert out.returncode == status and message in out.stderr, out.stderr[-2000:]
    assert "atexit ran" in out.stdout and "finalized" not in out.stdout, out.stdout


def test_shutdown_releases_the_prepared_model():
    """Accelerate keeps what `prepare` returned until `free_memory`: a caller of `train()` that goes on in the same
    process (Ray Tune, a notebook) would keep every run's model and optimizer."""
    from accelerate import Accelerator

    from msf_scale.distributed import reset_state, shutdown

    reset_state()
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 2)
    watch = weakref.ref(model)
    model, optimizer = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    del model, optimizer
    gc.collect()
    assert watch() is not None            # held by the accelerator, not by this test
    shutdown(acc)
    assert watch() is None
    reset_state()


def test_exit_rank_exits_when_an_atexit_handler_fails():
    code = _PROBE + ("from msf_scale.distributed import exit_rank\natexit.register(lambda: 1 / 0)\n"
                     "raise SystemExit(exit_rank(5))\n")
    out = _python(code, "2")
    assert out.returncode == 5 and "ZeroDivisionError" in out.stderr, out.stderr[-2000:]
    assert "atexit ran" in out.stdout and "finalized" not in out.stdout, out.stdout
