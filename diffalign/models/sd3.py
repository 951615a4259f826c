"""Stable Diffusion 3 / 3.5 adapter: MMDiT transformer, rectified flow, three text encoders.

Conditioning (batch-first):
- "prompt_embeds": (N, 77 + L, 4096): both CLIPs' states (zero-padded to T5's width) followed
  by T5's L tokens. Without text_encoder_3 (SD3 allows dropping T5) the T5 part is zeros, as
  in StableDiffusion3Pipeline.
- "pooled_prompt_embeds": (N, 2048): both CLIPs' pooled projections.

Flow matching (flow_grpo / diffusers' SD3 scripts): sigma ~ logit-normal(logit_mean,
logit_std), x_t = (1 - sigma) x0 + sigma noise, target noise - x0. The transformer takes the
timestep sigma * 1000, the values of FlowMatchEulerDiscreteScheduler.timesteps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffalign.models import cond_to, flow_add_noise, flow_target, logit_normal_sigmas, vae_decode, vae_encode

if TYPE_CHECKING:
    from torch import Tensor, nn


class SD3Adapter:
    family = "sd3"
    prediction_type = "flow"

    def __init__(self, pipe, *, logit_mean: float = 0.0, logit_std: float = 1.0, max_sequence_length: int = 256) -> None:
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.max_sequence_length = max_sequence_length

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's weight dtype, read live: inputs follow a later cast (full fine-tuning in fp32)."""
        return self.denoiser.dtype

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, prompts, prompts, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def encode_images(self, pixels: Tensor) -> Tensor:
        return vae_encode(self.pipe.vae, pixels)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.pipe.vae, latents)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        """sigma in (0, 1) per sample."""
        return logit_normal_sigmas(n, generator, self.logit_mean, self.logit_std, self.device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return flow_add_noise(x0, noise, t)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return flow_target(x0, noise)

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = cond_to(cond, self.device, self.dtype)
        return denoiser(
            hidden_states=xt.to(self.device, self.dtype),
            # sigma -> 0..1000 in fp32 like the scheduler's timesteps (bf16 would round 537 to 536)
            timestep=t.to(self.device, torch.float32) * self.num_train_timesteps,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
