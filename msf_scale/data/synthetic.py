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

GENERATOR_VERSION = 1  # bump when rendering changes, so cached datasets are regenerated
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
    # None: scaled from the defaults at 32 px, 4 px motion of a 14 px disk (size / 8 and 7 size / 16)
    motion_px: float | None = None  # the class signal: object displacement per frame, px (per-clip jitter +-20%)
    object_px: float | None = None  # object diameter, px (per-subject jitter +-15%)
    drift_px: float = 0.5  # distractor: max global camera drift per frame, px (random direction per clip)
    distractors: int = 0  # distractor objects with random, class-independent straight motion at motion_px
    noise_std: float = 3.0  # Gaussian pixel noise, on the 0-255 scale
    texture: float = 50.0  # background texture contrast: max difference of the two background colours (0-255)
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
            (min(self.motion_px, self.drift_px, self.noise_std, self.texture) >= 0,
             "motion_px, drift_px, noise_std and texture must be >= 0"),
            (0 < self.object_px <= self.size / 2, "object_px must be in (0, size/2]"),
            (self.distractors >= 0, "distractors must be >= 0"),
            (self.format in ("npy", "mp4"), "format must be 'npy' or 'mp4'"),
            (self.shard_size >= 1 and self.fps > 0, "shard_size >= 1 and fps > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SynthConfig: {msg} ({self})")

    @property
    def class_names(self) -> list[str]:
        return [m[0] for m in MOTIONS[: self.num_classes]]

    def digest(self) -> str:
        """Short hash of everything that changes the generated bytes (names the cache directory)."""
        d = asdict(self) | {"generator_version": GENERATOR_VERSION}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def synth_config(**overrides: Any) -> SynthConfig:
    """SynthConfig with keyword overrides; an unknown key raises ValueError listing the valid ones."""
    valid = {f.name for f in fields(SynthConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"unknown synthetic-data options {sorted(unknown)}; valid: {sorted(valid)}")
    return SynthConfig(**{k: v for k, v in overrides.items() if v is not None})


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
    return {"freqs": freqs, "basis": basis, "c1": c1, "c2": c2, "obj": obj,
            "radius": cfg.object_px / 2 * rng.uniform(0.85, 1.15)}


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


def split_plan(cfg: SynthConfig, split: str) -> list[tuple[int, int, int]]:
    """(clip index, label, subject) of every clip of ``split``, in the (seeded, shuffled) order written."""
    n_train = cfg.subjects - cfg.test_subjects
    subjects = list(range(n_train)) if split == "train" else list(range(n_train, cfg.subjects))
    per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
    plan = [(c, subjects[i % len(subjects)]) for c in range(cfg.num_classes) for i in range(per_class)]
    order = np.random.default_rng([cfg.seed, 104729, int(split == "train")]).permutation(len(plan))
    return [(i, *plan[j]) for i, j in enumerate(order)]


def generate_split(cfg: SynthConfig, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All clips of a split in memory: videos uint8 [N, T, S, S, 3], labels int64 [N], subjects int64 [N]."""
    plan = split_plan(cfg, split)
    subj = {s: _subject(cfg, s) for s in {p[2] for p in plan}}
    sid = 0 if split == "train" else 1
    videos = np.zeros((len(plan), cfg.num_frames, cfg.size, cfg.size, 3), np.uint8)
    for i, label, s in plan:
        videos[i] = render_clip(cfg, label, s, np.random.default_rng([cfg.seed, sid, i]), subj[s])
    return videos, np.array([p[1] for p in plan], np.int64), np.array([p[2] for p in plan], np.int64)


# ----------------------------------------------------------------------------------------------- writing
def synthesize(out: str | os.PathLike, config: SynthConfig | None = None, **overrides: Any) -> Path:
    """Generate the synthetic dataset into ``out`` (shards + dataset.json) and return ``out``.

    ``config`` and/or keyword overrides of SynthConfig fields. Deterministic for a config: the same seed gives
    byte-identical shards.
    """
    if config is None:
        cfg = synth_config(**overrides)   # size-relative defaults follow an overridden size
    else:
        cfg = synth_config(**(asdict(config) | overrides)) if overrides else config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "test"):
        videos, labels, subjects = generate_split(cfg, split)
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
    cfg = synth_config(**synth_kwargs)
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
