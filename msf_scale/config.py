"""Run configuration: typed dataclasses, YAML presets and `--section.field value` overrides.

Precedence (later wins): dataclass defaults < `configs/<size>/default.yaml` < `--config NAME|PATH`
< command-line overrides. Every value is coerced to its field's annotation, an unknown key raises a
`ConfigError` naming the nearest valid key, and each section validates itself in `__post_init__`
with messages that name the field path, so a typo never silently trains the wrong thing.

The presets live in the package (`msf_scale/configs/`, `msf_scale/cluster/`; the repository's `configs/` and
`cluster/` point there), so a wheel install resolves `--size base` exactly as a checkout does; a missing preset
is an error, never a silent fall-back to the dataclass defaults. The comment after each field is its `--help` text.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msf_scale.catalog import SIZES, VARIANTS   # the one list of model names (re-exported for callers)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"     # package data: ships in the wheel
CLUSTER_DIR = Path(__file__).resolve().parent / "cluster"
# Short flags of the issue -> config paths (everything else is `--section.field`).
SHORT_FLAGS = {"size": "model.size", "variant": "model.variant", "data": "data.root",
               "output-dir": "train.output_dir", "max-steps": "train.max_steps",
               "epochs": "schedule.epochs", "resume": "train.resume"}


class UserError(Exception):
    """A mistake in what the user asked for (a flag, a path, a preset): the command line prints one line and
    exits 2. Everything else is a bug and keeps its traceback. (Below this layer, ops mark such errors with a
    ``user_error`` attribute instead: ops/_choice.EnvChoiceError.)"""


class ConfigError(UserError, ValueError):
    """A bad config value or key (a ValueError, so library callers can catch it as one)."""


class UserPathError(UserError, FileNotFoundError):
    """A path the user gave (data directory, config file, checkpoint) that does not exist."""


def _check(ok: bool, path: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: {msg}")


@dataclass
class ModelConfig:
    variant: str = "msf_mamba"          # videomamba | msf_mamba | msf_mamba_plus | cnn3d
    size: str = "tiny"                  # tiny | small | base (widths live in the model registry)
    num_frames: int = 8                 # T frames per clip
    img_size: int = 224                 # square crop side
    drop_path_rate: float | None = None  # None = the size's default (SPEC: 0.1 / 0.2 / 0.4)
    grad_checkpointing: bool = False    # activation checkpointing per block
    arch: dict[str, Any] = field(default_factory=dict)  # extra MSFMambaConfig overrides (patch_size, theta...)
    init: str | None = None             # start from these weights: a VideoMamba .pth or an msf-scale export (msf-scale import)

    def __post_init__(self) -> None:
        _check(self.variant in VARIANTS, "model.variant", f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        _check(self.size in SIZES, "model.size", f"unknown size {self.size!r}; choose one of {SIZES}")
        _check(self.num_frames >= 1, "model.num_frames", "must be >= 1")
        _check(self.img_size >= 1, "model.img_size", "must be >= 1")
        _check(self.drop_path_rate is None or 0 <= self.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
        clash = {"num_classes", "num_frames", "img_size", "drop_path_rate"} & set(self.arch)
        _check(not clash, "model.arch", f"{sorted(clash)} are set by the dataset / model.* fields, not model.arch")


@dataclass
class DataConfig:
    root: str | None = None             # shard directory; None = synthetic default (generated once into a cache)
    synth: dict[str, Any] = field(default_factory=dict)  # synthesize() kwargs for the synthetic default
    num_workers: int = 4                # loader worker processes per rank
    num_clips: int = 1                  # test-time temporal clips per video
    num_crops: int = 1                  # test-time spatial crops per clip
    flip: bool | None = None            # None = the dataset's flip_ok flag
    min_scale: float = 0.5              # random-resized-crop minimum area fraction
    epoch_samples: int | None = None    # clips per training epoch (all ranks); None = train split size
    eval_batch_size: int | None = None  # None = train.batch_size
    val_fraction: float = 0.0           # no val split in the data: carve this fraction of training subjects
    val_seed: int = 0                   # seeds that carve (not train.seed: every training seed gets the same val split)
    allow_val_overlap: bool = False     # use a dataset's own val split that shares subjects with train or test (else refused)

    def __post_init__(self) -> None:
        _check(0 <= self.val_fraction < 1, "data.val_fraction",
               f"{self.val_fraction} must be in [0, 1) (0 = no carve-out)")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.num_clips >= 1 and self.num_crops >= 1, "data.num_clips/num_crops", "must be >= 1")
        _check(0 < self.min_scale <= 1, "data.min_scale", "must be in (0, 1]")
        _check(self.epoch_samples is None or self.epoch_samples >= 1, "data.epoch_samples", "must be >= 1")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 4e-4                    # peak lr per 256 clips; scaled linearly with the global batch
    weight_decay: float = 0.05          # not applied to 1-D params and model.no_weight_decay()
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas, comma-separated
    eps: float = 1e-8                   # AdamW epsilon
    layer_decay: float = 1.0            # layer-wise lr decay; 1.0 = off (SPEC's recipe)
    clip_grad: float = 1.0              # max global grad norm; 0 = off
    label_smoothing: float = 0.1        # of the cross-entropy targets

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", "both must be in [0, 1)")
        _check(0 < self.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1] (1.0 = off)")
        _check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 = off)")
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")


@dataclass
class ScheduleConfig:
    epochs: int = 50                    # length of the schedule (max_steps may stop earlier)
    warmup_epochs: float = 5            # linear warm-up from 0, then cosine to min_lr
    min_lr: float = 1e-6                # absolute floor of the cosine

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "schedule.epochs", "must be >= 1")
        _check(0 <= self.warmup_epochs <= self.epochs, "schedule.warmup_epochs",
               f"{self.warmup_epochs} must be in [0, schedule.epochs={self.epochs}]; "
               "pass --schedule.warmup_epochs with a shorter --epochs")
        _check(self.min_lr >= 0, "schedule.min_lr", "must be >= 0")


@dataclass
class TrainConfig:
    batch_size: int = 32                # clips per device per micro-step
    grad_accum: int = 1                 # micro-steps per optimizer step
    global_batch: int | None = None     # if set, grad_accum = global_batch / (batch_size * world_size)
    max_steps: int | None = None        # stop early (the schedule still spans schedule.epochs)
    seed: int = 0                       # model init, data order and augmentation
    precision: str = "bf16"             # bf16 | fp32 (an accelerate/DeepSpeed config must agree, or the run is refused)
    eval_every: int = 5                 # epochs between evaluations: on val if the run has one, else test (0 = end only)
    final_test: bool = True             # with a val split: test once at the end (final + best/ weights); false = never
    ckpt_every: int = 0                 # optimizer steps between checkpoints (0 = end of epoch only)
    keep_last: int = 2                  # complete checkpoints kept
    ema: bool = False                   # keep an EMA of the weights (evaluated and exported separately)
    ema_decay: float = 0.9998           # per optimizer step
    max_bad_steps: int = 5              # abort after this many non-finite losses in a row
    output_dir: str | None = None       # the run directory; None = runs/<variant>_<size>
    resume: str | None = None           # None | auto | PATH to a checkpoint or run dir
    mem_check: bool = True              # on CPU, refuse a run whose estimated memory exceeds the free RAM (false: warn only)
    compile: str | None = None          # none | no | whole | regional (none: the launcher's; DeepSpeed's drops its flags)
    #                                     torch.compile through Accelerate's TorchDynamoPlugin; not with ZeRO-3
    compile_backend: str = "inductor"   # torch.compile backend of train.compile (one of Accelerate's DynamoBackend names)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.global_batch is None or self.global_batch >= 1, "train.global_batch", "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.precision in ("bf16", "fp32"), "train.precision",
               f"{self.precision!r} is not supported; use bf16 or fp32 (fp16 does not run on CPU)")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.ckpt_every >= 0, "train.ckpt_every", "must be >= 0")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(0 < self.ema_decay < 1, "train.ema_decay", "must be in (0, 1)")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        # YAML reads an unquoted `no` / `off` as false and `yes` / `on` as true (the loader keeps them as those words)
        self.compile = {"false": "no", "true": "whole"}.get(self.compile, self.compile)
        _check(self.compile in (None, "no", "whole", "regional"), "train.compile",
               f"{self.compile!r} is not one of none (the launcher's setting), no, whole, regional")


@dataclass
class DistConfig:
    zero_stage: int = 0                 # 0 = plain DDP / one process (unless the launcher's accelerate config enables DeepSpeed)
    deepspeed_config: str | None = None  # DeepSpeed JSON (e.g. cluster/ds_zero2.json); zero_stage > 0 overrides its stage
    timeout_min: int = 30               # collective timeout: a hung peer fails the run after this long

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "dist.zero_stage", "must be 0, 1, 2 or 3")
        _check(self.timeout_min >= 1, "dist.timeout_min", "must be >= 1")


@dataclass
class LogConfig:
    log_every: int = 10                 # optimizer steps between metric lines (the only host syncs besides the NaN check)
    tensorboard: bool = True            # false removes tensorboard from log_with
    log_with: str = "tensorboard"       # Accelerate trackers, comma-separated: tensorboard, wandb, mlflow, ... or none
    peak_tflops: float | None = None    # per-device peak for MFU; None = look up known GPUs, else MFU is None
    progress: bool = True               # tqdm bar on the main process

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "log.log_every", "must be >= 1")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "log.peak_tflops", "must be > 0")

    def trackers(self) -> list[str]:
        names = [t.strip() for t in self.log_with.split(",") if t.strip() and t.strip() != "none"]
        return [t for t in names if self.tensorboard or t != "tensorboard"]


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.model.variant}_{self.model.size}")


# ----------------------------------------------------------------------------- coercion
def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value or a command-line string to the annotated type, or raise naming `path`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if tp is Any:
        return yaml.safe_load(value) if isinstance(value, str) else value
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        _check(isinstance(value, dict), path, f"expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        _check(isinstance(value, (list, tuple)) and len(value) == len(args), path,
               f"expected {len(args)} comma-separated values, got {value!r}")
        return tuple(_coerce(v, a, path) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        _check(s in ("true", "false", "1", "0", "yes", "no", "on", "off"), path, f"expected true/false, got {value!r}")
        return s in ("true", "1", "yes", "on")
    if tp is float:
        _check(not isinstance(value, bool), path, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is int:
        _check(not isinstance(value, bool), path, f"expected an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, float) else int(_coerce_int_float(value))
        except (TypeError, ValueError):
            try:  # "1e3" on the command line
                return int(_coerce_int_float(float(value)))
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: expected an integer, got {value!r}") from None
    if tp is str:
        _check(isinstance(value, (str, int, float)), path, f"expected a string, got {value!r}")
        if isinstance(value, bool):   # YAML 1.1 reads unquoted yes/no/on/off/true/false as a bool
            return "true" if value else "false"
        return str(value)
    raise TypeError(f"{path}: unsupported annotation {tp!r}")  # invariant: every field type is handled above


def _coerce_int_float(x: float) -> float:
    if not float(x).is_integer():
        raise ValueError(x)
    return x


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys() -> list[str]:
    """Every `section.field` path, for error messages and help."""
    return [f"{s}.{f}" for s, sec in _hints(RunConfig).items() for f in _hints(sec)]


def _unknown(key: str) -> ValueError:
    near = difflib.get_close_matches(key, valid_keys() + list(_hints(RunConfig)), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid_keys())}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _apply(tree: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    """Set `section.field[.subkey]` in a plain dict tree, checking the key against the dataclasses."""
    parts = key.split(".")
    sections = _hints(RunConfig)
    if len(parts) < 2 or parts[0] not in sections or parts[1] not in _hints(sections[parts[0]]):
        raise _unknown(key)
    section, name = parts[0], parts[1]
    if len(parts) > 2:  # --model.arch.patch_size 8: one key of a dict field
        tp = _hints(sections[section])[name]
        _check(typing.get_origin(tp) is dict, key, f"{section}.{name} is not a mapping")
        sub = dict(tree.setdefault(section, {}).get(name) or {})
        sub[".".join(parts[2:])] = yaml.safe_load(value) if isinstance(value, str) else value
        tree[section][name] = sub
    elif isinstance(value, dict) and typing.get_origin(_hints(sections[section])[name]) is dict:
        tree.setdefault(section, {})[name] = {**(tree.get(section, {}).get(name) or {}), **value}
    else:
        tree.setdefault(section, {})[name] = value


def _merge_yaml(tree: dict, path: Path) -> None:
    doc = yaml.safe_load(path.read_text()) or {}
    _check(isinstance(doc, dict), str(path), "a config file must be a mapping of sections")
    for section, fields in doc.items():
        if not isinstance(fields, dict):
            raise _unknown(str(section)) if section not in _hints(RunConfig) else ConfigError(
                f"{path}: section {section!r} must be a mapping")
        for name, value in fields.items():
            _apply(tree, f"{section}.{name}", value)


def build(tree: dict[str, dict[str, Any]]) -> RunConfig:
    """Construct the typed config from a (partial) dict tree; validation runs in each __post_init__."""
    sections = {}
    for section, cls in _hints(RunConfig).items():
        hints = _hints(cls)
        values = tree.get(section, {})
        for name in values:
            if name not in hints:
                raise _unknown(f"{section}.{name}")
        sections[section] = cls(**{k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()})
    return RunConfig(**sections)


def resolve_config_file(name: str, size: str) -> Path:
    """`--config NAME` is a file in configs/<size>/, or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserPathError(f"config file {p} does not exist")
        return p
    cand = CONFIG_DIR / size / f"{name}.yaml"
    if not cand.is_file():
        names = sorted(q.stem for q in (CONFIG_DIR / size).glob("*.yaml"))
        raise ConfigError(f"unknown config {name!r} for size {size!r}; choose one of {names} or pass a YAML path")
    return cand


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """`--a.b v`, `--a.b=v` and the short flags of SHORT_FLAGS -> [(dotted key, raw string)]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.field value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            val, i = argv[i + 1], i + 1
        out.append((SHORT_FLAGS.get(key, key), val))
        i += 1
    return out


def _presets(pairs: list[tuple[str, str]]) -> tuple[str, list[Path]]:
    """The size and the preset files (default.yaml, then --config) that a command line selects."""
    config_name = next((v for k, v in reversed(pairs) if k == "config"), None)
    size = next((v for k, v in reversed(pairs) if k == "model.size"), None)
    extra = resolve_config_file(config_name, size or "tiny") if config_name else None
    if size is None and extra is not None:  # a --config path may name its size
        size = ((yaml.safe_load(extra.read_text()) or {}).get("model") or {}).get("size")
    size = size or "tiny"
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    default = CONFIG_DIR / size / "default.yaml"
    if not default.is_file():  # a broken install: never train on the dataclass defaults instead
        raise UserPathError(f"preset {default} is missing: reinstall msf_scale (the presets ship in the package)")
    files = [default]
    if extra is not None and extra.resolve() != default.resolve():
        files.append(extra)
    return size, files


def load_config(argv: list[str] | None = None) -> RunConfig:
    """Command line -> RunConfig (defaults < configs/<size>/default.yaml < --config < overrides)."""
    pairs = parse_overrides(list(argv or []))
    size, files = _presets(pairs)
    tree: dict[str, dict[str, Any]] = {}
    for f in files:
        _merge_yaml(tree, f)
    for key, val in pairs:
        if key != "config":
            _apply(tree, key, val)
    tree.setdefault("model", {})["size"] = size
    return build(tree)


def field_help() -> dict[str, str]:
    """`section.field` -> its help text: the comment after the field in this file."""
    out = {}
    for section, cls in _hints(RunConfig).items():
        for m in re.finditer(r"^    (\w+): [^=\n]+=[^\n#]*#\s*(.+)$", inspect.getsource(cls), re.M):
            out[f"{section}.{m.group(1)}"] = m.group(2).strip()
    return out


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(str(x) for x in v)
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def help_text(argv: list[str] | None = None) -> str:
    """Every overridable key with the value it takes under the presets and flags of `argv`, and its help."""
    argv = [a for a in (argv or []) if a not in ("-h", "--help")]
    try:
        pairs = parse_overrides(argv)
        _, files = _presets(pairs)
        cfg = load_config(argv)
        source = " < ".join([str(f) for f in files] + (["the command line"] if any(k != "config" for k, _ in pairs)
                                                       else []))
    except UserError as e:
        cfg, source = RunConfig(), f"the dataclass defaults (the command line does not resolve: {e})"
    helps = field_help()
    rows = [(f"--{k}", _show(getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])), helps.get(k, ""))
            for k in valid_keys()]
    w0, w1 = max(len(r[0]) for r in rows), min(24, max(len(r[1]) for r in rows))
    presets = ", ".join(f"{s}: {' '.join(sorted(q.stem for q in (CONFIG_DIR / s).glob('*.yaml')))}" for s in SIZES)
    lines = ["short flags: " + ", ".join(f"--{k} ({v})" for k, v in SHORT_FLAGS.items()),
             f"--config NAME|PATH: a preset of configs/<size>/ ({presets}) or a YAML path",
             f"overrides (--section.field value); values shown: {source}"]
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


def save_config(cfg: RunConfig, path: Path) -> None:
    data = cfg.to_dict()
    data["optim"]["betas"] = list(data["optim"]["betas"])
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def read_config(path: Path) -> RunConfig:
    """Load a run's saved config.yaml (the resolved config, so no presets are applied)."""
    tree: dict[str, dict[str, Any]] = {}
    _merge_yaml(tree, Path(path))
    return build(tree)
