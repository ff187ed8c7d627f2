"""`tokenbench profile`, `visualize` and `speed` as a user runs them."""

import numpy as np
import pytest
import torch
from PIL import Image
from plain_vit import one_thread  # noqa: F401  (autouse fixture)

from tokenbench.cli import main
from tokenbench.report.patches import DROPPED, describe, patch_owners, render
from tokenbench.run.speed import parse_cell


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def run(*argv):
    return main([str(a) for a in argv])


def test_profile_prints_the_papers_schedule_and_gmacs(capsys):
    assert run("profile", "--model", "deit_small_patch16_224", "--method", "evit", "--keep", "0.7", "--count", "1") == 0
    out = capsys.readouterr().out
    tokens = [int(line.split()[1]) for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert tokens == [197] * 4 + [140] * 3 + [100] * 3 + [72] * 2
    assert "GMACs per image: 3.0357, dense 4.6083" in out


def test_profile_adaptive_method_on_an_image_folder(checkpoint, image_folder, capsys):
    assert run("profile", "--checkpoint", checkpoint, "--method", "ats", "--sample-rate", "1",
               "--images", image_folder) == 0
    out = capsys.readouterr().out
    assert "ats sample_rate=1 on vit_digits" in out and f"3 images from {image_folder}" in out
    assert "GMACs per image:" in out


def test_profile_errors_are_one_line(checkpoint, tmp_path, capsys):
    assert run("profile", "--checkpoint", checkpoint, "--method", "tome", "--keep", "0.5") == 2
    assert "tome has no knob 'keep' (its knobs: r, inflect)" in capsys.readouterr().err
    assert run("profile", "--checkpoint", checkpoint, "--method", "ats", "--images", tmp_path / "nothing") == 2
    assert "not a folder" in capsys.readouterr().err


def test_visualize_writes_one_panel_per_reduction(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "tome.png"
    assert run("visualize", "--checkpoint", checkpoint, "--method", "tome", "--r", "4",
               "--image", image_folder / "0.png", "--out", out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"block {i:2d}" for i in range(12)]
    assert lines[0].startswith("block  0: 61 tokens; patches") and "in" in lines[0] and "merged" in lines[0]
    assert Image.open(out).size[0] > 500


def test_patch_roles_from_the_traced_sources():
    # tokens: class token (no patches), one holding patches 0 and 1, one holding patch 2; patch 3 dropped
    source = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)
    owners = patch_owners(source)
    assert owners.tolist() == [1, 1, 2, DROPPED]
    assert describe(owners) == "1 kept, 1 dropped, 2 in 1 merged"
    picture = np.random.default_rng(0).random((8, 8, 3))  # 2x2 patches of 4x4 pixels
    drawn = render(picture, owners, (2, 2))
    assert np.allclose(drawn[5:, :4], picture[5:, :4])  # the kept patch is untouched (below the outline)
    assert (drawn[4, :4] == 1).all()  # the merged group's outline
    assert not np.allclose(drawn[4:, 4:], picture[4:, 4:])  # the dropped patch is washed out
    assert np.allclose(drawn[:4], picture[:4].reshape(-1, 3).mean(0))  # merged: one flat mean colour


def test_speed_cells_parse_with_the_methods_own_knobs():
    assert parse_cell("tome:r=13") == ("tome", {"r": 13, "inflect": 0.0})
    assert parse_cell("evit:keep=0.7") == ("evit", {"keep": 0.7})
    assert run("speed", "--cell", "tome:keep=0.7") == 2


def test_speed_table_under_bf16_autocast(capsys, monkeypatch):
    from tokenbench.measure import metrics as measure

    dtypes = []
    real = measure.autocast
    monkeypatch.setattr(measure, "autocast", lambda device, dtype: dtypes.append(dtype) or real(device, dtype))
    assert run("speed", "--model", "vit_digits", "--cell", "topk:keep=0.5", "--batch-size", "4", "--rounds", "2",
               "--warmup", "0", "--dtype", "bf16") == 0
    out = capsys.readouterr().out
    assert ", bf16, 2 rounds" in out and set(dtypes) == {"bf16"}  # the timing and the kernel probes
    topk = next(line.split() for line in out.splitlines() if line.startswith("topk"))
    assert float(topk[2]) < float(next(line.split() for line in out.splitlines() if line.startswith("none"))[2])


def test_speed_batch_size_curve_table_and_plot(tmp_path, capsys):
    """--batch-sizes: one row per batch size and model, dense and methods interleaved at each; --plot draws the
    speedup curves with their GMACs ratios."""
    from tokenbench.run.speed import speed_table

    plot = tmp_path / "curve.png"
    assert run("speed", "--model", "vit_digits", "--cell", "topk:keep=0.5", "--cell", "tome:r=8", "--batch-sizes",
               "1,4", "--rounds", "2", "--warmup", "0", "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [(b, m) for b in ("1", "4") for m in ("none", "topk", "tome")]
    assert plot.stat().st_size > 10_000
    from tokenbench.models import loading as models

    table = speed_table(models.load_model("vit_digits").model, [("topk", {"keep": 0.5})], (2,), rounds=1, warmup=0,
                        log=lambda line: None)
    dense, topk = table.to_dict("records")
    assert dense["speedup"] == 1 and dense["gmacs_ratio"] == 1 and topk["gmacs_ratio"] > 1.3
    assert topk["speedup_per_gmacs_ratio"] == pytest.approx(topk["speedup"] / topk["gmacs_ratio"])
    assert run("speed", "--plot", str(plot)) == 2  # the plot is of the batch-size curve


def test_attention_kernels_name_the_path_each_method_ran():
    """Fused attention where nothing needs the map, the explicit path where a reducer does (MCTF merges it),
    and the backend torch actually selects (math when the fused kernels are switched off)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenbench import api
    from tokenbench.measure.metrics import attention_kernels
    from tokenbench.models import loading as models

    vit = models.load_model("vit_digits").model
    images = torch.randn(2, 3, 32, 32)
    assert attention_kernels(api.apply(vit, "none"), images) == "cpu-fused"
    assert attention_kernels(api.apply(vit, "mctf", r=4), images) == "cpu-fused+explicit"  # block 0 fused
    with sdpa_kernel(SDPBackend.MATH):
        assert attention_kernels(api.apply(vit, "tome", r=4), images) == "math"
    assert attention_kernels(vit, images) is None  # a bare timm model: not tokenbench's blocks
