"""The FLOP ledger against the papers' numbers, fvcore and torch's FlopCounterMode."""

import pytest
import timm
import torch

from tokenbench.reduce.ledger import CostLedger, flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


def fvcore_gmacs(model: torch.nn.Module, images: torch.Tensor) -> float:
    """GMACs by fvcore (the papers' tool), with the handle for fused attention that it lacks."""
    from fvcore.nn import FlopCountAnalysis

    def sdpa_handle(inputs, outputs):
        q, k, v = (i.type().sizes() for i in inputs[:3])
        batch_heads = 1
        for d in q[:-2]:
            batch_heads *= d
        return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])

    analysis = FlopCountAnalysis(model, images).set_op_handle("aten::scaled_dot_product_attention", sdpa_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total() / 1e9


@pytest.fixture(scope="module")
def deit_s():
    return timm.create_model("deit_small_patch16_224").eval()


def test_dense_deit_small_is_the_papers_4_608(deit_s):
    ledger = measure_gmacs(get_method("none").build(deit_s), torch.randn(1, 3, 224, 224))
    assert ledger.gmacs.item() == pytest.approx(4.608338, abs=1e-6)
    assert ledger.tokens_per_block()[0].tolist() == [197.0] * 12


def test_dense_vit_base_is_17_58():
    model = timm.create_model("vit_base_patch16_224").eval()
    ledger = measure_gmacs(get_method("none").build(model), torch.randn(1, 3, 224, 224))
    assert round(ledger.gmacs.item(), 2) == 17.58


def test_fvcore_with_the_fused_attention_handle_matches_the_ledger(deit_s):
    pytest.importorskip("fvcore")
    assert fvcore_gmacs(deit_s, torch.randn(1, 3, 224, 224)) == pytest.approx(4.608338, abs=1e-6)


@pytest.mark.parametrize("method,knobs", [("none", {}), ("topk", {"keep": 0.7}), ("random", {"keep": 0.5})])
def test_ledger_matmuls_equal_flop_counter(deit_s, method, knobs):
    model = get_method(method).build(deit_s, **knobs)
    x = torch.randn(1, 3, 224, 224)
    assert measure_gmacs(model, x).matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)


def test_topk_schedule_and_gmacs(deit_s):
    ledger = measure_gmacs(get_method("topk").build(deit_s, keep=0.7), torch.randn(2, 3, 224, 224))
    assert ledger.tokens_per_block()[0].tolist() == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert ledger.gmacs.tolist() == pytest.approx([3.0033] * 2, abs=1e-4)


def test_rows_scatter_costs_to_a_subset():
    with CostLedger(4) as ledger:
        ledger.add(1.0)
        with ledger.rows(torch.tensor([1, 3])):
            ledger.add(torch.tensor([10.0, 20.0]))
            with ledger.rows(torch.tensor([1])):
                ledger.note("late", 1.0)
    assert ledger.macs.tolist() == [1.0, 11.0, 1.0, 21.0]
    assert ledger.notes["late"].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_nothing_is_recorded_without_an_active_ledger(tiny_vit, digit_images):
    model = get_method("none").build(tiny_vit)
    with CostLedger(4) as ledger:
        pass
    with torch.inference_mode():
        model(digit_images)
    assert ledger.macs.sum().item() == 0.0
