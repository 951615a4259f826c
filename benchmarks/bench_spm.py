"""How well does the step-aware preference model judge noisy pairs? Pairwise accuracy on the
held-out noised toy pairs at fixed t, for toy-spm and, on the same images, toy-reward.

    OMP_NUM_THREADS=1 python benchmarks/bench_spm.py --output build/bench/spm.json

The pairs: toy-sd's preference pairs (assets/toy-data/toy-sd/pairs.parquet, labelled by
toy-reward on the clean samples) whose prompts toy-spm held out of its training
(assets/toy-spm/heldout_prompts.txt). At each t, both images of a pair are noised with the same
noise, toy-sd predicts x0 (DDIM's pred_original_sample, guided at the model's own scale) and the
decoded x0 is scored: toy-spm at t, toy-reward ignoring t (what SPO does with a reward that has no
timestep input). t = 0 scores the clean images, as the original's evaluation. Each t > 0 is
measured with --repeats noise draws per pair; the interval is a 95% bootstrap over pairs (each
pair carrying its draws), and the last column is toy-spm minus toy-reward on the same images.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from statistics import fmean


def bootstrap(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(fmean(rng.choices(values, k=len(values))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def main(argv: list[str] | None = None) -> int:
    from diffalign.paths import asset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spm", default=str(asset("toy-spm")), help="the SPM folder (default: the shipped toy-spm)")
    parser.add_argument("--reward", default=str(asset("toy-reward")), help="the t-blind reward beside it (toy-reward)")
    parser.add_argument("--model", default=str(asset("toy-sd")), help="the base model that predicts x0")
    parser.add_argument("--pairs", default=str(asset("toy-data") / "toy-sd" / "pairs.parquet"))
    parser.add_argument("--heldout", default=None, help="held-out prompts, one a line (default: SPM/heldout_prompts.txt)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[0, 250, 500, 750, 950])
    parser.add_argument("--repeats", type=int, default=3, help="noise draws per pair at each t > 0")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import pyarrow
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import tempfile

    from diffalign.edges import sampling_defaults
    from diffalign.models import load_adapter
    from diffalign.rewards.pickscore import PickScoreReward
    from diffalign.rewards.spm import SPMReward
    from diffalign.train import model_resolution
    from diffalign.train_spm import SPMConfig, build_pairs, noised_pair_correct

    start = time.time()
    heldout = Path(args.heldout or Path(args.spm) / "heldout_prompts.txt").read_text().split("\n")
    heldout = [p for p in heldout if p]
    table = pq.read_table(args.pairs)
    table = table.filter(pc.is_in(table.column("caption"), value_set=pyarrow.array(heldout)))
    resolution = model_resolution(args.model)
    guidance = float(sampling_defaults(args.model).get("guidance_scale", 5.0))
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / "heldout.parquet")
        pairs = build_pairs(SPMConfig(base_model="", dataset=str(Path(tmp) / "heldout.parquet"), init="", output_dir="",
                                      resolution=resolution))
        adapter = load_adapter(args.model)
        scorers = {"toy-spm": SPMReward.from_pretrained(args.spm, name="toy-spm"),
                   "toy-reward": PickScoreReward.from_pretrained(args.reward, name="toy-reward")}
        per_pair = {name: {t: [0.0] * len(pairs) for t in args.timesteps} for name in scorers}
        for r in range(args.repeats):
            ts = [t for t in args.timesteps if t > 0 or r == 0]
            found = noised_pair_correct(adapter, scorers, pairs, ts, guidance_scale=guidance, seed=r)
            for name, by_t in found.items():
                for t, values in by_t.items():
                    draws = 1 if t == 0 else args.repeats
                    per_pair[name][t] = [a + v / draws for a, v in zip(per_pair[name][t], values)]
    rows = []
    for t in args.timesteps:
        spm, reward = per_pair["toy-spm"][t], per_pair["toy-reward"][t]
        diff = [a - b for a, b in zip(spm, reward)]
        rows.append({"t": t, "pairs": len(spm), "draws": 1 if t == 0 else args.repeats,
                     "toy-spm": fmean(spm), "toy-spm_ci": bootstrap(spm), "toy-reward": fmean(reward),
                     "toy-reward_ci": bootstrap(reward), "difference": fmean(diff), "difference_ci": bootstrap(diff)})
    print("| t | toy-spm | toy-reward (decoded x0, t ignored) | toy-spm - toy-reward | pairs x draws |")
    print("|---|---|---|---|---|")
    for row in rows:
        ci = {k: f"[{row[k + '_ci'][0]:.3f}, {row[k + '_ci'][1]:.3f}]" for k in ("toy-spm", "toy-reward", "difference")}
        print(f"| {row['t']} | {row['toy-spm']:.3f} {ci['toy-spm']} | {row['toy-reward']:.3f} {ci['toy-reward']} | "
              f"{row['difference']:+.3f} {ci['difference']} | {row['pairs']} x {row['draws']} |")
    seconds = round(time.time() - start, 1)
    print(f"({len(heldout)} held-out prompts, guidance {guidance}, {seconds} s)")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"rows": rows, "heldout_prompts": len(heldout), "guidance_scale": guidance,
                                           "seconds": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
