"""Tiny random diffusers pipelines for tests, one per supported family.

Every component is built from a config after `torch.manual_seed(seed)`, at the sizes diffusers
uses in its own pipeline tests (`get_dummy_components`), so a whole pipeline builds in well under
a second and runs on the CPU. Nothing touches the model hub:

- CLIP tokenizers are CLIP's real BPE (from `diffalign.rewards.clip_tokenizer`, offline) cut
  to its first 1000 merges: 1514 tokens, so they load fast and the text encoders stay tiny.
- T5 has no offline tokenizer here, so a CLIP tokenizer folder stands in for T5's
  (`tokenizer_2` of FLUX, `tokenizer_3` of SD3, `tokenizer` of PixArt). The pipelines only call
  it with `padding="max_length", max_length=..., truncation=True`, which any tokenizer serves;
  the ids are fed to a tiny random `T5EncoderModel` with the same vocabulary size. Real
  checkpoints ship their real T5 tokenizer.

`tiny_pipeline(family)` returns the pipeline; `save_tiny_pipeline(family, dir)` writes it with
`save_pretrained` so `DiffusionPipeline.from_pretrained(dir)` (the hub-id code path) loads it.
Default image size is `TINY_RESOLUTION[family]` pixels.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")

# Pixel resolution the tiny pipelines are meant for (latent = pixels / vae scale factor).
TINY_RESOLUTION = {"sd": 32, "sdxl": 32, "sd3": 32, "flux": 32, "pixart": 16}

# Named variants covering every code path of the adapters: id -> (family, tiny_pipeline options).
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd-eps": ("sd", {}),
    "sd-v": ("sd", {"prediction_type": "v_prediction"}),
    "sdxl": ("sdxl", {}),
    "sd3": ("sd3", {}),
    "sd3-no-t5": ("sd3", {"with_t5": False}),
    "flux": ("flux", {}),
    "flux-guidance": ("flux", {"guidance_embeds": True}),
    "pixart-sigma": ("pixart", {}),
    "pixart-alpha-eps-microcond": ("pixart", {"alpha": True, "learn_sigma": False, "use_additional_conditions": True}),
}

# The tiny pipelines use CLIP's BPE truncated to its first TINY_MERGES merges: the same
# tokenization rules (any text still tokenizes, into shorter pieces), but a 1514-token vocabulary,
# so tokenizers load in milliseconds and the tiny text encoders stay tiny.
TINY_MERGES = 1000
CLIP_VOCAB_SIZE = 2 * 256 + TINY_MERGES + 2
CLIP_BOS, CLIP_EOS = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1

_TOKENIZER_CACHE: dict[str, Any] = {}


def write_tiny_clip_tokenizer(out_dir: str | Path, num_merges: int = TINY_MERGES) -> Path:
    """A transformers CLIPTokenizer folder with CLIP's first `num_merges` BPE merges."""
    import json

    from diffalign.rewards.clip_tokenizer import bytes_to_unicode, clip_vocab_and_merges

    _, merges = clip_vocab_and_merges()
    merges = merges[:num_merges]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def tiny_clip_tokenizer():
    """The offline tiny CLIP tokenizer (built once per process, copied per pipeline)."""
    if "clip" not in _TOKENIZER_CACHE:
        from transformers import CLIPTokenizer

        # Loaded into memory, so the folder can go (one leaked folder per test process otherwise).
        with tempfile.TemporaryDirectory(prefix="diffalign-clip-tok-") as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(Path(tmp))))
        assert len(tokenizer) == CLIP_VOCAB_SIZE and tokenizer.eos_token_id == CLIP_EOS
        _TOKENIZER_CACHE["clip"] = tokenizer
    return copy.deepcopy(_TOKENIZER_CACHE["clip"])


def _clip_config(hidden_size: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,  # pooling takes the hidden state at the first eos token
        pad_token_id=CLIP_EOS,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


def tiny_clip_text_encoder(hidden_size: int = 32, projection_dim: int = 32, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(hidden_size, projection_dim)).eval()


def tiny_t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=CLIP_VOCAB_SIZE,  # it reads the ids of the CLIP stand-in tokenizer
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=CLIP_EOS,
        eos_token_id=CLIP_EOS,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int = 4, depth: int = 2, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A tiny AutoencoderKL; `depth` blocks give a spatial scale factor of 2**(depth-1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=[4, 8][:depth],
        down_block_types=["DownEncoderBlock2D"] * depth,
        up_block_types=["UpDecoderBlock2D"] * depth,
        latent_channels=latent_channels,
        norm_num_groups=2,
        layers_per_block=1,
        sample_size=32,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    ).eval()


def _sd_components(prediction_type: str = "epsilon", **_: Any) -> dict:
    from diffusers import DDIMScheduler, UNet2DConditionModel

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
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": tiny_vae(),
        "text_encoder": tiny_clip_text_encoder(hidden_size=8, projection_dim=8),
        "tokenizer": tiny_clip_tokenizer(),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _sdxl_components(prediction_type: str = "epsilon", **_: Any) -> dict:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

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
    return {
        "unet": unet,
        "scheduler": scheduler,
        "vae": tiny_vae(scaling_factor=0.13025),
        "text_encoder": tiny_clip_text_encoder(hidden_size=16, projection_dim=16),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": tiny_clip_text_encoder(hidden_size=16, projection_dim=16, with_projection=True),
        "tokenizer_2": tiny_clip_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _sd3_components(with_t5: bool = True, **_: Any) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

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
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        "text_encoder": tiny_clip_text_encoder(16, 16, with_projection=True),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": tiny_clip_text_encoder(16, 16, with_projection=True),
        "tokenizer_2": tiny_clip_tokenizer(),
        "text_encoder_3": tiny_t5_encoder(32) if with_t5 else None,
        "tokenizer_3": tiny_clip_tokenizer() if with_t5 else None,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _flux_components(guidance_embeds: bool = False, **_: Any) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

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
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
        "text_encoder": tiny_clip_text_encoder(32, 32),
        "tokenizer": tiny_clip_tokenizer(),
        "text_encoder_2": tiny_t5_encoder(32),
        "tokenizer_2": tiny_clip_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def _pixart_components(learn_sigma: bool = True, use_additional_conditions: bool | None = None, **_: Any) -> dict:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

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
    return {
        "transformer": transformer,
        "scheduler": DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        "vae": tiny_vae(),
        "text_encoder": tiny_t5_encoder(32),
        "tokenizer": tiny_clip_tokenizer(),
    }


_BUILDERS = {
    "sd": ("StableDiffusionPipeline", _sd_components),
    "sdxl": ("StableDiffusionXLPipeline", _sdxl_components),
    "sd3": ("StableDiffusion3Pipeline", _sd3_components),
    "flux": ("FluxPipeline", _flux_components),
    "pixart": ("PixArtSigmaPipeline", _pixart_components),
}


def tiny_pipeline(family: str, seed: int = 0, **kw: Any):
    """A tiny random pipeline of `family` (one of FAMILIES), in float32 on the CPU.

    Options: sd/sdxl `prediction_type="epsilon"|"v_prediction"`; sd3 `with_t5=False` (no
    text_encoder_3, as SD3 allows); flux `guidance_embeds=True` (FLUX.1-dev style); pixart
    `learn_sigma=False`, `use_additional_conditions=True` (PixArt-alpha 1024 micro-conditions),
    `alpha=True` (PixArtAlphaPipeline instead of Sigma).
    """
    import diffusers

    from diffalign.errors import DiffalignError

    if family not in _BUILDERS:
        raise DiffalignError(f"unknown tiny family {family!r}: choose one of {', '.join(FAMILIES)}")
    class_name, build = _BUILDERS[family]
    if family == "pixart" and kw.pop("alpha", False):
        class_name = "PixArtAlphaPipeline"
    torch.manual_seed(seed)
    components = build(**kw)
    return getattr(diffusers, class_name)(**components)


def save_tiny_pipeline(family: str, out_dir: str | Path, seed: int = 0, **kw: Any) -> Path:
    """Build `tiny_pipeline(family, ...)`, `save_pretrained` it to `out_dir`, return the path."""
    out = Path(out_dir)
    tiny_pipeline(family, seed=seed, **kw).save_pretrained(str(out))
    return out
