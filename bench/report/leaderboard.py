"""Leaderboards from results rows: a markdown table (tabulate) and Pareto plots (seaborn) per setting.

One table and one pair of plots per setting (dataset, device, dtype, batch) and dense backbone: rows
from different hardware or precision are never mixed. Methods that bring their own trained weights
(DVT's cascade, DynamicViT's predictors) join the table of the dense backbone of the same setting, with
their weights named. The dense baseline is the `none` row; the Pareto front marks configurations that no other configuration beats on both axes.
"""

from __future__ import annotations

import html
import importlib.metadata
import re
from pathlib import Path

import numpy as np
import pandas as pd

from tokenbench.errors import BenchError
from tokenbench.measure.results import read_results_folder, rows_frame
from tokenbench.measure.stats import correct_from_bits, decimals_for, delta_ci, holm, mcnemar
from tokenbench.reduce.knobs import knob_label
from tokenbench.reduce.registry import declared_methods
from tokenbench.report.board import Board, Section

SETTING = ["dataset", "device_name", "dtype", "batch_size", "compile"]


def load_rows(directory: str | Path) -> pd.DataFrame:
    """Every row under `directory`, shards merged (the last row of a configuration wins)."""
    df = rows_frame(read_results_folder(directory))
    df["knob_text"] = df["knobs"].map(knob_label)
    df["compile"] = df["compile"].fillna(False).astype(bool)  # compiled timings are a setting of their own
    for column in ("throughput", "throughput_iqr", "latency_ms", "budget"):  # None (not measured) -> NaN
        df[column] = df[column].astype(float)
    return df.reset_index(drop=True)


def pareto_front(df: pd.DataFrame, cost: str, higher_cost_is_better: bool = False) -> pd.Series:
    """True for rows not dominated on (top-1 up, cost down), or (top-1 up, cost up) for throughput."""
    order = df.sort_values(cost, ascending=not higher_cost_is_better, kind="stable")
    on_front, best = pd.Series(False, index=df.index), -1.0
    for idx, top1 in order["top1"].items():
        if pd.notna(order.at[idx, cost]) and top1 > best:
            on_front[idx], best = True, top1
    return on_front


def backbone_weights(g: pd.DataFrame) -> str:
    """The weights of the backbone the training-free methods share: the dense row's."""
    dense = g.loc[g["method"] == "none", "weights"]
    return dense.iloc[-1] if len(dense) else g["weights"].mode().iloc[0]


def fronts(g: pd.DataFrame, cost: str, higher_cost_is_better: bool = False) -> pd.Series:
    """'★' for the Pareto front of the rows on the backbone's weights, '☆' for the front of each separately
    trained model (DVT's cascade, DynamicViT's predictors) among its own rows: a model trained on its own
    never pushes the training-free methods off the front of the backbone they share."""
    shared = backbone_weights(g)
    marks = pd.Series("", index=g.index)
    for weights, rows in g.groupby("weights"):
        on = pareto_front(rows, cost, higher_cost_is_better)
        marks[on[on].index] = "★" if weights == shared else "☆"
    return marks


def slug(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts)


def backbone_tables(setting: pd.DataFrame):
    """(backbone model, rows) per dense backbone; rows of models without a dense row join the first."""
    backbones = list(dict.fromkeys(setting.loc[setting["method"] == "none", "model"])) or [setting["model"].iloc[0]]
    others = ~setting["model"].isin(backbones)
    for i, model in enumerate(backbones):
        rows = (setting["model"] == model) | (others if i == 0 else False)
        yield model, setting[rows]


def is_video(g: pd.DataFrame) -> bool:
    return "protocol" in g and g["protocol"].notna().any()


def outcomes(row) -> np.ndarray | None:
    """A row's per-image top-1 outcomes, when it recorded them."""
    bits = row.get("correct_bits")
    return correct_from_bits(bits, int(row["n_images"])) if isinstance(bits, str) else None


def paired(a, b) -> bool:
    """Whether two rows saw the same images in the same order (so their outcomes can be compared image by image)."""
    return (isinstance(a.get("image_key"), str) and a.get("image_key") == b.get("image_key")
            and a["n_images"] == b["n_images"] and isinstance(a.get("correct_bits"), str)
            and isinstance(b.get("correct_bits"), str))


def delta_text(row, base, decimals: int) -> str:
    """Δ top-1 in points against the dense row, with its paired bootstrap 95% interval when both have outcomes."""
    if base is None:
        return ""
    delta = 100 * (row["top1"] - base["top1"])
    if row.name == base.name or not paired(row, base):
        return f"{delta:+.{decimals}f}"
    low, high = delta_ci(outcomes(row), outcomes(base))
    return f"{delta:+.{decimals}f} ({low:+.{decimals}f}, {high:+.{decimals}f})"


BASELINES = ("random", "topk", "downsample")  # what every method must beat (the McNemar column)
REFERENCE_LINES = ("random", "downsample")  # baselines drawn dashed on every plot


def better_than(g: pd.DataFrame, alpha: float = 0.05) -> pd.Series:
    """At each matched budget: the baselines (random, topk, downsample) each method beats on the same images by an exact
    McNemar test, Holm-corrected over the methods compared with that baseline at that budget. A baseline that
    spent under 95% of a method's GMACs (downsample's coarse grid of resolutions) is not compared with it."""
    marks = pd.Series("", index=g.index)
    for _, rows in g[g["budget"].notna()].groupby("budget"):
        for baseline in BASELINES:
            reference = rows[rows["method"] == baseline]
            if reference.empty:
                continue
            ref = reference.iloc[-1]
            others = [(i, row) for i, row in rows.iterrows()
                      if row["method"] not in ("none", baseline) and paired(row, ref)
                      and ref["gmacs"] >= 0.95 * row["gmacs"]]
            pvalues = holm([mcnemar(outcomes(row), outcomes(ref)) for _, row in others])
            for (i, row), p in zip(others, pvalues):
                if p < alpha and row["top1"] > ref["top1"]:
                    marks[i] = ", ".join(filter(None, [marks[i], baseline]))
    return marks


def group_table(g: pd.DataFrame) -> pd.DataFrame:
    dense = g[g["method"] == "none"]
    base = dense.iloc[-1] if len(dense) else None
    decimals = decimals_for(int(g["n_images"].max()))
    table = pd.DataFrame({
        "method": g["method"],
        "knobs": g["knob_text"],
        "top-1 %": (100 * g["top1"]).map(lambda v: f"{v:.{decimals}f}"),
        "Δ top-1 (95% CI)": [delta_text(row, base, decimals) for _, row in g.iterrows()],
        "GMACs": g["gmacs"],
        "GMACs ÷ dense": (g["gmacs"] / base["gmacs"]).round(3) if base is not None else float("nan"),
        "clips/s" if is_video(g) else "img/s": g["throughput"],
        "speedup": (g["throughput"] / base["throughput"]).round(2) if base is not None else float("nan"),
        "latency ms (b=1)": g["latency_ms"],
        "Pareto": fronts(g, "gmacs"),
    })
    noisy = g["timing_noisy"].eq(True)  # IQR above 10% of the median: the machine was busy
    if noisy.any():
        table.insert(table.columns.get_loc("speedup") + 1, "timing", noisy.map({True: "noisy", False: ""}))
    if g["compile"].any():  # compiled timings: how each model ran, and what compiling took
        table.insert(table.columns.get_loc("latency ms (b=1)") + 1, "ran", g["compiled"])
        table.insert(table.columns.get_loc("ran") + 1, "compile s", g["compile_s"].astype(float).round(1))
    if g["budget"].notna().any():
        table.insert(2, "budget", g["budget"])
        table["better than (McNemar, Holm, p < 0.05)"] = better_than(g)
    return table.sort_values(["GMACs", "method"], ascending=[False, True])


def settings_line(g: pd.DataFrame) -> str:
    p = g.iloc[-1]["provenance"]
    threads = g.iloc[-1].get("threads")
    bits = [f"device **{p['device_name']}**", f"dtype {g.iloc[-1]['dtype']}", f"batch {g.iloc[-1]['batch_size']}"]
    if isinstance(threads, (int, float)) and threads == threads:
        bits.append(f"{int(threads)} threads")
    bits += [f"torch {p['torch']}", f"timm {p['timm']}", f"git {str(p.get('git_sha'))[:10]}"
             + (" (dirty)" if p.get("git_dirty") else ""), f"{int(g['n_images'].iloc[-1])} images",
             f"measured {p['time_utc'][:10]}"]
    last = g.iloc[-1]
    if isinstance(last.get("protocol"), str):  # video: views per video, and what stands in for a class token
        views = int(last["views"])
        bits.append(f"video protocol {last['protocol']} ({views} view{'s' * (views != 1)} per video: GMACs are per "
                    "video; throughput counts clips, one view each)")
        substitutes = g["cls_substitute"].dropna().unique() if "cls_substitute" in g else []
        if len(substitutes):
            bits.append(f"no class token: class-attention methods rank tokens by the {substitutes[0]}")
    return ", ".join(bits)


def style_of(methods: list[str]) -> dict:
    """One colour and one marker per method: given every registered method, the same on every board."""
    import seaborn as sns

    pairs = sns.color_palette("tab20", 20)
    colours = pairs[0::2] + pairs[1::2]  # ten strong colours, then their light partners
    markers = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*"]
    return {m: (colours[i % len(colours)], markers[i % len(markers)]) for i, m in enumerate(sorted(methods))}


def varying_labels(rows: pd.DataFrame) -> list[str]:
    """Each point's label on a plot: only the knobs that vary within its method's points (`r=13`, not
    `r=13 inflect=0`), all of them when none varies."""
    knobs = list(rows["knobs"])
    varying = [k for k in (knobs[0] if knobs else {}) if len({repr(row.get(k)) for row in knobs}) > 1]
    return [knob_label({k: row[k] for k in varying}) if varying else knob_label(row) for row in knobs]


def accuracy_interval(row) -> tuple[float, float]:
    """Wilson 95% interval of a row's top-1, in points (what its image count allows)."""
    from scipy.stats import binomtest

    n = int(row["n_images"])
    ci = binomtest(int(round(row["top1"] * n)), n).proportion_ci(method="wilson")
    return 100 * ci.low, 100 * ci.high


def hover_text(row, decimals: int, unit: str) -> str:
    """What a point says on the web page's hover: method, knobs, weights, accuracy with its interval, cost, speed."""
    low, high = accuracy_interval(row)
    lines = [f"{row['method']} {row['knob_text']}", f"weights {row['weights'].split('@')[0]}",
             f"top-1 {100 * row['top1']:.{decimals}f} % (95% {low:.{decimals}f}–{high:.{decimals}f})",
             f"{row['gmacs']:.4g} GMACs"]
    if row["throughput"] == row["throughput"]:
        lines.append(f"{row['throughput']:.4g} {unit}, IQR {row['throughput_iqr']:.3g}")
    return "\n".join(lines)


def plot_group(g: pd.DataFrame, title: str, path_stem: Path, style: dict) -> list[tuple[Path, str]]:
    """Accuracy against GMACs and against throughput (log axis, IQR bars): every point labelled with its knobs,
    95% bars on accuracy, the dense reference line, the baselines drawn dashed (random, downsample: the model at a
    lower resolution), and the Pareto front of the backbone's weights (methods
    on their own trained weights drawn hollow). Each plot is written as PNG and returned with its SVG text,
    in which every point carries a hover title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    item = "video" if is_video(g) else "image"
    decimals = decimals_for(int(g["n_images"].max()))
    unit = "clips/s" if item == "video" else "img/s"
    shared = backbone_weights(g)
    axes_spec = [("gmacs", f"GMACs per {item} (mean)", False, None),
                 ("throughput", "throughput (clips/s, log)" if item == "video" else "throughput (images/s, log)",
                  True, "throughput_iqr")]
    for cost, label, higher, spread in axes_spec:
        if g[cost].isna().all():
            continue
        data = g.assign(top1_pct=100 * g["top1"]).sort_values(cost)
        fig, ax = plt.subplots(figsize=(8, 5))
        for (method, weights), rows in data[data["method"] != "none"].groupby(["method", "weights"], sort=True):
            colour, marker = style[method]
            own = weights != shared
            reference = method in REFERENCE_LINES
            ci = np.array([accuracy_interval(r) for _, r in rows.iterrows()])
            yerr = np.abs(ci - rows["top1_pct"].to_numpy()[:, None]).T
            xerr = rows[spread].to_numpy() / 2 if spread else None
            ax.errorbar(rows[cost], rows["top1_pct"], yerr=yerr, xerr=xerr, color=colour, marker=marker,
                        markerfacecolor="white" if own else colour, linewidth=1.2, markersize=6, capsize=2,
                        elinewidth=0.8, linestyle="--" if reference else "-",
                        label=f"{method} (own weights)" if own else f"{method} (reference)" if reference else method)
            for text, (_, r) in zip(varying_labels(rows), rows.iterrows()):
                ax.annotate(text, (r[cost], r["top1_pct"]), textcoords="offset points", xytext=(3, 3),
                            fontsize=6, color=colour)
        free = data[data["weights"] == shared]
        front = free[pareto_front(free, cost, higher)].sort_values(cost)
        ax.plot(front[cost], front["top1_pct"], drawstyle="steps-post" if not higher else "steps-pre",
                color="grey", alpha=0.5, linewidth=3, zorder=0, label="Pareto front (backbone's weights)")
        dense = data[data["method"] == "none"]
        if len(dense):
            ax.scatter(dense[cost], dense["top1_pct"], marker="*", s=250, color="black", zorder=5, label="dense")
            ax.axhline(dense["top1_pct"].iloc[-1], color="black", linestyle="--", linewidth=1)
        if higher:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%), 95% interval")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right", ncol=2)
        hover = {}  # an invisible marker over every point, with a gid to hang the hover title on
        for i, (_, r) in enumerate(data.dropna(subset=[cost]).iterrows()):
            hover[f"tb-point-{i}"] = hover_text(r, decimals, unit)
            ax.scatter([r[cost]], [r["top1_pct"]], s=90, alpha=0.0, zorder=10, gid=f"tb-point-{i}")
        fig.tight_layout()
        path = path_stem.with_name(f"{path_stem.name}_{cost}.png")
        fig.savefig(path, dpi=120)
        svg = io.StringIO()
        with matplotlib.rc_context({"svg.hashsalt": path.stem}):  # ids unique across the plots of one page
            fig.savefig(svg, format="svg", metadata={"Date": None})  # reproducible pages
        plt.close(fig)
        text = svg.getvalue()
        for gid, tip in hover.items():
            text = text.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{html.escape(tip)}</title>', 1)
        written.append((path, text))
    return written


REPORT_ENTRY_POINTS = "tokenbench.reports"  # writers: (Board, out_dir) -> the path written


def build_board(results_dir: Path, out_dir: Path) -> Board:
    """The board of every results file in `results_dir`: one section per setting, backbone and budget, with
    its plots written under `out_dir/plots/`."""
    df = load_rows(results_dir)
    if df.empty:
        raise BenchError(f"no results rows under {results_dir}")
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    style = style_of(sorted(set(declared_methods()) | set(df["method"])))  # the same style on every board
    command = f"tokenbench leaderboard --results {results_dir}" + (f" --out {out_dir}" if out_dir != results_dir else "")
    intro = ("GMACs count one multiply-add "
             "as one (the papers' convention), per image, on the computation actually run; speedup is "
             "measured throughput over the dense model's in the same setting. ★ marks the GMACs Pareto front of "
             "the methods on the backbone's weights, ☆ the front of a method on its own trained weights (DVT, "
             "DynamicViT), which never displaces the training-free methods; "
             "`noisy` marks a timing whose IQR exceeded 10% of its median (the machine was busy). Accuracy is "
             "rounded to what the image count supports; Δ top-1 is against the dense model, with the paired "
             "bootstrap 95% interval over the same images (10,000 resamples): an interval that excludes 0 is a "
             "difference beyond sampling noise. At a matched budget, `better than` names the baselines "
             "(random, top-k, downsample) a method beats on the same images by an exact McNemar test, Holm-corrected.")
    sections = []
    for (dataset, device, dtype, batch, compile), setting in df.groupby(SETTING, sort=True, dropna=False):
        mode = " · compiled" if compile else ""
        for model, board in backbone_tables(setting):
            for budget, g in board.groupby(board["budget"].fillna(-1.0), sort=True):  # the sweep, then each budget
                matched = budget >= 0
                title = f"{dataset} · {model} · {device} · {dtype} · batch {batch}{mode}"
                heading = (f"{dataset} · {model}{mode}"
                           + (f" · matched budget {budget:g} × dense" if matched else ""))
                weights = ", ".join(f"`{w}`" for w in g.loc[g["method"] == "none", "weights"].unique())
                settings = settings_line(g) + f"; dense weights {weights}"
                table = group_table(g)
                if g["weights"].nunique() > 1:
                    table.insert(2, "weights", g["weights"].map(lambda w: w.split("@")[0]))
                dense = g[g["method"] == "none"]
                section = Section(heading, settings, table, values={"top-1 %": 100 * g["top1"]},
                                  provenance=dense.iloc[-1]["provenance"] if len(dense) else {})
                if not matched:  # plots of the sweep; a matched budget is one point per method
                    parts = [dataset, model, device, dtype, f"b{batch}"] + (["compiled"] if compile else [])
                    section.plots = plot_group(g, title, out_dir / "plots" / slug(*parts), style)
                sections.append(section)
    return Board("tokenbench leaderboard", intro, command, sections)


def report_writers() -> dict:
    """{name: writer} of the `tokenbench.reports` entry-point group (markdown and the web page built in)."""
    writers = {}
    for ep in importlib.metadata.entry_points(group=REPORT_ENTRY_POINTS):
        try:
            writers[ep.name] = ep.load()
        except Exception as err:
            raise BenchError(f"report plugin {ep.name!r} ({ep.value}) failed to import: {err}") from None
    return writers


def write_leaderboard(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Regenerate `leaderboard.md`, its plots under `plots/`, the web page `index.html` and every plugin
    writer's output from every results file in `results_dir`; returns the markdown board's path."""
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir else results_dir
    board = build_board(results_dir, out_dir)
    written = {name: writer(board, out_dir) for name, writer in report_writers().items()}
    return written["markdown"]
