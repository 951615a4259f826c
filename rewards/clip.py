"""CLIP score (Hessel et al. 2021, https://arxiv.org/abs/2104.08718; torchmetrics' form):
100 x cosine(image, text), clamped at 0.

Two backends over the same formula:
- transformers `CLIPModel` (default; hub id `openai/clip-vit-large-patch14`, torchmetrics'
  default): a folder or hub id with config.json + weights and the tokenizer files;
- open_clip (`architecture="ViT-B-32"` etc.): built with pretrained=None and a checkpoint file
  (flat state dict, or one under 'state_dict') loaded strictly.
PIL images and files go through each backend's own preprocessing: the processor's PIL image
processor (transformers), or open_clip's `image_transform` (PIL bicubic resize, centre crop,
OpenAI mean/std). Tensors take the same steps in torch (bicubic with antialias), differentiable;
`exact=True` sends them through the PIL path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInput,
    PromptInput,
    check_batch,
    check_scores,
    clip_crop_transform,
    freeze,
    load_checkpoint,
    load_state_dict_strict,
    prepare_pixels,
    resolve_weights,
)

HUB_REPO = "openai/clip-vit-large-patch14"


def build_open_clip(architecture: str | dict) -> tuple[nn.Module, Any]:
    """An open_clip model with random weights (never a pretrained download) and its tokenizer.

    `architecture` is an open_clip model name ("ViT-H-14") or a config dict with embed_dim,
    vision_cfg and text_cfg, as in open_clip's model_configs/*.json.
    """
    import open_clip

    if isinstance(architecture, str):
        config = open_clip.get_model_config(architecture)
        if config is None:
            raise DiffalignError(
                f"unknown open_clip architecture {architecture!r}: use a name from open_clip.list_models()"
            )
        tokenizer = open_clip.get_tokenizer(architecture)
    else:
        config = dict(architecture)
        tokenizer = open_clip.SimpleTokenizer(context_length=config["text_cfg"].get("context_length", 77))
    if config.get("custom_text") or "hf_model_name" in config.get("text_cfg", {}):
        raise DiffalignError(f"open_clip architecture {architecture!r} has a custom text tower: use a plain CLIP one")
    model = open_clip.CLIP(**{k: v for k, v in config.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")})
    return model, tokenizer


class CLIPScoreReward(nn.Module):
    """CLIP score over either backend; `encode(pixels, prompts)` gives normalised features."""

    def __init__(self, model: nn.Module, tokenizer: Any, backend: str, size: int = 224, crop_size: int | None = None,
                 mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, name: str = "clip", image_processor: Any = None):
        super().__init__()
        if backend not in ("transformers", "open_clip"):
            raise DiffalignError(f"unknown CLIP backend {backend!r}: use 'transformers' or 'open_clip'")
        self.model = model
        self.tokenizer = tokenizer
        self.backend = backend
        self.name = name
        crop = crop_size or size
        if backend == "transformers":
            from diffalign.rewards.pickscore import clip_pil_image_processor, hf_pil_transform

            self.transform = clip_crop_transform(size, mean, std, crop, crop_rounding="floor")
            self.image_processor = image_processor or clip_pil_image_processor(size, crop, mean, std)
            self.pil_transform = hf_pil_transform(self.image_processor)
        else:
            import open_clip

            self.transform = clip_crop_transform(size, mean, std, crop)
            self.pil_transform = open_clip.image_transform(size, is_train=False, mean=tuple(mean), std=tuple(std))

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        architecture: str | dict | None = None,
        processor: str | None = None,
    ) -> "CLIPScoreReward":
        """transformers backend unless `architecture` (an open_clip name or config) is given;
        then `path` is the open_clip checkpoint file (or a folder with open_clip_model.safetensors)."""
        if architecture is None:
            from diffalign.rewards.pickscore import load_hf_clip

            model, tokenizer, image_cfg = load_hf_clip(path or HUB_REPO, processor, "clip")
            return cls(freeze(model, device, dtype), tokenizer, "transformers", name="clip", **image_cfg).eval()
        if path is None:
            raise DiffalignError("the open_clip CLIP score needs weights: pass path=<checkpoint file> (--reward clip@FILE)")
        [file] = resolve_weights(path, "open_clip_model.safetensors", "or pass the checkpoint file itself")
        checkpoint = load_checkpoint(file)
        model, tokenizer = build_open_clip(architecture)
        load_state_dict_strict(model, checkpoint.get("state_dict", checkpoint), str(file))
        return cls(freeze(model, device, dtype), tokenizer, "open_clip", size=int(model.visual.image_size[0])).eval()

    def encode(self, pixels: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        device = pixels.device
        if self.backend == "open_clip":
            tokens = self.tokenizer(prompts).to(device)
            return self.model.encode_image(pixels, normalize=True), self.model.encode_text(tokens, normalize=True)
        from diffalign.rewards.pickscore import hf_clip_features

        return hf_clip_features(self.model, self.tokenizer, pixels, prompts)

    def score(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        """(B,) float32. Tensors are differentiable; PIL images, files and `exact=True` take the
        backend's own PIL preprocessing."""
        prompts = check_batch(images, prompts)
        param = next(self.model.parameters())
        pixels = prepare_pixels(images, self.transform, param.device, param.dtype, self.pil_transform, exact)
        image_features, text_features = self.encode(pixels, prompts)
        cosine = (image_features.float() * text_features.float()).sum(dim=-1)
        return check_scores((100.0 * cosine).clamp(min=0.0), len(prompts), self.name)

    def forward(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        return self.score(images, prompts, exact=exact)
