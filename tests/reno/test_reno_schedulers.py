"""The generators use each scheduler's own step(): check its gradient is exact.

A stand-in affine model (eps = 0.5 * scaled x + 0.1) runs two steps through the sampler's
`denoise`. Each step is affine in (sample, model output) for a fixed timestep, so the whole map
is affine and a central difference is exact for any h: a large h keeps the fp32 arithmetic
inside Euler-type steps from blurring it, and any detached term in a step() shows up as a
mismatch.
"""

import pytest
import torch

from diffalign.sampler import SamplingSetup, SchedulerStep, denoise, initial_latents, reset_schedule

SCHEDULERS = [
    ("DDIMScheduler", {"clip_sample": False}),
    ("DDPMScheduler", {"clip_sample": False}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("LCMScheduler", {}),
    ("TCDScheduler", {}),
    ("DPMSolverMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {}),
]


class AffineModel:
    """Just enough of a model adapter for the sampler: the model sees the scheduler's scaled
    input, as the pipelines feed it, and no prompt."""

    denoiser = None
    one_step_image_is_x0 = False

    def sampling_timestep(self, t, n, dtype):
        return t

    def forward(self, denoiser, x, timestep, cond):
        return 0.5 * x + 0.1


def bare_setup(scheduler) -> SamplingSetup:
    setup = SamplingSetup(
        adapter=AffineModel(), cond={}, uncond=None, guidance_scale=1.0, latent_shape=(4, 4, 4), dtype=torch.float64,
        device=torch.device("cpu"), transition=SchedulerStep(), scheduler=scheduler,
        schedule={"num_inference_steps": 2}, timesteps=torch.empty(0),
    )
    setup.timesteps = reset_schedule(setup)
    return setup


@pytest.mark.parametrize("name,config", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_scheduler_step_gradient_matches_finite_difference(name, config):
    import diffusers

    setup = bare_setup(getattr(diffusers, name)(**config))

    def run(noise):
        # A fresh generator per run, as the ReNO generator seeds one per call: stochastic steps
        # (DDPM, Euler-ancestral, LCM, TCD) draw the same noise every time.
        trajectory = denoise(setup, initial_latents(setup, noise), generator=torch.Generator().manual_seed(0))
        return trajectory.final

    draw = torch.Generator().manual_seed(0)
    noise, direction, weights = (torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=draw) for _ in range(3))
    noise.requires_grad_(True)
    (run(noise) * weights).sum().backward()
    analytic = (noise.grad * direction).sum().item()
    h = 0.5
    with torch.no_grad():
        numeric = (((run(noise + h * direction) - run(noise - h * direction)) * weights).sum() / (2 * h)).item()
    assert analytic != 0
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-6)

