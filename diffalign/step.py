"""One micro-step of training: its randomness, its inputs and its loss, and the metrics log.

    generator = micro_step_generator(seed, micro_step)        # a pure function of where the run is
    draws = draw_step(adapter, batch, generator, global_batch, caption_dropout).rows(my_rows)
    loss, metrics = compute_loss(adapter, denoiser, batch, objective, hparams, reference, draws, device)

The randomness of a micro-step (caption dropout, noise, t) is drawn for the whole global batch
in a fixed order and each process keeps its rows once, so N processes train exactly as one with
N times the batch, and a resumed run draws what the uninterrupted one would have. The likelihood
maths is diffalign.elbo's; the model call and the encoders are the family adapter's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffalign.lazy import lazy

if TYPE_CHECKING:
    from diffalign.config import TrainConfig

torch = lazy("torch")  # the CLI imports train.py (and this) to parse its flags: torch loads when training starts


def micro_step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The noise/timestep/dropout RNG of one micro-step: a pure function of where we are, so
    a resumed run draws exactly what the uninterrupted one would have. The same on every
    process: each keeps its own rows of the global draw (`draw_step(...).rows(...)`)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step * 7_919) % (2**63 - 1))


# Text encodings a run may keep across steps (PromptMemo): ample for any prompt set that repeats
# (SD1.5: 4,500 prompts; the toy data: all of it many times over), small beside the models.
PROMPT_MEMO_BYTES = 1 << 30


class PromptMemo:
    """`adapter.encode_prompts` that keeps each text's encoding for the next time it comes.

    Each new text is encoded alone, so its encoding depends on the text only, not on the batch
    that met it first: a resumed run reads the numbers an uninterrupted one would. Encodings
    are kept while they fit in `max_bytes`; texts beyond that are encoded (alone) each time."""

    def __init__(self, encode, max_bytes: int = PROMPT_MEMO_BYTES):
        self.encode, self.max_bytes = encode, max_bytes
        self.table: dict[str, dict[str, torch.Tensor]] = {}
        self.bytes = 0

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        rows = []
        for text in prompts:
            row = self.table.get(text)
            if row is None:
                row = self.encode([text])
                size = sum(v.numel() * v.element_size() for v in row.values())
                if self.bytes + size <= self.max_bytes:
                    self.table[text], self.bytes = row, self.bytes + size
            rows.append(row)
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}


def remember_prompts(cfg: TrainConfig, adapter, dataset, processes: int) -> bool:
    """Keep text encodings across steps (PromptMemo) when the run reads its data more than once:
    a map-style dataset smaller than the groups the run trains on. The latent cache holds its own
    encodings, and a stream is not known to repeat. True when the memo is on."""
    if cfg.cache_latents or not hasattr(dataset, "__len__"):
        return False
    if cfg.max_steps * cfg.grad_accum * cfg.batch_size * processes <= len(dataset):
        return False
    adapter.encode_prompts = PromptMemo(adapter.encode_prompts)
    return True


@dataclass
class StepDraws:
    """One micro-step's randomness: caption dropout (B,) bool or None, noise (B, C, h, w) shared
    by the K images of a group, and t (B,)."""

    drop: torch.Tensor | None
    noise: torch.Tensor
    t: torch.Tensor

    def rows(self, rows: slice) -> "StepDraws":
        """This process's rows of the global draw."""
        return StepDraws(None if self.drop is None else self.drop[rows], self.noise[rows], self.t[rows])


def draw_step(adapter, batch: dict, generator: torch.Generator, groups: int, caption_dropout: float = 0.0) -> StepDraws:
    """The randomness of one micro-step for `groups` groups (the whole global batch), in a fixed
    order from the micro-step's own generator, so every process, a resumed run and a run with
    another number of processes draw the same numbers; each process then keeps its rows.
    `batch` (this process's) gives the latent shape."""
    from diffalign.elbo import draw_noise_and_timesteps

    drop = torch.rand(groups, generator=generator) < caption_dropout if caption_dropout > 0 else None
    if "latents" in batch:
        latent_shape = tuple(batch["latents"].shape[2:])
    elif batch["pixels"].ndim == 6:  # videos (B, K, F, 3, H, W)
        if not getattr(adapter, "video", False):
            from diffalign.errors import DiffalignError

            raise DiffalignError(f"video data (--num-frames) needs a video model, and {adapter.family} takes images: "
                                 "unset --num-frames or train a video model (wan)")
        latent_shape = adapter.latent_shape(*batch["pixels"].shape[-2:], num_frames=batch["pixels"].shape[2])
    else:
        latent_shape = adapter.latent_shape(*batch["pixels"].shape[-2:])
    noise, t = draw_noise_and_timesteps(adapter, latent_shape, groups, generator)
    return StepDraws(drop, noise, t)


def encode_batch(adapter, batch: dict, uses_captions: bool, drop: torch.Tensor | None, device,
                 empty_cond: dict | None = None):
    """Latents (B, K, C, h, w) and conditioning for B*K images, group-major; groups in `drop`
    train on the empty prompt."""
    if "latents" in batch:  # from the latent cache: no VAE and no text encoder in the loop
        return cached_inputs(batch, uses_captions, drop, device, empty_cond)
    from diffalign.models import placement

    pixels = batch["pixels"].to(device)
    b, k = pixels.shape[:2]
    with torch.no_grad():
        flat = adapter.encode_images(pixels.reshape(b * k, *pixels.shape[2:]).to(placement(adapter.pipe.vae)[1]))
    latents = flat.reshape(b, k, *flat.shape[1:])
    texts = [list(c) if uses_captions else [p] * k for p, c in zip(batch["prompts"], batch["captions"])]
    if drop is not None:
        texts = [[""] * k if d else t for d, t in zip(drop.tolist(), texts)]
    flat_texts = [t for group in texts for t in group]
    cond = encode_texts(adapter, flat_texts)
    return latents, {key: value.to(device) for key, value in cond.items()}


def cached_inputs(batch: dict, uses_captions: bool, drop: torch.Tensor | None, device, empty_cond: dict | None):
    """Latents and per-image conditioning straight from the cache (caption dropout included)."""
    latents = batch["latents"].to(device)
    b, k = latents.shape[:2]
    if uses_captions:
        cond = {key: value.flatten(0, 1) for key, value in batch["cond"].items()}  # (B*K, ...)
    else:  # every image of a group on its prompt
        cond = {key: value.repeat_interleave(k, dim=0) for key, value in batch["prompt_cond"].items()}
    if drop is not None:
        mask = drop.repeat_interleave(k)
        cond = {key: torch.where(mask.view(-1, *[1] * (v.ndim - 1)), empty_cond[key].to(v.dtype), v)
                for key, v in cond.items()}
    return latents, {key: value.to(device) for key, value in cond.items()}


def encode_texts(adapter, texts: list[str]) -> dict[str, torch.Tensor]:
    """Encode each distinct text once, then gather one row per image."""
    unique = list(dict.fromkeys(texts))
    with torch.no_grad():
        table = adapter.encode_prompts(unique)
    index = torch.tensor([unique.index(t) for t in texts])
    return {key: value.index_select(0, index.to(value.device)) for key, value in table.items()}


def compute_loss(adapter, denoiser, batch: dict, objective, hparams: dict, reference, draws: StepDraws, device,
                 empty_cond: dict | None = None):
    """One micro-step's objective: encode -> policy/reference errors -> loss. Returns (loss, metrics).

    `draws` holds this process's rows of the step's randomness (`draw_step(...).rows(...)`)."""
    from diffalign.elbo import policy_and_reference_errors

    uses_captions = objective.DATA == "captioned-pairs"
    latents, cond = encode_batch(adapter, batch, uses_captions, draws.drop, device, empty_cond)
    err, ref_err = policy_and_reference_errors(adapter, denoiser, latents, cond, draws.noise, draws.t, reference)
    scores = batch["scores"].to(err.device) if batch.get("scores") is not None else None
    losses, metrics = objective.loss(err, ref_err, scores=scores, num_timesteps=adapter.num_train_timesteps, **hparams)
    return losses.mean(), metrics


class StepLog:
    """Loss and objective metrics kept on the device, moved to the host only when written.

    `add` takes each micro-step's values (means over its groups); `end_step` closes an
    optimiser step; `flush` gathers every pending step from all processes in one call and
    returns metrics.jsonl rows (means over the global batch and the step's micro-steps).
    `first_non_finite` is the finiteness check, one host sync over every step since the last
    check and the current one; the loops run it every log_every steps and before checkpoints,
    so a GPU is not stalled at every step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.micro: list[dict[str, torch.Tensor]] = []
        self.pending: list[tuple[dict, dict[str, torch.Tensor]]] = []
        self.unchecked: list[tuple[int, torch.Tensor]] = []  # (step, its mean loss) not checked yet
        self.last: dict = {}

    @property
    def micro_steps(self) -> int:
        return len(self.micro)

    def add(self, loss: torch.Tensor, metrics: dict) -> None:
        values = {"loss": loss.detach().float()}
        values.update({k: torch.as_tensor(v).detach().float().mean() for k, v in metrics.items()})
        self.micro.append(values)

    def first_non_finite(self, current_step: int) -> tuple[int, float] | None:
        """(step, loss) of the first NaN or infinite loss among the steps not checked yet and
        the current step's micro-steps (`current_step`), or None; those steps count as checked."""
        steps = [step for step, _ in self.unchecked] + [current_step] * len(self.micro)
        losses = [loss for _, loss in self.unchecked] + [m["loss"] for m in self.micro]
        self.unchecked = []
        if not losses:
            return None
        stacked = torch.stack(losses)
        bad = (~torch.isfinite(stacked)).nonzero().flatten().tolist()  # the host sync
        return (steps[bad[0]], float(stacked[bad[0]])) if bad else None

    def end_step(self, **info) -> None:
        means = {k: torch.stack([m[k] for m in self.micro]).mean() for k in self.micro[0]}
        self.pending.append((info, means))
        self.unchecked.append((info["step"], means["loss"]))
        self.micro = []

    def flush(self) -> list[dict]:
        if not self.pending:
            return []
        names = list(self.pending[0][1])
        local = torch.stack([torch.stack([values[k] for k in names]) for _, values in self.pending])  # (S, M)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.gather(local.to(self.accelerator.device)[None]).mean(0)
        rows = [{**dict(zip(names, values)), **info} for (info, _), values in zip(self.pending, local.tolist())]
        self.pending = []
        self.last = rows[-1]
        return rows


class MetricsFile:
    """OUTPUT/metrics.jsonl (written by the main process) and the trackers: the rows a StepLog
    hands over. Every process calls `write`, since the flush gathers across processes."""

    def __init__(self, path, accelerator, report_to: str):
        self.accelerator = accelerator
        self.report = report_to != "none"
        self.file = open(path, "a") if accelerator.is_main_process else None

    def write(self, log: StepLog) -> None:
        rows = log.flush()
        if self.file is None:
            return
        for record in rows:
            self.file.write(json.dumps(record) + "\n")
            if self.report:
                self.accelerator.log(record, step=record["step"])
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
