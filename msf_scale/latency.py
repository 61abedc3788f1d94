"""The latency harness: `msf-scale latency` over variants x sizes, or over run directories / checkpoints.

    msf-scale latency --models msf_mamba_tiny,videomamba_base --device cuda --modes eager,graph,compile --out lat/
    msf-scale latency --runs runs/ --device cuda --out lat/          # every run dir (its own input shape)
    msf-scale latency --models msf_mamba_tiny --device cpu --modes eager --frames 8 --img-size 32 --runs-per 50

What it measures, per model and mode (msf_scale.inference): batch-1 latency of one clip (one view) and of one
video (all its test views in one batch), median and p90 over N timed runs after a warm-up; throughput (clips/s) at
a large batch; peak memory; optionally the whole path from a video file (decode + views + forward, eager).
GPU timing uses CUDA events around each call; CPU timing time.perf_counter. Writes latency.csv and latency.json
with the GPU, driver, torch, CUDA and mamba-ssm versions.

Eager batch-1 is launch-bound (the host issuing hundreds of small kernels): it measures Python and the driver
more than the model and swings by ~2x between runs. Quote CUDA-graph replay (or torch.compile).
"""
from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from msf_scale.inference import MODES, build_runner

LAUNCH_BOUND_NOTE = ("eager batch-1 latency is launch-bound (hundreds of small kernels issued from Python) and "
                     "swings by ~2x between runs: quote CUDA-graph replay (mode 'graph') or torch.compile")
CSV_FIELDS = ("model", "variant", "size", "source", "mode", "measure", "batch", "input", "dtype", "median_ms",
              "p90_ms", "mean_ms", "min_ms", "runs", "clips_per_s", "peak_mem_gb", "device", "error")


@dataclass
class Row:
    model: str          # registry name, e.g. msf_mamba_tiny
    variant: str
    size: str
    source: str         # "registry" or the run directory / checkpoint
    mode: str           # eager | graph | compile
    measure: str        # clip (batch 1, one view) | video (batch = views) | throughput (large batch) | file
    batch: int
    input: str          # C x T x H x W of one view
    dtype: str
    median_ms: float | None
    p90_ms: float | None
    mean_ms: float | None
    min_ms: float | None
    runs: int
    clips_per_s: float | None
    peak_mem_gb: float | None
    device: str
    error: str = ""     # why this row has no numbers (e.g. out of memory at the throughput batch)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_calls(fn: Callable[[], object], runs: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``runs`` calls after ``warmup`` untimed ones. CUDA: events on the current stream
    (each call's own start/end, synchronised once at the end); CPU: perf_counter."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    from msf_scale.metrics import peak_memory_gb

    return peak_memory_gb(device)


def environment(device: torch.device) -> dict:
    """Versions and hardware that the numbers depend on."""
    from importlib import metadata

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    env = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "mamba_ssm": version("mamba-ssm") or version("mamba_ssm"), "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
           "device": str(device), "gpu": None, "driver": None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def _stats(ms: list[float]) -> dict:
    return {"median_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "mean_ms": sum(ms) / len(ms),
            "min_ms": min(ms), "runs": len(ms)}


def measure_model(model: nn.Module, name: str, variant: str, size: str, source: str, device: torch.device,
                  modes: Iterable[str], views: int, throughput_batch: int, runs: int, warmup: int,
                  dtype: torch.dtype | None, video_file: str | None = None, num_clips: int = 1, num_crops: int = 1,
                  measures: Iterable[str] = ("clip", "video", "throughput"), throughput_runs: int | None = None,
                  progress: Callable[[str], None] | None = None) -> list[Row]:
    """Every row for one model: per mode, clip (batch 1), video (batch = views; skipped for one view),
    throughput (batch ``throughput_batch``), those named in ``measures``; plus one eager row for the whole file
    path when ``video_file``. ``throughput_runs`` (default ``runs``): timed calls of the large-batch row."""
    cfg = model.cfg
    shape = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    model = model.to(device).eval()
    dname = "fp32" if dtype in (None, torch.float32) else str(dtype).replace("torch.", "")
    rows = []
    for mode in modes:
        for measure, batch in (("clip", 1), ("video", views), ("throughput", throughput_batch)):
            if measure not in measures or batch <= 0 or (measure == "video" and views == 1):
                continue   # one view: the video row would repeat the clip row
            if progress:
                progress(f"{name} {mode} {measure} (batch {batch})")
            x = torch.randn(batch, *shape, device=device)
            _peak_reset(device)
            base = dict(model=name, variant=variant, size=size, source=source, mode=mode, measure=measure,
                        batch=batch, input=" x ".join(map(str, shape)), dtype=dname, device=str(device))
            try:
                run = build_runner(model, x, mode, dtype)
                n = (throughput_runs or runs) if measure == "throughput" else runs
                ms = time_calls(lambda: run(x), n, warmup, device)
            except torch.cuda.OutOfMemoryError as e:
                torch.cuda.empty_cache()
                rows.append(Row(**base, median_ms=None, p90_ms=None, mean_ms=None, min_ms=None, runs=0,
                                clips_per_s=None, peak_mem_gb=None, error=f"out of memory: {str(e)[:80]}"))
                continue
            except Exception as e:   # noqa: BLE001 - a mode that cannot run this model is a row, not a crash
                if mode == "eager":
                    raise
                inner = getattr(e, "inner_exception", None) or e   # dynamo wraps the backend's own error
                first = (str(inner).strip().splitlines() or [""])[0][:160]
                rows.append(Row(**base, median_ms=None, p90_ms=None, mean_ms=None, min_ms=None, runs=0,
                                clips_per_s=None, peak_mem_gb=None,
                                error=f"{mode} failed: {type(inner).__name__}: {first}"))
                continue
            st = _stats(ms)
            rows.append(Row(**base, **st, clips_per_s=batch / (st["median_ms"] / 1e3), peak_mem_gb=_peak_gb(device)))
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if video_file:
        rows.append(_file_row(model, name, variant, size, source, device, video_file, num_clips, num_crops,
                              runs, warmup, dtype, dname, shape))
    return rows


def _file_row(model, name, variant, size, source, device, path, num_clips, num_crops, runs, warmup, dtype, dname,
              shape) -> Row:
    """Decode the file, build its test views (as msf-scale predict / the eval loader do) and run them: eager,
    one video per call, timed end to end with perf_counter (host work included by design)."""
    from msf_scale.predict import clip_views, read_clip

    cfg = model.cfg
    run = build_runner(model, torch.zeros(num_clips * num_crops, *shape, device=device), "eager", dtype)

    def whole() -> None:
        views = clip_views(read_clip(path), cfg.num_frames, cfg.img_size, num_clips, num_crops)
        run(views.to(device)).float().softmax(-1).mean(0).cpu()   # .cpu() waits for the device

    _peak_reset(device)
    ms = time_calls(whole, runs, warmup, torch.device("cpu"))   # perf_counter: the host path is the point
    st = _stats(ms)
    return Row(model=name, variant=variant, size=size, source=f"{source} + {path}", mode="eager", measure="file",
               batch=num_clips * num_crops, input=" x ".join(map(str, shape)), dtype=dname, **st,
               clips_per_s=num_clips * num_crops / (st["median_ms"] / 1e3), peak_mem_gb=_peak_gb(device),
               device=str(device))


def write_results(rows: list[Row], env: dict, out_dir: Path, settings: dict) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "latency.csv", out_dir / "latency.json"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    json_path.write_text(json.dumps({"environment": env, "settings": settings, "note": LAUNCH_BOUND_NOTE,
                                     "results": [asdict(r) for r in rows]}, indent=1))
    return csv_path, json_path


def read_results(path: Path) -> list[dict]:
    """The result rows of a latency.json (or of the latency.json in a directory)."""
    p = Path(path)
    p = p / "latency.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no latency results (write them with msf-scale latency --out DIR)")
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError(f"{p}: not a latency.json written by msf-scale latency (no 'results' list)")
    return data["results"]


def preferred_latency(rows: list[dict], measure: str = "clip", modes: tuple[str, ...] = ("graph", "compile", "eager")
                      ) -> dict[tuple[str, str], dict]:
    """(variant, size) -> the row to quote, all in one mode: the first of ``modes`` that timed ``measure`` for any
    model (one plot never mixes graph replay with eager). Models not timed in that mode are absent."""
    for mode in modes:
        picked = {(r["variant"], r["size"]): r for r in rows
                  if r.get("mode") == mode and r.get("measure") == measure and r.get("median_ms") is not None}
        if picked:
            return picked
    return {}


def format_table(rows: list[Row]) -> str:
    lines = ["| model | mode | measure | batch | median ms | p90 ms | clips/s | peak GB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.median_ms is None:
            lines.append(f"| {r.model} | {r.mode} | {r.measure} | {r.batch} | — | — | — | — ({r.error}) |")
            continue
        lines.append(f"| {r.model} | {r.mode} | {r.measure} | {r.batch} | {r.median_ms:.2f} | {r.p90_ms:.2f} | "
                     f"{r.clips_per_s:.1f} | {r.peak_mem_gb:.2f} |")
    return "\n".join(lines)


# --- which models ------------------------------------------------------------------------------------------------
def models_from_names(names: list[str], frames: int, img_size: int, num_classes: int, device: torch.device
                      ) -> Iterable[tuple[nn.Module, str, str, str, str]]:
    """(model, name, variant, size, source) for registry names (random weights: latency needs no training)."""
    from msf_scale.models import create_model, list_models

    known = list_models()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown model {name!r}; registered: {', '.join(known)}")
        variant, size = name.rsplit("_", 1)
        yield (create_model(name, num_classes=num_classes, num_frames=frames, img_size=img_size, device=device),
               name, variant, size, "registry")


def find_run_dirs(root: Path) -> list[Path]:
    """``root`` itself when it holds an export (model_config.json), else its sub-directories that do."""
    root = Path(root)
    if (root / "model_config.json").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if (p / "model_config.json").is_file()) if root.is_dir() else []


def models_from_runs(paths: list[Path], device: torch.device) -> Iterable[tuple[nn.Module, str, str, str, str]]:
    """Exported runs (a run dir, its best/, or a .safetensors file), each at its own input shape and weights."""
    from msf_scale.export import load_model, read_model_config

    for p in paths:
        meta = read_model_config(p)
        model = load_model(p, device=device)
        yield model, f"{meta['variant']}_{meta['size']}", meta["variant"], meta["size"], str(p)


# --- the command -------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--models", default=None,
                   help="comma-separated registry names or 'all' (default: the 9 MSF/VideoMamba models, or none "
                        "with --runs)")
    p.add_argument("--runs", nargs="*", default=None, metavar="DIR",
                   help="run directories (or a folder of them, or best/, or .safetensors): their weights and shape")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--modes", default=None, help=f"comma-separated of {','.join(MODES)} (default: all on GPU, "
                   "eager on CPU)")
    p.add_argument("--measures", default="clip,video,throughput", help="which of clip,video,throughput to time")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=32)
    p.add_argument("--views", type=int, default=6, help="test views per video (2 clips x 3 crops, the configs')")
    p.add_argument("--batch", type=int, default=64, help="batch for the throughput row (0: skip)")
    p.add_argument("--runs-per", type=int, default=50, help="timed runs per row (>= 50 for the quoted figures)")
    p.add_argument("--throughput-runs", type=int, default=None, help="timed runs of the throughput row (default: "
                   "--runs-per)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--video-file", default=None, help="also time the whole path from this file (decode + views + "
                   "forward, eager)")
    p.add_argument("--out", default="latency", help="output directory for latency.csv / latency.json")


def run_command(args) -> int:
    from msf_scale.config import UserError, UserPathError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    modes = (args.modes or ("eager,graph,compile" if device.type == "cuda" else "eager")).split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"--modes: unknown {bad}; expected some of {','.join(MODES)}")
    if "graph" in modes and device.type != "cuda":
        raise UserError("--modes graph needs CUDA (CUDA graphs); on CPU use --modes eager or eager,compile")
    measures = set(args.measures.split(","))
    if measures - {"clip", "video", "throughput"} or not measures:
        raise UserError(f"--measures: expected some of clip,video,throughput, got {args.measures!r}")
    if args.runs_per < 1 or args.warmup < 0:
        raise UserError("--runs-per must be >= 1 and --warmup >= 0")
    if args.video_file and not Path(args.video_file).is_file():
        raise UserPathError(f"--video-file {args.video_file}: no such file")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    sources = []
    if args.runs is not None:
        dirs = [d for r in args.runs for d in (find_run_dirs(Path(r)) if not str(r).endswith(".safetensors") else [r])]
        if not dirs:
            raise UserPathError(f"--runs {' '.join(args.runs)}: no exported run (model_config.json) found")
        sources.append(models_from_runs(dirs, device))
    if args.models or args.runs is None:
        from msf_scale.models import list_models

        names = [n for n in (args.models or "").split(",") if n] if args.models not in (None, "all") else [
            n for n in list_models() if args.models == "all" or not n.startswith("cnn3d")]
        unknown = [n for n in names if n not in list_models()]
        if unknown:
            raise UserError(f"--models: unknown {', '.join(unknown)}; registered: {', '.join(list_models())}")
        sources.append(models_from_names(names, args.frames, args.img_size, args.num_classes, device))
    from tqdm.auto import tqdm

    rows: list[Row] = []
    with tqdm(desc="latency", unit="row", dynamic_ncols=True) as bar:
        for source in sources:
            try:
                for model, name, variant, size, src in source:
                    clips, crops = _run_views(src, args.views)
                    rows += measure_model(model, name, variant, size, src, device, modes, clips * crops, args.batch,
                                          args.runs_per, args.warmup, dtype, args.video_file, clips, crops,
                                          measures, args.throughput_runs, progress=lambda s: (bar.set_postfix_str(s), bar.update(1)))
                    del model
            except ValueError as e:   # a shape the models refuse (e.g. --img-size not divisible by the patch)
                raise UserError(str(e)) from e
    env = environment(device)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    csv_path, json_path = write_results(rows, env, Path(args.out), settings)
    print(format_table(rows))
    print(f"\n{env.get('gpu') or env['cpu']}, torch {env['torch']}, CUDA {env['cuda']}, mamba-ssm {env['mamba_ssm']}; "
          f"{args.runs_per} timed runs per row after {args.warmup} warm-up.\nNote: {LAUNCH_BOUND_NOTE}.\n"
          f"-> {csv_path}, {json_path}")
    return 0


def _run_views(source: str, default: int) -> tuple[int, int]:
    """(num_clips, num_crops) of a run's test views (its config.yaml), or (default, 1) for registry models."""
    if source == "registry":
        return default, 1
    p = Path(source)
    run_dir = p.parent if p.suffix == ".safetensors" else p
    for d in (run_dir, run_dir.parent):   # best/ sits inside the run directory
        if (d / "config.yaml").is_file():
            from msf_scale.config import read_config

            cfg = read_config(d / "config.yaml")
            return cfg.data.num_clips, cfg.data.num_crops
    return 1, 1
