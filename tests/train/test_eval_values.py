"""evaluate_model on hand-made logits: softmax probabilities averaged over every view of a video, top-1 and
top-5 counted per video, across batches."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from msf_scale.evaluate import evaluate_model


class LogitsFromInput(torch.nn.Module):
    """A 'model' whose logits are written into its input: x [N, 3, 1, 1, C] -> x[:, 0, 0, 0]."""

    def forward(self, x):
        return x[:, 0, 0, 0]


def _video(views: list[list[float]]) -> torch.Tensor:
    """[V, 3, 1, 1, C] carrying one logit row per view."""
    t = torch.tensor(views)
    return t[:, None, None, None, :].expand(-1, 3, 1, 1, -1).clone()


# 6 classes, 3 views per video
VIDEOS = {
    # view 0 says class 0 with confidence, views 1 and 2 say class 1 (the label): the average says 1
    "a": (1, [[5, 0, 0, 0, 0, 0], [0, 3, 0, 0, 0, 0], [0, 3, 0, 0, 0, 0]]),
    # mean of logits would pick class 0 (10/3 > 8/3); mean of probabilities picks the label, 2
    "b": (2, [[10, 0, 0, 0, 0, 0], [0, 0, 4, 0, 0, 0], [0, 0, 4, 0, 0, 0]]),
    # the label (3) second everywhere: top-5 only
    "c": (3, [[2, 0, 0, 1, 0, -1]] * 3),
    # the label (5) last everywhere: neither
    "d": (5, [[5, 4, 3, 2, 1, 0]] * 3),
}


def test_multiview_average_and_topk_on_hand_made_logits():
    keys = list(VIDEOS)
    batches = [(torch.stack([_video(VIDEOS[k][1]) for k in ks]), torch.tensor([VIDEOS[k][0] for k in ks]), ks)
               for ks in (keys[:2], keys[2:])]
    acc = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    model = LogitsFromInput().train()
    res = evaluate_model(model, batches, acc, (3, 3, 1, 1, 6))
    assert res == {"top1": pytest.approx(2 / 4), "top5": pytest.approx(3 / 4), "num_samples": 4, "views": 3}
    assert model.training                                            # the caller's mode is given back
    single = evaluate_model(model, [(b[0][:, :1], b[1], b[2]) for b in batches], acc, (1, 3, 1, 1, 6))
    assert single["top1"] == pytest.approx(0.0) and single["views"] == 1   # the first views alone miss a and b
