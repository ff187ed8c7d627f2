"""Backbones tokenbench cannot reduce are refused in one line that names the reason, in the API and on the
command line, before any work (the families it supports are checked by the conformance suite)."""

import pytest
import timm
import torch

from tokenbench import api
from tokenbench.cli import main
from tokenbench.errors import BenchError
from tokenbench.models.families import REFUSED, small_model

REASONS = {  # what each refusal must say
    "swin_tiny_patch4_window7_224": "hierarchical", "eva02_small_patch14_224": "rotary position embedding",
    "beit_base_patch16_224": "relative position bias", "resnet18": "not a Vision Transformer",
}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.parametrize("method", ["none", "topk", "tome", "diffrate", "ats"])
def test_unsupported_backbones_get_the_reason(name, method):
    reason = REASONS[name]
    model = small_model(name)
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


@pytest.mark.slow
def test_the_support_table_in_the_docs_is_the_command_s_output():
    """docs/support.md is `tokenbench support --out docs/support.md`: rerun, it must not have drifted; every
    supported family runs every block-level method, every refused one refuses them all."""
    from pathlib import Path

    from tokenbench.cli.support import SUPPORT_HEADER
    from tokenbench.models.families import SUPPORTED
    from tokenbench.run.support import support_markdown, support_table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = support_table()
    finally:
        torch.set_num_threads(threads)
    doc = Path(__file__).resolve().parents[2] / "docs" / "support.md"
    assert doc.read_text() == SUPPORT_HEADER + support_markdown(table), "rerun: tokenbench support --out docs/support.md"
    assert (table.loc["topk", list(SUPPORTED)] == "yes").all()
    assert table.loc["topk", list(REFUSED)].str.startswith("refused").all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_small_distilled_patch16_224", "vit_base_patch16_siglip_224",
                                  "vit_small_patch14_reg4_dinov2"])
def test_full_size_families_no_op_is_timm_s_forward_and_a_real_setting_runs(name):
    """The matrix runs on small configurations; once, at full size (random init, 224/518 px): every
    training-free method's no-op equals timm's own logits, and its middle setting runs to finite logits."""
    from tokenbench.reduce.registry import all_methods

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    images = torch.randn(1, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(images)
        for method_name, cls in all_methods().items():
            if cls.needs_training or cls.needs_calibration:
                continue  # trained methods run their own weights; calibrating ones search (the small matrix has them)
            method = cls()
            assert torch.equal(api.apply(model, method_name, **method.noop_knobs())(images), expected), method_name
            knobs = method.sweep_points()[len(method.sweep_points()) // 2]
            assert torch.isfinite(api.apply(model, method_name, **knobs)(images)).all(), method_name
