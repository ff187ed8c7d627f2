"""The video track: tubelet ViT, class-token substitute, VideoMAE loading, protocol, datasets, CLI."""

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import shared_data

from tokenbench.cli import main
from tokenbench.data import images as data
from tokenbench.data import registry as datasets
from tokenbench.data.video import VideoProtocol, VideoTransform, frame_indices, moving_digits_split
from tokenbench.errors import BenchError
from tokenbench.measure.results import read_results
from tokenbench.models.loading import load_model, save_checkpoint
from tokenbench.models.video import sinusoid_table
from tokenbench.reduce.attention import run_attention
from tokenbench.reduce.contract import Need, TokenState
from tokenbench.reduce.ledger import flop_counter_gmacs, measure_gmacs
from tokenbench.reduce.registry import get_method
from tokenbench.reduce.vit import TokenReducedViT


@pytest.fixture
def video_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_video_digits").eval()


@pytest.fixture
def clips():
    torch.manual_seed(1)
    return torch.randn(2, 3, 8, 32, 32)


def test_tubelets_are_time_major_tokens(video_vit):
    embed = video_vit.patch_embed
    assert (embed.grid_size, embed.num_patches, video_vit.num_prefix_tokens) == ((2, 8, 8), 128, 0)
    x = torch.zeros(1, 3, 8, 32, 32)
    x[0, :, 4:8, 0:4, 4:8] = 1  # second tubelet in time, first row, second column
    tokens = embed(x) - embed(torch.zeros_like(x))
    assert tokens.abs().sum(-1).nonzero()[:, 1].tolist() == [64 + 1]


def test_wrong_clip_shape_is_a_clear_error(video_vit):
    with pytest.raises(BenchError, match=r"\[B, C, T, H, W\]"):
        video_vit(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("method,knobs", [("none", {}), ("topk", {"keep": 0.5}), ("evit", {"keep": 0.5}),
                                          ("ats", {"sample_rate": 0.5}), ("tome", {"r": 8})])
def test_ledger_equals_flop_counter_on_video(video_vit, clips, method, knobs):
    model = get_method(method).build(video_vit, **knobs)
    x = clips[:1]
    ledger = measure_gmacs(model, x)
    assert ledger.matmul_gmacs.item() == pytest.approx(flop_counter_gmacs(model, x), rel=1e-9)


def test_dense_video_gmacs_by_formula(video_vit, clips):
    n, d, depth = 128, 96, 12
    blocks = depth * (12 * n * d * d + 2 * n * n * d)
    embed = 96 * 3 * 4 * 4 * 4 * n
    assert measure_gmacs(TokenReducedViT(video_vit), clips).matmul_gmacs[0].item() * 1e9 == pytest.approx(
        blocks + embed + d * 10, rel=1e-12)


def attention_weights(attn, x):
    qkv = attn.qkv(x).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def test_substitute_is_the_mean_attention_each_token_receives(video_vit):
    attn = video_vit.blocks[0].attn
    x = torch.randn(2, 10, 96)
    needs = Need.CLS_ATTN
    out, info, _ = run_attention(attn, x, None, needs, state=TokenState(prefix=0, class_token=False))
    weights = attention_weights(attn, x)
    torch.testing.assert_close(info.cls_attn, weights.mean(dim=2))
    torch.testing.assert_close(info.cls_attn.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(out, attn(x))
    # With a class token the row of token 0 is used, as before.
    _, info, _ = run_attention(attn, x, None, needs, state=TokenState(prefix=1))
    torch.testing.assert_close(info.cls_attn, weights[:, :, 0])


def test_substitute_ignores_padding_queries(video_vit):
    attn = video_vit.blocks[0].attn
    x = torch.randn(1, 6, 96)
    mask = torch.tensor([[True, True, True, True, False, False]])
    bias = torch.zeros(1, 6).masked_fill(~mask, float("-inf"))[:, None, None, :]
    state = TokenState(prefix=0, class_token=False, mask=mask)
    _, info, _ = run_attention(attn, x, bias, Need.CLS_ATTN, state=state)
    real = attention_weights(attn, x[:, :4]).mean(dim=2)
    torch.testing.assert_close(info.cls_attn[..., :4], real)
    assert info.cls_attn[..., 4:].abs().max() == 0


def test_topk_keeps_the_most_attended_tokens_without_a_class_token(video_vit, clips):
    model = get_method("topk").build(video_vit, keep=0.5)
    assert model.cls_substitute == "mean attention received"
    assert get_method("tome").build(video_vit, r=4).cls_substitute is None
    assert get_method("topk").build(timm.create_model("vit_digits"), keep=0.5).cls_substitute is None
    ledger = measure_gmacs(model, clips)
    assert ledger.tokens_per_block()[0].tolist() == [128] * 4 + [64] * 3 + [32] * 3 + [16] * 2


# --- VideoMAE checkpoints -------------------------------------------------------------------------

HF_CONFIG = dict(model_type="videomae", image_size=32, patch_size=16, num_channels=3, num_frames=4, tubelet_size=2,
                 hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, hidden_act="gelu",
                 qkv_bias=True, use_mean_pooling=True, layer_norm_eps=1e-12,
                 id2label={str(i): f"class {i}" for i in range(5)})


def random_hf_videomae(cfg) -> dict:
    g = torch.Generator().manual_seed(0)
    d, m, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {"videomae.embeddings.patch_embeddings.projection.weight": r(d, 3, 2, 16, 16),
             "videomae.embeddings.patch_embeddings.projection.bias": r(d),
             "fc_norm.weight": r(d), "fc_norm.bias": r(d), "classifier.weight": r(5, d), "classifier.bias": r(5)}
    for i in range(layers):
        p = f"videomae.encoder.layer.{i}."
        state.update({p + f"attention.attention.{n}.weight": r(d, d) / 4 for n in ("query", "key", "value")})
        state.update({p + "attention.attention.q_bias": r(d), p + "attention.attention.v_bias": r(d),
                      p + "attention.output.dense.weight": r(d, d) / 4, p + "attention.output.dense.bias": r(d),
                      p + "intermediate.dense.weight": r(m, d) / 4, p + "intermediate.dense.bias": r(m),
                      p + "output.dense.weight": r(d, m) / 8, p + "output.dense.bias": r(d),
                      p + "layernorm_before.weight": r(d), p + "layernorm_before.bias": r(d),
                      p + "layernorm_after.weight": r(d), p + "layernorm_after.bias": r(d)})
    return state


def reference_videomae(state: dict, cfg: dict, video: torch.Tensor) -> torch.Tensor:
    """Hugging Face VideoMAEForVideoClassification's forward, written out from its weights ([B, C, T, H, W])."""
    d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    s = {k.removeprefix("videomae."): v for k, v in state.items()}
    x = F.conv3d(video, s["embeddings.patch_embeddings.projection.weight"],
                 s["embeddings.patch_embeddings.projection.bias"], stride=(2, 16, 16)).flatten(2).transpose(1, 2)
    n = x.shape[1]
    angle = torch.tensor([[p / 10000 ** (2 * (j // 2) / d) for j in range(d)] for p in range(n)], dtype=torch.float64)
    angle[:, 0::2], angle[:, 1::2] = angle[:, 0::2].sin(), angle[:, 1::2].cos()
    x = x + angle.float()
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        h = F.layer_norm(x, (d,), s[p + "layernorm_before.weight"], s[p + "layernorm_before.bias"], eps)
        a = p + "attention.attention."
        q = F.linear(h, s[a + "query.weight"], s[a + "q_bias"])
        k = F.linear(h, s[a + "key.weight"])
        v = F.linear(h, s[a + "value.weight"], s[a + "v_bias"])
        q, k, v = (t.view(t.shape[0], n, heads, -1).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
        o = (w @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(o, s[p + "attention.output.dense.weight"], s[p + "attention.output.dense.bias"])
        h = F.layer_norm(x, (d,), s[p + "layernorm_after.weight"], s[p + "layernorm_after.bias"], eps)
        h = F.gelu(F.linear(h, s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"]))
        x = x + F.linear(h, s[p + "output.dense.weight"], s[p + "output.dense.bias"])
    pooled = F.layer_norm(x.mean(1), (d,), s["fc_norm.weight"], s["fc_norm.bias"], 1e-5)
    return F.linear(pooled, s["classifier.weight"], s["classifier.bias"])


def write_hf_folder(folder, cfg, state, weights="model.safetensors"):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in state.items()}
    if weights == "model.safetensors":
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_videomae_folder_loads_exactly(tmp_path, weights):
    pytest.importorskip("safetensors")
    state = random_hf_videomae(HF_CONFIG)
    write_hf_folder(tmp_path / "videomae-tiny", HF_CONFIG, state, weights)
    loaded = load_model(checkpoint=tmp_path / "videomae-tiny")
    model = loaded.model
    assert loaded.name == "videomae:videomae-tiny" and loaded.weights.startswith("file:videomae-tiny@sha256:")
    assert (model.patch_embed.num_patches, model.num_prefix_tokens, model.head.out_features) == (8, 0, 5)
    ours = model.state_dict()
    layer = "videomae.encoder.layer.1.attention.attention."
    assert torch.equal(ours["blocks.1.attn.qkv.weight"][32:64], state[layer + "key.weight"])
    bias = ours["blocks.1.attn.qkv.bias"]
    assert torch.equal(bias[:32], state[layer + "q_bias"]) and torch.equal(bias[64:], state[layer + "v_bias"])
    assert bias[32:64].abs().max() == 0  # VideoMAE's keys have no bias
    assert torch.equal(ours["pos_embed"], sinusoid_table(8, 32)) and not model.pos_embed.requires_grad
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(video), reference_videomae(state, HF_CONFIG, video), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(TokenReducedViT(model)(video), model(video), rtol=0, atol=0)


def test_videomae_folder_with_foreign_keys_is_a_clear_error(tmp_path):
    pytest.importorskip("safetensors")
    state = random_hf_videomae(HF_CONFIG)
    state["videomae.layernorm.weight"] = torch.ones(32)
    write_hf_folder(tmp_path / "extra", HF_CONFIG, state)
    with pytest.raises(BenchError, match="keys this model does not use"):
        load_model(checkpoint=tmp_path / "extra")
    del state["videomae.layernorm.weight"], state["classifier.bias"]
    write_hf_folder(tmp_path / "short", HF_CONFIG, state)
    with pytest.raises(BenchError, match="lacks 'classifier.bias'"):
        load_model(checkpoint=tmp_path / "short")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(HF_CONFIG))
    with pytest.raises(BenchError, match="neither model.safetensors nor pytorch_model.bin"):
        load_model(checkpoint=tmp_path / "empty")


@pytest.mark.parametrize("damage", ["bad config.json", "config without sizes", "wrong shapes", "truncated weights"])
def test_a_broken_videomae_folder_is_one_line_on_the_command_line(tmp_path, capsys, damage):
    pytest.importorskip("safetensors")
    state = random_hf_videomae(HF_CONFIG)
    if damage == "wrong shapes":
        state["classifier.weight"] = torch.zeros(5, 16)
    folder = tmp_path / "videomae"
    write_hf_folder(folder, HF_CONFIG, state)
    if damage == "bad config.json":
        (folder / "config.json").write_text("{'not': json")
    elif damage == "config without sizes":
        (folder / "config.json").write_text(json.dumps({"model_type": "videomae"}))
    elif damage == "truncated weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    assert main(["bench", "--method", "none", "--checkpoint", str(folder), "--dataset", "moving-digits",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder}" in err[0], err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_videomae_shapes():
    model = timm.create_model("videomae_base_patch16_224", depth=1)
    assert (model.patch_embed.num_patches, model.protocol, model.num_prefix_tokens) == (1568, "16x4x5x3", 0)


# --- protocol and sampling ----------------------------------------------------------------------

def test_videomae_protocol_sampling():
    protocol = VideoProtocol.parse("videomae")
    assert (str(protocol), protocol.views) == ("16x4x5x3", 15)
    clips = frame_indices(300, protocol)
    assert [c[0] for c in clips] == [0, 56, 116, 176, 236]  # 75 strided frames, starts 0, 14, 29, 44, 59
    assert all(c == list(range(c[0], c[0] + 64, 4)) for c in clips)
    assert frame_indices(10, VideoProtocol(16, 4)) == [[0, 4, 8] + [8] * 13]
    assert frame_indices(40, VideoProtocol(4, 2)) == [[16, 18, 20, 22]]  # one clip: centred
    with pytest.raises(BenchError, match="FRAMESxSTRIDExCLIPSxCROPS"):
        VideoProtocol.parse("16x4")


def test_three_crops_span_the_long_side():
    transform = VideoTransform(VideoProtocol(2, 1, 1, 3), 4, mean=(0, 0, 0), std=(1, 1, 1))
    video = torch.arange(4 * 6, dtype=torch.uint8).view(1, 1, 4, 6).expand(3, 2, 4, 6).contiguous()
    views = transform(video)
    assert views.shape == (3, 3, 2, 4, 4)
    for view, left in zip(views, (0, 1, 2)):
        torch.testing.assert_close(view * 255, video[..., left:left + 4].float())


def test_moving_digits_are_deterministic_moving_digits():
    clips, labels = moving_digits_split("val")
    again, _ = moving_digits_split("val")
    images, digit_labels = data.digits_split("val")
    assert clips.shape == (len(images), 8, 32, 32) and np.array_equal(clips, again)
    assert np.array_equal(labels, digit_labels)
    assert all(clips[i, 0].sum() == clips[i, -1].sum() for i in range(10))  # the whole digit in every frame
    assert all(not np.array_equal(clips[i, 0], clips[i, -1]) for i in range(10))  # and it moved


def test_moving_digits_train_split_draws_a_new_seeded_path_at_every_read():
    first, again = (datasets.build_dataset("moving-digits", "train", lambda v: v).dataset for _ in range(2))
    reads = [first[0][0] for _ in range(3)]
    assert not torch.equal(reads[0], reads[1]) and not torch.equal(reads[1], reads[2])
    replay = [again[0][0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(reads, replay))  # a fresh dataset replays the same paths
    assert reads[0].sum() == reads[1].sum()  # the same digit, elsewhere


def test_video_dataset_through_model_transform(video_vit):
    ds = datasets.build_dataset("moving-digits", "test", datasets.eval_transform(video_vit))
    x, y = ds.dataset[0]
    assert (x.shape, ds.views, ds.num_classes) == ((3, 8, 32, 32), 1, 10)
    assert x.min() == -1 and y == int(moving_digits_split("test")[1][0])
    with pytest.raises(BenchError, match="samples 16 frames, but the model takes 8"):
        datasets.eval_transform(video_vit, "videomae")
    with pytest.raises(BenchError, match="video models only"):
        datasets.eval_transform(timm.create_model("vit_digits"), "videomae")


def test_multi_view_evaluation_averages_views(video_vit):
    from tokenbench.measure.metrics import evaluate

    torch.manual_seed(0)
    videos, labels = torch.randn(3, 2, 3, 8, 32, 32), torch.tensor([0, 1, 2])
    model = TokenReducedViT(video_vit)
    result = evaluate(model, [(videos, labels)], torch.device("cpu"), views=2)
    with torch.no_grad():
        probs = video_vit(videos.flatten(0, 1)).softmax(-1).view(3, 2, -1).mean(1)
    assert result.top1 == (probs.argmax(1) == labels).float().mean().item()
    per_view = measure_gmacs(model, videos[0]).gmacs[0].item()
    assert result.gmacs.tolist() == pytest.approx([2 * per_view] * 3, rel=1e-12)


# --- real clips -------------------------------------------------------------------------------------

def kinetics_root(tmp_path):
    clips = shared_data("kinetics-clips")
    root = tmp_path / "k400"
    (root / "val" / "arm wrestling").mkdir(parents=True)
    (root / "val" / "flipping pancake").mkdir(parents=True)
    (root / "kinetics400_label_map.txt").symlink_to(clips / "mmaction2_label_map_k400.txt")
    (root / "val" / "arm wrestling" / "demo0000000_000000_000010.mp4").symlink_to(clips / "mmaction2_demo.mp4")
    (root / "val" / "flipping pancake" / "pancake0000_000003_000013.mkv").symlink_to(
        clips / "decord_flipping_a_pancake.mkv")
    (root / "val" / "arm wrestling" / "broken00000_000001_000011.mp4").write_bytes(b"not a video at all" * 100)
    (root / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "arm wrestling,demo0000000,0,10,val\n"
        "flipping pancake,pancake0000,3,13,val\n"
        "arm wrestling,broken00000,1,11,val\n"
        "arm wrestling,gone0000000,5,15,val\n")
    return root


def test_kinetics_csv_counts_missing_and_undecodable_and_labels_by_the_map(tmp_path):
    pytest.importorskip("av")
    root = kinetics_root(tmp_path)
    names = (root / "kinetics400_label_map.txt").read_text().splitlines()
    model = timm.create_model("videomae_small_patch16_224", depth=1, embed_dim=32, num_heads=1)
    ds = datasets.build_dataset("kinetics400", "val", datasets.eval_transform(model, "16x4x2x3"), str(root))
    assert (len(ds.dataset), ds.missing, ds.unreadable, ds.views) == (2, 1, 1, 6)
    assert ds.dataset.labels == [names.index("arm wrestling"), names.index("flipping pancake")]
    (root / "val.txt").write_text(f"{root}/val/arm wrestling/demo0000000_000000_000010.mp4 6\n"
                                  "val/flipping pancake/pancake0000_000003_000013.mkv flipping pancake\n")
    (root / "validate.csv").unlink()
    listed = datasets.build_dataset("kinetics400", "val", datasets.eval_transform(model), str(root))
    assert listed.dataset.labels == ds.dataset.labels and listed.views == 15


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_kinetics_pipeline_end_to_end_on_real_clips(tmp_path, monkeypatch, capsys, streamed):
    """Decode, sample 2 clips x 3 crops, run dense and top-k through a random-init VideoMAE-shaped ViT;
    streamed (as a set too big for memory is), the clips are decoded again by worker processes."""
    pytest.importorskip("av")
    if streamed:
        monkeypatch.setattr("tokenbench.data.store.FLOAT_MEMORY_BYTES", 0)
    root = kinetics_root(tmp_path)
    torch.manual_seed(0)
    kwargs = dict(depth=4, embed_dim=32, num_heads=1)
    ckpt = tmp_path / "videomae_tiny.pt"
    save_checkpoint(ckpt, timm.create_model("videomae_small_patch16_224", **kwargs), "videomae_small_patch16_224",
                    {}, kwargs)
    out = tmp_path / "runs"
    assert main(["bench", "--method", "none,topk", "--keep", "0.5", "--checkpoint", str(ckpt), "--dataset",
                 "kinetics400", "--data-root", str(root), "--split", "val", "--protocol", "16x4x2x3",
                 "--no-timing", "--batch-size", "2", "--workers", "2", "--out", str(out)]) == 0
    assert ("streamed, decoded at every configuration" in capsys.readouterr().out) == streamed
    dense, topk = read_results(out / "results.jsonl")
    for row in (dense, topk):
        assert (row.n_images, row.n_missing, row.n_unreadable, row.views) == (2, 1, 1, 6)
        assert (row.protocol, row.throughput_unit) == ("16x4x2x3", "clips/s")
        assert row.gmacs == pytest.approx(6 * row.gmacs_per_view)
    assert dense.tokens_per_block == [1568] * 4 and topk.tokens_per_block == [1568, 1568, 784, 392]
    assert dense.cls_substitute is None and topk.cls_substitute == "mean attention received"


@pytest.mark.slow
def test_streamed_video_set_gives_the_rows_kept_in_memory_gives(tmp_path, monkeypatch, capsys):
    def sweep(out):
        assert main(["bench", "--method", "none,evit", "--keep", "0.5", "--dataset", "moving-digits",
                     "--no-timing", "--workers", "1", "--out", str(out)]) == 0
        streamed = "streamed, decoded at every configuration" in capsys.readouterr().out
        return streamed, [(r.top1, r.gmacs, r.n_images) for r in read_results(out / "results.jsonl")]

    in_memory, kept = sweep(tmp_path / "kept")
    monkeypatch.setattr("tokenbench.data.store.FLOAT_MEMORY_BYTES", 0)
    streamed, rows = sweep(tmp_path / "streamed")
    assert (in_memory, streamed) == (False, True) and rows == kept


def test_video_leaderboard_counts_clips_and_videos(tmp_path):
    assert main(["bench", "--method", "none", "--dataset", "moving-digits", "--repeats", "1", "--out",
                 str(tmp_path)]) == 0
    assert main(["leaderboard", "--results", str(tmp_path)]) == 0
    header = next(line for line in (tmp_path / "leaderboard.md").read_text().splitlines() if "top-1 %" in line)
    assert "clips/s" in header and "img/s" not in header


def test_embedded_video_weights_reach_their_recorded_val_accuracy():
    from tokenbench.data.images import batches, preload
    from tokenbench.measure.metrics import evaluate

    loaded = load_model("vit_video_digits")
    assert loaded.weights.startswith("embedded:vit_video_digits.pt@sha256:")
    assert loaded.meta["command"].startswith("tokenbench train") and "--dataset moving-digits" in loaded.meta["command"]
    val = datasets.build_dataset("moving-digits", "val", datasets.eval_transform(loaded.model))
    videos, labels = preload(val.dataset)
    result = evaluate(loaded.model, batches(videos, labels, 64), torch.device("cpu"))
    assert result.top1 == pytest.approx(loaded.meta["val_top1"], abs=1 / len(labels))


@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_a_clip_that_breaks_after_the_readability_check_is_counted_not_fatal(tmp_path, monkeypatch, streamed):
    pytest.importorskip("av")
    from tokenbench.data import registry as registry

    if streamed:
        monkeypatch.setattr("tokenbench.data.store.FLOAT_MEMORY_BYTES", 0)
    root = kinetics_root(tmp_path)
    build = registry.dataset_builder("kinetics400")

    def build_then_break(*args, **kwargs):
        ds = build(*args, **kwargs)  # the readability check has passed: now the pancake clip goes bad
        pancake = root / "val" / "flipping pancake" / "pancake0000_000003_000013.mkv"
        pancake.unlink()
        pancake.write_bytes(b"truncated" * 50)
        return ds

    monkeypatch.setitem(registry.DATASETS, "kinetics400", build_then_break)
    kwargs = dict(depth=1, embed_dim=32, num_heads=1)
    ckpt = tmp_path / "videomae_tiny.pt"
    save_checkpoint(ckpt, timm.create_model("videomae_small_patch16_224", **kwargs), "videomae_small_patch16_224",
                    {}, kwargs)
    argv = ["bench", "--method", "none", "--checkpoint", str(ckpt), "--dataset", "kinetics400", "--data-root",
            str(root), "--split", "val", "--protocol", "16x4x1x1", "--no-timing", "--batch-size", "2",
            "--workers", "2"]
    assert main([*argv, "--out", str(tmp_path / "runs")]) == 0
    row = read_results(tmp_path / "runs" / "results.jsonl")[0]
    assert (row.n_images, row.n_missing, row.n_unreadable) == (1, 1, 2)
    # --strict fails on it: with the clip whole again at the check and no other unreadable one
    (root / "val" / "arm wrestling" / "broken00000_000001_000011.mp4").unlink()
    pancake = root / "val" / "flipping pancake" / "pancake0000_000003_000013.mkv"
    pancake.unlink()
    pancake.symlink_to(shared_data("kinetics-clips") / "decord_flipping_a_pancake.mkv")
    assert main([*argv, "--strict", "--out", str(tmp_path / "strict")]) == 2


def test_streamed_clips_are_decoded_by_workers_started_from_a_forkserver(tmp_path):
    """A child forked after its parent decoded a video hangs in PyAV 18.1.1 (the streamed tests of the slow tier
    did, in CI): a video set's workers start from a forkserver; an image set's keep the default fork."""
    from torch.utils.data import Subset

    from tokenbench.data.store import worker_context
    from tokenbench.data.video import VideoFiles

    videos = VideoFiles([tmp_path / "clip.mp4"], [0], torch.nn.Identity())
    assert worker_context(Subset(videos, [0])).get_start_method() == "forkserver"
    assert worker_context(datasets.build_dataset("digits", "test", torch.nn.Identity()).dataset) is None
