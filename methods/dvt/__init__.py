"""DVT: a cascade of ViTs on growing token grids that stops at the first confident exit.

`architecture.py` builds the cascade, `thresholds.py` chooses the exits' thresholds; this file is the
method. Each stage is a timm ViT of the same width with its own weights and classifier, on a finer token grid
than the last (DeiT-S at 224: 7x7, 10x10, 14x14 tokens; the 10x10 grid needs a padded k=23 stride-23
patch conv). Downstream stages reuse the previous stage's work: *feature reuse* turns its final patch
tokens (before the final norm) into a narrow context embedding, one LayerNorm-MLP per downstream block,
upsampled to the new grid and concatenated into that block's MLP input (the class token gets zeros);
*relationship reuse* mixes the pre-softmax attention logits of all upstream layers with 1x1 convs,
upsamples them and adds one chunk to each downstream layer's logits. Training sums cross-entropy over
all exits. At inference an image leaves at the first exit whose max softmax reaches that exit's
threshold (the last exit always answers); only images still running go on. Thresholds maximise
accuracy under a GMACs budget on a held-out split. The `criterion` knob swaps the max softmax for the
paper's ablation alternatives: normalised entropy (thresholds searched the same way) or a random exit
(a seeded draw per image; its exit fractions follow the paper's pi_k ~ q^k family at the q that meets the
budget on the held-out split, never chosen by accuracy).
Wang et al., "Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image
Recognition", NeurIPS 2021 (official code: blackfeather-wang/Dynamic-Vision-Transformer).
"""

from __future__ import annotations

import math
import re

from tokenbench.reduce import BenchError, Knob, Method, register_method

# This file imports no torch: `tokenbench methods` and option parsing read the method without it.
REUSE = {"both": (True, True), "feature": (True, False), "relation": (False, True), "none": (False, False)}

@register_method
class DVT(Method):
    name = "dvt"
    family = "early-exit"
    needs_training = True
    needs_calibration = True
    knobs = (Knob("cost", (0.15, 0.2, 0.25, 0.3, 0.4, 1.0), noop=1.0, low=0.0, high=1.0,
                  help="DVT: the GMACs budget, mean GMACs allowed on the held-out split as a fraction of "
                       "running every exit (1 = no early exit)"),
             Knob("criterion", ("confidence",), noop="confidence", kind=str,
                  choices=("confidence", "entropy", "random"),  # thresholds.CRITERIA (test_dvt checks)
                  help="DVT: what decides an early exit: confidence (the paper's max softmax), entropy, or random "
                       "(a seeded draw per image at exit fractions that meet the budget; the paper's baseline)"))
    summary = "cascade of ViTs on 4x4/6x6/8x8 (7x7/10x10/14x14) grids with feature and relation reuse; exits when confident"

    def calibrate(self, model, calibration, cost=1.0, criterion="confidence"):
        """The exit thresholds that meet `cost` on the held-out split (none below 1: no early exit)."""
        from .thresholds import exit_outputs, family_thresholds, search_thresholds

        if cost >= 1.0:
            return {"thresholds": [math.inf] * (len(model.stages) - 1)}
        images, labels = calibration
        costs = model.exit_gmacs(images[:1])
        scores, correct = exit_outputs(model, images, labels, criterion)
        if criterion == "random":  # exit fractions from the cost alone: accuracy must not choose them
            thresholds = family_thresholds(scores, costs, cost * costs[-1])
        else:
            thresholds = search_thresholds(scores, correct, costs, cost * costs[-1])
        return {"thresholds": [float(t) for t in thresholds]}

    def check_model(self, model):
        from .architecture import DVTCascade  # timm, only when a cascade is built (keeps `tokenbench methods` fast)

        if not isinstance(model, DVTCascade):
            raise BenchError("dvt runs and trains a cascade of its own (--model dvt_digits, dvt_deit_small), "
                             "not a plain ViT")

    def build(self, model, cost=1.0, criterion="confidence", calibration=None, calibrated=None):
        if calibrated is None:
            if cost < 1.0 and calibration is None:
                raise BenchError("dvt needs a held-out split to choose its exit thresholds")
            calibrated = self.calibrate(model, calibration, cost, criterion)
        from .architecture import EarlyExitDVT

        return EarlyExitDVT(model, calibrated["thresholds"], criterion)

    def checkpoint_for(self, model_name, dataset):
        """Also under the cascade's own name: `dvt_cifar10` has `vit_cifar10`'s width and depth."""
        return super().checkpoint_for(re.sub(r"^dvt_", "vit_", model_name), dataset)

    @classmethod
    def add_training_options(cls, group):
        group.add_argument("--reuse", default="both", choices=list(REUSE),
                           help="which reuse paths the cascade has (the paper's ablation)")
        group.add_argument("--backbone", default=None,
                           help="start every stage from this ViT checkpoint (patch and position embeddings resampled)")

    def training_model_kwargs(self, options):
        return dict(zip(("feature_reuse", "relation_reuse"), REUSE[options["reuse"]]))

    def prepare_training_model(self, model, options, load_model):
        if options["backbone"]:
            from .architecture import init_from_backbone

            init_from_backbone(model, load_model(options["backbone"]))

    def training_record(self, model, loader):
        """Test top-1 of every exit, each image answered there (what `dvt-ablation` reports)."""
        import torch

        from .thresholds import exit_outputs

        hits, total = None, 0
        for images, labels in loader:
            _, correct = exit_outputs(model, images, labels)
            hits = correct.sum(1) if hits is None else hits + correct.sum(1)
            total += len(labels)
        return {"exit_test_top1": [float(h) / total for h in torch.as_tensor(hits)]}

    def training_loss(self, model):
        """The paper's loss: cross-entropy summed over all exits (`check_model` has made sure it is a cascade)."""
        import torch.nn.functional as F

        def loss(m, images, labels, label_smoothing=0.0):
            return sum(F.cross_entropy(out, labels, label_smoothing=label_smoothing) for out in m.forward_exits(images))
        return model, loss
