"""Per-method micro-benchmarks with pytest-benchmark: one forward at the speed gate's setup and knobs.

Not collected by the default test run (pyproject's `--ignore=tests/benchmarks`). `nox -s regression`
runs them with `--benchmark-autosave --benchmark-compare` (storage `.benchmarks/`) and writes
`runs/regression/micro.json`. Absolute times only mean something against runs on the same quiet
machine, so the comparison is informational; the gate is `tokenbench regression` (speedup ratios).
"""

import pytest
import torch

from tokenbench.reduce.ledger import measure_gmacs
from tokenbench.reduce.registry import all_methods
from tokenbench.regression import snapshot as reg
from tokenbench.regression import speed_gate as gate

SETUP = gate.SpeedSetup()


@pytest.fixture(scope="module", autouse=True)
def fixed_threads():
    with reg.threads(SETUP.threads):
        yield


@pytest.mark.parametrize("name", ["dense", *all_methods()])
def test_forward(benchmark, name):
    if name == "dense":
        model = reg.random_model(SETUP.model)
        x, knobs = reg.random_images(model, SETUP.batch), {}
    else:
        timed = gate.timed_models(all_methods()[name], SETUP)
        if isinstance(timed, str):
            pytest.skip(timed)
        _, model, x, knobs = timed
    gmacs = float(measure_gmacs(model, x).gmacs.mean()) if name != "dense" else None
    benchmark.extra_info.update(model=SETUP.model, batch=SETUP.batch, threads=torch.get_num_threads(),
                                knobs=knobs, gmacs_per_image=gmacs)
    with torch.inference_mode():
        benchmark.pedantic(model, args=(x,), rounds=10, warmup_rounds=2)
