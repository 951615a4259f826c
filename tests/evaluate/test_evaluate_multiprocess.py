"""`diffalign eval` under `accelerate launch` (2 CPU processes, gloo): the same eval.json,
scores.jsonl and grid as one process; the baseline cache works across process counts."""

import json
from pathlib import Path

from diffalign.evaluate import in_batches
from diffalign.processes import Processes

from helpers import cli_command, run_cli


def test_batches_are_dealt_to_the_processes_in_turn():
    everyone = [in_batches(10, 3, Processes(rank=r, world=2)) for r in range(2)]
    assert everyone == [[(0, 3), (6, 9)], [(3, 6), (9, 10)]]
    assert in_batches(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # one process: all of them


def eval_cmd(model: str, baseline: str, prompts: Path, out: Path, processes: int, cache: str | None) -> list[str]:
    flags = ["eval", "--model", model, "--baseline", baseline, "--prompts", str(prompts), "--reward",
             "helpers:redness,helpers:brightness", "--num-images", "2", "--seed", "3", "--output-dir", str(out),
             "--num-inference-steps", "2", "--guidance-scale", "3", "--resolution", "32", "--batch-size", "4"]
    flags += ["--baseline-cache", cache] if cache else ["--no-baseline-cache"]
    return cli_command(flags, processes)


def test_two_processes_write_the_eval_of_one(tiny_sd_dir, tmp_path):
    from diffalign.testing import save_tiny_pipeline

    other = str(save_tiny_pipeline("sd", tmp_path / "other-sd", seed=1))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green ring\na yellow star\na purple cross\n")
    cache = str(tmp_path / "cache")
    run_cli(eval_cmd(other, tiny_sd_dir, prompts, tmp_path / "one", 1, None))
    out = run_cli(eval_cmd(other, tiny_sd_dir, prompts, tmp_path / "two", 2, cache))
    assert out.count("wrote ") == 1  # the main process reports and writes
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert one == two and one["num_images"] == 10
    for name in ("scores.jsonl", "grid.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    # The baseline the two processes drew was kept; the next run reads it back, same numbers.
    run_cli(eval_cmd(other, tiny_sd_dir, prompts, tmp_path / "again", 2, cache))
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["baseline_images"].startswith("cache") and again["rewards"] == one["rewards"]
