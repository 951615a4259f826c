"""ReNO: reward-based initial-noise optimisation (Eyring et al., NeurIPS 2024, arXiv 2406.04312).

Optimise the initial noise eps of a one- or few-step generator G against weighted rewards:

    max_eps  sum_i w_i R_i(G(eps, c), c)  -  reg_weight * (0.5 ||eps||^2 - (d - 1) log ||eps||)

The penalty is the negative log-density of the chi distribution with d = numel(eps) degrees of
freedom (the law of ||eps|| for Gaussian eps): it keeps eps on the Gaussian shell, radius about
sqrt(d - 1). As in ExplainableML/ReNO (training/trainer.py): SGD with Nesterov momentum
(lr 5, momentum 0.9), the latent's gradient norm clipped to 0.1, the best image kept by reward
alone (penalty excluded), and no optimiser step after the last evaluation.

    from diffalign.reno import optimize
    result = optimize(pipe, "a cat", rewards={"hpsv2.1": 5.0, "pickscore": 0.05}, iterations=50)
    result = optimize(pipe, "a cat", rewards="hpsv2.1@ckpt/HPS_v2.1_compressed.pt=5,pickscore=0.05")
    result.image, result.latent, result.history

Rewards are reward specs (diffalign.edges, `NAME[@PATH][=WEIGHT]`, a missing weight counting 1),
or {spec | Reward | callable: weight}.

`diffalign reno ...` (`add_arguments`, `run`) is the command-line front end; the generators
(pipeline -> differentiable function of the noise) come from `diffalign.sampler.build_generator`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from diffalign.edges import (default_device, load_pipeline, load_rewards, parse_dtype, parse_reward_specs,
                             read_prompts, sampling_defaults)
from diffalign.errors import DiffalignError

# The paper's reward mix (ReNO arguments.py); the registry names map to the same models.
DEFAULT_REWARDS = {"hpsv2.1": 5.0, "imagereward": 1.0, "pickscore": 0.05, "clip": 0.01}
# The generator's settings when neither the command line nor the model folder's diffalign.json
# gives them: ReNO's one-step models (SD-Turbo, SDXL-Turbo, ...) run one step without guidance.
RENO_SAMPLING = {"num_inference_steps": 1, "guidance_scale": 0.0}
OPTIMIZERS = ("sgd", "adam")

RewardFn = Callable[[Tensor, list], Tensor]  # (images (B,3,H,W) in [0,1], prompts) -> (B,)


@dataclass
class RenoResult:
    """What `optimize` returns. Images are float32 (3, H, W) in [0, 1] on the CPU."""

    image: Tensor  # the best image by (weighted) reward, the regulariser excluded
    latent: Tensor  # the initial noise that produced it, in the pipeline's `latents=` layout
    best_iteration: int
    initial_image: Tensor
    initial_latent: Tensor
    # One entry per evaluation: iteration, total (weighted reward), rewards {name: score},
    # regularizer (weighted), objective (total - regularizer), latent_norm.
    history: list[dict] = field(default_factory=list)

    @property
    def initial_reward(self) -> float:
        return self.history[0]["total"]

    @property
    def best_reward(self) -> float:
        return self.history[self.best_iteration]["total"]


def norm_regularizer(latent: Tensor) -> Tensor:
    """0.5 r^2 - (d - 1) log r with r = ||latent|| and d = numel(latent[0]), in fp32.

    This is -log chi_d(r) up to a constant; its minimum is at r = sqrt(d - 1).
    """
    d = math.prod(latent.shape[1:])
    r = torch.linalg.vector_norm(latent.float())  # fp32: r^2 overflows fp16 at SD sizes
    return 0.5 * r**2 - (d - 1) * torch.log(r)


def make_optimizer(
    name: str, latent: Tensor, lr: float, momentum: float = 0.9, nesterov: bool = True
) -> torch.optim.Optimizer:
    """ReNO's optimisers (training/optim.py): Nesterov SGD by default, or Adam with eps 1e-2."""
    if name == "sgd":
        if nesterov and momentum <= 0:
            raise DiffalignError("nesterov=True needs momentum > 0: set momentum (ReNO: 0.9) or nesterov=False")
        return torch.optim.SGD([latent], lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam([latent], lr=lr, eps=1e-2)
    raise DiffalignError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def reward_items(rewards: str | Mapping[Any, float]) -> list[tuple[Any, float]]:
    """A spec string, or {spec | Reward | callable: weight} -> [(RewardSpec | object, weight)],
    every spec checked: this fails before anything heavy loads."""
    if isinstance(rewards, str):
        return [(spec, 1.0 if spec.weight is None else spec.weight) for spec in parse_reward_specs(rewards)]
    if not rewards:
        raise DiffalignError("no rewards given: pass rewards={'hpsv2.1': 5.0, ...} (or --reward NAME[@PATH][=WEIGHT],...)")
    items = []
    for key, weight in rewards.items():
        if isinstance(key, str):
            specs = parse_reward_specs(key)
            if len(specs) != 1 or specs[0].weight is not None:
                raise DiffalignError(f"reward key {key!r}: give one NAME[@PATH] per key and its weight as the value")
            key = specs[0]
        items.append((key, float(weight)))
    return items


def check_reward_names(rewards: str | Mapping[Any, float]) -> None:
    """Fail before anything heavy loads: no rewards, an unknown name, a bad spec."""
    reward_items(rewards)


def resolve_rewards(rewards: str | Mapping[Any, float], device=None,
                    dtype: torch.dtype | None = None) -> dict[str, tuple[RewardFn, float]]:
    """A spec string or {spec | Reward module | callable: weight} -> {name: (score function, weight)}."""
    resolved: dict[str, tuple[RewardFn, float]] = {}
    for key, weight in reward_items(rewards):
        [(name, reward)] = load_rewards([key], device=device, dtype=dtype).items()
        if name in resolved:
            name = f"{name}#{len(resolved)}"  # two callables with one __name__ keep both entries
        resolved[name] = (reward.score, weight)
    return resolved


def _score(fn: RewardFn, name: str, image: Tensor, prompt: str, checkpointed: bool) -> Tensor:
    """One reward's score for the (1, 3, H, W) image, checked to be differentiable."""
    if checkpointed:
        # Recompute the tower in backward: with several rewards only one tower's activations
        # are alive at a time (ReNO checkpoints every reward model).
        score = torch.utils.checkpoint.checkpoint(fn, image, [prompt], use_reentrant=False)
    else:
        score = fn(image, [prompt])
    if not isinstance(score, Tensor) or score.numel() != 1:
        raise DiffalignError(f"reward {name!r} must return a tensor with one score per image: fix the reward")
    if not score.requires_grad:
        raise DiffalignError(f"reward {name!r} returned a score without gradient: ReNO needs a differentiable reward")
    return score.reshape(()).float()


def optimize_latent(
    generate: Callable[[Tensor], Tensor],
    latent: Tensor,
    prompt: str,
    rewards: Mapping[str, tuple[RewardFn, float]],
    *,
    iterations: int = 50,
    lr: float = 5.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = True,
    grad_clip: float | None = 0.1,
    reg_weight: float = 0.01,
    checkpoint_rewards: bool | None = None,
    progress: bool = True,
) -> RenoResult:
    """The ReNO loop over any differentiable `generate(noise) -> (1, 3, H, W) in [0, 1]`.

    `rewards` is {name: (score_fn, weight)} (see `resolve_rewards`). Each iteration evaluates
    the current noise; all but the last then take one clipped optimiser step.
    """
    from tqdm.auto import tqdm

    _check_settings(iterations, lr, grad_clip, reg_weight)
    checkpointed = len(rewards) > 1 if checkpoint_rewards is None else checkpoint_rewards
    # An fp32 master copy: fp16 noise would round away SGD's small clipped updates.
    latent = latent.detach().clone().float().requires_grad_(True)
    opt = make_optimizer(optimizer, latent, lr, momentum, nesterov)
    history: list[dict] = []
    best: dict[str, Any] = {}
    bar = tqdm(range(iterations), desc="reno", disable=not progress, dynamic_ncols=True)
    for iteration in bar:
        opt.zero_grad(set_to_none=True)
        image = generate(latent)
        if not image.requires_grad:
            raise DiffalignError("the generator's image has no gradient w.r.t. the noise: check the pipeline is not under no_grad")
        scores = {name: _score(fn, name, image.float(), prompt, checkpointed) for name, (fn, _) in rewards.items()}
        total = sum(rewards[name][1] * score for name, score in scores.items())
        reg = reg_weight * norm_regularizer(latent) if reg_weight > 0 else torch.zeros((), device=latent.device)
        history.append(_record(iteration, total, scores, reg, latent))
        # Best by reward alone: the regulariser only shapes the path, not the pick.
        if not best or history[-1]["total"] > history[best["iteration"]]["total"]:
            best = {"iteration": iteration, "image": image.detach()[0].float().cpu(), "latent": latent.detach().clone().cpu()}
        if iteration == 0:
            initial = (best["image"], best["latent"])
        bar.set_postfix(reward=f"{history[-1]['total']:.4f}", best=f"{history[best['iteration']]['total']:.4f}")
        if iteration < iterations - 1:  # the last evaluation takes no step (as ReNO)
            (reg - total).backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_([latent], grad_clip)
            opt.step()
    return RenoResult(best["image"], best["latent"], best["iteration"], initial[0], initial[1], history)


def _check_settings(iterations: int, lr: float, grad_clip: float | None, reg_weight: float) -> None:
    if not isinstance(iterations, int) or iterations < 1:
        raise DiffalignError(f"iterations={iterations!r}: use a whole number >= 1 (ReNO: 50)")
    if lr <= 0:
        raise DiffalignError(f"lr={lr}: use a positive learning rate (ReNO: 5.0 with SGD)")
    if grad_clip is not None and grad_clip < 0:
        raise DiffalignError(f"grad_clip={grad_clip}: use a positive norm (ReNO: 0.1), or 0/None to turn clipping off")
    if reg_weight < 0:
        raise DiffalignError(f"reg_weight={reg_weight}: use a weight >= 0 (ReNO: 0.01; 0 turns the regulariser off)")


def _record(iteration: int, total: Tensor, scores: dict[str, Tensor], reg: Tensor, latent: Tensor) -> dict:
    total_value, reg_value = float(total.detach()), float(reg.detach())
    return {
        "iteration": iteration,
        "total": total_value,
        "rewards": {name: float(score.detach()) for name, score in scores.items()},
        "regularizer": reg_value,
        "objective": total_value - reg_value,
        "latent_norm": float(torch.linalg.vector_norm(latent.detach())),
    }


def optimize(
    pipe: Any,
    prompt: str,
    rewards: str | Mapping[Any, float] = DEFAULT_REWARDS,
    *,
    iterations: int = 50,
    lr: float = 5.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = True,
    grad_clip: float | None = 0.1,
    reg_weight: float = 0.01,
    seed: int = 0,
    num_inference_steps: int = 1,
    guidance_scale: float = 0.0,
    timesteps: list[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    latent: Tensor | None = None,
    reward_dtype: torch.dtype | None = None,
    checkpoint_rewards: bool | None = None,
    gradient_checkpointing: bool = True,
    progress: bool = True,
) -> RenoResult:
    """Optimise the initial noise of `pipe` for `prompt` against weighted `rewards`.

    `rewards` is a reward spec ("hpsv2.1@PATH=5,pickscore=0.05"), or maps a registry name
    (`diffalign.rewards.REWARDS`, with an optional @PATH), a loaded Reward, or a callable
    `(images (B,3,H,W) in [0,1], prompts) -> Tensor[B]` to its weight. The noise starts from
    `latent` or from N(0, I) drawn with `seed` on the CPU (the same on every device). The
    pipeline's VAE and denoiser are frozen (requires_grad False) and, with
    `gradient_checkpointing`, checkpointed. See the module docstring for the algorithm.
    """
    from diffalign.sampler import build_generator, pipeline_family

    _check_settings(iterations, lr, grad_clip, reg_weight)
    make_optimizer(optimizer, torch.zeros(1, requires_grad=True), lr, momentum, nesterov)  # fail fast
    check_reward_names(rewards)
    pipeline_family(pipe)
    generator = build_generator(
        pipe, prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        timesteps=timesteps, height=height, width=width, seed=seed, gradient_checkpointing=gradient_checkpointing,
    )
    resolved = resolve_rewards(rewards, device=generator.device, dtype=reward_dtype)
    if latent is None:
        latent = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(latent.shape) != generator.latent_shape:
        raise DiffalignError(f"latent has shape {tuple(latent.shape)}: this pipeline needs {generator.latent_shape}")
    return optimize_latent(
        generator, latent.to(generator.device), prompt, resolved, iterations=iterations, lr=lr,
        optimizer=optimizer, momentum=momentum, nesterov=nesterov, grad_clip=grad_clip,
        reg_weight=reg_weight, checkpoint_rewards=checkpoint_rewards, progress=progress,
    )


# ----------------------------------------------------------------------------------------
# Command line: diffalign reno --model M --prompt "..." --reward hpsv2.1=5,pickscore=0.05
# ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers folder, hub id, or toy-sd / toy-flow")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", default=None, help="'toy' or a .txt (one a line), .jsonl ({\"prompt\"}) or .json list")
    parser.add_argument(
        "--reward", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_REWARDS.items()), metavar="SPEC",
        help="rewards to maximise, NAME[@PATH][=WEIGHT],... with registry names or module:function callables",
    )
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--lr", type=float, default=5.0)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    parser.add_argument("--grad-clip", type=float, default=0.1, help="0 turns clipping off")
    parser.add_argument("--reg-weight", type=float, default=0.01, help="0 turns the norm regulariser off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-inference-steps", type=int, default=None,
                        help="sampler steps of the generator (default: the model folder's diffalign.json, e.g. toy-sd's "
                        f"20, else {RENO_SAMPLING['num_inference_steps']}, for one-step models such as SD-Turbo)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the model folder's diffalign.json, else "
                        f"{RENO_SAMPLING['guidance_scale']:g}, as one-step models use)")
    parser.add_argument("--timesteps", help="comma-separated custom timesteps (PixArt-DMD: 400, Hyper-SD: 800)")
    parser.add_argument("--resolution", type=int, default=None, help="image height = width (default: the pipeline's)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="pipeline dtype: auto | fp32 | fp16 | bf16 (auto: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--reward-dtype", default=None, help="reward dtype: fp32 | fp16 | bf16 (default: the reward's)")
    parser.add_argument("--output-dir", type=Path, required=True)


def generator_settings(model: Any, num_inference_steps: int | None, guidance_scale: float | None) -> dict:
    """Steps and guidance of the generator: the flags, else the model folder's diffalign.json (a
    many-step model such as toy-sd: its own 20 steps, not one step of them, which leaves noise),
    else ReNO's one-step defaults."""
    settings = {**RENO_SAMPLING, **sampling_defaults(model)}
    if num_inference_steps is not None:
        settings["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        settings["guidance_scale"] = guidance_scale
    if settings["num_inference_steps"] < 1:
        raise DiffalignError(f"--num-inference-steps {settings['num_inference_steps']}: use at least 1 step "
                             "(one-step models: 1; others: their own count, e.g. 20 for toy-sd)")
    return settings


def run(args: argparse.Namespace) -> int:
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise DiffalignError("no prompt given: pass --prompt TEXT or --prompts FILE")
    check_reward_names(args.reward)
    sampling = generator_settings(args.model, args.num_inference_steps, args.guidance_scale)
    args.num_inference_steps, args.guidance_scale = sampling["num_inference_steps"], sampling["guidance_scale"]
    print(f"diffalign reno: {args.num_inference_steps} sampler steps, guidance {args.guidance_scale:g}")
    device = default_device(args.device)
    dtype = parse_dtype(args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32"))
    reward_dtype = parse_dtype(args.reward_dtype) if args.reward_dtype else None
    _check_settings(args.iterations, args.lr, args.grad_clip, args.reg_weight)
    # Every iteration has the same shapes: cuDNN's own timing beats its default fp16 conv-backward
    # pick (0.83 -> 0.60 s/iteration for SD-Turbo + 3 CLIP-H rewards on an H100).
    torch.backends.cudnn.benchmark = device.type == "cuda"
    pipe = load_pipeline(args.model, dtype, device=device)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for index, prompt in enumerate(prompts):
        result = optimize(
            pipe, prompt, args.reward, iterations=args.iterations, lr=args.lr, optimizer=args.optimizer,
            momentum=args.momentum, nesterov=args.nesterov, grad_clip=args.grad_clip, reg_weight=args.reg_weight,
            seed=args.seed, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
            timesteps=[int(t) for t in args.timesteps.split(",")] if args.timesteps else None,
            height=args.resolution, width=args.resolution, reward_dtype=reward_dtype,
        )
        folder = args.output_dir / f"{index:03d}"
        save_result(result, folder, prompt, settings={k: str(v) for k, v in vars(args).items() if k != "func"})
        summary.append({"prompt": prompt, "folder": folder.name, "initial_reward": result.initial_reward,
                        "best_reward": result.best_reward, "best_iteration": result.best_iteration})
        print(f"[{index}] {prompt!r}: reward {result.initial_reward:.4f} -> {result.best_reward:.4f} ({folder})")
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def save_result(result: RenoResult, folder: Path, prompt: str, settings: dict | None = None) -> None:
    """initial.png, optimized.png, latent.pt, history.json and rewards.png under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    to_pil(result.initial_image).save(folder / "initial.png")
    to_pil(result.image).save(folder / "optimized.png")
    torch.save({"latent": result.latent, "initial_latent": result.initial_latent}, folder / "latent.pt")
    record = {"prompt": prompt, "best_iteration": result.best_iteration, "initial_reward": result.initial_reward,
              "best_reward": result.best_reward, "settings": settings or {}, "history": result.history}
    (folder / "history.json").write_text(json.dumps(record, indent=2))
    plot_history(result.history, folder / "rewards.png", title=prompt)


def to_pil(image: Tensor):
    """(3, H, W) in [0, 1] -> PIL image."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def plot_history(history: list[dict], path: Path, title: str = "") -> None:
    """The weighted total and each reward per iteration, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    names = list(history[0]["rewards"])
    series = {"total (weighted)": [h["total"] for h in history]}
    if len(names) > 1:  # one reward's panel would repeat the total up to its weight
        series.update({name: [h["rewards"][name] for h in history] for name in names})
    fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * len(series)), sharex=True, squeeze=False)
    for ax, (label, values) in zip(axes[:, 0], series.items()):
        ax.plot(range(len(values)), values, marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].set_title(title[:80])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
