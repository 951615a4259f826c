"""Stable Diffusion 1.x / 2.x: UNet, one CLIP text encoder, epsilon or v-prediction.

Training (diffalign.elbo) noises with the DDPM forward process of the pipeline's betas; this
file says which (`prediction_type`, `alphas_cumprod`) and calls the UNet. Sampling
(diffalign.sampler) follows StableDiffusionPipeline: classifier-free guidance over
[unconditional, conditional] rows when guidance > 1, except for guidance-distilled (LCM) UNets,
which take the guidance scale as an embedding (`timestep_cond`) instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.models import (
    DenoiserPlacement, cond_to, ddpm_schedule, uses_unconditional_branch, vae_decode, vae_encode, vae_scale_factor,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

# The UNet's attention projections, as diffusers' SD/SDXL DPO scripts.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]

TINY_RESOLUTION = 32  # pixels; the tiny VAE halves them
TINY_VARIANTS = {"sd-eps": {}, "sd-v": {"prediction_type": "v_prediction"}}


class SDAdapter(DenoiserPlacement):
    family = "sd"
    one_step_image_is_x0 = False

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.prediction_type, self.num_train_timesteps, self.alphas_cumprod = ddpm_schedule(pipe)
        self.vae_scale_factor = vae_scale_factor(pipe.vae)

    # ------------------------------------------------------------------ training

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

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The training prediction; the network takes the integer DDPM timestep as it is."""
        return self.forward(denoiser, xt, t, cond)

    def forward(self, denoiser: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Run `denoiser` (the policy, the reference, or a wrapped one) on x at the network's timestep."""
        cond = cond_to(cond, self.device, self.dtype)
        return denoiser(
            x.to(self.device, self.dtype),
            timestep.to(self.device),
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep_cond=cond.get("timestep_cond"),  # LCM UNets only
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ sampling

    def default_size(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def sampling_condition(self, prompts: list[str], guidance_scale: float, height: int, width: int) -> tuple[dict, dict | None]:
        """(conditional, unconditional or None) rows, encoded as StableDiffusionPipeline does."""
        device = self.pipe._execution_device
        guided = uses_unconditional_branch(guidance_scale, self.denoiser)
        embeds, negative = self.pipe.encode_prompt(list(prompts), device, 1, guided)
        cond = {"encoder_hidden_states": embeds}
        if self.denoiser.config.time_cond_proj_dim is not None:
            scale = torch.tensor(guidance_scale - 1).repeat(len(prompts))
            embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=self.denoiser.config.time_cond_proj_dim)
            cond["timestep_cond"] = embedding.to(device, embeds.dtype)
        return cond, ({"encoder_hidden_states": negative} if guided else None)

    def sampling_timestep(self, t: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        return t  # the scheduler's scalar timestep, broadcast by the UNet

    def schedule_options(self, scheduler: Any, latent_shape: tuple[int, ...], num_inference_steps: int,
                         custom_timesteps: bool) -> dict[str, Any]:
        return {}

    def to_pipeline_latents(self, latents: Tensor) -> Tensor:
        return latents

    def from_pipeline_latents(self, latents: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        return latents


Adapter = SDAdapter


def save_lora_weights(denoiser: nn.Module, out: Path, metadata: dict) -> Path:
    """pytorch_lora_weights.safetensors in diffusers' UNet key format: `pipe.load_lora_weights(out)`."""
    from diffusers import StableDiffusionPipeline

    from diffalign.models.lora import lora_state_dict

    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=lora_state_dict(denoiser, diffusers_keys=True),
        unet_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


def tiny_pipeline(prediction_type: str = "epsilon", **_: Any):
    """A tiny random StableDiffusionPipeline (diffusers' own test sizes), DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from diffalign.testing import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae

    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_encoder(hidden_size=8, projection_dim=8),
        tokenizer=tiny_clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
