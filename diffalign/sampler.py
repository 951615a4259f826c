"""The one generation primitive: a stepwise sampler over a diffusers pipeline's own components.

    images = generate(pipe, prompts, seeds=[0, 1], num_inference_steps=20, guidance_scale=4.0)

equals `pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
num_inference_steps=20, guidance_scale=4.0, output_type="pt").images` (to 1e-5 in fp32, tested
for every family; PixArt without resolution binning). The steps underneath are public:

    setup = prepare(pipe, prompts, num_inference_steps=20, guidance_scale=5.0, transition=DDIMStep(eta=1.0))
    generators = seed_generators([0, 1])
    x = initial_latents(setup, initial_noise(setup, generators))
    trajectory = denoise(setup, x, generator=generators)     # x_t per step, log-probs, predicted x0
    images = decode(setup, trajectory.final)

- `prepare` encodes the prompts once (with the unconditional rows when guidance is on) and sets
  the schedule; the family file (diffalign/models/<family>.py) supplies the encoding, the latent
  shape, the network's timestep and the denoiser call, so nothing here names a family.
- `step(setup, x, i)` is one transition from step i; `denoise(setup, x, start=k)` runs steps
  k..S-1 from x = x_t at step k. SPO branches k candidates from one x_t with
  `step(setup.rows([i] * k), x_t.expand(k, ...), i)`; GRPO re-scores a recorded transition with
  `step(..., prev_sample=x_next, denoiser=policy_or_reference)`.
- Everything runs under the caller's grad mode: no_grad for evaluation, autograd end to end
  for ReNO (`build_generator`). Latents are (N, C, h, w) (FLUX unpacked; the maths below only
  takes means over non-batch dims, so (N, C, F, h, w) video latents fit too).

Transitions (x: the current latent, model output guided by classifier-free guidance)
------------------------------------------------------------------------------------
`SchedulerStep()` - the pipeline scheduler's own `step()`, what pipe() does; no log-prob.

`DDIMStep(eta)` - DDPM families (DDPO's `ddim_step_with_logprob`, SPO). DDIM on the model's
betas, abar_t = alphas_cumprod[t], t' = t - T / S the next timestep, abar_t' =
final_alpha_cumprod when t' < 0 (diffusers' DDIM; DDPO/SPO clamp t' to 0, which is the same for
SD's `set_alpha_to_one=False`):

    x0_hat = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)           epsilon models
    x0_hat = sqrt(abar_t) x - sqrt(1 - abar_t) v,  eps = sqrt(abar_t) v + sqrt(1 - abar_t) x    v models
    std    = eta * sqrt((1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t'))
    mean   = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - std^2) eps
    x'     = mean + std z,   z ~ N(0, I)

`FlowSDEStep(noise_level)` - flow families (Flow-GRPO's `sde_step_with_logprob`, as DanceGRPO):
the Euler step of the flow ODE turned into an SDE with the same marginals. sigma = sigmas[i],
dt = sigmas[i+1] - sigma < 0, v the velocity:

    std    = noise_level * sqrt(sigma / (1 - sigma~)),  sigma~ = sigmas[1] if sigma == 1 else sigma
    mean   = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
    x'     = mean + std sqrt(-dt) z

Per-step log-probability, both stochastic transitions (s = std, resp. std sqrt(-dt)):

    log p(x' | x) = mean over non-batch dims of [ -(x' - mean)^2 / (2 s^2) - log s - log sqrt(2 pi) ]

a mean, not a sum, as DDPO, SPO and Flow-GRPO compute it (their clip ranges and betas assume
it), in fp32, with x' detached so the gradient flows through the mean only. eta = 0 or
noise_level = 0 is the deterministic DDIM / Euler step (no log-prob).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from diffalign.errors import DiffalignError
from diffalign.models import ModelAdapter, detect_family, make_adapter

# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class StepOutput:
    prev_sample: Tensor  # x at the next step
    pred_x0: Tensor | None  # the clean-sample prediction at this step (None: scheduler without one)
    log_prob: Tensor | None = None  # (N,) float32, stochastic transitions only
    mean: Tensor | None = None  # the Gaussian transition's mean and std (GRPO's KL uses them)
    std: Tensor | None = None


@dataclass
class Trajectory:
    latents: list[Tensor]  # x before each step, then the result: steps + 1 entries
    timesteps: Tensor  # (steps,) the scheduler timesteps of the steps taken
    log_probs: Tensor | None  # (steps, N) for stochastic transitions, else None
    pred_x0: list[Tensor | None]  # one per step

    @property
    def final(self) -> Tensor:
        return self.latents[-1]


# ---------------------------------------------------------------------------------------------
# Transitions


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) averaged over non-batch dims, (N,) float32; x is detached."""
    x, mean, std = x.detach().float(), mean.float(), std.float()
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def gaussian_transition(mean: Tensor, std: Tensor, generator: Any, prev_sample: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Draw x' ~ N(mean, std^2) (noise as diffusers' randn_tensor: one generator per image when
    given a list), or score a given `prev_sample`. Returns (x', log-prob or None when std = 0)."""
    from diffusers.utils.torch_utils import randn_tensor

    if prev_sample is None:
        if not bool(std.any()):
            return mean, None
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


@dataclass(frozen=True)
class SchedulerStep:
    """The pipeline scheduler's own `step()`: what `pipe()` does. Stateful schedulers (Euler,
    DPM-Solver) keep their step counter and solver history, so run it through `denoise`; a
    start in the middle is exact for one-step schedulers (DDIM, Euler, flow Euler) only."""

    def make_scheduler(self, pipe: Any) -> Any:
        # A setup owns its scheduler: two setups (or a pipe() call in between) never share state.
        return type(pipe.scheduler).from_config(pipe.scheduler.config)

    def step(self, scheduler: Any, model_output: Tensor, t: Tensor, index: int, x: Tensor, generator: Any = None,
             prev_sample: Tensor | None = None) -> StepOutput:
        if prev_sample is not None:
            raise DiffalignError("the scheduler's own step has no log-prob: use DDIMStep or FlowSDEStep to score a recorded transition")
        # Schedulers that draw noise take the pipeline's generators, as pipelines pass them.
        extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        out = scheduler.step(model_output, t, x, return_dict=True, **extra)
        x0 = getattr(out, "pred_original_sample", None)  # DDIM, DDPM, Euler, LCM report their own
        if x0 is None and knows_x0(scheduler):
            x0 = predicted_x0(scheduler, model_output, t, x, index)
        return StepOutput(out.prev_sample, x0)


@dataclass(frozen=True)
class DDIMStep:
    """DDIM with eta (> 0: stochastic, with its Gaussian log-prob) for DDPM-family models."""

    eta: float = 1.0

    def make_scheduler(self, pipe: Any) -> Any:
        from diffusers import DDIMScheduler

        if type(pipe.scheduler).__name__.startswith("FlowMatch"):
            raise DiffalignError(f"DDIMStep needs a DDPM-family model, not one with {type(pipe.scheduler).__name__}: use FlowSDEStep for flow models")
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if scheduler.config.thresholding:
            raise DiffalignError("DDIMStep does not threshold x0: set thresholding=False in the scheduler config")
        return scheduler

    def step(self, scheduler: Any, model_output: Tensor, t: Tensor, index: int, x: Tensor, generator: Any = None,
             prev_sample: Tensor | None = None) -> StepOutput:
        abar_t, abar_prev = ddim_alphas(scheduler, t)
        x0, eps = ddim_x0_and_eps(scheduler, model_output, x, abar_t)
        std = self.eta * ddim_variance(abar_t, abar_prev) ** 0.5
        mean = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        std = torch.as_tensor(std, device=mean.device)
        x_next, log_prob = gaussian_transition(mean, std, generator, prev_sample)
        return StepOutput(x_next, x0, log_prob, mean, std)


def ddim_alphas(scheduler: Any, t: Tensor) -> tuple[Tensor, Tensor]:
    """(abar_t, abar_t') for DDIM's next timestep t' = t - T / S (diffusers' DDIMScheduler)."""
    t = int(t)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[t], abar_prev


def ddim_variance(abar_t: Tensor, abar_prev: Tensor) -> Tensor:
    """The DDPM posterior variance between the two timesteps (DDIM's eta = 1)."""
    return (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)


def ddim_x0_and_eps(scheduler: Any, model_output: Tensor, x: Tensor, abar_t: Tensor) -> tuple[Tensor, Tensor]:
    """The clean sample and the noise the model output implies (clipped as the scheduler clips)."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        x0, eps = (x - (1 - abar_t) ** 0.5 * model_output) / abar_t**0.5, model_output
    elif prediction == "v_prediction":
        x0 = abar_t**0.5 * x - (1 - abar_t) ** 0.5 * model_output
        eps = abar_t**0.5 * model_output + (1 - abar_t) ** 0.5 * x
    else:
        raise DiffalignError(f"DDIMStep supports epsilon and v_prediction models, not {prediction!r}")
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0, eps


@dataclass(frozen=True)
class FlowSDEStep:
    """The SDE form of the flow-matching Euler step (noise_level > 0: stochastic, with its
    Gaussian log-prob); Flow-GRPO's default noise level is 0.7."""

    noise_level: float = 0.7

    def make_scheduler(self, pipe: Any) -> Any:
        if not type(pipe.scheduler).__name__.startswith("FlowMatchEuler"):
            raise DiffalignError(f"FlowSDEStep needs a flow-matching Euler scheduler, not {type(pipe.scheduler).__name__}: use DDIMStep for DDPM models")
        return type(pipe.scheduler).from_config(pipe.scheduler.config)

    def step(self, scheduler: Any, model_output: Tensor, t: Tensor, index: int, x: Tensor, generator: Any = None,
             prev_sample: Tensor | None = None) -> StepOutput:
        v, x32 = model_output.float(), x.float()  # in fp32, as Flow-GRPO (bf16 overflows the log-prob)
        sigmas = scheduler.sigmas.to(x.device, torch.float32)
        sigma, dt = sigmas[index], sigmas[index + 1] - sigmas[index]
        std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma))) * self.noise_level
        mean = x32 * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        step_std = std * torch.sqrt(-dt)
        scored = None if prev_sample is None else prev_sample.float()
        x_next, log_prob = gaussian_transition(mean, step_std, generator, scored)
        return StepOutput(x_next.to(x.dtype), x32 - sigma * v, log_prob, mean, step_std)


# ---------------------------------------------------------------------------------------------
# Setup: the prompts encoded once, the schedule


@dataclass
class SamplingSetup:
    adapter: ModelAdapter
    cond: dict[str, Tensor]  # batch-first conditional rows
    uncond: dict[str, Tensor] | None  # the unconditional rows under classifier-free guidance
    guidance_scale: float
    latent_shape: tuple[int, ...]  # one image's latent, unpacked
    dtype: torch.dtype  # the latents', as the pipelines: the prompt embeddings' dtype
    device: torch.device
    transition: Any  # SchedulerStep | DDIMStep | FlowSDEStep
    scheduler: Any
    schedule: dict[str, Any]  # retrieve_timesteps arguments, re-applied before each run
    timesteps: Tensor

    def rows(self, index: list[int] | Tensor) -> SamplingSetup:
        """The setup for these prompt rows, e.g. [i] * k to branch k candidates from prompt i."""
        index = torch.as_tensor(index, dtype=torch.long)
        uncond = None if self.uncond is None else select_rows(self.uncond, index)
        return replace(self, cond=select_rows(self.cond, index), uncond=uncond)


def select_rows(rows: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    return {key: value.index_select(0, index.to(value.device)) for key, value in rows.items()}


def prepare(
    pipe: Any,
    prompts: str | list[str],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    timesteps: list[int] | None = None,
    transition: Any = None,
    num_frames: int | None = None,
) -> SamplingSetup:
    """Encode `prompts` once and set the schedule. `pipe` is a diffusers pipeline or a model
    adapter (training code passes its own, e.g. with max_sequence_length set). `timesteps`
    overrides the schedule (PixArt-DMD: [400]); `transition` defaults to SchedulerStep().
    `num_frames`: video families only (None: the pipeline's default length)."""
    adapter = pipe if isinstance(pipe, ModelAdapter) else make_adapter(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    transition = transition or SchedulerStep()
    default_height, default_width = adapter.default_size()
    height, width = height or default_height, width or default_width
    with torch.no_grad():
        cond, uncond = adapter.sampling_condition(prompts, guidance_scale, height, width)
    latent_shape = adapter.latent_shape(height, width, **video_options(adapter, num_frames))
    scheduler = transition.make_scheduler(adapter.pipe)
    options = adapter.schedule_options(scheduler, latent_shape, num_inference_steps, timesteps is not None)
    schedule = {"num_inference_steps": None if timesteps is not None else num_inference_steps, "timesteps": timesteps, **options}
    device = adapter.pipe._execution_device
    # The prompt embeddings' dtype (they come first), unless the family keeps its own (Wan: fp32).
    dtype = getattr(adapter, "latent_dtype", None) or next(v.dtype for v in cond.values() if v.is_floating_point())
    setup = SamplingSetup(adapter, cond, uncond, guidance_scale, latent_shape, dtype, device, transition,
                          scheduler, schedule, timesteps=torch.empty(0))
    setup.timesteps = reset_schedule(setup)
    return setup


def video_options(adapter: ModelAdapter, num_frames: int | None) -> dict[str, int]:
    """`latent_shape`'s frame count for a video family; an image family refuses one."""
    if not getattr(adapter, "video", False):
        if num_frames is not None:
            raise DiffalignError(f"num_frames={num_frames} is for video models, not {adapter.family}: leave it unset")
        return {}
    return {} if num_frames is None else {"num_frames": int(num_frames)}


def reset_schedule(setup: SamplingSetup, start: int = 0) -> Tensor:
    """Set the scheduler's timesteps afresh (schedulers count steps and keep solver history) and
    point it at step `start`. Returns the timesteps."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    timesteps, _ = retrieve_timesteps(setup.scheduler, device=setup.device, **setup.schedule)
    if hasattr(setup.scheduler, "set_begin_index"):  # index-counting schedulers: start here
        setup.scheduler.set_begin_index(start)
    return timesteps


def seed_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image, as `pipe(generator=[...])` takes them."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(setup: SamplingSetup, generator: torch.Generator | list[torch.Generator]) -> Tensor:
    """N(0, I) latents (N, *latent_shape), drawn as the pipelines draw them (diffusers'
    randn_tensor: with a list, image i from generator i), so a seed gives pipe()'s image."""
    from diffusers.utils.torch_utils import randn_tensor

    n = len(generator) if isinstance(generator, list) else next(iter(setup.cond.values())).shape[0]
    return randn_tensor((n, *setup.latent_shape), generator=generator, device=setup.device, dtype=setup.dtype)


def initial_latents(setup: SamplingSetup, noise: Tensor) -> Tensor:
    """x at the first step: the noise scaled by the scheduler's initial sigma, as the DDPM-family
    pipelines do (1 except for sigma-space schedulers such as Euler); flow schedulers have none
    and start at the noise itself."""
    noise = noise.to(setup.device, setup.dtype)
    init_sigma = getattr(setup.scheduler, "init_noise_sigma", None)
    return noise if init_sigma is None else noise * init_sigma


# ---------------------------------------------------------------------------------------------
# Stepping


def guided_output(setup: SamplingSetup, denoiser: torch.nn.Module, x: Tensor, t: Tensor) -> Tensor:
    """The model output at step t with classifier-free guidance, computed as the pipelines do:
    one forward over [unconditional, conditional] rows, then uncond + g (cond - uncond)."""
    guided = setup.uncond is not None
    x_in = torch.cat([x, x]) if guided else x
    scale = getattr(setup.scheduler, "scale_model_input", None)  # sigma-space schedulers scale it; flow ones have none
    if scale is not None:
        x_in = scale(x_in, t)
    cond = {k: torch.cat([setup.uncond[k], v]) for k, v in setup.cond.items()} if guided else setup.cond
    timestep = setup.adapter.sampling_timestep(t, x_in.shape[0], x_in.dtype)
    out = setup.adapter.forward(denoiser, x_in, timestep, cond)
    if not guided:
        return out
    uncond_out, cond_out = out.chunk(2)
    return uncond_out + setup.guidance_scale * (cond_out - uncond_out)


def step(setup: SamplingSetup, x: Tensor, index: int, *, denoiser: torch.nn.Module | None = None, generator: Any = None,
         prev_sample: Tensor | None = None) -> StepOutput:
    """One transition from step `index` (x = x_t there). `denoiser`: the network to run (default
    the pipeline's; pass the policy or the reference); `prev_sample`: score this x' instead of
    drawing one (stochastic transitions)."""
    t = setup.timesteps[index]
    model_output = guided_output(setup, setup.adapter.denoiser if denoiser is None else denoiser, x, t)
    return setup.transition.step(setup.scheduler, model_output, t, index, x, generator, prev_sample)


def denoise(setup: SamplingSetup, x: Tensor, *, start: int = 0, stop: int | None = None,
            denoiser: torch.nn.Module | None = None, generator: Any = None) -> Trajectory:
    """Run steps start..stop-1 from x (x_t at step `start`) and return the trajectory."""
    stop = len(setup.timesteps) if stop is None else stop
    reset_schedule(setup, start)
    latents, x0s, log_probs = [x], [], []
    for index in range(start, stop):
        out = step(setup, x, index, denoiser=denoiser, generator=generator)
        x = out.prev_sample
        latents.append(x)
        x0s.append(out.pred_x0)
        log_probs.append(out.log_prob)
    if setup.adapter.one_step_image_is_x0 and len(setup.timesteps) == 1 and isinstance(setup.transition, SchedulerStep):
        latents[-1] = x0s[-1]  # as PixArt-alpha's pipeline: a one-step (DMD) model's image is its x0
    stochastic = bool(log_probs) and all(lp is not None for lp in log_probs)
    return Trajectory(latents, setup.timesteps[start:stop], torch.stack(log_probs) if stochastic else None, x0s)


def decode(setup: SamplingSetup, latents: Tensor) -> Tensor:
    """Latents -> (N, 3, H, W) images (video families: (N, F, 3, H, W)) in [0, 1], through the
    family's VAE decode.

    Contiguous, as `pipe(output_type="pt")` returns them: the VAE's last convolution may hand
    back another memory layout, and a reduction over it sums in another order."""
    return setup.adapter.decode_latents(latents).contiguous()


def pipeline_defaults(pipe: Any) -> dict[str, Any]:
    """The pipeline's own `num_inference_steps` and `guidance_scale` defaults (its __call__'s)."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    return {name: parameters[name].default for name in ("num_inference_steps", "guidance_scale")}


def generate(
    pipe: Any,
    prompts: str | list[str],
    *,
    seeds: list[int] | None = None,
    noise: Tensor | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    timesteps: list[int] | None = None,
    transition: Any = None,
    num_frames: int | None = None,
) -> Tensor:
    """Images (N, 3, H, W) float32 in [0, 1] for `prompts`, one per prompt, under no_grad;
    videos (N, F, 3, H, W) for a video family (`num_frames` F, None: the pipeline's default).

    Image i starts from `torch.Generator().manual_seed(seeds[i])` (or from `noise`, the
    unpacked latents); None steps/guidance take the pipeline's own defaults. With the default
    transition this is `pipe(prompt=prompts, generator=[...], output_type="pt", ...).images`
    (`.frames` for videos)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if (seeds is None) == (noise is None):
        raise DiffalignError("generate needs seeds (one per prompt) or noise, not both: pass seeds=[0, 1, ...]")
    if seeds is not None and len(seeds) != len(prompts):
        raise DiffalignError(f"{len(seeds)} seeds for {len(prompts)} prompts: pass one seed per prompt")
    defaults = pipeline_defaults(pipe)
    steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    with torch.no_grad():
        setup = prepare(pipe, prompts, num_inference_steps=steps, guidance_scale=scale, height=height, width=width,
                        timesteps=timesteps, transition=transition, num_frames=num_frames)
        generators = seed_generators(seeds) if seeds is not None else None
        start = initial_noise(setup, generators) if noise is None else noise
        trajectory = denoise(setup, initial_latents(setup, start), generator=generators)
        return decode(setup, trajectory.final)


# ---------------------------------------------------------------------------------------------
# The clean-sample prediction of a scheduler step


DDPM_FAMILY = {
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
    "LCMScheduler", "TCDScheduler", "DDIMParallelScheduler", "DDPMParallelScheduler",
}
SIGMA_FAMILY = {
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
    "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
}


def knows_x0(scheduler: Any) -> bool:
    name = type(scheduler).__name__
    return name in DDPM_FAMILY or name in SIGMA_FAMILY or name.startswith("FlowMatch")


def _current_sigma(scheduler: Any, timestep: Tensor | float, index: int | None) -> Tensor:
    if index is None:  # before the step: step_index points at it (None until the first step)
        index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(timestep)
    return scheduler.sigmas[index]


def predicted_x0(scheduler: Any, model_output: Tensor, timestep: Tensor | float, sample: Tensor, index: int | None = None) -> Tensor:
    """The clean-sample prediction of one scheduler step, from the step's own inputs:

    - DDPM family (x-space samples), abar = alphas_cumprod[t]:
      epsilon: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar);  v: x0 = sqrt(abar) x - sqrt(1 - abar) v
    - k-diffusion family (Euler, Heun, LMS, KDPM2: sigma-space samples x = x0 + sigma eps):
      epsilon: x0 = x - sigma eps;  v: x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)
    - flow matching (x = (1 - sigma) x0 + sigma noise, velocity v = noise - x0): x0 = x - sigma v

    `index`: the step's position in the schedule, when the caller knows it.
    """
    name = type(scheduler).__name__
    prediction = scheduler.config.get("prediction_type", "epsilon")
    out, x = model_output.float(), sample.float()
    if name.startswith("FlowMatch") or prediction == "flow_prediction":
        return x - _current_sigma(scheduler, timestep, index).float().to(x.device) * out
    if name in SIGMA_FAMILY:
        sigma = _current_sigma(scheduler, timestep, index).float().to(x.device)
        if prediction == "epsilon":
            return x - sigma * out
        if prediction == "v_prediction":
            return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5
    elif name in DDPM_FAMILY:
        abar = scheduler.alphas_cumprod[int(timestep)].float().to(x.device)
        if prediction == "epsilon":
            return _clip_like_scheduler(scheduler, (x - (1 - abar).sqrt() * out) / abar.sqrt())
        if prediction == "v_prediction":
            return _clip_like_scheduler(scheduler, abar.sqrt() * x - (1 - abar).sqrt() * out)
    else:
        known = ", ".join(sorted(DDPM_FAMILY | SIGMA_FAMILY)) + ", FlowMatch*"
        raise DiffalignError(f"scheduler {name} is not supported for x0 prediction: use one of {known}")
    if prediction == "sample":
        return out
    raise DiffalignError(f"prediction_type {prediction!r} of {name} is not supported: use epsilon, v_prediction or sample")


def _clip_like_scheduler(scheduler: Any, x0: Tensor) -> Tensor:
    # DDPM/DDIM clip their own x0 prediction when clip_sample is set (dynamic thresholding is not mirrored).
    if scheduler.config.get("clip_sample", False):
        limit = scheduler.config.get("clip_sample_range", 1.0)
        return x0.clamp(-limit, limit)
    return x0


# ---------------------------------------------------------------------------------------------
# ReNO: the image as a differentiable function of the initial noise


@dataclass
class Generator:
    """A differentiable map from the initial noise (float32, `latent_shape`) to (1, 3, H, W)."""

    family: str
    latent_shape: tuple[int, ...]  # the layout of the pipeline's `latents=` (FLUX: packed tokens)
    device: torch.device
    dtype: torch.dtype  # the pipeline's compute dtype; the noise is cast to it inside
    generate: Callable[[Tensor], Tensor]

    def __call__(self, latent: Tensor) -> Tensor:
        return self.generate(latent)


def pipeline_family(pipe: Any) -> str:
    """The family name of `pipe`, or a DiffalignError listing the supported pipelines."""
    return detect_family(pipe)


def build_generator(
    pipe: Any,
    prompt: str,
    *,
    num_inference_steps: int = 1,
    guidance_scale: float = 0.0,
    timesteps: list[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = True,
    num_frames: int | None = None,
) -> Generator:
    """The differentiable generator of `pipe` for one prompt (ReNO): the prompt encoded once,
    then noise -> `denoise` under autograd -> VAE decode.

    `guidance_scale` > 1 turns on classifier-free guidance (empty negative prompt); turbo models
    use 0. `timesteps` overrides the scheduler's schedule (PixArt-DMD: [400], Hyper-SD: [800]).
    `seed` fixes the noise of stochastic schedulers, so every call is the same function. The noise
    has the layout of the pipeline's `latents=` argument, so `pipe(prompt, latents=result.latent)`
    reproduces an optimised image. Video families give (1, F, 3, H, W) for `num_frames` F.
    """
    if num_inference_steps < 1:
        raise DiffalignError(f"num_inference_steps={num_inference_steps}: use 1 to 4 steps")
    adapter = make_adapter(pipe)
    # Only the noise is optimised: freeze the networks so backward skips their weight gradients.
    adapter.denoiser.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    if gradient_checkpointing:
        # Recompute activations in backward: the VAE decoder at full resolution dominates memory.
        pipe.vae.enable_gradient_checkpointing()
        if adapter.denoiser._supports_gradient_checkpointing:
            adapter.denoiser.enable_gradient_checkpointing()
    setup = prepare(adapter, [prompt], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    height=height, width=width, timesteps=timesteps, num_frames=num_frames)
    noise_shape = tuple(adapter.to_pipeline_latents(torch.zeros(1, *setup.latent_shape)).shape)

    def generate(noise: Tensor) -> Tensor:
        x = initial_latents(setup, adapter.from_pipeline_latents(noise, setup.latent_shape))
        trajectory = denoise(setup, x, generator=torch.Generator(setup.device).manual_seed(seed))
        return decode(setup, trajectory.final)

    return Generator(adapter.family, noise_shape, setup.device, setup.dtype, generate)
