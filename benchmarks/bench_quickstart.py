"""The toy world's proof: does preference training beat the base model, judged independently?

Runs the quickstart (`diffalign train --method M` with no model/dataset: toy-sd, or toy-flow
for flow-dpo) for each method and seed, then reads each run's eval.json and prints one table:
held-out win rate over the base model under toy-judge (never used to label the training data)
and under toy-reward (which labelled it), each with its 95% interval, plus wall time.
Each run is evaluated on 4 images per held-out prompt (`--eval-images`); the quickstart's own
default of 2 keeps a demo run under 5 minutes but is too noisy to judge a win rate near 0.60.

    python benchmarks/bench_quickstart.py --methods dpo,mapo,sft,flow-dpo --seeds 0,1,2
    python benchmarks/bench_quickstart.py --methods rankdpo,dcpo --seeds 0,1,2 --extra "--max-steps 300"
    python benchmarks/bench_quickstart.py --methods rankdpo,dcpo --model toy-flow   # the flow forms

A large gap between the two rewards' win rates is reward hacking; the script flags it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from analyse_eval import pooled_win  # benchmarks/ is on sys.path when this script runs


def run_dir(root: Path, method: str, seed: int, model: str | None) -> Path:
    return root / (f"{method}-{model}-seed{seed}" if model else f"{method}-seed{seed}")


def run_one(method: str, seed: int, root: Path, extra: list[str], eval_images: int, model: str | None) -> dict:
    out = run_dir(root, method, seed, model)
    cmd = [sys.executable, "-m", "diffalign.cli", "train", "--method", method, "--seed", str(seed),
           "--output-dir", str(out), "--eval-num-images", str(eval_images)] + extra
    if model:  # a toy model alone: the quickstart on that model and its own data
        cmd += ["--model", model]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"method": method, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:], "seconds": seconds}
    report = json.loads((out / "eval" / "eval.json").read_text())
    return {"method": method, "seed": seed, "seconds": seconds, "eval": report}


def win(report: dict, reward: str) -> tuple[float, list[float]]:
    part = report["rewards"][reward]
    return part["win_rate"], part["win_rate_ci"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dpo,mapo,sft,flow-dpo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="outputs/bench-quickstart")
    parser.add_argument("--model", default=None,
                        help="toy-sd or toy-flow for every method (default: toy-flow for flow-dpo, toy-sd otherwise)")
    parser.add_argument("--extra", default="", help="extra `diffalign train` flags for every run")
    parser.add_argument("--eval-images", type=int, default=4,
                        help="images per held-out prompt; the quickstart itself uses 2 to stay under 5 minutes, "
                             "but two 2-image evaluations of one model differ by up to 0.08 in win rate")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    root = Path(args.root)
    results = []
    print(f"{'method':9} {'seed':>4} {'judge win':>9} {'judge 95% CI':>15} {'reward win':>10} {'reward 95% CI':>15} {'time s':>7}")
    for method in args.methods.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            r = run_one(method, seed, root, shlex.split(args.extra), args.eval_images, args.model)
            results.append(r)
            if "error" in r:
                print(f"{method:9} {seed:>4} failed: {r['error']}")
                continue
            jw, jci = win(r["eval"], "toy-judge")
            rw, rci = win(r["eval"], "toy-reward")
            flag = "  <- reward hacking?" if rw - jw > 0.15 else ""
            print(f"{method:9} {seed:>4} {jw:9.3f} [{jci[0]:.3f}, {jci[1]:.3f}] {rw:10.3f} [{rci[0]:.3f}, {rci[1]:.3f}] "
                  f"{r['seconds']:7.0f}{flag}", flush=True)
    print("\nmean over seeds")
    for method in args.methods.split(","):
        ok = [r for r in results if r["method"] == method and "error" not in r]
        if ok:
            jw = sum(win(r["eval"], "toy-judge")[0] for r in ok) / len(ok)
            rw = sum(win(r["eval"], "toy-reward")[0] for r in ok) / len(ok)
            lo = min(win(r["eval"], "toy-judge")[1][0] for r in ok)
            pooled, (plo, phi), _ = pooled_win([run_dir(root, method, r["seed"], args.model) / "eval" for r in ok], "toy-judge")
            print(f"{method:9} judge win {jw:.3f} (lowest CI bound {lo:.3f}; all seeds' images pooled {pooled:.3f} "
                  f"[{plo:.3f}, {phi:.3f}]), reward win {rw:.3f}, {len(ok)} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
