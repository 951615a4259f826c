"""`diffalign train --method spo` under `accelerate launch` (2 CPU processes, gloo): each process
rolls out its own prompts, the pairs are pooled, and the run equals one process with the same
global rollout and global batch (same losses, same LoRA)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli_command, run_cli


def spo_cmd(model: str, prompts: Path, out: Path, processes: int) -> list[str]:
    # The global rollout is 2 prompts and the global batch 4 pairs either way.
    per_process = {"--batch-size": str(4 // processes), "--rollout-prompts": str(2 // processes)}
    flags = ["train", "--method", "spo", "--model", model, "--prompts", str(prompts), "--reward", "helpers:brightness",
             "--output-dir", str(out), "--max-steps", "3", "--resolution", "32", "--lr", "1e-3", "--lora-rank", "4",
             "--num-inference-steps", "5", "--divert-start-step", "2", "--num-candidates", "3", "--pair-threshold", "0",
             "--checkpoint-every", "0", "--seed", "3", *[x for kv in per_process.items() for x in kv]]
    return cli_command(flags, processes)


def test_two_processes_train_as_one_with_the_same_global_batch(tiny_sd_dir, prompts_file, tmp_path):
    run_cli(spo_cmd(tiny_sd_dir, prompts_file, tmp_path / "one", 1))
    run_cli(spo_cmd(tiny_sd_dir, prompts_file, tmp_path / "two", 2))
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2, 3]
    for key in ("loss", "reward_margin", "pair_rate", "rollouts"):
        assert [r[key] for r in rows["two"]] == pytest.approx([r[key] for r in rows["one"]], abs=1e-5), key
    one = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    ups = [v for k, v in one.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)  # zero at init: the runs trained
