"""`diffalign label` throughput: images/s, and the share of the time spent in the rewards.

Toy world (CPU, or --device cuda):
    python benchmarks/bench_label.py --model toy-sd --reward toy-reward --num-prompts 32 \
        --num-images 4 --batch-size 16 --num-inference-steps 20 --guidance-scale 4 --out runs/bench_label_toy.json

Runs a fresh `diffalign label` job on the first N toy training prompts (model loading is not
timed; generation, scoring and writing the rows are) and prints label's own stats plus the
setting. `--reward a,b` ranks by several rewards, as Syn-Pic does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy-sd", help="pipeline folder, hub id or shipped asset")
    p.add_argument("--reward", default="toy-reward", help="reward name(s), comma-separated")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: the model folder's diffalign.json")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model folder's diffalign.json")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the shared CI box has 2 cores)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def toy_prompts(n: int) -> list[str]:
    """The first n toy training prompts, as shipped in assets/toy-data/prompts_train.txt."""
    from diffalign.paths import asset

    return (asset("toy-data") / "prompts_train.txt").read_text().splitlines()[:n]


def main(argv=None) -> int:
    from diffalign.label import LabelConfig, label

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(toy_prompts(args.num_prompts)) + "\n")
        cfg = LabelConfig(model=args.model, prompts=str(prompts), output_dir=str(Path(tmp) / "out"),
                          rewards=[r for r in args.reward.split(",") if r], num_images=args.num_images,
                          batch_size=args.batch_size, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                          resolution=args.resolution,
                          device=args.device, dtype=args.dtype)
        stats = label(cfg)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    result = {
        "model": args.model, "rewards": cfg.rewards, "prompts": args.num_prompts, "images_per_prompt": args.num_images,
        "batch_size": args.batch_size, "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale, "device": gpu or f"cpu x{args.threads} threads",
        **{k: v for k, v in stats.items() if k not in ("ranked", "pairs")},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
