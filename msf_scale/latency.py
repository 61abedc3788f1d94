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
import os
import platform
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from msf_scale.inference import MODES, build_runner

LAUNCH_BOUND_NOTE = ("eager batch-1 latency is launch-bound (hundreds of small kernels issued from Python) and "
                     "swings by ~2x between runs: quote CUDA-graph replay (mode 'graph') or torch.compile")
CSV_FIELDS = ("model", "variant", "size", "source", "mode", "measure", "batch", "input", "dtype", "median_ms",
              "p90_ms", "mean_ms", "min_ms", "runs", "clips_per_s", "peak_mem_gb", "device", "error", "build_s")


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
    build_s: float | None = None   # seconds to build the runner: graph warm-up + capture, or torch.compile


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_calls(fn: Callable[[], object], runs: int, warmup: int, device: torch.device,
               max_s: float | None = None) -> list[float]:
    """Milliseconds of each of ``runs`` calls after ``warmup`` untimed ones. CUDA: events on the current stream
    (each call's own start/end, synchronised once at the end); CPU: perf_counter.

    ``max_s`` bounds one row whatever a call costs (a batch-64 forward of a base model is ~1 s on a GPU and tens
    of seconds on a CPU): warm-up stops once it has taken max_s / 4 (after at least one call; each warm-up call is
    synchronised and timed), and the timed calls are cut to what fits in max_s at the last warm-up call's pace,
    never below min(runs, 5). The returned list's length says how many were timed."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    per_call = None
    t_warm = time.perf_counter()
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        if max_s is not None:
            sync()
            per_call = time.perf_counter() - t
            if time.perf_counter() - t_warm > max_s / 4:
                break
    if max_s is not None and per_call is not None and per_call > 0:
        runs = min(runs, max(min(runs, 5), int(max_s / per_call)))
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
    """Versions and hardware that the numbers depend on, and the implementation choices (implementation_choices)."""
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
    env["choices"] = implementation_choices()
    return env


def implementation_choices() -> dict:
    """What a latency figure depends on besides versions and hardware: every MSF_SCALE_* variable that is set, the
    compiled-inference forms read at import, and the Triton kernels' settings as they stand in this process (a
    script that patches a CONFIG before measuring is recorded as it ran), so that a table says which code it timed."""
    from msf_scale.models import blocks, stem
    from msf_scale.ops import causal_conv1d

    choices = {"variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MSF_SCALE_")},
               "conv1d_compiled": causal_conv1d.COMPILED_INFERENCE_FORM,
               "patch_embed_compiled": stem.PATCH_EMBED_COMPILED_FORM,
               "mixer_layout": blocks.MIXER_INFERENCE_LAYOUT, "conv1d_tokens": causal_conv1d.TOKEN_MAJOR_FORM}
    try:   # the Triton kernels' modules import triton
        from msf_scale.ops import _conv1d_triton, _fusion_triton, _scan_chunked
    except ImportError:
        return choices
    choices["conv1d_triton"] = dict(_conv1d_triton.CONFIG)
    choices["scan_chunked"] = dict(_scan_chunked.CONFIG)
    choices["fusion_triton"] = dict(_fusion_triton.CONFIG)
    choices["fusion_triton_batch1"] = {**_fusion_triton.BATCH1_FORWARD,
                                       "stack_max_channels": _fusion_triton.STACK_MAX_CHANNELS}
    return choices


def choices_line(env: dict) -> str:
    """One line of a table's footer: the forms and any MSF_SCALE_* variables (environment()["choices"])."""
    c = env.get("choices")
    if not c:
        return "compiled forms: not recorded"
    variables = ", ".join(f"{k}={v}" for k, v in c.get("variables", {}).items()) or "none"
    scan = c.get("scan_chunked")
    return (f"compiled forms: conv1d {c.get('conv1d_compiled')}, patch embedding {c.get('patch_embed_compiled')}"
            + (f", mixer layout {c['mixer_layout']} (batch-1 chunked scan)" if "mixer_layout" in c else "")
            + (f", chunked scan (where it runs) blocks of {scan['steps']} steps"
               + (f" ({scan['steps_tokens']} token-major)" if "steps_tokens" in scan else "") if scan else "")
            + f"; MSF_SCALE_* set: {variables}; Triton settings in the JSON")


def _stats(ms: list[float]) -> dict:
    return {"median_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "mean_ms": sum(ms) / len(ms),
            "min_ms": min(ms), "runs": len(ms)}


def measure_model(model: nn.Module, name: str, variant: str, size: str, source: str, device: torch.device,
                  modes: Iterable[str], views: int, throughput_batch: int, runs: int, warmup: int,
                  dtype: torch.dtype | None, video_file: str | None = None, num_clips: int = 1, num_crops: int = 1,
                  measures: Iterable[str] = ("clip", "video", "throughput"), throughput_runs: int | None = None,
                  progress: Callable[[str], None] | None = None, row_cap_s: float | None = None) -> list[Row]:
    """Every row for one model: per mode, clip (batch 1), video (batch = views; skipped for one view),
    throughput (batch ``throughput_batch``), those named in ``measures``; plus one eager row for the whole file
    path when ``video_file``. ``throughput_runs`` (default ``runs``): timed calls of the large-batch row.
    ``row_cap_s``: bound on each row's warm-up + timed calls (time_calls' max_s; the runner's build is apart)."""
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
                t_build = time.perf_counter()
                run = build_runner(model, x, mode, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                base["build_s"] = time.perf_counter() - t_build
                n = (throughput_runs or runs) if measure == "throughput" else runs
                ms = time_calls(lambda: run(x), n, warmup, device, max_s=row_cap_s)
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


def _replace_text(path: Path, text: str) -> None:
    """Write then rename: a reader (or a kill mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_results(rows: list[Row], env: dict, out_dir: Path, settings: dict, status: dict | None = None
                  ) -> tuple[Path, Path]:
    """latency.csv and latency.json (atomically replaced: safe to call after every row). ``status``: the table
    harness's progress (rows done, steps planned, finished or not), stored in the JSON."""
    import io

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "latency.csv", out_dir / "latency.json"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    _replace_text(csv_path, buf.getvalue())
    data = {"environment": env, "settings": settings, "note": LAUNCH_BOUND_NOTE}
    if status is not None:
        data["status"] = status
    data["results"] = [asdict(r) for r in rows]
    _replace_text(json_path, json.dumps(data, indent=1, default=str))
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


# --- the budgeted table (benchmarks/bench_latency.py) ----------------------------------------------------------
PENDING = "not run: the harness stopped before this step"


class StepTimeout(BaseException):
    """Raised by :func:`time_limit`'s alarm. A BaseException, so that no ``except Exception`` inside a step
    (measure_model's per-mode handler, dynamo's own) turns it into a failed row or swallows it."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise StepTimeout in the main thread after ``seconds`` of wall time (SIGALRM, POSIX). No limit when None,
    or off the main thread. A step blocked inside one C call (a CUDA synchronize, a compiler subprocess wait) is
    interrupted when that call returns to Python."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise StepTimeout(seconds)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Step:
    """One row of the table: a model, a mode, a measure (and its batch)."""
    name: str
    mode: str
    measure: str
    batch: int

    @property
    def variant(self) -> str:
        return self.name.rsplit("_", 1)[0]

    @property
    def size(self) -> str:
        return self.name.rsplit("_", 1)[1]

    def __str__(self) -> str:
        return f"{self.name} {self.mode} {self.measure} (batch {self.batch})"


def plan_table(names: list[str], modes: Iterable[str], measures: Iterable[str], compile_measures: Iterable[str],
               views: int, batch: int, depth: dict[str, int] | None = None) -> list[Step]:
    """The order the table runs in. Every eager and graph row first, measure by measure (all batch-1 clip rows,
    then video, then throughput), each model's eager row beside its graph row; then the torch.compile rows
    (``compile_measures``), shallowest model first (compile time grows with the number of blocks traced). A budget
    cut therefore loses the expensive tail (throughput, compile of the deepest models), never the clip rows."""
    modes, measures, compile_measures = list(modes), set(measures), set(compile_measures)
    batches = {"clip": 1, "video": views, "throughput": batch}
    wanted = lambda m: batches[m] > 0 and not (m == "video" and views == 1)   # noqa: E731 - one view: video = clip
    fast = [m for m in modes if m != "compile"]
    steps = [Step(n, mode, m, batches[m]) for m in batches if m in measures and wanted(m) for n in names for mode in fast]
    if "compile" in modes:
        order = sorted(names, key=lambda n: (depth or {}).get(n, 0))   # stable: equal depths keep the given order
        steps += [Step(n, "compile", m, batches[m]) for m in batches if m in compile_measures and wanted(m)
                  for n in order]
    return steps


class Budget:
    """A table's wall-clock budget (None: unbounded) and the predicted cost of a step from the steps measured
    so far: the same mode and measure on other models (for eager/graph with none yet, the other of the two on
    the same measure), scaled by the models' cost ratio: depth for batch-1 clip rows (launch-bound) and for
    compile (the trace grows with the blocks), analytic MACs per clip for the batched rows. The largest of those
    predictions is used: a cautious guess, so that a step predicted to overrun is not started. With the rows'
    ``row_cap_s``, an eager/graph prediction is at most twice it (what the cap lets a row cost, short of calls
    slower than cap / 5)."""

    def __init__(self, budget_s: float | None, costs: dict[str, tuple[float, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic, start: float | None = None,
                 row_cap_s: float | None = None):
        self.budget_s = budget_s
        self.row_cap_s = row_cap_s        # the rows' own cap (time_calls' max_s): eager/graph predictions <= 2x it
        self.clock = clock
        self.t0 = clock() if start is None else start
        self.costs = costs or {}          # name -> (depth, MACs per clip)
        self.done: list[tuple[Step, float]] = []

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def record(self, step: Step, seconds: float) -> None:
        self.done.append((step, seconds))

    def _ratio(self, ref: Step, step: Step) -> float:
        a, b = self.costs.get(ref.name), self.costs.get(step.name)
        i = 0 if step.measure == "clip" or step.mode == "compile" else 1
        return b[i] / a[i] if a and b and a[i] else 1.0

    def predict(self, step: Step) -> float | None:
        guess = self._predict(step)
        if guess is not None and step.mode != "compile" and self.row_cap_s is not None:
            guess = min(guess, 2 * self.row_cap_s)   # warm-up <= cap/4 + a call, timed <= cap (>= 5 calls), build
        return guess

    def _predict(self, step: Step) -> float | None:
        """Seconds, or None when nothing similar has run yet. Sources, first found: (1) the same mode and measure
        on other models, cost-scaled; (2) for eager/graph, the other of the two, same measure, cost-scaled; (3) the
        same model's (else any model's, cost-scaled) largest-batch eager/graph row so far, scaled by the batch
        ratio (e.g. throughput from video), or for compile the eager/graph rows of the same measure (a lower bound:
        compiling costs more)."""
        same = [(s, t) for s, t in self.done if s.mode == step.mode and s.measure == step.measure]
        if not same and step.mode != "compile":
            same = [(s, t) for s, t in self.done if s.mode != "compile" and s.measure == step.measure]
        if same:
            return max(t * self._ratio(s, step) for s, t in same)
        near = [(s, t) for s, t in self.done if s.mode != "compile"
                and (step.mode != "compile" or s.measure == step.measure)]
        near = [(s, t) for s, t in near if s.name == step.name] or near   # the same model's rows, else any model's
        if not near:
            return None
        top = max(s.batch for s, _ in near)
        return max(t * self._ratio(s, step) for s, t in near if s.batch == top) * max(step.batch / top, 1.0)


def _empty_row(step: Step, input_: str, dtype: str, device: torch.device, error: str) -> Row:
    return Row(model=step.name, variant=step.variant, size=step.size, source="registry", mode=step.mode,
               measure=step.measure, batch=step.batch, input=input_, dtype=dtype, median_ms=None, p90_ms=None,
               mean_ms=None, min_ms=None, runs=0, clips_per_s=None, peak_mem_gb=None, device=str(device), error=error)


def _timed_out(e: BaseException) -> bool:
    """A StepTimeout, or an error raised while unwinding from one (e.g. a CUDA-graph capture ended by the alarm)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, StepTimeout):
            return True
        seen.add(id(e))
        e = e.__context__
    return False


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def row_line(row: Row, step_s: float | None = None) -> str:
    """The progress line of one finished row (without the clock)."""
    what = f"{row.model} {row.mode} {row.measure} (batch {row.batch})"
    if row.median_ms is None:
        return f"{what}: {row.error}" + ("" if step_s is None else f"; step {step_s:.1f} s")
    build = "" if row.build_s is None else f", build {row.build_s:.1f} s"
    return (f"{what}: median {row.median_ms:.2f} ms, p90 {row.p90_ms:.2f} ms, {row.runs} runs{build}"
            + ("" if step_s is None else f"; step {step_s:.1f} s"))


def run_table(steps: list[Step], make_model: Callable[[str], nn.Module], device: torch.device, runs: int,
              warmup: int, dtype: torch.dtype | None, out_dir: Path, env: dict, settings: dict, *,
              budget: Budget | None = None, compile_cap_s: float | None = None, compile_reserve_s: float = 0.0,
              row_cap_s: float | None = None, throughput_runs: int | None = None, input_: str = "",
              min_start_s: float = 1.0, log: Callable[[str], None] = lambda s: print(s, flush=True)) -> tuple[list[Row], int]:
    """Run ``steps`` in order and return (rows, steps that raised). Every planned step is a row from the start
    (``PENDING``), and latency.csv/.json are rewritten (atomically) after every step, so a run killed at any
    point leaves every finished row on disk and names the rest. One progress line per step, with the clock.

    The budget is hard: a step is skipped (a row saying so) when its predicted time (``Budget.predict``) exceeds
    what is left (a step with no prediction yet: when less than ``min_start_s`` is left), and a step that runs
    past what is left is stopped by an alarm and recorded as such. While compile
    steps remain, the eager/graph steps see ``compile_reserve_s`` less. A compile step is also stopped after
    ``compile_cap_s``. Models are built once (``make_model(name)``) and kept for their later steps; a step that
    raises is a "failed" row and the table goes on; an interruption (SIGTERM handler, Ctrl-C) marks the steps not
    run, writes, and propagates."""
    budget = budget or Budget(None)
    dname = "fp32" if dtype in (None, torch.float32) else str(dtype).replace("torch.", "")
    rows = [_empty_row(st, input_, dname, device, PENDING) for st in steps]
    status = {"steps": len(steps), "done": 0, "finished": False, "elapsed_s": 0.0, "budget_s": budget.budget_s}

    def write() -> None:
        status["elapsed_s"] = round(budget.elapsed(), 1)
        write_results(rows, env, out_dir, settings, status)

    def say(i: int, text: str) -> None:
        log(f"[{budget.elapsed():7.1f} s] {i + 1}/{len(steps)} {text}")

    write()
    n_compile = sum(st.mode == "compile" for st in steps)
    log(f"[{budget.elapsed():7.1f} s] plan: {len(steps)} rows ({len(steps) - n_compile} eager/graph, then {n_compile} "
        f"compile), budget {'none' if budget.budget_s is None else f'{budget.budget_s:.0f} s'}, -> {Path(out_dir)}")
    models: dict[str, nn.Module | BaseException] = {}
    failures = 0
    i = -1
    try:
        for i, st in enumerate(steps):
            reserve = compile_reserve_s if st.mode != "compile" and any(
                s.mode == "compile" for s in steps[i + 1:]) else 0.0
            avail = budget.left() - reserve
            pred = budget.predict(st)
            if avail <= (min_start_s if pred is None else 0) or (pred is not None and pred > avail):
                kept = f" (the last {reserve:.0f} s are kept for compile)" if reserve else ""
                if budget.left() <= 0:
                    why = f"--budget-s {budget.budget_s:.0f} spent"
                elif pred is None or avail <= 0:
                    why = f"{max(avail, 0):.1f} s left{kept}"
                else:
                    why = f"predicted {pred:.0f} s > {avail:.0f} s left{kept}"
                rows[i] = _empty_row(st, input_, dname, device, f"skipped (budget): {why}")
                status["done"] = i + 1
                write()
                say(i, row_line(rows[i]))
                continue
            cap, capped_by = (avail, "budget") if budget.budget_s is not None else (None, "")
            if st.mode == "compile" and compile_cap_s is not None and (cap is None or compile_cap_s < cap):
                cap, capped_by = compile_cap_s, "compile cap"
            if st.mode == "compile":
                say(i, f"{st}: compiling" + ("" if cap is None else f" (stopped after {cap:.0f} s: {capped_by})"))
            t = budget.clock()
            try:
                with time_limit(cap):
                    model = models.get(st.name)
                    if model is None:
                        try:
                            model = models[st.name] = make_model(st.name)
                        except Exception as e:   # noqa: BLE001 - one model that cannot be built is its rows
                            models[st.name] = e
                            raise
                    if isinstance(model, BaseException):
                        raise RuntimeError(f"model not built: {_first_line(model)}")
                    got = measure_model(model, st.name, st.variant, st.size, "registry", device, [st.mode],
                                        st.batch if st.measure == "video" else 2, st.batch, runs, warmup, dtype,
                                        measures=[st.measure], throughput_runs=throughput_runs, row_cap_s=row_cap_s)
                    del model
                rows[i] = got[0]
            except Exception as e:   # noqa: BLE001 - a step that raises is a row; the table goes on
                if not _timed_out(e):
                    failures += 1
                    rows[i] = _empty_row(st, input_, dname, device, f"failed: {_first_line(e)}")
                else:
                    rows[i] = _empty_row(st, input_, dname, device,
                                         f"stopped ({capped_by}): ran {budget.clock() - t:.1f} s of {cap:.1f} s allowed")
            except StepTimeout:
                rows[i] = _empty_row(st, input_, dname, device,
                                     f"stopped ({capped_by}): ran {budget.clock() - t:.1f} s of {cap:.1f} s allowed")
            dt = budget.clock() - t
            if device.type == "cuda" and rows[i].median_ms is None:
                try:   # a stopped or failed step may leave work queued and memory held
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                except Exception:   # noqa: BLE001
                    pass
            budget.record(st, dt)
            status["done"] = i + 1
            write()
            say(i, row_line(rows[i], dt))
    except BaseException as e:   # killed (SIGTERM -> the script's handler), interrupted or crashed: keep what is done
        for j in range(max(i, 0), len(steps)):
            if rows[j].error == PENDING:
                rows[j].error = f"not run: the harness was stopped ({type(e).__name__}) at {budget.elapsed():.0f} s"
        write()
        raise
    status["finished"] = True
    write()
    return rows, failures


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
    env = environment(device)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings["grouped_scan"] = True   # build_runner's default: both scan directions as one grouped call
    with tqdm(desc="latency", unit="row", dynamic_ncols=True) as bar:
        for source in sources:
            try:
                for model, name, variant, size, src in source:
                    clips, crops = _run_views(src, args.views)
                    rows += measure_model(model, name, variant, size, src, device, modes, clips * crops, args.batch,
                                          args.runs_per, args.warmup, dtype, args.video_file, clips, crops,
                                          measures, args.throughput_runs, progress=lambda s: (bar.set_postfix_str(s), bar.update(1)))
                    del model
                    write_results(rows, env, Path(args.out), settings)   # a stopped run keeps its finished models
            except ValueError as e:   # a shape the models refuse (e.g. --img-size not divisible by the patch)
                raise UserError(str(e)) from e
    csv_path, json_path = write_results(rows, env, Path(args.out), settings)
    print(format_table(rows))
    print(f"\n{env.get('gpu') or env['cpu']}, torch {env['torch']}, CUDA {env['cuda']}, mamba-ssm {env['mamba_ssm']}; "
          f"{args.runs_per} timed runs per row after {args.warmup} warm-up; {choices_line(env)}.\n"
          f"Note: {LAUNCH_BOUND_NOTE}.\n"
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
