"""toy-reward and toy-judge: small CLIP models trained contrastively on the toy world.

Both are saved in the PickScore layout (a transformers `CLIPModel` + `CLIPProcessor` in one
folder), so `diffalign.rewards` loads them through the PickScore code:
score = logit_scale.exp() * cos(image_embed, text_embed).

Training: every step, a batch of rendered images is scored against *every* training prompt
(972 of them), and the loss is the cross-entropy of the true prompt (image -> text) plus the
usual CLIP text -> image term over the batch. The full prompt set contains every
one-attribute swap of each prompt that is a training combination, so the hard negatives
("two" vs "three", "left" vs "right") are always in the softmax. Held-out prompts are never
seen, so held-out accuracy measures generalisation to new attribute combinations.

toy-judge differs in width, depth, patch size, seed and render seeds, and is only ever used to
evaluate, so a win rate it reports is not the reward that labelled the data grading itself.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tools.toy import common
from tools.toy.render import ATTRIBUTES, IMAGE_SIZE, Scene, all_scenes, perturb, split_prompts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_LENGTH = 16


@dataclass
class ClipSpec:
    name: str
    seed: int
    render_seed_offset: int
    vision: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    projection_dim: int = 32
    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-3
    renders_per_scene: int = 48


REWARD_SPEC = ClipSpec(
    name="toy-reward", seed=0, render_seed_offset=common.SEEDS_REWARD,
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, patch_size=8),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    steps=1500, batch_size=128, renders_per_scene=16,
)
# Another architecture (fine patches, narrower and shallower), seed and set of renders.
JUDGE_SPEC = ClipSpec(
    name="toy-judge", seed=1, render_seed_offset=common.SEEDS_JUDGE,
    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=4),
    text=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2),
    projection_dim=24, steps=1000, batch_size=128, renders_per_scene=16,
)


def build_clip(spec: ClipSpec, vocab_size: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, projection_dim=spec.projection_dim, **spec.text)
    vision = dict(image_size=IMAGE_SIZE, projection_dim=spec.projection_dim, **spec.vision)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection_dim)
    torch.manual_seed(spec.seed)
    return CLIPModel(config)


def build_processor(tokenizer_dir: Path):
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    # The processor's size is the training resolution, so PickScore-style preprocessing
    # (shortest side resize + centre crop) is the identity on toy images.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir))


def save_processor(tokenizer_dir: Path, out_dir: Path) -> None:
    """Processor files, with the tokenizer as the slow-format vocab.json + merges.txt (1.5 MB)
    rather than the 3.6 MB tokenizer.json transformers would write: assets must stay small."""
    import shutil

    processor = build_processor(tokenizer_dir)
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)  # preprocessor_config.json, as PickScore ships
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).unlink(missing_ok=True)
    for path in Path(tokenizer_dir).iterdir():
        shutil.copy(path, out_dir / path.name)


def normalise(images01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, device=images01.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images01.device).view(3, 1, 1)
    return (images01 - mean) / std


# Spelled out rather than get_image_features: its return type changed across transformers 5.x.
def embed_images(model, images01: torch.Tensor) -> torch.Tensor:
    pooled = model.vision_model(pixel_values=normalise(images01)).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def embed_texts(model, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    pooled = model.text_model(**tokens).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


def train_clip(spec: ClipSpec, out_dir: Path, tokenizer_dir: Path, device: torch.device, log=print) -> dict:
    """Train one toy CLIP, save it (PickScore layout) to out_dir and return its metrics."""
    from transformers import CLIPTokenizer

    start = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    train_scenes, heldout_scenes = split_prompts()
    bank = common.render_bank(train_scenes, spec.renders_per_scene, spec.render_seed_offset).to(device)
    text_tokens = {k: v.to(device) for k, v in common.tokenize(tokenizer, [s.prompt for s in train_scenes], TEXT_LENGTH).items()}

    model = build_clip(spec, len(tokenizer)).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(spec.seed)
    num_scenes = len(train_scenes)
    for step in tqdm(range(spec.steps), desc=f"train {spec.name}", mininterval=5):
        scene_idx = torch.randperm(num_scenes, generator=gen)[: spec.batch_size]  # distinct prompts
        render_idx = torch.randint(0, spec.renders_per_scene, (len(scene_idx),), generator=gen)
        images = common.to_unit(bank[scene_idx.to(device), render_idx.to(device)])
        image_emb = embed_images(model, images)  # (B, D)
        text_emb = embed_texts(model, text_tokens)  # (S, D): every training prompt
        scale = model.logit_scale.exp()
        logits = scale * image_emb @ text_emb.T  # (B, S)
        target = scene_idx.to(device)
        loss_i2t = F.cross_entropy(logits, target)
        loss_t2i = F.cross_entropy(logits[:, target].T, torch.arange(len(target), device=device))
        loss = loss_i2t + 0.5 * loss_t2i
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 500 == 0 or step == spec.steps - 1:
            log(f"[{spec.name}] step {step} loss {loss.item():.3f} scale {scale.item():.1f}")

    model.eval()
    metrics = evaluate_clip(model, tokenizer, heldout_scenes, device)
    metrics["train_seconds"] = round(time.time() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    common.save_transformers_fp16(model.cpu(), out_dir)
    save_processor(tokenizer_dir, out_dir)
    log(f"[{spec.name}] saved to {out_dir}: {metrics}")
    return metrics


@torch.no_grad()
def score_matrix(model, tokenizer, images01: torch.Tensor, prompts: list[str], device) -> torch.Tensor:
    """PickScore-style scores (N images, P prompts)."""
    tokens = {k: v.to(device) for k, v in common.tokenize(tokenizer, prompts, TEXT_LENGTH).items()}
    return model.logit_scale.exp() * embed_images(model, images01.to(device)) @ embed_texts(model, tokens).T


@torch.no_grad()
def evaluate_clip(model, tokenizer, scenes: list[Scene], device, renders: int = 4) -> dict:
    """Held-out accuracies on rendered images (never-trained seeds and prompt combinations).

    - prompt_top1: the true prompt scores highest among all 1080 prompts.
    - prompt_pair_acc[attr]: the true prompt beats the same prompt with `attr` swapped.
    - image_pair_acc: for a prompt, its own render beats a render of a one-attribute swap.
    """
    rng = random.Random(0)
    everything = all_scenes()
    index = {s: i for i, s in enumerate(everything)}
    images = torch.stack([
        common.render_bank([s], renders, common.SEEDS_EVAL)[0] for s in scenes
    ]).flatten(0, 1)  # (N*R, 3, H, W) uint8
    owners = [s for s in scenes for _ in range(renders)]
    scores = score_matrix(model, tokenizer, common.to_unit(images), [s.prompt for s in everything], device).cpu()
    truth = torch.tensor([index[s] for s in owners])
    top1 = (scores.argmax(1) == truth).float().mean().item()

    pair_acc = {}
    for attribute in ATTRIBUTES:
        wins = [scores[i, truth[i]] > scores[i, index[perturb(s, rng, attribute)]] for i, s in enumerate(owners)]
        pair_acc[attribute] = round(float(torch.stack(wins).float().mean()), 4)

    # image vs image: the correct render against a render of a perturbed scene, same prompt
    negatives = [perturb(s, rng) for s in owners]
    neg_images = torch.stack([common.render_bank([n], 1, common.SEEDS_EVAL + 100 + i)[0, 0] for i, n in enumerate(negatives)])
    neg_scores = score_matrix(model, tokenizer, common.to_unit(neg_images), [s.prompt for s in everything], device).cpu()
    image_wins = neg_scores[torch.arange(len(owners)), truth] < scores[torch.arange(len(owners)), truth]
    return {
        "heldout_prompts": len(scenes),
        "images": len(owners),
        "prompt_top1": round(top1, 4),
        "prompt_pair_acc": pair_acc,
        "prompt_pair_acc_mean": round(sum(pair_acc.values()) / len(pair_acc), 4),
        "image_pair_acc": round(image_wins.float().mean().item(), 4),
    }
