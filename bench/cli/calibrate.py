"""`tokenbench calibrate`: what a calibrating method chooses on a held-out split (DiffRate's searched per-block
rates, DVT's exit thresholds) at each setting, with its GMACs and top-1 there; `tokenbench.calibrate` does the work."""

from __future__ import annotations

import json

from tokenbench.cli.options import add_knob_options, add_model_options, given_knobs
from tokenbench.errors import BenchError
from tokenbench.reduce.registry import get_method, knob_overrides, resolve_methods


def add_parser(sub):
    p = sub.add_parser("calibrate",
                       help="DiffRate's rate search, DVT's thresholds: what a method chooses on held-out images")
    p.add_argument("--method", required=True, help="a method that calibrates (`tokenbench methods`: diffrate, dvt)")
    p.add_argument("--write-shipped", action="store_true",
                   help="recompute the calibrations tokenbench ships for the default sweep on the embedded model "
                        "(one thread, as the regression snapshot) and write them into the package")
    add_model_options(p)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="the held-out split to calibrate on")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--out", default=None, help="also write the rows to this JSON file")
    add_knob_options(p, many=True, default_help="settings to calibrate; default: the method's sweep")
    return p


def run(args):
    knob_overrides(resolve_methods(args.method), given_knobs(args))  # errors before torch loads
    import torch

    from tokenbench import api

    if args.write_shipped:
        from tokenbench.measure.calibrations import write_shipped

        torch.set_num_threads(1)
        write_shipped(resolve_methods(args.method))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    method = get_method(args.method)
    if checkpoint is None and method.needs_training:  # as `bench` does: the weights shipped for this model and data
        checkpoint = method.checkpoint_for(args.model, args.dataset)
        if checkpoint is None:
            raise BenchError(f"{args.method} needs trained weights and none ship for {args.model} on {args.dataset}; "
                             "pass --checkpoint")
    model = api.load_model(None if checkpoint else args.model, checkpoint, args.pretrained)
    table = api.calibrate(model, args.method, args.dataset, split=args.split, data_root=args.data_root,
                          **given_knobs(args))
    print(f"{args.method} calibrated on {args.dataset}/{args.split} ({table['images'].iloc[0]} images), "
          f"{checkpoint or args.model}, {torch.get_num_threads()} threads")
    shown = table.drop(columns=["method", "dataset", "split", "images"]).round({"gmacs": 5, "gmacs_fraction": 3,
                                                                                 "formula_fraction": 3, "top1": 4})
    print(shown.to_markdown(index=False, tablefmt="github"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table.to_dict(orient="records"), f, indent=1)
        print(f"-> {args.out}")
    return 0
