"""HPSv2 / HPSv2.1 (Wu et al. 2023, https://github.com/tgxs002/HPSv2).

An open_clip ViT-H-14 fine-tuned on human preferences. The score is the cosine of the
L2-normalised image and text features (no logit scale; `scale=100` gives the benchmark form
reported in the HPSv2 tables). Preprocessing follows the official `preprocess_val`: RGB,
ToTensor, then on the [0, 1] tensor: longest side to 224 (torchvision bicubic, antialias), zero
padding to 224x224, OpenAI mean/std. The original resizes a float tensor too, so PIL images,
files and tensors all take this one path (`exact=True` only rounds tensors to uint8 first).

Weights: hub repo `xswu/HPSv2`, files HPS_v2_compressed.pt (v2.0) and HPS_v2.1_compressed.pt
(v2.1), a dict with the open_clip state dict under 'state_dict'. The architecture is built with
pretrained=None (no 3.9 GB LAION download) and the checkpoint loads strictly. fp32 by default:
the original runs under AMP, which makes many scores tie (tgxs002/HPSv2#26).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards.base import (
    ImageInput,
    PromptInput,
    check_batch,
    check_scores,
    clip_pad_transform,
    freeze,
    load_checkpoint,
    load_state_dict_strict,
    prepare_pixels,
    resolve_weights,
    to_tensor_transform,
)

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ARCHITECTURE = "ViT-H-14"


class HPSv2Reward(nn.Module):
    """`HPSv2Reward(clip_model, tokenizer)` wraps any open_clip CLIP; use `from_pretrained`
    (or the registry names `hpsv2`, `hpsv2.1`) to load the released weights."""

    def __init__(self, model: nn.Module, tokenizer: Any, scale: float = 1.0, name: str = "hpsv2.1"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer  # open_clip SimpleTokenizer: list[str] -> LongTensor (N, 77)
        self.scale = float(scale)
        self.name = name
        self.image_size = int(model.visual.image_size[0])
        self.transform = clip_pad_transform(self.image_size)
        self.pil_transform = to_tensor_transform(self.transform)

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        version: str = "v2.1",
        scale: float = 1.0,
        architecture: str | dict = ARCHITECTURE,
    ) -> "HPSv2Reward":
        """`path`: the .pt file or a folder holding it; default the hub repo xswu/HPSv2.
        `architecture`: an open_clip model name or config dict (tests use a small one)."""
        from diffalign.rewards.clip import build_open_clip

        if version not in CHECKPOINTS:
            raise DiffalignError(f"unknown HPS version {version!r}: use one of {', '.join(CHECKPOINTS)}")
        name = "hpsv2" if version == "v2.0" else "hpsv2.1"
        filename = CHECKPOINTS[version]
        [file] = resolve_weights(path or HUB_REPO, filename, f"or pass --reward {name}@DIR (load_reward path=)")
        checkpoint = load_checkpoint(file)
        # The released files wrap the weights in {'state_dict': ...}; a bare state dict also loads.
        state_dict = checkpoint.get("state_dict", checkpoint)
        model, tokenizer = build_open_clip(architecture)
        load_state_dict_strict(model, state_dict, str(file))
        return cls(freeze(model, device, dtype), tokenizer, scale=scale, name=name).eval()

    @classmethod
    def v2(cls, path: str | None = None, device=None, dtype=None, **opts: Any) -> "HPSv2Reward":
        return cls.from_pretrained(path, device, dtype, version="v2.0", **opts)

    @classmethod
    def v2_1(cls, path: str | None = None, device=None, dtype=None, **opts: Any) -> "HPSv2Reward":
        return cls.from_pretrained(path, device, dtype, version="v2.1", **opts)

    def score(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        """(B,) float32, differentiable w.r.t. tensor images; `exact=True` rounds tensors to
        uint8 images first, as a saved file would be."""
        prompts = check_batch(images, prompts)
        param = self.model.logit_scale
        pixels = prepare_pixels(images, self.transform, param.device, param.dtype, self.pil_transform, exact)
        tokens = self.tokenizer(prompts).to(param.device)
        image_features = self.model.encode_image(pixels, normalize=True)  # (B, D)
        text_features = self.model.encode_text(tokens, normalize=True)  # (B, D)
        cosine = (image_features.float() * text_features.float()).sum(dim=-1)
        return check_scores(self.scale * cosine, len(prompts), self.name)

    def forward(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        return self.score(images, prompts, exact=exact)
