"""What one optimiser update does, by value: a real run's gradients, learning rates and weights against a hand
computation (label-smoothed cross-entropy, the mean over accumulated micro-batches, global-norm clipping, the
warm-up + cosine rate, one scheduler step per update, AdamW); EMA by its formula and across resume; the data
position remapped when the batch changes on resume; `resolve_resume`, `truncate_jsonl`, DropPath, top-k."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import msf_scale.data.builders as builders_mod
import msf_scale.train as train_mod
import msf_scale.train_setup as setup_mod
from msf_scale.checkpoint import resolve_resume
from msf_scale.export import load_model
from msf_scale.ema import ModelEma
from msf_scale.metrics import device_peak_tflops, mfu, read_jsonl, topk_correct, train_flops_per_clip, truncate_jsonl
from msf_scale.models.blocks import DropPath


class Recorder:
    """Wraps train.py's model, loader and optimizer: the initial weights, every batch handed out, every
    set_epoch call, and at each optimizer.step the gradients and learning rates it sees."""

    def __init__(self, monkeypatch):
        self.initial, self.model, self.batches, self.set_epochs, self.steps = None, None, [], [], []
        real_create, real_loader, real_opt = setup_mod.build_model, builders_mod.build_train_loader, setup_mod.build_optimizer

        def create(*a, **kw):
            self.model = real_create(*a, **kw)
            self.initial = copy.deepcopy(self.model.state_dict())
            return self.model

        def loader(*a, **kw):
            return _RecordingLoader(real_loader(*a, **kw), self)

        def optimizer(*a, **kw):
            opt = real_opt(*a, **kw)
            names = {id(p): n for n, p in self.model.named_parameters()}

            def recorded(o, args, kwargs):
                self.steps.append({
                    "grads": {names[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"]},
                    "lrs": {names[id(p)]: g["lr"] for g in o.param_groups for p in g["params"]}})
            opt.register_step_pre_hook(recorded)
            return opt

        import accelerate
        real_clip = accelerate.Accelerator.clip_grad_norm_

        def clip(acc, parameters, *a, **kw):   # the gradients before clipping: their scale is what clipping hides
            parameters = list(parameters)
            names = {id(p): n for n, p in self.model.named_parameters()}
            self.unclipped.append({names[id(p)]: p.grad.detach().clone() for p in parameters})
            return real_clip(acc, parameters, *a, **kw)

        self.unclipped = []
        monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", clip)
        monkeypatch.setattr(setup_mod, "build_model", create)
        monkeypatch.setattr(builders_mod, "build_train_loader", loader)
        monkeypatch.setattr(setup_mod, "build_optimizer", optimizer)


class _RecordingLoader:
    def __init__(self, loader, rec: Recorder):
        self.loader, self.rec = loader, rec

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):          # stats and anything else train.py reads
        return getattr(self.loader, name)

    def set_epoch(self, epoch, start_batch=0):
        self.rec.set_epochs.append((epoch, start_batch))
        return self.loader.set_epoch(epoch, start_batch=start_batch)

    def __iter__(self):
        for video, label in self.loader:
            self.rec.batches.append((video.clone(), label.clone()))
            yield video, label


def smoothed_ce(logits, labels, eps):
    """Cross-entropy against (1 - eps) one-hot + eps / C uniform, averaged over the batch."""
    logp = logits.log_softmax(-1)
    target = torch.full_like(logp, eps / logits.shape[-1])
    target[torch.arange(len(labels)), labels] += 1 - eps
    return -(target * logp).sum(-1).mean()


def cosine_factor(step, total, floor):
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total))


# batch 4 x 2 micro-batches = 8 clips per update, 4 updates per epoch on the 32 clips; no drop path (its masks
# are random), weight decay on; peak lr = 0.064 x 8 / 256 = 2e-3; clipping at 0.05 binds (checked below)
STEP_ARGS = ("--epochs", "1", "--schedule.warmup_epochs", "0", "--max-steps", "2", "--train.batch_size", "4",
             "--train.grad_accum", "2", "--model.drop_path_rate", "0", "--optim.lr", "0.064",
             "--optim.clip_grad", "0.05", "--optim.label_smoothing", "0.1", "--optim.weight_decay", "0.05",
             "--schedule.min_lr", "1e-4")


def test_two_updates_match_a_hand_computation(tiny_argv, monkeypatch):
    rec = Recorder(monkeypatch)
    train_mod.main(tiny_argv(*STEP_ARGS))
    assert len(rec.steps) == 2 and len(rec.batches) == 4                      # one optimizer.step per 2 batches
    assert len(rec.unclipped) == 2                                             # clipped once before each step
    replica = copy.deepcopy(rec.model)
    replica.load_state_dict(rec.initial)
    replica.train()
    nwd = replica.no_weight_decay()
    params = dict(replica.named_parameters())
    decay = [p for n, p in params.items() if p.ndim > 1 and n not in nwd]
    no_decay = [p for n, p in params.items() if not (p.ndim > 1 and n not in nwd)]
    peak, total, floor = 0.064 * 8 / 256, 4, 1e-4 / (0.064 * 8 / 256)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.999), eps=1e-8)
    for k, seen in enumerate(rec.steps):
        replica.zero_grad()
        micro = rec.batches[2 * k:2 * k + 2]
        loss = sum(smoothed_ce(replica(v), y, 0.1) for v, y in micro) / len(micro)   # the mean over micro-batches
        loss.backward()
        for name, p in params.items():                                         # the mean, not the sum
            assert torch.allclose(rec.unclipped[k][name], p.grad, rtol=1e-4, atol=1e-9 + 1e-4 * p.grad.abs().max())
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params.values()))
        assert norm > 0.05 * 1.5, "the test needs clipping to bind"
        for p in params.values():
            p.grad.mul_(0.05 / (norm + 1e-6))
        for name, p in params.items():
            got = seen["grads"][name]
            assert torch.allclose(got, p.grad, rtol=1e-4, atol=1e-9 + 1e-4 * p.grad.abs().max()), (k, name)
        lr = peak * cosine_factor(k, total, floor)
        assert list(seen["lrs"].values()) == pytest.approx([lr] * len(params), rel=1e-12), k
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    trained = rec.model.state_dict()
    for name, p in replica.state_dict().items():
        assert torch.allclose(trained[name], p, rtol=1e-5, atol=1e-7), name


def test_loss_logged_is_the_smoothed_cross_entropy(tiny_argv, tmp_path, monkeypatch):
    """The first logged loss is the label-smoothed loss of the first update's clips at the initial weights."""
    rec = Recorder(monkeypatch)
    train_mod.main(tiny_argv(*STEP_ARGS[:-2], "--max-steps", "1"))
    replica = copy.deepcopy(rec.model)
    replica.load_state_dict(rec.initial)
    replica.train()
    with torch.no_grad():
        want = sum(smoothed_ce(replica(v), y, 0.1) * len(y) for v, y in rec.batches[:2]) / 8
    first = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r][0]
    assert first["loss"] == pytest.approx(want.item(), rel=1e-5)


# --- EMA -----------------------------------------------------------------------------------------------------
def test_ema_update_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.6, device=torch.device("cpu"))
    e = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n_update in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.6, (1 + n_update) / (10 + n_update))           # warm-up, then the decay
        for n, p in model.named_parameters():
            e[n] = d * e[n] + (1 - d) * p.detach()
            assert torch.allclose(dict(ema.module.named_parameters())[n], e[n], atol=1e-6), (n_update, n)
    assert ema.num_updates == 5
    state = ema.state_dict()
    other = ModelEma(torch.nn.Linear(3, 2), decay=0.6, device=torch.device("cpu"))
    other.load_state_dict(state)
    assert other.num_updates == 5 and all(torch.equal(a, b) for a, b in
                                          zip(other.module.state_dict().values(), ema.module.state_dict().values()))


def test_ema_resumes_exactly(tiny_argv, tmp_path):
    """EMA weights after 2 + 2 steps with a resume in between equal those of 4 uninterrupted steps."""
    args = ("--epochs", "1", "--schedule.warmup_epochs", "0", "--train.ema", "true", "--train.ema_decay", "0.5",
            "--train.ckpt_every", "2", "--model.drop_path_rate", "0", "--optim.lr", "0.05")
    train_mod.main(tiny_argv(*args, run="full"))
    train_mod.main(tiny_argv(*args, "--max-steps", "2", run="part"))
    train_mod.main(tiny_argv(*args, "--resume", "auto", run="part"))
    full, part = load_model(tmp_path / "full", ema=True), load_model(tmp_path / "part", ema=True)
    plain = load_model(tmp_path / "full")
    for (n, a), b, c in zip(full.state_dict().items(), part.state_dict().values(), plain.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), n
    assert any(not torch.allclose(a, c) for a, c in zip(full.state_dict().values(), plain.state_dict().values()))


# --- resume --------------------------------------------------------------------------------------------------
def test_resume_remaps_the_data_position_when_the_batch_changes(tiny_argv, monkeypatch):
    """Saved after 1 batch of 8 clips: resumed with batches of 4, the loader must skip 2 batches, not 1."""
    args = ("--epochs", "1", "--schedule.warmup_epochs", "0", "--train.ckpt_every", "1")
    train_mod.main(tiny_argv(*args, "--max-steps", "1"))
    rec = Recorder(monkeypatch)
    train_mod.main(tiny_argv(*args, "--max-steps", "2", "--resume", "auto", "--train.batch_size", "4"))
    assert rec.set_epochs[0] == (0, 2)


def _fake_ckpt(run, step):
    d = run / "ckpt" / f"step_{step:07d}"
    d.mkdir(parents=True)
    (d / "COMPLETE").write_text(f"{step}\n")
    return d


def test_resolve_resume_path_auto_and_none(tmp_path):
    run = tmp_path / "run"
    s2, s4 = _fake_ckpt(run, 2), _fake_ckpt(run, 4)
    (run / "ckpt" / "step_0000006.tmp").mkdir()
    assert resolve_resume(str(s2), run) == s2                        # a checkpoint path: that checkpoint
    assert resolve_resume(str(s4), tmp_path / "elsewhere") == s4
    assert resolve_resume("auto", run) == s4                         # auto: the newest complete one
    assert resolve_resume(str(run), tmp_path / "elsewhere") == s4    # a run dir: its newest
    assert resolve_resume("auto", tmp_path / "fresh") is None
    assert resolve_resume(None, tmp_path / "fresh") is None
    with pytest.raises(ValueError, match="already holds checkpoints"):
        resolve_resume(None, run)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(run / "ckpt" / "step_0000006.tmp"), run)


def test_truncate_jsonl_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)] + [{"step": 4, "test_top1": 0.5}]
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    truncate_jsonl(path, 3)
    assert read_jsonl(path) == rows[:3]
    truncate_jsonl(path, 10)
    assert read_jsonl(path) == rows[:3]
    truncate_jsonl(tmp_path / "missing.jsonl", 3)                    # nothing to do, no file made
    assert not (tmp_path / "missing.jsonl").exists()


# --- DropPath, top-k -----------------------------------------------------------------------------------------
def test_drop_path_keeps_the_expectation():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    x = torch.ones(20000, 3, 2)
    y = dp(x)
    kept = y[:, 0, 0] != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.75))                # kept samples rescaled
    assert (y[~kept] == 0).all() and (y == y[:, :1, :1]).all()                     # whole samples dropped
    assert abs(kept.float().mean().item() - 0.75) < 0.02 and abs(y.mean().item() - 1.0) < 0.03
    assert torch.equal(dp.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)


def test_topk_correct_on_hand_made_logits():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.9, 0.4],    # ranks: 5, 1, 6, 4, 2, 0, 3
                           [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    labels = torch.tensor([1, 0, 1])
    top1, top2, top5 = topk_correct(logits, labels, (1, 2, 5))
    assert top1.tolist() == [False, True, False]
    assert top2.tolist() == [True, True, False]
    assert top5.tolist() == [True, True, False]                    # label 1 is 6th of 7 in the last row
    (top10,) = topk_correct(logits, labels, (10,))                  # k beyond the class count: every label
    assert top10.all()
    first = topk_correct(logits[:, :5], torch.tensor([4, 0, 0]), (5,))[0]
    assert first.all()


def test_training_flops_and_mfu_by_value():
    """2 FLOPs per MAC, backward twice the forward: 6 x MACs; MFU = achieved / peak FLOP/s (None without a peak)."""
    assert train_flops_per_clip(1000) == 6000
    assert mfu(6e12, 10.0, 120.0) == pytest.approx(0.5)
    assert mfu(6e12, 10.0, None) is None
    assert device_peak_tflops(None, torch.device("cpu")) is None and device_peak_tflops(50.0, torch.device("cpu")) == 50.0
