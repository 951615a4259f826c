"""`diffalign score`: score images with one or several reward models.

    diffalign score --reward pickscore,hpsv2.1 --prompt "a red bicycle" img1.png img2.png
    diffalign score --reward hpsv2@./weights --input pairs.jsonl --output-file scores.csv

`--reward` takes the reward spec of every command (diffalign.edges, `NAME[@PATH][=WEIGHT],...`;
@PATH points a reward at local weights; each reward is reported on its own, so weights only
label the spec). `--input` is a JSONL or CSV file with `prompt` and `image` fields; relative
image paths are taken relative to that file's folder. Scores print as a table and optionally go
to CSV/JSONL.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from diffalign.edges import atomic_write_text, load_rewards, parse_dtype, parse_reward_specs
from diffalign.errors import DiffalignError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", help="image files to score (with --prompt)")
    parser.add_argument("--reward", required=True, metavar="SPEC",
                        help="rewards, NAME[@PATH][=WEIGHT],... e.g. pickscore,hpsv2.1@weights/HPS_v2.1_compressed.pt")
    parser.add_argument("--prompt", help="the prompt for every IMAGE")
    parser.add_argument("--input", help="JSONL or CSV file with 'prompt' and 'image' fields")
    parser.add_argument("--reward-opt", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="builder option for one reward, VALUE as JSON if it parses, e.g. hpsv2.1:scale=100")
    parser.add_argument("--output-file", help="write the scores to this .csv or .jsonl file")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="fp32", help="reward dtype: fp32 | fp16 | bf16")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning instead of failing")


def parse_options(items: list[str], names: list[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in items:
        name, sep, assignment = item.partition(":")
        key, eq, raw = assignment.partition("=")
        if not sep or not eq or not key:
            raise DiffalignError(f"--reward-opt {item!r} is malformed: write --reward-opt NAME:KEY=VALUE, e.g. hpsv2.1:scale=100")
        if name not in options:
            raise DiffalignError(f"--reward-opt {item!r} names {name}, which is not in --reward {','.join(names)}: fix the name")
        try:
            options[name][key] = json.loads(raw)
        except json.JSONDecodeError:
            options[name][key] = raw  # a plain string such as a folder
    return options


def read_rows(args: argparse.Namespace) -> list[dict[str, str]]:
    """(prompt, image path) rows from --input, or from --prompt and the positional images."""
    if args.input and (args.images or args.prompt):
        raise DiffalignError("give either --input FILE or --prompt with IMAGE files, not both")
    if not args.input:
        if not args.images or args.prompt is None:
            raise DiffalignError("nothing to score: pass --prompt TEXT IMAGE... or --input FILE.jsonl|csv")
        return [{"prompt": args.prompt, "image": image} for image in args.images]
    path = Path(args.input)
    if not path.is_file():
        raise DiffalignError(f"input file {args.input!r} not found: check the path")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DiffalignError(f"input file {args.input!r} has an unknown format: use .jsonl or .csv")
    for i, row in enumerate(rows):
        if "prompt" not in row or "image" not in row:
            raise DiffalignError(f"row {i + 1} of {args.input!r} lacks 'prompt' or 'image': both columns are required")
    if not rows:
        raise DiffalignError(f"input file {args.input!r} has no rows: add prompt,image rows")
    return [{"prompt": str(r["prompt"]), "image": str(path.parent / r["image"])} for r in rows]


def load_rows(rows: list[dict[str, str]], skip_bad: bool) -> tuple[list[dict[str, str]], list[Any]]:
    """Read every image once, kept as a PIL image so each reward preprocesses it as its original
    does; check that every video file or frame folder opens (videoreward decodes it when
    scoring, so it stays a path). An unreadable one fails, or is skipped with a warning."""
    from diffalign.rewards.base import load_pil
    from diffalign.rewards.videoreward import is_video_path, probe_video

    kept, images = [], []
    for row in rows:
        try:
            if is_video_path(row["image"]):
                probe_video(row["image"])
                images.append(row["image"])
            else:
                images.append(load_pil(row["image"]))
        except DiffalignError as err:
            if not skip_bad:
                raise DiffalignError(f"{err} (pass --skip-bad to skip such images)") from None
            warnings.warn(f"skipping {row['image']}: {err}", stacklevel=1)
            continue
        kept.append(row)
    if not kept:
        raise DiffalignError("no readable images left to score: check the image files")
    return kept, images


def score_all(rewards: dict[str, Any], images: list[Any], prompts: list[str], batch_size: int) -> dict[str, list[float]]:
    """{name: scores}; a video reward with VideoReward's dimensions (`score_dimensions`) adds
    "NAME.VQ", "NAME.MQ", "NAME.TA" beside its overall score."""
    import torch
    from tqdm.auto import tqdm

    scores: dict[str, list[float]] = {name: [] for name in rewards}
    starts = range(0, len(images), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="scoring", unit="batch", disable=len(starts) < 2, file=sys.stderr):
            batch, batch_prompts = images[start : start + batch_size], prompts[start : start + batch_size]
            for name, reward in rewards.items():
                if hasattr(reward, "score_dimensions"):
                    parts = reward.score_dimensions(batch, batch_prompts)
                    scores[name].extend(parts.pop("Overall").tolist())
                    for dim, values in parts.items():
                        scores.setdefault(f"{name}.{dim}", []).extend(values.tolist())
                else:
                    scores[name].extend(reward.score(batch, batch_prompts).tolist())
    return scores


def format_table(records: list[dict[str, Any]], names: list[str]) -> str:
    headers = ["image", "prompt", *names]
    cells = [[str(Path(r["image"]).name), _shorten(r["prompt"], 40), *(f"{r[n]:.4f}" for n in names)] for r in records]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def write_output(path: str, records: list[dict[str, Any]], names: list[str]) -> None:
    out = Path(path)
    if out.suffix not in (".csv", ".jsonl"):
        raise DiffalignError(f"--output-file {path!r} has an unknown format: use .csv or .jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
        return
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["image", "prompt", *names])
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(out, text.getvalue())


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise DiffalignError(f"--batch-size {args.batch_size} must be at least 1")
    dtype = parse_dtype(args.dtype)
    rows, images = load_rows(read_rows(args), args.skip_bad)
    specs = parse_reward_specs(args.reward)  # every check before the first reward model loads
    options = parse_options(args.reward_opt, [spec.name for spec in specs])
    rewards = load_rewards(specs, device=args.device, dtype=dtype, options=options)
    scores = score_all(rewards, images, [r["prompt"] for r in rows], args.batch_size)
    names = list(scores)
    records = [{**row, **{n: scores[n][i] for n in names}} for i, row in enumerate(rows)]
    print(format_table(records, names))
    if args.output_file:
        write_output(args.output_file, records, names)
        print(f"wrote {len(records)} rows to {args.output_file}")
    return 0
