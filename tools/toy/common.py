"""Helpers shared by the toy asset builders: rendered image banks, tokenising, saving small."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tools.toy.render import Scene, render

# Render seeds are drawn from disjoint ranges so no builder trains on another's images and
# the held-out evaluation images are never trained on.
SEEDS_REWARD = 0
SEEDS_JUDGE = 1_000_000
SEEDS_GENERATOR = 2_000_000
SEEDS_EVAL = 9_000_000


def render_bank(scenes: list[Scene], renders_per_scene: int, seed_offset: int) -> torch.Tensor:
    """uint8 (S, R, 3, 32, 32): R seeded renders of each scene (seed = offset + r)."""
    import numpy as np

    bank = np.stack([
        np.stack([np.asarray(render(scene, seed_offset + r)) for r in range(renders_per_scene)])
        for scene in scenes
    ])  # (S, R, H, W, 3)
    return torch.from_numpy(bank).permute(0, 1, 4, 2, 3).contiguous()


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float in [0, 1]."""
    return images_uint8.float() / 255.0


def tokenize(tokenizer, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pad to a fixed short length: toy prompts are at most 14 tokens, and CLIP's causal
    attention makes tokens after <|endoftext|> irrelevant, so this matches padding to 77."""
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def save_transformers_fp16(model, out_dir: str | Path) -> None:
    """Save a transformers model with fp16 weights (half the disk) that still loads as fp32.

    transformers 5 loads in the dtype written in config.json by default, and CPU users want
    fp32, so the config records float32 and the fp16 tensors are upcast on load.
    """
    model.to(torch.float16).save_pretrained(out_dir)
    model.to(torch.float32)
    config_path = Path(out_dir) / "config.json"
    config = json.loads(config_path.read_text())
    _set_dtype(config, "float32")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _set_dtype(config: dict, dtype: str) -> None:
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    for value in config.values():
        if isinstance(value, dict):
            _set_dtype(value, dtype)


def save_diffusers_fp16(model, out_dir: str | Path) -> None:
    """diffusers loads in fp32 unless told otherwise, so fp16 weights on disk are enough."""
    model.to(torch.float16).save_pretrained(out_dir)
    model.to(torch.float32)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
