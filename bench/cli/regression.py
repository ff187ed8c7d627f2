"""`tokenbench regression`: the CI gate on what each method computes (exact) and how fast it runs (ratios).

Exit status: 0 when nothing regressed (or the speed part was inconclusive on a loaded machine, said
loudly), 1 when a snapshot value changed or a method got slower, 2 on a usage error.
"""

from __future__ import annotations

import time
from pathlib import Path

from tokenbench.errors import BenchError


def add_parser(sub):
    p = sub.add_parser("regression", help="check each method's tokens/GMACs snapshot and speedup against the baselines")
    p.add_argument("--update", action="store_true",
                   help="rewrite the snapshot and this device's speed baseline instead of checking them")
    p.add_argument("--methods", default=None, metavar="A,B", help="only these methods (default: every registered one)")
    p.add_argument("--part", default="all", choices=["all", "exact", "speed"], help="which part to run")
    p.add_argument("--tolerance", type=float, default=0.2,
                   help="speed: fail below (1 - T) x the baseline speedup (default %(default)s)")
    p.add_argument("--pairs", type=int, default=15,
                   help="speed: interleaved timing pairs per method (default %(default)s)")
    p.add_argument("--snapshot", type=Path, default=None,
                   help="snapshot JSON (default: results/regression/snapshot.json in the working directory "
                        "or the nearest parent folder that has results/regression)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="speed baseline JSON (default: speed-baseline.json beside the default snapshot)")
    return p


def exact_part(methods, path: Path, update: bool) -> bool:
    import torch
    from tabulate import tabulate

    from tokenbench.reduce.registry import all_methods
    from tokenbench.regression import snapshot as reg

    started = time.perf_counter()
    actual = reg.take_snapshot(methods)
    elapsed = time.perf_counter() - started
    stored = reg.read_json(path)
    if update:
        models = stored.get("models", {})
        for model_name, entries in actual.items():  # with --methods, other methods' entries stay
            models[model_name] = {**models.get(model_name, {}), **entries}
        models = {m: {n: v for n, v in sorted(entries.items()) if n in all_methods()} for m, entries in models.items()}
        reg.write_json(path, {
            "about": f"tokens per block and GMACs per image of every method at every default sweep point on "
                     f"seeded random-init models at one thread; regenerate with `{reg.UPDATE_COMMAND}`",
            "images_per_forward": reg.SNAPSHOT_MODELS, "seed": reg.SEED, "torch": torch.__version__,
            "models": models})
        print(f"exact: wrote {path} ({len(methods)} methods, {elapsed:.0f} s)")
        return True
    if not stored:
        raise BenchError(f"no snapshot at {path}; create it with {reg.UPDATE_COMMAND}")
    diff = reg.compare_snapshots(stored["models"], actual)
    if diff:
        print(f"exact: FAILED, {len(diff)} value(s) differ from {path}:")
        print(tabulate(diff, headers=["model", "method", "knobs", "field", "snapshot", "now"], disable_numparse=True))
        if stored.get("torch") != torch.__version__:
            print(f"The snapshot was recorded with torch {stored.get('torch')}, this is {torch.__version__}: seeded "
                  "random weights may differ, which moves the counts of data-dependent methods (ats).")
        print(f"If the change is intended, run `{reg.UPDATE_COMMAND} --part exact` and commit the snapshot.")
        return False
    points = sum(len(p) for m in actual.values() for p in m.values())
    print(f"exact: ok, {points} configurations of {len(methods)} methods match {path} ({elapsed:.0f} s)")
    return True


def speed_part(methods, path: Path, update: bool, setup, tolerance: float) -> bool:
    from tabulate import tabulate

    from tokenbench.reduce.registry import all_methods
    from tokenbench.regression import snapshot as reg
    from tokenbench.regression import speed_gate as gate

    key = gate.baseline_key(setup)
    stored = reg.read_json(path)
    entries = stored.get("entries", {})
    print(f"speed: {setup.model} random-init, batch {setup.batch}, {setup.threads} thread(s), "
          f"{setup.pairs} interleaved pairs per method; baseline key '{key}'")
    if update:
        with reg.threads(setup.threads):
            calibration = gate.calibration_seconds()
        entry = gate.baseline_entry(gate.measure_speeds(methods, setup), setup, calibration)
        old = entries.get(key, {})
        if old and gate.same_setup(old.get("setup", {}), setup):  # with --methods, other methods' entries stay
            entry["methods"] = {**old.get("methods", {}), **entry["methods"]}
            entry["skipped"] = {**old.get("skipped", {}), **entry["skipped"]}
        for section in ("methods", "skipped"):
            entry[section] = {n: v for n, v in sorted(entry[section].items()) if n in all_methods()}
        entries[key] = entry
        reg.write_json(path, {"about": f"speedup over dense per device; regenerate with `{reg.UPDATE_COMMAND}` "
                                       "on a quiet machine", "tolerance": tolerance, "entries": entries})
        print(f"speed: wrote the baseline for '{key}' to {path} (calibration {calibration * 1e3:.1f} ms)")
        return True
    entry = entries.get(key)
    if entry is not None and not gate.same_setup(entry.get("setup", {}), setup):
        print("speed: the baseline was measured with another model, batch or thread count; ignoring it")
        entry = None
    if entry is not None:
        report = gate.speed_gate(methods, entry.get("methods", {}), entry.get("calibration_s"), setup, tolerance)
    else:
        # Another device's ratios still say which methods must beat dense; nothing finer is portable.
        other = next((e for k, e in sorted(entries.items()) if gate.same_setup(e.get("setup", {}), setup)), {})
        print(f"speed: NO BASELINE for this device: only 'a method found faster than dense elsewhere is now slower "
              f"than dense' is checked, and contention is not detected. Record one with "
              f"`{reg.UPDATE_COMMAND} --part speed`.")
        report = gate.speed_gate(methods, other.get("methods", {}), None, setup, tolerance=None)
    if report.verdicts:
        print(tabulate([v.row() for v in report.verdicts],
                       headers=["method", "knobs", "baseline", "now (median ± IQR)", "change", "status"],
                       disable_numparse=True))
    if report.inconclusive:
        reference = entry.get("calibration_s", float("nan")) if entry else float("nan")
        print("\n" + "!" * 100)
        print(f"speed: INCONCLUSIVE: {report.inconclusive}: calibration "
              f"{', '.join(f'{c * 1e3:.1f}' for c in report.calibration_s)} ms vs {reference * 1e3:.1f} ms at "
              f"baseline. Speed was NOT checked; rerun on a quiet machine.")
        print("!" * 100)
        return True
    if report.failed:
        print(f"speed: FAILED: a method's speedup over dense fell by more than {tolerance:.0%} of its baseline, or "
              f"it became slower than dense. If the slowdown is intended, run `{reg.UPDATE_COMMAND} --part speed` "
              f"on a quiet machine and commit the baseline.")
        return False
    print("speed: ok")
    return True


def run(args):
    from dataclasses import replace

    import torch

    from tokenbench.regression import snapshot as reg
    from tokenbench.regression import speed_gate as gate

    if not 0 < args.tolerance < 1:
        raise BenchError("--tolerance must be between 0 and 1")
    if args.pairs < 1:
        raise BenchError("--pairs must be at least 1")
    from tokenbench.reduce.registry import method_class, resolve_methods

    methods = {name: method_class(name) for name in resolve_methods(args.methods or "all")}
    setup = replace(gate.SpeedSetup(), pairs=args.pairs)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran
        pass
    folder = reg.regression_folder()
    ok = True
    # Speed first, in a fresh process as `--part speed` alone (and its baseline) sees it: besides the pinned
    # allocator (metrics.pin_allocator), nothing the exact part's 234 builds leave behind can reach the timings.
    if args.part in ("all", "speed"):
        ok &= speed_part(methods, args.baseline or folder / reg.BASELINE_NAME, args.update, setup, args.tolerance)
    if args.part in ("all", "exact"):
        ok &= exact_part(methods, args.snapshot or folder / reg.SNAPSHOT_NAME, args.update)
    return 0 if ok else 1
