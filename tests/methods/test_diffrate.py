"""DiffRate against its official rules, written out per image (re-sort every block by head-mean class attention,
keep P, merge the rest into the M most important by cosine of the tokens: plain mean, sizes grown by similarity
x size), its published DeiT-S / DeiT-B schedules and FLOPs, and the rate search from the command line."""

import json

import pytest
import timm
import torch
from plain_vit import deit_small, one_thread, plain_logits, small_vit, without_weights  # noqa: F401

from tokenbench import api
from tokenbench.cli import main
from tokenbench.errors import BenchError
from tokenbench.methods.diffrate import PUBLISHED, Rates, RateSearch, formula_fraction, model_flops, with_rates
from tokenbench.reduce.ledger import measure_gmacs


def diffrate_step(rates, protected):
    def reduce(i, x, attn, keys, values, size):
        p = protected
        importance = attn[0, :, 0, p:].mean(0) if p else attn[0].mean(0).mean(0)
        order = list(range(p)) + [p + j for j in importance.argsort(descending=True).tolist()]
        x, size = x[:, order][:, :rates.prune[i]], size[:, order][:, :rates.prune[i]]
        kept = rates.merge[i]
        if kept >= x.shape[1]:
            return x, size
        unit = x[0] / x[0].norm(dim=-1, keepdim=True)
        members = [[x[0, d]] for d in range(kept)]
        sizes = [size[0, d, 0] for d in range(kept)]
        for s in range(kept, x.shape[1]):
            sims = [float(unit[s] @ unit[d]) for d in range(p, kept)]
            d = p + sims.index(max(sims))
            members[d].append(x[0, s])
            sizes[d] = sizes[d] + max(sims) * size[0, s, 0]
        return torch.stack([torch.stack(m).mean(0) for m in members])[None], torch.stack(sizes)[None, :, None]

    return reduce


SCHEDULES = [  # 17 tokens; P above the incoming count, prune only, merge only
    Rates((17, 16, 14, 12, 12, 10, 9, 8, 8, 6, 5, 3), (17, 15, 13, 12, 11, 10, 8, 8, 7, 5, 4, 3)),
    Rates((17, 17, 15, 16, 14, 14, 12, 12, 12, 12, 12, 12), (17, 14, 15, 13, 13, 11, 12, 10, 10, 9, 9, 9)),
    Rates((17, 13, 13, 11, 11, 9, 9, 7, 7, 5, 5, 5), (17,) * 12),
]


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("rates", SCHEDULES)
def test_logits_equal_the_written_out_algorithm(rates, class_token):
    kwargs = {} if class_token else {"class_token": False, "global_pool": "avg"}
    vit = small_vit("deit_small_patch16_224", **kwargs)
    if not class_token:  # 16 tokens, none protected
        rates = Rates(tuple(min(r, 16) for r in rates.prune), tuple(min(r, 16) for r in rates.merge))
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        fast = with_rates(vit, rates)(images)
        slow = torch.cat([plain_logits(vit, img[None], diffrate_step(rates, int(class_token))) for img in images])
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


PUBLISHED_GFLOPS = {2.3: 2.327, 2.5: 2.505, 2.7: 2.709, 2.9: 2.905, 3.1: 3.108,
                    8.7: 8.731, 10.0: 9.986, 10.4: 10.434, 11.5: 11.517, 12.5: 12.523}


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_published_rates_give_the_published_flops_and_token_counts(key):
    """The official FLOPs formula at the searched rates of compression_rate.json: the README's 2.905 (DeiT-S)
    and 11.517 (DeiT-B), and each block runs on the tokens the lists imply."""
    name, _ = key
    rates = PUBLISHED[key]
    model = deit_small() if name == "deit_small_patch16_224" else without_weights(lambda: timm.create_model(name))
    assert model_flops(model, rates) / 1e9 == pytest.approx(PUBLISHED_GFLOPS[key[1]], abs=6e-4)
    if name == "deit_small_patch16_224":
        ledger = measure_gmacs(with_rates(model, rates), torch.randn(1, 3, 224, 224))
        assert ledger.tokens_per_block()[0].tolist() == [197] + rates.tokens(197)[:-1]


def test_deit_small_2_9_schedule_and_gmacs():
    rates = PUBLISHED[("deit_small_patch16_224", 2.9)]
    assert rates.tokens(197) == [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]
    ledger = measure_gmacs(with_rates(deit_small(), rates), torch.randn(1, 3, 224, 224))
    # the formula's 2.905, plus LayerNorms, softmax-free extras the formula leaves out and the matching
    assert ledger.gmacs.item() == pytest.approx(2.9156, abs=1e-3)
    assert formula_fraction(deit_small(), rates) == pytest.approx(2.905 / 4.599, abs=1e-3)


def test_the_search_model_at_full_counts_is_the_dense_model():
    """Every candidate weight on keeping all tokens: the masked search forward gives the dense logits (up to
    the masked softmax's 1e-6 smoothing) and the dense FLOPs."""
    vit = small_vit("deit_small_patch16_224")
    search = RateSearch(vit)
    with torch.no_grad():
        search.logits.fill_(-1e9)
        search.logits[..., 0] = 0.0
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    logits, flops = search(images)
    torch.testing.assert_close(logits, vit(images), rtol=0, atol=1e-5)
    assert flops.item() == pytest.approx(model_flops(vit, None), rel=1e-12)
    assert search.rates() == Rates((17,) * 12, (17,) * 12)


def test_the_flops_term_pulls_every_learned_count_down_when_above_target():
    vit = small_vit("deit_small_patch16_224")
    search = RateSearch(vit)
    logits, flops = search(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    ((flops / model_flops(vit, None) - 0.1) ** 2).backward()
    expected_kept = search.logits.softmax(-1) @ search.candidates
    (grad,) = torch.autograd.grad(expected_kept.sum(), search.logits)
    assert ((search.logits.grad * grad).sum(dim=-1) > 0).all()  # descending the loss lowers each expected count


@pytest.mark.slow
def test_search_from_the_command_line_meets_its_target(tmp_path, capsys):
    out = tmp_path / "rates.json"
    assert main(["calibrate", "--method", "diffrate", "--target", "0.5", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "diffrate calibrated on digits/val (179 images)" in printed and "target=0.5" in printed
    (row,) = json.loads(out.read_text())
    assert row["prune"][0] == row["merge"][0] == 65 and len(row["prune"]) == 12
    assert row["formula_fraction"] == pytest.approx(0.5, abs=0.03)
    assert row["gmacs_fraction"] == pytest.approx(0.5, abs=0.04)
    assert row["top1"] > 0.8  # dense: 0.894 on this split; a broken merge would not keep this
    built = with_rates(api.load_model("vit_digits"), Rates(tuple(row["prune"]), tuple(row["merge"])))
    assert built(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_apply_asks_for_the_held_out_split():
    vit = api.load_model("vit_digits")
    with pytest.raises(BenchError, match="calibration=\\(images, labels\\)"):
        api.apply(vit, "diffrate", target=0.5)
    with pytest.raises(BenchError, match="topk does not calibrate"):
        api.apply(vit, "topk", calibration=(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)), keep=0.5)


def test_published_rates_by_gflops_without_a_search():
    """`gflops` picks the official rates of the model's architecture; a value not published is an error."""
    deit = deit_small()
    images = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        chosen = api.apply(deit, "diffrate", gflops=2.7)(images)
        direct = with_rates(deit, PUBLISHED[("deit_small_patch16_224", 2.7)])(images)
    assert torch.equal(chosen, direct)
    with pytest.raises(BenchError, match="no published rates for deit_small_patch16_224 at 2.8 GFLOPs"):
        api.apply(deit, "diffrate", gflops=2.8)
    with pytest.raises(BenchError, match="give one \\(with gflops, target=1\\)"):
        api.apply(deit, "diffrate", gflops=2.7, target=0.5)


def test_the_search_runs_on_a_model_without_a_class_token():
    """VideoMAE-style models: the mean attention received ranks the tokens in the search as at inference."""
    vit = small_vit("deit_small_patch16_224", class_token=False, global_pool="avg")
    search = RateSearch(vit)
    logits, flops = search(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    logits.sum().backward()
    assert logits.shape == (2, 1000) and search.logits.grad.abs().sum() > 0
    assert search.rates().prune[0] == 16


def test_the_search_runs_under_inference_mode_and_leaves_the_model_as_it_was():
    from tokenbench.methods.diffrate import search_rates

    vit = small_vit("deit_small_patch16_224")
    images, labels = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with torch.inference_mode():
        rates = search_rates(vit, images, labels, 0.5, steps=3, batch_size=2)
    assert rates == search_rates(vit, images, labels, 0.5, steps=3, batch_size=2)
    assert all(p.requires_grad for p in vit.parameters())
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())


def test_published_rates_follow_the_shapes():
    """ViT-B has DeiT-B's shapes, so it takes DeiT-B's rates (the GPU suite times it at 10.4 G)."""
    from tokenbench.methods.diffrate import published

    vit_b = without_weights(lambda: timm.create_model("vit_base_patch16_224"))
    assert published(vit_b, 10.4) == PUBLISHED[("deit_base_patch16_224", 10.4)]
    with pytest.raises(BenchError, match="published for its shapes: 8.7, 10, 10.4, 11.5, 12.5"):
        published(vit_b, 2.7)
