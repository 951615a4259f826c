"""The step-aware preference model (SPM) of SPO (Liang et al. 2025, RockeyCoss/SPO).

A CLIP (PickScore's ViT-H-14 layout) whose vision tower is conditioned on the diffusion
timestep t: t -> sinusoidal features (256) -> MLP -> c (the vision width); every vision block
modulates its two pre-norms DiT-style, `adaLN_modulation(c) = (shift, scale, gate) x 2`,

    h = h + gate_msa * attn(layer_norm1(h) * (1 + scale_msa) + shift_msa)
    h = h + gate_mlp * mlp(layer_norm2(h) * (1 + scale_mlp) + shift_mlp)

and the pooled output is modulated once more, `pooled * (1 + scale) + shift`. The score is
PickScore's, `logit_scale.exp() * cosine(image, text)`, computed as the original's
`get_preference_score`: bicubic resize of the shortest side to 224 (no antialias), centre crop,
clamp, OpenAI normalisation; the prompt padded to 77 tokens.

Weights: the released `sd-v1-5_step-aware_preference_model.bin` and
`sdxl_step-aware_preference_model.bin` are torch state dicts of the original
`StepAwarePreferenceModel` (keys `model.text_model.*`, `model.vision_model.*`,
`model.t_embedder.*`, ...). They load with `weights_only=True`, strictly (old checkpoints'
`position_ids` buffers aside). The architecture comes from PickScore_v1's config.json and the
tokenizer from the CLIP-H processor, or from `path` itself when it is a folder holding
config.json, the tokenizer files and one `.bin`/`.safetensors` state dict.

    reward = load_reward("spm", path="sd-v1-5_step-aware_preference_model.bin")
    scores = reward.score(images, prompts, t=torch.tensor([501, 501]))  # t = 0: a clean image
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffalign.errors import DiffalignError
from diffalign.rewards.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInput,
    PromptInput,
    check_batch,
    check_scores,
    freeze,
    load_checkpoint,
    load_image,
    load_state_dict_strict,
    normalize,
)

CONFIG_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FREQUENCY_DIM = 256  # the timestep embedder's sinusoidal features (DiT's TimestepEmbedder)


def adaln(dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim, bias=True))


def timestep_features(t: Tensor, dim: int = FREQUENCY_DIM, max_period: int = 10000) -> Tensor:
    """DiT's sinusoidal timestep features: [cos(t f), sin(t f)], f = max_period^(-i / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class TimeConditionedCLIP(nn.Module):
    """The original `HFTimeConditionedCLIPModel`'s parameters, by name: a transformers CLIPModel
    with `adaLN_modulation` in every vision block and after the pooled output, and `t_embedder`."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import CLIPModel

        clip = CLIPModel(config)
        self.text_model, self.vision_model = clip.text_model, clip.vision_model
        self.visual_projection, self.text_projection, self.logit_scale = (
            clip.visual_projection, clip.text_projection, clip.logit_scale)
        self.config = config
        width = config.vision_config.hidden_size
        for layer in self.vision_model.encoder.layers:
            layer.adaLN_modulation = adaln(width, 6)
        self.vision_model.adaLN_modulation = adaln(width, 2)
        self.t_embedder = TimestepEmbedder(width)
        self.clip = [clip]  # the get_text_features wrapper, kept out of the state dict

    def image_features(self, pixels: Tensor, t: Tensor) -> Tensor:
        vision = self.vision_model
        c = self.t_embedder(t.to(pixels.device))
        h = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers:
            shift1, scale1, gate1, shift2, scale2, gate2 = layer.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=2)
            attn = layer.self_attn(hidden_states=layer.layer_norm1(h) * (1 + scale1) + shift1)[0]
            h = h + gate1 * attn
            h = h + gate2 * layer.mlp(layer.layer_norm2(h) * (1 + scale2) + shift2)
        pooled = vision.post_layernorm(h[:, 0])
        shift, scale = vision.adaLN_modulation(c).chunk(2, dim=1)
        return self.visual_projection(pooled * (1 + scale) + shift)

    def text_features(self, input_ids: Tensor) -> Tensor:
        text = self.clip[0].get_text_features(input_ids=input_ids)
        return text if isinstance(text, Tensor) else text.pooler_output  # transformers 5: an output object


class StepAwarePreferenceModel(nn.Module):
    """The container whose state dict the released checkpoints hold (`model.` prefix)."""

    def __init__(self, config: Any):
        super().__init__()
        self.model = TimeConditionedCLIP(config)


class SPMReward(nn.Module):
    def __init__(self, spm: StepAwarePreferenceModel, tokenizer: Any, size: int = 224,
                 mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, name: str = "spm"):
        super().__init__()
        self.spm = spm
        self.tokenizer = tokenizer
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, *, config: str | None = None, processor: str | None = None,
                        name: str = "spm") -> "SPMReward":
        """`path`: the .bin state dict, or a folder with config.json, tokenizer files and one
        state dict; `config`: the CLIPConfig source (default PickScore_v1's); `processor`: the
        tokenizer/image-processor source (default the CLIP-H one)."""
        from transformers import AutoTokenizer, CLIPConfig

        if path is None:
            raise DiffalignError("spm needs its weights: download sd-v1-5_step-aware_preference_model.bin (or the SDXL one) "
                                 "from the SPO release and pass --reward spm@FILE")
        where = Path(path).expanduser()
        if where.is_dir():
            found = sorted(p for p in where.iterdir() if p.suffix in (".bin", ".safetensors", ".pt"))
            if len(found) != 1:
                raise DiffalignError(f"{str(where)!r} must hold one state dict (.bin/.safetensors), found "
                                     f"{len(found)}: pass the file itself with --reward spm@FILE")
            weights, config, processor = found[0], config or str(where), processor or str(where)
        elif where.is_file():
            weights = where
        else:
            raise DiffalignError(f"spm weights {str(path)!r} not found: pass the .bin file or its folder")
        try:
            clip_config = CLIPConfig.from_pretrained(config or CONFIG_REPO)
            tokenizer = AutoTokenizer.from_pretrained(processor or PROCESSOR_REPO)
        except OSError:
            raise DiffalignError(f"spm's CLIP config ({config or CONFIG_REPO}) or tokenizer ({processor or PROCESSOR_REPO}) "
                                 "is unavailable offline: put config.json and the tokenizer files next to the weights "
                                 "and pass that folder as --reward spm@DIR") from None
        spm = StepAwarePreferenceModel(clip_config)
        state = load_checkpoint(weights)
        own = spm.state_dict()
        state = {k: v for k, v in state.items() if not (k.endswith("position_ids") and k not in own)}
        load_state_dict_strict(spm, state, str(weights))
        size = clip_config.vision_config.image_size
        return cls(freeze(spm, device, dtype), tokenizer, size=size, name=name).eval()

    def pixels(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> the model input, as the original's get_preference_score."""
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        size = (int(h * scale + 0.5), int(w * scale + 0.5))
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        if size[0] != size[1]:
            top, left = int(round((size[0] - self.size) / 2.0)), int(round((size[1] - self.size) / 2.0))
            images = images[..., top: top + self.size, left: left + self.size]
        return normalize(images.clamp(0, 1).float(), self.mean, self.std)

    def score(self, images: ImageInput, prompts: PromptInput, *, t: Tensor | int = 0, exact: bool = False) -> Tensor:
        """(B,) float32 at timestep `t` (an int or (B,); 0 scores a clean image). Tensors are
        differentiable; PIL images and files are read to tensors first (the original has
        only the tensor path, so `exact` changes nothing)."""
        prompts = check_batch(images, prompts)
        if not isinstance(images, Tensor):
            images = torch.stack([load_image(item) for item in images])
        param = self.spm.model.logit_scale
        pixels = self.pixels(images.to(param.device)).to(param.dtype)
        t = torch.as_tensor(t, device=param.device).reshape(-1).expand(len(prompts))
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(param.device)
        model = self.spm.model
        image = F.normalize(model.image_features(pixels, t).float(), dim=-1)
        text = F.normalize(model.text_features(tokens).float(), dim=-1)
        return check_scores(model.logit_scale.float().exp() * (image * text).sum(dim=-1), len(prompts), self.name)

    def forward(self, images: ImageInput, prompts: PromptInput, *, t: Tensor | int = 0) -> Tensor:
        return self.score(images, prompts, t=t)
