"""Shared pieces of the tune tests: the tiny stand-in model (2 blocks x 32 wide, 4 frames of 32 px) of the training
tests, a tiny synthetic dataset with a val split (8 classes x 4 train clips, 2 val and 2 test subjects), and one
local Ray runtime for the in-process searches of a session."""
from __future__ import annotations

import pytest

TINY_SETS = ["model.arch.depth=2", "model.arch.embed_dim=32", "model.arch.patch_size=8", "model.img_size=32",
             "model.num_frames=4", "data.num_workers=0", "data.num_clips=1", "data.num_crops=1",
             "train.batch_size=8", "train.precision=fp32", "log.tensorboard=false", "log.log_every=1",
             "schedule.epochs=2", "schedule.warmup_epochs=0", "data.synth.train_per_class=4",
             "data.synth.test_per_class=2", "data.synth.shard_size=8"]
SPACE = """space:
  optim.lr: {loguniform: [1.0e-3, 3.0e-2]}
  optim.weight_decay: {uniform: [0.0, 0.1]}
asha: {grace_period: 1, reduction_factor: 2}
"""


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tune_synth")


@pytest.fixture
def tiny_sets(synth_cache):
    return [*TINY_SETS, f"data.synth.cache_dir={synth_cache}"]


@pytest.fixture
def space_file(tmp_path):
    def make(text: str = SPACE):
        p = tmp_path / "space.yaml"
        p.write_text(text)
        return str(p)
    return make


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime (2 CPUs) for the in-process searches; shut down at the end of the session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
