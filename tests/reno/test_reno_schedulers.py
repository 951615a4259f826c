"""The generators use each scheduler's own step(): check its gradient is exact.

A stand-in affine model (eps = 0.5 * scaled x + 0.1) runs two steps through `_denoise`. Each
step is affine in (sample, model output) for a fixed timestep, so the whole map is affine and a
central difference is exact for any h: a large h keeps the fp32 arithmetic inside Euler-type
steps from blurring it, and any detached term in a step() shows up as a mismatch.
"""

from types import SimpleNamespace

import pytest
import torch

from diffalign.reno_generators import _denoise, _retrieve_timesteps

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


@pytest.mark.parametrize("name,config", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_scheduler_step_gradient_matches_finite_difference(name, config):
    import diffusers

    pipe = SimpleNamespace(scheduler=getattr(diffusers, name)(**config))

    def run(noise):
        timesteps = _retrieve_timesteps(pipe.scheduler, 2, "cpu")
        sigma = getattr(pipe.scheduler, "init_noise_sigma", 1.0)  # flow matching starts at noise
        return _denoise(pipe, noise * sigma, timesteps, predict, seed=0, device="cpu")

    def predict(x, t):
        # As the generators do: the model sees the scheduler's scaled input.
        scale = getattr(pipe.scheduler, "scale_model_input", None)
        return 0.5 * (scale(x, t) if scale else x) + 0.1

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
