"""The shared likelihood core: per-image denoising errors for groups of K images.

Diffusion-DPO and its relatives compare how well a model denoises the images of one prompt,
so every image of a group must see the *same* noise and the *same* timestep (otherwise the
error difference is dominated by the noise draw, not by the model). For B groups of K images:

    noise: one (C, h, w) draw per group, shared by its K images
    t:     one timestep per group (uniform integer for DDPM models, sigma for flow models)
    err:   mean over C, h, w of (pred - target)^2 in fp32, shape (B, K)

The policy runs once over the B*K batch. The reference (when the objective needs one) runs
the same inputs under no_grad.
"""

from __future__ import annotations

from typing import Callable

import torch


def shared_noise_and_timesteps(
    adapter, latents: torch.Tensor, generator: torch.Generator, rows: slice | None = None, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """latents (B, K, C, h, w) -> noise (B, K, C, h, w) equal across K, and t (B,).

    `rows`: this process's slice of the global batch of `total` groups. Every process draws the
    noise of the whole global batch from the same generator and keeps its rows, so N processes
    with B groups each see exactly what one process with N*B groups sees.
    """
    b, k = latents.shape[:2]
    rows = rows or slice(0, b)
    total = total or rows.stop
    noise = torch.randn((total, 1, *latents.shape[2:]), generator=generator, dtype=torch.float32)[rows]
    noise = noise.to(latents.device).expand(b, k, *latents.shape[2:])
    t = adapter.sample_timesteps(total, generator=generator)[rows].to(latents.device)
    return noise, t


def flatten_groups(x: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) -> (B*K, ...), group-major: image j of group i lands at row i*K + j."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def repeat_per_image(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) -> (B*K,) in the same group-major order as flatten_groups."""
    return t.repeat_interleave(k, dim=0)


def denoising_errors(
    adapter,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    noise: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Per-image mean squared error of the denoiser's prediction, (B, K) float32.

    latents/noise: (B, K, C, h, w); cond: batch-first tensors with B*K rows (group-major);
    t: (B,). One forward over all B*K images.
    """
    b, k = latents.shape[:2]
    x0 = flatten_groups(latents)
    eps = flatten_groups(noise).to(x0.dtype)
    tt = repeat_per_image(t, k)
    xt = adapter.add_noise(x0, eps, tt)
    target = adapter.target(x0, eps, tt)
    pred = adapter.predict(denoiser, xt, tt, cond)
    err = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    return err.view(b, k)


def policy_and_reference_errors(
    adapter,
    denoiser: torch.nn.Module,
    latents: torch.Tensor,
    cond: dict[str, torch.Tensor],
    generator: torch.Generator,
    reference: Callable[[], "torch.nn.Module"] | None,
    rows: slice | None = None,
    total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Errors of the policy and (when `reference` is given) of the reference on shared noise.

    `reference` is a context-manager factory yielding the reference network (the same module
    with LoRA disabled, or a frozen copy). Returns (err, ref_err or None, t).
    """
    noise, t = shared_noise_and_timesteps(adapter, latents, generator, rows, total)
    ref_err = None
    if reference is not None:
        with torch.no_grad(), reference() as ref_model:
            ref_err = denoising_errors(adapter, ref_model, latents, cond, noise, t)
    err = denoising_errors(adapter, denoiser, latents, cond, noise, t)
    return err, ref_err, t
