"""The micro preset (the fine-motion benchmark): its geometry, time-reversal pairs, determinism, and one frame at chance."""
import numpy as np
import pytest
import torch

from msf_scale.data import synthesize, read_dataset_info
from msf_scale.data.synthetic import MOTIONS, PRESETS, _gesture, generate_split, synth_config
from test_data_synthetic import _frame_cnn_accuracy   # tests/data is on sys.path (pytest rootdir import mode)

# The micro scene at half size (every length halved), so that one-frame checks stay fast on CPU.
HALF = dict(size=56, num_frames=16, gesture_px=6.0, object_px=5.0, body_px=24.0, sway_px=0.5,
            train_per_class=40, test_per_class=20)


def test_micro_preset_is_the_documented_benchmark():
    cfg = synth_config("micro")
    assert (cfg.scene, cfg.size, cfg.num_frames, cfg.num_classes) == ("body", 112, 32, 8)
    assert cfg.train_per_class * cfg.num_classes == 576 and cfg.test_per_class * cfg.num_classes == 192
    assert (cfg.subjects - cfg.test_subjects, cfg.test_subjects) == (12, 4)
    assert 9.5 <= 0.8 * cfg.gesture_px and 1.2 * cfg.gesture_px <= 15   # a gesture of about 10-14 px
    assert synth_config("micro", size=64).size == 64                   # flags override a preset
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        synth_config("nano")
    assert PRESETS["demo"] == {} and synth_config("demo") == synth_config()


@pytest.mark.parametrize("fwd, rev", [("move_right", "move_left"), ("move_up", "move_down"),
                                      ("circle_cw", "circle_ccw")])
def test_pairs_differ_only_in_time_order(fwd, rev):
    """Played backwards (the gesture window mirrored), one class of a pair is exactly the other."""
    t = np.arange(32, dtype=np.float64)
    kinds = {m[0]: m[1:] for m in MOTIONS}
    start, stop, phase, amp = 0.15, 0.85, 1.1, 12.0
    a = _gesture(*kinds[fwd], t, amp, phase, start, stop)[::-1]
    b = _gesture(*kinds[rev], t, amp, phase, 1 - stop, 1 - start)
    np.testing.assert_allclose(a, b, atol=1e-9)          # absolute offsets: a line is centred on its window
    assert np.abs(a - a[0]).max() > 5     # and the two are different motions, not standing still


def test_gesture_amplitude_and_window():
    t = np.arange(32, dtype=np.float64)
    g = _gesture("line", (1.0, 0.0), t, 12.0, 0.0, 0.25, 0.75)
    assert g[:, 0].max() - g[:, 0].min() == pytest.approx(12.0)
    frac = t / 31
    still = (frac <= 0.25) | (frac >= 0.75)
    assert np.all(np.diff(g[:, 0])[still[1:] & still[:-1]] == 0)          # no motion outside the window
    osc = _gesture("osc", (0.0, 1.0), t, 12.0, 0.0, 0.0, 1.0)
    assert osc[:, 0].max() == 0 and osc[:, 1].max() - osc[:, 1].min() == pytest.approx(12.0, abs=0.5)


def test_parallel_rendering_gives_the_same_bytes(tmp_path):
    small = dict(preset="micro", size=24, num_frames=6, train_per_class=2, test_per_class=1, gesture_px=3.0,
                 object_px=3.0, body_px=10.0, sway_px=1.0)
    a = synthesize(tmp_path / "a", workers=1, **small)
    b = synthesize(tmp_path / "b", workers=2, **small)
    for split in ("train", "test"):
        for name in read_dataset_info(a).splits[split].shards:
            assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.fixture(scope="module")
def half_micro():
    cfg = synth_config("micro", **HALF)
    return generate_split(cfg, "train", workers=2), generate_split(cfg, "test", workers=2), 1.0 / cfg.num_classes


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_micro_one_frame_is_at_chance(half_micro, where):
    """Any one frame, including the first and last (where a gesture's displacement from its rest is largest)."""
    (vtr, ytr, _), (vte, yte, _), chance = half_micro
    frame = {"first": 0, "middle": vtr.shape[1] // 2, "last": vtr.shape[1] - 1}[where]
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices; restored, or every later test in this process runs on one thread
    try:
        acc = _frame_cnn_accuracy(vtr, ytr, vte, yte, frame=frame)
    finally:
        torch.set_num_threads(n)
    # 160 test clips: chance +- 2.6 points (one std); 9 points is well outside noise
    assert acc < chance + 0.09, f"frame {frame} predicts the class: {acc:.3f} on held-out subjects vs chance {chance:.3f}"
