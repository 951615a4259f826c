"""GRPO's step time, broken down into rollout (sampling + decoding), reward and training, and how
it scales with the group size G.

Toy world (CPU, one thread):
    OMP_NUM_THREADS=1 python benchmarks/bench_online.py --model toy-flow --reward toy-reward \
        --group-sizes 4 8 16 --rollout-prompts 2 --steps 4 --out runs/bench_online_toy.json

Each G runs a fresh `diffalign train --method grpo` (no checkpoints, no final evaluation) for
`--steps` optimiser steps with batches of one prompt's group (batch_size = G, so every G trains
on the same rollout_prompts x G images a rollout, one optimiser step per group), and reads the
loop's own clocks from metrics.jsonl: rollout_time (sampling and decoding), reward_time and
train_time, accumulated over the run. Model loading is not timed; the first rollout is.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy-flow", help="pipeline folder, hub id or shipped asset")
    p.add_argument("--reward", default="toy-reward", help="reward spec, NAME[@PATH][=WEIGHT],...")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--rollout-prompts", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="optimiser steps a setting (a multiple of --rollout-prompts)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: the model folder's")
    p.add_argument("--train-steps", default="all", help="all | first:K | window:K")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the shared CI box has 2 cores)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    return p.parse_args(argv)


def run_one(args, group_size: int, folder: Path) -> dict:
    from diffalign.config import TrainConfig
    from diffalign.train import train

    cfg = TrainConfig(method="grpo", model=args.model, prompts="toy", reward=args.reward, output_dir=str(folder),
                      group_size=group_size, rollout_prompts=args.rollout_prompts, batch_size=group_size,
                      max_steps=args.steps, num_inference_steps=args.num_inference_steps, train_steps=args.train_steps,
                      resolution=args.resolution, mixed_precision=args.mixed_precision, lr=1e-4, lora_rank=8,
                      checkpoint_every=0, seed=0)
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    images = last["images"]
    parts = {k: last[k] for k in ("rollout_time", "reward_time", "train_time")}
    return {"group_size": group_size, "steps": len(rows), "rollouts": last["rollouts"], "images": images,
            "wall_s": round(wall, 2), **{k: round(v, 2) for k, v in parts.items()},
            "step_s": round(sum(parts.values()) / len(rows), 3),
            "rollout_images_per_s": round(images / max(last["rollout_time"], 1e-9), 2),
            "share": {k: round(v / max(sum(parts.values()), 1e-9), 3) for k, v in parts.items()}}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for group_size in args.group_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            row = run_one(args, group_size, Path(tmp) / "run")
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"setting": {k: v for k, v in vars(args).items() if k != "out"}, "device": "cpu" if not
              torch.cuda.is_available() else torch.cuda.get_device_name(), "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
