"""Synthetic micro-gestures: the class is carried only by how a small object moves, never by one frame.

Every clip is rendered on a torus (the canvas wraps around): a subject-specific smooth background (a sum of
integer-frequency sinusoids, so any shift is seamless), a small anti-aliased disk in the subject's colour,
a class-specific motion pattern of the disk from a uniformly random start, an optional global camera drift
that moves everything (class-independent distractor), optional distractor disks moving at random, and
Gaussian pixel noise. Because the start position is uniform on the torus and appearance depends only on the
subject, the distribution of any single frame is the same for every class: one frame carries no label
information, by construction (tests check it empirically). Train and test use disjoint subjects.

The difficulty knobs live in ``SynthConfig``; its defaults are the embedded demo dataset (8 frames of
32 x 32, 8 classes), chosen to be easy for a motion-aware model.

A second scene, ``scene="body"`` (the ``micro`` preset, ``PRESETS``), is the fine-motion benchmark built to the
paper's premise: a small "hand" makes a gesture of 10-15 px in all over a long clip (32 frames at 112 px, of which a
model samples 8), during a random part of the clip only, while riding on the sway of a large "body" over a textured,
drifting background, with a second small object moving at random as a distractor. Classes differ only in the
hand's small motion and its time order (move right/left, up/down and circle cw/ccw are time reverses of each other).
The hand's position is uniform on the torus in every frame, whatever the class, and the body is placed independently
of it (the hand rides the body's sway, not its position), so one frame carries no label information exactly. Version 1
of this scene put the body under the hand's rest position; a review found that the hand's offset from the body's
centre then gives the class away at a fixed frame (an ideal observer reaches 27.8% at the first frame), so version 2
places them independently.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .schema import DatasetInfo, ShardSink, make_sample, npy_bytes, write_dataset_info

GENERATOR_VERSION = 2  # bump when rendering changes, so cached datasets are regenerated
PERIOD = 8  # frames per revolution (circles) and per back-and-forth (oscillations)

# Motion patterns, in class-index order: (name, kind, direction). Image y points down.
MOTIONS = (
    ("move_right", "line", (1.0, 0.0)), ("move_left", "line", (-1.0, 0.0)),
    ("move_up", "line", (0.0, -1.0)), ("move_down", "line", (0.0, 1.0)),
    ("circle_cw", "circle", 1.0), ("circle_ccw", "circle", -1.0),
    ("oscillate_horizontal", "osc", (1.0, 0.0)), ("oscillate_vertical", "osc", (0.0, 1.0)),
    ("move_up_right", "line", (0.7071, -0.7071)), ("move_up_left", "line", (-0.7071, -0.7071)),
    ("move_down_right", "line", (0.7071, 0.7071)), ("move_down_left", "line", (-0.7071, 0.7071)),
)


@dataclass(frozen=True)
class SynthConfig:
    """Geometry, size and difficulty of the synthetic dataset. Defaults: the embedded CPU demo (easy)."""

    num_classes: int = 8  # the first N of MOTIONS (at most 12)
    train_per_class: int = 200  # train clips per class (1600 in all)
    test_per_class: int = 40  # test clips per class (320 in all), from subjects never seen in training
    num_frames: int = 8  # frames per clip
    size: int = 32  # square frames, px
    subjects: int = 16  # distinct appearances (background, object colour and size)...
    test_subjects: int = 4  # ...of which these many are held out for the test split
    val_subjects: int = 0  # ...and these many of the rest for a val split (0 = none: train and test only)
    val_per_class: int | None = None  # val clips per class (None = test_per_class); only with val_subjects > 0
    # None: scaled from the defaults at 32 px, 4 px motion of a 14 px disk (size / 8 and 7 size / 16)
    motion_px: float | None = None  # the class signal: object displacement per frame, px (per-clip jitter +-20%)
    object_px: float | None = None  # object diameter, px (per-subject jitter +-15%)
    drift_px: float = 0.5  # distractor: max global camera drift per frame, px (random direction per clip)
    distractors: int = 0  # distractor objects with random, class-independent straight motion at motion_px
    noise_std: float = 3.0  # Gaussian pixel noise, on the 0-255 scale
    texture: float = 50.0  # background texture contrast: max difference of the two background colours (0-255)
    # the "body" scene (the micro preset): a hand gesture over the whole clip, riding on a swaying body
    scene: str = "disk"  # "disk": the demo (motion_px per frame); "body": the fine-motion benchmark
    gesture_px: float = 12.0  # body scene: the hand's gesture amplitude over the clip, px (per-clip jitter +-20%)
    gesture_min_frac: float = 0.6  # body scene: the gesture fills a random [this, 1] fraction of the clip
    body_px: float = 48.0  # body scene: the body's height, px (an ellipse 0.6 as wide)
    sway_px: float = 6.0  # body scene: amplitude of the body's (and hand's) class-independent sway, px
    hand_contrast: float = 1.0  # body scene: 1 = full contrast of the hand against body and background, 0 = none
    seed: int = 0
    format: str = "npy"  # "npy" (exact, fast to decode) or "mp4" (H.264)
    shard_size: int = 256  # clips per tar shard
    fps: float = 8.0  # written to the metadata and the mp4 container

    def __post_init__(self) -> None:
        if self.motion_px is None:   # frozen: fill the size-relative defaults in place
            object.__setattr__(self, "motion_px", self.size / 8)
        if self.object_px is None:
            object.__setattr__(self, "object_px", self.size * 7 / 16)
        checks = [
            (1 <= self.num_classes <= len(MOTIONS), f"num_classes must be in 1..{len(MOTIONS)}"),
            (self.train_per_class >= 0 and self.test_per_class >= 0, "clips per class must be >= 0"),
            (self.num_frames >= 2, "num_frames must be >= 2 (motion needs two frames)"),
            (self.size >= 8 and self.size % 2 == 0, "size must be an even number >= 8"),
            (1 <= self.test_subjects < self.subjects, "need 1 <= test_subjects < subjects"),
            (0 <= self.val_subjects < self.subjects - self.test_subjects,
             "need 0 <= val_subjects < subjects - test_subjects (at least one training subject)"),
            (self.val_per_class is None or self.val_per_class >= 0, "val_per_class must be >= 0"),
            (min(self.motion_px, self.drift_px, self.noise_std, self.texture) >= 0,
             "motion_px, drift_px, noise_std and texture must be >= 0"),
            (0 < self.object_px <= self.size / 2, "object_px must be in (0, size/2]"),
            (self.distractors >= 0, "distractors must be >= 0"),
            (self.scene in ("disk", "body"), "scene must be 'disk' or 'body'"),
            (min(self.gesture_px, self.sway_px) >= 0 and self.body_px > 0 and 0 < self.gesture_min_frac <= 1
             and 0 <= self.hand_contrast <= 1, "gesture_px, sway_px >= 0; body_px > 0; gesture_min_frac in (0, 1]; "
             "hand_contrast in [0, 1]"),
            (self.format in ("npy", "mp4"), "format must be 'npy' or 'mp4'"),
            (self.shard_size >= 1 and self.fps > 0, "shard_size >= 1 and fps > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SynthConfig: {msg} ({self})")

    @property
    def class_names(self) -> list[str]:
        return [m[0] for m in MOTIONS[: self.num_classes]]

    def hashed_fields(self) -> dict[str, Any]:
        """The fields, without the val ones when there is no val split: a dataset made before val splits existed
        keeps its digest (its cache directory is reused, not regenerated)."""
        d = asdict(self)
        if not self.val_subjects:
            d.pop("val_subjects"), d.pop("val_per_class")
        return d

    def digest(self) -> str:
        """Short hash of everything that changes the generated bytes (names the cache directory)."""
        d = self.hashed_fields() | {"generator_version": GENERATOR_VERSION}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# Named datasets. "micro": the fine-motion benchmark (issue 14): 8 classes of a ~10-14 px hand gesture, 32 frames
# of 112 x 112, 576 train clips from 12 subjects, 192 test clips from 4 unseen subjects. Calibrated (scene version
# 2, lent H200): cnn3d tiny reaches 89.6% test top-1 after 150 epochs (83.3% after 40; docs/BENCHMARKS.md, "Fine
# motion"); gesture_px=20 gives 85.4 +- 4.5% over 3 seeds. Shorter schedules stop before the CNN's sudden transition.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "micro": dict(scene="body", num_classes=8, size=112, num_frames=32, subjects=16, test_subjects=4,
                  train_per_class=72, test_per_class=24, object_px=10.0, gesture_px=12.0, gesture_min_frac=1.0,
                  body_px=48.0, sway_px=1.0, distractors=1, drift_px=0.25, noise_std=4.0, texture=50.0,
                  hand_contrast=1.0, shard_size=64),
}


def synth_config(preset: str | None = None, **overrides: Any) -> SynthConfig:
    """SynthConfig of a named preset (``PRESETS``; None = the demo defaults) with keyword overrides; an unknown key
    or preset raises ValueError listing the valid ones."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    valid = {f.name for f in fields(SynthConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"unknown synthetic-data options {sorted(unknown)}; valid: {sorted(valid)}")
    base = dict(PRESETS[preset]) if preset is not None else {}
    return SynthConfig(**(base | {k: v for k, v in overrides.items() if v is not None}))


# ----------------------------------------------------------------------------------------------- rendering
def _subject(cfg: SynthConfig, s: int) -> dict[str, Any]:
    """Appearance of subject ``s``: background sinusoids, two background colours, object colour and size."""
    rng = np.random.default_rng([cfg.seed, 7919, s])
    freqs = rng.integers(-2, 3, size=(4, 2))
    freqs[np.all(freqs == 0, axis=1)] = (1, 0)
    amps, phases = rng.uniform(0.5, 1.0, 4), rng.uniform(0, 2 * np.pi, 4)
    c1 = rng.uniform(50, 205, size=3)
    c2 = np.clip(c1 + rng.uniform(-1, 1, size=3) * cfg.texture, 30, 225)
    # the object is dark on a bright background and bright on a dark one: contrast in luminance, not only hue
    bright = (c1 + c2).mean() / 2 < 127.5
    obj = rng.uniform(215, 255, 3) if bright else rng.uniform(0, 40, 3)
    # The background is sum_k amp_k cos(theta_k(x) - psi_k(t)), psi_k = 2 pi freq_k . camera_t / size: store
    # amp_k cos(theta_k) and amp_k sin(theta_k) so that a shifted frame is one small matrix product.
    yy, xx = np.mgrid[0:cfg.size, 0:cfg.size].astype(np.float64) + 0.5
    theta = 2 * np.pi * (xx[None] * freqs[:, 0, None, None] + yy[None] * freqs[:, 1, None, None]) / cfg.size
    theta = (theta + phases[:, None, None]).reshape(4, -1)
    basis = np.concatenate([amps[:, None] * np.cos(theta), amps[:, None] * np.sin(theta)])  # 8 x HW
    radius = cfg.object_px / 2 * rng.uniform(0.85, 1.15)
    # body scene only (a separate stream, so the demo's bytes do not depend on it): a shirt colour, and a hand whose
    # colour moves from the shirt's toward the demo's high-contrast object colour by ``hand_contrast``
    body_rng = np.random.default_rng([cfg.seed, 6007, s])
    body = body_rng.uniform(40, 215, 3)
    hand = body + cfg.hand_contrast * (obj - body)
    return {"freqs": freqs, "basis": basis, "c1": c1, "c2": c2, "obj": obj, "radius": radius,
            "body": body, "hand": hand, "distractor": 255 - hand}


def _displacement(kind: str, arg: Any, t: np.ndarray, speed: float, phase: float) -> np.ndarray:
    """Object offset (T x 2, px, x then y) for one motion pattern, ``speed`` px per frame."""
    if kind == "line":
        return np.outer(t, arg) * speed
    if kind == "circle":  # chord of ``speed`` px per frame, one revolution per PERIOD frames
        r = speed / (2 * np.sin(np.pi / PERIOD))
        a = phase + arg * 2 * np.pi * t / PERIOD
        return r * np.stack([np.cos(a) - np.cos(phase), np.sin(a) - np.sin(phase)], axis=1)
    # oscillation: triangle wave, slope ``speed`` px per frame, PERIOD frames per back-and-forth
    u = (t + phase / (2 * np.pi) * PERIOD) % PERIOD
    tri = np.where(u < PERIOD / 2, u, PERIOD - u) * speed
    return np.outer(tri - tri[0], arg)


def _disk_alpha(xx: np.ndarray, yy: np.ndarray, pos: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Anti-aliased disk coverage (T x H x W) at positions ``pos`` (T x 2) on the torus."""
    dx = (xx[None] - pos[:, 0, None, None] + size / 2) % size - size / 2
    dy = (yy[None] - pos[:, 1, None, None] + size / 2) % size - size / 2
    return np.clip(radius + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)


def render_clip(cfg: SynthConfig, label: int, subject: int, rng: np.random.Generator,
                subj: dict[str, Any] | None = None) -> np.ndarray:
    """One uint8 clip (T x S x S x 3) of class ``label`` performed by ``subject``."""
    subj = subj or _subject(cfg, subject)
    if cfg.scene == "body":
        return _render_body_clip(cfg, label, subj, rng)
    size, t = cfg.size, np.arange(cfg.num_frames, dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # camera: a random start offset (appearance-preserving) plus drift in a random direction
    ang = rng.uniform(0, 2 * np.pi)
    cam = rng.uniform(0, size, 2)[None] + np.outer(t, [np.cos(ang), np.sin(ang)]) * rng.uniform(0, cfg.drift_px)
    psi = 2 * np.pi * cam @ subj["freqs"].T / size  # T x 4
    field = (np.concatenate([np.cos(psi), np.sin(psi)], axis=1) @ subj["basis"]).reshape(-1, size, size)
    mix = 0.5 + 0.5 * np.tanh(field)
    frames = subj["c1"] + (subj["c2"] - subj["c1"]) * mix[..., None]
    # distractors first, so the gesturing object stays on top
    for _ in range(cfg.distractors):
        d_ang = rng.uniform(0, 2 * np.pi)
        pos = rng.uniform(0, size, 2)[None] + cam + np.outer(t, [np.cos(d_ang), np.sin(d_ang)]) * cfg.motion_px
        alpha = _disk_alpha(xx, yy, pos, subj["radius"], size)[..., None]
        frames = frames * (1 - alpha) + (255 - subj["obj"]) * alpha
    _, kind, arg = MOTIONS[label]
    speed = cfg.motion_px * rng.uniform(0.8, 1.2)
    pos = rng.uniform(0, size, 2)[None] + cam + _displacement(kind, arg, t, speed, rng.uniform(0, 2 * np.pi))
    alpha = _disk_alpha(xx, yy, pos, subj["radius"], size)[..., None]
    frames = frames * (1 - alpha) + subj["obj"] * alpha
    if cfg.noise_std > 0:
        frames = frames + rng.normal(0.0, cfg.noise_std, frames.shape)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _gesture(kind: str, arg: Any, t: np.ndarray, amp: float, phase: float, start: float, stop: float) -> np.ndarray:
    """Hand offset (T x 2, px) of a gesture of amplitude ``amp`` px that runs from clip fraction ``start`` to
    ``stop`` (still before and after). Lines are centred on the clip, so a line and its time reverse (right/left)
    cover the same positions; circles make one revolution, oscillations two back-and-forths."""
    u = np.clip((t / max(len(t) - 1, 1) - start) / max(stop - start, 1e-6), 0.0, 1.0)   # gesture progress 0..1
    if kind == "line":
        return np.outer(u - 0.5, arg) * amp
    if kind == "circle":
        a = phase + arg * 2 * np.pi * u
        return amp / 2 * np.stack([np.cos(a) - np.cos(phase), np.sin(a) - np.sin(phase)], axis=1)
    w = (2 * u + phase / (2 * np.pi)) % 1.0            # two triangle periods over the gesture
    tri = np.where(w < 0.5, w, 1.0 - w) * 2 * amp
    return np.outer(tri - tri[0], arg)


def _ellipse_alpha(xx: np.ndarray, yy: np.ndarray, pos: np.ndarray, ax: float, ay: float, size: int) -> np.ndarray:
    """Anti-aliased ellipse coverage (T x H x W) with semi-axes (ax, ay) at ``pos`` (T x 2) on the torus."""
    dx = (xx[None] - pos[:, 0, None, None] + size / 2) % size - size / 2
    dy = (yy[None] - pos[:, 1, None, None] + size / 2) % size - size / 2
    return np.clip((1.0 - np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)) * min(ax, ay) + 0.5, 0.0, 1.0)


def _render_body_clip(cfg: SynthConfig, label: int, subj: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """The micro preset's scene: background, a swaying body, a distractor, then the gesturing hand on top."""
    size, t = cfg.size, np.arange(cfg.num_frames, dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    frac = t / max(cfg.num_frames - 1, 1)
    ang = rng.uniform(0, 2 * np.pi)
    cam = rng.uniform(0, size, 2)[None] + np.outer(t, [np.cos(ang), np.sin(ang)]) * rng.uniform(0, cfg.drift_px)
    psi = 2 * np.pi * cam @ subj["freqs"].T / size
    field = (np.concatenate([np.cos(psi), np.sin(psi)], axis=1) @ subj["basis"]).reshape(-1, size, size)
    frames = subj["c1"] + (subj["c2"] - subj["c1"]) * (0.5 + 0.5 * np.tanh(field))[..., None]
    # sway: a slow class-independent oscillation of body and hand (0.5-1.5 cycles a clip, mostly sideways)
    # (independent x and y phases, so that a clip played backwards is as likely as forwards)
    cycles, ph = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi, 2)
    sway = cfg.sway_px * rng.uniform(0.5, 1.0) * np.stack(
        [np.sin(2 * np.pi * cycles * frac + ph[0]), 0.3 * np.sin(4 * np.pi * cycles * frac + ph[1])], axis=1)
    base = rng.uniform(0, size, 2)[None] + cam + sway          # where the hand rests: uniform on the torus
    ay = cfg.body_px / 2 * subj["radius"] / (cfg.object_px / 2)   # the subject's size jitter scales the body too
    ax = 0.6 * ay
    body_pos = rng.uniform(0, size, 2)[None] + cam + sway      # independent of the hand: one frame stays uninformative
    alpha = _ellipse_alpha(xx, yy, body_pos, ax, ay, size)[..., None]
    frames = frames * (1 - alpha) + subj["body"] * alpha
    for _ in range(cfg.distractors):   # another small object drifting straight, class-independent
        d_ang = rng.uniform(0, 2 * np.pi)
        pos = (rng.uniform(0, size, 2)[None] + cam
               + np.outer(frac - 0.5, [np.cos(d_ang), np.sin(d_ang)]) * cfg.gesture_px * rng.uniform(0.8, 1.2))
        alpha = _disk_alpha(xx, yy, pos, subj["radius"], size)[..., None]
        frames = frames * (1 - alpha) + subj["distractor"] * alpha
    _, kind, arg = MOTIONS[label]
    dur = rng.uniform(cfg.gesture_min_frac, 1.0)
    start = rng.uniform(0, 1.0 - dur)
    amp = cfg.gesture_px * rng.uniform(0.8, 1.2)
    pos = (base + _gesture(kind, arg, t, amp, rng.uniform(0, 2 * np.pi), start, start + dur))
    alpha = _disk_alpha(xx, yy, pos, subj["radius"], size)[..., None]
    frames = frames * (1 - alpha) + subj["hand"] * alpha
    if cfg.noise_std > 0:
        frames = frames + rng.normal(0.0, cfg.noise_std, frames.shape)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def split_plan(cfg: SynthConfig, split: str) -> list[tuple[int, int, int]]:
    """(clip index, label, subject) of every clip of ``split``, in the (seeded, shuffled) order written."""
    n_train = cfg.subjects - cfg.test_subjects   # val subjects are the last val_subjects of the non-test ones
    first_val = n_train - cfg.val_subjects
    subjects = {"train": list(range(first_val)), "val": list(range(first_val, n_train)),
                "test": list(range(n_train, cfg.subjects))}[split]
    per_class = {"train": cfg.train_per_class, "test": cfg.test_per_class,
                 "val": cfg.test_per_class if cfg.val_per_class is None else cfg.val_per_class}[split]
    if not subjects:   # no val split asked for
        return []
    plan = [(c, subjects[i % len(subjects)]) for c in range(cfg.num_classes) for i in range(per_class)]
    stream = {"train": 1, "test": 0, "val": 2}[split]
    order = np.random.default_rng([cfg.seed, 104729, stream]).permutation(len(plan))
    return [(i, *plan[j]) for i, j in enumerate(order)]


def _render_many(cfg: SynthConfig, split: str, items: list[tuple[int, int, int]]) -> np.ndarray:
    sid = {"train": 0, "test": 1, "val": 2}[split]
    subj = {s: _subject(cfg, s) for s in {p[2] for p in items}}
    return np.stack([render_clip(cfg, label, s, np.random.default_rng([cfg.seed, sid, i]), subj[s])
                     for i, label, s in items]) if items else np.zeros((0,), np.uint8)


def generate_split(cfg: SynthConfig, split: str, workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All clips of a split in memory: videos uint8 [N, T, S, S, 3], labels int64 [N], subjects int64 [N].
    ``workers`` > 1 renders in that many processes; every clip has its own seed, so the bytes are the same."""
    plan = split_plan(cfg, split)
    videos = np.zeros((len(plan), cfg.num_frames, cfg.size, cfg.size, 3), np.uint8)
    chunks = [plan[i::workers] for i in range(workers)] if workers > 1 else [plan]
    if workers > 1 and len(plan) > workers:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers) as pool:
            for chunk, out in zip(chunks, pool.map(_render_many, [cfg] * workers, [split] * workers, chunks)):
                videos[[p[0] for p in chunk]] = out
    else:
        for chunk in chunks:
            if chunk:
                videos[[p[0] for p in chunk]] = _render_many(cfg, split, chunk)
    return videos, np.array([p[1] for p in plan], np.int64), np.array([p[2] for p in plan], np.int64)


# ----------------------------------------------------------------------------------------------- writing
def synthesize(out: str | os.PathLike, config: SynthConfig | None = None, preset: str | None = None,
               workers: int | None = None, **overrides: Any) -> Path:
    """Generate the synthetic dataset into ``out`` (shards + dataset.json) and return ``out``.

    ``config``, or a named ``preset`` (PRESETS), and/or keyword overrides of SynthConfig fields. Deterministic for a
    config: the same seed gives byte-identical shards, whatever ``workers`` (rendering processes; None = all cores,
    at most 8).
    """
    workers = workers or min(8, os.cpu_count() or 1)
    if config is not None and preset is not None:
        raise ValueError("pass a SynthConfig or a preset name, not both")
    if config is None:
        cfg = synth_config(preset, **overrides)   # size-relative defaults follow an overridden size
    else:
        cfg = synth_config(**(asdict(config) | overrides)) if overrides else config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "val", "test") if cfg.val_subjects else ("train", "test"):
        videos, labels, subjects = generate_split(cfg, split, workers)
        sink = ShardSink(out, split, cfg.shard_size)
        for i, (video, label, s) in enumerate(zip(videos, labels, subjects)):
            if cfg.format == "mp4":
                from .video import encode_mp4

                data = encode_mp4(video, fps=cfg.fps)
            else:
                data = npy_bytes(video)
            key = f"{split}_s{s:03d}_{i:06d}"
            meta = {"label": int(label), "label_name": cfg.class_names[label], "subject": f"s{s:03d}",
                    "num_frames": cfg.num_frames, "fps": cfg.fps, "height": cfg.size, "width": cfg.size,
                    "source": "synthetic"}
            sink.write(make_sample(key, int(label), data, cfg.format, meta))
        splits[split] = sink.close()
    info = DatasetInfo(name=f"synthetic-{cfg.digest()}", num_classes=cfg.num_classes, class_names=cfg.class_names,
                       splits=splits, num_frames=cfg.num_frames, height=cfg.size, width=cfg.size,
                       flip_ok=False,  # a mirror turns move_left into move_right and cw into ccw
                       format=cfg.format, fps=cfg.fps,
                       source={"generator": "msf_scale.data.synthetic", "version": GENERATOR_VERSION} | asdict(cfg))
    write_dataset_info(out, info)
    return out


def default_cache_dir() -> Path:
    """``$MSF_SCALE_CACHE`` if set, else ``~/.cache/msf_scale``."""
    env = os.environ.get("MSF_SCALE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "msf_scale"


def ensure_synthetic(cache_dir: str | os.PathLike | None = None, **synth_kwargs: Any) -> Path:
    """Path of the synthetic dataset for these parameters, generating it once into ``cache_dir/synth-<hash>``.

    Safe when several processes (ranks) call it at once: one generates under a file lock into a temporary
    directory that is renamed into place when complete; the others wait and reuse it.
    """
    cfg = synth_config(**synth_kwargs)   # synth_kwargs may name a preset: {"preset": "micro", ...}
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    root = base / f"synth-{cfg.digest()}"
    if (root / "dataset.json").is_file():
        return root
    with open(base / f".synth-{cfg.digest()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / "dataset.json").is_file():
                tmp = Path(tempfile.mkdtemp(prefix=f".synth-{cfg.digest()}-", dir=base))
                try:
                    synthesize(tmp, cfg)
                    if root.exists():  # a half-written directory from a killed run
                        shutil.rmtree(root)
                    os.replace(tmp, root)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root
