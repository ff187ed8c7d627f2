"""The dense model: every token through every block. The reference every method is compared with."""

from tokenbench.reduce import Method, TokenReducedViT, register_method


@register_method
class Dense(Method):
    name = "none"
    family = "none"
    summary = "dense model, no reduction"

    def build(self, model, **knobs):
        return TokenReducedViT(model)
