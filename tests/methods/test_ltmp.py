"""LTMP: the official inference rule worked by hand and written out per image, padded batches, training."""

import math

import pytest
import torch
from conftest import train_steps

from tokenbench.errors import BenchError
from tokenbench.methods.ltmp import TARGETS, LTMPReducer, flops_ratio
from tokenbench.models import loading as models
from tokenbench.models.families import SUPPORTED, small_model
from tokenbench.reduce.contract import AttentionInfo, TokenState
from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.ops import apply_merge
from tokenbench.reduce.registry import get_method


def hard_reducer(merge: float, prune: float) -> LTMPReducer:
    return LTMPReducer(torch.tensor([merge]), torch.tensor([prune]), 0, []).eval()


def test_a_case_worked_by_hand_merges_then_prunes_and_pads_the_shorter_image():
    """Six tokens [cls, t1..t5]: A = t2, t4; B = t1, t3, t5. t2's best partner t3 (cos 0.995 > 0.9) merges;
    t4's best (t3, cos 0.63) does not. Importance (all rows of the map alike): t3's own 0.03 is below the
    prune threshold 0.1 but it takes t2's 0.2, so it stays; t1 (0.02) goes in image 0 and stays in image 1
    (0.15). Output: cls, unmerged A (t4), B (t1, t3, t5); image 0 has one slot of padding."""
    keys = torch.tensor([[0.5, 0.5], [0, 1], [1, 0], [1, 0.1], [1, -1], [-1, 0]])
    keys = keys.expand(2, 1, 6, 2)
    rows = torch.tensor([[0.3, 0.02, 0.2, 0.03, 0.25, 0.2], [0.17, 0.15, 0.2, 0.03, 0.25, 0.2]])
    weights = rows[:, None, None, :].expand(2, 1, 6, 6)
    x = torch.arange(2 * 6 * 3, dtype=torch.float64).reshape(2, 6, 3)
    state = TokenState(prefix=1)
    decision = hard_reducer(0.9, 0.1).decide(x, state, AttentionInfo(keys=keys, weights=weights))
    out = apply_merge(x, state, decision)
    assert state.mask.tolist() == [[True, True, True, True, False], [True] * 5]
    assert decision.kept[0, :4].tolist() == [0, 4, 3, 5] and decision.kept[1].tolist() == [0, 4, 1, 3, 5]
    merged = (x[:, 2] + x[:, 3]) / 2
    assert torch.equal(out[0, :4], torch.stack([x[0, 0], x[0, 4], merged[0], x[0, 5]]))
    assert torch.equal(out[1], torch.stack([x[1, 0], x[1, 4], x[1, 1], merged[1], x[1, 5]]))
    assert state.size[0, :4, 0].tolist() == [1, 1, 2, 1] and state.size[1, :, 0].tolist() == [1, 1, 1, 2, 1]


def official_logits(vit, image, merge, prune):
    """LTMP's inference block (lt_mergeprune_inference.py) written out for one image: every token real,
    tokens removed as they go; A = even positions (the class token, never merged), B = odd."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))
    size = torch.ones_like(x[..., :1])
    entering = []
    for i, blk in enumerate(vit.blocks):
        attn, (b, n, c) = blk.attn, x.shape
        entering.append(n)
        q, k, v = attn.qkv(blk.norm1(x)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q * attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :, 0]).softmax(-1)
        x = x + blk.ls1(attn.proj((a @ v).transpose(1, 2).reshape(b, n, c)))
        importance = a.mean(dim=(1, 2))
        importance[..., 0] = math.inf
        metric = k.mean(1) / k.mean(1).norm(dim=-1, keepdim=True)
        scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)
        scores[..., 0, :] = -math.inf
        best, partner = scores.max(dim=-1)
        merging = best[0] > merge[i]
        x = x * size
        src_x, dst_x, src_s, dst_s = x[0, ::2], x[0, 1::2].clone(), size[0, ::2], size[0, 1::2].clone()
        src_i, dst_i = importance[0, ::2], importance[0, 1::2].clone()
        for j in torch.nonzero(merging).flatten().tolist():
            d = partner[0, j]
            dst_x[d] += src_x[j]
            dst_s[d] += src_s[j]
            dst_i[d] = max(dst_i[d], src_i[j])
        x = torch.cat([src_x[~merging], dst_x])[None]
        size = torch.cat([src_s[~merging], dst_s])[None]
        keep = torch.cat([src_i[~merging], dst_i]) > prune[i]
        x, size = x[:, keep], size[:, keep]
        x = x / size
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return vit.head(vit.norm(x)[:, 0]), entering


@pytest.fixture(scope="module")
def digits_ltmp():
    """The shipped backbone in float64 with thresholds that make images keep different numbers of tokens."""
    model = models.load_model("vit_digits").model.double().eval()
    method = get_method("ltmp")
    model = method.with_fresh_parts(model)
    row = model.ltmp_thresholds.row(0.7)
    with torch.no_grad():
        model.ltmp_thresholds.merge[row].copy_(torch.linspace(0.8, 0.95, 12))
        model.ltmp_thresholds.prune[row].copy_(torch.linspace(0.004, 0.012, 12))
    return model, row


def test_logits_and_token_counts_equal_the_official_rule_per_image_in_float64(digits_ltmp, digit_images):
    model, row = digits_ltmp
    images = digit_images.double()
    thresholds = model.ltmp_thresholds
    reduced = get_method("ltmp").build(model, target=0.7)
    with torch.inference_mode():
        batched = reduced(images)
        expected = [official_logits(model, images[i:i + 1], thresholds.merge[row], thresholds.prune[row])
                    for i in range(len(images))]
    counts = measure_gmacs(reduced, images).tokens_per_block().tolist()
    assert len({tuple(c) for c in counts}) == len(images), "the case must pad: images keep different numbers"
    assert [n for _, n in expected] == counts
    torch.testing.assert_close(batched, torch.cat([logit for logit, _ in expected]), rtol=0, atol=1e-10)


def test_gmacs_are_per_image_and_batch_invariant(digits_ltmp, digit_images):
    model, _ = digits_ltmp
    reduced = get_method("ltmp").build(model, target=0.7)
    images = digit_images.double()
    together = measure_gmacs(reduced, images).gmacs
    alone = torch.cat([measure_gmacs(reduced, images[i:i + 1]).gmacs for i in range(len(images))])
    assert torch.allclose(together, alone, rtol=1e-12) and len(set(together.tolist())) > 1


def test_target_one_is_the_backbone_and_untrained_targets_are_refused(tiny_vit, digit_images):
    method = get_method("ltmp")
    with torch.inference_mode():
        assert torch.equal(method.build(tiny_vit, target=1.0)(digit_images), tiny_vit(digit_images))
    with pytest.raises(BenchError, match="thresholds were trained"):
        method.build(tiny_vit, target=0.7)
    method.attach(tiny_vit)
    with pytest.raises(BenchError, match="never trained"):
        method.build(tiny_vit, target=0.7)
    with pytest.raises(BenchError, match="not 0.65"):
        method.training_loss(tiny_vit, target=0.65)
    with pytest.raises(BenchError, match=r"target=0.65 is not one of its settings \(0.9, 0.8"):
        method.check_knobs({"target": 0.65})


def test_a_matched_budget_takes_the_trained_target_that_spends_the_most_of_it():
    """The budget search walks the trained targets only (others do not exist), from the no-op down."""
    from tokenbench.measure.budget import candidates

    knob = get_method("ltmp").knobs[0]
    assert candidates(knob, None) == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]


def test_the_flops_ratio_of_the_official_loss():
    """All kept: 1. Half the tokens after every block: the official formula by hand (n = 65, d = 96)."""
    n, d = 65, 96
    assert flops_ratio([torch.ones(2, n)] * 12, n, d).item() == pytest.approx(1.0)
    half = [torch.cat([torch.ones(2, 33), torch.zeros(2, 32)], dim=1)] * 12
    m = 33 / 65
    first = (2 * n * d**2 + n**2 * d + 4 * m * n * d**2) / (6 * n * d**2 + n**2 * d)
    rest = (2 * m * n * d**2 + (m * n) ** 2 * d + 4 * m * n * d**2) / (6 * n * d**2 + n**2 * d)
    assert flops_ratio(half, n, d).item() == pytest.approx((first + 11 * rest) / 12)


def test_training_moves_only_this_target_s_thresholds_toward_its_ratio(tiny_vit, digit_images):
    """Gates pass gradients to both thresholds (the merge threshold through the tokens it merged, as in the
    official training); with thresholds that keep everything the training forward is the backbone's; the loss
    falls; the backbone and the other targets stay as they were."""
    method = get_method("ltmp")
    backbone = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    trainee, loss = method.training_loss(tiny_vit, target=0.5)
    thresholds, row = tiny_vit.ltmp_thresholds, TARGETS.index(0.5)
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    assert trainable == [thresholds.merge[row], thresholds.prune[row]]
    trainee.train()
    with torch.no_grad():
        thresholds.merge[row].fill_(2.0)
        thresholds.prune[row].fill_(-1.0)
        assert torch.allclose(trainee(digit_images), tiny_vit(digit_images), atol=1e-5)
        thresholds.merge[row].fill_(0.3)  # random keys: some tokens merge (a merge threshold learns from those)
        thresholds.prune[row].fill_(0.0)
    labels = torch.arange(4)
    losses = train_steps(lambda: loss(trainee, digit_images, labels), trainable, steps=6, lr=1e-2)
    assert losses[-1] < losses[0]
    assert thresholds.merge[row].grad.abs().sum() > 0 and thresholds.prune[row].grad.abs().sum() > 0
    others = [i for i in range(len(TARGETS)) if i != row]
    assert all(torch.equal(thresholds.merge[i], torch.full_like(thresholds.merge[i], 0.9)) for i in others)
    assert thresholds.trained.tolist() == [i == row for i in range(len(TARGETS))]
    assert all(torch.equal(tiny_vit.state_dict()[k], v) for k, v in backbone.items())


@pytest.mark.parametrize("backbone, dataset", [("vit_digits", "digits"), ("vit_cifar10", "cifar10"),
                                               ("vit_cifar10_v2", "cifar10"),
                                               ("vit_cifar10_v3", "cifar10")])
def test_the_shipped_thresholds_cover_every_target_and_reduce_in_order(backbone, dataset):
    """Every target of the sweep trained; a lower target spends fewer GMACs (on a fixed batch)."""
    method = get_method("ltmp")
    path = method.checkpoint_for(backbone, dataset)
    if path is None:
        pytest.fail(f"no shipped ltmp thresholds for {backbone} on {dataset}")
    model = models.load_model(checkpoint=path).model
    assert model.ltmp_thresholds.trained.all()
    torch.manual_seed(0)
    images = torch.randn(8, 3, *model.patch_embed.img_size)
    spent = [measure_gmacs(method.build(model, target=t), images).gmacs.mean().item() for t in TARGETS]
    assert spent == sorted(spent, reverse=True)


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_on_every_supported_family_the_conformance_checks_hold(family):
    """With stand-ins for trained thresholds (merge above 0.2 here, prune at 0): target 1 is
    timm's own forward, images alone give what they give together (padding in between), and the ledger
    equals torch's count of the matrix products."""
    torch.manual_seed(0)
    model = small_model(family)
    torch.manual_seed(1)
    images = torch.randn(3, 3, *model.patch_embed.img_size)
    method = get_method("ltmp")
    model = method.with_fresh_parts(model)
    with torch.no_grad():  # random weights: a looser merge threshold so that tokens do merge
        model.ltmp_thresholds.merge[TARGETS.index(0.7)].fill_(0.2)
    with torch.inference_mode():
        assert torch.equal(method.build(model, target=1.0)(images), model(images))
        reduced = method.build(model, target=0.7)
        together = reduced(images)
        alone = torch.cat([reduced(images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    assert measure_gmacs(reduced, images[:1]).tokens_per_block()[0, -1] < measure_gmacs(
        reduced, images[:1]).tokens_per_block()[0, 0]
    counted = measure_gmacs(reduced, images[:1]).matmul_gmacs.item()
    assert counted == pytest.approx(flop_counter_gmacs(reduced, images[:1]), rel=1e-9)


@pytest.mark.slow
def test_the_documented_training_command_trains_one_target_and_keeps_the_others(tmp_path):
    """`tokenbench train --method ltmp --target T --init CKPT` (one digits epoch): T's thresholds move and stay
    marked trained; the other targets' thresholds stay as they were."""
    from tokenbench.cli import main

    method = get_method("ltmp")
    shipped = method.checkpoint_for("vit_digits", "digits")
    before = models.load_model(checkpoint=shipped).model.ltmp_thresholds
    out = tmp_path / "ltmp.pt"
    assert main(["train", "--method", "ltmp", "--init", str(shipped), "--target", "0.7", "--epochs", "1",
                 "--batch-size", "128", "--lr", "0.01", "--warmup-epochs", "0", "--threads", "1",
                 "--out", str(out)]) == 0
    after = models.load_model(checkpoint=out).model.ltmp_thresholds
    row = TARGETS.index(0.7)
    assert after.trained.all() and not torch.equal(after.merge[row], before.merge[row])
    assert all(torch.equal(after.prune[i], before.prune[i]) and torch.equal(after.merge[i], before.merge[i])
               for i in range(len(TARGETS)) if i != row)
    assert torch.load(out, weights_only=False)["meta"]["knobs"] == {"target": 0.7}
