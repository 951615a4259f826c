"""`diffalign label` under `accelerate launch` (2 CPU processes, gloo) writes the dataset one
process writes, and resumes one process's unfinished run."""

import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from helpers import cli_command, run_cli


def label_cmd(model: str, prompts: Path, out: Path, processes: int) -> list[str]:
    flags = ["label", "--model", model, "--prompts", str(prompts), "--num-images", "3", "--reward",
             "helpers:redness,helpers:brightness", "--output-dir", str(out), "--seed", "7", "--batch-size", "4",
             "--num-inference-steps", "2", "--guidance-scale", "3", "--resolution", "32"]
    return cli_command(flags, processes)


def dataset(out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    rows = [json.loads(f.read_text()) for f in sorted((out / "rows").glob("*.json"))]
    ranked = [json.loads(line) for line in (out / "ranked.jsonl").read_text().splitlines()]
    return rows, ranked, pq.read_table(out / "pairs.parquet").to_pylist()


def test_two_processes_write_the_dataset_of_one(tiny_sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    # 5 prompts of 3 images in batches of 4: one prompt a chunk, 5 chunks dealt 3 / 2.
    prompts.write_text("a red circle\na blue square\na green ring\na yellow star\na purple cross\n")
    run_cli(label_cmd(tiny_sd_dir, prompts, tmp_path / "one", 1))
    run_cli(label_cmd(tiny_sd_dir, prompts, tmp_path / "two", 2))
    one, two = dataset(tmp_path / "one"), dataset(tmp_path / "two")
    assert len(one[0]) == 5 and one == two  # rows (scores, ranks, seeds), ranked.jsonl, pairs with image bytes
    for name in sorted(os.listdir(tmp_path / "one" / "images")):
        assert (tmp_path / "one" / "images" / name).read_bytes() == (tmp_path / "two" / "images" / name).read_bytes()
    stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert stats["prompts_per_process"] == [3, 2] and stats["rows"] == 5  # chunks 0, 2, 4 and 1, 3

    # Resume one process's interrupted run with two: the missing rows are made, nothing else changes.
    for p in (1, 3):
        (tmp_path / "one" / "rows" / f"{p:06d}.json").unlink()
    (tmp_path / "one" / "ranked.jsonl").unlink()
    run_cli(label_cmd(tiny_sd_dir, prompts, tmp_path / "one", 2))
    assert dataset(tmp_path / "one") == two
    assert json.loads((tmp_path / "one" / "stats.json").read_text())["prompts_per_process"] == [0, 2]
