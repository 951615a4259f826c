"""Training configuration: dataclass defaults, then a YAML file, then CLI flags.

Every field of `TrainConfig` is a YAML key and a CLI flag (`max_steps` <-> `--max-steps`).
Unknown YAML keys fail with the list of valid ones; the CLI overrides the YAML; the resolved
config is written to OUTPUT/config.yaml so a run can be repeated with `--config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffalign.errors import DiffalignError


@dataclass
class TrainConfig:
    # --- what to train ---
    method: str = "dpo"
    """Objective, by CLI name: dpo, mapo, flow-dpo, sft, rankdpo, dcpo."""
    model: str | None = None
    """diffusers pipeline: hub id or local folder. None with no dataset runs the toy quickstart."""
    dataset: str | None = None
    """Preference data: hub id, parquet file/folder, `datasets` folder or .jsonl (docs/datasets.md)."""
    output_dir: str = "outputs/run"
    """Where weights, checkpoints, metrics.jsonl, plots and config.yaml go."""
    beta: float | None = None
    """The objective's beta (None: its per-family default, see docs/objectives.md)."""
    objective: dict = field(default_factory=dict)
    """Extra objective options as KEY=VALUE, e.g. --objective loss_type=hinge (YAML: objective: {loss_type: hinge})."""
    prompts: str | None = None
    """Online methods (spo, grpo): the prompts to sample from, a .txt/.jsonl/.json file or 'toy' (the toy
    training prompts); they replace --dataset. Rollouts use num_inference_steps and guidance_scale."""
    reward: str | None = None
    """Online methods: the reward that judges the candidates, NAME[@PATH][=WEIGHT],... (spm scores at
    the step's t; any other image reward scores the decoded predicted x0 and ignores t)."""
    num_candidates: int = 4
    """Online methods: candidates x_{t-1} drawn from the same x_t at each branching step (SPO: 4 SD1.5, 2 SDXL)."""
    divert_start_step: int = 4
    """Online methods: the sampling step from which candidates branch (steps before it sample one chain)."""
    pair_threshold: float = 0.3
    """SPO: keep a best/worst pair only if softmax(best, worst) differ by more than this (0.3 SD1.5, 0.4 SDXL)."""
    sampler_eta: float = 1.0
    """Online methods on DDPM-family models: DDIM eta of the rollouts (> 0: stochastic, with a log-prob)."""
    sampler_noise_level: float = 0.7
    """Online methods on flow models: noise level of the flow SDE step (> 0; Flow-GRPO's 0.7)."""
    rollout_prompts: int = 2
    """Online methods: prompts each process samples per rollout; the pairs of all processes are pooled."""
    adv_clip_max: float = 5.0
    """GRPO: advantages are clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO: 5)."""
    global_std: bool = False
    """GRPO: divide each group's centred rewards by the std of the whole global rollout instead of the
    group's own (Flow-GRPO's published configs: on)."""
    inner_epochs: int = 1
    """GRPO: passes over each rollout's images before the next rollout (Flow-GRPO: 1)."""
    train_steps: str = "all"
    """GRPO: the sampling steps trained on: all, first:K (the first K; Flow-GRPO's timestep_fraction), or
    window:K (K consecutive steps at a random place, drawn per rollout, as Flow-GRPO-Fast / MixGRPO)."""
    sample_every: int = 0
    """GRPO: every N steps, write OUTPUT/samples/step-N.png: a rollout's groups with their rewards (0: off)."""

    # --- model ---
    lora_rank: int = 8
    """LoRA rank (ignored with full_finetune)."""
    lora_alpha: float | None = None
    """LoRA alpha (None: equal to the rank, as diffusers' DPO scripts)."""
    lora_targets: list | None = None
    """Module names LoRA wraps (None: the family default)."""
    full_finetune: bool = False
    """Train every weight of the denoiser; the reference becomes a frozen copy."""
    offload_reference: bool = False
    """Keep the frozen reference copy on the CPU between uses (full fine-tuning only)."""
    mixed_precision: str = "no"
    """no | fp16 | bf16 (accelerate autocast; trainable weights stay fp32)."""
    attention: str = "auto"
    """auto | xformers | sdpa. auto takes xformers on CUDA when it imports, else SDPA."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile the denoiser: the first steps wait for the compiler (tens of seconds to minutes),
    later ones may run faster on a GPU; on the CPU it did not pay for the toy models (docs/benchmarks.md)."""
    channels_last: bool = False
    """UNets only: keep the denoiser's weights in channels_last memory format, which GPU convolution
    kernels (fp16/bf16) prefer; on the CPU it did not pay for the toy models (docs/benchmarks.md)."""
    fused_optimizer: bool = True
    """AdamW's fused kernel (one kernel for every trainable tensor), on CUDA and the CPU."""
    tf32: bool = False
    """CUDA on Ampere or newer only: fp32 matmuls and convolutions in TF32 (faster, 10-bit mantissa
    products); the CPU and older GPUs ignore it."""
    expert: str = "auto"
    """Wan 2.2 (two experts by noise level): which trains, high | low | both (auto: both; one-transformer models: auto only)."""

    # --- data ---
    resolution: int | None = None
    """Images are resized (shortest side) and cropped to this square size (None: the size the model
    was built for, from its configs, e.g. 32 for toy-sd, 512 for SD1.5; 512 when unknown)."""
    random_flip: bool = False
    """Horizontal flip, the same for every image of a group."""
    center_crop: bool = True
    """Centre crop (else a random crop, the same for every image of a group)."""
    caption_dropout: float = 0.0
    """Probability of training a group on the empty prompt (the original DPO script uses 0.2)."""
    max_samples: int | None = None
    """Use only the first N groups of the dataset."""
    streaming: bool = False
    """Stream the dataset instead of downloading/loading it whole (for Pick-a-Pic v2 scale)."""
    strict: bool = False
    """Fail on a corrupt or missing image instead of skipping it with a warning."""
    cache_latents: bool = False
    """Train from a latent + text-embedding cache (built on first use); no VAE/text encoder in the loop."""
    cache_dir: str | None = None
    """Where the cache lives (None: OUTPUT/latent-cache); a sub-folder per model, resolution and data."""
    num_workers: int | None = None
    """DataLoader worker processes (None: decode images in workers when this process has CPU cores
    its training does not use and an epoch holds at least 32 batches; the latent cache and streams
    read in the training process)."""
    split: str = "train"
    """Split to read from a hub id or a save_to_disk DatasetDict (local parquet: all files)."""
    drop_ties: bool | None = None
    """Drop groups whose best and worst scores are equal (None: drop them for pair objectives)."""
    group_size: int | None = None
    """Ranked objectives: K images per group, spread over each list's ranking (None: as in the data).
    GRPO: images sampled per prompt, the group its advantages are relative to (None: 8)."""
    shuffle_buffer: int = 1000
    """Streaming only: shuffle buffer size (0: read in storage order)."""
    caption_column: str = "caption"
    """Pick-a-Pic schema: the prompt column; per-image captions are <caption_column>_<i>."""
    image_columns: list | None = None
    """Pick-a-Pic schema: one column per image (None: jpg_0, jpg_1, ...)."""
    label_columns: list | None = None
    """Pick-a-Pic schema: one score column per image (None: label_0, label_1, ...)."""
    num_frames: int | None = None
    """Video data: frames sampled from every video (None: image data). The same frame times for every
    video of a group; a shorter video is skipped and counted (Wan: 1 + 4k, e.g. 33)."""
    fps: float | None = None
    """Video data: the rate the frames are sampled at (None: consecutive frames at the file's own rate)."""
    video_label: str = "overall"
    """VideoAlign CSV data: the winner by overall (majority of VQ, MQ, TA) | VQ | MQ | TA; ties dropped for pair methods."""

    # --- optimisation ---
    max_steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 1
    """Groups (pairs) per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimiser step."""
    lr: float = 1e-5
    """Learning rate (per optimiser step; see scale_lr)."""
    scale_lr: bool = False
    """Multiply lr by batch_size * grad_accum * processes, as the original Diffusion-DPO script."""
    optimizer: str = "adamw"
    """adamw | adamw8bit (needs the bnb extra) | adafactor."""
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant_with_warmup"
    """Any diffusers.optimization scheduler name: constant, constant_with_warmup, cosine, linear, ..."""
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    ema: bool = False
    """Keep an exponential moving average of the trainable weights and save it as the result."""
    ema_decay: float = 0.999
    logit_mean: float = 0.0
    """Flow models: sigma ~ logit-normal(logit_mean, logit_std). DDPM models draw t uniformly."""
    logit_std: float = 1.0
    seed: int = 0

    # --- bookkeeping ---
    resume: str | None = None
    """latest | a checkpoint folder. Continues exactly: data order, RNG, optimiser, scheduler."""
    checkpoint_every: int = 500
    """Write a checkpoint every N optimiser steps and at the end (0: only on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    """Keep the last N checkpoints."""
    log_every: int = 10
    """Write metrics and check the loss is finite every N optimiser steps (and before each
    checkpoint): one host sync each, so a GPU is not stalled at every step. A non-finite loss
    found after its step was applied keeps the last checkpoint; 1 keeps the step before it."""
    report_to: str = "none"
    """none | tensorboard | wandb (metrics.jsonl is always written)."""
    validation_every: int = 0
    """Every N steps, sample validation_prompts with fixed seeds and save a PNG grid (0: off)."""
    validation_prompts: list = field(default_factory=list)
    num_inference_steps: int | None = None
    """Sampler steps for validation and evaluation images (None: the model's default, from its
    folder's diffalign.json or its pipeline)."""
    guidance_scale: float | None = None
    """Classifier-free guidance for validation and evaluation images (None: the model's default)."""

    # --- evaluation at the end (the quickstart uses it) ---
    eval_prompts: str | None = None
    """Prompt file (one a line) or 'toy' to evaluate against the base model after training."""
    eval_rewards: list = field(default_factory=list)
    """Reward specs (NAME[@PATH][=WEIGHT]) that score the final evaluation."""
    eval_num_images: int = 1
    """Images per prompt in the final evaluation."""
    eval_max_prompts: int | None = None
    """Evaluate on the first N prompts only (None: all)."""
    eval_baseline_cache: bool = True
    """Keep the base model's evaluation images between runs ($DIFFALIGN_CACHE, default ~/.cache/diffalign)."""


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def _field_doc(name: str) -> str:
    """The docstring under a field in the class source (used as the CLI help)."""
    lines = _config_source_lines()
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{name}:") and i + 1 < len(lines) and lines[i + 1].strip().startswith('"""'):
            doc = [lines[i + 1].strip()[3:]]
            j = i + 1
            while not doc[-1].endswith('"""') and j + 1 < len(lines):  # a docstring over several lines
                j += 1
                doc.append(lines[j].strip())
            return " ".join(doc)[: -3].strip()
    return ""


@functools.lru_cache(maxsize=1)
def _config_source_lines() -> list[str]:
    """TrainConfig's source, read once: `inspect.getsource` a field costs ~10 ms, 0.7 s for them all."""
    import inspect

    return inspect.getsource(TrainConfig).splitlines()


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One CLI flag per config field; defaults are None so we know what the user set."""
    parser.add_argument("--config", help="YAML file with config keys (CLI flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = _field_doc(f.name)
        if kind in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "objective":
            parser.add_argument(flag, action="append", default=None, metavar="KEY=VALUE", help=help_text)
        elif kind in (list, list | None):
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            base = _scalar_type(kind)
            parser.add_argument(flag, type=base, default=None, help=help_text)


def _scalar_type(kind: Any) -> type:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args else kind
    return base if base in (int, float, str) else str


def _parse_objective_items(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise DiffalignError(f"--objective expects KEY=VALUE, got {item!r}: e.g. --objective loss_type=hinge")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_yaml(path: str | Path) -> dict:
    """A config file's keys. `extends: OTHER.yaml` (relative to the file) reads OTHER first and
    lets this file's keys override it, so recipes that differ in a few keys share one base."""
    path = Path(path)
    if not path.is_file():
        raise DiffalignError(f"config file {str(path)!r} not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise DiffalignError(f"config file {str(path)!r} is not valid YAML{line}: fix its syntax") from None
    if not isinstance(data, dict):
        raise DiffalignError(f"config file {str(path)!r} must hold a mapping of config keys")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return {**load_yaml(path.parent / str(parent)), **data}


def merge(base: TrainConfig, updates: dict, source: str) -> TrainConfig:
    """Strictly merge `updates` into `base`: unknown keys fail, types are checked."""
    valid = {f.name for f in config_fields()}
    unknown = sorted(set(updates) - valid)
    if unknown:
        raise DiffalignError(
            f"unknown config key(s) {', '.join(unknown)} in {source}: valid keys are {', '.join(sorted(valid))}"
        )
    hints = typing.get_type_hints(TrainConfig)
    clean = {}
    for key, value in updates.items():
        clean[key] = _coerce(key, value, hints[key], source)
    return dataclasses.replace(base, **clean)


def _coerce(key: str, value: Any, kind: Any, source: str) -> Any:
    if value is None:
        return None
    allowed = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    for typ in allowed:
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ in (str, bool, list, dict) and isinstance(value, typ):
            return value
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise DiffalignError(f"config key {key!r} in {source} must be {names}, got {value!r}")


def resolve_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """Defaults (or `base`) -> YAML (--config) -> CLI flags."""
    cfg = base or TrainConfig()
    if getattr(args, "config", None):
        cfg = merge(cfg, load_yaml(args.config), f"--config {args.config}")
    cli = {}
    for f in config_fields():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "objective":
            value = {**cfg.objective, **_parse_objective_items(value)}
        cli[f.name] = value
    return merge(cfg, cli, "the command line")


# Option -> allowed values, for the string options that take a fixed set.
CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "attention": ("auto", "xformers", "sdpa"),
    "optimizer": ("adamw", "adamw8bit", "adafactor"),
    "report_to": ("none", "tensorboard", "wandb"),
}
# Option -> the smallest value it takes.
MINIMUM = {
    "batch_size": 1, "grad_accum": 1, "max_steps": 1, "lora_rank": 1, "log_every": 1, "keep_checkpoints": 1,
    "checkpoint_every": 0, "validation_every": 0, "warmup_steps": 0, "num_workers": 0, "max_samples": 1,
    "num_inference_steps": 1, "eval_num_images": 1, "eval_max_prompts": 1, "group_size": 2, "shuffle_buffer": 0,
    "max_grad_norm": 0, "weight_decay": 0, "ema_decay": 0, "logit_std": 0,
}
# The VAEs of every supported family downsample by 8 (FLUX packs 2x2 latents: 16, checked at load).
RESOLUTION_MULTIPLE = 8


def validate(cfg: TrainConfig) -> None:
    """Every value a user can get wrong, checked in one line before any model or data loads."""
    from diffalign.objectives import check_hparams, get_objective

    objective = get_objective(cfg.method)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise DiffalignError(f"{key} {getattr(cfg, key)!r} is not valid: choose one of {', '.join(allowed)}")
    for key, low in MINIMUM.items():
        value = getattr(cfg, key)
        if value is not None and value < low:
            flag = "--" + key.replace("_", "-")
            raise DiffalignError(f"{flag} {value} is too small: it must be at least {low}")
    if not cfg.lr > 0:
        raise DiffalignError(f"--lr {cfg.lr} must be a positive learning rate: e.g. 1e-5 (LoRA on SD1.5: 1e-5 to 1e-4)")
    if not 0 <= cfg.caption_dropout < 1:
        raise DiffalignError(f"--caption-dropout {cfg.caption_dropout} must be in [0, 1): the share of groups on the empty prompt")
    if cfg.resolution is not None and (cfg.resolution <= 0 or cfg.resolution % RESOLUTION_MULTIPLE):
        raise DiffalignError(
            f"--resolution {cfg.resolution} is not a positive multiple of {RESOLUTION_MULTIPLE} (the VAE's downsampling): "
            f"use e.g. {max(RESOLUTION_MULTIPLE, round(cfg.resolution / RESOLUTION_MULTIPLE) * RESOLUTION_MULTIPLE)}"
        )
    check_video_options(cfg)
    if cfg.guidance_scale is not None and cfg.guidance_scale < 0:
        raise DiffalignError(f"--guidance-scale {cfg.guidance_scale} must be >= 0 (1 or less turns guidance off)")
    groups = objective.DATA == "ranked" or getattr(objective, "ROLLOUT", None) == "groups"  # GRPO samples groups
    if not groups and cfg.group_size not in (None, 2):
        raise DiffalignError(f"{cfg.method} trains on pairs, not groups of {cfg.group_size}: unset --group-size "
                             "(only rankdpo takes ranked lists)")
    check_hparams(cfg.method, {**cfg.objective, **({"beta": cfg.beta} if cfg.beta is not None else {})})
    from diffalign.online import check_online_config  # online methods read prompts, not a dataset

    check_online_config(cfg, objective)
    if cfg.eval_prompts:  # found now, not after training and the base model's images
        from diffalign.edges import parse_reward_specs, read_prompts

        read_prompts(cfg.eval_prompts)
        if not cfg.eval_rewards:
            raise DiffalignError("--eval-prompts is set but --eval-rewards is empty: name the rewards that judge the "
                                 "evaluation, e.g. --eval-rewards pickscore hpsv2.1")
        parse_reward_specs(cfg.eval_rewards)


def check_video_options(cfg: TrainConfig) -> None:
    """The video fields (num_frames, fps, video_label, expert), before anything loads."""
    if cfg.num_frames is not None and cfg.num_frames < 1:
        raise DiffalignError(f"--num-frames {cfg.num_frames} must be at least 1 (Wan: 1 + 4k, e.g. 33)")
    if cfg.fps is not None and not cfg.fps > 0:
        raise DiffalignError(f"--fps {cfg.fps} must be a positive frame rate, e.g. 16 (or unset: the file's own rate)")
    if cfg.fps is not None and cfg.num_frames is None:
        raise DiffalignError("--fps samples video frames: set --num-frames too (or unset --fps for image data)")
    if cfg.video_label not in VIDEO_LABELS:
        raise DiffalignError(f"--video-label {cfg.video_label!r} is not valid: choose one of {', '.join(VIDEO_LABELS)}")
    if cfg.expert not in EXPERTS:
        raise DiffalignError(f"--expert {cfg.expert!r} is not valid: choose one of {', '.join(EXPERTS)}")
    if cfg.dataset and str(cfg.dataset).endswith(".csv") and cfg.num_frames is None:
        raise DiffalignError(f"{cfg.dataset} is a video CSV: set --num-frames (e.g. 33 for Wan)")


VIDEO_LABELS = ("overall", "VQ", "MQ", "TA")  # VideoAlign's dimensions; overall = their majority
EXPERTS = ("auto", "high", "low", "both")  # diffalign.models.wan.EXPERTS


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
