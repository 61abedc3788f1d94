"""The scaling report: `msf-scale report --runs DIR --out DIR [--latency latency.json] [--tune SEARCH_DIR]`.

One self-contained HTML page (plots embedded as base64 PNG) and the same summary table as Markdown:
accuracy vs parameters, vs GFLOPs and vs latency (one line per variant through its sizes); training clips/s and
MFU vs size; loss and test-accuracy curves per run (from metrics.jsonl; val accuracy dashed where a run has a val
split). A run without an evaluation, or a model the latency file has not timed, shows as missing in the table and is
named under each plot it cannot join.

`--tune DIR` (repeatable; a search directory of `msf-scale tune`, or a folder of them) adds each search's section:
its summary (trials by status, the val split it selected on, the best trial and its val top-1), the val top-1
curves of every trial (search_curves.png, embedded) and the table of all trials (trials.md), with links to
trials.csv and best_config.yaml. Either --runs or --tune may be given alone.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from msf_scale.config import UserError, UserPathError
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
        val = [(m["step"], 100 * m["val_top1"]) for m in r.metrics if m.get("val_top1") is not None]
        if loss:
            axes[0].plot(*zip(*loss), **style)
        if test:
            axes[1].plot(*zip(*test), "-o", ms=3, **style)
        if val:   # a run with a val split: val every evaluation (dashed), test once at the end
            axes[1].plot(*zip(*val), "--", marker="s", ms=3, **{**style, "label": f"{r.name} (val)"})
        if not test and not val:
            no_eval.append(r.name)
    axes[0].set(xlabel="optimizer step", ylabel="training loss", title="Training loss per run")
    axes[1].set(xlabel="optimizer step", ylabel="top-1 accuracy (%): test solid, val dashed",
                title="Test (and val) accuracy per run")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    note_missing(fig, [f"{n} (no evaluation)" for n in no_eval])
    fig.tight_layout(rect=(0, 0.06 if no_eval else 0, 1, 1))
    figs["Loss and test accuracy per run"] = _png(fig)
    plt.close(fig)
    return figs


# --- tune searches ------------------------------------------------------------------------------------------------
SEARCH_SUMMARY, SEARCH_TRIALS_MD, SEARCH_CURVES = "search_summary.json", "trials.md", "search_curves.png"


@dataclass
class Search:
    """One `msf-scale tune` experiment directory, as the report shows it."""
    path: Path
    summary: dict
    trials_md: str
    curves_png: bytes | None
    unfinished: bool = False     # found in a storage folder with search.json but no summary yet

    @property
    def name(self) -> str:
        return self.path.name + (" (unfinished)" if self.unfinished else "")

    def facts(self) -> list[str]:
        if self.unfinished:
            return [f"unfinished: no {SEARCH_SUMMARY} yet (the search is running, or was interrupted: msf-scale tune "
                    "... --resume finishes it)"]
        s, best = self.summary, self.summary.get("best")
        by = ", ".join(f"{n} {k}" for k, n in (s.get("by_status") or {}).items())
        out = [f"{s.get('trials', '?')} trials" + (f" ({by})" if by else ""),
               f"selected on {s.get('metric', 'val_top1')} ({(s.get('data') or {}).get('val', 'a val split')}); "
               "no trial sees the test split"]
        if best:
            top1 = best.get("val_top1")
            out.append(f"best trial {best.get('trial')}: val top-1 "
                       + ("?" if top1 is None else f"{100 * float(top1):.1f}%") + f" after {best.get('epochs')} epochs")
        else:
            out.append("no best trial (no trial reported val top-1)")
        return out


def _search_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise UserPathError(f"--tune {root}: no such directory")
    if (root / SEARCH_SUMMARY).is_file() or (root / "search.json").is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and ((p / SEARCH_SUMMARY).is_file()
                                                                or (p / "search.json").is_file()))
    if not found:
        raise UserError(f"--tune {root}: not a search directory of msf-scale tune (no {SEARCH_SUMMARY} in it or in "
                        "its subdirectories)")
    return found


def read_searches(roots: list[str | Path]) -> list[Search]:
    """Every search given, or inside the given folders (one level down). UserError for a directory that is none, or
    for an unfinished search given itself; an unfinished one inside a storage folder gets a section saying so."""
    out = []
    for root, d in ((Path(root), d) for root in roots for d in _search_dirs(Path(root))):
        if not (d / SEARCH_SUMMARY).is_file() and d != root:
            out.append(Search(d, {}, "", None, unfinished=True))
            continue
        if not (d / SEARCH_SUMMARY).is_file():
            raise UserError(f"--tune {d}: the search has not written its outputs ({SEARCH_SUMMARY}): it is running "
                            "or was interrupted (msf-scale tune ... --resume finishes it)")
        try:
            summary = json.loads((d / SEARCH_SUMMARY).read_text())
        except ValueError as e:
            raise UserError(f"--tune {d / SEARCH_SUMMARY}: not JSON ({e})") from None
        if not isinstance(summary, dict) or "trials" not in summary:
            raise UserError(f"--tune {d / SEARCH_SUMMARY}: not a search summary of msf-scale tune (no 'trials')")
        md = (d / SEARCH_TRIALS_MD).read_text() if (d / SEARCH_TRIALS_MD).is_file() else ""
        png = (d / SEARCH_CURVES).read_bytes() if (d / SEARCH_CURVES).is_file() else None
        out.append(Search(d, summary, md, png))
    return out


def _md_rows(md: str) -> list[list[str]]:
    """The cells of a Markdown pipe table (the separator row dropped; an escaped pipe is a pipe in its cell)."""
    rows = []
    for line in md.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
            continue
        rows.append(cells)
    return rows


def search_html(search: Search, out: Path) -> str:
    rel = Path(os.path.relpath(search.path.resolve(), out.resolve()))
    links = " ".join(f"<a href='{html.escape(str(rel / f))}'>{f}</a>" for f in
                     ("trials.csv", "trials.md", "best_config.yaml", SEARCH_CURVES) if (search.path / f).is_file())
    facts = "".join(f"<li>{html.escape(f)}</li>" for f in search.facts())
    rows = _md_rows(search.trials_md)
    table = ""
    if rows:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        table = f"<h3>Trials</h3><table><tr>{head}</tr>{body}</table>"
    img = "" if search.unfinished else (f"<img alt='search curves {html.escape(search.name)}' "
           f"src='data:image/png;base64,{base64.b64encode(search.curves_png).decode()}'>"
           if search.curves_png else f"<p class='miss'>no {SEARCH_CURVES} in the search directory</p>")
    return (f"<h2>Hyper-parameter search: {html.escape(search.name)}</h2><p>{html.escape(str(search.path))} "
            f"({links})</p><ul>{facts}</ul>{img}{table}")


def search_markdown(search: Search, out: Path) -> str:
    rel = os.path.relpath(search.path.resolve(), out.resolve())
    lines = [f"## Hyper-parameter search: {search.name}", "", f"`{search.path}`", ""]
    lines += [f"- {f}" for f in search.facts()] + [""]
    if search.curves_png:
        lines += [f"![search curves]({rel}/{SEARCH_CURVES})", ""]
    if search.trials_md.strip():
        lines += [search.trials_md.strip(), ""]
    return "\n".join(lines)


def render_html(rows: list[dict], figs: dict[str, str], env: dict, sources: str, extra: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td class='{'miss' if str(v).startswith(('missing', 'not timed')) else ''}'>"
                                    f"{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    env_line = ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and k in
                         ("gpu", "driver", "torch", "cuda", "mamba_ssm", "date_utc")) or "no latency file given"
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>"
                   for t, b in figs.items())
    summary = f"<h2>Summary</h2><table><tr>{head}</tr>{body}</table>" if rows else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>msf_scale scaling report</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;color:#222}}table{{border-collapse:collapse;
font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child,th{{text-align:left}}
td.miss,p.miss{{color:#b00}}img{{max-width:100%}}</style></head><body>
<h1>msf_scale scaling report</h1><p>Runs: {html.escape(sources)}. Latency: {html.escape(env_line)}.
FLOPs: forward multiply-adds per clip (1 multiply-add = 1 FLOP, fvcore's convention). Latency: batch-1, one clip,
median (CUDA-graph replay where timed: eager batch-1 is launch-bound).</p>
{summary}{imgs}{extra}</body></html>
"""


def make_report(runs: list[Run], latency_rows: list[dict], env: dict, out: Path, sources: str,
                searches: list[Search] = ()) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(runs, latency_index(latency_rows)) if runs else []
    paths = {"html": out / "report.html", "md": out / "summary.md"}
    figs = figures(runs, latency_rows, env) if runs else {}
    paths["html"].write_text(render_html(rows, figs, env, sources or "none",
                                         "".join(search_html(s, out) for s in searches)))
    md = ("# Summary\n\n" + markdown_table(rows) + "\n") if rows else ""
    md += "".join("\n" + search_markdown(s, out) for s in searches)
    paths["md"].write_text(md)
    return paths


# --- the command -------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--runs", nargs="+", default=None, help="run directories, or folders of them")
    p.add_argument("--out", required=True, help="output directory: report.html, summary.md")
    p.add_argument("--latency", default=None, help="latency.json from msf-scale latency (else: latency not timed)")
    p.add_argument("--tune", action="append", default=[], metavar="DIR",
                   help="a search directory of msf-scale tune, or a folder of them: its curves, trials and best "
                        "config in the report (repeatable)")


def run_command(args) -> int:
    if not args.runs and not args.tune:
        raise UserError("nothing to report: give --runs DIR (run directories) and/or --tune DIR (a search)")
    searches = read_searches(args.tune)
    runs = find_runs(args.runs) if args.runs else []
    rows, env = read_latency(args.latency)
    paths = make_report(runs, rows, env, Path(args.out), " ".join(args.runs or []), searches)
    print(f"{len(runs)} runs, {len(searches)} searches -> {paths['html']}, {paths['md']}")
    return 0
