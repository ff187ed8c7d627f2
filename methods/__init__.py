"""Built-in method plugins: each module registers one method with `bench.registry.register_method`."""

from methods import ats, dvt, dynamicvit, evit, none, random_drop, tome, topk  # noqa: F401
