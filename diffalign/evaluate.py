"""`diffalign eval`: generate with a model and a baseline from the same seeds, score both with
reward models, and report the model's win rate over the baseline.

    diffalign eval --model toy-sd --lora runs/mapo/lora --prompts toy \
        --reward toy-reward,toy-judge --num-images 4 --seed 0 --output-dir runs/mapo/eval

Sampler settings: --num-inference-steps / --guidance-scale, else the model folder's
diffalign.json (the toy models ship 20 steps at guidance 4), else the pipeline's own defaults.

Image j of prompt i uses seed `seed + i * num_images + j` for both models, so each model image
has a baseline twin that differs only in the weights. For every reward:
- reward_mean / reward_std over all images, for the model and the baseline;
- win_rate: the share of twins where the model scores higher (ties count half);
- win_rate_ci: a 95% percentile bootstrap interval that resamples *prompts* (images of one
  prompt are correlated, so resampling images would be too narrow); 2000 resamples, seeded.
  win_rate_ci_wilson (Wilson score interval over images) is written beside it for reference;
- gain: the mean gain in standard deviations (effect_size_d), the win rate it would give
  between independent draws, and the share of images the model re-drew (`gain_diagnostics`).

Writes OUT/eval.json, OUT/scores.jsonl (every image's scores), OUT/grid.png (a prompt a row; each
base image beside its trained twin from the same seed, both with their score under the first
reward and the higher one framed green) and prints a summary table. `evaluate()` is the same thing as a
Python function, used by `diffalign train` at the end of the quickstart.

Baseline cache. Comparing many runs with one base model re-draws the same baseline images each
time (half of a toy run's evaluation). When the baseline is a local folder, its images are kept
under $DIFFALIGN_CACHE (default ~/.cache/diffalign)/eval-baselines/, keyed by the folder's files
(path, size, modification time), the prompts, seeds, sampler settings, dtype, device, batch size
and the torch and diffusers versions, and read back on the next run with the same key.
`--no-baseline-cache` turns it off; `--baseline-cache DIR` moves it.

Many processes: `accelerate launch [--config_file ...] -m diffalign.cli eval ...` deals the
sampler batches (and the scoring batches) to the processes in turn, each on its own device; the
main process gathers the images and scores and writes the same files as one process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import torch

from diffalign.edges import (atomic_write_bytes, default_device, load_pipeline, load_rewards, model_folder, parse_dtype,
                             parse_reward_specs, read_prompts, sampling_defaults, write_files)
from diffalign.errors import DiffalignError

BOOTSTRAP_RESAMPLES = 2000


# ------------------------------------------------------------------------------ statistics


def win_fractions(model_scores: list[float], baseline_scores: list[float]) -> list[float]:
    """1 where the model wins, 0 where it loses, 0.5 for a tie; one value per image pair."""
    if len(model_scores) != len(baseline_scores):
        raise DiffalignError(f"{len(model_scores)} model scores but {len(baseline_scores)} baseline scores: "
                             "score the same images for both")
    return [1.0 if m > b else 0.0 if m < b else 0.5 for m, b in zip(model_scores, baseline_scores)]


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion (ties enter as half successes)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def bootstrap_over_prompts(wins: list[float], prompt_ids: list[int], resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the win rate when whole prompts (with all their images) are drawn
    with replacement; the statistic is the mean over the drawn images."""
    by_prompt: dict[int, list[float]] = {}
    for w, p in zip(wins, prompt_ids):
        by_prompt.setdefault(p, []).append(w)
    groups = [(sum(v), len(v)) for v in by_prompt.values()]
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        draw = [groups[rng.randrange(len(groups))] for _ in groups]
        stats.append(sum(s for s, _ in draw) / sum(n for _, n in draw))
    stats.sort()
    lo_index = int(math.floor((1 - level) / 2 * resamples))
    hi_index = min(resamples - 1, int(math.ceil((1 + level) / 2 * resamples)) - 1)
    return (stats[lo_index], stats[hi_index])


def gain_diagnostics(model_scores: list[float], baseline_scores: list[float]) -> dict:
    """How much of a paired win rate is a mean gain, and how much the model re-draws images.

    d is the mean score gain in pooled (population) standard deviations; independent_draw_win
    = Φ(d/√2) is the win rate two independent draws with that gain would give; moved_share is
    the share of twins whose score changed by more than half a standard deviation. When
    fine-tuning re-draws most images (moved_share high), the win rate falls towards
    independent_draw_win even if the mean gain is real (docs/benchmarks.md, "The toy world").
    """
    model_t = torch.tensor(model_scores, dtype=torch.float64)
    base_t = torch.tensor(baseline_scores, dtype=torch.float64)
    diff = model_t - base_t
    sd = math.sqrt((float(model_t.var(unbiased=False)) + float(base_t.var(unbiased=False))) / 2)
    d = float(diff.mean()) / sd if sd > 0 else 0.0
    return {
        "mean_gain": float(diff.mean()),
        "effect_size_d": d,
        "independent_draw_win": 0.5 * (1 + math.erf(d / 2)),  # Φ(d/√2) = (1 + erf(d/2)) / 2
        "moved_share": float((diff.abs() > sd / 2).double().mean()) if sd > 0 else 0.0,
    }


def summarise(model_scores: list[float], baseline_scores: list[float], prompt_ids: list[int], seed: int = 0) -> dict:
    """eval.json's entry for one reward."""
    wins = win_fractions(model_scores, baseline_scores)
    model_t, base_t = torch.tensor(model_scores, dtype=torch.float64), torch.tensor(baseline_scores, dtype=torch.float64)
    lo, hi = bootstrap_over_prompts(wins, prompt_ids, seed=seed)
    wl, wh = wilson_interval(sum(wins), len(wins))
    std = (lambda t: float(t.std(unbiased=True)) if len(t) > 1 else 0.0)
    return {
        "model": {"reward_mean": float(model_t.mean()), "reward_std": std(model_t)},
        "baseline": {"reward_mean": float(base_t.mean()), "reward_std": std(base_t)},
        "win_rate": sum(wins) / len(wins),
        "win_rate_ci": [lo, hi],
        "win_rate_ci_wilson": [wl, wh],
        "ties": sum(1 for w in wins if w == 0.5),
        "num_prompts": len(set(prompt_ids)),
        "num_images": len(wins),
        "gain": gain_diagnostics(model_scores, baseline_scores),
    }


# ------------------------------------------------------------------------------ inputs


def open_pipeline(model: Any, device: torch.device, dtype: torch.dtype):
    """A loaded pipeline on `device`: `model` is a name/path (diffalign.edges.load_pipeline) or a pipeline."""
    return load_pipeline(model, dtype, device=device) if isinstance(model, str) else model


def load_lora(pipe, lora: str) -> None:
    if not Path(lora).exists():
        raise DiffalignError(f"LoRA {lora!r} not found: pass the folder that save_lora_weights wrote")
    with only_denoiser_lora_notices(type(pipeline_denoiser(pipe)).__name__):
        pipe.load_lora_weights(lora)


def pipeline_denoiser(pipe):
    """The network a diffalign LoRA adapts: the UNet of SD-style pipelines, else the DiT."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise DiffalignError(f"{type(pipe).__name__} has neither a unet nor a transformer: "
                         "pass a diffusers text-to-image pipeline")


# The diffusers modules whose loggers say "No LoRA keys associated to <class> ..." on a load.
_LORA_LOADER_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft")


@contextlib.contextmanager
def only_denoiser_lora_notices(denoiser_class: str):
    """Drop diffusers' "No LoRA keys associated to <text encoder>" warnings during a LoRA load.

    diffalign's LoRAs adapt the denoiser only, so load_lora_weights warns once per text encoder
    (twice for SD3) on every evaluation. The same notice about the denoiser is kept: it means the
    file holds nothing for the model being evaluated.
    """

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith("No LoRA keys associated to") or denoiser_class in message

    loggers = [logging.getLogger(name) for name in _LORA_LOADER_LOGGERS]
    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


# ------------------------------------------------------------------------------ generate + score


def image_seeds(num_prompts: int, num_images: int, seed: int) -> list[int]:
    return [seed + i * num_images + j for i in range(num_prompts) for j in range(num_images)]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int, call_kwargs: dict, desc: str,
             progress: bool = True) -> torch.Tensor:
    """uint8 (N, 3, H, W) images; image i is drawn from torch.Generator().manual_seed(seeds[i])."""
    from tqdm.auto import tqdm

    from diffalign.sampler import generate as sample

    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        images = sample(pipe, prompts[start : start + batch_size], seeds=seeds[start : start + batch_size], **call_kwargs)
        out.append((images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


@torch.no_grad()
def score(reward, images: torch.Tensor, prompts: list[str], batch_size: int, device: torch.device) -> list[float]:
    values = []
    for start in range(0, len(prompts), batch_size):
        batch = images[start : start + batch_size].to(device).float() / 255.0
        # The saved 8-bit images through each reward's original preprocessing: scores a user can
        # set beside published ones.
        values += reward.score(batch, prompts[start : start + batch_size], exact=True).float().cpu().tolist()
    return values


def in_batches(n: int, batch_size: int, processes=None) -> list[tuple[int, int]]:
    """(start, stop) of the batches of `n` items this process works on: batch b belongs to
    process b % world, so the batches, and what is drawn in them, are those of one process."""
    from diffalign.processes import Processes

    procs = processes or Processes()
    starts = range(0, n, batch_size)
    return [(start, min(start + batch_size, n)) for b, start in enumerate(starts) if procs.owns(b)]


def gather_batches(parts: list[tuple[int, Any]], processes) -> list[Any]:
    """Every process's (start, value) batches, in the order of their starts."""
    everyone = processes.gather(parts)
    return [value for _, value in sorted((part for mine in everyone for part in mine), key=lambda part: part[0])]


def generate_shared(pipe, prompts: list[str], seeds: list[int], batch_size: int, call_kwargs: dict, desc: str,
                    processes) -> torch.Tensor:
    """`generate` with the batches dealt to the processes; every process gets every image."""
    if processes.world == 1:
        return generate(pipe, prompts, seeds, batch_size, call_kwargs, desc)
    parts = [(start, generate(pipe, prompts[start:stop], seeds[start:stop], batch_size, call_kwargs, desc,
                              progress=False))
             for start, stop in in_batches(len(prompts), batch_size, processes)]
    return torch.cat(gather_batches(parts, processes))


def score_shared(reward, images: torch.Tensor, prompts: list[str], batch_size: int, device: torch.device,
                 processes) -> list[float]:
    """`score` with the batches dealt to the processes; every process gets every score."""
    if processes.world == 1:
        return score(reward, images, prompts, batch_size, device)
    parts = [(start, score(reward, images[start:stop], prompts[start:stop], batch_size, device))
             for start, stop in in_batches(len(prompts), batch_size, processes)]
    return [value for values in gather_batches(parts, processes) for value in values]


# ------------------------------------------------------------------------------ outputs


def write_grid(path: Path, baseline: torch.Tensor, model: torch.Tensor, num_images: int, **options) -> Path:
    """`grid_sheet(...)` written to `path` as PNG."""
    from diffalign.edges import write_files
    from diffalign.plots import png_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_files(path.parent, {path.name: png_bytes(grid_sheet(baseline, model, num_images, **options))},
                       "the evaluation grid")[0]


def grid_sheet(baseline: torch.Tensor, model: torch.Tensor, num_images: int, prompts: list[str] | None = None,
               scores: dict[str, list[float]] | None = None, reward_name: str | None = None, max_prompts: int = 8,
               max_images: int = 4, tile: int = 160):
    """grid.png as a PIL image. Rows = prompts (`prompts`: one a row), the prompt above its row;
    per seed the base image, then its trained twin (same seed). `scores` ({"baseline": [...],
    "model": [...]}, one an image, under the first reward) go under each image and the higher
    twin is framed green, so the picture shows what improved."""
    from diffalign.plots import Tile, image_sheet

    num_prompts = min(max_prompts, len(model) // num_images)
    cols = min(max_images, num_images)
    rows, wins = [], []
    for p in range(num_prompts):
        row, won = [], 0
        for j in range(cols):
            i = p * num_images + j
            if scores is None:
                row += [Tile(baseline[i]), Tile(model[i])]
                continue
            base_score, model_score = scores["baseline"][i], scores["model"][i]
            won += model_score > base_score
            for image, own, other in ((baseline[i], base_score, model_score), (model[i], model_score, base_score)):
                verdict = "  higher" if own > other else "  tie" if own == other else ""
                row.append(Tile(image, [f"{own:.3f}{verdict}"], "chosen" if own > other else None))
        rows.append(row)
        wins.append(f" (trained higher in {won} of {cols})" if scores is not None else "")
    how = (f"under each image its {reward_name} score, the higher of each pair framed green" if scores is not None
           else "no scores")
    title = f"base vs trained: each pair comes from one seed; {how}"
    row_titles = [f"{p + 1}. {prompts[p]}{wins[p]}" for p in range(num_prompts)] if prompts is not None else None
    col_titles = [name for j in range(cols) for name in (f"base #{j + 1}", f"trained #{j + 1}")]
    return image_sheet(rows, row_titles=row_titles, col_titles=col_titles, title=title, tile=tile, group=2)


def format_table(results: dict) -> str:
    lines = [f"{'reward':<14}{'model':>20}{'baseline':>20}   win rate [95% CI]"]
    for name, reward in results["rewards"].items():
        # video rewards with VideoReward's dimensions: a line for each (VQ, MQ, TA) under the overall
        for label, r in [(name, reward)] + [(f"  {dim}", v) for dim, v in reward.get("dimensions", {}).items()]:
            m, b = r["model"], r["baseline"]
            lo, hi = r["win_rate_ci"]
            lines.append(f"{label:<14}{m['reward_mean']:>11.3f} ± {m['reward_std']:<6.3f}{b['reward_mean']:>11.3f} ± "
                         f"{b['reward_std']:<6.3f}   {r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]")
    lines.append(f"{results['num_prompts']} prompts x {results['images_per_prompt']} images, seed {results['seed']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ videos

VIDEO_FPS = 16  # frame rate of the written mp4s when none is given: Wan's own export rate


def write_eval_videos(out: Path, baseline: torch.Tensor, model: torch.Tensor, fps: float, processes) -> dict[str, list[str]]:
    """Every video as mp4 under OUT/videos/{baseline,model}/ (the main process writes, the others
    wait); {"baseline": [paths], "model": [paths]}, in the order of the prompts and seeds."""
    from diffalign.plots import mp4_bytes

    files: dict[str, list[str]] = {}
    for side, videos in (("baseline", baseline), ("model", model)):
        folder = out / "videos" / side
        names = [f"{i:05d}.mp4" for i in range(len(videos))]
        if processes.main:
            folder.mkdir(parents=True, exist_ok=True)
            write_files(folder, {name: mp4_bytes(video, fps) for name, video in zip(names, videos)}, "the evaluation video")
        files[side] = [str(folder / name) for name in names]
    processes.barrier()
    return files


@torch.no_grad()
def score_video_files(reward, paths: list[str], prompts: list[str], batch_size: int) -> dict[str, list[float]]:
    """{"score": [...]} for the files, plus each dimension of a reward with `score_dimensions`
    (VideoReward's VQ, MQ, TA; its Overall is the score)."""
    out: dict[str, list[float]] = {}
    for start in range(0, len(paths), batch_size):
        batch, text = paths[start : start + batch_size], prompts[start : start + batch_size]
        if hasattr(reward, "score_dimensions"):
            parts = reward.score_dimensions(batch, text)
            parts = {"score": parts.pop("Overall"), **parts}
        else:
            parts = {"score": reward.score(batch, text)}
        for key, values in parts.items():
            out.setdefault(key, []).extend(values.float().cpu().tolist())
    return out


def score_videos_shared(reward, files: dict[str, list[str]], prompts: list[str], batch_size: int, processes):
    """(model scores, baseline scores, {dimension: {"model": [...], "baseline": [...]}}), the
    batches dealt to the processes."""
    sides = {}
    for side in ("model", "baseline"):
        parts = [(start, score_video_files(reward, files[side][start:stop], prompts[start:stop], batch_size))
                 for start, stop in in_batches(len(prompts), batch_size, processes)]
        gathered = gather_batches(parts, processes)
        sides[side] = {key: [v for part in gathered for v in part[key]] for key in gathered[0]}
    dimensions = {key: {side: sides[side][key] for side in sides} for key in sides["model"] if key != "score"}
    return sides["model"]["score"], sides["baseline"]["score"], dimensions


def write_video_outputs(out: Path, results: dict, rows: list[dict], files: dict[str, list[str]], baseline: torch.Tensor,
                        model: torch.Tensor, num_images: int, prompts: list[str], per_image: dict, fps: float,
                        verbose: bool) -> dict:
    """eval.json, scores.jsonl (with each row's two mp4 files) and grid.gif: the evaluation grid
    (prompts as rows, base and trained twins side by side, scores under them), one sheet per frame."""
    from diffalign.plots import gif_bytes

    for i, row in enumerate(rows):
        row["videos"] = {side: str(Path(files[side][i]).relative_to(out)) for side in ("baseline", "model")}
    first = next(iter(per_image), None)
    sheets = [grid_sheet(baseline[:, f], model[:, f], num_images, prompts=prompts, scores=per_image.get(first),
                         reward_name=first, tile=128) for f in range(model.shape[1])]
    write_files(out, {"eval.json": (json.dumps(results, indent=2) + "\n").encode(),
                      "scores.jsonl": "".join(json.dumps(row) + "\n" for row in rows).encode(),
                      "grid.gif": gif_bytes(sheets, fps)}, "the evaluation file")
    if verbose:
        print(format_table(results))
        print(f"wrote {out / 'eval.json'}, {out / 'scores.jsonl'}, {out / 'grid.gif'} and {len(rows) * 2} videos "
              f"under {out / 'videos'}")
    return results


# ------------------------------------------------------------------------------ baseline cache

BASELINE_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIFFALIGN_CACHE") or Path.home() / ".cache" / "diffalign")


def model_fingerprint(model: Any) -> list | None:
    """(file, size, mtime) of a local model folder's files, so an edited model gets a new key.
    None for a hub id or a pipeline object: what they hold cannot be checked cheaply, so they are
    never cached."""
    folder = model_folder(model) if isinstance(model, str) else None
    if folder is None or not folder.is_dir():
        return None
    root = folder.resolve()
    files = sorted(f for f in root.rglob("*") if f.is_file())
    return [str(root)] + [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def baseline_cache_file(cache_dir: Path, fingerprint: list, prompts: list[str], seeds: list[int], call_kwargs: dict,
                        dtype: torch.dtype, device: torch.device, batch_size: int) -> Path:
    import diffusers

    key = {"format": BASELINE_CACHE_FORMAT, "model": fingerprint, "prompts": prompts, "seeds": seeds,
           "call_kwargs": call_kwargs, "dtype": str(dtype), "device": device.type, "batch_size": batch_size,
           "torch": torch.__version__, "diffusers": diffusers.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / "eval-baselines" / f"{digest}.safetensors"


def read_cached_baseline(path: Path, num_images: int) -> torch.Tensor | None:
    """The cached uint8 images, or None when absent or unreadable (then they are drawn again)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        images = load_file(str(path))["images"]
    except Exception as error:  # a damaged cache entry costs a re-draw, never the evaluation
        warnings.warn(f"baseline cache {path} is unreadable ({error}); drawing the baseline again", stacklevel=2)
        return None
    return images if images.dtype == torch.uint8 and images.shape[0] == num_images else None


def write_cached_baseline(path: Path, images: torch.Tensor) -> bool:
    """Written to a temporary file and renamed, so a reader never sees half a file; a failed write
    (full disk, read-only cache) only warns. True when the entry was written."""
    from safetensors.torch import save

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"images": images.contiguous()}))
    except OSError as error:
        warnings.warn(f"could not write the baseline cache {path} ({error}); evaluation goes on without it",
                      stacklevel=2)
        return False
    return True


# ------------------------------------------------------------------------------ entry points


def evaluate(model: Any, baseline: Any, prompts: list[str] | str, rewards: Any, num_images: int, seed: int,
             output_dir: str | Path, *, lora: str | None = None, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, resolution: int | None = None, batch_size: int = 8,
             max_prompts: int | None = None, device: str | None = None, dtype: str | torch.dtype = "fp32",
             verbose: bool = True, baseline_cache: str | Path | bool = True, processes=None,
             num_frames: int | None = None, fps: float | None = None) -> dict:
    """Generate `num_images` per prompt with `model` (plus `lora`) and `baseline`, same seeds,
    score with `rewards`, write eval.json + scores.jsonl + grid.png to `output_dir`, return the
    eval.json dict. `model`/`baseline` are names, paths or loaded pipelines; baseline None means
    the model without the LoRA. `prompts` is a list or a --prompts source ('toy', a file).
    `rewards` is a reward spec ('toy-reward,toy-judge') or a list of specs, Rewards and callables.
    Sampler settings not given come from the model folder's diffalign.json (else the baseline's),
    else the pipeline's defaults.
    `baseline_cache`: True (the default folder), a folder, or False (always draw the baseline).
    `processes` (diffalign.processes, from `accelerate launch`): every process draws and scores
    its share of the batches, each on its own device; all of them get every image and score, and
    the main process writes the files, the same as one process would.
    Video models (`num_frames`: frames per video, None for the pipeline's default): every video
    is written as mp4 (OUT/videos/{baseline,model}/NNNNN.mp4 at `fps`, default VIDEO_FPS) and
    scored from those files; rewards with VideoReward's dimensions report VQ/MQ/TA beside their
    overall score; the grid is OUT/grid.gif (`write_video_outputs`)."""
    from diffalign.processes import Processes

    procs = processes or Processes()
    verbose = verbose and procs.main
    if num_images < 1:
        raise DiffalignError(f"--num-images {num_images}: generate at least one image per prompt")
    if baseline is None and lora is None:
        raise DiffalignError("nothing to compare: give --lora (baseline = the model without it) or --baseline MODEL")
    if isinstance(lora, (str, Path)) and not Path(lora).exists():  # before the baseline is drawn
        raise DiffalignError(f"LoRA {str(lora)!r} not found: pass the folder that save_lora_weights wrote")
    reward_items = [rewards] if isinstance(rewards, str) else list(rewards)
    specs = [r for r in reward_items if isinstance(r, str)]
    if specs or not reward_items:
        parse_reward_specs(specs)  # names, paths and weights checked before any model loads
    prompt_list = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    if max_prompts:
        prompt_list = prompt_list[:max_prompts]
    if not prompt_list:
        raise DiffalignError("no prompts to evaluate: pass --prompts toy or a non-empty prompt file")
    torch_device = default_device(device) if device is not None or procs.device is None else procs.device
    torch_dtype = parse_dtype(dtype)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    base_model = baseline if baseline is not None else model
    call_kwargs: dict[str, Any] = sampling_defaults(model) or sampling_defaults(base_model)
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    if resolution is not None:
        call_kwargs["height"] = call_kwargs["width"] = resolution
    if num_frames is not None:
        call_kwargs["num_frames"] = num_frames
    all_prompts = [p for p in prompt_list for _ in range(num_images)]
    seeds = image_seeds(len(prompt_list), num_images, seed)
    prompt_ids = [i for i in range(len(prompt_list)) for _ in range(num_images)]

    # The baseline first: with baseline None it is the same pipeline before the LoRA goes in.
    cache_file = None
    fingerprint = model_fingerprint(base_model) if baseline_cache is not False else None
    if fingerprint is not None:
        cache_dir = default_cache_dir() if baseline_cache is True else Path(baseline_cache)
        cache_file = baseline_cache_file(cache_dir, fingerprint, all_prompts, seeds, call_kwargs, torch_dtype,
                                         torch_device, batch_size)
    baseline_images = read_cached_baseline(cache_file, len(all_prompts)) if cache_file else None
    baseline_source = f"cache {cache_file}" if baseline_images is not None else "drawn"
    if verbose and baseline_images is not None:
        print(f"baseline images read from the cache {cache_file} (to draw them again: diffalign eval "
              "--no-baseline-cache, diffalign train --no-eval-baseline-cache)")
    base_pipe = None
    if baseline_images is None:
        base_pipe = open_pipeline(base_model, torch_device, torch_dtype)
        baseline_images = generate_shared(base_pipe, all_prompts, seeds, batch_size, call_kwargs, "baseline", procs)
        if cache_file and procs.main and write_cached_baseline(cache_file, baseline_images) and verbose:
            print(f"baseline images kept in {cache_file} ({baseline_images.numel() / 2**20:.1f} MiB) for the next eval")
    model_pipe = base_pipe if baseline is None and base_pipe is not None else open_pipeline(model, torch_device, torch_dtype)
    del base_pipe
    if lora is not None:
        load_lora(model_pipe, lora)
    model_images = generate_shared(model_pipe, all_prompts, seeds, batch_size, call_kwargs, "model", procs)
    del model_pipe

    results: dict[str, Any] = {
        "model": model if isinstance(model, str) else type(model).__name__,
        "lora": lora,
        "baseline": (baseline if isinstance(baseline, str) else type(baseline).__name__) if baseline is not None
        else f"{model if isinstance(model, str) else 'model'} without LoRA",
        "baseline_images": baseline_source,
        "num_prompts": len(prompt_list),
        "images_per_prompt": num_images,
        "num_images": len(all_prompts),
        "seed": seed,
        "seeds": "seed + prompt_index * images_per_prompt + image_index",
        "call_kwargs": call_kwargs,
        "win_rate_ci_method": f"percentile bootstrap over prompts, {BOOTSTRAP_RESAMPLES} resamples, 95%",
        "rewards": {},
    }
    per_image: dict[str, dict[str, list[float]]] = {}
    video_files = write_eval_videos(out, baseline_images, model_images, fps or VIDEO_FPS, procs) \
        if model_images.ndim == 5 else None
    for name, reward in load_rewards(reward_items, torch_device).items():
        if video_files is None:
            m = score_shared(reward, model_images, all_prompts, batch_size, torch_device, procs)
            b = score_shared(reward, baseline_images, all_prompts, batch_size, torch_device, procs)
            dimensions = {}
        else:
            m, b, dimensions = score_videos_shared(reward, video_files, all_prompts, batch_size, procs)
        results["rewards"][name] = summarise(m, b, prompt_ids, seed=seed)
        per_image[name] = {"model": m, "baseline": b}
        if dimensions:
            results["rewards"][name]["dimensions"] = {dim: summarise(v["model"], v["baseline"], prompt_ids, seed=seed)
                                                      for dim, v in dimensions.items()}
            per_image.update({f"{name}.{dim}": v for dim, v in dimensions.items()})

    if not procs.main:  # every process holds the results; the main process writes them
        return results
    rows = [{"prompt": prompt, "seed": s, **{n: {k: v[i] for k, v in d.items()} for n, d in per_image.items()}}
            for i, (prompt, s) in enumerate(zip(all_prompts, seeds))]
    if video_files is not None:
        return write_video_outputs(out, results, rows, video_files, baseline_images, model_images, num_images,
                                   prompt_list, per_image, fps or VIDEO_FPS, verbose)
    from diffalign.plots import png_bytes

    first = next(iter(per_image), None)  # the grid shows the first reward's scores
    grid = grid_sheet(baseline_images, model_images, num_images, prompts=prompt_list, scores=per_image.get(first),
                      reward_name=first)
    write_files(out, {"eval.json": (json.dumps(results, indent=2) + "\n").encode(),
                      "scores.jsonl": "".join(json.dumps(row) + "\n" for row in rows).encode(),
                      "grid.png": png_bytes(grid)}, "the evaluation file")
    if verbose:
        print(format_table(results))
        print(f"wrote {out / 'eval.json'}, {out / 'scores.jsonl'} and {out / 'grid.png'}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers folder, hub id, or toy-sd / toy-flow")
    parser.add_argument("--lora", default=None, help="LoRA folder loaded with pipe.load_lora_weights")
    parser.add_argument("--baseline", default=None, help="model to compare against (default: --model without --lora)")
    parser.add_argument("--prompts", default="toy", help="'toy' (held-out toy prompts) or a .txt/.jsonl/.json file")
    parser.add_argument("--reward", default="toy-reward,toy-judge", metavar="SPEC",
                        help="rewards, NAME[@PATH][=WEIGHT],... (each reported on its own)")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt and model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True, help="where eval.json, scores.jsonl and grid.png go")
    parser.add_argument("--num-inference-steps", type=int, default=None,
                        help="sampler steps (default: the model folder's diffalign.json, else the pipeline's)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the model folder's diffalign.json, else the pipeline's)")
    parser.add_argument("--resolution", type=int, default=None, help="image height = width (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="video models: frames per video (default: the pipeline's; Wan: 1 + 4k)")
    parser.add_argument("--fps", type=float, default=None, help=f"video models: frame rate of the written mp4s (default {VIDEO_FPS})")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="fp32", help="pipeline dtype: fp32 | fp16 | bf16")
    parser.add_argument("--baseline-cache", default=None,
                        help="folder that keeps baseline images between runs (default: $DIFFALIGN_CACHE or ~/.cache/diffalign)")
    parser.add_argument("--no-baseline-cache", action="store_true", help="always draw the baseline images")


def run(args: argparse.Namespace) -> int:
    from diffalign.processes import launched

    evaluate(args.model, args.baseline, args.prompts, args.reward, args.num_images, args.seed, args.output_dir,
             lora=args.lora, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
             resolution=args.resolution,
             batch_size=args.batch_size, max_prompts=args.max_prompts, device=args.device, dtype=args.dtype,
             num_frames=args.num_frames, fps=args.fps,
             baseline_cache=False if args.no_baseline_cache else (args.baseline_cache or True),
             processes=launched())
    return 0
