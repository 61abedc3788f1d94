"""Small datasets shared by the data tests (built once per session, in a temporary directory)."""
from __future__ import annotations

import pytest
from data_helpers import make_dataset


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """npy dataset: 40 train clips in 5 shards, 23 test clips in 3 shards."""
    root = tmp_path_factory.mktemp("toy")
    return root, make_dataset(root, {"train": 40, "test": 23}, shard_size=8)
