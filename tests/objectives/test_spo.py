"""SPO's loss over per-step log-probs, and the per-step log-prob it trains on.

loss = -log sigmoid(beta (log r_w - log r_l)), r = clamp(exp(logp - ref_logp), 1 - eps, 1 + eps)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.objectives import check_hparams, get_objective
from diffalign.errors import DiffalignError

spo = get_objective("spo")


def test_declares_online_data_and_paper_defaults():
    from diffalign.objectives import DATA_KINDS

    assert spo.DATA == "prompts" and "prompts" in DATA_KINDS and spo.NEEDS_REF
    assert spo.default_hparams("epsilon") == {"beta": 10.0, "eps": 0.1}
    with pytest.raises(DiffalignError, match="positive"):
        check_hparams("spo", {"eps": 0})


def test_policy_equal_to_reference_gives_log_2_on_any_pair():
    logp = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 3
    losses, metrics = spo.loss(logp, logp.clone())
    torch.testing.assert_close(losses, torch.full((16,), math.log(2)))
    assert metrics["ratio_w"].eq(1).all() and metrics["clipped"].eq(0).all()


def test_hand_computed_value():
    # log r_w = 0.05, log r_l = -0.02 (both inside [log 0.9, log 1.1]); beta 10 -> margin 0.7
    logp = torch.tensor([[1.05, 2.0]])
    ref = torch.tensor([[1.0, 2.02]])
    losses, metrics = spo.loss(logp, ref, beta=10.0, eps=0.1)
    expected = -math.log(1 / (1 + math.exp(-10 * (0.05 + 0.02))))
    assert losses.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["implicit_acc"].item() == 1.0
    # a lower winner log-prob raises the loss
    assert spo.loss(torch.tensor([[1.0, 2.0]]), ref)[0].item() > losses.item()


@pytest.mark.parametrize("delta, moves", [(0.05, True), (-0.05, True), (0.2, False), (-0.2, False)])
def test_clamp_zeroes_the_gradient_outside_the_trust_region(delta, moves):
    """exp(0.2) = 1.22 > 1.1 and exp(-0.2) = 0.82 < 0.9: the clamp holds the ratio, no gradient."""
    logp = torch.tensor([[delta, 0.01]], requires_grad=True)
    losses, metrics = spo.loss(logp, torch.zeros(1, 2), eps=0.1)
    losses.sum().backward()
    assert (logp.grad[0, 0].abs() > 0) == moves
    assert logp.grad[0, 1].abs() > 0  # the loser's ratio is inside
    assert metrics["clipped"].item() == (0.0 if moves else 0.5)


def test_transition_log_probs_equal_an_independent_gaussian(tiny_sd):
    """online.transition_log_probs (the training path: pairs grouped by step, the loser scored
    on the same Gaussian) against DDIM's posterior written out, with torch.distributions."""
    from diffalign import online
    from diffalign.sampler import DDIMStep

    setup = online.rollout_setup(tiny_sd, "a", steps=6, guidance_scale=4.0, resolution=32, transition=DDIMStep(1.0))
    g = torch.Generator().manual_seed(0)
    shape = (3, *setup.latent_shape)
    pairs = online.Pairs(torch.tensor([1, 4, 1]), torch.tensor([0, 1, 1]), torch.zeros(3, dtype=torch.long),
                         torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    prompts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        got = online.transition_log_probs(setup, tiny_sd.unet, pairs, prompts)

    sched = setup.scheduler
    expected = torch.zeros(3, 2)
    for n in range(3):
        i = int(pairs.step[n])
        t = int(setup.timesteps[i])
        prev = t - 1000 // 6
        abar, abar_prev = sched.alphas_cumprod[t], (sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod)
        embeds, negative = tiny_sd.encode_prompt([prompts[int(pairs.prompt[n])]], "cpu", 1, True)
        x = pairs.x[n: n + 1]
        with torch.no_grad():
            out = tiny_sd.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, embeds])).sample
        uncond, cond = out.chunk(2)
        eps = uncond + 4.0 * (cond - uncond)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        std = ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).sqrt() * eps
        normal = torch.distributions.Normal(mean.double(), std.double())
        for j, target in enumerate((pairs.win, pairs.lose)):
            expected[n, j] = normal.log_prob(target[n: n + 1].double()).mean().float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
