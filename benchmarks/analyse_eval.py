"""Why is a win rate what it is? Reads `diffalign eval` outputs (eval/scores.jsonl) and splits
the paired win rate into a mean gain and a re-draw effect.

    python benchmarks/analyse_eval.py outputs/quickstart-dpo/eval [more eval dirs] --reward toy-judge

For each run: the mean score gain of the model over the baseline on the same seeds, its size
in pooled standard deviations (d), the win rate two independent draws would give, Φ(d/√2), the
share of images whose score moved by more than half a standard deviation, the win rate on the
first and on the second half of each prompt's images (the evaluation's own noise), and the win
rate in each quartile of the baseline's scores. When fine-tuning re-draws the picture a seed gives
(big moves, wins piled up where the baseline did worst), the paired win rate approaches
Φ(d/√2): it is then set by the mean gain, and a gain of d ≈ 0.36 is what a win rate of 0.60 needs.

With --pool, a last line pools the runs given (e.g. the 3 training seeds of one method, each
evaluated on the same prompts): the win rate over all their images and its 95% interval from a
bootstrap over prompts, each prompt carrying its images from every run. It measures the
evaluation's noise on the pooled images; the spread between the runs' own lines shows the
training-seed noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import fmean


def read_scores(scores_jsonl: Path) -> list[dict]:
    if not scores_jsonl.is_file():
        raise SystemExit(f"{scores_jsonl} not found: pass the eval folders `diffalign eval` or `diffalign train` wrote")
    return [json.loads(line) for line in scores_jsonl.read_text().splitlines() if line.strip()]


def analyse(scores_jsonl: Path, reward: str) -> dict:
    from diffalign.evaluate import gain_diagnostics, win_fractions

    rows = read_scores(scores_jsonl)
    if not rows or reward not in rows[0]:
        raise SystemExit(f"{scores_jsonl}: no scores for reward {reward!r}")
    model = [r[reward]["model"] for r in rows]
    base = [r[reward]["baseline"] for r in rows]
    wins = win_fractions(model, base)
    order = sorted(range(len(rows)), key=lambda i: base[i])
    quarter = max(1, len(rows) // 4)
    by_quartile = [fmean(wins[i] for i in order[q * quarter:(q + 1) * quarter]) for q in range(4)]
    return {"images": len(rows), "win_rate": fmean(wins), **gain_diagnostics(model, base),
            "win_by_baseline_quartile": by_quartile, "win_by_image_half": win_by_image_half(rows, wins)}


def pooled_win(eval_dirs: list[Path], reward: str) -> tuple[float, tuple[float, float], int]:
    """Win rate over every image of every run, with a percentile bootstrap over prompts."""
    from diffalign.evaluate import bootstrap_over_prompts, win_fractions

    wins, prompt_ids, index = [], [], {}
    for folder in eval_dirs:
        rows = read_scores(folder / "scores.jsonl")
        wins += win_fractions([r[reward]["model"] for r in rows], [r[reward]["baseline"] for r in rows])
        prompt_ids += [index.setdefault(r["prompt"], len(index)) for r in rows]
    return fmean(wins), bootstrap_over_prompts(wins, prompt_ids), len(wins)


def win_by_image_half(rows: list[dict], wins: list[float]) -> tuple[float, float]:
    """Win rate over the first and the second half of each prompt's images: two evaluations of the
    same model on the same prompts with different seeds, so their gap shows the evaluation's own noise."""
    per_prompt: dict[str, list[float]] = {}
    for row, win in zip(rows, wins):
        per_prompt.setdefault(row["prompt"], []).append(win)
    first = [w for ws in per_prompt.values() for w in ws[: len(ws) // 2]]
    second = [w for ws in per_prompt.values() for w in ws[len(ws) // 2:]]
    return (fmean(first) if first else float("nan"), fmean(second) if second else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="folders holding scores.jsonl")
    parser.add_argument("--reward", default="toy-judge")
    parser.add_argument("--pool", action="store_true", help="add a line pooling every run's images")
    args = parser.parse_args()
    print(f"{'run':40} {'images':>6} {'win':>6} {'gain':>6} {'d':>6} {'Φ(d/√2)':>8} {'moved':>6}  {'halves':>11}  win by baseline quartile")
    for folder in args.eval_dirs:
        r = analyse(folder / "scores.jsonl", args.reward)
        quartiles = " ".join(f"{w:.2f}" for w in r["win_by_baseline_quartile"])
        halves = "/".join(f"{w:.3f}" for w in r["win_by_image_half"])
        print(f"{str(folder)[-40:]:40} {r['images']:6d} {r['win_rate']:6.3f} {r['mean_gain']:6.2f} "
              f"{r['effect_size_d']:6.3f} {r['independent_draw_win']:8.3f} {r['moved_share']:6.2f}  {halves:>11}  {quartiles}")

    if args.pool:
        win, (lo, hi), images = pooled_win(args.eval_dirs, args.reward)
        print(f"{'pooled (' + str(len(args.eval_dirs)) + ' runs)':40} {images:6d} {win:6.3f}  95% CI [{lo:.3f}, {hi:.3f}]")


if __name__ == "__main__":
    main()
