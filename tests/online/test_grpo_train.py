"""`diffalign train --method grpo`: group rollouts whose stored log-probs the training pass
re-scores exactly (flow and DDPM), the batch order that makes N processes train as one, the
run end to end (metrics, sample grids, exact resume, the KL reference) and one-line errors."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign import online
from diffalign.config import TrainConfig, validate
from diffalign.errors import DiffalignError
from diffalign.sampler import DDIMStep, FlowSDEStep
from diffalign.train import train


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3)) * 100


@pytest.fixture(autouse=True)
def bright_reward(monkeypatch):
    from diffalign import rewards

    monkeypatch.setitem(rewards.REWARDS, "bright", brightness)


def rewards():
    from diffalign.rewards import FunctionReward

    return {"bright": (FunctionReward(brightness, "bright"), 1.0)}


@pytest.fixture(scope="module")
def tiny_sd3():
    from diffalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPTS = ["a red circle", "two blue squares"]


def rollout(pipe, transition, slots, steps=range(4), prompts=PROMPTS, size=3):
    setup = online.rollout_setup(pipe, "a", steps=4, guidance_scale=4.0, resolution=32, transition=transition)
    ids = list(range(len(prompts)))
    images = online.image_slots(slots, size)
    result = online.group_rollout(online.condition(setup, prompts), prompts, ids, images, rewards(),
                                  online.slot_generators(0, images), group_size=size, steps=steps)
    return setup, result


@pytest.mark.parametrize("family", ["sd3", "sd", "flux"])
def test_training_pass_rescores_the_stored_log_probs(family, tiny_sd, tiny_sd3):
    """The catch for a mismatched sampler: with the same weights, the training pass (another
    batch, another order, one step at a time) gives back the log-probs stored at sampling.
    Flow (SD3; FLUX with its packed latents and guidance input) and DDPM (SD, DDIM eta 1)."""
    if family == "flux":
        from diffalign.testing import tiny_pipeline

        pipe, transition = tiny_pipeline("flux"), FlowSDEStep(0.7)
    else:
        pipe, transition = (tiny_sd3, FlowSDEStep(0.7)) if family == "sd3" else (tiny_sd, DDIMStep(1.0))
    setup, result = rollout(pipe, transition, [0, 1])
    groups = result.groups
    assert groups.latents.shape == (6, 5, *setup.latent_shape) and groups.log_probs.shape == (6, 4)
    assert torch.isfinite(groups.log_probs).all() and groups.rewards.shape == (6,)
    batch = groups.index(torch.tensor([4, 1, 3]))
    cond = online.condition(setup, [PROMPTS[int(p)] for p in batch.prompt])
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    with torch.no_grad():
        for k in range(4):
            out = online.rescore_step(cond, denoiser, batch, k, k)
            torch.testing.assert_close(out.log_prob, batch.log_probs[:, k], atol=1e-5, rtol=1e-6)
    # a trained window stores only its transitions, the same numbers
    _, window = rollout(pipe, transition, [0, 1], steps=range(1, 3))
    torch.testing.assert_close(window.groups.log_probs, groups.log_probs[:, 1:3], atol=1e-6, rtol=0)
    torch.testing.assert_close(window.groups.latents, groups.latents[:, 1:4], atol=1e-6, rtol=0)


def test_a_gradient_step_raises_the_likelihood_of_the_better_images():
    """The sign: one small SGD step on the GRPO loss raises sum_n A_n logp_n (the images above
    their group's mean become likelier, those below less likely), re-scored afterwards."""
    from diffalign import objectives
    from diffalign.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    grpo = objectives.get_objective("grpo")
    setup, result = rollout(pipe, FlowSDEStep(0.7), [0, 1], steps=range(1, 2), size=4)
    groups = result.groups
    groups.advantages = grpo.group_advantages(groups.rewards.view(2, 4))[0].reshape(-1)
    cond = online.condition(setup, [PROMPTS[int(p)] for p in groups.prompt])
    params = [p for p in pipe.transformer.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    out = online.rescore_step(cond, pipe.transformer, groups, 0, 1)
    losses, _ = grpo.loss(out.log_prob, groups.log_probs[:, 0], scores=groups.advantages, clip_range=0.2)
    losses.mean().backward()
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 1e-3 * p.grad
        after = online.rescore_step(cond, pipe.transformer, groups, 0, 1).log_prob
    gain = (groups.advantages * (after - groups.log_probs[:, 0])).sum()
    assert gain > 0 and groups.advantages.abs().sum() > 0


def test_an_image_slot_draws_the_same_image_beside_any_other(tiny_sd3):
    """One generator an image slot: a prompt's group does not depend on the other prompts of the
    rollout (so splitting the prompts over processes changes nothing)."""
    _, both = rollout(tiny_sd3, FlowSDEStep(0.7), [0, 1])
    _, alone = rollout(tiny_sd3, FlowSDEStep(0.7), [1], prompts=PROMPTS[1:])
    torch.testing.assert_close(alone.groups.latents, both.groups.latents[3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.groups.rewards, both.groups.rewards[3:], atol=1e-4, rtol=0)
    _, other = rollout(tiny_sd3, FlowSDEStep(0.7), [5], prompts=PROMPTS[1:])
    assert not torch.allclose(other.groups.latents, alone.groups.latents)
    # sampled a prompt at a time (chunk_prompts=1): the same rollout
    setup = online.rollout_setup(tiny_sd3, "a", steps=4, guidance_scale=4.0, resolution=32, transition=FlowSDEStep(0.7))
    slots = online.image_slots([0, 1], 3)
    chunked = online.group_rollout(online.condition(setup, PROMPTS), PROMPTS, [0, 1], slots, rewards(),
                                   online.slot_generators(0, slots), group_size=3, steps=range(4), chunk_prompts=1)
    for field in online.Groups.FIELDS:
        torch.testing.assert_close(getattr(chunked.groups, field), getattr(both.groups, field), atol=1e-4, rtol=0)
    assert chunked.images.shape == both.images.shape


def test_trained_steps():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert online.trained_steps("all", 10, g()) == range(10)
    assert online.trained_steps("first:9", 10, g()) == range(9)
    windows = {tuple(online.trained_steps("window:2", 10, torch.Generator().manual_seed(s))) for s in range(40)}
    assert all(len(w) == 2 and w[1] == w[0] + 1 and 0 <= w[0] <= 8 for w in windows) and len(windows) > 3
    for bad in ("some", "window:0", "first:x", "window:11"):
        with pytest.raises(DiffalignError, match="--train-steps"):
            online.parse_train_steps(bad, 10)


def fake_groups(group_slots, size):
    slots = torch.tensor(online.image_slots(group_slots, size))
    n = len(slots)
    return online.Groups(slots // size, slots, slots.float()[:, None, None].expand(n, 2, 1).clone(),
                         torch.zeros(n, 1), slots.float(), slots.float())


def test_batches_of_two_processes_hold_the_batch_of_one():
    """Process r holds its groups; a batch of b images per process from B groups each equals,
    as a set, one process's batch of 2b from all 2B groups, in every inner epoch."""
    size, seed = 4, 7
    one, ranks = online.GroupBuffer(), [online.GroupBuffer(), online.GroupBuffer()]
    one.fill(fake_groups([0, 1, 2, 3], size), range(1), {})
    ranks[0].fill(fake_groups([0, 1], size), range(1), {})
    ranks[1].fill(fake_groups([2, 3], size), range(1), {})
    seen = []
    while (batch := one.take(8, 2, seed, size)) is not None:
        parts = [r.take(4, 2, seed, size) for r in ranks]
        assert sorted(batch.slot.tolist()) == sorted(parts[0].slot.tolist() + parts[1].slot.tolist())
        seen.append(batch.slot.tolist())
    assert all(r.take(4, 2, seed, size) is None for r in ranks)
    assert len(seen) == 4 and sorted(sum(seen[:2], [])) == list(range(16))  # an epoch sees every image once
    assert seen[0] != seen[2]  # the next inner epoch draws another order
    restored = online.GroupBuffer()
    one.fill(fake_groups([0, 1, 2, 3], size), range(2, 3), {"reward_mean": 1.5})
    one.take(8, 2, seed, size)
    restored.load_state_dict(one.state_dict())
    assert restored.steps == range(2, 3) and restored.stats == {"reward_mean": 1.5}
    assert restored.take(8, 2, seed, size).slot.tolist() == one.take(8, 2, seed, size).slot.tolist()


# --------------------------------------------------------------------------- the run
def cfg_for(model, prompts, out, **kw):
    base = dict(method="grpo", model=model, prompts=str(prompts), reward="bright", output_dir=str(out), resolution=32,
                batch_size=3, max_steps=3, lr=1e-3, lora_rank=4, checkpoint_every=0, seed=0, num_inference_steps=3,
                group_size=3, rollout_prompts=2, objective={"clip_range": 0.2})
    base.update(kw)
    return TrainConfig(**base)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_a_flow_lora_and_logs_its_groups(tiny_sd3_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    result = train(cfg_for(tiny_sd3_dir, prompts_file, out, max_steps=4, sample_every=2))
    rows = metrics(out)
    assert result["step"] == 4 and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # the first batch: policy == the sampling policy
    assert rows[0]["clipfrac"] == 0.0
    # 2 prompts x 3 images a rollout, batches of 3: two steps a rollout
    assert [r["rollouts"] for r in rows] == [1, 1, 2, 2] and rows[-1]["images"] == 12
    for key in ("reward_mean", "reward_std", "zero_std_share", "reward_time", "rollout_time", "train_time",
                "approx_kl"):
        assert key in rows[0], key
    assert 0 <= rows[0]["zero_std_share"] <= 1 and rows[0]["reward_std"] > 0
    assert any(r["ratio"] != pytest.approx(1.0, abs=1e-7) for r in rows[1:])  # the policy moved within a rollout
    assert (out / "samples" / "step-000002.png").is_file() and (out / "samples" / "step-000004.png").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_resume_equals_an_uninterrupted_run(tiny_sd_dir, prompts_file, tmp_path):
    """Checkpoint mid-rollout (step 3 of 2-step rollouts x 2 inner epochs): the rollout's images,
    advantages and place in the inner epochs come back, and the run ends as the whole one."""
    kw = dict(max_steps=5, checkpoint_every=3, inner_epochs=2, train_steps="window:2", objective={"kl_beta": 0.1})
    full = tmp_path / "full"
    train(cfg_for(tiny_sd_dir, prompts_file, full, **kw))
    part = tmp_path / "part"
    train(cfg_for(tiny_sd_dir, prompts_file, part, **{**kw, "max_steps": 3}))
    train(cfg_for(tiny_sd_dir, prompts_file, part, **kw, resume="latest"))
    a = load_file(str(full / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    ra, rb = metrics(full), metrics(part)
    for key in ("loss", "kl", "reward_mean", "rollouts"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], abs=1e-6), key
    assert ra[-1]["rollouts"] == 2 and ra[0]["kl"] == 0.0 and ra[-1]["kl"] > 0  # the KL reference ran


def no_rollout(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a rollout ran before the input was checked")

    monkeypatch.setattr(online, "group_rollout", refuse)


@pytest.mark.parametrize("change, message", [
    ({"group_size": 1}, "--group-size 1 is too small"),
    ({"reward": "videoreward"}, "scores videos"),
    ({"reward": None}, "needs --reward"),
    ({"objective": {"clip_range": 0}}, "clip_range=0 must be a positive"),
    ({"objective": {"clip_range": 1.5}}, "clip_range=1.5 must be below 1"),
    ({"objective": {"kl_beta": -0.1}}, "kl_beta=-0.1 must be a number >= 0"),
    ({"objective": {"eps": 0.1}}, "has no option eps"),
    ({"train_steps": "window:9"}, "more than the 3 sampling steps"),
    ({"train_steps": "last"}, "--train-steps 'last' is not valid"),
    ({"inner_epochs": 0}, "--inner-epochs 0"),
    ({"adv_clip_max": 0.0}, "--adv-clip-max"),
    ({"batch_size": 4}, "does not divide a rollout's 6 images"),
    ({"sampler_noise_level": 0.0}, "deterministic step"),
])
def test_bad_grpo_options_fail_in_one_line_before_loading(change, message, prompts_file, tmp_path, monkeypatch):
    no_rollout(monkeypatch)
    cfg = replace(cfg_for("no/such-model", prompts_file, tmp_path / "x"), **change)
    with pytest.raises(DiffalignError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value)


def test_spo_options_do_not_bind_grpo(prompts_file, tmp_path):
    """SPO's branching step is no GRPO option: 3 sampling steps with the default divert step 4 pass."""
    validate(cfg_for("m", prompts_file, tmp_path / "x", num_inference_steps=3, divert_start_step=4))
    with pytest.raises(DiffalignError, match="not groups of 3"):
        validate(cfg_for("m", prompts_file, tmp_path / "x", method="spo", objective={}))


def test_the_quickstart_recipe_runs_grpo_on_toy_flow(tmp_path):
    from diffalign.train import quickstart_base

    base = quickstart_base(argparse.Namespace(method="grpo", model=None, dataset=None, prompts=None, config=None))
    assert (base.method, base.model, base.prompts, base.reward) == ("grpo", "toy-flow", "toy", "toy-reward")
    assert base.eval_prompts == "toy" and "toy-judge" in base.eval_rewards
    validate(base)
    out = tmp_path / "toy"
    result = train(replace(base, output_dir=str(out), max_steps=1, rollout_prompts=1, group_size=2, batch_size=2,
                           num_inference_steps=2, train_steps="first:1", checkpoint_every=0, eval_prompts=None,
                           sample_every=0))
    assert result["step"] == 1 and (out / "pytorch_lora_weights.safetensors").is_file()
