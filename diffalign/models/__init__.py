"""Model adapters: one uniform interface over a diffusers pipeline per model family.

`load_adapter(model)` loads a pipeline (hub id, local folder, or an already built
`DiffusionPipeline`), detects its family from the pipeline class and wraps it:

    family   pipeline class                              prediction  denoiser
    sd       StableDiffusionPipeline (SD1.x, SD2.x)      eps | v     pipe.unet
    sdxl     StableDiffusionXLPipeline                   eps | v     pipe.unet
    sd3      StableDiffusion3Pipeline (SD3, SD3.5)       flow        pipe.transformer
    flux     FluxPipeline (FLUX.1 dev/schnell)           flow        pipe.transformer
    pixart   PixArtAlphaPipeline, PixArtSigmaPipeline    eps         pipe.transformer

The interface (docs/architecture.md, "Model adapter") is the `ModelAdapter` protocol below.
Conventions shared by every adapter:

- `t` is what `sample_timesteps` returns: integer timesteps in [0, T) for the DDPM family,
  the noise level sigma in (0, 1) for flow families. Each adapter converts it to what its
  network wants inside `predict` (SD3: sigma * 1000; FLUX: sigma, as FluxPipeline passes
  `timestep / 1000`).
- Flow matching: x_t = (1 - sigma) x0 + sigma noise, target (velocity) = noise - x0.
- Conditioning dicts are batch-first, so a caller can cache them, index them and
  `repeat_interleave` them over the K images of a group.

Room for video DiTs (Wan 2.x, WanPipeline). A `wan.py` adapter would need:
- 5-D latents (N, C, F, h, w) from `AutoencoderKLWan`, normalised per channel with the VAE's
  `latents_mean`/`latents_std` (not one scaling factor); `encode_images` would take
  (N, 3, F, H, W) videos, `decode_latents` return them, and every helper here that takes a
  "mean over C, H, W" must take the mean over all non-batch dims (the ELBO core already does).
- flow matching as in sd3.py (sigma * 1000 timesteps, velocity target), UMT5 text
  embeddings only (no pooled vector), and LoRA targets on the transformer's attn1/attn2/ffn.
Nothing in this file assumes 4-D tensors except the adapters themselves.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from diffalign.errors import DiffalignError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from torch import Tensor, nn

FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")

# Pipeline class name -> family. Subclasses of these classes map to the same family.
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
}


@runtime_checkable
class ModelAdapter(Protocol):
    """What the ELBO core, the cache and the training loop rely on (see docs/architecture.md)."""

    family: str  # "sd" | "sdxl" | "sd3" | "flux" | "pixart"
    prediction_type: str  # "epsilon" | "v_prediction" | "flow"
    pipe: DiffusionPipeline
    denoiser: nn.Module  # pipe.unet or pipe.transformer
    num_train_timesteps: int
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]: ...
    def encode_images(self, pixels: Tensor) -> Tensor: ...
    def decode_latents(self, latents: Tensor) -> Tensor: ...
    def sample_timesteps(self, n: int, generator: torch.Generator) -> Tensor: ...
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...
    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor: ...
    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor: ...


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
        pipe = _load_pipeline(str(model), dtype, from_pretrained_kwargs or {})
    else:
        pipe = model
    family = detect_family(pipe)
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

    if family == "sd":
        from diffalign.models.sd import SDAdapter as adapter_class
    elif family == "sdxl":
        from diffalign.models.sdxl import SDXLAdapter as adapter_class
    elif family == "sd3":
        from diffalign.models.sd3 import SD3Adapter as adapter_class
    elif family == "flux":
        from diffalign.models.flux import FluxAdapter as adapter_class
    else:
        from diffalign.models.pixart import PixArtAdapter as adapter_class
    try:
        return adapter_class(pipe, **options)
    except TypeError as exc:  # an option this family does not take
        raise DiffalignError(f"bad model option for the {family} adapter ({exc}): remove it or check the spelling") from None


def detect_family(pipe: Any) -> str:
    """The family name of a pipeline object, or a DiffalignError listing the supported ones."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINE_FAMILIES:
            return PIPELINE_FAMILIES[cls.__name__]
    supported = ", ".join(f"{name} ({fam})" for name, fam in PIPELINE_FAMILIES.items())
    raise DiffalignError(f"unsupported pipeline {type(pipe).__name__}: diffalign supports {supported}; pass one of those models")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_pipeline(model: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> DiffusionPipeline:
    """Load a diffusers pipeline from a hub id, a local folder or a shipped toy asset name
    ("toy-sd", "toy-flow"), with one-line errors for what a user can fix.

    Components saved as null (SD3 without T5: text_encoder_3/tokenizer_3) are passed as None
    again, which `from_pretrained` needs to load such a folder.
    """
    return _load_pipeline(str(model), dtype, kwargs)


def _load_pipeline(model: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> DiffusionPipeline:
    import json

    from diffusers import DiffusionPipeline

    from diffalign.paths import asset

    path = Path(model).expanduser()
    if not path.exists() and model.startswith("toy-") and asset(model).is_dir():
        path = asset(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DiffalignError(f"model folder {model!r} has no model_index.json: pass a diffusers pipeline folder (save_pretrained output)")
        source = str(path)
        index = json.loads((path / "model_index.json").read_text())
        nulls = {k: None for k, v in index.items() if isinstance(v, list) and v and v[0] is None}
        kwargs = {**nulls, **kwargs}
    elif _HUB_ID.match(model) and not model.startswith((".", "~")):
        source = model
    else:
        raise DiffalignError(f"model {model!r} is neither an existing folder nor a hub id: check the path, or pass a hub id like 'owner/name'")
    try:
        with warnings.catch_warnings():
            # Recent diffusers renamed torch_dtype to dtype and warn on the old name; the
            # releases we support (>= 0.32) all accept torch_dtype, not all accept dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffalignError(
            f"could not load model {model!r} ({reason[:200]}): download it first (HF_HUB_OFFLINE=1 needs it in the "
            "local cache) or pass a local diffusers folder"
        ) from None


# ---------------------------------------------------------------------------------------------
# Helpers shared by the adapters (VAE, DDPM noising, flow noising)


def vae_encode(vae: nn.Module, pixels: Tensor) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents. Uses the posterior mean, so a latent cache is
    deterministic (the SD-family posterior std is ~1e-3 of the mean's scale)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise DiffalignError(f"images must be (N, 3, H, W), got {tuple(pixels.shape)}: stack RGB images in [-1, 1] along dim 0")
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = vae.config.shift_factor or 0.0  # SD3/FLUX shift their latents; SD does not
    return (latents - shift) * vae.config.scaling_factor


def vae_decode(vae: nn.Module, latents: Tensor) -> Tensor:
    """Scaled latents -> (N, 3, H, W) images in [0, 1]."""
    shift = vae.config.shift_factor or 0.0
    latents = latents / vae.config.scaling_factor + shift
    with torch.no_grad():
        images = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def vae_scale_factor(vae: nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def ddpm_training_scheduler(pipe: DiffusionPipeline):
    """A DDPMScheduler with the pipeline scheduler's betas and prediction type (pipelines ship
    an inference scheduler; training noises with the DDPM forward process)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise DiffalignError(
            f"prediction_type {scheduler.config.prediction_type!r} is not supported: diffalign trains epsilon or "
            "v_prediction models; fix scheduler/scheduler_config.json"
        )
    return scheduler


def ddpm_sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform integer timesteps in [0, T), drawn on the generator's device."""
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator, device=generator.device)
    return t.to(device)


def ddpm_target(scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)  # v = sqrt(a) noise - sqrt(1 - a) x0
    return noise


def logit_normal_sigmas(n: int, generator: torch.Generator, mean: float, std: float, device: torch.device) -> Tensor:
    """sigma = sigmoid(u), u ~ N(mean, std): SD3's logit-normal sampling (flow_grpo uses 0, 1)."""
    u = torch.randn(n, generator=generator, device=generator.device) * std + mean
    return torch.sigmoid(u).to(device)


def flow_add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Rectified flow interpolation x_t = (1 - sigma) x0 + sigma noise, sigma per sample."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity d x_t / d sigma = noise - x0."""
    return noise - x0


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against `like`, in its dtype and device."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def cond_to(cond: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Move a conditioning dict to the model; floats take the model dtype, masks keep theirs."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}
