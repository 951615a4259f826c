"""PickScore (Kirstain et al. 2023, https://github.com/yuvalkirstain/PickScore).

A transformers `CLIPModel` (CLIP-H fine-tuned on Pick-a-Pic). The score is
`logit_scale.exp() * cosine(image, text)` (about 20-23 for real images). PIL images and files
go through the processor's own PIL image processor (`CLIPImageProcessor`'s PIL backend, as the
original README's `AutoProcessor`: PIL bicubic resize of the uint8 image, centre crop, rescale,
OpenAI mean/std). Tensors take the same steps in torch (bicubic with antialias, crop offsets
floored as the processor's), which keeps them differentiable; `exact=True` sends tensors through
the PIL path. The processor folder gives the tokenizer and the image processor.

Weights: hub `yuvalkirstain/PickScore_v1` (config.json + weights), processor
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. A local model folder that also holds the tokenizer
files is used as its own processor. Loading is strict: missing or unexpected keys raise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards.base import (
    ImageInput,
    PromptInput,
    check_batch,
    check_scores,
    clip_crop_transform,
    freeze,
    hub_offline,
    prepare_pixels,
)

HUB_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _is_local(source: str) -> bool:
    return Path(os.path.expanduser(source)).exists() or source.startswith((".", "/", "~"))


def _hub_error(what: str, source: str, files: str, name: str) -> DiffalignError:
    if _is_local(source):
        return DiffalignError(f"{what} not found in {source!r}: place {files} there")
    why = "not in the HF cache and HF_HUB_OFFLINE=1" if hub_offline() else "could not be downloaded"
    return DiffalignError(
        f"{what} {source!r} {why}: download {files} from https://huggingface.co/{source} into a folder "
        f"and pass it (--reward {name}@DIR, load_reward path=)"
    )


def load_hf_clip(source: str, processor: str | None, name: str, default_processor: str | None = None) -> tuple[nn.Module, Any, dict]:
    """Load a transformers CLIPModel strictly, its tokenizer, and its image processor.

    The processor comes from `processor`, else from `source` when that is a local folder with
    tokenizer files (or `default_processor` is None), else from `default_processor`.
    Returns (model, tokenizer, dict(size, crop_size, mean, std, image_processor)): the PIL
    image processor and the settings the torch path copies.
    """
    from transformers import AutoTokenizer, CLIPModel

    source = str(source)
    if _is_local(source) and not Path(os.path.expanduser(source)).is_dir():
        raise DiffalignError(f"model folder {source!r} not found: pass a folder with config.json and the weights")
    try:
        model, info = CLIPModel.from_pretrained(source, output_loading_info=True)
    except OSError:
        raise _hub_error(f"{name} model", source, "config.json and model.safetensors", name) from None
    # Old checkpoints carry the position_ids buffer, which transformers now recomputes.
    unexpected = [k for k in info["unexpected_keys"] if not k.endswith("position_ids")]
    problems = {"missing": info["missing_keys"], "unexpected": unexpected, "wrong shape": info["mismatched_keys"]}
    problems = {k: [str(x) for x in v] for k, v in problems.items() if v}
    if problems:
        shown = "; ".join(f"{k}: {', '.join(v[:3])}" + (f", ... ({len(v)})" if len(v) > 3 else "") for k, v in problems.items())
        raise DiffalignError(f"{name} weights in {source!r} do not match CLIPModel ({shown}): check the folder")

    local_processor = Path(os.path.expanduser(source)).is_dir() and any(
        (Path(os.path.expanduser(source)) / f).is_file() for f in TOKENIZER_FILES
    )
    processor = processor or (source if local_processor or default_processor is None else default_processor)
    try:
        tokenizer = AutoTokenizer.from_pretrained(processor)
        image_processor = load_pil_image_processor(processor)
    except OSError:
        raise _hub_error(f"{name} processor", processor, "the tokenizer and preprocessor_config.json files", name) from None
    image_cfg = {
        "size": int(image_processor.size["shortest_edge"]),
        "crop_size": int(image_processor.crop_size["height"]),
        "mean": tuple(image_processor.image_mean),
        "std": tuple(image_processor.image_std),
        "image_processor": image_processor,
    }
    return model, tokenizer, image_cfg


def load_pil_image_processor(processor: str) -> Any:
    """The processor folder's image processor with transformers' PIL backend: the one the
    original code ran (transformers 4.x's default `CLIPImageProcessor`); transformers 5 defaults
    to a torchvision backend, which resizes differently."""
    import warnings

    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(processor, backend="pil")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoImageProcessor.from_pretrained(processor, use_fast=False)


def clip_pil_image_processor(size: int, crop_size: int, mean, std) -> Any:
    """A CLIP PIL image processor with these settings, for rewards built without a processor folder."""
    try:
        from transformers.models.clip import CLIPImageProcessorPil as processor_class  # transformers 5
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class  # 4.x: the PIL one

    return processor_class(size={"shortest_edge": size}, crop_size={"height": crop_size, "width": crop_size},
                           image_mean=list(mean), image_std=list(std))


def hf_pil_transform(image_processor: Any):
    """PIL image -> (3, crop, crop) pixel values from the HF image processor itself."""

    def transform(image: Any) -> Tensor:
        return torch.as_tensor(image_processor(images=[image], return_tensors="np")["pixel_values"][0])

    return transform


def hf_clip_features(model: nn.Module, tokenizer: Any, pixels: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """L2-normalised image and text embeddings from a transformers CLIPModel, (B, D) each."""
    max_length = min(77, model.config.text_config.max_position_embeddings)
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tokens = tokens.to(pixels.device)
    image = model.get_image_features(pixel_values=pixels)
    text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    # transformers 5 returns an output object whose pooler_output is the projection; 4.x a tensor.
    image = image if isinstance(image, Tensor) else image.pooler_output
    text = text if isinstance(text, Tensor) else text.pooler_output
    return nn.functional.normalize(image, dim=-1), nn.functional.normalize(text, dim=-1)


class PickScoreReward(nn.Module):
    def __init__(self, model: nn.Module, tokenizer: Any, size: int = 224, crop_size: int = 224,
                 mean=None, std=None, name: str = "pickscore", image_processor: Any = None):
        super().__init__()
        from diffalign.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        mean, std = mean or OPENAI_CLIP_MEAN, std or OPENAI_CLIP_STD
        self.transform = clip_crop_transform(size, mean, std, crop_size, crop_rounding="floor")
        self.image_processor = image_processor or clip_pil_image_processor(size, crop_size, mean, std)
        self.pil_transform = hf_pil_transform(self.image_processor)

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        processor: str | None = None,
        name: str = "pickscore",
    ) -> "PickScoreReward":
        """`path`: a CLIPModel folder or hub id (default yuvalkirstain/PickScore_v1);
        `processor`: the tokenizer/image-processor folder or hub id (default the CLIP-H one)."""
        model, tokenizer, image_cfg = load_hf_clip(path or HUB_REPO, processor, name, PROCESSOR_REPO)
        return cls(freeze(model, device, dtype), tokenizer, name=name, **image_cfg).eval()

    def score(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        """(B,) float32. Tensors are differentiable; PIL images, files and `exact=True` take the
        processor's PIL path."""
        prompts = check_batch(images, prompts)
        param = self.model.logit_scale
        pixels = prepare_pixels(images, self.transform, param.device, param.dtype, self.pil_transform, exact)
        image_features, text_features = hf_clip_features(self.model, self.tokenizer, pixels, prompts)
        cosine = (image_features.float() * text_features.float()).sum(dim=-1)
        return check_scores(self.model.logit_scale.float().exp() * cosine, len(prompts), self.name)

    def forward(self, images: ImageInput, prompts: PromptInput, *, exact: bool = False) -> Tensor:
        return self.score(images, prompts, exact=exact)
