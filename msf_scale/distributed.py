"""Build the `Accelerator` (and the DeepSpeed plugin) from the run config, the few cross-rank agreements the loops
need (`all_ranks_true`, `any_rank`), and the end of a run and of a rank's process (`shutdown`, `run_rank`); the only
module that creates an Accelerator or touches DeepSpeed.

DeepSpeed is engaged when `dist.zero_stage > 0`, when `dist.deepspeed_config` names a JSON, or when the
launcher's accelerate config enables it (`accelerate launch --config_file cluster/accelerate_*.yaml`).
`dist.zero_stage > 0` overrides the stage of any file. The per-device batch, gradient accumulation and
clipping always come from the run config, so the printed global batch is the one trained. Precision is
`train.precision`, checked against what the launcher asked for (`accelerate launch --mixed_precision`,
`mixed_precision:` in an accelerate config, a DeepSpeed JSON's `bf16`/`fp16`): they agree or the run is refused
with the flag to change (`resolve_precision`), never silently overridden.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from msf_scale.config import CLUSTER_DIR, ConfigError, RunConfig, UserPathError


def _env_uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def deepspeed_dict(cfg: RunConfig, grad_accum: int) -> dict[str, Any] | None:
    """The DeepSpeed config this run uses, or None for plain DDP / one process."""
    path = cfg.dist.deepspeed_config or (os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") if _env_uses_deepspeed() else None)
    if cfg.dist.zero_stage == 0 and not path and not _env_uses_deepspeed():
        return None
    if path and path != "none":
        if not Path(path).is_file() and (CLUSTER_DIR / path).is_file():  # a name of the shipped cluster/ JSONs
            path = str(CLUSTER_DIR / path)
        if not Path(path).is_file():
            raise UserPathError(f"dist.deepspeed_config: {path} does not exist (see cluster/ds_zero*.json)")
        ds = json.loads(Path(path).read_text())
    else:
        ds = {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))}}
    zero = ds.setdefault("zero_optimization", {})
    if cfg.dist.zero_stage > 0:
        zero["stage"] = cfg.dist.zero_stage
    for kind in ("optimizer", "param"):  # inline `offload_*_device` of an accelerate config
        dev = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
        if dev != "none" and f"offload_{kind}" not in zero:
            zero[f"offload_{kind}"] = {"device": dev}
    for key in ("optimizer", "scheduler"):  # ours are built in code (optim.py)
        if key in ds:
            raise ConfigError(f"{path}: remove the {key!r} section; msf_scale builds AdamW and the schedule itself")
    if zero.get("stage") == 3:  # export (`get_state_dict`) gathers the partitioned weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = "auto"
    ds["gradient_clipping"] = cfg.optim.clip_grad
    # bf16 through DeepSpeed's torch autocast, like DDP's: fp32 weights, bf16 matmuls and gradient
    # communication. (Its "bf16" mode casts the weights to bf16 but not the activations, and the model keeps
    # its residual stream in fp32; DeepSpeed also switches off any autocast set around the engine.)
    _check_ds_precision(ds, path or "the accelerate config's DeepSpeed section", cfg.train.precision)
    ds["bf16"] = {"enabled": False}
    ds["torch_autocast"] = {"enabled": cfg.train.precision == "bf16", "dtype": "bfloat16"}
    ds.pop("fp16", None)
    return ds


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_grad_accum(cfg: RunConfig, world_size: int) -> int:
    """train.global_batch (if set) fixes grad_accum; it must divide evenly, as nanoGPT's global batch does."""
    if cfg.train.global_batch is None:
        return cfg.train.grad_accum
    per_step = cfg.train.batch_size * world_size
    if cfg.train.global_batch % per_step:
        raise ConfigError(f"train.global_batch={cfg.train.global_batch} is not a multiple of train.batch_size x "
                         f"world size = {cfg.train.batch_size} x {world_size}; change one of them")
    return cfg.train.global_batch // per_step


def _enabled(section: Any) -> bool | str:
    value = section.get("enabled", False) if isinstance(section, dict) else bool(section)
    return value if value == "auto" else bool(value)


def _check_ds_precision(ds: dict[str, Any], where: str, precision: str) -> None:
    """A DeepSpeed JSON's own precision must agree with train.precision ("auto" follows it)."""
    if _enabled(ds.get("fp16", {})) is True:
        raise ConfigError(f"{where} enables fp16, which msf_scale does not train in: remove its \"fp16\" section "
                          "(train.precision bf16 or fp32 decides)")
    if _enabled(ds.get("bf16", {})) is True and precision != "bf16":
        raise ConfigError(f"{where} enables bf16 but train.precision is {precision}: pass --train.precision bf16, "
                          "or set \"bf16\": {\"enabled\": false} in the JSON")


def resolve_precision(cfg: RunConfig) -> str:
    """Accelerate's mixed precision, which must agree with train.precision.

    `accelerate launch --mixed_precision X` and `mixed_precision: X` in an accelerate config reach the script as
    ACCELERATE_MIXED_PRECISION. fp16/fp8 are refused; bf16 with train.precision fp32 is refused. "no" is also
    Accelerate's default when nothing was asked, so it cannot overrule train.precision: with bf16 a note says so."""
    asked, precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower(), cfg.train.precision
    if asked in ("fp16", "fp8"):
        raise ConfigError(f"accelerate's mixed_precision is {asked} (accelerate launch --mixed_precision or the "
                          "accelerate config's mixed_precision:), which msf_scale does not train in: use bf16 or no, "
                          "and choose with --train.precision bf16|fp32")
    if asked == "bf16" and precision != "bf16":
        raise ConfigError(f"accelerate's mixed_precision is bf16 but train.precision is {precision}: pass "
                          "--train.precision bf16, or launch with --mixed_precision no")
    if asked == "no" and precision == "bf16" and os.environ.get("RANK", "0") == "0":
        print("[msf_scale] accelerate's mixed_precision is 'no' (also its default); train.precision bf16 decides: "
              "pass --train.precision fp32 to train in fp32", flush=True)
    return precision


def check_trackers(names: list[str]) -> list[str]:
    """log.log_with names, each importable (wandb and mlflow are optional installs)."""
    import importlib.util

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
               "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
    for name in names:
        if name not in modules:
            raise ConfigError(f"log.log_with: unknown tracker {name!r}; use some of {', '.join(modules)} or none")
        if importlib.util.find_spec(modules[name]) is None:
            raise ConfigError(f"log.log_with: {name} is not installed (pip install {modules[name]}), "
                              "or leave it out of --log.log_with")
    return names


def build_accelerator(cfg: RunConfig):
    """Accelerator with gloo on CPU, our precision and gradient accumulation, DeepSpeed when configured, and the
    trackers of log.log_with writing under the run directory."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, ProjectConfiguration

    precision = resolve_precision(cfg)
    trackers = check_trackers(cfg.log.trackers())
    grad_accum = resolve_grad_accum(cfg, world_size_from_env())
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    pg = InitProcessGroupKwargs(backend="gloo" if cpu else "nccl",
                                timeout=datetime.timedelta(minutes=cfg.dist.timeout_min))
    ds = deepspeed_dict(cfg, grad_accum)
    plugin = None
    if ds is not None:
        # The launcher's inline DeepSpeed fields were read above; Accelerate would reject them beside a full dict.
        os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = ""
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # Accelerate initialises deepspeed.comm only with it
        if "LOCAL_RANK" not in os.environ:  # plain `python train.py`: DeepSpeed still needs a (1-process) group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        plugin = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False)
    dynamo = dynamo_plugin(cfg)
    check_compile_with_zero(dynamo, ds)
    return Accelerator(
        cpu=cpu and ds is None,  # CPU DDP needs it (MULTI_CPU, gloo); with DeepSpeed it would turn DeepSpeed off
        dynamo_plugin=dynamo,   # None: the launcher's compile settings
        mixed_precision="bf16" if precision == "bf16" and ds is None else "no",  # DeepSpeed: torch_autocast above
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(cfg.run_dir()), logging_dir=str(cfg.run_dir() / "tb")),
        gradient_accumulation_steps=grad_accum,
        deepspeed_plugin=plugin,
        step_scheduler_with_optimizer=False,  # train.py steps the schedule once per real optimizer update
        kwargs_handlers=[pg] if world_size_from_env() > 1 or ds is not None else [],
    )


def dynamo_plugin(cfg: RunConfig):
    """Accelerate's compile settings from train.compile, or None for the launcher's (ACCELERATE_DYNAMO_*, which
    `accelerate launch --dynamo_backend ...` sets for one process and multi-GPU runs but, as of accelerate 1.16,
    not for DeepSpeed runs). Mode, fullgraph and dynamic still come from the launcher's environment."""
    tc = cfg.train
    if tc.compile is None:
        return None
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin
    backend = "no" if tc.compile == "no" else tc.compile_backend
    if backend.upper() not in DynamoBackend.__members__ or (tc.compile != "no" and backend.upper() == "NO"):
        raise ConfigError(f"train.compile_backend: {backend!r} is not one of "
                          f"{', '.join(b.lower() for b in DynamoBackend.__members__ if b != 'NO')}")
    return TorchDynamoPlugin(backend=backend, use_regional_compilation=tc.compile == "regional")


def check_compile_with_zero(dynamo, ds: dict | None) -> None:
    """Refuse torch.compile under ZeRO-3: dynamo traces the partitioned (1-d placeholder) parameters that the mixer
    reads directly (the conv1d weight), and the first forward fails deep in the model (seen on CPU, aot_eager).
    ``dynamo``: train.compile's plugin, or None for the launcher's settings (read here from its environment)."""
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin
    if ds is None or int(ds.get("zero_optimization", {}).get("stage", 0)) != 3:
        return
    if (dynamo or TorchDynamoPlugin()).backend != DynamoBackend.NO:
        raise ConfigError("train.compile: torch.compile does not run under ZeRO-3 here (dynamo traces its partitioned "
                          "parameters); use dist.zero_stage 2 or --train.compile no")


def build_eval_accelerator():
    """The Accelerator of `msf-scale eval` (one process or `accelerate launch`): no DeepSpeed, the GPU if any;
    precision is the caller's autocast, not Accelerate's."""
    from accelerate import Accelerator
    return Accelerator(cpu=not torch.cuda.is_available())


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.zero_stage) if uses_deepspeed(accelerator) else 0


def engine_name(model) -> str:
    """Class of the prepared model (`DeepSpeedEngine`, `DistributedDataParallel` or the bare module)."""
    return type(model).__name__


def compiled_form(model) -> str:
    """How Accelerate's `prepare` compiled the model: "whole" (torch.compile of the model, or a DeepSpeed engine's
    compile), "regional (N modules)" (each repeated block compiled on its own, one compilation shared by all; the
    other top-level modules each on their own) or "no". Logged with the run: a run that was meant to be compiled and
    was not is otherwise only slower (DeepSpeed's launcher drops Accelerate's --dynamo_* flags)."""
    from torch._dynamo.eval_frame import OptimizedModule

    if isinstance(model, OptimizedModule) or getattr(model, "is_compiled", False) is True:
        return "whole"
    regions = sum(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
                  for name, m in model.named_modules() if not name.endswith("_orig_mod"))   # a wrapper's own module
    return f"regional ({regions} modules)" if regions else "no"


def all_ranks_true(accelerator, flag: torch.Tensor) -> torch.Tensor:
    """Logical AND of a 0-d bool tensor across ranks (one tiny all-reduce), so every rank takes the same branch."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(flag.float().reshape(1), reduction="sum")[0] == accelerator.num_processes


def any_rank(accelerator, flag: bool) -> bool:
    """Logical OR of a Python bool across ranks (e.g. "this rank still has a batch"), so all keep stepping."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


_had_process_group = False   # set by `shutdown`: `exit_rank` must skip finalization after the groups are destroyed


def shutdown(accelerator) -> None:
    """End a run's distributed state once every rank is done and the caller holds none of the run's models,
    optimizers or loaders: Accelerate's references to them and the DeepSpeed engine go (`free_memory`, which calls
    `DeepSpeedEngine.destroy`), then the process groups (through `deepspeed.comm` when DeepSpeed ran, which also drops
    the groups DeepSpeed caches), the trackers, and a garbage collection frees what is left. After DDP or ZeRO-1/2
    nothing of the run is left; after ZeRO-3, DeepSpeed 0.19 itself keeps the engine (its hooks' closures), and with
    it a gloo group and its threads, for the life of the process: see `exit_rank`."""
    global _had_process_group
    _had_process_group = _had_process_group or torch.distributed.is_initialized()
    accelerator.wait_for_everyone()   # no rank tears down a group while a peer still talks to it
    with_deepspeed = uses_deepspeed(accelerator)
    accelerator.free_memory()
    if with_deepspeed and torch.distributed.is_initialized():
        from deepspeed import comm
        comm.destroy_process_group()
    accelerator.end_training()        # the trackers; the groups where DeepSpeed did not own them
    gc.collect()


def exit_rank(status: Any) -> Any:
    """How a process that may hold a process group ends: `raise SystemExit(exit_rank(status))`, from the main thread.

    A plain process returns `status` for the usual exit. A rank of a launch (WORLD_SIZE > 1), or a process that
    created a process group (single-process DeepSpeed), takes the interpreter's own first steps of exiting (waits
    for its non-daemon threads, then runs the atexit handlers: logging's flush, torch's compile-worker shutdown;
    an error in either is printed, as the interpreter does) and leaves with `os._exit`, without finalization: a gloo
    group that something still holds (ZeRO-3) keeps worker threads, and one still releasing a collective's tensors
    once finalization has begun dies taking the GIL and aborts the process after a complete run (docs/TRAINING.md,
    "A rank that finishes"). `status` means what SystemExit's code does: None is 0, an int is its low byte,
    anything else is printed and exits 1."""
    if not (world_size_from_env() > 1 or _had_process_group or torch.distributed.is_initialized()):
        return status
    code = _exit_code(status)
    try:
        try:
            threading._shutdown()     # what Py_FinalizeEx does first, in this order
            atexit._run_exitfuncs()
        except BaseException:
            traceback.print_exc()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    finally:
        os._exit(code)


def _exit_code(status: Any) -> int:
    """SystemExit's reading of an exit status, as an int `os._exit` takes."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status & 0xFF
    print(status, file=sys.stderr, flush=True)
    return 1


def run_rank(main: Callable[[], Any]) -> Any:
    """`raise SystemExit(run_rank(cli))`: `main()`'s exit status, also when it raises (SystemExit's code; 1 after the
    traceback, printed by `sys.excepthook`, for an error; 130 for Ctrl-C, where Python would die of SIGINT), handed
    to `exit_rank`, so that a failing rank of a launch reports its own error rather than an abort at exit."""
    try:
        raise SystemExit(main())
    except SystemExit as e:
        status = e.code
    except BaseException as e:
        sys.excepthook(type(e), e, e.__traceback__)
        status = 130 if isinstance(e, KeyboardInterrupt) else 1
    return exit_rank(status)


def reset_state() -> None:
    """Forget the Accelerate singletons so that `main()` can run twice in one process (tests)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
