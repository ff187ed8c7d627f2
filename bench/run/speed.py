"""Speed against GMACs: does a method's saving in GMACs turn into wall-clock speed, and at which batch sizes?

`speed_table` times dense and every method in one process on the same random batch, for each batch size:
every round runs dense and each method once, in an order that rotates from round to round so that a drift
in machine speed cancels out, and the speedup is the median over rounds of (dense time / method time)
within a round. `plot_batch_curve` draws the speedup against batch size with each method's GMACs ratio as
a horizontal line: where a curve stays below its line, overheads the GMACs do not count (gathers, sorting,
small matrix products, Python) are eating the saving. Run it on a quiet machine.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pandas as pd
import torch

from tokenbench.errors import BenchError
from tokenbench.reduce.knobs import knob_label
from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import get_method


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


@contextlib.contextmanager
def compile_limits(n_models: int = 1):
    """Dynamo settings under which compiled timings can be trusted.

    Dynamo keeps at most `recompile_limit` (8) graphs per code object, shared by every model of the same
    classes, and past it falls back to eager with only a log warning: the ninth method compiled in one
    process would be timed eager and labelled compiled. Here the limits grow with the number of models
    (a method whose token counts vary per image compiles to one graph per block between graph breaks), and
    hitting them is an error (`compiled` then says the model runs eager)."""
    import torch._dynamo.config as config

    saved = config.recompile_limit, config.accumulated_recompile_limit, config.fail_on_recompile_limit_hit
    config.recompile_limit = max(8, 64 * n_models)
    config.accumulated_recompile_limit = max(256, 256 * n_models)
    config.fail_on_recompile_limit_hit = True
    try:
        yield
    finally:
        config.recompile_limit, config.accumulated_recompile_limit, config.fail_on_recompile_limit_hit = saved


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compiled(model: torch.nn.Module, inputs: list[torch.Tensor], dtype: str) -> tuple[torch.nn.Module, float, str]:
    """(`torch.compile` (inductor) of `model`, seconds its first calls on each of `inputs` took, what ran).

    Compile time is reported apart, never inside a throughput: every input shape the timing will use is
    compiled here, then called once more to check that nothing recompiles at timing time. What ran is
    'compiled, N graphs' (more graphs than one: graph breaks, where data-dependent token counts or Python
    steps run eager between compiled pieces), or 'eager (...)' with the reason when compiling fails: the
    model is then timed as it is, and says so. Call it under `compile_limits`."""
    from tokenbench.measure import metrics as measure

    fast = torch.compile(model)
    before = graphs_compiled()
    start = time.perf_counter()
    try:
        with torch.inference_mode(), measure.autocast(inputs[0].device, dtype):
            for x in inputs:
                fast(x)
            seconds, graphs = time.perf_counter() - start, graphs_compiled() - before
            for x in inputs:
                fast(x)
    except Exception as err:  # noqa: BLE001 - any compiler failure: time the eager model, and say why
        return model, float("nan"), f"eager ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    if graphs_compiled() - before != graphs:
        return model, float("nan"), "eager (recompiles at every call)"
    if graphs == 0:  # an earlier model of the same code and shapes: dynamo reuses its graphs
        return fast, seconds, "compiled, graphs reused"
    return fast, seconds, f"compiled, {graphs} graph{'s' if graphs != 1 else ''}"


def speed_table(model: torch.nn.Module, cells: list[tuple[str, dict]], batch_sizes=(32,), rounds: int = 7,
                warmup: int = 1, device: str = "cpu", dtype: str = "fp32", compile: bool = False,
                log=print) -> pd.DataFrame:
    """One row per batch size and model (dense first, then each (method, knobs) of `cells`): GMACs per image,
    GMACs ratio, median ms per batch, median speedup over dense and its IQR, speedup / GMACs ratio, and the
    attention kernels it ran (`measure.attention_kernels`). With `compile`, every model (dense included) is
    compiled first (`compiled`), the speedups are over the compiled dense model, `compile_s` says what
    compiling took and `ran` whether it ran compiled (and in how many graphs) or eager, and why; every model
    is then also timed eager in the same rounds, in rows with `ran` 'eager' and speedups over eager dense,
    so what compiling changes (dense's ms per batch, each method's speedup) is measured side by side."""
    import statistics

    from tokenbench.measure import metrics as measure
    from tokenbench.models import loading as models

    if not batch_sizes or min(batch_sizes) < 1 or rounds < 1 or warmup < 0:
        raise BenchError("batch sizes and rounds must be at least 1, warm-up rounds at least 0")
    device = torch.device(device)
    built = [get_method("none").build(model)]
    for name, knobs in cells:
        torch.manual_seed(0)
        built.append(get_method(name).build(model, **knobs))  # knobs checked by parse_cell
    built = [m.to(device).eval() for m in built]
    shape = models.input_shape(model)
    probe = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    gmacs = [measure_gmacs(m.eval(), probe).gmacs.mean().item() for m in built]
    kernels = [measure.attention_kernels(m, probe[:2], dtype) for m in built]
    labels = [("none", "-")] + [(name, knob_label(knobs)) for name, knobs in cells]
    compile_s, ran = [float("nan")] * len(built), ["eager"] * len(built)
    if compile:  # compile times of this table's own, not graphs cached by an earlier call
        import torch._dynamo as dynamo

        dynamo.reset()
    rows = []
    for batch in batch_sizes:
        images = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        timed = list(built)
        if compile:  # per batch size: a new shape is a new graph
            with compile_limits(len(built)):
                timed, compile_s, ran = map(list, zip(*(compiled(m, [images], dtype) for m in built)))
            log(f"batch {batch}: " + ", ".join(f"{n} {r} in {t:.0f} s" if t == t else f"{n} {r}"
                                               for (n, _), t, r in zip(labels, compile_s, ran)))
            timed += built  # every model eager too, in the same rounds: what compiling changes, side by side
        times, _ = measure.interleaved_seconds(timed, images, dtype, repeats=rounds, warmup_rounds=warmup,
                                               warmup_s=0.0, min_repeat_s=0.0)
        groups = [(times[:, :len(built)], compile_s, ran)]
        if compile:
            groups.append((times[:, len(built):], [float("nan")] * len(built), ["eager"] * len(built)))
        for group_times, group_compile_s, group_ran in groups:
            speedup, iqr = measure.speedups(group_times)
            for j, (name, knobs) in enumerate(labels):
                ratio = gmacs[0] / gmacs[j]
                rows.append({"batch_size": batch, "method": name, "knobs": knobs, "gmacs": gmacs[j],
                             "gmacs_ratio": ratio, "ms_per_batch": 1e3 * statistics.median(group_times[:, j]),
                             "speedup": speedup[j], "iqr": iqr[j] if j else float("nan"),
                             "speedup_per_gmacs_ratio": speedup[j] / ratio, "attention": kernels[j],
                             "compile_s": group_compile_s[j], "ran": group_ran[j]})
            log(f"batch {batch} ({group_ran[0].split(',')[0]}): "
                + ", ".join(f"{n} {k} {x:.2f}x" for (n, k), x in zip(labels[1:], speedup[1:])))
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, tablefmt: str = "github") -> str:
    """`speed_table`'s rows as text (tabulate's `tablefmt`): the batch column only when it varies, the
    compile columns only when something was compiled."""
    from tabulate import tabulate

    compiled = table["ran"].ne("eager").any()
    shown = table.assign(
        gmacs=table["gmacs"].map("{:.3f}".format), gmacs_ratio=table["gmacs_ratio"].map("{:.3f}".format),
        ms_per_batch=table["ms_per_batch"].map("{:.4g}".format), speedup=table["speedup"].map("{:.3f}".format),
        iqr=table["iqr"].map(lambda v: "-" if v != v else f"{v:.3f}"),
        speedup_per_gmacs_ratio=[("-" if m == "none" else f"{v:.2f}")
                                 for m, v in zip(table["method"], table["speedup_per_gmacs_ratio"])],
        compile_s=table["compile_s"].map(lambda v: "-" if v != v else f"{v:.0f}"))
    headers = ["batch", "method", "knobs", "GMACs", "GMACs ratio", "ms / batch", "speedup", "IQR",
               "speedup / GMACs ratio", "attention", "compile s", "ran"]
    if not compiled:
        shown, headers = shown.drop(columns=["compile_s", "ran"]), headers[:-2]
    if shown["batch_size"].nunique() == 1:
        shown, headers = shown.drop(columns="batch_size"), headers[1:]
    return tabulate(shown.values.tolist(), headers=headers, disable_numparse=True, tablefmt=tablefmt)


def plot_batch_curve(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Speedup over dense against batch size (log axis), IQR bars, each method's GMACs ratio dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenbench.reduce.registry import all_methods
    from tokenbench.report.figures import save_png
    from tokenbench.report.leaderboard import style_of

    if table["ran"].ne("eager").any():  # a compiled table also has its eager rows: draw the compiled curves
        table = table[table["ran"].ne("eager")]
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
    return save_png(fig, path)
