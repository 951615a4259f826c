"""The online training loop (`diffalign train --method spo`): roll out, judge, pool, train.

    build -> loop: [buffer short of a global batch: rollout -> pool] -> log-probs (policy,
             reference) -> objective -> step -> log/ckpt

`diffalign.train.train` dispatches here when the objective's DATA is "prompts". The building
blocks are train.py's (denoiser setup, optimiser, scheduler, checkpoint hooks, StepLog) and
diffalign/online.py's (rollouts, pair selection, the pooled buffer). A checkpoint holds the
trainable weights, the optimiser and scheduler, the pairs not yet trained on, and the trainer
state (step, rollouts made, the prompt order's position): every rollout's randomness is a pure
function of the seed and that position, so a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from diffalign.config import TrainConfig, save_config, validate
from diffalign.errors import DiffalignError

# Config keys of an online run that make it what it is (besides checkpoint.RUN_IDENTITY).
ONLINE_IDENTITY = ("prompts", "reward", "num_candidates", "divert_start_step", "pair_threshold", "sampler_eta",
                   "sampler_noise_level", "rollout_prompts", "num_inference_steps", "guidance_scale")
# Rollouts in a row without one pair above the threshold before the run gives up.
MAX_EMPTY_ROLLOUTS = 20


def train_online(cfg: TrainConfig, pipeline=None) -> dict:
    """Run an online method as configured (`pipeline`: an already-loaded diffusers pipeline)."""
    from diffalign import checkpoint as ckpt
    from diffalign.train import check_output_dir, model_resolution, resolve_shipped

    validate(cfg)
    cfg = replace(cfg, model=resolve_shipped(cfg.model))
    if cfg.resolution is None:
        cfg = replace(cfg, resolution=model_resolution(cfg.model if pipeline is None else pipeline))
    out = check_output_dir(cfg.output_dir)
    resume_from = ckpt.resolve_resume(cfg.resume, out)
    ckpt.check_same_run(asdict(cfg), out, resume_from)
    check_same_online_run(asdict(cfg), out, resume_from)
    with ckpt.RunLock(out, enabled=int(os.environ.get("RANK", "0")) == 0):
        return run_online(cfg, out, resume_from, pipeline)


def check_same_online_run(config: dict, out: Path, resume_from: Path | None) -> None:
    """The online keys of the folder's (or checkpoint's) run must equal this run's."""
    import yaml

    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text()).get("config")
    else:
        path = out / "config.yaml"
        saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    changed = [k for k in ONLINE_IDENTITY if saved and k in saved and saved[k] != config.get(k)]
    if changed:
        key = changed[0]
        raise DiffalignError(f"output folder {out} holds another run: its {key} is {saved[key]!r}, this run's is "
                             f"{config.get(key)!r}; choose another --output-dir or resume with the run's own settings")


def sampling_settings(cfg: TrainConfig) -> tuple[int, float]:
    """Rollout steps and guidance: the config's, else the model folder's / pipeline's defaults."""
    from diffalign.edges import sampling_defaults

    defaults = sampling_defaults(cfg.model) if isinstance(cfg.model, (str, Path)) else {}
    steps = cfg.num_inference_steps or defaults.get("num_inference_steps") or 20
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else defaults.get("guidance_scale", 5.0)
    return int(steps), float(guidance)


def load_online_rewards(spec: str, device) -> dict:
    """{name: (reward, weight)} from a reward spec (weight 1 where none is given)."""
    from diffalign.edges import load_rewards, parse_reward_specs

    specs = parse_reward_specs(spec)
    loaded = load_rewards(specs, device=device)
    weights = [1.0 if s.weight is None else s.weight for s in specs]
    return {name: (reward, weight) for (name, reward), weight in zip(loaded.items(), weights)}


def run_online(cfg: TrainConfig, out: Path, resume_from: Path | None, pipeline=None) -> dict:
    from tqdm.auto import tqdm

    from diffalign import checkpoint as ckpt
    from diffalign import online
    from diffalign.models import load_adapter
    from diffalign.models.lora import set_attention
    from diffalign.objectives import get_objective
    from diffalign.step import MetricsFile, StepLog, micro_step_generator
    from diffalign.train import (GroupOrder, any_process, build_ema, build_optimizer, build_scheduler, check_finite,
                                 finish_run, install_stop_handler, keep_work, make_accelerator, objective_hparams,
                                 register_trainable_checkpointing, setup_denoiser, trim_metrics, weight_dtype_for)

    objective = get_objective(cfg.method)
    accelerator = make_accelerator(cfg, out)
    main = accelerator.is_main_process
    adapter = load_adapter(pipeline if pipeline is not None else cfg.model, device=accelerator.device,
                           dtype=weight_dtype_for(cfg))
    transition = online.transition_for(adapter, cfg.sampler_eta, cfg.sampler_noise_level)
    hparams = objective_hparams(cfg, adapter)
    prompts = online.read_training_prompts(cfg.prompts)
    steps, guidance = sampling_settings(cfg)
    if cfg.divert_start_step >= steps:
        raise DiffalignError(f"--divert-start-step {cfg.divert_start_step} leaves no branching step of the model's "
                             f"{steps} sampling steps: use a smaller one or raise --num-inference-steps")
    world, rank, per_rollout = accelerator.num_processes, accelerator.process_index, cfg.rollout_prompts
    if len(prompts) < world * per_rollout:
        raise DiffalignError(f"{len(prompts)} prompts are fewer than one rollout of {world * per_rollout} "
                             "(processes x --rollout-prompts): lower --rollout-prompts or add prompts")
    rewards = load_online_rewards(cfg.reward, accelerator.device)
    attention = set_attention(adapter.denoiser, cfg.attention)
    setup = online.rollout_setup(adapter, prompts[0], steps=steps, guidance_scale=guidance, resolution=cfg.resolution,
                                 transition=transition)

    params, reference = setup_denoiser(cfg, adapter, objective.NEEDS_REF)
    lr = cfg.lr * (cfg.batch_size * cfg.grad_accum * world if cfg.scale_lr else 1)
    optimizer = build_optimizer(cfg, params)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scheduler = build_scheduler(cfg, optimizer)
    ema = build_ema(cfg, params)
    register_trainable_checkpointing(accelerator)
    denoiser, optimizer = accelerator.prepare(adapter.denoiser, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    buffer = online.PairBuffer(tuple(setup.latent_shape))
    accelerator.register_for_checkpointing(buffer)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    state = {"step": 0, "epoch": 0, "consumed": 0, "rollouts": 0, "compared": 0, "pairs": 0,
             "rollout_time": 0.0, "train_time": 0.0}
    if resume_from is not None:
        state = {**state, **ckpt.load_checkpoint(accelerator, resume_from)}
        if main:
            print(f"diffalign: resumed from {resume_from} at step {state['step']}")
    if main:
        trim_metrics(out / "metrics.jsonl", state["step"])
        save_config(cfg, out / "config.yaml")
        print(
            f"diffalign: {cfg.method} on {adapter.family} ({adapter.prediction_type}), "
            f"{'full fine-tune' if cfg.full_finetune else f'LoRA rank {cfg.lora_rank}'}, {cfg.resolution} px, "
            f"attention={attention}, {len(prompts)} prompts, {type(transition).__name__}, {steps} steps, "
            f"guidance {guidance:g}, {cfg.num_candidates} candidates from step {cfg.divert_start_step}, "
            f"{sum(p.numel() for p in params):,} trainable parameters, hparams={hparams}"
        )
    metrics_file = MetricsFile(out / "metrics.jsonl", accelerator, cfg.report_to)
    stop = install_stop_handler()
    progress = tqdm(total=cfg.max_steps, initial=state["step"], disable=not main, desc=cfg.method, dynamic_ncols=True)
    log = StepLog(accelerator)
    rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    global_batch = cfg.batch_size * world
    interrupted = False

    def save(step_state):
        return ckpt.save_checkpoint(accelerator, out, step_state["step"], {**step_state, "config": asdict(cfg)},
                                    cfg.keep_checkpoints)

    def write_metrics():
        metrics_file.write(log)

    def prompt_ids() -> list[int]:
        """This process's prompts of the next rollout, in the seeded per-epoch order."""
        while True:
            order = GroupOrder(len(prompts), cfg.seed, state["epoch"], rank, world, per_rollout, state["consumed"])
            ids = order.indices()[:per_rollout]
            if len(ids) == per_rollout:
                return ids
            state["epoch"], state["consumed"] = state["epoch"] + 1, 0

    def rollout() -> int:
        start = time.perf_counter()
        ids = prompt_ids()
        first = state["rollouts"] * world * per_rollout + rank * per_rollout
        slots = list(range(first, first + per_rollout))
        texts = [prompts[i] for i in ids]
        with accelerator.autocast():
            result = online.branch_rollout(
                online.condition(setup, texts), texts, ids, slots, rewards,
                online.slot_generators(cfg.seed, slots), num_candidates=cfg.num_candidates,
                divert_start_step=cfg.divert_start_step, threshold=cfg.pair_threshold,
            )
        pooled = online.pool(result.pairs, accelerator, micro_step_generator(cfg.seed + 1, state["rollouts"]))
        buffer.extend(pooled)
        state["rollouts"] += 1
        state["consumed"] += per_rollout
        state["compared"] += result.candidate_steps * world
        state["pairs"] += len(pooled)
        state["rollout_time"] += time.perf_counter() - start
        return len(pooled)

    last_good = dict(state)
    step_start = time.perf_counter()
    try:
        while state["step"] < cfg.max_steps:
            empty = 0
            while len(buffer) < global_batch:
                empty = 0 if rollout() else empty + 1
                if empty >= MAX_EMPTY_ROLLOUTS:
                    raise DiffalignError(f"{MAX_EMPTY_ROLLOUTS} rollouts in a row gave no pair above --pair-threshold "
                                         f"{cfg.pair_threshold}: lower it, or use a reward that separates the candidates")
            train_start = time.perf_counter()
            batch = buffer.take(global_batch).index(rows)
            with accelerator.accumulate(denoiser), accelerator.autocast():
                logp, ref_logp = online.pair_log_probs(setup, denoiser, reference, batch, prompts)
                losses, metrics = objective.loss(logp, ref_logp, **hparams)
                loss = losses.mean()
                log.add(loss, metrics)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    check_finite(accelerator, log, state["step"] + 1)
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["train_time"] += time.perf_counter() - train_start
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                ema.step(params)
            state["step"] += 1
            last_good = dict(state)
            elapsed, step_start = time.perf_counter() - step_start, time.perf_counter()
            log.end_step(step=state["step"], epoch=state["epoch"], lr=scheduler.get_last_lr()[0], step_time=elapsed,
                         rollouts=state["rollouts"], pair_rate=state["pairs"] / max(state["compared"], 1),
                         rollout_time=state["rollout_time"], train_time=state["train_time"])
            progress.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] >= cfg.max_steps:
                write_metrics()
                progress.set_postfix(loss=f"{log.last['loss']:.4f}", pairs=f"{log.last['pair_rate']:.2f}")
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                write_metrics()
                save(dict(state))
            if any_process(accelerator, stop.requested):
                write_metrics()
                path = save(dict(state))
                if main:
                    print(f"\ndiffalign: stopped by signal at step {state['step']}; checkpoint {path}; "
                          "continue with --resume latest")
                interrupted = True
                break
    except DiffalignError as err:
        write_metrics()
        raise DiffalignError(f"{err}; {keep_work(last_good, save, out)}") from None
    progress.close()
    stop.restore()
    metrics_file.close()
    if interrupted:
        return {"interrupted": True, "step": state["step"]}

    result = {"step": state["step"], "output_dir": str(out),
              "pair_rate": state["pairs"] / max(state["compared"], 1), "rollouts": state["rollouts"]}
    return finish_run(cfg, accelerator, adapter, denoiser, params, ema, out, state, save, result)
