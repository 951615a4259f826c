"""Why SPO does or does not move a model: are its step-level labels about the final image?

SPO labels a transition x_t -> x_{t-1} by scoring each candidate's predicted x0 (diffalign/online.py).
This script rolls out with a recipe's settings, then, for every kept pair, continues the winner
and the loser to the end of sampling **with the same noise** and scores both final images with
an independent judge (and with the labelling reward). The agreement by step says how much the
step labels say about what the user sees; 0.5 is no information.

With `--lora`, it also reports a trained policy's implicit accuracy on fresh pairs (does the
policy put more log-prob ratio on the winner of pairs it never trained on?) and its log-prob
ratios.

    OMP_NUM_THREADS=1 python benchmarks/diagnose_spo.py --prompts 48 --judge toy-judge
    OMP_NUM_THREADS=1 python benchmarks/diagnose_spo.py --prompts 48 --lora outputs/quickstart-spo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sd")
    p.add_argument("--reward", default="toy-reward", help="the labelling reward (reward spec)")
    p.add_argument("--judge", default="toy-judge", help="the independent reward the final images are scored by")
    p.add_argument("--prompts", type=int, default=48, help="how many held-out toy prompts to roll out")
    p.add_argument("--rollout-prompts", type=int, default=8)
    p.add_argument("--num-candidates", type=int, default=4)
    p.add_argument("--divert-start-step", type=int, default=4)
    p.add_argument("--pair-threshold", type=float, default=0.3)
    p.add_argument("--num-inference-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--lora", default=None, help="a trained SPO run folder: report its implicit accuracy on fresh pairs")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", default=None, help="write the summary as JSON here")
    return p.parse_args(argv)


def continue_to_the_end(setup, pairs, prompts, seed):
    """Final images of each pair's winner and loser, continued from x_{t-1} with shared noise."""
    from diffalign import online
    from diffalign.sampler import decode, denoise

    n = len(pairs)
    finals = torch.zeros(n, 2, 3, *(setup.latent_shape[-2] * setup.adapter.pipe.vae_scale_factor,) * 2)
    total = len(setup.timesteps)
    for i in pairs.step.unique().tolist():
        rows = (pairs.step == i).nonzero()[:, 0]
        texts = [prompts[int(p)] for p in pairs.prompt[rows] for _ in range(2)]
        group = online.condition(setup, texts)
        x = torch.stack([pairs.win[rows], pairs.lose[rows]], dim=1).flatten(0, 1).to(setup.device, setup.dtype)
        generators = [torch.Generator().manual_seed(seed + int(r)) for r in rows for _ in range(2)]
        with torch.no_grad():
            final = denoise(group, x, start=i + 1, generator=generators).final if i + 1 < total else x
            finals[rows] = decode(setup, final).float().cpu().view(len(rows), 2, *finals.shape[2:])
    return finals


def main(argv=None) -> dict:
    args = parse_args(argv)
    from diffalign import online
    from diffalign.edges import load_rewards
    from diffalign.models import load_adapter
    from diffalign.paths import asset
    from diffalign.edges import read_prompts
    from diffalign.train import resolve_shipped
    from diffalign.train_online import load_online_rewards

    torch.manual_seed(args.seed)
    adapter = load_adapter(resolve_shipped(args.model))
    if args.lora:
        from diffalign.evaluate import load_lora

        load_lora(adapter.pipe, args.lora)
    transition = online.transition_for(adapter, 1.0, 0.7)
    prompts = read_prompts(asset("toy-data") / "prompts_heldout.txt")[: args.prompts]
    setup = online.rollout_setup(adapter, prompts[0], steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                 resolution=args.resolution, transition=transition)
    rewards = load_online_rewards(args.reward, "cpu")
    judge = next(iter(load_rewards(args.judge).values()))
    label_reward = next(iter(rewards.values()))[0]

    start = time.perf_counter()
    parts, compared = [], torch.zeros(args.num_inference_steps, dtype=torch.long)
    for first in range(0, len(prompts), args.rollout_prompts):
        ids = list(range(first, min(first + args.rollout_prompts, len(prompts))))
        texts = [prompts[i] for i in ids]
        slots = [args.seed * 100_000 + i for i in ids]
        with torch.no_grad():
            rollout = online.branch_rollout(online.condition(setup, texts), texts, ids, slots, rewards,
                                            online.slot_generators(args.seed, slots),
                                            num_candidates=args.num_candidates,
                                            divert_start_step=args.divert_start_step, threshold=args.pair_threshold)
        parts.append(rollout.pairs)
        compared[args.divert_start_step:] += len(ids)
    pairs = online.Pairs.cat(parts)
    finals = continue_to_the_end(setup, pairs, prompts, args.seed)
    texts = [prompts[int(p)] for p in pairs.prompt]
    with torch.no_grad():
        judge_w, judge_l = (judge.score(finals[:, j], texts).float() for j in (0, 1))
        reward_w, reward_l = (label_reward.score(finals[:, j], texts).float() for j in (0, 1))

    summary = {"args": vars(args), "pairs": len(pairs), "seconds": round(time.perf_counter() - start, 1), "by_step": []}
    for i in range(args.divert_start_step, args.num_inference_steps):
        rows = pairs.step == i
        kept = int(rows.sum())
        entry = {"step": i, "validity": kept / max(int(compared[i]), 1), "pairs": kept}
        if kept:
            entry["judge_agrees"] = float((judge_w[rows] > judge_l[rows]).float().mean())
            entry["reward_agrees"] = float((reward_w[rows] > reward_l[rows]).float().mean())
            entry["judge_gap"] = float((judge_w[rows] - judge_l[rows]).mean())
        summary["by_step"].append(entry)
    summary["judge_agrees"] = float((judge_w > judge_l).float().mean())
    summary["reward_agrees"] = float((reward_w > reward_l).float().mean())

    if args.lora:
        from contextlib import contextmanager

        @contextmanager
        def reference():
            adapter.denoiser.disable_adapters() if hasattr(adapter.denoiser, "disable_adapters") else None
            try:
                yield adapter.denoiser
            finally:
                adapter.denoiser.enable_adapters() if hasattr(adapter.denoiser, "enable_adapters") else None

        with torch.no_grad():
            logp, ref_logp = online.pair_log_probs(setup, adapter.denoiser, reference, pairs, prompts)
        log_ratio = (logp - ref_logp).double()
        summary["implicit_acc_fresh_pairs"] = float((log_ratio[:, 0] > log_ratio[:, 1]).float().mean())
        summary["log_ratio_abs_mean"] = float(log_ratio.abs().mean())
        summary["log_ratio_w_minus_l_mean"] = float((log_ratio[:, 0] - log_ratio[:, 1]).mean())

    print(json.dumps({k: v for k, v in summary.items() if k != "by_step"}, indent=1))
    print(f"{'step':>4} {'validity':>8} {'pairs':>5} {'judge agrees':>12} {'reward agrees':>13} {'judge gap':>9}")
    for e in summary["by_step"]:
        print(f"{e['step']:>4} {e['validity']:>8.2f} {e['pairs']:>5} {e.get('judge_agrees', float('nan')):>12.2f} "
              f"{e.get('reward_agrees', float('nan')):>13.2f} {e.get('judge_gap', float('nan')):>9.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
