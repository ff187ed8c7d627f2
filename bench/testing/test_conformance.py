"""Every registered method, automatically: valid knobs, no-op equals dense, shapes, token counts, seeded
determinism, batch invariance, the backbone left untouched.

Run on whatever is installed: `pytest --pyargs tokenbench.testing` (`-k NAME` for one method).
Model-level methods (family early-exit, e.g. a cascade) are built on their own architectures, and methods
with learned parts (DynamicViT's predictors) on a backbone trained with them; both carry their own
equivalent checks. Every other method must accept any timm ViT. A method that calibrates on held-out images
(DiffRate's rate search) calibrates once per setting on the random images, with labels 0.
"""

import copy

import pytest
import torch

from tokenbench.models.families import SUPPORTED, small_model
from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import all_methods, get_method

BLOCK_LEVEL = [name for name, cls in all_methods().items() if cls.family != "early-exit" and not cls.needs_training]


_CALIBRATED: dict = {}  # (method, setting, model fingerprint) -> what it chose on that model


def build(method, model, knobs, images):
    """`method` on `model` at `knobs`, calibrated on `images` if it calibrates."""
    if not method.needs_calibration:
        return method.build(model, **knobs)
    fingerprint = (type(model).__name__, tuple(images.shape),
                   sum(float(p.detach().double().sum()) for p in model.parameters()))
    key = (method.name, tuple(sorted(knobs.items())), fingerprint)
    if key not in _CALIBRATED:
        # Searched in float32 whatever the model's dtype: what it chooses is plain data, so the float64 copy of
        # the batch-invariance test reuses the float32 search instead of running one twice as slow.
        in_float32 = model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
        labels = torch.zeros(len(images), dtype=torch.long)
        _CALIBRATED[key] = method.calibrate(in_float32, (images.float(), labels), **knobs)
    return method.build(model, **knobs, calibrated=_CALIBRATED[key])


def logits(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.fixture(scope="module", params=list(SUPPORTED))
def family_vit(request):
    """(model, images, timm's own logits) for one family."""
    torch.manual_seed(0)
    model = small_model(request.param)
    torch.manual_seed(1)
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    return model, images, logits(model, images)


@pytest.mark.parametrize("name", BLOCK_LEVEL)
def test_noop_setting_reproduces_timm_s_own_forward_on_every_family(name, family_vit):
    """Against timm's forward, not the wrapper's dense path: distilled DeiT averages its two heads."""
    model, images, timm_logits = family_vit
    method = get_method(name)
    torch.manual_seed(0)
    reduced = build(method, model, method.noop_knobs(), images)
    assert torch.equal(logits(reduced, images), timm_logits)
    counted = measure_gmacs(reduced, images[:1]).matmul_gmacs.item()
    torch.manual_seed(0)
    assert counted == pytest.approx(flop_counter_gmacs(reduced, images[:1]), rel=1e-9)


@pytest.mark.parametrize("name", list(all_methods()))
def test_knobs_are_valid(name):
    cls = all_methods()[name]
    assert cls.check_knobs(cls.noop_knobs()) == cls.noop_knobs()
    for point in cls.sweep_points():
        assert cls.check_knobs(point) == point


@pytest.mark.parametrize("name", BLOCK_LEVEL)
def test_noop_setting_reproduces_dense_logits(name, tiny_vit, digit_images):
    method = get_method(name)
    dense = logits(tiny_vit, digit_images)
    torch.manual_seed(0)
    out = logits(build(method, tiny_vit, method.noop_knobs(), digit_images), digit_images)
    assert torch.equal(out, dense)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if all_methods()[n].needs_calibration else n
                                  for n in BLOCK_LEVEL])  # a calibrating method searches at every sweep point
def test_default_sweep_shapes_and_token_counts(name, tiny_vit, digit_images):
    method = get_method(name)
    dense = measure_gmacs(get_method("none").build(tiny_vit), digit_images)
    for knobs in method.sweep_points():
        torch.manual_seed(0)
        model = build(method, tiny_vit, knobs, digit_images)
        ledger = measure_gmacs(model, digit_images)
        out = logits(model, digit_images)
        assert out.shape == (4, 10) and torch.isfinite(out).all()
        tokens = ledger.tokens_per_block()
        assert tokens.shape == (4, len(tiny_vit.blocks))
        assert (tokens <= 65).all() and (tokens >= 1).all()
        assert (ledger.gmacs <= dense.gmacs + 1e-6).all(), knobs


@pytest.mark.parametrize("name", BLOCK_LEVEL)
def test_same_seed_same_output(name, tiny_vit, digit_images):
    method = get_method(name)
    knobs = method.sweep_points()[len(method.sweep_points()) // 2]
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(logits(build(method, tiny_vit, knobs, digit_images), digit_images))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("name", [n for n in BLOCK_LEVEL if all_methods()[n].batch_invariant])
def test_an_image_s_result_does_not_depend_on_its_batch(name, tiny_vit, digit_images):
    method = get_method(name)
    vit, images = tiny_vit.double(), digit_images.double()
    for knobs in method.sweep_points():
        torch.manual_seed(0)
        model = build(method, vit, knobs, images)
        together = logits(model, images)
        alone = torch.cat([logits(model, images[i:i + 1]) for i in range(len(images))])
        torch.testing.assert_close(alone, together, rtol=0, atol=1e-10, msg=f"{name} {knobs}")


@pytest.mark.parametrize("name", BLOCK_LEVEL)
def test_the_ledger_charges_every_matmul_torch_counts(name, tiny_vit, digit_images):
    """The GMACs ledger's matrix products equal torch's FlopCounterMode on the same forward, at every point
    of the default sweep (the ledger adds only what the counter cannot see: norms)."""
    method = get_method(name)
    for knobs in method.sweep_points():
        torch.manual_seed(0)
        model = build(method, tiny_vit, knobs, digit_images)
        counted = measure_gmacs(model, digit_images[:1]).matmul_gmacs.item()
        torch.manual_seed(0)
        assert counted == pytest.approx(flop_counter_gmacs(model, digit_images[:1]), rel=1e-9), knobs


def test_random_differs_from_topk_and_across_seeds(tiny_vit, digit_images):
    torch.manual_seed(0)
    a = logits(get_method("random").build(tiny_vit, keep=0.5), digit_images)
    torch.manual_seed(1)
    b = logits(get_method("random").build(tiny_vit, keep=0.5), digit_images)
    c = logits(get_method("topk").build(tiny_vit, keep=0.5), digit_images)
    assert not torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", BLOCK_LEVEL)
def test_wrapping_leaves_the_model_untouched(name, tiny_vit, digit_images):
    method = get_method(name)
    before = logits(tiny_vit, digit_images)
    state = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    torch.manual_seed(0)
    logits(build(method, tiny_vit, method.sweep_points()[-1], digit_images), digit_images)
    assert torch.equal(logits(tiny_vit, digit_images), before)
    assert all(torch.equal(v, state[k]) for k, v in tiny_vit.state_dict().items())


@pytest.mark.parametrize("name", BLOCK_LEVEL)
def test_the_reduced_model_is_an_ordinary_module(name, tiny_vit, digit_images):
    """nn.Module's own machinery works on it: apply, state_dict, copies."""
    import copy

    method = get_method(name)
    torch.manual_seed(0)
    model = build(method, tiny_vit, method.sweep_points()[0], digit_images)
    seen = []
    model.apply(lambda m: seen.append(m))
    assert model in seen and len(seen) > len(tiny_vit.blocks)
    assert set(model.state_dict()) >= {f"vit.{k}" for k in tiny_vit.state_dict()}
    clone = copy.deepcopy(model)  # before any forward: a seeded method's generator is copied in its start state
    assert torch.equal(logits(clone, digit_images), logits(model, digit_images))


@pytest.mark.parametrize("name", BLOCK_LEVEL)
def test_a_real_setting_runs_and_keeps_its_books_on_every_family(name, family_vit):
    """The middle of the default sweep: finite logits, the ledger's matmuls equal torch's count, and the
    source trace never gives one patch to two tokens."""
    model, images, timm_logits = family_vit
    method = get_method(name)
    knobs = method.sweep_points()[len(method.sweep_points()) // 2]
    torch.manual_seed(0)
    reduced = build(method, model, knobs, images)
    out = logits(reduced, images)
    assert out.shape == timm_logits.shape and torch.isfinite(out).all()
    counted = measure_gmacs(reduced, images[:1]).matmul_gmacs.item()
    torch.manual_seed(0)
    assert counted == pytest.approx(flop_counter_gmacs(reduced, images[:1]), rel=1e-9), knobs
    if hasattr(reduced, "trace"):
        torch.manual_seed(0)
        for block, source in reduced.trace(images):
            assert ((source > 0).sum(1) <= 1).all(), f"block {block}: a patch held by two tokens"
