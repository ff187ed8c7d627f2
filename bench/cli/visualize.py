"""`tokenbench visualize`: draw which patches each reduction kept, dropped or merged, like the papers' figures.

The method runs once on one image in trace mode, where every token carries the set of input patches it
stands for. After each block that changed the tokens, a panel shows the image with dropped patches
washed out (EViT, ATS, top-k) and every group of patches now held by one token (a ToMe merge, EViT's
fused token) painted in its mean colour and outlined; a patch that is still its own token is shown as is.
"""

from __future__ import annotations

from pathlib import Path

from tokenbench.cli.options import add_knob_options, add_model_options, one_setting
from tokenbench.errors import BenchError


def add_parser(sub):
    p = sub.add_parser("visualize", help="draw the patches a method kept, dropped or merged at each stage")
    add_model_options(p)
    p.add_argument("--method", required=True, help="one registered method (see `tokenbench methods`)")
    add_knob_options(p, many=False, default_help="default: the first value of the method's sweep")
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--out", required=True, help="PNG file to write")
    return p


def run(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image
    from timm.data import resolve_data_config

    from tokenbench import api
    from tokenbench.data import images as data
    from tokenbench.data import registry as datasets
    from tokenbench.models import loading as models
    from tokenbench.reduce.knobs import knob_label
    from tokenbench.reduce.vit import TokenReducedViT
    from tokenbench.report.figures import save_png
    from tokenbench.report.patches import describe, patch_owners, render

    knobs = one_setting(args.method, args)
    loaded = models.load_model(args.model, args.checkpoint, args.pretrained)
    torch.manual_seed(0)
    model = api.apply(loaded.model, args.method, **knobs)
    if not isinstance(model, TokenReducedViT) or model.vit.patch_embed.proj.weight.ndim != 4:
        raise BenchError("visualize draws block-level methods on image ViTs")
    path = Path(args.image)
    if not path.is_file() or not data.is_image(path.name):
        raise BenchError(f"--image {args.image}: not an image file")
    try:
        image = datasets.eval_transform(loaded.model)(Image.open(path).convert("RGB"))
    except OSError as err:
        raise BenchError(f"--image {args.image}: cannot read it ({err})") from None
    config = resolve_data_config({}, model=loaded.model)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    picture = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    scale = max(1, 224 // picture.shape[0])  # small inputs (32x32 digits) are enlarged to be seen
    picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    grid = tuple(model.vit.patch_embed.grid_size)

    stages = [(block, source[0]) for block, source in model.trace(image[None])]
    label = knob_label(knobs)
    panels = [("input", f"{grid[0] * grid[1]} patches", picture)]
    for block, source in stages:
        owners = patch_owners(source)
        panels.append((f"after block {block}: {source.shape[0]} tokens", describe(owners),
                       render(picture, owners, grid)))
        print(f"block {block:2d}: {source.shape[0]} tokens; patches {panels[-1][1]}")
    if not stages:
        print(f"{args.method} {label} changed no tokens on this image")

    cols = min(len(panels), 5)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, subtitle, panel) in zip(axes.flat, panels):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(f"{title}\n{subtitle}", fontsize=8)
    fig.suptitle(f"{args.method} {label} on {loaded.name}: washed out = dropped, flat outlined = merged",
                 fontsize=9)
    print(f"wrote {save_png(fig, args.out, dpi=100)}")
    return 0
