"""The command line as a user runs it: sweeps, resume, and one-line errors that write nothing."""

import argparse
import json

import pytest
import torch

from tokenbench.cli import main
from tokenbench.measure.results import read_results


def run(*argv):
    return main([str(a) for a in argv])


def test_methods_lists_name_family_knobs_and_training(capsys):
    assert run("methods") == 0
    out = capsys.readouterr().out
    assert "topk" in out and "prune" in out and "keep = 0.9, 0.8, 0.7, 0.6, 0.5" in out
    assert "needs training" in out


def test_sweep_writes_one_row_per_configuration_and_resumes(tmp_path, checkpoint, capsys):
    args = ["bench", "--method", "none,topk", "--keep", "0.7,0.5", "--checkpoint", checkpoint,
            "--out", tmp_path, "--repeats", "1", "--batch-size", "8"]
    assert run(*args) == 0
    rows = read_results(tmp_path / "results.jsonl")
    assert [(r.method, r.knobs) for r in rows] == [("none", {}), ("topk", {"keep": 0.7}), ("topk", {"keep": 0.5})]
    row = rows[1]
    assert row.n_images == 540 and 0 <= row.top1 <= row.top5 <= 1
    assert row.tokens_per_block == [65] * 4 + [46] * 3 + [33] * 3 + [24] * 2
    assert row.gmacs < rows[0].gmacs and row.gmacs_std == pytest.approx(0)
    assert row.throughput > 0 and row.latency_ms > 0 and row.threads == torch.get_num_threads()
    assert row.attention_kernels == "cpu-fused"  # top-k needs only the class row, the rest stays fused
    assert row.weights.startswith("file:vit_digits_random.pt@sha256:")
    prov = row.provenance
    assert {"git_sha", "git_dirty", "torch", "timm", "device_name", "time_utc", "seed"} <= set(prov)
    capsys.readouterr()
    assert run(*args) == 0
    assert capsys.readouterr().out.count("already recorded") == 3
    assert len(read_results(tmp_path / "results.jsonl")) == 3


def test_accuracy_only_rows_are_completed_by_a_timed_run(tmp_path, checkpoint):
    base = ["bench", "--method", "none", "--checkpoint", checkpoint, "--out", tmp_path, "--batch-size", "8"]
    assert run(*base, "--no-timing") == 0
    assert read_results(tmp_path / "results.jsonl")[0].throughput is None
    assert run(*base, "--repeats", "1") == 0
    rows = read_results(tmp_path / "results.jsonl")
    assert len(rows) == 2 and rows[1].throughput > 0 and rows[0].cell_id == rows[1].cell_id


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope"], "unknown method 'nope'; known methods: "),
    (["--method", "topk", "--keep", "1.5"], "topk: keep=1.5 is outside (0, 1]"),
    (["--method", "topk", "--keep", "0"], "topk: keep=0 is outside (0, 1]"),
    (["--method", "topk", "--keep", "abc"], "topk: keep='abc' is not a valid float"),
    (["--method", "none", "--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--method", "none", "--dataset", "no_such_data"], "unknown dataset 'no_such_data'; known datasets: "),
    (["--method", "none", "--model", "resnet18"], "ResNet is not a Vision Transformer with a token sequence tokenbench can reduce"),
    (["--method", "none", "--checkpoint", "/nonexistent/w.pt"], "checkpoint not found: /nonexistent/w.pt"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert run("bench", *argv, "--out", out, "--no-timing") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("tokenbench bench: error: ")
    assert not (out / "results.jsonl").exists()


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    assert run("bench", "--method", "none", "--checkpoint", bad, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {bad}: it is truncated or not a torch checkpoint" in err
    assert err.count("\n") == 1 and "weights_only" not in err


def test_checkpoints_never_unpickle_code(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": "vit_digits", "state_dict": {}, "x": Payload()}, evil, pickle_module=pickle)
    assert run("bench", "--method", "none", "--checkpoint", evil, "--out", tmp_path / "o") == 2
    captured = capsys.readouterr()
    assert "pwned" not in captured.out and "holds objects other than tensors and plain data" in captured.err
    assert captured.err.count("\n") == 1 and "weights_only=False" not in captured.err  # no unsafe advice


def test_an_empty_image_folder_says_no_images_were_found(tmp_path, capsys):
    for name in ("cats", "dogs"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "notes.txt").write_text("not an image")
    assert run("bench", "--method", "none", "--dataset", "folder", "--data-root", tmp_path / "data",
               "--out", tmp_path / "o", "--no-timing") == 2
    err = capsys.readouterr().err
    assert "no images found under" in err and "2 class folders" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_leaderboard_from_a_sweep(tmp_path, checkpoint, capsys):
    assert run("bench", "--method", "none,topk,random", "--keep", "0.5", "--checkpoint", checkpoint,
               "--out", tmp_path, "--repeats", "1", "--batch-size", "8") == 0
    assert run("leaderboard", "--results", tmp_path) == 0
    text = (tmp_path / "leaderboard.md").read_text()
    assert "| none" in text and "| topk" in text and "| random" in text and "speedup" in text
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 2 and pngs[0].endswith("_gmacs.png") and pngs[1].endswith("_throughput.png")


def test_leaderboard_without_results_is_an_error(tmp_path, capsys):
    assert run("leaderboard", "--results", tmp_path) == 2
    assert "no results rows" in capsys.readouterr().err


def test_rows_are_valid_json_lines(tmp_path, checkpoint):
    run("bench", "--method", "none", "--checkpoint", checkpoint, "--out", tmp_path, "--no-timing")
    for line in (tmp_path / "results.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line), dict)


def test_a_shared_knob_s_help_names_every_method_that_declares_it():
    from tokenbench.reduce.registry import knob_owners

    parser = argparse.ArgumentParser()
    from tokenbench.cli import bench

    bench_parser = bench.add_parser(parser.add_subparsers())
    keep = next(a for a in bench_parser._actions if a.dest == "keep")
    owners = [m for m, _ in knob_owners()["keep"]]
    assert len(owners) >= 7 and keep.help.startswith(", ".join(owners) + ": ")
