"""Fixtures for the ReNO tests: a tiny random StableDiffusionPipeline built from configs.

Sizes follow diffusers' own pipeline tests (get_dummy_components): 32-pixel images, a 4x16x16
latent. The tokenizer is the real CLIP one, written offline.
"""

import tempfile
from pathlib import Path

import pytest
import torch


def build_tiny_sd(scheduler: str = "euler"):
    from diffusers import (
        AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=8,
        intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=77,
    ))
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tempfile.mkdtemp()))))
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if scheduler == "euler":  # SD-Turbo's scheduler: Euler with trailing spacing
        sched = EulerDiscreteScheduler(timestep_spacing="trailing", **common)
    else:
        sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sd():
    return build_tiny_sd("euler")



@pytest.fixture(scope="session")
def tiny_sd_float64():
    """The same pipeline in float64, for finite-difference checks of the gradient."""
    return build_tiny_sd("euler").to(torch.float64)
