"""Training throughput and memory: pairs/s, peak memory, step time vs a bare forward+backward.

Each case runs in its own subprocess (so peak memory is its own) and measures, side by side:
  step : diffalign's training step (compute_loss -> backward -> optimizer step), the real path
  bare : the same denoiser's forward+backward on the same B*K latents with a plain MSE loss
  bare+ref : bare plus one no-grad forward (what a reference-based objective must add)
The ratio step / (bare or bare+ref) is diffalign's overhead (goal: <= 1.10).

    # tiny models on the CPU (what CI-class machines can run)
    python benchmarks/bench_train.py --scale tiny
    # real-size architectures (random weights, built from their configs) on a GPU
    python benchmarks/bench_train.py --scale real --device cuda --dtype bf16
    # the speed options (TrainConfig.compile, .channels_last), each against the plain step
    python benchmarks/bench_train.py --scale tiny --only sd15:dpo:lora:nocache --options plain,channels_last,compile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

# --------------------------------------------------------------------------- real-size configs
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


def real_pipeline(name: str, tokenizer_dir: str):
    """A real-size pipeline with random weights (no hub): SD1.5, SDXL or SD3.5-Medium (no T5)."""
    from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                         steps_offset=1, clip_sample=False)  # as the released SD1.5 and SDXL schedulers
    if name == "sd15":
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)), tokenizer=tok,
            unet=UNet2DConditionModel(**SD15_UNET), scheduler=ddpm, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        ), 512
    if name == "sdxl":
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SD_VAE, force_upcast=False), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), tokenizer=tok, tokenizer_2=tok,
            unet=UNet2DConditionModel(**SDXL_UNET), scheduler=ddpm,
        ), 1024
    if name == "sd35m":
        vae = AutoencoderKL(**{**SD_VAE, "latent_channels": 16}, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=1.5305, shift_factor=0.0609)
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae, text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), tokenizer_2=tok,
            text_encoder_3=None, tokenizer_3=None,
        ), 1024
    raise SystemExit(f"unknown model {name}")


# --------------------------------------------------------------------------- one case
def run_case(case: dict) -> dict:
    from diffalign import elbo
    from diffalign.config import TrainConfig
    from diffalign.models import load_adapter
    from diffalign.objectives import get_objective, resolve_hparams
    from diffalign.testing import TINY_RESOLUTION, tiny_pipeline
    from diffalign.step import compute_loss, draw_step
    from diffalign.train import setup_denoiser

    torch.manual_seed(0)
    device = torch.device(case["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    if case["scale"] == "tiny":
        family = {"sd15": "sd", "sd3": "sd3"}[case["model"]]
        pipe, resolution = tiny_pipeline(family), case["resolution"] or TINY_RESOLUTION[family] * 2
    else:
        with torch.device(device):  # initialise the random weights on the GPU: seconds, not minutes
            pipe, resolution = real_pipeline(case["model"], case["tokenizer_dir"])
        resolution = case["resolution"] or resolution
    full = case["full_finetune"]
    adapter = load_adapter(pipe, device=device, dtype=torch.float32 if full else dtype)
    objective = get_objective(case["method"])
    cfg = TrainConfig(method=case["method"], full_finetune=full, lora_rank=case["lora_rank"],
                      gradient_checkpointing=case["scale"] == "real", **{name: True for name in case["options"]})
    hparams = resolve_hparams(case["method"], adapter.prediction_type, {})
    from diffalign.models.lora import set_attention

    attention = set_attention(adapter.denoiser, case["attention"])
    params, reference = setup_denoiser(cfg, adapter, objective.NEEDS_REF)
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    b, k = case["batch_size"], 2
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(b, k, 3, resolution, resolution, generator=g) * 2 - 1)
    prompts = [f"prompt {i}" for i in range(b)]
    batch = {"pixels": pixels, "prompts": prompts, "captions": [[p] * k for p in prompts], "scores": torch.tensor([[1.0, 0.0]] * b)}
    if case["cache"]:  # what a cached run reads from disk: latents + per-image text conditioning
        with torch.no_grad():
            lat = adapter.encode_images(pixels.flatten(0, 1).to(device, adapter.pipe.vae.dtype))
            cond = adapter.encode_prompts(prompts)
        batch = {**batch, "latents": lat.view(b, k, *lat.shape[1:]),
                 "cond": {n: v.unsqueeze(1).expand(b, k, *v.shape[1:]) for n, v in cond.items()},
                 "prompt_cond": cond}
        del batch["pixels"]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def training_step(i):
        with autocast:
            loss, _ = compute_loss(adapter, adapter.denoiser, batch, objective, hparams, reference,
                                   draw_step(adapter, batch, torch.Generator().manual_seed(i), len(batch['prompts'])), device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The bare baseline works on fixed latents/conditioning: no VAE, no text encoder, no objective.
    with torch.no_grad():
        lat = adapter.encode_images(pixels.flatten(0, 1).to(device, adapter.pipe.vae.dtype))
        cond = {n: v.repeat_interleave(k, 0) for n, v in adapter.encode_prompts(prompts).items()}
    t = elbo.draw_timesteps(adapter, b * k, torch.Generator().manual_seed(0)).to(device)
    noise = torch.randn_like(lat)

    def bare_step(with_ref):
        with autocast:
            xt = elbo.add_noise(adapter, lat, noise, t)
            if with_ref:
                with torch.no_grad():
                    adapter.predict(adapter.denoiser, xt, t, cond)
            loss = (adapter.predict(adapter.denoiser, xt, t, cond).float() - noise.float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmups = []

    def timed(fn, n):
        start = time.perf_counter()
        for i in range(case["warmup"]):
            fn(i)
        sync(device)
        warmups.append(time.perf_counter() - start)  # torch.compile compiles here
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        sync(device)
        return (time.perf_counter() - start) / n

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_time = timed(training_step, case["steps"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else rss_gib()
    bare_time = timed(lambda i: bare_step(False), case["steps"])
    bare_ref_time = timed(lambda i: bare_step(True), case["steps"]) if objective.NEEDS_REF else bare_time
    result = dict(case, attention_used=attention, step_s=step_time, warmup_s=warmups[0], pairs_per_s=b / step_time, peak_gib=peak,
                  bare_s=bare_time, bare_ref_s=bare_ref_time, ratio_vs_bare=step_time / bare_time,
                  ratio_vs_bare_ref=step_time / bare_ref_time, trainable=sum(p.numel() for p in params))
    if device.type == "cuda":
        result["mfu"] = model_flops(training_step) / step_time / case["peak_tflops"] / 1e12
    return result


def model_flops(step_fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step_fn(0)
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_gib() -> float:
    """Peak resident memory of this process (the case runs alone in it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------- driver
def cases(args) -> list[dict]:
    """Every model x method x (lora, full) x (cache off, on), or the `--only` list
    (model:method:lora|full:cache|nocache, comma-separated)."""
    if args.only:
        specs = [tuple(item.split(":")) for item in args.only.split(",")]
    else:
        models = args.models.split(",") if args.models else (["sd15", "sd3"] if args.scale == "tiny" else ["sd15", "sdxl", "sd35m"])
        specs = [
            (model, method, mode, cache)
            for model in models
            for method in (["flow-dpo", "mapo"] if model in ("sd3", "sd35m") else ["dpo", "mapo"])
            for mode in ("lora", "full")
            for cache in ("nocache", "cache")
        ]
    return [
        dict(model=model, method=method, full_finetune=mode == "full", cache=cache == "cache", scale=args.scale,
             device=args.device, dtype=args.dtype, batch_size=args.batch_size, lora_rank=args.lora_rank,
             steps=args.steps, warmup=args.warmup, peak_tflops=args.peak_tflops, tokenizer_dir=args.tokenizer_dir,
             attention=args.attention, options=[] if option == "plain" else option.split("+"),
             resolution=args.resolution)
        for model, method, mode, cache in specs
        for option in args.options.split(",")
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--models", default=None, help="comma list: sd15,sd3 (tiny) or sd15,sdxl,sd35m (real)")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels (default: twice the tiny family's, or the real model's native size)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--only", default=None, help="cases as model:method:lora|full:cache|nocache,...")
    parser.add_argument("--attention", default="auto", help="auto | sdpa | xformers")
    parser.add_argument("--options", default="plain",
                        help="comma list of TrainConfig speed options a case runs with: plain, compile, channels_last, "
                             "or several joined by + (each case runs once per entry)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_case(json.loads(args.one))), flush=True)
        return
    if args.tokenizer_dir is None:
        import tempfile

        from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

        args.tokenizer_dir = str(write_clip_tokenizer(tempfile.mkdtemp()))
    results = []
    header = f"{'model':6} {'method':8} {'mode':5} {'cache':5} {'attn':8} {'options':14} {'pairs/s':>8} {'peak GiB':>8} {'step/bare':>9} {'step/(bare+ref)':>15} {'warm-up s':>9} {'step ms':>7} {'bare ms':>7} {'bare+ref ms':>9}" + (" MFU" if args.device == "cuda" else "")
    print(header)
    for case in cases(args):
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{case['model']} {case['method']} failed:\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[7:])
        results.append(r)
        mfu = f" {r['mfu']:.1%}" if "mfu" in r else ""
        print(f"{r['model']:6} {r['method']:8} {'full' if r['full_finetune'] else 'lora':5} {str(r['cache']):5} {r['attention_used']:8} "
              f"{'+'.join(r['options']) or 'plain':14} "
              f"{r['pairs_per_s']:8.2f} {r['peak_gib']:8.2f} {r['ratio_vs_bare']:9.2f} {r['ratio_vs_bare_ref']:15.2f} "
              f"{r['warmup_s']:9.1f} {1000 * r['step_s']:7.1f} {1000 * r['bare_s']:7.1f} {1000 * r['bare_ref_s']:9.1f}{mfu}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
