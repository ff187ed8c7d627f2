"""`tokenbench dvt-ablation`: DVT's reuse ablation (per-exit top-1 and GMACs of each cascade) and its
exit-criterion comparison (test top-1 at GMACs budgets per criterion); the tables are
`ablation`'s. A plugin command: the `tokenbench.commands` entry point `dvt-ablation`."""

from __future__ import annotations

from pathlib import Path

from tokenbench.reduce import BenchError


def add_parser(sub):
    p = sub.add_parser("dvt-ablation", help="DVT: per-exit top-1 and GMACs with and without reuse; exit criteria at budgets")
    p.add_argument("checkpoints", nargs="*", help="DVT checkpoints (default: the shipped dvt_DATASET*.pt)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split the tables report")
    p.add_argument("--budgets", default="0.2,0.3,0.4,0.6",
                   help="criterion table: GMACs budgets as fractions of running every exit (thresholds from val)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    return p


def markdown(table) -> str:
    return table.to_markdown(index=False, tablefmt="github")


def run(args):
    import pandas as pd
    import torch

    from tokenbench import api

    from . import DVT
    from .ablation import criterion_table, reuse_label, reuse_table
    from .architecture import DVTCascade

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise BenchError(f"--budgets {args.budgets!r}: give fractions like 0.2,0.3,0.4,0.6") from None
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise BenchError(f"--budgets {args.budgets!r}: each budget is a fraction in (0, 1]")
    pattern = f"dvt_{args.dataset.replace('-', '_')}*.pt"
    paths = [Path(p) for p in args.checkpoints] or sorted(DVT.weights_file("").glob(pattern))
    if not paths:
        raise BenchError(f"no DVT checkpoints given and none shipped matching {pattern}")
    cascades = {}
    for path in paths:
        cascade = api.load_model(checkpoint=path)
        if not isinstance(cascade, DVTCascade):
            raise BenchError(f"{path} holds {type(cascade).__name__}, not a DVT cascade")
        cascades[path.name] = cascade
    first = next(iter(cascades.values()))
    splits = {s: api.load_images(first, args.dataset, s, args.data_root) for s in dict.fromkeys(["val", args.split])}
    images, labels = splits[args.split]

    table = reuse_table(cascades, images, labels)
    table = table.round({"top-1 %": 2, "GMACs": 5, "reuse GMACs +%": 1})
    measures = ["top-1 %", "GMACs", "reuse GMACs +%"]
    wide = table.pivot_table(index=["reuse", "checkpoint"], columns="exit", values=measures, sort=False)
    wide = wide[[(what, k) for k in sorted(table["exit"].unique()) for what in measures]]
    wide.columns = [f"exit {k} {what}" for what, k in wide.columns]
    wide = wide.reset_index()
    print(f"Reuse ablation: {args.dataset}/{args.split}, {len(labels)} images, every image answered at every exit; "
          "GMACs are cumulative (stages 1..k with reuse), +% over the cascade without reuse")
    print(markdown(wide))

    main = next((c for c in cascades.values() if reuse_label(c) == "feature + relation"), first)
    criteria = criterion_table(main, splits["val"], splits[args.split], budgets)
    criteria["cell"] = [f"{a:.2f} ({g:.4g})" for a, g in zip(criteria["top-1 %"], criteria["GMACs"])]
    shaped = criteria.pivot(index="criterion", columns="budget", values="cell").reindex(criteria["criterion"].unique())
    shaped.columns = [f"budget {b:g}: top-1 % (GMACs)" for b in shaped.columns]
    name = next(n for n, c in cascades.items() if c is main)
    print(f"\nExit criterion: {name}, thresholds solved on {args.dataset}/val under each budget (a fraction of "
          f"running every exit, {main.exit_gmacs(images[:1])[-1]:.4g} GMACs), then {args.dataset}/{args.split}")
    print(markdown(pd.DataFrame(shaped).reset_index()))
    return 0
