"""A third-party method package, installed with pip, joins a sweep through the entry point.

The package is the README's own plugin example, so the documented example is the tested one.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README lacks the {marker} block"
    return match.group(1)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    source = tmp_path_factory.mktemp("plugin-src")
    (source / "pyproject.toml").write_text(readme_block("plugin-example:pyproject"))
    package = source / "tokenbench_every_other"
    package.mkdir()
    (package / "__init__.py").write_text(readme_block("plugin-example:module"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return target


def tokenbench(plugin_path, *args):
    env_path = f"{plugin_path}:{Path(__file__).resolve().parents[1]}"
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin",
                               "TOKENBENCH_CACHE": os.environ["TOKENBENCH_CACHE"]}, timeout=600)


def test_installed_plugin_is_listed(plugin_path):
    out = tokenbench(plugin_path, "methods")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("every_other"))
    assert "prune" in line and "stride = 2, 4" in line and "tokenbench_every_other" in line


def test_installed_plugin_runs_in_a_sweep(plugin_path, tmp_path):
    out = tokenbench(plugin_path, "bench", "--method", "none,every_other", "--out", tmp_path, "--no-timing")
    assert out.returncode == 0, out.stderr
    import json

    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["knobs"]) for r in rows] == [("none", {}), ("every_other", {"stride": 2}),
                                                         ("every_other", {"stride": 4})]
    dense, half, quarter = (r["tokens_per_block"] for r in rows)
    assert half[:6] == dense[:6] == [65] * 6 and half[6:] == [33] * 6 and quarter[6:] == [17] * 6
