"""Each adapter against hand computations and against the pipeline's own conventions."""

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.models import load_adapter
from diffalign.testing import TINY_RESOLUTION, TINY_VARIANTS

# Families implemented so far (widened as adapters land).
VARIANTS = {k: v for k, v in TINY_VARIANTS.items() if v[0] in ("sd",)}

ALL = list(VARIANTS)
DDPM = [v for v in ALL if VARIANTS[v][0] in ("sd", "sdxl", "pixart")]
FLOW = [v for v in ALL if VARIANTS[v][0] in ("sd3", "flux")]


def _images(adapter, n, seed=0):
    res = TINY_RESOLUTION[adapter.family]
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _hand_alpha_bar(config):
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), from the scheduler config's beta schedule."""
    b0, b1, T = config.beta_start, config.beta_end, config.num_train_timesteps
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
    else:
        assert config.beta_schedule == "linear"
        betas = torch.linspace(b0, b1, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("variant", ALL)
def test_loads_from_saved_folder(variant, loaded_adapters):
    family, options = VARIANTS[variant]
    adapter = loaded_adapters(variant)
    assert adapter.family == family
    expected = "flow" if family in ("sd3", "flux") else options.get("prediction_type", "epsilon")
    assert adapter.prediction_type == expected
    network = adapter.pipe.unet if family in ("sd", "sdxl") else adapter.pipe.transformer
    assert adapter.denoiser is network
    assert adapter.num_train_timesteps == 1000
    # frozen encoders: nothing outside the denoiser would ever receive a gradient
    assert not any(p.requires_grad for p in adapter.pipe.vae.parameters())
    assert not any(p.requires_grad for p in adapter.pipe.text_encoder.parameters())


@pytest.mark.parametrize("variant", ALL)
def test_encode_shapes(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    cond = adapter.encode_prompts(["a red cube", "", "two blue spheres"])
    assert cond and all(v.shape[0] == 3 for v in cond.values())
    # different prompts give different embeddings; the same prompt the same
    again = adapter.encode_prompts(["a red cube"])
    for key, value in cond.items():
        assert torch.equal(value[:1], again[key])
    pixels = _images(adapter, 2)
    latents = adapter.encode_images(pixels)
    vae = adapter.pipe.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    res = TINY_RESOLUTION[adapter.family]
    assert latents.shape == (2, vae.config.latent_channels, res // factor, res // factor)
    # hand computation of the scaling: (posterior mean - shift) * scale
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    expected = (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)
    images = adapter.decode_latents(latents)
    assert images.shape == pixels.shape and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("variant", DDPM)
def test_ddpm_noise_and_target_by_hand(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 500, 999])
    ab = _hand_alpha_bar(adapter.pipe.scheduler.config)[t].float().view(3, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(adapter.add_noise(x0, noise, t), xt, atol=1e-5, rtol=1e-5)
    if adapter.prediction_type == "v_prediction":
        expected = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    else:
        expected = noise
    torch.testing.assert_close(adapter.target(x0, noise, t), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", FLOW)
def test_flow_noise_and_target_by_hand(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    x0 = torch.full((2, 4, 2, 2), 3.0)
    noise = torch.full((2, 4, 2, 2), -1.0)
    sigma = torch.tensor([0.25, 1.0])
    xt = adapter.add_noise(x0, noise, sigma)
    assert torch.allclose(xt[0], torch.full((4, 2, 2), 0.75 * 3.0 + 0.25 * -1.0))
    assert torch.allclose(xt[1], noise[1])  # sigma = 1 is pure noise
    assert torch.allclose(adapter.target(x0, noise, sigma), torch.full((2, 4, 2, 2), -4.0))


@pytest.mark.parametrize("variant", ALL)
def test_sample_timesteps(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    t = adapter.sample_timesteps(4000, torch.Generator().manual_seed(0))
    again = adapter.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and torch.equal(t, again)
    if adapter.prediction_type == "flow":
        assert t.is_floating_point() and 0 < t.min() and t.max() < 1
        logit = torch.log(t / (1 - t))  # logit-normal(0, 1): the logits are standard normal
        assert abs(logit.mean()) < 0.1 and abs(logit.std() - 1) < 0.1
    else:
        assert not t.is_floating_point() and t.min() >= 0 and t.max() < 1000
        assert t.float().std() > 250  # spread over [0, T), not a constant


def _inputs(adapter, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = adapter.encode_images(_images(adapter, n, seed))
    noise = torch.randn(latents.shape, generator=gen)
    t = adapter.sample_timesteps(n, gen)
    return adapter.add_noise(latents, noise, t), t


@pytest.mark.parametrize("variant", ALL)
def test_predict_batch_equals_single(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    cond = adapter.encode_prompts(["a red cube", "", "two blue spheres"])
    xt, t = _inputs(adapter, 3)
    with torch.no_grad():
        batch = adapter.predict(adapter.denoiser, xt, t, cond)
        singles = [adapter.predict(adapter.denoiser, xt[i : i + 1], t[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()}) for i in range(3)]
    assert batch.shape == xt.shape
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch, torch.cat(singles), atol=1e-5, rtol=1e-4)
    # the prediction depends on the prompt and on t
    with torch.no_grad():
        swapped = adapter.predict(adapter.denoiser, xt, t, {k: v.flip(0) for k, v in cond.items()})
    assert not torch.allclose(batch[0], swapped[0])


def _pipeline_call(adapter, xt, t, cond):
    """The denoiser called the way the family's diffusers pipeline calls it."""
    family, net = adapter.family, adapter.denoiser
    if family == "sd":
        return net(xt, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    raise AssertionError(family)


@pytest.mark.parametrize("variant", ALL)
def test_predict_matches_pipeline_convention(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    cond = adapter.encode_prompts(["a red cube", "two blue spheres"])
    xt, t = _inputs(adapter, 2)
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(adapter.denoiser, xt, t, cond), _pipeline_call(adapter, xt, t, cond))


def test_unsupported_pipeline_is_a_clear_error():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(DiffalignError, match="unsupported pipeline DDPMPipeline.*StableDiffusionXLPipeline"):
        load_adapter(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))


def test_bad_model_paths_are_clear_errors(tmp_path):
    with pytest.raises(DiffalignError, match="neither an existing folder nor a hub id"):
        load_adapter(str(tmp_path / "missing" / "deeper" / "model"))
    with pytest.raises(DiffalignError, match="no model_index.json"):
        load_adapter(str(tmp_path))
    with pytest.raises(DiffalignError, match="could not load model 'nobody-xyz/no-such-model'"):
        load_adapter("nobody-xyz/no-such-model")
