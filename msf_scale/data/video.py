"""Video I/O with PyAV (torchvision does not import beside our torch): mp4 encode/decode, reading files.

All clips are uint8 arrays T x H x W x 3 (RGB). PyAV is imported lazily so that npy-only use never needs it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a core dependency
        raise ImportError("PyAV is needed for mp4 clips: pip install av") from e
    return av


_REFORMATTER = None


def _to_rgb(frame, width: int | None = None, height: int | None = None, interpolation: str | None = None):
    """uint8 H x W x 3 RGB of a decoded frame, through one cached swscale context per process on one thread.

    ``frame.to_ndarray(format="rgb24")`` builds a new swscale context, with a thread pool, for every frame: measured
    10x slower than decoding itself on 224 x 224 H.264 (2026-11-25), so it is never used here."""
    global _REFORMATTER
    if _REFORMATTER is None:
        from av.video.reformatter import VideoReformatter

        _REFORMATTER = VideoReformatter()
    return _REFORMATTER.reformat(frame, width=width, height=height, format="rgb24", interpolation=interpolation,
                                 threads=1).to_ndarray()


def encode_mp4(video: np.ndarray, fps: float = 25.0, crf: int = 18, preset: str = "veryfast") -> bytes:
    """H.264 (libx264, yuv420p) mp4 bytes of a uint8 T x H x W x 3 clip. H and W must be even (yuv420p).

    ``tune=fastdecode`` (no CABAC, no deblocking): measured 1.3-1.5x faster decoding for ~20% more bytes, the
    right trade for training data that is decoded every epoch."""
    av = _av()
    t, h, w, c = video.shape
    if video.dtype != np.uint8 or c != 3 or t == 0:
        raise ValueError(f"need a uint8 T x H x W x 3 clip with T > 0, got {video.dtype} {video.shape}")
    if h % 2 or w % 2:
        raise ValueError(f"mp4 (yuv420p) needs even height and width, got {h} x {w}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        from fractions import Fraction

        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, "tune": "fastdecode"}
        stream.codec_context.thread_count = 1  # deterministic output, and callers parallelise by process
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes, indices: list[int] | None = None, threads: int = 1) -> np.ndarray:
    """Decode mp4 bytes to uint8 T x H x W x 3, keeping only ``indices`` (sorted or not, repeats allowed).

    Decoding stops after the last wanted frame; an index past the end of the clip gives its last frame.
    Raises ValueError when nothing decodes.
    """
    av = _av()
    want = None if indices is None else set(indices)
    stop = None if indices is None else max(indices)
    frames: dict[int, np.ndarray] = {}
    last, last_frame = -1, None
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        for i, frame in enumerate(container.decode(stream)):
            last, last_frame = i, frame  # converted only if an index turns out to lie past the end
            if want is None or i in want:
                frames[i] = _to_rgb(frame)
            if stop is not None and i >= stop:
                break
    if last_frame is None:
        raise ValueError("mp4 holds no decodable frame")
    if indices is None:
        return np.stack([frames[i] for i in range(last + 1)])
    if last not in frames:
        frames[last] = _to_rgb(last_frame)
    return np.stack([frames[min(i, last)] for i in indices])


@dataclass
class ClipProbe:
    frames: int  # decoded frames
    expected: int  # frames announced by the container (0 when unknown)
    fps: float
    height: int
    width: int


def short_side_size(h: int, w: int, size: int, even: bool = True) -> tuple[int, int]:
    """(height, width) with the short side ``size`` and the aspect kept; ``even`` as yuv420p mp4 needs."""
    scale = size / min(h, w)
    if even:  # the nearest even sizes
        return max(2, 2 * round(h * scale / 2)), max(2, 2 * round(w * scale / 2))
    return max(1, round(h * scale)), max(1, round(w * scale))


def read_video_file(path: str | os.PathLike, short_side: int | None = None, start: int | None = None,
                    end: int | None = None, threads: int = 1) -> tuple[np.ndarray, ClipProbe]:
    """Decode the frames [start, end) (default: all) of a video file, resizing (area filter) so that the short
    side is ``short_side``. A segment of a long video is reached by seeking to the keyframe before ``start``
    and counting frames by timestamp, so cutting many segments out of one recording stays cheap.

    Raises ValueError (with the reason) for unreadable, zero-frame or truncated clips: a decode error part-way,
    or far fewer frames than the container announces (or than the segment asks for).
    """
    av = _av()
    frames: list[np.ndarray] = []
    start = start or 0
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise ValueError("zero frames: no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            fps = float(stream.average_rate or stream.guessed_rate or 25.0)
            t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            total = int(stream.frames or 0)
            expected = (min(end, total) if end is not None and total else end or total) - start
            if start > 0:  # land on the keyframe at or before the segment; timestamps say where we are
                container.seek(int((t0 + start / fps) / stream.time_base), stream=stream, backward=True)
            for i, frame in enumerate(container.decode(stream)):
                idx = round((frame.time - t0) * fps) if frame.time is not None else i
                if idx < start:
                    continue
                if end is not None and idx >= end:
                    break
                if short_side is not None:
                    h, w = short_side_size(frame.height, frame.width, short_side)
                    frames.append(_to_rgb(frame, w, h, "AREA"))
                else:
                    frames.append(_to_rgb(frame))
    except av.error.FFmpegError as e:
        why = e.strerror or str(e)
        if frames:
            raise ValueError(f"truncated: decode error after {len(frames)} frames ({why})") from e
        raise ValueError(f"unreadable: {why}") from e
    if not frames:
        raise ValueError("zero frames" + (f" in [{start}, {end})" if start or end is not None else ""))
    # Containers count frames approximately; a clip missing more than 10% (and 2+ frames) is truncated.
    if expected > 0 and len(frames) < expected - max(1, expected // 10):
        raise ValueError(f"truncated: decoded {len(frames)} of {expected} frames")
    video = np.stack(frames)
    return video, ClipProbe(len(frames), max(expected, 0), fps, video.shape[1], video.shape[2])


def sample_indices(num_frames: int, t: int) -> list[int]:
    """T evenly spaced frame indices over a clip of ``num_frames`` (segment centres; repeats when shorter)."""
    if num_frames < 1 or t < 1:
        raise ValueError(f"need num_frames >= 1 and t >= 1, got {num_frames}, {t}")
    return [min(num_frames - 1, int((i + 0.5) * num_frames / t)) for i in range(t)]
