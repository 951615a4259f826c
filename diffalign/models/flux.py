"""FLUX.1: packed-latent transformer, rectified flow, CLIP (pooled) + T5 conditioning.

Conditioning (batch-first):
- "prompt_embeds": (N, L, 4096), T5 states (L = max_sequence_length, 512 by default)
- "pooled_prompt_embeds": (N, 768), CLIP's pooled output
- optional "guidance": (N,) float32, the guidance scale of a guidance-distilled model (the
  sampler sets it; training uses the adapter's `guidance_scale`)

`forward` takes latents (N, C, h, w) and hides FLUX's packing: 2x2 latent patches become
tokens (N, h/2 * w/2, 4C), with positional ids img_ids (row, column) per token and zero
txt_ids; the output is unpacked back to (N, C, h, w). The transformer takes the timestep as
sigma in (0, 1) (FluxPipeline passes `timestep / 1000`). FLUX.1-dev is guidance-distilled
(transformer.config.guidance_embeds): it also gets the guidance scale, 3.5 by default in
training as in diffusers' FLUX training scripts; FLUX.1-schnell has no guidance input. Neither
runs an unconditional branch (FluxPipeline's `true_cfg_scale` is not used).

Flow matching as in sd3.py: x_t = (1 - sigma) x0 + sigma noise, target noise - x0.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.errors import DiffalignError
from diffalign.models import DenoiserPlacement, cond_to, vae_decode, vae_encode, vae_scale_factor

if TYPE_CHECKING:
    from torch import Tensor, nn

# sd3's MMDiT targets, plus the MLP of FLUX's single-stream blocks (their attn.to_q/k/v match above).
LORA_TARGETS = [
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp",
]

TINY_RESOLUTION = 32
TINY_VARIANTS = {"flux": {}, "flux-guidance": {"guidance_embeds": True}}


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


class FluxAdapter(DenoiserPlacement):
    family = "flux"
    prediction_type = "flow"
    one_step_image_is_x0 = False

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
        self.logit_mean, self.logit_std = logit_mean, logit_std  # the training sigma draw (diffalign.elbo)
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = guidance_scale
        self.vae_scale_factor = vae_scale_factor(pipe.vae)

    # ------------------------------------------------------------------ training

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompts, prompts, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    # Copied from diffalign.models.sd.SDAdapter.encode_images
    def encode_images(self, pixels: Tensor) -> Tensor:
        return vae_encode(self.pipe.vae, pixels)

    # Copied from diffalign.models.sd.SDAdapter.decode_latents
    def decode_latents(self, latents: Tensor) -> Tensor:
        return vae_decode(self.pipe.vae, latents)

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The training prediction at sigma = t, fed in fp32 as FluxPipeline's timestep / 1000."""
        return self.forward(denoiser, xt, t.to(self.device, torch.float32), cond)

    def forward(self, denoiser: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        n, _, h, w = x.shape
        if h % 2 or w % 2:
            raise DiffalignError(f"FLUX packs 2x2 latent patches but the latent is {h}x{w}: use a resolution divisible by {4 * self.vae_scale_factor}")
        guidance = self.guidance(cond, n)
        cond = cond_to({k: v for k, v in cond.items() if k != "guidance"}, self.device, self.dtype)
        out = denoiser(
            hidden_states=pack_latents(x.to(self.device, self.dtype)),
            timestep=timestep.to(self.device),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3, device=self.device, dtype=self.dtype),
            img_ids=image_ids(h, w, self.device, self.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def guidance(self, cond: dict[str, Tensor], n: int) -> Tensor | None:
        """The guidance input of a guidance-distilled model, in fp32 as FluxPipeline feeds it."""
        if not self.denoiser.config.guidance_embeds:
            return None
        if "guidance" in cond:
            return cond["guidance"].to(self.device, torch.float32)
        return torch.full((n,), self.guidance_scale, device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ sampling

    # Copied from diffalign.models.sdxl.SDXLAdapter.default_size
    def default_size(self) -> tuple[int, int]:
        size = self.pipe.default_sample_size * self.vae_scale_factor
        return size, size

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Unpacked (C, h, w), with h and w rounded down to even so that 2x2 patches tile them."""
        per_patch = self.vae_scale_factor * 2
        return (self.denoiser.config.in_channels // 4, 2 * (height // per_patch), 2 * (width // per_patch))

    def sampling_condition(self, prompts: list[str], guidance_scale: float, height: int, width: int) -> tuple[dict, dict | None]:
        """Conditional rows only, encoded as FluxPipeline does; the guidance scale becomes the
        guidance input of guidance-distilled models."""
        device = self.pipe._execution_device
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        cond = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.denoiser.config.guidance_embeds:
            cond["guidance"] = torch.full((len(prompts),), guidance_scale, device=device, dtype=torch.float32)
        return cond, None

    def sampling_timestep(self, t: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        return t.expand(n).to(dtype) / 1000  # FluxPipeline rounds to the latents' dtype first

    def schedule_options(self, scheduler: Any, latent_shape: tuple[int, ...], num_inference_steps: int,
                         custom_timesteps: bool) -> dict[str, Any]:
        """FluxPipeline's schedule: sigmas 1 .. 1/S, shifted by the number of image tokens (`mu`)."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        mu = calculate_shift(
            tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
        if custom_timesteps or config.get("use_flow_sigmas"):
            return {"mu": mu}
        return {"sigmas": np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), "mu": mu}

    def to_pipeline_latents(self, latents: Tensor) -> Tensor:
        """FluxPipeline's `latents=` takes packed tokens."""
        return pack_latents(latents)

    def from_pipeline_latents(self, latents: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        return unpack_latents(latents, latent_shape[-2], latent_shape[-1])


Adapter = FluxAdapter


def save_lora_weights(denoiser: nn.Module, out: Path, metadata: dict) -> Path:
    """pytorch_lora_weights.safetensors with peft keys: `pipe.load_lora_weights(out)`."""
    from diffusers import FluxPipeline

    from diffalign.models.lora import lora_state_dict

    FluxPipeline.save_lora_weights(
        str(out), transformer_lora_layers=lora_state_dict(denoiser),
        transformer_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


def tiny_pipeline(guidance_embeds: bool = False, **_: Any):
    """A tiny random FluxPipeline; `guidance_embeds=True` is FLUX.1-dev style."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from diffalign.testing import tiny_clip_text_encoder, tiny_clip_tokenizer, tiny_t5_encoder, tiny_vae

    # in_channels = 4 latent channels * 2x2 packing; rope axes sum to attention_head_dim.
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=tiny_clip_text_encoder(32, 32),
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(32),
        tokenizer_2=tiny_clip_tokenizer(),
        image_encoder=None,
        feature_extractor=None,
    )
