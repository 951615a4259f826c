"""Tiny reward backbones with the original key layouts, saved in the original file layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

# open_clip CLIP with HPSv2's key naming (ViT-H-14 scaled down); 224 px so the real
# preprocessing sizes are exercised, patch 32 so the vision tower stays tiny.
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_hf_clip_config():
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=49408, max_position_embeddings=77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=32)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="session")
def hps_checkpoint(tmp_path_factory):
    """HPS_v2.1_compressed.pt with random weights: {'state_dict': open_clip state dict}."""
    from diffalign.rewards.clip import build_open_clip

    torch.manual_seed(0)
    model, _ = build_open_clip(TINY_OPEN_CLIP)
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2_compressed.pt")
    return folder


@pytest.fixture(scope="session")
def hf_clip_folder(tmp_path_factory):
    """A PickScore_v1-style folder: CLIPModel weights + CLIP processor files (offline tokenizer)."""
    from transformers import CLIPImageProcessor, CLIPModel

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    model = CLIPModel(tiny_hf_clip_config()).eval()
    folder = tmp_path_factory.mktemp("pickscore")
    model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    # CLIP-H's processor settings: shortest edge 224, centre crop 224, bicubic, OpenAI mean/std.
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def random_pil(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random image (smooth so resize methods agree closely, as on real photos)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
