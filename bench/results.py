"""Results storage: append-only JSON Lines, one object per measured configuration, with provenance.

Each line is written with a single `write` on a file opened for appending, then flushed and synced, so
a killed run leaves whole lines only; a torn last line (power loss) is ignored when reading and cut
off before the next append. A configuration's `cell_id` hashes everything that defines it, so a rerun
with the same `--out` skips what is already recorded.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"


def cell_id(cell: dict) -> str:
    """A stable id for the configuration described by `cell` (plain JSON data)."""
    return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16]


def read_results(path: str | Path) -> list[dict]:
    """All complete rows of one results file (a torn last line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n") and line.strip():
                rows.append(json.loads(line))
    return rows


def results_files(directory: str | Path) -> list[Path]:
    """Every results file under `directory` (shards of one sweep write one file each)."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("results*.jsonl") if p.is_file())


def append_result(path: str | Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:  # cut a torn last line left by a crash, so the new row starts on its own line
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    content = path.read_bytes()
                    os.ftruncate(fd, content.rfind(b"\n") + 1)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def git_state(root: Path = Path(__file__).resolve().parent.parent) -> dict:
    """The git sha and dirty flag of the tokenbench checkout in use (None outside a checkout).

    Dirty means uncommitted changes to tracked files outside `results/`: regenerating a committed
    leaderboard rewrites its own folder while it runs, and that says nothing about the code measured.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def provenance(device: torch.device, seed: int) -> dict:
    import timm
    import torchvision

    return {
        **git_state(),
        "torch": str(torch.__version__), "timm": timm.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "hostname": socket.gethostname(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device_name": device_name(device), "cpu_count": os.cpu_count(), "seed": seed,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "schema": SCHEMA_VERSION,
    }
