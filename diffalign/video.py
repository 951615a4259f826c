"""Video preference data: reading videos, sampling frames, one crop/flip per group, the CSV schema.

diffalign.data reads a dataset's groups; with `num_frames` set (`--num-frames`) each entry of a
group is a video, and `load_video_group` turns the group into

    {"pixels": (K, F, 3, R, R) in [-1, 1], "prompt", "captions" (K), "scores" (K,)}

so a batch holds pixels (B, K, F, 3, R, R), what a video family's `encode_images` takes
after the (B, K) dims are flattened (docs/datasets.md, "Video data").

Sources:
- VideoAlign's CSV (`--dataset pairs.csv`): path_A, path_B, prompt, VQ, MQ, TA in {A, B, same},
  optional fps_A, num_frames_A, fps_B, num_frames_B (the videos' metadata: fps_X is the frame
  rate of a frame folder, which has none of its own; a file's decoder decides its own rate and
  length), optional reward_A, reward_B (per-video rewards, e.g. for flow-rwr: they replace the
  label scores). Paths are relative to the CSV. `--video-label` picks the winner: one
  dimension (VQ, MQ or TA), or "overall", the side that wins more of the three (a "same"
  votes for neither; equal counts are a tie). Scores: winner 1, loser 0, a tie 0.5 each, so
  pairwise objectives drop ties as for images.
- JSONL pairs / ranked lists (diffalign.data) whose paths are video files or frame folders.

Frames: every video of a group is sampled at the same times, t_i = i / fps for i < num_frames
(fps None: consecutive frames, t_i = i / the video's rate), frame index round(t_i * rate)
from the start. A video shorter than that span is skipped and counted ("too short"), as are
missing and corrupt files (diffalign.data.SkipCounter: a warning with the running counts).
Each frame then goes through the image path's resize / crop / flip with the group's one
`Augment` draw, so all frames of all K videos share one crop position and one flip.

Files decode with PyAV through the opener the VideoReward reward uses
(`diffalign.rewards.videoreward.video_stream`), frame folders read their images in name order.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

from diffalign.errors import DiffalignError

LABEL_DIMENSIONS = ("VQ", "MQ", "TA")
LABELS = ("overall", *LABEL_DIMENSIONS)
CSV_REQUIRED = ("path_A", "path_B", "prompt")


# ----------------------------------------------------------------------------------------------
# Frames


def frame_indices(num_frames: int, fps: float | None, video_fps: float | None) -> list[int]:
    """The frame indices sampled from a video of rate `video_fps`: t_i = i / fps, index
    round(t_i * video_fps); consecutive frames when fps (or the video's rate) is None."""
    if fps is None or video_fps is None:
        return list(range(num_frames))
    return [int(math.floor(i * video_fps / fps + 0.5)) for i in range(num_frames)]


def read_frames(ref: Any, base_dir: Path | None, num_frames: int, fps: float | None) -> list:
    """The sampled frames of one video (a file or a frame folder; `ref` a path or a dict
    {"path", "fps"}) as RGB PIL images. Raises diffalign.data._BadImage ("missing", "corrupt",
    "short") for a video to skip."""
    from diffalign.data import _BadImage

    folder_fps = None
    if isinstance(ref, dict):
        ref, folder_fps = ref.get("path"), ref.get("fps")
    if not isinstance(ref, (str, Path)) or not str(ref):
        raise _BadImage("missing", "no video path")
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_dir():
        return _folder_frames(path, num_frames, fps, folder_fps)
    if not path.is_file():
        raise _BadImage("missing", f"no file {path}")
    return _file_frames(path, num_frames, fps)


def _file_frames(path: Path, num_frames: int, fps: float | None) -> list:
    from diffalign.data import _BadImage
    from diffalign.rewards.videoreward import video_stream

    frames: dict[int, Any] = {}
    try:
        with video_stream(path) as stream:
            rate = stream.average_rate or stream.guessed_rate
            wanted = frame_indices(num_frames, fps, float(rate) if rate else None)
            if fps is not None and not rate:
                raise _BadImage("corrupt", f"{path} has no frame rate to sample at {fps} fps")
            last, want = wanted[-1], set(wanted)
            for i, frame in enumerate(stream.container.decode(stream)):
                if i in want:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= last:
                    break
    except _BadImage:
        raise
    except DiffalignError as err:
        raise _BadImage("corrupt", str(err)) from None
    if len(frames) < len(set(wanted)):
        raise _BadImage("short", f"{path} has {len(frames)} of the frames up to index {last} ({num_frames} frames"
                                 f"{'' if fps is None else f' at {fps:g} fps'})")
    return [frames[i] for i in wanted]


def _folder_frames(folder: Path, num_frames: int, fps: float | None, folder_fps: float | None) -> list:
    from diffalign.data import _BadImage, _open_image
    from diffalign.rewards.videoreward import frame_files

    try:
        files = frame_files(folder)
    except DiffalignError as err:
        raise _BadImage("corrupt", str(err)) from None
    wanted = frame_indices(num_frames, fps, folder_fps)
    if wanted[-1] >= len(files):
        raise _BadImage("short", f"{folder} has {len(files)} frames, {wanted[-1] + 1} needed")
    return [_open_image(files[i], None) for i in wanted]


def load_video_group(group, order: list[int], cfg, aug) -> dict:
    """diffalign.data.load_group for videos: (K, F, 3, R, R) pixels, one Augment for every
    frame of every video; aug None = decode only (to skip)."""
    from diffalign.data import _BadImage, group_sample, transform_image

    videos = []
    for i in order:
        try:
            frames = read_frames(group.images[i], group.base_dir, cfg.num_frames, cfg.fps)
        except _BadImage as err:
            err.args = (f"{group.where}, video {i}: {err}",)
            raise
        if aug is not None:
            videos.append(torch.stack([transform_image(f, cfg.resolution, aug) for f in frames]))
    return group_sample(group, order, videos) if aug is not None else {}


# ----------------------------------------------------------------------------------------------
# VideoAlign's CSV


def label_scores(row: dict, label: str, where: str) -> list[float]:
    """(score_A, score_B) from the row's VQ/MQ/TA votes: 1/0, 0/1, or 0.5/0.5 for a tie."""
    dims = LABEL_DIMENSIONS if label == "overall" else (label,)
    votes = []
    for dim in dims:
        value = str(row.get(dim) or "").strip()
        if value not in ("A", "B", "same"):
            raise DiffalignError(f"{where}: {dim} is {value!r}, not A, B or same: fix the row, or choose another "
                                 "--video-label")
        votes.append(value)
    a, b = votes.count("A"), votes.count("B")
    return [1.0, 0.0] if a > b else [0.0, 1.0] if b > a else [0.5, 0.5]


def _number(row: dict, key: str, where: str) -> float | None:
    value = (row.get(key) or "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise DiffalignError(f"{where}: {key} is {value!r}, not a number: fix the row") from None
    if not math.isfinite(number):
        raise DiffalignError(f"{where}: {key} is {value!r}: give a finite number")
    return number


def read_csv_groups(path: str | Path, label: str = "overall") -> list:
    """The rows of a VideoAlign CSV as diffalign.data._Group (video A first), scores by `label`."""
    from diffalign.data import _Group

    if label not in LABELS:
        raise DiffalignError(f"--video-label {label!r} is not valid: choose one of {', '.join(LABELS)}")
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        needed = list(CSV_REQUIRED) + list(LABEL_DIMENSIONS if label == "overall" else (label,))
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DiffalignError(f"{path} lacks column(s) {', '.join(missing)}: VideoAlign's CSV schema is path_A, path_B, "
                                 "prompt, VQ, MQ, TA (A | B | same), fps_A, num_frames_A, fps_B, num_frames_B")
        rewards = "reward_A" in columns and "reward_B" in columns
        groups = []
        for number, row in enumerate(reader, 2):  # line 1 is the header
            where = f"line {number} of {path}"
            if rewards:
                scores = [_number(row, "reward_A", where), _number(row, "reward_B", where)]
                if None in scores:
                    raise DiffalignError(f"{where}: reward_A/reward_B is empty: give every video a reward, or drop the columns")
            else:
                scores = label_scores(row, label, where)
            refs = [{"path": (row.get(f"path_{s}") or "").strip(), "fps": _number(row, f"fps_{s}", where)} for s in "AB"]
            prompt = row.get("prompt") or ""
            groups.append(_Group(prompt, refs, [prompt, prompt], scores, where, path.parent))
    return groups


def csv_dataset(cfg, pairwise: bool, drop_ties: bool):
    """A map-style diffalign.data.GroupDataset over a VideoAlign CSV."""
    from diffalign.data import groups_dataset

    if cfg.streaming:
        raise DiffalignError("a video CSV is read whole (it holds paths, not videos): unset --streaming")
    return groups_dataset(read_csv_groups(cfg.dataset, cfg.video_label), cfg, pairwise, drop_ties)


# ----------------------------------------------------------------------------------------------
# Writing


def write_video(path: str | Path, frames, fps: float = 8.0, codec: str = "mpeg4") -> Path:
    """Write frames (T, H, W, 3) uint8, or (T, 3, H, W) float in [0, 1] (what a video family's
    `generate` returns per video), as a video file with PyAV. H and W are padded to even sizes
    for yuv420p by repeating the last row / column. mpeg4 (PyAV's bundled FFmpeg always has it)
    keeps the test and toy files small; pass codec="libx264" where it is built in."""
    import numpy as np

    from diffalign.rewards.videoreward import _import_av

    av = _import_av()
    if torch.is_tensor(frames):
        frames = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise DiffalignError(f"frames of shape {frames.shape}: pass (T, H, W, 3) uint8 or (T, 3, H, W) floats in [0, 1]")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from fractions import Fraction

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
