"""`diffalign train --method grpo` under `accelerate launch` (2 CPU processes, gloo): each process
samples its prompts' whole groups, the rewards are gathered for the advantages (global std on),
and the run equals one process with the same global rollout and global batch (same metrics,
same LoRA), with the KL reference and a random window of trained steps."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli_command, run_cli


def grpo_cmd(model: str, prompts: Path, out: Path, processes: int) -> list[str]:
    # The global rollout is 2 prompts x 4 images and the global batch 4 images either way; a
    # process's batch holds a whole multiple of its groups' count (GroupBuffer's order).
    per_process = {"--batch-size": str(4 // processes), "--rollout-prompts": str(2 // processes)}
    flags = ["train", "--method", "grpo", "--model", model, "--prompts", str(prompts), "--reward", "helpers:brightness",
             "--output-dir", str(out), "--max-steps", "3", "--resolution", "32", "--lr", "1e-3", "--lora-rank", "4",
             "--num-inference-steps", "3", "--group-size", "4", "--train-steps", "window:2", "--global-std",
             "--objective", "kl_beta=0.1", "--objective", "clip_range=0.2", "--checkpoint-every", "0", "--seed", "3",
             *[x for kv in per_process.items() for x in kv]]
    return cli_command(flags, processes)


def test_two_processes_train_as_one_with_the_same_global_group(tiny_sd3_dir, prompts_file, tmp_path):
    run_cli(grpo_cmd(tiny_sd3_dir, prompts_file, tmp_path / "one", 1))
    run_cli(grpo_cmd(tiny_sd3_dir, prompts_file, tmp_path / "two", 2))
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]
    keys = ("loss", "ratio", "kl", "advantage", "reward_mean", "reward_std", "zero_std_share", "rollouts", "images")
    # The gradient all-reduce sums in another order; where a LoRA weight's gradients nearly
    # cancel, Adam (m / sqrt(v)) magnifies that rounding, so after two steps the weights agree to
    # a tenth of one step (lr 1e-3) and the third loss to 1e-4; other groups, rewards or
    # advantages move them by whole steps.
    for key in keys:
        assert [r[key] for r in rows["two"]] == pytest.approx([r[key] for r in rows["one"]], abs=1e-4), key
    one = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys()
    moved = 0.0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-4)
        moved = max(moved, float((one[key]).abs().max()))
    assert moved > 0
