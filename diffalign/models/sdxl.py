"""Stable Diffusion XL: UNet, two CLIP text encoders, pooled embeddings, time ids.

Conditioning (batch-first):
- "encoder_hidden_states": (N, 77, 768 + 1280), both encoders' penultimate states concatenated
- "text_embeds": (N, 1280), the pooled projection of text_encoder_2
- optional "time_ids": (N, 6). When absent, `forward` builds SDXL's micro-conditioning from the
  latent size: (original H, W) + crop (0, 0) + (target H, W), the training images' resolution,
  as diffusers' SDXL DPO script does for square center crops (and StableDiffusionXLPipeline
  by default).

Noising and targets are the DDPM ones of sd.py (SDXL is epsilon; v works too). Sampling follows
StableDiffusionXLPipeline, whose empty negative prompt encodes to zeros
(`force_zeros_for_empty_prompt`).
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

# Copied from diffalign.models.sd.LORA_TARGETS
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]

TINY_RESOLUTION = 32
TINY_VARIANTS = {"sdxl": {}}


class SDXLAdapter(DenoiserPlacement):
    family = "sdxl"
    one_step_image_is_x0 = False

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.denoiser = pipe.unet
        self.prediction_type, self.num_train_timesteps, self.alphas_cumprod = ddpm_schedule(pipe)
        self.vae_scale_factor = vae_scale_factor(pipe.vae)

    # ------------------------------------------------------------------ training

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"encoder_hidden_states": embeds.to(self.dtype), "text_embeds": pooled.to(self.dtype)}

    # Copied from diffalign.models.sd.SDAdapter.encode_images
    def encode_images(self, pixels: Tensor) -> Tensor:
        return vae_encode(self.pipe.vae, pixels)

    # Copied from diffalign.models.sd.SDAdapter.decode_latents
    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.pipe.vae, latents)

    def time_ids(self, xt: Tensor) -> Tensor:
        """(N, 6): original size (H, W), crop top-left (0, 0), target size (H, W), in pixels."""
        height, width = xt.shape[-2] * self.vae_scale_factor, xt.shape[-1] * self.vae_scale_factor
        ids = torch.tensor([height, width, 0, 0, height, width], device=self.device, dtype=self.dtype)
        return ids.expand(xt.shape[0], 6)

    # Copied from diffalign.models.sd.SDAdapter.predict
    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The training prediction; the network takes the integer DDPM timestep as it is."""
        return self.forward(denoiser, xt, t, cond)

    def forward(self, denoiser: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = cond_to(cond, self.device, self.dtype)
        time_ids = cond["time_ids"] if "time_ids" in cond else self.time_ids(x)
        return denoiser(
            x.to(self.device, self.dtype),
            timestep.to(self.device),
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep_cond=cond.get("timestep_cond"),  # LCM UNets only
            added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": time_ids},
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ sampling

    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.vae_scale_factor
        return size, size

    # Copied from diffalign.models.sd.SDAdapter.latent_shape
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def sampling_condition(self, prompts: list[str], guidance_scale: float, height: int, width: int) -> tuple[dict, dict | None]:
        """(conditional, unconditional or None) rows, encoded as StableDiffusionXLPipeline does."""
        device = self.pipe._execution_device
        guided = uses_unconditional_branch(guidance_scale, self.denoiser)
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided
        )
        encoder_2 = self.pipe.text_encoder_2
        projection_dim = encoder_2.config.projection_dim if encoder_2 is not None else int(pooled.shape[-1])
        time_ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim
        ).to(device).repeat(len(prompts), 1)
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        if self.denoiser.config.time_cond_proj_dim is not None:
            scale = torch.tensor(guidance_scale - 1).repeat(len(prompts))
            embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=self.denoiser.config.time_cond_proj_dim)
            cond["timestep_cond"] = embedding.to(device, embeds.dtype)
        if not guided:
            return cond, None
        return cond, {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": time_ids}

    # Copied from diffalign.models.sd.SDAdapter.sampling_timestep
    def sampling_timestep(self, t: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        return t  # the scheduler's scalar timestep, broadcast by the UNet

    # Copied from diffalign.models.sd.SDAdapter.schedule_options
    def schedule_options(self, scheduler: Any, latent_shape: tuple[int, ...], num_inference_steps: int,
                         custom_timesteps: bool) -> dict[str, Any]:
        return {}

    # Copied from diffalign.models.sd.SDAdapter.to_pipeline_latents
    def to_pipeline_latents(self, latents: Tensor) -> Tensor:
        return latents

    # Copied from diffalign.models.sd.SDAdapter.from_pipeline_latents
    def from_pipeline_latents(self, latents: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        return latents


Adapter = SDXLAdapter


def save_lora_weights(denoiser: nn.Module, out: Path, metadata: dict) -> Path:
    """pytorch_lora_weights.safetensors in diffusers' UNet key format: `pipe.load_lora_weights(out)`."""
    from diffusers import StableDiffusionXLPipeline

    from diffalign.models.lora import lora_state_dict

    StableDiffusionXLPipeline.save_lora_weights(
        str(out), unet_lora_layers=lora_state_dict(denoiser, diffusers_keys=True),
        unet_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


def tiny_pipeline(prediction_type: str = "epsilon", **_: Any):
    """A tiny random StableDiffusionXLPipeline, Euler scheduler with leading spacing."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from diffalign.testing import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_vae

    # cross_attention_dim = 16 + 16 (both encoders' hidden states concatenated);
    # projection_class_embeddings_input_dim = 6 time ids * 8 + pooled 16.
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1, prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=tiny_vae(scaling_factor=0.13025),
        text_encoder=tiny_clip_text_encoder(hidden_size=16, projection_dim=16),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(hidden_size=16, projection_dim=16, with_projection=True),
        tokenizer_2=tiny_clip_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )
