"""DynamicViT: keep counts relative to the original patches, predictor cost, no-op, training and checkpoints."""

import pytest
import torch
from conftest import train_steps

from tokenbench.errors import BenchError
from tokenbench.models import loading as models
from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method


@pytest.fixture
def with_predictors(tiny_vit):
    torch.manual_seed(3)
    return get_method("dynamicvit").attach(tiny_vit)


def test_keep_one_reproduces_the_backbone(with_predictors, digit_images):
    with torch.inference_mode():
        assert torch.equal(get_method("dynamicvit").build(with_predictors, rho=1.0)(digit_images),
                           with_predictors(digit_images))


def test_keeps_int_n_rho_power_s_before_blocks_3_6_9(with_predictors, digit_images):
    model = get_method("dynamicvit").build(with_predictors, rho=0.7)
    tokens = measure_gmacs(model, digit_images).tokens_per_block()[0].tolist()
    kept = [1 + int(64 * 0.7 ** s) for s in (1, 2, 3)]  # 44, 31, 21 patches plus the class token
    assert tokens == [65] * 3 + [kept[0]] * 3 + [kept[1]] * 3 + [kept[2]] * 3


def test_predictor_cost_is_counted(with_predictors, digit_images):
    model = get_method("dynamicvit").build(with_predictors, rho=0.7)
    ledger = measure_gmacs(model, digit_images[:1]).matmul_gmacs.item()
    assert ledger == pytest.approx(flop_counter_gmacs(model, digit_images[:1]), rel=1e-9)
    without = measure_gmacs(get_method("topk").build(with_predictors, keep=1.0), digit_images[:1]).gmacs.item()
    assert ledger < without


def test_plain_backbone_is_refused(tiny_vit):
    with pytest.raises(BenchError, match="predictors"):
        get_method("dynamicvit").build(tiny_vit, rho=0.7)


def test_training_lowers_the_loss_moves_only_predictors_and_reloads(tmp_path, tiny_vit, digit_images):
    backbone = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    method = get_method("dynamicvit")
    torch.manual_seed(0)
    trainee, loss = method.training_loss(tiny_vit, rho=0.7)
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in tiny_vit.token_predictors.parameters())
    labels = torch.arange(4)
    trainee.train()
    # the same Gumbel noise each step (seed 0): the loss moves only with the weights
    losses = train_steps(lambda: loss(trainee, digit_images, labels), trainable, steps=8, lr=3e-3, seed=0)
    assert losses[-1] < losses[0]
    tiny_vit.eval()
    assert all(torch.equal(tiny_vit.state_dict()[k], v) for k, v in backbone.items())
    path = tmp_path / "dyvit.pt"
    models.save_checkpoint(path, tiny_vit, "vit_digits", {"trained_with": "dynamicvit"})
    loaded = models.load_model(checkpoint=path).model
    with torch.inference_mode():
        assert torch.equal(method.build(loaded, rho=0.7)(digit_images), method.build(tiny_vit, rho=0.7)(digit_images))


def test_a_sweep_of_dynamicvit_alone_runs_on_the_checkpoint_given(tmp_path):
    """With the dense baseline added to the sweep, the one method named still gets the user's weights."""
    import shutil

    from tokenbench.cli import main
    from tokenbench.measure.results import read_results

    mine = tmp_path / "my_dynamicvit.pt"
    shutil.copy(get_method("dynamicvit").weights_file("dynamicvit_digits.pt"), mine)
    assert main(["bench", "--method", "dynamicvit", "--rho", "0.7", "--checkpoint", str(mine), "--no-timing",
                 "--split", "val", "--out", str(tmp_path / "out")]) == 0
    rows = {r.method: r for r in read_results(tmp_path / "out" / "results.jsonl")}
    assert rows["dynamicvit"].weights.startswith("file:my_dynamicvit.pt@") and rows["none"].baseline


@pytest.mark.parametrize("path", sorted(get_method("dynamicvit").weights_file("").glob("dynamicvit_*.pt")),
                         ids=lambda p: p.name)
def test_shipped_predictors_were_trained_on_the_backbone_their_file_names(path):
    """`checkpoint_for` finds them by file name: the weights must be that backbone's, trained from its weights."""
    loaded = models.load_model(checkpoint=path)
    backbone = "vit_" + path.stem.removeprefix("dynamicvit_")
    assert loaded.name == backbone and loaded.meta["trained_with"] == "dynamicvit"
    assert loaded.meta["init"].endswith(f"/{backbone}.pt") and loaded.meta["dataset"] == backbone.split("_")[1]
