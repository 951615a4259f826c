"""SPO's gradient path end to end: trained on one fixed batch of its own pairs, the policy comes to
prefer the winners (the margin grows, the loss falls below ln 2) while the reference stays put.
A broken sign, a detached log-prob or a reference that is the policy would fail here."""

from __future__ import annotations

import functools
import math

import torch

from diffalign import online
from diffalign.models import load_adapter
from diffalign.models.lora import add_lora, reference
from diffalign.objectives import spo
from diffalign.rewards import FunctionReward
from diffalign.sampler import DDIMStep
from diffalign.testing import tiny_pipeline


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3)) * 100


def test_the_policy_learns_to_prefer_the_winners_of_a_fixed_batch():
    torch.manual_seed(0)
    adapter = load_adapter(tiny_pipeline("sd"))
    prompts = ["a red circle", "two blue squares", "a green ring"]
    setup = online.rollout_setup(adapter, prompts[0], steps=6, guidance_scale=4.0, resolution=32,
                                 transition=DDIMStep(1.0))
    rewards = {"bright": (FunctionReward(brightness, "bright"), 1.0)}
    pairs = online.branch_rollout(online.condition(setup, prompts), prompts, [0, 1, 2], [0, 1, 2], rewards,
                                  online.slot_generators(0, [0, 1, 2]), num_candidates=3, divert_start_step=2,
                                  threshold=0.0).pairs
    assert len(pairs) >= 6
    torch.manual_seed(0)  # the LoRA's initial A, whatever ran before in this process
    params = add_lora(adapter.denoiser, 4, family=adapter.family)
    ref = functools.partial(reference, adapter.denoiser)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses, margins = [], []
    for _ in range(25):
        logp, ref_logp = online.pair_log_probs(setup, adapter.denoiser, ref, pairs, prompts)
        loss, metrics = spo.loss(logp, ref_logp, beta=10.0, eps=0.1)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(float(loss.mean().detach()))
        margins.append(metrics["reward_margin"])
    assert losses[0] == math.log(2) or abs(losses[0] - math.log(2)) < 1e-6  # policy == reference at the start
    assert losses[-1] < math.log(2) - 0.03
    assert float((margins[-1] > 0).float().mean()) > 0.5 and float(margins[-1].mean()) > 0.1
    with torch.no_grad():  # the reference is still the base model: its log-probs did not move
        _, ref_again = online.pair_log_probs(setup, adapter.denoiser, ref, pairs, prompts)
        _, ref_first = online.pair_log_probs(setup, adapter.denoiser, ref, pairs, prompts)
    torch.testing.assert_close(ref_again, ref_first)
