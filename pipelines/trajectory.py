"""Reward of the predicted clean image x0 along a sampling trajectory.

`RewardTrajectoryCallback` is a `callback_on_step_end` for any diffusers pipeline. The callback
alone only sees the latents *after* a scheduler step, which do not determine x0; so while
attached it also wraps `pipe.scheduler.step` to keep that step's inputs (the guided model
output, the timestep and the sample) and computes x0 from them exactly
(`diffalign.sampler.predicted_x0`):

- DDPM family (x-space samples, `alphas_cumprod`), abar = alphas_cumprod[t]:
  epsilon: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar);  v: x0 = sqrt(abar) x - sqrt(1 - abar) v
- k-diffusion family (Euler, Heun, LMS, KDPM2: sigma-space samples x = x0 + sigma eps):
  epsilon: x0 = x - sigma eps;  v: x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)
- flow matching (x = (1 - sigma) x0 + sigma noise, velocity v = noise - x0): x0 = x - sigma v
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from diffalign.errors import DiffalignError
from diffalign.sampler import predicted_x0  # the x0 maths lives with the sampler


def decode_latents(pipe: Any, latents: Tensor) -> Tensor:
    """VAE-decode (B, C, h, w) latents to images in [0, 1] (SD, SDXL, SD3, PixArt layouts)."""
    if latents.ndim != 4:
        raise DiffalignError(
            f"latents of shape {tuple(latents.shape)} are packed or video latents: pass decode=<your function> "
            "that maps them to (B, 3, H, W) images in [0, 1]"
        )
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
    images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class RewardTrajectoryCallback:
    """Records reward(decode(x0_hat)) every `every` steps. Use it attached:

        tracker = RewardTrajectoryCallback(reward, prompt)
        with tracker.attached(pipe):
            pipe(prompt, callback_on_step_end=tracker, output_type="pt")
        tracker.scores  # (S, B) float32; tracker.steps, tracker.timesteps
    """

    tensor_inputs = ["latents"]

    def __init__(self, reward: Any, prompts: str | list[str], every: int = 1,
                 decode: Callable[[Any, Tensor], Tensor] | None = None, keep_images: bool = False):
        from diffalign.rewards import as_reward

        if every < 1:
            raise DiffalignError(f"every={every} must be at least 1")
        self.reward = as_reward(reward)
        self.prompts = prompts
        self.every = every
        self.decode = decode or decode_latents
        self.keep_images = keep_images
        self.steps: list[int] = []
        self.timesteps: list[float] = []
        self._scores: list[Tensor] = []
        self.images: list[Tensor] = []
        self._pending: tuple[Tensor, Any, Tensor] | None = None
        self._scheduler: Any = None

    @contextmanager
    def attached(self, pipe: Any) -> Iterator["RewardTrajectoryCallback"]:
        """Wrap `pipe.scheduler.step` (an instance attribute, removed on exit) to see each step's inputs."""
        scheduler = pipe.scheduler
        original = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            self._pending = (model_output.detach(), timestep, sample.detach())
            return original(model_output, timestep, sample, *args, **kwargs)

        self._scheduler = scheduler
        scheduler.step = step
        try:
            yield self
        finally:
            del scheduler.step  # the class method shows through again
            self._scheduler = None

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self._scheduler is None or self._pending is None:
            raise DiffalignError("RewardTrajectoryCallback is not attached: run the pipeline inside `with tracker.attached(pipe):`")
        if step % self.every == 0:
            model_output, t, sample = self._pending
            with torch.no_grad():
                x0 = predicted_x0(self._scheduler, model_output, t, sample)
                images = self.decode(pipe, x0.to(sample.dtype))
                scores = self.reward.score(images, self._prompts_for(images.shape[0]))
            self.steps.append(step)
            self.timesteps.append(float(t))
            self._scores.append(scores.detach().cpu())
            if self.keep_images:
                self.images.append(images.detach().cpu())
        return callback_kwargs

    def _prompts_for(self, batch: int) -> list[str]:
        if isinstance(self.prompts, str):
            return [self.prompts] * batch
        if len(self.prompts) == batch:
            return list(self.prompts)
        if batch % len(self.prompts) == 0:  # num_images_per_prompt > 1: prompts repeat in order
            return [p for p in self.prompts for _ in range(batch // len(self.prompts))]
        raise DiffalignError(f"{len(self.prompts)} prompts for a batch of {batch}: pass the pipeline's prompts")

    @property
    def scores(self) -> Tensor:
        """(S, B) rewards of the predicted x0, one row per recorded step."""
        if not self._scores:
            raise DiffalignError("no steps recorded yet: run the pipeline with callback_on_step_end=tracker")
        return torch.stack(self._scores)
