"""Reward throughput (images/s) and peak memory, with random weights; and, with --fidelity, how
far the differentiable tensor path is from the original's PIL path on the same images.

    python benchmarks/bench_rewards.py                                   # CPU, tiny models
    python benchmarks/bench_rewards.py --size real --device cuda --dtypes fp32,fp16,bf16
    python benchmarks/bench_rewards.py --fidelity --size real            # tensor vs PIL path

`--size tiny` builds scaled-down models with the original key layouts (as the tests do);
`--size real` builds the released architectures (HPSv2: open_clip ViT-H-14; PickScore: CLIP-H
in transformers; CLIP score: OpenAI ViT-L/14; ImageReward: BLIP ViT-L/16 + BERT-base) with
random weights, so no download is needed. Each (reward, dtype) runs in a fresh child process
so peak memory is its own: on CUDA `max_memory_allocated`, on CPU the peak resident set
(VmHWM, which includes the Python process itself). "score" is a no-grad forward; "grad" adds
the backward pass to the images, as reward guidance and ReNO need.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NAMES = ("hpsv2.1", "pickscore", "clip", "imagereward")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_CLIP_TOWERS = (
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=32),
)
# PickScore_v1 = CLIP-H; CLIP score default = openai/clip-vit-large-patch14.
CLIP_H = (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
          dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14), 1024)
CLIP_L = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
          dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14), 768)
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512, "vocab_size": 30524, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
             "pad_token_id": 0, "type_vocab_size": 2, "add_cross_attention": True, "encoder_width": 768}
TINY_BERT = {**BERT_BASE, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 64}
TINY_VIT = {"image_size": 224, "patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}


def build_hf_clip(cls, towers, tmp: Path, name: str):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from diffalign.rewards.clip_tokenizer import write_clip_tokenizer

    text, vision, projection = towers
    model = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "image_size": 224}, projection_dim=projection))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / name))
    return cls(model, tokenizer, name=name) if name == "pickscore" else cls(model, tokenizer, "transformers", name=name)


def build_imagereward(size: str, tmp: Path):
    from transformers import BertTokenizer

    from diffalign.rewards.imagereward import BLIP, VIT_LARGE, ImageRewardReward, mlp_head

    med, vit = (BERT_BASE, VIT_LARGE) if size == "real" else (TINY_BERT, TINY_VIT)
    # A stand-in vocabulary: throughput does not depend on which words the ids stand for.
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(50)] + list("abcdefghijklmnopqrstuvwxyz")
    (tmp / "bert").mkdir(parents=True, exist_ok=True)
    (tmp / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(tmp / "bert"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return ImageRewardReward(BLIP(med, vit), mlp_head(med["hidden_size"]), tokenizer)


def build(name: str, size: str, tmp: Path) -> torch.nn.Module:
    """A reward with random weights, on the current default device, in fp32."""
    from diffalign.rewards.clip import CLIPScoreReward, build_open_clip
    from diffalign.rewards.hpsv2 import HPSv2Reward
    from diffalign.rewards.pickscore import PickScoreReward

    if name == "hpsv2.1":
        model, tokenizer = build_open_clip("ViT-H-14" if size == "real" else TINY_OPEN_CLIP)
        return HPSv2Reward(model, tokenizer)
    if name == "pickscore":
        return build_hf_clip(PickScoreReward, CLIP_H if size == "real" else (*TINY_CLIP_TOWERS, 16), tmp, name)
    if name == "clip":
        return build_hf_clip(CLIPScoreReward, CLIP_L if size == "real" else (*TINY_CLIP_TOWERS, 16), tmp, name)
    if name == "imagereward":
        return build_imagereward(size, tmp)
    raise SystemExit(f"unknown reward {name!r}: choose from {', '.join(NAMES)}")


def cpu_memory_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def bench_one(name: str, size: str, device: str, dtype: str, batch: int, iters: int, resolution: int) -> dict:
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp, torch.device(device):
        reward = build(name, size, Path(tmp))
    reward = reward.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    weights_mib = sum(p.numel() * p.element_size() for p in reward.parameters()) / 2**20
    images = torch.rand(batch, 3, resolution, resolution, device=device)
    prompts = ["a photograph of an astronaut riding a horse on the moon"] * batch
    result = {"reward": name, "size": size, "device": device, "dtype": dtype, "batch": batch,
              "resolution": resolution, "params_M": sum(p.numel() for p in reward.parameters()) / 1e6,
              "weights_MiB": round(weights_mib, 1)}
    for mode in ("score", "grad"):
        def step():
            x = images.clone().requires_grad_(mode == "grad")
            with torch.set_grad_enabled(mode == "grad"):
                scores = reward.score(x, prompts)
                if mode == "grad":
                    scores.sum().backward()
            return scores

        scores = step()  # warm-up (kernels, caches)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            scores = step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else cpu_memory_mib()[1]
        result[f"{mode}_img_s"] = round(batch * iters / seconds, 2)
        result[f"{mode}_peak_MiB"] = round(peak, 1)
        result["finite"] = bool(torch.isfinite(scores).all())
    return result


def fidelity_images(count: int, width: int, height: int) -> dict[str, list]:
    """Natural-looking images (toy renders, 32 px, upscaled with PIL's Lanczos) and uniform noise,
    all uint8 RGB PIL images of width x height."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.paths import asset

    table = pq.read_table(asset("toy-data") / "toy-sd" / "pairs.parquet", columns=["jpg_0"]).to_pylist()
    renders = [Image.open(io.BytesIO(row["jpg_0"])).convert("RGB") for row in table[::max(len(table) // count, 1)][:count]]
    rng = np.random.default_rng(0)
    return {
        "natural": [im.resize((width, height), Image.LANCZOS) for im in renders],
        "noise": [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)],
    }


def fidelity_one(name: str, reward, images: dict[str, list], prompts: list[str]) -> list[dict]:
    """Per image set: pixel and score differences between score(tensor) and score(PIL)."""
    from diffalign.rewards.base import OPENAI_CLIP_STD, pil_to_tensor

    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    rows = []
    for kind, pils in images.items():
        tensors = torch.stack([pil_to_tensor(im) for im in pils])
        pixel = torch.stack([((reward.transform(t[None])[0] - reward.pil_transform(im)) * std).abs() * 255 for t, im in zip(tensors, pils)])
        with torch.no_grad():
            from_pil = reward.score(pils, prompts[: len(pils)])
            from_tensor = reward.score(tensors, prompts[: len(pils)])
        delta = (from_tensor - from_pil).abs()
        rows.append({"reward": name, "images": kind, "n": len(pils), "pixel_max_grey": round(float(pixel.max()), 2),
                     "pixel_mean_grey": round(float(pixel.mean()), 3), "score_mean": round(float(from_pil.mean()), 4),
                     "score_std": round(float(from_pil.std()), 4), "delta_max": float(f"{float(delta.max()):.3g}"),
                     "delta_mean": float(f"{float(delta.mean()):.3g}"),
                     "delta_over_std": float(f"{float(delta.max() / from_pil.std().clamp(min=1e-12)):.3g}")})
    return rows


def video_fidelity(images: dict[str, list]) -> list[dict]:
    """VideoReward: frames (the image sets as clips) resized by the differentiable tensor path vs
    the original's uint8 torchvision resize (what video files and exact=True get), at the
    release's max_frame_pixels. Pixels only: the score needs the 2B model."""
    from diffalign.rewards.base import pil_to_tensor
    from diffalign.rewards.videoreward import resize_frames_uint8, resize_frames_uint8_like, smart_resize

    rows = []
    for kind, pils in images.items():
        frames = torch.stack([pil_to_tensor(im) for im in pils]) * 255
        h, w = smart_resize(*frames.shape[-2:], 28, 128 * 28 * 28, 448 * 448)
        delta = (resize_frames_uint8_like(frames, h, w) - resize_frames_uint8(frames.round().to(torch.uint8), h, w)).abs()
        rows.append({"reward": "videoreward", "images": kind, "n": len(pils), "pixel_max_grey": round(float(delta.max()), 2),
                     "pixel_mean_grey": round(float(delta.mean()), 3), "score_mean": None, "score_std": None,
                     "delta_max": None, "delta_mean": None, "delta_over_std": None})
    return rows


def fidelity(names: list[str], size: str, count: int) -> list[dict]:
    """Tensor path vs PIL path for each reward: 512x384 inputs for the 224 px rewards (random
    weights at `size`), 96x72 for the shipped, trained toy rewards (32 px)."""
    from diffalign.rewards import load_reward

    prompts = [line for line in (Path(__file__).resolve().parents[1] / "assets" / "toy-data" / "prompts_heldout.txt").read_text().splitlines() if line][:count]
    rows = []
    for name in names:
        torch.manual_seed(0)
        if name == "videoreward":
            rows += video_fidelity(fidelity_images(count, 1280, 720))  # a 720p clip, downscaled to max_frame_pixels
            continue
        if name.startswith("toy-"):
            reward, images = load_reward(name), fidelity_images(count, 96, 72)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                reward = build(name, size, Path(tmp)).eval().requires_grad_(False)
            images = fidelity_images(count, 512, 384)
        rows += fidelity_one(name, reward, images, prompts)
        print(f"{name}: done", file=sys.stderr)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["reward", "dtype", "params_M", "batch", "score_img_s", "score_peak_MiB", "grad_img_s", "grad_peak_MiB", "finite"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewards", default=",".join(NAMES))
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32,fp16,bf16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=512, help="input images are RxR (resized by the reward)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the CI box has 2 cores)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark=True (fp16 gradients: cuDNN's default pick for the patch conv is slow)")
    parser.add_argument("--output", help="write all rows as JSON here")
    parser.add_argument("--fidelity", action="store_true",
                        help="measure tensor path vs the original's PIL path per reward (CPU, in this process)")
    parser.add_argument("--count", type=int, default=8, help="--fidelity: images per set (natural, noise)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.fidelity:
        names = args.rewards.split(",") if args.rewards != ",".join(NAMES) else [*NAMES, "toy-reward", "toy-judge", "videoreward"]
        rows = fidelity(names, args.size, args.count)
        cols = list(rows[0])
        print(f"\ntensor vs PIL path, {args.size} models, {args.count} images per set\n")
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        print("\n".join("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows))
        if args.output:
            Path(args.output).write_text(json.dumps(rows, indent=2))
        return
    if args.one:  # child: exactly one reward and dtype; print one JSON line
        print(json.dumps(bench_one(args.rewards, args.size, args.device, args.dtypes, args.batch, args.iters, args.resolution)))
        return
    rows = []
    for name in args.rewards.split(","):
        for dtype in args.dtypes.split(","):
            cmd = [sys.executable, __file__, "--one", "--rewards", name, "--size", args.size, "--device", args.device,
                   "--dtypes", dtype, "--batch", str(args.batch), "--iters", str(args.iters),
                   "--resolution", str(args.resolution), "--threads", str(args.threads)]
            cmd += ["--cudnn-benchmark"] if args.cudnn_benchmark else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name} {dtype}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name} {dtype}: {rows[-1]['score_img_s']} img/s", file=sys.stderr)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{args.size} models on {device_name} ({args.threads} thread(s) on CPU), batch {args.batch}, "
          f"{args.resolution}px inputs, {args.iters} timed iterations\n")
    print(format_table(rows))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
