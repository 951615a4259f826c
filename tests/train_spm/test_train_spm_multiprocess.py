"""`diffalign train-spm` under `accelerate launch` (2 CPU processes, gloo): each process takes
its rows of the global batch and of the step's noise and t draw, so the run equals one process
with the same global batch (same losses, same weights)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli_command, run_cli


def spm_cmd(model: str, data: str, init: str, out: Path, processes: int) -> list[str]:
    flags = ["train-spm", "--base-model", model, "--dataset", data, "--init", init, "--output-dir", str(out),
             "--max-steps", "2", "--batch-size", str(4 // processes), "--resolution", "32", "--lr", "1e-3",
             "--guidance-scale", "3", "--log-every", "1", "--seed", "3"]
    return cli_command(flags, processes)


def test_two_processes_train_as_one_with_the_same_global_batch(tiny_sd_dir, hf_clip_folder, pairs_parquet, tmp_path):
    for name, processes in (("one", 1), ("two", 2)):
        run_cli(spm_cmd(tiny_sd_dir, pairs_parquet, str(hf_clip_folder), tmp_path / name, processes))
    rows = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == [1, 2]
    for key in ("loss", "train_acc"):
        assert [r[key] for r in rows["two"]] == pytest.approx([r[key] for r in rows["one"]], abs=1e-5), key
    one = load_file(str(tmp_path / "one" / "step_aware_preference_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "step_aware_preference_model.safetensors"))
    assert one.keys() == two.keys()
    # AdamW's first step is lr * g / (|g| + eps): where a gradient is ~eps, the all-reduce's float
    # order can flip it, moving a weight by up to 2 lr per step; a handful do, the rest agree.
    diffs = torch.cat([(two[key] - one[key]).abs().flatten() for key in one])
    assert diffs.max() < 2 * 2 * 1e-3 and (diffs > 1e-5).float().mean() < 1e-3, (diffs > 1e-5).float().mean()
    gate = "model.vision_model.adaLN_modulation.1.weight"
    assert float(one[gate].abs().max()) > 0  # zero at init: the runs trained
