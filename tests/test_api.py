"""The Python API: the README's example as written, knob checks shared with the CLI, the registry's rules,
and a command line that starts without the heavy imports."""

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

import tokenbench
from tokenbench.cli import build_parser, main
from tokenbench.reduce.knobs import Knob
from tokenbench.reduce.registry import HARNESS_OPTIONS, Method, all_methods, get_method, knob_by_name, register_method

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_api_example_runs_as_written(capsys):
    code = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(code, "README api-example", "exec"), namespace)
    vit, fast, rows = namespace["vit"], namespace["fast"], namespace["rows"]
    images = namespace["images"]
    assert tokenbench.gmacs(fast, images).mean() < tokenbench.gmacs(vit, images).mean()
    assert list(rows["method"]) == ["none", "topk", "topk"] and rows["knobs"].iloc[1] == {"keep": 0.7}
    out = capsys.readouterr().out
    assert "tome" in out and "dynamicvit" in out  # the method table was printed
    quoted = re.findall(r'# prints "(.*?)"', code)
    assert quoted and all(figure in out for figure in quoted), (quoted, out[:300])  # the figures it quotes


def test_apply_checks_knobs_with_the_cli_s_messages(tiny_vit, capsys, tmp_path):
    with pytest.raises(tokenbench.BenchError) as api_error:
        tokenbench.apply(tiny_vit, "topk", keep=1.5)
    assert main(["bench", "--method", "topk", "--keep", "1.5", "--out", str(tmp_path)]) == 2
    cli_error = capsys.readouterr().err.strip()
    assert str(api_error.value) == "topk: keep=1.5 is outside (0, 1]" and cli_error.endswith(str(api_error.value))
    for bad, message in [({"keep": 0}, "topk: keep=0 is outside (0, 1]"),
                         ({"r": 4}, "topk has no knob 'r' (its knobs: keep)"),
                         ({"keep": "0.5"}, "topk: keep='0.5' is not a number")]:
        with pytest.raises(tokenbench.BenchError, match=re.escape(message)):
            tokenbench.apply(tiny_vit, "topk", **bad)
    with pytest.raises(tokenbench.BenchError, match=re.escape("tome: r=2.5 is not a whole number")):
        tokenbench.apply(tiny_vit, "tome", r=2.5)
    with pytest.raises(tokenbench.BenchError, match="ats: sample_rate=1e\\+09 is outside"):
        tokenbench.apply(tiny_vit, "ats", sample_rate=1e9)  # bounded: it would allocate for 1e9 samples


def test_apply_without_knobs_is_the_dense_model(tiny_vit, digit_images):
    with torch.inference_mode():
        assert torch.equal(tokenbench.apply(tiny_vit, "tome")(digit_images), tiny_vit(digit_images))


def test_gmacs_of_a_plain_timm_vit_is_the_published_dense_count():
    deit = timm.create_model("deit_small_patch16_224")
    assert tokenbench.gmacs(deit, torch.randn(1, 3, 224, 224)).item() == pytest.approx(4.608, abs=5e-4)


def test_sweep_returns_the_rows_it_appends_and_resumes(tmp_path, checkpoint):
    first = tokenbench.sweep("none,topk", checkpoint=str(checkpoint), knobs={"keep": "0.5"}, timing=False,
                             out=tmp_path, log=lambda *a: None)
    assert isinstance(first, pd.DataFrame) and list(first["method"]) == ["none", "topk"]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["cell_id"] for row in lines] == list(first["cell_id"])
    again = tokenbench.sweep(["none", "topk"], checkpoint=str(checkpoint), knobs={"keep": [0.5, 0.5]},
                             timing=False, out=tmp_path, log=lambda *a: None)
    assert list(again["top1"]) == list(first["top1"])  # resumed from the file, nothing measured twice
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2


def test_methods_table_lists_every_registered_method():
    table = tokenbench.methods()
    assert set(table.index) == set(all_methods()) and table.loc["ats", "family"] == "prune"
    assert table.loc["ats", "knobs"]["sample_rate"]["noop"] == float("inf")


def test_a_knob_may_not_shadow_a_harness_option():
    class Shadowing(Method):
        name, family = "shadowing", "prune"
        knobs = (Knob("seed", (1, 2), noop=0, kind=int),)

    with pytest.raises(tokenbench.BenchError, match=r"test_api.*Shadowing: knob 'seed' would shadow the harness "
                                                    r"option --seed"):
        register_method(Shadowing)
    assert "shadowing" not in all_methods()


def test_every_harness_option_is_reserved():
    """HARNESS_OPTIONS must name every option of every command that is not a method knob."""
    knobs = set(knob_by_name())
    options = set()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in subparsers.choices.values():
        options |= {action.dest for action in command._actions} - knobs
    assert options <= HARNESS_OPTIONS, sorted(options - HARNESS_OPTIONS)


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["train", "--help"], ["methods"],
                                  ["bench", "--methd", "all"], ["bench", "--out", "x", "--keep", "abc"]])
def test_the_command_line_starts_without_torch(argv):
    """--help, methods and argument errors answer before torch (or timm, torchvision, pandas) is imported: the
    methods' metadata is read from their source (`registry.declared_methods`)."""
    code = ("import sys\nfrom tokenbench.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as done:\n    code = done.code\n"
            "heavy = [m for m in ('torch', 'timm', 'torchvision', 'pandas') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    heavy = done.stderr.strip().splitlines()[-1]
    assert heavy == "HEAVY []", done.stderr


def test_the_light_help_text_names_every_dataset():
    """`bench --help` lists the datasets without importing them; the list must not drift from the registry."""
    from tokenbench.cli import bench
    from tokenbench.data import registry as datasets

    help_text = next(a.help for a in bench.add_parser(argparse.ArgumentParser().add_subparsers())._actions
                     if a.dest == "dataset")
    assert all(name in help_text for name in datasets.dataset_names()) and "kinetics400" in help_text


def test_every_method_s_declared_metadata_is_its_class_s():
    """`tokenbench methods` and option parsing read the built-ins from source; what they read must be what
    importing the class gives (names, families, knobs with their sweeps, no-ops and ranges, summaries)."""
    from tokenbench.reduce import registry

    for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP):
        declared = registry._declaration(ep)
        assert declared is not None, f"{ep.value} does not declare its metadata literally: the CLI would import torch"
        real = ep.load()
        for field in registry.DECLARED:
            assert getattr(declared, field) == getattr(real, field), (ep.name, field)


def test_a_method_declared_from_code_is_imported_instead(tmp_path, monkeypatch):
    from tokenbench.reduce import registry

    (tmp_path / "computed_knobs.py").write_text(
        "from tokenbench.reduce import Knob, Method\n\n"
        "def make():\n    return (Knob('stride', (2,), noop=1, kind=int),)\n\n"
        "class Computed(Method):\n    name = 'computed'\n    family = 'prune'\n    knobs = make()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("computed", "computed_knobs:Computed", registry.ENTRY_POINT_GROUP)
    assert registry._declaration(ep) is None  # not literal: the registry imports it (`_load`)
    (tmp_path / "literal_knobs.py").write_text(
        "from tokenbench.reduce import Knob, Method\n\nSWEEP = (2, 4)\n\n"
        "class Literal(Method):\n    name = 'literal'\n    family = 'prune'\n"
        "    knobs = (Knob('stride', SWEEP, noop=1, kind=int),)\n")
    declared = registry._declaration(importlib.metadata.EntryPoint("literal", "literal_knobs:Literal",
                                                                   registry.ENTRY_POINT_GROUP))
    assert declared.knobs[0].sweep == (2, 4) and "literal_knobs" not in sys.modules


@pytest.mark.parametrize("method", ["dvt", "dynamicvit", "ltmp"])
def test_trained_weights_are_found_by_backbone_and_only_for_its_dataset(method):
    """`weights/<method>_<backbone without vit_>.pt`, for the dataset the backbone was trained on; none for a
    backbone whose weights do not ship (DVT also answers to its cascade's own name)."""
    trained = get_method(method)
    assert trained.checkpoint_for("vit_cifar10", "cifar10").name == f"{method}_cifar10.pt"
    assert trained.checkpoint_for("vit_digits", "digits").name == f"{method}_digits.pt"
    assert trained.checkpoint_for("vit_cifar10", "digits") is None
    assert trained.checkpoint_for("deit_small_patch16_224", "imagenet") is None
    assert (trained.checkpoint_for("dvt_cifar10", "cifar10") is not None) == (method == "dvt")
    assert trained.checkpoint_for("vit_cifar10_v2", "cifar10").name == f"{method}_cifar10_v2.pt"  # retrained on v2
    assert get_method("topk").checkpoint_for("vit_cifar10", "cifar10") is None  # trains nothing
