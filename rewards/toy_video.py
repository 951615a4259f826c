"""toy-video-reward and toy-video-judge: rewards for the toy video world (tools/toy/video.py).

A toy video prompt names shapes, a motion and a background, e.g. "two small red circles moving
left slowly on a gray background". Both rewards return VideoReward's three dimensions
(`score_dimensions`: VQ, MQ, TA and Overall = VQ + MQ + TA; `score` is Overall), each a toy
stand-in for VideoAlign's rubric:

- VQ, the picture: the image-world CLIP reward on every frame (toy-reward for the reward,
  toy-judge for the judge) against the frame prompts, the prompt's shapes and background at
  either end of the motion ("two small red circles on the left / on the right on a gray
  background"), the better of the two per frame, averaged over frames.
- TA, the motion the prompt names: the shapes' displacement along the named direction over the
  clip, in pixels of a 32 px frame, times TA_WEIGHT. Positive when they move the named way,
  negative when they move the other way, zero when nothing moves.
- MQ, the quality of the motion: minus MQ_WEIGHT times (how far the speed along the direction
  is from the named one, in px a frame + the drift across it + the flicker of the shapes' mass).

The two measure motion differently, so the judge is not the reward's own motion term:
- the reward follows the foreground centroid: a soft mask of the pixels away from the
  background colour (the median of the frame's border), its centre of mass per frame, and the
  least-squares line through those centres (slope = velocity);
- the judge estimates a global optical flow between consecutive frames (Lucas-Kanade over the
  whole frame, on the blurred distance from the background), the mean over frame pairs.

Inputs: (B, F, 3, H, W) tensors in [0, 1] (differentiable), or lists of (F, 3, H, W) tensors,
video files (mp4, GIF, ... decoded with PyAV, every frame) and frame folders, as videoreward
reads them. Files are scored as their 8-bit frames, the same as `exact=True` on a tensor.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards import base

DIMENSIONS = ("VQ", "MQ", "TA")
# unit vectors in image coordinates (x right, y down)
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slowly": 1.0, "quickly": 2.0}  # px a frame at 32 px
# the image world's positions at the two ends of each motion, and their phrases
AXIS_POSITIONS = {"left": ("left", "right"), "right": ("left", "right"), "up": ("top", "bottom"), "down": ("top", "bottom")}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
PROMPT = re.compile(r"^(?P<noun>.+?) moving (?P<direction>left|right|up|down)(?: (?P<speed>slowly|quickly))?"
                    r" on an? (?P<background>\w+) background$")
REFERENCE_SIZE = 32  # displacements are reported in pixels of a 32 px frame
TA_WEIGHT = 0.5
MQ_WEIGHT = 2.0


def parse_prompt(prompt: str) -> dict[str, Any]:
    """noun, direction, speed (None when the prompt names none) and background of a toy video prompt."""
    match = PROMPT.match(prompt.strip())
    if match is None:
        raise DiffalignError(f"{prompt!r} is not a toy video prompt: toy video rewards read prompts like "
                             "'one small red circle moving left slowly on a gray background'")
    return match.groupdict()


def frame_prompts(prompt: str) -> list[str]:
    """The image-world prompts of a frame: the video's shapes and background at each end of its motion."""
    p = parse_prompt(prompt)
    return [f"{p['noun']} {POSITION_PHRASES[pos]} on a {p['background']} background" for pos in AXIS_POSITIONS[p["direction"]]]


def background_distance(videos: Tensor) -> Tensor:
    """(B, F, H, W): each pixel's L1 colour distance from its frame's background, the median
    colour of the frame's one-pixel border."""
    border = torch.cat([videos[..., 0, :], videos[..., -1, :], videos[..., 1:-1, 0], videos[..., 1:-1, -1]], dim=-1)
    background = border.median(dim=-1).values  # (B, F, 3)
    return (videos - background[..., None, None]).abs().sum(dim=2)


def centroid_motion(videos: Tensor) -> tuple[Tensor, Tensor]:
    """The reward's motion estimate: (velocity (B, 2) in px a frame, flicker (B,)). A soft
    foreground mask, its centre of mass per frame, the least-squares slope of the centres."""
    b, f, _, h, w = videos.shape
    mask = torch.sigmoid((background_distance(videos) - 0.15) / 0.03)  # (B, F, H, W)
    ys = torch.arange(h, dtype=videos.dtype, device=videos.device) * (REFERENCE_SIZE / h)
    xs = torch.arange(w, dtype=videos.dtype, device=videos.device) * (REFERENCE_SIZE / w)
    mass = mask.sum(dim=(-2, -1)) + 1e-6  # (B, F)
    cx = (mask.sum(dim=-2) * xs).sum(-1) / mass
    cy = (mask.sum(dim=-1) * ys).sum(-1) / mass
    t = torch.arange(f, dtype=videos.dtype, device=videos.device)
    t = t - t.mean()
    denom = (t * t).sum().clamp_min(1e-6)
    velocity = torch.stack([(cx * t).sum(-1) / denom, (cy * t).sum(-1) / denom], dim=-1)
    flicker = mass.std(dim=1, unbiased=False) / mass.mean(dim=1) if f > 1 else torch.zeros(b, device=videos.device)
    return velocity, flicker


def flow_motion(videos: Tensor) -> tuple[Tensor, Tensor]:
    """The judge's motion estimate: (velocity (B, 2) in px a frame, flicker (B,)). One global
    Lucas-Kanade flow per pair of consecutive frames on the blurred background distance, averaged."""
    b, f, _, h, w = videos.shape
    g = background_distance(videos)
    g = F.avg_pool2d(g.reshape(b * f, 1, h, w), 3, stride=1, padding=1, count_include_pad=False).reshape(b, f, h, w)
    if f < 2:
        return torch.zeros(b, 2, device=videos.device), torch.zeros(b, device=videos.device)
    mid = (g[:, 1:] + g[:, :-1]) / 2
    it = g[:, 1:] - g[:, :-1]
    ix = torch.zeros_like(mid)
    iy = torch.zeros_like(mid)
    ix[..., 1:-1] = (mid[..., 2:] - mid[..., :-2]) / 2
    iy[..., 1:-1, :] = (mid[..., 2:, :] - mid[..., :-2, :]) / 2
    sxx, syy, sxy = (ix * ix).sum((-2, -1)), (iy * iy).sum((-2, -1)), (ix * iy).sum((-2, -1))
    sxt, syt = (ix * it).sum((-2, -1)), (iy * it).sum((-2, -1))
    det = (sxx * syy - sxy * sxy).clamp_min(1e-6)
    vx = (-syy * sxt + sxy * syt) / det
    vy = (sxy * sxt - sxx * syt) / det
    velocity = torch.stack([vx.mean(1) * (REFERENCE_SIZE / w), vy.mean(1) * (REFERENCE_SIZE / h)], dim=-1)
    level = g.mean(dim=(-2, -1)) + 1e-6  # (B, F)
    flicker = level.std(dim=1, unbiased=False) / level.mean(dim=1)
    return velocity, flicker


MOTION = {"centroid": centroid_motion, "flow": flow_motion}


class ToyVideoReward(nn.Module):
    """A toy video reward: an image-world CLIP reward per frame plus a motion measurement."""

    def __init__(self, frame_reward: nn.Module, motion: str, name: str):
        super().__init__()
        if motion not in MOTION:
            raise DiffalignError(f"unknown motion measure {motion!r}: use {' or '.join(MOTION)}")
        self.frame_reward = frame_reward
        self.motion = motion
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | None = None, device=None, dtype: torch.dtype | None = None, *,
                        frame_reward: str = "toy-reward", motion: str = "centroid", name: str = "toy-video-reward",
                        **opts: Any) -> "ToyVideoReward":
        """`path`: the frame reward's folder (default the shipped toy-reward / toy-judge)."""
        from diffalign.rewards.toy import toy_judge, toy_reward

        builders = {"toy-reward": toy_reward, "toy-judge": toy_judge}
        if frame_reward not in builders:
            raise DiffalignError(f"unknown frame reward {frame_reward!r}: use toy-reward or toy-judge")
        return cls(builders[frame_reward](path, device, dtype, **opts), motion, name).eval().requires_grad_(False)

    def score(self, videos: Any, prompts: base.PromptInput, *, exact: bool = False) -> Tensor:
        return self.score_dimensions(videos, prompts, exact=exact)["Overall"]

    def forward(self, videos: Any, prompts: base.PromptInput, *, exact: bool = False) -> Tensor:
        return self.score(videos, prompts, exact=exact)

    def score_dimensions(self, videos: Any, prompts: base.PromptInput, *, exact: bool = False) -> dict[str, Tensor]:
        """{"VQ", "MQ", "TA", "Overall"}: (B,) float32 each."""
        clips = self._clips(videos)
        prompts = base.check_prompts(prompts, len(clips))
        parsed = [parse_prompt(p) for p in prompts]  # every prompt checked before any model runs
        if isinstance(clips, Tensor):
            parts = self._dimensions(clips, prompts, parsed, exact)
        else:  # clips of different sizes or lengths: one at a time
            each = [self._dimensions(clip[None], [p], [q], exact or from_file)
                    for (clip, from_file), p, q in zip(clips, prompts, parsed)]
            parts = {dim: torch.cat([e[dim] for e in each]) for dim in DIMENSIONS}
        out = {dim: base.check_scores(parts[dim], len(prompts), self.name) for dim in DIMENSIONS}
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out

    def _dimensions(self, videos: Tensor, prompts: list[str], parsed: list[dict], exact: bool) -> dict[str, Tensor]:
        b, f = videos.shape[:2]
        if exact:  # the 8-bit frames a saved video holds
            videos = (videos.detach().clamp(0, 1) * 255).round() / 255
        frames = videos.flatten(0, 1)
        per_frame = []
        for end in range(2):
            frame_text = [frame_prompts(p)[end] for p in prompts for _ in range(f)]
            per_frame.append(self.frame_reward.score(frames, frame_text, exact=exact).view(b, f))
        vq = torch.maximum(*per_frame).mean(dim=1)
        velocity, flicker = MOTION[self.motion](videos.float())
        direction = torch.tensor([DIRECTIONS[q["direction"]] for q in parsed], dtype=velocity.dtype, device=velocity.device)
        along = (velocity * direction).sum(-1)
        across = (velocity * direction.flip(-1)).sum(-1).abs()
        named = torch.tensor([SPEEDS[q["speed"]] if q["speed"] else float("nan") for q in parsed], device=velocity.device)
        speed_error = torch.where(named.isnan(), torch.zeros_like(along), (along - named.nan_to_num()).abs())
        ta = TA_WEIGHT * along * (f - 1)
        mq = -MQ_WEIGHT * (speed_error + across + flicker)
        return {"VQ": vq.float(), "MQ": mq.float(), "TA": ta.float()}

    def _clips(self, videos: Any) -> Tensor | list[tuple[Tensor, bool]]:
        """A checked (B, F, 3, H, W) tensor, or [(clip (F, 3, H, W), read from a file)]."""
        if isinstance(videos, Tensor):
            return base.check_image_tensor(videos, video=True)
        if isinstance(videos, (str, os.PathLike)) or not isinstance(videos, (list, tuple)) or not videos:
            raise DiffalignError(f"{self.name} takes a (B, F, 3, H, W) tensor or a non-empty list of (F, 3, H, W) "
                                 "tensors, video files and frame folders")
        clips = []
        for clip in videos:
            if isinstance(clip, Tensor):
                clips.append((base.check_image_tensor(clip[None], video=True)[0], False))
            elif isinstance(clip, (str, os.PathLike)):
                clips.append((read_video_frames(clip), True))
            else:
                raise DiffalignError(f"cannot score a video of type {type(clip).__name__}: pass (F, 3, H, W) tensors, "
                                     "video files or frame folders")
        return clips


def read_video_frames(path: str | os.PathLike) -> Tensor:
    """Every frame of a video file (PyAV) or a frame folder (image files sorted by name), as
    float (F, 3, H, W) in [0, 1]."""
    import numpy as np

    from diffalign.rewards.videoreward import decode_video, frame_files

    path = Path(path).expanduser()
    if path.is_dir():
        frames = [base.pil_to_tensor(base.load_pil(file).convert("RGB")) for file in frame_files(path)]
        if len({tuple(f.shape) for f in frames}) != 1:
            raise DiffalignError(f"frames in {str(path)!r} differ in size: every frame of a video needs the same size")
        return torch.stack(frames)
    if not path.is_file():
        raise DiffalignError(f"video {str(path)!r} not found: check the path")
    decoded, _ = decode_video(path)
    array = np.stack([frame.to_ndarray(format="rgb24") for frame in decoded])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


def toy_video_reward(path: str | None = None, device=None, dtype: torch.dtype | None = None, **opts: Any) -> ToyVideoReward:
    """toy-reward on every frame, motion by the foreground centroid: for labels and training."""
    return ToyVideoReward.from_pretrained(path, device, dtype, frame_reward="toy-reward", motion="centroid",
                                          name="toy-video-reward", **opts)


def toy_video_judge(path: str | None = None, device=None, dtype: torch.dtype | None = None, **opts: Any) -> ToyVideoReward:
    """toy-judge on every frame, motion by global optical flow: for evaluation only."""
    return ToyVideoReward.from_pretrained(path, device, dtype, frame_reward="toy-judge", motion="flow",
                                          name="toy-video-judge", **opts)
