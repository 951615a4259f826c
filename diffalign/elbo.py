"""The likelihood core: the noising maths and per-image denoising errors for groups of K images.

Diffusion-DPO and its relatives compare how well a model denoises the images of one prompt,
so every image of a group must see the *same* noise and the *same* timestep (otherwise the
error difference is dominated by the noise draw, not by the model). For B groups of K images:

    noise: one (C, h, w) draw per group, shared by its K images
    t:     one timestep per group
    err:   mean over C, h, w of (pred - target)^2 in fp32, shape (B, K)

The forward processes, by the adapter's `prediction_type`:

    DDPM (epsilon | v_prediction), abar_t = alphas_cumprod[t], t uniform in {0, ..., T-1}:
        x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
        target = noise                                        (epsilon)
        target = sqrt(abar_t) noise - sqrt(1 - abar_t) x0     (v, Salimans & Ho 2022)
    flow (rectified flow, SD3/FLUX), sigma = sigmoid(u), u ~ N(logit_mean, logit_std^2):
        x_t = (1 - sigma) x0 + sigma noise
        target = noise - x0                                   (the velocity d x_t / d sigma)

The DDPM formulas are computed in the order of diffusers' DDPMScheduler.add_noise /
get_velocity, so they agree bit for bit. The loop draws a step's noise and t once for its
global batch (`draw_noise_and_timesteps`) and gives each process its rows; nothing here knows
about processes. The policy runs once over the B*K batch; the reference (when the objective
needs one) runs the same inputs under no_grad. Means over "C, h, w" are means over every
non-batch dim, so 5-D video latents work unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Draws


def draw_noise_and_timesteps(adapter, latent_shape: tuple[int, ...], n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """noise (n, *latent_shape) float32 and t (n,), drawn in that order from `generator`, on
    its device (the CPU: the same numbers on every machine). One row per group."""
    noise = torch.randn((n, 1, *latent_shape), generator=generator, dtype=torch.float32)[:, 0]
    return noise, draw_timesteps(adapter, n, generator)


def draw_timesteps(adapter, n: int, generator: torch.Generator) -> Tensor:
    """DDPM: uniform integers in [0, T). Flow: sigma ~ logit-normal(logit_mean, logit_std), as
    SD3's training scripts (flow_grpo uses 0, 1), mapped into the adapter's `sigma_range`
    (lo, hi) when it has one: lo + (hi - lo) sigma (a Wan 2.2 expert trains on its own noise levels)."""
    if adapter.prediction_type == "flow":
        u = torch.randn(n, generator=generator, device=generator.device) * adapter.logit_std + adapter.logit_mean
        low, high = getattr(adapter, "sigma_range", (0.0, 1.0))
        sigma = torch.sigmoid(u)
        return sigma if (low, high) == (0.0, 1.0) else low + (high - low) * sigma
    return torch.randint(0, adapter.num_train_timesteps, (n,), generator=generator, device=generator.device)


# ---------------------------------------------------------------------------------------------
# Forward process and targets


def add_noise(adapter, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t for per-sample t (see the module docstring)."""
    if adapter.prediction_type == "flow":
        sigma = per_sample(t, x0)
        return (1 - sigma) * x0 + sigma * noise
    sqrt_abar, sqrt_one_minus_abar = ddpm_coefficients(adapter.alphas_cumprod, t, x0)
    return sqrt_abar * x0 + sqrt_one_minus_abar * noise


def target(adapter, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the network learns to predict at x_t: epsilon, v, or the flow velocity."""
    if adapter.prediction_type == "flow":
        return noise - x0
    if adapter.prediction_type == "v_prediction":
        sqrt_abar, sqrt_one_minus_abar = ddpm_coefficients(adapter.alphas_cumprod, t, noise)
        return sqrt_abar * noise - sqrt_one_minus_abar * x0
    return noise


def ddpm_coefficients(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) per sample, shaped to broadcast against `like`."""
    abar = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    return per_sample(abar**0.5, like), per_sample((1 - abar) ** 0.5, like)


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, 1, ...) broadcastable against `like`, in its dtype and device."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# Errors


def flatten_groups(x: Tensor) -> Tensor:
    """(B, K, ...) -> (B*K, ...), group-major: image j of group i lands at row i*K + j."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def repeat_per_image(t: Tensor, k: int) -> Tensor:
    """(B, ...) -> (B*K, ...) in the same group-major order as flatten_groups."""
    return t.repeat_interleave(k, dim=0)


def denoising_errors(adapter, denoiser: torch.nn.Module, latents: Tensor, cond: dict[str, Tensor], noise: Tensor,
                     t: Tensor) -> Tensor:
    """Per-image mean squared error of the denoiser's prediction, (B, K) float32.

    latents: (B, K, C, h, w); noise: (B, C, h, w), one draw per group; cond: batch-first
    tensors with B*K rows (group-major); t: (B,). One forward over all B*K images.
    """
    b, k = latents.shape[:2]
    x0 = flatten_groups(latents)
    eps = repeat_per_image(noise.to(x0.device, x0.dtype), k)
    tt = repeat_per_image(t.to(x0.device), k)
    pred = adapter.predict(denoiser, add_noise(adapter, x0, eps, tt), tt, cond)
    err = (pred.float() - target(adapter, x0, eps, tt).float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    return err.view(b, k)


def policy_and_reference_errors(
    adapter,
    denoiser: torch.nn.Module,
    latents: Tensor,
    cond: dict[str, Tensor],
    noise: Tensor,
    t: Tensor,
    reference: Callable[[], "torch.nn.Module"] | None,
) -> tuple[Tensor, Tensor | None]:
    """Errors (B, K) of the policy and (when `reference` is given) of the reference, on the
    same noise (B, C, h, w) and t (B,).

    `reference` is a context-manager factory yielding the reference network (the same module
    with LoRA disabled, or a frozen copy). Returns (err, ref_err or None).
    """
    ref_err = None
    if reference is not None:
        with torch.no_grad(), reference() as ref_model:
            ref_err = denoising_errors(adapter, ref_model, latents, cond, noise, t)
    err = denoising_errors(adapter, denoiser, latents, cond, noise, t)
    return err, ref_err
