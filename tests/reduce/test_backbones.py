"""Backbones tokenbench cannot reduce are refused in one line that names the reason, in the API and on the
command line, before any work (the families it supports are checked by the conformance suite)."""

import pytest
import timm
import torch

from tokenbench import api
from tokenbench.cli import main
from tokenbench.errors import BenchError

REFUSED = {  # small random-init configurations, and the reason each message must give
    "swin_tiny_patch4_window7_224": (dict(img_size=64, embed_dim=24, depths=(1, 1), num_heads=(1, 2), window_size=4),
                                     "hierarchical"),
    "eva02_small_patch14_224": (dict(img_size=56, depth=2, embed_dim=48, num_heads=3), "rotary position embedding"),
    "beit_base_patch16_224": (dict(img_size=64, depth=2, embed_dim=48, num_heads=3), "relative position bias"),
    "resnet18": ({}, "not a Vision Transformer"),
}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.parametrize("method", ["none", "topk", "tome", "diffrate", "ats"])
def test_unsupported_backbones_get_the_reason(name, method):
    kwargs, reason = REFUSED[name]
    model = timm.create_model(name, **kwargs)
    with pytest.raises(BenchError, match=reason) as err:
        api.apply(model, method)
    assert "\n" not in str(err.value) and "Supported: DeiT" in str(err.value)
    with pytest.raises(BenchError, match=reason):
        api.gmacs(model, torch.randn(1, 3, 64, 64))


def test_the_command_line_refuses_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["bench", "--model", "resnet18", "--method", "topk", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Vision Transformer" in err[0]
    assert not out.exists()
