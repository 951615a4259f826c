"""FLUX.1 adapter: packed-latent transformer, rectified flow, CLIP (pooled) + T5 conditioning.

Conditioning (batch-first):
- "prompt_embeds": (N, L, 4096), T5 states (L = max_sequence_length, 512 by default)
- "pooled_prompt_embeds": (N, 768), CLIP's pooled output

`predict` takes latents (N, C, h, w) and hides FLUX's packing: 2x2 latent patches become
tokens (N, h/2 * w/2, 4C), with positional ids img_ids (row, column) per token and zero
txt_ids; the output is unpacked back to (N, C, h, w). The transformer takes the timestep as
sigma in (0, 1) (FluxPipeline passes `timestep / 1000`). FLUX.1-dev is guidance-distilled
(transformer.config.guidance_embeds): it also gets the guidance scale, 3.5 by default as in
diffusers' FLUX training scripts; FLUX.1-schnell has no guidance input.

Flow matching as in sd3.py: x_t = (1 - sigma) x0 + sigma noise, target noise - x0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffalign.errors import DiffalignError
from diffalign.models import cond_to, flow_add_noise, flow_target, logit_normal_sigmas, vae_decode, vae_encode

if TYPE_CHECKING:
    from torch import Tensor, nn


def pack_latents(latents: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): each 2x2 patch becomes one token (C, dy, dx order)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of pack_latents for a latent of spatial size (h, w)."""
    n, _, d = tokens.shape
    x = tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxAdapter:
    family = "flux"
    prediction_type = "flow"

    def __init__(
        self,
        pipe,
        *,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
    ) -> None:
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = guidance_scale

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
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompts, prompts, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
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
        n, _, h, w = xt.shape
        if h % 2 or w % 2:
            raise DiffalignError(f"FLUX packs 2x2 latent patches but the latent is {h}x{w}: use a resolution divisible by {4 * self.pipe.vae_scale_factor}")
        cond = cond_to(cond, self.device, self.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance_scale, device=self.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=pack_latents(xt.to(self.device, self.dtype)),
            timestep=t.to(self.device, torch.float32),  # sigma in fp32, as FluxPipeline's timestep / 1000
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=image_ids(h, w, self.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
