"""`diffalign train-spm`: train SPO's step-aware preference model (SPM) on preference pairs.

    diffalign train-spm --base-model runwayml/stable-diffusion-v1-5 --dataset yuvalkirstain/pickapic_v1 \\
        --init yuvalkirstain/PickScore_v1 --output-dir spm

The SPM (diffalign.rewards.spm) is a CLIP whose vision tower is modulated by the diffusion
timestep t; `--init` names the PickScore-layout CLIP it starts from (a fresh SPM scores exactly
as that CLIP). Each step, as the original's `SPMTask.get_noised_imgs`:

1. both images of a pair are VAE-encoded (posterior mean, as diffalign's latent cache; the
   original samples the posterior, whose std is ~1e-3 of the mean on SD's VAE) and noised with
   the SAME noise at the SAME t, t uniform in [0, T) (flow models: sigma as `diffalign train`
   draws it, shown to the SPM as sigma * T), drawn by `diffalign.elbo` from the step's own
   generator;
2. the frozen base model predicts x0 from x_t (DDIM's `pred_original_sample`; with classifier-
   free guidance at --guidance-scale, the empty prompt as the unconditional branch);
3. both predicted x0 are decoded and scored by the SPM at t: s_0, s_1;
4. loss = PickScore's soft-label cross-entropy over the pair (spm_criterion.py, no in-batch
   negatives): with p = softmax(s_0, s_1) and labels y (1, 0) for a preferred first image and
   (0.5, 0.5) for a tie, `-(y_0 log p_0 + y_1 log p_1) + [tie] log 0.5`, so a tie's ideal loss
   is 0 and ties pull the two scores together. The batch mean; the original also weights each
   pair by 1 / (pairs of its prompt), which this leaves out.

Ties are kept (the data reader's `drop_ties=False`); pairs come best first, so y is (1, 0)
unless the two labels are equal. Runs under `accelerate launch` as `diffalign train` does (its
`make_accelerator`); the result, written atomically at the end, is a folder `--reward
spm@OUTPUT` loads strictly: config.json, the tokenizer, and the state dict in the original key
layout (`diffalign.rewards.spm`), with metrics.jsonl beside them.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from diffalign.errors import DiffalignError
from diffalign.lazy import lazy

torch = lazy("torch")

PRECISIONS = ("no", "fp16", "bf16")
DEFAULT_GUIDANCE = 5.0  # the original's cfg_scale, for a model folder that names none


@dataclass
class SPMConfig:
    base_model: str
    dataset: str
    init: str
    output_dir: str
    mixed_precision: str = "no"
    batch_size: int = 8
    lr: float = 3e-6  # PickScore's fine-tuning lr (the SPM starts as that CLIP)
    weight_decay: float = 0.0
    max_steps: int = 1000
    seed: int = 0
    resolution: int | None = None
    guidance_scale: float | None = None
    max_grad_norm: float = 1.0
    max_samples: int | None = None
    caption_column: str = "caption"
    split: str = "train"
    log_every: int = 10
    grad_accum: int = 1  # make_accelerator's fields
    report_to: str = "none"


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", required=True,
                        help="the diffusion model that predicts x0 (diffusers folder, hub id or toy-sd)")
    parser.add_argument("--dataset", required=True,
                        help="preference pairs in the Pick-a-Pic schema (hub id, parquet, .jsonl); ties are kept")
    parser.add_argument("--init", required=True, help="the CLIP the SPM starts from, in PickScore's layout: folder or "
                        "hub id (yuvalkirstain/PickScore_v1, toy-reward)")
    parser.add_argument("--output-dir", required=True,
                        help="where the SPM folder (config, tokenizer, weights) and metrics.jsonl go")
    parser.add_argument("--mixed-precision", default="no",
                        help="no | fp16 | bf16: the frozen base model's dtype and accelerate's autocast")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per process per step (default 8)")
    parser.add_argument("--lr", type=float, default=3e-6, help="AdamW learning rate (default 3e-6, PickScore's)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=1000, help="optimiser steps (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=None, help="images are resized and cropped to this square "
                        "size (default: the size the base model was built for)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance of the x0 "
                        "prediction (default: the model folder's diffalign.json, else 5.0 as the original)")
    parser.add_argument("--max-samples", type=int, default=None, help="use only the first N pairs")
    parser.add_argument("--caption-column", default="caption", help="the prompt column (Pick-a-Pic schema)")
    parser.add_argument("--split", default="train", help="split of a hub dataset")
    parser.add_argument("--log-every", type=int, default=10, help="write metrics every N steps")


def config_from_args(args: argparse.Namespace) -> SPMConfig:
    return SPMConfig(**{name: getattr(args, name) for name in SPMConfig.__dataclass_fields__ if hasattr(args, name)})


def run(args: argparse.Namespace) -> int:
    train_spm(config_from_args(args))
    return 0


def validate(cfg: SPMConfig) -> None:
    """The values a user can get wrong, in one line each, before any model or data loads."""
    from diffalign.rewards.spm import check_clip_source

    if cfg.mixed_precision not in PRECISIONS:
        raise DiffalignError(f"--mixed-precision {cfg.mixed_precision!r} is not valid: choose one of {', '.join(PRECISIONS)}")
    for flag, value, low in (("--batch-size", cfg.batch_size, 1), ("--max-steps", cfg.max_steps, 1),
                             ("--log-every", cfg.log_every, 1), ("--max-samples", cfg.max_samples, 1)):
        if value is not None and value < low:
            raise DiffalignError(f"{flag} {value} is too small: it must be at least {low}")
    if not cfg.lr > 0:
        raise DiffalignError(f"--lr {cfg.lr} must be a positive learning rate: e.g. 3e-6 (PickScore's)")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        raise DiffalignError("--weight-decay and the gradient clipping norm must be >= 0")
    if cfg.resolution is not None and (cfg.resolution <= 0 or cfg.resolution % 8):
        raise DiffalignError(f"--resolution {cfg.resolution} is not a positive multiple of 8 (the VAE's downsampling)")
    if cfg.guidance_scale is not None and cfg.guidance_scale < 0:
        raise DiffalignError(f"--guidance-scale {cfg.guidance_scale} must be >= 0 (1 or less turns guidance off)")
    check_clip_source(cfg.init)


def resolve(cfg: SPMConfig, pipeline=None) -> SPMConfig:
    """Shipped toy names (toy-sd, toy-reward, toy-data/...) to their folders, and the
    resolution and guidance the base model was built with where the user left them unset."""
    from diffalign.edges import sampling_defaults
    from diffalign.train import model_resolution, resolve_shipped

    cfg = replace(cfg, base_model=resolve_shipped(cfg.base_model), dataset=resolve_shipped(cfg.dataset),
                  init=resolve_shipped(cfg.init))
    model = cfg.base_model if pipeline is None else pipeline
    if cfg.resolution is None:
        cfg = replace(cfg, resolution=model_resolution(model))
    if cfg.guidance_scale is None:
        found = sampling_defaults(cfg.base_model).get("guidance_scale") if pipeline is None else None
        cfg = replace(cfg, guidance_scale=float(found) if found is not None else DEFAULT_GUIDANCE)
    return cfg


def build_pairs(cfg: SPMConfig):
    """The pairs, best first, ties kept (diffalign.data's reader with drop_ties=False)."""
    from diffalign.data import DataConfig, build_dataset

    data = DataConfig(dataset=cfg.dataset, split=cfg.split, resolution=cfg.resolution, max_samples=cfg.max_samples,
                      drop_ties=False, seed=cfg.seed, caption_column=cfg.caption_column)
    dataset = build_dataset(data, pairwise=True)
    if len(dataset) == 0:
        raise DiffalignError(f"{cfg.dataset!r} holds no pairs: check the dataset and --split")
    return dataset


# --------------------------------------------------------------------------- the maths
def pair_labels(scores: torch.Tensor) -> torch.Tensor:
    """(B, 2) data scores, best first -> soft labels (B, 2): (1, 0), or (0.5, 0.5) for a tie."""
    tie = (scores[:, 0] == scores[:, 1]).float()
    return torch.stack([1 - 0.5 * tie, 0.5 * tie], dim=1)


def soft_label_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PickScore's criterion over one pair, (B, 2) SPM scores and labels -> (B,):
    -(y_0 log p_0 + y_1 log p_1) + [y_0 == y_1] log 0.5, p = softmax(scores)."""
    logp = torch.log_softmax(scores.float(), dim=1)
    tie = (labels[:, 0] == labels[:, 1]).float()
    return -(labels * logp).sum(dim=1) + tie * math.log(0.5)


def pair_correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original's accuracy per pair: the preferred image scores higher; a tie counts 0.5."""
    first, second = (scores[:, 0] > scores[:, 1]).float(), (scores[:, 0] < scores[:, 1]).float()
    return first * labels[:, 0] + second * labels[:, 1]


def predicted_clean(adapter, xt: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 from the model output at x_t (DDIM's pred_original_sample, per-sample t):
    epsilon (x - sqrt(1 - abar) eps) / sqrt(abar); v sqrt(abar) x - sqrt(1 - abar) v; flow x - sigma v.
    Clipped as the scheduler clips (`clip_sample`)."""
    from diffalign.elbo import ddpm_coefficients, per_sample

    xt, output = xt.float(), output.float()
    if adapter.prediction_type == "flow":
        return xt - per_sample(t, xt) * output
    sqrt_abar, sqrt_one_minus = ddpm_coefficients(adapter.alphas_cumprod, t, xt)
    if adapter.prediction_type == "v_prediction":
        x0 = sqrt_abar * xt - sqrt_one_minus * output
    else:
        x0 = (xt - sqrt_one_minus * output) / sqrt_abar
    config = adapter.pipe.scheduler.config
    if config.get("clip_sample", False):
        x0 = x0.clamp(-config.get("clip_sample_range", 1.0), config.get("clip_sample_range", 1.0))
    return x0


def spm_timesteps(adapter, t: torch.Tensor) -> torch.Tensor:
    """The t the SPM sees: the DDPM timestep, or a flow model's sigma * T (its scheduler's timestep)."""
    if adapter.prediction_type == "flow":
        return t.float() * adapter.num_train_timesteps
    return t


@torch.no_grad()
def noised_predictions(adapter, pixels: torch.Tensor, prompts: list[str], noise: torch.Tensor, t: torch.Tensor,
                       guidance_scale: float, uncond: dict | None = None) -> torch.Tensor:
    """The decoded predicted x0 of B pairs (B, 2, 3, R, R) in [-1, 1], both images of pair i
    noised with noise[i] at t[i]: (2B, 3, R, R) in [0, 1], pair-major (image j of pair i at 2i + j)."""
    from diffalign.elbo import add_noise, flatten_groups, repeat_per_image

    device = adapter.device
    b, k = pixels.shape[:2]
    latents = adapter.encode_images(flatten_groups(pixels).to(device))
    noise = noise.to(device, latents.dtype).repeat_interleave(k, dim=0)
    tk = repeat_per_image(t.to(device), k)
    xt = add_noise(adapter, latents, noise, tk).to(latents.dtype)
    rows = [p for p in prompts for _ in range(k)]
    cond = adapter.encode_prompts(rows)
    denoiser = adapter.denoiser
    if guidance_scale > 1:
        if uncond is None:
            uncond = adapter.encode_prompts([""])
        both = {name: torch.cat([uncond[name].expand(len(rows), *uncond[name].shape[1:]), value])
                for name, value in cond.items()}
        out_u, out_c = adapter.predict(denoiser, torch.cat([xt, xt]), torch.cat([tk, tk]), both).float().chunk(2)
        output = out_u + guidance_scale * (out_c - out_u)
    else:
        output = adapter.predict(denoiser, xt, tk, cond).float()
    x0 = predicted_clean(adapter, xt, output, tk)
    return adapter.decode_latents(x0.to(latents.dtype)).float().clamp(0, 1)


def score_pairs(scorer, images: torch.Tensor, prompts: list[str], t: torch.Tensor | None) -> torch.Tensor:
    """(2B, 3, H, W) pair-major images -> (B, 2) scores; `t` (B,) goes to a scorer that takes
    it (the SPM), the others score the images alone."""
    import inspect

    rows = [p for p in prompts for _ in range(2)]
    inner = getattr(scorer, "module", scorer)  # an SPM wrapped by accelerate (DDP)
    if t is not None and "t" in inspect.signature(inner.score).parameters:
        scores = scorer(images, rows, t=t.repeat_interleave(2))  # through forward, where DDP hooks in
    else:
        scores = inner.score(images, rows)
    return scores.float().view(-1, 2)


# --------------------------------------------------------------------------- the loop
def train_spm(cfg: SPMConfig, pipeline=None) -> dict:
    """Train as configured; `pipeline`: an already-loaded diffusers pipeline instead of
    `cfg.base_model` (tests, notebooks). Returns the run's summary (also OUTPUT/train_spm.json)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from diffalign.data import collate_groups
    from diffalign.edges import write_files
    from diffalign.elbo import draw_noise_and_timesteps
    from diffalign.models import load_adapter
    from diffalign.rewards.spm import SPMReward
    from diffalign.step import micro_step_generator
    from diffalign.train import GroupOrder, check_output_dir, make_accelerator, weight_dtype_for

    cfg = resolve(cfg, pipeline)  # names and model configs only: nothing loads
    validate(cfg)
    dataset = build_pairs(cfg)  # a missing column or file fails here, before any model loads
    out = check_output_dir(cfg.output_dir)
    accelerator = make_accelerator(cfg, out)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(dataset) < cfg.batch_size * world:
        raise DiffalignError(f"{cfg.dataset!r} has {len(dataset)} pairs, fewer than one global batch "
                             f"({cfg.batch_size} x {world} processes): lower --batch-size")
    adapter = load_adapter(pipeline if pipeline is not None else cfg.base_model, device=accelerator.device,
                           dtype=weight_dtype_for(cfg))
    adapter.denoiser.requires_grad_(False).eval()
    spm = SPMReward.from_clip(cfg.init, accelerator.device, seed=cfg.seed).train()
    params = [p for p in spm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(spm, optimizer)
    uncond = adapter.encode_prompts([""]) if cfg.guidance_scale > 1 else None
    latent_shape = adapter.latent_shape(cfg.resolution, cfg.resolution)

    def batches():
        epoch = 0
        while True:
            order = GroupOrder(len(dataset), cfg.seed, epoch, rank, world, cfg.batch_size)
            dataset.set_epoch(epoch)
            yield from DataLoader(dataset, batch_size=cfg.batch_size, sampler=list(order), collate_fn=collate_groups,
                                  drop_last=True)
            epoch += 1

    rows_of = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    metrics, log, totals = [], {"loss": 0.0, "acc": 0.0, "n": 0}, {"loss": 0.0, "acc": 0.0, "n": 0}
    bar = tqdm(total=cfg.max_steps, desc="train-spm", disable=not main, mininterval=2)
    data = batches()
    for step in range(1, cfg.max_steps + 1):
        batch = next(data)
        noise, t = draw_noise_and_timesteps(adapter, latent_shape, cfg.batch_size * world,
                                            micro_step_generator(cfg.seed, step - 1))
        noise, t = noise[rows_of], t[rows_of]
        images = noised_predictions(adapter, batch["pixels"], batch["prompts"], noise, t, cfg.guidance_scale, uncond)
        labels = pair_labels(batch["scores"]).to(accelerator.device)
        scores = score_pairs(model, images, batch["prompts"], spm_timesteps(adapter, t).to(accelerator.device))
        loss = soft_label_loss(scores, labels).mean()
        if not torch.isfinite(loss):
            raise DiffalignError(f"train-spm: the loss is {loss.item()} at step {step}: lower --lr")
        accelerator.backward(loss)
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the global batch's mean over processes (the same number one process with it would log)
        seen = accelerator.reduce(torch.stack([loss.detach(), pair_correct(scores.detach(), labels).mean()]), "mean")
        for bucket in (log, totals):
            bucket["loss"] += seen[0].item()
            bucket["acc"] += seen[1].item()
            bucket["n"] += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics.append({"step": step, "loss": log["loss"] / log["n"], "train_acc": log["acc"] / log["n"]})
            bar.set_postfix(loss=f"{metrics[-1]['loss']:.3f}", acc=f"{metrics[-1]['train_acc']:.2f}")
            log = {"loss": 0.0, "acc": 0.0, "n": 0}
        bar.update(1)
    bar.close()
    result = {"steps": cfg.max_steps, "pairs": len(dataset), "loss": totals["loss"] / totals["n"],
              "train_acc": totals["acc"] / totals["n"], "config": asdict(cfg)}
    accelerator.wait_for_everyone()
    if main:
        files = accelerator.unwrap_model(model).state_files()
        files["metrics.jsonl"] = "".join(json.dumps(m) + "\n" for m in metrics).encode()
        files["train_spm.json"] = (json.dumps(result, indent=2) + "\n").encode()
        write_files(out, files, "the SPM")
        print(f"diffalign: done. The SPM is in {out} (use it as --reward spm@{out})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def noised_pair_correct(adapter, scorers: dict[str, Any], dataset, timesteps: list[int], *, guidance_scale: float,
                        seed: int = 0, batch_size: int = 16) -> dict[str, dict[int, list[float]]]:
    """{scorer: {t: per-pair correctness}} on every pair of `dataset`, both images noised with
    the same seeded noise at the fixed t (t = 0: the clean images, as the original's
    evaluation), x0 predicted by `adapter` and decoded; every scorer scores the same images (one
    that takes t gets it). Correct: 1 when the preferred image scores higher, a tie 0.5 whichever
    way (the original's accuracy)."""
    from diffalign.data import collate_groups

    latent_shape = adapter.latent_shape(dataset.cfg.resolution, dataset.cfg.resolution)
    uncond = adapter.encode_prompts([""]) if guidance_scale > 1 else None
    correct = {name: {t: [] for t in timesteps} for name in scorers}
    for start in range(0, len(dataset), batch_size):
        batch = collate_groups([dataset.load(i, augment=False) for i in range(start, min(start + batch_size, len(dataset)))])
        b = len(batch["prompts"])
        labels = pair_labels(batch["scores"])
        noise = torch.randn((b, *latent_shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + start))
        for t in timesteps:
            tt = torch.full((b,), t, dtype=torch.long)
            if t == 0:
                images = ((batch["pixels"].flatten(0, 1).float() + 1) / 2).clamp(0, 1).to(adapter.device)
            else:
                images = noised_predictions(adapter, batch["pixels"], batch["prompts"], noise, tt, guidance_scale, uncond)
            for name, scorer in scorers.items():
                scores = score_pairs(scorer, images, batch["prompts"], tt).cpu()
                correct[name][t] += pair_correct(scores, labels).tolist()
    return correct


def noised_pair_accuracy(adapter, scorers: dict[str, Any], dataset, timesteps: list[int], **options) -> dict[str, dict[int, float]]:
    """{scorer: {t: pairwise accuracy}}: the mean of `noised_pair_correct`."""
    found = noised_pair_correct(adapter, scorers, dataset, timesteps, **options)
    return {name: {t: sum(v) / len(v) for t, v in by_t.items()} for name, by_t in found.items()}
