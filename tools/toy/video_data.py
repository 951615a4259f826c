"""Toy video preference data in VideoAlign's CSV schema, from the toy video generator.

For `num_prompts` training prompts (evenly spread over the 1944, so every attribute value
occurs), `candidates` videos each from assets/toy-video (WanPipeline's own __call__, 20 steps,
guidance 4, seed SEED_BASE + 16 * prompt_index + k), written as mp4 and scored from the files by
toy-video-reward (the judge never labels). The pair is the best against the worst by Overall;
A/B order is drawn per prompt (seeded), so the winner is not always A. Each dimension's label is
the video that scores higher on it, or "same" within SAME_TOLERANCE.

Written to assets/toy-data/toy-video/:
- pairs.csv: path_A, path_B, prompt, VQ, MQ, TA ({A, B, same}), fps_A, num_frames_A, fps_B,
  num_frames_B, plus reward_A / reward_B (toy-video-reward Overall); mp4 paths relative to it;
- videos/: the mp4s of the pairs (only those);
- prompts_train.txt / prompts_heldout.txt: the split of tools/toy/video.py; prompts_eval.txt:
  an evenly spread quarter of the held-out prompts, what the quickstart evaluates on;
- stats.json: settings, label counts, how often toy-video-judge agrees, the base model's scores.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tools.toy.video import FPS, NUM_FRAMES, split_video_prompts, write_mp4
from tools.toy.video_generator import GUIDANCE, STEPS, load_video_pipeline, sample_videos

SEED_BASE = 8_000_000
SAME_TOLERANCE = 0.1
DIMENSIONS = ("VQ", "MQ", "TA")
COLUMNS = ("path_A", "path_B", "prompt", "VQ", "MQ", "TA", "fps_A", "num_frames_A", "fps_B", "num_frames_B",
           "reward_A", "reward_B")


@dataclass
class VideoDataSpec:
    num_prompts: int = 160
    candidates: int = 4
    heldout_prompts: int = 48  # base-model scores, on prompts_eval.txt
    seed: int = 0


def video_seed(prompt_index: int, k: int) -> int:
    return SEED_BASE + 16 * prompt_index + k


def to_uint8(video01: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> uint8 (F, H, W, 3)."""
    return (video01.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def label(a: float, b: float) -> str:
    return "same" if abs(a - b) < SAME_TOLERANCE else ("A" if a > b else "B")


def write_prompt_lists(out: Path) -> list[str]:
    train, heldout = split_video_prompts()
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts_train.txt").write_text("".join(s.prompt + "\n" for s in train))
    (out / "prompts_heldout.txt").write_text("".join(s.prompt + "\n" for s in heldout))
    evaluation = [s.prompt for s in heldout[::4]]
    (out / "prompts_eval.txt").write_text("".join(p + "\n" for p in evaluation))
    return evaluation


@torch.no_grad()
def build_video_data(model_dir: Path, out: Path, spec: VideoDataSpec, log=print) -> dict:
    from diffalign.rewards import load_reward

    start = time.time()
    evaluation = write_prompt_lists(out)
    pipe = load_video_pipeline(model_dir)
    reward, judge = load_reward("toy-video-reward"), load_reward("toy-video-judge")
    train, _ = split_video_prompts()
    step = max(1, len(train) // spec.num_prompts)
    scenes = train[::step][: spec.num_prompts]
    C = spec.candidates
    prompts = [s.prompt for s in scenes for _ in range(C)]
    seeds = [video_seed(p, k) for p in range(len(scenes)) for k in range(C)]
    videos = sample_videos(pipe, prompts, seeds)  # (P*C, F, 3, H, W)

    work = out / "candidates"
    files = [write_mp4(to_uint8(v), work / f"p{i // C:04d}_k{i % C}.mp4", FPS) for i, v in enumerate(videos)]
    r = reward.score_dimensions([str(f) for f in files], prompts)
    j = judge.score_dimensions([str(f) for f in files], prompts)
    overall = r["Overall"].view(-1, C)

    videos_dir = out / "videos"
    if videos_dir.exists():
        for old in videos_dir.glob("*.mp4"):
            old.unlink()
    videos_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    rows, judge_agrees, majority_agrees = [], 0, 0
    counts = {dim: {"A": 0, "B": 0, "same": 0} for dim in DIMENSIONS}
    for p, scene in enumerate(scenes):
        best, worst = int(overall[p].argmax()), int(overall[p].argmin())
        a, b = (best, worst) if rng.random() < 0.5 else (worst, best)
        ia, ib = p * C + a, p * C + b
        row = {"prompt": scene.prompt}
        for side, i in (("A", ia), ("B", ib)):
            name = f"p{p:04d}_{side}.mp4"
            files[i].replace(videos_dir / name)
            row[f"path_{side}"] = f"videos/{name}"
            row[f"fps_{side}"], row[f"num_frames_{side}"] = FPS, NUM_FRAMES
            row[f"reward_{side}"] = round(float(r["Overall"][i]), 4)
        for dim in DIMENSIONS:
            row[dim] = label(float(r[dim][ia]), float(r[dim][ib]))
            counts[dim][row[dim]] += 1
        winner = "A" if a == best else "B"
        judge_agrees += (float(j["Overall"][ia]) > float(j["Overall"][ib])) == (winner == "A")
        votes = [row[d] for d in DIMENSIONS]
        majority_agrees += votes.count(winner) > votes.count("B" if winner == "A" else "A")
        rows.append(row)
    for leftover in work.glob("*.mp4"):
        leftover.unlink()
    work.rmdir()
    with (out / "pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    held = [p for p in evaluation[: spec.heldout_prompts]]
    held_videos = sample_videos(pipe, held, [video_seed(100_000 + i, 0) for i in range(len(held))])
    held_judge = judge.score_dimensions(held_videos, held, exact=True)
    from tools.toy.video import parse_video_prompt, video_tensor

    renders = torch.stack([video_tensor(parse_video_prompt(p), 0) for p in held])
    render_judge = judge.score_dimensions(renders, held, exact=True)
    stats = {
        "model": model_dir.name,
        "num_pairs": len(rows),
        "candidates_per_prompt": C,
        "sampling": {"steps": STEPS, "guidance_scale": GUIDANCE, "num_frames": NUM_FRAMES, "fps": FPS,
                     "seed": f"{SEED_BASE} + 16 * prompt_index + k"},
        "labels": counts,
        "same_tolerance": SAME_TOLERANCE,
        "judge_agrees_on_pairs": round(judge_agrees / len(rows), 4),
        "majority_of_dimensions_agrees_with_overall": round(majority_agrees / len(rows), 4),
        "reward_margin_best_minus_worst": round(float((overall.max(1).values - overall.min(1).values).mean()), 3),
        "reward_candidates_mean": {d: round(float(v.mean()), 3) for d, v in r.items()},
        "judge_candidates_mean": {d: round(float(v.mean()), 3) for d, v in j.items()},
        "judge_heldout_base_mean": {d: round(float(v.mean()), 3) for d, v in held_judge.items()},
        "judge_heldout_renders_mean": {d: round(float(v.mean()), 3) for d, v in render_judge.items()},
        "base_heldout_moves_the_named_way": round(float((held_judge["TA"] > 0).float().mean()), 4),
        "seconds": round(time.time() - start, 1),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"[toy-video data] {stats}")
    return stats
