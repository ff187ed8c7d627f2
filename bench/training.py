"""Training: the loop behind `tokenbench train`, used to make the embedded default checkpoints.

Plain supervised training with AdamW, linear warm-up then cosine decay, label smoothing and light
augmentation. Deterministic for a given seed on one device and thread count. With a `state_file` the
run saves its whole state after every epoch (weights, optimiser, data order and random streams), so an
interrupted run resumes where it stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

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


def save_state(path, model, optimizer, step, history, order: torch.Generator, identity: dict) -> None:
    """Everything a resumed run needs, written atomically (a crash mid-write keeps the previous epoch's)."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "history": history, "order": order.get_state(), "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def train(model: nn.Module, train_set, cfg: TrainConfig, loss_fn=None, val_loader=None, device="cpu", log=print,
          state_file=None, identity: dict | None = None):
    """Train `model` in place; `loss_fn(model, images, labels)` defaults to cross-entropy on its logits.

    `state_file`: save the run's state there after every epoch and, if it exists, resume from it; its
    recorded `identity` (the run's settings) must equal this run's.
    """
    torch.manual_seed(cfg.seed)
    loss_fn = loss_fn or (lambda m, x, y: classification_loss(m, x, y, cfg.label_smoothing))
    order = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=order)
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total, warmup = cfg.epochs * len(loader), cfg.warmup_epochs * len(loader)
    step, history = 0, []
    model.to(device)
    if state_file is not None and os.path.exists(state_file):
        saved = torch.load(state_file, map_location=device, weights_only=False)
        if saved["identity"] != identity:
            raise BenchError(f"{state_file} is a partial run with other settings ({saved['identity']}); "
                             "rerun with those or delete it")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, history = saved["step"], saved["history"]
        order.set_state(saved["order"])
        torch.set_rng_state(saved["rng"])
        log(f"resuming after epoch {len(history)} from {state_file}")
    for epoch in range(len(history), cfg.epochs):
        model.train()
        start, running = time.perf_counter(), 0.0
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, warmup, cfg.lr)
            loss = loss_fn(model, images.to(device), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        entry = {"epoch": epoch + 1, "loss": running / len(loader), "seconds": time.perf_counter() - start}
        if val_loader is not None:
            entry["val_top1"] = accuracy(model, val_loader, device)
        history.append(entry)
        if state_file is not None:
            save_state(state_file, model, optimizer, step, history, order, identity)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
    model.eval()
    return history
