"""GRPO's group advantages and PPO-clipped loss (diffalign/objectives/grpo.py).

A = clip((r - mean_group) / (std + 1e-4), +-adv_clip_max), 0 for a group of equal rewards;
loss = max(-A ratio, -A clamp(ratio, 1 - clip, 1 + clip)) + kl_beta kl, ratio = exp(logp - logp_old)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.errors import DiffalignError
from diffalign.objectives import check_hparams, get_objective, hparam_names

grpo = get_objective("grpo")


def test_declares_online_groups_and_published_defaults():
    assert grpo.DATA == "prompts" and grpo.ROLLOUT == "groups" and not grpo.NEEDS_REF
    assert grpo.default_hparams("flow") == {"clip_range": 1e-4, "kl_beta": 0.0}
    assert sorted(hparam_names(grpo)) == ["clip_range", "kl_beta"]  # kl and the advantages are not options
    assert not grpo.needs_reference({"kl_beta": 0.0}) and grpo.needs_reference({"kl_beta": 0.04})
    with pytest.raises(DiffalignError, match="positive"):
        check_hparams("grpo", {"clip_range": 0})


def test_group_advantages_equal_a_hand_computation():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0],
                            [0.5, 0.5, 0.5, 0.5],    # zero variance: 0, and counted
                            [0.0, 0.0, 0.0, 100.0]])  # one outlier: +-5 clip
    adv, zero = grpo.group_advantages(rewards, clip_max=5.0)
    # group 0: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    std = math.sqrt(3.5)
    expected0 = [(r - 3.0) / (std + 1e-4) for r in (1.0, 2.0, 3.0, 6.0)]
    torch.testing.assert_close(adv[0], torch.tensor(expected0), atol=1e-6, rtol=1e-6)
    assert adv[1].eq(0).all() and zero.tolist() == [False, True, False]
    # group 2: mean 25, std sqrt(3 * 625 + 5625) / 2 = 43.30; (100 - 25) / 43.30 = 1.732, -25 / 43.30 = -0.577
    std2 = math.sqrt((3 * 25**2 + 75**2) / 4)
    torch.testing.assert_close(adv[2], torch.tensor([-25 / (std2 + 1e-4)] * 3 + [75 / (std2 + 1e-4)]), atol=1e-6,
                               rtol=1e-6)
    clipped, _ = grpo.group_advantages(rewards, clip_max=1.0)
    assert clipped[2, 3].item() == 1.0 and clipped[0, 0].item() == -1.0  # -1.07 clipped
    assert clipped[0, 1].item() == pytest.approx(-1 / (std + 1e-4))  # inside: as before


def test_global_std_divides_by_the_std_of_every_reward():
    rewards = torch.tensor([[1.0, 3.0], [10.0, 30.0], [4.0, 4.0]])
    adv, zero = grpo.group_advantages(rewards, global_std=True, clip_max=100.0)
    std = rewards.double().std(unbiased=False).item()  # numpy's np.std over all rewards (Flow-GRPO)
    expected = torch.tensor([[-1 / (std + 1e-4), 1 / (std + 1e-4)], [-10 / (std + 1e-4), 10 / (std + 1e-4)], [0, 0]])
    torch.testing.assert_close(adv, expected.float(), atol=1e-6, rtol=1e-6)
    assert zero.tolist() == [False, False, True]


def test_policy_equal_to_old_policy_gives_ratio_1_and_the_advantage_gradient():
    logp = torch.randn(6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0, -0.5, 3.0])
    losses, metrics = grpo.loss(logp, logp.detach().clone(), scores=adv)
    assert metrics["ratio"].eq(1).all() and metrics["clipfrac"].eq(0).all() and metrics["approx_kl"].eq(0).all()
    torch.testing.assert_close(losses, -adv)
    losses.mean().backward()
    torch.testing.assert_close(logp.grad, -adv / 6)  # d(-A exp(logp - old))/dlogp = -A at ratio 1


def ppo(logp, old, adv, clip):
    """The PPO formula written out per element (Schulman et al. 2017, as Flow-GRPO's train_sd3.py)."""
    out = []
    for lp, o, a in zip(logp.tolist(), old.tolist(), adv.tolist()):
        r = math.exp(lp - o)
        out.append(max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
    return torch.tensor(out)


@pytest.mark.parametrize("clip", [1e-4, 0.2])
def test_clipped_objective_equals_the_ppo_formula(clip):
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(32, generator=g) * 0.3, torch.randn(32, generator=g) * 0.3
    adv = torch.randn(32, generator=g)
    losses, _ = grpo.loss(logp, old, scores=adv, clip_range=clip)
    torch.testing.assert_close(losses, ppo(logp, old, adv, clip), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("delta, adv, moves", [
    (0.05, 1.0, False),   # ratio 1.05 > 1 + clip with A > 0: the clamped term wins, no gradient
    (0.05, -1.0, True),   # ratio above the region but A < 0: the unclipped (larger) term keeps it
    (-0.05, -1.0, False),  # ratio 0.95 < 1 - clip with A < 0: clamped, no gradient
    (-0.05, 1.0, True),   # below the region with A > 0: unclipped
    (0.01, 1.0, True),    # inside the region: gradient
])
def test_gradient_vanishes_where_the_clamp_holds(delta, adv, moves):
    logp = torch.tensor([delta], requires_grad=True)
    losses, metrics = grpo.loss(logp, torch.zeros(1), scores=torch.tensor([adv]), clip_range=0.02)
    losses.sum().backward()
    assert (logp.grad.abs().item() > 0) == moves
    assert metrics["clipfrac"].item() == (1.0 if abs(delta) > 0.02 else 0.0)


def test_kl_term_is_the_gaussian_kl_and_adds_with_its_coefficient():
    g = torch.Generator().manual_seed(2)
    mean, ref_mean = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    std = torch.tensor(0.3)
    kl = grpo.kl_divergence(mean, ref_mean, std)
    p = torch.distributions.Normal(mean.double(), std.double())
    q = torch.distributions.Normal(ref_mean.double(), std.double())
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).mean(dim=(1, 2, 3)).float())
    logp = torch.zeros(3)
    base, _ = grpo.loss(logp, logp, scores=torch.ones(3))
    with_kl, metrics = grpo.loss(logp, logp, kl, scores=torch.ones(3), kl_beta=0.04)
    torch.testing.assert_close(with_kl, base + 0.04 * kl)
    assert "kl" in metrics
