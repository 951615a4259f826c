"""DCPO through the real training loop: with both captions equal to the prompt it is Diffusion-DPO."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import png


def write_pairs(path, caption_1):
    prompts = ["a red square", "a blue circle"]
    pq.write_table(pa.table({
        "caption": prompts, "jpg_0": [png((255, 0, 0)), png((0, 0, 255))], "jpg_1": [png((0, 255, 0)), png((90, 90, 9))],
        "label_0": [1.0, 1.0], "label_1": [0.0, 0.0], "caption_0": prompts, "caption_1": caption_1,
    }), path)
    return path


def train_run(method, model, dataset, out, steps):
    from safetensors.torch import load_file

    from diffalign.config import TrainConfig
    from diffalign.train import train

    cfg = TrainConfig(method=method, model=str(model), dataset=str(dataset), output_dir=str(out), beta=500.0,
                      resolution=32, max_steps=steps, batch_size=2, lr=1e-2, checkpoint_every=0, seed=3,
                      lora_targets=["to_q", "to_k", "to_v", "to_out.0"])
    train(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, load_file(str(out / "pytorch_lora_weights.safetensors"))


def test_dcpo_with_prompt_captions_trains_exactly_like_dpo(tiny_sd_dir, tmp_path):
    pytest.importorskip("diffalign.train")
    same = write_pairs(tmp_path / "same.parquet", ["a red square", "a blue circle"])
    dpo_metrics, dpo_weights = train_run("dpo", tiny_sd_dir, same, tmp_path / "dpo", steps=2)
    dcpo_metrics, dcpo_weights = train_run("dcpo", tiny_sd_dir, same, tmp_path / "dcpo", steps=2)
    keys = ("loss", "implicit_acc", "reward_margin", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l")
    for a, b in zip(dpo_metrics, dcpo_metrics):
        assert all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in keys)
    assert dpo_metrics[1]["loss"] != pytest.approx(0.6931, abs=1e-6)  # the second step saw a trained policy
    assert dpo_weights.keys() == dcpo_weights.keys()
    assert all(torch.allclose(dpo_weights[k], dcpo_weights[k], atol=1e-7) for k in dpo_weights)
    # Control: different loser captions change the loser's error, so the test can tell them apart.
    other = write_pairs(tmp_path / "other.parquet", ["a green square", "a yellow triangle"])
    other_metrics, _ = train_run("dcpo", tiny_sd_dir, other, tmp_path / "other", steps=1)
    assert other_metrics[0]["model_err_w"] == pytest.approx(dcpo_metrics[0]["model_err_w"], rel=1e-6)
    assert other_metrics[0]["model_err_l"] != pytest.approx(dcpo_metrics[0]["model_err_l"], rel=1e-6)


def test_dcpo_on_pairs_without_captions_fails_before_training(tiny_sd_dir, tmp_path):
    """Without caption_0/caption_1 DCPO would silently train as Diffusion-DPO."""
    from diffalign.errors import DiffalignError

    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"caption": ["a red square"] * 2, "jpg_0": [png((255, 0, 0))] * 2,
                             "jpg_1": [png((0, 255, 0))] * 2, "label_0": [1.0, 1.0]}), path)
    with pytest.raises(DiffalignError, match="dcpo needs a caption per image .* add caption_0/caption_1 columns"):
        train_run("dcpo", tiny_sd_dir, path, tmp_path / "out", steps=1)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
