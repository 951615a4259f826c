"""Wan 2.x text-to-video: a 3-D DiT on video latents, rectified flow, UMT5 conditioning.

Serves Wan 2.1 T2V (1.3B, 14B: one transformer) and Wan 2.2 T2V (A14B: two experts split by
noise level; the TI2V 5B model's per-token timesteps too), as WanPipeline builds them.

Pixels and latents (the video layout every video family shares):
- pixels: (N, F, 3, H, W) in [-1, 1] for `encode_images`; `decode_latents` returns
  (N, F, 3, H, W) in [0, 1], what `pipe(output_type="pt").frames` holds. Frame-major, as the
  reward models take videos.
- latents: (N, C, F', h, w) with F' = (F - 1) / 4 + 1 (the VAE keeps the first frame alone and
  compresses the rest 4x in time; F - 1 must be a multiple of the temporal factor) and h, w =
  H / 8, W / 8. The VAE's posterior mean is normalised per channel with its `latents_mean` /
  `latents_std`: z = (mean - latents_mean) / latents_std, undone before decoding, as
  WanPipeline does.
- diffalign.elbo and the sampler take means over every non-batch dim, so the group's one
  noise draw (C, F', h, w) and one t are shared across all frames of all K videos.

Conditioning (batch-first): "prompt_embeds" (N, L, 4096), UMT5 states with the padding
zeroed, L = max_sequence_length (512 as WanPipeline's default). Sampling encodes the
negative prompt "" for classifier-free guidance (guidance > 1) and runs the network on it,
uncond + g (cond - uncond), as WanPipeline.

Flow matching as in sd3.py: x_t = (1 - sigma) x0 + sigma noise, target noise - x0; the
transformer takes sigma * 1000, the scheduler's timesteps.

Wan 2.2's experts (`expert` option, `--expert` in training): `pipe.transformer` denoises
timesteps t >= boundary_ratio * 1000 (high noise), `pipe.transformer_2` the rest (low noise).
- "high" / "low": only that expert trains (LoRA on it alone), and the training sigma is
  drawn in its range: sigma = lo + (hi - lo) * sigmoid(u), u ~ N(logit_mean, logit_std^2),
  with (lo, hi) = (boundary_ratio, 1) or (0, boundary_ratio);
- "both" (the default for a two-expert model): both train, as one module (`WanExperts`), and
  each row of a batch goes to the expert of its sigma, drawn over (0, 1);
- one-transformer models (Wan 2.1) take "auto" (= the transformer) only.
Sampling always routes by timestep as WanPipeline does, whichever expert trained, with one
guidance scale for both stages (WanPipeline's `guidance_scale_2` defaults to it).

LoRA files: `save_lora_weights` writes `pytorch_lora_weights.safetensors` for the transformer
(`pipe.load_lora_weights(OUT)`); a low-noise expert's LoRA is written as
`pytorch_lora_weights_transformer_2.safetensors`, loaded with
`pipe.load_lora_weights(OUT, weight_name="pytorch_lora_weights_transformer_2.safetensors",
load_into_transformer_2=True)` (`load_lora_weights` below does both).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffalign.errors import DiffalignError
from diffalign.models import DenoiserPlacement, cond_to, placement

if TYPE_CHECKING:
    from torch import Tensor, nn

# Self- and cross-attention projections plus the feed-forward layers of every block
# (WanTransformerBlock: attn1, attn2, ffn), as diffusers' and finetrainers' Wan LoRA recipes.
LORA_TARGETS = [
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
]

EXPERTS = ("auto", "high", "low", "both")
LOW_NOISE_WEIGHTS = "pytorch_lora_weights_transformer_2.safetensors"
LOW_NOISE_MARK = "_diffalign_low_noise_expert"  # set on transformer_2 when it trains alone

TINY_RESOLUTION = 16
TINY_NUM_FRAMES = 5
TINY_VARIANTS = {"wan": {}, "wan2.2": {"two_experts": True}}


def route(high: nn.Module, low: nn.Module, boundary: float, call, timestep: Tensor, *rows: Tensor) -> Tensor:
    """Run each row on its expert: timestep >= boundary -> `high`, else `low`, as WanPipeline
    switches between its two transformers. `call(model, timestep, *rows)` runs one; a batch
    whose rows share an expert is one call (the sampler's case)."""
    key = timestep if timestep.ndim == 1 else timestep[:, 0]  # per-token timesteps: the row's first
    is_high = key >= boundary
    if bool(is_high.all()):
        return call(high, timestep, *rows)
    if not bool(is_high.any()):
        return call(low, timestep, *rows)
    index_high, index_low = is_high.nonzero()[:, 0], (~is_high).nonzero()[:, 0]
    out_high = call(high, timestep[index_high], *(r[index_high] for r in rows))
    out_low = call(low, timestep[index_low], *(r[index_low] for r in rows))
    out = out_high.new_empty((timestep.shape[0], *out_high.shape[1:]))
    out[index_high], out[index_low] = out_high, out_low
    return out


class WanExperts(torch.nn.Module):
    """Wan 2.2's two experts as one trainable module (expert "both"): LoRA goes into both, and
    each row runs on the expert of its timestep. `high`/`low` are the pipeline's own modules."""

    _supports_gradient_checkpointing = True  # read by ReNO's build_generator, as diffusers models'

    def __init__(self, high: nn.Module, low: nn.Module, boundary: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, boundary
        self.config = high.config  # in_channels, patch_size: what the adapter reads

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False, **kw):
        def call(model, t, x, embeds):
            return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, return_dict=False, **kw)[0]

        return (route(self.high, self.low, self.boundary, call, timestep, hidden_states, encoder_hidden_states),)

    def enable_gradient_checkpointing(self) -> None:
        self.high.enable_gradient_checkpointing()
        self.low.enable_gradient_checkpointing()

    def enable_xformers_memory_efficient_attention(self) -> None:
        self.high.enable_xformers_memory_efficient_attention()
        self.low.enable_xformers_memory_efficient_attention()


class WanAdapter(DenoiserPlacement):
    family = "wan"
    prediction_type = "flow"
    one_step_image_is_x0 = False
    video = True  # pixels (N, F, 3, H, W), latents (N, C, F', h, w); sampling takes num_frames

    def __init__(self, pipe, *, logit_mean: float = 0.0, logit_std: float = 1.0, max_sequence_length: int = 512,
                 expert: str = "auto") -> None:
        self.pipe = pipe
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps
        self.logit_mean, self.logit_std = logit_mean, logit_std  # the training sigma draw (diffalign.elbo)
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = pipe.vae_scale_factor_spatial
        self.temporal_factor = pipe.vae_scale_factor_temporal
        ratio = pipe.config.boundary_ratio
        two = ratio is not None and pipe.transformer is not None and getattr(pipe, "transformer_2", None) is not None
        self.boundary_ratio = ratio if two else None
        self.set_expert(expert)

    # ------------------------------------------------------------------ experts

    def set_expert(self, expert: str) -> None:
        """Choose what trains (module docstring): sets `denoiser` and the training sigma range."""
        if expert not in EXPERTS:
            raise DiffalignError(f"unknown Wan expert {expert!r}: use one of {', '.join(EXPERTS)}")
        if self.boundary_ratio is None:
            if expert != "auto":
                raise DiffalignError(f"--expert {expert} needs a two-expert model (Wan 2.2 with transformer_2 and "
                                     "boundary_ratio); this one has one transformer: use --expert auto")
            self.expert, self.sigma_range = "auto", (0.0, 1.0)
            self.denoiser = self.pipe.transformer
            return
        if expert != "auto":  # an explicit choice; "auto" (any adapter the sampler makes) leaves the mark
            setattr(self.pipe.transformer_2, LOW_NOISE_MARK, expert == "low")
        expert = "both" if expert == "auto" else expert
        b = float(self.boundary_ratio)
        self.expert = expert
        self.sigma_range = {"high": (b, 1.0), "low": (0.0, b), "both": (0.0, 1.0)}[expert]
        self.denoiser = {
            "high": self.pipe.transformer,
            "low": self.pipe.transformer_2,
            "both": WanExperts(self.pipe.transformer, self.pipe.transformer_2, self.boundary_timestep),
        }[expert]

    @property
    def boundary_timestep(self) -> float | None:
        return None if self.boundary_ratio is None else self.boundary_ratio * self.num_train_timesteps

    # ------------------------------------------------------------------ training

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(
                list(prompts), do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
        return {"prompt_embeds": embeds.to(self.dtype)}

    def latents_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel latents_mean and latents_std, shaped (1, C, 1, 1, 1)."""
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Videos (N, F, 3, H, W) in [-1, 1] -> normalised latents (N, C, F', h, w), the posterior
        mean (deterministic, so a latent cache holds what training would encode)."""
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise DiffalignError(f"Wan encodes videos (N, F, 3, H, W), got {tuple(pixels.shape)}: stack the frames of "
                                 "each video along dim 1 (set --num-frames for video data)")
        frames = pixels.shape[1]
        if (frames - 1) % self.temporal_factor:
            raise DiffalignError(f"{frames} frames: Wan's VAE takes 1 + {self.temporal_factor}k frames: set --num-frames "
                                 f"to e.g. {(frames - 1) // self.temporal_factor * self.temporal_factor + 1}")
        vae = self.pipe.vae
        with torch.no_grad():
            latents = vae.encode(pixels.permute(0, 2, 1, 3, 4).to(*placement(vae))).latent_dist.mode()
        mean, std = self.latents_stats(latents)
        return (latents - mean) / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents (N, C, F', h, w) -> videos (N, F, 3, H, W) in [0, 1], as WanPipeline's
        decode + postprocess (the caller's grad mode)."""
        vae = self.pipe.vae
        latents = latents.to(*placement(vae))
        mean, std = self.latents_stats(latents)
        # WanPipeline multiplies by 1 / (1 / std): the same rounding.
        video = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
        video = video.to(torch.promote_types(video.dtype, torch.float32))
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    def predict(self, denoiser: nn.Module, xt: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The training prediction at sigma = t: the transformer takes sigma * 1000, in fp32."""
        return self.forward(denoiser, xt, t.to(self.device, torch.float32) * self.num_train_timesteps, cond)

    def forward(self, denoiser: nn.Module, x: Tensor, timestep: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The transformer call as WanPipeline makes it. A pipeline transformer of a two-expert
        model is routed by timestep (the sampler passes the adapter's denoiser for every step)."""
        embeds = cond_to(cond, self.device, self.dtype)["prompt_embeds"]
        x = x.to(self.device, self.dtype)
        timestep = self.expand_timesteps(timestep.to(self.device), x)
        if self.boundary_ratio is not None and any(denoiser is m for m in (self.pipe.transformer, self.pipe.transformer_2)):
            return route(self.pipe.transformer, self.pipe.transformer_2, self.boundary_timestep, _call, timestep, x, embeds)
        return _call(denoiser, timestep, x, embeds)

    def expand_timesteps(self, timestep: Tensor, x: Tensor) -> Tensor:
        """Wan 2.2 TI2V (`expand_timesteps`) takes one timestep per latent token, (N, F' h/2 w/2)."""
        if not self.pipe.config.get("expand_timesteps", False) or timestep.ndim == 2:
            return timestep
        _, p_h, p_w = self.pipe.transformer.config.patch_size
        tokens = x.shape[2] * (x.shape[3] // p_h) * (x.shape[4] // p_w)
        return timestep[:, None].expand(timestep.shape[0], tokens)

    # ------------------------------------------------------------------ sampling

    def default_size(self) -> tuple[int, int]:
        return 480, 832  # WanPipeline's defaults

    default_num_frames = 81  # WanPipeline's default

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """(C, F', h, w) for `num_frames` frames (None: WanPipeline's 81)."""
        frames = self.default_num_frames if num_frames is None else int(num_frames)
        if frames < 1 or (frames - 1) % self.temporal_factor:
            raise DiffalignError(f"num_frames {frames}: Wan generates 1 + {self.temporal_factor}k frames: use e.g. "
                                 f"{max(1, (frames - 1) // self.temporal_factor * self.temporal_factor + 1)}")
        _, p_h, p_w = self.denoiser.config.patch_size
        multiple = self.vae_scale_factor * max(p_h, p_w)
        if height % multiple or width % multiple:
            raise DiffalignError(f"{height}x{width} pixels: Wan needs multiples of {multiple} (VAE x patch): use e.g. "
                                 f"{max(multiple, height // multiple * multiple)}x{max(multiple, width // multiple * multiple)}")
        latent_frames = (frames - 1) // self.temporal_factor + 1
        return (self.denoiser.config.in_channels, latent_frames, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def sampling_condition(self, prompts: list[str], guidance_scale: float, height: int, width: int) -> tuple[dict, dict | None]:
        """(conditional, unconditional or None) rows, encoded as WanPipeline does (negative prompt "")."""
        guided = guidance_scale > 1.0
        embeds, negative = self.pipe.encode_prompt(
            prompt=list(prompts), do_classifier_free_guidance=guided, max_sequence_length=self.max_sequence_length,
            device=self.pipe._execution_device,
        )
        embeds = embeds.to(self.dtype)
        return {"prompt_embeds": embeds}, ({"prompt_embeds": negative.to(self.dtype)} if guided else None)

    # WanPipeline keeps its latents in fp32 whatever the transformer's dtype (the sampler reads this).
    latent_dtype = torch.float32

    def sampling_timestep(self, t: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        return t.expand(n)  # the scheduler's timestep, as WanPipeline passes it

    def schedule_options(self, scheduler: Any, latent_shape: tuple[int, ...], num_inference_steps: int,
                         custom_timesteps: bool) -> dict[str, Any]:
        return {}  # WanPipeline calls set_timesteps(num_inference_steps): the scheduler's own shift

    # Copied from diffalign.models.sd.SDAdapter.to_pipeline_latents
    def to_pipeline_latents(self, latents: Tensor) -> Tensor:
        return latents

    # Copied from diffalign.models.sd.SDAdapter.from_pipeline_latents
    def from_pipeline_latents(self, latents: Tensor, latent_shape: tuple[int, ...]) -> Tensor:
        return latents


def _call(model: nn.Module, timestep: Tensor, x: Tensor, embeds: Tensor) -> Tensor:
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]


Adapter = WanAdapter


def save_lora_weights(denoiser: nn.Module, out: Path, metadata: dict) -> Path:
    """pytorch_lora_weights.safetensors with peft keys: `pipe.load_lora_weights(out)`. The
    low-noise expert's LoRA goes to LOW_NOISE_WEIGHTS (loaded with `load_into_transformer_2=True`,
    see `load_lora_weights`): alone (expert "low", marked by `set_expert`) or beside the
    transformer's (a `WanExperts` module, expert "both")."""
    from diffusers import WanPipeline

    from diffalign.models.lora import lora_state_dict

    state = lora_state_dict(denoiser)
    if getattr(denoiser, LOW_NOISE_MARK, False):
        WanPipeline.save_lora_weights(str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata,
                                      weight_name=LOW_NOISE_WEIGHTS, safe_serialization=True)
        return out / LOW_NOISE_WEIGHTS
    if isinstance(denoiser, WanExperts):
        high = {k.removeprefix("high."): v for k, v in state.items() if k.startswith("high.")}
        low = {k.removeprefix("low."): v for k, v in state.items() if k.startswith("low.")}
        WanPipeline.save_lora_weights(str(out), transformer_lora_layers=low, transformer_lora_adapter_metadata=metadata,
                                      weight_name=LOW_NOISE_WEIGHTS, safe_serialization=True)
        state = high
    WanPipeline.save_lora_weights(
        str(out), transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    return out / "pytorch_lora_weights.safetensors"


def load_lora_weights(pipe, folder: str | Path) -> None:
    """Load what `save_lora_weights` wrote into a WanPipeline: the transformer's LoRA, and the
    low-noise expert's when the folder has one."""
    folder = Path(folder)
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(str(folder))
    if (folder / LOW_NOISE_WEIGHTS).is_file():
        pipe.load_lora_weights(str(folder), weight_name=LOW_NOISE_WEIGHTS, load_into_transformer_2=True)


def tiny_vae():
    """A tiny AutoencoderKLWan at the sizes of diffusers' own Wan pipeline test (z_dim 16,
    spatial factor 8, temporal factor 4)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def tiny_transformer(text_dim: int = 32):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=text_dim, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def tiny_umt5_encoder(d_model: int = 32):
    """A tiny random UMT5 encoder reading the ids of the CLIP stand-in tokenizer (diffalign.testing)."""
    from transformers import UMT5Config, UMT5EncoderModel

    from diffalign.testing import CLIP_EOS, CLIP_VOCAB_SIZE

    config = UMT5Config(vocab_size=CLIP_VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=CLIP_EOS, eos_token_id=CLIP_EOS,
                        decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


def tiny_pipeline(two_experts: bool = False, boundary_ratio: float = 0.875, expand_timesteps: bool = False, **_: Any):
    """A tiny random WanPipeline (Wan 2.1 layout); `two_experts=True` adds transformer_2 and
    `boundary_ratio` (Wan 2.2 T2V A14B layout); `expand_timesteps=True` feeds one timestep per
    latent token (Wan 2.2 TI2V 5B)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from diffalign.testing import tiny_clip_tokenizer

    return WanPipeline(
        tokenizer=tiny_clip_tokenizer(),
        text_encoder=tiny_umt5_encoder(32),
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=tiny_transformer(32),
        transformer_2=tiny_transformer(32) if two_experts else None,
        boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=expand_timesteps,
    )
