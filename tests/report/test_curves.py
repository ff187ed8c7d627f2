"""`tokenbench curve`: the learning curve and the top-k vs random probes of a training run."""

import pytest
import torch

from tokenbench.cli import main
from tokenbench.models.loading import asset
from tokenbench.report import curves

HISTORY = [
    {"epoch": 1, "loss": 2.1, "seconds": 60.0, "val_top1": 0.30, "ema_val_top1": 0.25},
    {"epoch": 2, "loss": 1.9, "seconds": 61.0, "val_top1": 0.40, "ema_val_top1": 0.42,
     "probes": {"topk:keep=0.5": 0.35, "random:keep=0.5": 0.37, "topk:keep=0.7": 0.40, "random:keep=0.7": 0.39,
                "evit:keep=0.5": 0.36}},
]


def test_topk_minus_random_pairs_each_setting_probed_with_both():
    gaps = curves.topk_minus_random(curves.history_frame(HISTORY))
    assert list(gaps.index) == [2]  # only the epoch that probed
    assert gaps.loc[2].to_dict() == pytest.approx({"keep=0.5": -2.0, "keep=0.7": 1.0})


def test_curve_reads_a_resume_state_prints_the_gaps_and_writes_a_png(tmp_path, capsys):
    state = tmp_path / "run.pt.partial"
    torch.save({"history": HISTORY, "step": 10}, state)
    out = tmp_path / "curve.png"
    assert main(["curve", str(state), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-k minus random" in printed and "-2.00" in printed and "+1.00" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_reads_a_shipped_checkpoints_history():
    """The v1 CIFAR-10 reference records its 15 epochs; it ran no probes, so there is no gap to show."""
    frame = curves.history_frame(curves.read_history(asset("vit_cifar10.pt")))
    assert list(frame.index) == list(range(1, 16))
    assert curves.topk_minus_random(frame).empty


def test_a_file_without_history_is_refused_by_name(tmp_path, capsys):
    other = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, other)
    assert main(["curve", str(other), "--out", str(tmp_path / "x.png")]) == 2
    assert "weights.pt: holds no training history" in capsys.readouterr().err


def test_a_file_that_is_not_a_torch_file_is_refused_by_name(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("epoch=1 loss=2.0\n")
    assert main(["curve", str(text), "--out", str(tmp_path / "x.png")]) == 2
    assert "notes.txt: not a checkpoint or resume state" in capsys.readouterr().err
