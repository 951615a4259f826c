"""Each adapter against hand computations and against the pipeline's own conventions."""

import pytest
import torch

from diffalign import elbo
from diffalign.errors import DiffalignError
from diffalign.models import ModelAdapter, load_adapter
from diffalign.testing import TINY_RESOLUTION, TINY_VARIANTS, tiny_pixels

VARIANTS = TINY_VARIANTS

ALL = list(VARIANTS)
DDPM = [v for v in ALL if VARIANTS[v][0] in ("sd", "sdxl", "pixart")]
FLOW = [v for v in ALL if VARIANTS[v][0] in ("sd3", "flux", "wan")]
IMAGE = [v for v in ALL if VARIANTS[v][0] != "wan"]  # video encode/decode: tests/models/test_wan.py


def _images(adapter, n, seed=0):
    """Images (n, 3, R, R), or videos (n, F, 3, R, R) for a video family, in [-1, 1]."""
    return tiny_pixels(adapter.family, n, torch.Generator().manual_seed(seed))


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
    assert isinstance(adapter, ModelAdapter)  # every attribute and method of the contract
    assert adapter.family == family
    expected = "flow" if family in ("sd3", "flux", "wan") else options.get("prediction_type", "epsilon")
    assert adapter.prediction_type == expected
    network = adapter.pipe.unet if family in ("sd", "sdxl") else adapter.pipe.transformer
    if getattr(adapter.pipe, "transformer_2", None) is not None:  # Wan 2.2: both experts train by default
        assert adapter.denoiser.high is network and adapter.denoiser.low is adapter.pipe.transformer_2
    else:
        assert adapter.denoiser is network
    assert adapter.num_train_timesteps == 1000
    # frozen encoders: nothing outside the denoiser would ever receive a gradient
    assert not any(p.requires_grad for p in adapter.pipe.vae.parameters())
    assert not any(p.requires_grad for p in adapter.pipe.text_encoder.parameters())


@pytest.mark.parametrize("variant", IMAGE)
def test_encode_shapes(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    cond = adapter.encode_prompts(["a red cube", "", "two blue spheres"])
    assert cond and all(v.shape[0] == 3 for v in cond.values())
    # different prompts give different embeddings; the same prompt the same
    again = adapter.encode_prompts(["a red cube"])
    for key, value in cond.items():
        torch.testing.assert_close(value[:1], again[key], atol=1e-5, rtol=1e-5)
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
    torch.testing.assert_close(elbo.add_noise(adapter, x0, noise, t), xt, atol=1e-5, rtol=1e-5)
    if adapter.prediction_type == "v_prediction":
        expected = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    else:
        expected = noise
    torch.testing.assert_close(elbo.target(adapter, x0, noise, t), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", FLOW)
def test_flow_noise_and_target_by_hand(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    x0 = torch.full((2, 4, 2, 2), 3.0)
    noise = torch.full((2, 4, 2, 2), -1.0)
    sigma = torch.tensor([0.25, 1.0])
    xt = elbo.add_noise(adapter, x0, noise, sigma)
    assert torch.allclose(xt[0], torch.full((4, 2, 2), 0.75 * 3.0 + 0.25 * -1.0))
    assert torch.allclose(xt[1], noise[1])  # sigma = 1 is pure noise
    assert torch.allclose(elbo.target(adapter, x0, noise, sigma), torch.full((2, 4, 2, 2), -4.0))


@pytest.mark.parametrize("variant", ALL)
def test_draw_timesteps(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    t = elbo.draw_timesteps(adapter, 4000, torch.Generator().manual_seed(0))
    again = elbo.draw_timesteps(adapter, 4000, torch.Generator().manual_seed(0))
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
    t = elbo.draw_timesteps(adapter, n, gen)
    return elbo.add_noise(adapter, latents, noise, t), t


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
    family, net, pipe = adapter.family, adapter.denoiser, adapter.pipe
    n, c, h, w = xt.shape[0], xt.shape[1], xt.shape[-2], xt.shape[-1]
    scale = 2 ** (len(pipe.vae.config.get("block_out_channels", [])) - 1)
    if family == "sd":
        return net(xt, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    if family == "sdxl":
        time_ids = pipe._get_add_time_ids((h * scale, w * scale), (0, 0), (h * scale, w * scale), xt.dtype,
                                          text_encoder_projection_dim=cond["text_embeds"].shape[-1]).repeat(n, 1)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return net(xt, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
    if family == "sd3":  # the scheduler's timesteps are sigma * 1000 (checked below)
        return net(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=cond["prompt_embeds"],
                   pooled_projections=cond["pooled_prompt_embeds"]).sample
    if family == "flux":
        packed = pipe._pack_latents(xt, n, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, xt.device, xt.dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3)
        guidance = torch.full((n,), 3.5) if net.config.guidance_embeds else None
        out = net(hidden_states=packed, timestep=(t * 1000) / 1000, guidance=guidance,
                  pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                  txt_ids=txt_ids, img_ids=img_ids).sample
        return pipe._unpack_latents(out, h * scale, w * scale, scale)
    if family == "pixart":
        added = {"resolution": None, "aspect_ratio": None}
        if net.use_additional_conditions:
            added = {"resolution": torch.tensor([h * scale, w * scale]).float().repeat(n, 1),
                     "aspect_ratio": torch.tensor([h / w]).float().repeat(n, 1)}
        out = net(xt, encoder_hidden_states=cond["prompt_embeds"], encoder_attention_mask=cond["prompt_attention_mask"],
                  timestep=t, added_cond_kwargs=added).sample
        if net.config.out_channels // 2 == c:  # learned sigma: keep epsilon
            out = out.chunk(2, dim=1)[0]
        return out
    if family == "wan":  # WanPipeline: transformer for timesteps >= boundary_ratio * 1000, else transformer_2
        boundary = (pipe.config.boundary_ratio or 0.0) * 1000
        return torch.cat([(pipe.transformer if ti * 1000 >= boundary else pipe.transformer_2)(
            hidden_states=xt[i : i + 1], timestep=t[i : i + 1] * 1000,
            encoder_hidden_states=cond["prompt_embeds"][i : i + 1]).sample for i, ti in enumerate(t)])
    raise AssertionError(family)


@pytest.mark.parametrize("variant", ALL)
def test_predict_matches_pipeline_convention(variant, loaded_adapters):
    adapter = loaded_adapters(variant)
    cond = adapter.encode_prompts(["a red cube", "two blue spheres"])
    xt, t = _inputs(adapter, 2)
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(adapter.denoiser, xt, t, cond), _pipeline_call(adapter, xt, t, cond))


def test_flow_timestep_convention_matches_the_scheduler():
    """FlowMatchEulerDiscreteScheduler's timesteps are its sigmas * 1000 (what SD3 is fed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(5)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


def test_flux_packing_round_trip_and_order():
    from diffusers import FluxPipeline

    from diffalign.models.flux import image_ids, pack_latents, unpack_latents

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    torch.testing.assert_close(unpack_latents(packed, 6, 8), x)
    torch.testing.assert_close(image_ids(6, 8, torch.device("cpu"), torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_flux_rejects_odd_latents(loaded_adapters):
    adapter = loaded_adapters("flux")
    cond = adapter.encode_prompts(["x"])
    with pytest.raises(DiffalignError, match="packs 2x2 latent patches"):
        adapter.predict(adapter.denoiser, torch.randn(1, 4, 5, 6), torch.tensor([0.5]), cond)


def test_sd3_without_t5_uses_zero_t5_features(loaded_adapters):
    adapter = loaded_adapters("sd3-no-t5")
    embeds = adapter.encode_prompts(["a red cube"])["prompt_embeds"]
    assert embeds.shape[1] == 77 + adapter.max_sequence_length
    assert torch.all(embeds[:, 77:] == 0) and embeds[:, :77].abs().sum() > 0


def test_unknown_adapter_option_is_a_clear_error():
    from diffalign.testing import tiny_pipeline

    with pytest.raises(DiffalignError, match="bad model option for the sd adapter"):
        load_adapter(tiny_pipeline("sd"), logit_std=2.0)


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


def test_loading_a_pipeline_prints_no_dtype_deprecation():
    """Every train/eval/label run loads a pipeline: diffusers' torch_dtype FutureWarning must not reach users."""
    import warnings

    from diffalign.models import load_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline("toy-sd", torch.float32)
    assert pipe.unet.dtype == torch.float32
    assert [str(w.message) for w in caught if "torch_dtype" in str(w.message)] == []


def test_predict_follows_the_denoiser_dtype():
    """Loaded in bf16, the adapter feeds bf16; after a full-fine-tuning cast to fp32 it feeds
    fp32 (a stale dtype would make the UNet's conv fail on mismatched input)."""
    from diffalign.testing import tiny_pipeline

    adapter = load_adapter(tiny_pipeline("sd"), dtype=torch.bfloat16)
    cond = adapter.encode_prompts(["a red cube"])
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16
    xt, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert adapter.predict(adapter.denoiser, xt, t, cond).dtype == torch.bfloat16
        adapter.denoiser.to(torch.float32)
        assert adapter.predict(adapter.denoiser, xt, t, cond).dtype == torch.float32


def test_fp16_keeps_an_unsafe_vae_in_fp32():
    from diffalign.testing import tiny_pipeline

    adapter = load_adapter(tiny_pipeline("sdxl"), dtype=torch.float16)
    assert adapter.denoiser.dtype == torch.float16 and adapter.pipe.text_encoder.dtype == torch.float16
    assert adapter.pipe.vae.dtype == torch.float32  # force_upcast: fp16 would overflow
    pipe = tiny_pipeline("sdxl")
    pipe.vae.register_to_config(force_upcast=False)  # an fp16-safe VAE follows the dtype
    assert load_adapter(pipe, dtype=torch.float16).pipe.vae.dtype == torch.float16
