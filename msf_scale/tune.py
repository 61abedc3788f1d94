"""Ray Tune searches over the training loop, selecting on a validation split: `msf-scale tune`.

    msf-scale tune --size tiny --num-samples 16                        # ASHA on a local Ray runtime (ray.init)
    msf-scale tune --size base --variant msf_mamba_plus --num-samples 64 --gpus-per-trial 1 --address auto
    msf-scale tune --size tiny --num-samples 16 --resume               # an interrupted search: finished trials stay
    msf-scale tune --size tiny --num-samples 4 --set schedule.epochs=4 --set data.root=data/mine --val-fraction 0.2

Every trial runs the project's training function (train.py's, no second loop) on a config made of the presets
(--size/--variant/--config), the `--set key=value` overrides and one sample of the search space
(configs/<size>/tune/space.yaml, or --space FILE), evaluates on the val split after every epoch and reports
`val_top1` (and the training loss) to Tune, with a Tune checkpoint of its training state, so that ASHA can stop weak
trials and a resumed search (`--resume`, Tuner.restore) continues unfinished trials from their last epoch while finished
ones are kept as they are. A trial that raises is retried (--max-failures) and, if it still fails, reported as
failed with its error; the search goes on.

Selecting on test is a leak, so a trial never sees the test split: it trains on a *tuning view* of the dataset
(`<storage>/<name>/data_view/`: symlinks to the shards) holding the train split and the val split, where the
split the loop evaluates as "test" is the val split too. The val split is the dataset's own (data pack's split
column, data synth --val-subjects N) or, with --val-fraction F (or a `data.val_fraction` config field), a seeded
subject-independent carve-out of the training subjects (data/splits.py). With neither, the search is refused.

At the end, in `<storage>/<name>/` next to Ray's own files: best_config.yaml (a config train.py accepts as
--config: the presets and --set values with the best trial's hyper-parameters, on the original dataset, with the
search's val split: a carve's data.val_fraction and data.val_seed, so that train.py carves the same subjects),
trials.csv and trials.md (every trial: status, hyper-parameters, val top-1, epochs, restarts, error),
search_curves.png (val top-1 vs epoch per trial) and search_summary.json; trials.md and the plot give val top-1
in percent, trials.csv and the summary as a fraction (as metrics.jsonl). `msf-scale report --tune DIR` shows them. Ray (`pip install 'msf_scale[tune]'`) is
imported only when a search runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msf_scale.config import (CONFIG_DIR, SIZES, VARIANTS, ConfigError, RunConfig, UserError, UserPathError,
                              load_config, save_config, valid_keys)

METRIC, MODE = "val_top1", "max"
SEARCH_JSON, SUMMARY_JSON = "search.json", "search_summary.json"
BEST_YAML, TRIALS_CSV, TRIALS_MD, CURVES_PNG = "best_config.yaml", "trials.csv", "trials.md", "search_curves.png"
STARTS = "starts.jsonl"                 # in each trial's directory: one line per start (restarts = lines - 1)
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "quniform", "grid")
# what every trial sets on top of the user's config: an evaluation (and report) after every epoch, no progress bar,
# no test evaluation at the end (the view's "test" is the val split again: a trial has nothing else to measure)
TRIAL_FIXED = ["--train.eval_every", "1", "--log.progress", "false", "--train.final_test", "false"]


# ----------------------------------------------------------------------------------------------- search space
@dataclass
class SearchSpace:
    """A search space file (configs/<size>/tune/space.yaml): `space` (key -> {distribution: args}), per-variant
    additions, ASHA settings, fixed overrides. Not in configs/<size>/ itself: every YAML there is a run preset."""

    params: dict[str, dict[str, Any]]
    asha: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def space_file(size: str) -> Path:
    return CONFIG_DIR / size / "tune" / "space.yaml"


def load_space(size: str, variant: str, path: str | os.PathLike | None = None) -> SearchSpace:
    """The search space of `size` (configs/<size>/tune/space.yaml) or of a given file, for `variant`."""
    p = Path(path) if path else space_file(size)
    if not p.is_file():
        raise UserPathError(f"search space {p} does not exist" + ("" if path else f" (none for size {size})"))
    doc = yaml.safe_load(p.read_text()) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("space", {}), dict):
        raise ConfigError(f"{p}: a search space is a mapping with a `space:` mapping of key -> distribution")
    unknown = set(doc) - {"space", "variants", "asha", "fixed"}
    if unknown:
        raise ConfigError(f"{p}: unknown sections {sorted(unknown)} (space, variants, asha, fixed)")
    params = dict(doc.get("space") or {})
    params.update(((doc.get("variants") or {}).get(variant) or {}))
    keys = set(valid_keys())
    for key, spec in params.items():
        if ".".join(key.split(".")[:2]) not in keys:
            raise ConfigError(f"{p}: {key!r} is not a config key (section.field or model.arch.name)")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(f"{p}: {key}: give one distribution of {DISTRIBUTIONS}, e.g. "
                              "{loguniform: [1e-4, 1e-2]}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{p}: {key}: {kind} takes a list, got {args!r}")
        if kind in ("loguniform", "uniform", "randint") and (len(args) != 2 or not args[0] < args[1]):
            raise ConfigError(f"{p}: {key}: {kind} takes [low, high] with low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{p}: {key}: loguniform needs low > 0, got {args}")
        if kind == "quniform" and (len(args) != 3 or not args[0] < args[1]):
            raise ConfigError(f"{p}: {key}: quniform takes [low, high, q], got {args}")
    return SearchSpace(params, dict(doc.get("asha") or {}), dict(doc.get("fixed") or {}), str(p))


def _domain(spec: dict[str, Any]):
    from ray import tune

    kind, a = next(iter(spec.items()))
    return {"loguniform": lambda: tune.loguniform(float(a[0]), float(a[1])),
            "uniform": lambda: tune.uniform(float(a[0]), float(a[1])),
            "quniform": lambda: tune.quniform(float(a[0]), float(a[1]), float(a[2])),
            "randint": lambda: tune.randint(int(a[0]), int(a[1])),
            "choice": lambda: tune.choice(a), "grid": lambda: tune.grid_search(a)}[kind]()


def _probe_values(spec: dict[str, Any]) -> list[Any]:
    """The values a pre-flight check tries: every choice, or a range's ends."""
    kind, a = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(a)
    if kind == "randint":
        return [int(a[0]), int(a[1]) - 1]
    return [float(a[0]), float(a[1])]


def fmt_value(v: Any) -> str:
    """A sampled value as the command line's config parser reads it back (YAML for lists, true/false, null)."""
    if isinstance(v, (list, tuple, dict, bool)) or v is None:
        return yaml.safe_dump(list(v) if isinstance(v, tuple) else v, default_flow_style=True).strip().removesuffix(
            "...").strip()
    return str(v)


def params_argv(params: dict[str, Any]) -> list[str]:
    return [f"--{k}={fmt_value(v)}" for k, v in sorted(params.items())]


def parse_sets(sets: list[str]) -> list[str]:
    """`--set key=value` -> config overrides `--key=value` (checked by the config loader)."""
    out = []
    for s in sets or []:
        key, eq, value = s.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {s!r}: expected key=value, e.g. --set optim.lr=1e-3")
        out.append(f"--{key.removeprefix('--')}={value}")
    return out


def preflight(base_argv: list[str], space: SearchSpace) -> RunConfig:
    """Refuse a space a trial could not start with: every choice / range end must give a valid config (and, for
    model keys, a model that builds), so a typo fails here in a second, not in N trials."""
    cfg = load_config(base_argv)
    for key, spec in space.params.items():
        for v in _probe_values(spec):
            try:
                c = load_config(base_argv + [f"--{key}={fmt_value(v)}"])
                if key.startswith("model."):
                    from msf_scale.models import create_model
                    m = c.model
                    create_model(m.variant, size=m.size, num_classes=4, num_frames=m.num_frames, img_size=m.img_size,
                                 drop_path_rate=m.drop_path_rate, device="meta", **m.arch)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"search space {space.path}: {key}={fmt_value(v)} does not give a valid run "
                                  f"with this config: {e}") from None
    return cfg


# ----------------------------------------------------------------------------------------------- data
def resolve_data(cfg: RunConfig) -> str:
    """The dataset directory of a config: its root, or the synthetic default (generated once into the cache)."""
    from msf_scale.data import ensure_synthetic, read_dataset_info

    if cfg.data.root is None:
        return str(ensure_synthetic(**cfg.data.synth))
    try:
        read_dataset_info(cfg.data.root)
    except FileNotFoundError as e:
        raise UserPathError(str(e)) from None
    return str(cfg.data.root)


NO_VAL = ("{root} has no val split and no val fraction was given: a search that selects on the test split "
          "overfits it, so it is refused. Give the dataset a val split (msf-scale data synth --val-subjects N; a "
          "`split` column with val rows for msf-scale data pack) or carve one from the training subjects with "
          "--val-fraction F (seeded, subject-independent).")


def val_source(root: str, val_fraction: float | None, seed: int, work: Path,
               allow_overlap: bool = False) -> tuple[str, dict[str, Any]]:
    """A dataset holding a val split: `root` itself, or a subject-independent carve-out into work/carved (seeded by
    `seed`, data.val_seed: the subjects train.py's --data.val_fraction carves with the same seed)."""
    from msf_scale.data.splits import has_split, materialize_val_split, read_subjects

    if has_split(root, "val"):
        from msf_scale.data.builders import overlap_error
        from msf_scale.data.splits import overlapping_subjects

        shared = {k: v for k, v in overlapping_subjects(root, "val").items() if v}
        if shared and not allow_overlap:   # refused before Ray starts, as train.py would refuse in every trial
            raise ConfigError(overlap_error(root, shared))
        return root, {"val": "the dataset's own val split", "root": root}
    if not val_fraction:
        raise ConfigError(NO_VAL.format(root=root))
    carved = work / "carved"
    if not (carved / "dataset.json").is_file():
        shutil.rmtree(carved, ignore_errors=True)
        materialize_val_split(root, carved, fraction=val_fraction, seed=seed)
    val_subjects = sorted(set(read_subjects(carved, "val").values()))
    return str(carved), {"val": f"carved from train: {len(val_subjects)} subjects (data.val_fraction "
                                f"{val_fraction:g}, data.val_seed {seed})", "root": root, "carved": str(carved),
                         "val_subjects": val_subjects, "val_fraction": val_fraction, "val_seed": seed}


def tuning_view(src: str, out: Path) -> Path:
    """A dataset directory of symlinks: train and val shards of `src`, and the val shards again as the split the
    training loop evaluates (test), so that its evaluations are on val. The real test split is not in it."""
    from msf_scale.data.schema import DatasetInfo, SplitInfo, read_dataset_info, write_dataset_info

    info = read_dataset_info(src)
    if (out / "dataset.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits = {}
    for name, as_name in (("train", "train"), ("val", "val"), ("val", "test")):
        s = info.splits[name]
        names = []
        for i, shard in enumerate(s.shards):
            link = f"{as_name}-{i:06d}.tar"
            os.symlink(Path(src, shard).resolve(), tmp / link)
            names.append(link)
        splits[as_name] = SplitInfo(names, s.num_samples, list(s.shard_samples))
    view = DatasetInfo(**{**{k: getattr(info, k) for k in ("name", "num_classes", "class_names", "num_frames",
                                                           "height", "width", "flip_ok", "format", "fps")},
                          "splits": splits,
                          "source": {**info.source, "tuning_view": {"from": str(Path(src).resolve()),
                                                                    "test_is": "val", "test_withheld": True}}})
    write_dataset_info(tmp, view)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------------------- the trial
def _read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a line being written (not yet parseable) is left for the next read."""
    rows = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def _eval_top1(row: dict[str, Any]) -> float | None:
    """The val top-1 of an evaluation row: `val_top1` where the loop reports one, else its `test_top1`, which in a
    tuning view is measured on the val split (the view holds no test data)."""
    v = row.get("val_top1", row.get("test_top1"))
    return None if v is None else float(v)


class TuneReporter:
    """The training loop's callback (train.py's `Callback` protocol): each evaluation becomes a `tune.report` of
    val_top1 and the training metrics, with a Tune checkpoint of the newest training checkpoint."""

    def __init__(self, run_dir: Path, done_epoch: int = 0):
        self.run_dir, self.done_epoch = run_dir, done_epoch
        self.last_ckpt: Path | None = None

    def on_checkpoint(self, path: Path) -> None:
        self.last_ckpt = Path(path)

    def _stage(self, epoch: int, step: int) -> Path | None:
        """The Tune checkpoint's files, staged outside every directory Ray syncs (report() copies them to
        <trial>/checkpoint_N): the newest training checkpoint (ckpt/step_N), the run's config and metrics so far."""
        if self.last_ckpt is None or not self.last_ckpt.is_dir():
            return None
        stage = Path(tempfile.mkdtemp(prefix="msf_scale_tune_ckpt_"))
        shutil.copytree(self.last_ckpt, stage / "run" / "ckpt" / self.last_ckpt.name)
        for name in ("config.yaml", "run_meta.json"):
            if (self.run_dir / name).is_file():
                shutil.copy2(self.run_dir / name, stage / "run" / name)
        rows = [r for r in _read_rows(self.run_dir / "metrics.jsonl") if r.get("step", 0) <= step]
        (stage / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (stage / "tune_state.json").write_text(json.dumps({"epoch": epoch, "step": step,
                                                           "ckpt": self.last_ckpt.name}))
        return stage

    def on_evaluate(self, metrics: dict[str, Any]) -> bool | None:
        from ray import tune

        top1, epoch, step = _eval_top1(metrics), int(metrics["epoch"]), int(metrics["step"])
        if top1 is None or epoch <= self.done_epoch:   # a restarted trial's epochs that Tune already has
            return None
        report = {METRIC: top1, "epoch": epoch, "step": step,
                  **{k: metrics.get(k, math.nan) for k in ("loss", "train_top1", "lr")},
                  "val_samples": metrics.get("val_samples", metrics.get("test_samples"))}
        if "val_loss" in metrics:
            report["val_loss"] = metrics["val_loss"]
        stage = self._stage(epoch, step)
        try:
            tune.report(report, checkpoint=None if stage is None else tune.Checkpoint.from_directory(str(stage)))
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        self.done_epoch = epoch
        return None   # stopping is the scheduler's: Tune ends a trial that ASHA cuts


def _trial_storage_dir() -> Path:
    """The trial's directory in the experiment's storage (a filesystem path every node reaches). The run directory
    lives there, not in Tune's trial working / staging directory, which Ray copies to the storage as artifacts
    (it would copy every training checkpoint, while the loop rotates them)."""
    import pyarrow.fs
    from ray import tune

    storage = tune.get_context().get_storage()
    if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
        raise UserError(f"--storage must be a filesystem path (shared by every node), not {storage.storage_filesystem}")
    path = Path(storage.trial_fs_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def trainable(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial: train.py's `train(cfg, callbacks)` on setup["argv"] + the sampled `params`, in this process (the
    trial's resources), with a TuneReporter as its callback. A Tune checkpoint, when Tune restores one (a retry, a
    resumed search), is the training state to continue from (--resume auto on a copy of it)."""
    from ray import tune

    import torch

    trial_dir = _trial_storage_dir()
    run_dir = trial_dir / "run"
    torch.set_num_threads(max(1, int(setup.get("cpus", 1))))
    done_epoch, resume = 0, []
    ckpt = tune.get_checkpoint()
    shutil.rmtree(run_dir, ignore_errors=True)   # a restart resumes from Tune's checkpoint, never a half epoch
    if ckpt is not None:
        with ckpt.as_directory() as d:
            done_epoch = int(json.loads(Path(d, "tune_state.json").read_text())["epoch"])
            shutil.copytree(Path(d, "run"), run_dir)
        resume = ["--resume", "auto"]
    with open(trial_dir / STARTS, "a") as f:
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "from_epoch": done_epoch}) + "\n")
    argv = [*setup["argv"], *params_argv(params), *TRIAL_FIXED, "--output-dir", str(run_dir), *resume]
    from msf_scale.train import train

    train(load_config(argv), callbacks=[TuneReporter(run_dir, done_epoch)])


# ----------------------------------------------------------------------------------------------- the search
@dataclass
class SearchOptions:
    size: str
    variant: str | None = None
    config: str | None = None
    sets: list[str] = field(default_factory=list)
    num_samples: int = 8
    scheduler: str = "asha"
    gpus_per_trial: float | None = None
    cpus_per_trial: float = 1
    storage: str = "runs/tune"
    name: str | None = None
    resume: bool = False
    address: str | None = None
    max_failures: int = 2
    max_concurrent: int | None = None
    space: str | None = None
    val_fraction: float | None = None
    seed: int = 0
    verbose: int = 1

    def base_argv(self) -> list[str]:
        argv = ["--size", self.size] + (["--variant", self.variant] if self.variant else [])
        argv += ["--config", self.config] if self.config else []
        return argv + parse_sets(self.sets)

    def exp_name(self, cfg: RunConfig) -> str:
        return self.name or f"tune_{cfg.model.variant}_{cfg.model.size}"


def _scheduler(opts: SearchOptions, space: SearchSpace, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if opts.scheduler == "fifo":
        return FIFOScheduler()
    a = {"grace_period": 1, "reduction_factor": 2, **space.asha}
    # max_t one past the schedule: ASHA cuts only at its rungs and a surviving trial ends by itself (after its final
    # evaluation and export), rather than being stopped by the scheduler at its last report
    return ASHAScheduler(time_attr="epoch", max_t=int(a.get("max_t", epochs + 1)),
                         grace_period=int(a["grace_period"]), reduction_factor=float(a["reduction_factor"]))


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _setup_search(opts: SearchOptions) -> dict[str, Any]:
    """Check everything a search needs before Ray starts: config, space, val split, the tuning view."""
    if opts.size not in SIZES:
        raise ConfigError(f"unknown size {opts.size!r}; choose one of {SIZES}")
    if opts.variant is not None and opts.variant not in VARIANTS:
        raise ConfigError(f"unknown variant {opts.variant!r}; choose one of {VARIANTS}")
    if opts.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"--scheduler {opts.scheduler!r}: asha or fifo")
    if opts.num_samples < 1 or opts.max_failures < 0 or opts.cpus_per_trial <= 0:
        raise ConfigError("need --num-samples >= 1, --max-failures >= 0 and --cpus-per-trial > 0")
    if opts.gpus_per_trial is not None and opts.gpus_per_trial > 1:
        raise ConfigError("--gpus-per-trial > 1: a trial runs the training function in one process (one device); "
                          "use 1 (or a fraction) and more concurrent trials")
    base = opts.base_argv()
    cfg = load_config(base)
    space = load_space(cfg.model.size, cfg.model.variant, opts.space)
    fixed = parse_sets([f"{k}={fmt_value(v)}" for k, v in space.fixed.items()])
    user_set = {s.partition("=")[0].removeprefix("--") for s in parse_sets(opts.sets)}
    fixed = [f for f in fixed if f[2:].partition("=")[0] not in user_set]   # --set wins over the space's fixed
    base = base[:len(base) - len(opts.sets)] + fixed + parse_sets(opts.sets)
    cfg = preflight(base, space)
    exp = Path(opts.storage).resolve() / opts.exp_name(cfg)
    if exp.exists() and any(exp.iterdir()):
        raise ConfigError(f"{exp} already holds a search: pass --resume to continue it, or another --name")
    exp.mkdir(parents=True, exist_ok=True)
    val_fraction = opts.val_fraction if opts.val_fraction is not None else cfg.data.val_fraction
    root = resolve_data(cfg)
    try:
        src, val_info = val_source(root, val_fraction, cfg.data.val_seed, exp, cfg.data.allow_val_overlap)
    except UserError:
        shutil.rmtree(exp, ignore_errors=True)
        raise
    view = tuning_view(src, exp / "data_view")
    trial_argv = [*base, "--data", str(view)]
    trial_argv += ["--data.val_fraction", "0"]   # the view already holds the val split: no second carve-out
    setup = {"argv": trial_argv, "base_argv": base, "space": space.params, "space_file": space.path,
             "asha": space.asha, "epochs": cfg.schedule.epochs, "data": val_info, "view": str(view),
             "options": {k: v for k, v in vars(opts).items()}, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (exp / SEARCH_JSON).write_text(json.dumps(setup, indent=1))
    return setup


def _ray_init(address: str | None, cpus: float | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, num_cpus=cpus)


def run_search(opts: SearchOptions) -> dict[str, Any]:
    """Run (or resume) a search; returns the summary written to search_summary.json."""
    from ray import tune

    if opts.resume:
        cfg = load_config(opts.base_argv())
        exp = Path(opts.storage).resolve() / opts.exp_name(cfg)
        if not (exp / SEARCH_JSON).is_file():
            raise UserPathError(f"--resume: {exp} holds no search (no {SEARCH_JSON}); run it without --resume first")
        setup = json.loads((exp / SEARCH_JSON).read_text())
        saved = SearchOptions(**setup["options"])
        opts = SearchOptions(**{**vars(saved), "resume": True, "address": opts.address,
                                "max_failures": opts.max_failures, "verbose": opts.verbose})
    else:
        setup = _setup_search(opts)
        exp = Path(setup["view"]).parent
    _ray_init(opts.address)
    import ray

    gpus = opts.gpus_per_trial
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    setup["cpus"] = opts.cpus_per_trial
    fn = tune.with_resources(tune.with_parameters(trainable, setup=setup), {"cpu": opts.cpus_per_trial, "gpu": gpus})
    if opts.resume and tune.Tuner.can_restore(str(exp)):
        tuner = tune.Tuner.restore(str(exp), trainable=fn, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            fn, param_space={k: _domain(v) for k, v in setup["space"].items()},
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=opts.num_samples,
                                        scheduler=_scheduler(opts, SearchSpace(setup["space"], setup["asha"]),
                                                             setup["epochs"]),
                                        search_alg=BasicVariantGenerator(random_state=opts.seed,
                                                                         max_concurrent=opts.max_concurrent or 0),
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name=exp.name, storage_path=str(exp.parent),
                                      failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                      verbose=opts.verbose))
    tuner.fit()
    return write_outputs(exp, setup)


# ----------------------------------------------------------------------------------------------- outputs
def _history(trial_dir: Path) -> list[dict[str, Any]]:
    """A trial's reports (result.json), one per epoch (a report repeated after a restart keeps its last value)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    p = trial_dir / "result.json"
    for r in _read_rows(p):
        if r.get(METRIC) is not None and r.get("epoch") is not None:
            by_epoch[int(r["epoch"])] = r
    return [by_epoch[e] for e in sorted(by_epoch)]


def collect_trials(exp: Path, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial of the experiment: id, status, hyper-parameters, val top-1, epochs, restarts, error."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(exp))
    rows = []
    for t in sorted(analysis.trials, key=lambda t: t.trial_id):
        trial_dir = Path(t.path)   # in the storage: result.json (synced there by Tune), starts.jsonl, run/
        hist = _history(trial_dir)
        starts = _read_rows(trial_dir / STARTS)
        err = ""
        if t.status == "ERROR":
            err_file = trial_dir / "error.txt"
            text = err_file.read_text() if err_file.is_file() else str(getattr(t, "error_msg", "") or "")
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            err = lines[-1].strip() if lines else "error"
        epochs = int(hist[-1]["epoch"]) if hist else 0
        status = {"ERROR": "failed", "TERMINATED": "completed" if epochs >= setup["epochs"] else "stopped early"}.get(
            t.status, f"unfinished ({t.status.lower()})")
        if status == "stopped early" and setup.get("options", {}).get("scheduler") == "fifo":
            status = "completed"
        rows.append({"trial": t.trial_id, "status": status,
                     **{k: t.config.get(k) for k in setup["space"]},
                     "val_top1": hist[-1][METRIC] if hist else None,
                     "best_val_top1": max(h[METRIC] for h in hist) if hist else None,
                     "epochs": epochs, "starts": len(starts), "error": err,
                     "history": [(int(h["epoch"]), float(h[METRIC])) for h in hist], "dir": str(trial_dir)})
    return rows


def best_trial(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest final val top-1 (else the highest of any trial that reported);
    ties go to the earlier trial id."""
    done = [r for r in rows if r["status"] == "completed" and r["val_top1"] is not None]
    pool = done or [r for r in rows if r["val_top1"] is not None]
    return max(pool, key=lambda r: (r["val_top1"], [-ord(c) for c in r["trial"]]), default=None)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return fmt_value(v) if isinstance(v, (list, tuple, bool)) else str(v)


PCT_COLS = {"val_top1": "val top-1 (%)", "best_val_top1": "best val top-1 (%)"}


def write_tables(exp: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """trials.csv (val top-1 as a fraction, as metrics.jsonl and search_summary.json hold it) and trials.md (val
    top-1 in percent, as search_curves.png plots it; the headers say so)."""
    cols = ["trial", "status", *keys, "val_top1", "best_val_top1", "epochs", "starts", "error"]
    with open(exp / TRIALS_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(r[c]) for c in cols])

    def md_cell(r: dict[str, Any], c: str) -> str:
        if c in PCT_COLS and r[c] is not None:
            return f"{100 * float(r[c]):.1f}"
        return _cell(r[c]).replace("|", "\\|")

    md = ["| " + " | ".join(PCT_COLS.get(c, c) for c in cols) + " |",
          "|" + "|".join("---:" if c in (*PCT_COLS, "epochs", "starts") else "---" for c in cols) + "|"]
    md += ["| " + " | ".join(md_cell(r, c) for c in cols) + " |" for r in rows]
    (exp / TRIALS_MD).write_text("\n".join(md) + "\n")


def write_outputs(exp: Path, setup: dict[str, Any]) -> dict[str, Any]:
    rows = collect_trials(exp, setup)
    keys = list(setup["space"])
    best = best_trial(rows)
    write_tables(exp, rows, keys)
    _plot(rows, exp / CURVES_PNG, best)
    summary = {"experiment": str(exp), "metric": METRIC, "mode": MODE, "data": setup["data"],
               "trials": len(rows), "by_status": {s: sum(r["status"] == s for r in rows) for s in
                                                  sorted({r["status"] for r in rows})},
               "best": None if best is None else {k: best[k] for k in ("trial", "val_top1", "epochs", *keys)},
               "files": {"best_config": BEST_YAML if best else None, "trials_csv": TRIALS_CSV,
                         "trials_md": TRIALS_MD, "curves": CURVES_PNG}}
    if best is not None:
        write_best_config(best_config_argv(setup), {k: best[k] for k in keys}, exp / BEST_YAML,
                          header=f"best trial {best['trial']} of {exp}: val_top1 {best['val_top1']:.4f} after "
                                 f"{best['epochs']} epochs ({setup['data']['val']})")
    else:
        (exp / BEST_YAML).unlink(missing_ok=True)
    (exp / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    return {**summary, "rows": rows}


def best_config_argv(setup: dict[str, Any]) -> list[str]:
    """The argv best_config.yaml is made of (before the best trial's values): the presets and --set values, and the
    search's val split, so that training the best config selects best/ on the val subjects the search selected on
    (and tests once at the end): a carved split's data.val_fraction and data.val_seed (--val-fraction is not in the
    presets), or data.val_fraction 0 where the dataset has its own val split (train.py uses that one)."""
    data = setup.get("data", {})
    if "carved" not in data:
        return [*setup["base_argv"], "--data.val_fraction", "0"]
    fraction = data.get("val_fraction", setup.get("options", {}).get("val_fraction"))
    seed = data["val_seed"] if "val_seed" in data else load_config(setup["base_argv"]).train.seed  # older searches
    extra = [] if fraction is None else ["--data.val_fraction", fmt_value(fraction)]   # else: in base_argv (--set)
    return [*setup["base_argv"], *extra, "--data.val_seed", str(seed)]


def write_best_config(base_argv: list[str], params: dict[str, Any], path: Path, header: str = "") -> RunConfig:
    """The user's config (presets + --set, on the original dataset) with the best hyper-parameters, resolved, as
    YAML that `train.py --config PATH` reads (it names its size)."""
    cfg = load_config(base_argv + params_argv(params))
    cfg.train.output_dir = None
    cfg.train.resume = None
    save_config(cfg, path)
    lines = [f"# {header}", "# train with: python msf_scale/train.py --config " + str(path),
             "# tuned: " + ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted(params.items()))]
    path.write_text("\n".join(lines) + "\n" + path.read_text())
    return cfg


def _plot(rows: list[dict[str, Any]], path: Path, best: dict[str, Any] | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r["history"]:
            continue
        e, v = zip(*r["history"])
        is_best = best is not None and r["trial"] == best["trial"]
        ax.plot(e, [100 * x for x in v], marker="o", lw=2.5 if is_best else 1.2, alpha=1 if is_best else 0.7,
                label=f"{r['trial']} ({r['status']})" + (" best" if is_best else ""))
    failed = [r["trial"] for r in rows if r["status"] == "failed"]
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("search curves" + (f" (failed, no curve: {', '.join(failed)})" if failed else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if any(r["history"] for r in rows):
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", required=True, choices=SIZES,
                   help="model size (configs/<size>/: the presets; configs/<size>/tune/space.yaml: the search space)")
    p.add_argument("--variant", choices=VARIANTS, default=None, help="model variant (default: the preset's)")
    p.add_argument("--config", default=None, help="a preset of configs/<size>/ or a YAML path, as train.py's")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every trial, e.g. --set schedule.epochs=20 (repeatable)")
    p.add_argument("--num-samples", type=int, default=8, help="trials to sample (x grid entries) (default 8)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha: stop weak trials at rungs of epochs (default); fifo: run every trial to the end")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs a trial holds (default: 1 if the Ray cluster has GPUs, else 0; fractions share one)")
    p.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs a trial holds (default 1)")
    p.add_argument("--storage", default="runs/tune", help="experiment root, a shared path on a cluster "
                                                          "(default runs/tune)")
    p.add_argument("--name", default=None, help="experiment name (default tune_<variant>_<size>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search <storage>/<name>: "
                                                         "finished trials are kept, unfinished ones resume")
    p.add_argument("--address", default=None, help="join a running Ray cluster (auto, or HOST:PORT) instead of "
                                                   "starting a local runtime")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial (default 2)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once (default: as resources "
                                                                    "allow)")
    p.add_argument("--space", default=None, help="search space YAML (default configs/<size>/tune/space.yaml)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="carve a val split of this fraction of the training subjects when the dataset has none")
    p.add_argument("--seed", type=int, default=0, help="seed of the search's sampling (default 0)")


def run_command(args: argparse.Namespace) -> int:
    opts = SearchOptions(size=args.size, variant=args.variant, config=args.config, sets=args.sets,
                         num_samples=args.num_samples, scheduler=args.scheduler, gpus_per_trial=args.gpus_per_trial,
                         cpus_per_trial=args.cpus_per_trial, storage=args.storage, name=args.name, resume=args.resume,
                         address=args.address, max_failures=args.max_failures, max_concurrent=args.max_concurrent,
                         space=args.space, val_fraction=args.val_fraction, seed=args.seed)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("Ray Tune is not installed: pip install 'msf_scale[tune]'") from None
    summary = run_search(opts)
    exp = Path(summary["experiment"])
    print((exp / TRIALS_MD).read_text())
    print(f"{summary['trials']} trials: " + ", ".join(f"{n} {s}" for s, n in summary["by_status"].items()))
    for r in summary["rows"]:
        if r["status"] == "failed":
            print(f"trial {r['trial']} failed after {r['starts']} start(s): {r['error']}", file=sys.stderr)
    unfinished = [r for r in summary["rows"] if r["status"].startswith("unfinished")]
    if summary["best"] is None:
        print(f"no trial reported {METRIC}: no best config; see {exp}", file=sys.stderr)
    else:
        print(f"best trial {summary['best']['trial']}: val top-1 {100 * summary['best']['val_top1']:.1f}%; "
              f"config {exp / BEST_YAML}")
    print(f"wrote {exp / TRIALS_CSV}, {exp / TRIALS_MD}, {exp / CURVES_PNG}, {exp / SUMMARY_JSON}")
    if unfinished:
        print(f"{len(unfinished)} trial(s) unfinished: continue with the same command and --resume", file=sys.stderr)
        return 1
    return 0 if summary["best"] is not None else 1
