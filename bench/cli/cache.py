"""`tokenbench cache list|clear`: what the cache folder holds (calibrations, decoded images) and emptying it."""

from __future__ import annotations

import shutil


def add_parser(sub):
    p = sub.add_parser("cache", help="list or clear stored calibrations and decoded images (TOKENBENCH_CACHE)")
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("--what", default="all", choices=["all", "calibrations", "images"],
                   help="which part of the cache to clear (default: all)")
    return p


def run(args):
    from tokenbench.data.store import cache_root
    from tokenbench.measure.calibrations import stored

    root = cache_root()
    if args.action == "list":
        rows = stored()
        print(f"{root}: {len(rows)} calibrations")
        for row in rows:
            print(f"  {row['method']} {row['knobs']} key {row['key']} ({row['seconds']} s, {row['created']})")
        images = sorted(p.name for p in (root / "images").glob("*") if p.is_dir())
        print(f"{len(images)} decoded datasets: {', '.join(images) or '-'}")
        return 0
    parts = ["calibrations", "images"] if args.what == "all" else [args.what]
    for part in parts:
        shutil.rmtree(root / part, ignore_errors=True)
    print(f"cleared {', '.join(parts)} under {root}")
    return 0
