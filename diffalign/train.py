"""`diffalign train`: one flat loop for every objective, on accelerate.

    build -> for each step: encode -> errors (policy, reference) -> objective -> step -> log/ckpt

Objectives differ only in `diffalign/objectives/<method>.py`; model families only in their
adapter (`diffalign/models`). Multi-GPU is `accelerate launch -m diffalign.cli train ...` with a
config from configs/accelerate/ (DDP, FSDP, DeepSpeed); nothing here is launcher-specific.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, replace
from pathlib import Path

from diffalign.config import TrainConfig, add_config_arguments, load_yaml, merge, resolve_config, save_config, validate
from diffalign.errors import DiffalignError
from diffalign.lazy import lazy
from diffalign.objectives import get_objective, resolve_hparams
from diffalign.step import MetricsFile, StepLog, compute_loss, draw_step, micro_step_generator, remember_prompts

torch = lazy("torch")  # loads when training starts: argument errors report before torch's import (seconds)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    cfg = resolve_config(args, base=quickstart_base(args))
    result = train(cfg)
    return 130 if result.get("interrupted") else 0


# The shipped toy models, in the order a quickstart looks for a method's recipe
# (configs/quickstart/<model>/<method>.yaml): flow-only methods exist only under toy-flow;
# toy-video (the toy Wan video model) comes last: it runs when named (`--model toy-video`) or for a
# method that has a recipe only there.
QUICKSTART_MODELS = ("toy-sd", "toy-flow", "toy-video")


def quickstart_recipe(method: str, model: str | None) -> Path:
    """configs/quickstart/<model>/<method>.yaml; with no model, the first toy model that has one."""
    from diffalign.paths import configs_dir

    root = configs_dir() / "quickstart"
    for name in [model] if model else QUICKSTART_MODELS:
        recipe = root / name / f"{method}.yaml"
        if recipe.is_file():
            return recipe
    have = sorted(p.stem for p in (root / (model or QUICKSTART_MODELS[0])).glob("*.yaml"))
    raise DiffalignError(
        f"no toy quickstart for --method {method}" + (f" on {model}" if model else "")
        + f": the toy recipes are {', '.join(have)}; or give --model and --dataset"
    )


def quickstart_base(args) -> TrainConfig | None:
    """With neither --model nor --dataset (on the CLI or in --config), start from the toy quickstart.

    A toy model with no --dataset (`--model toy-flow`) runs the quickstart on that model and its data.
    """
    user = load_yaml(args.config) if getattr(args, "config", None) else {}
    model = getattr(args, "model", None) or user.get("model")
    dataset = getattr(args, "dataset", None) or user.get("dataset")
    dataset = dataset or getattr(args, "prompts", None) or user.get("prompts")  # online methods read prompts
    if model and dataset:
        return None
    if dataset or (model and model not in QUICKSTART_MODELS):
        missing = "--dataset" if model else "--model"
        raise DiffalignError(
            f"{missing} is missing: give both --model and --dataset (--prompts for --method spo), or neither (or only a toy model: "
            f"{', '.join(QUICKSTART_MODELS)}) to run the toy quickstart"
        )
    method = getattr(args, "method", None) or user.get("method") or "dpo"
    recipe = quickstart_recipe(method, model)
    shown = recipe.relative_to(recipe.parents[2])
    base = merge(TrainConfig(), load_yaml(recipe), f"configs/{shown}")
    print(f"diffalign: no --dataset given: running the toy quickstart on {base.model} (configs/{shown})")
    return base


DEFAULT_RESOLUTION = 512


def model_resolution(model) -> int:
    """The size a model was built for (its configs), for a run that does not set --resolution."""
    from diffalign.edges import native_resolution

    if not isinstance(model, (str, Path)):  # a pipeline object
        denoiser = getattr(model, "unet", None) or getattr(model, "transformer", None)
        size = getattr(denoiser.config, "sample_size", None) if denoiser is not None else None
        return size * model.vae_scale_factor if isinstance(size, int) else DEFAULT_RESOLUTION
    return native_resolution(model) or DEFAULT_RESOLUTION


def resolve_shipped(name: str | None) -> str | None:
    """`toy-sd`, `toy-data/...`: the shipped assets, unless a local path of that name exists."""
    from diffalign.paths import asset

    if name and name.startswith("toy-") and not Path(name).exists() and asset(name.split("/")[0]).exists():
        return str(asset(name))
    return name


# --------------------------------------------------------------------------- data order
class GroupOrder:
    """Seeded per-epoch permutation of the dataset, split over processes, resumable.

    Epoch e uses randperm(N, seed + e), cut into global batches of world * batch_size groups;
    process r takes rows [r*B, (r+1)*B) of each global batch, so N processes with B groups
    see the same groups as one process with N*B. `start` skips the groups this process
    already consumed, so a resumed run sees the same data.
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int, world: int, batch_size: int, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world, self.batch_size = rank, world, batch_size

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        per_step = self.world * self.batch_size
        steps = self.n // per_step
        perm = torch.randperm(self.n, generator=g)[: steps * per_step]
        mine = perm.view(steps, self.world, self.batch_size)[:, self.rank, :].reshape(-1)
        return mine.tolist()[self.start :]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


# --------------------------------------------------------------------------- building blocks
def check_output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one a process: launched processes check the same folder at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise DiffalignError(
            f"cannot write to output folder {path!r} ({err.strerror or err}): choose a writable --output-dir"
        ) from err
    return out


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
            **({"fused": True} if use_fused_adamw(cfg, params) else {}),
        )
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise DiffalignError("optimizer adamw8bit needs bitsandbytes: pip install 'diffalign[bnb]'") from err
        return bnb.optim.AdamW8bit(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon
        )
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # The original SDXL Diffusion-DPO settings: a fixed lr, no parameter scaling.
        return Adafactor(
            params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
            clip_threshold=1.0, weight_decay=cfg.weight_decay,
        )
    raise DiffalignError(f"unknown optimizer {cfg.optimizer!r}: choose adamw, adamw8bit or adafactor")


def prepare_training(cfg: TrainConfig, accelerator, adapter, params):
    """The optimiser (lr scaled by the global batch with --scale-lr), its scheduler and the EMA,
    the denoiser and optimiser through accelerate, the scheduler registered for checkpoints.
    Returns (denoiser, optimizer, scheduler, ema); the caller registers the EMA (ema may be None)
    after its own checkpointed objects, in the order its checkpoints hold them."""
    optimizer = build_optimizer(cfg, params)
    scale = cfg.batch_size * cfg.grad_accum * accelerator.num_processes if cfg.scale_lr else 1
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * scale
    scheduler = build_scheduler(cfg, optimizer)
    ema = build_ema(cfg, params)
    register_trainable_checkpointing(accelerator)
    denoiser, optimizer = accelerator.prepare(adapter.denoiser, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return denoiser, optimizer, scheduler, ema


def apply_gradients(cfg: TrainConfig, accelerator, optimizer, params, log: StepLog, step: int) -> None:
    """After a micro-step's backward, inside `accelerator.accumulate`: at an optimiser step the
    finiteness check (at check steps) and gradient clipping, then the step (accelerate skips it
    between)."""
    if accelerator.sync_gradients:
        if is_check_step(cfg, step):
            check_finite(accelerator, log, step)
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def build_scheduler(cfg: TrainConfig, optimizer):
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
        )
    except ValueError as err:
        raise DiffalignError(f"lr_scheduler {cfg.lr_scheduler!r}: {err}") from err


def weight_dtype_for(cfg: TrainConfig) -> torch.dtype:
    """Frozen weights may run in half precision; trainable ones always stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)


def use_fused_adamw(cfg: TrainConfig, params) -> bool:
    """AdamW's fused kernel (one kernel over every trainable tensor instead of a Python loop
    over them): asked for, and every trainable tensor on a CUDA or CPU device (torch's fused
    AdamW runs on both; on the CPU it is 6x faster than the loop for the tiny UNet's 64 LoRA tensors)."""
    devices = {p.device.type for p in params}
    return cfg.fused_optimizer and devices in ({"cuda"}, {"cpu"})


def set_tf32(cfg: TrainConfig, device) -> bool:
    """TF32 matmuls and convolutions for fp32 work on an Ampere or newer GPU, when asked; True when on."""
    if not (cfg.tf32 and torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8):
        return False
    torch.set_float32_matmul_precision("high")  # TF32 matmuls
    torch.backends.cudnn.allow_tf32 = True  # and convolutions
    return True


def setup_denoiser(cfg: TrainConfig, adapter, needs_ref: bool):
    """Make the denoiser trainable (LoRA or full) and return (params, reference factory).

    Speed options: `channels_last` (convolution weights in channels_last, before a frozen
    reference copy is taken, so both run alike), `tf32` (set_tf32), `compile` (the denoiser's
    own forward compiled in place, `nn.Module.compile`: names, checkpoints and the LoRA reference
    stay as they are; the reference pass, with LoRA off, compiles its own graph once)."""
    from functools import partial

    from diffalign.models.lora import add_lora, frozen_copy, reference

    denoiser = adapter.denoiser
    denoiser.requires_grad_(False)
    if cfg.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    set_tf32(cfg, adapter.device)
    ref = None
    if cfg.full_finetune:
        denoiser.to(torch.float32)
        # The frozen copy must be taken before training touches the weights.
        if needs_ref:
            ref = partial(reference, denoiser, frozen_copy(denoiser, offload=cfg.offload_reference))
        denoiser.requires_grad_(True)
    else:
        add_lora(denoiser, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets, family=adapter.family)
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if needs_ref:
            ref = partial(reference, denoiser)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    if cfg.compile:
        denoiser.compile()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    return params, ref


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, pipeline=None) -> dict:
    """Run training as configured. `pipeline`: an already-loaded diffusers pipeline to train
    instead of loading `cfg.model` (for notebooks and tests).

    Everything the config alone decides is checked before any model loads: the values, and
    whether the output folder may hold this run (one run a folder, one process group at a time,
    a resume only of the same run)."""
    from diffalign import checkpoint as ckpt

    if get_objective(cfg.method).DATA == "prompts":  # online: the method samples and judges its own pairs
        from diffalign.train_online import train_online

        return train_online(cfg, pipeline)
    # shipped prompt lists (toy-data/...) resolve before validate reads them
    cfg = replace(cfg, eval_prompts=resolve_shipped(cfg.eval_prompts))
    validate(cfg)
    cfg = replace(cfg, model=resolve_shipped(cfg.model), dataset=resolve_shipped(cfg.dataset))
    if cfg.resolution is None:
        cfg = replace(cfg, resolution=model_resolution(cfg.model if pipeline is None else pipeline))
    out = check_output_dir(cfg.output_dir)
    resume_from = ckpt.resolve_resume(cfg.resume, out)
    ckpt.check_same_run(asdict(cfg), out, resume_from)
    with ckpt.RunLock(out, enabled=int(os.environ.get("RANK", "0")) == 0):
        return run_training(cfg, out, resume_from, pipeline)


def make_accelerator(cfg: TrainConfig, out: Path):
    """The run's Accelerator, seeded, with its trackers started (offline and online loops alike)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        # Several processes and no GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a
        # laptop): run them as a gloo process group on the CPU instead of failing on CUDA.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )
    set_seed(cfg.seed)
    if accelerator.num_processes > 1:
        # All processes leave the group together: one that exits while another still writes its
        # files takes gloo's threads down with it ("terminate called without an active exception").
        import atexit

        from diffalign.processes import close_process_group

        atexit.register(close_process_group)
    if cfg.report_to != "none":
        scalars = {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("diffalign", config=scalars)
    return accelerator


def objective_hparams(cfg: TrainConfig, adapter) -> dict:
    """The objective's options for this model: its defaults, the user's --objective, then --beta."""
    overrides = dict(cfg.objective)
    if cfg.beta is not None:
        overrides["beta"] = cfg.beta
    return resolve_hparams(cfg.method, adapter.prediction_type, overrides)


def run_training(cfg: TrainConfig, out: Path, resume_from: Path | None, pipeline=None) -> dict:
    """The loop itself, on a validated config and a folder this run holds."""
    from tqdm.auto import tqdm

    from diffalign import checkpoint as ckpt
    from diffalign.models import load_adapter
    from diffalign.models.lora import set_attention

    objective = get_objective(cfg.method)
    accelerator = make_accelerator(cfg, out)
    main = accelerator.is_main_process
    adapter = load_adapter(pipeline if pipeline is not None else cfg.model, device=accelerator.device,
                           dtype=weight_dtype_for(cfg))
    if adapter.prediction_type == "flow":  # sigma ~ logit-normal(mean, std)
        adapter.logit_mean, adapter.logit_std = cfg.logit_mean, cfg.logit_std
    if hasattr(adapter, "set_expert"):  # Wan 2.2: which expert trains (before LoRA goes in)
        adapter.set_expert(cfg.expert)
    elif cfg.expert != "auto":
        raise DiffalignError(f"--expert {cfg.expert} is for two-expert video models (Wan 2.2), not {adapter.family}: unset it")
    hparams = objective_hparams(cfg, adapter)
    attention = set_attention(adapter.denoiser, cfg.attention)

    dataset = build_training_data(cfg, adapter, accelerator, objective)
    params, reference = setup_denoiser(cfg, adapter, objective.NEEDS_REF)
    remember_prompts(cfg, adapter, dataset, accelerator.num_processes)
    denoiser, optimizer, scheduler, ema = prepare_training(cfg, accelerator, adapter, params)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    state = {"step": 0, "epoch": 0, "consumed": 0}
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from)
        if main:
            print(f"diffalign: resumed from {resume_from} at step {state['step']}")
    if main:
        trim_metrics(out / "metrics.jsonl", state["step"])  # rows logged after the checkpoint are redone
        save_config(cfg, out / "config.yaml")
        print(
            f"diffalign: {cfg.method} on {adapter.family} ({adapter.prediction_type}), "
            f"{'full fine-tune' if cfg.full_finetune else f'LoRA rank {cfg.lora_rank}'}, {cfg.resolution} px, attention={attention}, "
            f"{len(dataset) if hasattr(dataset, '__len__') else 'streamed'} groups, {sum(p.numel() for p in params):,} trainable parameters, hparams={hparams}"
        )
    metrics_file = MetricsFile(out / "metrics.jsonl", accelerator, cfg.report_to)
    stop = install_stop_handler()
    progress = tqdm(total=cfg.max_steps, initial=state["step"], disable=not main, desc=cfg.method, dynamic_ncols=True)
    log = StepLog(accelerator)
    rank = accelerator.process_index
    rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)  # this process's rows of a global batch
    global_batch = cfg.batch_size * accelerator.num_processes
    empty_cond = dataset.empty_cond if cfg.cache_latents else None  # the cache's empty prompt, for caption dropout
    step_start = time.perf_counter()
    interrupted = False

    def save(step_state):
        # The checkpoint carries the config it was trained with, so a resume can check it is the same run.
        return ckpt.save_checkpoint(accelerator, out, step_state["step"], {**step_state, "config": asdict(cfg)},
                                    cfg.keep_checkpoints)

    def write_metrics():
        metrics_file.write(log)

    last_good = dict(state)  # the state at the last optimiser step: what a checkpoint may hold
    try:
        while state["step"] < cfg.max_steps and not interrupted:
            loader = make_loader(dataset, cfg, state, accelerator)
            if loader is None:  # fewer groups left in this epoch than one batch
                if state["consumed"] == 0:
                    raise DiffalignError(
                        f"the dataset has fewer usable groups than one batch of {cfg.batch_size} per process: "
                        "lower --batch-size or add data"
                    )
                state["epoch"], state["consumed"] = state["epoch"] + 1, 0
                continue
            produced = False
            for batch in loader:
                produced = True
                micro = state["step"] * cfg.grad_accum + log.micro_steps
                generator = micro_step_generator(cfg.seed, micro)
                draws = draw_step(adapter, batch, generator, global_batch, cfg.caption_dropout).rows(rows)
                with accelerator.accumulate(denoiser), accelerator.autocast():
                    loss, metrics = compute_loss(adapter, denoiser, batch, objective, hparams, reference, draws,
                                                 accelerator.device, empty_cond)
                    log.add(loss, metrics)
                    accelerator.backward(loss)
                    apply_gradients(cfg, accelerator, optimizer, params, log, state["step"] + 1)
                state["consumed"] += cfg.batch_size
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                if ema is not None:
                    ema.step(params)
                state["step"] += 1
                last_good = dict(state)
                elapsed = time.perf_counter() - step_start
                step_start = time.perf_counter()
                log.end_step(step=state["step"], epoch=state["epoch"], lr=scheduler.get_last_lr()[0], step_time=elapsed)
                progress.update(1)
                if state["step"] % cfg.log_every == 0 or state["step"] >= cfg.max_steps:
                    write_metrics()
                    progress.set_postfix(loss=f"{log.last['loss']:.4f}", acc=f"{log.last.get('implicit_acc', float('nan')):.2f}")
                if cfg.validation_every and state["step"] % cfg.validation_every == 0 and main:
                    run_validation(cfg, adapter, out, state["step"])
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                    write_metrics()  # a resumed run trims metrics.jsonl to its checkpoint: log up to it first
                    save(dict(state))
                if stop_requested(accelerator, stop, cfg, state["step"]):
                    check_finite(accelerator, log, state["step"])  # a checkpoint holds checked steps only
                    write_metrics()
                    path = save(dict(state))
                    if main:
                        print(f"\ndiffalign: stopped by signal at step {state['step']}; checkpoint {path}; "
                              f"continue with --resume latest")
                    interrupted = True
                    break
                if state["step"] >= cfg.max_steps:
                    break
            else:
                if not produced:
                    raise DiffalignError(
                        f"this process's share of the stream holds fewer than {cfg.batch_size} groups: "
                        "lower --batch-size, use fewer processes, or add data"
                    )
                state["epoch"], state["consumed"] = state["epoch"] + 1, 0
    except DiffalignError as err:  # bad data under --strict, a non-finite loss, ...: keep the work done
        write_metrics()
        progress.close()  # ends the bar's line: the error gets a line of its own
        raise DiffalignError(f"{err}; {keep_work(last_good, save, out, params)}") from None
    progress.close()
    stop.restore()
    metrics_file.close()
    if interrupted:
        return {"interrupted": True, "step": state["step"]}

    return finish_run(cfg, accelerator, adapter, denoiser, params, ema, out, state, save,
                      {"step": state["step"], "output_dir": str(out)})


def is_check_step(cfg: TrainConfig, step: int) -> bool:
    """The optimiser steps whose losses reach the host: each log_every-th, each checkpoint's and
    the last. The finiteness check runs there, so a checkpoint never holds a non-finite step."""
    return (step % cfg.log_every == 0 or step >= cfg.max_steps
            or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0))


def check_finite(accelerator, log: StepLog, step: int) -> None:
    """Stop on a NaN or infinite loss among the steps since the last check and step `step` (the
    one whose micro-steps are in `log`; before its optimiser step in apply_gradients), on every
    process at once."""
    bad = log.first_non_finite(step)
    first = earliest_across(accelerator, bad[0] if bad else None)
    if first is None:
        return
    value = bad[1] if bad and bad[0] == first else "not finite"
    raise DiffalignError(f"loss is {value} at step {first}: lower --lr or --beta, or train in fp32/bf16 instead "
                         "of fp16")


def finish_run(cfg: TrainConfig, accelerator, adapter, denoiser, params, ema, out: Path, state: dict, save,
               result: dict) -> dict:
    """After the last step: a final checkpoint, the weights (EMA ones when kept), the curves and
    the final evaluation; returns `result` with the evaluation added."""
    if cfg.checkpoint_every:
        save(dict(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(params)
        save_final_weights(cfg, adapter, accelerator.unwrap_model(denoiser), out)
    try:
        if accelerator.is_main_process:
            plot_training_curves(out / "metrics.jsonl", out / "training_curves.png")
        if cfg.eval_prompts:
            accelerator.wait_for_everyone()  # every process reads the weights the main one wrote
            result["eval"] = run_final_eval(cfg, out, training_processes(accelerator))
    except DiffalignError as err:  # e.g. a full disk: the weights are written, say so
        raise DiffalignError(f"{err} (training finished: the weights are in {out})") from None
    if accelerator.is_main_process:
        print(f"diffalign: done. Weights, metrics.jsonl, training_curves.png and config.yaml are in {out}")
        if "eval" in result:
            grid = "grid.gif" if cfg.num_frames else "grid.png"  # videos: an animated side-by-side grid
            print(f"diffalign: evaluation (eval.json, before/after {grid}) is in {out / 'eval'}")
    accelerator.end_training()
    return result


# --------------------------------------------------------------------------- helpers of the loop
def make_loader(dataset, cfg: TrainConfig, state: dict, accelerator):
    """This process's batches for the rest of the current epoch (None when less than a batch is left).

    Map-style data follows GroupOrder; a stream (`--streaming`) is already split by process
    and resumes by skipping the groups it had consumed this epoch.
    """
    from torch.utils.data import DataLoader, IterableDataset

    from diffalign.data import collate_groups

    if isinstance(dataset, IterableDataset):
        dataset.set_epoch(state["epoch"])
        dataset.skip(state["consumed"], batch_size=cfg.batch_size)
        # A stream's order is exact only when one process reads it (its workers rotate it).
        return DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate_groups,
                          num_workers=cfg.num_workers or 0, drop_last=True)
    order = GroupOrder(len(dataset), cfg.seed, state["epoch"], accelerator.process_index,
                       accelerator.num_processes, cfg.batch_size, state["consumed"])
    if len(order) < cfg.batch_size:
        return None
    if hasattr(dataset, "set_epoch"):  # new augmentation draws each epoch
        dataset.set_epoch(state["epoch"])
    workers = loader_workers(cfg, len(order) // cfg.batch_size, accelerator)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=list(order), collate_fn=collate_groups,
                      num_workers=workers, drop_last=True, persistent_workers=False,
                      prefetch_factor=4 if workers else None)


# Workers start afresh each epoch (a fraction of a second): an epoch shorter than this many
# batches decodes in the training process.
AUTO_WORKERS_MIN_BATCHES = 32
AUTO_WORKERS_MAX = 4


def loader_workers(cfg: TrainConfig, batches: int, accelerator) -> int:
    """`cfg.num_workers`, or with None: workers for the CPU cores this process's training leaves
    idle (on the CPU, the cores beyond its torch threads; on a GPU, all but one), up to
    AUTO_WORKERS_MAX, when the data is decoded (not the latent cache) and the epoch is long enough."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if cfg.cache_latents or batches < AUTO_WORKERS_MIN_BATCHES:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    mine = max(1, cores // max(1, local))
    busy = torch.get_num_threads() if accelerator.device.type == "cpu" else 1
    return max(0, min(AUTO_WORKERS_MAX, mine - busy))


def data_config(cfg: TrainConfig):
    """The data section of the training config: every DataConfig field has a TrainConfig twin."""
    from dataclasses import fields

    from diffalign.data import DataConfig

    return DataConfig(**{f.name: getattr(cfg, f.name) for f in fields(DataConfig)})


def build_training_data(cfg: TrainConfig, adapter, accelerator, objective):
    data_cfg = data_config(cfg)
    pairwise = objective.DATA != "ranked"
    if not cfg.cache_latents:
        from diffalign.data import build_dataset

        dataset = build_dataset(data_cfg, pairwise=pairwise)
        check_data_fits(cfg, objective, dataset)
        return dataset
    from diffalign.cache import CachedDataset, build_cache

    cache_root = cfg.cache_dir or str(Path(cfg.output_dir) / "latent-cache")
    folder = build_cache(adapter, data_cfg, cache_root, model_id=str(cfg.model), pairwise=pairwise,
                         device=accelerator.device, rank=accelerator.process_index, world_size=accelerator.num_processes)
    accelerator.wait_for_everyone()
    return CachedDataset(folder)


def check_data_fits(cfg: TrainConfig, objective, dataset) -> None:
    """Data the objective cannot learn from: DCPO without per-image captions would train as plain
    DPO, and ranked lists that are all ties give RankDPO a zero loss."""
    import warnings

    from diffalign.data import GroupDataset, describe_groups

    if not isinstance(dataset, GroupDataset):  # a stream: nothing to read ahead
        return
    seen = describe_groups(dataset)
    if objective.DATA == "captioned-pairs" and not seen["image_captions"]:
        raise DiffalignError(
            f"{cfg.method} needs a caption per image but the first {seen['checked']} groups of {cfg.dataset!r} have "
            "none: add caption_0/caption_1 columns (or \"captions\" in JSONL), "
            "e.g. with `diffalign captions`"
        )
    if objective.DATA == "ranked" and seen["all_ties"]:
        warnings.warn(
            f"the first {seen['checked']} groups of {cfg.dataset!r} are all ties (equal scores): {cfg.method} learns "
            "nothing from a tie (loss 0); check the score columns", stacklevel=2
        )


def register_trainable_checkpointing(accelerator) -> None:
    """Checkpoints hold only the trainable weights (LoRA: megabytes, not the whole UNet)."""
    from safetensors.torch import load_file, save_file

    from diffalign.edges import apply_umask

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, str(Path(output_dir) / f"trainable_{i}.safetensors"))
            apply_umask(Path(output_dir) / f"trainable_{i}.safetensors")  # safetensors leaves 0600
        weights.clear()  # accelerate would otherwise write every weight of the model

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            state = load_file(str(Path(input_dir) / f"trainable_{i}.safetensors"))
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            misfits = sorted(n for n, w in state.items() if shapes.get(n) != tuple(w.shape))
            if misfits:
                name = misfits[0]
                found = f"shape {tuple(state[name].shape)} where the model has {shapes[name]}" if name in shapes else "unknown"
                raise DiffalignError(
                    f"checkpoint {input_dir} does not fit this model ({len(misfits)} weights, e.g. {name}: {found}): "
                    "resume with the same --model, --lora-rank and --full-finetune settings"
                )
            model.load_state_dict(state, strict=False)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any (so they stop or save together)."""
    if accelerator.num_processes == 1:
        return flag
    flags = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))
    return bool(flags.max().item() > 0)


def earliest_across(accelerator, step: int | None) -> int | None:
    """The smallest `step` over all processes (None where a process has none), on every process."""
    if accelerator.num_processes == 1:
        return step
    steps = accelerator.gather(torch.tensor([math.inf if step is None else float(step)], device=accelerator.device))
    first = steps.min().item()
    return None if math.isinf(first) else int(first)


def stop_requested(accelerator, stop, cfg: TrainConfig, step: int) -> bool:
    """A SIGTERM/SIGINT seen by any process. One process reads its flag every step; several
    agree on it at check steps only, so the agreement adds no collective to the other steps."""
    if accelerator.num_processes > 1 and not is_check_step(cfg, step):
        return False
    return any_process(accelerator, stop.requested)


def trim_metrics(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(rows):
        path.write_text("".join(line + "\n" for line in kept))


def keep_work(last_good: dict, save, out: Path, params) -> str:
    """Checkpoint the last finished step (unless one exists) and say where it is. When the
    trainable weights are no longer finite (a bad loss found after its optimiser step, at a
    later check), the last checkpoint is what is kept: each was written after a check."""
    from diffalign.checkpoint import list_checkpoints

    if not all(bool(torch.isfinite(p).all()) for p in params):
        found = list_checkpoints(out)
        if not found:
            return ("training stopped; the weights are not finite and no checkpoint precedes the bad step "
                    "(losses are checked every --log-every steps: --log-every 1 keeps the step before a bad one)")
        return f"training stopped; the last good checkpoint is {found[-1]} (--resume latest continues from it)"
    if last_good["step"] == 0:
        return "training stopped before the first step finished"
    found = [p for p in list_checkpoints(out) if p.name == f"checkpoint-{last_good['step']}"]
    path = found[0] if found else save(dict(last_good))
    return f"training stopped; the last good step is in {path} (--resume latest continues from it)"


class install_stop_handler:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_ema(cfg: TrainConfig, params):
    if not cfg.ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.ema_decay)


def save_final_weights(cfg: TrainConfig, adapter, denoiser, out: Path) -> None:
    """LoRA -> OUTPUT/pytorch_lora_weights.safetensors (pipe.load_lora_weights(OUTPUT));
    full fine-tune -> the whole pipeline in OUTPUT (DiffusionPipeline.from_pretrained(OUTPUT)).

    Written through a temporary folder with the user's umask (`models.lora.publish`). A full disk
    (any OSError, or the writers' own errors about writing) ends in one line naming the last
    complete checkpoint and the space the weights need; no partial file stays behind."""
    from diffalign.models.lora import publish, save_lora

    try:
        if cfg.full_finetune:
            publish(out, lambda folder: adapter.pipe.save_pretrained(str(folder), safe_serialization=True) or folder)
        else:
            save_lora(denoiser, str(out), adapter.family)
    except Exception as err:  # safetensors and torch report a failed write as their own error types
        text = str(err).strip()
        if not isinstance(err, OSError) and not any(w in text.lower() for w in ("writ", "space", "storage")):
            raise
        reason = getattr(err, "strerror", None) or (text.splitlines()[0][:120] if text else type(err).__name__)
        raise DiffalignError(f"could not write the final weights to {out} ({reason}); {weights_kept(cfg, out)}: free at "
                             f"least {final_weights_size(cfg, adapter, denoiser)} (the weights), then {rerun(cfg, out)}") from None


def final_weights_size(cfg: TrainConfig, adapter, denoiser) -> str:
    """What the final weights take on disk: the trainable tensors (LoRA), or every weight of the pipeline."""
    from diffalign.edges import size_text

    if cfg.full_finetune:
        modules = [m for m in adapter.pipe.components.values() if isinstance(m, torch.nn.Module)]
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    else:
        tensors = [p for p in denoiser.parameters() if p.requires_grad]
    return size_text(sum(t.numel() * t.element_size() for t in tensors))


def weights_kept(cfg: TrainConfig, out: Path) -> str:
    from diffalign.checkpoint import list_checkpoints

    found = list_checkpoints(out)
    if found:
        return f"the trained state is kept in the last complete checkpoint, {found[-1]}"
    return "no checkpoint holds the trained state (--checkpoint-every 0)"


def rerun(cfg: TrainConfig, out: Path) -> str:
    from diffalign.checkpoint import list_checkpoints

    if list_checkpoints(out):
        return "run the same command with --resume latest (it writes the weights from the checkpoint)"
    return "train again"


VALIDATION_ROWS = 8  # validation steps a sheet shows: the latest ones


def run_validation(cfg: TrainConfig, adapter, out: Path, step: int) -> None:
    """Images of the validation prompts (same seeds every time) at this step, kept in
    OUTPUT/validation/images/; OUTPUT/validation/step-<step>.png shows them beside the earlier
    steps': a prompt a column, a step a row (the latest VALIDATION_ROWS), so a person sees the
    model change."""
    from PIL import Image

    from diffalign.edges import sampling_defaults
    from diffalign.plots import Tile, save_image_sheet
    from diffalign.sampler import generate

    prompts = cfg.validation_prompts or ["a photo"]
    pipe = adapter.pipe
    # Settings left None: the model folder's diffalign.json, else the pipeline's defaults.
    sampling = sampling_defaults(cfg.model)
    if cfg.num_inference_steps is not None:
        sampling["num_inference_steps"] = cfg.num_inference_steps
    if cfg.guidance_scale is not None:
        sampling["guidance_scale"] = cfg.guidance_scale
    seeds = [cfg.seed + i for i in range(len(prompts))]
    adapter.denoiser.eval()
    with torch.no_grad():
        if cfg.resolution is not None:
            sampling["height"] = sampling["width"] = cfg.resolution
        batch = generate(pipe, prompts, seeds=seeds, **sampling)
    adapter.denoiser.train()
    folder = out / "validation"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pixels = (batch.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / "images" / f"step-{step:06d}-{i:02d}.png")
    steps = sorted({int(f.name[5:11]) for f in (folder / "images").glob("step-*.png") if int(f.name[5:11]) <= step})
    steps = steps[-VALIDATION_ROWS:]
    rows = [[Tile(Image.open(f)) if (f := folder / "images" / f"step-{s:06d}-{i:02d}.png").is_file() else None
             for i in range(len(prompts))] for s in steps]
    save_image_sheet(folder / f"step-{step:06d}.png", rows, what="the validation sheet", row_titles=[f"step {s}" for s in steps],
                     col_titles=prompts, title=f"validation images: one seed a prompt, the latest {len(steps)} validation steps")


def plot_training_curves(metrics_path: Path, png_path: Path) -> None:
    from diffalign.plots import plot_curves

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if rows:
        # the panels a run logs: pair methods' implicit accuracy, GRPO's mean training reward
        plot_curves(rows, ["loss", "implicit_acc", "reward_mean"], png_path)


def training_processes(accelerator):
    """The training's processes, for work they share after training (the final evaluation)."""
    from accelerate import PartialState

    from diffalign.processes import Processes

    if accelerator.num_processes == 1:
        return Processes()
    return Processes(rank=accelerator.process_index, world=accelerator.num_processes, state=PartialState())


def run_final_eval(cfg: TrainConfig, out: Path, processes=None) -> dict:
    """Generate with the trained and the base model (same seeds), score, write OUTPUT/eval/.
    With several training processes each draws its share of the images (diffalign.processes);
    the main process writes the files."""
    from diffalign.evaluate import evaluate

    trained = str(out) if cfg.full_finetune else cfg.model
    # Settings left None come from the base model's folder (evaluate falls back to the baseline's).
    return evaluate(
        trained, cfg.model if cfg.full_finetune else None, cfg.eval_prompts, cfg.eval_rewards,
        cfg.eval_num_images, cfg.seed, out / "eval", lora=None if cfg.full_finetune else str(out),
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, resolution=cfg.resolution,
        max_prompts=cfg.eval_max_prompts, baseline_cache=cfg.eval_baseline_cache,
        num_frames=cfg.num_frames, fps=cfg.fps,  # video models: as many frames as the training videos
        processes=processes,
    )
