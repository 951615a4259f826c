"""ReNO benchmark: reward gain over the initial noise and over best-of-N, time and memory.

Quality (the toy world, CPU):
    python benchmarks/bench_reno.py --model toy-sd --reward toy-reward --judge toy-judge \
        --num-prompts 20 --iterations 50 --num-inference-steps 4 --out runs/bench_reno_toy.json

For each held-out toy prompt: ReNO from the seed's noise for `iterations` evaluations, and
best-of-N sampling with N = iterations fresh noises (the first is ReNO's starting noise), so
both spend the same number of reward evaluations. The judge (a separately trained toy CLIP)
scores the initial, ReNO and best-of-N images, to show whether the gain transfers.

Cost (real-size architectures with random weights, e.g. on a GPU):
    python benchmarks/bench_reno.py --arch sd-turbo --reward-towers 3 --device cuda \
        --dtype fp16 --iterations 10 --num-prompts 1
SD-Turbo = SD 2.1 UNet + VAE + OpenCLIP-H text encoder, 512 px, 1 step; each reward tower is a
random PickScore-shaped CLIP ViT-H-14 (ReNO runs HPS, PickScore and CLIP: three ViT-H).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffalign.edges import load_pipeline, load_rewards, parse_dtype
from diffalign.reno import optimize_latent, resolve_rewards
from diffalign.sampler import build_generator


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy-sd", help="pipeline folder or shipped asset")
    p.add_argument("--arch", choices=("sd-turbo",), help="build this real-size architecture with random weights")
    p.add_argument("--reward", default="toy-reward", metavar="NAME[@PATH]",
                   help="the reward optimised (weight 1): a registry name, @ its weights folder if not the registry's")
    p.add_argument("--reward-towers", type=int, default=1, help="--arch: random CLIP-H reward towers")
    p.add_argument("--judge", default=None, metavar="NAME[@PATH]", help="a held-out judge (toy-judge)")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--num-inference-steps", type=int, default=1, help="generator sampling steps")
    p.add_argument("--guidance-scale", type=float, default=0.0, help="> 1: classifier-free guidance")
    p.add_argument("--lr", type=float, default=5.0)
    p.add_argument("--reg-weight", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-best-of-n", action="store_true")
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="keep cuDNN's default algorithms (slow fp16 conv backward at 512 px)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="--arch: a CLIP tokenizer folder (default: written offline, needs open_clip)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def heldout_prompts(n: int) -> list[str]:
    """n held-out toy prompts, evenly spread over the fixed held-out split
    (assets/toy-data/prompts_heldout.txt)."""
    from diffalign.paths import asset

    heldout = (asset("toy-data") / "prompts_heldout.txt").read_text().splitlines()
    stride = max(1, len(heldout) // n)
    return heldout[::stride][:n]


def clip_tokenizer(folder: Path | None):
    from transformers import CLIPTokenizer

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(str(folder or write_clip_tokenizer(Path(tempfile.mkdtemp()))))


def sd_turbo_random(device, dtype, tokenizer):
    """SD-Turbo's architecture (SD 2.1 base: UNet, VAE, OpenCLIP-H text) with random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    with torch.device(device):  # initialise the ~1.3B random weights where they will run
        modules = _sd_turbo_modules()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **modules)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def _sd_turbo_modules() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    ))
    return {"unet": unet, "vae": vae, "text_encoder": text}


def random_clip_h_rewards(k: int, device, dtype, tokenizer) -> dict:
    """k PickScore-shaped rewards on random CLIP ViT-H-14 towers: {name: (score, weight)}."""
    from transformers import CLIPConfig, CLIPModel

    from diffalign.rewards.pickscore import PickScoreReward

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                         num_hidden_layers=24, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                           image_size=224, patch_size=14),
        projection_dim=1024,
    )
    rewards = {}
    for i in range(k):
        torch.manual_seed(100 + i)
        with torch.device(device):
            model = CLIPModel(config).to(dtype).eval().requires_grad_(False)
        reward = PickScoreReward(model, tokenizer, name=f"clip-h-{i}")
        rewards[reward.name] = (reward.score, 1.0)
    return rewards


def best_of_n(generator, reward_fns: dict, prompt: str, n: int, first_noise: torch.Tensor, seed: int):
    """Score n noises (the first is ReNO's start) with no gradient; return the best (score, image)."""
    best_score, best_image = -float("inf"), None
    for k in range(n):
        noise = first_noise if k == 0 else torch.randn(
            generator.latent_shape, generator=torch.Generator().manual_seed(seed * 100_003 + k))
        with torch.no_grad():
            image = generator(noise.to(generator.device)).float()
            score = sum(w * fn(image, [prompt]) for fn, w in reward_fns.values()).item()
        if score > best_score:
            best_score, best_image = score, image[0].cpu()
    return best_score, best_image


def judge_scores(judge, images: dict[str, torch.Tensor], prompt: str, device) -> dict[str, float]:
    with torch.no_grad():
        return {key: judge.score(image[None].to(device), [prompt]).item() for key, image in images.items()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    cuda = args.device.startswith("cuda")
    # Same shapes every iteration: let cuDNN time its algorithms once. Its default pick for the
    # VAE's fp16 conv backward at 512 px cost ~170 ms of ~250 ms GPU time per iteration (H100).
    torch.backends.cudnn.benchmark = cuda and not args.no_cudnn_benchmark
    if args.arch:
        tokenizer = clip_tokenizer(args.tokenizer)
        pipe = sd_turbo_random(args.device, dtype, tokenizer)
        reward_fns = random_clip_h_rewards(args.reward_towers, args.device, dtype, tokenizer)
        prompts = ["a photo of an astronaut riding a horse on the moon"] * args.num_prompts
    else:
        pipe = load_pipeline(args.model, dtype, device=args.device)
        reward_fns = resolve_rewards({args.reward: 1.0}, device=args.device)
        prompts = heldout_prompts(args.num_prompts)
    judge = None
    if args.judge:
        (judge,) = load_rewards(args.judge, device=args.device).values()
    rows, timings, peaks = [], [], []
    baseline = peak_rss_mib()  # models loaded: the growth past this is the optimisation's own
    for index, prompt in enumerate(prompts):
        seed = args.seed + index
        generator = build_generator(pipe, prompt, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=seed,
                                    gradient_checkpointing=not args.no_checkpointing)
        noise = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(seed))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = optimize_latent(generator, noise.to(args.device), prompt, reward_fns, iterations=args.iterations,
                                 lr=args.lr, reg_weight=args.reg_weight, progress=False)
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            peaks.append(peak_rss_mib())
        timings.append((time.perf_counter() - start) / args.iterations)
        row = {"prompt": prompt, "initial": result.initial_reward, "reno": result.best_reward,
               "best_iteration": result.best_iteration, "seconds_per_iteration": timings[-1]}
        images = {"initial": result.initial_image, "reno": result.image}
        if not args.skip_best_of_n:
            row["best_of_n"], images["best_of_n"] = best_of_n(generator, reward_fns, prompt, args.iterations, noise, seed)
        if judge is not None:
            row["judge"] = judge_scores(judge, images, prompt, args.device)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "judge"}),
              file=sys.stderr)
    summary = summarise(rows, timings, peaks, args, cuda)
    if not cuda:
        summary["peak_rss_growth_mib"] = max(peaks) - baseline
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "prompts": rows}, indent=2))
    return 0


def summarise(rows: list[dict], timings: list[float], peaks: list[float], args, cuda: bool) -> dict:
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    summary = {
        "setting": {k: str(v) for k, v in vars(args).items()},
        "prompts": n,
        "reno_beats_initial": sum(r["reno"] > r["initial"] for r in rows) / n,
        "mean_initial": mean("initial"),
        "mean_reno": mean("reno"),
        # The first prompt pays one-off costs (allocator, cuDNN autotuning): left out when n > 1.
        "seconds_per_iteration": sum(timings[1:] or timings) / len(timings[1:] or timings),
        ("peak_gpu_mib" if cuda else "peak_rss_mib"): max(peaks),
    }
    if "best_of_n" in rows[0]:
        summary["mean_best_of_n"] = mean("best_of_n")
        summary["reno_beats_best_of_n"] = sum(r["reno"] > r["best_of_n"] for r in rows) / n
    if "judge" in rows[0]:
        for key in rows[0]["judge"]:
            summary[f"judge_mean_{key}"] = sum(r["judge"][key] for r in rows) / n
    return summary


if __name__ == "__main__":
    sys.exit(main())
