"""`tokenbench train`: train a backbone (or fine-tune one with a method in place) and save a checkpoint."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from bench import data, models
from bench.registry import BenchError
from bench.train import TrainConfig, accuracy, train


def add_parser(sub):
    p = sub.add_parser("train", help="train a model on a dataset and save a tokenbench checkpoint")
    p.add_argument("--model", default="vit_digits", help="timm model name (default: vit_digits)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu")
    return p


def augmenting(eval_tf):
    """Light geometric augmentation in front of the model's eval transform."""
    return transforms.Compose([transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)), eval_tf])


def run(args):
    if args.epochs < 1:
        raise BenchError("--epochs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    probe = data.build_dataset(args.dataset, "test", transform=lambda im: im, root=args.data_root)
    model = models.create(args.model, num_classes=probe.num_classes)
    eval_tf = data.eval_transform(model)
    train_set = data.build_dataset(args.dataset, "train", augmenting(eval_tf), args.data_root).dataset
    val_loader = DataLoader(data.build_dataset(args.dataset, "val", eval_tf, args.data_root).dataset, batch_size=256)
    test_loader = DataLoader(data.build_dataset(args.dataset, "test", eval_tf, args.data_root).dataset, batch_size=256)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    history = train(model, train_set, cfg, val_loader=val_loader, device=args.device)
    test_top1 = accuracy(model, test_loader, args.device)
    command = (f"tokenbench train --model {args.model} --dataset {args.dataset} --epochs {args.epochs} "
               f"--batch-size {args.batch_size} --lr {args.lr} --seed {args.seed} --out {args.out}")
    meta = {
        "command": command,
        "dataset": args.dataset, "test_top1": test_top1, "val_top1": history[-1].get("val_top1"),
        "epochs": args.epochs, "seed": args.seed, "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
    }
    models.save_checkpoint(args.out, model.cpu(), args.model, meta)
    print(f"test top-1 {test_top1:.4f}; wrote {args.out}")
    return 0
