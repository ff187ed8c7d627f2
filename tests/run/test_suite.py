"""`tokenbench suite gpu --quick`: the GPU suite's whole path, shrunk to run on a CPU."""

import json
from pathlib import Path

import pytest
from plain_vit import one_thread  # noqa: F401  (autouse fixture)

from tokenbench.cli import main

CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


@pytest.mark.slow
def test_the_gpu_suite_quick_writes_every_table_the_target_check_and_both_boards(tmp_path, capsys):
    cifar = ["--cifar10-root", str(CIFAR10)] if CIFAR10.exists() else []
    assert main(["suite", "gpu", "--quick", "--device", "cpu", "--out", str(tmp_path), *cifar]) == 0
    summary = (tmp_path / "README.md").read_text()
    for stem in ("vit_digits_bf16_batch_curve", "vit_digits_fp32_b8", "vit_digits_bf16_b8_compiled"):
        assert (tmp_path / f"speed_{stem}.csv").exists()
    assert (tmp_path / "speed_vit_digits_bf16_batch_curve.png").stat().st_size > 0
    assert "Target (speedup ≥ 0.9 × GMACs ratio at batch 8, bf16)" in summary
    assert "- topk:keep=0.7: " in summary and ("): met" in summary or "NOT met" in summary)
    assert summary.count("compiled, 1 graph") == 2  # dense and top-k, compiled (not silently eager)
    assert json.loads((tmp_path / "provenance.json").read_text())["git_sha"]
    boards = [("digits", {"none", "topk", "tome"})] + ([("cifar10", {"none", "topk"})] if cifar else [])
    for dataset, methods in boards:
        rows = [json.loads(line) for line in (tmp_path / dataset / "results.jsonl").read_text().splitlines()]
        assert {r["method"] for r in rows} == methods
        assert all(r["budget"] == 0.7 and r["throughput"] > 0 for r in rows)
        assert all(r["budget_achieved"] <= 0.7 + 1e-9 for r in rows if r["method"] != "none")
        assert (tmp_path / dataset / "leaderboard.md").exists() and (tmp_path / dataset / "index.html").exists()
    if not cifar:
        assert "cifar10 board: skipped (no --cifar10-root given)" in summary
    assert "| total |" in summary
