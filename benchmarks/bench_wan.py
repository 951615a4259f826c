"""Wan video training: step time and peak memory of a Flow-DPO LoRA step, with and without the
latent cache and gradient checkpointing.

    # Wan 2.1 T2V 1.3B's DiT and VAE at their real sizes (random weights, built from their
    # configs: no hub), 480 x 832 x 33 frames, one pair a step, bf16, on a GPU
    python benchmarks/bench_wan.py --scale real --device cuda --dtype bf16
    # the tiny test pipeline on the CPU (checks the script; what this machine can run)
    python benchmarks/bench_wan.py --scale tiny

Cases: cache (latents given: no VAE in the step) or not (the step encodes the two videos with
the VAE), gradient checkpointing on or off. Each case: `--warmup` steps, then the median of
`--steps` steps of diffalign's own step (diffalign.step.compute_loss -> backward -> AdamW), one
JSON line each. The text encoder is a UMT5 of the real width (4096) with 2 layers: prompts are
encoded once per text (PromptMemo) in a run, so its depth does not weigh on a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                  text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def real_pipeline():
    """Wan 2.1 T2V 1.3B's transformer and VAE (AutoencoderKLWan's defaults are Wan 2.1's VAE)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from diffalign.testing import CLIP_EOS, CLIP_VOCAB_SIZE, tiny_clip_tokenizer

    text = UMT5EncoderModel(UMT5Config(vocab_size=CLIP_VOCAB_SIZE, d_model=4096, d_kv=64, d_ff=10240, num_layers=2,
                                       num_heads=64, pad_token_id=CLIP_EOS, eos_token_id=CLIP_EOS))
    return WanPipeline(tokenizer=tiny_clip_tokenizer(), text_encoder=text, vae=AutoencoderKLWan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=WanTransformer3DModel(**WAN21_1_3B))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--height", type=int, default=None, help="default: 480 (real), 16 (tiny)")
    parser.add_argument("--width", type=int, default=None, help="default: 832 (real), 16 (tiny)")
    parser.add_argument("--num-frames", type=int, default=None, help="default: 33 (real), 5 (tiny)")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    from diffalign.config import TrainConfig
    from diffalign.models import load_adapter
    from diffalign.objectives import get_objective, resolve_hparams
    from diffalign.step import PromptMemo, compute_loss, draw_step
    from diffalign.testing import tiny_pipeline
    from diffalign.train import setup_denoiser

    real = args.scale == "real"
    height = args.height or (480 if real else 16)
    width = args.width or (832 if real else 16)
    frames = args.num_frames or (33 if real else 5)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    torch.manual_seed(0)
    pipe = real_pipeline() if real else tiny_pipeline("wan")
    adapter = load_adapter(pipe, device=device, dtype=dtype)
    adapter.encode_prompts = PromptMemo(adapter.encode_prompts)
    objective, hparams = get_objective("flow-dpo"), resolve_hparams("flow-dpo", "flow", {})
    params, reference = setup_denoiser(TrainConfig(method="flow-dpo", lora_rank=args.lora_rank), adapter, True)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1, 2, frames, 3, height, width, generator=g) * 2 - 1).to(device, dtype)
    prompts = ["a red fox runs across a snowy field"]
    with torch.no_grad():
        latents = adapter.encode_images(pixels.flatten(0, 1)).unflatten(0, (1, 2))
    cond = adapter.encode_prompts(prompts)
    base = {"prompts": prompts, "captions": [prompts * 2], "scores": torch.tensor([[1.0, 0.0]])}
    cached = {**base, "latents": latents.cpu(), "prompt_cond": {k: v.cpu() for k, v in cond.items()}}
    decoded = {**base, "pixels": pixels}
    print(json.dumps({"scale": args.scale, "device": str(device), "dtype": args.dtype, "video": [frames, height, width],
                      "latent": list(latents.shape[2:]), "trainable": sum(p.numel() for p in params)}))
    for checkpointing in (False, True):
        if checkpointing:
            adapter.denoiser.enable_gradient_checkpointing()
        for cache in (True, False):
            batch = cached if cache else decoded
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            try:
                for step in range(args.warmup + args.steps):
                    start = time.perf_counter()
                    draws = draw_step(adapter, batch, torch.Generator().manual_seed(step), 1)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        loss, _ = compute_loss(adapter, adapter.denoiser, batch, objective, hparams, reference, draws, device)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if step >= args.warmup:
                        times.append(time.perf_counter() - start)
                row = {"cache": cache, "gradient_checkpointing": checkpointing,
                       "step_s": round(statistics.median(times), 4), "videos_per_s": round(2 / statistics.median(times), 3)}
                if device.type == "cuda":
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except torch.OutOfMemoryError:
                row = {"cache": cache, "gradient_checkpointing": checkpointing, "error": "out of memory"}
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
