"""Stable Diffusion 3 / 3.5: MMDiT transformer, rectified flow, three text encoders.

Conditioning (batch-first):
- "prompt_embeds": (N, 77 + L, 4096): both CLIPs' states (zero-padded to T5's width) followed
  by T5's L tokens. Without text_encoder_3 (SD3 allows dropping T5) the T5 part is zeros, as
  in StableDiffusion3Pipeline.
- "pooled_prompt_embeds": (N, 2048): both CLIPs' pooled projections.

Flow matching (diffalign.elbo): sigma ~ logit-normal(logit_mean, logit_std), x_t =
(1 - sigma) x0 + sigma noise, target noise - x0. The transformer takes the timestep sigma *
1000, the values of FlowMatchEulerDiscreteScheduler.timesteps. Sampling follows
StableDiffusion3Pipeline (classifier-free guidance when guidance > 1; SD3.5's
resolution-dependent shift when the scheduler asks for dynamic shifting).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.models import DenoiserPlacement, cond_to, vae_decode, vae_encode, vae_scale_factor

if TYPE_CHECKING:
    from torch import Tensor, nn

# The attention projections of both streams plus the feed-forward layers, as diffusers'
# SD3 DreamBooth-LoRA script and flow_grpo do.
LORA_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]

TINY_RESOLUTION = 32
TINY_VARIANTS = {"sd3": {}, "sd3-no-t5": {"with_t5": False}}


class SD3Adapter(DenoiserPlacement):
    family = "sd3"
    prediction_type = "flow"
    one_step_image_is_x0 = False

    def __init__(self, pipe, *, logit_mean: float = 0.0, logit_std: float = 1.0, max_sequence_length: int = 256) -> None:
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self.logit_mean, self.logit_std = logit_mean, logit_std  # the training sigma draw (diffalign.elbo)
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = vae_scale_factor(pipe.vae)

    # ------------------------------------------------------------------ training

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, prompts, prompts, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    # Copied from diffalign.models.sd.SDAdapter.encode_images
    def encode_images(self, pixels: Tensor) -> Tensor:
        return vae_encode(self.pipe.vae, pixels)

    # Copied from diffalign.models.sd.SDAdapter.decode_latents
    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.pipe.vae, latents)

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The training prediction at sigma = t: the transformer takes sigma * 1000, in fp32 like
        the scheduler's timesteps (bf16 would round 537 to 536)."""
        return self.forward(denoiser, xt, t.to(self.device, torch.float32) * self.num_train_timesteps, cond)

    def forward(self, denoiser: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = cond_to(cond, self.device, self.dtype)
        return denoiser(
            hidden_states=x.to(self.device, self.dtype),
            timestep=timestep.to(self.device),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ sampling

    # Copied from diffalign.models.sdxl.SDXLAdapter.default_size
    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.vae_scale_factor
        return size, size

    # Copied from diffalign.models.sd.SDAdapter.latent_shape
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def sampling_condition(self, prompts: list[str], guidance_scale: float, height: int, width: int) -> tuple[dict, dict | None]:
        """(conditional, unconditional or None) rows, encoded as StableDiffusion3Pipeline does."""
        guided = guidance_scale > 1
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.pipe._execution_device,
            do_classifier_free_guidance=guided, max_sequence_length=self.max_sequence_length,
        )
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        return cond, ({"prompt_embeds": negative, "pooled_prompt_embeds": negative_pooled} if guided else None)

    def sampling_timestep(self, t: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        return t.expand(n)  # the scheduler's sigma * 1000, in fp32

    def schedule_options(self, scheduler: Any, latent_shape: tuple[int, ...], num_inference_steps: int,
                         custom_timesteps: bool) -> dict[str, Any]:
        """SD3.5-style schedulers shift sigmas by the number of image tokens (`mu`)."""
        config = scheduler.config
        if not config.get("use_dynamic_shifting", None):
            return {}
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        patch = self.denoiser.config.patch_size
        tokens = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        mu = calculate_shift(
            tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.16),
        )
        return {"mu": mu}

    # Copied from diffalign.models.sd.SDAdapter.to_pipeline_latents
    def to_pipeline_latents(self, latents: Tensor) -> Tensor:
        return latents

    # Copied from diffalign.models.sd.SDAdapter.from_pipeline_latents
    def from_pipeline_latents(self, latents: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        return latents


Adapter = SD3Adapter


def save_lora_weights(denoiser: nn.Module, out: Path, metadata: dict) -> Path:
    """pytorch_lora_weights.safetensors with peft keys: `pipe.load_lora_weights(out)`."""
    from diffusers import StableDiffusion3Pipeline

    from diffalign.models.lora import lora_state_dict

    StableDiffusion3Pipeline.save_lora_weights(
        str(out), transformer_lora_layers=lora_state_dict(denoiser),
        transformer_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


def tiny_pipeline(with_t5: bool = True, **_: Any):
    """A tiny random StableDiffusion3Pipeline; `with_t5=False` drops text_encoder_3, as SD3 allows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffalign.testing import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_t5_encoder, tiny_vae

    # Token features: CLIP hidden 16 + 16 concatenated = 32 = T5 d_model = joint_attention_dim;
    # pooled: projection 16 + 16 = pooled_projection_dim 32.
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_clip_text_encoder(16, 16, with_projection=True),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(16, 16, with_projection=True),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(32) if with_t5 else None,
        tokenizer_3=tiny_clip_tokenizer() if with_t5 else None,
        image_encoder=None,
        feature_extractor=None,
    )
