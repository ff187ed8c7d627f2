"""`tokenbench profile`: tokens entering each block and GMACs per image of one method, without a dataset.

Fixed-rate methods (top-k, EViT, ToMe) cost the same on any input, so random images do. Adaptive ones
(ATS) depend on the image: give `--images FOLDER` to profile them on real images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tabulate import tabulate

from bench import data, models
from bench.ledger import measure_gmacs
from bench.registry import BenchError, Method, get_method, knob_by_name


def add_model_and_method_args(p) -> None:
    """--model/--checkpoint/--pretrained, --method and one value per knob (shared with `visualize`)."""
    p.add_argument("--model", default="vit_digits", help="timm ViT name (default: the embedded vit_digits)")
    p.add_argument("--checkpoint", default=None, help="local weights file (read with weights_only=True)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub or its cache)")
    p.add_argument("--method", required=True, help="one registered method (see `tokenbench methods`)")
    for knob in knob_by_name().values():
        p.add_argument(f"--{knob.name}", default=None, metavar="V",
                       help=f"{knob.help} (default: the first value of the method's sweep)")


def method_knobs(method: Method, args) -> dict:
    """The knob values given on the command line, the first sweep value for the others; checked."""
    given = {name for name in knob_by_name() if getattr(args, name, None) is not None}
    own = {k.name for k in method.knobs}
    unknown = sorted(given - own)
    if unknown:
        knobs = ", ".join(sorted(own)) or "none"
        raise BenchError(f"--{unknown[0]} is not a knob of {method.name} (its knobs: {knobs})")
    return {k.name: k.parse(getattr(args, k.name)) if k.name in given else k.sweep[0] for k in method.knobs}


def build_from_args(args):
    """(loaded backbone, method, knobs, model with the method applied) from the shared arguments."""
    loaded = models.load_model(args.model, args.checkpoint, args.pretrained)
    method = get_method(args.method)
    if method.needs_training or method.needs_calibration:
        raise BenchError(f"{method.name} needs {'trained weights' if method.needs_training else 'a held-out split'}; "
                         "profile it with `tokenbench bench`")
    knobs = method_knobs(method, args)
    torch.manual_seed(0)
    return loaded, method, knobs, method.build(loaded.model, **knobs).eval()


def read_images(folder: str, model, limit: int) -> torch.Tensor:
    """Up to `limit` images found under `folder` (sorted paths), through the model's eval preprocessing."""
    root = Path(folder)
    if not root.is_dir():
        raise BenchError(f"--images {folder}: not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and data.is_image(p.name))[:limit]
    if not paths:
        raise BenchError(f"--images {folder}: no images found")
    transform = data.eval_transform(model)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def input_shape(model) -> tuple:
    size = model.pretrained_cfg.get("input_size")
    return tuple(size) if size else (3, *model.patch_embed.img_size)


def add_parser(sub):
    p = sub.add_parser("profile", help="print tokens per block and GMACs per image of one method (no dataset)")
    add_model_and_method_args(p)
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="profile on the images under FOLDER (for adaptive methods); default: random images")
    p.add_argument("--count", type=int, default=8, help="how many images (random, or the first in FOLDER)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images")
    return p


def spread(values: torch.Tensor, digits: int) -> str:
    """'v' when every image has the same value, else 'mean (min-max)'."""
    lo, hi, mean = values.min().item(), values.max().item(), values.mean().item()
    return f"{lo:.{digits}f}" if lo == hi else f"{mean:.{digits + 1}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def run(args):
    if args.count < 1:
        raise BenchError("--count must be at least 1")
    loaded, method, knobs, model = build_from_args(args)
    if args.images:
        images = read_images(args.images, loaded.model, args.count)
        source = f"{len(images)} images from {args.images}"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.count, *input_shape(loaded.model), generator=generator)
        source = f"{args.count} random images"
    dense = measure_gmacs(get_method("none").build(loaded.model), images[:1]).gmacs.item()
    ledger = measure_gmacs(model, images)
    tokens = ledger.tokens_per_block()
    label = " ".join(f"{k}={v:g}" for k, v in knobs.items()) or "-"
    print(f"{method.name} {label} on {loaded.name} ({loaded.weights}), {source} of shape "
          f"{tuple(images.shape[1:])}")
    print(tabulate([[i, spread(tokens[:, i], 0)] for i in range(tokens.shape[1])], headers=["block", "tokens in"]))
    gmacs = ledger.gmacs
    print(f"GMACs per image: {spread(gmacs, 4)}, dense {dense:.4f} ({gmacs.mean().item() / dense:.3f} x dense)")
    return 0
