"""The sweep's numeric options, checked once for the command line and the Python API.

No torch here: `tokenbench bench` runs these checks before it imports anything heavy, so a bad option is
one line at once; `tokenbench.sweep` runs the same ones with the same messages.
"""

from __future__ import annotations

from tokenbench.errors import BenchError


def check_sweep_numbers(batch_size: int | None = None, repeats: int = 1, threads: int | None = None,
                        workers: int | None = None, seed: int = 0, budget: float | None = None) -> None:
    """A BenchError naming the first option out of range (None means the default, always valid)."""
    for option, value, least in (("--batch-size", batch_size, 1), ("--repeats", repeats, 1),
                                 ("--threads", threads, 1), ("--workers", workers, 0)):
        if value is not None and value < least:
            raise BenchError(f"{option} {value}: must be at least {least}")
    if not 0 <= seed < 2**63:
        raise BenchError(f"--seed {seed}: must be in [0, 2**63)")
    if budget is not None and not 0 < budget <= 1:
        raise BenchError(f"--budget {budget:g}: must be a fraction of the dense GMACs in (0, 1]")
