"""Scaling a sweep out with existing engines: torchrun data parallelism, `--shard i/n`, and SLURM via submitit.

- Data parallel (`torchrun --nproc_per_node=N -m tokenbench bench ...`): every process evaluates one contiguous
  slice of the images (sizes differ by at most one; no padding, no duplicates, unlike DistributedSampler),
  the per-rank results are gathered in rank order and merged, and rank 0 times and writes the row, so the
  row is the one a single process would write.
- `--shard i/n`: cells i, i+n, ... of the sweep's cells in sorted order, so a job array covers the grid;
  each shard appends to its own `results-shard-i-of-n.jsonl` and `tokenbench leaderboard` merges them.
- `--submitit`: `tokenbench.run.slurm` submits the same sweep as a job array of shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tokenbench.errors import BenchError
from tokenbench.measure.metrics import Evaluation


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun (or a submitit task) describes in the environment, if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return World(dist.get_rank(), dist.get_world_size()), device


def barrier(world: World):
    if world.size > 1:
        dist.barrier()


def contiguous_slice(n: int, world: World) -> tuple[int, int]:
    """This rank's [start, stop) of n items: contiguous, sizes differing by at most one, covering n exactly."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def gather(evaluation: Evaluation | None, world: World) -> Evaluation | None:
    """The merged evaluation on every rank (a rank with no images passes None)."""
    if world.size == 1:
        return evaluation
    parts = [None] * world.size
    dist.all_gather_object(parts, evaluation)
    return Evaluation.merged([p for p in parts if p is not None])


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise BenchError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise BenchError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def shard_of(plan: list, shard: tuple[int, int] | None, key) -> list:
    """Cells i, i+n, ... of `plan` sorted by `key` (a stable, machine-independent description of a cell)."""
    if shard is None:
        return plan
    index, count = shard
    return sorted(plan, key=key)[index::count]


def cell_sort_key(method: str, knobs: dict) -> str:
    return json.dumps([method, knobs], sort_keys=True)


def results_name(shard: tuple[int, int] | None) -> str:
    return "results.jsonl" if shard is None else f"results-shard-{shard[0]}-of-{shard[1]}.jsonl"
