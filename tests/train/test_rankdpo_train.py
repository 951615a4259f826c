"""`diffalign label` -> ranked JSONL -> RankDPO through the training loop: the label scores arrive."""

import json
import math

import pytest
from helpers import redness

from diffalign import label as lab
from diffalign.rewards import REWARDS, register_reward


def test_rankdpo_trains_on_labelled_ranked_lists(tiny_sd, tiny_sd_dir, tmp_path):
    pytest.importorskip("diffalign.train")
    from safetensors.torch import load_file

    from diffalign.config import TrainConfig
    from diffalign.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    register_reward("test-red-train", redness, overwrite=True)
    try:
        lab.label(lab.LabelConfig(model="unused", prompts=str(prompts), output_dir=str(tmp_path / "syn"),
                                  rewards=["test-red-train"], num_images=3, num_inference_steps=2, resolution=32), pipe=tiny_sd)
    finally:
        REWARDS.pop("test-red-train")
    row = json.loads((tmp_path / "syn" / "ranked.jsonl").read_text())
    psi = row["scores"]
    assert psi == [1.0, 0.5, 0.0]

    cfg = TrainConfig(method="rankdpo", model=str(tiny_sd_dir), dataset=str(tmp_path / "syn" / "ranked.jsonl"),
                      output_dir=str(tmp_path / "run"), resolution=32, max_steps=2, batch_size=1, lr=1e-2,
                      checkpoint_every=0, seed=0, lora_targets=["to_q", "to_k", "to_v", "to_out.0"])
    train(cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Step 1: policy == reference, so every s_i = 0, the model's ranking is the data order and the
    # loss is log 2 times the sum of the DCG weights of the truly ordered pairs.
    expected = sum(
        abs(2 ** psi[i] - 2 ** psi[j]) * abs(1 / math.log2(2 + i) - 1 / math.log2(2 + j)) * math.log(2)
        for i in range(3) for j in range(i + 1, 3)
    )
    assert metrics[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(metrics[1]["loss"]) and metrics[1]["loss"] != pytest.approx(expected, rel=1e-6)
    weights = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
