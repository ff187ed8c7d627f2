"""Video datasets and the video evaluation protocol.

A protocol is FRAMESxSTRIDExCLIPSxCROPS: each view is FRAMES frames taken every STRIDE-th frame; CLIPS
temporal clips are spread evenly over the video and CROPS square crops evenly along its long side
(after the short side is resized to the crop size), so a video gives CLIPS x CROPS views whose
predictions are averaged. `videomae` is VideoMAE's Kinetics-400 test protocol, 16x4x5x3 (15 views).

Datasets (items are uint8 [C, N, H, W] videos run through the `VideoTransform`):
- `moving-digits`: the embedded default, no download. Each scikit-learn digit (split as `digits`)
  drawn 2x on a 32x32 canvas, moving on a seeded straight path that bounces off the edges, 8 frames;
  val and test paths are fixed, the train split draws a new path at every read.
- `kinetics400`: clips decoded with PyAV from `--data-root`, listed by the official annotation CSV
  or a `path label` list; missing and undecodable videos are counted, not fatal.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from tokenbench.data.images import DatasetInfo, Unreadable, digits_split
from tokenbench.errors import BenchError
from tokenbench.models.video import IMAGENET_MEAN, IMAGENET_STD

PRESETS = {"videomae": "16x4x5x3"}


@dataclass(frozen=True)
class VideoProtocol:
    frames: int
    stride: int = 1
    clips: int = 1
    crops: int = 1

    @classmethod
    def parse(cls, text: str) -> "VideoProtocol":
        spec = PRESETS.get(text, text)
        if not re.fullmatch(r"\d+x\d+x\d+x\d+", spec):
            raise BenchError(f"video protocol {text!r}: use FRAMESxSTRIDExCLIPSxCROPS (e.g. 16x4x5x3) "
                             f"or a preset ({', '.join(PRESETS)})")
        protocol = cls(*(int(v) for v in spec.split("x")))
        if min(protocol.frames, protocol.stride, protocol.clips, protocol.crops) < 1:
            raise BenchError(f"video protocol {text!r}: every number must be at least 1")
        return protocol

    @property
    def views(self) -> int:
        return self.clips * self.crops

    def __str__(self):
        return f"{self.frames}x{self.stride}x{self.clips}x{self.crops}"


def clip_starts(length: int, frames: int, clips: int) -> list[int]:
    """First indices of `clips` windows of `frames` spread evenly over `length` (centred if one)."""
    room = max(length - frames, 0)
    if clips == 1:
        return [room // 2]
    return [int(i * room / (clips - 1)) for i in range(clips)]


def frame_indices(num_frames: int, protocol: VideoProtocol) -> list[list[int]]:
    """For each temporal clip, the frame indices of a video with `num_frames` frames.

    As VideoMAE's test sampling: take every `stride`-th frame (repeating the last one if the video is
    too short), then spread the clips evenly over those.
    """
    strided = list(range(0, num_frames, protocol.stride))
    strided += [strided[-1]] * max(0, protocol.frames - len(strided))
    return [strided[s:s + protocol.frames] for s in clip_starts(len(strided), protocol.frames, protocol.clips)]


class VideoTransform:
    """uint8 video [C, N, H, W] -> float views [V, C, T, S, S] (or [C, T, S, S] for one view).

    Per view: the protocol's frames, short side resized to S (bilinear, antialiased), a square crop
    (evenly spaced along the long side), scaled to [0, 1] and normalised with the model's mean and std.
    """

    def __init__(self, protocol: VideoProtocol, size: int, mean, std):
        self.protocol, self.size = protocol, size
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None, None]

    @property
    def views(self) -> int:
        return self.protocol.views

    def resize(self, clip: torch.Tensor) -> torch.Tensor:
        """[C, T, H, W] uint8 -> float in [0, 1] with the short side at `size`."""
        clip = clip.float() / 255
        h, w = clip.shape[-2:]
        if min(h, w) == self.size:
            return clip
        scale = self.size / min(h, w)
        out = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        return F.interpolate(clip.transpose(0, 1), size=out, mode="bilinear", align_corners=False,
                             antialias=True).transpose(0, 1)

    def crops(self, clip: torch.Tensor) -> list[torch.Tensor]:
        h, w = clip.shape[-2:]
        n, s = self.protocol.crops, self.size
        long_starts = clip_starts(max(h, w), s, n)
        short_start = (min(h, w) - s) // 2
        if h >= w:
            return [clip[..., t:t + s, short_start:short_start + s] for t in long_starts]
        return [clip[..., short_start:short_start + s, t:t + s] for t in long_starts]

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 4:
            raise BenchError(f"a video transform takes [C, N, H, W] frames, got {list(video.shape)}")
        views = []
        for index in frame_indices(video.shape[1], self.protocol):
            clip = self.resize(video[:, index])
            views += [(crop - self.mean) / self.std for crop in self.crops(clip)]
        return views[0] if len(views) == 1 else torch.stack(views)

    def __repr__(self):
        return f"VideoTransform({self.protocol}, size={self.size})"


def eval_transform(model: torch.nn.Module, protocol: str | None = None) -> VideoTransform:
    """The video model's evaluation views: its default protocol (or `protocol`), its size, mean and std."""
    chosen = VideoProtocol.parse(protocol or model.protocol)
    if chosen.frames != model.num_frames:
        raise BenchError(f"protocol {chosen} samples {chosen.frames} frames, but the model takes {model.num_frames}")
    cfg = getattr(model, "pretrained_cfg", None) or {}

    size = model.patch_embed.img_size
    if size[0] != size[1]:
        raise BenchError(f"video models with non-square input {size} are not supported")
    return VideoTransform(chosen, size[0], cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


# --- moving-digits ------------------------------------------------------------------------------

CANVAS, FRAMES, SCALE = 32, 8, 2


def render_moving(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 clips [N, T, 32, 32]: each 8x8 digit drawn 2x, bouncing off the edges along a path drawn from `rng`."""
    digit = SCALE * images.shape[1]
    room = CANVAS - digit
    clips = np.zeros((len(images), FRAMES, CANVAS, CANVAS), dtype=np.uint8)
    start = rng.integers(0, room + 1, size=(len(images), 2))
    velocity = rng.choice([-2, -1, 1, 2], size=(len(images), 2))
    steps = np.arange(FRAMES)[:, None]
    for i, image in enumerate(images):
        big = np.kron(image, np.ones((SCALE, SCALE), dtype=np.uint8))
        path = np.abs((start[i] + velocity[i] * steps + room) % (2 * room) - room)  # reflect at both edges
        for t, (y, x) in enumerate(path):
            clips[i, t, y:y + digit, x:x + digit] = big
    return clips


def moving_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The val or test clips on their fixed seeded paths, and their labels."""
    images, labels = digits_split(split)
    return render_moving(images, np.random.default_rng({"val": 1, "test": 2}[split])), labels


def grey_video(clip: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W] -> the 3-channel [3, T, H, W] video a model's transform takes."""
    return torch.from_numpy(clip)[None].expand(3, -1, -1, -1)


class ArrayVideos(Dataset):
    """In-memory grey uint8 clips [N, T, H, W] through `transform`."""

    def __init__(self, clips: np.ndarray, labels: np.ndarray, transform: Callable):
        self.clips, self.labels, self.transform = clips, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(grey_video(self.clips[i])), int(self.labels[i])


class FreshPathVideos(Dataset):
    """The train split: every read draws the digit a new path, so training sees endless motion.

    The generator is seeded, so a process that reads in the same order sees the same clips and a training
    run repeats exactly; one fixed path per training digit would give a ViT far fewer positions to learn from.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable, seed: int = 0):
        self.images, self.labels, self.transform = images, labels, transform
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(grey_video(render_moving(self.images[i:i + 1], self.rng)[0])), int(self.labels[i])


def moving_digits(split: str, transform: Callable, root: str | None = None) -> DatasetInfo:
    if split == "train":
        images, labels = digits_split(split)
        videos = FreshPathVideos(images, labels, transform)
    else:
        videos = ArrayVideos(*moving_digits_split(split), transform)
    return DatasetInfo(videos, "moving-digits", split, num_classes=10, views=getattr(transform, "views", 1),
                       mirror_invariant=False)


# --- Kinetics-400 ------------------------------------------------------------------------------------

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
KINETICS_LAYOUT = """  ROOT/<label map>   the 400 class names in index order, one per line: a file named *label_map*.txt or classes.txt
  and, for the split (val reads val.* or validate.*):
  ROOT/<split>.csv   the official annotations (label,youtube_id,time_start,time_end,split); clips found anywhere
                     under ROOT as <youtube_id>_<start:06d>_<end:06d>.<ext>, e.g. <split>/<class>/... as downloaded
  ROOT/<split>.txt   or a list of `path label` lines (path relative to ROOT, label a class index or name)"""


class Undecodable(Exception):
    """A video file PyAV cannot decode."""


def decode_video(path: Path) -> torch.Tensor:
    """Every frame of the first video stream as uint8 [3, N, H, W] (RGB), decoded with PyAV."""
    try:
        import av
    except ImportError:
        raise BenchError("decoding video needs PyAV: pip install 'tokenbench[video]'") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except (av.FFmpegError, IndexError, OSError) as err:
        raise Undecodable(f"{path}: {err}") from None
    if not frames:
        raise Undecodable(f"{path}: no video frames")
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)


class VideoFiles(Dataset):
    """Videos decoded on access with PyAV, with their labels."""

    fork_safe = False  # a child forked after this process decoded a video can hang in PyAV (18.1.1)

    def __init__(self, paths: list[Path], labels: list[int], transform: Callable):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            video = decode_video(self.paths[i])
        except Undecodable as err:  # undecodable after the readability check: counted by the store, not fatal
            raise Unreadable(str(err)) from None
        return self.transform(video), self.labels[i]


def read_label_map(root: Path) -> list[str]:
    found = sorted(root.glob("*label_map*.txt")) + sorted(root.glob("classes.txt"))
    if not found:
        raise BenchError(f"kinetics400: no label map in {root}\n{KINETICS_LAYOUT}")
    names = [line.strip() for line in found[0].read_text().splitlines() if line.strip()]
    if len(names) != 400:
        raise BenchError(f"kinetics400: {found[0]} lists {len(names)} classes, not 400")
    return names


def annotation_file(root: Path, split: str) -> Path:
    stems = {"val": ("val", "validate"), "train": ("train",), "test": ("test",)}[split]
    for stem in stems:
        for suffix in (".csv", ".txt"):
            if (root / f"{stem}{suffix}").is_file():
                return root / f"{stem}{suffix}"
    raise BenchError(f"kinetics400: no annotations for split {split!r} in {root}\n{KINETICS_LAYOUT}")


def csv_items(path: Path, root: Path, classes: dict[str, int]) -> tuple[list[Path | None], list[int]]:
    """(clip path or None when missing, label) per row of an official Kinetics annotation CSV."""
    files = {f.stem: f for f in root.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES}
    paths, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if "label" not in row or row["label"] not in classes:
                raise BenchError(f"kinetics400: {path} row {row} has no known label (the test CSV is unlabelled)")
            stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
            paths.append(files.get(stem))
            labels.append(classes[row["label"]])
    return paths, labels


def list_items(path: Path, root: Path, classes: dict[str, int]) -> tuple[list[Path | None], list[int]]:
    """(clip path or None when missing, label) per `path label` line; the label is an index or a class name.

    Paths and class names may contain spaces: a line ends in a class index or in one of the class names.
    """
    by_length = sorted(classes, key=len, reverse=True)
    paths, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        name, _, label = line.rpartition(" ")
        if label.isdigit() and int(label) < len(classes):
            index = int(label)
        else:
            label = next((c for c in by_length if line.endswith(" " + c)), None)
            if label is None:
                raise BenchError(f"kinetics400: {path}:{number}: the line ends in neither a class index nor a class name")
            name, index = line[:-len(label) - 1], classes[label]
        file = root / name
        paths.append(file if file.is_file() else None)
        labels.append(index)
    return paths, labels


def readable(path: Path) -> bool:
    """Whether PyAV opens `path` and decodes a first video frame."""
    import av

    try:
        with av.open(str(path)) as container:
            next(container.decode(video=0))
        return True
    except (av.FFmpegError, IndexError, OSError, StopIteration):
        return False


def kinetics400(split: str, transform: Callable, root: str | None = None) -> DatasetInfo:
    if root is None or not Path(root).is_dir():
        raise BenchError(f"kinetics400: --data-root {root} is not a folder holding:\n{KINETICS_LAYOUT}")
    root_path = Path(root)
    classes = {name: i for i, name in enumerate(read_label_map(root_path))}
    annotations = annotation_file(root_path, split)
    reader = csv_items if annotations.suffix == ".csv" else list_items
    paths, labels = reader(annotations, root_path, classes)
    found = [(p, y) for p, y in zip(paths, labels) if p is not None]
    good = [(p, y) for p, y in found if readable(p)]
    if not good:
        raise BenchError(f"kinetics400: none of the {len(paths)} videos listed in {annotations} could be read")
    return DatasetInfo(VideoFiles([p for p, _ in good], [y for _, y in good], transform), "kinetics400", split,
                       num_classes=400, unreadable=len(found) - len(good), missing=len(paths) - len(found),
                       views=getattr(transform, "views", 1))
