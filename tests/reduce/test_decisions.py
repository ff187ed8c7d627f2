"""A plugin's malformed decision is one clear error naming the reducer, the block and the rule it broke."""

import pytest
import torch

from tokenbench.cli import main
from tokenbench.reduce import BenchError, Merge, Propagate, Prune, TokenReducedViT, TokenReducer


class Returns(TokenReducer):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def decide(self, x, state, info):
        return self.make(x, state)


BAD = {
    "a 1-D keep": (lambda x, s: Prune(keep=torch.arange(4)), "Prune.keep must be [2, K] token indices, got (4,)"),
    "keep out of range": (lambda x, s: Prune(keep=torch.full((x.shape[0], 3), x.shape[1])),
                          "Prune.keep holds indices in [65, 65], outside [0, 64)"),
    "float indices": (lambda x, s: Prune(keep=torch.zeros(x.shape[0], 3)), "must hold integer indices"),
    "a merge map of the wrong size": (
        lambda x, s: Merge(kept=torch.arange(60).expand(x.shape[0], -1), merged=torch.arange(60, 65).expand(x.shape[0], -1),
                           into=torch.zeros(x.shape[0], 4, dtype=torch.long)),
        "Merge.into must be [2, 5] token indices, got (2, 4)"),
    "merge into a slot that is not kept": (
        lambda x, s: Merge(kept=torch.arange(60).expand(x.shape[0], -1), merged=torch.arange(60, 65).expand(x.shape[0], -1),
                           into=torch.full((x.shape[0], 5), 60)),
        "Merge.into holds indices in [60, 60], outside [0, 60)"),
    "propagation weights of the wrong shape": (
        lambda x, s: Propagate(keep=torch.arange(50).expand(x.shape[0], -1), donors=torch.arange(50, 64).expand(x.shape[0], -1),
                               weight=torch.zeros(x.shape[0], 50, 13)),
        "Propagate.weight must be [2, K, 14] floating-point weights (K kept tokens), got (2, 50, 13)"),
    "a donor beyond the patch tokens": (
        lambda x, s: Propagate(keep=None, donors=torch.full((x.shape[0], 3), 64), weight=torch.zeros(x.shape[0], 2, 3)),
        "Propagate.donors holds indices in [64, 64], outside [0, 64)"),
    "a merge's valid slots of the wrong size": (
        lambda x, s: Merge(kept=torch.arange(60).expand(x.shape[0], -1), merged=torch.arange(60, 65).expand(x.shape[0], -1),
                           into=torch.zeros(x.shape[0], 5, dtype=torch.long),
                           valid=torch.ones(x.shape[0], 59, dtype=torch.bool)),
        "Merge.valid must be [2, 60], got (2, 59)"),
    "merging padded tokens without saying which slots are real": (
        lambda x, s: [Prune(keep=torch.arange(60).expand(x.shape[0], -1), valid=torch.tensor([[True] * 60, [True] * 59 + [False]])),
                      Merge(kept=torch.arange(55).expand(x.shape[0], -1), merged=torch.arange(55, 61).expand(x.shape[0], -1),
                            into=torch.zeros(x.shape[0], 6, dtype=torch.long))],
        "merging tokens of images that keep different numbers of tokens needs Merge.valid"),
    "not a decision": (lambda x, s: torch.arange(3), "returned Tensor, not a Prune, Merge, Propagate or Gate"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_malformed_decision_names_reducer_block_and_rule(case, tiny_vit, digit_images):
    make, rule = BAD[case]
    model = TokenReducedViT(tiny_vit, {3: Returns(make)}).eval()
    with pytest.raises(BenchError) as err:
        model(digit_images[:2])
    assert "Returns (test_decisions) at block 3" in str(err.value) and rule in str(err.value)
    assert "\n" not in str(err.value)


def test_the_cli_turns_it_into_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from tokenbench.reduce import registry

    class Broken(registry.Method):
        name = "broken_decider"
        family = "prune"
        summary = "returns a 1-D keep"

        def build(self, model):
            return TokenReducedViT(model, {3: Returns(lambda x, s: Prune(keep=torch.arange(4)))})

    monkeypatch.setitem(registry._REGISTRY, "broken_decider", Broken)
    assert main(["bench", "--method", "broken_decider", "--out", str(tmp_path / "o"), "--no-timing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at block 3: Prune.keep must be" in err
