"""Helpers of the data tests: write small shard datasets whose content the tests know."""
from __future__ import annotations

import numpy as np

from msf_scale.data.schema import DatasetInfo, ShardSink, make_sample, npy_bytes, write_dataset_info


def make_dataset(root, splits: dict[str, int], shard_size: int, num_classes: int = 4, frames: int = 6,
                 size: int = 16, fmt: str = "npy", flip_ok: bool = True, seed: int = 0) -> dict[str, dict]:
    """Write random clips into shards; returns {split: {key: (label, video)}} for checking what comes back."""
    from msf_scale.data.video import encode_mp4

    rng = np.random.default_rng(seed)
    truth, infos = {}, {}
    for split, n in splits.items():
        sink = ShardSink(root, split, shard_size)
        truth[split] = {}
        for i in range(n):
            video = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
            label = int(rng.integers(num_classes))
            key = f"{split}_{i:05d}"
            data = npy_bytes(video) if fmt == "npy" else encode_mp4(video, fps=10)
            meta = {"label": label, "label_name": f"c{label}", "subject": f"s{i % 3}", "num_frames": frames,
                    "fps": 10, "height": size, "width": size, "source": "test"}
            sink.write(make_sample(key, label, data, fmt, meta))
            truth[split][key] = (label, video)
        infos[split] = sink.close()
    write_dataset_info(root, DatasetInfo(name="toy", num_classes=num_classes,
                                         class_names=[f"c{i}" for i in range(num_classes)], splits=infos,
                                         num_frames=frames, height=size, width=size, flip_ok=flip_ok, format=fmt))
    return truth
