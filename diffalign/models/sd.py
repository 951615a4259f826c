"""Stable Diffusion 1.x / 2.x adapter: UNet, one CLIP text encoder, epsilon or v-prediction.

Training noises with the DDPM forward process of the pipeline's betas
(x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise) at uniform integer t in [0, T); the target is the
noise (epsilon models) or v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (v-prediction, SD2.x 768).
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
)

if TYPE_CHECKING:
    from torch import Tensor, nn


class SDAdapter:
    family = "sd"

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.scheduler = ddpm_training_scheduler(pipe)
        self.prediction_type = self.scheduler.config.prediction_type
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype, read live: inputs follow a later cast (full fine-tuning in fp32)."""
        return self.denoiser.dtype

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"encoder_hidden_states": (N, 77, D)}; "" encodes the unconditional prompt."""
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": embeds.to(self.dtype)}

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

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = cond_to(cond, self.device, self.dtype)
        return denoiser(
            xt.to(self.device, self.dtype),
            t.to(self.device),
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
        )[0]
