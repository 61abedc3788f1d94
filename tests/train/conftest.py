"""Shared pieces of the training tests: a tiny stand-in model (2 blocks x 32 wide, 4 frames of 32 px) on a
small synthetic dataset, cached once per session, so every run takes seconds on 2 CPU cores."""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_MODEL = ["--size", "tiny", "--model.arch.depth", "2", "--model.arch.embed_dim", "32",
              "--model.arch.patch_size", "8", "--model.img_size", "32", "--model.num_frames", "4"]
TINY_RUN = ["--data.num_workers", "0", "--data.num_clips", "1", "--data.num_crops", "1",
            "--train.batch_size", "8", "--train.precision", "fp32", "--log.log_every", "1",
            "--log.tensorboard", "false", "--log.progress", "false", "--train.eval_every", "0"]
# 8 classes x 4 clips = 32 training clips: 4 steps per epoch at batch 8 (2 per rank with 2 ranks)
TINY_SYNTH = ["--data.synth.train_per_class", "4", "--data.synth.test_per_class", "2",
              "--data.synth.shard_size", "8"]


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth_cache")


@pytest.fixture
def tiny_argv(synth_cache, tmp_path):
    """argv for a tiny run writing into tmp_path/run; extra args are appended (later flags win)."""
    def make(*extra: str, run: str = "run") -> list[str]:
        return [*TINY_MODEL, *TINY_RUN, *TINY_SYNTH, "--data.synth.cache_dir", str(synth_cache),
                "--output-dir", str(tmp_path / run), *extra]
    return make


@pytest.fixture
def tiny_common(synth_cache) -> list[str]:
    """Model + dataset flags of the tiny stand-in (no run settings)."""
    return [*TINY_MODEL, *TINY_SYNTH, "--data.synth.cache_dir", str(synth_cache)]
