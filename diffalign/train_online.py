"""The online training loop (`diffalign train --method spo | grpo`): roll out, judge, train.

    build -> loop: [buffer empty: rollout -> judge -> buffer] -> log-probs -> objective -> step -> log/ckpt

`diffalign.train.train` dispatches here when the objective's DATA is "prompts". One loop serves
both rollout kinds (`online.rollout_kind`): an engine fills its buffer and computes a batch's loss;
the loop owns the optimiser step, logging, checkpoints and the end of the run.

- "branch" (SPO, `BranchEngine`): step-aware pairs from branching candidates, pooled over the
  processes; a batch is `batch_size` pairs a process.
- "groups" (GRPO, `GroupEngine`): G images a prompt, the rewards gathered from every process for
  the group advantages; each rollout is trained for `inner_epochs` passes in batches of
  `batch_size` images a process, every trained sampling step a backward pass of its own.

The building blocks are train.py's (denoiser setup, optimiser, scheduler, checkpoint hooks,
StepLog) and diffalign/online.py's (rollouts, buffers). A checkpoint holds the trainable
weights, the optimiser and scheduler, the buffer, and the trainer state (step, rollouts made,
the prompt order's position): every rollout's randomness is a pure function of the seed and that
position, so a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from diffalign.config import TrainConfig, save_config, validate
from diffalign.errors import DiffalignError
from diffalign.lazy import lazy

torch = lazy("torch")

# Config keys of an online run that make it what it is (besides checkpoint.RUN_IDENTITY).
ONLINE_IDENTITY = ("prompts", "reward", "num_candidates", "divert_start_step", "pair_threshold", "sampler_eta",
                   "sampler_noise_level", "rollout_prompts", "num_inference_steps", "guidance_scale", "group_size",
                   "train_steps", "inner_epochs", "global_std", "adv_clip_max")
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


class OnlineRun:
    """What the loop and its engine share: the config, the accelerator, the model and sampler
    setup, the prompts and rewards, the objective, the trainer state and the metrics log."""

    def __init__(self, cfg, accelerator, adapter, setup, prompts, rewards, objective, hparams, state, log):
        self.cfg, self.accelerator, self.adapter, self.setup = cfg, accelerator, adapter, setup
        self.prompts, self.rewards, self.objective, self.hparams = prompts, rewards, objective, hparams
        self.state, self.log = state, log
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.denoiser = self.reference = None  # set once the denoiser is trainable and prepared

    def prompt_ids(self) -> list[int]:
        """This process's prompts of the next rollout, in the seeded per-epoch order."""
        from diffalign.train import GroupOrder

        state, per_rollout = self.state, self.cfg.rollout_prompts
        while True:
            order = GroupOrder(len(self.prompts), self.cfg.seed, state["epoch"], self.rank, self.world, per_rollout,
                               state["consumed"])
            ids = order.indices()[:per_rollout]
            if len(ids) == per_rollout:
                return ids
            state["epoch"], state["consumed"] = state["epoch"] + 1, 0

    def group_slots(self) -> list[int]:
        """The global positions of this process's prompts in the next rollout."""
        per_rollout = self.cfg.rollout_prompts
        first = self.state["rollouts"] * self.world * per_rollout + self.rank * per_rollout
        return list(range(first, first + per_rollout))


class BranchEngine:
    """SPO: branching rollouts -> step-aware pairs pooled over the processes -> the pair loss."""

    def __init__(self, run: OnlineRun):
        from diffalign import online

        self.run, self.buffer = run, online.PairBuffer(tuple(run.setup.latent_shape))
        for key in ("compared", "pairs"):  # best/worst comparisons made, pairs kept
            run.state.setdefault(key, 0)

    @staticmethod
    def needs_reference(objective, hparams) -> bool:
        return objective.NEEDS_REF

    @staticmethod
    def check_steps(cfg, steps: int) -> None:
        if cfg.divert_start_step >= steps:
            raise DiffalignError(f"--divert-start-step {cfg.divert_start_step} leaves no branching step of the model's "
                                 f"{steps} sampling steps: use a smaller one or raise --num-inference-steps")

    def describe(self) -> str:
        cfg = self.run.cfg
        return f"{cfg.num_candidates} candidates from step {cfg.divert_start_step}"

    def rollout(self) -> int:
        from diffalign import online
        from diffalign.step import micro_step_generator

        run, cfg, state = self.run, self.run.cfg, self.run.state
        start = time.perf_counter()
        ids, slots = run.prompt_ids(), run.group_slots()
        texts = [run.prompts[i] for i in ids]
        with run.accelerator.autocast():
            result = online.branch_rollout(
                online.condition(run.setup, texts), texts, ids, slots, run.rewards,
                online.slot_generators(cfg.seed, slots), num_candidates=cfg.num_candidates,
                divert_start_step=cfg.divert_start_step, threshold=cfg.pair_threshold,
            )
        pooled = online.pool(result.pairs, run.accelerator, micro_step_generator(cfg.seed + 1, state["rollouts"]))
        self.buffer.extend(pooled)
        state["rollouts"] += 1
        state["consumed"] += cfg.rollout_prompts
        state["compared"] += result.candidate_steps * run.world
        state["pairs"] += len(pooled)
        state["rollout_time"] += time.perf_counter() - start
        return len(pooled)

    def next_batch(self):
        run, cfg = self.run, self.run.cfg
        global_batch = cfg.batch_size * run.world
        empty = 0
        while len(self.buffer) < global_batch:
            empty = 0 if self.rollout() else empty + 1
            if empty >= MAX_EMPTY_ROLLOUTS:
                raise DiffalignError(f"{MAX_EMPTY_ROLLOUTS} rollouts in a row gave no pair above --pair-threshold "
                                     f"{cfg.pair_threshold}: lower it, or use a reward that separates the candidates")
        rows = slice(run.rank * cfg.batch_size, (run.rank + 1) * cfg.batch_size)
        return self.buffer.take(global_batch).index(rows)

    def backward(self, batch) -> None:
        from diffalign import online

        run = self.run
        with run.accelerator.autocast():
            logp, ref_logp = online.pair_log_probs(run.setup, run.denoiser, run.reference, batch, run.prompts)
            losses, metrics = run.objective.loss(logp, ref_logp, **run.hparams)
            loss = losses.mean()
            run.log.add(loss, metrics)
            run.accelerator.backward(loss)

    def step_info(self) -> dict:
        state = self.run.state
        return {"rollouts": state["rollouts"], "pair_rate": state["pairs"] / max(state["compared"], 1),
                "rollout_time": state["rollout_time"], "train_time": state["train_time"]}

    def postfix(self, last: dict) -> dict:
        return {"loss": f"{last['loss']:.4f}", "pairs": f"{last['pair_rate']:.2f}"}

    def after_step(self, out: Path) -> None:
        pass

    def result(self) -> dict:
        state = self.run.state
        return {"pair_rate": state["pairs"] / max(state["compared"], 1), "rollouts": state["rollouts"]}


# Images a prompt and prompts a sample grid shows (the main process's first groups of a rollout).
GRID_IMAGES, GRID_PROMPTS = 8, 4


class GroupEngine:
    """GRPO: G images a prompt -> rewards gathered over the processes -> group advantages ->
    `inner_epochs` passes of PPO-clipped steps over the rollout's images."""

    def __init__(self, run: OnlineRun):
        from diffalign import online

        self.run, self.buffer = run, online.GroupBuffer()
        self.size = online.group_size(run.cfg)
        self.objective = run.objective
        self.grid = None  # (images, rewards, prompts) of the latest rollout, for the sample grids
        run.state.setdefault("reward_time", 0.0)
        run.state.setdefault("images", 0)  # images sampled by all processes

    @staticmethod
    def needs_reference(objective, hparams) -> bool:
        return objective.needs_reference(hparams)

    @staticmethod
    def check_steps(cfg, steps: int) -> None:
        from diffalign import online

        online.parse_train_steps(cfg.train_steps, steps)

    def describe(self) -> str:
        cfg = self.run.cfg
        return (f"groups of {self.size}, train steps {cfg.train_steps}, {cfg.inner_epochs} inner epoch(s), "
                f"{'global' if cfg.global_std else 'per-prompt'} std")

    def rollout(self) -> None:
        from diffalign import online
        from diffalign.step import micro_step_generator

        run, cfg, state = self.run, self.run.cfg, self.run.state
        start = time.perf_counter()
        ids, group_slots = run.prompt_ids(), run.group_slots()
        slots = online.image_slots(group_slots, self.size)
        texts = [run.prompts[i] for i in ids]
        steps = online.trained_steps(cfg.train_steps, len(run.setup.timesteps),
                                     micro_step_generator(cfg.seed + 2, state["rollouts"]))
        with run.accelerator.autocast():
            result = online.group_rollout(online.condition(run.setup, texts), texts, ids, slots, run.rewards,
                                          online.slot_generators(cfg.seed, slots), group_size=self.size, steps=steps,
                                          chunk_prompts=max(1, -(-cfg.batch_size // self.size)))
        local = result.groups.rewards.view(len(ids), self.size)
        everyone = online.gather_rewards(local, run.accelerator)
        advantages, zero_std = self.objective.group_advantages(everyone, global_std=cfg.global_std,
                                                               clip_max=cfg.adv_clip_max)
        result.groups.advantages = advantages[run.rank * len(ids):(run.rank + 1) * len(ids)].reshape(-1)
        self.buffer.fill(result.groups, steps, online.group_stats(everyone, zero_std))
        g = min(self.size, GRID_IMAGES)
        self.grid = (result.images.view(len(ids), self.size, *result.images.shape[1:])[:GRID_PROMPTS, :g],
                     local[:GRID_PROMPTS, :g], texts[:GRID_PROMPTS])
        state["rollouts"] += 1
        state["consumed"] += cfg.rollout_prompts
        state["images"] += everyone.numel()
        state["reward_time"] += result.reward_seconds
        state["rollout_time"] += time.perf_counter() - start - result.reward_seconds

    def next_batch(self):
        cfg = self.run.cfg
        batch = self.buffer.take(cfg.batch_size, cfg.inner_epochs, cfg.seed, self.size)
        if batch is None:
            self.rollout()
            batch = self.buffer.take(cfg.batch_size, cfg.inner_epochs, cfg.seed, self.size)
        return batch

    def backward(self, batch) -> None:
        """One backward pass per trained step (the graphs of all steps never live at once), the
        loss averaged over the batch and the steps; gradients sync across processes on the last."""
        from contextlib import nullcontext

        from diffalign import online

        run, accelerator = self.run, self.run.accelerator
        group = online.condition(run.setup, [run.prompts[int(p)] for p in batch.prompt])
        steps = list(self.buffer.steps)
        for k, index in enumerate(steps):
            last = k == len(steps) - 1
            with nullcontext() if last else accelerator.no_sync(run.denoiser), accelerator.autocast():
                out = online.rescore_step(group, run.denoiser, batch, k, index)
                kl = None
                if run.reference is not None:
                    with torch.no_grad(), run.reference() as ref_model:
                        ref = online.rescore_step(group, ref_model, batch, k, index)
                    kl = self.objective.kl_divergence(out.mean, ref.mean, out.std)
                losses, metrics = self.objective.loss(out.log_prob, batch.log_probs[:, k], kl,
                                                      scores=batch.advantages, **run.hparams)
                loss = losses.mean()
                run.log.add(loss, metrics)
                accelerator.backward(loss / len(steps))

    def step_info(self) -> dict:
        state = self.run.state
        return {"rollouts": state["rollouts"], "images": state["images"], **self.buffer.stats,
                "rollout_time": state["rollout_time"], "reward_time": state["reward_time"],
                "train_time": state["train_time"]}

    def postfix(self, last: dict) -> dict:
        return {"loss": f"{last['loss']:.2e}", "reward": f"{last.get('reward_mean', float('nan')):.3f}"}

    def after_step(self, out: Path) -> None:
        """Every `sample_every` steps: the latest rollout's groups with their rewards (main process)."""
        run = self.run
        every = run.cfg.sample_every
        if not every or run.state["step"] % every or self.grid is None or not run.accelerator.is_main_process:
            return
        write_sample_grid(out / "samples" / f"step-{run.state['step']:06d}.png", *self.grid, step=run.state["step"])

    def result(self) -> dict:
        return {"rollouts": self.run.state["rollouts"], **self.buffer.stats}


def write_sample_grid(path: Path, images, rewards, prompts: list[str], *, step: int) -> Path:
    """A prompt a row, its group's images with their rewards; the best framed green, the worst red."""
    from diffalign.plots import Tile, save_image_sheet

    rows = []
    for row_images, row_rewards in zip(images, rewards):
        best, worst = int(row_rewards.argmax()), int(row_rewards.argmin())
        rows.append([Tile(img, (f"{float(r):.3f}",), "chosen" if j == best else "rejected" if j == worst else None)
                     for j, (img, r) in enumerate(zip(row_images, row_rewards))])
    return save_image_sheet(path, rows, what="the sample grid", row_titles=prompts,
                            title=f"rollout samples at step {step} with their rewards (best green, worst red)")


ENGINES = {"branch": BranchEngine, "groups": GroupEngine}


def run_online(cfg: TrainConfig, out: Path, resume_from: Path | None, pipeline=None) -> dict:
    from tqdm.auto import tqdm

    from diffalign import checkpoint as ckpt
    from diffalign import online
    from diffalign.models import load_adapter
    from diffalign.models.lora import set_attention
    from diffalign.objectives import get_objective
    from diffalign.step import MetricsFile, StepLog
    from diffalign.train import (apply_gradients, check_finite, finish_run, install_stop_handler, keep_work,
                                 make_accelerator, objective_hparams, prepare_training, setup_denoiser,
                                 stop_requested, trim_metrics, weight_dtype_for)

    objective = get_objective(cfg.method)
    engine_type = ENGINES[online.rollout_kind(objective)]
    accelerator = make_accelerator(cfg, out)
    main = accelerator.is_main_process
    adapter = load_adapter(pipeline if pipeline is not None else cfg.model, device=accelerator.device,
                           dtype=weight_dtype_for(cfg))
    transition = online.transition_for(adapter, cfg.sampler_eta, cfg.sampler_noise_level)
    hparams = objective_hparams(cfg, adapter)
    prompts = online.read_training_prompts(cfg.prompts)
    steps, guidance = sampling_settings(cfg)
    engine_type.check_steps(cfg, steps)
    world, per_rollout = accelerator.num_processes, cfg.rollout_prompts
    if len(prompts) < world * per_rollout:
        raise DiffalignError(f"{len(prompts)} prompts are fewer than one rollout of {world * per_rollout} "
                             "(processes x --rollout-prompts): lower --rollout-prompts or add prompts")
    rewards = load_online_rewards(cfg.reward, accelerator.device)
    attention = set_attention(adapter.denoiser, cfg.attention)
    setup = online.rollout_setup(adapter, prompts[0], steps=steps, guidance_scale=guidance, resolution=cfg.resolution,
                                 transition=transition)

    params, reference = setup_denoiser(cfg, adapter, engine_type.needs_reference(objective, hparams))
    denoiser, optimizer, scheduler, ema = prepare_training(cfg, accelerator, adapter, params)
    state = {"step": 0, "epoch": 0, "consumed": 0, "rollouts": 0, "rollout_time": 0.0, "train_time": 0.0}
    log = StepLog(accelerator)
    run = OnlineRun(cfg, accelerator, adapter, setup, prompts, rewards, objective, hparams, state, log)
    run.denoiser, run.reference = denoiser, reference
    engine = engine_type(run)
    accelerator.register_for_checkpointing(engine.buffer)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    if resume_from is not None:
        state.update(ckpt.load_checkpoint(accelerator, resume_from))
        if main:
            print(f"diffalign: resumed from {resume_from} at step {state['step']}")
    if main:
        trim_metrics(out / "metrics.jsonl", state["step"])
        save_config(cfg, out / "config.yaml")
        print(
            f"diffalign: {cfg.method} on {adapter.family} ({adapter.prediction_type}), "
            f"{'full fine-tune' if cfg.full_finetune else f'LoRA rank {cfg.lora_rank}'}, {cfg.resolution} px, "
            f"attention={attention}, {len(prompts)} prompts, {type(transition).__name__}, {steps} steps, "
            f"guidance {guidance:g}, {engine.describe()}, "
            f"{sum(p.numel() for p in params):,} trainable parameters, hparams={hparams}"
        )
    metrics_file = MetricsFile(out / "metrics.jsonl", accelerator, cfg.report_to)
    stop = install_stop_handler()
    progress = tqdm(total=cfg.max_steps, initial=state["step"], disable=not main, desc=cfg.method, dynamic_ncols=True)
    interrupted = False

    def save(step_state):
        return ckpt.save_checkpoint(accelerator, out, step_state["step"], {**step_state, "config": asdict(cfg)},
                                    cfg.keep_checkpoints)

    def write_metrics():
        metrics_file.write(log)

    last_good = dict(state)
    step_start = time.perf_counter()
    try:
        while state["step"] < cfg.max_steps:
            batch = engine.next_batch()
            train_start = time.perf_counter()
            with accelerator.accumulate(denoiser):
                engine.backward(batch)
                apply_gradients(cfg, accelerator, optimizer, params, log, state["step"] + 1)
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
                         **engine.step_info())
            progress.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] >= cfg.max_steps:
                write_metrics()
                progress.set_postfix(**engine.postfix(log.last))
            engine.after_step(out)
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                write_metrics()
                save(dict(state))
            if stop_requested(accelerator, stop, cfg, state["step"]):
                check_finite(accelerator, log, state["step"])  # a checkpoint holds checked steps only
                write_metrics()
                path = save(dict(state))
                if main:
                    print(f"\ndiffalign: stopped by signal at step {state['step']}; checkpoint {path}; "
                          "continue with --resume latest")
                interrupted = True
                break
    except DiffalignError as err:
        write_metrics()
        raise DiffalignError(f"{err}; {keep_work(last_good, save, out, params)}") from None
    progress.close()
    stop.restore()
    metrics_file.close()
    if interrupted:
        return {"interrupted": True, "step": state["step"]}

    result = {"step": state["step"], "output_dir": str(out), **engine.result()}
    return finish_run(cfg, accelerator, adapter, denoiser, params, ema, out, state, save, result)
