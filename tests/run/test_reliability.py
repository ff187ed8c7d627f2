"""Results that can be trusted: no silent loss, no duplicates, bad lines skipped and named, one-line errors
before any work, NaN and noisy timings flagged."""

import errno
import json
import os
import zipfile

import pytest
import timm
import torch

from tokenbench.cli import main
from tokenbench.errors import BenchError
from tokenbench.measure import metrics as measure
from tokenbench.measure import results as results
from tokenbench.measure.results import ResultRow, append_result, read_results
from tokenbench.models.loading import save_checkpoint
from tokenbench.report.leaderboard import load_rows, write_leaderboard
from tokenbench.run import sweep as harness


def run(*argv):
    return main([str(a) for a in argv])


def sweep_args(checkpoint, out, *extra):
    return ["bench", "--method", "none,topk", "--keep", "0.5", "--checkpoint", checkpoint, "--out", out,
            "--no-timing", "--split", "val", *extra]


class FullDisk:
    """`os` for the results module, whose writes stop after `room` bytes with ENOSPC, as a full disk's do."""

    def __init__(self, room: int):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, bytes(data[:self.room]))
        self.room -= n
        return n


def test_a_full_disk_stops_the_sweep_with_whole_lines_only(tmp_path, checkpoint, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run("bench", "--method", "none", "--checkpoint", checkpoint, "--out", out, "--no-timing", "--split",
               "val") == 0
    first = (out / "results.jsonl").read_bytes()
    monkeypatch.setattr(results, "os", FullDisk(room=100))  # part of the next row fits, then the disk is full
    assert run(*sweep_args(checkpoint, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "rows already written are intact" in err[0]
    assert (out / "results.jsonl").read_bytes() == first  # the torn row was undone


def test_duplicate_sweep_values_are_measured_once(tmp_path, checkpoint):
    assert run(*sweep_args(checkpoint, tmp_path, "--keep", "0.5,0.5,0.50")) == 0
    assert [(r.method, r.knobs) for r in read_results(tmp_path / "results.jsonl")] == [
        ("none", {}), ("topk", {"keep": 0.5})]


def test_a_second_sweep_on_the_same_results_file_stops_at_once(tmp_path, checkpoint, capsys):
    with results.exclusive(tmp_path / "results.jsonl"):
        assert run(*sweep_args(checkpoint, tmp_path)) == 2
    assert f"is being written by another tokenbench process (pid {os.getpid()})" in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()
    assert run(*sweep_args(checkpoint, tmp_path)) == 0  # the lock went with its holder


def test_bad_lines_are_skipped_named_and_never_rewritten(tmp_path, checkpoint, capsys):
    assert run(*sweep_args(checkpoint, tmp_path)) == 0
    path = tmp_path / "results.jsonl"
    good = path.read_text().splitlines()
    row_without_id = {k: v for k, v in json.loads(good[0]).items() if k != "cell_id"}
    damaged = [good[0], "garbage", good[1][:40], json.dumps(row_without_id), "[1, 2]"]
    path.write_text("\n".join(damaged) + "\n")
    capsys.readouterr()
    assert len(load_rows(tmp_path)) == 1
    assert "skipped 4 lines that are not a results row (line 2, 3, 4, 5)" in capsys.readouterr().err
    write_leaderboard(tmp_path)
    assert run(*sweep_args(checkpoint, tmp_path)) == 0  # resume: the none row is kept, topk measured again
    lines = path.read_text().splitlines()
    assert lines[:5] == damaged and len(lines) == 6 and json.loads(lines[5])["method"] == "topk"


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--threads", "0"], "--threads 0: must be at least 1"),
    (["--threads", "-1"], "--threads -1: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be at least 0"),
    (["--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be in [0, 2**63)"),
    (["--keep", ","], "topk: keep ',' gives no values"),
    (["--method", ","], "no method named in ','"),
    (["--method", "topk,ats", "--sample-rate", "1e9"], "ats: sample_rate=1e+09 is outside (0, 16]"),
    (["--budget", "0"], "--budget 0: must be a fraction of the dense GMACs in (0, 1]"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, checkpoint, capsys, argv, message):
    out = tmp_path / "out"
    assert run(*sweep_args(checkpoint, out), *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_an_output_path_that_is_a_file_stops_the_sweep_and_the_training(tmp_path, checkpoint, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run(*sweep_args(checkpoint, blocker)) == 2
    assert "--out " + str(blocker) + ": is a file, not a folder" in capsys.readouterr().err
    assert run("train", "--epochs", "1", "--out", blocker / "model.pt") == 2
    err = capsys.readouterr().err
    assert "cannot write there" in err and "nothing was trained" in err
    assert run("train", "--epochs", "1", "--out", tmp_path) == 2
    assert "is a folder; give the checkpoint file to write" in capsys.readouterr().err


def test_train_checks_knobs_against_the_method_it_trains(tmp_path, capsys):
    assert run("train", "--method", "tome", "--keep", "0.5", "--epochs", "1", "--out", tmp_path / "m.pt") == 2
    assert "tome has no knob 'keep' (its knobs: r, inflect)" in capsys.readouterr().err
    assert run("train", "--method", "evit", "--keep", "1.5", "--epochs", "1", "--out", tmp_path / "m.pt") == 2
    assert "evit: keep=1.5 is outside (0, 1]" in capsys.readouterr().err


def test_a_checkpoint_of_the_wrong_shapes_is_one_line(tmp_path, capsys):
    path = tmp_path / "wide.pt"
    save_checkpoint(path, timm.create_model("vit_digits", embed_dim=48, num_heads=3), "vit_digits", {})
    state = torch.load(path, weights_only=True)
    state["model_kwargs"] = {}  # claims to be the default vit_digits, holds a narrower one
    torch.save(state, path)
    assert run("bench", "--method", "none", "--checkpoint", path, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {path} does not fit vit_digits: size mismatch" in err[0]


def test_a_truncated_cifar_zip_is_one_line(tmp_path, checkpoint, capsys):
    with zipfile.ZipFile(tmp_path / "test.zip", "w") as z:
        z.writestr("test/cat/0.png", b"x" * 1000)
    (tmp_path / "test.zip").write_bytes((tmp_path / "test.zip").read_bytes()[:200])
    assert run("bench", "--method", "none", "--checkpoint", checkpoint, "--dataset", "cifar10", "--data-root",
               tmp_path, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a readable zip file" in err[0]


def test_nan_weights_and_logits_are_flagged_in_the_row_and_on_stderr(tmp_path, capsys):
    model = timm.create_model("vit_digits")
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model, "vit_digits", {})
    assert run("bench", "--method", "none", "--checkpoint", path, "--out", tmp_path / "o", "--no-timing",
               "--split", "val") == 0
    row = read_results(tmp_path / "o" / "results.jsonl")[0]
    assert row.nonfinite_weights is True and row.nonfinite_logits == row.n_images
    assert f"none -: {row.n_images} images with NaN or inf logits; NaN or inf weights" in capsys.readouterr().err


def test_a_noisy_timing_is_flagged_in_the_row_and_on_the_leaderboard(tmp_path, monkeypatch):
    busy = measure.Timing(median=100.0, iqr=25.0, repeats=7, iterations=1)
    monkeypatch.setattr(measure, "throughput", lambda *a, **k: busy)
    fields = harness.timing_fields(torch.nn.Identity(), torch.zeros(2, 3), "fp32", repeats=7)
    assert fields["timing_noisy"] is True and len(fields["load_average"]) == 2
    base = {f: 0 for f in ("method", "knobs", "model", "weights", "dataset", "split", "device", "device_name",
                           "dtype", "batch_size", "threads", "seed", "family", "needs_training", "n_images",
                           "top1", "top5", "gmacs", "gmacs_p50", "gmacs_std", "gmacs_min", "gmacs_max",
                           "gmacs_counter", "tokens_per_block", "stats")}
    provenance = {"device_name": "cpu", "torch": "t", "timm": "t", "time_utc": "2026-01-01", "git_sha": None}
    for cell, method, noisy in (("a", "none", False), ("b", "topk", True)):
        append_result(tmp_path / "results.jsonl", ResultRow.from_dict(
            {**base, "cell_id": cell, "method": method, "knobs": {}, "model": "m", "weights": "w", "dataset": "d",
             "dtype": "fp32", "batch_size": 1, "device_name": "cpu", "n_images": 1, "gmacs": 1.0,
             "throughput": 10.0, "latency_ms": 1.0, "timing_noisy": noisy, "provenance": provenance}))
    board = write_leaderboard(tmp_path).read_text()
    assert "| timing" in board and "noisy" in board


def test_read_results_reports_through_its_log(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("not json\n")
    said = []
    assert read_results(path, log=said.append) == [] and "line 1" in said[0]


def test_append_result_raises_instead_of_writing_half_a_line(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    row = ResultRow.from_dict({f: 0 for f in ("cell_id", "method", "knobs", "model", "weights", "dataset", "split",
                                              "device", "device_name", "dtype", "batch_size", "threads", "seed",
                                              "family", "needs_training", "n_images", "top1", "top5", "gmacs",
                                              "gmacs_p50", "gmacs_std", "gmacs_min", "gmacs_max", "gmacs_counter",
                                              "tokens_per_block", "stats", "provenance")})
    append_result(path, row)
    before = path.read_bytes()
    monkeypatch.setattr(results, "os", FullDisk(room=10))
    with pytest.raises(BenchError, match="No space left on device"):
        append_result(path, row)
    assert path.read_bytes() == before


def test_knob_values_are_stored_exactly_as_given(tmp_path, checkpoint):
    """Rows can be filtered on equality: 0.7 is stored as 0.7, never as 0.7000000000000001."""
    assert run(*sweep_args(checkpoint, tmp_path, "--keep", "0.7,.3,1e-1")) == 0
    text = (tmp_path / "results.jsonl").read_text()
    assert [r.knobs for r in read_results(tmp_path / "results.jsonl")][1:] == [{"keep": 0.7}, {"keep": 0.3},
                                                                                {"keep": 0.1}]
    assert '"keep": 0.7}' in text and "0000000" not in text.split('"knobs"')[2][:40]
