"""Training: the loop behind `tokenbench train`, used to make the embedded default checkpoints.

Supervised training with AdamW (or a method's own optimiser), linear warm-up then cosine decay and label smoothing, under one of two
recipes (`RECIPES`): `light` (light geometric augmentation; every shipped checkpoint before the CIFAR-10
v2 reference) and `strong` (TrivialAugment, mixup/cutmix, stochastic depth and an EMA of the weights: the
small-dataset ViT recipe of DeiT and Lee et al. 2021, cut to a CPU budget). Deterministic for a given seed
on one device and thread count.

With a `state_file` the run saves its state after every epoch (data order and random streams included).
The full state (weights and optimiser in float32) resumes to exactly the weights of an uninterrupted run.
A compact state (`TrainConfig.compact_state`: weights and EMA in float16, no optimiser moments) is small
enough to commit between sessions of a long run; on resume the AdamW moments are rebuilt from
`MOMENT_REBUILD_STEPS` batches at learning rate 0, so the run continues close to, not exactly on, the
uninterrupted trajectory.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tokenbench.errors import BenchError


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    seed: int = 0
    mixup: float = 0.0  # timm Mixup's alphas; both 0: no mixing
    cutmix: float = 0.0
    mix_prob: float = 1.0  # the fraction of batches mixed
    ema_decay: float = 0.0  # 0: no EMA; else the EMA of the weights is evaluated, probed and returned
    compact_state: bool = False
    optimizer: str = "adamw"  # or "sgd": plain SGD, no momentum (LTMP's official threshold training)
    probes: dict[str, Callable] = field(default_factory=dict)  # name -> fn(model) -> float, run every probe_every epochs
    probe_every: int = 5


RECIPES = {
    "light": dict(augment="light"),
    "strong": dict(augment="trivial", mixup=0.8, cutmix=1.0, mix_prob=0.5, ema_decay=0.999, drop_path=0.1,
                   compact_state=True),
}
"""Named training recipes: the augmentation (`augment`, applied by the command), `drop_path` (a model
argument at training time only) and the `TrainConfig` fields they set."""

MOMENT_REBUILD_STEPS = 50


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def classification_loss(model: nn.Module, images, labels, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader, device="cpu") -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return correct / max(1, total)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser groups of the trainable parameters: weight decay on matrices only, and a parameter's own
    `lr_scale` attribute (default 1) multiplying the scheduled learning rate (LTMP's two threshold rates)."""
    groups: dict = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (p.ndim > 1, getattr(p, "lr_scale", 1.0))
            groups.setdefault(key, []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), params in groups.items()]


def half(state: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save_state(path, model, optimizer, step, history, order: torch.Generator, identity: dict, ema=None,
               compact: bool = False) -> None:
    """Everything a resumed run needs, written atomically (a crash mid-write keeps the previous epoch's).

    `compact`: weights and EMA in float16 and no optimiser moments (rebuilt on resume)."""
    weights = model.state_dict()
    state = {"identity": identity, "model": half(weights) if compact else weights,
             "optimizer": None if compact else optimizer.state_dict(),
             "ema": None if ema is None else (half(ema.module.state_dict()) if compact else ema.module.state_dict()),
             "step": step, "history": history, "order": order.get_state(), "rng": torch.get_rng_state(),
             "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_into(module: nn.Module, state: dict) -> None:
    """Load a saved state dict, float16 or not, in the module's own dtypes."""
    own = module.state_dict()
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def rebuild_moments(model, optimizer, batches, loss_fn, steps: int, log) -> None:
    """Re-estimate AdamW's moments after a compact resume: `steps` batches at learning rate 0."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    model.train()
    for i, (images, labels) in enumerate(batches):
        if i == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, images, labels).backward()
        optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    log(f"rebuilt the optimiser moments from {steps} batches at learning rate 0")


def train(model: nn.Module, train_set, cfg: TrainConfig, loss_fn=None, val_loader=None, device="cpu", log=print,
          state_file=None, identity: dict | None = None):
    """Train `model` in place; `loss_fn(model, images, labels)` defaults to cross-entropy on its logits.

    `state_file`: save the run's state there after every epoch and, if it exists, resume from it; its
    recorded `identity` (the run's settings) must equal this run's. With `cfg.ema_decay`, the model's
    weights end as the EMA's when it scores higher on `val_loader` (the history records both).
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if mixing and loss_fn is not None:
        raise BenchError("mixup/cutmix need the plain classification loss: a method's own loss cannot take mixed labels")
    mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                  label_smoothing=cfg.label_smoothing, num_classes=model.num_classes) if mixing else None
    soft_ce = SoftTargetCrossEntropy()
    loss_fn = loss_fn or (lambda m, x, y: classification_loss(m, x, y, cfg.label_smoothing))
    order = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=order)
    groups = parameter_groups(model, cfg.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr) if cfg.optimizer == "sgd" else torch.optim.AdamW(groups, lr=cfg.lr)
    total, warmup = cfg.epochs * len(loader), cfg.warmup_epochs * len(loader)
    step, history = 0, []
    model.to(device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, device=device) if cfg.ema_decay else None
    if state_file is not None and os.path.exists(state_file):
        saved = torch.load(state_file, map_location=device, weights_only=False)
        if saved["identity"] != identity:
            raise BenchError(f"{state_file} is a partial run with other settings ({saved['identity']}); "
                             "rerun with those or delete it")
        load_into(model, saved["model"])
        if ema is not None:
            load_into(ema.module, saved["ema"])
        step, history = saved["step"], saved["history"]
        order.set_state(saved["order"])
        torch.set_rng_state(saved["rng"])
        np.random.set_state(saved["numpy_rng"])
        random.setstate(saved["python_rng"])
        log(f"resuming after epoch {len(history)} from {state_file}")
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
        else:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, warmup, cfg.lr) * group["lr_scale"]
            rebuild_moments(model, optimizer, ((x.to(device), y.to(device)) for x, y in loader), loss_fn,
                            MOMENT_REBUILD_STEPS, log)
    for epoch in range(len(history), cfg.epochs):
        model.train()
        start, running = time.perf_counter(), 0.0
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, warmup, cfg.lr) * group["lr_scale"]
            images, labels = images.to(device), labels.to(device)
            if mixer is not None:
                images, targets = mixer(images, labels)
                loss = soft_ce(model(images), targets)
            else:
                loss = loss_fn(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model, step=step)
            running += loss.item()
            step += 1
        entry = {"epoch": epoch + 1, "loss": running / len(loader), "seconds": time.perf_counter() - start}
        if val_loader is not None:
            entry["val_top1"] = accuracy(model, val_loader, device)
            if ema is not None:
                entry["ema_val_top1"] = accuracy(ema.module, val_loader, device)
        if cfg.probes and ((epoch + 1) % cfg.probe_every == 0 or epoch + 1 == cfg.epochs):
            probed = ema.module if ema is not None else model
            entry["probes"] = {name: probe(probed) for name, probe in cfg.probes.items()}
        history.append(entry)
        if state_file is not None:
            save_state(state_file, model, optimizer, step, history, order, identity, ema, cfg.compact_state)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
    if ema is not None and ends_with_ema(history):
        model.load_state_dict(ema.module.state_dict())
        log("the EMA weights score higher on the held-out split: the model ends with them")
    model.eval()
    return history


def ends_with_ema(history: list[dict]) -> bool:
    """Whether `train` ends with the EMA's weights: they scored higher on the held-out split in the last epoch."""
    return bool(history) and history[-1].get("ema_val_top1", 0) > history[-1].get("val_top1", 0)


def final_val_top1(history: list[dict]) -> float | None:
    """The held-out top-1 of the weights `train` ends with (the EMA's where it chose them), None without val."""
    if not history:
        return None
    return history[-1].get("ema_val_top1" if ends_with_ema(history) else "val_top1")
