"""`tokenbench dvt-ablation`: DVT's reuse ablation, per-exit top-1 and cumulative GMACs of each cascade.

Like the paper's table: the same cascade trained with and without feature / relationship reuse, every
exit evaluated on every image (no early exit), with the cost of answering at that exit (stages 1..k and
their reuse modules, from the ledger).
"""

from __future__ import annotations

from pathlib import Path

from tokenbench.errors import BenchError

ASSET_GLOB = "dvt_digits*.pt"


def add_parser(sub):
    p = sub.add_parser("dvt-ablation", help="DVT with and without feature / relationship reuse: per-exit top-1, GMACs")
    p.add_argument("checkpoints", nargs="*", help=f"DVT checkpoints (default: the shipped {ASSET_GLOB})")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    return p


def reuse_label(cascade) -> str:
    names = [n for n, on in (("feature", cascade.feature_reuse), ("relation", cascade.relation_reuse)) if on]
    return " + ".join(names) or "none"


def exit_accuracy(cascade, images, labels, batch_size=256) -> list[float]:
    import torch

    hits = None
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            outs = cascade.forward_exits(images[i:i + batch_size])
            batch = [(o.argmax(-1) == labels[i:i + batch_size]).sum().item() for o in outs]
            hits = batch if hits is None else [a + b for a, b in zip(hits, batch)]
    return [h / len(labels) for h in hits]


def run(args):
    import torch
    from tabulate import tabulate

    from tokenbench import datasets, models
    from tokenbench.methods.dvt.architecture import DVTCascade
    from tokenbench.harness import preload

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.checkpoints] or models.shipped(ASSET_GLOB)
    if not paths:
        raise BenchError(f"no DVT checkpoints given and none shipped matching {ASSET_GLOB}")
    rows, split = [], None
    for path in paths:
        loaded = models.load_model(checkpoint=path)
        cascade = loaded.model
        if not isinstance(cascade, DVTCascade):
            raise BenchError(f"{path} holds {loaded.name}, not a DVT cascade")
        if split is None:
            ds = datasets.build_dataset(args.dataset, args.split, datasets.eval_transform(cascade), args.data_root)
            split = preload(ds.dataset)
        images, labels = split
        accs = exit_accuracy(cascade, images, labels)
        gmacs = cascade.exit_gmacs(images[:1])
        row = {"reuse": reuse_label(cascade), "checkpoint": path.name}
        for k, (acc, g) in enumerate(zip(accs, gmacs), 1):
            row[f"exit {k} top-1 %"] = round(100 * acc, 2)
            row[f"exit {k} GMACs"] = round(float(g), 5)
        rows.append(row)
    print(f"{args.dataset}/{args.split}, {len(split[1])} images; GMACs are cumulative (stages 1..k with reuse)")
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return 0
