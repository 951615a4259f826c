"""toy-sd and toy-flow: tiny text-to-image models trained on rendered toy scenes.

Both are real diffusers pipelines (`DiffusionPipeline.from_pretrained("assets/toy-sd")`):
- toy-sd: StableDiffusionPipeline. CLIPTextModel + AutoencoderKL (32 px -> 4x16x16 latents)
  + UNet2DConditionModel (cross-attention to the prompt at 16x16, one head, and at 8x8),
  epsilon prediction, DDPM training, DDIM sampling (20 steps).
- toy-flow: StableDiffusion3Pipeline. Two CLIPTextModelWithProjection + the same VAE +
  SD3Transformer2DModel, rectified-flow training, FlowMatchEulerDiscreteScheduler.

The text encoders are trained jointly with the denoiser (there is no pretrained CLIP for the
toy world), 10% of the prompts are dropped to "" so classifier-free guidance works. The models
are trained briefly (CPU time was the budget), so they follow prompts only in part (docs/toy.md
has the numbers), which leaves room for preference alignment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tools.toy import common
from tools.toy.render import IMAGE_SIZE, split_prompts

LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 2  # two VAE blocks: one 2x downsampling
CFG_DROPOUT = 0.1


@dataclass
class GeneratorSpec:
    seed: int = 0
    vae_steps: int = 1000
    steps: int = 900
    sd_cycles: int = 2
    flow_steps: int = 700
    batch_size: int = 32
    lr: float = 1e-3
    renders_per_scene: int = 8


def clipped_step(loss: torch.Tensor, params: list, optimiser, schedule) -> None:
    """One optimiser step for the generators: gradients clipped to norm 1, then the LR schedule."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()
    schedule.step()


def log_every(step: int, total: int) -> bool:
    return step % 500 == 0 or step == total - 1


# ---------------------------------------------------------------------------------- VAE


def build_vae(shift_factor: float | None = None, scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
        use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    )


def train_vae(out_dir: Path, spec: GeneratorSpec, device: torch.device, log=print) -> dict:
    """Train the shared autoencoder briefly (L1 + MSE, tiny KL) and save it to out_dir with
    its latent statistics: scaling_factor = 1/std (SD convention), shift_factor = mean (SD3)."""
    start = time.time()
    torch.manual_seed(spec.seed)
    train_scenes, _ = split_prompts()
    bank = common.render_bank(train_scenes, 8, common.SEEDS_GENERATOR + 500_000).flatten(0, 1).to(device)
    vae = build_vae()
    # Start the posterior nearly deterministic (log-variance -8): with the default std of 1 the
    # decoder sees mostly noise and a short run learns no colours at all.
    with torch.no_grad():
        vae.encoder.conv_out.weight[LATENT_CHANNELS:] = 0
        vae.encoder.conv_out.bias[LATENT_CHANNELS:] = -8.0
    vae = vae.to(device).train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=spec.vae_steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(spec.seed)
    for step in tqdm(range(spec.vae_steps), desc="train vae", mininterval=5):
        idx = torch.randint(0, len(bank), (spec.batch_size,), generator=gen).to(device)
        x = common.to_unit(bank[idx]) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / (LATENT_CHANNELS * LATENT_SIZE**2)
        # Shapes cover a few percent of the pixels: weight them 5x so their outlines come out
        # sharp; the background is each image's median colour.
        background = x.flatten(2).median(dim=2).values[:, :, None, None]
        weight = 1 + 4 * ((x - background).abs().sum(1, keepdim=True) > 0.1).float()
        err = recon - x
        loss = (weight * (err.abs() + err**2)).mean() + 1e-4 * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0 or step == spec.vae_steps - 1:
            log(f"[vae] step {step} loss {loss.item():.4f} kl {kl.item():.2f}")
    vae.eval()
    with torch.no_grad():
        x = common.to_unit(bank[:1024]) * 2 - 1
        latents = vae.encode(x).latent_dist.mean
        recon_mse = F.mse_loss(vae.decode(latents).sample.clamp(-1, 1), x).item()
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5), shift_factor=round(latents.mean().item(), 5))
    out_dir.mkdir(parents=True, exist_ok=True)
    common.save_diffusers_fp16(vae.cpu(), out_dir)
    metrics = {"recon_mse": round(recon_mse, 5), "train_seconds": round(time.time() - start, 1),
               "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor}
    log(f"[vae] saved to {out_dir}: {metrics}")
    return metrics


def load_vae(vae_dir: Path, device: torch.device, keep_shift: bool):
    """The trained VAE; SD-style pipelines get shift_factor None (they do not apply one)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).to(device)
    if not keep_shift:
        vae.register_to_config(shift_factor=None)
    return vae.requires_grad_(False).eval()


@torch.no_grad()
def encode_bank(vae, bank: torch.Tensor, device: torch.device, shift: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image in a (N, 3, H, W) uint8 bank, already shifted and
    scaled as the pipeline expects; training samples latents = mean + std * noise."""
    means, stds = [], []
    for chunk in bank.split(1024):
        dist = vae.encode(common.to_unit(chunk.to(device)) * 2 - 1).latent_dist
        means.append((dist.mean - shift) * scale)
        stds.append(dist.std * scale)
    return torch.cat(means), torch.cat(stds)


def generator_batches(spec: GeneratorSpec, vae, device: torch.device, shift: float, seed_offset: int = 0):
    """Yields (latents, prompts) batches forever, over train scenes x seeded renders."""
    train_scenes, _ = split_prompts()
    bank = common.render_bank(train_scenes, spec.renders_per_scene, common.SEEDS_GENERATOR)
    owners = [s.prompt for s in train_scenes for _ in range(spec.renders_per_scene)]
    mean, std = encode_bank(vae, bank.flatten(0, 1), device, shift, vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(spec.seed + 1000 * seed_offset)
    while True:
        idx = torch.randint(0, len(owners), (spec.batch_size,), generator=gen)
        drop = torch.rand(spec.batch_size, generator=gen) < CFG_DROPOUT
        prompts = ["" if d else owners[i] for i, d in zip(idx.tolist(), drop.tolist())]
        idx = idx.to(device)
        noise = torch.randn(mean[idx].shape, generator=gen).to(device)
        yield mean[idx] + std[idx] * noise, prompts


# ---------------------------------------------------------------------------------- toy-sd


# toy-sd's prompt: toy prompts are at most 14 tokens, so padding to 16 instead of CLIP's 77 pays
# for most of the cross-attention at 16x16.
SD_TEXT_LENGTH = 16
# The UNet's initial weights come from their own seeded stream (GeneratorSpec.seed + 7).
SD_UNET_SEED_OFFSET = 7
# Attention heads at 16x16 (diffusers' legacy `attention_head_dim` counts heads) and at 8x8. One
# head of 32 channels runs CPU attention over the 256 positions at 16x16 about 8x faster than
# eight heads of 4 (flash SDPA, forward + backward) and changes no parameter shape.
SD_HEADS = (1, 8)


def build_sd_parts(tokenizer_dir: Path, seed: int):
    """toy-sd's untrained parts: the UNet reads the prompt at 16x16 as well as at 8x8, since
    reading it at 8x8 only left DPO short of the toy bar (docs/benchmarks.md, "What did not work")."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=SD_TEXT_LENGTH)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    torch.manual_seed(seed + SD_UNET_SEED_OFFSET)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=SD_HEADS, norm_num_groups=16,
    )
    # DDPM's linear betas end close to zero SNR at t=T: flat-colour toy images would otherwise
    # leak their mean colour into the "pure noise" start (SD's scaled_linear keeps ~7% signal).
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return tokenizer, text_encoder, unet, scheduler


def train_toy_sd(out_dir: Path, vae_dir: Path, tokenizer_dir: Path, spec: GeneratorSpec, device: torch.device,
                 log=print) -> dict:
    """`spec.sd_cycles` warm-restarted cycles of `spec.steps` steps. Each cycle starts from the
    previous one's fp16-rounded weights (what a save and reload between cycles would give) and
    draws its own seeded batches."""
    from diffusers import StableDiffusionPipeline

    start = time.time()
    vae = load_vae(vae_dir, device, keep_shift=False)
    tokenizer, text_encoder, unet, scheduler = build_sd_parts(tokenizer_dir, spec.seed)
    text_encoder.to(device).train()
    unet.to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    alphas = scheduler.alphas_cumprod.to(device)
    for cycle in range(spec.sd_cycles):
        if cycle > 0:
            with torch.no_grad():  # what a save and reload between cycles would do
                for p in params:
                    p.copy_(p.half().float())
        optimiser = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05)
        batches = generator_batches(spec, vae, device, shift=0.0, seed_offset=cycle)
        gen = torch.Generator().manual_seed(spec.seed + 1 + 100 * cycle)
        for step in tqdm(range(spec.steps), desc=f"train toy-sd (cycle {cycle + 1}/{spec.sd_cycles})", mininterval=5):
            x0, prompts = next(batches)
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            cond = text_encoder(ids.to(device))[0]  # as StableDiffusionPipeline.encode_prompt does
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
            clipped_step(loss, params, optimiser, schedule)
            if log_every(step, spec.steps):
                log(f"[toy-sd] cycle {cycle + 1} step {step} loss {loss.item():.4f}")

    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.eval().cpu(), tokenizer=tokenizer, unet=unet.eval().cpu(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    save_pipeline_fp16(pipe, out_dir, tokenizer_dir, text_length=tokenizer.model_max_length)
    metrics = {"train_seconds": round(time.time() - start, 1), "final_loss": round(loss.item(), 4),
               "unet_params": sum(p.numel() for p in unet.parameters())}
    log(f"[toy-sd] saved to {out_dir}: {metrics}")
    return metrics


# ---------------------------------------------------------------------------------- toy-flow


def build_flow_parts(tokenizer_dir: Path, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)

    def text_encoder(hidden: int, heads: int):
        # SD3 reads the penultimate hidden layer, so two layers are the fewest that use context.
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=heads, projection_dim=hidden, max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))

    # Small widths: most of a CLIP text encoder's weights are its 49408-row embedding table.
    text_encoder_1, text_encoder_2 = text_encoder(16, 2), text_encoder(8, 1)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=3, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
        caption_projection_dim=64, pooled_projection_dim=16 + 8, pos_embed_max_size=LATENT_SIZE // 2,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return tokenizer, text_encoder_1, text_encoder_2, transformer, scheduler


def flow_matching_loss(pipe, x0: torch.Tensor, prompts: list[str], gen: torch.Generator, device) -> torch.Tensor:
    """toy-flow's training loss: logit-normal sigmas (SD3), x_t = (1 - s) x0 + s noise, velocity
    target noise - x0, conditioned through the pipeline's own encoder (exactly what inference sees)."""
    cond, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device, do_classifier_free_guidance=False)
    sigma = torch.sigmoid(torch.randn(len(x0), generator=gen)).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    s = sigma.view(-1, 1, 1, 1)
    pred = pipe.transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=sigma * 1000, encoder_hidden_states=cond,
                            pooled_projections=pooled).sample
    return F.mse_loss(pred, noise - x0)


def train_toy_flow(out_dir: Path, vae_dir: Path, tokenizer_dir: Path, spec: GeneratorSpec, device: torch.device, log=print) -> dict:
    from diffusers import StableDiffusion3Pipeline

    start = time.time()
    vae = load_vae(vae_dir, device, keep_shift=True)
    tokenizer, te1, te2, transformer, scheduler = build_flow_parts(tokenizer_dir, spec.seed + 10)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1, tokenizer=tokenizer,
        text_encoder_2=te2, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    ).to(device)
    for module in (te1, te2, transformer):
        module.train()
    params = [p for m in (te1, te2, transformer) for p in m.parameters()]
    optimiser = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec.lr, total_steps=spec.flow_steps, pct_start=0.05)
    batches = generator_batches(spec, vae, device, shift=vae.config.shift_factor)
    gen = torch.Generator().manual_seed(spec.seed + 11)
    for step in tqdm(range(spec.flow_steps), desc="train toy-flow", mininterval=5):
        x0, prompts = next(batches)
        loss = flow_matching_loss(pipe, x0, prompts, gen, device)
        clipped_step(loss, params, optimiser, schedule)
        if log_every(step, spec.flow_steps):
            log(f"[toy-flow] step {step} loss {loss.item():.4f}")

    for module in (te1, te2, transformer):
        module.eval()
    save_pipeline_fp16(pipe.to("cpu"), out_dir, tokenizer_dir)
    metrics = {"train_seconds": round(time.time() - start, 1), "final_loss": round(loss.item(), 4),
               "transformer_params": sum(p.numel() for p in transformer.parameters())}
    log(f"[toy-flow] saved to {out_dir}: {metrics}")
    return metrics


def save_pipeline_fp16(pipe, out_dir: Path, tokenizer_dir: Path, text_length: int | None = None) -> None:
    """save_pretrained with fp16 weights; transformers text encoders keep a float32 config so
    every component loads as fp32 on a CPU by default. `text_length`: the saved tokenizers'
    model_max_length, when it is not tokenizer_dir's."""
    import shutil

    pipe.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    pipe.to(torch.float32)
    for name in ("text_encoder", "text_encoder_2"):
        if (out_dir / name).is_dir():
            common.save_transformers_fp16(getattr(pipe, name), out_dir / name)
    # tokenizers as the compact vocab.json + merges.txt (see clip_reward.save_processor)
    for name in ("tokenizer", "tokenizer_2"):
        folder = out_dir / name
        if folder.is_dir():
            shutil.rmtree(folder)
            shutil.copytree(tokenizer_dir, folder)
            if text_length is not None:
                config_path = folder / "tokenizer_config.json"
                config = json.loads(config_path.read_text())
                config_path.write_text(json.dumps({**config, "model_max_length": text_length}, indent=2) + "\n")
    # diffusers skips None components when saving, but SD3 needs them listed to load
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in ("text_encoder_3", "tokenizer_3"):
        if name in pipe.components and name not in index:
            index[name] = [None, None]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
