"""Toy preference data, made the way RankDPO's Syn-Pic is made: sample K images per training
prompt from a toy base model (fixed seeds), score them with toy-reward, rank them.

Written for each base model under assets/toy-data/<model>/:
- ranked.parquet: caption, jpg_0..jpg_{K-1} (PNG bytes, best first), label_0..label_{K-1}
  (toy-reward scores, descending): the Pick-a-Pic schema widened to K images, which
  diffalign.data reads with image_columns/label_columns set to all K.
- pairs.parquet: the Pick-a-Pic v2 schema (caption, jpg_0, jpg_1, label_0, label_1): best vs
  worst of each list, label_0 = 1 (the winner is always jpg_0), plus Pick-Double Caption's
  caption_0/caption_1 for DCPO (one file, so the images are stored once), made as DCPO-p makes
  them: the winner keeps the prompt, the loser gets the prompt perturbed (`loser_caption`).
  toy-sd: one word changed by diffalign.captions' rules (`diffalign captions --strategy perturb
  --perturb-strength weak`, seed 0). toy-flow: the prompt reworded, the toy stand-in for DCPO-p's
  paraphrasing model (tools.toy.render.paraphrase), which wins more there than the one-word
  change. Captions that describe the loser instead cost DCPO its gain in the toy world, where
  every description is itself a prompt to follow (docs/benchmarks.md, "What did not work").
- stats.json: settings, sizes, toy-reward/toy-judge agreement and base-model accuracy.
"""

from __future__ import annotations

import io
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffalign.captions import perturb_text
from tools.toy import clip_reward
from tools.toy.render import ATTRIBUTES, VALUES, Scene, all_scenes, paraphrase, parse_prompt, split_prompts

K = 4
HELDOUT_IMAGES = 2  # per held-out prompt, for the base model's prompt-following numbers
STEPS = 20
GUIDANCE = 4.0
SEED_BASE = 7_000_000


def loser_caption(prompt: str, strategy: str, seed: int = 0) -> str:
    """DCPO-p's loser caption for a toy prompt: 'perturb' (the caption rules' one-word change) or
    'paraphrase' (another word order of the same scene, drawn from a stream seeded by the prompt)."""
    if strategy == "paraphrase":
        return paraphrase(parse_prompt(prompt), random.Random(f"{seed}:{prompt}"))
    if strategy == "perturb":
        return perturb_text(prompt, "weak", seed=seed)
    raise ValueError(f"unknown loser caption strategy {strategy!r}: use 'perturb' or 'paraphrase'")


def image_seed(prompt_index: int, k: int) -> int:
    """Image k of prompt p always gets the same seed, whatever the batching."""
    return SEED_BASE + prompt_index * 16 + k


def load_clip(folder: Path, device: torch.device):
    from transformers import CLIPModel, CLIPTokenizer

    return CLIPModel.from_pretrained(folder).to(device).eval(), CLIPTokenizer.from_pretrained(folder)


def load_toy_pipeline(folder: Path, device: torch.device):
    """Either toy pipeline; SD3 without T5 needs its null encoder named (diffusers' own rule)."""
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    nulls = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
    pipe = DiffusionPipeline.from_pretrained(folder, **nulls).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE,
             batch_size: int = 256, desc: str = "sample") -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]; image i uses torch.Generator().manual_seed(seeds[i])."""
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, mininterval=5):
        batch = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
        images = pipe(prompt=batch, generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images
        out.append(images.float().cpu())
    return torch.cat(out)


def png_bytes(image01: torch.Tensor) -> bytes:
    from PIL import Image

    array = (image01.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@torch.no_grad()
def prompt_following(judge, tokenizer, images01: torch.Tensor, scenes: list[Scene], device) -> dict:
    """How often images show their prompt, by a CLIP judge: top-1 among all 1080 prompts, and
    per attribute the share where the true prompt beats every edit of that attribute."""
    everything = all_scenes()
    index = {s: i for i, s in enumerate(everything)}
    scores = torch.cat([
        clip_reward.score_matrix(judge, tokenizer, chunk, [s.prompt for s in everything], device).cpu()
        for chunk in images01.split(512)
    ])
    truth = torch.tensor([index[s] for s in scenes])
    result = {"prompt_top1": round((scores.argmax(1) == truth).float().mean().item(), 4)}
    for attribute in ATTRIBUTES:
        correct = []
        for i, scene in enumerate(scenes):
            rivals = [index[replace(scene, **{attribute: v})] for v in VALUES[attribute] if v != getattr(scene, attribute)]
            correct.append(bool(scores[i, truth[i]] > scores[i, rivals].max()))
        result[attribute] = round(sum(correct) / len(correct), 4)
    return result


def pairwise_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of within-row image pairs that two scorers order the same way; (P, K) each."""
    agree, total = 0, 0
    for i in range(a.shape[1]):
        for j in range(i + 1, a.shape[1]):
            agree += ((a[:, i] - a[:, j]) * (b[:, i] - b[:, j]) > 0).sum().item()
            total += a.shape[0]
    return agree / total


def write_parquet(path: Path, columns: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, compression="zstd")


def ranked_subset(candidates: int, k: int = K) -> list[int]:
    """Which ranks of `candidates` sorted samples the K-list keeps: best, worst, evenly spread
    between. With candidates == K that is every sample (plain Syn-Pic)."""
    if candidates < k:
        raise ValueError(f"candidates ({candidates}) must be at least K ({k})")
    return [round(i * (candidates - 1) / (k - 1)) for i in range(k)]


def build_preference_data(model_dir: Path, reward_dir: Path, judge_dir: Path, out_dir: Path, device: torch.device,
                          num_prompts: int | None = None, heldout_prompts: int | None = None,
                          candidates: int = K, loser_captions: str = "perturb", log=print) -> dict:
    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_toy_pipeline(model_dir, device)
    reward, reward_tok = load_clip(reward_dir, device)
    judge, judge_tok = load_clip(judge_dir, device)
    train_scenes, heldout_scenes = split_prompts()
    heldout_scenes = heldout_scenes[:heldout_prompts]
    # an evenly spread subset keeps every attribute value in the data
    num_prompts = num_prompts or len(train_scenes)
    step = max(1, len(train_scenes) // num_prompts)
    scenes = train_scenes[::step][:num_prompts]
    C = candidates
    prompts = [s.prompt for s in scenes for _ in range(C)]
    seeds = [image_seed(p, k) for p in range(len(scenes)) for k in range(C)]
    samples = generate(pipe, prompts, seeds, desc=f"sample {model_dir.name}")  # (P*C, 3, H, W)

    def own_prompt_scores(model, tok):
        return torch.cat([
            clip_reward.score_matrix(model, tok, samples[i : i + C], [scenes[i // C].prompt], device)[:, 0].cpu()
            for i in range(0, len(samples), C)
        ]).view(len(scenes), C)

    all_reward = own_prompt_scores(reward, reward_tok)  # (P, C)
    all_judge = own_prompt_scores(judge, judge_tok)
    # keep K of the C samples, best first: (P, K) indices into each prompt's C samples
    keep = all_reward.argsort(dim=1, descending=True)[:, ranked_subset(C)]
    reward_scores, judge_scores = all_reward.gather(1, keep), all_judge.gather(1, keep)
    images = samples.view(len(scenes), C, *samples.shape[1:])[torch.arange(len(scenes))[:, None], keep]  # (P, K, ...)

    ranked = {"caption": [s.prompt for s in scenes]}
    for k in range(K):
        ranked[f"jpg_{k}"] = [png_bytes(images[p, k]) for p in range(len(scenes))]
    for k in range(K):
        ranked[f"label_{k}"] = [float(reward_scores[p, k]) for p in range(len(scenes))]
    write_parquet(out_dir / "ranked.parquet", ranked)

    # Pick-a-Pic v2 pairs (best against worst), with DCPO's per-image captions alongside as in
    # Pick-Double Caption: DPO, MaPO and SFT read the prompt, DCPO caption_0/caption_1.
    write_parquet(out_dir / "pairs.parquet", {
        "caption": ranked["caption"], "jpg_0": ranked["jpg_0"], "jpg_1": ranked[f"jpg_{K - 1}"],
        "label_0": [1.0] * len(scenes), "label_1": [0.0] * len(scenes),
        "caption_0": ranked["caption"],
        "caption_1": [loser_caption(prompt, loser_captions) for prompt in ranked["caption"]],
    })

    # how good is the base model, judged independently, on held-out prompts
    heldout_text = [s.prompt for s in heldout_scenes for _ in range(HELDOUT_IMAGES)]
    heldout_seeds = [image_seed(100_000 + p, k) for p in range(len(heldout_scenes)) for k in range(HELDOUT_IMAGES)]
    heldout_images = generate(pipe, heldout_text, heldout_seeds, desc="sample held-out")
    heldout_owner = [s for s in heldout_scenes for _ in range(HELDOUT_IMAGES)]
    stats = {
        "model": model_dir.name,
        "num_prompts": len(scenes),
        "images_per_prompt": K,
        "candidates_per_prompt": C,
        "num_pairs": len(scenes),
        "loser_captions": loser_captions,  # caption_1 in pairs.parquet: loser_caption's strategy
        "sampling": {"steps": STEPS, "guidance_scale": GUIDANCE, "seed": f"{SEED_BASE} + 16 * prompt_index + k"},
        "judge_agrees_on_pairs": round((judge_scores[:, 0] > judge_scores[:, K - 1]).float().mean().item(), 4),
        "judge_reward_pairwise_agreement": round(pairwise_agreement(all_reward, all_judge), 4),
        "reward_margin_best_minus_worst": round((reward_scores[:, 0] - reward_scores[:, K - 1]).mean().item(), 3),
        "base_model_heldout_following_by_judge": prompt_following(judge, judge_tok, heldout_images, heldout_owner, device),
        "base_model_train_following_by_judge": prompt_following(judge, judge_tok, samples, [s for s in scenes for _ in range(C)], device),
        "seconds": round(time.time() - start, 1),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"[toy-data/{model_dir.name}] {stats}")
    return stats


def write_prompt_lists(out_dir: Path) -> None:
    train, heldout = split_prompts()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prompts_train.txt").write_text("".join(s.prompt + "\n" for s in train))
    (out_dir / "prompts_heldout.txt").write_text("".join(s.prompt + "\n" for s in heldout))
