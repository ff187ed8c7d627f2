"""`tokenbench profile`: tokens entering each block and GMACs per image of one method, without a dataset.

Fixed-rate methods (top-k, EViT, ToMe) cost the same on any input, so random images do. Adaptive ones
(ATS) depend on the image: give `--images FOLDER` to profile them on real images.
"""

from __future__ import annotations

from tokenbench.cli.options import add_knob_options, add_model_options, one_setting
from tokenbench.errors import BenchError


def add_parser(sub):
    p = sub.add_parser("profile", help="print tokens per block and GMACs per image of one method (no dataset)")
    add_model_options(p)
    p.add_argument("--method", required=True, help="one registered method (see `tokenbench methods`)")
    add_knob_options(p, many=False, default_help="default: the first value of the method's sweep")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="profile on the images under FOLDER (for adaptive methods); default: random images")
    p.add_argument("--count", type=int, default=8, help="how many images (random, or the first in FOLDER)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images")
    return p


def read_images(folder: str, model, limit: int):
    """Up to `limit` images found under `folder` (sorted paths), through the model's eval preprocessing."""
    from pathlib import Path

    import torch
    from PIL import Image

    from tokenbench.data import images as data
    from tokenbench.data import registry as datasets

    root = Path(folder)
    if not root.is_dir():
        raise BenchError(f"--images {folder}: not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and data.is_image(p.name))[:limit]
    if not paths:
        raise BenchError(f"--images {folder}: no images found")
    transform = datasets.eval_transform(model)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def spread(values, digits: int) -> str:
    """'v' when every image has the same value, else 'mean (min-max)'."""
    lo, hi, mean = values.min().item(), values.max().item(), values.mean().item()
    return f"{lo:.{digits}f}" if lo == hi else f"{mean:.{digits + 1}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def run(args):
    import torch
    from tabulate import tabulate

    from tokenbench import api
    from tokenbench.models import loading as models
    from tokenbench.reduce.knobs import knob_label
    from tokenbench.reduce.ledger import measure_gmacs

    if args.count < 1:
        raise BenchError("--count must be at least 1")
    knobs = one_setting(args.method, args)
    loaded = models.load_model(args.model, args.checkpoint, args.pretrained)
    torch.manual_seed(0)
    model = api.apply(loaded.model, args.method, **knobs)
    if args.images:
        images = read_images(args.images, loaded.model, args.count)
        source = f"{len(images)} images from {args.images}"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randn(args.count, *models.input_shape(loaded.model), generator=generator)
        source = f"{args.count} random images"
    dense = api.gmacs(loaded.model, images[:1]).item()
    ledger = measure_gmacs(model, images)
    tokens = ledger.tokens_per_block()
    print(f"{args.method} {knob_label(knobs)} on {loaded.name} ({loaded.weights}), {source} of shape "
          f"{tuple(images.shape[1:])}")
    print(tabulate([[i, spread(tokens[:, i], 0)] for i in range(tokens.shape[1])], headers=["block", "tokens in"]))
    gmacs = ledger.gmacs
    print(f"GMACs per image: {spread(gmacs, 4)}, dense {dense:.4f} ({gmacs.mean().item() / dense:.3f} x dense)")
    return 0
