"""A tiny Stable Diffusion pipeline saved to disk (diffusers' dummy sizes), and small rewards."""

import pytest
import torch


def build_tiny_sd_pipeline(tokenizer_dir):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    )
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=8, intermediate_size=16,
        num_attention_heads=2, num_hidden_layers=1, vocab_size=49408, projection_dim=8,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(tmp_path_factory.mktemp("clip-tokenizer"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory, clip_tokenizer_dir):
    """A saved tiny pipeline, so `diffalign label --model DIR` takes the from_pretrained path."""
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(clip_tokenizer_dir).save_pretrained(path)
    return path


def redness(images, prompts):
    """A reward a test can check by hand: mean red minus mean green, (B,)."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1].mean(dim=(1, 2))


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="session")
def tiny_sd(clip_tokenizer_dir):
    """The pipeline object itself (label(cfg, pipe=...)): no reload per test."""
    pipe = build_tiny_sd_pipeline(clip_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\ntwo blue squares\na green triangle on the left\nthree yellow stars\na cat\n")
    return path
