"""SLURM through submitit: a sweep as a job array of `--shard i/n` jobs, each appending its own results file."""

from __future__ import annotations

import os

from tokenbench.errors import BenchError
from tokenbench.run.distributed import parse_shard, results_name
from tokenbench.run.sweep import sweep


def task_environment():
    """Inside a multi-task submitit job: export the rank variables torchrun would set."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank),
                          WORLD_SIZE=str(env.num_tasks), MASTER_ADDR=env.hostnames[0],
                          MASTER_PORT=str(20000 + int(str(env.job_id).split("_")[0]) % 20000))


def run_shard(sweep_kwargs: dict, shard: str) -> int:
    """What one array job runs: this sweep restricted to `shard`."""

    task_environment()
    sweep(**{**sweep_kwargs, "shard": shard})
    return 0


def submit(sweep_kwargs: dict, *, jobs: int, out: str, folder: str | None = None, cluster: str | None = None,
           nodes: int = 1, gpus_per_node: int = 0, cpus_per_task: int | None = None, timeout_min: int = 60,
           partition: str | None = None, account: str | None = None, array_parallelism: int | None = None) -> list:
    """Submit `jobs` shards of the sweep `sweep_kwargs` describes as a SLURM job array (or submitit's local
    executor), `gpus_per_node` processes per job running data parallel; returns the submitit jobs (waited
    on for local/debug)."""
    try:
        import submitit
    except ImportError:
        raise BenchError("--submitit needs submitit: pip install 'tokenbench[slurm]'") from None
    if jobs < 1:
        raise BenchError("--jobs must be at least 1")
    folder = folder or os.path.join(out, "submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    tasks = max(1, gpus_per_node)
    params = dict(timeout_min=timeout_min, nodes=nodes, tasks_per_node=tasks, name="tokenbench")
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if partition:
        params["slurm_partition"] = partition
    if account:
        params["slurm_account"] = account
    if array_parallelism:
        params["slurm_array_parallelism"] = array_parallelism
    executor.update_parameters(**params)
    shards = [f"{i}/{jobs}" for i in range(jobs)]
    submitted = executor.map_array(run_shard, [sweep_kwargs] * jobs, shards)
    for job, shard in zip(submitted, shards):
        print(f"submitted job {job.job_id}: shard {shard} -> {os.path.join(out, results_name(parse_shard(shard)))}")
    if executor.cluster in ("local", "debug"):
        for job in submitted:
            job.result()
    return submitted
