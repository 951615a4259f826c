"""The toy world: coloured shapes drawn with PIL, and the prompts that describe them.

A *scene* is six attributes: `count` (1-3) `size` `colour` `shape`s in one `position` (a
column on the left or right, a row at the top or bottom) on a `background`, e.g.
"two small red circles on the left on a gray background". `render(scene, seed)` draws it
deterministically; the seed only jitters placement, size and shade, so many images match one
prompt. Colour, shape and background are easy for a tiny model; count, size and position are
harder, which leaves room for preference alignment.

The 1080 attribute combinations are split once, by a fixed seed, into train and held-out
prompts (`split_prompts`): every attribute value appears in both, but no held-out combination
is ever drawn for training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from itertools import product

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
POSITIONS = ("left", "right", "top", "bottom")

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
ATTRIBUTES = ("count", "size", "colour", "shape", "position", "background")
VALUES = {
    "count": COUNTS,
    "size": SIZES,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, like a photo would have
RADIUS = {"small": 3.0, "large": 5.0}  # in output pixels (half the shape's width)
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Scene:
    count: int
    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        return f"{self.noun_phrase()} {POSITION_PHRASES[self.position]} on a {self.background} background"

    def noun_phrase(self, colour_first: bool = False) -> str:
        """Count, adjectives and shape, e.g. "two small red circles" ("two red small circles" with
        colour_first); the noun agrees with the count."""
        shape = self.shape if self.count == 1 else self.shape + "s"
        adjectives = f"{self.colour} {self.size}" if colour_first else f"{self.size} {self.colour}"
        return f"{COUNT_WORDS[self.count]} {adjectives} {shape}"


def all_scenes() -> list[Scene]:
    """Every attribute combination, in a fixed order (1080 scenes)."""
    return [Scene(*combo) for combo in product(*(VALUES[a] for a in ATTRIBUTES))]


def split_prompts() -> tuple[list[Scene], list[Scene]]:
    """(train, heldout) scenes: a fixed seeded 90/10 split of all combinations."""
    scenes = all_scenes()
    order = list(range(len(scenes)))
    random.Random(SPLIT_SEED).shuffle(order)
    num_heldout = round(HELDOUT_FRACTION * len(scenes))
    heldout = sorted(order[:num_heldout])
    train = sorted(order[num_heldout:])
    return [scenes[i] for i in train], [scenes[i] for i in heldout]


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes (inverse of Scene.prompt); ValueError if it is not one."""
    lookup = {scene.prompt: scene for scene in all_scenes()}
    if prompt not in lookup:
        raise ValueError(f"not a toy-world prompt: {prompt!r}")
    return lookup[prompt]


def perturb(scene: Scene, rng: random.Random, attribute: str | None = None) -> Scene:
    """The scene with one attribute (random unless given) changed to another value: a hard
    negative whose prompt differs from the original in exactly one attribute."""
    attribute = attribute or rng.choice(ATTRIBUTES)
    current = getattr(scene, attribute)
    value = rng.choice([v for v in VALUES[attribute] if v != current])
    return replace(scene, **{attribute: value})


PARAPHRASE_REWRITES = ("adjectives", "background_first", "position_first")


def paraphrase(scene: Scene, rng: random.Random, rewrites: int = 1) -> str:
    """The scene's prompt reworded without changing its meaning: `rewrites` of three word-order
    changes, chosen at random (colour before size; the background before the position; the position
    at the front, which wins over the second when both are chosen). Only the prompt's own words are
    used, so the toy tokenizer reads every token.
    The toy analogue of a paraphrasing model (DCPO-p's DIPPER), e.g. "one small red circle on the
    left on a gray background" -> "on the left one small red circle on a gray background"."""
    chosen = rng.sample(PARAPHRASE_REWRITES, rewrites)
    noun = scene.noun_phrase(colour_first="adjectives" in chosen)
    position, background = POSITION_PHRASES[scene.position], f"on a {scene.background} background"
    if "position_first" in chosen:
        return f"{position} {noun} {background}"
    if "background_first" in chosen:
        return f"{noun} {background} {position}"
    return f"{noun} {position} {background}"


def _centres(scene: Scene, rng: random.Random) -> list[tuple[float, float]]:
    """Shape centres in output pixels: evenly spaced along a column (left/right) or a row
    (top/bottom), each jittered by up to a pixel; the line itself shifts by up to 2 px."""
    s = IMAGE_SIZE
    line = {"left": s * 0.25, "right": s * 0.75, "top": s * 0.25, "bottom": s * 0.75}[scene.position]
    line += rng.uniform(-2.0, 2.0)
    offset = rng.uniform(-1.5, 1.5) if scene.count < 3 else 0.0
    along = [s * (i + 0.5) / scene.count + offset + rng.uniform(-1.0, 1.0) for i in range(scene.count)]
    if scene.position in ("left", "right"):
        return [(line, a) for a in along]
    return [(a, line) for a in along]


def _jitter_colour(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in rgb)


def _jitter_brightness(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    # One shift for all channels: a gray background stays gray rather than turning tinted.
    delta = rng.randint(-15, 15)
    return tuple(max(0, min(255, c + delta)) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.9  # a square of the same half-width looks bigger than the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:  # triangle pointing up, centred on its bounding box
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


def render(scene: Scene, seed: int) -> Image.Image:
    """Draw `scene` as a 32x32 RGB image; the same (scene, seed) always gives the same pixels."""
    rng = random.Random(f"{scene.prompt}|{seed}")  # str seeds hash deterministically (sha512)
    k = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), _jitter_brightness(BACKGROUNDS[scene.background], rng))
    draw = ImageDraw.Draw(big)
    fill = _jitter_colour(COLOURS[scene.colour], rng)
    radius = RADIUS[scene.size] * rng.uniform(0.9, 1.1)
    for cx, cy in _centres(scene, rng):
        _draw_shape(draw, scene.shape, cx * k, cy * k, radius * k, fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def make_grid(images: list[Image.Image], columns: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile images (all the same size) into a grid, row by row, with a white gutter."""
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, image in enumerate(images):
        image = image.convert("RGB").resize((w, h), Image.NEAREST)
        grid.paste(image, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return grid
