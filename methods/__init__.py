"""Built-in method plugins: each module registers one method with `bench.registry.register_method`."""

from methods import none, random_drop, topk  # noqa: F401
