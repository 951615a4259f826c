"""Score what a diffusers pipeline generates; best-of-N sampling.

Any pipeline that returns `images` (or video `frames`) with `output_type="pt"` works: the
tensors are already in [0, 1], so they go to `reward.score` without a PIL round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffalign.errors import DiffalignError


def output_pixels(output: Any) -> Tensor:
    """`pipe(..., output_type="pt")` output -> (B, 3, H, W) or (B, T, 3, H, W) float in [0, 1]."""
    pixels = output["images"] if "images" in output else output["frames"]
    if not isinstance(pixels, Tensor):
        raise DiffalignError("the pipeline returned PIL/numpy images: call it with output_type='pt'")
    return pixels


def generate_and_score(pipe: Any, prompt: str | list[str], reward: Any, **pipe_kwargs: Any) -> tuple[Tensor, Tensor]:
    """Run `pipe(prompt, output_type="pt", **pipe_kwargs)`; return (images, scores (B,))."""
    from diffalign.rewards import as_reward

    reward = as_reward(reward)
    pixels = output_pixels(pipe(prompt, output_type="pt", **pipe_kwargs))
    prompts = [prompt] * pixels.shape[0] if isinstance(prompt, str) else _repeat(prompt, pixels.shape[0])
    with torch.no_grad():
        return pixels, reward.score(pixels, prompts)


def _repeat(prompts: list[str], batch: int) -> list[str]:
    # diffusers orders num_images_per_prompt copies next to their prompt.
    return [p for p in prompts for _ in range(batch // len(prompts))]


@dataclass
class BestOfN:
    image: Tensor  # (3, H, W) or (T, 3, H, W) in [0, 1]
    score: float
    index: int
    seed: int  # regenerate this candidate alone with generator=torch.Generator().manual_seed(seed)
    scores: Tensor  # (n,) every candidate's score
    images: Tensor | None = None  # (n, ...) all candidates when keep_all=True


def best_of_n(pipe: Any, prompt: str, reward: Any, n: int, seed: int = 0, batch_size: int | None = None,
              keep_all: bool = False, **pipe_kwargs: Any) -> BestOfN:
    """Generate `n` candidates for one prompt (candidate i from seed + i) and keep the best."""
    from tqdm.auto import tqdm

    from diffalign.rewards import as_reward

    if n < 1:
        raise DiffalignError(f"best_of_n needs n >= 1, got {n}")
    if not isinstance(prompt, str):
        raise DiffalignError("best_of_n takes one prompt (a str): loop over prompts for several")
    reward = as_reward(reward)
    batch_size = batch_size or n
    kept, scores = [], []
    best_score, best_image = float("-inf"), None
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="best-of-n", disable=len(starts) < 2):
        count = min(batch_size, n - start)
        # One CPU generator per candidate: candidate i is reproducible on its own, on any device.
        generators = [torch.Generator("cpu").manual_seed(seed + start + j) for j in range(count)]
        batch, batch_scores = generate_and_score(pipe, prompt, reward, num_images_per_prompt=count,
                                                 generator=generators, **pipe_kwargs)
        scores.append(batch_scores.cpu())
        if keep_all:
            kept.append(batch.cpu())
        i = int(batch_scores.argmax())
        if float(batch_scores[i]) > best_score:  # strict: ties keep the earliest, like argmax
            best_score, best_image = float(batch_scores[i]), batch[i].cpu()
    all_scores = torch.cat(scores)
    index = int(all_scores.argmax())
    return BestOfN(image=best_image, score=best_score, index=index, seed=seed + index,
                   scores=all_scores, images=torch.cat(kept) if keep_all else None)
