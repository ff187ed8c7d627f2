"""torch.compile timings: compiled models are timed compiled (never silently eager), compile time apart."""

import json

import pytest
import torch
import torch._dynamo.config as dynamo_config
from plain_vit import one_thread  # noqa: F401  (autouse fixture)

from tokenbench.cli import main
from tokenbench.run.speed import compile_limits, compiled


class Repeat(torch.nn.Module):
    """A Python int attribute that steers control flow, like a block's token schedule: one graph per value."""

    def __init__(self, times: int):
        super().__init__()
        self.times = times

    def forward(self, x):
        for _ in range(self.times):
            x = x * 2 + 1
        return x


@pytest.mark.slow
def test_past_the_recompile_limit_a_model_is_reported_eager_never_timed_as_compiled():
    """Dynamo's limit is per code object, shared by every instance: past it dynamo would fall back to eager with
    a log line. Under compile_limits that is an error, and `compiled` says the model runs eager and why."""
    x = torch.randn(4, 3)
    saved = dynamo_config.recompile_limit, dynamo_config.fail_on_recompile_limit_hit
    torch._dynamo.reset()
    with compile_limits(3):
        assert dynamo_config.recompile_limit >= 3 * 8 and dynamo_config.fail_on_recompile_limit_hit
        dynamo_config.recompile_limit = 2  # room for two of the three
        ran = []
        for times in (1, 2, 3):
            model, seconds, what = compiled(Repeat(times), [x], "fp32")
            ran.append(what)
            with torch.inference_mode():
                assert torch.allclose(model(x), Repeat(times)(x))
    assert ran[:2] == ["compiled, 1 graph"] * 2
    assert ran[2].startswith("eager (FailOnRecompileLimitHit")
    assert (dynamo_config.recompile_limit, dynamo_config.fail_on_recompile_limit_hit) == saved  # restored


@pytest.mark.slow
def test_speed_compiled_times_compiled_dense_and_reports_compile_time_apart(capsys):
    """speed --compile: every model compiled first (its first calls, timed apart), then interleaved as usual;
    speedups are over the compiled dense model and each row says what ran."""
    from tokenbench.models import loading as models
    from tokenbench.run.speed import speed_table

    model = models.load_model("vit_digits").model
    table = speed_table(model, [("topk", {"keep": 0.5}), ("ats", {"sample_rate": 1.0})], batch_sizes=[4], rounds=2,
                        warmup=0, compile=True, log=lambda line: None)
    assert list(table["method"]) == ["none", "topk", "ats"] * 2  # compiled, then eager in the same rounds
    assert list(table["ran"])[3:] == ["eager"] * 3 and table["compile_s"][3:].isna().all()
    assert table["speedup"].iloc[3] == 1.0  # eager rows are over the eager dense model
    assert (table["compile_s"][:3] > 0).all() and (table["speedup"] > 0).all()
    assert table["ran"].iloc[0] == table["ran"].iloc[1] == "compiled, 1 graph"
    assert table["ran"].iloc[2].startswith("compiled,")  # per-image token counts: graph breaks, still compiled
    assert int(table["ran"].iloc[2].split()[1]) > 1
    assert main(["speed", "--model", "vit_digits", "--cell", "topk:keep=0.5", "--batch-size", "4", "--rounds", "1",
                 "--warmup", "0", "--compile"]) == 0
    out = capsys.readouterr().out
    assert "fp32, compiled, 1 rounds" in out and "none compiled, 1 graph in" in out


@pytest.mark.slow
def test_bench_compile_times_compiled_models_in_rows_of_their_own(tmp_path, capsys):
    """bench --compile: accuracy and GMACs as eager, the timing compiled at both timed shapes (batch and 1),
    rows with their own cell ids, and a leaderboard section of their own."""
    args = ["bench", "--method", "topk", "--keep", "0.5", "--out", str(tmp_path), "--repeats", "1"]
    assert main(args + ["--no-timing"]) == 0
    assert main(args + ["--compile"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    eager = {r["method"]: r for r in rows if not r.get("compile")}
    fast = {r["method"]: r for r in rows if r.get("compile")}
    assert set(eager) == set(fast) == {"none", "topk"}
    for name in fast:
        assert fast[name]["cell_id"] != eager[name]["cell_id"]
        assert fast[name]["top1"] == eager[name]["top1"] and fast[name]["gmacs"] == eager[name]["gmacs"]
        assert fast[name]["compiled"] == "compiled, 2 graphs" and fast[name]["compile_s"] > 0  # batch 32 and 1
        assert fast[name]["throughput"] > 0 and eager[name]["throughput"] is None
    assert main(["leaderboard", "--results", str(tmp_path)]) == 0
    board = (tmp_path / "leaderboard.md").read_text()
    assert "## digits · vit_digits · compiled" in board and "compiled, 2 graphs" in board
