"""ReNO: the regulariser, the optimiser loop, best-by-reward selection, the generator, errors."""

import math

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.reno import norm_regularizer, optimize, optimize_latent



def redness(images, prompts):
    """A tiny differentiable reward: mean red minus mean blue, one score per image."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))


def chi_log_pdf(r: float, d: int) -> float:
    """log of the chi density with d degrees of freedom, written out independently."""
    return (1 - d / 2) * math.log(2) - math.lgamma(d / 2) + (d - 1) * math.log(r) - r * r / 2


# ----------------------------------------------------------------------------------------
# The chi-norm regulariser
# ----------------------------------------------------------------------------------------


def test_regularizer_is_chi_negative_log_density_up_to_a_constant():
    d = 4 * 8 * 8
    direction = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()
    sums = []
    for radius in (5.0, 15.0, math.sqrt(d - 1), 30.0, 60.0):
        reg = norm_regularizer(direction * radius).item()
        sums.append(reg + chi_log_pdf(radius, d))
    # reg = -log chi_d(r) + const: the sum is the same constant at every radius.
    assert max(sums) - min(sums) < 1e-6 * abs(sums[0])
    # ... and that constant is the chi log-normaliser, -((d/2 - 1) log 2 + lgamma(d/2)).
    # (The regulariser computes in fp32, hence the tolerances.)
    assert sums[0] == pytest.approx(-((d / 2 - 1) * math.log(2) + math.lgamma(d / 2)), rel=1e-6)


def test_regularizer_gradient_pulls_the_norm_towards_sqrt_d_minus_1():
    d = 4 * 8 * 8
    shell = math.sqrt(d - 1)
    for radius in (0.5 * shell, 2.0 * shell):
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        x = (x / x.norm() * radius).requires_grad_(True)
        norm_regularizer(x).backward()
        # Analytic gradient (1 - (d-1)/r^2) x: radial, pointing out below the shell, in above it.
        expected = (1 - (d - 1) / radius**2) * x.detach()
        torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-5)
        stepped = x.detach() - 0.1 * x.grad
        assert abs(stepped.norm().item() - shell) < abs(radius - shell)
    # Gradient descent on the regulariser alone settles on the shell.
    x = (torch.ones(1, 4, 8, 8) * 0.1).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.2)
    for _ in range(200):
        opt.zero_grad()
        norm_regularizer(x).backward()
        opt.step()
    assert x.norm().item() == pytest.approx(shell, rel=1e-3)


# ----------------------------------------------------------------------------------------
# The loop on a toy generator (identity-like), against hand-written updates
# ----------------------------------------------------------------------------------------


def _toy_generate(latent):
    """(1, 3, 2, 2) latent -> 'image' in (0, 1); monotone, so redness grows with latent[:, 0]."""
    return torch.sigmoid(latent)


def test_nesterov_sgd_with_clipping_matches_hand_formula_and_skips_the_last_step():
    lr, mu, clip, reg_w, iterations = 5.0, 0.9, 0.1, 0.01, 3
    x0 = torch.randn(1, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weight = 2.0
    result = optimize_latent(
        _toy_generate, x0, "p", {"redness": (redness, weight)}, iterations=iterations, lr=lr,
        momentum=mu, nesterov=True, grad_clip=clip, reg_weight=reg_w, progress=False,
    )
    # Independent reference: gradient of loss = reg_w * reg - weight * redness written by hand,
    # clip to norm 0.1, Nesterov: v = mu v + g; x -= lr (g + mu v). Steps = iterations - 1.
    d = 12
    x, v = x0.clone().float().double(), torch.zeros_like(x0)
    trajectory = [x.clone()]
    for _ in range(iterations - 1):
        s = torch.sigmoid(x)
        g_red = torch.zeros_like(x)
        g_red[:, 0] = s[:, 0] * (1 - s[:, 0]) / 4
        g_red[:, 2] = -s[:, 2] * (1 - s[:, 2]) / 4
        r = x.norm()
        g = reg_w * (1 - (d - 1) / r**2) * x - weight * g_red
        g = g * min(1.0, clip / (g.norm().item() + 1e-6))  # clip_grad_norm_'s formula
        v = mu * v + g
        x = x - lr * (g + mu * v)
        trajectory.append(x.clone())
    assert len(result.history) == iterations
    # redness rises along this path, so the best is the last evaluation: x after 2 steps, not 3.
    assert result.best_iteration == iterations - 1
    torch.testing.assert_close(result.latent.double(), trajectory[-1], rtol=1e-5, atol=1e-6)
    for record, xi in zip(result.history, trajectory):
        assert record["latent_norm"] == pytest.approx(xi.norm().item(), rel=1e-5)
        assert record["total"] == pytest.approx(weight * redness(torch.sigmoid(xi), None).item(), rel=1e-5)


def test_one_iteration_evaluates_once_and_never_steps():
    calls = []

    def generate(latent):
        calls.append(latent.detach().clone())
        return torch.sigmoid(latent)

    x0 = torch.randn(1, 3, 2, 2)
    result = optimize_latent(generate, x0, "p", {"r": (redness, 1.0)}, iterations=1, progress=False)
    assert len(calls) == 1 and len(result.history) == 1
    torch.testing.assert_close(result.latent, x0)
    torch.testing.assert_close(result.image, torch.sigmoid(x0)[0])


def test_best_image_is_chosen_by_reward_with_the_regulariser_excluded():
    scripted = iter([1.0, 3.0, 2.0, 2.5])  # the reward peaks at iteration 1
    seen = []

    def generate(latent):
        seen.append(latent.detach().clone())
        return torch.sigmoid(latent)

    def scripted_reward(images, prompts):
        return images.sum() * 0 + next(scripted)  # differentiable, value fixed by the script

    # Start far inside the shell with a strong regulariser: the penalty falls every step, so the
    # objective (reward - penalty) peaks later than the reward does.
    x0 = torch.full((1, 3, 2, 2), 0.05)
    result = optimize_latent(
        generate, x0, "p", {"scripted": (scripted_reward, 1.0)}, iterations=4, lr=1.0, reg_weight=10.0,
        grad_clip=None, progress=False,
    )
    objectives = [h["objective"] for h in result.history]
    assert max(range(4), key=objectives.__getitem__) != 1  # the regulariser would pick another
    assert result.best_iteration == 1
    torch.testing.assert_close(result.latent, seen[1])
    torch.testing.assert_close(result.image, torch.sigmoid(seen[1])[0])
    torch.testing.assert_close(result.initial_latent, x0)


# ----------------------------------------------------------------------------------------
# Through a real (tiny) StableDiffusionPipeline
# ----------------------------------------------------------------------------------------


def test_generator_matches_the_pipeline_and_passes_reward_gradients(turbo_sd_float64):
    from diffalign.sampler import build_generator

    pipe = turbo_sd_float64
    gen = build_generator(pipe, "a red apple", num_inference_steps=1)
    noise = torch.randn(gen.latent_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise.requires_grad_(True)
    image = gen(noise)
    with torch.no_grad():
        reference = pipe("a red apple", latents=noise.detach(), num_inference_steps=1, guidance_scale=0.0,
                         output_type="pt").images
    torch.testing.assert_close(image.detach().float(), reference.float(), rtol=1e-5, atol=1e-5)
    # The reward's gradient reaches the noise, and matches a finite difference along a direction.
    redness(image, ["a red apple"]).sum().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0
    direction = torch.randn(gen.latent_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # Euler steps in fp32 internally, so h cannot be tiny; a large h crosses the kinks of the
    # [0, 1] clamp at the saturated pixels.
    h = 1e-4
    with torch.no_grad():
        plus = redness(gen(noise + h * direction), None)
        minus = redness(gen(noise - h * direction), None)
    finite_difference = ((plus - minus) / (2 * h)).item()
    assert (noise.grad * direction).sum().item() == pytest.approx(finite_difference, rel=1e-3)


def test_three_iterations_raise_a_tiny_reward(turbo_sd):
    result = optimize(turbo_sd, "a red apple", {redness: 100.0}, iterations=3, progress=False)
    assert len(result.history) == 3
    assert result.best_reward > result.initial_reward
    assert result.best_iteration > 0
    assert result.image.shape == (3, 32, 32) and 0 <= result.image.min() and result.image.max() <= 1
    # The returned latent regenerates the returned image through the pipeline itself.
    with torch.no_grad():
        again = turbo_sd("a red apple", latents=result.latent, num_inference_steps=1, guidance_scale=0.0,
                        output_type="pt").images[0]
    torch.testing.assert_close(again, result.image, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_zero_iterations_is_a_clear_error(turbo_sd):
    with pytest.raises(DiffalignError, match="iterations"):
        optimize(turbo_sd, "x", {redness: 1.0}, iterations=0)


def test_unsupported_pipeline_lists_the_supported_ones():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, norm_num_groups=2,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(DiffalignError, match="StableDiffusionPipeline.*FluxPipeline"):
        optimize(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), "x", {redness: 1.0})


def test_unknown_optimizer_and_non_differentiable_reward_are_clear_errors(turbo_sd):
    with pytest.raises(DiffalignError, match="sgd, adam"):
        optimize(turbo_sd, "x", {redness: 1.0}, optimizer="lion")

    def detached(images, prompts):
        return redness(images, prompts).detach()

    with pytest.raises(DiffalignError, match="without gradient"):
        optimize(turbo_sd, "x", {detached: 1.0}, iterations=2, progress=False)


def test_unknown_reward_name_lists_the_registry(turbo_sd):
    import diffalign.rewards

    if "load_reward" not in vars(diffalign.rewards):
        pytest.skip("the reward registry (diffalign.rewards.load_reward) has not landed yet")
    with pytest.raises(DiffalignError, match="unknown reward 'hpsv9'.*pickscore"):
        optimize(turbo_sd, "x", {"hpsv9": 1.0}, iterations=2, progress=False)
