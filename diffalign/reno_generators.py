"""Differentiable few-step generators for ReNO: initial noise -> image in [0, 1].

`build_generator(pipe, prompt)` turns a diffusers pipeline into a function of its initial noise
alone, built from the pipeline's own components: the prompt is encoded once (no grad), the
denoiser runs 1-4 steps through the scheduler's own `step()`, and the VAE decodes with
gradients. Every `step()` of the schedulers these models ship with (DDIM, DDPM, Euler,
Euler-ancestral, LCM, TCD, DPM-Solver++, UniPC, FlowMatch-Euler) is differentiable, with
gradients matching finite differences (tests/reno/test_reno_schedulers.py), so no update is
re-derived here.

The noise has the layout the pipeline's `latents=` argument takes (FLUX: packed, (1, seq, 4C)),
so `pipe(prompt, latents=result.latent, ...)` reproduces an optimised image.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from diffalign.errors import DiffalignError

# Pipeline class name -> family. Subclasses (e.g. ReNO's RewardStableDiffusion) match too.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "FluxPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3",
}


@dataclass
class Generator:
    """A differentiable map from the initial noise (float32, `latent_shape`) to (1, 3, H, W)."""

    family: str
    latent_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype  # the pipeline's compute dtype; the noise is cast to it inside
    generate: Callable[[Tensor], Tensor]

    def __call__(self, latent: Tensor) -> Tensor:
        return self.generate(latent)


def pipeline_family(pipe: Any) -> str:
    """The family name of `pipe`, or a DiffalignError listing the supported pipelines."""
    import diffusers

    for class_name, family in SUPPORTED_PIPELINES.items():
        if isinstance(pipe, getattr(diffusers, class_name)):
            return family
    raise DiffalignError(
        f"ReNO cannot optimise the noise of a {type(pipe).__name__}: use one of "
        f"{', '.join(SUPPORTED_PIPELINES)} (e.g. SD-Turbo, SDXL-Turbo, PixArt-DMD, FLUX.1-schnell)"
    )


def build_generator(
    pipe: Any,
    prompt: str,
    *,
    num_inference_steps: int = 1,
    guidance_scale: float = 0.0,
    timesteps: list[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = True,
) -> Generator:
    """Build the differentiable generator of `pipe` for one prompt.

    `guidance_scale` > 1 turns on classifier-free guidance (empty negative prompt); turbo models
    use 0. `timesteps` overrides the scheduler's schedule (PixArt-DMD: [400], Hyper-SD: [800]).
    `seed` fixes the noise of stochastic schedulers, so every call is the same function.
    """
    family = pipeline_family(pipe)
    if num_inference_steps < 1:
        raise DiffalignError(f"num_inference_steps={num_inference_steps}: use 1 to 4 steps")
    denoiser = pipe.transformer if family in ("pixart", "flux", "sd3") else pipe.unet
    # Only the noise is optimised: freeze the networks so backward skips their weight gradients.
    denoiser.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if gradient_checkpointing:
        # Recompute activations in backward: the VAE decoder at full resolution dominates memory.
        pipe.vae.enable_gradient_checkpointing()
        if denoiser._supports_gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
    builders = {"sd": _sd, "sdxl": _sdxl, "pixart": _pixart, "flux": _flux, "sd3": _sd3}
    settings = dict(
        steps=num_inference_steps, guidance=guidance_scale, timesteps=timesteps, seed=seed,
        height=height, width=width, device=pipe._execution_device, dtype=denoiser.dtype,
    )
    with torch.no_grad():
        return builders[family](pipe, prompt, **settings)


# ----------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------


def _retrieve_timesteps(scheduler, steps, device, timesteps=None, **kwargs) -> Tensor:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    if timesteps is not None:
        return retrieve_timesteps(scheduler, None, device, timesteps=timesteps, **kwargs)[0]
    return retrieve_timesteps(scheduler, steps, device, **kwargs)[0]


def _step_kwargs(scheduler, seed: int, device) -> dict:
    """A freshly seeded generator for stochastic schedulers, so each call draws the same noise."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator(device).manual_seed(seed)}
    return {}


def _guided(pred: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance over a batch laid out as [unconditional, conditional]."""
    if guidance <= 1.0:
        return pred
    uncond, cond = pred.chunk(2)
    return uncond + guidance * (cond - uncond)


def _doubled(x: Tensor, guidance: float) -> Tensor:
    return torch.cat([x, x]) if guidance > 1.0 else x


def _decode(vae, latents: Tensor) -> Tensor:
    """VAE decode with gradients, mapped to [0, 1] as the pipelines' postprocess does."""
    shift = vae.config.shift_factor or 0.0
    latents = latents / vae.config.scaling_factor + shift
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def _denoise(pipe, latents, timesteps, predict, seed, device, one_step_x0=False) -> Tensor:
    """Run the scheduler's own step() over `timesteps`; `predict(latents, t)` is the model."""
    scheduler = pipe.scheduler
    extra = _step_kwargs(scheduler, seed, device)
    for t in timesteps:
        output = scheduler.step(predict(latents, t), t, latents, return_dict=True, **extra)
        # PixArt-DMD: a one-step model's image is the predicted x0, as the pipeline takes it.
        x0 = getattr(output, "pred_original_sample", None) if one_step_x0 else None
        latents = output.prev_sample if x0 is None else x0
    return latents


def _size(pipe, height, width, sample_size) -> tuple[int, int]:
    default = sample_size * pipe.vae_scale_factor
    return height or default, width or default


def _guidance_embedding(pipe, unet, guidance, dtype, device):
    """LCM-distilled UNets take the guidance scale as an embedding (time_cond_proj_dim)."""
    if unet.config.time_cond_proj_dim is None:
        return None
    scale = torch.tensor(guidance - 1).repeat(1)
    return pipe.get_guidance_scale_embedding(scale, embedding_dim=unet.config.time_cond_proj_dim).to(device, dtype)


# ----------------------------------------------------------------------------------------
# One builder per family: encode once, then return the closure over the noise
# ----------------------------------------------------------------------------------------


def _sd(pipe, prompt, *, steps, guidance, timesteps, seed, height, width, device, dtype) -> Generator:
    unet = pipe.unet
    cfg = guidance > 1.0
    embeds, negative = pipe.encode_prompt(prompt, device, 1, cfg, None)
    embeds = torch.cat([negative, embeds]) if cfg else embeds
    timestep_cond = _guidance_embedding(pipe, unet, guidance, dtype, device)
    height, width = _size(pipe, height, width, unet.config.sample_size)
    shape = (1, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

    def predict(latents, t):
        x = pipe.scheduler.scale_model_input(_doubled(latents, guidance), t)
        pred = unet(x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, return_dict=False)[0]
        return _guided(pred, guidance)

    def generate(noise: Tensor) -> Tensor:
        ts = _retrieve_timesteps(pipe.scheduler, steps, device, timesteps)
        latents = noise.to(device, dtype) * pipe.scheduler.init_noise_sigma  # as prepare_latents
        return _decode(pipe.vae, _denoise(pipe, latents, ts, predict, seed, device))

    return Generator("sd", shape, device, dtype, generate)


def _sdxl(pipe, prompt, *, steps, guidance, timesteps, seed, height, width, device, dtype) -> Generator:
    unet = pipe.unet
    cfg = guidance > 1.0
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg
    )
    height, width = _size(pipe, height, width, pipe.default_sample_size)
    projection_dim = (
        pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
    )
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=embeds.dtype, text_encoder_projection_dim=projection_dim
    ).to(device)
    if cfg:
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    added = {"text_embeds": pooled, "time_ids": _doubled(time_ids, guidance)}
    timestep_cond = _guidance_embedding(pipe, unet, guidance, dtype, device)
    shape = (1, unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)

    def predict(latents, t):
        x = pipe.scheduler.scale_model_input(_doubled(latents, guidance), t)
        pred = unet(
            x, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return _guided(pred, guidance)

    def generate(noise: Tensor) -> Tensor:
        ts = _retrieve_timesteps(pipe.scheduler, steps, device, timesteps)
        latents = noise.to(device, dtype) * pipe.scheduler.init_noise_sigma
        return _decode(pipe.vae, _denoise(pipe, latents, ts, predict, seed, device))

    return Generator("sdxl", shape, device, dtype, generate)


def _pixart(pipe, prompt, *, steps, guidance, timesteps, seed, height, width, device, dtype) -> Generator:
    transformer = pipe.transformer
    cfg = guidance > 1.0
    embeds, mask, negative, negative_mask = pipe.encode_prompt(prompt, cfg, device=device)
    if cfg:
        embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
    height, width = _size(pipe, height, width, transformer.config.sample_size)
    channels = transformer.config.in_channels
    shape = (1, channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    added = {"resolution": None, "aspect_ratio": None}
    # PixArt-alpha 1024 takes size micro-conditions (the pipeline tests sample_size == 128; the
    # model's own flag is the same for real checkpoints and right for custom configs too).
    if transformer.use_additional_conditions:
        batch = 2 if cfg else 1
        added = {
            "resolution": torch.tensor([[height, width]] * batch, dtype=embeds.dtype, device=device),
            "aspect_ratio": torch.tensor([[height / width]] * batch, dtype=embeds.dtype, device=device),
        }

    def predict(latents, t):
        x = pipe.scheduler.scale_model_input(_doubled(latents, guidance), t)
        t_batch = t.reshape(1).to(device).expand(x.shape[0])
        pred = transformer(
            x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t_batch,
            added_cond_kwargs=added, return_dict=False,
        )[0]
        pred = _guided(pred, guidance)
        # Learned sigma: the first half of the channels is the noise prediction.
        return pred.chunk(2, dim=1)[0] if transformer.config.out_channels // 2 == channels else pred

    def generate(noise: Tensor) -> Tensor:
        ts = _retrieve_timesteps(pipe.scheduler, steps, device, timesteps)
        latents = noise.to(device, dtype) * pipe.scheduler.init_noise_sigma
        latents = _denoise(pipe, latents, ts, predict, seed, device, one_step_x0=len(ts) == 1)
        return _decode(pipe.vae, latents)

    return Generator("pixart", shape, device, dtype, generate)


def _flux(pipe, prompt, *, steps, guidance, timesteps, seed, height, width, device, dtype) -> Generator:
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    transformer = pipe.transformer
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device)
    height, width = _size(pipe, height, width, pipe.default_sample_size)
    # Latent height/width must be even: FLUX packs 2x2 patches into one token.
    lat_h = 2 * (int(height) // (pipe.vae_scale_factor * 2))
    lat_w = 2 * (int(width) // (pipe.vae_scale_factor * 2))
    channels = transformer.config.in_channels // 4
    shape = (1, (lat_h // 2) * (lat_w // 2), channels * 4)
    image_ids = pipe._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, device, dtype)
    # FLUX.1-dev embeds the guidance scale; schnell has no guidance input.
    flux_guidance = torch.full([1], guidance, device=device, dtype=torch.float32) if transformer.config.guidance_embeds else None
    config = pipe.scheduler.config
    mu = calculate_shift(
        shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5), config.get("max_shift", 1.15),
    )
    sigmas = None if timesteps is not None or config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)

    def predict(latents, t):
        return transformer(
            hidden_states=latents, timestep=t.expand(1).to(latents.dtype) / 1000, guidance=flux_guidance,
            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
            return_dict=False,
        )[0]

    def generate(noise: Tensor) -> Tensor:
        ts = _retrieve_timesteps(pipe.scheduler, steps, device, timesteps, sigmas=sigmas, mu=mu)
        latents = _denoise(pipe, noise.to(device, dtype), ts, predict, seed, device)
        return _decode(pipe.vae, pipe._unpack_latents(latents, lat_h * pipe.vae_scale_factor, lat_w * pipe.vae_scale_factor, pipe.vae_scale_factor))

    return Generator("flux", shape, device, dtype, generate)


def _sd3(pipe, prompt, *, steps, guidance, timesteps, seed, height, width, device, dtype) -> Generator:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    transformer = pipe.transformer
    cfg = guidance > 1.0
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg
    )
    if cfg:
        embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
    height, width = _size(pipe, height, width, pipe.default_sample_size)
    shape = (1, transformer.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    config = pipe.scheduler.config
    extra = {}
    if config.get("use_dynamic_shifting", None):  # SD3.5-style resolution-dependent shift
        patches = (shape[2] // transformer.config.patch_size) * (shape[3] // transformer.config.patch_size)
        extra["mu"] = calculate_shift(
            patches, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.16),
        )

    def predict(latents, t):
        x = _doubled(latents, guidance)
        pred = transformer(
            hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeds,
            pooled_projections=pooled, return_dict=False,
        )[0]
        return _guided(pred, guidance)

    def generate(noise: Tensor) -> Tensor:
        ts = _retrieve_timesteps(pipe.scheduler, steps, device, timesteps, **extra)
        return _decode(pipe.vae, _denoise(pipe, noise.to(device, dtype), ts, predict, seed, device))

    return Generator("sd3", shape, device, dtype, generate)
