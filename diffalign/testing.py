"""Tiny random diffusers pipelines for tests, one per supported family.

Each family file (diffalign/models/<family>.py) builds its own tiny pipeline (`tiny_pipeline`,
`TINY_RESOLUTION`, `TINY_VARIANTS`) from the shared tiny parts here. Every component is built
from a config after `torch.manual_seed(seed)`, at the sizes diffusers uses in its own pipeline
tests (`get_dummy_components`), so a whole pipeline builds in well under a second and runs on
the CPU. Nothing touches the model hub:

- CLIP tokenizers are CLIP's real BPE (from `diffalign.rewards.clip_tokenizer`, offline) cut
  to its first 1000 merges: 1514 tokens, so they load fast and the text encoders stay tiny.
- T5 has no offline tokenizer here, so a CLIP tokenizer folder stands in for T5's
  (`tokenizer_2` of FLUX, `tokenizer_3` of SD3, `tokenizer` of PixArt) and UMT5's (Wan). The pipelines only call
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

from diffalign.models import FAMILIES, family_module

# Pixel resolution each family's tiny pipeline is meant for (latent = pixels / vae scale factor),
# read from the family files.
TINY_RESOLUTION: dict[str, int] = {family: family_module(family).TINY_RESOLUTION for family in FAMILIES}

# Frames per video of the video families' tiny pipelines (None: an image family).
TINY_NUM_FRAMES: dict[str, int | None] = {family: getattr(family_module(family), "TINY_NUM_FRAMES", None) for family in FAMILIES}

# Named variants covering every code path of the adapters: id -> (family, tiny_pipeline options),
# gathered from each family file's TINY_VARIANTS (tests parametrise over them).
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (family, options) for family in FAMILIES for name, options in family_module(family).TINY_VARIANTS.items()
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


def tiny_pixels(family: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n random inputs in [-1, 1] for `family`'s `encode_images` at its tiny size: images
    (n, 3, R, R), or videos (n, F, 3, R, R) for a video family."""
    res, frames = TINY_RESOLUTION[family], TINY_NUM_FRAMES[family]
    shape = (n, 3, res, res) if frames is None else (n, frames, 3, res, res)
    return torch.rand(shape, generator=generator) * 2 - 1


def tiny_pipeline(family: str, seed: int = 0, **kw: Any):
    """A tiny random pipeline of `family` (one of FAMILIES), in float32 on the CPU: the family
    file's `tiny_pipeline(**kw)` after `torch.manual_seed(seed)`.

    Options: wan `two_experts=True` (Wan 2.2: transformer_2 and boundary_ratio);
    sd/sdxl `prediction_type="epsilon"|"v_prediction"`; sd3 `with_t5=False` (no
    text_encoder_3, as SD3 allows); flux `guidance_embeds=True` (FLUX.1-dev style); pixart
    `learn_sigma=False`, `use_additional_conditions=True` (PixArt-alpha 1024 micro-conditions),
    `alpha=True` (PixArt-alpha's pipeline instead of PixArt-sigma's).
    """
    from diffalign.errors import DiffalignError

    if family not in FAMILIES:
        raise DiffalignError(f"unknown tiny family {family!r}: choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    return family_module(family).tiny_pipeline(**kw)


def save_tiny_pipeline(family: str, out_dir: str | Path, seed: int = 0, **kw: Any) -> Path:
    """Build `tiny_pipeline(family, ...)`, `save_pretrained` it to `out_dir`, return the path."""
    out = Path(out_dir)
    tiny_pipeline(family, seed=seed, **kw).save_pretrained(str(out))
    return out
