"""Each family's generator equals the pipeline's own sampling and passes gradients to the noise."""

import pytest
import torch

from diffalign.sampler import build_generator

# (family, tiny_pipeline options, scheduler swap, generator/pipeline settings)
CASES = {
    "sdxl-turbo-1step": ("sdxl", {}, None, dict(num_inference_steps=1, guidance_scale=0.0)),
    "sd-cfg-2step": ("sd", {}, None, dict(num_inference_steps=2, guidance_scale=3.0)),
    "sd3-flow-2step": ("sd3", {}, None, dict(num_inference_steps=2, guidance_scale=0.0)),
    "flux-schnell-1step": ("flux", {}, None, dict(num_inference_steps=1, guidance_scale=0.0)),
    "flux-dev-guidance-2step": ("flux", {"guidance_embeds": True}, None, dict(num_inference_steps=2, guidance_scale=3.5)),
    "pixart-alpha-dmd": ("pixart", {"alpha": True}, "DDPMScheduler",
                         dict(num_inference_steps=1, timesteps=[400], guidance_scale=1.0)),
    "pixart-sigma-2step": ("pixart", {}, None, dict(num_inference_steps=2, guidance_scale=1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generator_matches_pipeline_and_has_gradient(case):
    import diffusers

    from diffalign.testing import TINY_RESOLUTION, tiny_pipeline

    family, options, scheduler, settings = CASES[case]
    pipe = tiny_pipeline(family, **options)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    size = TINY_RESOLUTION[family]
    gen = build_generator(pipe, "a red apple", height=size, width=size, **settings)
    noise = torch.randn(gen.latent_shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    image = gen(noise)
    image[:, 0].mean().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0 and torch.isfinite(noise.grad).all()

    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    if "timesteps" in settings:
        extra["timesteps"] = settings["timesteps"]
    with torch.no_grad():
        reference = pipe(
            "a red apple", latents=noise.detach(), height=size, width=size, output_type="pt",
            num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
            generator=torch.Generator().manual_seed(0), **extra,
        ).images
    assert image.shape == reference.shape == (1, 3, size, size)
    torch.testing.assert_close(image.detach(), reference, rtol=1e-5, atol=1e-5)


def test_pixart_micro_conditions_reach_the_image():
    """PixArt-alpha 1024 conditions on (height, width); the tiny pipeline cannot run them through
    pipe() (it tests sample_size == 128), so check that the generator feeds them: scaling the
    projection weights of the size embedding changes the image."""
    from diffalign.testing import TINY_RESOLUTION, tiny_pipeline

    pipe = tiny_pipeline("pixart", alpha=True, use_additional_conditions=True)
    size = TINY_RESOLUTION["pixart"]
    noise = torch.randn(build_generator(pipe, "x", height=size, width=size).latent_shape)
    with torch.no_grad():
        before = build_generator(pipe, "x", height=size, width=size, guidance_scale=2.0)(noise)
        pipe.transformer.adaln_single.emb.resolution_embedder.linear_1.weight.mul_(3.0)
        after = build_generator(pipe, "x", height=size, width=size, guidance_scale=2.0)(noise)
    assert (before - after).abs().max() > 1e-6
