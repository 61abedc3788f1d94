"""Start from released VideoMamba weights: an OpenGVLab/VideoMamba checkpoint mapped onto any of our variants.

    msf-scale import videomamba_t16_k400_f8_res224.pth --variant msf_mamba --size tiny --out runs/init_tiny
    python msf_scale/train.py --size tiny --model.init videomamba_t16_k400_f8_res224.pth --data data/imigue

Their names (videomamba/video_sm/models/videomamba.py; mamba_simple.Mamba with bimamba v2) -> ours:

    patch_embed.proj.{weight,bias}             -> patch_embed.{weight,bias}  (an image kernel is inflated to the
                                                  tubelet at its centre frame, as their own loader does)
    cls_token                                  -> cls_token                   (only with model.arch.class_token)
    pos_embed [1, 1 + N, d], class token first -> cls_pos + pos_embed [1, N', d]: spatial grid resized (bicubic)
    temporal_pos_embedding [1, T, d]           -> temporal_pos_embedding [1, T', 1, d]: resized (linear)
    layers.i.norm / norm_f                     -> blocks.i.norm / norm_f
    layers.i.mixer.{in_proj,out_proj}          -> blocks.i.mixer.{in_proj,out_proj}
    layers.i.mixer.{conv1d,x_proj,dt_proj,A_log,D}           -> blocks.i.mixer.fwd.*
    layers.i.mixer.{conv1d_b,x_proj_b,dt_proj_b,A_b_log,D_b} -> blocks.i.mixer.bwd.*
    head                                       -> head, if the class count matches (else left at its init)

The CFD fusion modules (blocks.i.fusion.*) have no counterpart and keep their init: zero kernels, so every block
starts as VideoMamba's. Our own exports (model.safetensors) load the same way (names already ours). Files are read
with `torch.load(weights_only=True)`: no code in a checkpoint runs.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msf_scale.config import ConfigError, UserError, UserPathError

_MIXER = {"conv1d": "fwd.conv1d", "x_proj": "fwd.x_proj", "dt_proj": "fwd.dt_proj", "A_log": "fwd.A_log",
          "D": "fwd.D", "conv1d_b": "bwd.conv1d", "x_proj_b": "bwd.x_proj", "dt_proj_b": "bwd.dt_proj",
          "A_b_log": "bwd.A_log", "D_b": "bwd.D", "in_proj": "in_proj", "out_proj": "out_proj"}
_LAYER = re.compile(r"^layers\.(\d+)\.(norm|mixer)\.(.+)$")


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)      # our keys set from the checkpoint
    missing: list[str] = field(default_factory=list)     # our keys left at their init
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no place in the model
    notes: list[str] = field(default_factory=list)       # resized, inflated, dropped

    def summary(self, source: str) -> str:
        def short(keys: list[str]) -> str:
            blocks = sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", k) for k in keys})
            return ", ".join(blocks) if blocks else "none"
        return "\n".join([f"init from {source}: {len(self.loaded)} tensors loaded",
                          *(f"  {n}" for n in self.notes),
                          f"  missing (left at init): {short(self.missing)}",
                          f"  unexpected (ignored): {short(self.unexpected)}"])


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: safetensors, or a torch file (weights only) whose state dict may sit under
    "model" / "module" / "state_dict", with their "module." / "backbone." / "encoder." prefixes removed."""
    p = Path(path)
    if not p.is_file():
        raise UserPathError(f"--model.init / import: {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle with code, or not a torch file at all
        raise ConfigError(f"{p} is not a weights-only torch checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"{p} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            for prefix in ("module.", "backbone.", "encoder."):
                k = k.removeprefix(prefix)
            out[k] = v
    return out


def _resize_spatial(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, g*g, d] -> [1, gh*gw, d], bicubic on the square grid (as VideoMamba's fine-tuning does)."""
    n, d = pos.shape[1], pos.shape[2]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ConfigError(f"pos_embed holds {n} positions, not a square grid")
    if (g, g) == tuple(grid):
        return pos
    x = pos.reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos.dtype)


def _resize_temporal(pos: torch.Tensor, t: int) -> torch.Tensor:
    """[1, T0, d] -> [1, t, d], linear in time."""
    if pos.shape[1] == t:
        return pos
    x = F.interpolate(pos.permute(0, 2, 1).float(), size=t, mode="linear", align_corners=False)
    return x.permute(0, 2, 1).to(pos.dtype)


def convert_videomamba(sd: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str],
                                                                              list[str]]:
    """Their state dict -> (ours, unexpected keys, notes), shaped for `model` (its grid, tubelet, classes)."""
    cfg, target = model.cfg, model.state_dict()
    t, gh, gw = cfg.grid
    out, unexpected, notes = {}, [], []
    for k, v in sd.items():
        m = _LAYER.match(k)
        if m:
            i, part, rest = m.groups()
            if part == "norm":
                out[f"blocks.{i}.norm.{rest}"] = v
                continue
            name, _, leaf = rest.partition(".")
            if name in _MIXER:
                out[f"blocks.{i}.mixer.{_MIXER[name]}" + (f".{leaf}" if leaf else "")] = v
                continue
            unexpected.append(k)
        elif k in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            if k.endswith("weight"):
                if v.dim() == 4:   # an image model's Conv2d kernel
                    v = v.unsqueeze(2)
                k_t = target["patch_embed.weight"].shape[2]
                if v.shape[2] != k_t:   # inflate at the centre frame (their load_state_dict, center=True)
                    w = torch.zeros(*v.shape[:2], k_t, *v.shape[3:], dtype=v.dtype)
                    w[:, :, k_t // 2] = v[:, :, v.shape[2] // 2]
                    notes.append(f"patch_embed: temporal kernel {v.shape[2]} -> {k_t} (centre frame)")
                    v = w
            out[k.replace(".proj", "")] = v
        elif k == "pos_embed":
            extra = 0 if int(round(v.shape[1] ** 0.5)) ** 2 == v.shape[1] else 1
            if extra and "cls_pos" in target:
                out["cls_pos"] = v[:, :1]
            grid0 = int(round((v.shape[1] - extra) ** 0.5))
            out["pos_embed"] = _resize_spatial(v[:, extra:], (gh, gw))
            if (grid0, grid0) != (gh, gw):
                notes.append(f"pos_embed: spatial grid {grid0} x {grid0} -> {gh} x {gw} (bicubic)")
        elif k == "temporal_pos_embedding":
            pos = v.reshape(1, v.shape[1], v.shape[-1])
            if pos.shape[1] != t:
                notes.append(f"temporal_pos_embedding: {pos.shape[1]} -> {t} frames (linear)")
            out["temporal_pos_embedding"] = _resize_temporal(pos, t).reshape(1, t, 1, -1)
        elif k == "cls_token" and "cls_token" in target:
            out[k] = v
        elif k in ("norm_f.weight", "norm_f.bias", "head.weight", "head.bias"):
            out[k] = v
        else:
            unexpected.append(k)
    return out, unexpected, notes


def load_init(model: nn.Module, path: str | Path) -> ImportReport:
    """Load VideoMamba (or our own exported) weights into `model` in place; what was loaded, resized, left at init
    and ignored is in the report. A width or depth that does not match is an error (the wrong --size)."""
    if not hasattr(model.cfg, "grid"):
        raise ConfigError(f"--model.init loads VideoMamba weights into the Mamba variants, not {model.cfg.variant}")
    sd = read_state_dict(path)
    ours = any(k.startswith("blocks.") for k in sd)
    if ours:
        mapped, unexpected, notes = {}, [], []
        for k, v in sd.items():   # an export of another geometry: same resizing of the position embeddings
            if k == "pos_embed":
                v = _resize_spatial(v, model.cfg.grid[1:])
            elif k == "temporal_pos_embedding":
                v = _resize_temporal(v.reshape(1, v.shape[1], v.shape[-1]), model.cfg.grid[0]).reshape(
                    1, model.cfg.grid[0], 1, -1)
            mapped[k] = v
    else:
        if model.cfg.stem != "patch" or model.cfg.stem_input != "rgb":
            raise ConfigError(f"{path}: VideoMamba weights fit the linear patch stem on RGB input; this model has "
                              f"stem={model.cfg.stem}, stem_input={model.cfg.stem_input} (drop those options to "
                              "import them)")
        mapped, unexpected, notes = convert_videomamba(sd, model)
    target = model.state_dict()
    width = sd.get("norm_f.weight")
    if width is not None and width.shape[0] != model.cfg.embed_dim:
        raise ConfigError(f"{path} has width {width.shape[0]}, the model {model.cfg.embed_dim}: choose the --size "
                          "that matches the checkpoint (tiny 192, small 384, base 576)")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"^(?:layers|blocks)\.(\d+)\.", k))), default=-1)
    if depth and depth != model.cfg.depth:
        raise ConfigError(f"{path} has {depth} blocks, the model {model.cfg.depth}: choose the matching --size")
    report = ImportReport(notes=notes)
    load = {}
    for k, v in mapped.items():
        if k not in target:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(target[k].shape):
            what = "head" if k.startswith("head.") else k
            report.notes.append(f"{what}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}, left at init"
                                + (" (a new class count)" if what == "head" else ""))
        else:
            load[k] = v.to(target[k].dtype)
    report.unexpected += unexpected
    result = model.load_state_dict(load, strict=False)
    report.loaded = sorted(load)
    report.missing = sorted(result.missing_keys)
    return report


def main(argv: list[str] | None = None) -> int:
    """`msf-scale import`: a VideoMamba checkpoint -> an msf-scale export (model.safetensors + model_config.json),
    usable by --model.init, eval and predict."""
    p = argparse.ArgumentParser(prog="msf-scale import", description=main.__doc__)
    p.add_argument("checkpoint", help="VideoMamba .pth (or an msf-scale model.safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--variant", default="msf_mamba", help="videomamba | msf_mamba | msf_mamba_plus")
    p.add_argument("--size", default="tiny", help="tiny (192) | small (384) | base (576): must match the width")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's head")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--arch", action="append", default=[], metavar="KEY=VALUE",
                   help="MSFMambaConfig override, e.g. class_token=true (repeatable)")
    args = p.parse_args(argv)
    try:
        import yaml
        from safetensors.torch import save_file

        from msf_scale.export import model_meta
        from msf_scale.models import create_model

        sd = read_state_dict(args.checkpoint)
        head = sd.get("head.weight")
        n = args.num_classes or (head.shape[0] if head is not None else None)
        if n is None:
            raise ConfigError(f"{args.checkpoint} has no head: pass --num-classes")
        arch = {}
        for kv in args.arch:
            key, eq, val = kv.partition("=")
            if not eq:
                raise ConfigError(f"--arch {kv!r}: expected KEY=VALUE")
            arch[key] = yaml.safe_load(val)
        try:
            model = create_model(args.variant, size=args.size, num_classes=n, num_frames=args.num_frames,
                                 img_size=args.img_size, **arch)
        except (ValueError, KeyError) as e:
            raise ConfigError(str(e)) from None
        report = load_init(model, args.checkpoint)
        print(report.summary(args.checkpoint))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        meta = {**model_meta(model, args.variant, args.size), "dtype": "float32", "num_classes": n,
                "imported_from": str(args.checkpoint)}
        (out / "model_config.json").write_text(json.dumps(meta, indent=1))
        print(f"wrote {out / 'model.safetensors'}: train from it with --model.init {out / 'model.safetensors'}")
    except UserError as e:
        print(f"msf-scale import: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
