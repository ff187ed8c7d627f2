"""A third-party method package, installed with pip, joins a sweep through the entry point.

The package is the plugin guide's own example (docs/writing-a-method.md), so the documented example is the
tested one.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test installs a package and runs subprocesses

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "writing-a-method.md"


def guide_block(marker: str) -> str:
    text = GUIDE.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"the plugin guide lacks the {marker} block"
    return match.group(1)


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    source = tmp_path_factory.mktemp("plugin-src")
    (source / "pyproject.toml").write_text(guide_block("plugin-example:pyproject"))
    package = source / "tokenbench_every_other"
    package.mkdir()
    (package / "__init__.py").write_text(guide_block("plugin-example:module"))
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
    """The guide's one command for a plugin author, run from a folder outside the checkout."""
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


TOY_PYPROJECT = """
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "tokenbench-toy"
version = "0.1.0"

[project.entry-points."tokenbench.models"]
toy = "tokenbench_toy.models"

[project.entry-points."tokenbench.commands"]
toy-hello = "tokenbench_toy.command"

[project.entry-points."tokenbench.datasets"]
toy-digits = "tokenbench_toy:toy_digits"

[project.entry-points."tokenbench.reports"]
toy = "tokenbench_toy:write_toy_report"
"""
TOY_INIT = '''
from tokenbench.data.images import digits


def toy_digits(split, transform, root=None):
    """The embedded digits under another name: a dataset plugin."""
    return digits(split, transform, root)


def write_toy_report(board, out_dir):
    path = out_dir / "toy.txt"
    path.write_text("\\n".join(section.heading for section in board.sections))
    return path
'''
TOY_MODELS = '''
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

default_cfgs = generate_default_cfgs({"toy_vit.toy": dict(
    input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0, num_classes=10)})


@register_model
def toy_vit(pretrained=False, **kwargs):
    """A model a plugin adds: a tiny ViT at the digits' input size."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    return build_model_with_cfg(VisionTransformer, "toy_vit", pretrained, **dict(args, **kwargs))
'''
TOY_COMMAND = '''
def add_parser(sub):
    p = sub.add_parser("toy-hello", help="a plugin's command")
    p.add_argument("--name", default="world")
    return p


def run(args):
    from tokenbench import api

    model = api.load_model("toy_vit")
    print(f"hello {args.name} from {type(model).__name__}")
    return 0
'''


@pytest.fixture(scope="module")
def toy_plugin_path(tmp_path_factory):
    """A plugin that adds a timm model, a command, a dataset and a report writer through the same entry-point
    groups as tokenbench's own (DVT's model and `dvt-ablation` command, the built-in datasets and writers)."""
    source = tmp_path_factory.mktemp("toy-src")
    (source / "pyproject.toml").write_text(TOY_PYPROJECT)
    package = source / "tokenbench_toy"
    package.mkdir()
    for name, text in {"__init__.py": TOY_INIT, "models.py": TOY_MODELS, "command.py": TOY_COMMAND}.items():
        (package / name).write_text(text)
    target = tmp_path_factory.mktemp("toy-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return target


def test_a_plugin_adds_a_model_a_command_a_dataset_and_a_report(toy_plugin_path, tmp_path):
    hello = tokenbench(toy_plugin_path, "toy-hello", "--name", "tester")
    assert hello.returncode == 0 and hello.stdout.strip() == "hello tester from VisionTransformer", hello.stderr
    assert "toy-hello" in tokenbench(toy_plugin_path, "--help").stdout
    assert "toy-digits" in tokenbench(toy_plugin_path, "bench", "--help").stdout
    out = tokenbench(toy_plugin_path, "bench", "--method", "none,topk", "--keep", "0.5", "--model", "toy_vit",
                     "--dataset", "toy-digits", "--no-timing", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    board = tokenbench(toy_plugin_path, "leaderboard", "--results", tmp_path)
    assert board.returncode == 0, board.stderr
    assert (tmp_path / "toy.txt").read_text() == "toy-digits · toy_vit"
    assert "toy_vit" in (tmp_path / "leaderboard.md").read_text()
