"""toy-video: a tiny text-to-video model in the Wan 2.1 layout, trained on moving toy shapes.

`DiffusionPipeline.from_pretrained("assets/toy-video")` gives a diffusers `WanPipeline`:
- tokenizer: CLIP's BPE cut to the toy video words (601-token idea of tools/toy/vocab.py), a
  stand-in for UMT5's tokenizer as in diffalign.testing (there is no offline T5 tokenizer);
- text_encoder: a tiny `UMT5EncoderModel` (width 32, 2 layers) reading those ids;
- vae: a tiny `AutoencoderKLWan` (causal 3-D convolutions, base width 8, z 4): 32 px -> 16x16,
  9 frames -> 5 latent frames (scale_factor_spatial 2, scale_factor_temporal 2), latents_mean /
  latents_std measured on the training clips;
- transformer: a tiny `WanTransformer3DModel` (3 layers, 4 heads of 16, patch 1x2x2: 320 tokens);
- scheduler: `FlowMatchEulerDiscreteScheduler` (shift 1; the images are tiny).

Training is plain flow matching with the diffusers modules themselves: the VAE first (briefly,
L1 + MSE with shapes weighted up, tiny KL), then the text encoder and transformer jointly on the
VAE's latents of rendered videos (logit-normal sigmas, x_t = (1 - s) x0 + s noise, target
noise - x0; 10% of the prompts dropped to "" for classifier-free guidance).

WanPipeline pads every prompt's embedding to 512 positions with zeros. The padding positions are
identical keys and values in cross-attention, so training reads the first TEXT_LENGTH positions
plus ONE zero position whose attention logit is raised by log(512 - TEXT_LENGTH): the same
softmax as 512 positions, exactly (tested), at a third of the cost on a CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tools.toy import common
from tools.toy.render import IMAGE_SIZE
from tools.toy.video import NUM_FRAMES, all_video_scenes, split_video_prompts, video_bank

Z_DIM = 4
MAX_SEQUENCE_LENGTH = 512  # WanPipeline's default prompt length
TEXT_LENGTH = 16  # toy video prompts are at most 14 tokens with <|startoftext|> and <|endoftext|>
CFG_DROPOUT = 0.1
SEEDS_VIDEO = 3_000_000  # render seeds of the generator's videos (disjoint from the image builders')
STEPS = 20
GUIDANCE = 4.0


@dataclass
class VideoGeneratorSpec:
    seed: int = 0
    vae_steps: int = 250
    vae_batch_size: int = 6
    # a second VAE stage on 5-frame windows (the first frame alone, then one group of 4), from the
    # first stage's fp16-rounded weights: 250 steps alone left the colours grey
    vae_steps_2: int = 450
    vae_batch_size_2: int = 8
    vae_lr_2: float = 3e-3
    vae_stage_1: str | None = None  # a VAE folder holding stage 1 already (an earlier build's), to skip it
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1.5e-3
    renders_per_scene: int = 2


# ------------------------------------------------------------------------------ tokenizer


def video_texts() -> list[str]:
    return [s.prompt for s in all_video_scenes()] + [""]


def write_video_tokenizer(folder: Path) -> int:
    """CLIP's BPE cut to the merges toy video prompts use (as tools/toy/vocab.py does for
    the image world): every toy video prompt gets CLIP's own tokens, renumbered."""
    from diffalign.rewards.clip_tokenizer import clip_vocab_and_merges
    from tools.toy.vocab import SPECIALS, bpe_trace, words

    full_vocab, full_merges = clip_vocab_and_merges()
    ranks = {tuple(m.split()): i for i, m in enumerate(full_merges)}
    used = set()
    for text in video_texts():
        for word in words(text):
            used.update(bpe_trace(word, ranks))
    merges = [m for m in full_merges if tuple(m.split()) in used]
    tokens = [tok for tok, i in full_vocab.items() if i < 512] + ["".join(m.split()) for m in merges] + list(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_SEQUENCE_LENGTH, "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1], "unk_token": SPECIALS[1], "pad_token": SPECIALS[1], "do_lower_case": True,
    }, indent=2) + "\n")
    return len(tokens)


# ------------------------------------------------------------------------------ parts


def build_vae(latents_mean=None, latents_std=None):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=latents_mean or [0.0] * Z_DIM, latents_std=latents_std or [1.0] * Z_DIM,
        scale_factor_temporal=2, scale_factor_spatial=2,
    )


def build_parts(tokenizer_dir: Path, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import CLIPTokenizer, UMT5Config, UMT5EncoderModel

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=eos, eos_token_id=eos,
        decoder_start_token_id=0,
    ))
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=Z_DIM, out_channels=Z_DIM,
        text_dim=32, freq_dim=64, ffn_dim=128, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return tokenizer, text_encoder, transformer, scheduler


# ------------------------------------------------------------------------------ VAE


def to_clip(bank_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, F, 3, H, W) -> the VAE's (N, 3, F, H, W) in [-1, 1]."""
    return (bank_uint8.float() / 127.5 - 1).permute(0, 2, 1, 3, 4)


def vae_loss(vae, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE with the shapes weighted 5x (each clip's median colour is its background), tiny KL."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    kl = posterior.kl().mean() / recon[0, 0].numel()
    background = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    weight = 1 + 4 * ((x - background).abs().sum(1, keepdim=True) > 0.1).float()
    err = recon - x
    return (weight * (err.abs() + err**2)).mean() + 1e-4 * kl


def vae_stage(vae, batches, steps: int, lr: float, name: str, log) -> None:
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.05)
    for step in tqdm(range(steps), desc=f"train toy-video vae ({name})", mininterval=10):
        loss = vae_loss(vae, next(batches))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"[toy-video vae {name}] step {step} loss {loss.item():.4f}")


def train_vae(spec: VideoGeneratorSpec, log=print):
    """Two stages: whole 9-frame clips, then (from stage 1's fp16-rounded weights, what a save and
    reload gives) 5-frame windows at a higher rate: cheaper steps that cover both of the causal
    encoder's paths (a first frame alone, a group of 4)."""
    from diffusers import AutoencoderKLWan

    start = time.time()
    torch.manual_seed(spec.seed)
    train_scenes, _ = split_video_prompts()
    bank = video_bank(train_scenes, 1, SEEDS_VIDEO + 500_000)[:, 0]  # (N, F, 3, H, W)
    gen = torch.Generator().manual_seed(spec.seed)

    def clips(batch_size: int, frames: int | None = None):
        while True:
            x = bank[torch.randint(0, len(bank), (batch_size,), generator=gen)]
            if frames is not None:
                first = int(torch.randint(0, x.shape[1] - frames + 1, (1,), generator=gen))
                x = x[:, first : first + frames]
            yield to_clip(x)

    if spec.vae_stage_1 is None:
        vae = build_vae()
        with torch.no_grad():  # start nearly deterministic (log-variance -8), as tools/toy/generators.train_vae
            vae.quant_conv.weight[Z_DIM:] = 0
            vae.quant_conv.bias[Z_DIM:] = -8.0
        vae.train()
        vae_stage(vae, clips(spec.vae_batch_size), spec.vae_steps, 2e-3, "stage 1", log)
        with torch.no_grad():
            for p in vae.parameters():
                p.copy_(p.half().float())
    else:
        vae = AutoencoderKLWan.from_pretrained(spec.vae_stage_1, torch_dtype=torch.float32).train()
    gen.manual_seed(spec.seed + 1)
    vae_stage(vae, clips(spec.vae_batch_size_2, 5), spec.vae_steps_2, spec.vae_lr_2, "stage 2", log)
    vae.eval()
    with torch.no_grad():
        x = to_clip(bank[:64])
        mean = vae.encode(x).latent_dist.mean
        recon_mse = F.mse_loss(vae.decode(mean).sample.clamp(-1, 1), x).item()
    return vae, {"vae_recon_mse": round(recon_mse, 5), "vae_seconds": round(time.time() - start, 1)}


@torch.no_grad()
def encode_clips(vae, bank: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every clip, unnormalised: (N, Z, F', h, w) each."""
    means, stds = [], []
    for part in bank.split(chunk):
        dist = vae.encode(to_clip(part)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ------------------------------------------------------------------------------ transformer


class PaddedTextAttention:
    """Cross-attention processor for training: context = TEXT_LENGTH positions + one zero
    position standing for the other (512 - TEXT_LENGTH) zero positions WanPipeline appends, by
    adding log(count) to that position's attention logit. Same result as the full 512."""

    def __init__(self, processor, count: int):
        self.processor = processor
        self.count = count

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        length = encoder_hidden_states.shape[1]
        bias = torch.zeros(1, 1, 1, length, dtype=hidden_states.dtype, device=hidden_states.device)
        bias[..., -1] = math.log(self.count)
        return self.processor(attn, hidden_states, encoder_hidden_states, bias, rotary_emb)


def use_padded_text_attention(transformer, count: int) -> list:
    """Swap every cross-attention processor; returns the originals for `restore_processors`."""
    originals = []
    for block in transformer.blocks:
        originals.append(block.attn2.processor)
        block.attn2.set_processor(PaddedTextAttention(block.attn2.processor, count))
    return originals


def restore_processors(transformer, originals: list) -> None:
    for block, processor in zip(transformer.blocks, originals):
        block.attn2.set_processor(processor)


def short_prompt_embeds(pipe, prompts: list[str]) -> torch.Tensor:
    """WanPipeline's own prompt embedding at TEXT_LENGTH positions, plus the one zero position."""
    embeds = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=TEXT_LENGTH, device=torch.device("cpu"))
    return torch.cat([embeds, embeds.new_zeros(embeds.shape[0], 1, embeds.shape[2])], dim=1)


def flow_matching_loss(pipe, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    context = short_prompt_embeds(pipe, prompts)
    sigma = torch.sigmoid(torch.randn(len(x0), generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1, 1)
    pred = pipe.transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000,
                            encoder_hidden_states=context).sample
    return F.mse_loss(pred, noise - x0)


def train_toy_video(out_dir: Path, work: Path, spec: VideoGeneratorSpec, log=print) -> dict:
    """Build assets/toy-video (CPU)."""
    from diffusers import WanPipeline

    start = time.time()
    tokenizer_dir = work / "video-tokenizer"
    vocab_size = write_video_tokenizer(tokenizer_dir)
    vae, metrics = train_vae(spec, log)
    train_scenes, _ = split_video_prompts()
    bank = video_bank(train_scenes, spec.renders_per_scene, SEEDS_VIDEO)  # (S, R, F, 3, H, W)
    owners = [s.prompt for s in train_scenes for _ in range(spec.renders_per_scene)]
    mean, std = encode_clips(vae, bank.flatten(0, 1))
    channel_mean = mean.transpose(0, 1).flatten(1).mean(1)
    channel_std = mean.transpose(0, 1).flatten(1).std(1)
    vae.register_to_config(latents_mean=[round(v, 5) for v in channel_mean.tolist()],
                           latents_std=[round(v, 5) for v in channel_std.tolist()])
    shape = (1, Z_DIM, 1, 1, 1)
    mean = (mean - channel_mean.view(shape)) / channel_std.view(shape)
    std = std / channel_std.view(shape)
    metrics["encode_seconds"] = round(time.time() - start, 1)

    tokenizer, text_encoder, transformer, scheduler = build_parts(tokenizer_dir, spec.seed + 20)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.requires_grad_(False),
                       transformer=transformer, scheduler=scheduler)
    originals = use_padded_text_attention(transformer, MAX_SEQUENCE_LENGTH - TEXT_LENGTH)
    text_encoder.train()
    transformer.train()
    params = list(text_encoder.parameters()) + list(transformer.parameters())
    optimiser = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(spec.seed + 21)
    losses = []
    for step in tqdm(range(spec.steps), desc="train toy-video", mininterval=10):
        idx = torch.randint(0, len(owners), (spec.batch_size,), generator=gen)
        drop = torch.rand(spec.batch_size, generator=gen) < CFG_DROPOUT
        prompts = ["" if d else owners[i] for i, d in zip(idx.tolist(), drop.tolist())]
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        loss = flow_matching_loss(pipe, x0, prompts, gen)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == spec.steps - 1:
            log(f"[toy-video] step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    restore_processors(transformer, originals)
    text_encoder.eval()
    transformer.eval()
    save_video_pipeline(pipe, out_dir, tokenizer_dir)
    metrics.update({"final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4), "vocab_size": vocab_size,
                    "transformer_params": sum(p.numel() for p in transformer.parameters()),
                    "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
                    "vae_params": sum(p.numel() for p in vae.parameters()),
                    "train_seconds": round(time.time() - start, 1)})
    log(f"[toy-video] saved to {out_dir}: {metrics}")
    return metrics


def save_video_pipeline(pipe, out_dir: Path, tokenizer_dir: Path) -> None:
    """fp16 weights that load as fp32 (tools/toy/common.py), the toy tokenizer, the sampling defaults."""
    pipe.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    pipe.to(torch.float32)
    common.save_transformers_fp16(pipe.text_encoder, out_dir / "text_encoder")
    shutil.rmtree(out_dir / "tokenizer")
    shutil.copytree(tokenizer_dir, out_dir / "tokenizer")
    defaults = {"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
                "num_frames": NUM_FRAMES}  # sampled at its own size, not Wan's 480 x 832 x 81
    (out_dir / "diffalign.json").write_text(json.dumps(defaults) + "\n")


def load_video_pipeline(folder: Path, device: torch.device | str = "cpu"):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_videos(pipe, prompts: list[str], seeds: list[int], steps: int = STEPS, guidance: float = GUIDANCE,
                  batch_size: int = 32, num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """(N, F, 3, H, W) in [0, 1] from WanPipeline's own __call__; video i uses seeds[i]."""
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sample toy-video", mininterval=10):
        batch = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
        frames = pipe(prompt=batch, negative_prompt=[""] * len(batch), generator=gens, height=32, width=32,
                      num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance, output_type="pt").frames
        out.append(frames.float().cpu())
    return torch.cat(out)
