"""PixArt-alpha / PixArt-sigma: DiT with T5 conditioning, DDPM epsilon training.

Conditioning (batch-first):
- "prompt_embeds": (N, L, 4096) T5 states, L = max_sequence_length (alpha 120, sigma 300)
- "prompt_attention_mask": (N, L), 1 on real tokens (the cross-attention ignores padding)

The released PixArt transformers learn the variance too (out_channels = 2C): `forward` keeps
only the first C channels, the epsilon prediction, as the pipelines do. PixArt-alpha 1024
(sample_size 128) also takes micro-conditions: resolution (H, W) and aspect ratio H / W in
pixels, built from the latent size. Sampling follows the pipelines without resolution binning
(`use_resolution_binning=False`); PixArtAlphaPipeline takes a one-step model's image from the
predicted x0 (PixArt-DMD), and so does the sampler.

PixArt has no diffusers LoRA loader, so its LoRA is saved in peft's own format
(`diffalign.models.lora.load_lora` reads it back).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.models import (
    DenoiserPlacement, cond_to, ddpm_schedule, vae_decode, vae_encode, vae_scale_factor,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

# The attention projections plus the feed-forward layers of the DiT blocks.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]

TINY_RESOLUTION = 16
TINY_VARIANTS = {
    "pixart-sigma": {},
    "pixart-alpha-eps-microcond": {"alpha": True, "learn_sigma": False, "use_additional_conditions": True},
}


class PixArtAdapter(DenoiserPlacement):
    family = "pixart"

    def __init__(self, pipe, *, max_sequence_length: int | None = None) -> None:
        from diffusers.utils import is_bs4_available, is_ftfy_available

        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.prediction_type, self.num_train_timesteps, self.alphas_cumprod = ddpm_schedule(pipe)
        self.vae_scale_factor = vae_scale_factor(pipe.vae)
        is_alpha = type(pipe).__name__ == "PixArtAlphaPipeline"
        self.max_sequence_length = max_sequence_length or (120 if is_alpha else 300)
        self.one_step_image_is_x0 = is_alpha
        # The pipelines clean captions only when both libraries import (and warn otherwise).
        self.clean_caption = is_bs4_available() and is_ftfy_available()

    # ------------------------------------------------------------------ training

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            embeds, mask, _, _ = self.pipe.encode_prompt(
                list(prompts), do_classifier_free_guidance=False, num_images_per_prompt=1, device=self.device,
                clean_caption=False, max_sequence_length=self.max_sequence_length,
            )
        return {"prompt_embeds": embeds.to(self.dtype), "prompt_attention_mask": mask}

    # Copied from diffalign.models.sd.SDAdapter.encode_images
    def encode_images(self, pixels: Tensor) -> Tensor:
        return vae_encode(self.pipe.vae, pixels)

    # Copied from diffalign.models.sd.SDAdapter.decode_latents
    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.pipe.vae, latents)

    def micro_conditions(self, xt: Tensor) -> dict[str, Tensor | None]:
        """PixArt-alpha's resolution / aspect-ratio inputs, or None for models without them."""
        if not self.denoiser.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        n = xt.shape[0]
        height, width = xt.shape[-2] * self.vae_scale_factor, xt.shape[-1] * self.vae_scale_factor
        resolution = torch.tensor([height, width], device=self.device, dtype=self.dtype).expand(n, 2)
        aspect_ratio = torch.tensor([height / width], device=self.device, dtype=self.dtype).expand(n, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    # Copied from diffalign.models.sd.SDAdapter.predict
    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The training prediction; the network takes the integer DDPM timestep as it is."""
        return self.forward(denoiser, xt, t, cond)

    def forward(self, denoiser: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        cond = cond_to(cond, self.device, self.dtype)
        out = denoiser(
            x.to(self.device, self.dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=timestep.to(self.device),
            added_cond_kwargs=self.micro_conditions(x),
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]]  # learned-sigma models: [epsilon, variance] along channels

    # ------------------------------------------------------------------ sampling

    def default_size(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size * self.vae_scale_factor
        return size, size

    # Copied from diffalign.models.sd.SDAdapter.latent_shape
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return (self.denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def sampling_condition(self, prompts: list[str], guidance_scale: float, height: int, width: int) -> tuple[dict, dict | None]:
        """(conditional, unconditional or None) rows, encoded as the PixArt pipelines do."""
        guided = guidance_scale > 1
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            list(prompts), guided, device=self.pipe._execution_device, clean_caption=self.clean_caption,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        return cond, ({"prompt_embeds": negative, "prompt_attention_mask": negative_mask} if guided else None)

    def sampling_timestep(self, t: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        return t.reshape(1).expand(n)  # the DiT's timestep embedding takes one value per row

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


Adapter = PixArtAdapter


def save_lora_weights(denoiser: nn.Module, out: Path, metadata: dict) -> Path:
    """peft's format (no diffusers loader for PixArt): `diffalign.models.lora.load_lora`."""
    from diffalign.models.lora import save_peft_lora

    return save_peft_lora(denoiser, out)


def tiny_pipeline(alpha: bool = False, learn_sigma: bool = True, use_additional_conditions: bool | None = None, **_: Any):
    """A tiny random PixArtSigmaPipeline (`alpha=True`: PixArtAlphaPipeline), DPM-Solver scheduler.

    `learn_sigma=False` outputs epsilon only; `use_additional_conditions=True` adds PixArt-alpha
    1024's micro-conditions (pipe() cannot run those at this size: it keys them on sample_size 128)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    from diffalign.testing import tiny_clip_tokenizer, tiny_t5_encoder, tiny_vae

    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,  # T5 d_model
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8 if learn_sigma else 4,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=use_additional_conditions,
    )
    pipeline_class = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    return pipeline_class(
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        vae=tiny_vae(),
        text_encoder=tiny_t5_encoder(32),
        tokenizer=tiny_clip_tokenizer(),
    )
