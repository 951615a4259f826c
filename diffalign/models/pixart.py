"""PixArt-alpha / PixArt-sigma adapter: DiT with T5 conditioning, DDPM epsilon training.

Conditioning (batch-first):
- "prompt_embeds": (N, L, 4096) T5 states, L = max_sequence_length (alpha 120, sigma 300)
- "prompt_attention_mask": (N, L), 1 on real tokens (the cross-attention ignores padding)

The released PixArt transformers learn the variance too (out_channels = 2C): `predict` keeps
only the first C channels, the epsilon prediction, as the pipelines do. PixArt-alpha 1024
(sample_size 128) also takes micro-conditions: resolution (H, W) and aspect ratio H / W in
pixels, built from the latent size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffalign.models import (
    cond_to,
    ddpm_sample_timesteps,
    ddpm_target,
    ddpm_training_scheduler,
    vae_decode,
    vae_encode,
    vae_scale_factor,
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class PixArtAdapter:
    family = "pixart"

    def __init__(self, pipe, *, max_sequence_length: int | None = None) -> None:
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.scheduler = ddpm_training_scheduler(pipe)
        self.prediction_type = self.scheduler.config.prediction_type
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.vae_scale_factor = vae_scale_factor(pipe.vae)
        is_alpha = type(pipe).__name__ == "PixArtAlphaPipeline"
        self.max_sequence_length = max_sequence_length or (120 if is_alpha else 300)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype, read live: inputs follow a later cast (full fine-tuning in fp32)."""
        return self.denoiser.dtype

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            embeds, mask, _, _ = self.pipe.encode_prompt(
                list(prompts), do_classifier_free_guidance=False, num_images_per_prompt=1, device=self.device,
                clean_caption=False, max_sequence_length=self.max_sequence_length,
            )
        return {"prompt_embeds": embeds.to(self.dtype), "prompt_attention_mask": mask}

    def encode_images(self, pixels: Tensor) -> Tensor:
        return vae_encode(self.pipe.vae, pixels)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.pipe.vae, latents)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        return ddpm_sample_timesteps(n, self.num_train_timesteps, generator, self.device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return ddpm_target(self.scheduler, x0, noise, t)

    def micro_conditions(self, xt: Tensor) -> dict[str, Tensor | None]:
        """PixArt-alpha's resolution / aspect-ratio inputs, or None for models without them."""
        if not self.denoiser.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        n = xt.shape[0]
        height, width = xt.shape[-2] * self.vae_scale_factor, xt.shape[-1] * self.vae_scale_factor
        resolution = torch.tensor([height, width], device=self.device, dtype=self.dtype).expand(n, 2)
        aspect_ratio = torch.tensor([height / width], device=self.device, dtype=self.dtype).expand(n, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = cond_to(cond, self.device, self.dtype)
        out = denoiser(
            xt.to(self.device, self.dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=t.to(self.device),
            added_cond_kwargs=self.micro_conditions(xt),
            return_dict=False,
        )[0]
        return out[:, : xt.shape[1]]  # learned-sigma models: [epsilon, variance] along channels
