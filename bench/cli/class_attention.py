"""`tokenbench class-attention`: is the backbone's class attention informative, block by block?"""

from __future__ import annotations

from tokenbench.cli.options import add_model_options


def add_parser(sub):
    p = sub.add_parser("class-attention",
                       help="top-1 keeping the most, random or least class-attended tokens at each reduction block")
    add_model_options(p)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--keep", type=float, default=0.5, help="fraction of patch tokens kept at each block (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random order")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    return p


def run(args):
    import torch
    from tabulate import tabulate

    from tokenbench import api
    from tokenbench.errors import BenchError
    from tokenbench.measure.class_attention import probe
    from tokenbench.models import loading as models

    if not 0 < args.keep < 1:
        raise BenchError(f"--keep {args.keep}: must be between 0 and 1 (exclusive)")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = models.load_model(args.model, args.checkpoint, args.pretrained)
    model = loaded.model
    if getattr(model, "cls_token", None) is None:
        raise BenchError(f"{loaded.name} has no class token: there is no class attention to probe")
    images, labels = api.load_images(model, args.dataset, args.split, args.data_root)
    table = probe(model, images, labels, keep=args.keep, seed=args.seed)
    print(f"{loaded.name} ({loaded.weights}) on {args.dataset}/{args.split} ({len(labels)} images): keep "
          f"{args.keep:g} of the patch tokens after attention in the blocks named (0-based); gap: mean distance in "
          "patches to the nearest kept patch; minus random: points, paired 95% interval")
    signed = {"minus random", "95% low", "95% high"}
    formats = ["+.2f" if c in signed else ".2g" if c == "McNemar p" else ".2f" for c in table.columns]
    rows = [[None if v != v else v for v in row] for row in table.itertuples(index=False)]  # NaN: not against random
    print(tabulate(rows, headers=list(table.columns), floatfmt=formats, missingval=""))
    return 0
