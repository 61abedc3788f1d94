"""The scaling report: `msf-scale report --runs DIR --out DIR [--latency latency.json]`.

One self-contained HTML page (plots embedded as base64 PNG) and the same summary table as Markdown:
accuracy vs parameters, vs GFLOPs and vs latency (one line per variant through its sizes); training clips/s and
MFU vs size; loss and test-accuracy curves per run (from metrics.jsonl). A run without an evaluation, or a model
the latency file has not timed, shows as missing in the table and is named under each plot it cannot join.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from msf_scale.curve import (SIZE_ORDER, Run, curve_rows, find_runs, latency_axis_label, latency_index,
                             note_missing, plot_lines, read_latency)

MISSING = "missing"


def _fmt(v, spec: str, missing: str = MISSING) -> str:
    return missing if v is None else format(v, spec)


def summary_rows(runs: list[Run], lat: dict) -> list[dict]:
    """One row per run, every column formatted; what is absent reads as missing / not timed."""
    out = []
    for r, c in zip(sorted(runs, key=lambda r: (r.variant, SIZE_ORDER.get(r.size, 9), r.name)),
                    curve_rows(runs, lat)):
        out.append({"run": r.name, "variant": r.variant, "size": r.size,
                    "params (M)": _fmt(c["params_m"], ".2f"), "GFLOPs/clip": _fmt(r.gflops, ".2f"),
                    "test top-1 (%)": _fmt(c["test_top1_pct"], ".1f", "missing (no evaluation)"),
                    "latency (ms)": (_fmt(c["latency_ms"], ".2f", "not timed")
                                     + (f" ({c['latency_mode']})" if c["latency_mode"] else "")),
                    "train clips/s": _fmt(r.clips_per_s, ".1f"),
                    "MFU (%)": _fmt(None if r.mfu is None else 100 * r.mfu, ".1f", "n/a"),
                    "steps": _fmt(r.steps, "d"), "wall (s)": _fmt(r.wall_s, ".0f")})
    return out


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return base64.b64encode(buf.getvalue()).decode()


def figures(runs: list[Run], latency_rows: list[dict], env: dict) -> dict[str, str]:
    """title -> base64 PNG of every plot of the report."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve_rows(runs, latency_index(latency_rows))
    figs: dict[str, str] = {}
    for title, x, xlabel in (("Accuracy vs parameters", "params_m", "parameters (M)"),
                             ("Accuracy vs GFLOPs", "gflops", "forward GFLOPs per clip (1 multiply-add = 1 FLOP)"),
                             ("Accuracy vs latency", "latency_ms", latency_axis_label(rows, env))):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        missing = plot_lines(ax, rows, x)
        ax.set(xlabel=xlabel, ylabel="test top-1 accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="variant", fontsize=8)
        note_missing(fig, missing)
        fig.tight_layout(rect=(0, 0.06 if missing else 0, 1, 1))
        figs[title] = _png(fig)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    absent = []
    for ax, key, label, scale in ((axes[0], "clips_per_s", "training clips/s (all devices)", 1),
                                  (axes[1], "mfu", "MFU (%)", 100)):
        for i, v in enumerate(sorted({r.variant for r in runs})):
            pts = sorted((r for r in runs if r.variant == v and getattr(r, key) is not None),
                         key=lambda r: SIZE_ORDER.get(r.size, 9))
            absent += [f"{r.name} ({key})" for r in runs if r.variant == v and getattr(r, key) is None]
            if pts:
                ax.plot([SIZE_ORDER.get(r.size, 3) for r in pts], [scale * getattr(r, key) for r in pts], "-o",
                        color=f"C{i % 10}", label=v)
        ax.set_xticks(list(SIZE_ORDER.values()), list(SIZE_ORDER))
        ax.set(xlabel="model size", ylabel=label, title=label.split(" (")[0] + " vs size")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    note_missing(fig, absent)
    fig.tight_layout(rect=(0, 0.06 if absent else 0, 1, 1))
    figs["Training throughput and MFU vs size"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    no_eval = []
    for j, r in enumerate(sorted(runs, key=lambda r: (r.variant, SIZE_ORDER.get(r.size, 9), r.name))):
        style = dict(color=f"C{j % 10}", lw=1.2, label=r.name)
        loss = [(m["step"], m["loss"]) for m in r.metrics if m.get("loss") is not None]
        test = [(m["step"], 100 * m["test_top1"]) for m in r.metrics if m.get("test_top1") is not None]
        if loss:
            axes[0].plot(*zip(*loss), **style)
        if test:
            axes[1].plot(*zip(*test), "-o", ms=3, **style)
        else:
            no_eval.append(r.name)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="Training loss per run")
    axes[1].set(xlabel="optimizer step", ylabel="test top-1 accuracy (%)", title="Test accuracy per run")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    note_missing(fig, [f"{n} (no evaluation)" for n in no_eval])
    fig.tight_layout(rect=(0, 0.06 if no_eval else 0, 1, 1))
    figs["Loss and test accuracy per run"] = _png(fig)
    plt.close(fig)
    return figs


def render_html(rows: list[dict], figs: dict[str, str], env: dict, sources: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td class='{'miss' if str(v).startswith(('missing', 'not timed')) else ''}'>"
                                    f"{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    env_line = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and k in
                         ("gpu", "driver", "torch", "cuda", "mamba_ssm", "date_utc")) or "no latency file given"
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>"
                   for t, b in figs.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>msf_scale scaling report</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}}table{{border-collapse:collapse;
font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child,th{{text-align:left}}
td.miss{{color:#b00}}img{{max-width:100%}}</style></head><body>
<h1>msf_scale scaling report</h1><p>Runs: {html.escape(sources)}. Latency: {html.escape(env_line)}.
FLOPs: forward multiply-adds per clip (1 multiply-add = 1 FLOP, fvcore's convention). Latency: batch-1, one clip,
median (CUDA-graph replay where timed: eager batch-1 is launch-bound).</p>
<h2>Summary</h2><table><tr>{head}</tr>{body}</table>{imgs}</body></html>
"""


def make_report(runs: list[Run], latency_rows: list[dict], env: dict, out: Path, sources: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs, latency_index(latency_rows))
    paths = {"html": out / "report.html", "md": out / "summary.md"}
    paths["html"].write_text(render_html(rows, figures(runs, latency_rows, env), env, sources))
    paths["md"].write_text("# Summary\n\n" + markdown_table(rows) + "\n")
    return paths


# --- the command -------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--runs", nargs="+", required=True, help="run directories, or folders of them")
    p.add_argument("--out", required=True, help="output directory: report.html, summary.md")
    p.add_argument("--latency", default=None, help="latency.json from msf-scale latency (else: latency not timed)")


def run_command(args) -> int:
    runs = find_runs(args.runs)
    rows, env = read_latency(args.latency)
    paths = make_report(runs, rows, env, Path(args.out), " ".join(args.runs))
    print(f"{len(runs)} runs -> {paths['html']}, {paths['md']}")
    return 0
