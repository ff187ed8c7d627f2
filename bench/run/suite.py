"""The GPU suite: every speed figure and board the README reports for a GPU, from one command.

`gpu_suite` writes, under one folder: the speed tables of every training-free method on DeiT-S and ViT-B
(batch-size curve in bf16 from batch 1 to 256, batch 256 in fp32; on DeiT-S also dense and the target
methods compiled, at batch 256 in bf16), the check of the issue's targets (speedup at least 0.9 of the GMACs ratio for EViT 0.7, top-k 0.7 and
ToMe r = 13 on DeiT-S at batch 256 in bf16), and the digits and CIFAR-10 leaderboards measured on the GPU
at matched budgets (CIFAR-10 on `vit_cifar10_v2`, the committed board's backbone). Weights come from the
repository (the embedded `vit_digits`, `vit_cifar10_v2` and the methods' weights trained on them) or are
random (DeiT-S and ViT-B for speed: fixed-rate methods keep the same number of tokens whatever the weights),
so a machine without internet runs it after `pip install --no-deps -e .`.
`QUICK` is the same run shrunk to seconds on a CPU, which the tests run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from tokenbench.errors import BenchError

# Every training-free method near 0.6 x dense GMACs on DeiT-S (DVT and DynamicViT need weights trained with them).
SPEED_CELLS = ("topk:keep=0.7", "evit:keep=0.7", "tome:r=13", "random:keep=0.7", "ats:sample_rate=0.5",
               "tofu:r=13", "pitome:ratio=0.9", "mctf:r=16", "ppt:r=50", "kmedoids:keep=0.7", "dpcknn:keep=0.7",
               "atc:keep=0.7", "visionzip:dominant=0.4", "vidtldr:r=0.15", "zerotprune:keep=0.7")
# Cells that depend on the model: DiffRate's official searched rates near 0.6 x dense for DeiT-S / DeiT-B shapes.
MODEL_CELLS = {"deit_small_patch16_224": ("diffrate:target=1,gflops=2.7",),
               "vit_base_patch16_224": ("diffrate:target=1,gflops=10.4",)}
TARGET_CELLS = ("evit:keep=0.7", "topk:keep=0.7", "tome:r=13")
TARGET = 0.9  # measured speedup / GMACs ratio the targets must reach


@dataclasses.dataclass(frozen=True)
class SuitePlan:
    speed_models: tuple[str, ...]
    speed_cells: tuple[str, ...]
    model_cells: dict  # model name -> its own extra cells
    target_cells: tuple[str, ...]
    curve_batches: tuple[int, ...]  # bf16; the last is the large batch of the fp32 table and the compiled one
    rounds: int
    boards: tuple[tuple[str, str, str], ...]  # (dataset, model, methods)
    budgets: tuple[float, ...]
    repeats: int


GPU = SuitePlan(speed_models=("deit_small_patch16_224", "vit_base_patch16_224"), speed_cells=SPEED_CELLS,
                model_cells=MODEL_CELLS,
                target_cells=TARGET_CELLS, curve_batches=(1, 16, 64, 256), rounds=15,
                boards=(("digits", "vit_digits", "all"), ("cifar10", "vit_cifar10_v2", "all")), budgets=(0.7,),
                repeats=5)
QUICK = SuitePlan(speed_models=("vit_digits",), speed_cells=("topk:keep=0.7", "tome:r=4"), model_cells={},
                  target_cells=("topk:keep=0.7",), curve_batches=(1, 8), rounds=1,
                  boards=(("digits", "vit_digits", "topk,tome"), ("cifar10", "vit_cifar10", "topk")), budgets=(0.7,),
                  repeats=1)


def gpu_suite(out: str | Path, cifar10_root: str | None = None, device: str = "cuda", quick: bool = False,
              log: Callable[[str], None] = print) -> Path:
    """Run the suite on `device` into `out` and return the path of its summary (`OUT/README.md`).

    `cifar10_root`: the CIFAR-10 folder (as `--data-root`); without it the CIFAR-10 board is skipped, and
    the summary says so. `quick`: `QUICK`, small enough for a CPU test of the whole path."""
    import torch

    from tokenbench.measure import results as results
    from tokenbench.models import loading as models
    from tokenbench.report.leaderboard import write_leaderboard
    from tokenbench.run import speed as speed
    from tokenbench.run import sweep as harness

    plan = QUICK if quick else GPU
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device cuda, but no CUDA device is available (the suite is for a GPU; --quick runs on CPU)")
    out = harness.writable_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if device == "cuda":  # as timm's benchmark.py: the fastest kernels, TF32 matmuls for fp32
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    env = results.provenance(torch.device(device), seed=0)
    (out / "provenance.json").write_text(json.dumps(env, indent=1) + "\n")
    started = time.perf_counter()
    summary = [f"# tokenbench GPU suite on {env['device_name']}", "",
               f"`{suite_command(out, cifar10_root, device, quick)}`; torch {env['torch']}, timm {env['timm']}, "
               f"CUDA {env['cuda']}, git {str(env.get('git_sha'))[:10]}{' (dirty)' if env.get('git_dirty') else ''}, "
               f"{env['time_utc']}. Speed: random-init weights, every model timed interleaved with dense "
               f"({plan.rounds} rounds after one warm-up round), median speedup over rounds.", ""]
    parts = []
    cells = [speed.parse_cell(c) for c in plan.speed_cells]
    targets = [speed.parse_cell(c) for c in plan.target_cells]
    big = plan.curve_batches[-1]
    for name in plan.speed_models:
        model = models.load_model(name).model
        mine = cells + [speed.parse_cell(c) for c in plan.model_cells.get(name, ())]
        runs = [(f"{name}_bf16_batch_curve", mine, plan.curve_batches, "bf16", False),
                (f"{name}_fp32_b{big}", mine, (big,), "fp32", False)]
        if name == plan.speed_models[0]:  # compiling takes tens of seconds a model: the target cells, first model
            runs.append((f"{name}_bf16_b{big}_compiled", targets, (big,), "bf16", True))
        for stem, chosen, batches, dtype, compile in runs:
            part = time.perf_counter()
            log(f"speed: {stem}")
            table = speed.speed_table(model, chosen, batches, plan.rounds, 1, device, dtype, compile=compile, log=log)
            table.to_csv(out / f"speed_{stem}.csv", index=False)
            if len(batches) > 1:
                speed.plot_batch_curve(table, out / f"speed_{stem}.png", f"{name}, {env['device_name']}, {dtype}")
            title = f"{name}, {dtype}, " + (f"batch {batches[0]}" if len(batches) == 1 else "batch-size curve")
            summary += [f"## Speed: {title}{', compiled (inductor)' if compile else ''}", "",
                        speed.format_table(table), ""]
            if len(batches) > 1:
                summary += [f"![{stem}](speed_{stem}.png)", ""]
            if stem == f"{plan.speed_models[0]}_bf16_batch_curve":
                summary += target_lines(table[table["batch_size"] == big], zip(plan.target_cells, targets))
            parts.append((f"speed {stem}", time.perf_counter() - part))
    for dataset, model, methods in plan.boards:
        if dataset == "cifar10" and cifar10_root is None:
            summary += [f"## {dataset} board: skipped (no --cifar10-root given)", ""]
            continue
        part = time.perf_counter()
        folder = out / dataset
        for budget in plan.budgets:
            log(f"board: {dataset} at {budget} x dense GMACs")
            harness.sweep(methods, model, dataset=dataset, data_root=cifar10_root if dataset == "cifar10" else None,
                          out=folder, device=device, repeats=plan.repeats, budget=budget, log=log)
        board = write_leaderboard(folder)
        which = "every method" if methods == "all" else methods.replace(",", ", ")
        summary += [f"## {dataset} board on {model}", "", f"[{board.relative_to(out)}]({board.relative_to(out)}): "
                    f"{which} at {', '.join(f'{b:g}' for b in plan.budgets)} × dense GMACs, fp32, on "
                    f"{env['device_name']}.", ""]
        parts.append((f"board {dataset}", time.perf_counter() - part))
    summary += ["## Time", "", "| part | seconds |", "|---|---|"]
    summary += [f"| {name} | {seconds:.0f} |" for name, seconds in parts]
    summary += [f"| total | {time.perf_counter() - started:.0f} |", ""]
    path = out / "README.md"
    path.write_text("\n".join(summary))
    log(f"suite done in {time.perf_counter() - started:.0f} s; {path}")
    return path


def target_lines(table, targets) -> list[str]:
    """The issue's GPU target as lines of the summary: speedup / GMACs ratio at least TARGET per target cell,
    given as (cell text, (method, knobs)) pairs."""
    from tokenbench.reduce.knobs import knob_label

    lines = [f"Target (speedup ≥ {TARGET} × GMACs ratio at batch {int(table['batch_size'].iloc[0])}, bf16):", ""]
    for cell, (name, knobs) in targets:
        row = table[(table["method"] == name) & (table["knobs"] == knob_label(knobs))].iloc[0]
        ok = row["speedup_per_gmacs_ratio"] >= TARGET
        lines.append(f"- {cell}: {row['speedup']:.2f}× for a GMACs ratio of {row['gmacs_ratio']:.2f} "
                     f"({row['speedup_per_gmacs_ratio']:.2f}): {'met' if ok else 'NOT met'}")
    return lines + [""]


def suite_command(out: Path, cifar10_root: str | None, device: str, quick: bool) -> str:
    return ("tokenbench suite gpu --out " + str(out) + (f" --cifar10-root {cifar10_root}" if cifar10_root else "")
            + (f" --device {device}" if device != "cuda" else "") + (" --quick" if quick else ""))
