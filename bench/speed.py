"""Speed against GMACs: does a method's saving in GMACs turn into wall-clock speed, and at which batch sizes?

`speed_table` times dense and every method in one process on the same random batch, for each batch size:
every round runs dense and each method once, in an order that rotates from round to round so that a drift
in machine speed cancels out, and the speedup is the median over rounds of (dense time / method time)
within a round. `plot_batch_curve` draws the speedup against batch size with each method's GMACs ratio as
a horizontal line: where a curve stays below its line, overheads the GMACs do not count (gathers, sorting,
small matrix products, Python) are eating the saving. Run it on a quiet machine.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from tokenbench.errors import BenchError
from tokenbench.registry import get_method, knob_label


def parse_cell(text: str) -> tuple[str, dict]:
    """'tome:r=13' -> ('tome', {'r': 13}); knobs parsed and checked by the method's own knobs, the rest at
    their first sweep value."""
    name, _, spec = text.partition(":")
    method = get_method(name.strip())
    given = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            own = ", ".join(k.name for k in method.knobs) or "none"
            raise BenchError(f"--cell {text}: expected {name}:KNOB=V with KNOB one of {own}")
        given[key] = value
    return method.name, method.check_knobs(method.parse_knobs(given), default="sweep")


def compiled(model: torch.nn.Module, images: torch.Tensor, dtype: str) -> tuple[torch.nn.Module, float]:
    """`torch.compile` (inductor) of `model` and the seconds its first call took on `images` (compiling it):
    compile time is reported apart, never inside a throughput. Token counts that vary per image (ATS) or
    data-dependent steps (clustering) cause graph breaks: those parts run eager between compiled graphs."""
    import time

    from tokenbench import measure

    fast = torch.compile(model)
    start = time.perf_counter()
    with torch.inference_mode(), measure.autocast(images.device, dtype):
        fast(images)
    return fast, time.perf_counter() - start


def speed_table(model: torch.nn.Module, cells: list[tuple[str, dict]], batch_sizes=(32,), rounds: int = 7,
                warmup: int = 1, device: str = "cpu", dtype: str = "fp32", compile: bool = False,
                log=print) -> pd.DataFrame:
    """One row per batch size and model (dense first, then each (method, knobs) of `cells`): GMACs per image,
    GMACs ratio, median ms per batch, median speedup over dense and its IQR, speedup / GMACs ratio, and the
    attention kernels it ran (`measure.attention_kernels`). With `compile`, every model (dense included) is
    compiled first, the speedups are over the compiled dense model and `compile_s` says what compiling took."""
    import statistics

    from tokenbench import api, measure, models

    if not batch_sizes or min(batch_sizes) < 1 or rounds < 1 or warmup < 0:
        raise BenchError("batch sizes and rounds must be at least 1, warm-up rounds at least 0")
    device = torch.device(device)
    built = [api.apply(model, "none")]
    for name, knobs in cells:
        torch.manual_seed(0)
        built.append(api.apply(model, name, **knobs))
    built = [m.to(device).eval() for m in built]
    shape = models.input_shape(model)
    probe = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    gmacs = [api.gmacs(m, probe).mean().item() for m in built]
    kernels = [measure.attention_kernels(m, probe[:2], dtype) for m in built]
    labels = [("none", "-")] + [(name, knob_label(knobs)) for name, knobs in cells]
    compile_s = [float("nan")] * len(built)
    rows = []
    for batch in batch_sizes:
        images = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        timed = built
        if compile:  # per batch size: a new shape is a new graph
            timed, compile_s = zip(*(compiled(m, images, dtype) for m in built))
            log(f"batch {batch}: compiled in " + ", ".join(f"{n} {t:.0f} s" for (n, _), t in zip(labels, compile_s)))
        times, _ = measure.interleaved_seconds(list(timed), images, dtype, repeats=rounds, warmup_rounds=warmup,
                                               warmup_s=0.0, min_repeat_s=0.0)
        speedup, iqr = measure.speedups(times)
        for j, (name, knobs) in enumerate(labels):
            ratio = gmacs[0] / gmacs[j]
            rows.append({"batch_size": batch, "method": name, "knobs": knobs, "gmacs": gmacs[j], "gmacs_ratio": ratio,
                         "ms_per_batch": 1e3 * statistics.median(times[:, j]), "speedup": speedup[j],
                         "iqr": iqr[j] if j else float("nan"), "speedup_per_gmacs_ratio": speedup[j] / ratio,
                         "attention": kernels[j], "compile_s": compile_s[j]})
        log(f"batch {batch}: " + ", ".join(f"{n} {s:.2f}x" for (n, _), s in zip(labels[1:], speedup[1:])))
    return pd.DataFrame(rows)


def plot_batch_curve(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Speedup over dense against batch size (log axis), IQR bars, each method's GMACs ratio dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenbench.leaderboard import style_of
    from tokenbench.registry import all_methods

    style = style_of(sorted(set(all_methods()) | set(table["method"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, knobs), rows in table[table["method"] != "none"].groupby(["method", "knobs"], sort=False):
        colour, marker = style[method]
        rows = rows.sort_values("batch_size")
        ax.errorbar(rows["batch_size"], rows["speedup"], yerr=rows["iqr"] / 2, color=colour, marker=marker,
                    capsize=2, label=f"{method} {knobs}")
        ax.axhline(rows["gmacs_ratio"].iloc[0], color=colour, linestyle="--", linewidth=0.9)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over dense (dashed: GMACs ratio)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
