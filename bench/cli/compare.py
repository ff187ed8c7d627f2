"""`tokenbench compare`: a method against a baseline on the same images, with paired 95% intervals."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("compare", help="a method's top-1 minus a baseline's, setting by setting, with 95%% intervals")
    p.add_argument("--results", required=True, help="a results folder (every results*.jsonl under it)")
    p.add_argument("--method", required=True, help="the method, e.g. topk")
    p.add_argument("--baseline", required=True, help="what it is measured against, e.g. random")
    return p


def run(args):
    from tabulate import tabulate

    from tokenbench.report.compare import compare

    table = compare(args.results, args.method, args.baseline)
    signed = {"difference", "95% low", "95% high"}
    formats = ["+.2f" if c in signed else ".2g" if c == "McNemar p" else ".2f" for c in table.columns]
    print(tabulate(table, headers="keys", showindex=False, floatfmt=formats))
    return 0
