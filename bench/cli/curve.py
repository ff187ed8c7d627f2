"""`tokenbench curve`: a training run's learning curve and probes, from its checkpoint or its resume state."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("curve", help="plot a training run's val top-1 by epoch and its top-k vs random probes")
    p.add_argument("path", help="a checkpoint written by `tokenbench train`, or a run's OUT.partial resume state")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--title", default=None, help="the figure's title (default: the file's name)")
    return p


def run(args):
    from pathlib import Path

    from tabulate import tabulate

    from tokenbench.report import curves

    def records(table):  # ints stay ints, epochs that did not probe show blanks
        return [{k: None if v != v else v for k, v in row.items()} for row in table.reset_index().to_dict("records")]

    frame = curves.history_frame(curves.read_history(args.path))
    print(tabulate(records(frame), headers="keys", floatfmt=".2f"))
    gaps = curves.topk_minus_random(frame)
    if not gaps.empty:
        print("\ntop-k minus random (points), by probed epoch:")
        print(tabulate(records(gaps), headers="keys", floatfmt="+.2f"))
    print(f"wrote {curves.draw(frame, args.title or Path(args.path).name, args.out)}")
    return 0
