"""The toy video world: the toy shapes of render.py, moving.

A *video scene* is the toy scene's count, size, colour, shape and background plus a
`direction` (left, right, up, down) and a `speed` (slowly: 1 px a frame, quickly: 2 px a frame),
e.g. "two small red circles moving left slowly on a gray background". The shapes stand in a
column when they move sideways and in a row when they move up or down (the image world's
left/right columns and top/bottom rows), and the line travels through the middle of the frame:
a video moving left starts right of centre and ends left of it.

`render_video(scene, seed)` draws NUM_FRAMES frames of 32x32 px, deterministically; the seed
jitters what `render.render` jitters (placement, size, shade, background brightness) once per
video, and where along the path the line starts (up to 1.5 px). NUM_FRAMES is 9, not 8: Wan's
causal VAE encodes 1 + k * (temporal factor) frames (the first frame alone, then groups), so
WanPipeline rounds any other count to that form; 9 frames are 5 latent frames at factor 2.

The prompt grammar (directions, speeds, parsing) lives in `diffalign.rewards.toy_video`, which
the toy video rewards need without this tools/ folder; everything here builds on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffalign.rewards.toy_video import DIRECTIONS, SPEEDS, frame_prompts
from tools.toy.render import (
    BACKGROUNDS, COLOURS, COUNT_WORDS, COUNTS, IMAGE_SIZE, RADIUS, SHAPES, SIZES, SUPERSAMPLE,
    _draw_shape, _jitter_brightness, _jitter_colour,
)

NUM_FRAMES = 9
FPS = 8
ATTRIBUTES = ("count", "size", "colour", "shape", "direction", "speed", "background")
VALUES = {
    "count": COUNTS,
    "size": SIZES,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "direction": tuple(DIRECTIONS),
    "speed": tuple(SPEEDS),
    "background": tuple(BACKGROUNDS),
}
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 4321


@dataclass(frozen=True)
class VideoScene:
    count: int
    size: str
    colour: str
    shape: str
    direction: str
    speed: str
    background: str

    @property
    def noun_phrase(self) -> str:
        shape = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {shape}"

    @property
    def prompt(self) -> str:
        return f"{self.noun_phrase} moving {self.direction} {self.speed} on a {self.background} background"

    def frame_prompts(self) -> list[str]:
        """The two image-world prompts a frame of this video can match (the line's two ends)."""
        return frame_prompts(self.prompt)


def all_video_scenes() -> list[VideoScene]:
    """Every combination, in a fixed order (3*2*5*3*4*2*3 = 2160 scenes)."""
    return [VideoScene(*combo) for combo in product(*(VALUES[a] for a in ATTRIBUTES))]


def split_video_prompts() -> tuple[list[VideoScene], list[VideoScene]]:
    """(train, heldout): a fixed seeded 90/10 split of all combinations."""
    scenes = all_video_scenes()
    order = list(range(len(scenes)))
    random.Random(SPLIT_SEED).shuffle(order)
    num_heldout = round(HELDOUT_FRACTION * len(scenes))
    return [scenes[i] for i in sorted(order[num_heldout:])], [scenes[i] for i in sorted(order[:num_heldout])]


def parse_video_prompt(prompt: str) -> VideoScene:
    lookup = {scene.prompt: scene for scene in all_video_scenes()}
    if prompt not in lookup:
        raise ValueError(f"not a toy video prompt: {prompt!r}")
    return lookup[prompt]


def perturb_video(scene: VideoScene, rng: random.Random, attribute: str | None = None) -> VideoScene:
    """The scene with one attribute (random unless given) changed."""
    attribute = attribute or rng.choice(ATTRIBUTES)
    value = rng.choice([v for v in VALUES[attribute] if v != getattr(scene, attribute)])
    return replace(scene, **{attribute: value})


def centre_path(scene: VideoScene, rng: random.Random, num_frames: int) -> list[list[tuple[float, float]]]:
    """Shape centres (output pixels) for every frame: a column (sideways motion) or a row
    (up/down) of `count` shapes whose line moves `speed` px a frame through the frame's centre."""
    s = IMAGE_SIZE
    dx, dy = DIRECTIONS[scene.direction]
    travel = SPEEDS[scene.speed] * (num_frames - 1)
    start = s / 2 - travel / 2 + rng.uniform(-1.5, 1.5)  # along the motion, in the direction's sign
    offset = rng.uniform(-1.5, 1.5) if scene.count < 3 else 0.0
    along = [s * (i + 0.5) / scene.count + offset + rng.uniform(-1.0, 1.0) for i in range(scene.count)]
    frames = []
    for f in range(num_frames):
        progress = start + SPEEDS[scene.speed] * f  # distance travelled from the back edge
        if dx:
            x = progress if dx > 0 else s - progress
            frames.append([(x, a) for a in along])
        else:
            y = progress if dy > 0 else s - progress
            frames.append([(a, y) for a in along])
    return frames


def render_video(scene: VideoScene, seed: int, num_frames: int = NUM_FRAMES) -> list[Image.Image]:
    """`num_frames` 32x32 RGB frames of `scene`; the same (scene, seed) always gives the same pixels."""
    rng = random.Random(f"{scene.prompt}|{seed}")
    k = SUPERSAMPLE
    background = _jitter_brightness(BACKGROUNDS[scene.background], rng)
    fill = _jitter_colour(COLOURS[scene.colour], rng)
    radius = RADIUS[scene.size] * rng.uniform(0.9, 1.1)
    frames = []
    for centres in centre_path(scene, rng, num_frames):
        big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), background)
        draw = ImageDraw.Draw(big)
        for cx, cy in centres:
            _draw_shape(draw, scene.shape, cx * k, cy * k, radius * k, fill)
        frames.append(big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
    return frames


def video_array(scene: VideoScene, seed: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """uint8 (F, H, W, 3)."""
    return np.stack([np.asarray(frame) for frame in render_video(scene, seed, num_frames)])


def video_tensor(scene: VideoScene, seed: int, num_frames: int = NUM_FRAMES):
    """float (F, 3, H, W) in [0, 1], the layout rewards take."""
    import torch

    return torch.from_numpy(video_array(scene, seed, num_frames)).permute(0, 3, 1, 2).float() / 255.0


def video_bank(scenes: list[VideoScene], renders_per_scene: int, seed_offset: int):
    """uint8 (S, R, F, 3, H, W): R seeded videos of each scene (seed = offset + r)."""
    import torch

    bank = np.stack([np.stack([video_array(s, seed_offset + r) for r in range(renders_per_scene)]) for s in scenes])
    return torch.from_numpy(bank).permute(0, 1, 2, 5, 3, 4).contiguous()


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = FPS, crf: int = 12) -> Path:
    """Write uint8 (F, H, W, 3) frames as an H.264 mp4 (yuv420p, what every player reads)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryslow"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(frames: np.ndarray, path: str | Path, fps: int = FPS) -> Path:
    """uint8 (F, H, W, 3) frames as a looping GIF."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path
