"""Accuracy vs inference time (the paper's Figure 5): `msf-scale curve --runs DIR --latency latency.json --out DIR`.

Reads the run directories train.py writes (config.yaml, run_meta.json, metrics.jsonl, eval.json,
final_metrics.json, model_config.json) and the latency rows of `msf-scale latency`; draws one line per variant
through its sizes (x: batch-1 latency per clip, ms; y: test top-1, %), PNG and SVG, and writes the CSV behind it.
A run without a test evaluation, or a model the latency file has not timed, is listed in the CSV and named on
the plot as missing, never dropped silently. Any variant the runs hold (cnn3d included) gets its line.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msf_scale.config import UserError, UserPathError

SIZE_ORDER = {"tiny": 0, "small": 1, "base": 2}
RUN_MARKERS = ("config.yaml", "run_meta.json", "metrics.jsonl", "eval.json", "final_metrics.json", "model_config.json")


@dataclass
class Run:
    """What the measurement tools need from one run directory (None: not recorded)."""
    name: str
    path: Path
    variant: str
    size: str
    num_frames: int | None
    img_size: int | None
    params: int | None
    gflops: float | None                 # forward, one clip (run_meta's forward_macs_per_clip)
    test_top1: float | None              # final_metrics.json, else the last eval.json
    steps: int | None
    clips_per_s: float | None            # training throughput, all devices (last logged window)
    mfu: float | None
    world_size: int | None
    wall_s: float | None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.variant}_{self.size}"


def _json(p: Path) -> dict | None:
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e})") from e
    return data if isinstance(data, dict) else None


def _jsonl(p: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{i}: not a JSON line ({e})") from e
    return rows


def _params(variant: str, size: str, cfg_model: dict, num_classes: int | None) -> int | None:
    """Parameter count of the run's model, built on the meta device (no memory, no weights needed)."""
    from msf_scale.models import create_model

    try:
        m = create_model(variant, size=size, num_classes=num_classes, num_frames=cfg_model.get("num_frames"),
                         img_size=cfg_model.get("img_size"), device="meta", **(cfg_model.get("arch") or {}))
    except (ValueError, TypeError):
        return None
    return sum(p.numel() for p in m.parameters())


def read_run(path: Path) -> Run:
    """One run directory; raises UserError for one that has no metrics.jsonl (nothing to report)."""
    import yaml

    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise UserError(f"{path}: no metrics.jsonl: not a training run directory (msf_scale/train.py writes one)")
    cfg = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    model_cfg = (cfg or {}).get("model") or {}
    export = _json(path / "model_config.json") or {}
    meta = _json(path / "run_meta.json") or {}
    final = _json(path / "final_metrics.json") or {}
    ev = _json(path / "eval.json") or {}
    variant = model_cfg.get("variant") or export.get("variant")
    size = model_cfg.get("size") or export.get("size")
    if not variant or not size:
        raise UserError(f"{path}: neither config.yaml nor model_config.json names the model variant and size")
    rows = _jsonl(path / "metrics.jsonl")
    train_rows = [r for r in rows if "clips_per_s" in r]
    last = train_rows[-1] if train_rows else {}
    top1 = final.get("test_top1", ev.get("test_top1"))
    macs = meta.get("forward_macs_per_clip")
    return Run(name=path.name, path=path, variant=variant, size=size,
               num_frames=model_cfg.get("num_frames"), img_size=model_cfg.get("img_size"),
               params=_params(variant, size, model_cfg, meta.get("num_classes")),
               gflops=None if macs is None else macs / 1e9, test_top1=top1,
               steps=final.get("step", last.get("step")), clips_per_s=final.get("clips_per_s", last.get("clips_per_s")),
               mfu=final.get("mfu", last.get("mfu")), world_size=meta.get("world_size"), wall_s=final.get("wall_s"),
               metrics=rows)


def find_runs(roots: list[str | Path]) -> list[Run]:
    """Every run directory given, or inside the given folders (one level down). UserError when none."""
    dirs: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise UserPathError(f"--runs {root}: no such directory")
        if any((root / m).is_file() for m in RUN_MARKERS):
            dirs.append(root)
            continue
        found = sorted(p for p in root.iterdir() if p.is_dir() and any((p / m).is_file() for m in RUN_MARKERS))
        if not found:
            raise UserError(f"--runs {root}: no run directories in it (a run dir holds metrics.jsonl, config.yaml...)")
        dirs += found
    return [read_run(d) for d in dirs]


def read_latency(path: str | Path | None) -> tuple[list[dict], dict]:
    """(rows, environment) of a latency.json; ([], {}) when path is None."""
    if path is None:
        return [], {}
    p = Path(path)
    p = p / "latency.json" if p.is_dir() else p
    if not p.is_file():
        raise UserPathError(f"--latency {path}: no such file (write it with msf-scale latency --out DIR)")
    data = _json(p)
    if not data or not isinstance(data.get("results"), list):
        raise UserError(f"--latency {p}: not a latency.json from msf-scale latency (no 'results' list)")
    return data["results"], data.get("environment") or {}


def latency_index(rows: list[dict], measure: str = "clip", modes: tuple[str, ...] = ("graph", "compile", "eager")
                  ) -> dict[tuple[str, str], dict]:
    """(variant, size) -> the row to quote, in the first of ``modes`` timed (batch-1 clip by default)."""
    from msf_scale.latency import preferred_latency

    return preferred_latency(rows, measure, modes)


def curve_rows(runs: list[Run], lat: dict[tuple[str, str], dict]) -> list[dict]:
    """The data behind the plot: one row per run, with why a point is missing."""
    out = []
    for r in sorted(runs, key=lambda r: (r.variant, SIZE_ORDER.get(r.size, 9), r.name)):
        row = lat.get((r.variant, r.size))
        mode = next(iter(lat.values()))["mode"] if lat else None
        missing = [w for w, bad in (("no test evaluation", r.test_top1 is None),
                                    ("not timed" + (f" ({mode})" if mode else ""), row is None)) if bad]
        out.append({"run": r.name, "variant": r.variant, "size": r.size,
                    "test_top1_pct": None if r.test_top1 is None else 100 * r.test_top1,
                    "latency_ms": None if row is None else row["median_ms"],
                    "latency_p90_ms": None if row is None else row.get("p90_ms"),
                    "latency_mode": None if row is None else row["mode"],
                    "latency_input": None if row is None else row.get("input"),
                    "run_input": f"3 x {r.num_frames} x {r.img_size} x {r.img_size}" if r.num_frames else None,
                    "params_m": None if r.params is None else r.params / 1e6,
                    "gflops": r.gflops, "status": "; ".join(missing) or "ok"})
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    return path


def plot_lines(ax, rows: list[dict], x: str, y: str = "test_top1_pct") -> list[str]:
    """One line per variant through its sizes (mean over runs of a size), every run as a dot; returns the runs
    that could not be placed (missing x or y), for the caller to name on the figure."""
    variants = sorted({r["variant"] for r in rows})
    missing = []
    for i, v in enumerate(variants):
        pts = [r for r in rows if r["variant"] == v and r[x] is not None and r[y] is not None]
        missing += [f"{r['run']} ({r['status'] if r['status'] != 'ok' else 'no ' + x})"
                    for r in rows if r["variant"] == v and (r[x] is None or r[y] is None)]
        if not pts:
            continue
        color = f"C{i % 10}"
        ax.scatter([r[x] for r in pts], [r[y] for r in pts], color=color, s=18, alpha=0.5, zorder=3)
        by_size: dict[str, list[dict]] = {}
        for r in pts:
            by_size.setdefault(r["size"], []).append(r)
        sizes = sorted(by_size, key=lambda s: SIZE_ORDER.get(s, 9))
        xs = [sum(r[x] for r in by_size[s]) / len(by_size[s]) for s in sizes]
        ys = [sum(r[y] for r in by_size[s]) / len(by_size[s]) for s in sizes]
        ax.plot(xs, ys, "-o", color=color, label=v, zorder=4)
        for s, xv, yv in zip(sizes, xs, ys):
            ax.annotate(s, (xv, yv), textcoords="offset points", xytext=(5, -10), fontsize=8, color=color)
    return missing


def note_missing(fig, missing: list[str]) -> None:
    if missing:
        fig.text(0.01, 0.01, "not shown: " + ", ".join(missing), fontsize=7, color="0.3", wrap=True)


def latency_axis_label(rows: list[dict], env: dict) -> str:
    modes = sorted({r["latency_mode"] for r in rows if r["latency_mode"]})
    where = env.get("gpu") or env.get("cpu") or "unknown device"
    return f"batch-1 latency per clip (ms; median, {'/'.join(modes) or 'no'} mode, {where})"


def make_curve(runs: list[Run], latency_rows: list[dict], env: dict, out: Path,
               modes: tuple[str, ...] = ("graph", "compile", "eager")) -> dict[str, Path]:
    """curve.png, curve.svg and curve.csv in ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = curve_rows(runs, latency_index(latency_rows, "clip", modes))
    paths = {"csv": write_csv(rows, out / "curve.csv")}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    missing = plot_lines(ax, rows, "latency_ms")
    ax.set_xlabel(latency_axis_label(rows, env))
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Accuracy vs inference time")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(title="variant")
    note_missing(fig, missing)
    fig.tight_layout(rect=(0, 0.05 if missing else 0, 1, 1))
    for ext in ("png", "svg"):
        paths[ext] = out / f"curve.{ext}"
        fig.savefig(paths[ext], dpi=150)
    plt.close(fig)
    return paths


# --- the command -------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="run directories, or folders of them")
    p.add_argument("--latency", required=True, help="latency.json (or its directory) from msf-scale latency")
    p.add_argument("--out", required=True, help="output directory: curve.png, curve.svg, curve.csv")
    p.add_argument("--modes", default="graph,compile,eager",
                   help="latency mode to quote, in order of preference (the first one timed)")


def run_command(args) -> int:
    runs = find_runs(args.runs)
    rows, env = read_latency(args.latency)
    paths = make_curve(runs, rows, env, Path(args.out), tuple(args.modes.split(",")))
    data = list(csv.DictReader(paths["csv"].open()))
    for r in data:
        if r["status"] != "ok":
            print(f"missing: {r['run']} ({r['variant']} {r['size']}): {r['status']}")
    print(f"{len(data)} runs -> {paths['png']}, {paths['svg']}, {paths['csv']}")
    return 0
