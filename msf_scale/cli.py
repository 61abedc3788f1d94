"""`msf-scale`: one command for the data, training, evaluation and model-inspection tools.

    msf-scale data synth --out data/synth        msf-scale data pack --videos DIR --annotations ann.csv --out DIR
    msf-scale train --size tiny --config cpu_demo (one process; several: accelerate launch msf_scale/train.py ...)
    msf-scale eval --ckpt runs/<run>             msf-scale models [--num-frames 8 --img-size 224]
    msf-scale flops --variant msf_mamba --size base          msf-scale latency --device cuda --out lat/
    msf-scale curve --runs runs/ --latency lat/latency.json --out curve/
    msf-scale report --runs runs/ --latency lat/latency.json --out report/
    msf-scale tune --size tiny --num-samples 16 [--scheduler asha|fifo] [--resume] [--address auto]
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def _models(args: argparse.Namespace) -> int:
    """Parameter and FLOP table of every registered model (counted by the code, markdown)."""
    from msf_scale.models import MODEL_SIZES, VARIANTS, create_model

    paper = {"tiny": "~7M (VideoMamba-Ti)", "small": "~26M (VideoMamba-S)", "base": "~74M (VideoMamba-M)"}
    print(f"Input {args.num_frames} x {args.img_size} x {args.img_size}, {args.num_classes} classes; "
          "GFLOPs = forward multiply-adds per clip (MAC = 1 FLOP, fvcore's convention).\n")
    print("| variant | size | params (M) | GFLOPs | VideoMamba counterpart |")
    print("|---|---|---:|---:|---|")
    for variant in (*VARIANTS, "cnn3d"):   # cnn3d: the locality-prior baseline every table is read against
        for size in MODEL_SIZES:
            m = create_model(variant, size=size, num_classes=args.num_classes, num_frames=args.num_frames,
                             img_size=args.img_size, device="meta")
            ref = paper[size] if variant in VARIANTS else "- (3-D CNN baseline)"
            print(f"| {variant} | {size} | {m.num_params() / 1e6:.2f} | {m.flops_per_clip() / 1e9:.1f} | {ref} |")
    return 0


MEASURE = {"flops": ("msf_scale.flops", "fvcore FLOP count: per-module table, GFLOPs per view and per video"),
           "latency": ("msf_scale.latency", "batch-1 / per-video latency and throughput, eager / CUDA graph / compile"),
           "curve": ("msf_scale.curve", "accuracy vs inference time plot (PNG, SVG, CSV) from runs + latency"),
           "report": ("msf_scale.report", "HTML scaling report (and Markdown summary) of run directories"),
           "tune": ("msf_scale.tune", "Ray Tune search over the training loop, selecting on the val split (ASHA)")}


def _measure(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        from msf_scale.config import UserError

        try:
            return importlib.import_module(module).run_command(args)
        except Exception as e:   # a user mistake: one line, exit 2 (anything else keeps its traceback); errors
            if not (isinstance(e, UserError) or getattr(e, "user_error", False)):   # raised in ops mark themselves
                raise
            print(f"msf-scale {args.command}: error: {e}", file=sys.stderr)
            return 2
    return run


def _passthrough(module: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        mod = importlib.import_module(module)
        result = getattr(mod, "cli", mod.main)(args.rest)   # cli(): a user error prints one line and returns 2
        return result if isinstance(result, int) else 0
    return run


def build_parser() -> argparse.ArgumentParser:
    from msf_scale.data.commands import add_data_parser

    parser = argparse.ArgumentParser(prog="msf-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_parser(sub)
    for name, text in (("train", "train in this process (msf-scale train --help)"),
                       ("eval", "top-1/top-5 of a run or model file (msf-scale eval --help)"),
                       ("predict", "top-k classes of video files with a run's own preprocessing (msf-scale predict --help)"),
                       ("import", "a VideoMamba .pth -> an msf-scale export for --model.init (msf-scale import --help)")):
        p = sub.add_parser(name, help=text, add_help=False)   # listed for --help; main() hands them over
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_passthrough(PASSTHROUGH[name]))
    models = sub.add_parser("models", help="parameter / FLOP table of every variant x size")
    models.add_argument("--num-frames", type=int, default=8)
    models.add_argument("--img-size", type=int, default=224)
    models.add_argument("--num-classes", type=int, default=32)
    models.set_defaults(func=_models)
    import importlib

    for name, (module, text) in MEASURE.items():
        p = sub.add_parser(name, help=text, description=importlib.import_module(module).__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(func=_measure(module))
    return parser


PASSTHROUGH = {"train": "msf_scale.train", "eval": "msf_scale.evaluate",
               "predict": "msf_scale.predict", "import": "msf_scale.weights_import"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:   # their own parsers own every flag (argparse's REMAINDER drops --flags)
        return _passthrough(PASSTHROUGH[argv[0]])(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry() -> NoReturn:
    """The `msf-scale` console script: `main`, ended by `distributed.run_rank` (a rank of a launch skips the
    interpreter's finalization, where a process group's worker thread can abort the process)."""
    from msf_scale.distributed import run_rank
    sys.exit(run_rank(main))


if __name__ == "__main__":
    entry()
