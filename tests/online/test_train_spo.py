"""`diffalign train --method spo` end to end on the tiny SD pipeline: outputs, exact resume,
and bad input refused in one line before any rollout."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.config import TrainConfig, validate
from diffalign.errors import DiffalignError
from diffalign.train import train


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3)) * 100


@pytest.fixture(autouse=True)
def bright_reward(monkeypatch):
    from diffalign import rewards

    monkeypatch.setitem(rewards.REWARDS, "bright", brightness)


def cfg_for(model, prompts, out, **kw):
    base = dict(method="spo", model=model, prompts=str(prompts), reward="bright", output_dir=str(out), resolution=32,
                batch_size=2, max_steps=3, lr=1e-3, lora_rank=4, checkpoint_every=0, seed=0, num_inference_steps=6,
                divert_start_step=2, num_candidates=3, pair_threshold=0.0, rollout_prompts=2)
    base.update(kw)
    return TrainConfig(**base)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_trains_a_lora_from_its_own_pairs(tiny_sd_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--method", "spo", "--model", tiny_sd_dir, "--prompts", str(prompts_file), "--reward", "bright",
                 "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2", "--resolution", "32", "--lr", "1e-3",
                 "--lora-rank", "4", "--num-inference-steps", "6", "--divert-start-step", "2", "--num-candidates", "3",
                 "--pair-threshold", "0", "--rollout-prompts", "2", "--checkpoint-every", "0"])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "pytorch_lora_weights.safetensors"):
        assert (out / name).is_file(), name
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert rows[-1]["pair_rate"] == 1.0 and rows[-1]["rollouts"] >= 1
    assert any(abs(r["loss"] - math.log(2)) > 1e-7 for r in rows[1:])  # the policy moved


def test_resume_equals_an_uninterrupted_run(tiny_sd_dir, prompts_file, tmp_path):
    """The pairs not yet trained on and the rollout position are in the checkpoint: a run
    stopped at step 2 (mid-rollout buffer) and resumed ends where the whole run ends."""
    full = tmp_path / "full"
    train(cfg_for(tiny_sd_dir, prompts_file, full, max_steps=5, checkpoint_every=2))
    part = tmp_path / "part"
    train(cfg_for(tiny_sd_dir, prompts_file, part, max_steps=2, checkpoint_every=2))
    train(cfg_for(tiny_sd_dir, prompts_file, part, max_steps=5, checkpoint_every=2, resume="latest"))
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [r["loss"] for r in metrics(full)] == pytest.approx([r["loss"] for r in metrics(part)], abs=1e-6)
    assert [r["rollouts"] for r in metrics(full)] == [r["rollouts"] for r in metrics(part)]
    assert max(r["rollouts"] for r in metrics(full)) >= 2  # the resumed part made rollouts of its own


def no_rollout(monkeypatch):
    from diffalign import online

    def refuse(*args, **kwargs):
        raise AssertionError("a rollout ran before the input was checked")

    monkeypatch.setattr(online, "branch_rollout", refuse)


@pytest.mark.parametrize("change, message", [
    ({"num_candidates": 1}, "--num-candidates 1 is too small"),
    ({"reward": "videoreward"}, "scores videos"),
    ({"reward": None}, "needs --reward"),
    ({"prompts": None}, "needs --prompts"),
    ({"dataset": "pairs.parquet"}, "drop --dataset"),
    ({"sampler_eta": 0.0}, "deterministic step"),
    ({"divert_start_step": 6}, "leaves no branching step"),
    ({"pair_threshold": 1.0}, "--pair-threshold"),
    ({"objective": {"eps": 1.5}}, "below 1"),
])
def test_bad_online_options_fail_in_one_line_before_loading(change, message, prompts_file, tmp_path, monkeypatch):
    no_rollout(monkeypatch)
    cfg = replace(cfg_for("no/such-model", prompts_file, tmp_path / "x"), **change)
    with pytest.raises(DiffalignError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value)


def test_empty_prompt_file_and_offline_methods(prompts_file, tmp_path, monkeypatch):
    no_rollout(monkeypatch)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DiffalignError, match="holds no prompts"):
        train(cfg_for("no/such-model", empty, tmp_path / "x"))
    with pytest.raises(DiffalignError, match="online methods"):
        validate(TrainConfig(method="dpo", model="m", dataset="d", prompts=str(prompts_file)))


def test_a_model_with_no_stochastic_sampler_fails_before_any_rollout(tiny_sd_dir, prompts_file, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    no_rollout(monkeypatch)
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()  # an epsilon UNet on a flow scheduler: no DDIM step
    with pytest.raises(DiffalignError, match="no stochastic sampler") as err:
        train(cfg_for(tiny_sd_dir, prompts_file, tmp_path / "x"), pipeline=pipe)
    assert "\n" not in str(err.value)


def test_no_pair_above_the_threshold_stops_with_advice(tiny_sd_dir, prompts_file, tmp_path):
    with pytest.raises(DiffalignError, match="lower it"):
        train(cfg_for(tiny_sd_dir, prompts_file, tmp_path / "x", pair_threshold=0.999999, num_inference_steps=3,
                      divert_start_step=1, num_candidates=2))


def test_the_quickstart_recipe_runs_spo_on_toy_sd(tmp_path):
    import argparse

    from diffalign.train import quickstart_base

    base = quickstart_base(argparse.Namespace(method="spo", model=None, dataset=None, prompts=None, config=None))
    assert (base.method, base.model, base.prompts, base.reward) == ("spo", "toy-sd", "toy", "toy-spm")
    validate(base)
    out = tmp_path / "toy"
    result = train(replace(base, output_dir=str(out), max_steps=1, batch_size=1, rollout_prompts=1, num_candidates=2,
                           num_inference_steps=6, divert_start_step=1, checkpoint_every=0, eval_prompts=None))
    assert result["step"] == 1 and (out / "pytorch_lora_weights.safetensors").is_file()


def test_flow_models_roll_out_with_the_flow_sde_step(tiny_sd3_dir, prompts_file, tmp_path):
    out = tmp_path / "sd3"
    result = train(cfg_for(tiny_sd3_dir, prompts_file, out, max_steps=2, num_inference_steps=4, divert_start_step=1,
                           num_candidates=2))
    rows = metrics(out)
    assert result["step"] == 2 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(r["logp_w"]) for r in rows)
