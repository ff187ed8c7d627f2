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


def run_with_plugin(plugin_path, *args, cwd=None):
    """`python -m ...` in the test's environment, with the plugin installed beside tokenbench."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(plugin_path), "PATH": "/usr/bin:/bin",
                               "TOKENBENCH_CACHE": os.environ["TOKENBENCH_CACHE"]}, timeout=600)


def tokenbench(plugin_path, *args):
    return run_with_plugin(plugin_path, "tokenbench", *args)


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


def test_the_conformance_suite_runs_on_the_installed_plugin(plugin_path, tmp_path):
    """The README's one command for a plugin author, run from a folder outside the checkout."""
    out = run_with_plugin(plugin_path, "pytest", "--pyargs", "tokenbench.testing", "-k", "every_other", "-v",
                          "-p", "no:cacheprovider", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:]
    tested = [line for line in out.stdout.splitlines() if "every_other" in line and "PASSED" in line]
    assert len(tested) >= 5, out.stdout[-3000:]


def test_a_users_methods_py_or_bench_py_changes_nothing(plugin_path, tmp_path):
    """tokenbench installs as one import name: files called methods.py or bench.py in the working folder
    (which Python puts first on the path) can shadow nothing."""
    (tmp_path / "methods.py").write_text("raise SystemExit('the user methods.py was imported')\n")
    (tmp_path / "bench.py").write_text("raise SystemExit('the user bench.py was imported')\n")
    out = run_with_plugin(plugin_path, "tokenbench", "methods", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert {line.split()[0] for line in out.stdout.splitlines()[2:]} >= {"none", "topk", "tome", "every_other"}
