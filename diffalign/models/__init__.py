"""Model families: one file per family, one table, one detection function.

    family   pipeline classes                            prediction  denoiser
    sd       StableDiffusionPipeline (SD1.x, SD2.x)      eps | v     pipe.unet
    sdxl     StableDiffusionXLPipeline                   eps | v     pipe.unet
    sd3      StableDiffusion3Pipeline (SD3, SD3.5)       flow        pipe.transformer
    flux     FluxPipeline (FLUX.1 dev/schnell)           flow        pipe.transformer
    pixart   PixArtAlphaPipeline, PixArtSigmaPipeline    eps         pipe.transformer
    wan      WanPipeline (Wan 2.1 T2V, Wan 2.2 T2V)      flow        pipe.transformer (and transformer_2)

`diffalign/models/<family>.py` owns everything about its family (docs/architecture.md, "Add a
model family"): the `Adapter` class (encoders, the denoiser call, latent packing, and the
sampler's pieces: prompt encoding with classifier-free guidance, latent shape, the timestep
as the pipeline feeds it), `LORA_TARGETS` and `save_lora_weights`, and the tiny test
components (`TINY_RESOLUTION`, `TINY_VARIANTS`, `tiny_components`). `FAMILY_TABLE` below is
the only list of families; `detect_family` the only place that maps a pipeline to one.

The noising maths (DDPM forward process, flow interpolation, targets, timestep draws) lives in
`diffalign.elbo`; an adapter only says which kind it is (`prediction_type`,
`num_train_timesteps`, and `alphas_cumprod` for DDPM or `logit_mean`/`logit_std` for flow).
Conventions shared by every adapter:

- Training `t` is what `elbo.draw_noise_and_timesteps` draws: integer timesteps in [0, T) for
  the DDPM family, the noise level sigma in (0, 1) for flow families. `predict` converts it to
  what the network wants (SD3: sigma * 1000; FLUX: sigma, as FluxPipeline passes
  `timestep / 1000`).
- Latents are (N, C, h, w) everywhere outside the adapter; FLUX packs and unpacks inside.
- Conditioning dicts are batch-first, so a caller can cache them, index them and
  `repeat_interleave` them over the K images of a group.

Video families (wan.py) set `video = True` and take videos: pixels (N, F, 3, H, W), latents
(N, C, F', h, w), `latent_shape(height, width, num_frames)`, `default_num_frames`. The ELBO
core and the sampler take means over all non-batch dims and never assume 4-D latents; only
the family files do.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from torch import Tensor, nn

# The one family table: family -> (its module, the pipeline classes it serves). Subclasses of
# these classes (e.g. ReNO's RewardStableDiffusion) map to the same family.
FAMILY_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "sd": ("diffalign.models.sd", ("StableDiffusionPipeline",)),
    "sdxl": ("diffalign.models.sdxl", ("StableDiffusionXLPipeline",)),
    "sd3": ("diffalign.models.sd3", ("StableDiffusion3Pipeline",)),
    "flux": ("diffalign.models.flux", ("FluxPipeline",)),
    "pixart": ("diffalign.models.pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline")),
    "wan": ("diffalign.models.wan", ("WanPipeline",)),
}
FAMILIES = tuple(FAMILY_TABLE)
PIPELINE_FAMILIES = {name: family for family, (_, names) in FAMILY_TABLE.items() for name in names}


@runtime_checkable
class ModelAdapter(Protocol):
    """What the ELBO core, the cache, the training loop and the sampler rely on."""

    family: str  # a key of FAMILY_TABLE
    prediction_type: str  # "epsilon" | "v_prediction" | "flow"
    pipe: DiffusionPipeline
    denoiser: nn.Module  # pipe.unet or pipe.transformer
    num_train_timesteps: int
    device: torch.device
    dtype: torch.dtype

    # training
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]: ...
    def encode_images(self, pixels: Tensor) -> Tensor: ...
    def decode_latents(self, latents: Tensor) -> Tensor: ...
    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor: ...

    # sampling (diffalign.sampler)
    one_step_image_is_x0: bool  # the pipeline takes a one-step model's image from x0 (PixArt-alpha)
    def forward(self, denoiser: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor: ...
    def default_size(self) -> tuple[int, int]: ...
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]: ...
    def sampling_condition(self, prompts: list[str], guidance_scale: float, height: int, width: int) -> tuple[dict, dict | None]: ...
    def sampling_timestep(self, t: Tensor, n: int, dtype: torch.dtype) -> Tensor: ...
    def schedule_options(self, scheduler: Any, latent_shape: tuple[int, ...], num_inference_steps: int, custom_timesteps: bool) -> dict: ...
    def to_pipeline_latents(self, latents: Tensor) -> Tensor: ...
    def from_pipeline_latents(self, latents: Tensor, latent_shape: tuple[int, ...]) -> Tensor: ...


def family_module(family: str) -> ModuleType:
    """The module of `family` (diffalign.models.<family>), or a DiffalignError naming the families."""
    if family not in FAMILY_TABLE:
        raise DiffalignError(f"unknown model family {family!r}: use one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILY_TABLE[family][0])


def detect_family(pipe: Any) -> str:
    """The family name of a pipeline object, or a DiffalignError listing the supported ones."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls.__name__]
    supported = ", ".join(f"{name} ({fam})" for name, fam in PIPELINE_FAMILIES.items())
    raise DiffalignError(f"unsupported pipeline {type(pipe).__name__}: diffalign supports {supported}; pass one of those models")


def make_adapter(pipe: Any, **options: Any) -> ModelAdapter:
    """Wrap a pipeline in its family's adapter, moving and freezing nothing (`load_adapter`
    does that for training; the sampler takes the pipeline as it is)."""
    family = detect_family(pipe)
    try:
        return family_module(family).Adapter(pipe, **options)
    except TypeError as exc:  # an option this family does not take
        raise DiffalignError(f"bad model option for the {family} adapter ({exc}): remove it or check the spelling") from None


# ---------------------------------------------------------------------------------------------
# Loading


def load_adapter(
    model: str | Path | DiffusionPipeline,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    from_pretrained_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> ModelAdapter:
    """Load `model` (hub id, local pipeline folder, or pipeline object) and wrap it.

    `from_pretrained_kwargs` go to `DiffusionPipeline.from_pretrained`, e.g. `{"variant": "fp16"}`
    or SD3 without T5: `{"text_encoder_3": None, "tokenizer_3": None}`.
    `options` go to the family's adapter, e.g. `logit_mean`/`logit_std` (flow families),
    `max_sequence_length` (T5 families), `guidance_scale` (FLUX with guidance embedding).
    The text encoders and the VAE are frozen; the denoiser's trainability is left to the caller
    (`diffalign.models.lora.add_lora`, or full fine-tuning).
    """
    if isinstance(model, (str, Path)):
        pipe = load_pipeline(model, dtype, **(from_pretrained_kwargs or {}))
    else:
        pipe = model
    detect_family(pipe)  # an unsupported pipeline fails before anything moves
    pipe.to(torch.device(device))
    for module in pipe.components.values():
        # cast component by component (a passed pipeline may mix dtypes); casting a module that
        # already has the dtype only makes diffusers warn
        if isinstance(module, torch.nn.Module) and module.dtype != dtype:
            module.to(dtype=dtype)
    if dtype == torch.float16 and pipe.vae.config.force_upcast:
        # SD/SDXL VAEs overflow in fp16 (diffusers' pipelines upcast them too); keep it in fp32
        # unless the VAE says it is fp16-safe (e.g. madebyollin/sdxl-vae-fp16-fix).
        pipe.vae.to(torch.float32)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return make_adapter(pipe, **options)


# The one pipeline loader lives in the edge layer; re-exported for `diffalign.models.load_pipeline`.
from diffalign.edges import load_pipeline  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Helpers shared by the family files (VAE, DDPM schedule, conditioning)


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The module's first weight's device and dtype: what diffusers' `ModelMixin.device` and
    `.dtype` return without offloading hooks, without their walk over every submodule (about a
    millisecond a call on the tiny UNet, several calls a training step)."""
    weight = next(module.parameters())
    return weight.device, weight.dtype


class DenoiserPlacement:
    """An adapter's `device` and `dtype`: its denoiser's first weight's (`placement`), read live so
    that inputs follow a later cast (full fine-tuning in fp32)."""

    denoiser: nn.Module

    @property
    def device(self) -> torch.device:
        return placement(self.denoiser)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.denoiser)[1]


def vae_encode(vae: nn.Module, pixels: Tensor) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents. Uses the posterior mean, so a latent cache is
    deterministic (the SD-family posterior std is ~1e-3 of the mean's scale)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise DiffalignError(f"images must be (N, 3, H, W), got {tuple(pixels.shape)}: stack RGB images in [-1, 1] along dim 0")
    with torch.no_grad():
        latents = vae.encode(pixels.to(*placement(vae))).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0  # SD3/FLUX shift their latents; SD does not
    return (latents - shift) * vae.config.scaling_factor


def vae_decode(vae: nn.Module, latents: Tensor) -> Tensor:
    """Scaled latents -> (N, 3, H, W) images in [0, 1], as the pipelines' decode + postprocess.

    Differentiable: the caller picks no_grad (training, evaluation) or autograd (ReNO)."""
    shift = vae.config.shift_factor or 0.0
    latents = latents / vae.config.scaling_factor + shift
    images = vae.decode(latents.to(*placement(vae)), return_dict=False)[0]
    # At least fp32 (half-precision VAEs), and fp64 kept (gradient checks against finite differences).
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    return (images / 2 + 0.5).clamp(0, 1)


def vae_scale_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def ddpm_schedule(pipe: DiffusionPipeline) -> tuple[str, int, Tensor]:
    """(prediction_type, num_train_timesteps, alphas_cumprod) of the pipeline's betas: what the
    ELBO core needs to noise a DDPM-family model (pipelines ship an inference scheduler;
    training noises with the DDPM forward process of the same betas)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise DiffalignError(
            f"prediction_type {scheduler.config.prediction_type!r} is not supported: diffalign trains epsilon or "
            "v_prediction models; fix scheduler/scheduler_config.json"
        )
    return scheduler.config.prediction_type, scheduler.config.num_train_timesteps, scheduler.alphas_cumprod


def cond_to(cond: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Move a conditioning dict to the model; floats take the model dtype, masks keep theirs."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}


def uses_unconditional_branch(guidance_scale: float, denoiser: nn.Module) -> bool:
    """Whether a UNet pipeline runs classifier-free guidance: guidance > 1, except for
    guidance-distilled UNets (LCM: time_cond_proj_dim), which take the scale as an embedding."""
    return guidance_scale > 1 and denoiser.config.time_cond_proj_dim is None
