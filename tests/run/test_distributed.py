"""Scaling out: exact data-parallel slices, torchrun with 2 gloo processes, --shard i/n, submitit."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenbench.cli import main
from tokenbench.errors import BenchError
from tokenbench.measure.metrics import Evaluation
from tokenbench.measure.results import read_results, results_files
from tokenbench.report.leaderboard import load_rows
from tokenbench.run import distributed as distributed

REPO = Path(__file__).resolve().parents[2]
VOLATILE = {"provenance", "cell_id", "device_name"}


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("n", [0, 1, 5, 540, 1003])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_slices_cover_every_image_once_without_padding(n, size):
    slices = [distributed.contiguous_slice(n, distributed.World(rank, size)) for rank in range(size)]
    covered = [i for start, stop in slices for i in range(start, stop)]
    assert covered == list(range(n))
    assert max(b - a for a, b in slices) - min(b - a for a, b in slices) <= 1


def evaluation(top1, gmacs, tokens, stats):
    g = np.asarray(gmacs, dtype=float)
    correct = np.arange(len(g)) < round(top1 * len(g))
    return Evaluation(len(g), top1, 1.0, g, g / 2, tokens, stats, 0, correct, g.astype(int))


def test_merge_is_the_single_process_evaluation():
    parts = [evaluation(2 / 3, [1, 2, 3], [65.0, 40.0], {"exit": 0.5}), evaluation(0.0, [4], [65.0, 20.0], {"exit": 1.0})]
    merged = Evaluation.merged(parts)
    assert merged.n_images == 4 and merged.top1 == 0.5 and merged.gmacs.tolist() == [1, 2, 3, 4]
    assert merged.tokens_per_block == [65.0, 35.0] and merged.stats == {"exit": 0.625}
    assert merged.correct.tolist() == [True, True, False, False] and merged.labels.tolist() == [1, 2, 3, 4]


def test_shard_parsing_and_deterministic_round_robin():
    assert distributed.parse_shard("1/3") == (1, 3) and distributed.parse_shard(None) is None
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(BenchError, match="--shard"):
            distributed.parse_shard(bad)
    plan = [("topk", {"keep": k}) for k in (0.9, 0.5, 0.7)] + [("none", {})]
    key = lambda cell: distributed.cell_sort_key(*cell)  # noqa: E731
    shards = [distributed.shard_of(plan, (i, 2), key) for i in range(2)]
    assert shards == [[("none", {}), ("topk", {"keep": 0.7})], [("topk", {"keep": 0.5}), ("topk", {"keep": 0.9})]]
    assert shards == [distributed.shard_of(plan[::-1], (i, 2), key) for i in range(2)]  # order of listing is irrelevant


def rows_without_volatile(path):
    return {(r.method, str(r.knobs)): {k: v for k, v in r.to_dict().items() if k not in VOLATILE}
            for r in read_results(path)}


def test_shards_cover_the_sweep_and_the_leaderboard_merges_them(tmp_path, checkpoint):
    base = ["bench", "--method", "none,topk", "--keep", "0.7,0.5", "--checkpoint", str(checkpoint), "--no-timing", "--split", "val",
            "--batch-size", "64", "--threads", "1"]
    assert main(base + ["--out", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert main(base + ["--out", str(tmp_path / "sharded"), "--shard", f"{i}/2"]) == 0
    files = results_files(tmp_path / "sharded")
    assert [f.name for f in files] == ["results-shard-0-of-2.jsonl", "results-shard-1-of-2.jsonl"]
    assert [len(read_results(f)) for f in files] == [2, 1]
    merged = {k: v for f in files for k, v in rows_without_volatile(f).items()}
    assert merged == rows_without_volatile(tmp_path / "whole" / "results.jsonl")
    assert sorted(load_rows(tmp_path / "sharded")["knob_text"]) == ["-", "keep=0.5", "keep=0.7"]  # what the board reads


@pytest.mark.slow
def test_torchrun_two_gloo_processes_write_the_single_process_row(tmp_path, checkpoint):
    base = ["--method", "none,topk", "--keep", "0.5", "--checkpoint", str(checkpoint), "--no-timing", "--split", "val",
            "--batch-size", "50", "--threads", "1"]
    assert main(["bench", *base, "--out", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tokenbench", "bench", *base, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes" in done.stdout
    ddp = rows_without_volatile(tmp_path / "ddp" / "results.jsonl")
    single = rows_without_volatile(tmp_path / "single" / "results.jsonl")
    assert ddp.keys() == single.keys() and len(ddp) == 2
    for key in single:
        assert ddp[key]["n_images"] == single[key]["n_images"] == 179  # odd: ranks get 90 and 89
        for name in ("top1", "top5", "tokens_per_block", "gmacs_p50", "gmacs_min", "gmacs_max"):
            assert ddp[key][name] == single[key][name], name
        assert ddp[key]["gmacs"] == pytest.approx(single[key]["gmacs"], rel=1e-12)


def test_submitit_runs_each_shard_as_an_array_job(tmp_path, checkpoint):
    pytest.importorskip("submitit")
    args = ["bench", "--method", "none,topk", "--keep", "0.7,0.5", "--checkpoint", str(checkpoint), "--no-timing", "--split", "val",
            "--batch-size", "64", "--threads", "1", "--out", str(tmp_path), "--submitit", "--cluster", "debug", "--jobs", "2",
            "--timeout-min", "5"]
    assert main(args) == 0
    files = results_files(tmp_path)
    assert [f.name for f in files] == ["results-shard-0-of-2.jsonl", "results-shard-1-of-2.jsonl"]
    assert sorted((r.method, r.knobs.get("keep")) for f in files for r in read_results(f)) == [
        ("none", None), ("topk", 0.5), ("topk", 0.7)]
