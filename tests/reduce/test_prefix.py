"""Dense-prefix reuse gives the same logits, ledger and token counts, bit for bit, as running every block."""

import copy
import gc

import pytest
import timm
import torch

from tokenbench.reduce.ledger import CostLedger
from tokenbench.reduce.prefix import PrefixStore, reusing
from tokenbench.reduce.registry import get_method

# One method per way a reducer plugs in: after attention (top-k, EViT), choosing queries (ATS), after the block
# (VisionZip), before the block from the attention the previous block exported (K-Medoids), a `begin` that reads the
# embedded tokens (GTP), a random generator (random), the plain attention map (Zero-TPrune), a resized input
# (downsample), merging from block 0 (ToMe).
CASES = [("topk", {"keep": 0.7}), ("evit", {"keep": 0.5}), ("ats", {"sample_rate": 1.0}),
         ("visionzip", {"dominant": 0.5}), ("kmedoids", {"keep": 0.7}), ("gtp", {"r": 2}), ("random", {"keep": 0.6}),
         ("zerotprune", {"keep": 0.7}), ("downsample", {"scale": 0.5}), ("tome", {"r": 4})]


def run(model, batches, store=None):
    """Per batch: logits, per-image MACs, tokens entering each block."""
    out = []
    for images in batches:
        with torch.inference_mode(), CostLedger(len(images)) as ledger:
            if store is None:
                logits = model(images)
            else:
                with reusing(store):
                    logits = model(images)
        out.append((logits, ledger.macs.clone(), ledger.tokens_per_block().clone()))
    return out


def assert_identical(a, b):
    for (logits_a, macs_a, tokens_a), (logits_b, macs_b, tokens_b) in zip(a, b, strict=True):
        assert torch.equal(logits_a, logits_b)
        assert torch.equal(macs_a, macs_b)
        assert torch.equal(tokens_a, tokens_b)


@pytest.fixture(scope="module")
def batches():
    torch.manual_seed(3)
    return [torch.randn(6, 3, 32, 32), torch.randn(5, 3, 32, 32)]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_digits").eval()


def build(vit, name, knobs):
    method = get_method(name)
    torch.manual_seed(0)
    return method.build(vit, **method.check_knobs(knobs)).eval()


def test_every_way_of_reducing_gives_the_same_answer_from_a_stored_prefix(vit, batches):
    store = PrefixStore()
    for name, knobs in CASES:  # each runs twice on the store: the first may fill it, the second reads it
        plain = run(build(vit, name, knobs), batches)
        for _ in range(2):
            assert_identical(run(build(vit, name, knobs), batches, store), plain)
    # top-k stores the 3-block prefix that EViT, ATS, random and Zero-TPrune then read (twice each, top-k once);
    # VisionZip decides after block 2: it stores its own and reads it once; K-Medoids' block 2 exports attention, so
    # its prefix is 2 blocks too (read twice); GTP and ToMe decide at block 0 and downsample runs a resized copy of
    # the model: nothing to read
    assert store.hits == 12 * len(batches)
    assert [sorted(depths) for depths in store.entries.values()] == [[2, 3]] * len(batches)


def test_a_changed_weight_or_other_images_are_never_served_a_stale_prefix(batches):
    torch.manual_seed(0)
    vit = timm.create_model("vit_digits").eval()
    store = PrefixStore()
    run(build(vit, "topk", {"keep": 0.7}), batches, store)
    with torch.no_grad():
        vit.blocks[1].mlp.fc1.weight.mul_(1.5)  # in place: the same tensor, a new version
    hits = store.hits
    assert_identical(run(build(vit, "topk", {"keep": 0.7}), batches, store), run(build(vit, "topk", {"keep": 0.7}), batches))
    assert store.hits == hits
    other = [images.flip(-1) for images in batches]
    assert_identical(run(build(vit, "topk", {"keep": 0.7}), other, store), run(build(vit, "topk", {"keep": 0.7}), other))
    assert store.hits == hits


def test_prefixes_are_only_read_while_the_store_is_active_and_leave_with_their_backbone(vit, batches):
    store = PrefixStore()
    model = build(vit, "topk", {"keep": 0.7})
    run(model, batches, store)
    hits = store.hits
    run(model, batches)  # a timed forward: no store active, every block runs
    assert store.hits == hits
    twin = copy.deepcopy(vit)
    run(build(twin, "topk", {"keep": 0.7}), batches, store)
    assert store.hits == hits and len(store.entries) == 2 * len(batches)  # another module: its own prefixes
    del twin
    gc.collect()
    assert len(store.entries) == len(batches) and store.bytes > 0


def test_a_full_store_computes_prefixes_and_keeps_none(vit, batches):
    store = PrefixStore(max_bytes=1)
    model = build(vit, "topk", {"keep": 0.7})
    assert_identical(run(model, batches, store), run(model, batches))
    assert store.entries == {} and store.hits == 0
