"""`diffalign label`: build synthetic preference data, the Syn-Pic way (RankDPO, arXiv:2410.18013).

    diffalign label --model toy-sd --prompts prompts.txt --num-images 4 \
        --reward toy-reward,clip --output-dir data/syn

For every prompt: generate K images (image k of prompt p always uses the same seed, see
`image_seed`), score them with every reward, rank them and write

    D/images/000012_03.png    image 3 of prompt 12, as generated (PNG: what is scored is what is saved)
    D/rows/000012.json        the prompt's ranked record, written atomically: the done-index
    D/ranked.jsonl            ranked lists, best first (docs/datasets.md JSONL format):
                              {"prompt", "images", "scores", "ranks", "rewards": {name: [...]}, "seeds"}
    D/pairs.parquet           Pick-a-Pic v2 schema: caption, jpg_0 (winner), jpg_1, label_0, label_1
    D/run.json, D/stats.json  the settings (checked on resume) and the timing of the last run
                              (images/s over generation + scoring + writing, and the rewards' share)
    D/samples.png             the first prompts' images, best first, every reward's score under each,
                              the chosen image of each pair framed green and the rejected one red

Rewards (`--reward NAME[@PATH][=WEIGHT],...`, diffalign.edges): names from diffalign.rewards
(built-in, or added from Python with `diffalign.rewards.register_reward`), or "module:function"
for a plain callable `(images (B, 3, H, W) in [0, 1], prompts) -> Tensor[B]`. Rewards see the
saved 8-bit pixels.

Sampler settings: --num-inference-steps / --guidance-scale, else the model folder's
diffalign.json (the toy models ship 20 steps at guidance 4), else the pipeline's own defaults.

Ranking (`--rank-by`). "avg-rank" (default) is the paper's Algorithm 1: each reward votes on every
pair of images, and an image's score psi is its share of won votes, wins / (n_rewards * (K - 1)),
in [0, 1]. That is a linear function of the average per-reward rank, and it is what RankDPO takes
as the label score. "weighted" ranks by sum_r w_r * reward_r (the weights of `--reward a=1,b=0.5`;
avg-rank does not use them), and psi is the share
of the other images it beats. Pairs: "best-worst" (one pair per prompt; ties dropped) or "margin"
(every pair whose psi differ by more than `--margin`, or whose weighted scores do with
--rank-by weighted).

Resuming: a prompt is done once its row file exists (written after its images, by rename). A
rerun with the same flags skips done prompts and regenerates unfinished batches whole, so the
batches, and therefore the pixels, are the same as in an uninterrupted run; ranked.jsonl and
pairs.parquet are rebuilt from the row files at the end. Nothing is duplicated or lost.

Many processes: `accelerate launch [--config_file ...] -m diffalign.cli label ...` deals the
generation chunks to the processes in turn (each on its own device); each writes the images and
rows of its chunks, and the main process writes ranked.jsonl, pairs.parquet and stats.json: the
same dataset as one process. A run may be resumed with another number of processes.

Dual captions (DCPO): `--captions caption|perturb|hybrid` adds caption_0/caption_1 to the pairs
(see diffalign/captions.py for the strategies and `diffalign captions` for existing data).

Videos (`--num-frames F` with a video pipeline, e.g. Wan): the same Syn-Pic recipe with K videos
a prompt, written as D/videos/000012_03.mp4 (at `--fps`) and scored from those files (what a
reward scores is what is saved); ranked.jsonl lists the mp4s under "images" (with "dimensions":
each VideoReward-style reward's VQ/MQ/TA), and the pairs go to D/pairs.csv in VideoAlign's schema
(path_A = chosen, path_B = rejected, VQ/MQ/TA labels A|B|same from the first reward that has those
dimensions, else A, fps_*, num_frames_*, reward_A/reward_B = the ranking scores), which
`diffalign train --dataset D/pairs.csv --num-frames F` reads. D/samples.gif replaces samples.png.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffalign.edges import (atomic_write_bytes, atomic_write_text, default_device, load_pipeline, load_rewards,
                             parse_dtype, parse_reward_specs, read_prompts, sampling_defaults)
from diffalign.errors import DiffalignError

RANK_BY = ("avg-rank", "weighted")
PAIRS = ("best-worst", "margin")


@dataclass
class LabelConfig:
    model: str
    prompts: str
    output_dir: str
    rewards: list[str]  # reward specs, NAME[@PATH][=WEIGHT] (diffalign.edges)
    num_images: int = 4
    seed: int = 0
    batch_size: int = 8
    num_inference_steps: int | None = None  # None: the model folder's diffalign.json, else the pipeline's
    guidance_scale: float | None = None
    resolution: int | None = None
    pairs: str = "best-worst"
    margin: float = 0.0
    rank_by: str = "avg-rank"
    device: str | None = None
    dtype: str = "fp32"
    captions: str | None = None
    captioner: str | None = None
    paraphraser: str | None = None
    caption_prompt: str | None = None
    perturb_strength: str = "medium"
    num_frames: int | None = None  # video pipelines: frames a video (None: images)
    fps: float = 16.0  # video pipelines: frame rate of the written mp4s

    def identity(self) -> dict[str, Any]:
        """The settings that decide the content of the rows: a resumed run must match them."""
        keep = ("model", "prompts", "num_images", "seed", "batch_size", "num_inference_steps", "guidance_scale",
                "resolution", "rank_by", "dtype", "num_frames")
        out = {k: v for k, v in asdict(self).items() if k in keep}
        out["rewards"] = [str(spec) for spec in parse_reward_specs(self.rewards)]
        # The prompt list itself, not the file's path: moving the file is fine, editing it is not.
        out["prompts"] = hashlib.sha256("\n".join(read_prompts(self.prompts)).encode()).hexdigest()
        return out


# ----------------------------------------------------------------------------------------------
# Inputs


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """Seed of image k of prompt p: fixed by (seed, p, k), independent of batching and resumes."""
    return (seed * 1_000_003 + prompt_index * 1009 + k) % (2**63 - 1)


def reward_weights(cfg: LabelConfig) -> list[float] | None:
    """The weights of the reward specs, in order; None unless every reward has one."""
    weights = [spec.weight for spec in parse_reward_specs(cfg.rewards)]
    return None if None in weights else weights


# ----------------------------------------------------------------------------------------------
# Ranking: pure functions of the reward table, tested by hand


def win_fractions(table: list[list[float]]) -> list[float]:
    """Algorithm 1 of the paper. table[r][i] = reward r of image i. psi_i = wins / (n * (K - 1)),
    a win being a strictly higher reward than another image (ties win nothing)."""
    n, k = len(table), len(table[0])
    wins = [sum(1 for row in table for j in range(k) if row[i] > row[j]) for i in range(k)]
    return [w / (n * (k - 1)) for w in wins]


def rank_images(rewards: dict[str, list[float]], rank_by: str, weights: list[float] | None) -> tuple[list[int], list[float], list[float]]:
    """Order of the images best first, their psi scores (in that order) and the values the
    pair margin is measured on (psi, or the weighted score)."""
    table = list(rewards.values())
    for name, values in rewards.items():
        if not all(v == v and abs(v) != float("inf") for v in values):
            raise DiffalignError(f"reward {name!r} returned NaN or inf: check the reward or the generated images")
    if rank_by == "avg-rank":
        psi = win_fractions(table)
        key = psi
    elif rank_by == "weighted":
        if weights is None or len(weights) != len(table):
            raise DiffalignError(f"--rank-by weighted needs one weight per reward ({len(table)}): write --reward NAME=WEIGHT,...")
        key = [sum(w * row[i] for w, row in zip(weights, table)) for i in range(len(table[0]))]
        psi = win_fractions([key])
    else:
        raise DiffalignError(f"unknown --rank-by {rank_by!r}: choose one of {', '.join(RANK_BY)}")
    order = sorted(range(len(psi)), key=lambda i: (-psi[i], -key[i], i))  # stable, best first
    return order, [psi[i] for i in order], [key[i] for i in order]


def competition_ranks(sorted_scores: list[float]) -> list[int]:
    """1-based ranks of scores sorted descending; equal scores share the best rank (1, 2, 2, 4)."""
    return [1 + sum(1 for other in sorted_scores if other > s) for s in sorted_scores]


def select_pairs(margin_values: list[float], mode: str, margin: float) -> list[tuple[int, int]]:
    """(winner, loser) positions in a best-first list. Ties never make a pair."""
    k = len(margin_values)
    if mode == "best-worst":
        return [(0, k - 1)] if margin_values[0] > margin_values[-1] else []
    if mode == "margin":
        return [(i, j) for i in range(k) for j in range(i + 1, k) if margin_values[i] - margin_values[j] > margin]
    raise DiffalignError(f"unknown --pairs {mode!r}: choose one of {', '.join(PAIRS)}")


# ----------------------------------------------------------------------------------------------
# Generation and the per-prompt rows


def _row_path(out: Path, p: int) -> Path:
    return out / "rows" / f"{p:06d}.json"


def generate_images(pipe, prompts: list[str], seeds: list[int], cfg: LabelConfig):
    """One image per (prompt, seed), as uint8 (N, H, W, 3) numpy; each image has its own CPU
    generator, so it depends only on its seed (and the batch it is made in)."""
    import numpy as np

    from diffalign.sampler import generate

    kwargs: dict[str, Any] = sampling_defaults(cfg.model)
    if cfg.num_inference_steps is not None:
        kwargs["num_inference_steps"] = cfg.num_inference_steps
    if cfg.guidance_scale is not None:
        kwargs["guidance_scale"] = cfg.guidance_scale
    if cfg.resolution is not None:
        kwargs["height"] = kwargs["width"] = cfg.resolution
    if cfg.num_frames is not None:
        kwargs["num_frames"] = cfg.num_frames
    images = generate(pipe, prompts, seeds=seeds, **kwargs)  # (N, 3, H, W) in [0, 1]; videos (N, F, 3, H, W)
    images = images.movedim(-3, -1).float().cpu().numpy()  # videos: uint8 (N, F, H, W, 3)
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def score_images(rewards: dict[str, Any], pixels, prompts: list[str]) -> dict[str, list[float]]:
    """Score uint8 images (N, H, W, 3): exactly the pixels that are saved, through each reward's
    original preprocessing (`exact=True`), so a label equals the original code's score of the file."""
    import torch

    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    out = {}
    with torch.no_grad():
        for name, reward in rewards.items():
            values = torch.as_tensor(reward.score(images, prompts, exact=True)).detach().float().cpu().reshape(-1)
            if values.numel() != len(prompts):
                raise DiffalignError(f"reward {name!r} returned {values.numel()} scores for {len(prompts)} images: "
                                     "it must return one score per image")
            out[name] = values.tolist()
    return out


def make_row(p: int, prompt: str, seeds: list[int], files: list[str], rewards: dict[str, list[float]],
             cfg: LabelConfig, weights: list[float] | None = None) -> dict[str, Any]:
    order, psi, key = rank_images(rewards, cfg.rank_by, weights)
    row = {
        "index": p,
        "prompt": prompt,
        "images": [files[i] for i in order],
        "scores": psi,
        "ranks": competition_ranks(psi),
        "rewards": {name: [values[i] for i in order] for name, values in rewards.items()},
        "seeds": [seeds[i] for i in order],
    }
    if cfg.rank_by == "weighted":
        row["weighted_scores"] = key
    return row


def chunks(num_prompts: int, k: int, batch_size: int) -> list[list[int]]:
    """Prompt indices per generation chunk: whole prompts, aligned from prompt 0, so a resumed
    run regenerates exactly the same batches."""
    per_chunk = max(1, batch_size // k)
    return [list(range(start, min(start + per_chunk, num_prompts))) for start in range(0, num_prompts, per_chunk)]


def label_chunk(pipe, rewards, prompts: list[str], chunk: list[int], cfg: LabelConfig, out: Path,
                timing: dict[str, float], weights: list[float] | None = None) -> int:
    """Generate, score and write the rows of the prompts in `chunk` that are not done yet."""
    import numpy as np
    from PIL import Image

    k = cfg.num_images
    items = [(p, i) for p in chunk for i in range(k)]
    pixels = []
    start = time.perf_counter()
    for b in range(0, len(items), cfg.batch_size):  # a prompt wider than a batch spans several
        batch = items[b : b + cfg.batch_size]
        pixels.extend(generate_images(pipe, [prompts[p] for p, _ in batch], [image_seed(cfg.seed, p, i) for p, i in batch], cfg))
    timing["generate"] += time.perf_counter() - start
    written = 0
    for n, p in enumerate(chunk):
        if _row_path(out, p).exists():
            continue  # done in an earlier run; this chunk was only regenerated to keep batches equal
        mine = pixels[n * k : (n + 1) * k]
        if mine[0].ndim == 4:  # videos
            written += label_videos(rewards, p, prompts[p], mine, cfg, out, timing, weights)
            continue
        start = time.perf_counter()
        scores = score_images(rewards, np.stack(mine), [prompts[p]] * k)
        timing["reward"] += time.perf_counter() - start
        files = [f"images/{p:06d}_{i:02d}.png" for i in range(k)]
        for file, img in zip(files, mine):
            Image.fromarray(img).save(out / file)
        row = make_row(p, prompts[p], [image_seed(cfg.seed, p, i) for i in range(k)], files, scores, cfg, weights)
        atomic_write_text(_row_path(out, p), json.dumps(row))
        written += 1
    return written


def label_videos(rewards: dict[str, Any], p: int, prompt: str, videos: list, cfg: LabelConfig, out: Path,
                 timing: dict[str, float], weights: list[float] | None) -> int:
    """Write one prompt's videos as mp4, score the files, write its row (with each reward's
    VideoReward-style dimensions, when it has them, under "dimensions")."""
    import torch

    from diffalign.plots import mp4_bytes

    files = [f"videos/{p:06d}_{i:02d}.mp4" for i in range(len(videos))]
    (out / "videos").mkdir(exist_ok=True)
    for file, video in zip(files, videos):
        atomic_write_bytes(out / file, mp4_bytes(video, cfg.fps))
    start = time.perf_counter()
    scores, dimensions = {}, {}
    with torch.no_grad():
        for name, reward in rewards.items():
            paths, text = [str(out / f) for f in files], [prompt] * len(files)
            if hasattr(reward, "score_dimensions"):
                parts = {key: value.float().cpu().tolist() for key, value in reward.score_dimensions(paths, text).items()}
                scores[name] = parts.pop("Overall")
                dimensions[name] = parts
            else:
                scores[name] = reward.score(paths, text).float().cpu().tolist()
    timing["reward"] += time.perf_counter() - start
    row = make_row(p, prompt, [image_seed(cfg.seed, p, i) for i in range(len(files))], files, scores, cfg, weights)
    order = [files.index(f) for f in row["images"]]
    if dimensions:
        row["dimensions"] = {name: {dim: [v[i] for i in order] for dim, v in parts.items()} for name, parts in dimensions.items()}
    row["fps"], row["num_frames"] = cfg.fps, int(videos[0].shape[0])
    atomic_write_text(_row_path(out, p), json.dumps(row))
    return 1


VIDEO_PAIR_COLUMNS = ("path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B", "num_frames_B",
                      "reward_A", "reward_B")


def video_pair_rows(rows: list[dict[str, Any]], cfg: LabelConfig) -> list[dict[str, Any]]:
    """VideoAlign's CSV rows: the chosen video is A; each dimension's label from the first reward
    with dimensions (A, B or same), else A for all three."""
    records = []
    for row in rows:
        values = row.get("weighted_scores", row["scores"])
        dims = next(iter(row.get("dimensions", {}).values()), None)
        for w, l in select_pairs(values, cfg.pairs, cfg.margin):
            record = {"path_A": row["images"][w], "path_B": row["images"][l], "prompt": row["prompt"]}
            for dim in ("VQ", "MQ", "TA"):
                a, b = (dims[dim][w], dims[dim][l]) if dims and dim in dims else (1.0, 0.0)
                record[dim] = "A" if a > b else "B" if b > a else "same"
            for side in ("A", "B"):
                record[f"fps_{side}"], record[f"num_frames_{side}"] = row["fps"], row["num_frames"]
            record["reward_A"], record["reward_B"] = values[w], values[l]
            records.append(record)
    return records


def write_video_pairs(out: Path, records: list[dict[str, Any]]) -> Path:
    import csv

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=VIDEO_PAIR_COLUMNS)
    writer.writeheader()
    writer.writerows(records)
    return atomic_write_text(out / "pairs.csv", text.getvalue())


def write_video_sample_sheet(out: Path, rows: list[dict[str, Any]], cfg: LabelConfig) -> Path | None:
    """OUT/samples.gif: samples.png's sheet (best first, scores, chosen green, rejected red), one
    sheet a frame."""
    import numpy as np

    from diffalign.plots import Tile, gif_bytes, image_sheet
    from diffalign.rewards.videoreward import decode_video

    shown, titles = sample_rows(rows, cfg)
    if not shown:
        return None
    frames = {file: np.stack([f.to_ndarray(format="rgb24") for f in decode_video(out / file)[0]])
              for row in shown for file, _, _ in row}
    length = min(len(v) for v in frames.values())
    title = (f"samples: {len(shown)} of {len(rows)} prompts, videos best first (--rank-by {cfg.rank_by}); "
             f"--pairs {cfg.pairs}: chosen framed green, rejected red")
    sheets = [image_sheet([[Tile(frames[file][t], caption, mark) for file, caption, mark in row] for row in shown],
                          row_titles=titles, tile=128, title=title)
              for t in range(length)]
    return atomic_write_bytes(out / "samples.gif", gif_bytes(sheets, cfg.fps))


# ----------------------------------------------------------------------------------------------
# Outputs, rebuilt from the rows


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((out / "rows").glob("*.json"))]


def write_ranked(out: Path, rows: list[dict[str, Any]]) -> Path:
    lines = []
    for row in rows:
        lines.append(json.dumps({k: v for k, v in row.items() if k != "index"}))
    path = out / "ranked.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def pair_records(out: Path, rows: list[dict[str, Any]], cfg: LabelConfig) -> list[dict[str, Any]]:
    records = []
    for row in rows:
        values = row.get("weighted_scores", row["scores"])
        for w, l in select_pairs(values, cfg.pairs, cfg.margin):
            records.append({
                "caption": row["prompt"],
                "jpg_0": (out / row["images"][w]).read_bytes(),
                "jpg_1": (out / row["images"][l]).read_bytes(),
                "label_0": 1.0,
                "label_1": 0.0,
                "score_0": row["scores"][w],
                "score_1": row["scores"][l],
                "prompt_index": row["index"],
            })
    return records


SAMPLE_PROMPTS = 4  # prompts samples.png shows
SAMPLE_IMAGES = 8  # images a prompt it shows, best first


def write_sample_sheet(out: Path, rows: list[dict[str, Any]], cfg: LabelConfig) -> Path | None:
    """OUT/samples.png: the first few prompts, a row each, their images best first with every
    reward's score and the rank score (psi) under each, the chosen image of each pair framed green
    and the rejected one red, so a person can check the labels by eye."""
    from diffalign.plots import Tile, save_image_sheet

    shown, titles = sample_rows(rows, cfg)
    if not shown:
        return None
    sheet = [[Tile(out / file, caption, mark) for file, caption, mark in row] for row in shown]
    title = (f"samples: {len(shown)} of {len(rows)} prompts, images best first (--rank-by {cfg.rank_by}); "
             f"--pairs {cfg.pairs}: chosen framed green, rejected red")
    return save_image_sheet(out / "samples.png", sheet, what="the sample sheet", row_titles=titles, title=title)


def sample_rows(rows: list[dict[str, Any]], cfg: LabelConfig) -> tuple[list[list[tuple]], list[str]]:
    """The sample sheet's content: for the first SAMPLE_PROMPTS rows, (file, caption, mark) of
    their first SAMPLE_IMAGES images (every reward's score, the rank score psi; an image chosen in
    one pair and rejected in another is marked neither, and its caption says both), and a title a
    row."""
    shown = rows[:SAMPLE_PROMPTS]
    k = min(SAMPLE_IMAGES, max((len(row["images"]) for row in shown), default=0))
    tiles, titles = [], []
    for row in shown:
        pairs = select_pairs(row.get("weighted_scores", row["scores"]), cfg.pairs, cfg.margin)
        chosen, rejected = {w for w, _ in pairs}, {l for _, l in pairs}
        row_tiles = []
        for i, file in enumerate(row["images"][:k]):
            mark = "chosen" if i in chosen and i not in rejected else "rejected" if i in rejected and i not in chosen else None
            caption = [f"{name} {values[i]:.3f}" for name, values in row["rewards"].items()]
            caption.append(f"rank {row['ranks'][i]}, psi {row['scores'][i]:.2f}"
                           + {"chosen": "  chosen", "rejected": "  rejected"}.get(mark, "  chosen+rejected" if i in chosen else ""))
            row_tiles.append((file, caption, mark))
        tiles.append(row_tiles)
        titles.append(f"{row['index'] + 1}. {row['prompt']} ({len(pairs)} pair{'s' * (len(pairs) != 1)})")
    return tiles, titles


def write_pairs(out: Path, records: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "score_0", "score_1", "prompt_index"]
    columns += [c for c in ("caption_0", "caption_1") if records and c in records[0]]
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "caption": pa.string(), "prompt_index": pa.int64(),
             "caption_0": pa.string(), "caption_1": pa.string()}
    table = pa.table({c: pa.array([r[c] for r in records], type=types.get(c, pa.float64())) for c in columns})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return atomic_write_bytes(out / "pairs.parquet", buffer.getvalue())


def _check_run(out: Path, cfg: LabelConfig) -> None:
    """A resumed run must have the settings that made the rows already there."""
    run_file = out / "run.json"
    if run_file.exists():
        before = json.loads(run_file.read_text())
        changed = sorted(k for k in cfg.identity() if before.get(k) != cfg.identity()[k])
        if changed:
            raise DiffalignError(f"{out} holds a run made with other {', '.join(changed)}: resume with the same flags "
                                 "or choose a new --output-dir")
    else:
        atomic_write_text(run_file, json.dumps(cfg.identity(), indent=2))


def validate(cfg: LabelConfig) -> None:
    if cfg.num_images < 2:
        raise DiffalignError(f"--num-images {cfg.num_images}: a ranking needs at least 2 images a prompt")
    if cfg.batch_size < 1:
        raise DiffalignError("--batch-size must be at least 1")
    specs = parse_reward_specs(cfg.rewards)  # unknown names and bad weights fail before any model loads
    parse_dtype(cfg.dtype)
    if cfg.rank_by not in RANK_BY:
        raise DiffalignError(f"unknown --rank-by {cfg.rank_by!r}: choose one of {', '.join(RANK_BY)}")
    if cfg.pairs not in PAIRS:
        raise DiffalignError(f"unknown --pairs {cfg.pairs!r}: choose one of {', '.join(PAIRS)}")
    if cfg.rank_by == "weighted" and reward_weights(cfg) is None:
        raise DiffalignError(f"--rank-by weighted needs one weight per reward ({len(specs)}): write --reward NAME=WEIGHT,...")
    if cfg.margin < 0:
        raise DiffalignError("--margin must be >= 0")
    if cfg.captions not in (None, "caption", "perturb", "hybrid"):
        raise DiffalignError(f"unknown --captions {cfg.captions!r}: choose caption, perturb or hybrid")
    if cfg.num_frames is not None and cfg.num_frames < 1:
        raise DiffalignError(f"--num-frames {cfg.num_frames} must be at least 1 (Wan: 1 + 4k, e.g. 33)")
    if cfg.fps <= 0:
        raise DiffalignError(f"--fps {cfg.fps} must be positive")
    if cfg.num_frames is not None and cfg.captions:
        raise DiffalignError("--captions describes images: leave it out with --num-frames (videos)")
    if cfg.captions in ("caption", "hybrid") and not cfg.captioner:
        raise DiffalignError(f"--captions {cfg.captions} needs a captioning model: pass --captioner HUB_ID_OR_PATH")


def label(cfg: LabelConfig, pipe=None, processes=None) -> dict[str, Any]:
    """Run (or resume) a labelling job; returns the paths and the timing. `pipe` overrides cfg.model.

    `processes` (diffalign.processes, from `accelerate launch`): generation chunks are dealt to
    the processes in turn, each generates, scores and writes the rows of its own chunks, and
    the main process writes ranked.jsonl, pairs.parquet and stats.json from all the rows, the
    same files as one process (the chunks, and so the pixels, do not depend on who draws them)."""
    from tqdm.auto import tqdm

    from diffalign.processes import Processes

    procs = processes or Processes()
    validate(cfg)
    prompts = read_prompts(cfg.prompts)
    out = Path(cfg.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "rows").mkdir(exist_ok=True)
    _check_run(out, cfg)
    todo = [c for i, c in enumerate(chunks(len(prompts), cfg.num_images, cfg.batch_size))
            if procs.owns(i) and not all(_row_path(out, p).exists() for p in c)]
    timing = {"generate": 0.0, "reward": 0.0}
    made, wall = 0, 0.0
    device = cfg.device or (str(procs.device) if procs.device is not None else None)
    if todo:
        if pipe is None:
            pipe = load_pipeline(cfg.model, parse_dtype(cfg.dtype), device=default_device(device))
        rewards, weights = load_rewards(cfg.rewards, device), reward_weights(cfg)
        wall_start = time.perf_counter()
        with tqdm(total=sum(len(c) for c in todo), desc="label", unit="prompt", disable=not procs.main) as bar:
            for chunk in todo:
                made += label_chunk(pipe, rewards, prompts, chunk, cfg, out, timing, weights)
                bar.update(len(chunk))
        wall = time.perf_counter() - wall_start  # generation, scoring and writing rows; not model loading
    # Every process's count and timing; the processes ran at the same time, so the wall is the longest.
    parts = procs.gather((made, timing, wall))
    made = sum(m for m, _, _ in parts)
    timing = {key: sum(t[key] for _, t, _ in parts) for key in timing}
    wall = max(w for _, _, w in parts)
    busy = sum(w for _, _, w in parts)
    if not procs.main:
        return {"prompts_labelled": made, "main_process": False}
    rows = read_rows(out)
    ranked = write_ranked(out, rows)
    if cfg.num_frames is not None:  # videos: VideoAlign's CSV instead of Pick-a-Pic's parquet
        records = video_pair_rows(rows, cfg)
        pairs = write_video_pairs(out, records)
        write_video_sample_sheet(out, rows, cfg)
    else:
        records = pair_records(out, rows, cfg)
        if cfg.captions:
            from diffalign.captions import caption_pairs

            records = caption_pairs(records, cfg.captions, captioner=cfg.captioner, paraphraser=cfg.paraphraser,
                                    seed=cfg.seed, device=cfg.device, strength=cfg.perturb_strength,
                                    caption_prompt=cfg.caption_prompt)
        pairs = write_pairs(out, records)
        write_sample_sheet(out, rows, cfg)
    stats = {
        "prompts_labelled": made,
        "images": made * cfg.num_images,
        "processes": procs.world,
        "prompts_per_process": [m for m, _, _ in parts],
        "seconds_generate": timing["generate"],
        "seconds_reward": timing["reward"],
        "seconds_wall": wall,
        "images_per_second": made * cfg.num_images / wall if made else None,
        "reward_share": timing["reward"] / busy if made else None,
        "rows": len(rows),
        "num_pairs": len(records),
    }
    atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))
    return {"ranked": ranked, "pairs": pairs, **stats}


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="diffusers folder, hub id, or toy-sd / toy-flow")
    parser.add_argument("--prompts", required=True, help="'toy' or a .txt (one a line), .jsonl ({\"prompt\"}) or .json list")
    parser.add_argument("--num-images", type=int, default=4, help="K images a prompt (default 4)")
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="rewards, NAME[@PATH][=WEIGHT],... (weights count with --rank-by weighted)")
    parser.add_argument("--output-dir", required=True, help="output folder; rerun with the same flags to resume")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="images a pipeline call")
    parser.add_argument("--num-inference-steps", type=int, default=None,
                        help="sampler steps (default: the model folder's diffalign.json, else the pipeline's)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the model folder's diffalign.json, else the pipeline's)")
    parser.add_argument("--resolution", type=int, default=None, help="image height = width (default: the pipeline's)")
    parser.add_argument("--pairs", choices=PAIRS, default="best-worst")
    parser.add_argument("--margin", type=float, default=0.0, help="--pairs margin: minimum score gap of a pair")
    parser.add_argument("--rank-by", choices=RANK_BY, default="avg-rank")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="fp32", help="pipeline dtype: fp32 | fp16 | bf16")
    parser.add_argument("--captions", choices=("caption", "perturb", "hybrid"), default=None,
                        help="add DCPO dual captions (caption_0/caption_1) to the pairs")
    parser.add_argument("--captioner", default=None, help="image-to-text model (hub id or path) for caption/hybrid")
    parser.add_argument("--paraphraser", default=None, help="text2text model for perturb/hybrid (default: rule-based)")
    parser.add_argument("--caption-prompt", default=None, help="text prompt for chat-style captioners")
    parser.add_argument("--perturb-strength", choices=("weak", "medium", "strong"), default="medium",
                        help="rule-based perturbation: 1, 2 or 3 word edits")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="video pipelines: frames a video (Wan: 1 + 4k); writes mp4s and VideoAlign's pairs.csv")
    parser.add_argument("--fps", type=float, default=16.0, help="video pipelines: frame rate of the written mp4s")


def config_from_args(args: argparse.Namespace) -> LabelConfig:
    return LabelConfig(
        model=args.model, prompts=args.prompts, output_dir=args.output_dir,
        rewards=[str(spec) for spec in parse_reward_specs(args.reward)], num_images=args.num_images,
        seed=args.seed, batch_size=args.batch_size, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, resolution=args.resolution, pairs=args.pairs, margin=args.margin,
        rank_by=args.rank_by,
        device=args.device, dtype=args.dtype, captions=args.captions, captioner=args.captioner,
        paraphraser=args.paraphraser, caption_prompt=args.caption_prompt, perturb_strength=args.perturb_strength,
        num_frames=args.num_frames, fps=args.fps,
    )


def run(args: argparse.Namespace) -> int:
    from diffalign.processes import launched

    result = label(config_from_args(args), processes=launched())
    if not result.get("main_process", True):  # under accelerate launch the main process reports
        return 0
    rate = result["images_per_second"]
    speed = f", {rate:.2f} images/s, rewards {100 * result['reward_share']:.0f}% of the time" if rate else ""
    print(f"labelled {result['prompts_labelled']} new prompts ({result['rows']} in all{speed})")
    print(f"ranked lists: {result['ranked']}\npairs ({result['num_pairs']}): {result['pairs']}")
    return 0
