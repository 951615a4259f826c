"""The sampler against each family's own diffusers pipeline, and its stochastic transitions
against independent Gaussian computations from the schedulers' alphas and sigmas."""

import math

import pytest
import torch

from diffalign.sampler import (
    DDIMStep,
    FlowSDEStep,
    decode,
    denoise,
    generate,
    initial_latents,
    initial_noise,
    prepare,
    seed_generators,
    step,
)
from diffalign.testing import TINY_NUM_FRAMES, TINY_RESOLUTION, TINY_VARIANTS, tiny_pipeline

# Every tiny variant pipe() can run, plus PixArt-alpha's pipeline (the micro-condition variant
# cannot run through pipe() at tiny size: the pipeline keys the conditions on sample_size 128).
CASES = {name: case for name, case in TINY_VARIANTS.items() if name != "pixart-alpha-eps-microcond"}
CASES["pixart-alpha"] = ("pixart", {"alpha": True})
PROMPTS = ["a red cube", "two blue spheres", "a green cat"]
SEEDS = [3, 1, 4]


def _pipe(family: str, **options):
    pipe = tiny_pipeline(family, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_images(pipe, family: str, prompts: list[str], seeds: list[int], **settings) -> torch.Tensor:
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    with torch.no_grad():
        out = pipe(prompt=prompts, generator=seed_generators(seeds), output_type="pt", **settings, **extra)
    return out.frames if TINY_NUM_FRAMES[family] else out.images  # a video pipeline returns frames


@pytest.mark.parametrize("variant", CASES)
def test_deterministic_sampling_equals_the_pipeline(variant):
    family, options = CASES[variant]
    pipe = _pipe(family, **options)
    size = TINY_RESOLUTION[family]
    frames = TINY_NUM_FRAMES[family]
    video = {"num_frames": frames} if frames else {}
    settings = dict(num_inference_steps=2, guidance_scale=3.0, height=size, width=size, **video)
    expected = _reference_images(pipe, family, PROMPTS, SEEDS, **settings)
    images = generate(pipe, PROMPTS, seeds=SEEDS, **settings)
    assert images.shape == ((3, frames, 3, size, size) if frames else (3, 3, size, size)) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_ddim_with_eta_equals_the_pipeline_with_eta():
    """DDIMStep draws its noise as DDIMScheduler does, from the per-image generators."""
    pipe = _pipe("sd")
    settings = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32)
    expected = _reference_images(pipe, "sd", PROMPTS[:2], [5, 6], eta=0.8, **settings)
    images = generate(pipe, PROMPTS[:2], seeds=[5, 6], transition=DDIMStep(eta=0.8), **settings)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,transition", [("sd", DDIMStep(eta=0.0)), ("sd3", FlowSDEStep(noise_level=0.0))])
def test_zero_noise_transitions_are_the_deterministic_steps(family, transition):
    pipe = _pipe(family)
    settings = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32)
    deterministic = generate(pipe, PROMPTS[:2], seeds=[0, 1], **settings)
    torch.testing.assert_close(generate(pipe, PROMPTS[:2], seeds=[0, 1], transition=transition, **settings), deterministic,
                               rtol=1e-5, atol=1e-5)


def _normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torch.distributions' Gaussian density, averaged over non-batch dims (DDPO / Flow-GRPO)."""
    log_prob = torch.distributions.Normal(mean.double(), std.double()).log_prob(x.double())
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_log_prob_equals_an_independent_gaussian(prediction_type):
    pipe = _pipe("sd", prediction_type=prediction_type)
    eta, index = 0.7, 1
    setup = prepare(pipe, PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, transition=DDIMStep(eta=eta))
    x = torch.randn(2, *setup.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = step(setup, x, index, generator=torch.Generator().manual_seed(1))
        # Independently: the UNet's prediction and the DDIM posterior from the pipeline scheduler's alphas.
        pipe.scheduler.set_timesteps(4)
        t, t_next = pipe.scheduler.timesteps[index], pipe.scheduler.timesteps[index + 1]
        embeds = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)[0]
        prediction = pipe.unet(x, t, encoder_hidden_states=embeds).sample
    a_t, a_next = pipe.scheduler.alphas_cumprod[t].double(), pipe.scheduler.alphas_cumprod[t_next].double()
    x64, p64 = x.double(), prediction.double()
    if prediction_type == "epsilon":
        eps, x0 = p64, (x64 - (1 - a_t).sqrt() * p64) / a_t.sqrt()
    else:
        eps, x0 = a_t.sqrt() * p64 + (1 - a_t).sqrt() * x64, a_t.sqrt() * x64 - (1 - a_t).sqrt() * p64
    std = eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)).sqrt()
    mean = a_next.sqrt() * x0 + (1 - a_next - std**2).sqrt() * eps
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), _normal_log_prob(out.prev_sample, mean, std), rtol=1e-5, atol=1e-5)
    assert out.log_prob.shape == (2,) and out.log_prob.dtype == torch.float32
    # The drawn x' is DDIMScheduler's own eta step with the same noise.
    noise = (out.prev_sample.double() - mean) / std
    own = pipe.scheduler.step(prediction, t, x, eta=eta, variance_noise=noise.float()).prev_sample
    torch.testing.assert_close(out.prev_sample, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", [0, 2])  # 0: sigma = 1, where Flow-GRPO substitutes sigmas[1]
def test_flow_sde_log_prob_equals_an_independent_gaussian(index):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _pipe("sd3")
    noise_level = 0.7
    setup = prepare(pipe, PROMPTS[:2], num_inference_steps=4, guidance_scale=1.0, transition=FlowSDEStep(noise_level))
    x = torch.randn(2, *setup.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = step(setup, x, index, generator=torch.Generator().manual_seed(1))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(4)
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:2], None, None, do_classifier_free_guidance=False)
        velocity = pipe.transformer(hidden_states=x, timestep=scheduler.timesteps[index].expand(2),
                                    encoder_hidden_states=embeds, pooled_projections=pooled).sample
    sigmas = scheduler.sigmas.double()
    sigma, dt = sigmas[index], sigmas[index + 1] - sigmas[index]
    sigma_in_ratio = sigmas[1] if sigma == 1 else sigma
    std = noise_level * math.sqrt(sigma / (1 - sigma_in_ratio))
    x64, v64 = x.double(), velocity.double()
    mean = x64 * (1 + std**2 / (2 * sigma) * dt) + v64 * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    scale = torch.as_tensor(std * math.sqrt(-dt), dtype=torch.float64)
    torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_prob.double(), _normal_log_prob(out.prev_sample, mean, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pred_x0.double(), x64 - sigma * v64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,transition", [
    ("sd", None), ("sdxl", None), ("sd3", None),  # the schedulers' own steps (DDIM, Euler, flow Euler)
    ("sd", DDIMStep(eta=1.0)), ("flux", FlowSDEStep(noise_level=0.7)),
])
def test_starting_at_step_k_from_a_recorded_state_reproduces_the_rest(family, transition):
    pipe = _pipe(family)
    setup = prepare(pipe, PROMPTS[:2], num_inference_steps=4, guidance_scale=3.0, height=32, width=32, transition=transition)
    x = initial_latents(setup, initial_noise(setup, seed_generators([0, 1])))
    with torch.no_grad():
        full = denoise(setup, x, generator=seed_generators([7, 8]))
        generators = seed_generators([7, 8])
        head = denoise(setup, x, stop=2, generator=generators)
        tail = denoise(setup, head.final, start=2, generator=generators)
    assert len(full.latents) == 5 and torch.equal(tail.timesteps, full.timesteps[2:])
    for got, want in zip(head.latents + tail.latents[1:], full.latents):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    if transition is not None:  # GRPO re-scores recorded transitions: the same log-probs
        assert full.log_probs.shape == (4, 2)
        with torch.no_grad():
            again = [step(setup, full.latents[i], i, prev_sample=full.latents[i + 1]).log_prob for i in range(4)]
        torch.testing.assert_close(torch.stack(again), full.log_probs, rtol=1e-5, atol=1e-5)


def test_branching_candidates_from_one_state():
    """SPO: k candidates for x_{t-1} from one x_t share the transition's mean, not the draw."""
    pipe = _pipe("sd")
    setup = prepare(pipe, PROMPTS[:2], num_inference_steps=4, guidance_scale=3.0, transition=DDIMStep(eta=1.0))
    x = initial_latents(setup, initial_noise(setup, seed_generators([0, 1])))
    with torch.no_grad():
        parent = step(setup, x, 1, generator=seed_generators([2, 3]))
        branches = step(setup.rows([1, 1, 1]), x[1:2].expand(3, *x.shape[1:]), 1, generator=seed_generators([4, 5, 6]))
    for k in range(3):
        torch.testing.assert_close(branches.mean[k], parent.mean[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(branches.prev_sample[0], branches.prev_sample[1])


@pytest.mark.parametrize("family,transition", [("sd", DDIMStep(eta=1.0)), ("flux", FlowSDEStep(noise_level=0.7))])
def test_a_reward_gradient_reaches_the_initial_noise(family, transition):
    pipe = _pipe(family)
    pipe.vae.requires_grad_(False)
    setup = prepare(pipe, PROMPTS[:2], num_inference_steps=2, guidance_scale=3.0, height=32, width=32, transition=transition)
    noise = initial_noise(setup, seed_generators([0, 1])).requires_grad_(True)
    trajectory = denoise(setup, initial_latents(setup, noise), generator=seed_generators([2, 3]))
    images = decode(setup, trajectory.final)
    redness = (images[:, 0] - images[:, 1:].mean(dim=1)).mean(dim=(1, 2))  # (N,): a reward-like score
    redness.sum().backward()
    assert noise.grad is not None and torch.isfinite(noise.grad).all()
    assert all(noise.grad[i].abs().sum() > 0 for i in range(2))  # each image's own noise
    assert trajectory.log_probs.requires_grad  # the policy gradient flows through the means
