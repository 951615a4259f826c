"""Stable Diffusion XL adapter: UNet, two CLIP text encoders, pooled embeddings, time ids.

Conditioning (batch-first):
- "encoder_hidden_states": (N, 77, 768 + 1280), both encoders' penultimate states concatenated
- "text_embeds": (N, 1280), the pooled projection of text_encoder_2
- optional "time_ids": (N, 6). When absent, `predict` builds SDXL's micro-conditioning from the
  latent size: (original H, W) + crop (0, 0) + (target H, W), the training images' resolution,
  as diffusers' SDXL DPO script does for square center crops.

Noising, timesteps and targets are the DDPM ones of sd.py (SDXL is epsilon; v works too).
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


class SDXLAdapter:
    family = "sdxl"

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.scheduler = ddpm_training_scheduler(pipe)
        self.prediction_type = self.scheduler.config.prediction_type
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.vae_scale_factor = vae_scale_factor(pipe.vae)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype, read live: inputs follow a later cast (full fine-tuning in fp32)."""
        return self.denoiser.dtype

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": embeds.to(self.dtype), "text_embeds": pooled.to(self.dtype)}

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

    def time_ids(self, xt: Tensor) -> Tensor:
        """(N, 6): original size (H, W), crop top-left (0, 0), target size (H, W), in pixels."""
        height, width = xt.shape[-2] * self.vae_scale_factor, xt.shape[-1] * self.vae_scale_factor
        ids = torch.tensor([height, width, 0, 0, height, width], device=self.device, dtype=self.dtype)
        return ids.expand(xt.shape[0], 6)

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = cond_to(cond, self.device, self.dtype)
        time_ids = cond["time_ids"] if "time_ids" in cond else self.time_ids(xt)
        return denoiser(
            xt.to(self.device, self.dtype),
            t.to(self.device),
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": time_ids},
            return_dict=False,
        )[0]
