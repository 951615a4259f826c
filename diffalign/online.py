"""Online machinery: rollouts on the stepwise sampler, per-step log-probs of policy and
reference, step-aware pair selection (SPO), group rollouts (GRPO), and their buffers.

SPO ("branch" rollouts):

    setup = rollout_setup(adapter, cfg)                     # the stochastic transition, CFG, steps
    rollout = branch_rollout(setup, prompts, slots, reward, generators, num_candidates=4, ...)
    buffer.extend(pool(rollout, accelerator, generator))    # every process holds the same pairs
    batch = buffer.take(global_batch)                       # each process trains on its rows
    logp, ref_logp = pair_log_probs(setup, policy, reference, batch, prompts)   # (B, 2) each

SPO (Liang et al. 2025; RockeyCoss/SPO multi_sample_pipeline.py), for B prompts and k candidates:

- steps 0 .. D-1 (D = `divert_start_step`) sample one chain per prompt;
- at step D the transition's Gaussian (one model call) gives k candidates x_{t-1} from the same x_t;
- at each later step i the model runs on the k candidates: its predicted x0 is decoded and scored
  at the candidate's timestep t_i (after the last step the candidates are the clean latents,
  decoded and scored at t = 0); the best and the worst candidate form a pair when
  softmax(best, worst) differ by more than the threshold; one candidate chosen uniformly at
  random continues, and its Gaussian (from the same model call) gives the next k candidates.

A pair is (step, prompt, x_t, x_{t-1}^w, x_{t-1}^l). Rewards without a `t` argument score the
decoded predicted x0 and ignore t. DDPM-family models roll out with `DDIMStep(eta)`, flow models
with `FlowSDEStep(noise_level)` (diffalign.sampler); a transition without noise has no log-prob.

GRPO ("groups" rollouts, the objective's ROLLOUT):

    result = group_rollout(setup, prompts, ids, image_slots(slots, G), reward, generators, group_size=G,
                           steps=trained_steps("all", S, generator))   # G images a prompt, stored steps
    A, zero_std = grpo.group_advantages(gather_rewards(rewards (B, G), accelerator))
    buffer.fill(groups, steps, stats); batch = buffer.take(batch_size, inner_epochs, seed, G)
    out = rescore_step(condition(setup, batch prompts), policy, batch, k, steps[k])   # .log_prob, .mean

Each image runs the whole stochastic chain; x before the first trained step and after each,
with each trained transition's log-prob (on x as stored), are kept, and the final images are
scored. A prompt's group is sampled on one process; the rewards are gathered for the statistics.

Determinism: every prompt slot (GRPO: every image slot) of a rollout has its own CPU
generator, a pure function of the seed and the slot's global position, so the draws do not
depend on how the slots are split over processes, and a resumed run draws what the
uninterrupted one would have. The pooled pairs are ordered by (slot, step) before the seeded
shuffle, and GRPO's batches deal each group's images in turn (GroupBuffer), for the same reason.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from diffalign.errors import DiffalignError
from diffalign.lazy import lazy

torch = lazy("torch")  # config.validate reaches this module: the checks run before torch loads
if TYPE_CHECKING:
    from torch import Tensor

# Rewards that cannot judge a single image: the candidates are images.
IMAGE_INCAPABLE = {"videoreward": "scores videos (mp4 files, frame folders), not single images"}


# --------------------------------------------------------------------------- checks before loading
def check_online_config(cfg: Any, objective: Any) -> None:
    """The online options, checked in one line each before any model loads (config.validate)."""
    if objective.DATA != "prompts":
        if cfg.prompts or cfg.reward:
            raise DiffalignError(f"--prompts and --reward are for online methods (spo, grpo); {cfg.method} trains on "
                                 "--dataset pairs: drop them, or choose --method spo")
        return
    if cfg.dataset:
        raise DiffalignError(f"{cfg.method} samples and judges its own images: drop --dataset {cfg.dataset!r} and pass "
                             "--prompts FILE (or toy) with --reward")
    if not cfg.prompts:
        raise DiffalignError(f"{cfg.method} needs --prompts: a .txt (one a line), .jsonl or .json file, or toy")
    if not cfg.reward:
        raise DiffalignError(f"{cfg.method} needs --reward to judge its samples: e.g. --reward spm@PATH, "
                             "--reward pickscore or --reward toy-reward")
    if cfg.rollout_prompts < 1:
        raise DiffalignError(f"--rollout-prompts {cfg.rollout_prompts} is too small: it must be at least 1")
    if rollout_kind(objective) == "groups":
        check_group_config(cfg)
    else:
        check_branch_config(cfg)
    if not cfg.sampler_eta > 0 or not cfg.sampler_noise_level > 0:
        raise DiffalignError("--sampler-eta and --sampler-noise-level must be > 0: a deterministic step has no "
                             "log-prob to train (SPO: eta 1.0)")
    eps = cfg.objective.get("eps")
    if eps is not None and not eps < 1:
        raise DiffalignError(f"{cfg.method} option eps={eps!r} must be below 1: the ratio clamp is [1 - eps, 1 + eps]")
    if cfg.cache_latents:
        raise DiffalignError(f"{cfg.method} samples its own latents: drop --cache-latents")
    read_training_prompts(cfg.prompts)
    check_image_reward(cfg.reward)


def rollout_kind(objective: Any) -> str:
    """"groups" (GRPO: G images a prompt) or "branch" (SPO's branching pairs, the default)."""
    return getattr(objective, "ROLLOUT", "branch")


def check_branch_config(cfg: Any) -> None:
    if cfg.num_candidates < 2:
        raise DiffalignError(f"--num-candidates {cfg.num_candidates} is too small: a pair needs at least 2 candidates "
                             "a step (SPO: 4 on SD1.5, 2 on SDXL)")
    if cfg.divert_start_step < 0:
        raise DiffalignError(f"--divert-start-step {cfg.divert_start_step} must be >= 0 (SPO: 4)")
    steps = cfg.num_inference_steps
    if steps is not None and cfg.divert_start_step >= steps:
        raise DiffalignError(f"--divert-start-step {cfg.divert_start_step} leaves no branching step of "
                             f"--num-inference-steps {steps}: use a smaller one (SPO: 4 of 20)")
    if not 0 <= cfg.pair_threshold < 1:
        raise DiffalignError(f"--pair-threshold {cfg.pair_threshold} must be in [0, 1): a gap of two softmax "
                             "probabilities (SPO: 0.3 SD1.5, 0.4 SDXL)")


DEFAULT_GROUP_SIZE = 8  # GRPO's images a prompt when --group-size is unset


def group_size(cfg: Any) -> int:
    return DEFAULT_GROUP_SIZE if cfg.group_size is None else int(cfg.group_size)


def check_group_config(cfg: Any) -> None:
    """GRPO's rollout and training options (config.validate's MINIMUM has refused --group-size 1)."""
    kl_beta = cfg.objective.get("kl_beta")
    if kl_beta is not None and (isinstance(kl_beta, bool) or not isinstance(kl_beta, (int, float)) or kl_beta < 0):
        raise DiffalignError(f"{cfg.method} option kl_beta={kl_beta!r} must be a number >= 0 (0: no KL to the "
                             "reference; Flow-GRPO: 0.04)")
    clip = cfg.objective.get("clip_range")
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and not clip < 1:
        raise DiffalignError(f"{cfg.method} option clip_range={clip!r} must be below 1: the ratio clamp is "
                             "[1 - clip_range, 1 + clip_range] (Flow-GRPO: 1e-4)")
    if not cfg.adv_clip_max > 0:
        raise DiffalignError(f"--adv-clip-max {cfg.adv_clip_max} must be > 0: advantages are clipped to +-it "
                             "(Flow-GRPO: 5)")
    if cfg.inner_epochs < 1:
        raise DiffalignError(f"--inner-epochs {cfg.inner_epochs} is too small: it must be at least 1")
    if cfg.sample_every < 0:
        raise DiffalignError(f"--sample-every {cfg.sample_every} must be >= 0 (0: no sample grids)")
    parse_train_steps(cfg.train_steps, cfg.num_inference_steps)
    images = cfg.rollout_prompts * group_size(cfg)
    if images % cfg.batch_size:
        raise DiffalignError(f"--batch-size {cfg.batch_size} does not divide a rollout's {images} images "
                             f"(--rollout-prompts {cfg.rollout_prompts} x --group-size {group_size(cfg)}): choose a "
                             "divisor, so each rollout trains in whole batches")


def parse_train_steps(spec: str, steps: int | None = None) -> tuple[str, int | None]:
    """'all' -> ("all", None); 'first:K' / 'window:K' -> (kind, K); checked against the sampling
    steps when they are known."""
    kind, _, count = str(spec).partition(":")
    fix = "use all, first:K or window:K (K sampling steps, e.g. window:2)"
    if kind == "all" and not count:
        return "all", None
    if kind not in ("first", "window") or not count.isdigit() or int(count) < 1:
        raise DiffalignError(f"--train-steps {spec!r} is not valid: {fix}")
    if steps is not None and int(count) > steps:
        raise DiffalignError(f"--train-steps {spec!r} asks for more than the {steps} sampling steps: {fix}")
    return kind, int(count)


def trained_steps(spec: str, steps: int, generator: torch.Generator) -> range:
    """The sampling steps a rollout trains on: all, the first K, or K consecutive ones at a
    place drawn from `generator` (the rollout's: the same on every process)."""
    kind, count = parse_train_steps(spec, steps)
    if kind == "all":
        return range(steps)
    if kind == "first":
        return range(count)
    start = int(torch.randint(steps - count + 1, (1,), generator=generator))
    return range(start, start + count)


def read_training_prompts(source: str) -> list[str]:
    """'toy' -> the toy world's training prompts (the held-out ones stay for evaluation);
    toy-data/... -> the shipped file; else a .txt/.jsonl/.json file (diffalign.edges)."""
    from diffalign.edges import read_prompts
    from diffalign.paths import asset
    from diffalign.train import resolve_shipped

    if source == "toy":
        return read_prompts(asset("toy-data") / "prompts_train.txt")
    return read_prompts(resolve_shipped(source))


def check_image_reward(spec: str) -> None:
    """A reward that cannot score one image fails before any model loads."""
    from diffalign.edges import parse_reward_specs

    for item in parse_reward_specs(spec):
        if item.name in IMAGE_INCAPABLE:
            raise DiffalignError(f"reward {item.name!r} {IMAGE_INCAPABLE[item.name]}: an online method scores images; "
                                 "use an image reward (spm, pickscore, hpsv2.1, imagereward, toy-reward, ...)")


# --------------------------------------------------------------------------- sampler setup
def transition_for(adapter: Any, eta: float, noise_level: float) -> Any:
    """DDIM with eta for DDPM-family models, the flow SDE step for flow models; checked against
    the model's scheduler now, so a model with no stochastic sampler fails before any rollout."""
    from diffalign.sampler import DDIMStep, FlowSDEStep

    transition = FlowSDEStep(noise_level) if adapter.prediction_type == "flow" else DDIMStep(eta)
    try:
        transition.make_scheduler(adapter.pipe)
    except DiffalignError as err:
        raise DiffalignError(f"this model has no stochastic sampler with a log-prob ({err})") from None
    if adapter.one_step_image_is_x0:
        raise DiffalignError("this model is a one-step (distilled) generator: it has no stochastic multi-step sampler "
                             "to branch; use its base model")
    return transition


def rollout_setup(adapter: Any, prompt: str, *, steps: int, guidance_scale: float, resolution: int, transition: Any):
    """The sampler setup every rollout and training step re-conditions (`condition`)."""
    from diffalign.sampler import prepare

    return prepare(adapter, [prompt], num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
                   width=resolution, transition=transition)


def condition(setup: Any, prompts: list[str]) -> Any:
    """`setup` with these prompts' rows (encoded under no_grad, as the pipelines encode them)."""
    height = setup.latent_shape[-2] * setup.adapter.pipe.vae_scale_factor
    width = setup.latent_shape[-1] * setup.adapter.pipe.vae_scale_factor
    with torch.no_grad():
        cond, uncond = setup.adapter.sampling_condition(list(prompts), setup.guidance_scale, height, width)
    return replace(setup, cond=cond, uncond=uncond)


# --------------------------------------------------------------------------- rewards
def score_candidates(rewards: dict[str, tuple[Any, float]], images: Tensor, prompts: list[str], t: Tensor) -> Tensor:
    """Weighted sum of the rewards on (N, 3, H, W) images in [0, 1]; a reward whose `score`
    takes `t` (the step-aware model) gets the timestep of each image, the others ignore it."""
    total = torch.zeros(images.shape[0])
    for reward, weight in rewards.values():
        takes_t = "t" in inspect.signature(reward.score).parameters
        scores = reward.score(images, prompts, t=t) if takes_t else reward.score(images, prompts)
        total = total + weight * scores.float().cpu()
    return total


def select_pairs(scores: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """SPO's `preference_score_compare`: scores (B, k) -> (best (B,), worst (B,), valid (B,)).

    A pair is kept when softmax([s_best, s_worst]) differ by more than `threshold`."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    best, worst = order[:, 0], order[:, -1]
    pair = torch.stack([scores.gather(1, best[:, None])[:, 0], scores.gather(1, worst[:, None])[:, 0]], dim=1)
    p = pair.float().softmax(dim=1)
    return best, worst, p[:, 0] - p[:, 1] > threshold


# --------------------------------------------------------------------------- rollouts
@dataclass
class Pairs:
    """Win/lose transitions: step index, prompt index, the slot that sampled them, x_t and the
    two x_{t-1}. Every tensor is batch-first with the same length; kept on the CPU."""

    step: Tensor
    prompt: Tensor
    slot: Tensor
    x: Tensor
    win: Tensor
    lose: Tensor

    FIELDS = ("step", "prompt", "slot", "x", "win", "lose")

    def __len__(self) -> int:
        return int(self.step.shape[0])

    @classmethod
    def empty(cls, latent_shape: tuple[int, ...]) -> "Pairs":
        long, lat = torch.zeros(0, dtype=torch.long), torch.zeros(0, *latent_shape)
        return cls(long, long.clone(), long.clone(), lat, lat.clone(), lat.clone())

    def index(self, rows: Tensor | slice) -> "Pairs":
        return Pairs(*(getattr(self, f)[rows] for f in self.FIELDS))

    @classmethod
    def cat(cls, parts: list["Pairs"]) -> "Pairs":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in cls.FIELDS))


@dataclass
class Rollout:
    pairs: Pairs
    candidate_steps: int  # best/worst comparisons made (pairs kept + dropped)
    scores: Tensor  # every score (for logging)


def slot_generators(seed: int, positions: list[int]) -> list[torch.Generator]:
    """One CPU generator per prompt slot, from its global position in the run."""
    from diffalign.step import micro_step_generator

    return [micro_step_generator(seed, p) for p in positions]


def draw_candidates(mean: Tensor, std: Tensor, generators: list[torch.Generator], k: int, dtype: torch.dtype) -> Tensor:
    """k draws from N(mean[b], std^2) per row b, row b's from generators[b]: (B * k, ...), b-major."""
    noise = torch.stack([torch.randn((k, *mean.shape[1:]), generator=g) for g in generators])
    noise = noise.flatten(0, 1).to(mean.device, mean.dtype)
    return (mean.repeat_interleave(k, dim=0) + std * noise).to(dtype)


def branch_rollout(setup: Any, prompts: list[str], prompt_ids: list[int], slots: list[int], rewards: dict,
                   generators: list[torch.Generator], *, num_candidates: int, divert_start_step: int,
                   threshold: float) -> Rollout:
    """SPO's step-wise resampling rollout for these prompts (module docstring). `setup` is
    conditioned on `prompts`; `generators[b]` draws everything of prompt b."""
    with torch.no_grad():
        return _branch_rollout(setup, prompts, prompt_ids, slots, rewards, generators, num_candidates,
                               divert_start_step, threshold)


def _branch_rollout(setup, prompts, prompt_ids, slots, rewards, generators, num_candidates, divert_start_step,
                    threshold) -> Rollout:
    from diffalign.sampler import decode, initial_latents, initial_noise, reset_schedule, step

    b, k = len(prompts), num_candidates
    total = len(setup.timesteps)
    if not 0 <= divert_start_step < total:
        raise DiffalignError(f"--divert-start-step {divert_start_step} leaves no branching step of {total} sampling "
                             "steps: use a smaller one (SPO: 4 of 20)")
    reset_schedule(setup)
    x = initial_latents(setup, initial_noise(setup, generators))
    for i in range(divert_start_step):
        x = step(setup, x, i, generator=generators).prev_sample
    branched = setup.rows(torch.arange(b).repeat_interleave(k))
    branched_prompts = [p for p in prompts for _ in range(k)]
    out = step(setup, x, divert_start_step)
    candidates = draw_candidates(out.mean, out.std, generators, k, setup.dtype)
    parent, parent_step = x, divert_start_step
    found, all_scores, compared = [], [], 0
    for i in range(divert_start_step + 1, total + 1):
        if i < total:
            out = step(branched, candidates, i)
            images, t = decode(setup, out.pred_x0), setup.timesteps[i]
        else:  # the candidates are the clean latents: scored at t = 0
            images, t = decode(setup, candidates), torch.zeros((), dtype=setup.timesteps.dtype)
        t_rows = t.reshape(1).expand(b * k).cpu()
        scores = score_candidates(rewards, images, branched_prompts, t_rows).view(b, k)
        all_scores.append(scores.flatten())
        best, worst, valid = select_pairs(scores, threshold)
        compared += b
        rows = valid.nonzero()[:, 0]
        if len(rows):
            flat = candidates.view(b, k, *candidates.shape[1:])
            found.append(Pairs(
                torch.full((len(rows),), parent_step, dtype=torch.long), torch.tensor(prompt_ids)[rows],
                torch.tensor(slots)[rows], parent[rows].float().cpu(), flat[rows, best[rows]].float().cpu(),
                flat[rows, worst[rows]].float().cpu(),
            ))
        if i == total:
            break
        choice = torch.cat([torch.randint(k, (1,), generator=g) for g in generators])
        chosen = torch.arange(b) * k + choice
        parent, parent_step = candidates[chosen.to(candidates.device)], i
        std = out.std if out.std.ndim == 0 else out.std[chosen]
        candidates = draw_candidates(out.mean[chosen.to(out.mean.device)], std, generators, k, setup.dtype)
    pairs = Pairs.cat(found) if found else Pairs.empty(tuple(setup.latent_shape))
    return Rollout(pairs, compared, torch.cat(all_scores))


def pool(pairs: Pairs, accelerator: Any, generator: torch.Generator) -> Pairs:
    """Every process's pairs, on every process, ordered by (slot, step), then shuffled by the
    rollout's generator: the same buffer whatever the number of processes."""
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = Pairs.cat(gather_object([pairs]))
    if not len(pairs):
        return pairs
    key = pairs.slot * 1_000_003 + pairs.step
    pairs = pairs.index(key.argsort(stable=True))
    return pairs.index(torch.randperm(len(pairs), generator=generator))


class PairBuffer:
    """The pooled pairs not yet trained on: the same on every process, saved in checkpoints
    (accelerate's `register_for_checkpointing`) so a resumed run trains on the same pairs."""

    def __init__(self, latent_shape: tuple[int, ...]):
        self.pairs = Pairs.empty(latent_shape)

    def __len__(self) -> int:
        return len(self.pairs)

    def extend(self, pairs: Pairs) -> None:
        self.pairs = Pairs.cat([self.pairs, pairs])

    def take(self, n: int) -> Pairs:
        head, self.pairs = self.pairs.index(slice(0, n)), self.pairs.index(slice(n, None))
        return head

    def state_dict(self) -> dict:
        return {f: getattr(self.pairs, f) for f in Pairs.FIELDS}

    def load_state_dict(self, state: dict) -> None:
        self.pairs = Pairs(*(state[f] for f in Pairs.FIELDS))


# --------------------------------------------------------------------------- training log-probs
def transition_log_probs(setup: Any, denoiser: Any, pairs: Pairs, prompts: list[str]) -> Tensor:
    """(B, 2) per-step log-probs of the winner's and the loser's transition from x_t under
    `denoiser` (the caller's grad mode). Pairs of one sampling step share one model call; the
    two candidates share x_t, hence the Gaussian."""
    from diffalign.sampler import gaussian_log_prob, step

    out = torch.zeros(len(pairs), 2, device=setup.device)
    for i in pairs.step.unique().tolist():
        rows = (pairs.step == i).nonzero()[:, 0]
        group = condition(setup, [prompts[int(p)] for p in pairs.prompt[rows]])
        x = pairs.x[rows].to(setup.device, setup.dtype)
        win, lose = pairs.win[rows].to(setup.device), pairs.lose[rows].to(setup.device)
        result = step(group, x, i, denoiser=denoiser, prev_sample=win)
        logp = torch.stack([result.log_prob, gaussian_log_prob(lose, result.mean, result.std)], dim=1)
        out = out.index_put((rows.to(out.device),), logp)
    return out


def pair_log_probs(setup: Any, denoiser: Any, reference: Any, pairs: Pairs, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Policy log-probs (with gradients) and reference log-probs (no_grad), (B, 2) each."""
    logp = transition_log_probs(setup, denoiser, pairs, prompts)
    with torch.no_grad(), reference() as ref_model:
        ref_logp = transition_log_probs(setup, ref_model, pairs, prompts)
    return logp, ref_logp


# --------------------------------------------------------------------------- GRPO: group rollouts
@dataclass
class Groups:
    """The images of a group rollout, batch-first, a prompt's G images in a row: the prompt's
    index, the image's slot (group slot * G + its place), x before the first trained step and
    after each (latents (N, K + 1, ...)), each trained transition's log-prob at sampling (N, K),
    the reward and the advantage. Kept on the CPU."""

    prompt: Tensor
    slot: Tensor
    latents: Tensor
    log_probs: Tensor
    rewards: Tensor
    advantages: Tensor

    FIELDS = ("prompt", "slot", "latents", "log_probs", "rewards", "advantages")

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    def index(self, rows: Tensor | slice) -> "Groups":
        return Groups(*(getattr(self, f)[rows] for f in self.FIELDS))


@dataclass
class GroupRollout:
    groups: Groups  # advantages still 0: they need every process's rewards (`group_advantages`)
    steps: range  # the trained sampling steps
    images: Tensor  # (N, 3, H, W) in [0, 1], on the CPU, for the sample grids
    reward_seconds: float = 0.0  # of the rollout's time, the rewards'


def image_slots(group_slots: list[int], size: int) -> list[int]:
    """The slots of the G images of each group: one generator each, whatever the process split."""
    return [g * size + j for g in group_slots for j in range(size)]


def group_rollout(setup: Any, prompts: list[str], prompt_ids: list[int], slots: list[int], rewards: dict,
                  generators: list[torch.Generator], *, group_size: int, steps: range,
                  chunk_prompts: int | None = None) -> GroupRollout:
    """G images for each of these prompts from the stochastic sampler (`setup` conditioned on
    `prompts`); `generators[n]` draws everything of image n (its initial noise and every step's),
    so the images do not depend on which prompts are sampled together. Keeps x at the trained
    `steps` and the log-prob of each of their transitions, computed on x as stored (after the
    cast to the latents' dtype), so training re-scores the same numbers. `chunk_prompts`: the
    prompts sampled in one batch (None: all)."""
    chunk = chunk_prompts or len(prompts)
    parts = []
    with torch.no_grad():
        for first in range(0, len(prompts), chunk):
            rows = list(range(first, min(first + chunk, len(prompts))))
            images = slice(first * group_size, (rows[-1] + 1) * group_size)
            parts.append(_group_rollout(setup.rows(rows), [prompts[i] for i in rows], [prompt_ids[i] for i in rows],
                                        slots[images], rewards, generators[images], group_size, steps))
    if len(parts) == 1:
        return parts[0]
    groups = Groups(*(torch.cat([getattr(p.groups, f) for p in parts]) for f in Groups.FIELDS))
    return GroupRollout(groups, steps, torch.cat([p.images for p in parts]), sum(p.reward_seconds for p in parts))


def _group_rollout(setup, prompts, prompt_ids, slots, rewards, generators, group_size, steps) -> GroupRollout:
    from diffalign.sampler import decode, gaussian_log_prob, initial_latents, initial_noise, reset_schedule, step

    b, g = len(prompts), group_size
    rows = setup.rows(torch.arange(b).repeat_interleave(g))
    reset_schedule(setup)
    x = initial_latents(rows, initial_noise(rows, generators))
    kept, log_probs = [], []
    for i in range(len(setup.timesteps)):
        if i == steps.start:
            kept.append(x.float().cpu())
        out = step(rows, x, i, generator=generators)
        x = out.prev_sample
        if i in steps:
            kept.append(x.float().cpu())
            log_probs.append(gaussian_log_prob(x, out.mean, out.std).cpu())
    images = decode(setup, x)
    texts = [p for p in prompts for _ in range(g)]
    start = time.perf_counter()
    scores = score_candidates(rewards, images, texts, torch.zeros(b * g, dtype=setup.timesteps.dtype))
    seconds = time.perf_counter() - start  # the scores are on the CPU: the device has finished
    groups = Groups(torch.tensor(prompt_ids).repeat_interleave(g), torch.tensor(slots), torch.stack(kept, dim=1),
                    torch.stack(log_probs, dim=1), scores, torch.zeros(b * g))
    return GroupRollout(groups, steps, images.float().cpu(), seconds)


def gather_rewards(rewards: Tensor, accelerator: Any) -> Tensor:
    """(B, G) rewards of this process -> (processes * B, G) of all, in process order, on every
    process: the statistics of the global rollout. A group's G images are sampled on one
    process, so no group is split; the global std needs them all."""
    if accelerator is None or accelerator.num_processes == 1:
        return rewards
    gathered = accelerator.gather(rewards.to(accelerator.device)[None])  # (processes, B, G)
    return gathered.reshape(-1, rewards.shape[1]).cpu()


class GroupBuffer:
    """The images of the latest group rollout and where training is in them (inner epoch, batch):
    saved in checkpoints (accelerate's `register_for_checkpointing`), so a resumed run trains on
    the same images in the same order.

    Order: in each inner epoch every group's G images are permuted by a generator of the seed,
    the epoch and the group's slot, and the batches take the groups' images in turn (image 0 of
    every group, then image 1, ...). A batch of b images from B groups on each process (b a
    multiple of B) then holds the same images as one process with all the groups and
    processes x b: N processes train as one."""

    def __init__(self):
        self.groups: Groups | None = None
        self.steps = range(0)
        self.epoch = 0
        self.batch = 0
        self.stats: dict[str, float] = {}

    def fill(self, groups: Groups, steps: range, stats: dict[str, float]) -> None:
        self.groups, self.steps, self.epoch, self.batch, self.stats = groups, steps, 0, 0, dict(stats)

    def order(self, seed: int, group_size: int) -> Tensor:
        from diffalign.step import micro_step_generator

        first = self.groups.slot[::group_size] // group_size  # each group's slot
        epoch_seed = seed + 1000 + self.epoch
        perms = torch.stack([torch.randperm(group_size, generator=micro_step_generator(epoch_seed, int(s)))
                             for s in first])
        rows = torch.arange(len(first))[:, None] * group_size + perms  # (groups, G)
        return rows.t().reshape(-1)

    def take(self, batch_size: int, inner_epochs: int, seed: int, group_size: int) -> Groups | None:
        """This process's next batch, or None when the rollout has had its inner epochs."""
        if self.groups is None:
            return None
        if self.batch * batch_size >= len(self.groups):
            self.epoch, self.batch = self.epoch + 1, 0
        if self.epoch >= inner_epochs:
            return None
        rows = self.order(seed, group_size)[self.batch * batch_size:(self.batch + 1) * batch_size]
        self.batch += 1
        return self.groups.index(rows)

    def state_dict(self) -> dict:
        if self.groups is None:
            return {}
        state = {f: getattr(self.groups, f) for f in Groups.FIELDS}
        position = [self.steps.start, self.steps.stop, self.epoch, self.batch]
        state["position"] = torch.tensor(position)
        state["stats_names"] = list(self.stats)
        state["stats"] = torch.tensor(list(self.stats.values()), dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.groups = None
            return
        self.groups = Groups(*(state[f] for f in Groups.FIELDS))
        start, stop, self.epoch, self.batch = (int(v) for v in state["position"])
        self.steps = range(start, stop)
        self.stats = dict(zip(state["stats_names"], state["stats"].tolist()))


def group_stats(rewards: Tensor, zero_std: Tensor) -> dict[str, float]:
    """The global rollout's per-prompt reward statistics (rewards (groups, G)) for metrics.jsonl."""
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(dim=1, unbiased=False).mean()),
            "zero_std_share": float(zero_std.float().mean())}


def rescore_step(setup: Any, denoiser: Any, batch: Groups, k: int, index: int) -> Any:
    """Trained step k of `batch` (sampling step `index`) under `denoiser`, in the caller's grad
    mode: the StepOutput scoring the stored x_{t-1}, with `.log_prob` (B,), `.mean` and `.std`.
    `setup` is conditioned on the batch's prompts (`condition`)."""
    from diffalign.sampler import step

    x = batch.latents[:, k].to(setup.device, setup.dtype)
    return step(setup, x, index, denoiser=denoiser, prev_sample=batch.latents[:, k + 1].to(setup.device))
