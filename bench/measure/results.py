"""Results storage: append-only JSON Lines, one `ResultRow` per measured configuration, with provenance.

Each line is written on a file opened for appending, then synced; a write that fails or falls short (a
full disk) is undone and stops the run, so the file holds whole lines only. A torn last line (power
loss) is ignored when reading and cut off before the next append; any other line that is not a results
row is skipped with a warning naming it, and never rewritten. A sweep holds an advisory lock on its
results file, so two sweeps never measure into one file. A configuration's `cell_id` hashes everything
that defines it, so a rerun with the same `--out` skips what is already recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from tokenbench.errors import BenchError

SCHEMA_VERSION = 1


@dataclasses.dataclass
class ResultRow:
    """One measured configuration: what the sweep writes, the shard merge reads and the leaderboard shows.

    The README's results schema. Rows written by older versions lack some fields (None here); fields this
    version does not know are kept in `extra` and written back unchanged.
    """

    cell_id: str
    method: str
    knobs: dict
    model: str
    weights: str
    dataset: str
    split: str
    device: str
    device_name: str
    dtype: str
    batch_size: int
    threads: int | None
    seed: int
    family: str
    needs_training: bool
    n_images: int
    top1: float
    top5: float
    gmacs: float
    gmacs_p50: float
    gmacs_std: float
    gmacs_min: float
    gmacs_max: float
    gmacs_counter: str
    tokens_per_block: list
    stats: dict
    provenance: dict
    params: int | None = None
    n_unreadable: int = 0
    n_missing: int = 0
    trained_with: str | None = None
    budget: float | None = None  # matched compute: the requested fraction of the dense GMACs
    budget_achieved: float | None = None
    protocol: str | None = None  # video: views per video
    views: int | None = None
    gmacs_per_view: float | None = None
    throughput_unit: str | None = None
    cls_substitute: str | None = None
    throughput: float | None = None
    throughput_iqr: float | None = None
    timing_repeats: int | None = None  # repeats run: at least 5, until the IQR is tight, at most --repeats
    timing_rule: str | None = None  # the stopping rule those repeats followed
    timing_iterations: int | None = None
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    peak_memory_mb: float | None = None
    attention_kernels: str | None = None  # the attention kernels the timed forward ran: cpu-fused, flash, explicit, ...
    compile: bool | None = None  # timed under torch.compile (inductor); accuracy and GMACs are always eager
    compile_s: float | None = None  # seconds compiling took (both timed shapes), never inside the throughput
    compiled: str | None = None  # what the timing ran: 'compiled, N graphs', or 'eager (why compiling failed)'
    timing_noisy: bool | None = None  # an IQR above 10% of its median: the machine was busy
    load_average: list | None = None  # 1-minute load average before and after the timing
    nonfinite_logits: int | None = None  # images whose logits held NaN or inf
    nonfinite_weights: bool | None = None
    correct_bits: str | None = None  # per image, in the dataset's order: top-1 right (1) or wrong, base64 bits
    image_key: str | None = None  # hash of the evaluated labels in order: rows with equal keys saw the same images
    baseline: bool | None = None  # the dense model, measured because the sweep did not name it
    calibration: dict | None = None  # a calibrating method's: {key, source: shipped|loaded|computed, seconds}
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResultRow":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @property
    def timed(self) -> bool:
        return self.throughput is not None


def cell_id(cell: dict) -> str:
    """A stable id for the configuration described by `cell` (plain JSON data)."""
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16]


def warn(message: str) -> None:
    print(f"tokenbench: warning: {message}", file=sys.stderr)


def read_results(path: str | Path, log: Callable[[str], None] = warn) -> list[ResultRow]:
    """All rows of one results file. A torn last line (a crash mid-write) is left out silently; any other
    line that is not a results row is left out and reported through `log`, with its line number."""
    path = Path(path)
    if not path.exists():
        return []
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                rows.append(ResultRow.from_dict(json.loads(line)))
            except (ValueError, TypeError, AttributeError):  # not JSON, not an object, or fields missing
                bad.append(number)
    if bad:
        where = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        log(f"{path}: skipped {len(bad)} line{'s' * (len(bad) > 1)} that {'are' if len(bad) > 1 else 'is'} not a "
            f"results row (line {where}); the other rows are used and the file is left as it is")
    return rows


def read_results_folder(directory: str | Path) -> list[ResultRow]:
    """Every row under `directory`, shards merged: the last row of each configuration wins."""
    rows = {}
    for path in results_files(directory):
        for row in read_results(path):
            rows.pop(row.cell_id, None)
            rows[row.cell_id] = row
    return list(rows.values())


def results_files(directory: str | Path) -> list[Path]:
    """Every results file under `directory` (shards of one sweep write one file each)."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("results*.jsonl") if p.is_file())


def append_result(path: str | Path, row: ResultRow) -> None:
    """Append one row as one whole line, synced; on a failed or short write, undo it and raise BenchError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row.to_dict(), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:  # cut a torn last line left by a crash, so the new row starts on its own line
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    size = path.read_bytes().rfind(b"\n") + 1
                    os.ftruncate(fd, size)
        try:
            written = 0
            while written < len(data):
                n = os.write(fd, data[written:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += n
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, size)  # whole lines only: the rows before this one stay, this one is not half there
            raise BenchError(f"cannot write a results row to {path}: {err.strerror or err}; "
                             "the rows already written are intact") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: str | Path):
    """Hold an advisory lock on the results file `path` (through `path.lock`, which names the holder's pid)
    while a sweep writes it: a second sweep on the same file stops at once instead of measuring every cell
    again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BenchError(f"{path} is being written by another tokenbench process (pid {holder}); wait for it "
                             "to finish or give another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:  # removed while still held, so no other sweep can lock the file being removed
            os.unlink(lock)
    finally:
        os.close(fd)  # closing releases the lock


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout (bench/measure/ is two below it), when run from one


@lru_cache(maxsize=1)
def git_state(root: Path = PACKAGE_ROOT) -> dict:
    """The git sha and dirty flag of tokenbench's own checkout, when it runs from one (else None).

    Only when the package folder is `bench/` at the top of a git work tree whose pyproject names this
    project: an installed copy, or a virtual environment inside another repository, records no commit.
    Dirty means uncommitted changes to tracked files outside `results/`: regenerating a committed
    leaderboard rewrites its own folder while it runs, and that says nothing about the code measured.
    """
    none = {"git_sha": None, "git_dirty": None}
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        pyproject = root / "pyproject.toml"
        own = pyproject.is_file() and 'name = "tokenbench"' in pyproject.read_text()
        if Path(top).resolve() != root.resolve() or not own:
            return none
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return none


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, with its family and model numbers where /proc/cpuinfo has them: a virtual
    machine may report only "AMD EPYC", and the numbers still tell CPU generations apart."""
    try:
        fields = {}
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = (f" (family {fields['cpu family']}, model {fields['model']})"
                       if "cpu family" in fields and "model" in fields else "")
            return fields["model name"] + numbers
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def provenance(device, seed: int) -> dict:
    import timm
    import torch
    import torchvision

    return {
        "tokenbench": importlib.metadata.version("tokenbench"), **git_state(),
        "torch": str(torch.__version__), "timm": timm.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "hostname": socket.gethostname(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device_name": device_name(device), "cpu_count": os.cpu_count(), "seed": seed,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "schema": SCHEMA_VERSION,
    }


def rows_frame(rows: list[ResultRow]):
    """Rows as a pandas DataFrame, one column per schema field (what `tokenbench.sweep` returns)."""
    import pandas as pd

    return pd.DataFrame([row.to_dict() for row in rows], columns=None if rows else
                        [f.name for f in dataclasses.fields(ResultRow) if f.name != "extra"])
